//! The benchmark's own load generator: keep-alive HTTP/1.1 clients on plain
//! threads, a log-linear latency histogram, and SSE stream clients that
//! record when each event arrived.
//!
//! wrk is cheaper per request and is preferred for the non-streaming runs
//! when installed; this generator is the fallback, and the only way to
//! measure streams (wrk cannot see individual SSE events). Every loop here is
//! bounded by a deadline and, where it repeats requests, by a count.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Non-streaming chat request body (the fake answers it with a small JSON).
pub const CHAT_BODY: &str =
    r#"{"model":"fake","messages":[{"role":"user","content":"Hello, how are you?"}]}"#;
/// Streaming chat request body.
pub const STREAM_BODY: &str = r#"{"model":"fake","stream":true,"messages":[{"role":"user","content":"Hello, how are you?"}]}"#;

/// Read ticks: how often a blocked client looks at its deadline and stop flag.
const TICK: Duration = Duration::from_millis(100);
/// Longest wait for one non-streaming response.
const RESPONSE_LIMIT: Duration = Duration::from_secs(10);
/// Client thread stacks: clients are shallow, and 1,000 of them must be cheap.
const CLIENT_STACK: usize = 128 * 1024;

/// A keep-alive POST of `body` to the chat endpoint, as raw bytes.
pub fn chat_request(host: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Log-linear histogram of nanosecond values: 64 buckets per power of two
/// (under 1.6 % error), fixed size, so recording never allocates.
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

const SUB_BITS: u32 = 6;
const BUCKETS: usize = ((64 - SUB_BITS as usize) << SUB_BITS) + 128;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        let msb = 63 - (v | 1).leading_zeros();
        if msb <= SUB_BITS {
            v as usize
        } else {
            let e = msb - SUB_BITS;
            ((e as usize) << SUB_BITS) + (v >> e) as usize
        }
    }

    /// Middle of bucket `i`.
    fn value(i: usize) -> f64 {
        if i < 128 {
            return i as f64;
        }
        let e = (i >> SUB_BITS) - 1;
        let m = i - (e << SUB_BITS);
        ((m as u64) << e) as f64 + ((1u64 << e) as f64 - 1.0) / 2.0
    }

    /// Count one value.
    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
    }

    /// Add another histogram's counts.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    /// The value at quantile `q` (0..=1), in nanoseconds; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i);
            }
        }
        0.0
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    Close,
}

