//! Upstream hosts: who they are, whether they are healthy, and in which order
//! a request tries them. This is where a host is ejected and readmitted.
//!
//! Health: five consecutive host failures (connect errors, timeouts, 5xx,
//! broken responses) eject a host for 30 s × n (n = ejections in a row, capped
//! at 300 s, plus 0–10 % jitter). When that time is up exactly one request
//! probes it (half-open): success readmits it, failure ejects it again with
//! n + 1. Never more than half the hosts are ejected at once, and when fewer
//! than half the primaries and no backup are free of ejection, the
//! ejections are ignored (panic mode): the balancer tries the least-bad
//! hosts rather than refuse traffic. A 429 is
//! not a host failure; it cools the host, the key or the pair (host, key),
//! whichever the evidence points at.
//!
//! Selection follows `strategy` ([`selection`](crate::selection)). Failover is
//! an iterator of [`Candidate`]s: each `next()` picks among routable hosts this
//! request has not tried, primaries before backups, each with a usable key;
//! only when every host has been tried does it go round again.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::config::{HostSpec, Strategy};
use crate::cooldowns::Cooldown;
use crate::discovery::{Catalog, ModelId, Routes};
use crate::keys::{Key, KeyPool, EVIDENCE_WINDOW};
use crate::retry::{self, Outcome};
use crate::rng;
use crate::selection::{HostSignals, Selector};

/// Consecutive host failures that eject a host.
pub const EJECT_AFTER: u32 = 5;
/// Ejection time per ejection in a row.
pub const EJECT_BASE: Duration = Duration::from_secs(30);
/// Longest ejection.
pub const EJECT_MAX: Duration = Duration::from_secs(300);

/// Where a host stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// Taking traffic.
    Up,
    /// Out of rotation until the instant.
    Ejected(Instant),
    /// Ejection over; one probe request decides.
    Probing,
}

/// A host's health, behind its mutex.
#[derive(Debug, Clone)]
pub struct Health {
    /// Up, ejected or probing.
    pub state: HostState,
    /// Host failures since the last success.
    pub consecutive: u32,
    /// Ejections since the last readmission.
    pub in_a_row: u32,
    /// Ejections since start.
    pub ejections: u64,
    /// A probe request is under way.
    pub probe_in_flight: bool,
    /// Rate-limit (or 503 Retry-After) cooldown of the whole host.
    pub cooldown: Cooldown,
    /// Keys this host answered 429 recently (key index, when).
    pub limited_keys: Vec<(usize, Instant)>,
    /// Cooldowns of (this host, key index) pairs.
    pub pairs: Vec<(usize, Cooldown)>,
    /// The last failure, for `/status`.
    pub last_failure: Option<String>,
    /// The key pool `limited_keys` and `pairs` index into: the host's pool
    /// in the newest table, which a reload may have renewed (see
    /// [`Hosts::reloaded`]).
    pool: Weak<KeyPool>,
    /// The ejection count of the newest table holding the host, which its
    /// transitions in and out of `Up` update, whichever generation's request
    /// makes them.
    out: Arc<Out>,
}

/// How many hosts of one table are ejected or probing, and how many may be.
#[derive(Debug)]
struct Out {
    now: AtomicUsize,
    /// Never more than half the hosts out.
    cap: usize,
}

impl Health {
    /// From when this health lets a request through without a look under
    /// the lock (see [`HealthCell::quiet_from`]): the end of the last
    /// cooldown of the host or of one of its (host, key) pairs while it is
    /// up, [`NEVER`] while it is not.
    fn quiet_from(&self) -> u64 {
        if self.state != HostState::Up {
            return NEVER;
        }
        let pairs = self.pairs.iter().filter_map(|(_, c)| c.deadline());
        let last = pairs.chain(self.cooldown.deadline()).max();
        // An end too far off to count in nanoseconds is as good as never.
        last.map_or(0, |t| nanos(t).unwrap_or(NEVER))
    }

    /// The cooldown of this host with key `key`, new when it has none yet.
    fn pair(&mut self, key: usize) -> &mut Cooldown {
        let at = match self.pairs.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                self.pairs.push((key, Cooldown::default()));
                self.pairs.len() - 1
            }
        };
        &mut self.pairs[at].1
    }
}

/// `quiet_from` of a host that is not up.
const NEVER: u64 = u64::MAX;

/// The instant quiet summaries count from. [`Hosts::new`] sets it, before
/// any host exists, so the `now` of any request is at or after it.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Nanoseconds from [`origin`] to `at` (0 for earlier instants); `None`
/// beyond about 584 years.
fn nanos(at: Instant) -> Option<u64> {
    u64::try_from(at.saturating_duration_since(origin()).as_nanos()).ok()
}

/// A host's health, and a summary of it the request path reads without the
/// lock: with every host up and nothing cooling, choosing a host need not
/// lock each one's health (twice: panic mode, then usability) per request.
#[derive(Debug)]
struct HealthCell {
    health: Mutex<Health>,
    /// [`Health::quiet_from`] as of the last change, in nanoseconds since
    /// [`origin`]. Only [`HealthGuard`] writes it, under the lock, whenever
    /// the health was changed through it: no change can miss it.
    quiet_from: AtomicU64,
}

/// A host's health, locked. Dropping it after a change refreshes the
/// summary in its [`HealthCell`] (before the lock is released).
#[derive(Debug)]
pub struct HealthGuard<'a> {
    cell: &'a HealthCell,
    health: MutexGuard<'a, Health>,
    changed: bool,
}

impl Deref for HealthGuard<'_> {
    type Target = Health;
    fn deref(&self) -> &Health {
        &self.health
    }
}

impl DerefMut for HealthGuard<'_> {
    fn deref_mut(&mut self) -> &mut Health {
        self.changed = true;
        &mut self.health
    }
}

impl Drop for HealthGuard<'_> {
    fn drop(&mut self) {
        if self.changed {
            let quiet_from = self.health.quiet_from();
            self.cell.quiet_from.store(quiet_from, Ordering::Relaxed);
        }
    }
}

/// What an attempt says about the host's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Real output: the host works.
    Success,
    /// It answered, but not with output (4xx, 429): alive, not healthy proof of output.
    Alive,
    /// A host failure (connect, timeout, 5xx, broken).
    Failure,
    /// Nothing learned (the client left).
    Unknown,
}

/// One upstream host and its live counters.
#[derive(Debug)]
pub struct Host {
    /// Index in the host table.
    pub index: usize,
    /// The configured host.
    pub spec: HostSpec,
    /// Keys this host may be sent (its own, or the global pool).
    pub keys: Arc<KeyPool>,
    /// The `Host` header of its requests (see [`crate::upstream::host_header`]).
    pub host_header: Option<ureq::http::HeaderValue>,
    /// Requests currently being sent to or read from this host (shared with
    /// the same host in older generations, see [`Hosts::reloaded`]).
    pub in_flight: Arc<AtomicUsize>,
    /// Attempts that ended in a host failure (shared like `in_flight`).
    pub failures: Arc<AtomicU64>,
    /// Attempts that produced output (shared like `in_flight`).
    pub successes: Arc<AtomicU64>,
    /// Models it serves, as model discovery learned them.
    pub catalog: Catalog,
    /// Latency estimate and slow start, read by the strategies.
    pub signals: Arc<HostSignals>,
    /// Shared with the same host in older generations, so that what their
    /// requests still in flight learn reaches this one.
    health: Arc<HealthCell>,
}

