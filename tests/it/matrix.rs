//! The whole hostile-input framing matrix of issue 6, over raw sockets against
//! the running server: for every malformed or ambiguous request, the status
//! it gets, that the connection is closed afterwards, and that a request
//! smuggled behind it never reaches the upstream. `request.rs` proves the
//! parser decides each case; these tests prove the server acts on the decision
//! (answers once, closes, forwards nothing) and keeps serving.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::fake::{Reply, Upstream};
use crate::util::{connect, post, start};

/// A valid request that would reach the upstream if the server ever parsed
/// it: appended behind every bad request to catch smuggling.
const SMUGGLED: &[u8] = b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}";

/// What came back on one connection.
pub struct Exchange {
    pub text: String,
    /// The status of every response, in order.
    pub statuses: Vec<u16>,
    /// The server closed the connection (EOF or reset) within the deadline.
    pub closed: bool,
}

/// Write `bytes` in one go (optionally half-closing), then read until the
/// server closes or `limit` passes.
pub fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool, limit: Duration) -> Exchange {
    let mut s = connect(addr);
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    read_until_close(&mut s, limit)
}

fn read_until_close(s: &mut TcpStream, limit: Duration) -> Exchange {
    let end = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut closed = false;
    while Instant::now() < end {
        let left = end.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                closed = true; // reset: closed, too
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let statuses = statuses(&out);
    Exchange {
        text,
        statuses,
        closed,
    }
}

/// The status of each response in `bytes`, walking them by their framing
/// (Content-Length, chunked, or to the end); stops at anything unparsable.
pub fn statuses(mut bytes: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..100 {
        let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
            break;
        };
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        bytes = &bytes[end + 4..];
        let Some(status) = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3)?.parse().ok())
        else {
            break;
        };
        out.push(status);
        let header = |name: &str| {
            head.split("\r\n").skip(1).find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        if status == 100 {
            continue;
        }
        if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            bytes = &bytes[n.min(bytes.len())..];
        } else if header("transfer-encoding").is_some() {
            let Some(last) = bytes.windows(5).position(|w| w == b"0\r\n\r\n") else {
                break;
            };
            bytes = &bytes[last + 5..];
        } else {
            break;
        }
    }
    out
}

/// `POST /v1/embeddings` over HTTP/1.1 with these extra header lines and body.
fn post_with(extra: &str, body: &str) -> Vec<u8> {
    format!("POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n{extra}\r\n{body}").into_bytes()
}

