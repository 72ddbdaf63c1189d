//! Hostile and malformed input over raw sockets against the running server.

use std::io::{BufReader, Read, Write};
use std::time::{Duration, Instant};

use crate::fake::{Reply, Step, Upstream};
use crate::util::{
    connect, hold_the_only_worker, post, raw, read_response, request, start, status_of,
};

#[test]
fn huge_content_length_is_413_and_the_process_keeps_serving() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &[], |_| {});
    let resp = raw(
        bal.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000000\r\n\r\n{",
    );
    assert_eq!(status_of(&resp), 413, "{resp}");
    assert!(resp.contains("Connection: close"));
    let max = raw(
        bal.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 18446744073709551615\r\n\r\n",
    );
    assert_eq!(status_of(&max), 413, "{max}");
    assert_eq!(post(bal.addr, "/v1/embeddings", "{}").status, 200);
    assert_eq!(up.hits(), 1);
}

#[test]
fn ten_thousand_headers_is_431() {
    let bal = start(&[crate::fake::refused_url()], &[], |_| {});
    let mut req = b"GET /healthz HTTP/1.1\r\nHost: t\r\n".to_vec();
    for i in 0..10_000 {
        req.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let resp = raw(bal.addr, &req);
    assert_eq!(status_of(&resp), 431, "{resp}");
    assert_eq!(request(bal.addr, "GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn slow_head_gets_408_while_others_are_served() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.head_timeout = Duration::from_millis(800)
    });
    let mut slow = connect(bal.addr);
    slow.write_all(b"POST /v1/embeddings HTTP/1.1\r\nHo")
        .unwrap();
    let began = Instant::now();
    // Others are served meanwhile.
    for _ in 0..5 {
        assert_eq!(post(bal.addr, "/v1/embeddings", "{}").status, 200);
    }
    let mut out = String::new();
    let _ = slow.read_to_string(&mut out);
    assert_eq!(status_of(&out), 408, "{out}");
    assert!(began.elapsed() < Duration::from_secs(5));
}

#[test]
fn the_first_head_is_due_head_timeout_after_the_accept_not_after_its_first_byte() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.head_timeout = Duration::from_millis(500)
    });
    let mut slow = connect(bal.addr);
    let connected = Instant::now();
    // The scenario itself: silent for 300 ms, then the head in pieces, the
    // last sent at least 700 ms after connecting (within 500 ms of the
    // first byte, but not of the accept).
    std::thread::sleep(Duration::from_millis(300));
    let head = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    let (start, end) = head.split_at(head.len() - 2);
    let _ = slow.write_all(start);
    std::thread::sleep(Duration::from_millis(700).saturating_sub(connected.elapsed()));
    let _ = slow.write_all(end);
    let mut out = String::new();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = slow.read_to_string(&mut out);
    assert_eq!(status_of(&out), 408, "{out}");
}

#[test]
fn ambiguous_framing_is_refused_and_nothing_is_smuggled() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &[], |_| {});
    let smuggle = "POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nPOST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}";
    let resp = raw(bal.addr, smuggle.as_bytes());
    assert_eq!(status_of(&resp), 400, "{resp}");
    assert_eq!(
        resp.matches("HTTP/1.1").count(),
        1,
        "one answer, then close: {resp}"
    );
    let dup = raw(bal.addr, b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}");
    assert_eq!(status_of(&dup), 400, "{dup}");
    let list = raw(
        bal.addr,
        b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 2, 2\r\n\r\n{}",
    );
    assert_eq!(status_of(&list), 400, "{list}");
    let te = raw(
        bal.addr,
        b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n{}",
    );
    assert_eq!(status_of(&te), 501, "{te}");
    assert_eq!(up.hits(), 0);
}

#[test]
fn truncated_body_is_never_forwarded() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &[], |_| {});
    let mut s = connect(bal.addr);
    s.write_all(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"input\":",
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.is_empty() || status_of(&out) == 400, "{out}");
    assert_eq!(up.hits(), 0);
}

#[test]
fn chunked_request_body_and_expect_continue_are_forwarded() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &[], |_| {});
    let resp = raw(
        bal.addr,
        b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n4\r\n:12}\r\n0\r\n\r\n",
    );
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert_eq!(up.requests()[0].body, b"{\"a\":12}");

    let s = connect(bal.addr);
    let mut w = s.try_clone().unwrap();
    let mut reader = BufReader::new(s);
    w.write_all(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n").unwrap();
    let cont = read_response(&mut reader).unwrap();
    assert_eq!(cont.status, 100);
    w.write_all(b"{}").unwrap();
    assert_eq!(read_response(&mut reader).unwrap().status, 200);
}

