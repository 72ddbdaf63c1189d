//! Upstream hosts: who they are, how busy they are, and in which order a
//! request tries them.
//!
//! Selection is smooth weighted round-robin (nginx's algorithm): over any
//! window of `sum(weights)` picks each host is chosen `weight` times, spread
//! out rather than in bursts. Failover is an iterator of candidates
//! ([`Candidates`]): each `next()` picks among the hosts this request has not
//! tried yet, primaries before backups, and only when every host has been
//! tried does it start over, so a retry lands on a different host whenever
//! one exists.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::HostSpec;
use crate::keys::KeyPool;

/// One upstream host and its live counters.
#[derive(Debug)]
pub struct Host {
    /// Index in the host table.
    pub index: usize,
    /// The configured host.
    pub spec: HostSpec,
    /// Keys this host may be sent (its own, or the global pool).
    pub keys: Arc<KeyPool>,
    /// Requests currently being sent to or read from this host.
    pub in_flight: AtomicUsize,
    /// Attempts that ended in a host failure (connect, timeout, 5xx).
    pub failures: AtomicU64,
    /// Attempts that produced a usable response.
    pub successes: AtomicU64,
}

impl Host {
    /// Count this host busy until the guard drops.
    pub fn busy(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The URL for a request path such as `/v1/chat/completions?x=1`.
    pub fn url(&self, path: &str) -> String {
        let mut url = String::with_capacity(self.spec.base_url.len() + path.len());
        url.push_str(&self.spec.base_url);
        url.push_str(path);
        url
    }
}

/// Decrements a host's in-flight count when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Host>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The host table and the shared round-robin state.
#[derive(Debug)]
pub struct Hosts {
    hosts: Vec<Arc<Host>>,
    /// Smooth weighted round-robin "current weights", one per host.
    current: Mutex<Vec<i64>>,
}

impl Hosts {
    /// Build the table; hosts without their own keys share `global`.
    pub fn new(specs: &[HostSpec], global: &Arc<KeyPool>) -> Self {
        let hosts: Vec<Arc<Host>> = specs
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                let keys = match &spec.api_keys {
                    Some(own) => Arc::new(KeyPool::new(own)),
                    None => global.clone(),
                };
                Arc::new(Host {
                    index,
                    spec: spec.clone(),
                    keys,
                    in_flight: AtomicUsize::new(0),
                    failures: AtomicU64::new(0),
                    successes: AtomicU64::new(0),
                })
            })
            .collect();
        let current = Mutex::new(vec![0; hosts.len()]);
        Hosts { hosts, current }
    }

    /// Every host, in configuration order.
    pub fn all(&self) -> &[Arc<Host>] {
        &self.hosts
    }

    /// The failover order for one request.
    pub fn candidates(&self) -> Candidates<'_> {
        Candidates {
            hosts: self,
            tried: vec![false; self.hosts.len()],
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<i64>> {
        // A panic while holding this lock leaves valid weights behind.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Smooth weighted round-robin over the hosts `eligible` accepts.
    fn pick(&self, eligible: impl Fn(&Host) -> bool) -> Option<Arc<Host>> {
        let mut current = self.lock();
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for host in &self.hosts {
            if !eligible(host) {
                continue;
            }
            let w = i64::from(host.spec.weight);
            current[host.index] += w;
            total += w;
            if best.is_none_or(|b| current[host.index] > current[b]) {
                best = Some(host.index);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(self.hosts[best].clone())
    }
}

/// Hosts in the order one request should try them.
pub struct Candidates<'a> {
    hosts: &'a Hosts,
    tried: Vec<bool>,
}

impl Candidates<'_> {
    /// Whether `host` was already tried by this request.
    pub fn tried(&self, host: &Host) -> bool {
        self.tried.get(host.index).copied().unwrap_or(false)
    }
}

impl Iterator for Candidates<'_> {
    type Item = Arc<Host>;

    fn next(&mut self) -> Option<Arc<Host>> {
        let tried = &self.tried;
        let fresh = |backup: bool| {
            move |h: &Host| h.spec.backup == backup && !tried.get(h.index).copied().unwrap_or(true)
        };
        let host = self
            .hosts
            .pick(fresh(false))
            .or_else(|| self.hosts.pick(fresh(true)))
            .or_else(|| {
                // Every host tried: go round again, primaries first.
                self.hosts
                    .pick(|h| !h.spec.backup)
                    .or_else(|| self.hosts.pick(|_| true))
            })?;
        if let Some(t) = self.tried.get_mut(host.index) {
            *t = true;
        }
        Some(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn names(hosts: &Hosts, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| hosts.candidates().next().unwrap().spec.name.clone())
            .collect()
    }

    #[test]
    fn smooth_weighted_round_robin_spreads_picks() {
        let pool = Arc::new(KeyPool::default());
        let hosts = Hosts::new(
            &[
                spec("a", 5, false),
                spec("b", 1, false),
                spec("c", 1, false),
            ],
            &pool,
        );
        // nginx's documented sequence for weights 5,1,1.
        assert_eq!(names(&hosts, 7), ["a", "a", "b", "a", "c", "a", "a"]);
    }

    #[test]
    fn candidates_try_every_primary_before_backups_then_wrap() {
        let pool = Arc::new(KeyPool::default());
        let hosts = Hosts::new(
            &[spec("a", 1, false), spec("z", 1, true), spec("b", 1, false)],
            &pool,
        );
        let order: Vec<String> = hosts
            .candidates()
            .take(4)
            .map(|h| h.spec.name.clone())
            .collect();
        let mut first_two = order[..2].to_vec();
        first_two.sort();
        assert_eq!(first_two, ["a", "b"]);
        assert_eq!(order[2], "z");
        assert_ne!(
            order[3], "z",
            "after a full round, primaries come first again"
        );
    }

    #[test]
    fn in_flight_is_released_on_drop() {
        let pool = Arc::new(KeyPool::default());
        let hosts = Hosts::new(&[spec("a", 1, false)], &pool);
        let h = hosts.candidates().next().unwrap();
        {
            let _g = h.busy();
            assert_eq!(h.in_flight.load(Ordering::Relaxed), 1);
        }
        assert_eq!(h.in_flight.load(Ordering::Relaxed), 0);
    }
}
