//! Retry policy: the one place that decides, for every upstream outcome,
//! whether to try again, where, and what it says about the host and the key.
//!
//! The table in [`decide`] is the contract (SPEC "Retries, failover, keys");
//! everything else in the request path asks it rather than deciding on its own.
//! Backoff is only ever slept when the next attempt goes back to a host that
//! just failed: a different host or key is tried at once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::rng;

/// What one upstream attempt came to, before anything reached the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// TCP or TLS connect failed, was refused, or timed out; DNS failed.
    Connect,
    /// No output within the first-byte deadline, or silence past the idle timeout.
    Timeout,
    /// The upstream answered with this status.
    Status(u16),
    /// The response broke off (reset, truncated, in-stream error) before the commit.
    Broken,
}

/// What the key that was used is guilty of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFault {
    /// Nothing.
    None,
    /// Rejected (401/403): out of rotation until the key file changes.
    Rejected,
    /// Rate limited (429): cool down the key, the host or the pair.
    RateLimited,
}

/// The verdict on one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Try again (if attempts, budget and deadline allow).
    pub retry: bool,
    /// Counts towards ejecting the host.
    pub host_failure: bool,
    /// What it says about the key.
    pub key: KeyFault,
}

/// The decision table.
pub fn decide(outcome: Outcome) -> Decision {
    let (retry, host_failure, key) = match outcome {
        Outcome::Connect | Outcome::Timeout | Outcome::Broken => (true, true, KeyFault::None),
        Outcome::Status(429) => (true, false, KeyFault::RateLimited),
        Outcome::Status(401 | 403) => (true, false, KeyFault::Rejected),
        Outcome::Status(404) => (true, false, KeyFault::None),
        Outcome::Status(s) if s >= 500 => (true, true, KeyFault::None),
        Outcome::Status(_) => (false, false, KeyFault::None),
    };
    Decision {
        retry,
        host_failure,
        key,
    }
}

/// The backoff window stops doubling at this many turn-arounds.
pub const BACKOFF_CAP_FACTOR: u32 = 4;

/// The pause before going back to a host that just failed, for the `n`th
/// such pause of one request (1-based): HAProxy's turn-around `t`
/// (`min(connectMs, 1 s)`, passed in) doubled per pause up to
/// [`BACKOFF_CAP_FACTOR`]` × t`, with "equal jitter" (uniform over the upper
/// half of the window), so requests that failed together do not come back
/// together, yet none comes back at once. With the default `t` of 1 s:
/// 0.5–1 s, 1–2 s, then 2–4 s.
pub fn backoff(n: u32, turnaround: Duration) -> Duration {
    let doublings = n.saturating_sub(1).min(BACKOFF_CAP_FACTOR.ilog2());
    let window = turnaround.saturating_mul(1 << doublings);
    let half = window / 2;
    half + Duration::from_nanos(rng::below(half.as_nanos() as u64 + 1))
}

/// Seconds of history the retry budget looks at.
pub const BUDGET_WINDOW_SECS: usize = 10;
/// Share of recent requests that may be retried.
pub const BUDGET_RATIO: f64 = 0.2;
/// Retries per second always allowed, so a quiet balancer can still retry.
pub const BUDGET_MIN_PER_SEC: usize = 10;
/// Retries under way at once, at least.
pub const BUDGET_MIN_CONCURRENT: usize = 3;

/// Longest wait for a free concurrent-retry slot.
pub const RETRY_SLOT_WAIT: Duration = Duration::from_secs(1);

/// The retry budget (Finagle/Envoy style): retries stay within 20 % of the
/// requests of the last 10 s plus 10 per second, and retries under way at
/// once within max(3, 20 % of requests in flight). An outage therefore
/// cannot multiply the load on the hosts that are left. A spent ratio refuses
/// at once; a full set of concurrent slots is waited on briefly, since a slot
/// frees as soon as some retry ends and a request that could be saved should be.
#[derive(Debug)]
pub struct Budget {
    state: Mutex<BudgetState>,
    freed: Condvar,
    in_flight: AtomicUsize,
    started: Instant,
    /// Retries granted since start (for metrics and `/status`).
    granted: AtomicU64,
    /// Requests refused a retry since start.
    refused: AtomicU64,
}

#[derive(Debug, Default)]
struct BudgetState {
    /// Per second slot: (second number, requests, retries).
    slots: [(u64, usize, usize); BUDGET_WINDOW_SECS],
    /// Retries under way.
    retrying: usize,
}

impl BudgetState {
    fn slot(&mut self, second: u64) -> &mut (u64, usize, usize) {
        let i = (second % BUDGET_WINDOW_SECS as u64) as usize;
        let slot = &mut self.slots[i];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot
    }

    fn totals(&self, second: u64) -> (usize, usize) {
        self.slots
            .iter()
            .filter(|(s, _, _)| *s <= second && second - *s < BUDGET_WINDOW_SECS as u64)
            .fold((0, 0), |(rq, rt), (_, q, t)| (rq + q, rt + t))
    }
}

/// A request counted in flight until dropped.
#[derive(Debug)]
pub struct RequestTicket<'a>(&'a Budget);

impl Drop for RequestTicket<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry under way until dropped.
#[derive(Debug)]
pub struct RetryTicket<'a>(&'a Budget);

impl Drop for RetryTicket<'_> {
    fn drop(&mut self) {
        self.0.lock().retrying -= 1;
        self.0.freed.notify_one();
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            state: Mutex::new(BudgetState::default()),
            freed: Condvar::new(),
            in_flight: AtomicUsize::new(0),
            started: Instant::now(),
            granted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }
}

impl Budget {
    fn second(&self, now: Instant) -> u64 {
        now.duration_since(self.started).as_secs() + 1
    }

