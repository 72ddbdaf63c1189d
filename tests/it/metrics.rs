//! `/metrics` checked with a real Prometheus parser (Python's
//! prometheus_client), counters that move with traffic, no key in the
//! output, the admin rule, `/status` totals and latency, and `/readyz` when
//! no host is routable.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::fake::{content_event, finish_events, role_event, Reply, Step, Upstream};
use crate::util::{chat, connect, hold_the_only_worker, post, request, start, wait_for};

const OK: &str = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;
const REVOKED: &str = "gaia-Revoked7Kq2mZ8xW4pL";
const GOOD: &str = "gaia-Good9Tn3vB6yH1cR5sJ";

/// One parsed sample: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parse exposition text with prometheus_client's parser; panics (failing
/// the test) when python3 or the package is missing or the text does not parse.
fn parse(text: &str) -> Vec<Sample> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    if family.type not in ("counter", "gauge", "histogram"):
        raise SystemExit("unexpected type %s for %s" % (family.type, family.name))
    if not family.documentation:
        raise SystemExit("no HELP for %s" % family.name)
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out, allow_nan=False))
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed to check /metrics (see .ci/run)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse /metrics (pip install prometheus-client): {}\n--- text ---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn scrape(addr: std::net::SocketAddr) -> String {
    let r = request(addr, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")));
    r.text()
}

/// The value of the sample `name` with exactly `labels`, 0 when absent.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|(n, l, _)| n == name && *l == want)
        .map_or(0.0, |(_, _, v)| *v)
}

