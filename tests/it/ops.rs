//! Operations against the real binary and the in-process server: graceful
//! shutdown on SIGTERM and SIGINT (streams finish, the listener closes at
//! once, idle keep-alive connections close promptly, the grace is enforced,
//! exit status 0), draining readiness, and logs that never show a whole key.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gaia_balancer::config::Config;
use gaia_balancer::{routes, server};

use crate::fake::{content_event, finish_events, refused_url, role_event, Reply, Step, Upstream};
use crate::process::Balancer;
use crate::util::{chat, connect, host, post, read_response, request, test_settings, wait_for};

/// The binary on `dir` with 8 workers, logging at `level`.
fn start(dir: &Path, level: &str) -> Balancer {
    Balancer::start(dir, "", &["--workers", "8"], level)
}

fn temp_dir(name: &str) -> PathBuf {
    crate::process::temp_dir("it-ops", name)
}

/// `balancer.json` for tests that count upstream traffic: model discovery's
/// polls of `/v1/models` would add to it.
const NO_DISCOVERY: &str = r#"{"discoveryIntervalMs": 0}"#;

/// A config directory with these hosts (JSON values) and `balancer.json` text.
fn config(name: &str, hosts: &[String], balancer: &str) -> PathBuf {
    let dir = temp_dir(name);
    std::fs::write(
        dir.join("hosts.json"),
        format!(r#"{{"hosts": [{}]}}"#, hosts.join(", ")),
    )
    .unwrap();
    std::fs::write(dir.join("balancer.json"), balancer).unwrap();
    dir
}

fn quoted(url: &str) -> String {
    format!("\"{url}\"")
}

/// A slow stream: content at once, then `pause` between further events.
fn slow_stream(pause: Duration) -> Reply {
    Reply::sse(vec![
        Step::Send(role_event()),
        Step::Send(content_event("one")),
        Step::Sleep(pause),
        Step::Send(content_event("two")),
        Step::Sleep(pause),
        Step::Send(content_event("three")),
        Step::Sleep(pause),
        Step::Send(finish_events()),
    ])
}

/// The head of a streamed chat request on a keep-alive connection.
fn stream_request() -> Vec<u8> {
    let body = chat(true);
    let mut all = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    all.extend_from_slice(body.as_bytes());
    all
}

fn refused(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err()
}

#[test]
fn sigterm_lets_a_stream_finish_refuses_new_connections_and_exits_0() {
    let up = Upstream::always(slow_stream(Duration::from_millis(400)));
    let dir = config("sigterm", &[quoted(&up.url())], NO_DISCOVERY);
    let mut bin = start(&dir, "info");
    let addr = bin.addr;

    // A keep-alive stream with a /readyz request pipelined behind it: the
    // second request is read only after the stream, i.e. while draining.
    let mut s = connect(addr);
    let mut bytes = stream_request();
    bytes.extend_from_slice(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n");
    s.write_all(&bytes).unwrap();
    let client = std::thread::spawn(move || {
        let mut reader = BufReader::new(s);
        let stream = read_response(&mut reader).unwrap();
        let ready = read_response(&mut reader).unwrap();
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        (stream, ready, rest)
    });
    // The balancer is in the middle of the stream once "one" left the upstream.
    assert!(wait_for(Duration::from_secs(10), || up.sent().len() >= 2));

    bin.signal("TERM");
    assert!(bin.logged("SIGTERM received: draining", Duration::from_secs(5)));
    assert!(
        wait_for(Duration::from_secs(5), || refused(addr)),
        "new connections are still accepted after SIGTERM"
    );
    assert!(
        up.sent().len() < 5,
        "the stream ended before the refusal was observed; the test proves nothing"
    );

    let (stream, ready, rest) = client.join().unwrap();
    assert_eq!(stream.status, 200);
    assert!(stream.complete, "stream cut: {}", stream.text());
    let text = stream.text();
    assert!(
        text.contains("three") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert_eq!(ready.status, 503);
    assert_eq!(ready.text(), "draining\n");
    assert_eq!(ready.header("connection"), Some("close"));
    assert!(
        rest.is_empty(),
        "the connection stays closed after draining"
    );

    let status = bin.exit_within(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{:?}", bin.lines());
    assert!(bin.logged("drained in", Duration::from_secs(1)));
}

#[test]
fn sigint_closes_idle_keep_alive_connections_and_exits_0_at_once() {
    let up = Upstream::always(Reply::json(200, r#"{"ok":true}"#));
    // A long keep-alive: the exit must not wait for it.
    let dir = config(
        "sigint",
        &[quoted(&up.url())],
        r#"{"keepAliveMs": 60000, "discoveryIntervalMs": 0}"#,
    );
    let mut bin = start(&dir, "info");
    let mut s = connect(bin.addr);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(s);
    assert_eq!(read_response(&mut reader).unwrap().status, 200);

    let sent = Instant::now();
    bin.signal("INT");
    let status = bin.exit_within(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{:?}", bin.lines());
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "exit took {:?}",
        sent.elapsed()
    );
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert!(bin.logged("SIGINT received: draining", Duration::from_secs(1)));
}

#[test]
fn the_grace_ends_a_stream_that_runs_too_long_and_still_exits_0() {
    let up = Upstream::always(slow_stream(Duration::from_secs(30)));
    let dir = config(
        "grace",
        &[quoted(&up.url())],
        r#"{"shutdownGraceMs": 300, "discoveryIntervalMs": 0}"#,
    );
    let mut bin = start(&dir, "info");
    let mut s = connect(bin.addr);
    s.write_all(&stream_request()).unwrap();
    let client = std::thread::spawn(move || read_response(&mut BufReader::new(s)));
    assert!(wait_for(Duration::from_secs(10), || up.sent().len() >= 2));

    let sent = Instant::now();
    bin.signal("TERM");
    let status = bin.exit_within(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{:?}", bin.lines());
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
    assert!(bin.logged(
        "ran out with requests still in flight",
        Duration::from_secs(1)
    ));
    // The client sees a cut-off stream, never a finished one.
    let resp = client.join().unwrap().unwrap();
    assert!(!resp.complete && !resp.text().contains("[DONE]"));
}

#[test]
fn draining_in_process_refuses_connections_and_reports_not_ready() {
    let up = Upstream::always(slow_stream(Duration::from_millis(300)));
    // Started here rather than through util::start, so that the test owns shutdown.
    let mut config = Config {
        dir: PathBuf::from("test"),
        hosts: vec![host(0, &up.url())],
        api_keys: Vec::new(),
        settings: test_settings(),
    };
    config.settings.keep_alive = Duration::from_secs(60);
    let srv = server::start(config).unwrap();
    let addr = srv.local_addr();
    let shared = srv.shared().clone();
    assert_eq!(routes::readiness(&shared, &shared.current()).0, 200);

    // An idle keep-alive connection, and a stream in flight.
    let mut idle = connect(addr);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut idle = BufReader::new(idle);
    assert_eq!(read_response(&mut idle).unwrap().status, 200);
    let streaming = std::thread::spawn(move || post(addr, "/v1/chat/completions", &chat(true)));
    assert!(wait_for(Duration::from_secs(10), || up.sent().len() >= 2));

    let stopper = std::thread::spawn(move || srv.shutdown(Duration::from_secs(10)));
    assert!(wait_for(Duration::from_secs(5), || shared.draining()));
    assert_eq!(
        routes::readiness(&shared, &shared.current()),
        (503, "draining\n")
    );
    assert!(wait_for(Duration::from_secs(5), || refused(addr)));
    // The idle connection is closed within a poll, not after keepAliveMs.
    let closed_at = Instant::now();
    let mut rest = Vec::new();
    let _ = idle.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert!(closed_at.elapsed() < Duration::from_secs(2));

    let resp = streaming.join().unwrap();
    assert!(resp.complete && resp.text().ends_with("data: [DONE]\n\n"));
    assert!(
        stopper.join().unwrap(),
        "workers did not finish within the grace"
    );
}

/// True when `line` holds 6 or more consecutive characters of `key`: more
/// than the 4-character mask shows, and enough to catch a hex dump's text
/// column, which cuts a key into 16-byte rows.
fn leaks(line: &str, key: &str) -> bool {
    let chars: Vec<char> = key.chars().collect();
    chars
        .windows(6)
        .any(|w| line.contains(&w.iter().collect::<String>()))
}

#[test]
fn the_leak_check_catches_whole_keys_and_hex_dump_rows() {
    let key = "gaia-Qm7tZ2pXv9LrK4sWnYb8";
    assert!(leaks(&format!("Authorization: Bearer {key}"), key));
    // A ureq_proto trace row: 16 bytes in hex, then their text.
    assert!(leaks(
        "6761 6961 2d51 6d37 745a 3270 5876 394c gaia-Qm7tZ2pXv9L",
        key
    ));
    assert!(!leaks("key ...Ynb8 cooled", key));
    assert!(!leaks("key ...Yb8 ...nYb8", key));
}

#[test]
fn no_log_line_at_trace_contains_a_whole_key() {
    let global = "gaia-Qm7tZ2pXv9LrK4sWnYb8";
    let own = "sk-or-Hd3fJ8kLq2Wz5VnR7cTu";
    // Requests in turn: 401 (bad key), JSON, stream; the refused host and
    // the 401 make the balancer fail over and log its attempts.
    let revoked = "gaia-Rv5kWq8ZtN3mLp6XcJd2";
    // The revoked key gets a 401 (and leaves rotation); the other one works.
    let up = Upstream::start(move |seen, _| {
        if seen.header("authorization") == Some(&format!("Bearer {revoked}")) {
            return Reply::json(401, r#"{"error":{"message":"invalid api key"}}"#);
        }
        if String::from_utf8_lossy(&seen.body).contains("\"stream\":true") {
            slow_stream(Duration::from_millis(5))
        } else {
            Reply::json(200, r#"{"ok":true}"#)
        }
    });
    let paid = Upstream::always(Reply::json(401, r#"{"error":"bad key"}"#));
    let dir = config(
        "logs",
        &[
            quoted(&refused_url()),
            quoted(&up.url()),
            format!(
                r#"{{"url": "{}", "backup": true, "apiKeys": ["{own}"]}}"#,
                paid.url()
            ),
        ],
        "{}",
    );
    std::fs::write(
        dir.join("api-keys.json"),
        format!(
            r#"{{"apiKeys": [{{"key": "{revoked}"}}, {{"key": "{global}", "isActive": true}}]}}"#
        ),
    )
    .unwrap();
    let mut bin = start(&dir, "trace");
    let addr = bin.addr;
    let mut statuses = Vec::new();
    for i in 0..6 {
        let r = post(addr, "/v1/chat/completions", &chat(i % 2 == 1));
        statuses.push(r.status);
    }
    // A client that sends a pool key as its own bearer token.
    let r = request(
        addr,
        "POST",
        "/v1/embeddings",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &format!("Bearer {global}")),
        ],
        b"{}",
    );
    statuses.push(r.status);
    assert!(statuses.contains(&200), "{statuses:?}");
    // The key was really in play: the upstream received it.
    assert!(up
        .requests()
        .iter()
        .any(|s| s.header("authorization") == Some(&format!("Bearer {global}"))));

    bin.terminate_cleanly();
    let lines = bin.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("TRACE") || l.contains("DEBUG")),
        "not at trace: {lines:?}"
    );
    // The libraries' debug lines, which only trace lets through, were checked too.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("DEBUG [ureq::run] Request {")),
        "no ureq request lines: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" POST /v1/chat/completions 200 host=")),
        "no per-request line: {lines:?}"
    );
    for key in [global, own, revoked] {
        let bad: Vec<&String> = lines.iter().filter(|l| leaks(l, key)).collect();
        assert!(bad.is_empty(), "key material in the log: {bad:#?}");
    }
}

/// README "Logs": at debug (the default level) the upstream libraries log
/// at info at most: their eleven lines per request had halved throughput.
#[test]
fn at_debug_the_upstream_libraries_stay_quiet() {
    let up = Upstream::always(Reply::json(200, r#"{"ok":true}"#));
    let dir = config("debug-quiet", &[quoted(&up.url())], NO_DISCOVERY);
    let mut bin = start(&dir, "debug");
    for _ in 0..3 {
        assert_eq!(
            post(bin.addr, "/v1/chat/completions", &chat(false)).status,
            200
        );
    }
    bin.terminate_cleanly();
    let lines = bin.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" POST /v1/chat/completions 200 host=")),
        "no per-request line: {lines:?}"
    );
    let noisy: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("[ureq") || l.contains("[rustls"))
        .collect();
    assert!(noisy.is_empty(), "library lines at debug: {noisy:#?}");
}

#[test]
fn every_request_gets_an_info_line_refused_and_abandoned_ones_included() {
    let up = Upstream::always(slow_stream(Duration::from_secs(2)));
    let host = format!(r#"{{"url": "{}", "name": "node-a"}}"#, up.url());
    let dir = config("info-lines", &[host], NO_DISCOVERY);
    let mut bin = start(&dir, "info");

    // A head refused before any body (413 from Content-Length) gets an id and a line.
    let mut s = connect(bin.addr);
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000000\r\n\r\n",
    )
    .unwrap();
    let r = read_response(&mut BufReader::new(s)).unwrap();
    assert_eq!(r.status, 413);
    let id = r.header("x-request-id").expect("an id").to_string();
    assert!(
        bin.logged(&format!("{id} - - 413 host=-"), Duration::from_secs(5)),
        "{:?}",
        bin.lines()
    );

    // A client that leaves mid-stream: 499, and the host that served it is named.
    let mut s = connect(bin.addr);
    s.write_all(&stream_request()).unwrap();
    let mut first = [0u8; 64];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(s.read(&mut first).unwrap() > 0);
    drop(s);
    assert!(
        bin.logged(
            " POST /v1/chat/completions 499 host=node-a ",
            Duration::from_secs(10)
        ),
        "{:?}",
        bin.lines()
    );
    bin.terminate_cleanly();
}

#[test]
fn sighup_re_reads_the_configuration_and_never_stops_the_process() {
    let key = "gaia-HupRevoked4Hn8sQ2vX";
    let bearer = format!("Bearer {key}");
    let up = Upstream::start(move |seen, _| {
        if seen.header("authorization") == Some(&bearer) {
            Reply::json(401, r#"{"error":{"message":"invalid key"}}"#)
        } else {
            slow_stream(Duration::from_millis(300))
        }
    });
    let dir = config("sighup", &[quoted(&up.url())], NO_DISCOVERY);
    std::fs::write(
        dir.join("api-keys.json"),
        format!(r#"{{"apiKeys": [{{"key": "{key}"}}, {{"key": "gaia-HupGood5Jk9wE3rP7cY"}}]}}"#),
    )
    .unwrap();
    let mut bin = start(&dir, "info");
    let key_state =
        |addr| request(addr, "GET", "/status", &[], b"").json()["keys"][0]["state"].clone();
    // Rotation reaches the revoked key within a few requests (the other key serves them).
    assert!(wait_for(Duration::from_secs(10), || {
        assert_eq!(post(bin.addr, "/v1/embeddings", "{}").status, 200);
        key_state(bin.addr) == "disabled"
    }));

    // A stream in flight while SIGHUP arrives runs to its end.
    let before = up.sent().len();
    let mut s = connect(bin.addr);
    s.write_all(&stream_request()).unwrap();
    let client = std::thread::spawn(move || read_response(&mut BufReader::new(s)));
    assert!(wait_for(Duration::from_secs(10), || up.sent().len() >= before + 2));
    bin.signal("HUP");
    assert!(bin.logged(
        "SIGHUP received: re-reading the configuration",
        Duration::from_secs(5)
    ));
    // The files are unchanged, yet the rejected key is back.
    assert!(
        wait_for(Duration::from_secs(5), || key_state(bin.addr) == "active"),
        "{:?}",
        bin.lines()
    );
    let resp = client.join().unwrap().unwrap();
    assert!(resp.text().ends_with("data: [DONE]\n\n"), "{}", resp.text());
    assert!(
        bin.exit_within(Duration::from_millis(200)).is_none(),
        "still running"
    );
    bin.terminate_cleanly();
}

#[test]
fn a_client_that_resets_mid_body_is_logged_499_as_it_is_counted() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let dir = config("reset-mid-body", &[quoted(&up.url())], NO_DISCOVERY);
    let mut bin = start(&dir, "info");
    // Expect: 100-continue, and the 100 is left unread: closing the socket
    // with it still in the receive buffer sends a reset, so the balancer's
    // body read fails with an I/O error, before any answer.
    let s = connect(bin.addr);
    (&s).write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nX-Request-Id: reset-1\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n{\"a\"",
    )
    .unwrap();
    let mut peek = [0u8; 8];
    assert!(s.peek(&mut peek).unwrap() > 0, "the 100 arrived");
    drop(s);
    assert!(
        bin.logged("reset-1 POST /v1/chat/completions ", Duration::from_secs(5)),
        "{:?}",
        bin.lines()
    );
    let line = bin
        .lines()
        .into_iter()
        .find(|l| l.contains("reset-1 POST"))
        .unwrap();
    assert!(
        line.contains(" POST /v1/chat/completions 499 host=- "),
        "{line}"
    );
    let metrics = request(bin.addr, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains("gaia_balancer_requests_total{route=\"chat\",code=\"499\"} 1"),
        "{metrics}"
    );
    assert_eq!(up.hits(), 0);
    bin.terminate_cleanly();
}

#[test]
fn a_request_id_with_spaces_is_replaced_so_log_fields_stay_apart() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let dir = config("spaced-id", &[quoted(&up.url())], NO_DISCOVERY);
    let mut bin = start(&dir, "info");
    // Spaces would let the id pose as the fields after it in the info line.
    let spoof = "x GET /healthz 200 host=- attempts=0 0ms";
    let r = request(
        bin.addr,
        "POST",
        "/v1/embeddings",
        &[
            ("X-Request-Id", spoof),
            ("Content-Type", "application/json"),
        ],
        b"{}",
    );
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").expect("an id").to_string();
    assert_eq!(id.len(), 16, "a generated id, not {id:?}");
    assert_eq!(up.requests()[0].header("x-request-id"), Some(id.as_str()));
    assert!(
        bin.logged(
            &format!("{id} POST /v1/embeddings 200 host="),
            Duration::from_secs(5)
        ),
        "{:?}",
        bin.lines()
    );
    // Visible characters are kept as sent.
    let r = request(
        bin.addr,
        "POST",
        "/v1/embeddings",
        &[
            ("X-Request-Id", "trace-7f3a/b:c"),
            ("Content-Type", "application/json"),
        ],
        b"{}",
    );
    assert_eq!(r.header("x-request-id"), Some("trace-7f3a/b:c"));
    bin.terminate_cleanly();
}

#[test]
fn a_panic_is_logged_without_the_query_string() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let dir = config("panic-query", &[quoted(&up.url())], NO_DISCOVERY);
    let mut bin = start(&dir, "info");
    // Some clients put their key in the query (Azure-style `api-key=`); the
    // info line leaves the query out, and so must the panic's error line.
    let r = request(
        bin.addr,
        "GET",
        "/v1/models?api-key=client-Secret-9Xq2",
        &[("X-Request-Id", "panic-1"), ("x-gaia-debug-panic", "1")],
        b"",
    );
    assert_eq!(r.status, 500);
    assert!(
        bin.logged("panic-1 GET /v1/models 500 ", Duration::from_secs(5)),
        "{:?}",
        bin.lines()
    );
    let lines = bin.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("panic-1: panic while serving GET /v1/models")),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("Secret-9Xq2")),
        "{lines:?}"
    );
    bin.terminate_cleanly();
}