#[test]
fn full_queue_sheds_with_503_and_retry_after() {
    // Silent far longer than the test (it ends when the balancer hangs up):
    // a stream that ended would free the worker and empty the queue while
    // a loaded machine is still filling it.
    let up = Upstream::always(Reply::sse(vec![Step::Sleep(Duration::from_secs(60))]));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.workers = 1;
        c.settings.queue_size = 1;
        // Nor may the queued connections time out of the queue meanwhile.
        c.settings.queue_wait = Duration::from_secs(30);
    });
    // Occupy the only worker with a stream that stays silent.
    let _busy = hold_the_only_worker(&bal, &up);
    // One connection in the dispatcher's hand, one in the queue of 1.
    let _handed = connect(bal.addr);
    assert!(crate::util::wait_for(Duration::from_secs(3), || bal
        .server()
        .queue_depth()
        == 1));
    let _queued = connect(bal.addr);
    assert!(crate::util::wait_for(Duration::from_secs(3), || bal
        .server()
        .queue_depth()
        == 2));
    let shed = raw(bal.addr, b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status_of(&shed), 503, "{shed}");
    assert!(shed.contains("Retry-After: 1"), "{shed}");
    // Health checks are answered without a worker (the health lane).
    for path in ["/healthz", "/readyz"] {
        let probe = raw(
            bal.addr,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
        );
        assert_eq!(status_of(&probe), 200, "{path}: {probe}");
        assert!(probe.contains("Connection: close"), "{probe}");
    }
    let head = raw(bal.addr, b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status_of(&head), 200, "{head}");
    assert!(!head.contains("ok\n"), "{head}");
    assert_eq!(bal.server().queue_depth(), 2, "the queue is untouched");
}

#[test]
fn a_panic_ends_the_request_not_the_worker() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &[], |c| c.settings.workers = 1);
    for _ in 0..3 {
        let r = request(
            bal.addr,
            "GET",
            "/v1/models",
            &[("x-gaia-debug-panic", "1")],
            b"",
        );
        assert_eq!(r.status, 500);
        assert_eq!(r.json()["error"]["code"], "internal_error");
        // The only worker is still there.
        assert_eq!(post(bal.addr, "/v1/embeddings", "{}").status, 200);
    }
}

#[test]
fn a_queued_connection_gets_503_at_queue_wait_while_every_worker_is_busy() {
    // The only worker is held by a stream that stays silent for seconds; a
    // queued connection must not wait for it to end.
    let up = Upstream::always(Reply::sse(vec![Step::Sleep(Duration::from_secs(4))]));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.workers = 1;
        c.settings.queue_wait = Duration::from_millis(500);
    });
    let _busy = hold_the_only_worker(&bal, &up);
    let began = Instant::now();
    let resp = raw(bal.addr, b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n");
    let waited = began.elapsed();
    assert_eq!(status_of(&resp), 503, "{resp}");
    assert!(resp.contains("Retry-After: 1"), "{resp}");
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_millis(1500),
        "answered after {waited:?}, queueWaitMs is 500"
    );
}

#[test]
fn idle_and_slow_connections_give_way_to_a_waiting_one() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &[], |c| c.settings.workers = 1);
    let grace = gaia_balancer::server::HEAD_GRACE;
    let served_within = |what: &str| {
        let began = Instant::now();
        let r = post(bal.addr, "/v1/embeddings", "{}");
        let took = began.elapsed();
        assert_eq!(r.status, 200, "{what}");
        assert!(took < grace + Duration::from_secs(1), "{what}: {took:?}");
    };
    let read_all = |mut s: std::net::TcpStream| {
        let mut out = String::new();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read_to_string(&mut out);
        out
    };

    // An idle keep-alive connection holds the only worker: closed silently.
    let ka = connect(bal.addr);
    let mut w = ka.try_clone().unwrap();
    let mut reader = BufReader::new(ka.try_clone().unwrap());
    w.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut reader).unwrap().status, 200);
    served_within("behind an idle keep-alive connection");
    assert_eq!(read_all(ka), "");

    // Each of the next two reaches the free worker before the request behind
    // it arrives (while every worker is busy, the health lane lets a request
    // that has arrived overtake a connection that has sent nothing yet).
    let worker_takes = |what: &str| {
        let server = bal.server();
        let taken = crate::util::wait_for(Duration::from_secs(3), || server.idle_workers() == 0);
        assert!(taken, "{what}: the worker did not take it");
    };
    let worker_free = || {
        let server = bal.server();
        assert!(crate::util::wait_for(Duration::from_secs(3), || server
            .idle_workers()
            == 1));
    };
    // A fresh connection that sends nothing: 503, so a late request learns why.
    worker_free();
    let idle = connect(bal.addr);
    worker_takes("silent");
    served_within("behind a silent new connection");
    let out = read_all(idle);
    assert_eq!(status_of(&out), 503, "{out}");
    assert!(out.contains("Retry-After: 1"));

    // A head that trickles in: 408.
    worker_free();
    let mut slow = connect(bal.addr);
    slow.write_all(b"POST /v1/embeddings HTTP/1.1\r\nHo")
        .unwrap();
    worker_takes("slow");
    served_within("behind a slow head");
    let out = read_all(slow);
    assert_eq!(status_of(&out), 408, "{out}");
    assert_eq!(up.hits(), 3);
}

