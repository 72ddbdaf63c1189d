//! The health model: each row of the decision table, ejection, cooldowns,
//! the retry budget, early commits, and a seeded chaos run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fake::{content_event, finish_events, refused_url, role_event, Reply, Step, Upstream};
use crate::util::{chat, post, request, start, wait_for};

const OK: &str = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;

fn status(addr: std::net::SocketAddr) -> serde_json::Value {
    request(addr, "GET", "/status", &[], b"").json()
}

fn host_field(addr: std::net::SocketAddr, host: usize, field: &str) -> serde_json::Value {
    status(addr)["hosts"][host][field].clone()
}

fn good_stream() -> Reply {
    Reply::sse(vec![
        Step::Send(role_event()),
        Step::Send(content_event("fine")),
        Step::Send(finish_events()),
    ])
}

#[test]
fn host_failures_are_counted_and_four_xx_are_not() {
    let cases: Vec<(Reply, bool)> = vec![
        (Reply::json(500, "{}"), true),
        (Reply::json(502, "{}"), true),
        (Reply::json(504, "{}"), true),
        (Reply::Close, true),
        (Reply::sse(vec![Step::Send(role_event()), Step::Cut]), true),
        (Reply::json(404, "{}"), false),
        (Reply::json(429, "{}"), false),
    ];
    for (reply, is_failure) in cases {
        let what = format!("{reply:?}");
        let bad = Upstream::always(reply);
        let good = Upstream::always(Reply::json(200, OK));
        let bal = start(&[bad.url(), good.url()], &[], |_| {});
        for _ in 0..2 {
            assert_eq!(
                post(bal.addr, "/v1/chat/completions", &chat(false)).status,
                200,
                "{what}"
            );
        }
        let failures = host_field(bal.addr, 0, "failures").as_u64().unwrap();
        assert_eq!(failures > 0, is_failure, "{what}: failures {failures}");
        assert_eq!(host_field(bal.addr, 1, "failures").as_u64(), Some(0));
    }
}

#[test]
fn refused_and_first_byte_timeouts_are_host_failures() {
    let hang = Upstream::always(Reply::Hang(Duration::from_secs(5)));
    let good = Upstream::always(Reply::json(200, OK));
    let bal = start(&[refused_url(), hang.url(), good.url()], &[], |c| {
        c.settings.timeouts.first_byte = Duration::from_millis(300);
    });
    for _ in 0..3 {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(false)).status,
            200
        );
    }
    assert!(host_field(bal.addr, 0, "failures").as_u64().unwrap() >= 1);
    assert!(host_field(bal.addr, 1, "failures").as_u64().unwrap() >= 1);
    let last = host_field(bal.addr, 0, "lastFailure");
    assert!(last.as_str().unwrap().contains("refused"), "{last}");
}

/// README: a DNS failure is a connect failure like a refused port (the
/// `connect` outcome in `x-gaia-attempts` and `upstream_attempts_total`),
/// not a connection that broke off. `.invalid` never resolves (RFC 6761);
/// a resolver that times out instead is a connect timeout, also `connect`.
#[test]
fn a_host_name_that_does_not_resolve_is_a_connect_failure() {
    let bal = start(&["http://no-such-host.invalid:9".to_string()], &[], |c| {
        c.settings.max_attempts = 1;
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:connect"));
    let metrics = request(bal.addr, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains(r#"upstream_attempts_total{host="h0",outcome="connect"} 1"#),
        "{metrics}"
    );
}

/// A host given by name is served through the resolver's cache (README:
/// "Name resolution"): `localhost` comes from `/etc/hosts`, may also name
/// `::1`, where nothing listens, and every request still gets its answer
/// from the one upstream, on pooled connections.
#[test]
fn a_host_given_by_name_is_served() {
    let up = Upstream::always(Reply::json(200, OK));
    let url = up.url().replace("127.0.0.1", "localhost");
    let bal = start(&[url], &[], |c| c.settings.max_attempts = 1);
    for _ in 0..20 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(up.hits(), 20);
}

#[test]
fn five_consecutive_failures_eject_a_host() {
    let bad = Upstream::always(Reply::json(500, "{}"));
    let good = Upstream::always(Reply::json(200, OK));
    let bal = start(&[bad.url(), good.url()], &[], |_| {});
    for _ in 0..12 {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(false)).status,
            200
        );
    }
    assert_eq!(host_field(bal.addr, 0, "state"), "ejected");
    assert_eq!(status(bal.addr)["totals"]["ejected"], 1);
    assert!(host_field(bal.addr, 0, "ejectedSeconds").as_f64().unwrap() > 25.0);
    let hits = bad.hits();
    assert_eq!(hits, 5);
    for _ in 0..10 {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(false)).status,
            200
        );
    }
    assert_eq!(bad.hits(), hits, "an ejected host gets no traffic");
    // /readyz stays 200: one host is still routable.
    assert_eq!(request(bal.addr, "GET", "/readyz", &[], b"").status, 200);
}