/// Sum of every sample `name` whose labels include `labels`.
fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// A cheap look at one unlabelled or fully labelled series without Python,
/// for wait loops.
fn quick(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn leaks(text: &str, key: &str) -> bool {
    let chars: Vec<char> = key.chars().collect();
    chars
        .windows(6)
        .any(|w| text.contains(&w.iter().collect::<String>()))
}

#[test]
fn metrics_parse_and_count_what_happened() {
    let hangs = Arc::new(AtomicUsize::new(0));
    let seen_hangs = hangs.clone();
    let revoked = |seen: &crate::fake::Seen| {
        seen.header("authorization") == Some(&format!("Bearer {REVOKED}"))
    };
    // Every host refuses the revoked key, so it is out of rotation once a
    // second host has rejected it (after the first, only that pair cools).
    let ok = Upstream::start(move |seen, _| {
        let body = String::from_utf8_lossy(&seen.body);
        if revoked(seen) {
            Reply::json(401, r#"{"error":{"message":"bad key"}}"#)
        } else if body.contains("cut-me") {
            Reply::sse(vec![Step::Send(content_event("part")), Step::Cut])
        } else if body.contains("\"stream\":true") {
            Reply::sse(vec![
                Step::Send(role_event()),
                Step::Send(content_event("fine")),
                Step::Send(finish_events()),
            ])
        } else if body.contains("fail-primary") {
            Reply::json(500, "{}")
        } else if body.contains("limit-me") {
            Reply::json(429, "{}").with_header("Retry-After", "1")
        } else if body.contains("hang-me") {
            seen_hangs.fetch_add(1, Ordering::SeqCst);
            Reply::Hang(Duration::from_secs(10))
        } else if seen.path.starts_with("/v1/models") {
            Reply::json(200, r#"{"object":"list","data":[]}"#)
        } else {
            Reply::json(200, OK)
        }
    });
    let bad = Upstream::start(move |seen, _| {
        if revoked(seen) {
            Reply::json(401, "{}")
        } else {
            Reply::json(500, "{}")
        }
    });
    let backup = Upstream::start(move |seen, _| {
        if revoked(seen) {
            Reply::json(401, "{}")
        } else {
            Reply::json(200, OK)
        }
    });
    let bal = start(
        &[ok.url(), bad.url(), backup.url()],
        &[REVOKED, GOOD],
        |c| c.hosts[2].backup = true,
    );
    let addr = bal.addr;
    let before = parse(&scrape(addr));
    assert_eq!(value(&before, "gaia_balancer_config_generation", &[]), 1.0);

    let body = |marker: &str, stream: bool| {
        format!(
            r#"{{"model":"m","stream":{stream},"messages":[{{"role":"user","content":"{marker}"}}]}}"#
        )
    };
    let mut chat_ok = 0;
    for _ in 0..6 {
        let r = post(addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.status, 200, "{}", r.text());
        chat_ok += 1;
    }
    for _ in 0..2 {
        let r = post(addr, "/v1/chat/completions", &chat(true));
        assert!(r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());
        chat_ok += 1;
    }
    let r = post(addr, "/v1/chat/completions", &body("cut-me", true));
    assert!(r.text().contains("stream_interrupted"), "{}", r.text());
    chat_ok += 1;
    let r = post(addr, "/v1/embeddings", r#"{"model":"e","input":"x"}"#);
    assert_eq!(r.status, 200);
    assert_eq!(request(addr, "GET", "/v1/models", &[], b"").status, 200);
    let r = post(addr, "/v1/chat/completions", &body("fail-primary", false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-gaia-upstream"), Some("h2"));
    chat_ok += 1;
    assert_eq!(request(addr, "GET", "/nope", &[], b"").status, 404);
    assert_eq!(request(addr, "GET", "/healthz", &[], b"").status, 200);

    // A client that leaves while the upstream is silent.
    {
        let mut s = connect(addr);
        let b = body("hang-me", false);
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
        .unwrap();
        assert!(wait_for(Duration::from_secs(5), || hangs
            .load(Ordering::SeqCst)
            == 1));
    }
    let mut scrapes = 1;
    assert!(wait_for(Duration::from_secs(5), || {
        scrapes += 1;
        quick(&scrape(addr), "gaia_balancer_client_disconnects_total") == 1.0
    }));

    // Last, because it cools the (ok, GOOD) pair for a second.
    let r = post(addr, "/v1/chat/completions", &body("limit-me", false));
    assert_eq!(r.status, 200, "{}", r.text());
    chat_ok += 1;

    // A request is counted once its answer has gone out: a moment after the
    // client has it.
    let chat_200 = [("route", "chat"), ("code", "200")];
    let counted = value(&before, "gaia_balancer_requests_total", &chat_200) + chat_ok as f64;
    assert!(wait_for(Duration::from_secs(2), || {
        scrapes += 1;
        value(
            &parse(&scrape(addr)),
            "gaia_balancer_requests_total",
            &chat_200,
        ) == counted
    }));
    let text = scrape(addr);
    for key in [REVOKED, GOOD] {
        assert!(!leaks(&text, key), "key material in /metrics:\n{text}");
    }
    let after = parse(&text);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };

    let req = "gaia_balancer_requests_total";
    assert_eq!(
        delta(req, &[("route", "chat"), ("code", "200")]),
        chat_ok as f64
    );
    assert_eq!(delta(req, &[("route", "chat"), ("code", "499")]), 1.0);
    assert_eq!(delta(req, &[("route", "embeddings"), ("code", "200")]), 1.0);
    assert_eq!(delta(req, &[("route", "models"), ("code", "200")]), 1.0);
    assert_eq!(delta(req, &[("route", "unknown"), ("code", "404")]), 1.0);
    assert_eq!(delta(req, &[("route", "healthz"), ("code", "200")]), 1.0);
    assert_eq!(
        delta(req, &[("route", "metrics"), ("code", "200")]),
        scrapes as f64
    );
    let proxied = chat_ok + 1 + 1 + 1; // + embeddings, models, the client that left

    // Attempts: every upstream hit is one attempt with an outcome, except
    // the one the departed client abandoned.
    let att = "gaia_balancer_upstream_attempts_total";
    assert_eq!(sum(&after, att, &[("host", "h0")]), (ok.hits() - 1) as f64);
    assert_eq!(sum(&after, att, &[("host", "h1")]), bad.hits() as f64);
    assert_eq!(sum(&after, att, &[("host", "h2")]), backup.hits() as f64);
    assert_eq!(
        sum(&after, att, &[("outcome", "status_4xx")]),
        2.0,
        "the two 401s"
    );
    assert_eq!(
        value(&after, att, &[("host", "h0"), ("outcome", "status_429")]),
        1.0
    );
    assert_eq!(
        value(&after, att, &[("host", "h0"), ("outcome", "broken")]),
        1.0
    );
    assert!(value(&after, att, &[("host", "h1"), ("outcome", "status_5xx")]) >= 1.0);
    assert!(value(&after, att, &[("host", "h0"), ("outcome", "ok")]) >= 8.0);
    let hits = ok.hits() + bad.hits() + backup.hits();
    assert_eq!(
        value(&after, "gaia_balancer_retries_total", &[]),
        (hits - proxied) as f64,
        "every attempt after a request's first is a retry"
    );
    assert_eq!(
        value(&after, "gaia_balancer_retry_budget_refusals_total", &[]),
        0.0
    );
    assert_eq!(
        value(
            &after,
            "gaia_balancer_backup_served_total",
            &[("host", "h2")]
        ),
        backup.hits() as f64
            - f64::from(u8::from(backup.requests().iter().any(
                |s| s.header("authorization") == Some(&format!("Bearer {REVOKED}"))
            )))
    );
    assert!(
        value(
            &after,
            "gaia_balancer_backup_served_total",
            &[("host", "h2")]
        ) >= 1.0
    );
    assert_eq!(
        value(
            &after,
            "gaia_balancer_cooldowns_total",
            &[("scope", "pair")]
        ),
        1.0
    );
    assert_eq!(
        value(&after, "gaia_balancer_keys", &[("state", "disabled")]),
        1.0
    );
    assert_eq!(
        value(&after, "gaia_balancer_keys", &[("state", "active")])
            + value(&after, "gaia_balancer_keys", &[("state", "cooling")]),
        1.0
    );
    assert_eq!(value(&after, "gaia_balancer_streams_cut_total", &[]), 1.0);
    assert_eq!(
        value(&after, "gaia_balancer_client_disconnects_total", &[]),
        1.0
    );
    assert_eq!(value(&after, "gaia_balancer_requests_in_flight", &[]), 0.0);
    assert_eq!(value(&after, "gaia_balancer_queue_depth", &[]), 0.0);
    assert_eq!(value(&after, "gaia_balancer_hosts", &[]), 3.0);

    // Host gauges agree with /status.
    let status = request(addr, "GET", "/status", &[], b"").json();
    let up = status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["state"] == "up")
        .count();
    assert_eq!(value(&after, "gaia_balancer_hosts_up", &[]), up as f64);
    for (i, name) in ["h0", "h1", "h2"].iter().enumerate() {
        let h = &status["hosts"][i];
        assert_eq!(
            value(&after, "gaia_balancer_host_up", &[("host", name)]),
            if h["state"] == "up" { 1.0 } else { 0.0 }
        );
        assert_eq!(
            value(
                &after,
                "gaia_balancer_host_ejections_total",
                &[("host", name)]
            ),
            h["ejections"].as_f64().unwrap()
        );
    }
    assert!(
        value(
            &after,
            "gaia_balancer_host_latency_seconds",
            &[("host", "h0")]
        ) > 0.0
    );

    // Histograms: one observation per proxied request (first byte: per
    // request an upstream answered), cumulative buckets, +Inf = count.
    let streams = 3.0;
    for (hist, json, stream) in [
        (
            "request_duration_seconds",
            proxied as f64 - streams,
            streams,
        ),
        ("overhead_seconds", proxied as f64 - streams, streams),
        (
            "time_to_first_byte_seconds",
            proxied as f64 - streams - 1.0,
            streams,
        ),
    ] {
        let name = format!("gaia_balancer_{hist}");
        for (kind, want) in [("json", json), ("stream", stream)] {
            let count = delta(&format!("{name}_count"), &[("kind", kind)]);
            assert_eq!(count, want, "{name} {kind}");
            let buckets: Vec<f64> = after
                .iter()
                .filter(|(n, l, _)| *n == format!("{name}_bucket") && l["kind"] == kind)
                .map(|(_, _, v)| *v)
                .collect();
            assert!(buckets.len() > 10, "{name}");
            assert!(
                buckets.windows(2).all(|w| w[0] <= w[1]),
                "{name}: {buckets:?}"
            );
            assert_eq!(
                *buckets.last().unwrap(),
                value(&after, &format!("{name}_count"), &[("kind", kind)])
            );
            assert!(value(&after, &format!("{name}_sum"), &[("kind", kind)]) > 0.0);
        }
    }

    // /status carries the same totals, and per-host latency.
    let totals = &status["totals"];
    assert_eq!(totals["requests"], proxied as u64);
    assert_eq!(
        totals["retries"].as_f64(),
        Some(value(&after, "gaia_balancer_retries_total", &[]))
    );
    assert_eq!(totals["budgetRefusals"], 0);
    assert!(status["hosts"][0]["latencyMs"].as_f64().unwrap() > 0.0);
    assert_eq!(
        status["hosts"][0]["attempts"].as_u64(),
        Some(ok.hits() as u64 - 1)
    );
    assert_eq!(status["config"]["generation"], 1);
    assert_eq!(status["config"]["reloads"], 0);
    let status_text = status.to_string();
    for key in [REVOKED, GOOD] {
        assert!(!leaks(&status_text, key), "{status_text}");
    }
}

#[test]
fn metrics_follow_the_admin_rule() {
    let up = Upstream::always(Reply::json(200, OK));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.admin_key = Some("admin-Secret-1234".into());
    });
    let r = request(bal.addr, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 401, "{}", r.text());
    let r = request(
        bal.addr,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer admin-Secret-1234")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("admin-Secret"));
    let r = request(bal.addr, "POST", "/metrics", &[], b"");
    assert_eq!(r.status, 405);
}

#[test]
fn readyz_is_503_while_no_host_is_routable() {
    let up = Upstream::always(Reply::json(429, "{}").with_header("Retry-After", "30"));
    let bal = start(&[up.url()], &[], |_| {});
    assert_eq!(request(bal.addr, "GET", "/readyz", &[], b"").status, 200);
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 503, "{}", r.text());
    let r = request(bal.addr, "GET", "/readyz", &[], b"");
    assert_eq!((r.status, r.text().as_str()), (503, "no routable host\n"));
    let text = scrape(bal.addr);
    assert_eq!(quick(&text, "gaia_balancer_hosts_up"), 0.0);
    assert_eq!(
        quick(&text, "gaia_balancer_cooldowns_total{scope=\"host\"}"),
        1.0
    );
}

#[test]
fn a_connection_shed_at_queue_wait_is_counted_and_leaves_the_queue() {
    let up = Upstream::always(Reply::sse(vec![Step::Sleep(Duration::from_secs(60))]));
    let bal = start(&[up.url()], &[], |c| {
        c.settings.workers = 1;
        c.settings.queue_wait = Duration::from_millis(300);
    });
    let busy = hold_the_only_worker(&bal, &up);
    // Waits in the queue while the only worker is busy, then gets 503.
    let r = request(bal.addr, "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 503, "{}", r.text());
    // The client of the silent stream leaves: the worker is free again.
    drop(busy);
    let server = bal.server();
    assert!(wait_for(Duration::from_secs(5), || server.idle_workers() == 1));
    assert_eq!(server.queue_depth(), 0);
    let text = scrape(bal.addr);
    assert_eq!(quick(&text, "gaia_balancer_queue_depth"), 0.0, "{text}");
    assert_eq!(
        quick(
            &text,
            "gaia_balancer_connections_shed_total{reason=\"queue_wait\"}"
        ),
        1.0,
        "{text}"
    );
}

#[test]
fn a_hedge_that_wins_a_json_request_is_timed_to_its_first_byte() {
    let slow = Upstream::always(Reply::Hang(Duration::from_secs(5)));
    let fast = Upstream::always(Reply::json(200, OK));
    let bal = start(&[slow.url(), fast.url()], &[], |c| {
        c.hosts[0].weight = 1000; // the slow host goes first
        c.settings.hedge = gaia_balancer::config::Hedge::After(Duration::from_millis(200));
    });
    let before = parse(&scrape(bal.addr));
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.header("x-gaia-upstream"), Some("h1"), "{}", r.text());
    // Counted once the worker is done with the request, just after the client read its end.
    let mut text = String::new();
    assert!(wait_for(Duration::from_secs(5), || {
        text = scrape(bal.addr);
        quick(
            &text,
            "gaia_balancer_request_duration_seconds_count{kind=\"json\"}",
        ) == 1.0
    }));
    let after = parse(&text);
    let delta = |name: &str| {
        let labels = [("kind", "json")];
        value(&after, name, &labels) - value(&before, name, &labels)
    };
    assert_eq!(delta("gaia_balancer_request_duration_seconds_count"), 1.0);
    assert_eq!(
        delta("gaia_balancer_time_to_first_byte_seconds_count"),
        1.0,
        "an upstream answered this request"
    );
    let ttfb = delta("gaia_balancer_time_to_first_byte_seconds_sum");
    assert!(ttfb >= 0.2, "the hedge started after 200 ms: {ttfb}");
}

#[test]
fn a_stream_committed_early_that_no_host_serves_counts_as_cut() {
    // The head and keep-alive comments go out at 200 ms; both attempts fail after.
    let failing = Upstream::always(Reply::Delayed(
        Duration::from_millis(500),
        Box::new(Reply::json(500, r#"{"error":{"message":"boom"}}"#)),
    ));
    let bal = start(&[failing.url()], &[], |c| {
        c.settings.stream_keep_alive_after = Some(Duration::from_millis(200));
        c.settings.stream_keep_alive_every = Duration::from_millis(100);
        c.settings.max_attempts = 2;
    });
    let before = parse(&scrape(bal.addr));
    let r = post(bal.addr, "/v1/chat/completions", &chat(true));
    assert_eq!(r.status, 200, "the head went out before the failures");
    let text = r.text();
    assert!(text.starts_with(": keep-alive"), "{text}");
    assert!(text.contains("\"code\":\"upstream_failed\""), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    // Counted once the worker is done with the request, just after the client read its end.
    let mut text = String::new();
    assert!(wait_for(Duration::from_secs(5), || {
        text = scrape(bal.addr);
        quick(
            &text,
            "gaia_balancer_request_duration_seconds_count{kind=\"stream\"}",
        ) == 1.0
    }));
    let after = parse(&text);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(
        delta(
            "gaia_balancer_upstream_attempts_total",
            &[("host", "h0"), ("outcome", "status_5xx")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            "gaia_balancer_requests_total",
            &[("route", "chat"), ("code", "200")]
        ),
        1.0,
        "the status sent"
    );
    assert_eq!(
        delta("gaia_balancer_streams_cut_total", &[]),
        1.0,
        "the client got an SSE error event and no [DONE]"
    );
}

#[test]
fn a_silent_connection_that_gives_way_with_503_is_counted_as_shed() {
    let up = Upstream::always(Reply::json(200, OK));
    let bal = start(&[up.url()], &[], |c| c.settings.workers = 1);
    let server = bal.server();
    assert!(wait_for(Duration::from_secs(3), || server.idle_workers() == 1));
    // A new connection that sends nothing takes the only worker ...
    let mut silent = connect(bal.addr);
    assert!(wait_for(Duration::from_secs(3), || server.idle_workers() == 0));
    // ... and gives it up with 503 once another connection waits past 1 s.
    let r = post(bal.addr, "/v1/embeddings", "{}");
    assert_eq!(r.status, 200);
    let mut out = String::new();
    let _ = std::io::Read::read_to_string(&mut silent, &mut out);
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    let text = scrape(bal.addr);
    let shed: f64 = ["queue_full", "queue_wait", "per_client", "idle"]
        .iter()
        .map(|r| {
            quick(
                &text,
                &format!("gaia_balancer_connections_shed_total{{reason=\"{r}\"}}"),
            )
        })
        .sum();
    assert_eq!(shed, 1.0, "{text}");
    assert_eq!(
        quick(
            &text,
            "gaia_balancer_connections_shed_total{reason=\"idle\"}"
        ),
        1.0
    );
    // It sent no request: requests_total holds the other one only (a
    // scrape is counted after its own answer).
    let parsed = parse(&text);
    assert_eq!(sum(&parsed, "gaia_balancer_requests_total", &[]), 1.0);
}

#[test]
fn a_backup_stream_the_client_leaves_still_counts_as_backup_served() {
    let backup = Upstream::always(Reply::sse(vec![
        Step::Send(role_event()),
        Step::Send(content_event("paid")),
        Step::Sleep(Duration::from_secs(5)),
        Step::Send(finish_events()),
    ]));
    let bal = start(&[crate::fake::refused_url(), backup.url()], &[], |c| {
        c.hosts[1].backup = true;
    });
    let addr = bal.addr;
    {
        let mut s = connect(addr);
        let b = chat(true);
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
        .unwrap();
        // Read until the first content event, then leave.
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..100 {
            if String::from_utf8_lossy(&seen).contains("paid") {
                break;
            }
            let n = std::io::Read::read(&mut s, &mut buf).unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&seen).contains("paid"));
    }
    let mut text = String::new();
    assert!(wait_for(Duration::from_secs(5), || {
        text = scrape(addr);
        quick(&text, "gaia_balancer_client_disconnects_total") == 1.0
    }));
    assert_eq!(
        quick(
            &text,
            "gaia_balancer_requests_total{route=\"chat\",code=\"499\"}"
        ),
        1.0,
        "{text}"
    );
    // The paid backup answered (part of) it: that is what this counter is for.
    assert_eq!(
        quick(&text, "gaia_balancer_backup_served_total{host=\"h1\"}"),
        1.0,
        "{text}"
    );
}
