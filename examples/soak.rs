//! Soak test: the balancer binary under mixed streaming and non-streaming
//! load for a long time (10 minutes by default) while its upstreams fail at
//! random, to show that nothing leaks and no request is lost.
//!
//! It starts three fake upstreams in this process (each answer has a small
//! chance of a 500, a 429, a close without answer, a stream or body cut
//! before the commit point, or a slow start, and one upstream goes through a
//! 15 s outage every 2 minutes unless `--no-outage`), starts `target/release/gaia-balancer` on a
//! free loopback port in front of them, and runs keep-alive clients that
//! check every answer (status 200; a stream ends with `data: [DONE]`; a JSON
//! body is whole). Some clients walk away in the middle of a stream on
//! purpose (the client-gone path), which is counted but not a loss. Every
//! 10 s it prints the balancer's RSS, threads and open descriptors from
//! `/proc`; at the end it checks they stayed flat after the warm-up.
//!
//! ```sh
//! cargo build --release && cargo run --release --example soak             # 10 minutes
//! SOAK_SECS=60 cargo run --release --example soak                         # 1 minute
//! cargo run --release --example soak -- --secs 60 --clients 8 --workers 32 --no-outage
//! ```
//!
//! Exit status 0 when no request was lost and memory, threads and
//! descriptors stayed flat; 1 otherwise. Loopback only; every loop is
//! bounded by the run time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// xorshift64*: deterministic per thread, no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Opts {
    secs: u64,
    outage: bool,
    clients: usize,
    workers: usize,
    bin: PathBuf,
}

fn opts() -> Opts {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/release/examples/soak -> target/release/gaia-balancer
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("gaia-balancer"))
        .unwrap_or_default();
    let mut o = Opts {
        secs: std::env::var("SOAK_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600),
        outage: true,
        clients: 16,
        workers: 32,
        bin,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match a.as_str() {
            "--secs" => o.secs = value().parse().unwrap_or(o.secs),
            "--clients" => o.clients = value().parse().unwrap_or(o.clients),
            "--workers" => o.workers = value().parse().unwrap_or(o.workers),
            "--bin" => o.bin = PathBuf::from(value()),
            "--no-outage" => o.outage = false,
            _ => {
                eprintln!(
                    "usage: soak [--secs N] [--clients N] [--workers N] [--no-outage] [--bin PATH] (or SOAK_SECS=N)"
                );
                std::process::exit(2);
            }
        }
    }
    o
}

// ---------------------------------------------------------------- upstreams

/// Counters of what the fake upstreams did.
#[derive(Default)]
struct Faults {
    answers: AtomicU64,
    injected: AtomicU64,
}

fn start_upstream(seed: u64, outage: bool, faults: Arc<Faults>, stop: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a fake upstream");
    let addr = listener.local_addr().unwrap();
    let began = Instant::now();
    thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok(stream) = stream else { continue };
            let faults = faults.clone();
            thread::spawn(move || {
                let mut rng = Rng(seed ^ (n as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let _ = serve_upstream(stream, &mut rng, outage, began, &faults);
            });
        }
    });
    format!("http://{addr}")
}

/// Read one request (head and Content-Length body); `None` at EOF.
fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<(String, bool)>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut len = 0;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            if n.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    let stream = String::from_utf8_lossy(&body).contains("\"stream\":true");
    Ok(Some((path, stream)))
}

fn chunk(out: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    let mut c = format!("{:x}\r\n", data.len()).into_bytes();
    c.extend_from_slice(data);
    c.extend_from_slice(b"\r\n");
    out.write_all(&c)
}

fn event(text: &str) -> String {
    format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":null}}]}}\n\n")
}