/// One client connection with its own read buffer.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Conn {
    /// Connect with a bounded wait; reads wake every [`TICK`].
    pub fn open(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(TICK))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(Conn {
            stream,
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
        })
    }

    /// Read more bytes; waits until data, EOF (an error), `deadline` or `stop`.
    fn fill(&mut self, deadline: Instant, stop: &AtomicBool) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        loop {
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Read one response head: status and framing.
    fn head(&mut self, deadline: Instant, stop: &AtomicBool) -> io::Result<(u16, Framing)> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            let parsed = resp
                .parse(self.pending())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if let httparse::Status::Complete(len) = parsed {
                let status = resp.code.unwrap_or(0);
                let mut framing = Framing::Close;
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let n = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or_else(|| io::Error::other("bad content-length"))?;
                        framing = Framing::Length(n);
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        framing = Framing::Chunked;
                    }
                }
                self.start += len;
                return Ok((status, framing));
            }
            self.fill(deadline, stop)?;
        }
    }

    /// Read a whole body, handing each piece to `data` as soon as it arrives.
    fn body(
        &mut self,
        framing: Framing,
        deadline: Instant,
        stop: &AtomicBool,
        data: &mut dyn FnMut(&[u8]),
    ) -> io::Result<()> {
        match framing {
            Framing::Length(mut left) => loop {
                let take = left.min(self.end - self.start);
                if take > 0 {
                    data(&self.buf[self.start..self.start + take]);
                    self.start += take;
                    left -= take;
                }
                if left == 0 {
                    return Ok(());
                }
                self.fill(deadline, stop)?;
            },
            Framing::Chunked => loop {
                let size = loop {
                    if let Some(i) = find(self.pending(), b"\r\n") {
                        let line = &self.pending()[..i];
                        let hex = line.split(|&b| b == b';').next().unwrap_or(line);
                        let size = std::str::from_utf8(hex)
                            .ok()
                            .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
                            .ok_or_else(|| io::Error::other("bad chunk size"))?;
                        self.start += i + 2;
                        break size;
                    }
                    self.fill(deadline, stop)?;
                };
                if size == 0 {
                    // Trailers (none expected) end with an empty line.
                    loop {
                        if let Some(i) = find(self.pending(), b"\r\n") {
                            self.start += i + 2;
                            if i == 0 {
                                return Ok(());
                            }
                        } else {
                            self.fill(deadline, stop)?;
                        }
                    }
                }
                let mut left = size;
                while left > 0 {
                    if self.start == self.end {
                        self.fill(deadline, stop)?;
                    }
                    let take = left.min(self.end - self.start);
                    data(&self.buf[self.start..self.start + take]);
                    self.start += take;
                    left -= take;
                }
                while self.end - self.start < 2 {
                    self.fill(deadline, stop)?;
                }
                if self.pending()[..2] != *b"\r\n" {
                    return Err(io::Error::other("chunk without CRLF"));
                }
                self.start += 2;
            },
            Framing::Close => loop {
                if self.start < self.end {
                    data(&self.buf[self.start..self.end]);
                    self.start = self.end;
                }
                match self.fill(deadline, stop) {
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    other => other?,
                }
            },
        }
    }

    /// Send `request` and read the whole response; returns its status.
    pub fn roundtrip(&mut self, request: &[u8]) -> io::Result<u16> {
        let never = AtomicBool::new(false);
        let deadline = Instant::now() + RESPONSE_LIMIT;
        self.stream.write_all(request)?;
        let (status, framing) = self.head(deadline, &never)?;
        self.body(framing, deadline, &never, &mut |_| {})?;
        if framing == Framing::Close {
            return Err(io::Error::other("connection not kept alive"));
        }
        Ok(status)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A closed-loop load: `conns` keep-alive connections, each sending the next
/// request as soon as the previous answer is in.
pub struct Load {
    pub conns: usize,
    pub duration: Duration,
    /// Stop after this many requests in all (a test needs only a few hundred).
    pub max_requests: u64,
}

/// What one load run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadStats {
    /// Responses with status 200.
    pub ok: u64,
    /// Other statuses, broken connections, timeouts.
    pub errors: u64,
    /// Wall time of the run.
    pub secs: f64,
    /// Latency quantiles of the 200 responses, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
}

