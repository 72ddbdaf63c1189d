//! HTTPS upstreams. The fake's TLS side, checked with a raw rustls client
//! that trusts only the test CA (`tests/tls/`), so the fake and the
//! certificates are known good before the balancer is put in front of them.

use std::io::{BufReader, ErrorKind, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::fake::{
    ca_pem_path, content_event, finish_events, role_event, tls_file, Cert, Reply, Step, Upstream,
};
use crate::util::{read_response, wait_for, write_request};

type TlsClient = BufReader<StreamOwned<ClientConnection, TcpStream>>;

/// A TLS client to `up` that trusts only the CAs in the PEM file `ca`; the
/// handshake happens on its first write.
fn connect_tls(up: &Upstream, ca: &Path) -> TlsClient {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let url = up.url();
    let addr = url.strip_prefix("https://").expect("an https URL");
    let tcp = TcpStream::connect(addr).unwrap();
    // A test can never hang on a silent server.
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = ClientConnection::new(Arc::new(config), name).unwrap();
    BufReader::new(StreamOwned::new(conn, tcp))
}

fn post_chat(client: &mut TlsClient) -> std::io::Result<()> {
    let body = br#"{"model":"m","messages":[]}"#;
    write_request(client.get_mut(), "POST", "/v1/chat/completions", &[], body)
}

#[test]
fn a_json_reply_arrives_intact_over_tls() {
    let up = Upstream::always_tls(Reply::json(200, r#"{"ok":true}"#));
    assert!(up.url().starts_with("https://127.0.0.1:"), "{}", up.url());
    let mut client = connect_tls(&up, &ca_pem_path());
    post_chat(&mut client).unwrap();
    let r = read_response(&mut client).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.complete);
    assert_eq!(r.text(), r#"{"ok":true}"#);
    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].body, br#"{"model":"m","messages":[]}"#);
}

#[test]
fn an_sse_reply_arrives_chunk_by_chunk_over_tls() {
    let up = Upstream::always_tls(Reply::sse(vec![
        Step::Send(role_event()),
        Step::Sleep(Duration::from_millis(20)),
        Step::Send(content_event("hi")),
        Step::Send(finish_events()),
    ]));
    let mut client = connect_tls(&up, &ca_pem_path());
    post_chat(&mut client).unwrap();
    let r = read_response(&mut client).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.complete, "{}", r.text());
    assert_eq!(r.chunks.len(), 3);
    assert_eq!(r.chunks[1].1, content_event("hi"));
    assert!(r.text().ends_with("data: [DONE]\n\n"));
}

/// A cut is a TCP close with no `close_notify`: rustls reports the stream
/// as truncated, not as ended.
#[test]
fn a_cut_ends_the_tls_stream_without_close_notify() {
    let up = Upstream::always_tls(Reply::sse(vec![Step::Send(role_event()), Step::Cut]));
    let mut client = connect_tls(&up, &ca_pem_path());
    post_chat(&mut client).unwrap();
    let err = read_response(&mut client).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");
}

/// The other certificate is well formed (a client trusting its own CA takes
/// it), so refusing it is about trust alone.
#[test]
fn a_cert_from_another_ca_is_refused() {
    let up = Upstream::start_tls_with(Cert::Other, |_, _| Reply::json(200, "{}"));
    let mut client = connect_tls(&up, &ca_pem_path());
    // The handshake runs on the first write (or its flush).
    let err = post_chat(&mut client)
        .and_then(|()| client.get_mut().flush())
        .unwrap_err();
    let cause = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    assert_eq!(
        cause,
        Some(&rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        )),
        "{err}"
    );
    assert_eq!(up.hits(), 0);

    let mut client = connect_tls(&up, &tls_file("other-ca.pem"));
    post_chat(&mut client).unwrap();
    assert_eq!(read_response(&mut client).unwrap().status, 200);
}

/// A TLS client may send `close_notify` before its FIN; the fake still sees
/// it leave while it holds back a reply.
#[test]
fn a_tls_client_leaving_a_delayed_reply_is_seen() {
    let up = Upstream::always_tls(Reply::Delayed(
        Duration::from_secs(10),
        Box::new(Reply::json(200, "{}")),
    ));
    let mut client = connect_tls(&up, &ca_pem_path());
    post_chat(&mut client).unwrap();
    assert!(wait_for(Duration::from_secs(5), || up.hits() == 1));
    let tls = client.get_mut();
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    tls.sock.shutdown(Shutdown::Write).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || up.peer_closed().len() == 1),
        "the fake did not see the client leave"
    );
}

