//! The proxy path: pass-through, failover, keys, client keys.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::fake::{refused_url, Reply, Step, Upstream};
use crate::util::{chat, post, request, start};

const OK: &str = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;

#[test]
fn body_reaches_upstream_byte_for_byte_and_answer_comes_back() {
    let up = Upstream::always(Reply::json(200, OK));
    let bal = start(&[up.url()], &["pool-key-000000000001"], |_| {});
    // Odd spacing and key order must survive untouched.
    let body = "{ \"model\" : \"m\",\"messages\":[{\"role\":\"user\",\"content\":\"h\\u00e9\"}] ,\"x\":1 }";
    let r = request(
        bal.addr,
        "POST",
        "/v1/chat/completions?trace=1",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer client-secret"),
            ("X-Request-Id", "req-123"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), OK);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-request-id"), Some("req-123"));
    assert_eq!(r.header("x-gaia-upstream"), Some("h0"));
    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, body.as_bytes());
    assert_eq!(seen[0].path, "/v1/chat/completions?trace=1");
    assert_eq!(
        seen[0].header("authorization"),
        Some("Bearer pool-key-000000000001")
    );
    assert_eq!(seen[0].header("x-request-id"), Some("req-123"));
}

#[test]
fn no_pool_key_means_no_authorization_upstream() {
    let up = Upstream::always(Reply::json(200, OK));
    let bal = start(&[up.url()], &[], |_| {});
    let r = request(
        bal.addr,
        "POST",
        "/v1/embeddings",
        &[
            ("Authorization", "Bearer client"),
            ("Content-Type", "application/json"),
        ],
        b"{\"input\":\"a\"}",
    );
    assert_eq!(r.status, 200);
    assert_eq!(up.requests()[0].header("authorization"), None);
    // A request id is generated when the client sends none.
    assert!(r.header("x-request-id").is_some_and(|v| v.len() == 16));
    assert_eq!(
        up.requests()[0].header("x-request-id"),
        r.header("x-request-id")
    );
}

#[test]
fn base_url_with_v1_is_not_doubled() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[format!("{}/v1", up.url())], &[], |c| {
        // The loader strips /v1; this checks the proxy appends the path once.
        c.hosts[0].base_url = c.hosts[0].base_url.trim_end_matches("/v1").to_string();
    });
    post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(up.requests()[0].path, "/v1/chat/completions");
}

#[test]
fn retryable_statuses_fail_over_to_the_next_host() {
    for status in [429u16, 404, 500, 502, 503, 504, 401, 403] {
        let bad = Upstream::always(Reply::json(status, r#"{"error":{"message":"no"}}"#));
        let good = Upstream::always(Reply::json(200, OK));
        let bal = start(&[bad.url(), good.url()], &[], |_| {});
        // Two requests: whichever host round-robin picks first, both succeed.
        for _ in 0..2 {
            let r = post(bal.addr, "/v1/chat/completions", &chat(false));
            assert_eq!(r.status, 200, "status {status}: {}", r.text());
            assert_eq!(r.text(), OK);
            assert_eq!(r.header("x-gaia-upstream"), Some("h1"));
        }
        assert!(bad.hits() >= 1, "status {status}: bad host never tried");
        let trail = post(bal.addr, "/v1/chat/completions", &chat(false));
        let attempts = trail.header("x-gaia-attempts").unwrap().to_string();
        assert!(attempts.ends_with("h1:200"), "{attempts}");
    }
}

#[test]
fn refused_and_hanging_hosts_fail_over() {
    let good = Upstream::always(Reply::json(200, OK));
    let hang = Upstream::always(Reply::Hang(Duration::from_secs(10)));
    let close = Upstream::always(Reply::Close);
    let bal = start(
        &[refused_url(), hang.url(), close.url(), good.url()],
        &[],
        |c| {
            c.settings.timeouts.first_byte = Duration::from_millis(500);
        },
    );
    for _ in 0..4 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-gaia-upstream"), Some("h3"));
    }
    assert!(hang.hits() >= 1);
    assert!(close.hits() >= 1);
}

#[test]
fn client_errors_pass_through_with_one_upstream_hit() {
    let body = r#"{"error":{"message":"bad request","type":"invalid_request_error"}}"#;
    let up = Upstream::always(Reply::json(400, body));
    let other = Upstream::always(Reply::json(200, OK));
    let bal = start(&[up.url(), other.url()], &[], |c| c.hosts.truncate(1));
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 400);
    assert_eq!(r.text(), body);
    assert_eq!(up.hits(), 1);
    assert_eq!(other.hits(), 0);
}

#[test]
fn every_attempt_failing_gives_502_within_max_attempts() {
    let a = Upstream::always(Reply::json(500, "{}"));
    let b = Upstream::always(Reply::json(503, "{}"));
    let bal = start(&[a.url(), b.url()], &[], |c| c.settings.max_attempts = 3);
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_failed");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(a.hits() + b.hits(), 3);
}