    fn lock(&self) -> MutexGuard<'_, BudgetState> {
        // Counters stay valid whatever panicked while the lock was held.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count a new proxied request.
    pub fn request(&self) -> RequestTicket<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let second = self.second(Instant::now());
        self.lock().slot(second).1 += 1;
        RequestTicket(self)
    }

    /// Whether the ratio part of the budget would allow a retry now (no slot
    /// taken). A `false` counts as a refusal: the caller stops retrying.
    pub fn allows(&self) -> bool {
        let st = self.lock();
        let (requests, retries) = st.totals(self.second(Instant::now()));
        let allowed = retries < Self::allowed(requests);
        if !allowed {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        allowed
    }

    fn allowed(requests: usize) -> usize {
        (requests as f64 * BUDGET_RATIO) as usize + BUDGET_MIN_PER_SEC * BUDGET_WINDOW_SECS
    }

    /// Ask to retry, waiting for a concurrent slot until `wait_until` at most;
    /// `None` when the budget is spent.
    pub fn retry(&self, wait_until: Instant) -> Option<RetryTicket<'_>> {
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            let second = self.second(now);
            let (requests, retries) = st.totals(second);
            let allowed =
                (requests as f64 * BUDGET_RATIO) as usize + BUDGET_MIN_PER_SEC * BUDGET_WINDOW_SECS;
            if retries >= allowed {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let concurrent = BUDGET_MIN_CONCURRENT.max(self.in_flight.load(Ordering::Relaxed) / 5);
            if st.retrying < concurrent {
                st.retrying += 1;
                st.slot(second).2 += 1;
                self.granted.fetch_add(1, Ordering::Relaxed);
                return Some(RetryTicket(self));
            }
            if now >= wait_until {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            st = self
                .freed
                .wait_timeout(st, wait_until - now)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }

    /// Retries under way now.
    pub fn retrying(&self) -> usize {
        self.lock().retrying
    }

    /// Retries granted since start.
    pub fn retries(&self) -> u64 {
        self.granted.load(Ordering::Relaxed)
    }

    /// Retries refused since start (each ends one request's retrying).
    pub fn refusals(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_table() {
        let d = |o| decide(o);
        assert_eq!(
            d(Outcome::Connect),
            Decision {
                retry: true,
                host_failure: true,
                key: KeyFault::None
            }
        );
        assert_eq!(
            d(Outcome::Timeout),
            Decision {
                retry: true,
                host_failure: true,
                key: KeyFault::None
            }
        );
        assert_eq!(
            d(Outcome::Broken),
            Decision {
                retry: true,
                host_failure: true,
                key: KeyFault::None
            }
        );
        for s in [500, 502, 503, 504, 599] {
            assert_eq!(
                d(Outcome::Status(s)),
                Decision {
                    retry: true,
                    host_failure: true,
                    key: KeyFault::None
                },
                "{s}"
            );
        }
        assert_eq!(
            d(Outcome::Status(429)),
            Decision {
                retry: true,
                host_failure: false,
                key: KeyFault::RateLimited
            }
        );
        for s in [401, 403] {
            assert_eq!(
                d(Outcome::Status(s)),
                Decision {
                    retry: true,
                    host_failure: false,
                    key: KeyFault::Rejected
                }
            );
        }
        assert_eq!(
            d(Outcome::Status(404)),
            Decision {
                retry: true,
                host_failure: false,
                key: KeyFault::None
            }
        );
        for s in [200, 201, 301, 400, 405, 413, 422, 451] {
            assert!(!d(Outcome::Status(s)).retry, "{s}");
            assert!(!d(Outcome::Status(s)).host_failure, "{s}");
        }
    }

    #[test]
    fn budget_allows_a_fifth_of_requests_plus_a_floor() {
        let b = Budget::default();
        let tickets: Vec<_> = (0..1000).map(|_| b.request()).collect();
        // 20 % of 1000 + 10/s over 10 s = 300 retries, taken one at a time.
        let mut granted = 0;
        for _ in 0..1000 {
            match b.retry(Instant::now()) {
                Some(t) => {
                    granted += 1;
                    drop(t);
                }
                None => break,
            }
        }
        assert_eq!(granted, 300);
        assert_eq!((b.retries(), b.refusals()), (300, 1));
        assert!(!b.allows());
        assert_eq!(b.refusals(), 2);
        drop(tickets);
    }

    #[test]
    fn concurrent_retries_are_capped() {
        let b = Budget::default();
        let _reqs: Vec<_> = (0..50).map(|_| b.request()).collect();
        // max(3, 50 / 5) = 10 at once.
        let held: Vec<_> = (0..20).filter_map(|_| b.retry(Instant::now())).collect();
        assert_eq!(held.len(), 10);
        assert_eq!(b.retrying(), 10);
        // A full set of slots is waited on, and a freed slot is taken.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| b.retry(Instant::now() + Duration::from_secs(5)).is_some());
            drop(held);
            assert!(waiter.join().unwrap());
        });
        assert_eq!(b.retrying(), 0);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let t = Duration::from_millis(1000);
        let window = |n: u32| t * (1 << (n - 1).min(2));
        let mut seen = [Duration::MAX, Duration::ZERO];
        for n in 1..40 {
            for _ in 0..50 {
                let b = backoff(n, t);
                assert!(b >= window(n) / 2 && b <= window(n), "pause {n}: {b:?}");
                assert!(b <= t * BACKOFF_CAP_FACTOR);
                if n == 1 {
                    seen = [seen[0].min(b), seen[1].max(b)];
                }
            }
        }
        // Jittered, not one fixed value.
        assert!(seen[1] - seen[0] > Duration::from_millis(50), "{seen:?}");
        assert_eq!(backoff(1, Duration::ZERO), Duration::ZERO);
    }
}