fn serve_upstream(
    stream: TcpStream,
    rng: &mut Rng,
    outage: bool,
    began: Instant,
    faults: &Faults,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    while let Some((path, streaming)) = read_request(&mut r)? {
        faults.answers.fetch_add(1, Ordering::Relaxed);
        // The outage: 15 s out of every 120 s, this upstream answers 503.
        let down =
            outage && began.elapsed().as_secs() % 120 >= 60 && began.elapsed().as_secs() % 120 < 75;
        let roll = if down { 0 } else { rng.below(100) };
        let json = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hello there"},"finish_reason":"stop"}]}"#;
        match roll {
            0 | 1 => {
                faults.injected.fetch_add(1, Ordering::Relaxed);
                let body = r#"{"error":{"message":"injected"}}"#;
                write!(out, "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", if down { 503 } else { 500 }, body.len())?;
            }
            2 | 3 => {
                faults.injected.fetch_add(1, Ordering::Relaxed);
                let body = r#"{"error":{"message":"slow down"}}"#;
                write!(out, "HTTP/1.1 429 X\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
            }
            4 | 5 => {
                faults.injected.fetch_add(1, Ordering::Relaxed);
                return Ok(()); // close without an answer
            }
            6 | 7 => {
                // Cut before the commit point: a preamble (stream) or half a body.
                faults.injected.fetch_add(1, Ordering::Relaxed);
                if streaming {
                    out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")?;
                    chunk(&mut out, b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"},\"finish_reason\":null}]}\n\n")?;
                } else {
                    write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", json.len())?;
                    out.write_all(&json.as_bytes()[..json.len() / 2])?;
                }
                return Ok(());
            }
            _ => {
                if roll < 10 {
                    thread::sleep(Duration::from_millis(300)); // slow start, not a fault
                }
                if streaming && path.ends_with("/chat/completions") {
                    out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")?;
                    for word in ["hello", " there", ",", " friend"] {
                        chunk(&mut out, event(word).as_bytes())?;
                        thread::sleep(Duration::from_millis(5));
                    }
                    chunk(&mut out, b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n")?;
                    out.write_all(b"0\r\n\r\n")?;
                } else {
                    write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}", json.len())?;
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- clients

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    streams: AtomicU64,
    lost: AtomicU64,
    aborted: AtomicU64,
}

/// Read one response; returns (status, body, complete).
/// One answer as the client read it.
struct Answer {
    status: u16,
    body: Vec<u8>,
    /// The body ended where its framing said (not cut by a close).
    complete: bool,
    /// The connection is not kept.
    close: bool,
    /// `x-gaia-attempts`, the trail a lost request is reported with.
    attempts: String,
}

fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<Answer> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut len, mut chunked, mut close) = (None, false, false);
    let mut attempts = String::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(std::io::Error::other("eof in head"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            let v = v.trim();
            if n.eq_ignore_ascii_case("content-length") {
                len = v.parse().ok();
            } else if n.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.eq_ignore_ascii_case("chunked");
            } else if n.eq_ignore_ascii_case("connection") {
                close = v.eq_ignore_ascii_case("close");
            } else if n.eq_ignore_ascii_case("x-gaia-attempts") {
                attempts = v.to_string();
            }
        }
    }
    let mut body = Vec::new();
    let answer = |body, complete, close| Answer {
        status,
        body,
        complete,
        close,
        attempts: attempts.clone(),
    };
    if chunked {
        for _ in 0..100_000 {
            let mut size = String::new();
            if r.read_line(&mut size)? == 0 {
                return Ok(answer(body, false, true));
            }
            let n = usize::from_str_radix(size.trim(), 16).map_err(std::io::Error::other)?;
            if n == 0 {
                let mut end = String::new();
                r.read_line(&mut end)?;
                return Ok(answer(body, true, close));
            }
            let mut data = vec![0; n + 2];
            r.read_exact(&mut data)?;
            body.extend_from_slice(&data[..n]);
        }
        Ok(answer(body, false, true))
    } else if let Some(n) = len {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
        Ok(answer(body, true, close))
    } else {
        r.read_to_end(&mut body)?;
        Ok(answer(body, true, true))
    }
}

fn client(addr: SocketAddr, seed: u64, end: Instant, tally: &Tally) {
    let mut rng = Rng(seed);
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut used = 0;
    while Instant::now() < end {
        if conn.is_none() || used > rng.below(20) {
            conn = TcpStream::connect(addr).ok().and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
                s.set_nodelay(true).ok()?;
                let r = BufReader::new(s.try_clone().ok()?);
                Some((s, r))
            });
            used = 0;
        }
        let Some((w, r)) = conn.as_mut() else {
            tally.lost.fetch_add(1, Ordering::Relaxed);
            eprintln!("lost: cannot connect");
            thread::sleep(Duration::from_millis(100));
            continue;
        };
        used += 1;
        let streaming = rng.below(2) == 0;
        let (path, body) = match (streaming, rng.below(3)) {
            (true, _) => (
                "/v1/chat/completions",
                r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            ),
            (false, 0) => ("/v1/embeddings", r#"{"model":"m","input":"hi"}"#),
            (false, _) => (
                "/v1/chat/completions",
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            ),
        };
        let req = format!("POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        if w.write_all(req.as_bytes()).is_err() {
            tally.lost.fetch_add(1, Ordering::Relaxed);
            eprintln!("lost: write failed");
            conn = None;
            continue;
        }
        // 1 in 50 streams: walk away mid-answer on purpose.
        if streaming && rng.below(50) == 0 {
            let mut some = [0u8; 64];
            let _ = r.read(&mut some);
            tally.aborted.fetch_add(1, Ordering::Relaxed);
            conn = None;
            continue;
        }
        match read_response(r) {
            Ok(Answer {
                status: 200,
                body,
                complete: true,
                close,
                attempts,
            }) => {
                let text = String::from_utf8_lossy(&body);
                let good = if streaming {
                    text.contains("data: [DONE]") && !text.contains("\"error\"")
                } else {
                    serde_json::from_slice::<serde_json::Value>(&body).is_ok()
                };
                if good {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    tally
                        .streams
                        .fetch_add(u64::from(streaming), Ordering::Relaxed);
                } else {
                    tally.lost.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "lost: bad body (attempts {attempts}) {}",
                        text.chars().take(200).collect::<String>()
                    );
                }
                if close {
                    conn = None;
                }
            }
            Ok(Answer {
                status,
                body,
                attempts,
                ..
            }) => {
                tally.lost.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "lost: status {status} (attempts {attempts}): {}",
                    String::from_utf8_lossy(&body)
                        .chars()
                        .take(200)
                        .collect::<String>()
                );
                conn = None;
            }
            Err(e) => {
                tally.lost.fetch_add(1, Ordering::Relaxed);
                eprintln!("lost: {e}");
                conn = None;
            }
        }
        thread::sleep(Duration::from_millis(rng.below(10)));
    }
}

