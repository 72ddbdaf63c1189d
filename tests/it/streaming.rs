//! Streaming: unbuffered forwarding, the commit point, cuts, departures, scale.

use std::io::{BufReader, Write};
use std::time::{Duration, Instant};

use crate::fake::{content_event, finish_events, role_event, Reply, Step, Upstream};
use crate::util::{chat, connect, post, read_response, start, wait_for};

fn ms(n: u64) -> Step {
    Step::Sleep(Duration::from_millis(n))
}

#[test]
fn each_chunk_reaches_the_client_within_50ms() {
    let mut steps = vec![Step::Send(role_event())];
    for i in 0..8 {
        steps.push(ms(200));
        steps.push(Step::Send(content_event(&format!("tok{i} "))));
    }
    steps.push(ms(200));
    steps.push(Step::Send(finish_events()));
    let up = Upstream::always(Reply::sse(steps));
    let bal = start(&[up.url()], &[], |_| {});
    let r = post(bal.addr, "/v1/chat/completions", &chat(true));
    assert_eq!(r.status, 200);
    assert!(r.complete);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = r.text();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.starts_with(std::str::from_utf8(&role_event()).unwrap()));
    // The first content event commits together with the held-back role event
    // (client chunk 0 = upstream sends 0 and 1); from then on each upstream
    // send is its own client chunk.
    let sent = up.sent();
    assert_eq!(sent.len(), 10);
    assert_eq!(
        r.chunks.len(),
        9,
        "one client chunk per upstream chunk after the commit"
    );
    // Each chunk arrives before the upstream sends the next (nothing is
    // buffered), and typically within 50 ms; the median keeps a busy CI
    // machine's scheduling hiccups from deciding the test.
    let mut lags: Vec<Duration> = r
        .chunks
        .iter()
        .enumerate()
        .map(|(k, (arrived, _))| arrived.duration_since(sent[k + 1]))
        .collect();
    // Buffering would delay every chunk past the next send; a loaded
    // machine may delay one or two.
    let on_time = lags
        .iter()
        .filter(|l| **l < Duration::from_millis(200))
        .count();
    assert!(on_time >= lags.len() - 2, "lags {lags:?}");
    lags.sort();
    let median = lags[lags.len() / 2];
    assert!(
        median < Duration::from_millis(50),
        "median lag {median:?}: {lags:?}"
    );
}

#[test]
fn preamble_only_failure_fails_over_invisibly() {
    let dying = Upstream::always(Reply::sse(vec![
        Step::Send(role_event()),
        ms(20),
        Step::Cut,
    ]));
    let good = Upstream::always(Reply::sse(vec![
        Step::Send(role_event()),
        Step::Send(content_event("hello")),
        Step::Send(finish_events()),
    ]));
    let bal = start(&[dying.url(), good.url()], &[], |_| {});
    for _ in 0..2 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(true));
        assert_eq!(r.status, 200);
        assert!(r.complete);
        let text = r.text();
        assert_eq!(
            text.matches("assistant").count(),
            1,
            "preamble sent once: {text}"
        );
        assert!(
            text.contains("hello") && text.ends_with("data: [DONE]\n\n"),
            "{text}"
        );
        assert_eq!(r.header("x-gaia-upstream"), Some("h1"));
    }
    assert!(dying.hits() >= 1);
}

#[test]
fn error_event_before_output_fails_over() {
    let erring = Upstream::always(Reply::sse(vec![Step::Send(
        b"data: {\"error\":{\"message\":\"model overloaded\"}}\n\n".to_vec(),
    )]));
    let good = Upstream::always(Reply::sse(vec![
        Step::Send(content_event("ok")),
        Step::Send(finish_events()),
    ]));
    let bal = start(&[erring.url(), good.url()], &[], |_| {});
    for _ in 0..2 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(true));
        assert!(r.text().contains("\"ok\""), "{}", r.text());
        assert!(!r.text().contains("overloaded"));
    }
}