#[test]
fn total_timeout_gives_504() {
    let hang = Upstream::always(Reply::Hang(Duration::from_secs(10)));
    let bal = start(&[hang.url()], &[], |c| {
        c.settings.timeouts.total = Duration::from_millis(600);
        c.settings.timeouts.first_byte = Duration::from_secs(5);
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 504, "{}", r.text());
}

#[test]
fn keys_rotate_round_robin() {
    let up = Upstream::always(Reply::json(200, OK));
    let keys = [
        "key-aaaaaaaaaaaa-0001",
        "key-bbbbbbbbbbbb-0002",
        "key-cccccccccccc-0003",
    ];
    let bal = start(&[up.url()], &keys, |_| {});
    for _ in 0..6 {
        assert_eq!(post(bal.addr, "/v1/embeddings", "{}").status, 200);
    }
    let used: Vec<String> = up
        .requests()
        .iter()
        .map(|s| s.header("authorization").unwrap().to_string())
        .collect();
    let expected: Vec<String> = keys
        .iter()
        .cycle()
        .take(6)
        .map(|k| format!("Bearer {k}"))
        .collect();
    assert_eq!(used, expected);
}

#[test]
fn a_rejected_key_is_not_reused_within_the_request() {
    let up = Upstream::start(|seen, _| {
        if seen.header("authorization") == Some("Bearer key-bad-xxxxxxxxxxxx") {
            Reply::json(401, r#"{"error":{"message":"bad key"}}"#)
        } else {
            Reply::json(200, OK)
        }
    });
    let bal = start(
        &[up.url()],
        &["key-bad-xxxxxxxxxxxx", "key-good-xxxxxxxxxxx"],
        |_| {},
    );
    for _ in 0..4 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // The trail names keys by their last 4 characters only.
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    let trail = r.header("x-gaia-attempts").unwrap();
    assert!(!trail.contains("key-"), "{trail}");
}

/// RFC 9110 §15.5.2: a 401 carries `WWW-Authenticate` with the scheme to
/// use, Bearer for client keys and the admin key alike.
#[test]
fn a_401_says_how_to_authenticate() {
    let up = Upstream::always(Reply::json(200, OK));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.client_keys = vec!["client-key-1".into()];
        c.settings.admin_key = Some("admin-Secret-1234".into());
    });
    let wrong = [("Authorization", "Bearer nope")];
    for (method, path, headers) in [
        ("POST", "/v1/chat/completions", &[][..]),
        ("POST", "/v1/chat/completions", &wrong[..]),
        ("GET", "/status", &[][..]),
        ("GET", "/status", &wrong[..]),
        ("GET", "/metrics", &[][..]),
    ] {
        let body = if method == "POST" {
            chat(false)
        } else {
            String::new()
        };
        let r = request(bal.addr, method, path, headers, body.as_bytes());
        assert_eq!(r.status, 401, "{path}: {}", r.text());
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer realm=\"gaia-balancer"),
            "{path} {headers:?}: {:?}",
            r.headers
        );
    }
    // The admin key answers to its own realm, so a client can tell which
    // key was asked for.
    let admin = request(bal.addr, "GET", "/status", &[], b"");
    let client = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_ne!(
        admin.header("www-authenticate"),
        client.header("www-authenticate")
    );
    assert_eq!(up.hits(), 0);
}

#[test]
fn client_keys_are_required_when_configured() {
    let up = Upstream::always(Reply::json(200, OK));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.client_keys = vec!["client-key-1".into()]
    });
    let none = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(none.status, 401);
    assert_eq!(none.json()["error"]["code"], "invalid_api_key");
    let wrong = request(
        bal.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer nope")],
        chat(false).as_bytes(),
    );
    assert_eq!(wrong.status, 401);
    let right = request(
        bal.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer client-key-1")],
        chat(false).as_bytes(),
    );
    assert_eq!(right.status, 200);
    assert_eq!(up.hits(), 1);
    // The client's key never reaches the upstream.
    assert_eq!(up.requests()[0].header("authorization"), None);
}

#[test]
fn errors_are_openai_shaped() {
    let up = Upstream::always(Reply::json(200, OK));
    let bal = start(&[up.url()], &[], |_| {});
    // Methods the upstream client cannot send (or must not: TRACE echoes
    // headers) are refused here, so no host is blamed or ejected for them.
    let cases: [(&str, &str, &[u8], u16); 8] = [
        ("GET", "/nope", b"", 404),
        ("POST", "/v1/models", b"", 405),
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("DELETE", "/healthz", b"", 405),
        ("FOO", "/v1/chat/completions", b"", 405),
        ("PROPFIND", "/v1/files", b"", 405),
        ("TRACE", "/v1/files", b"", 405),
        ("POST", "/v1/%2e%2e/status", b"{}", 400),
    ];
    for (method, path, body, status) in cases {
        let r = request(
            bal.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            body,
        );
        assert_eq!(r.status, status, "{method} {path}");
        let v = r.json();
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(v["error"]["type"].is_string());
        assert!(v["error"]["code"].is_string());
    }
    assert_eq!(up.hits(), 0);
}