#[test]
fn without_a_waiting_connection_idle_ones_keep_their_time() {
    // No pressure: an idle keep-alive connection is kept for keepAliveMs,
    // well past HEAD_GRACE.
    let bal = start(&[crate::fake::refused_url()], &[], |c| {
        c.settings.workers = 2;
        c.settings.keep_alive = Duration::from_secs(3);
    });
    let ka = connect(bal.addr);
    let mut w = ka.try_clone().unwrap();
    let mut reader = BufReader::new(ka);
    w.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut reader).unwrap().status, 200);
    let began = Instant::now();
    let mut byte = [0u8; 1];
    let n = reader.get_mut().read(&mut byte).unwrap_or(0);
    assert_eq!(n, 0);
    let held = began.elapsed();
    assert!(
        held > Duration::from_millis(2_500) && held < Duration::from_secs(5),
        "closed after {held:?}"
    );
}

#[test]
fn a_body_on_a_locally_answered_request_is_never_read_as_a_request() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.keep_alive = Duration::from_millis(300);
        c.settings.discovery_interval = Some(Duration::from_secs(60));
    });
    let smuggled = "GET /status HTTP/1.1\r\nHost: x\r\n\r\n";
    for path in ["/healthz", "/readyz", "/status", "/metrics", "/v1/models"] {
        let by_length = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        );
        let chunked = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
            smuggled.len()
        );
        for input in [by_length, chunked] {
            let out = raw(bal.addr, input.as_bytes());
            assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{path}: {out}");
            assert!(out.contains("Connection: close"), "{path}: {out}");
        }
    }
    // /status answered only the two requests for it, never a body.
    let m = request(bal.addr, "GET", "/metrics", &[], b"").text();
    let status_200 = m
        .lines()
        .find(|l| {
            l.contains("route=\"status\"")
                && l.contains("code=\"200\"")
                && l.starts_with("gaia_balancer_requests_total")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(status_200, Some(2.0), "{m}");
}

#[test]
fn the_health_lane_answers_no_check_a_worker_would_refuse() {
    // While the only worker is busy, health checks are answered by the lane;
    // it must be as strict as a worker (400 for each of these), never 200.
    let up = Upstream::always(Reply::sse(vec![Step::Sleep(Duration::from_secs(60))]));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.workers = 1;
        c.settings.queue_wait = Duration::from_millis(300);
    });
    let _busy = hold_the_only_worker(&bal, &up);
    let good = raw(bal.addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status_of(&good), 200, "the lane is on: {good}");
    for bad in [
        &b"GET /healthz HTTP/1.1\r\n\r\n"[..],
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /readyz HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        b"GET /healthz HTTP/1.1\nHost: a\n\n",
    ] {
        let r = raw(bal.addr, bad);
        assert_ne!(
            status_of(&r),
            200,
            "{:?} answered: {r}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn a_flood_of_silent_connections_cannot_keep_a_health_check_out() {
    let up = Upstream::always(Reply::sse(vec![Step::Sleep(Duration::from_secs(60))]));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.workers = 1;
        c.settings.queue_size = 2048;
        c.settings.queue_wait = Duration::from_secs(30);
    });
    let _busy = hold_the_only_worker(&bal, &up);
    // Silent connections keep arriving, faster than the lane's 100 ms look
    // lets them go: the lane stays full the whole time.
    let addr = bal.addr;
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = opened.clone();
    let flood = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for _ in 0..1500 {
            if let Ok(c) = std::net::TcpStream::connect(addr) {
                conns.push(c);
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        conns
    });
    assert!(crate::util::wait_for(Duration::from_secs(10), || {
        opened.load(std::sync::atomic::Ordering::Relaxed) >= 200
    }));
    let probe = raw(bal.addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status_of(&probe), 200, "{probe}");
    drop(flood.join().unwrap());
}
