//! Prometheus metrics: the counters, gauges and histograms behind `GET
//! /metrics`, written by hand in text exposition format 0.0.4 (no crate).
//!
//! Why hand-written: the format is a few lines of text, and owning it keeps
//! the hot path under our control. Guarantees: recording costs relaxed atomic
//! adds into pre-sized arrays and a thread-local [`Cell`], never an allocation
//! or a lock (the per-host series of a configuration generation are looked up
//! once, when the generation is installed, see [`crate::state::Shared`]);
//! counters never go down for the life of the process, across configuration
//! reloads (the state lives in `Shared`, host series are keyed by host name);
//! no label ever holds a key or any other secret (labels are route names,
//! status codes, host names and fixed words, and key counts are unlabelled).
//! Gauges that describe the host table and the key pools are computed when
//! scraped, from the balancer in force.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::hosts::{Host, HostState, Scope};
use crate::keys::KeyPool;
use crate::retry::Outcome;
use crate::state::{Balancer, Shared};

/// Prefix of every metric name.
pub const PREFIX: &str = "gaia_balancer_";

/// The `route` label: which endpoint a request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
    /// `/v1/embeddings`.
    Embeddings,
    /// `/v1/models`.
    Models,
    /// Any other `/v1/*` path.
    OtherV1,
    /// `/healthz`.
    Healthz,
    /// `/readyz`.
    Readyz,
    /// `/status`.
    Status,
    /// `/metrics`.
    Metrics,
    /// Anything else, and requests whose head could not be read.
    Unknown,
}

impl Route {
    /// Every route, in label order.
    pub const ALL: [Route; 10] = [
        Route::Chat,
        Route::Completions,
        Route::Embeddings,
        Route::Models,
        Route::OtherV1,
        Route::Healthz,
        Route::Readyz,
        Route::Status,
        Route::Metrics,
        Route::Unknown,
    ];

    /// The route of a request path (query already removed).
    pub fn of(path: &str) -> Route {
        match path {
            "/v1/chat/completions" => Route::Chat,
            "/v1/completions" => Route::Completions,
            "/v1/embeddings" => Route::Embeddings,
            "/v1/models" => Route::Models,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/status" => Route::Status,
            "/metrics" => Route::Metrics,
            p if p == "/v1" || p.starts_with("/v1/") => Route::OtherV1,
            _ => Route::Unknown,
        }
    }

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Route::Chat => "chat",
            Route::Completions => "completions",
            Route::Embeddings => "embeddings",
            Route::Models => "models",
            Route::OtherV1 => "other_v1",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Status => "status",
            Route::Metrics => "metrics",
            Route::Unknown => "unknown",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The `outcome` label of an upstream attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A 1xx–3xx answer, passed to the client (a stream cut after the
    /// commit counts as `Broken`).
    Ok,
    /// A 4xx other than 429 (retried for 401/403/404, passed through otherwise).
    Status4xx,
    /// 429 Too Many Requests.
    Status429,
    /// A 5xx.
    Status5xx,
    /// Connect, TLS or DNS failure.
    Connect,
    /// No output within the first-byte or idle timeout.
    Timeout,
    /// The response broke off, before or after the commit.
    Broken,
}

impl AttemptOutcome {
    /// Every outcome, in label order.
    pub const ALL: [AttemptOutcome; 7] = [
        AttemptOutcome::Ok,
        AttemptOutcome::Status4xx,
        AttemptOutcome::Status429,
        AttemptOutcome::Status5xx,
        AttemptOutcome::Connect,
        AttemptOutcome::Timeout,
        AttemptOutcome::Broken,
    ];

    /// The label of a retry-policy outcome.
    pub fn of(outcome: Outcome) -> AttemptOutcome {
        match outcome {
            Outcome::Connect => AttemptOutcome::Connect,
            Outcome::Timeout => AttemptOutcome::Timeout,
            Outcome::Broken => AttemptOutcome::Broken,
            Outcome::Status(429) => AttemptOutcome::Status429,
            Outcome::Status(s) if s >= 500 => AttemptOutcome::Status5xx,
            Outcome::Status(s) if s >= 400 => AttemptOutcome::Status4xx,
            Outcome::Status(_) => AttemptOutcome::Ok,
        }
    }

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            AttemptOutcome::Ok => "ok",
            AttemptOutcome::Status4xx => "status_4xx",
            AttemptOutcome::Status429 => "status_429",
            AttemptOutcome::Status5xx => "status_5xx",
            AttemptOutcome::Connect => "connect",
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::Broken => "broken",
        }
    }
}