#[test]
fn a_503_with_retry_after_cools_the_host() {
    let busy = Upstream::always(Reply::json(503, "{}").with_header("Retry-After", "30"));
    let good = Upstream::always(Reply::json(200, OK));
    let bal = start(&[busy.url(), good.url()], &[], |_| {});
    for _ in 0..6 {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(false)).status,
            200
        );
    }
    assert_eq!(busy.hits(), 1, "cooling for 30 s after one 503");
    assert_eq!(host_field(bal.addr, 0, "state"), "cooling");
}

#[test]
fn rejected_keys_leave_rotation() {
    let up = Upstream::start(|seen, _| {
        if seen.header("authorization") == Some("Bearer key-revoked-00000001") {
            Reply::json(401, r#"{"error":{"message":"invalid key"}}"#)
        } else {
            Reply::json(200, OK)
        }
    });
    let bal = start(
        &[up.url()],
        &["key-revoked-00000001", "key-working-00000002"],
        |_| {},
    );
    for _ in 0..6 {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(false)).status,
            200
        );
    }
    let used = up
        .requests()
        .iter()
        .filter(|s| s.header("authorization") == Some("Bearer key-revoked-00000001"))
        .count();
    assert_eq!(used, 1, "a rejected key is never sent again");
    let keys = status(bal.addr)["keys"].clone();
    assert_eq!(keys[0]["state"], "disabled");
    assert_eq!(keys[0]["key"], "...0001");
    assert_eq!(keys[1]["state"], "active");
}

#[test]
fn a_key_limited_on_two_hosts_cools_everywhere() {
    let limited = |seen: &crate::fake::Seen, _| {
        if seen.header("authorization") == Some("Bearer key-hot-000000000001") {
            Reply::json(429, "{}")
        } else {
            Reply::json(200, OK)
        }
    };
    let a = Upstream::start(limited);
    let b = Upstream::start(limited);
    let bal = start(
        &[a.url(), b.url()],
        &["key-hot-000000000001", "key-cool-00000000002"],
        |_| {},
    );
    for _ in 0..10 {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(false)).status,
            200
        );
    }
    let hot = |u: &Upstream| {
        u.requests()
            .iter()
            .filter(|s| s.header("authorization") == Some("Bearer key-hot-000000000001"))
            .count()
    };
    assert_eq!(hot(&a) + hot(&b), 2, "once per host, then the key cools");
    assert_eq!(status(bal.addr)["keys"][0]["state"], "cooling");
    assert_eq!(host_field(bal.addr, 0, "state"), "up");
}

#[test]
fn a_host_limiting_two_keys_cools_as_a_host() {
    let a = Upstream::always(Reply::json(429, "{}"));
    let b = Upstream::always(Reply::json(200, OK));
    let bal = start(
        &[a.url(), b.url()],
        &["key-one-000000000001", "key-two-000000000002"],
        |_| {},
    );
    for _ in 0..10 {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(false)).status,
            200
        );
    }
    assert_eq!(a.hits(), 2, "one 429 per key, then the host cools");
    assert_eq!(host_field(bal.addr, 0, "state"), "cooling");
    let keys = status(bal.addr)["keys"].clone();
    assert_eq!(keys[0]["state"], "active");
    assert_eq!(keys[1]["state"], "active");
}

#[test]
fn when_everything_cools_the_request_waits_if_it_fits() {
    let n = Arc::new(AtomicUsize::new(0));
    let calls = n.clone();
    let up = Upstream::start(move |_, _| {
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::json(429, "{}").with_header("Retry-After", "1")
        } else {
            Reply::json(200, OK)
        }
    });
    let bal = start(&[up.url()], &["key-only-0000000001"], |_| {});
    let began = Instant::now();
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    let waited = began.elapsed();
    assert!(waited >= Duration::from_millis(900), "waited {waited:?}");
    assert_eq!(
        r.header("x-gaia-attempts"),
        Some("h0[...0001]:429,h0[...0001]:200")
    );
}