/// The balancer in front of TLS fakes, trusting the test CA through `caFile`.
fn balancer_over(urls: &[String]) -> crate::util::Running {
    balancer_over_with(urls, |_| {})
}

/// [`balancer_over`], then `tweak`.
fn balancer_over_with(
    urls: &[String],
    tweak: impl FnOnce(&mut gaia_balancer::config::Config),
) -> crate::util::Running {
    let roots = CertificateDer::pem_file_iter(ca_pem_path())
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    crate::util::start(urls, &["k1"], |c| {
        c.settings.ca_file = Some(gaia_balancer::config::CaFile {
            path: ca_pem_path(),
            roots,
        });
        tweak(c);
    })
}

#[test]
fn the_balancer_proxies_json_and_streams_over_tls() {
    let up = Upstream::start_tls(|seen, _| {
        let json: serde_json::Value = serde_json::from_slice(&seen.body).unwrap_or_default();
        if json["stream"] == true {
            let mut steps = vec![Step::Send(role_event())];
            steps.push(Step::Send(content_event("tls")));
            steps.push(Step::Send(finish_events()));
            Reply::sse(steps)
        } else {
            Reply::json(200, r#"{"ok":"over tls"}"#)
        }
    });
    let bal = balancer_over(&[up.url()]);
    for _ in 0..3 {
        let r = crate::util::post(bal.addr, "/v1/chat/completions", &crate::util::chat(false));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.body, br#"{"ok":"over tls"}"#);
    }
    let r = crate::util::post(bal.addr, "/v1/chat/completions", &crate::util::chat(true));
    assert_eq!(r.status, 200);
    assert!(r.complete);
    assert!(String::from_utf8_lossy(&r.body).contains("tls"));
    assert!(String::from_utf8_lossy(&r.body).contains("[DONE]"));
    assert_eq!(up.hits(), 4);
    assert_eq!(up.requests()[0].header("authorization"), Some("Bearer k1"));
}

#[test]
fn an_untrusted_certificate_is_refused_and_the_request_fails_over() {
    let bad = Upstream::start_tls_with(Cert::Other, |_, _| Reply::json(200, r#"{"from":"bad"}"#));
    let good = Upstream::start_tls(|_, _| Reply::json(200, r#"{"from":"good"}"#));
    let bal = balancer_over(&[bad.url(), good.url()]);
    for _ in 0..4 {
        let r = crate::util::post(bal.addr, "/v1/chat/completions", &crate::util::chat(false));
        assert_eq!(r.status, 200);
        assert_eq!(r.body, br#"{"from":"good"}"#);
    }
    assert_eq!(bad.hits(), 0, "no request may reach an untrusted host");
}

/// An operator reading "invalid peer certificate: UnknownIssuer" learns
/// what to change: the node's CA (or its self-signed certificate) goes in
/// `caFile`.
#[test]
fn an_untrusted_certificate_says_to_add_its_ca_to_ca_file() {
    let bad = Upstream::start_tls_with(Cert::Other, |_, _| Reply::json(200, "{}"));
    // One attempt is enough to read the reason (the rest would back off).
    let bal = balancer_over_with(&[bad.url()], |c| c.settings.max_attempts = 1);
    let r = crate::util::post(bal.addr, "/v1/chat/completions", &crate::util::chat(false));
    assert_eq!(r.status, 502);
    let text = r.text();
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(text.contains("caFile"), "{text}");
}

#[test]
fn a_tls_stream_cut_without_close_notify_is_not_passed_off_as_complete() {
    let up = Upstream::start_tls(|_, _| {
        Reply::sse(vec![
            Step::Send(role_event()),
            Step::Send(content_event("half")),
            Step::Cut,
        ])
    });
    let bal = balancer_over(&[up.url()]);
    let r = crate::util::post(bal.addr, "/v1/chat/completions", &crate::util::chat(true));
    assert!(!String::from_utf8_lossy(&r.body).contains("[DONE]"));
    assert!(!r.complete || r.status != 200 || String::from_utf8_lossy(&r.body).contains("error"));
}

/// Request `i`, a chat completion through `bal` (over [`balancer_over`]),
/// succeeds at its first attempt: no failure was retried.
fn chat_succeeds_at_once(bal: &crate::util::Running, i: usize) {
    let r = crate::util::post(bal.addr, "/v1/chat/completions", &crate::util::chat(false));
    assert_eq!(r.status, 200, "request {i}: {}", r.text());
    // One attempt (with key k1, shown masked), which succeeded.
    assert_eq!(
        r.header("x-gaia-attempts"),
        Some("h0[****]:200"),
        "request {i}"
    );
}

/// Keep-alive works over TLS: one TCP connection and one handshake serve
/// every sequential request to a host (no connection left unusable by the
/// session tickets a TLS 1.3 server sends after the handshake, none thrown
/// away by the liveness check at pool checkout).
#[test]
fn https_upstream_connections_are_reused() {
    let up = Upstream::always_tls(Reply::json(200, r#"{"ok":true}"#));
    let bal = balancer_over(&[up.url()]);
    for i in 0..8 {
        chat_succeeds_at_once(&bal, i);
    }
    assert_eq!(up.hits(), 8);
    // Every request has been answered, so any connection opened for one
    // has been accepted by now.
    assert_eq!(up.accepted(), 1, "one connection, one handshake");
}

/// The TLS twin of `proxy::an_upstream_closing_idle_connections_costs_no_attempt`:
/// an upstream that ends every connection after its answer (`close_notify`,
/// then FIN, as a server whose keep-alive timeout ran out) costs no failed
/// attempt, no retry and no host failure: the stale pooled connection is
/// never sent a request.
#[test]
fn an_https_upstream_closing_idle_connections_costs_no_attempt() {
    let up = Upstream::always_tls(Reply::Closing(Box::new(Reply::json(200, r#"{"ok":1}"#))));
    let bal = balancer_over(&[up.url()]);
    for i in 0..20 {
        chat_succeeds_at_once(&bal, i);
        // The close has happened before the next request takes a connection.
        assert!(
            wait_for(Duration::from_secs(5), || up.closed() > i),
            "the fake did not close after request {i}"
        );
    }
    assert_eq!(up.hits(), 20);
    assert_eq!(up.accepted(), 20, "each request on a connection of its own");
    // The balancer counts an exchange once its answer has gone out, so the
    // last one may be counted a moment after the client has it.
    let status = || crate::util::request(bal.addr, "GET", "/status", &[], b"").json();
    wait_for(Duration::from_secs(5), || {
        status()["hosts"][0]["successes"] == 20
    });
    let status = status();
    let host = &status["hosts"][0];
    assert_eq!(host["failures"], 0, "{status}");
    assert_eq!(host["successes"], 20, "{status}");
}

/// A body without Content-Length or chunked coding ends when the connection
/// does; over TLS only a `close_notify` says it ended, and a TCP close
/// without one is a cut. Such a cut answer must fail over (here: every
/// attempt fails, 502), never reach the client as a complete 200.
#[test]
fn a_close_delimited_tls_body_cut_without_close_notify_is_not_an_answer() {
    let up = Upstream::always_tls(Reply::Raw(vec![Step::Send(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"choices\":[{\"text\":\"hal"
            .to_vec(),
    )]));
    let roots = vec![CertificateDer::from_pem_file(ca_pem_path()).unwrap()];
    let bal = crate::util::start(&[up.url()], &["k1"], |c| {
        c.settings.ca_file = Some(gaia_balancer::config::CaFile {
            path: ca_pem_path(),
            roots,
        });
        // No backoffs between attempts on the one host.
        c.settings.max_attempts = 1;
    });
    let r = crate::util::post(bal.addr, "/v1/chat/completions", &crate::util::chat(false));
    assert_eq!(
        r.status,
        502,
        "a cut body passed as an answer: {}",
        r.text()
    );
    assert!(
        r.header("x-gaia-attempts").unwrap_or("").contains("broken"),
        "{:?}",
        r.header("x-gaia-attempts")
    );
}

/// An https "host" that accepts TCP connections and never says a word, so
/// a TLS handshake with it stalls until the connect timeout. Its thread
/// holds what it accepted for 15 s at most, then closes it all.
fn silent_tls() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let end = std::time::Instant::now() + Duration::from_secs(15);
        let mut held = Vec::new();
        while std::time::Instant::now() < end {
            match listener.accept() {
                Ok((s, _)) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    url
}

/// The watch runs during a TLS handshake too: a hedge starts on time while
/// the first attempt's handshake stalls (not once the connect timeout has
/// failed it), and wins.
#[test]
fn a_hedge_starts_while_a_tls_handshake_stalls() {
    let silent = silent_tls();
    let good = Upstream::always_tls(Reply::json(200, r#"{"from":"good"}"#));
    let roots = vec![CertificateDer::from_pem_file(ca_pem_path()).unwrap()];
    let bal = crate::util::start(&[silent, good.url()], &["k1"], |c| {
        c.settings.ca_file = Some(gaia_balancer::config::CaFile {
            path: ca_pem_path(),
            roots,
        });
        c.hosts[0].weight = 1000; // the silent host goes first
        c.settings.timeouts.connect = Duration::from_secs(10);
        c.settings.hedge = gaia_balancer::config::Hedge::After(Duration::from_millis(200));
    });
    let r = crate::util::post(bal.addr, "/v1/chat/completions", &crate::util::chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, br#"{"from":"good"}"#);
    assert_eq!(
        r.header("x-gaia-attempts"),
        Some("h0[****]:outrun,h1[****](hedge):200")
    );
}

/// The TLS twin of `proxy::an_early_413_for_a_large_body_is_passed_through`:
/// an https upstream answers 413 from the request head alone and closes
/// without reading the body; its answer is passed through, not retried.
#[test]
fn an_early_413_over_tls_is_passed_through() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    // Nagle off (as `serve_by_hand` sets) matters here too: it would hold
    // the answer back behind the unacknowledged session tickets.
    let served = crate::util::serve_by_hand(listener, |tcp| {
        let conn = rustls::ServerConnection::new(Cert::Server.server_config()).unwrap();
        let mut s = StreamOwned::new(conn, tcp);
        crate::util::read_head_only(&mut s);
        // Straight to the socket: `StreamOwned`'s write would first
        // read on, into a plaintext buffer the unread body fills.
        let _ = s
            .conn
            .writer()
            .write_all(crate::proxy::too_large_answer().as_bytes());
        while s.conn.wants_write() {
            if s.conn.write_tls(&mut s.sock).is_err() {
                break;
            }
        }
    });
    let roots = vec![CertificateDer::from_pem_file(ca_pem_path()).unwrap()];
    let bal = crate::util::start(&[url], &["k1"], |c| {
        c.settings.ca_file = Some(gaia_balancer::config::CaFile {
            path: ca_pem_path(),
            roots,
        });
    });
    let r = crate::util::post(
        bal.addr,
        "/v1/chat/completions",
        &crate::proxy::large_chat(),
    );
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("body too large"), "{}", r.text());
    assert_eq!(r.header("x-gaia-attempts"), Some("h0[****]:413"));
    assert_eq!(
        served.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one attempt, no retry"
    );
}

/// An https upstream that keeps its connections open and answers its first
/// request with a head and body of exactly `first_len` bytes, then, in the
/// same write (one TLS record), a second answer nobody asked for ("EVIL");
/// later requests get "GOOD". Counts the connections it accepted.
fn smuggling_tls(first_len: usize) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, Read};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let requests = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for tcp in listener.incoming().take(8) {
            let Ok(tcp) = tcp else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let requests = requests.clone();
            std::thread::spawn(move || {
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let conn = rustls::ServerConnection::new(Cert::Server.server_config()).unwrap();
                let mut s = BufReader::new(StreamOwned::new(conn, tcp));
                loop {
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if s.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    if s.read_exact(&mut body).is_err() {
                        return;
                    }
                    let answer = |body: &str| {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    let out = if requests.fetch_add(1, Ordering::SeqCst) == 0 {
                        // The body that makes the whole answer `first_len` long.
                        let first = (0..first_len)
                            .map(|l| answer(&"a".repeat(l)))
                            .find(|a| a.len() == first_len)
                            .unwrap();
                        first + &answer("\"EVIL\"")
                    } else {
                        answer("\"GOOD\"")
                    };
                    if s.get_mut().write_all(out.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, accepted)
}

/// Bytes an upstream sent past the end of an answer are never read as the
/// answer to the next request on that connection, also when they sit
/// decrypted in the TLS layer rather than in the input buffer (the answer
/// ended exactly where the first read of the connection did: 4 KiB).
#[test]
fn bytes_past_an_answer_never_answer_the_next_request_over_tls() {
    let (url, accepted) = smuggling_tls(4096);
    let roots = vec![CertificateDer::from_pem_file(ca_pem_path()).unwrap()];
    let bal = crate::util::start(&[url], &["k1"], |c| {
        c.settings.ca_file = Some(gaia_balancer::config::CaFile {
            path: ca_pem_path(),
            roots,
        });
    });
    let first = crate::util::post(bal.addr, "/v1/chat/completions", &crate::util::chat(false));
    assert_eq!(first.status, 200, "{}", first.text());
    assert!(first.text().starts_with("aaa"), "{}", first.text());
    let second = crate::util::post(bal.addr, "/v1/chat/completions", &crate::util::chat(false));
    assert_eq!(second.text(), "\"GOOD\"", "a stale answer was served");
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the connection with stray bytes was not reused"
    );
}