/// Why a connection was answered 503 before any request was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Every worker busy and the queue full.
    QueueFull,
    /// Waited in the queue longer than `queueWaitMs`.
    QueueWait,
    /// The client address holds `maxConnectionsPerClient` connections already.
    PerClient,
    /// A new connection that had sent nothing gave its worker up to one
    /// waiting for a worker (see [`crate::server::HEAD_GRACE`]).
    Idle,
}

impl Shed {
    const ALL: [Shed; 4] = [
        Shed::QueueFull,
        Shed::QueueWait,
        Shed::PerClient,
        Shed::Idle,
    ];

    fn label(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::QueueWait => "queue_wait",
            Shed::PerClient => "per_client",
            Shed::Idle => "idle",
        }
    }
}

const SCOPES: [Scope; 3] = [Scope::Key, Scope::Pair, Scope::Host];

fn scope_label(scope: Scope) -> &'static str {
    match scope {
        Scope::Key => "key",
        Scope::Pair => "pair",
        Scope::Host => "host",
    }
}

/// Status codes are counted in a flat array indexed by code; anything outside
/// 100..=599 (never sent) lands in the 0 slot and is not exported.
const CODES: usize = 600;

/// Upper bounds (seconds) for request duration and time to first byte: LLM
/// answers range from tens of milliseconds (embeddings) to minutes (streams).
const LATENCY_BOUNDS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Upper bounds (seconds) for the balancer's own overhead: normally well under
/// a millisecond, seconds only with backoff or a slow client upload.
const OVERHEAD_BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A fixed-bucket histogram: one atomic per bucket (not cumulative; summed
/// when scraped), the sum in nanoseconds.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    /// Cumulative bucket counts (the last is `+Inf`, i.e. the count).
    fn cumulative(&self) -> Vec<u64> {
        let mut total = 0;
        self.buckets
            .iter()
            .map(|b| {
                total += b.load(Relaxed);
                total
            })
            .collect()
    }
}

/// The `kind` label of proxied requests: the client asked for a stream or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `"stream"` absent or false.
    Json,
    /// `"stream": true`.
    Stream,
}

const KINDS: [Kind; 2] = [Kind::Json, Kind::Stream];

fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Json => "json",
        Kind::Stream => "stream",
    }
}

/// Weight of the newest sample in a host's latency average.
const EWMA_ALPHA: f64 = 0.2;
/// "No sample yet" in an f64-bits atomic (a NaN no computation produces here).
const NONE_BITS: u64 = u64::MAX;

/// The series of one host, by name; shared by every generation that has a
/// host of that name.
#[derive(Debug)]
pub struct HostSeries {
    attempts: [AtomicU64; 7],
    backup_served: AtomicU64,
    /// Exponentially weighted average of the time to response head, seconds (f64 bits).
    latency: AtomicU64,
    /// The last time to response head, seconds (f64 bits).
    last_latency: AtomicU64,
}

impl Default for HostSeries {
    fn default() -> Self {
        HostSeries {
            attempts: Default::default(),
            backup_served: AtomicU64::new(0),
            latency: AtomicU64::new(NONE_BITS),
            last_latency: AtomicU64::new(NONE_BITS),
        }
    }
}

impl HostSeries {
    /// Count an attempt and, if the upstream answered, its time to response head.
    fn attempt(&self, outcome: AttemptOutcome, head_after: Option<Duration>) {
        self.attempts[outcome as usize].fetch_add(1, Relaxed);
        if let Some(d) = head_after {
            let sample = d.as_secs_f64();
            self.last_latency.store(sample.to_bits(), Relaxed);
            // A lost race between two samples costs one sample, never a torn value.
            let _ = self.latency.fetch_update(Relaxed, Relaxed, |old| {
                Some(if old == NONE_BITS {
                    sample.to_bits()
                } else {
                    let old = f64::from_bits(old);
                    (old + EWMA_ALPHA * (sample - old)).to_bits()
                })
            });
        }
    }

    /// Average and last time to response head, in seconds, once there is a sample.
    pub fn latency(&self) -> Option<(f64, f64)> {
        let (avg, last) = (self.latency.load(Relaxed), self.last_latency.load(Relaxed));
        (avg != NONE_BITS && last != NONE_BITS).then(|| (f64::from_bits(avg), f64::from_bits(last)))
    }