impl Host {
    /// Count this host busy until the guard drops.
    pub fn busy(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone(), Instant::now())
    }

    /// The URL for a request path such as `/v1/chat/completions?x=1`.
    pub fn url(&self, path: &str) -> String {
        let mut url = String::with_capacity(self.spec.base_url.len() + path.len());
        url.push_str(&self.spec.base_url);
        url.push_str(path);
        url
    }

    /// The host's health, locked.
    pub fn health(&self) -> HealthGuard<'_> {
        let cell = &*self.health;
        HealthGuard {
            cell,
            // Every state is valid, so a panic elsewhere leaves nothing to repair.
            health: cell.health.lock().unwrap_or_else(|e| e.into_inner()),
            changed: false,
        }
    }

    /// True when the host is up and neither it nor any of its (host, key)
    /// pairs is cooling at `now_ns` (nanoseconds since [`origin`]), read
    /// without the lock. False tells nothing: look under the lock.
    fn quiet(&self, now_ns: u64) -> bool {
        self.health.quiet_from.load(Ordering::Relaxed) <= now_ns
    }

    /// True when the host was up at its last change, read without the
    /// lock. False tells nothing: look under the lock.
    fn surely_up(&self) -> bool {
        self.health.quiet_from.load(Ordering::Relaxed) != NEVER
    }

    /// True when some key of the host's pool is usable with it now.
    fn free_key(&self, h: &Health, now: Instant) -> bool {
        self.keys
            .keys()
            .iter()
            .any(|k| k.usable(now) && !self.pair_cooling(h, k.index, now))
    }

    /// True when the (host, key) pair is cooling.
    fn pair_cooling(&self, h: &Health, key: usize, now: Instant) -> bool {
        self.pairs(h)
            .iter()
            .any(|(k, c)| *k == key && c.active(now))
    }

    /// True when the key evidence in `h` (`limited_keys`, `pairs`) is about
    /// this host object's keys. False for the host of an older generation
    /// whose pool a reload renewed: its key indexes name other keys now.
    fn owns_key_evidence(&self, h: &Health) -> bool {
        std::ptr::eq(h.pool.as_ptr(), Arc::as_ptr(&self.keys))
    }

    /// The pair cooldowns in `h` that are about this host object's keys.
    fn pairs<'a>(&self, h: &'a Health) -> &'a [(usize, Cooldown)] {
        if self.owns_key_evidence(h) {
            &h.pairs
        } else {
            &[]
        }
    }
}

/// Decrements a host's in-flight count when dropped; knows when it began.
#[derive(Debug)]
pub struct InFlight(Arc<Host>, Instant);

