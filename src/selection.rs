//! Host selection: which of the hosts a request may use right now takes its
//! next attempt, under the configured `strategy`, and the per-host signals
//! the strategies read (time-to-first-byte estimate, slow start).
//!
//! Why a module of its own: [`hosts`](crate::hosts) decides *which* hosts are
//! eligible (health, cooldowns, keys, tried already); this module only ranks
//! the eligible ones, so every strategy inherits failover, ejection and
//! backups unchanged.
//!
//! Guarantees: a pick returns an eligible host whenever one exists, and
//! `None` only when none is eligible; every strategy uses the *effective*
//! weight (the configured weight, scaled by [`SCALE`], reduced during slow
//! start and never below 1); a pick allocates nothing and takes at most one
//! short lock per host it reads (smooth round-robin's state is one lock); all
//! randomness comes from [`rng`], so a seeded thread picks the
//! same sequence every time.
//!
//! - `round-robin`: smooth weighted round-robin (nginx's algorithm): exact
//!   proportions, evenly interleaved, deterministic.
//! - `least-loaded`: fewest requests in flight per unit of weight; ties (idle
//!   hosts above all) are broken at random in proportion to weight.
//! - `latency`: power of two choices. Two distinct eligible hosts are drawn
//!   uniformly (weight already enters the cost, so it is not counted twice);
//!   the one with the lower cost = peak-EWMA of time to first byte ×
//!   (in flight + 1) ÷ weight wins.
//! - `random`: weighted random.
//!
//! Peak-EWMA as in Finagle and Linkerd: a sample above the current estimate
//! replaces it at once (a host that slows down is avoided at once); a lower
//! one pulls it down with weight `1 − exp(−Δt/τ)`, τ = 10 s (recovery is
//! believed gradually). Between samples the estimate decays toward zero with
//! the same τ (Finagle observes a zero at every read), so a host that was
//! slow or failed a while ago gets tried again and re-measured instead of
//! being starved forever. A host with no sample yet is costed like the
//! best measured host per unit of weight (times its own in-flight factor):
//! it is tried and measured soon, whatever its weight, and not flooded, as
//! each request under way makes it dearer. A failed attempt counts as a sample of twice
//! the current estimate (at least 1 s), however fast it failed: a host that
//! refuses connections must not look fast.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::Strategy;
use crate::hosts::{Host, Hosts};
use crate::rng;

/// Weights are kept ×100 internally so that slow start can ramp in 1 % steps
/// of a weight while smooth round-robin stays in integers.
pub const SCALE: u64 = 100;
/// How long slow start lasts.
pub const RAMP: Duration = Duration::from_secs(30);
/// Share of its weight a host gets when slow start begins, in percent.
pub const RAMP_FLOOR_PERCENT: u64 = 10;
/// Time constant τ of the latency estimate.
pub const DECAY: Duration = Duration::from_secs(10);
/// Cost floor: keeps the in-flight factor meaningful when an estimate has
/// decayed to (almost) zero, so an idle-looking host is not flooded.
const COST_FLOOR_NS: f64 = 1e6;
/// Estimate when no host has a sample yet (only the ratio between hosts
/// matters, so any positive value will do).
const DEFAULT_ESTIMATE_NS: f64 = 1e8;
/// Smallest and largest sample a failure counts as.
const FAILURE_MIN_NS: f64 = 1e9;
const FAILURE_MAX_NS: f64 = 300e9;
/// Hosts looked at for the cost of hosts without an estimate.
const SEED_SAMPLE: usize = 64;

/// What selection knows about one host beyond its configuration.
#[derive(Debug)]
pub struct HostSignals {
    /// Time to first byte, peak-EWMA.
    pub ttfb: PeakEwma,
    /// Slow start after readmission or a reload that added the host.
    pub slow_start: SlowStart,
}

impl HostSignals {
    /// No sample and no slow start (a host present at process start).
    pub fn new() -> Self {
        HostSignals {
            ttfb: PeakEwma::default(),
            slow_start: SlowStart::new(),
        }
    }
}