    /// Attempts counted for this host, every outcome.
    pub fn attempts(&self) -> u64 {
        self.attempts.iter().map(|a| a.load(Relaxed)).sum()
    }
}

/// Every metric the process keeps. One per process, in [`Shared`].
#[derive(Debug)]
pub struct Metrics {
    /// `[route][code]`, flat.
    requests: Box<[AtomicU64]>,
    in_flight: AtomicUsize,
    queued: AtomicUsize,
    shed: [AtomicU64; 4],
    cooldowns: [AtomicU64; 3],
    streams_cut: AtomicU64,
    client_gone: AtomicU64,
    duration: [Histogram; 2],
    first_byte: [Histogram; 2],
    overhead: [Histogram; 2],
    hosts: Mutex<BTreeMap<String, Arc<HostSeries>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: (0..Route::ALL.len() * CODES)
                .map(|_| AtomicU64::new(0))
                .collect(),
            in_flight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            shed: Default::default(),
            cooldowns: Default::default(),
            streams_cut: AtomicU64::new(0),
            client_gone: AtomicU64::new(0),
            duration: [
                Histogram::new(&LATENCY_BOUNDS),
                Histogram::new(&LATENCY_BOUNDS),
            ],
            first_byte: [
                Histogram::new(&LATENCY_BOUNDS),
                Histogram::new(&LATENCY_BOUNDS),
            ],
            overhead: [
                Histogram::new(&OVERHEAD_BOUNDS),
                Histogram::new(&OVERHEAD_BOUNDS),
            ],
            hosts: Mutex::new(BTreeMap::new()),
        }
    }
}