/// Every case of issue 6 point 1 that is decided from the bytes alone:
/// (name, request, expected status).
fn cases() -> Vec<(&'static str, Vec<u8>, u16)> {
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(9000)).into_bytes();
    vec![
        (
            "CL then TE",
            post_with(
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
            400,
        ),
        (
            "TE then CL",
            post_with(
                "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                "0\r\n\r\n",
            ),
            400,
        ),
        ("CL 5, 5", post_with("Content-Length: 5, 5\r\n", "{\"a\"}"), 400),
        ("CL +5", post_with("Content-Length: +5\r\n", "{\"a\"}"), 400),
        ("CL -1", post_with("Content-Length: -1\r\n", ""), 400),
        ("CL hex", post_with("Content-Length: 0x5\r\n", "{\"a\"}"), 400),
        ("CL empty", post_with("Content-Length: \r\n", ""), 400),
        (
            "CL equal duplicates",
            post_with("Content-Length: 2\r\nContent-Length: 2\r\n", "{}"),
            400,
        ),
        (
            "CL differing duplicates",
            post_with("Content-Length: 2\r\nContent-Length: 7\r\n", "{}"),
            400,
        ),
        (
            "CL overflows u64",
            post_with("Content-Length: 18446744073709551616\r\n", ""),
            400,
        ),
        (
            "CL far too long",
            post_with("Content-Length: 99999999999999999999999999\r\n", ""),
            400,
        ),
        (
            "CL over maxBodyBytes",
            post_with("Content-Length: 1000000000000\r\n", ""),
            413,
        ),
        (
            "TE gzip",
            post_with("Transfer-Encoding: gzip\r\n", "{}"),
            501,
        ),
        (
            "TE chunked, chunked",
            post_with("Transfer-Encoding: chunked, chunked\r\n", "2\r\n{}\r\n0\r\n\r\n"),
            501,
        ),
        (
            "TE gzip, chunked",
            post_with("Transfer-Encoding: gzip, chunked\r\n", "2\r\n{}\r\n0\r\n\r\n"),
            501,
        ),
        (
            "TE twice",
            post_with(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                "2\r\n{}\r\n0\r\n\r\n",
            ),
            501,
        ),
        (
            "TE identity",
            post_with("Transfer-Encoding: identity\r\n", "{}"),
            501,
        ),
        (
            "TE on HTTP/1.0",
            b"POST /v1/embeddings HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
                .to_vec(),
            400,
        ),
        (
            "missing Host on 1.1",
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            "duplicate Host",
            post_with("Host: u\r\nContent-Length: 2\r\n", "{}"),
            400,
        ),
        (
            "bare LF after request line",
            b"POST /v1/embeddings HTTP/1.1\nHost: t\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            "bare LF after a header",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\nContent-Length: 2\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            "bare LF ends the head",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\n{}".to_vec(),
            400,
        ),
        (
            "bare CR inside a header",
            post_with("X: a\rContent-Length: 2\r\n", "{}"),
            400,
        ),
        (
            "NUL in the target",
            b"POST /v1/embed\0dings HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            "NUL in a header value",
            post_with("X: a\0b\r\nContent-Length: 2\r\n", "{}"),
            400,
        ),
        (
            "NUL in a header name",
            post_with("X\0Y: a\r\nContent-Length: 2\r\n", "{}"),
            400,
        ),
        (
            "ESC in a header value",
            post_with("X: a\x1bb\r\nContent-Length: 2\r\n", "{}"),
            400,
        ),
        (
            "DEL in a header value",
            post_with("X: a\x7f\r\nContent-Length: 2\r\n", "{}"),
            400,
        ),
        (
            "vertical tab in a name",
            post_with("X\x0b: a\r\nContent-Length: 2\r\n", "{}"),
            400,
        ),
        (
            "space before the colon",
            post_with("Content-Length : 2\r\n", "{}"),
            400,
        ),
        (
            "tab before the colon",
            post_with("Content-Length\t: 2\r\n", "{}"),
            400,
        ),
        (
            "space before Transfer-Encoding's colon",
            post_with("Transfer-Encoding : chunked\r\n", "2\r\n{}\r\n0\r\n\r\n"),
            400,
        ),
        (
            "obs-fold",
            post_with("X: a\r\n b\r\nContent-Length: 2\r\n", "{}"),
            400,
        ),
        (
            "leading space on the request line",
            b" POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            "request line over 8 KiB",
            long_line,
            414,
        ),
        (
            "header line over 8 KiB",
            post_with(&format!("X: {}\r\nContent-Length: 2\r\n", "b".repeat(9000)), "{}"),
            431,
        ),
        (
            "header block over 32 KiB",
            post_with(
                &format!("{}Content-Length: 2\r\n", format!("X: {}\r\n", "b".repeat(8000)).repeat(5)),
                "{}",
            ),
            431,
        ),
        (
            "101 header fields",
            post_with(&format!("{}Content-Length: 2\r\n", "X: y\r\n".repeat(100)), "{}"),
            431,
        ),
        (
            "chunk size not hex",
            post_with("Transfer-Encoding: chunked\r\n", "g\r\n{}\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunk size 0x-prefixed",
            post_with("Transfer-Encoding: chunked\r\n", "0x2\r\n{}\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunk size signed",
            post_with("Transfer-Encoding: chunked\r\n", "+2\r\n{}\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunk size with a space",
            post_with("Transfer-Encoding: chunked\r\n", "2 \r\n{}\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunk size overflows u64",
            post_with("Transfer-Encoding: chunked\r\n", "10000000000000000\r\n{}\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunk size over maxBodyBytes",
            post_with("Transfer-Encoding: chunked\r\n", "fffffffffff\r\n{}\r\n0\r\n\r\n"),
            413,
        ),
        (
            "chunk size ends in bare LF",
            post_with("Transfer-Encoding: chunked\r\n", "2\n{}\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunk data without CRLF",
            post_with("Transfer-Encoding: chunked\r\n", "2\r\n{}XX0\r\n\r\n"),
            400,
        ),
        (
            "bad trailer",
            post_with("Transfer-Encoding: chunked\r\n", "2\r\n{}\r\n0\r\nno colon\r\n\r\n"),
            400,
        ),
        (
            "Expect: foo",
            post_with("Expect: foo\r\nContent-Length: 2\r\n", "{}"),
            417,
        ),
        (
            "Expect: 100-continue, foo",
            post_with("Expect: 100-continue, foo\r\nContent-Length: 2\r\n", "{}"),
            417,
        ),
        (
            "HTTP/2.0 request line",
            b"POST /v1/embeddings HTTP/2.0\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            505,
        ),
        (
            "HTTP/0.9 simple request",
            b"GET /v1/models\r\n\r\n".to_vec(),
            400,
        ),
        (
            "method with a bad byte",
            b"PO(T /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            "target with userinfo",
            b"POST http://u@x/v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"
                .to_vec(),
            400,
        ),
        (
            "target with a fragment",
            b"POST /v1/embeddings#x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            400,
        ),
    ]
}

#[test]
fn every_framing_case_gets_its_status_closes_and_smuggles_nothing() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &[], |c| c.settings.max_body_bytes = 1 << 20);
    let mut failures = Vec::new();
    let all = cases();
    for (name, bytes, want) in &all {
        let mut input = bytes.clone();
        input.extend_from_slice(SMUGGLED);
        let got = exchange(bal.addr, &input, false, Duration::from_secs(5));
        let ok = got.statuses == [*want] && got.closed && up.hits() == 0;
        if !ok {
            failures.push(format!(
                "{name}: statuses {:?} (want [{want}]), closed {}, upstream hits {}\n{}",
                got.statuses,
                got.closed,
                up.hits(),
                got.text.lines().next().unwrap_or("")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "framing matrix: {} cases, 0 reached the upstream",
        all.len()
    );
    // The server is unharmed.
    assert_eq!(post(bal.addr, "/v1/embeddings", "{}").status, 200);
    assert_eq!(up.hits(), 1);
}

#[test]
fn truncated_bodies_are_never_forwarded() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.body_timeout = Duration::from_millis(300)
    });
    let truncated: [(&str, Vec<u8>); 5] = [
        (
            "length, 3 of 10 bytes",
            post_with("Content-Length: 10\r\n", "{\"a"),
        ),
        ("length, head only", post_with("Content-Length: 10\r\n", "")),
        (
            "chunked, inside a chunk",
            post_with("Transfer-Encoding: chunked\r\n", "8\r\n{\"a\""),
        ),
        (
            "chunked, no last chunk",
            post_with("Transfer-Encoding: chunked\r\n", "2\r\n{}\r\n"),
        ),
        (
            "chunked, no end of trailers",
            post_with("Transfer-Encoding: chunked\r\n", "2\r\n{}\r\n0\r\n"),
        ),
    ];
    for (name, bytes) in &truncated {
        // The client goes away mid-body: 400 (or nothing), closed.
        let gone = exchange(bal.addr, bytes, true, Duration::from_secs(5));
        assert!(
            gone.closed && (gone.statuses.is_empty() || gone.statuses == [400]),
            "{name} then EOF: {:?} closed {}",
            gone.statuses,
            gone.closed
        );
        // The client stalls mid-body: 408 after bodyTimeoutMs, closed.
        let began = Instant::now();
        let stalled = exchange(bal.addr, bytes, false, Duration::from_secs(5));
        assert!(
            stalled.closed && stalled.statuses == [408],
            "{name} then silence: {:?} closed {}",
            stalled.statuses,
            stalled.closed
        );
        assert!(began.elapsed() < Duration::from_secs(3), "{name}");
    }
    assert_eq!(up.hits(), 0, "a truncated body was forwarded");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::start(|seen, _| {
        Reply::json(
            200,
            &format!("{{\"echo\":{}}}", String::from_utf8_lossy(&seen.body)),
        )
    });
    let bal = start(&[up.url()], &[], |_| {});
    let mut all = Vec::new();
    for (id, body) in [("first", "{\"n\":1}"), ("second", "{\"n\":2}")] {
        all.extend_from_slice(
            format!(
                "POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nX-Request-Id: {id}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    all.extend_from_slice(
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Request-Id: third\r\nConnection: close\r\n\r\n",
    );
    let got = exchange(bal.addr, &all, false, Duration::from_secs(10));
    assert_eq!(got.statuses, [200, 200, 200], "{}", got.text);
    assert!(got.closed, "Connection: close on the last one");
    let first = got
        .text
        .find("X-Request-Id: first")
        .expect("first answered");
    let second = got
        .text
        .find("X-Request-Id: second")
        .expect("second answered");
    let third = got
        .text
        .find("X-Request-Id: third")
        .expect("third answered");
    assert!(first < second && second < third, "{}", got.text);
    let one = got.text.find("{\"echo\":{\"n\":1}}").unwrap();
    let two = got.text.find("{\"echo\":{\"n\":2}}").unwrap();
    assert!(first < one && one < second && second < two && two < third);
    assert_eq!(up.hits(), 2);
}

#[test]
fn http10_closes_unless_keep_alive_is_asked_for() {
    let up = Upstream::always(Reply::json(200, "{\"ok\":1}"));
    let bal = start(&[up.url()], &[], |_| {});
    // Without keep-alive: one answer, then close.
    let plain = exchange(
        bal.addr,
        b"POST /v1/embeddings HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
        false,
        Duration::from_secs(5),
    );
    assert_eq!(plain.statuses, [200], "{}", plain.text);
    assert!(plain.closed);
    assert!(plain.text.starts_with("HTTP/1.1 200"), "{}", plain.text);
    assert!(plain.text.ends_with("{\"ok\":1}"), "{}", plain.text);
    // With keep-alive: the connection stays open for a second request.
    let mut s = connect(bal.addr);
    let req = b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    s.write_all(req).unwrap();
    let mut reader = std::io::BufReader::new(s.try_clone().unwrap());
    let first = crate::util::read_response(&mut reader).unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.header("connection"), Some("keep-alive"));
    s.write_all(
        b"POST /v1/embeddings HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}",
    )
    .unwrap();
    let second = crate::util::read_response(&mut reader).unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(second.text(), "{\"ok\":1}");
    // HTTP/1.0 never gets a chunked body.
    assert!(first.header("transfer-encoding").is_none());
    assert!(second.header("transfer-encoding").is_none());
    assert_eq!(up.hits(), 2);
}

#[test]
fn upgrade_is_ignored_and_never_forwarded() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &[], |_| {});
    let mut s = connect(bal.addr);
    s.write_all(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 2\r\n\r\n{}",
    )
    .unwrap();
    let mut reader = std::io::BufReader::new(s.try_clone().unwrap());
    let resp = crate::util::read_response(&mut reader).unwrap();
    assert_eq!(resp.status, 200, "served as an ordinary request, not 101");
    assert!(resp.header("upgrade").is_none());
    let seen = &up.requests()[0];
    assert!(seen.header("upgrade").is_none(), "{:?}", seen.headers);
    // The connection still speaks HTTP/1.1.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(crate::util::read_response(&mut reader).unwrap().status, 200);
}