impl Default for HostSignals {
    fn default() -> Self {
        Self::new()
    }
}

/// A peak-sensitive exponentially weighted moving average of durations.
#[derive(Debug, Default)]
pub struct PeakEwma {
    state: Mutex<Option<Sample>>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The estimate in nanoseconds as of `at`.
    ns: f64,
    at: Instant,
}

/// exp(−Δt/τ): how much of an estimate survives `elapsed`.
fn survival(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

impl PeakEwma {
    fn lock(&self) -> MutexGuard<'_, Option<Sample>> {
        // Any stored estimate is valid, so a panic elsewhere leaves nothing to repair.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fold in one sample taken at `now`.
    pub fn observe(&self, sample: Duration, now: Instant) {
        self.observe_ns(sample.as_secs_f64() * 1e9, now);
    }

    fn observe_ns(&self, sample: f64, now: Instant) {
        let mut state = self.lock();
        *state = Some(match *state {
            None => Sample {
                ns: sample,
                at: now,
            },
            Some(old) => {
                let w = survival(now.saturating_duration_since(old.at));
                let current = old.ns * w;
                let ns = if sample > current {
                    sample // peak: believe a slowdown at once
                } else {
                    current + sample * (1.0 - w)
                };
                Sample {
                    ns,
                    at: old.at.max(now),
                }
            }
        });
    }

    /// A failed attempt: count it as a slow sample, however fast it failed.
    pub fn penalize(&self, now: Instant) {
        let current = self.estimate_ns(now).unwrap_or(0.0);
        self.observe_ns((current * 2.0).clamp(FAILURE_MIN_NS, FAILURE_MAX_NS), now);
    }

    /// The estimate at `now` in nanoseconds, decayed since the last sample;
    /// `None` before the first sample.
    fn estimate_ns(&self, now: Instant) -> Option<f64> {
        let s = (*self.lock())?;
        Some(s.ns * survival(now.saturating_duration_since(s.at)))
    }

    /// The estimate at `now`; `None` before the first sample.
    pub fn estimate(&self, now: Instant) -> Option<Duration> {
        self.estimate_ns(now)
            .and_then(|ns| Duration::try_from_secs_f64(ns / 1e9).ok())
    }
}

/// Slow start: the effective weight ramps from [`RAMP_FLOOR_PERCENT`] to 100 %
/// over [`RAMP`]. Lock-free, since every pick reads it for every eligible host.
#[derive(Debug)]
pub struct SlowStart {
    /// Reference for `began`.
    origin: Instant,
    /// Nanoseconds from `origin` to the start of the ramp, plus one; 0 = none.
    began: AtomicU64,
}

impl SlowStart {
    /// No ramp: full weight from the start.
    pub fn new() -> Self {
        SlowStart {
            origin: Instant::now(),
            began: AtomicU64::new(0),
        }
    }

    /// Start ramping at `now`.
    pub fn begin(&self, now: Instant) {
        let ns = now.saturating_duration_since(self.origin).as_nanos();
        let ns = u64::try_from(ns).unwrap_or(u64::MAX - 1);
        self.began.store(ns.saturating_add(1), Ordering::Relaxed);
    }

    /// When the current (or last) ramp began, if one ever did.
    pub fn began(&self) -> Option<Instant> {
        match self.began.load(Ordering::Relaxed) {
            0 => None,
            n => self.origin.checked_add(Duration::from_nanos(n - 1)),
        }
    }

    /// `weight` as it counts at `now`, ×[`SCALE`].
    pub fn effective(&self, weight: u32, now: Instant) -> u64 {
        let since = self.began().map(|b| now.saturating_duration_since(b));
        ramped(weight, since)
    }
}

impl Default for SlowStart {
    fn default() -> Self {
        Self::new()
    }
}

/// `weight` ×[`SCALE`], `since` into a ramp (`None`: no ramp); never below 1.
pub fn ramped(weight: u32, since: Option<Duration>) -> u64 {
    let full = u64::from(weight).saturating_mul(SCALE);
    let Some(since) = since.filter(|s| *s < RAMP) else {
        return full.max(1);
    };
    let ramp = RAMP.as_millis();
    let pct = u128::from(RAMP_FLOOR_PERCENT) * ramp
        + u128::from(100 - RAMP_FLOOR_PERCENT) * since.as_millis();
    let w = u128::from(full) * pct / (100 * ramp);
    u64::try_from(w).unwrap_or(full).max(1)
}

impl Host {
    /// Effective weight at `now` (×[`SCALE`], slow start applied).
    pub fn effective_weight(&self, now: Instant) -> u64 {
        self.signals.slow_start.effective(self.spec.weight, now)
    }

    /// The upstream's response head arrived `ttfb` after the attempt began.
    pub fn observe_first_byte(&self, ttfb: Duration) {
        self.signals.ttfb.observe(ttfb, Instant::now());
    }

    /// The time-to-first-byte estimate at `now` (for `/status` and metrics).
    pub fn latency_estimate(&self, now: Instant) -> Option<Duration> {
        self.signals.ttfb.estimate(now)
    }
}

impl Hosts {
    /// Slow-start the host at `index` from now: for hosts that a
    /// configuration reload added (hosts present at process start get none).
    pub fn mark_new(&self, index: usize) {
        if let Some(h) = self.all().get(index) {
            h.signals.slow_start.begin(Instant::now());
        }
    }
}

/// The strategy and the state it keeps between picks.
#[derive(Debug)]
pub struct Selector {
    strategy: Strategy,
    /// Smooth weighted round-robin "current weights", one per host.
    current: Mutex<Vec<i64>>,
}

impl Selector {
    /// A selector for a table of `hosts` hosts.
    pub fn new(strategy: Strategy, hosts: usize) -> Self {
        let current = match strategy {
            Strategy::RoundRobin => vec![0; hosts],
            _ => Vec::new(),
        };
        Selector {
            strategy,
            current: Mutex::new(current),
        }
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// [`Self::pick_where`] with a list (indexed like `hosts`): for tests.
    #[cfg(test)]
    pub fn pick(&self, hosts: &[Arc<Host>], eligible: &[bool], now: Instant) -> Option<usize> {
        let eligible = |i: usize, _: &Host| eligible.get(i).copied().unwrap_or(false);
        self.pick_where(hosts, &eligible, now)
    }

    /// Index of the host that takes the next attempt among those for which
    /// `eligible(index, host)` is true, as of `now`: asked host by host, so
    /// that the request path need not collect its answers into a list first.
    pub fn pick_where(
        &self,
        hosts: &[Arc<Host>],
        eligible: &impl Fn(usize, &Host) -> bool,
        now: Instant,
    ) -> Option<usize> {
        match self.strategy {
            Strategy::RoundRobin => self.round_robin(hosts, eligible, now),
            Strategy::LeastLoaded => least_loaded(hosts, eligible, now),
            Strategy::Latency => latency(hosts, eligible, now),
            Strategy::Random => random(hosts, eligible, now),
        }
    }

    fn round_robin(
        &self,
        hosts: &[Arc<Host>],
        eligible: &impl Fn(usize, &Host) -> bool,
        now: Instant,
    ) -> Option<usize> {
        // A panic while holding this lock leaves valid weights behind.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.len() != hosts.len() {
            current.resize(hosts.len(), 0); // only if built for another table
        }
        let mut total = 0i64;
        // The best so far and its current weight (a host is visited once,
        // so that is still its weight when the next one is compared).
        let mut best: Option<(usize, i64)> = None;
        for ((i, host), c) in hosts.iter().enumerate().zip(current.iter_mut()) {
            if !eligible(i, host) {
                continue;
            }
            let w = i64::try_from(host.effective_weight(now)).unwrap_or(i64::MAX / 1024);
            *c = c.saturating_add(w);
            total = total.saturating_add(w);
            if best.is_none_or(|(_, b)| *c > b) {
                best = Some((i, *c));
            }
        }
        let (best, _) = best?;
        let c = current.get_mut(best)?;
        *c = c.saturating_sub(total);
        Some(best)
    }
}

/// `(index, host)` for every host `eligible` accepts.
fn each_eligible<'a, F: Fn(usize, &Host) -> bool>(
    hosts: &'a [Arc<Host>],
    eligible: &'a F,
) -> impl Iterator<Item = (usize, &'a Arc<Host>)> + 'a {
    hosts
        .iter()
        .enumerate()
        .filter(move |(i, h)| eligible(*i, h))
}

/// True with probability `w / total`.
fn chance(w: u64, total: u64) -> bool {
    rng::below(total) < w
}

fn least_loaded(
    hosts: &[Arc<Host>],
    eligible: &impl Fn(usize, &Host) -> bool,
    now: Instant,
) -> Option<usize> {
    // (index, in flight, weight) of the best so far, and the weight of all
    // hosts tied with it: weighted reservoir sampling breaks ties in one pass.
    let mut best: Option<(usize, u128, u128)> = None;
    let mut tied = 0u64;
    for (i, host) in each_eligible(hosts, eligible) {
        let load = host.in_flight.load(Ordering::Relaxed) as u128;
        let w = host.effective_weight(now);
        let Some((_, best_load, best_w)) = best else {
            best = Some((i, load, u128::from(w)));
            tied = w;
            continue;
        };
        // load / w against best_load / best_w, without division.
        let (mine, theirs) = (load * best_w, best_load * u128::from(w));
        if mine < theirs {
            best = Some((i, load, u128::from(w)));
            tied = w;
        } else if mine == theirs {
            tied = tied.saturating_add(w);
            if chance(w, tied) {
                best = Some((i, load, u128::from(w)));
            }
        }
    }
    best.map(|(i, _, _)| i)
}

fn random(
    hosts: &[Arc<Host>],
    eligible: &impl Fn(usize, &Host) -> bool,
    now: Instant,
) -> Option<usize> {
    let total = each_eligible(hosts, eligible)
        .map(|(_, h)| h.effective_weight(now))
        .fold(0u64, u64::saturating_add);
    let mut r = rng::below(total);
    let mut last = None;
    for (i, host) in each_eligible(hosts, eligible) {
        let w = host.effective_weight(now);
        if r < w {
            return Some(i);
        }
        r -= w;
        last = Some(i);
    }
    last // only if weights saturated the total
}

fn latency(
    hosts: &[Arc<Host>],
    eligible: &impl Fn(usize, &Host) -> bool,
    now: Instant,
) -> Option<usize> {
    let n = each_eligible(hosts, eligible).count();
    let nth = |k: usize| each_eligible(hosts, eligible).nth(k).map(|(i, _)| i);
    if n < 2 {
        return nth(0);
    }
    // Two distinct draws: the second skips over the first.
    let first = rng::below(n as u64) as usize;
    let mut second = rng::below(n as u64 - 1) as usize;
    if second >= first {
        second += 1;
    }
    let (a, b) = (nth(first)?, nth(second)?);
    let (ea, eb) = (
        hosts[a].signals.ttfb.estimate_ns(now),
        hosts[b].signals.ttfb.estimate_ns(now),
    );
    let best = if ea.is_none() || eb.is_none() {
        best_per_weight(hosts, now)
    } else {
        None
    };
    let cost = |i: usize, estimate: Option<f64>| {
        let host = &hosts[i];
        let load = host.in_flight.load(Ordering::Relaxed) as f64 + 1.0;
        let weight = host.effective_weight(now) as f64;
        match (estimate, best) {
            (Some(e), _) => e.max(COST_FLOOR_NS) * load / weight,
            // Unmeasured: as cheap per request as the best measured host,
            // whatever its own weight (costed by its weight, a lighter host
            // would lose every draw and never be measured at all).
            (None, Some(best)) => best * load,
            (None, None) => DEFAULT_ESTIMATE_NS * load / weight,
        }
    };
    Some(if cost(b, eb) < cost(a, ea) { b } else { a })
}

/// The lowest estimate per unit of weight over (up to [`SEED_SAMPLE`])
/// hosts that have one, `None` when none has; only computed while a drawn
/// host has no sample yet.
fn best_per_weight(hosts: &[Arc<Host>], now: Instant) -> Option<f64> {
    hosts
        .iter()
        .filter_map(|h| {
            let e = h.signals.ttfb.estimate_ns(now)?;
            Some(e.max(COST_FLOOR_NS) / h.effective_weight(now) as f64)
        })
        .take(SEED_SAMPLE)
        .min_by(f64::total_cmp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostSpec;
    use crate::keys::KeyPool;
    use std::collections::BTreeMap;

    /// A table of hosts with these weights and a selector for it.
    fn table(weights: &[u32], strategy: Strategy) -> (Hosts, Selector) {
        let specs: Vec<HostSpec> = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| HostSpec {
                name: format!("h{i}"),
                base_url: format!("http://h{i}"),
                weight,
                backup: false,
                api_keys: None,
                models: BTreeMap::new(),
            })
            .collect();
        let hosts = Hosts::new(&specs, &Arc::new(KeyPool::new(&[])), strategy);
        (hosts, Selector::new(strategy, weights.len()))
    }

    /// Picks per host over `n` picks with every host eligible, at `now`.
    fn counts((hosts, sel): &(Hosts, Selector), n: usize, now: Instant) -> Vec<usize> {
        let all = vec![true; hosts.all().len()];
        let mut counts = vec![0; hosts.all().len()];
        for _ in 0..n {
            counts[sel.pick(hosts.all(), &all, now).unwrap()] += 1;
        }
        counts
    }

    /// Each share within ±3 percentage points of its weight's share.
    fn assert_shares(counts: &[usize], weights: &[u32]) {
        let picks: usize = counts.iter().sum();
        let total: u32 = weights.iter().sum();
        for (c, w) in counts.iter().zip(weights) {
            let got = *c as f64 / picks as f64;
            let want = f64::from(*w) / f64::from(total);
            assert!(
                (got - want).abs() <= 0.03,
                "{counts:?} vs weights {weights:?}"
            );
        }
    }

    #[test]
    fn round_robin_and_random_honour_weights_over_10000_picks() {
        let weights = [1, 2, 3, 4];
        for strategy in [Strategy::RoundRobin, Strategy::Random] {
            rng::seed(7);
            let hosts = table(&weights, strategy);
            let c = counts(&hosts, 10_000, Instant::now());
            assert_shares(&c, &weights);
            if strategy == Strategy::RoundRobin {
                assert_eq!(c, [1000, 2000, 3000, 4000], "smooth WRR is exact");
            }
        }
    }

    #[test]
    fn seeded_picks_repeat() {
        for strategy in [Strategy::Random, Strategy::LeastLoaded, Strategy::Latency] {
            let run = || {
                rng::seed(99);
                let (hosts, sel) = table(&[1, 2, 3, 4], strategy);
                let all = [true; 4];
                let now = Instant::now();
                (0..200)
                    .map(|_| sel.pick(hosts.all(), &all, now).unwrap())
                    .collect::<Vec<_>>()
            };
            assert_eq!(run(), run(), "{strategy}");
        }
    }

    #[test]
    fn least_loaded_prefers_the_idle_host_and_spreads_ties_by_weight() {
        rng::seed(3);
        let hosts = table(&[1, 1, 1, 1], Strategy::LeastLoaded);
        for (i, load) in [2, 0, 1, 5].into_iter().enumerate() {
            hosts.0.all()[i].in_flight.store(load, Ordering::Relaxed);
        }
        assert_eq!(counts(&hosts, 1000, Instant::now()), [0, 1000, 0, 0]);
        // Load is per unit of weight: 2 in flight on weight 4 beats 1 on weight 1.
        let weighted = table(&[1, 4], Strategy::LeastLoaded);
        weighted.0.all()[0].in_flight.store(1, Ordering::Relaxed);
        weighted.0.all()[1].in_flight.store(2, Ordering::Relaxed);
        assert_eq!(counts(&weighted, 100, Instant::now()), [0, 100]);
        // All idle: ties are broken at random, in proportion to weight.
        let weights = [1, 2, 3, 4];
        let idle = table(&weights, Strategy::LeastLoaded);
        assert_shares(&counts(&idle, 10_000, Instant::now()), &weights);
        // Ineligible hosts are never picked, however idle.
        let only = [false, true, false, false];
        for _ in 0..100 {
            assert_eq!(idle.1.pick(idle.0.all(), &only, Instant::now()), Some(1));
        }
        assert_eq!(idle.1.pick(idle.0.all(), &[false; 4], Instant::now()), None);
    }

    #[test]
    fn latency_avoids_the_slow_host_and_weighs_load() {
        rng::seed(11);
        let hosts = table(&[1, 1, 1, 1], Strategy::Latency);
        let now = Instant::now();
        for (i, ms) in [5, 5, 5, 50].into_iter().enumerate() {
            hosts.0.all()[i]
                .signals
                .ttfb
                .observe(Duration::from_millis(ms), now);
        }
        let c = counts(&hosts, 10_000, now);
        assert_eq!(c[3], 0, "the slow host loses every comparison: {c:?}");
        assert_shares(&c[..3], &[1, 1, 1]);
        // Enough in flight on the fast hosts makes the slow one cheaper.
        for h in &hosts.0.all()[..3] {
            h.in_flight.store(20, Ordering::Relaxed);
        }
        let c = counts(&hosts, 1000, now);
        assert!(c[3] > 400, "{c:?}");
    }

    #[test]
    fn latency_costs_new_hosts_like_the_best_and_decays() {
        rng::seed(5);
        let hosts = table(&[1, 1, 1, 1], Strategy::Latency);
        let now = Instant::now();
        for (i, ms) in [10, 20, 400].into_iter().enumerate() {
            hosts.0.all()[i]
                .signals
                .ttfb
                .observe(Duration::from_millis(ms), now);
        }
        assert_eq!(
            best_per_weight(hosts.0.all(), now),
            Some(10e6 / SCALE as f64)
        );
        // The unsampled host counts as 10 ms: it beats 20 and 400 ms, ties 10 ms.
        let c = counts(&hosts, 3000, now);
        assert!(c[3] > c[1] && c[1] > c[2], "{c:?}");
        assert!(c[3] * 2 > c[0] && c[0] * 2 > c[3], "{c:?}");
        // Decay toward zero between samples: 400 ms is tried again later.
        let later = now + Duration::from_secs(60);
        let e = hosts.0.all()[2].latency_estimate(later).unwrap();
        assert!(e < Duration::from_millis(1), "{e:?}");
    }

    /// A lighter host with no sample yet is still tried: costed by its own
    /// weight at the others' estimate, it lost every draw against a heavier
    /// host of the same speed and was never measured (0 of 400).
    #[test]
    fn latency_tries_a_lighter_unmeasured_host() {
        rng::seed(7);
        let hosts = table(&[1, 3], Strategy::Latency);
        let now = Instant::now();
        hosts.0.all()[1]
            .signals
            .ttfb
            .observe(Duration::from_millis(50), now);
        let c = counts(&hosts, 400, now);
        assert!(c[0] > 0, "the light host was never tried: {c:?}");
        // Measured at the same speed, its weight makes it the dearer one.
        hosts.0.all()[0]
            .signals
            .ttfb
            .observe(Duration::from_millis(50), now);
        let c = counts(&hosts, 400, now);
        assert_eq!(c[0], 0, "{c:?}");
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let e = PeakEwma::default();
        assert_eq!(e.estimate(t0), None);
        e.observe(Duration::from_millis(100), t0);
        // A higher sample is taken at once.
        e.observe(Duration::from_millis(500), t0);
        assert_eq!(e.estimate(t0), Some(Duration::from_millis(500)));
        // A lower one after τ: weight 1 − e⁻¹ ≈ 0.632 toward it.
        let t1 = t0 + DECAY;
        e.observe(Duration::from_millis(100), t1);
        let got = e.estimate(t1).unwrap().as_secs_f64() * 1e3;
        let want = 500.0 * (-1f64).exp() + 100.0 * (1.0 - (-1f64).exp());
        assert!((got - want).abs() < 0.01, "{got} vs {want}");
        // A failure counts as at least 1 s, and doubles what is there.
        e.penalize(t1);
        assert_eq!(e.estimate(t1), Some(Duration::from_secs(1)));
        e.penalize(t1);
        assert_eq!(e.estimate(t1), Some(Duration::from_secs(2)));
        // An earlier "now" (clock skew between threads) changes nothing.
        e.observe(Duration::from_millis(1), t0);
        assert!(e.estimate(t1).unwrap() > Duration::from_millis(1900));
    }

    #[test]
    fn slow_start_ramps_from_ten_percent_to_full_over_30s() {
        assert_eq!(ramped(3, None), 300);
        assert_eq!(ramped(3, Some(Duration::ZERO)), 30);
        assert_eq!(ramped(3, Some(Duration::from_secs(15))), 165);
        assert_eq!(ramped(3, Some(RAMP)), 300);
        assert_eq!(ramped(1, Some(Duration::ZERO)), 10);
        let s = SlowStart::new();
        let t0 = Instant::now();
        assert_eq!(s.effective(2, t0), 200, "no ramp at process start");
        s.begin(t0);
        assert_eq!(s.began(), Some(t0));
        assert_eq!(s.effective(2, t0), 20);
        assert_eq!(s.effective(2, t0 + RAMP), 200);
    }

    #[test]
    fn readmitted_host_gets_a_tenth_of_its_share_then_all_of_it() {
        for strategy in [
            Strategy::RoundRobin,
            Strategy::Random,
            Strategy::LeastLoaded,
        ] {
            rng::seed(13);
            let hosts = table(&[1, 1, 1, 1], strategy);
            let t0 = Instant::now();
            hosts.0.all()[0].signals.slow_start.begin(t0);
            // At t0: weights 10,100,100,100 → host 0 gets 10/310 ≈ 3.2 %
            // (a tenth of its 25 %; least-loaded: every host idle, so a tie).
            let c = counts(&hosts, 10_000, t0);
            let share = c[0] as f64 / 10_000.0;
            assert!((share - 10.0 / 310.0).abs() < 0.01, "{strategy}: {c:?}");
            let c = counts(&hosts, 10_000, t0 + RAMP);
            assert_shares(&c, &[1, 1, 1, 1]);
        }
    }

    #[test]
    fn host_failures_raise_the_cost_and_reload_can_mark_new_hosts() {
        use crate::hosts::Verdict;
        let (hosts, _) = table(&[1, 1], Strategy::Latency);
        let a = &hosts.all()[0];
        a.observe_first_byte(Duration::from_millis(5));
        hosts.record(a, Verdict::Failure, false, Some("connect refused"));
        let e = a.latency_estimate(Instant::now()).unwrap();
        assert!(e >= Duration::from_millis(990), "{e:?}");
        // Hosts present at start get no slow start; a reload marks added ones.
        assert_eq!(hosts.all()[1].signals.slow_start.began(), None);
        hosts.mark_new(1);
        assert!(hosts.all()[1].effective_weight(Instant::now()) < SCALE);
        hosts.mark_new(7); // out of range: ignored
    }

    #[test]
    fn slow_start_lowers_the_latency_pick_too() {
        rng::seed(17);
        let hosts = table(&[1, 1], Strategy::Latency);
        let t0 = Instant::now();
        for h in hosts.0.all() {
            h.signals.ttfb.observe(Duration::from_millis(10), t0);
        }
        hosts.0.all()[0].signals.slow_start.begin(t0);
        assert_eq!(counts(&hosts, 100, t0), [0, 100]);
        // Ten in flight on the other host make the ramping one cheaper.
        hosts.0.all()[1].in_flight.store(10, Ordering::Relaxed);
        assert_eq!(counts(&hosts, 100, t0)[0], 100);
    }
}