#[test]
fn cut_after_commit_ends_with_error_event_and_no_done() {
    let up = Upstream::always(Reply::sse(vec![
        Step::Send(role_event()),
        Step::Send(content_event("partial")),
        ms(30),
        Step::Cut,
    ]));
    let other = Upstream::always(Reply::sse(vec![Step::Send(content_event("other"))]));
    let bal = start(&[up.url(), other.url()], &[], |c| c.hosts.truncate(1));
    let r = post(bal.addr, "/v1/chat/completions", &chat(true));
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("partial"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("data: {\"error\""), "{text}");
    assert!(last.contains("stream_interrupted"));
    assert_eq!(other.hits(), 0, "nothing after the commit is retried");
    // The balancer is still healthy.
    assert_eq!(
        crate::util::request(bal.addr, "GET", "/healthz", &[], b"").status,
        200
    );
}

/// Every event of an SSE body, each ended by a blank line (LF only here).
fn events(text: &str) -> Vec<&str> {
    text.split_terminator("\n\n").collect()
}

/// An upstream that dies in the middle of an event, after the commit: the
/// client must get the error event as an event of its own (a half event
/// before it would run into it, and neither would parse), over HTTP/1.1
/// and HTTP/1.0 alike.
#[test]
fn a_cut_in_the_middle_of_an_event_still_ends_with_a_whole_error_event() {
    let half = b"data: {\"id\":\"c1\",\"choi".to_vec();
    let up = Upstream::always(Reply::sse(vec![
        Step::Send(role_event()),
        Step::Send(content_event("partial")),
        ms(30),
        Step::Send(half),
        ms(30),
        Step::Cut,
    ]));
    let bal = start(&[up.url()], &[], |_| {});
    let body = chat(true);
    let http10 = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let raw10 = crate::util::raw(bal.addr, http10.as_bytes());
    let text10 = raw10
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    let r = post(bal.addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200);
    for text in [r.text(), text10] {
        assert!(text.contains("partial"), "{text}");
        assert!(!text.contains("[DONE]"), "{text}");
        assert!(text.ends_with("\n\n"), "{text:?}");
        let all = events(&text);
        for event in &all {
            let data = event.strip_prefix("data: ").expect("a data event");
            let value: serde_json::Value = serde_json::from_str(data)
                .unwrap_or_else(|e| panic!("event {event:?} is not JSON ({e}) in {text:?}"));
            assert!(value.is_object());
        }
        let last: serde_json::Value =
            serde_json::from_str(all.last().unwrap().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(last["error"]["code"], "stream_interrupted", "{text}");
    }
}

/// Start a stream, read its first chunk, then drop the client.
fn leave_mid_stream(silent: bool) {
    let mut steps = vec![Step::Send(content_event("first"))];
    if silent {
        steps.push(ms(10_000));
    } else {
        for _ in 0..200 {
            steps.push(ms(50));
            steps.push(Step::Send(content_event("more")));
        }
    }
    let up = Upstream::always(Reply::sse(steps));
    let bal = start(&[up.url()], &[], |_| {});
    let mut s = connect(bal.addr);
    let body = chat(true);
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert!(line.contains("200"), "{line}");
    std::thread::sleep(Duration::from_millis(100));
    let left = Instant::now();
    drop(reader);
    s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(s);
    assert!(
        wait_for(Duration::from_secs(3), || !up.peer_closed().is_empty()),
        "upstream never saw the close"
    );
    let seen = up.peer_closed()[0].duration_since(left);
    assert!(
        seen < Duration::from_secs(1),
        "upstream saw the close after {seen:?}"
    );
}

#[test]
fn client_leaving_mid_stream_closes_the_upstream() {
    leave_mid_stream(false);
}

#[test]
fn client_leaving_while_upstream_is_silent_closes_the_upstream() {
    leave_mid_stream(true);
}

#[test]
fn client_leaving_before_the_response_head_closes_the_upstream() {
    let up = Upstream::always(Reply::Hang(Duration::from_secs(10)));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.timeouts.first_byte = Duration::from_secs(30)
    });
    let mut s = connect(bal.addr);
    let body = chat(false);
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    assert!(wait_for(Duration::from_secs(3), || up.hits() == 1));
    let left = Instant::now();
    drop(s);
    assert!(wait_for(Duration::from_secs(3), || !up
        .peer_closed()
        .is_empty()));
    assert!(up.peer_closed()[0].duration_since(left) < Duration::from_secs(1));
}