/// A proxied request counted in flight until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    /// The series of the host called `name`, created on first use. Called
    /// when a generation is installed, not per request.
    pub fn host(&self, name: &str) -> Arc<HostSeries> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = hosts.get(name) {
            return s.clone();
        }
        let s = Arc::new(HostSeries::default());
        hosts.insert(name.to_string(), s.clone());
        s
    }

    /// Count a proxied request in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self)
    }

    /// Proxied requests in flight now.
    pub fn requests_in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// A connection entered the worker queue.
    pub fn queued(&self) {
        self.queued.fetch_add(1, Relaxed);
    }

    /// A connection left the worker queue (taken by a worker, or never entered it).
    pub fn dequeued(&self) {
        // Saturating: a gauge that wrapped below zero would read as 2^64.
        let _ = self
            .queued
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
    }

    /// Connections waiting for a worker now.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Relaxed)
    }

    /// A connection was answered 503 before any request was read.
    pub fn shed(&self, why: Shed) {
        self.shed[why as usize].fetch_add(1, Relaxed);
    }

    /// A 429 (or a 503 with `Retry-After`) started a cooldown of this scope.
    pub fn cooldown(&self, scope: Scope) {
        let i = SCOPES.iter().position(|s| *s == scope).unwrap_or(0);
        self.cooldowns[i].fetch_add(1, Relaxed);
    }

    /// Requests answered so far on `route`, every status.
    pub fn requests(&self, route: Route) -> u64 {
        let base = route.index() * CODES;
        self.requests[base..base + CODES]
            .iter()
            .map(|c| c.load(Relaxed))
            .sum()
    }

    /// Proxied requests answered so far, every route and status.
    pub fn proxied_requests(&self) -> u64 {
        [
            Route::Chat,
            Route::Completions,
            Route::Embeddings,
            Route::Models,
            Route::OtherV1,
        ]
        .into_iter()
        .map(|r| self.requests(r))
        .sum()
    }

    /// Record one upstream attempt on `host` of balancer `b`, which started
    /// at `begun`; `outcome` is `None` when the client left (nothing learned).
    /// `served`: the attempt's answer went to the client.
    pub fn attempt(
        &self,
        b: &Balancer,
        host: &Host,
        begun: Instant,
        outcome: Option<AttemptOutcome>,
        served: bool,
    ) {
        let now = Instant::now();
        let marks = MARKS.with(|m| {
            let mut marks = m.get();
            marks.upstream += now.saturating_duration_since(begun);
            marks.served |= served;
            m.set(marks);
            marks
        });
        let head_after = marks.head.map(|h| h.saturating_duration_since(begun));
        // Only an attempt that got a response head has a status to class it by.
        let status = head_after.map(|_| marks.head_status);
        self.count_attempt(b, host, outcome, status, head_after, served);
    }

    /// Record one hedge attempt on `host` (it ran on a hedge thread, so the
    /// worker's marks say nothing about it): `outcome` as for [`Self::attempt`]
    /// (`Ok` is classed by `status`), `head_after` its time to response head
    /// if it got one, `served` when its answer went to the client. Called on
    /// the worker, which commits the hedge.
    pub fn hedge_attempt(
        &self,
        b: &Balancer,
        host: &Host,
        outcome: Option<AttemptOutcome>,
        status: u16,
        head_after: Option<Duration>,
        served: bool,
    ) {
        mark(|m| m.served |= served);
        self.count_attempt(b, host, outcome, Some(status), head_after, served);
    }

    /// Count one attempt on `host`; an answer delivered (`Ok` with its
    /// `status`) is classed by that status (a 4xx passed through). A backup
    /// that served counts as such even when the client then left (no
    /// outcome): its answer, or part of it, went out.
    fn count_attempt(
        &self,
        b: &Balancer,
        host: &Host,
        outcome: Option<AttemptOutcome>,
        status: Option<u16>,
        head_after: Option<Duration>,
        served: bool,
    ) {
        let outcome = match (outcome, status) {
            (Some(AttemptOutcome::Ok), Some(s)) => Some(AttemptOutcome::of(Outcome::Status(s))),
            (o, _) => o,
        };
        let Some(series) = b.series.get(host.index) else {
            return;
        };
        if served && host.spec.backup {
            series.backup_served.fetch_add(1, Relaxed);
        }
        if let Some(outcome) = outcome {
            series.attempt(outcome, head_after);
        }
    }

    /// Record a finished request: `status` as sent (499 when the client left),
    /// `started` when its head was complete; `cut` and `client_gone` from the proxy.
    pub fn request(
        &self,
        route: Route,
        status: u16,
        started: Instant,
        cut: bool,
        client_gone: bool,
    ) {
        let code = if (100..CODES as u16).contains(&status) {
            usize::from(status)
        } else {
            0
        };
        self.requests[route.index() * CODES + code].fetch_add(1, Relaxed);
        let marks = MARKS.with(Cell::take);
        let Some(kind) = marks.proxied else {
            return;
        };
        let k = kind as usize;
        let total = started.elapsed();
        self.duration[k].observe(total);
        self.overhead[k].observe(
            total
                .saturating_sub(marks.upstream)
                .saturating_sub(marks.body),
        );
        if let Some(first) = marks
            .first_event
            .or(marks.served_head)
            .filter(|_| marks.served)
        {
            self.first_byte[k].observe(first.saturating_duration_since(started));
        }
        if cut {
            self.streams_cut.fetch_add(1, Relaxed);
        }
        if client_gone {
            self.client_gone.fetch_add(1, Relaxed);
        }
    }
}

/// What one request's thread noted on its way, for the request-level
/// metrics recorded when it ends.
#[derive(Debug, Clone, Copy, Default)]
struct Marks {
    /// The request was proxied, and how.
    proxied: Option<Kind>,
    /// Time spent receiving the request body.
    body: Duration,
    /// Time inside upstream attempts.
    upstream: Duration,
    /// When the current attempt's upstream response head arrived.
    head: Option<Instant>,
    /// The status of that head.
    head_status: u16,
    /// When the response head of the answer passed to the client arrived
    /// (a hedge's included, which `head` never sees).
    served_head: Option<Instant>,
    /// When the first SSE event was committed to the client.
    first_event: Option<Instant>,
    /// An upstream answer was committed to the client.
    served: bool,
}

thread_local! {
    static MARKS: Cell<Marks> = const {
        Cell::new(Marks {
            proxied: None,
            body: Duration::ZERO,
            upstream: Duration::ZERO,
            head: None,
            head_status: 0,
            served_head: None,
            first_event: None,
            served: false,
        })
    };
}

fn mark(f: impl FnOnce(&mut Marks)) {
    MARKS.with(|m| {
        let mut marks = m.get();
        f(&mut marks);
        m.set(marks);
    });
}

/// A request begins on this thread: forget the last one's marks.
pub fn begin_request() {
    MARKS.with(Cell::take);
}