#[test]
fn models_and_other_v1_paths_are_forwarded() {
    let up = Upstream::always(Reply::json(200, r#"{"object":"list","data":[]}"#));
    let bal = start(&[up.url()], &[], |_| {});
    let r = request(bal.addr, "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 200);
    let r = post(bal.addr, "/v1/completions", r#"{"prompt":"x"}"#);
    assert_eq!(r.status, 200);
    let paths: Vec<String> = up
        .requests()
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    assert_eq!(paths, ["GET /v1/models", "POST /v1/completions"]);
}

#[test]
fn health_endpoints_answer() {
    let up = Upstream::always(Reply::json(200, OK));
    let bal = start(&[up.url()], &["pool-key-secret-0000-wxyz"], |_| {});
    assert_eq!(request(bal.addr, "GET", "/healthz", &[], b"").status, 200);
    assert_eq!(request(bal.addr, "GET", "/readyz", &[], b"").status, 200);
    let status = request(bal.addr, "GET", "/status", &[], b"");
    assert_eq!(status.status, 200);
    assert!(
        !status.text().contains("pool-key-secret"),
        "{}",
        status.text()
    );
    assert!(status.text().contains("wxyz"));
}

#[test]
fn upstream_header_values_are_checked_before_copying() {
    // A control byte makes the upstream response malformed: a failed attempt.
    let ctl = Upstream::always(
        Reply::Full {
            status: 200,
            headers: vec![],
            body: b"{}".to_vec(),
        }
        .with_header("Content-Type", "application/json\u{1}X-Injected: 1"),
    );
    let bal = start(&[ctl.url()], &[], |c| c.settings.max_attempts = 1);
    let r = post(bal.addr, "/v1/embeddings", "{}");
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-injected"), None);
    // Bytes the upstream parser tolerates but a client should not get are dropped.
    let odd = Upstream::always(
        Reply::Full {
            status: 200,
            headers: vec![],
            body: b"{}".to_vec(),
        }
        .with_header("Content-Type", "application/json\u{ff}"),
    );
    let bal = start(&[odd.url()], &[], |_| {});
    let r = post(bal.addr, "/v1/embeddings", "{}");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), None);
    assert_eq!(r.text(), "{}");
}

/// Pooled upstream connections are probed before reuse: an upstream that
/// closes every connection after its answer (keep-alive timeout, restart)
/// costs no failed attempt, no retry and no host failure.
#[test]
fn an_upstream_closing_idle_connections_costs_no_attempt() {
    let up = Upstream::always(Reply::Closing(Box::new(Reply::json(200, OK))));
    let bal = start(&[up.url()], &[], |_| {});
    for i in 0..20 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.header("x-gaia-attempts"), Some("h0:200"), "request {i}");
        // The close has happened before the next request takes a connection.
        assert!(
            crate::util::wait_for(Duration::from_secs(5), || up.closed() > i),
            "the fake did not close after request {i}"
        );
    }
    assert_eq!(up.hits(), 20);
    // The last success is recorded just after its answer went out.
    let status = || crate::util::request(bal.addr, "GET", "/status", &[], b"").json();
    crate::util::wait_for(Duration::from_secs(5), || {
        status()["hosts"][0]["successes"] == 20
    });
    let status = status();
    let host = &status["hosts"][0];
    assert_eq!(host["failures"], 0, "{status}");
    assert_eq!(host["successes"], 20, "{status}");
}

/// A client that stops reading an answer is cut after writeTimeoutMs and
/// counted as 499 (it went away), not as a 200 it never received. The
/// answer (6 MiB) is one the balancer holds whole and sends in one write.
#[test]
fn a_client_that_stops_reading_is_counted_as_499() {
    let big = format!("{{\"data\":\"{}\"}}", "x".repeat(6 << 20));
    let up = Upstream::always(Reply::json(200, &big));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.write_timeout = Duration::from_millis(300);
    });
    // A tiny receive window (set before connecting), so the kernel cannot
    // absorb the answer on the client's behalf.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&bal.addr.into()).unwrap();
    let mut s: std::net::TcpStream = socket.into();
    let body = chat(false);
    let req = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
    // Never read; wait for the balancer to give up on us.
    let metrics = || crate::util::request(bal.addr, "GET", "/metrics", &[], b"").text();
    let counted = crate::util::wait_for(Duration::from_secs(20), || {
        metrics().lines().any(|l| {
            l.contains("requests_total{")
                && l.contains("route=\"embeddings\"")
                && l.contains("code=\"499\"")
        })
    });
    let m = metrics();
    assert!(counted, "no 499 counted:\n{m}");
    assert!(
        !m.lines().any(|l| l.contains("requests_total{")
            && l.contains("route=\"embeddings\"")
            && l.contains("code=\"200\"")),
        "the cut answer was counted as delivered:\n{m}"
    );
    drop(s);
}

#[test]
fn an_upstream_response_head_over_16_kib_is_a_clear_502() {
    let fits = "a".repeat(12 * 1024);
    let too_big = "b".repeat(20 * 1024);
    let up = Upstream::start(move |seen, _| {
        let value = if seen.path.contains("embeddings") {
            &fits
        } else {
            &too_big
        };
        Reply::json(200, "{\"ok\":1}").with_header("X-Large", value)
    });
    let bal = start(&[up.url()], &[], |_| {});
    // A 12 KiB head is read (the input buffer grows past its 4 KiB start);
    // only the body and content type are passed on.
    let r = post(bal.addr, "/v1/embeddings", "{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "{\"ok\":1}");
    // 20 KiB: refused with the reason, not as a misleading disconnect.
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("response head larger than 16 KiB"),
        "{}",
        r.text()
    );
}