impl InFlight {
    /// The upstream's response head arrived: feed the latency estimate.
    pub fn first_byte(&self) {
        self.0.observe_first_byte(self.1.elapsed());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The host table and the shared round-robin state.
#[derive(Debug)]
pub struct Hosts {
    hosts: Vec<Arc<Host>>,
    /// The strategy and its state.
    selector: Selector,
    /// Hosts ejected or probing now, shared with their health.
    ejected: Arc<Out>,
    /// Which hosts may serve the models asked for lately.
    routes: Routes,
}

/// How long a (host, key) pair stays out after the host alone rejected the key.
pub const REJECTED_PAIR_COOLDOWN: Duration = crate::cooldowns::MAX_COOLDOWN;

/// Which cooldown a 429 (or a 401/403) ended up setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The key, on every host.
    Key,
    /// The host, for every key.
    Host,
    /// Only this key on this host.
    Pair,
}

impl Hosts {
    /// Build the table; hosts without their own keys share `global`.
    pub fn new(specs: &[HostSpec], global: &Arc<KeyPool>, strategy: Strategy) -> Self {
        origin(); // before any health exists (see `origin`)
        let ejected = Arc::new(Out {
            now: AtomicUsize::new(0),
            cap: specs.len() / 2,
        });
        let hosts: Vec<Arc<Host>> = specs
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                let keys = match &spec.api_keys {
                    Some(own) => Arc::new(KeyPool::new(own)),
                    None => global.clone(),
                };
                let pool = Arc::downgrade(&keys);
                Arc::new(Host {
                    index,
                    spec: spec.clone(),
                    keys,
                    host_header: crate::upstream::host_header(&spec.base_url),
                    in_flight: Arc::new(AtomicUsize::new(0)),
                    failures: Arc::new(AtomicU64::new(0)),
                    successes: Arc::new(AtomicU64::new(0)),
                    catalog: Catalog::default(),
                    signals: Arc::new(HostSignals::new()),
                    health: Arc::new(HealthCell {
                        health: Mutex::new(Health {
                            state: HostState::Up,
                            consecutive: 0,
                            in_a_row: 0,
                            ejections: 0,
                            probe_in_flight: false,
                            cooldown: Cooldown::default(),
                            limited_keys: Vec::new(),
                            pairs: Vec::new(),
                            last_failure: None,
                            pool,
                            out: ejected.clone(),
                        }),
                        // Up, nothing cooling: quiet from the start.
                        quiet_from: AtomicU64::new(0),
                    }),
                })
            })
            .collect();
        let selector = Selector::new(strategy, hosts.len());
        Hosts {
            hosts,
            selector,
            ejected,
            routes: Routes::default(),
        }
    }

    /// Every host, in configuration order.
    pub fn all(&self) -> &[Arc<Host>] {
        &self.hosts
    }

    /// Hosts ejected (or probing) now.
    pub fn ejected(&self) -> usize {
        self.ejected.now.load(Ordering::Relaxed)
    }

    /// True when at least one host could take a request now.
    pub fn any_routable(&self) -> bool {
        let now = Instant::now();
        let panic = self.panic_mode(now);
        // A host whose every key is disabled or cooling cannot take one either.
        self.hosts.iter().any(|h| {
            let health = h.health();
            (panic || !matches!(health.state, HostState::Ejected(until) if until > now))
                && !health.cooldown.active(now)
                && (h.keys.is_empty() || h.free_key(&health, now))
        })
    }

    /// The failover order for one request.
    pub fn candidates(&self) -> Candidates<'_> {
        Candidates {
            hosts: self,
            seen: vec![Seen::default(); self.hosts.len()],
            retry_at: None,
            model: None,
        }
    }

    /// Record what an attempt on `host` showed; `probe` when it was the probe.
    pub fn record(&self, host: &Host, verdict: Verdict, probe: bool, detail: Option<&str>) {
        let now = Instant::now();
        let mut h = host.health();
        if probe {
            h.probe_in_flight = false;
        }
        match verdict {
            Verdict::Unknown => {}
            Verdict::Success | Verdict::Alive => {
                if verdict == Verdict::Success {
                    host.successes.fetch_add(1, Ordering::Relaxed);
                    // Only 429s in a row, not scattered ones, add up.
                    h.cooldown.reset();
                    h.limited_keys.clear();
                }
                h.consecutive = 0;
                if h.state != HostState::Up {
                    h.state = HostState::Up;
                    h.in_a_row = 0;
                    h.out.now.fetch_sub(1, Ordering::Relaxed);
                    host.signals.slow_start.begin(now);
                    log::info!("host {} readmitted", host.spec.name);
                }
            }
            Verdict::Failure => {
                host.failures.fetch_add(1, Ordering::Relaxed);
                host.signals.ttfb.penalize(now);
                h.consecutive = h.consecutive.saturating_add(1);
                h.last_failure = detail.map(str::to_string);
                match h.state {
                    HostState::Probing => self.eject(host, &mut h, now, false),
                    HostState::Up if h.consecutive >= EJECT_AFTER => {
                        self.eject(host, &mut h, now, true)
                    }
                    _ => {}
                }
            }
        }
    }

    /// Eject `host`; `new` when it was up (and so counts against the cap of
    /// the newest table holding it, which may not be `self`).
    fn eject(&self, host: &Host, h: &mut Health, now: Instant, new: bool) {
        if new {
            let cap = h.out.cap;
            let admitted = h
                .out
                .now
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| {
                    (e < cap).then_some(e + 1)
                })
                .is_ok();
            if !admitted {
                return; // never more than half the hosts out
            }
        }
        h.in_a_row = h.in_a_row.saturating_add(1);
        h.ejections += 1;
        let base = EJECT_BASE.saturating_mul(h.in_a_row).min(EJECT_MAX);
        let jitter = Duration::from_millis(rng::below(base.as_millis() as u64 / 10 + 1));
        let length = base + jitter;
        h.state = HostState::Ejected(now + length);
        log::warn!(
            "host {} ejected for {}s after {} consecutive failures",
            host.spec.name,
            length.as_secs(),
            h.consecutive
        );
    }

    /// Cool down after a 429 from `host` with `key`, scoped by the evidence.
    pub fn rate_limited(&self, host: &Host, key: Option<&Key>, hint: Option<Duration>) -> Scope {
        let now = Instant::now();
        let Some(key) = key else {
            host.health().cooldown.hit(now, hint);
            return Scope::Host;
        };
        if key.limited_by(&host.spec.base_url, now) >= 2 {
            key.state().cooldown.hit(now, hint);
            return Scope::Key;
        }
        let mut h = host.health();
        if !host.owns_key_evidence(&h) {
            // A request of an older generation, with a key of a pool the
            // reload replaced: that key is out of this host's rotation
            // already, and its index names another key now.
            return Scope::Pair;
        }
        h.limited_keys
            .retain(|(k, at)| *k != key.index && now.duration_since(*at) < EVIDENCE_WINDOW);
        h.limited_keys.push((key.index, now));
        if h.limited_keys.len() >= 2 {
            h.cooldown.hit(now, hint);
            return Scope::Host;
        }
        h.pair(key.index).hit(now, hint);
        Scope::Pair
    }

    /// A 401/403 from `host` with `key`: the key leaves rotation everywhere
    /// when a second host rejects it too, or when no other host uses its
    /// pool; until then only the pair cools (for [`REJECTED_PAIR_COOLDOWN`]),
    /// so one misconfigured host cannot take every shared key out.
    pub fn rejected(&self, host: &Host, key: &Key) -> Scope {
        let sharing = self
            .hosts
            .iter()
            .filter(|h| Arc::ptr_eq(&h.keys, &host.keys))
            .count();
        if sharing < 2 || key.rejected_by(&host.spec.base_url) >= 2 {
            key.disable();
            return Scope::Key;
        }
        let now = Instant::now();
        let mut h = host.health();
        // Not for a key of a pool a reload replaced (see rate_limited).
        if host.owns_key_evidence(&h) {
            h.pair(key.index).extend(now, REJECTED_PAIR_COOLDOWN);
        }
        Scope::Pair
    }

    /// `key` just worked on `host`: forget the rate-limit history of the
    /// key and of the pair, so only 429s in a row, not scattered ones, make
    /// their cooldowns grow.
    pub fn succeeded(&self, host: &Host, key: &Key) {
        key.succeeded();
        let mut h = host.health();
        if !host.owns_key_evidence(&h) {
            return; // a key of a pool a reload replaced (see rate_limited)
        }
        if let Some((_, c)) = h.pairs.iter_mut().find(|(k, _)| *k == key.index) {
            c.reset();
        }
    }

    /// Cool a host down for `length` (a 503 with `Retry-After`).
    pub fn cool_host(&self, host: &Host, length: Duration) {
        host.health().cooldown.extend(Instant::now(), length);
    }

    /// Panic mode: fewer than half the primaries are free of ejection, and
    /// no backup is. A backup free of ejection is what serves when the
    /// primaries cannot, so it keeps ejections in force: otherwise every
    /// request would fail on the ejected primaries before reaching it.
    pub fn panic_mode(&self, now: Instant) -> bool {
        let (mut total, mut routable, mut backups) = (0, 0, 0);
        for h in &self.hosts {
            // Up is free of ejection: no need to lock the health to see that.
            let free = h.surely_up()
                || !matches!(h.health().state, HostState::Ejected(until) if until > now);
            if h.spec.backup {
                backups += usize::from(free);
            } else {
                total += 1;
                routable += usize::from(free);
            }
        }
        routable * 2 < total && backups == 0
    }

    /// The configured strategy's pick among the hosts `eligible` accepts
    /// (by index and host).
    fn pick(&self, eligible: &impl Fn(usize, &Host) -> bool, now: Instant) -> Option<Arc<Host>> {
        let best = self.selector.pick_where(&self.hosts, eligible, now)?;
        self.hosts.get(best).cloned()
    }
}