#[test]
fn when_everything_cools_past_the_deadline_the_answer_is_503() {
    let up = Upstream::always(Reply::json(429, "{}").with_header("Retry-After", "20"));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.timeouts.total = Duration::from_secs(3)
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 503, "{}", r.text());
    let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((19..=20).contains(&after), "{after}");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(up.hits(), 1);
}

/// README "Keys": attempts that run out with every one rate-limited (429,
/// or 503 with `Retry-After`) end in a 503 saying when the first cooldown
/// ends, as the cooldown wait's 503 does, not in a 502 without a hint.
#[test]
fn when_attempts_run_out_on_429s_the_answer_is_503_with_retry_after() {
    let slow = Upstream::always(
        Reply::json(429, r#"{"error":{"message":"slow down (h0)"}}"#)
            .with_header("Retry-After", "30"),
    );
    let soon = Upstream::always(
        Reply::json(429, r#"{"error":{"message":"slow down (h1)"}}"#)
            .with_header("Retry-After", "20"),
    );
    let bal = start(&[slow.url(), soon.url()], &[], |c| {
        c.settings.max_attempts = 2;
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!((slow.hits(), soon.hits()), (1, 1), "{}", r.text());
    // The earliest cooldown of the two.
    let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((19..=20).contains(&after), "{after}");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let error = &r.json()["error"];
    assert_eq!(error["code"], "no_upstream_available");
    let msg = error["message"].as_str().unwrap();
    assert!(msg.contains("rate-limited"), "{msg}");
    assert!(msg.contains("maxAttempts"), "{msg}");
    let last = if r.header("x-gaia-attempts").unwrap().ends_with("h0:429") {
        "slow down (h0)"
    } else {
        "slow down (h1)"
    };
    assert!(msg.contains(last), "quotes the last upstream error: {msg}");
}

/// The README's old known limit: a 429 without `Retry-After`, waited out
/// once (1 s), then a second 429 (2 s now) as the last attempt.
#[test]
fn a_429_without_retry_after_as_the_last_attempt_gives_503_with_retry_after() {
    let up = Upstream::always(Reply::json(429, r#"{"error":{"message":"busy"}}"#));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.max_attempts = 2;
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(up.hits(), 2);
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:429,h0:429"));
    let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&after), "{after}");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("busy"), "{msg}");
}

/// A 503 with `Retry-After` cools its host as a 429 does: with a 429
/// elsewhere it is still only rate limits, so 503 with `Retry-After`.
#[test]
fn a_429_and_a_503_with_retry_after_give_503_with_retry_after() {
    let limited = Upstream::always(Reply::json(429, "{}").with_header("Retry-After", "30"));
    let busy = Upstream::always(Reply::json(503, "{}").with_header("Retry-After", "30"));
    let bal = start(&[limited.url(), busy.url()], &[], |c| {
        c.settings.max_attempts = 2;
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!((limited.hits(), busy.hits()), (1, 1));
    let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((29..=30).contains(&after), "{after}");
}

/// The same when what ends the attempts is the backoff before going back
/// to a host whose 503 with `Retry-After` has been waited out: no time is
/// left for it, and only a rate limit stood in the way.
#[test]
fn no_time_for_a_backoff_after_a_503_with_retry_after_gives_503_with_retry_after() {
    let busy = Upstream::always(Reply::json(503, "{}").with_header("Retry-After", "1"));
    // Waiting out the 1 s cooldown fits in 1.45 s; the backoff after it
    // (0.5-1 s, with a turn-around of 1 s) does not.
    let bal = start(&[busy.url()], &[], |c| {
        c.settings.timeouts.connect = Duration::from_secs(1);
        c.settings.timeouts.total = Duration::from_millis(1450);
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(busy.hits(), 1);
    assert_eq!(r.header("retry-after"), Some("1"));
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("no time left"), "{msg}");
}

/// A host that is broken, not just busy, keeps the 502: nothing says when
/// to come back.
#[test]
fn a_429_and_a_500_still_give_502() {
    let limited = Upstream::always(Reply::json(429, "{}").with_header("Retry-After", "30"));
    let broken = Upstream::always(Reply::json(500, r#"{"error":{"message":"boom"}}"#));
    let bal = start(&[limited.url(), broken.url()], &[], |c| {
        c.settings.max_attempts = 2;
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!((limited.hits(), broken.hits()), (1, 1));
    assert_eq!(r.header("retry-after"), None);
    assert_eq!(r.json()["error"]["code"], "upstream_failed");
}

#[test]
fn an_outage_stays_within_the_retry_budget() {
    let a = Upstream::always(Reply::json(500, r#"{"error":{"message":"node down"}}"#));
    let b = Upstream::always(Reply::json(500, "{}"));
    let c = Upstream::always(Reply::json(500, "{}"));
    // As many attempts as hosts: the budget, not the host count, cuts retries.
    // A short connect timeout keeps the same-host turn-around (min(connect, 1 s)) short.
    let bal = start(&[a.url(), b.url(), c.url()], &[], |c| {
        c.settings.max_attempts = 3;
        c.settings.timeouts.connect = Duration::from_millis(100);
    });
    let requests = 200;
    let began = Instant::now();
    let addr = bal.addr;
    let handles: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                (0..requests / 8)
                    .map(|_| {
                        let sent = Instant::now();
                        let r = post(addr, "/v1/chat/completions", &chat(false));
                        let clean =
                            r.status == 502 && r.json()["error"]["code"] == "upstream_failed";
                        (clean, sent.elapsed())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<(bool, Duration)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(
        results.iter().all(|(clean, _)| *clean),
        "every client got a clean 502"
    );
    // Functional bound, not a benchmark: nobody waits anywhere near totalMs (20 s).
    let slowest = results.iter().map(|(_, d)| *d).max().unwrap();
    assert!(
        slowest < Duration::from_secs(5),
        "slowest 502 took {slowest:?}"
    );
    let attempts = a.hits() + b.hits() + c.hits();
    // Without a budget: 3 attempts each = 600. With it: the requests, plus
    // 20 % of them, plus 10 retries per second of the run (at least one window).
    let secs = began.elapsed().as_secs() as usize + 1;
    let allowed = requests + requests / 5 + 10 * secs.max(10);
    assert!(
        attempts <= allowed,
        "{attempts} upstream attempts > {allowed}"
    );
    assert!(attempts > requests, "some retries were allowed");
}

#[test]
fn a_slow_first_token_commits_early_with_keep_alives_and_fails_over_invisibly() {
    let dies = Upstream::always(Reply::sse(vec![
        Step::Send(role_event()),
        Step::Sleep(Duration::from_millis(700)),
        Step::Cut,
    ]));
    let slow_ok = Upstream::always(Reply::sse(vec![
        Step::Sleep(Duration::from_millis(300)),
        Step::Send(content_event("late")),
        Step::Send(finish_events()),
    ]));
    let bal = start(&[dies.url(), slow_ok.url()], &[], |c| {
        c.settings.stream_keep_alive_after = Some(Duration::from_millis(200));
        c.settings.stream_keep_alive_every = Duration::from_millis(150);
        // The dying host must be tried first.
        c.hosts[0].weight = 1000;
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(true));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = r.text();
    assert!(text.starts_with(": keep-alive\n\n"), "{text}");
    assert!(text.matches(": keep-alive").count() >= 3, "{text}");
    assert!(
        text.contains("late") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert!(
        !text.contains("assistant"),
        "the dead host's preamble never reached the client: {text}"
    );
    assert!(r.complete);
    assert_eq!(dies.hits(), 1);
}

#[test]
fn an_early_committed_stream_that_cannot_be_saved_ends_with_an_error_event() {
    let up = Upstream::always(Reply::sse(vec![
        Step::Sleep(Duration::from_millis(400)),
        Step::Cut,
    ]));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.stream_keep_alive_after = Some(Duration::from_millis(100));
        c.settings.max_attempts = 2;
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(true));
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains(": keep-alive"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("data: {\"error\""), "{text}");
    assert!(last.contains("upstream_failed"), "{text}");
}

#[test]
fn a_cut_after_commit_counts_against_the_host() {
    // The pause lets the content be read before the cut (a reset can
    // discard unread bytes).
    let up = Upstream::always(Reply::sse(vec![
        Step::Send(content_event("part")),
        Step::Sleep(Duration::from_millis(50)),
        Step::Cut,
    ]));
    let bal = start(&[up.url()], &[], |_| {});
    let r = post(bal.addr, "/v1/chat/completions", &chat(true));
    assert!(r.text().contains("stream_interrupted"), "{}", r.text());
    // The client can read the error event before the worker has recorded
    // the failure.
    let counted = wait_for(Duration::from_secs(5), || {
        host_field(bal.addr, 0, "failures") == 1
    });
    assert!(counted, "{}", status(bal.addr));
}

#[test]
fn a_departed_client_is_no_failure() {
    let up = Upstream::always(Reply::Hang(Duration::from_secs(5)));
    let bal = start(&[up.url()], &[], |_| {});
    {
        let mut s = crate::util::connect(bal.addr);
        let body = chat(false);
        std::io::Write::write_all(
            &mut s,
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        assert!(wait_for(Duration::from_secs(3), || up.hits() == 1));
    }
    assert!(wait_for(Duration::from_secs(3), || !up
        .peer_closed()
        .is_empty()));
    assert!(wait_for(Duration::from_secs(3), || host_field(
        bal.addr, 0, "inFlight"
    ) == 0));
    assert_eq!(host_field(bal.addr, 0, "failures"), 0);
    assert_eq!(host_field(bal.addr, 0, "consecutiveFailures"), 0);
}

/// Deterministic per-request choice from a seed: xorshift of the request number.
fn roll(seed: u64, n: usize) -> u64 {
    let mut x = seed ^ (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for _ in 0..3 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

fn flaky(seed: u64, faults: Arc<AtomicUsize>) -> Upstream {
    Upstream::start(move |seen, n| {
        let r = roll(seed, n);
        let stream = String::from_utf8_lossy(&seen.body).contains("\"stream\":true");
        if r % 100 < 30 {
            faults.fetch_add(1, Ordering::SeqCst);
            return match (r >> 8) % 5 {
                0 => Reply::json(500, "{}"),
                1 => Reply::json(429, "{}").with_header("Retry-After", "1"),
                2 => Reply::Close,
                3 => Reply::Hang(Duration::from_millis(600)),
                _ => Reply::sse(vec![Step::Send(role_event()), Step::Cut]),
            };
        }
        if stream {
            good_stream()
        } else {
            Reply::json(200, OK)
        }
    })
}

#[test]
fn chaos_run_every_request_succeeds() {
    let steady_stream = |seen: &crate::fake::Seen, _: usize| {
        if String::from_utf8_lossy(&seen.body).contains("\"stream\":true") {
            good_stream()
        } else {
            Reply::json(200, OK)
        }
    };
    let faults = Arc::new(AtomicUsize::new(0));
    let ups = [
        flaky(0x5eed_0001, faults.clone()),
        flaky(0x5eed_0002, faults.clone()),
        Upstream::start(steady_stream),
        Upstream::start(steady_stream),
    ];
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let bal = start(
        &urls,
        &["key-chaos-0000000001", "key-chaos-0000000002"],
        |c| {
            c.settings.timeouts.first_byte = Duration::from_millis(300);
            c.settings.workers = 32;
        },
    );
    let addr = bal.addr;
    let total = 2000;
    let threads = 16;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                for i in 0..total / threads {
                    let stream = (t + i) % 2 == 0;
                    let r = post(addr, "/v1/chat/completions", &chat(stream));
                    let ok = r.status == 200
                        && r.complete
                        && if stream {
                            r.text().contains("fine")
                                && r.text().ends_with("data: [DONE]\n\n")
                                && !r.text().contains("error")
                        } else {
                            r.text() == OK
                        };
                    if !ok {
                        failed.push(format!(
                            "{} {:?} {}",
                            r.status,
                            r.header("x-gaia-attempts"),
                            r.text()
                        ));
                    }
                }
                failed
            })
        })
        .collect();
    let failed: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {total} failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    // Faults really happened (the flaky hosts may end up ejected, as they should).
    let injected = faults.load(Ordering::SeqCst);
    assert!(injected >= 20, "only {injected} faults injected");
}

#[test]
fn going_back_to_a_failed_host_backs_off_exponentially() {
    // One host, so every retry goes back to it after a turn-around of
    // min(connectMs, 1 s) = 200 ms, doubled per pause (jittered over the
    // upper half of the window, capped at 4 turn-arounds).
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = times.clone();
    let up = Upstream::start(move |_, n| {
        seen.lock().unwrap().push(Instant::now());
        if n < 4 {
            Reply::json(500, "{}")
        } else {
            Reply::json(200, OK)
        }
    });
    let bal = start(&[up.url()], &[], |c| {
        c.settings.timeouts.connect = Duration::from_millis(200);
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    let times = times.lock().unwrap().clone();
    assert_eq!(times.len(), 5);
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // Lower bounds only: a pause is never shorter than half its window.
    for (gap, floor) in gaps.iter().zip([100u64, 200, 400, 400]) {
        assert!(*gap >= Duration::from_millis(floor), "{gaps:?}");
    }
}

#[test]
fn a_backoff_that_would_outlast_total_ms_ends_the_request_at_once_with_502() {
    // One host, always 500: the second pause (1-2 s) cannot end before
    // totalMs (1.2 s), so the client hears now instead of at the deadline.
    let up = Upstream::always(Reply::json(500, r#"{"error":{"message":"down"}}"#));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.timeouts.connect = Duration::from_secs(1);
        c.settings.timeouts.total = Duration::from_millis(1200);
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 502, "{}", r.text());
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(message.contains("no time left"), "{message}");
    assert!(
        message.contains("down"),
        "the last upstream error is quoted: {message}"
    );
}

#[test]
fn a_probe_readmits_its_host_at_the_commit_not_when_its_stream_ends() {
    // h0 streams slowly; h1 refuses connections, so the request goes to h0.
    let slow = Upstream::always(Reply::sse(vec![
        Step::Send(role_event()),
        Step::Send(content_event("back")),
        // Shorter than the tests' 5 s idle timeout.
        Step::Sleep(Duration::from_secs(4)),
        Step::Send(finish_events()),
    ]));
    let bal = start(&[slow.url(), refused_url()], &[], |_| {});
    // Eject h0 as five failures would, then let its ejection run out.
    let b = bal.server().shared().current();
    let h0 = b.hosts.all()[0].clone();
    for _ in 0..gaia_balancer::hosts::EJECT_AFTER {
        b.hosts
            .record(&h0, gaia_balancer::hosts::Verdict::Failure, false, None);
    }
    assert_eq!(host_field(bal.addr, 0, "state"), "ejected");
    h0.health().state = gaia_balancer::hosts::HostState::Ejected(Instant::now());
    let addr = bal.addr;
    let client = std::thread::spawn(move || post(addr, "/v1/chat/completions", &chat(true)));
    // The probe's first content is out; the stream runs on for 4 s.
    assert!(wait_for(Duration::from_secs(5), || slow.sent().len() >= 2));
    assert!(
        wait_for(Duration::from_secs(2), || host_field(addr, 0, "state")
            == "up"),
        "still {}",
        host_field(addr, 0, "state")
    );
    assert!(slow.sent().len() < 3, "the stream has not ended yet");
    let r = client.join().unwrap();
    assert!(r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());
    assert_eq!(host_field(addr, 0, "state"), "up");
    assert_eq!(status(addr)["totals"]["ejected"], 0);
}

/// A success clears the repeat count of a (host, key) cooldown as it does
/// a key's and a host's: a 429 after a success cools the pair for 1 s again,
/// not for twice as long as the last one.
#[test]
fn a_success_clears_the_repeat_count_of_a_pair_cooldown() {
    let up = Upstream::start(|_, n| {
        if n == 1 {
            Reply::json(200, OK)
        } else {
            Reply::json(429, "{}")
        }
    });
    // One host, one key: a 429 cools the pair; 300 ms leave no time to wait it out.
    let bal = start(&[up.url()], &["key-only-0000000001"], |c| {
        c.settings.timeouts.total = Duration::from_millis(300)
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    // Once the pair has cooled, the second upstream answer is a success.
    assert!(wait_for(Duration::from_secs(5), || {
        post(bal.addr, "/v1/chat/completions", &chat(false)).status == 200
    }));
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(up.hits(), 3);
    assert_eq!(
        r.header("retry-after"),
        Some("1"),
        "the 429 after a success counted as a repeat"
    );
}

/// The backoff is for going back to a host that failed in this request,
/// whatever the attempt just before it was: a 429 from another host in
/// between (no host failure) must not make the failed host's retry immediate.
#[test]
fn going_back_to_a_failed_host_backs_off_even_after_a_429_elsewhere() {
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = times.clone();
    let failing = Upstream::start(move |_, _| {
        seen.lock().unwrap().push(Instant::now());
        Reply::json(500, "{}")
    });
    let limited = Upstream::always(Reply::json(429, "{}"));
    let bal = start(&[failing.url(), limited.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the failing host goes first
        c.settings.timeouts.connect = Duration::from_secs(1); // pauses of 0.5-1 s first
        c.settings.max_attempts = 3;
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        r.header("x-gaia-attempts"),
        Some("h0:500,h1:429,h0:500"),
        "{}",
        r.text()
    );
    let times = times.lock().unwrap().clone();
    assert_eq!(times.len(), 2);
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_millis(500),
        "went back to h0 after {gap:?}"
    );
}
