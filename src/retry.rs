//! Retry policy: the one place that decides, for every upstream outcome,
//! whether to try again, where, and what it says about the host and the key.
//!
//! The table in [`decide`] is the contract (SPEC "Retries, failover, keys");
//! everything else in the request path asks it rather than deciding on its own.
//! Backoff is only ever slept when the next attempt goes to the same host: a
//! different host is tried at once.

use std::time::Duration;

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

/// Base of the exponential backoff before retrying the same host.
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Cap of the exponential backoff.
pub const BACKOFF_CAP: Duration = Duration::from_millis(250);

/// Full-jitter backoff before retry number `retry` (1-based) to the same host,
/// floored at `floor` (HAProxy's turn-around: a host that just failed gets a moment).
pub fn backoff(retry: u32, floor: Duration) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(1u32 << retry.min(16))
        .min(BACKOFF_CAP);
    let jitter = Duration::from_nanos(rng::below(exp.as_nanos() as u64 + 1));
    jitter.max(floor)
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
    fn backoff_is_capped_and_floored() {
        for retry in 1..40 {
            let b = backoff(retry, Duration::ZERO);
            assert!(b <= BACKOFF_CAP, "{b:?}");
            assert!(backoff(retry, Duration::from_secs(1)) >= Duration::from_secs(1));
        }
    }
}