impl LoadStats {
    pub fn rps(&self) -> f64 {
        if self.secs > 0.0 {
            self.ok as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// Run a closed-loop load of `request` against `addr`.
pub fn hammer(addr: SocketAddr, request: &[u8], load: &Load) -> LoadStats {
    let issued = AtomicU64::new(0);
    let started = Instant::now();
    let deadline = started + load.duration;
    let (hist, ok, errors) = thread::scope(|s| {
        let handles: Vec<_> = (0..load.conns.max(1))
            .filter_map(|_| {
                thread::Builder::new()
                    .stack_size(CLIENT_STACK)
                    .spawn_scoped(s, || client_loop(addr, request, deadline, load, &issued))
                    .ok()
            })
            .collect();
        let mut all = Histogram::default();
        let (mut ok, mut errors) = (0, 0);
        for h in handles {
            if let Ok((hist, o, e)) = h.join() {
                all.merge(&hist);
                ok += o;
                errors += e;
            }
        }
        (all, ok, errors)
    });
    LoadStats {
        ok,
        errors,
        secs: started.elapsed().as_secs_f64(),
        p50_us: hist.quantile(0.50) / 1e3,
        p99_us: hist.quantile(0.99) / 1e3,
    }
}

fn client_loop(
    addr: SocketAddr,
    request: &[u8],
    deadline: Instant,
    load: &Load,
    issued: &AtomicU64,
) -> (Histogram, u64, u64) {
    let mut hist = Histogram::default();
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut conn: Option<Conn> = None;
    while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < load.max_requests {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::open(addr) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    errors += 1;
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        let t0 = Instant::now();
        match c.roundtrip(request) {
            Ok(200) => {
                hist.record(t0.elapsed().as_nanos() as u64);
                ok += 1;
            }
            Ok(_) => errors += 1,
            Err(_) => {
                errors += 1;
                conn = None;
            }
        }
    }
    (hist, ok, errors)
}

/// Concurrent SSE streams from `n` clients, each on one keep-alive connection.
///
/// Client `i` starts at `i * stagger / n` and runs `rounds` streams back to
/// back; only the last round is measured. With `stagger` about one stream's
/// length and two rounds, every measured stream runs while about `n` others
/// are open: a steady state, not the thundering herd of `n` simultaneous
/// starts (which mostly measures how fast `n` connections can be set up).
pub struct Streams {
    pub n: usize,
    /// Longest life of one run.
    pub limit: Duration,
    pub stagger: Duration,
    pub rounds: usize,
}

/// What one run of concurrent streams measured.
#[derive(Debug, Clone, Default)]
pub struct StreamStats {
    /// Streams that ended with `data: [DONE]` and the final chunk.
    pub completed: usize,
    /// Streams that failed, were cut, or timed out.
    pub errors: usize,
    /// Request sent until the first content event arrived: p50 / p99 over streams, µs.
    pub first_p50_us: f64,
    pub first_p99_us: f64,
    /// Upstream wrote an event until it arrived here (from the fake's
    /// `x_sent_ns` stamps): p50 / p99 over every content event, µs.
    pub lag_p50_us: f64,
    pub lag_p99_us: f64,
    /// Content events seen in all.
    pub events: u64,
}

/// What one stream saw.
#[derive(Default)]
struct Seen {
    first: Option<Duration>,
    lags_ns: Vec<u64>,
    done: bool,
    events: u64,
}

/// Splits a decoded SSE body into events and times the content events.
struct Sse<'a> {
    pending: Vec<u8>,
    sent: Instant,
    seen: &'a mut Seen,
    started: &'a AtomicUsize,
}

impl Sse<'_> {
    fn push(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
        while let Some(i) = find(&self.pending, b"\n\n") {
            let event = &self.pending[..i];
            if find(event, b"\"content\"").is_some() {
                if self.seen.first.is_none() {
                    self.seen.first = Some(self.sent.elapsed());
                    self.started.fetch_add(1, Ordering::Relaxed);
                }
                self.seen.events += 1;
                if let Some(sent) = stamp(event) {
                    self.seen.lags_ns.push(unix_ns().saturating_sub(sent));
                }
            } else if event == b"data: [DONE]" {
                self.seen.done = true;
            }
            self.pending.drain(..i + 2);
        }
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The fake upstream's `"x_sent_ns":N` stamp in an event.
fn stamp(event: &[u8]) -> Option<u64> {
    let key = b"\"x_sent_ns\":";
    let at = find(event, key)? + key.len();
    let digits: Vec<u8> = event[at..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Run `spec.n` concurrent streams of `request` against `addr`.
///
/// With `hold`, once every stream has had its first content event (or after
/// `spec.limit`), `hold` runs while all of them are still open, and then
/// every stream is closed from this side (used to sample memory at a known
/// number of live streams).
pub fn streams(
    addr: SocketAddr,
    request: &[u8],
    spec: &Streams,
    hold: Option<&dyn Fn(usize)>,
) -> StreamStats {
    let (stop, started) = (AtomicBool::new(false), AtomicUsize::new(0));
    let (stop, started) = (&stop, &started);
    let deadline = Instant::now() + spec.limit;
    let seen: Vec<Option<Seen>> = thread::scope(|s| {
        let handles: Vec<_> = (0..spec.n)
            .map(|i| {
                thread::Builder::new()
                    .stack_size(CLIENT_STACK)
                    .spawn_scoped(s, move || {
                        let offset = spec.stagger.mul_f64(i as f64 / spec.n.max(1) as f64);
                        client_streams(addr, request, spec.rounds, offset, deadline, stop, started)
                    })
                    .ok()
            })
            .collect();
        if let Some(hold) = hold {
            while started.load(Ordering::Relaxed) < spec.n && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            hold(started.load(Ordering::Relaxed));
            stop.store(true, Ordering::Relaxed);
        }
        handles
            .into_iter()
            .map(|h| h.and_then(|h| h.join().ok()))
            .collect()
    });
    let mut firsts: Vec<u64> = Vec::new();
    let mut lags = Histogram::default();
    let mut stats = StreamStats::default();
    for s in &seen {
        match s {
            Some(s) if s.done => stats.completed += 1,
            _ => stats.errors += 1,
        }
        if let Some(s) = s {
            if let Some(f) = s.first {
                firsts.push(f.as_nanos() as u64);
            }
            for &l in &s.lags_ns {
                lags.record(l);
            }
            stats.events += s.events;
        }
    }
    firsts.sort_unstable();
    stats.first_p50_us = exact_quantile(&firsts, 0.50) / 1e3;
    stats.first_p99_us = exact_quantile(&firsts, 0.99) / 1e3;
    stats.lag_p50_us = lags.quantile(0.50) / 1e3;
    stats.lag_p99_us = lags.quantile(0.99) / 1e3;
    stats
}

fn exact_quantile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}

/// One client: wait for its turn, then `rounds` streams on one connection;
/// what the last round saw.
fn client_streams(
    addr: SocketAddr,
    request: &[u8],
    rounds: usize,
    offset: Duration,
    deadline: Instant,
    stop: &AtomicBool,
    started: &AtomicUsize,
) -> Seen {
    let start = Instant::now() + offset;
    while Instant::now() < start.min(deadline) && !stop.load(Ordering::Relaxed) {
        thread::sleep((start - Instant::now().min(start)).min(TICK));
    }
    let mut conn: Option<Conn> = None;
    let mut seen = Seen::default();
    let never = AtomicUsize::new(0);
    for round in 0..rounds.max(1) {
        let last = round + 1 == rounds.max(1);
        seen = one_stream(
            &mut conn,
            addr,
            request,
            deadline,
            stop,
            if last { started } else { &never },
        );
        if !seen.done {
            break;
        }
    }
    seen
}

/// One stream on `conn` (opened, or reopened after a failure, as needed).
fn one_stream(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    request: &[u8],
    deadline: Instant,
    stop: &AtomicBool,
    started: &AtomicUsize,
) -> Seen {
    let mut seen = Seen::default();
    if conn.is_none() {
        *conn = Conn::open(addr).ok();
    }
    let Some(c) = conn.as_mut() else {
        return seen;
    };
    let sent = Instant::now();
    if c.stream.write_all(request).is_err() {
        *conn = None;
        return seen;
    }
    let ended = match c.head(deadline, stop) {
        Ok((200, framing)) if framing != Framing::Close => {
            let mut sse = Sse {
                pending: Vec::new(),
                sent,
                seen: &mut seen,
                started,
            };
            c.body(framing, deadline, stop, &mut |d| sse.push(d))
                .is_ok()
        }
        _ => false,
    };
    seen.done &= ended;
    if !seen.done {
        *conn = None;
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_contiguous_and_tight() {
        let mut last = 0;
        for v in [0u64, 1, 127, 128, 129, 255, 256, 1_000, 65_535, 1 << 40] {
            let i = Histogram::index(v);
            assert!(i >= last, "{v}");
            last = i;
            let mid = Histogram::value(i);
            assert!(
                (mid - v as f64).abs() <= v as f64 / 64.0 + 0.5,
                "{v} -> {mid}"
            );
        }
        assert!(Histogram::index(u64::MAX) < BUCKETS);
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5);
        assert!((p50 - 500_000.0).abs() < 500_000.0 / 50.0, "{p50}");
    }

    #[test]
    fn stamps_are_read_from_events() {
        let ev = br#"data: {"choices":[],"x_sent_ns":1234567}"#;
        assert_eq!(stamp(ev), Some(1_234_567));
        assert_eq!(stamp(b"data: {}"), None);
    }
}