// ---------------------------------------------------------------- the run

struct Sample {
    at: u64,
    rss_kib: u64,
    threads: u64,
    fds: usize,
}

fn sample(pid: u32, at: u64) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Sample {
        at,
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0),
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().unwrap().port()
}

fn main() {
    let o = opts();
    if !o.bin.is_file() {
        eprintln!(
            "soak: no balancer binary at {}; run `cargo build --release` first or pass --bin",
            o.bin.display()
        );
        std::process::exit(2);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let faults = Arc::new(Faults::default());
    let urls: Vec<String> = (0..3)
        .map(|i| start_upstream(0x5eed + i, o.outage && i == 0, faults.clone(), stop.clone()))
        .collect();
    let dir = std::env::temp_dir().join(format!("gaia-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let hosts: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    std::fs::write(
        dir.join("hosts.json"),
        format!("{{\"hosts\": [{}]}}", hosts.join(", ")),
    )
    .unwrap();
    std::fs::write(
        dir.join("balancer.json"),
        format!(r#"{{"workers": {}, "timeouts": {{"firstByteMs": 5000, "idleMs": 5000, "totalMs": 20000}}}}"#, o.workers),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new(&o.bin)
        .args([
            "--config",
            &dir.to_string_lossy(),
            "--port",
            &port.to_string(),
        ])
        .env("LOG_LEVEL", "error")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the balancer");
    let child = KillOnDrop(child);
    let pid = child.0.id();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let up = Instant::now();
    while TcpStream::connect(addr).is_err() {
        if up.elapsed() > Duration::from_secs(10) {
            eprintln!("soak: the balancer did not start");
            std::process::exit(1);
        }
        thread::sleep(Duration::from_millis(20));
    }
    println!(
        "soak: {} s, {} clients, {} workers, outages {}, balancer pid {pid} on {addr}, upstreams {urls:?}",
        o.secs,
        o.clients,
        o.workers,
        if o.outage { "on" } else { "off" }
    );
    let began = Instant::now();
    let end = began + Duration::from_secs(o.secs);
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..o.clients)
        .map(|i| {
            let tally = tally.clone();
            thread::spawn(move || client(addr, 0x00c1_1e47 + i as u64, end, &tally))
        })
        .collect();
    let mut samples = Vec::new();
    println!(
        "{:>6} {:>9} {:>8} {:>5} {:>9} {:>6} {:>7}",
        "secs", "RSS KiB", "threads", "fds", "ok", "lost", "faults"
    );
    let mut next = began;
    while Instant::now() < end {
        next += Duration::from_secs(10);
        thread::sleep(next.min(end).saturating_duration_since(Instant::now()));
        let s = sample(pid, began.elapsed().as_secs());
        println!(
            "{:>6} {:>9} {:>8} {:>5} {:>9} {:>6} {:>7}",
            s.at,
            s.rss_kib,
            s.threads,
            s.fds,
            tally.ok.load(Ordering::Relaxed),
            tally.lost.load(Ordering::Relaxed),
            faults.injected.load(Ordering::Relaxed)
        );
        samples.push(s);
    }
    for c in clients {
        let _ = c.join();
    }
    stop.store(true, Ordering::Relaxed);
    let ok = tally.ok.load(Ordering::Relaxed);
    let lost = tally.lost.load(Ordering::Relaxed);
    // Flat after warm-up: the first minute (or first sixth of a short run)
    // warms up; later RSS may not grow past the warm-up peak by more than
    // 10 % + 2 MiB. Threads and descriptors swing by ±10 with what is in
    // flight (outages, retries), so one high sample says nothing: the median
    // of the last third may not pass the warm-up peak by more than 8, which
    // a leak of any rate does within the run.
    let warm = samples.len().div_ceil(6).clamp(1, 6);
    let (before, after) = samples.split_at(warm.min(samples.len()));
    let peak = |f: &dyn Fn(&Sample) -> u64, s: &[Sample]| s.iter().map(f).max().unwrap_or(0);
    let late = |f: &dyn Fn(&Sample) -> u64, s: &[Sample]| {
        let mut v: Vec<u64> = s[s.len() * 2 / 3..].iter().map(f).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let rss = |s: &Sample| s.rss_kib;
    let threads = |s: &Sample| s.threads;
    let fds = |s: &Sample| s.fds as u64;
    let flat = after.is_empty()
        || (peak(&rss, after) <= peak(&rss, before) * 11 / 10 + 2048
            && late(&threads, after) <= peak(&threads, before) + 8
            && late(&fds, after) <= peak(&fds, before) + 8);
    println!(
        "soak: {ok} requests ok ({} streams), {lost} lost, {} walked away on purpose; upstream answers {} with {} injected faults; RSS after warm-up {} -> {} KiB (peak), threads {} -> {} (warm-up peak -> late median), fds {} -> {}: {}",
        tally.streams.load(Ordering::Relaxed),
        tally.aborted.load(Ordering::Relaxed),
        faults.answers.load(Ordering::Relaxed),
        faults.injected.load(Ordering::Relaxed),
        peak(&rss, before),
        peak(&rss, after),
        peak(&threads, before),
        late(&threads, after),
        peak(&fds, before),
        late(&fds, after),
        if flat { "flat" } else { "GREW" }
    );
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    if lost > 0 || !flat || ok == 0 {
        std::process::exit(1);
    }
}
