//! Connection floods against the balancer binary on loopback: 2,000 idle
//! connections, 500 slow-head clients and 200 clients that never read their
//! responses (that one is `#[ignore]`d in `cargo test`: it moves 1.4 GB). Each runs while a normal client keeps sending requests, and
//! checks from outside (`/proc/PID`) that threads, descriptors and RSS stay
//! under the caps documented in the README's "Reliability" section, that the
//! normal client is served within a bounded time, and that the balancer
//! accepts and serves at once after the flood.
//!
//! Loopback clients are exempt from `maxConnectionsPerClient`, so these floods
//! reach the worker pool and the queue, the last line of defence; from a
//! remote address the per-client limit (64) stops a single source first.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::fake::{content_event, Reply, Step, Upstream};
use crate::process::{config_dir, ordinary, probe, spawn, Balancer, Sample, Sampler};
use crate::util::wait_for;

/// Open `n` connections from a few threads; the ones that fail are skipped.
/// Floods run one at a time: two at once on two cores measure each other.
static ONE_FLOOD: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_flood() -> std::sync::MutexGuard<'static, ()> {
    ONE_FLOOD.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_many(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    // Several threads: when the listen backlog (128) overflows, a connect
    // waits for the SYN retransmit (1 s); the others go on meanwhile.
    let threads = 16;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                (0..n / threads + usize::from(t < n % threads))
                    .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// After a flood: descriptors back near the baseline, and ordinary requests
/// served at once. Returns the sample once settled.
fn recovers(bal: &Balancer, base: Sample) -> Sample {
    let settled = wait_for(Duration::from_secs(20), || {
        Sample::of(bal.pid).fds <= base.fds + 8
    });
    let now = Sample::of(bal.pid);
    assert!(settled, "descriptors did not return: {base:?} -> {now:?}");
    for _ in 0..20 {
        let r = ordinary(bal.addr, Duration::from_secs(5));
        assert_eq!(r.status, Some(200), "after the flood");
        assert!(r.served < Duration::from_secs(1), "after the flood: {r:?}");
    }
    now
}

/// Warm up, then the baseline sample.
fn baseline(bal: &Balancer) -> Sample {
    for _ in 0..20 {
        assert_eq!(ordinary(bal.addr, Duration::from_secs(5)).status, Some(200));
    }
    Sample::of(bal.pid)
}

fn report(name: &str, base: Sample, peak: Sample, after: Sample, probe: &str) {
    eprintln!(
        "{name}: threads {} -> peak {} -> {}; fds {} -> peak {} -> {}; RSS {} -> peak {} -> {} KiB; normal client: {probe}",
        base.threads,
        peak.threads,
        after.threads,
        base.fds,
        peak.fds,
        after.fds,
        base.rss_kib,
        peak.rss_kib,
        after.rss_kib
    );
}

const WORKERS: usize = 32;
const QUEUE: usize = 1024;

/// How long the balancer may take to answer the normal client during a
/// flood, once connected: the grace an idle or slow connection keeps its
/// worker while others wait ([`gaia_balancer::server::HEAD_GRACE`], 1 s),
/// plus slack for a loaded 2-core machine.
const NORMAL_LATENCY: Duration = Duration::from_millis(2_500);
/// How long connecting may take: the listen backlog is 128 (std's), and a
/// SYN dropped while a flood overflows it is retransmitted after 1 s, then
/// 3 s; this is the kernel's queue, reported apart from the balancer's own
/// latency.
const CONNECT_LATENCY: Duration = Duration::from_millis(7_500);

/// Caps for a balancer with `workers` workers and a `QUEUE` queue. Threads:
/// the fixed pool, the acceptor, dispatcher, health lane, main, signal and reload threads,
/// plus at most one short-lived resolver thread per worker that is opening
/// an upstream connection (ureq resolves with a timeout on a thread).
/// Descriptors: each worker holds its client socket and a clone of it and
/// one upstream connection; the queue holds one per waiting connection, and
/// the health lane up to its cap plus its channel while every worker is busy.
fn caps(workers: usize, peak: Sample) {
    assert!(peak.threads <= 2 * workers + 8, "threads {peak:?}");
    let lane = gaia_balancer::health_lane::LANE_CAP + gaia_balancer::health_lane::LANE_CHANNEL;
    assert!(
        peak.fds <= 3 * workers + QUEUE + lane + 32,
        "descriptors {peak:?}"
    );
}

/// How each flood connection was answered, by a non-blocking look at what
/// it received: a status, "closed" (EOF, nothing sent), or "open".
fn answered(conns: &mut [TcpStream]) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for s in conns {
        let _ = s.set_nonblocking(true);
        let mut buf = [0u8; 64];
        let key = match s.read(&mut buf) {
            Ok(0) => "closed".to_string(),
            Ok(n) => String::from_utf8_lossy(&buf[..n])
                .split_whitespace()
                .nth(1)
                .unwrap_or("?")
                .to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => "open".to_string(),
            Err(_) => "reset".to_string(),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

fn normal_client_was_served(normal: &crate::process::ProbeReport, bound: Duration) {
    assert!(normal.results.len() >= 3, "{}", normal.summary());
    assert_eq!(
        normal.ok(),
        normal.results.len(),
        "every normal request succeeds: {}",
        normal.summary()
    );
    assert!(normal.max_served() < bound, "{}", normal.summary());
    assert!(
        normal.max_connect() < CONNECT_LATENCY,
        "{}",
        normal.summary()
    );
}

#[test]
fn two_thousand_idle_connections() {
    let _one = one_flood();
    let up = Upstream::always(Reply::json(200, "{}"));
    let dir = config_dir(
        "idle",
        &up.url(),
        &format!(r#"{{"workers": {WORKERS}, "queueSize": {QUEUE}}}"#),
    );
    let bal = spawn(&dir, "");
    let base = baseline(&bal);
    let sampler = Sampler::start(bal.pid);
    let normal = probe(bal.addr, Duration::from_millis(100), Duration::from_secs(5));
    let began = Instant::now();
    let mut flood = open_many(bal.addr, 2_000);
    let opened = began.elapsed();
    let normal = normal.join().unwrap();
    // And once the whole flood is open and held.
    let held = probe(bal.addr, Duration::from_millis(100), Duration::from_secs(2))
        .join()
        .unwrap();
    let n = flood.len();
    let fates = answered(&mut flood);
    drop(flood);
    let peak = sampler.peak();
    let after = recovers(&bal, base);
    report(
        &format!("2000 idle connections ({n} opened in {opened:?}; {fates:?})"),
        base,
        peak,
        after,
        &format!(
            "while opening: {}; once open: {}",
            normal.summary(),
            held.summary()
        ),
    );
    normal_client_was_served(&normal, NORMAL_LATENCY);
    normal_client_was_served(&held, NORMAL_LATENCY);
    caps(WORKERS, peak);
    assert!(peak.rss_kib <= 64 * 1024, "RSS {peak:?}");
}

#[test]
fn five_hundred_slow_head_clients() {
    let _one = one_flood();
    let up = Upstream::always(Reply::json(200, "{}"));
    let dir = config_dir(
        "slow",
        &up.url(),
        &format!(r#"{{"workers": {WORKERS}, "queueSize": {QUEUE}}}"#),
    );
    let bal = spawn(&dir, "");
    let base = baseline(&bal);
    let sampler = Sampler::start(bal.pid);
    let normal = probe(bal.addr, Duration::from_millis(100), Duration::from_secs(5));
    let mut slow = open_many(bal.addr, 500);
    for s in &mut slow {
        let _ = s.write_all(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nX-Slow: ");
    }
    // One byte per client every 300 ms: a slowloris that never ends its head.
    let end = Instant::now() + Duration::from_secs(5);
    let mut ticks = 0;
    while Instant::now() < end && ticks < 100 {
        for s in &mut slow {
            let _ = s.write_all(b"a");
        }
        ticks += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    let normal = normal.join().unwrap();
    let fates = answered(&mut slow);
    drop(slow);
    let peak = sampler.peak();
    let after = recovers(&bal, base);
    report(
        &format!("500 slow-head clients ({fates:?})"),
        base,
        peak,
        after,
        &normal.summary(),
    );
    normal_client_was_served(&normal, NORMAL_LATENCY);
    caps(WORKERS, peak);
    assert!(peak.rss_kib <= 64 * 1024, "RSS {peak:?}");
    assert_eq!(
        up.hits(),
        20 + normal.results.len() + 20,
        "no slow head was forwarded"
    );
}

/// Ignored in `cargo test`: about 1.4 GB cross loopback before every write
/// blocks, which saturates two cores for seconds and starves the tests
/// running beside it. Run it alone:
/// `cargo test --test it flood -- --ignored --nocapture`.
#[test]
#[ignore = "heavy (1.4 GB over loopback): cargo test --test it flood -- --ignored"]
fn two_hundred_clients_that_never_read() {
    let _one = one_flood();
    // 16 MiB of SSE per answer: more than the kernel buffers between the
    // upstream, the balancer and a client that does not read (about 7 MiB on
    // loopback, measured), so the balancer's writes block.
    let event = content_event(&"x".repeat(16 * 1024));
    let up = Upstream::start(move |seen, _| {
        if seen.path == "/v1/chat/completions" {
            Reply::sse(vec![Step::Repeat(event.clone(), 1024)])
        } else {
            Reply::json(200, "{}")
        }
    });
    // The default 256 workers: more than the clients that never read, each
    // of which holds one for up to writeTimeoutMs.
    let workers = 256;
    let dir = config_dir(
        "noread",
        &up.url(),
        &format!(r#"{{"workers": {workers}, "queueSize": {QUEUE}, "writeTimeoutMs": 2000}}"#),
    );
    let bal = spawn(&dir, "");
    let base = baseline(&bal);
    let sampler = Sampler::start(bal.pid);
    let body = crate::util::chat(true);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let normal = probe(bal.addr, Duration::from_millis(100), Duration::from_secs(5));
    let mut stalled = open_many(bal.addr, 200);
    for s in &mut stalled {
        let _ = s.write_all(req.as_bytes());
    }
    let normal = normal.join().unwrap();
    // Still connected and still not reading: writeTimeoutMs frees the workers.
    let began = Instant::now();
    let released = wait_for(Duration::from_secs(40), || {
        Sample::of(bal.pid).fds <= base.fds + 8
    });
    let release = began.elapsed();
    assert!(released, "{:?}", Sample::of(bal.pid));
    drop(stalled);
    let peak = sampler.peak();
    let after = recovers(&bal, base);
    report(
        &format!("200 clients that never read (released {release:?} after the probe, writeTimeoutMs 2000)"),
        base,
        peak,
        after,
        &normal.summary(),
    );
    // Nothing holds the normal client back here (256 workers, 200 taken):
    // its latency is the CPU shared with 200 streams of 16 MiB.
    normal_client_was_served(&normal, 2 * NORMAL_LATENCY);
    caps(workers, peak);
    assert!(peak.rss_kib <= 160 * 1024, "RSS {peak:?}");
}