/// The request is proxied (`kind`), after `body` spent reading its body.
pub fn mark_proxied(kind: Kind, body: Duration) {
    mark(|m| {
        m.proxied = Some(kind);
        m.body = body;
    });
}

/// An upstream attempt begins; returns its start for [`Metrics::attempt`].
pub fn attempt_begins() -> Instant {
    mark(|m| m.head = None);
    Instant::now()
}

/// The current attempt's upstream response head arrived with `status`.
pub fn mark_head(status: u16) {
    mark(|m| {
        m.head = Some(Instant::now());
        m.head_status = status;
    });
}

/// The response head of the answer being passed to the client arrived at `at`.
pub fn mark_served_head(at: Instant) {
    mark(|m| m.served_head = Some(at));
}

/// The first SSE event was committed to the client.
pub fn mark_first_event() {
    mark(|m| {
        if m.first_event.is_none() {
            m.first_event = Some(Instant::now());
        }
    });
}

/// Where a host stands, as `/status` and the metrics name it.
pub fn host_state(h: &Host, now: Instant) -> &'static str {
    let health = h.health();
    match health.state {
        HostState::Up if health.cooldown.active(now) => "cooling",
        HostState::Up => "up",
        HostState::Ejected(until) if until > now => "ejected",
        HostState::Ejected(_) | HostState::Probing => "probing",
    }
}

/// Key counts by state over `pools` (each pool once): active, cooling, disabled.
fn key_counts<'a>(pools: impl Iterator<Item = &'a KeyPool>, now: Instant) -> [u64; 3] {
    let mut counts = [0u64; 3];
    for pool in pools {
        for k in pool.keys() {
            let st = k.state();
            let i = if st.disabled {
                2
            } else if st.cooldown.active(now) {
                1
            } else {
                0
            };
            counts[i] += 1;
        }
    }
    counts
}

/// Writes families in exposition format.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {PREFIX}{name} {help}");
        let _ = writeln!(self.0, "# TYPE {PREFIX}{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(PREFIX);
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                self.0.push_str(k);
                self.0.push_str("=\"");
                escape_label(&mut self.0, v);
                self.0.push('"');
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn histogram(&mut self, name: &str, help: &str, hists: &[Histogram; 2]) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (kind, h) in KINDS.iter().zip(hists) {
            let kind = kind_label(*kind);
            let counts = h.cumulative();
            for (bound, count) in h.bounds.iter().zip(&counts) {
                let le = bound.to_string();
                self.sample(&bucket, &[("kind", kind), ("le", &le)], count);
            }
            let total = counts.last().copied().unwrap_or(0);
            self.sample(&bucket, &[("kind", kind), ("le", "+Inf")], total);
            let sum = h.sum_nanos.load(Relaxed) as f64 / 1e9;
            self.sample(&format!("{name}_sum"), &[("kind", kind)], sum);
            self.sample(&format!("{name}_count"), &[("kind", kind)], total);
        }
    }
}