#[test]
fn three_hundred_concurrent_streams_all_complete() {
    let mut steps = vec![Step::Send(role_event())];
    for i in 0..5 {
        steps.push(ms(100));
        steps.push(Step::Send(content_event(&format!("t{i}"))));
    }
    steps.push(Step::Send(finish_events()));
    let up = Upstream::always(Reply::sse(steps));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.workers = 320;
        c.settings.queue_size = 1024;
    });
    let addr = bal.addr;
    let handles: Vec<_> = (0..300)
        .map(|_| {
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let r = post(addr, "/v1/chat/completions", &chat(true));
                    r.status == 200
                        && r.complete
                        && r.text().ends_with("data: [DONE]\n\n")
                        && r.text().contains("t4")
                })
                .unwrap()
        })
        .collect();
    let ok = handles
        .into_iter()
        .filter(|_| true)
        .map(|h| h.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(ok, 300);
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let up = Upstream::always(Reply::json(200, "{\"ok\":1}"));
    let bal = start(&[up.url()], &[], |_| {});
    let s = connect(bal.addr);
    let mut w = s.try_clone().unwrap();
    let mut reader = BufReader::new(s);
    for _ in 0..3 {
        write!(
            w,
            "POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{{}}"
        )
        .unwrap();
        let r = read_response(&mut reader).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "{\"ok\":1}");
    }
    let _ = post(bal.addr, "/v1/embeddings", "{}");
}

#[test]
fn worker_threads_start_on_demand_up_to_the_cap() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    // Every upstream request waits for the gate: each stream holds a worker.
    let gate = Arc::new(AtomicBool::new(false));
    let open = gate.clone();
    let up = Upstream::start(move |_, _| {
        wait_for(Duration::from_secs(30), || open.load(Ordering::Relaxed));
        Reply::sse(vec![
            Step::Send(role_event()),
            Step::Send(content_event("hi")),
            Step::Send(finish_events()),
        ])
    });
    let cap = 12;
    let bal = start(&[up.url()], &[], |c| {
        c.settings.workers = cap;
        c.settings.queue_wait = Duration::from_secs(60);
        c.settings.timeouts.first_byte = Duration::from_secs(60);
        c.settings.timeouts.total = Duration::from_secs(60);
    });
    let initial = gaia_balancer::server::INITIAL_WORKERS;
    assert_eq!(bal.server().workers_started(), initial);
    let addr = bal.addr;
    let stream = move || {
        std::thread::spawn(move || {
            let r = post(addr, "/v1/chat/completions", &chat(true));
            r.status == 200 && r.complete && r.text().ends_with("data: [DONE]\n\n")
        })
    };
    // Ten at once: the pool grows past its start to one thread per stream.
    let mut clients: Vec<_> = (0..10).map(|_| stream()).collect();
    assert!(
        wait_for(Duration::from_secs(20), || up.hits() == 10),
        "hits {}",
        up.hits()
    );
    let started = bal.server().workers_started();
    assert!((10..=cap).contains(&started), "started {started}");
    // Six more than the cap allows: it stops at the cap, the rest queue.
    clients.extend((0..6).map(|_| stream()));
    assert!(
        wait_for(Duration::from_secs(20), || up.hits() == cap
            && bal.server().queue_depth() == 16 - cap),
        "hits {}, queued {}",
        up.hits(),
        bal.server().queue_depth()
    );
    assert_eq!(bal.server().workers_started(), cap);
    // Released, every stream completes, the queued ones on freed workers.
    gate.store(true, Ordering::Relaxed);
    let ok = clients
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(ok, 16);
    assert_eq!(up.hits(), 16);
    assert_eq!(bal.server().workers_started(), cap);
}
