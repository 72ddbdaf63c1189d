//! Hedged requests: a second attempt on another host when the first is slow.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gaia_balancer::config::Hedge;

use crate::fake::{content_event, finish_events, Reply, Seen, Step, Upstream};
use crate::util::{chat, post, request, start, wait_for};

const OK: &str = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;

#[test]
fn a_slow_first_attempt_is_outrun_by_a_hedge_and_closed() {
    let slow = Upstream::always(Reply::Hang(Duration::from_secs(5)));
    let fast = Upstream::always(Reply::json(200, OK));
    let bal = start(&[slow.url(), fast.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the slow host goes first
        c.settings.hedge = Hedge::After(Duration::from_millis(200));
    });
    let began = Instant::now();
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), OK);
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(r.header("x-gaia-upstream"), Some("h1"));
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:outrun,h1(hedge):200"));
    // The loser's connection is closed at once.
    assert!(wait_for(Duration::from_secs(2), || !slow
        .peer_closed()
        .is_empty()));
}

#[test]
fn a_hedged_stream_commits_whichever_produces_output_first() {
    let slow = Upstream::always(Reply::sse(vec![
        Step::Sleep(Duration::from_secs(5)),
        Step::Send(content_event("slow")),
    ]));
    let fast = Upstream::always(Reply::sse(vec![
        Step::Send(content_event("fast")),
        Step::Send(finish_events()),
    ]));
    let bal = start(&[slow.url(), fast.url()], &[], |c| {
        c.hosts[0].weight = 1000;
        c.settings.hedge = Hedge::After(Duration::from_millis(200));
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(true));
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("fast") && !text.contains("slow"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(wait_for(Duration::from_secs(2), || !slow
        .peer_closed()
        .is_empty()));
}

#[test]
fn a_fast_first_attempt_cancels_the_hedge() {
    let first_slowish = Upstream::always(Reply::sse(vec![
        Step::Sleep(Duration::from_millis(400)),
        Step::Send(content_event("first")),
        Step::Send(finish_events()),
    ]));
    let hedge_slower = Upstream::always(Reply::sse(vec![
        Step::Sleep(Duration::from_secs(5)),
        Step::Send(content_event("second")),
    ]));
    let bal = start(&[first_slowish.url(), hedge_slower.url()], &[], |c| {
        c.hosts[0].weight = 1000;
        c.settings.hedge = Hedge::After(Duration::from_millis(100));
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(true));
    assert!(
        r.text().contains("first") && !r.text().contains("second"),
        "{}",
        r.text()
    );
    assert_eq!(r.header("x-gaia-upstream"), Some("h0"));
    // The hedge was started, then cancelled and its connection closed.
    assert_eq!(hedge_slower.hits(), 1);
    assert!(wait_for(Duration::from_secs(2), || !hedge_slower
        .peer_closed()
        .is_empty()));
}

#[test]
fn hedges_stay_within_five_percent_of_requests() {
    // Slow but successful, so it stays in rotation (never ejected).
    let slow = Upstream::always(Reply::Chunked {
        status: 200,
        content_type: "application/json".into(),
        steps: vec![
            Step::Sleep(Duration::from_millis(100)),
            Step::Send(OK.as_bytes().to_vec()),
        ],
    });
    let fast = Upstream::always(Reply::json(200, OK));
    let bal = start(&[slow.url(), fast.url()], &[], |c| {
        c.hosts[0].weight = 1000;
        c.settings.hedge = Hedge::After(Duration::from_millis(20));
    });
    let n = 200;
    let addr = bal.addr;
    let handles: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut trails = Vec::new();
                for _ in 0..n / 4 {
                    let r = post(addr, "/v1/chat/completions", &chat(false));
                    assert_eq!(r.status, 200);
                    trails.push(r.header("x-gaia-attempts").unwrap_or("").to_string());
                }
                trails
            })
        })
        .collect();
    let trails: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let hedged = trails.iter().filter(|t| t.contains("(hedge)")).count();
    // One token to start with, a twentieth per request.
    assert!(hedged >= 5, "hedging happened: {hedged}");
    assert!(hedged <= 1 + n / 20, "{hedged} hedges for {n} requests");
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// One of three hosts stalls 2 s on 10 % of its requests: tail latency with
/// hedging off and on, and the extra upstream requests hedging costs.
fn stall_run(hedge: Hedge) -> (Duration, Duration, usize, usize) {
    let n = Arc::new(AtomicUsize::new(0));
    let calls = n.clone();
    let stalling = Upstream::start(move |_, _| {
        if calls.fetch_add(1, Ordering::SeqCst) % 10 == 3 {
            Reply::Hang(Duration::from_secs(2))
        } else {
            Reply::json(200, OK)
        }
    });
    let a = Upstream::always(Reply::json(200, OK));
    let b = Upstream::always(Reply::json(200, OK));
    let bal = start(&[stalling.url(), a.url(), b.url()], &[], |c| {
        c.settings.hedge = hedge;
        c.settings.timeouts.first_byte = Duration::from_secs(3);
    });
    let addr = bal.addr;
    let requests = 300;
    let threads = 4;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                (0..requests / threads)
                    .map(|_| {
                        let t = Instant::now();
                        let r = post(addr, "/v1/chat/completions", &chat(false));
                        assert_eq!(r.status, 200);
                        t.elapsed()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut lat: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    lat.sort();
    let upstream = stalling.hits() + a.hits() + b.hits();
    (
        percentile(&lat, 50),
        percentile(&lat, 99),
        upstream,
        requests,
    )
}

#[test]
fn hedging_cuts_the_tail_of_a_stalling_host() {
    let (p50_off, p99_off, up_off, n) = stall_run(Hedge::Off);
    let (p50_on, p99_on, up_on, _) = stall_run(Hedge::After(Duration::from_millis(200)));
    println!(
        "hedging off: p50 {p50_off:?} p99 {p99_off:?} upstream requests {up_off}/{n}; \
         on (200 ms): p50 {p50_on:?} p99 {p99_on:?} upstream requests {up_on}/{n}"
    );
    // Stalled attempts that close without an answer are retried either way;
    // hedging adds at most 5 % more (plus the starting token).
    assert!(
        up_on <= up_off + n / 20 + 1,
        "{up_on} upstream requests vs {up_off} without hedging"
    );
    // Every stalled request was rescued: none waited the full 2 s stall.
    assert!(
        p99_off >= Duration::from_secs(2),
        "the stall shows without hedging: {p99_off:?}"
    );
    assert!(
        p99_on < Duration::from_secs(2),
        "hedging cut the tail: {p99_on:?}"
    );
}

#[test]
fn auto_hedges_after_the_hosts_p95_with_a_500ms_floor() {
    let n = Arc::new(AtomicUsize::new(0));
    let calls = n.clone();
    let a = Upstream::start(move |_, _| {
        if calls.fetch_add(1, Ordering::SeqCst) < 30 {
            Reply::json(200, OK)
        } else {
            Reply::Hang(Duration::from_secs(5))
        }
    });
    let b = Upstream::always(Reply::json(200, OK));
    let bal = start(&[a.url(), b.url()], &[], |c| {
        c.hosts[0].weight = 1000;
        c.settings.hedge = Hedge::Auto;
    });
    for _ in 0..30 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.header("x-gaia-attempts"), Some("h0:200"));
    }
    let began = Instant::now();
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    let took = began.elapsed();
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:outrun,h1(hedge):200"));
    assert!(
        took >= Duration::from_millis(500),
        "the floor holds: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// A hedge that won and then broke off after the commit is its own host's
/// failure: the host it outran (which only was slow) is not blamed.
#[test]
fn a_hedge_cut_after_the_commit_is_not_blamed_on_the_host_it_outran() {
    let slow = Upstream::always(Reply::Hang(Duration::from_secs(5)));
    let cutting = Upstream::always(Reply::sse(vec![
        Step::Send(content_event("partial")),
        Step::Cut,
    ]));
    let bal = start(&[slow.url(), cutting.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the slow host goes first
        c.settings.hedge = Hedge::After(Duration::from_millis(200));
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(true));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-gaia-upstream"), Some("h1"));
    let text = r.text();
    assert!(
        text.contains("partial") && text.contains("stream_interrupted"),
        "{text}"
    );
    let status = request(bal.addr, "GET", "/status", &[], b"").json();
    let host = |name: &str| {
        status["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(host("h1")["failures"], 1, "{status:#}");
    assert_eq!(host("h0")["failures"], 0, "the outrun host: {status:#}");
    assert_eq!(host("h0")["consecutiveFailures"], 0, "{status:#}");
    let metrics = request(bal.addr, "GET", "/metrics", &[], b"").text();
    assert_eq!(attempts(&metrics, "h0", "broken"), 0.0, "{metrics}");
    assert_eq!(attempts(&metrics, "h1", "broken"), 1.0, "{metrics}");
}

/// `gaia_balancer_upstream_attempts_total` of one host and outcome.
fn attempts(metrics: &str, host: &str, outcome: &str) -> f64 {
    let series =
        format!(r#"gaia_balancer_upstream_attempts_total{{host="{host}",outcome="{outcome}"}} "#);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or(0.0)
}

/// A hedge is an upstream attempt like any other: `upstream_attempts_total`
/// counts it on its host, whether it won or failed.
#[test]
fn hedge_attempts_are_counted_in_upstream_attempts_total() {
    let slow = Upstream::start(|_, n| {
        if n == 0 {
            // Outlives the hedge's failure, then fails itself.
            Reply::Delayed(
                Duration::from_millis(800),
                Box::new(Reply::json(502, r#"{"error":{"message":"bad gateway"}}"#)),
            )
        } else {
            Reply::json(200, OK)
        }
    });
    let other = Upstream::start(|_, n| {
        if n == 0 {
            Reply::json(500, r#"{"error":{"message":"boom"}}"#)
        } else {
            Reply::json(200, OK)
        }
    });
    let bal = start(&[slow.url(), other.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the slow host goes first
        c.settings.hedge = Hedge::After(Duration::from_millis(200));
    });
    // The hedge fails (500), then the first attempt (502); both hosts have
    // now been tried, so the retry goes round again by weight, and serves.
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-gaia-attempts"),
        Some("h0:502,h1(hedge):500,h0:200")
    );
    // Counted once the answer has gone out: a moment after the client has it.
    let served = || {
        let m = request(bal.addr, "GET", "/metrics", &[], b"").text();
        attempts(&m, "h0", "ok") == 1.0
    };
    assert!(wait_for(Duration::from_secs(2), served));
    let metrics = request(bal.addr, "GET", "/metrics", &[], b"").text();
    assert_eq!(attempts(&metrics, "h0", "status_5xx"), 1.0, "{metrics}");
    assert_eq!(attempts(&metrics, "h1", "status_5xx"), 1.0, "{metrics}");
    assert_eq!(attempts(&metrics, "h0", "ok"), 1.0, "{metrics}");
    // A hedge that wins counts as `ok` on its host; the host it outran,
    // only slower, gets no outcome.
    let slow = Upstream::always(Reply::Hang(Duration::from_secs(5)));
    let fast = Upstream::always(Reply::json(200, OK));
    let bal = start(&[slow.url(), fast.url()], &[], |c| {
        c.hosts[0].weight = 1000;
        c.settings.hedge = Hedge::After(Duration::from_millis(200));
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:outrun,h1(hedge):200"));
    let h1_ok = |bal: &crate::util::Running| {
        let m = request(bal.addr, "GET", "/metrics", &[], b"").text();
        attempts(&m, "h1", "ok") == 1.0
    };
    assert!(wait_for(Duration::from_secs(2), || h1_ok(&bal)));
    // The first attempt fails while its hedge runs, and the hedge wins:
    // both count, each on its own host.
    let failing = Upstream::always(Reply::Delayed(
        Duration::from_millis(300),
        Box::new(Reply::json(500, r#"{"error":{"message":"boom"}}"#)),
    ));
    let later = Upstream::always(Reply::Delayed(
        Duration::from_millis(600),
        Box::new(Reply::json(200, OK)),
    ));
    let bal = start(&[failing.url(), later.url()], &[], |c| {
        c.hosts[0].weight = 1000;
        c.settings.hedge = Hedge::After(Duration::from_millis(100));
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:500,h1(hedge):200"));
    assert!(wait_for(Duration::from_secs(2), || h1_ok(&bal)));
    let metrics = request(bal.addr, "GET", "/metrics", &[], b"").text();
    assert_eq!(attempts(&metrics, "h0", "status_5xx"), 1.0, "{metrics}");
    assert_eq!(attempts(&metrics, "h1", "ok"), 1.0, "{metrics}");
}

/// With every hedge thread busy there is no hedge (never a wait): a request
/// whose first attempt then fails retries at once on another host, instead of
/// waiting for a hedge queued behind the busy threads.
#[test]
fn no_hedge_is_queued_while_every_hedge_thread_is_busy() {
    let id = |s: &Seen| s.header("x-request-id").unwrap_or("").to_string();
    let first = Upstream::start(move |s, _| {
        let id = id(s);
        if id.starts_with("hang") {
            Reply::Hang(Duration::from_secs(30))
        } else if id == "late-500" {
            Reply::Delayed(
                Duration::from_millis(600),
                Box::new(Reply::json(500, r#"{"error":{"message":"boom"}}"#)),
            )
        } else {
            Reply::json(200, OK)
        }
    });
    let other = Upstream::start(move |s, _| {
        if id(s).starts_with("hang") {
            Reply::Hang(Duration::from_secs(30))
        } else {
            Reply::json(200, OK)
        }
    });
    let bal = start(&[first.url(), other.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the first host goes first
        c.settings.hedge = Hedge::After(Duration::from_millis(100));
        c.settings.timeouts.total = Duration::from_secs(8);
        c.settings.timeouts.first_byte = Duration::from_secs(8);
    });
    // Fill the hedge bucket: 80 requests earn 4 hedges (5 with the first token).
    for _ in 0..80 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.header("x-gaia-attempts"), Some("h0:200"));
    }
    // Four stalled requests whose hedges stall too: every hedge thread is busy.
    let addr = bal.addr;
    let _stalled: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let id = format!("hang-{i}");
                request(
                    addr,
                    "POST",
                    "/v1/chat/completions",
                    &[("Content-Type", "application/json"), ("X-Request-Id", &id)],
                    chat(false).as_bytes(),
                )
            })
        })
        .collect();
    assert!(
        wait_for(Duration::from_secs(5), || other.hits() == 4),
        "four hedges under way: {}",
        other.hits()
    );
    // This one's first attempt fails after its hedge would have started.
    let r = request(
        bal.addr,
        "POST",
        "/v1/chat/completions",
        &[
            ("Content-Type", "application/json"),
            ("X-Request-Id", "late-500"),
        ],
        chat(false).as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:500,h1:200"));
}

/// A stream committed early (keep-alive comments sent) whose hedge wins with
/// an answer that is no stream: that is the hedge host's failure, not the
/// outrun first host's.
#[test]
fn a_hedge_that_cannot_be_passed_on_is_blamed_on_its_own_host() {
    let slow = Upstream::always(Reply::Hang(Duration::from_secs(5)));
    let json = Upstream::always(Reply::json(200, OK));
    let bal = start(&[slow.url(), json.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the slow host goes first
        c.settings.hedge = Hedge::After(Duration::from_millis(300));
        c.settings.stream_keep_alive_after = Some(Duration::from_millis(50));
        c.settings.max_attempts = 2;
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(true));
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.starts_with(": keep-alive"), "{text}");
    assert!(text.contains("upstream_failed"), "{text}");
    let status = request(bal.addr, "GET", "/status", &[], b"").json();
    let failures = |name: &str| {
        status["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .unwrap()["failures"]
            .clone()
    };
    assert_eq!(failures("h0"), 0, "the outrun host: {status:#}");
    assert_eq!(failures("h1"), 1, "{status:#}");
}

/// A hedge is a speculative copy of a request a primary is still serving, so
/// it never goes to a backup (used only when no primary can serve): with the
/// other primary out of rotation, there is no hedge, and the slow primary's
/// answer is the one sent.
#[test]
fn a_hedge_never_goes_to_a_backup() {
    let slowish = Upstream::always(Reply::Delayed(
        Duration::from_millis(1000),
        Box::new(Reply::json(200, OK)),
    ));
    let other = Upstream::always(Reply::json(200, OK));
    let backup = Upstream::always(Reply::json(200, OK));
    let bal = start(&[slowish.url(), other.url(), backup.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the slow primary goes first
        c.hosts[2].backup = true;
        c.settings.hedge = Hedge::After(Duration::from_millis(100));
    });
    // The other primary cools down (as after a 503 with Retry-After).
    let b = bal.server().shared().current();
    b.hosts
        .cool_host(&b.hosts.all()[1], Duration::from_secs(60));
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:200"));
    assert_eq!(backup.hits(), 0, "the paid backup got a speculative copy");
}

/// A hedge that finds no host to go to was never sent, so it gives its token
/// back: the next slow request is still hedged (with the token spent, the
/// bucket would need 19 more requests first).
#[test]
fn a_hedge_with_nowhere_to_go_gives_its_token_back() {
    let slowish = Upstream::always(Reply::Delayed(
        Duration::from_millis(800),
        Box::new(Reply::json(200, OK)),
    ));
    let other = Upstream::always(Reply::json(200, OK));
    let bal = start(&[slowish.url(), other.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the slow host goes first
        c.settings.hedge = Hedge::After(Duration::from_millis(100));
    });
    let b = bal.server().shared().current();
    // Cooling well past the hedge's moment (100 ms), even on a busy machine.
    b.hosts
        .cool_host(&b.hosts.all()[1], Duration::from_millis(3000));
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:200"), "{}", r.text());
    let state = |bal: &crate::util::Running| {
        request(bal.addr, "GET", "/status", &[], b"").json()["hosts"][1]["state"].clone()
    };
    assert!(
        wait_for(Duration::from_secs(10), || state(&bal) == "up"),
        "{}",
        state(&bal)
    );
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:outrun,h1(hedge):200"));
}

/// A listener whose accept queue is full (backlog 0, one connection never
/// accepted): a new connection's SYN is dropped, so a connect to it stalls
/// as one to a black-holed host does, on loopback. Dropped at the test's end.
struct Unreachable {
    url: String,
    _listener: socket2::Socket,
    _queued: std::net::TcpStream,
}

fn unreachable() -> Unreachable {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let queued = std::net::TcpStream::connect(addr).unwrap();
    // The queue is full once the first connection sits in it: one more
    // connect must now stall (checked, so the test cannot pass vacuously).
    let probe = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
    assert!(probe.is_err(), "the accept queue did not fill");
    Unreachable {
        url: format!("http://{addr}"),
        _listener: listener,
        _queued: queued,
    }
}

/// The watch runs during a TCP connect too: a hedge starts on time while
/// the first attempt's connect stalls (not once connectMs has failed it).
#[test]
fn a_hedge_starts_while_a_connect_stalls() {
    let dead = unreachable();
    let fast = Upstream::always(Reply::json(200, OK));
    let bal = start(&[dead.url.clone(), fast.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the unreachable host goes first
        c.settings.timeouts.connect = Duration::from_secs(10);
        c.settings.hedge = Hedge::After(Duration::from_millis(200));
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:outrun,h1(hedge):200"));
}

/// A host that accepts connections and never reads from them (a server
/// whose workers are all busy); its thread holds them for 30 s at most.
fn never_reads() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(30);
        let mut held = Vec::new();
        while Instant::now() < end {
            match listener.accept() {
                Ok((s, _)) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    url
}

/// The watch runs while a request body waits to be written too: with a
/// prompt larger than the socket buffers and a host that does not read it,
/// a hedge starts on time (not after the write has stalled for 20 s).
#[test]
fn a_hedge_starts_while_a_request_body_cannot_be_written() {
    let stuck = never_reads();
    let fast = Upstream::always(Reply::json(200, OK));
    let bal = start(&[stuck, fast.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the stuck host goes first
        c.settings.hedge = Hedge::After(Duration::from_millis(200));
    });
    let big = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(8 * 1024 * 1024)
    );
    let r = post(bal.addr, "/v1/chat/completions", &big);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-gaia-attempts"), Some("h0:outrun,h1(hedge):200"));
    assert_eq!(fast.requests()[0].body.len(), big.len());
}

/// A hedge that failed tried its host for the request: a later attempt does
/// not send the same request there again as if it were untried (here: a
/// 404, which another try there cannot change).
#[test]
fn a_host_a_failed_hedge_tried_counts_as_tried() {
    let slow = Upstream::always(Reply::Delayed(
        Duration::from_millis(600),
        Box::new(Reply::json(500, r#"{"error":{"message":"boom"}}"#)),
    ));
    let missing = Upstream::always(Reply::json(404, r#"{"error":{"message":"no such path"}}"#));
    let good = Upstream::always(Reply::json(200, OK));
    let bal = start(&[slow.url(), missing.url(), good.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the slow host goes first,
        c.hosts[1].weight = 100; // the missing one next (the hedge's pick)
        c.settings.hedge = Hedge::After(Duration::from_millis(100));
    });
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-gaia-attempts"),
        Some("h0:500,h1(hedge):404,h2:200")
    );
    assert_eq!(missing.hits(), 1, "asked again after its hedge's 404");
}