/// Label values escape `\`, `"` and newlines (host names come from config).
fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The body of `GET /metrics` for the balancer `b` in force.
pub fn render(shared: &Shared, b: &Balancer) -> String {
    let m = &shared.metrics;
    let now = Instant::now();
    let mut o = Out(String::with_capacity(16 * 1024));

    o.family("build_info", "gauge", "Always 1; the version is a label.");
    o.sample("build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    o.family(
        "uptime_seconds",
        "gauge",
        "Seconds since the process started serving.",
    );
    o.sample(
        "uptime_seconds",
        &[],
        shared.started.elapsed().as_secs_f64(),
    );

    o.family(
        "requests_total",
        "counter",
        "Requests answered, by route and HTTP status (499: the client went away first).",
    );
    for route in Route::ALL {
        let base = route.index() * CODES;
        for code in 100..CODES {
            let n = m.requests[base + code].load(Relaxed);
            if n > 0 {
                let code = code.to_string();
                o.sample(
                    "requests_total",
                    &[("route", route.label()), ("code", &code)],
                    n,
                );
            }
        }
    }
    o.family(
        "requests_in_flight",
        "gauge",
        "Proxied (/v1/*) requests being served now.",
    );
    o.sample("requests_in_flight", &[], m.in_flight.load(Relaxed));
    o.family(
        "queue_depth",
        "gauge",
        "Accepted connections waiting for a free worker.",
    );
    o.sample("queue_depth", &[], m.queued.load(Relaxed));
    o.family(
        "connections_shed_total",
        "counter",
        "Connections answered 503 before a request was read, by reason.",
    );
    for why in Shed::ALL {
        o.sample(
            "connections_shed_total",
            &[("reason", why.label())],
            m.shed[why as usize].load(Relaxed),
        );
    }

    let series: Vec<(String, Arc<HostSeries>)> = m
        .hosts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    o.family(
        "upstream_attempts_total",
        "counter",
        "Upstream attempts by host and outcome (ok, status_4xx, status_429, status_5xx, connect, timeout, broken).",
    );
    for (name, s) in &series {
        for outcome in AttemptOutcome::ALL {
            o.sample(
                "upstream_attempts_total",
                &[("host", name), ("outcome", outcome.label())],
                s.attempts[outcome as usize].load(Relaxed),
            );
        }
    }
    o.family(
        "backup_served_total",
        "counter",
        "Requests answered by a backup host (one used only when no primary could serve).",
    );
    for (name, s) in &series {
        o.sample(
            "backup_served_total",
            &[("host", name)],
            s.backup_served.load(Relaxed),
        );
    }
    o.family(
        "retries_total",
        "counter",
        "Upstream attempts after the first of a request (each allowed by the retry budget).",
    );
    o.sample("retries_total", &[], shared.budget.retries());
    o.family(
        "retry_budget_refusals_total",
        "counter",
        "Requests that stopped retrying because the retry budget was spent.",
    );
    o.sample("retry_budget_refusals_total", &[], shared.budget.refusals());
    o.family("retries_in_flight", "gauge", "Retries under way now.");
    o.sample("retries_in_flight", &[], shared.budget.retrying());

    let hosts = b.hosts.all();
    let states: Vec<&str> = hosts.iter().map(|h| host_state(h, now)).collect();
    o.family("hosts", "gauge", "Hosts in the configuration in force.");
    o.sample("hosts", &[], hosts.len());
    o.family(
        "hosts_up",
        "gauge",
        "Hosts taking traffic now (not ejected, probing or cooling down).",
    );
    o.sample(
        "hosts_up",
        &[],
        states.iter().filter(|s| **s == "up").count(),
    );
    o.family(
        "host_up",
        "gauge",
        "1 when the host takes traffic now, else 0.",
    );
    for (h, state) in hosts.iter().zip(&states) {
        o.sample(
            "host_up",
            &[("host", &h.spec.name)],
            u8::from(*state == "up"),
        );
    }
    o.family(
        "host_in_flight",
        "gauge",
        "Attempts being sent to or read from the host now.",
    );
    for h in hosts {
        o.sample(
            "host_in_flight",
            &[("host", &h.spec.name)],
            h.in_flight.load(Relaxed),
        );
    }
    o.family(
        "host_ejections_total",
        "counter",
        "Times the host was ejected (resets if the host leaves the configuration and comes back).",
    );
    for h in hosts {
        o.sample(
            "host_ejections_total",
            &[("host", &h.spec.name)],
            h.health().ejections,
        );
    }
    o.family(
        "host_latency_seconds",
        "gauge",
        "Moving average (EWMA, alpha 0.2) of the host's time from sending an attempt to its response head.",
    );
    for (h, s) in hosts.iter().zip(&b.series) {
        if let Some((avg, _)) = s.latency() {
            o.sample("host_latency_seconds", &[("host", &h.spec.name)], avg);
        }
    }

    o.family(
        "cooldowns_total",
        "counter",
        "Cooldowns started by a 429 (or a 503 with Retry-After), by what cools: a key everywhere, a (host, key) pair, or a host.",
    );
    for scope in SCOPES {
        let i = SCOPES.iter().position(|s| *s == scope).unwrap_or(0);
        o.sample(
            "cooldowns_total",
            &[("scope", scope_label(scope))],
            m.cooldowns[i].load(Relaxed),
        );
    }
    let own = hosts
        .iter()
        .filter(|h| h.spec.api_keys.is_some())
        .map(|h| &*h.keys);
    let counts = key_counts(std::iter::once(&*b.keys).chain(own), now);
    o.family(
        "keys",
        "gauge",
        "Upstream keys (global pool and hosts' own) by state: active, cooling, disabled (rejected with 401/403).",
    );
    for (state, n) in ["active", "cooling", "disabled"].iter().zip(counts) {
        o.sample("keys", &[("state", state)], n);
    }

    o.family(
        "streams_cut_total",
        "counter",
        "Answers that failed after the commit (the client saw an error event or a cut body).",
    );
    o.sample("streams_cut_total", &[], m.streams_cut.load(Relaxed));
    o.family(
        "client_disconnects_total",
        "counter",
        "Proxied requests abandoned because the client went away.",
    );
    o.sample("client_disconnects_total", &[], m.client_gone.load(Relaxed));

    o.histogram(
        "request_duration_seconds",
        "Proxied requests, from the complete request head to the end of the answer.",
        &m.duration,
    );
    o.histogram(
        "time_to_first_byte_seconds",
        "Proxied requests answered by an upstream, from the request head to the upstream's response head (kind=json) or to the first committed SSE event (kind=stream).",
        &m.first_byte,
    );
    o.histogram(
        "overhead_seconds",
        "Proxied requests: duration minus the time spent receiving the request body and inside upstream attempts (includes backoff pauses).",
        &m.overhead,
    );

    let reload = &shared.reload;
    o.family(
        "config_generation",
        "gauge",
        "Generation of the configuration in force (1 at start, +1 per applied reload).",
    );
    o.sample("config_generation", &[], b.generation);
    o.family(
        "config_loaded_timestamp_seconds",
        "gauge",
        "Unix time the configuration in force was installed.",
    );
    o.sample(
        "config_loaded_timestamp_seconds",
        &[],
        unix_seconds(b.loaded_at),
    );
    o.family(
        "config_reloads_total",
        "counter",
        "Changed configuration files that were applied (ok) or refused (error).",
    );
    o.sample(
        "config_reloads_total",
        &[("result", "ok")],
        reload.applied(),
    );
    o.sample(
        "config_reloads_total",
        &[("result", "error")],
        reload.failed(),
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_from_paths() {
        assert_eq!(Route::of("/v1/chat/completions"), Route::Chat);
        assert_eq!(Route::of("/v1/models"), Route::Models);
        assert_eq!(Route::of("/v1/files/x"), Route::OtherV1);
        assert_eq!(Route::of("/v1"), Route::OtherV1);
        assert_eq!(Route::of("/v2"), Route::Unknown);
        assert_eq!(Route::of("/metrics"), Route::Metrics);
        for (i, r) in Route::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn outcomes_from_retry_outcomes() {
        assert_eq!(AttemptOutcome::of(Outcome::Status(200)), AttemptOutcome::Ok);
        assert_eq!(
            AttemptOutcome::of(Outcome::Status(404)),
            AttemptOutcome::Status4xx
        );
        assert_eq!(
            AttemptOutcome::of(Outcome::Status(429)),
            AttemptOutcome::Status429
        );
        assert_eq!(
            AttemptOutcome::of(Outcome::Status(503)),
            AttemptOutcome::Status5xx
        );
        assert_eq!(
            AttemptOutcome::of(Outcome::Connect),
            AttemptOutcome::Connect
        );
        for (i, o) in AttemptOutcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&OVERHEAD_BOUNDS);
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_secs(60));
        let c = h.cumulative();
        assert_eq!(c[0], 2, "0.0001 s is inclusive");
        assert_eq!(c[OVERHEAD_BOUNDS.len() - 1], 2);
        assert_eq!(*c.last().unwrap(), 3);
        assert_eq!(h.sum_nanos.load(Relaxed), 60_000_150_000);
    }

    #[test]
    fn latency_average_moves_towards_samples() {
        let s = HostSeries::default();
        assert!(s.latency().is_none());
        s.attempt(AttemptOutcome::Ok, Some(Duration::from_secs(1)));
        assert_eq!(s.latency(), Some((1.0, 1.0)));
        s.attempt(AttemptOutcome::Ok, Some(Duration::from_secs(2)));
        let (avg, last) = s.latency().unwrap();
        assert!((avg - 1.2).abs() < 1e-9 && last == 2.0);
        s.attempt(AttemptOutcome::Connect, None);
        assert_eq!(s.attempts(), 3);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        escape_label(&mut out, "a\"b\\c\nd");
        assert_eq!(out, "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn marks_reset_per_request() {
        begin_request();
        mark_proxied(Kind::Stream, Duration::from_millis(3));
        mark(|m| m.served = true);
        begin_request();
        let m = MARKS.with(Cell::get);
        assert!(m.proxied.is_none() && !m.served && m.body.is_zero());
    }
}