// Hot reload hook (see crate::reload); kept apart from the selection logic above.
impl Hosts {
    /// The table for a reloaded `specs`, where each host whose name and URL
    /// are unchanged from `old` keeps what was learned about it: its health
    /// (ejection, probe, cooldowns, failure counts), counters, in-flight
    /// count and latency signals are the old host's own, shared, so that
    /// requests still running on the old generation are counted, released,
    /// and heard: a failure they meet after the swap counts toward ejection
    /// here. Its own key pool is kept while its `apiKeys` are unchanged and
    /// `fresh_own_keys` (hosts.json, their key file, was rewritten) is false;
    /// evidence about keys (pair cooldowns, 429s per key) is dropped when its
    /// pool is new, and what the old generation's requests report about the
    /// old pool's keys is ignored from then on.
    ///
    /// The host objects are new even for unchanged hosts, because a host's
    /// index is its position in the table. The shared health moves to this
    /// table's ejection count: the table built last is the one that counts
    /// it, as the one put in force.
    pub fn reloaded(
        specs: &[HostSpec],
        global: &Arc<KeyPool>,
        old: &Hosts,
        strategy: Strategy,
        fresh_own_keys: bool,
    ) -> Hosts {
        let mut table = Hosts::new(specs, global, strategy);
        let out = table.ejected.clone();
        let mut added = Vec::new();
        for slot in &mut table.hosts {
            let Some(prev) = old
                .hosts
                .iter()
                .find(|p| p.spec.name == slot.spec.name && p.spec.base_url == slot.spec.base_url)
            else {
                added.push(slot.index);
                continue;
            };
            // Just built, so never shared yet.
            let Some(host) = Arc::get_mut(slot) else {
                continue;
            };
            if !fresh_own_keys
                && host.spec.api_keys.is_some()
                && host.spec.api_keys == prev.spec.api_keys
            {
                host.keys = prev.keys.clone();
            }
            host.in_flight = prev.in_flight.clone();
            // Latency estimate and slow start belong to the host, not the generation.
            host.signals = prev.signals.clone();
            host.failures = prev.failures.clone();
            host.successes = prev.successes.clone();
            host.health = prev.health.clone();
            let mut h = host.health();
            if !host.owns_key_evidence(&h) {
                h.limited_keys.clear();
                h.pairs.clear();
                h.pool = Arc::downgrade(&host.keys);
            }
            // Counted here and moved here under the host's lock: a transition
            // made afterwards, by a request of either generation, updates
            // this count, never one that missed it.
            if h.state != HostState::Up {
                out.now.fetch_add(1, Ordering::Relaxed);
            }
            h.out = out.clone();
        }
        // A host new to the table ramps up instead of taking its full share at once.
        for index in added {
            table.mark_new(index);
        }
        table
    }
}

/// One place to send an attempt.
#[derive(Debug)]
pub struct Candidate {
    /// The host.
    pub host: Arc<Host>,
    /// The key to send, if the host's pool has any.
    pub key: Option<Arc<Key>>,
    /// This attempt is the host's half-open probe.
    pub probe: bool,
    /// The request already tried this host.
    pub repeat: bool,
}

/// What one request has learned of a host so far, and what its last
/// [`Candidates::scan`] found there (kept here, so that a scan allocates
/// nothing).
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    /// An attempt of the request (its hedge's included) went there.
    tried: bool,
    /// Its last answer there was a host failure (a 429 or 401 is none).
    failed: bool,
    /// Its answer there stands (a 404): never again.
    settled: bool,
    /// The last scan: the host may take the request now.
    usable: bool,
}

/// Panic mode (see [`Hosts::panic_mode`]) at one instant, worked out only
/// when asked: a scan that finds every host up knows it is off, and spares
/// the pass over every host's health that would tell it so.
struct Panic<'a> {
    hosts: &'a Hosts,
    now: Instant,
    known: Option<bool>,
}

impl<'a> Panic<'a> {
    fn at(hosts: &'a Hosts, now: Instant) -> Self {
        Panic {
            hosts,
            now,
            known: None,
        }
    }

    fn get(&mut self) -> bool {
        *self
            .known
            .get_or_insert_with(|| self.hosts.panic_mode(self.now))
    }
}

/// Hosts in the order one request should try them.
pub struct Candidates<'a> {
    hosts: &'a Hosts,
    /// Per host, by index.
    seen: Vec<Seen>,
    retry_at: Option<Instant>,
    model: Option<ModelId>,
}

impl Candidates<'_> {
    /// Keep to the hosts that may serve `model` (see [`crate::discovery`]).
    pub fn for_model(mut self, model: Option<Arc<str>>) -> Self {
        // Hashed once here, not once per host at every scan.
        self.model = model.map(ModelId::new);
        self
    }

    /// An attempt on `index` (the request's own, or its hedge's) ended
    /// with `outcome`: the host counts as tried, and as failed for the
    /// pause before going back to it when the outcome blames the host.
    pub fn learn(&mut self, index: usize, outcome: Outcome) {
        if let Some(s) = self.seen.get_mut(index) {
            s.tried = true;
            s.failed = retry::decide(outcome).host_failure;
        }
    }

    /// The request's last answer from `index` was a host failure: going
    /// back to it waits a backoff (a new key after a 429 needs none).
    pub fn failed_before(&self, index: usize) -> bool {
        self.seen.get(index).is_some_and(|s| s.failed)
    }

    /// `index` gave an answer that asking it again cannot change (a 404:
    /// the path or model is the same with any key, after any pause), so this
    /// request never goes round to it again.
    pub fn settle(&mut self, index: usize) {
        if let Some(s) = self.seen.get_mut(index) {
            s.settled = true;
        }
    }

    /// After `next()` gave `None`: the earliest moment a cooling host or key
    /// frees up, if any will.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Can `host` take an attempt now? Notes when a cooling one frees up.
    fn usable(&mut self, host: &Host, now: Instant, panic: bool) -> Option<bool> {
        let h = host.health();
        let probe = match h.state {
            HostState::Up => false,
            HostState::Ejected(until) if until > now && !panic => return None,
            HostState::Probing if h.probe_in_flight && !panic => return None,
            _ => !panic,
        };
        if let Some(until) = h.cooldown.until(now) {
            self.note(until);
            return None;
        }
        if !host.keys.is_empty() && !host.free_key(&h, now) {
            // A key is free here once both its own cooldown and its pair's
            // end: the later of the two, for the key that frees first.
            let free_at = host
                .keys
                .keys()
                .iter()
                .filter_map(|k| {
                    let own = k.usable_from(now)?;
                    let pair = host
                        .pairs(&h)
                        .iter()
                        .filter(|(i, _)| *i == k.index)
                        .filter_map(|(_, c)| c.until(now))
                        .max();
                    Some(pair.map_or(own, |p| p.max(own)))
                })
                .min();
            if let Some(t) = free_at {
                self.note(t);
            }
            return None;
        }
        Some(probe)
    }

    /// Mark in `seen` which hosts this request may take now, and say
    /// whether any may; notes in `retry_at` when a cooling one frees up.
    ///
    /// Runs for every attempt, over every host, so the common case is kept
    /// cheap: the model's admissions come from a route remembered by the
    /// table (see [`Routes`]), and a host that is up with nothing cooling
    /// needs no health lock (see [`Host::quiet`]).
    fn scan(&mut self, now: Instant, panic: &mut Panic<'_>) -> bool {
        self.retry_at = None;
        let hosts = self.hosts;
        let admitted = self
            .model
            .as_ref()
            .map(|m| hosts.routes.admitted(&hosts.hosts, m, now));
        // Too far in the future to count: then only never-cooled hosts are quiet.
        let now_ns = nanos(now).unwrap_or(0);
        // The last key pool looked at, and whether it has a usable key:
        // hosts mostly share the global pool, so it is looked at once.
        let mut pool_free: Option<(&Arc<KeyPool>, bool)> = None;
        let mut any = false;
        let mut all_up = true;
        for host in &hosts.hosts {
            all_up &= host.surely_up();
            let Some(seen) = self.seen.get(host.index).copied() else {
                continue;
            };
            let usable = !seen.settled
                && admitted
                    .as_ref()
                    .is_none_or(|a| a.get(host.index).copied().unwrap_or(false))
                && ((host.quiet(now_ns)
                    // Up with no cooldown running, not even a pair's: what
                    // `usable` checks comes down to a usable key in its pool.
                    && (host.keys.is_empty()
                        || match pool_free {
                            Some((pool, free)) if Arc::ptr_eq(pool, &host.keys) => free,
                            _ => {
                                let free = host.keys.keys().iter().any(|k| k.usable(now));
                                pool_free = Some((&host.keys, free));
                                free
                            }
                        }))
                    // Otherwise the look under the lock, which also notes
                    // when a cooling key frees up (for `retry_at`).
                    || self.usable(host, now, panic.get()).is_some());
            if let Some(s) = self.seen.get_mut(host.index) {
                s.usable = usable;
            }
            any |= usable;
        }
        if all_up {
            // No host is ejected: no panic.
            panic.known.get_or_insert(false);
        }
        any
    }

    /// When this request could be served next, without taking a host (no
    /// probe is claimed, no key cursor moves): now if a host it may use is
    /// free, else when the first cooling host or key frees up; `None` when
    /// nothing is known to free up. For the `Retry-After` of a request
    /// that ran out of attempts.
    pub fn free_at(&mut self) -> Option<Instant> {
        let now = Instant::now();
        if self.scan(now, &mut Panic::at(self.hosts, now)) {
            Some(now)
        } else {
            self.retry_at
        }
    }

    fn note(&mut self, at: Instant) {
        self.retry_at = Some(self.retry_at.map_or(at, |r| r.min(at)));
    }

    /// Take `host` for this attempt, with a key. `None` when it cannot be
    /// had after all: no usable key, or since [`Self::usable`] looked another
    /// request took its probe (or ejected it), decided under the same lock
    /// that sets the probe flag, so only one request ever probes a host.
    fn take(
        &mut self,
        host: Arc<Host>,
        now: Instant,
        repeat: bool,
        panic: bool,
    ) -> Option<Candidate> {
        let key = if host.keys.is_empty() {
            None
        } else {
            let h = host.health();
            let k = host
                .keys
                .next(now, |k| !host.pair_cooling(&h, k.index, now));
            drop(h);
            Some(k?)
        };
        let mut h = host.health();
        let probe = match h.state {
            HostState::Up => false,
            HostState::Ejected(until) if until <= now => {
                h.state = HostState::Probing;
                true
            }
            HostState::Probing if !h.probe_in_flight => true,
            // Ejected, or its probe is under way: only panic mode sends more.
            HostState::Ejected(_) | HostState::Probing if panic => false,
            HostState::Ejected(_) | HostState::Probing => return None,
        };
        if probe {
            h.probe_in_flight = true;
        }
        drop(h);
        if let Some(s) = self.seen.get_mut(host.index) {
            s.tried = true;
        }
        Some(Candidate {
            host,
            key,
            probe,
            repeat,
        })
    }
}