#[test]
fn a_client_head_near_the_32_kib_limit_is_forwarded_whole() {
    let up = Upstream::always(Reply::json(200, OK));
    let bal = start(&[up.url()], &["pool-key-000000000001"], |_| {});
    // Four 7.5 KiB headers: under the 8 KiB line and 32 KiB head limits.
    let value = "v".repeat(7 * 1024 + 512);
    let names = ["x-fill-a", "x-fill-b", "x-fill-c", "x-fill-d"];
    let mut headers: Vec<(&str, &str)> = names.iter().map(|n| (*n, value.as_str())).collect();
    headers.push(("Content-Type", "application/json"));
    let r = request(
        bal.addr,
        "POST",
        "/v1/chat/completions",
        &headers,
        chat(false).as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = &up.requests()[0];
    for name in names {
        assert_eq!(seen.header(name).map(str::len), Some(value.len()), "{name}");
    }
}

#[test]
fn an_upstream_echoing_the_pool_key_never_shows_it_to_the_client() {
    const KEY: &str = "pool-key-echoed-0000-WXYZ";
    // The 401 quotes the key; with one key and one host every attempt fails,
    // so the 502 quotes the last upstream error.
    let up = Upstream::start(|seen, _| {
        let sent = seen.header("authorization").unwrap_or("").to_string();
        if seen.path.contains("embeddings") {
            Reply::json(
                400,
                &format!(r#"{{"error":{{"message":"bad input for {sent}"}}}}"#),
            )
        } else {
            Reply::json(
                401,
                &format!(r#"{{"error":{{"message":"invalid key {sent}"}}}}"#),
            )
        }
    });
    let bal = start(&[up.url()], &[KEY], |c| c.settings.max_attempts = 1);
    // A 400 is passed through as-is, except for the key.
    let r = post(bal.addr, "/v1/embeddings", r#"{"input":"a"}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.text(),
        r#"{"error":{"message":"bad input for Bearer ...WXYZ"}}"#
    );
    // The 401 takes the only key out, so this comes last.
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(!r.text().contains("echoed"), "{}", r.text());
    assert!(
        r.text().contains("invalid key Bearer ...WXYZ"),
        "{}",
        r.text()
    );
    assert!(up.hits() >= 2);
}

#[test]
fn hop_by_hop_and_connection_named_headers_stay_here() {
    let up = Upstream::always(Reply::json(200, OK));
    let bal = start(&[up.url()], &[], |_| {});
    let r = request(
        bal.addr,
        "POST",
        "/v1/embeddings",
        &[
            ("Content-Type", "application/json"),
            ("Connection", "keep-alive, X-Hop-One"),
            ("Connection", "x-hop-two"),
            ("X-Hop-One", "1"),
            ("X-Hop-Two", "2"),
            ("X-Kept", "3"),
            ("Cookie", "session=1"),
            ("Accept-Encoding", "gzip"),
            ("Proxy-Authorization", "Basic eDp5"),
            ("Keep-Alive", "timeout=5"),
        ],
        br#"{"input":"a"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = &up.requests()[0];
    assert_eq!(seen.header("x-kept"), Some("3"));
    for gone in [
        "x-hop-one",
        "x-hop-two",
        "cookie",
        "proxy-authorization",
        "keep-alive",
    ] {
        assert_eq!(seen.header(gone), None, "{gone} was forwarded");
    }
    // Ours, not the client's (see `bodies_are_asked_for_uncompressed`).
    assert_eq!(seen.header("accept-encoding"), Some("identity"));
}

/// A request without `Accept-Encoding` accepts any coding (RFC 9110
/// 12.5.3), but the balancer passes on `Content-Type` and the body, not
/// `Content-Encoding`, and reads bodies (SSE events, keys to mask): it asks
/// for `identity`. This fake compresses whenever it may, as the RFC lets it.
#[test]
fn bodies_are_asked_for_uncompressed() {
    let up = Upstream::start(|seen, _| {
        if seen.header("accept-encoding") == Some("identity") {
            Reply::json(200, OK)
        } else {
            Reply::json(200, "\x1f\u{8b}compressed").with_header("Content-Encoding", "gzip")
        }
    });
    let bal = start(&[up.url()], &[], |_| {});
    let r = request(
        bal.addr,
        "POST",
        "/v1/chat/completions",
        &[("Accept-Encoding", "gzip, br")],
        chat(false).as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), OK, "a compressed body lost its Content-Encoding");
}

#[test]
fn readyz_is_503_once_every_pool_key_is_rejected() {
    let up = Upstream::always(Reply::json(401, r#"{"error":{"message":"bad key"}}"#));
    let bal = start(&[up.url()], &["pool-key-rejected-000001"], |_| {});
    assert_eq!(request(bal.addr, "GET", "/readyz", &[], b"").status, 200);
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 503, "no key left: {}", r.text());
    // The host is fine, but nothing can be sent to it until the key file changes.
    let ready = request(bal.addr, "GET", "/readyz", &[], b"");
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert_eq!(request(bal.addr, "GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn one_host_rejecting_every_key_does_not_take_the_shared_keys_out() {
    // A misconfigured node answers 401 to everything; the other accepts both keys.
    let wrong = Upstream::always(Reply::json(401, r#"{"error":{"message":"no"}}"#));
    let good = Upstream::always(Reply::json(200, OK));
    let keys = ["pool-key-shared-000001", "pool-key-shared-000002"];
    let bal = start(&[wrong.url(), good.url()], &keys, |_| {});
    for _ in 0..8 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-gaia-upstream"), Some("h1"));
    }
    // Both keys still work on the good host, and the bad one is not tried again.
    let used: std::collections::BTreeSet<String> = good
        .requests()
        .iter()
        .filter_map(|s| s.header("authorization").map(str::to_string))
        .collect();
    assert_eq!(used.len(), 2, "{used:?}");
    assert_eq!(wrong.hits(), 2, "each key was rejected once there");
    let status = request(bal.addr, "GET", "/status", &[], b"").json();
    let states: Vec<&str> = status["keys"]
        .as_array()
        .map(|ks| ks.iter().filter_map(|k| k["state"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(states, ["active", "active"], "{status}");
    // What keeps them off the bad host shows there, keys masked.
    let pairs: Vec<&str> = status["hosts"][0]["pairCooldowns"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["key"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(pairs.len(), 2, "{status}");
    assert!(
        pairs.contains(&"...0001") && pairs.contains(&"...0002"),
        "{status}"
    );
    assert_eq!(status["hosts"][1]["pairCooldowns"], serde_json::json!([]));
}

#[test]
fn a_pool_key_echoed_in_an_error_body_too_large_to_hold_is_masked_too() {
    // Past JSON_HOLD_LIMIT (8 MiB) an error body is streamed, not held: the
    // key must be masked in the streamed part too, even split between reads.
    const KEY: &str = "pool-key-echoed-large-0000-WXYZ";
    let up = Upstream::start(|seen, _| {
        let sent = seen.header("authorization").unwrap_or("").to_string();
        let (front, back) = sent.split_at(sent.len() / 2);
        Reply::Chunked {
            status: 400,
            content_type: "application/json".into(),
            steps: vec![
                Step::Send(
                    format!(r#"{{"error":{{"message":"bad input for {sent}","pad":""#).into_bytes(),
                ),
                Step::Repeat(vec![b'x'; 64 * 1024], 130),
                Step::Send(format!(r#"","again":"{sent}","split":"{front}"#).into_bytes()),
                Step::Send(format!(r#"{back}"}}}}"#).into_bytes()),
            ],
        }
    });
    let bal = start(&[up.url()], &[KEY], |c| c.settings.max_attempts = 1);
    let r = post(bal.addr, "/v1/embeddings", r#"{"input":"a"}"#);
    assert_eq!(r.status, 400);
    assert!(r.complete);
    let text = r.text();
    assert!(r.body.len() > 8 * 1024 * 1024, "{}", r.body.len());
    assert!(!text.contains(KEY), "the pool key reached the client");
    assert_eq!(text.matches("Bearer ...WXYZ").count(), 3);
    assert!(
        text.ends_with(r#""split":"Bearer ...WXYZ"}}"#),
        "{}",
        &text[text.len() - 80..]
    );
}

#[test]
fn a_pool_key_echoed_in_an_sse_error_event_before_output_is_masked() {
    // The message of an error event before any output is quoted in the 502.
    const KEY: &str = "pool-key-echoed-sse-0000-WXYZ";
    let up = Upstream::start(|seen, _| {
        let sent = seen.header("authorization").unwrap_or("").to_string();
        Reply::sse(vec![Step::Send(
            format!("data: {{\"error\":{{\"message\":\"invalid key {sent}\"}}}}\n\n").into_bytes(),
        )])
    });
    let bal = start(&[up.url()], &[KEY], |c| c.settings.max_attempts = 1);
    let r = post(bal.addr, "/v1/chat/completions", &chat(true));
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(!r.text().contains(KEY), "{}", r.text());
    assert!(
        r.text().contains("invalid key Bearer ...WXYZ"),
        "{}",
        r.text()
    );
}

#[test]
fn a_proxied_head_answers_the_length_the_upstream_gave() {
    let up = Upstream::always(Reply::json(200, OK));
    let bal = start(&[up.url()], &[], |_| {});
    let out = crate::util::raw(
        bal.addr,
        b"HEAD /v1/files HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    assert_eq!(up.requests()[0].method, "HEAD");
    let want = format!("Content-Length: {}\r\n", OK.len());
    assert!(out.contains(&want), "{out}");
    assert!(out.ends_with("\r\n\r\n"), "no body after the head: {out}");
}

/// 204 and 304 answers have no body: the client's head must not carry a
/// Content-Length (RFC 9110 8.6 forbids one on a 204; on a 304 it would
/// claim the length of a body never sent), and the connection stays usable.
#[test]
fn no_content_and_not_modified_carry_no_content_length() {
    for status in [204u16, 304] {
        let up = Upstream::always(Reply::Raw(vec![Step::Send(
            format!("HTTP/1.1 {status} X\r\n\r\n").into_bytes(),
        )]));
        let bal = start(&[up.url()], &[], |_| {});
        let body = "{\"model\":\"m\"}";
        let req = format!(
            "DELETE /v1/files/f HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}\
             GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let text = crate::util::raw(bal.addr, req.as_bytes());
        let (first, rest) = text.split_once("\r\n\r\n").unwrap();
        assert!(first.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        assert!(
            !first.to_ascii_lowercase().contains("content-length"),
            "{first}"
        );
        assert!(
            !first.to_ascii_lowercase().contains("transfer-encoding"),
            "{first}"
        );
        assert!(rest.starts_with("HTTP/1.1 200 "), "{text}");
    }
}

#[test]
fn a_large_answer_to_an_http_1_0_client_declares_its_length_so_a_cut_shows() {
    // Past the 8 MiB hold the body is relayed as it comes; the upstream
    // declares more than it sends, then closes.
    let piece = vec![b' '; 1024 * 1024];
    let declared = 9 * piece.len() + 10;
    let up = Upstream::always(Reply::Raw(vec![
        Step::Send(
            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n")
                .into_bytes(),
        ),
        Step::Repeat(piece, 9),
    ]));
    let bal = start(&[up.url()], &[], |_| {});
    let body = r#"{"input":"x"}"#;
    let req = format!(
        "POST /v1/embeddings HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let text = crate::util::raw(bal.addr, req.as_bytes());
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.contains(&format!("Content-Length: {declared}\r\n")),
        "the length is declared: {head}"
    );
    assert!(
        rest.len() < declared,
        "and the cut shows: {} bytes",
        rest.len()
    );
}

/// An upstream answer with both Content-Length and chunked coding is framed
/// by the chunks (RFC 9112 6.3, as ureq reads it); its Content-Length is
/// not the body's and must not be declared to an HTTP/1.0 client, who
/// would take the first bytes of the body for all of it.
#[test]
fn a_content_length_beside_chunked_coding_is_never_declared() {
    let piece = vec![b' '; 1024 * 1024];
    let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
    chunk.extend_from_slice(&piece);
    chunk.extend_from_slice(b"\r\n");
    let up = Upstream::always(Reply::Raw(vec![
        Step::Send(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec(),
        ),
        Step::Repeat(chunk, 9),
        Step::Send(b"0\r\n\r\n".to_vec()),
    ]));
    let bal = start(&[up.url()], &[], |_| {});
    let body = r#"{"input":"x"}"#;
    let req = format!(
        "POST /v1/embeddings HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let text = crate::util::raw(bal.addr, req.as_bytes());
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(!head.contains("Content-Length: 10\r\n"), "{head}");
    assert_eq!(rest.len(), 9 * piece.len(), "the whole body arrives");
}

/// A one-connection upstream that reads a request, answers with a head
/// and part of a body that has no length (it would end at the close), then
/// resets the connection (RST, not FIN).
fn resetting_upstream() -> (String, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Head and body: read until the body's closing brace has come.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"}") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the request ended early");
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"choices\":[{\"text\":\"hal",
        )
        .unwrap();
        s.flush().unwrap();
        // Linger 0: the close sends RST.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    });
    (url, server)
}

/// The counterpart of the next test: a body with neither Content-Length nor
/// chunked coding that the upstream ends with an orderly close (FIN) is a
/// whole answer, passed on as such.
#[test]
fn a_body_without_length_ended_by_an_orderly_close_is_an_answer() {
    let up = Upstream::always(Reply::Raw(vec![Step::Send(
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{OK}").into_bytes(),
    )]));
    let bal = start(&[up.url()], &[], |c| c.settings.max_attempts = 1);
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, OK.as_bytes());
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:200"));
}

/// An IPv6 literal host with a path prefix: the connect (made by our own
/// transport, socket by socket) reaches `[::1]`, the request goes to the
/// prefix plus `/v1/...`, and `Host` carries the bracketed address.
#[test]
fn an_ipv6_host_with_a_path_prefix_is_reached() {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("[::1]:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    crate::util::serve_by_hand(listener, move |mut s| {
        let head = crate::util::read_head_only(&mut s);
        seen.lock()
            .unwrap()
            .push(String::from_utf8_lossy(&head).into_owned());
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{OK}",
            OK.len()
        );
    });
    let bal = start(&[format!("http://[::1]:{port}/api")], &[], |_| {});
    let r = request(bal.addr, "GET", "/v1/models/x", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, OK.as_bytes());
    let heads = heads.lock().unwrap();
    let head = heads.first().expect("the upstream was reached");
    assert!(
        head.starts_with("GET /api/v1/models/x HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("\r\nhost: [::1]:{port}\r\n")),
        "{head}"
    );
}

/// A reset is no orderly end: a body without a length cut by one must not
/// reach the client as a complete answer.
#[test]
fn a_body_without_length_cut_by_a_reset_is_not_an_answer() {
    let (url, server) = resetting_upstream();
    let bal = start(&[url], &[], |c| c.settings.max_attempts = 1);
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    server.join().unwrap();
    assert_eq!(
        r.status,
        502,
        "a cut body passed as an answer: {}",
        r.text()
    );
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:broken"));
}

/// Interim answers (100 Continue, 103 Early Hints) before the final status
/// are consumed upstream-side: the client sees only the final answer, and
/// the connection stays usable for the next request.
#[test]
fn interim_1xx_answers_are_not_passed_on() {
    let up = Upstream::always(Reply::Raw(vec![Step::Send(
        format!(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{OK}",
            OK.len()
        )
        .into_bytes(),
    )]));
    let bal = start(&[up.url()], &[], |_| {});
    for _ in 0..2 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, OK.as_bytes());
        assert_eq!(r.header("x-gaia-attempts"), Some("h0:200"));
    }
}

/// A 101 Switching Protocols nobody asked for (the balancer never forwards
/// `Upgrade`) is no answer: passed on, it would tell the client its
/// connection switched protocols. It fails over like a broken answer.
#[test]
fn an_unasked_101_is_not_passed_on() {
    let switching = Upstream::always(Reply::Raw(vec![Step::Send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            .to_vec(),
    )]));
    let good = Upstream::always(Reply::json(200, OK));
    let bal = start(&[switching.url(), good.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the switching host goes first
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, OK.as_bytes());
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:broken,h1:200"));
}

/// A redirect says the host's URL in hosts.json is not the node's (an
/// `http://` URL for an `https://` node): never passed on, as the client
/// would get it without its Location; it fails over, and when every host
/// redirects, the 502 says where to (with the pool key masked).
#[test]
fn a_redirect_fails_over_and_the_502_says_where_it_pointed() {
    let key = "pool-key-000000000001";
    let moved = Upstream::always(Reply::json(301, "").with_header(
        "Location",
        &format!("https://node.example/v1/chat/completions?k={key}"),
    ));
    let good = Upstream::always(Reply::json(200, OK));
    let bal = start(&[moved.url(), good.url()], &[key], |c| {
        c.hosts[0].weight = 1000; // the redirecting host goes first
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-gaia-attempts"),
        Some("h0[...0001]:broken,h1[...0001]:200")
    );

    let bal = start(&[moved.url()], &[key], |c| c.settings.max_attempts = 2);
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 502, "{}", r.text());
    let text = r.text();
    assert!(
        text.contains("status 301 redirecting to https://node.example/v1/chat/completions?k=")
            && text.contains("use that URL in hosts.json"),
        "{text}"
    );
    assert!(!text.contains(key), "the pool key leaked: {text}");
    // A 304 is an answer (to a conditional GET), not a redirect.
    let not_modified = Upstream::always(Reply::json(304, ""));
    let bal = start(&[not_modified.url()], &[], |_| {});
    let r = request(bal.addr, "GET", "/v1/models/x", &[], b"");
    assert_eq!(r.status, 304);
}

/// An upstream that refuses a large body from its head alone: it answers
/// 413 without reading the body and closes (unread bytes make that a
/// reset), as servers with a body limit do. Counts the connections it
/// served; its thread ends within 10 s.
fn early_413_upstream() -> (String, Arc<AtomicUsize>) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = crate::util::serve_by_hand(listener, |mut s| {
        crate::util::read_head_only(&mut s);
        let _ = s.write_all(too_large_answer().as_bytes());
    });
    (url, served)
}

/// The early answer of [`early_413_upstream`].
pub fn too_large_answer() -> String {
    let body = r#"{"error":{"message":"body too large"}}"#;
    format!(
        "HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A chat request with an 8 MiB prompt: more than socket buffers hold, so
/// an upstream that does not read it stops its sending.
pub fn large_chat() -> String {
    format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(8 * 1024 * 1024)
    )
}

/// The upstream's early 413 is its answer, passed through as other 4xx
/// are, not a broken attempt retried (and blamed on the host, five times:
/// an ejection) until 502.
#[test]
fn an_early_413_for_a_large_body_is_passed_through() {
    let (url, served) = early_413_upstream();
    let bal = start(&[url], &[], |_| {});
    let r = post(bal.addr, "/v1/chat/completions", &large_chat());
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("body too large"), "{}", r.text());
    assert_eq!(served.load(Ordering::SeqCst), 1, "one attempt, no retry");
}

/// Round-robin over the usable keys: with one of three keys out of rotation,
/// the other two share the traffic evenly, rather than the key after the
/// missing one taking its turn as well (two thirds of the load on one key,
/// which then hits its own rate limit first).
#[test]
fn keys_rotate_evenly_over_the_usable_ones() {
    const BAD: &str = "key-aaaaaaaaaaaa-0001";
    let up = Upstream::start(|seen, _| {
        if seen.header("authorization") == Some(format!("Bearer {BAD}").as_str()) {
            Reply::json(401, r#"{"error":{"message":"bad key"}}"#)
        } else {
            Reply::json(200, OK)
        }
    });
    let keys = [BAD, "key-bbbbbbbbbbbb-0002", "key-cccccccccccc-0003"];
    // One host: the first 401 takes the key out at once.
    let bal = start(&[up.url()], &keys, |_| {});
    for _ in 0..60 {
        let r = post(bal.addr, "/v1/embeddings", "{}");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let count = |k: &str| {
        let want = format!("Bearer {k}");
        up.requests()
            .iter()
            .filter(|s| s.header("authorization") == Some(want.as_str()))
            .count()
    };
    assert_eq!(count(BAD), 1);
    let (b, c) = (count(keys[1]), count(keys[2]));
    assert_eq!(b + c, 60);
    assert!(b.abs_diff(c) <= 2, "uneven rotation: {b} and {c}");
}

/// `maxAttempts` counts every attempt, the first included, and a hedge is one
/// (`x-gaia-attempts` lists it): with `maxAttempts: 1` a request goes to one
/// upstream only, however slow it is, and no hedge is sent.
#[test]
fn max_attempts_one_sends_no_hedge() {
    let slow = Upstream::always(Reply::Delayed(
        Duration::from_millis(800),
        Box::new(Reply::json(200, OK)),
    ));
    let fast = Upstream::always(Reply::json(200, OK));
    let bal = start(&[slow.url(), fast.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the slow host goes first
        c.settings.max_attempts = 1;
        c.settings.hedge = gaia_balancer::config::Hedge::After(Duration::from_millis(100));
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:200"));
    assert_eq!((slow.hits(), fast.hits()), (1, 0));
}

/// A 404 is retried on another host, never on one that already answered it
/// in this request (a key switch does not change what a path or model is):
/// once every host has answered 404, the client gets a 404 that quotes the
/// upstream, after one attempt per host, not `maxAttempts` of them and a 502.
#[test]
fn a_404_goes_to_each_host_once_and_then_reaches_the_client_as_404() {
    let body = r#"{"error":{"message":"no such route"}}"#;
    let a = Upstream::always(Reply::json(404, body));
    let b = Upstream::always(Reply::json(404, body));
    let keys = ["key-aaaaaaaaaaaa-0001", "key-bbbbbbbbbbbb-0002"];
    for hosts in [1, 2] {
        let bal = start(&[a.url(), b.url()], &keys, |c| c.hosts.truncate(hosts));
        let (a0, b0) = (a.hits(), b.hits());
        let r = post(bal.addr, "/v1/responses", "{}");
        assert_eq!(r.status, 404, "{hosts} host(s): {}", r.text());
        assert!(r.text().contains("no such route"), "{}", r.text());
        assert_eq!(r.header("x-should-retry"), Some("false"));
        assert_eq!(
            (a.hits() - a0, b.hits() - b0),
            if hosts == 1 { (1, 0) } else { (1, 1) },
            "{hosts} host(s): {:?}",
            r.header("x-gaia-attempts")
        );
    }
    // Attempts running out on a 404 end the same way.
    let bal = start(&[a.url(), b.url()], &keys, |c| c.settings.max_attempts = 1);
    let r = post(bal.addr, "/v1/responses", "{}");
    assert_eq!(r.status, 404, "{}", r.text());
    // A host that has it still serves after another said 404.
    let ok = Upstream::always(Reply::json(200, OK));
    let bal = start(&[a.url(), ok.url()], &keys, |c| c.hosts[0].weight = 1000);
    let r = post(bal.addr, "/v1/responses", "{}");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A 401 or 403 is retried with the next pool key; a host that refused a
/// request sent without any key (no pool configured) would refuse it again
/// the same way, so each host gets it once and the client a 502 quoting it.
#[test]
fn a_401_without_a_pool_key_goes_to_each_host_once() {
    let body = r#"{"error":{"message":"auth required"}}"#;
    for status in [401, 403] {
        let a = Upstream::always(Reply::json(status, body));
        let b = Upstream::always(Reply::json(status, body));
        let bal = start(&[a.url(), b.url()], &[], |_| {});
        let r = post(bal.addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.status, 502, "{}", r.text());
        assert!(r.text().contains("auth required"), "{}", r.text());
        assert_eq!(
            (a.hits(), b.hits()),
            (1, 1),
            "{:?}",
            r.header("x-gaia-attempts")
        );
    }
}

/// README "Performance", connection reuse: each host keeps its own idle
/// connections (`pool.rs`), so requests that go round several hosts reuse
/// one connection per host; parallel clients get one each, no more.
#[test]
fn each_host_reuses_its_own_connections() {
    let ups: Vec<Upstream> = (0..3)
        .map(|_| Upstream::always(Reply::json(200, OK)))
        .collect();
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let bal = start(&urls, &[], |_| {});
    for _ in 0..30 {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(false)).status,
            200
        );
    }
    for up in &ups {
        assert_eq!(up.hits(), 10, "round-robin over three hosts");
        assert_eq!(up.accepted(), 1, "one connection per host, reused");
    }
    // Four clients at once, twice: at most four connections per host in all.
    for _ in 0..2 {
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let addr = bal.addr;
                std::thread::spawn(move || {
                    for _ in 0..6 {
                        assert_eq!(post(addr, "/v1/chat/completions", &chat(false)).status, 200);
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
    }
    for up in &ups {
        assert!(up.accepted() <= 4, "{} connections", up.accepted());
    }
}