impl Iterator for Candidates<'_> {
    type Item = Candidate;

    fn next(&mut self) -> Option<Candidate> {
        let now = Instant::now();
        let hosts = self.hosts;
        let mut panic = Panic::at(hosts, now);
        self.scan(now, &mut panic);
        // Untried primaries, untried backups, then round again in the same order.
        for (backup, repeat) in [(false, false), (true, false), (false, true), (true, true)] {
            loop {
                let seen = &self.seen;
                let eligible = |i: usize, h: &Host| {
                    h.spec.backup == backup
                        && seen.get(i).is_some_and(|s| s.usable && s.tried == repeat)
                };
                let Some(host) = hosts.pick(&eligible, now) else {
                    break;
                };
                let index = host.index;
                if let Some(c) = self.take(host, now, repeat, panic.get()) {
                    return Some(c);
                }
                // Lost to another request since the scan looked: pick again.
                if let Some(s) = self.seen.get_mut(index) {
                    s.usable = false;
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery;
    use std::collections::BTreeMap;

    fn spec(name: &str, weight: u32, backup: bool) -> HostSpec {
        HostSpec {
            name: name.into(),
            base_url: format!("http://{name}"),
            weight,
            backup,
            api_keys: None,
            models: BTreeMap::new(),
        }
    }

    fn table(specs: &[HostSpec], keys: &[&str]) -> Hosts {
        let pool = Arc::new(KeyPool::new(
            &keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        ));
        Hosts::new(specs, &pool, Strategy::RoundRobin)
    }

    fn names(hosts: &Hosts, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| hosts.candidates().next().unwrap().host.spec.name.clone())
            .collect()
    }

    fn fail(hosts: &Hosts, i: usize, times: u32) {
        for _ in 0..times {
            hosts.record(&hosts.all()[i], Verdict::Failure, false, Some("boom"));
        }
    }

    #[test]
    fn smooth_weighted_round_robin_spreads_picks() {
        let hosts = table(
            &[
                spec("a", 5, false),
                spec("b", 1, false),
                spec("c", 1, false),
            ],
            &[],
        );
        // nginx's documented sequence for weights 5,1,1.
        assert_eq!(names(&hosts, 7), ["a", "a", "b", "a", "c", "a", "a"]);
    }

    #[test]
    fn candidates_try_every_primary_before_backups_then_wrap() {
        let hosts = table(
            &[spec("a", 1, false), spec("z", 1, true), spec("b", 1, false)],
            &[],
        );
        let order: Vec<(String, bool)> = hosts
            .candidates()
            .take(4)
            .map(|c| (c.host.spec.name.clone(), c.repeat))
            .collect();
        let mut first_two: Vec<&str> = order[..2].iter().map(|(n, _)| n.as_str()).collect();
        first_two.sort();
        assert_eq!(first_two, ["a", "b"]);
        assert_eq!(order[2], ("z".to_string(), false));
        assert!(
            order[3].1 && order[3].0 != "z",
            "after a full round, primaries come first again"
        );
    }

    #[test]
    fn five_consecutive_failures_eject_and_a_success_resets() {
        let hosts = table(
            &[
                spec("a", 1, false),
                spec("b", 1, false),
                spec("c", 1, false),
            ],
            &[],
        );
        fail(&hosts, 0, 4);
        hosts.record(&hosts.all()[0], Verdict::Success, false, None);
        fail(&hosts, 0, 4);
        assert_eq!(hosts.all()[0].health().state, HostState::Up);
        fail(&hosts, 0, 1);
        assert!(matches!(
            hosts.all()[0].health().state,
            HostState::Ejected(_)
        ));
        assert_eq!(hosts.ejected(), 1);
        for _ in 0..20 {
            assert_ne!(hosts.candidates().next().unwrap().host.spec.name, "a");
        }
    }

    #[test]
    fn ejection_length_grows_with_jitter_and_caps() {
        let hosts = table(&[spec("a", 1, false), spec("b", 1, false)], &[]);
        let a = &hosts.all()[0];
        let mut lengths = Vec::new();
        for n in 1..=12u32 {
            let before = Instant::now();
            if n == 1 {
                fail(&hosts, 0, EJECT_AFTER);
            } else {
                // Expire the ejection, take the probe, fail it.
                a.health().state = HostState::Ejected(Instant::now());
                let c = hosts.candidates().find(|c| c.host.index == 0).unwrap();
                assert!(c.probe);
                hosts.record(a, Verdict::Failure, true, None);
            }
            let HostState::Ejected(until) = a.health().state else {
                panic!("not ejected after round {n}");
            };
            lengths.push(until.duration_since(before));
        }
        for (i, l) in lengths.iter().enumerate() {
            let base = EJECT_BASE.saturating_mul(i as u32 + 1).min(EJECT_MAX);
            assert!(
                *l >= base && *l <= base + base / 10 + Duration::from_millis(50),
                "{i}: {l:?}"
            );
        }
    }

    #[test]
    fn one_probe_after_ejection_then_readmission() {
        let hosts = table(&[spec("a", 1, false), spec("b", 1, false)], &[]);
        fail(&hosts, 0, EJECT_AFTER);
        let a = hosts.all()[0].clone();
        a.health().state = HostState::Ejected(Instant::now());
        let probe = hosts.candidates().find(|c| c.host.index == 0).unwrap();
        assert!(probe.probe);
        // While the probe is out, nobody else gets the host.
        for _ in 0..10 {
            assert_eq!(hosts.candidates().next().unwrap().host.spec.name, "b");
        }
        hosts.record(&a, Verdict::Success, true, None);
        assert_eq!(a.health().state, HostState::Up);
        assert_eq!(hosts.ejected(), 0);
        // Readmitted in slow start: a tenth of its weight at first.
        assert!(a.signals.slow_start.began().is_some());
        let picks = names(&hosts, 40);
        let a_picks = picks.iter().filter(|n| *n == "a").count();
        assert!((1..=6).contains(&a_picks), "{picks:?}");
    }

    #[test]
    fn concurrent_requests_never_send_a_second_attempt_to_a_probing_host() {
        use std::sync::Barrier;
        // Four hosts, one ejected: not panic mode, so only its probe may go there.
        let hosts = Arc::new(table(
            &[
                spec("a", 1, false),
                spec("b", 1, false),
                spec("c", 1, false),
                spec("d", 1, false),
            ],
            &[],
        ));
        fail(&hosts, 0, EJECT_AFTER);
        let threads = 8;
        let rounds = 300;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (hosts, barrier) = (hosts.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut on_a = Vec::new();
                    for _ in 0..rounds {
                        // One thread ends the ejection; then all race for a.
                        if barrier.wait().is_leader() {
                            let a = &hosts.all()[0];
                            let mut h = a.health();
                            h.state = HostState::Ejected(Instant::now());
                            h.probe_in_flight = false;
                        }
                        barrier.wait();
                        let got = hosts.candidates().take(4).find(|c| c.host.index == 0);
                        on_a.push(got.map(|c| c.probe));
                        barrier.wait();
                    }
                    on_a
                })
            })
            .collect();
        let per_thread: Vec<Vec<Option<bool>>> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        for round in 0..rounds {
            let got: Vec<bool> = per_thread.iter().filter_map(|t| t[round]).collect();
            assert_eq!(got, [true], "round {round}: attempts on the probing host");
        }
    }

    #[test]
    fn never_more_than_half_ejected_and_panic_mode_routes_anyway() {
        let hosts = table(
            &[
                spec("a", 1, false),
                spec("b", 1, false),
                spec("c", 1, false),
                spec("d", 1, false),
            ],
            &[],
        );
        for i in 0..4 {
            fail(&hosts, i, EJECT_AFTER);
        }
        assert_eq!(hosts.ejected(), 2, "at most half");
        let single = table(&[spec("only", 1, false)], &[]);
        fail(&single, 0, 50);
        assert_eq!(single.all()[0].health().state, HostState::Up);
        assert!(single.candidates().next().is_some());
        // Force every host out (as a reload could leave it): panic mode still routes.
        let all_out = table(&[spec("a", 1, false), spec("b", 1, false)], &[]);
        for h in all_out.all() {
            h.health().state = HostState::Ejected(Instant::now() + Duration::from_secs(60));
        }
        assert!(all_out.candidates().next().is_some());
        assert!(all_out.any_routable());
    }

    #[test]
    fn a_key_leaves_rotation_once_two_hosts_reject_it() {
        let hosts = table(
            &[spec("a", 1, false), spec("b", 1, false)],
            &["k0-xxxxxxxxxx", "k1-xxxxxxxxxx"],
        );
        let (a, b) = (hosts.all()[0].clone(), hosts.all()[1].clone());
        let k0 = a.keys.keys()[0].clone();
        assert_eq!(hosts.rejected(&a, &k0), Scope::Pair);
        assert!(k0.usable(Instant::now()), "b may still take it");
        // a gets only k1 now; b still gets k0 in turn.
        for _ in 0..4 {
            let c = hosts.candidates().find(|c| c.host.index == 0).unwrap();
            assert_eq!(c.key.unwrap().index, 1);
        }
        assert_eq!(hosts.rejected(&a, &k0), Scope::Pair, "the same host again");
        assert_eq!(hosts.rejected(&b, &k0), Scope::Key);
        assert!(!k0.usable(Instant::now()));
        // No second host to ask: out at once.
        let single = table(&[spec("only", 1, false)], &["k0-xxxxxxxxxx"]);
        let only = single.all()[0].clone();
        assert_eq!(single.rejected(&only, &only.keys.keys()[0]), Scope::Key);
    }

    #[test]
    fn no_usable_key_means_not_routable() {
        let hosts = table(
            &[spec("a", 1, false), spec("b", 1, false)],
            &["k0-xxxxxxxxxx"],
        );
        assert!(hosts.any_routable());
        let key = hosts.all()[0].keys.keys()[0].clone();
        // Cooling for one pair leaves the other host.
        hosts.rate_limited(&hosts.all()[0], Some(&key), None);
        assert!(hosts.any_routable());
        key.disable();
        assert!(!hosts.any_routable());
        assert!(hosts.candidates().next().is_none());
    }

    #[test]
    fn rate_limit_scope_follows_the_evidence() {
        let hosts = table(
            &[spec("a", 1, false), spec("b", 1, false)],
            &["k0-xxxxxxxxxx", "k1-xxxxxxxxxx"],
        );
        let (a, b) = (hosts.all()[0].clone(), hosts.all()[1].clone());
        let k0 = a.keys.keys()[0].clone();
        let k1 = a.keys.keys()[1].clone();
        // One 429: only the pair cools; a still serves with k1.
        assert_eq!(hosts.rate_limited(&a, Some(&k0), None), Scope::Pair);
        for _ in 0..6 {
            let c = hosts.candidates().find(|c| c.host.index == 0).unwrap();
            assert_eq!(c.key.unwrap().index, 1);
        }
        // The same key refused on a second host: the key cools everywhere.
        assert_eq!(hosts.rate_limited(&b, Some(&k0), None), Scope::Key);
        assert!(!k0.usable(Instant::now()));
        // One host refusing a second key: the host cools.
        assert_eq!(hosts.rate_limited(&a, Some(&k1), None), Scope::Host);
        for _ in 0..6 {
            assert_eq!(hosts.candidates().next().unwrap().host.spec.name, "b");
        }
    }

    #[test]
    fn everything_cooling_reports_when_to_retry() {
        let hosts = table(&[spec("a", 1, false)], &["k0-xxxxxxxxxx"]);
        let a = hosts.all()[0].clone();
        let k0 = a.keys.keys()[0].clone();
        hosts.rate_limited(&a, Some(&k0), Some(Duration::from_secs(7)));
        let mut c = hosts.candidates();
        assert!(c.next().is_none());
        let at = c.retry_at().unwrap();
        let left = at.duration_since(Instant::now());
        assert!(
            left > Duration::from_secs(6) && left <= Duration::from_secs(7),
            "{left:?}"
        );
    }

    #[test]
    fn the_wait_is_for_the_key_that_frees_first_on_each_host() {
        let hosts = table(
            &[spec("a", 1, false), spec("b", 1, false)],
            &["k0-xxxxxxxxxx", "k1-xxxxxxxxxx"],
        );
        let (a, b) = (hosts.all()[0].clone(), hosts.all()[1].clone());
        let (k0, k1) = (a.keys.keys()[0].clone(), a.keys.keys()[1].clone());
        // a: k0 kept off it for 300 s; k1 cooling everywhere for 2 s; b cooling 100 s.
        assert_eq!(hosts.rejected(&a, &k0), Scope::Pair);
        k1.state()
            .cooldown
            .hit(Instant::now(), Some(Duration::from_secs(2)));
        hosts.cool_host(&b, Duration::from_secs(100));
        let mut c = hosts.candidates();
        assert!(c.next().is_none());
        let left = c.retry_at().unwrap().duration_since(Instant::now());
        // k1 on a, in 2 s: not k0's pair on a (300 s), nor b (100 s).
        assert!(left <= Duration::from_secs(2), "{left:?}");
    }

    /// Hosts up with nothing of theirs cooling (so quiet), whose only key
    /// cools everywhere: the wait is the key's, not "nothing will free up".
    #[test]
    fn quiet_hosts_whose_keys_all_cool_report_when_to_retry() {
        let hosts = table(
            &[spec("a", 1, false), spec("b", 1, false)],
            &["k0-xxxxxxxxxx"],
        );
        let k0 = hosts.all()[0].keys.keys()[0].clone();
        k0.state()
            .cooldown
            .hit(Instant::now(), Some(Duration::from_secs(5)));
        let mut c = hosts.candidates();
        assert!(c.next().is_none());
        let left = c.retry_at().map(|t| t.duration_since(Instant::now()));
        assert!(
            left.is_some_and(|l| l > Duration::from_secs(4) && l <= Duration::from_secs(5)),
            "{left:?}"
        );
        let left = c.free_at().map(|t| t.duration_since(Instant::now()));
        assert!(
            left.is_some_and(|l| l > Duration::from_secs(4) && l <= Duration::from_secs(5)),
            "{left:?}"
        );
    }

    /// `old` reloaded as `specs`, with `old`'s global pool or a new one.
    fn reload(old: &Hosts, specs: &[HostSpec], new_pool: bool) -> Hosts {
        let pool = if new_pool {
            Arc::new(KeyPool::new(&[
                "k0-xxxxxxxxxx".into(),
                "k1-xxxxxxxxxx".into(),
            ]))
        } else {
            old.all()[0].keys.clone()
        };
        Hosts::reloaded(specs, &pool, old, Strategy::RoundRobin, false)
    }

    #[test]
    fn failures_on_the_old_generation_eject_in_the_new_one_counted_once() {
        let old = table(
            &[
                spec("a", 1, false),
                spec("b", 1, false),
                spec("c", 1, false),
            ],
            &[],
        );
        fail(&old, 0, EJECT_AFTER - 1);
        // a moves from index 0 to 1; b leaves.
        let new = reload(&old, &[spec("c", 1, false), spec("a", 1, false)], false);
        let (old_a, new_a) = (old.all()[0].clone(), new.all()[1].clone());
        // The last failure comes from a request still on the old generation.
        fail(&old, 0, 1);
        assert!(matches!(new_a.health().state, HostState::Ejected(_)));
        assert_eq!(new_a.health().consecutive, EJECT_AFTER);
        assert_eq!(new_a.failures.load(Ordering::Relaxed), EJECT_AFTER as u64);
        assert_eq!(new.ejected(), 1);
        // More failures from either generation: still one host out.
        fail(&old, 0, 3);
        fail(&new, 1, 3);
        assert_eq!(new.ejected(), 1);
        // Its ejection ends; one probe, shared by both generations.
        new_a.health().state = HostState::Ejected(Instant::now());
        let probe = old.candidates().find(|c| c.host.index == 0).unwrap();
        assert!(probe.probe);
        for _ in 0..10 {
            assert_eq!(new.candidates().next().unwrap().host.spec.name, "c");
        }
        // The old generation's probe readmits it here: the count drops once.
        old.record(&old_a, Verdict::Success, true, None);
        assert_eq!(new_a.health().state, HostState::Up);
        assert_eq!(new.ejected(), 0);
        // The cap is the new table's: of two hosts, one may be out.
        fail(&new, 0, EJECT_AFTER);
        fail(&old, 0, EJECT_AFTER);
        assert_eq!(new.ejected(), 1);
        assert_eq!(new_a.health().state, HostState::Up);
    }

    #[test]
    fn key_evidence_from_the_old_generation_counts_only_for_the_same_pool() {
        let old = table(
            &[spec("a", 1, false), spec("b", 1, false)],
            &["k0-xxxxxxxxxx", "k1-xxxxxxxxxx"],
        );
        let old_a = old.all()[0].clone();
        let k0 = old_a.keys.keys()[0].clone();
        // Same pool: an old request's 429 cools the pair in the new table.
        let same = reload(&old, &[spec("a", 1, false), spec("b", 1, false)], false);
        assert_eq!(same.rate_limited(&old_a, Some(&k0), None), Scope::Pair);
        for _ in 0..4 {
            let c = same.candidates().find(|c| c.host.index == 0).unwrap();
            assert_eq!(c.key.unwrap().index, 1);
        }
        // A new pool: the pair evidence is dropped, and the old pool's keys
        // (their indexes name other keys now) add none.
        let renewed = reload(&same, &[spec("a", 1, false), spec("b", 1, false)], true);
        assert!(renewed.all()[0].health().pairs.is_empty());
        let old_k1 = old_a.keys.keys()[1].clone();
        assert_eq!(old.rejected(&old_a, &old_k1), Scope::Pair);
        old.rate_limited(&old_a, Some(&old_k1), None);
        let h = renewed.all()[0].health();
        assert!(h.pairs.is_empty() && h.limited_keys.is_empty(), "{h:?}");
        drop(h);
        let keys: Vec<usize> = (0..4)
            .filter_map(|_| renewed.candidates().find(|c| c.host.index == 0))
            .filter_map(|c| c.key.map(|k| k.index))
            .collect();
        assert!(keys.contains(&0) && keys.contains(&1), "{keys:?}");
    }

    /// `free_at` answers without taking: a free host means now and stays
    /// free for the next `next()`, on the same key; all cooling means the
    /// first expiry.
    #[test]
    fn free_at_takes_nothing() {
        let hosts = table(
            &[spec("a", 1, false), spec("b", 1, false)],
            &["k0-xxxxxxxxxx", "k1-xxxxxxxxxx"],
        );
        let (a, b) = (hosts.all()[0].clone(), hosts.all()[1].clone());
        hosts.cool_host(&a, Duration::from_secs(30));
        let mut c = hosts.candidates();
        let before = Instant::now();
        let at = c.free_at().unwrap();
        assert!(at >= before && at <= Instant::now(), "b is free now");
        let key = b.keys.keys()[0].clone();
        let got = c.next().unwrap();
        assert_eq!(got.host.spec.name, "b");
        assert_eq!(
            got.key.unwrap().index,
            key.index,
            "the key cursor did not move"
        );
        hosts.cool_host(&b, Duration::from_secs(20));
        let left = c.free_at().unwrap().duration_since(Instant::now());
        assert!(
            left > Duration::from_secs(19) && left <= Duration::from_secs(20),
            "{left:?}"
        );
    }

    /// The lock-free summary follows every change made through the health
    /// guard, tests' direct ones included, and the end of each cooldown.
    #[test]
    fn the_quiet_summary_follows_health_and_cooldown_ends() {
        let hosts = table(
            &[
                spec("a", 1, false),
                spec("b", 1, false),
                spec("c", 1, false),
            ],
            &["k0-xxxxxxxxxx", "k1-xxxxxxxxxx"],
        );
        let (a, b, c) = (&hosts.all()[0], &hosts.all()[1], &hosts.all()[2]);
        let ns = |t: Instant| nanos(t).expect("in range");
        let now = Instant::now();
        assert!(a.quiet(ns(now)) && a.surely_up(), "fresh: quiet");
        // A host cooldown: not quiet until it ends, up all along.
        hosts.cool_host(a, Duration::from_secs(30));
        let now = Instant::now();
        assert!(!a.quiet(ns(now)) && a.surely_up());
        assert!(a.quiet(ns(now + Duration::from_secs(31))));
        // A pair's cooldown counts too (it may leave the host no key).
        let k0 = b.keys.keys()[0].clone();
        assert_eq!(hosts.rate_limited(b, Some(&k0), None), Scope::Pair);
        assert!(!b.quiet(ns(Instant::now())));
        assert!(b.quiet(ns(Instant::now() + Duration::from_secs(2))));
        // Not up: never quiet, whatever the time, until it is up again.
        fail(&hosts, 2, EJECT_AFTER);
        assert!(!c.surely_up() && !c.quiet(ns(Instant::now() + EJECT_MAX * 2)));
        c.health().state = HostState::Ejected(Instant::now());
        let probe = hosts
            .candidates()
            .find(|x| x.host.index == 2)
            .expect("probe");
        assert!(probe.probe && !c.surely_up());
        hosts.record(c, Verdict::Success, true, None);
        assert!(c.surely_up() && c.quiet(ns(Instant::now())));
        // A change made straight through the guard is seen as well.
        a.health().state = HostState::Probing;
        assert!(!a.surely_up());
        a.health().state = HostState::Up;
        assert!(a.surely_up());
        // Reading through the guard changes nothing.
        let before = a.health.quiet_from.load(Ordering::Relaxed);
        drop(a.health());
        assert_eq!(a.health.quiet_from.load(Ordering::Relaxed), before);
    }

    /// What a scan finds, fast paths and remembered routes included, is
    /// what a look under every lock finds, host by host, through ejections,
    /// probes, cooldowns of hosts, keys and pairs, exclusions and settling.
    #[test]
    fn a_scan_agrees_with_a_look_under_every_lock() {
        let mut specs: Vec<HostSpec> = (0..8).map(|i| spec(&format!("h{i}"), 1, i >= 6)).collect();
        specs[3].models.insert("m".into(), "m".into());
        let hosts = table(&specs, &["k0-xxxxxxxxxx", "k1-xxxxxxxxxx"]);
        let all = hosts.all();
        let model: Arc<str> = Arc::from("m");
        // Checks one state: every host, by the scan and by the slow look.
        let check = |round: usize, model: Option<&Arc<str>>, settled: &[usize]| {
            let mut c = hosts.candidates().for_model(model.cloned());
            for &i in settled {
                c.settle(i);
            }
            let now = Instant::now();
            let mut panic = Panic::at(&hosts, now);
            // Spelled out: `c.scan` would be `Iterator::scan`.
            let any = Candidates::scan(&mut c, now, &mut panic);
            let got: Vec<bool> = c.seen.iter().map(|s| s.usable).collect();
            let in_panic = hosts.panic_mode(now);
            assert_eq!(panic.get(), in_panic, "round {round}: panic mode");
            let id = model.map(|m| ModelId::new(m.clone()));
            let declared = model.is_some_and(|m| discovery::declared_anywhere(all, m, now));
            let want: Vec<bool> = all
                .iter()
                .map(|h| {
                    !settled.contains(&h.index)
                        && id
                            .as_ref()
                            .is_none_or(|m| discovery::admission(h, m, now).admits(declared))
                        && c.usable(h, now, in_panic).is_some()
                })
                .collect();
            assert_eq!(got, want, "round {round}");
            assert_eq!(any, want.contains(&true), "round {round}");
        };
        let k0 = all[0].keys.keys()[0].clone();
        let k1 = all[0].keys.keys()[1].clone();
        let steps: Vec<Box<dyn Fn()>> = vec![
            Box::new(|| {}),
            Box::new(|| fail(&hosts, 1, EJECT_AFTER)),
            Box::new(|| hosts.cool_host(&all[2], Duration::from_secs(30))),
            Box::new(|| {
                hosts.rate_limited(&all[4], Some(&k0), None);
            }),
            Box::new(|| all[5].catalog.exclude(&model, Instant::now() + EJECT_MAX)),
            Box::new(|| all[1].health().state = HostState::Ejected(Instant::now())),
            Box::new(|| {
                // h1's probe goes out: h1 stays out for the others.
                let probe = hosts.candidates().find(|c| c.host.index == 1);
                assert!(probe.is_some_and(|c| c.probe));
            }),
            Box::new(|| {
                hosts.rate_limited(&all[4], Some(&k1), None);
            }),
            Box::new(|| k1.disable()),
            Box::new(|| {
                for i in [0, 3, 6] {
                    fail(&hosts, i, EJECT_AFTER);
                }
            }),
            Box::new(|| k0.disable()),
        ];
        for (round, step) in steps.iter().enumerate() {
            step();
            check(round, None, &[]);
            check(round, Some(&model), &[]);
            check(round, Some(&model), &[3, 7]);
        }
    }

    #[test]
    fn in_flight_is_released_on_drop() {
        let hosts = table(&[spec("a", 1, false)], &[]);
        let h = hosts.candidates().next().unwrap().host;
        {
            let _g = h.busy();
            assert_eq!(h.in_flight.load(Ordering::Relaxed), 1);
        }
        assert_eq!(h.in_flight.load(Ordering::Relaxed), 0);
    }
}
