//! The live balancer: the configuration in force with the host table, key
//! pools and upstream agent built from it, plus process-wide flags.
//!
//! A request takes one `Arc<Balancer>` when it starts and keeps it to the end,
//! so a configuration swapped in meanwhile never changes a request halfway.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::Config;
use crate::hedge::Hedger;
use crate::hosts::Hosts;
use crate::keys::KeyPool;
use crate::retry::Budget;
use crate::upstream;

/// One generation of configuration and everything built from it.
pub struct Balancer {
    /// The configuration in force.
    pub config: Config,
    /// Hosts with their health and counters.
    pub hosts: Hosts,
    /// The global key pool (hosts with their own keys have their own pools).
    pub keys: Arc<KeyPool>,
    /// The shared upstream agent (one connection pool).
    pub agent: ureq::Agent,
}

impl Balancer {
    /// Build everything a configuration describes.
    pub fn new(config: Config) -> Self {
        let keys = Arc::new(KeyPool::new(&config.api_keys));
        let hosts = Hosts::new(&config.hosts, &keys, config.settings.strategy);
        let agent = upstream::agent(&config.settings);
        Balancer {
            config,
            hosts,
            keys,
            agent,
        }
    }
}

/// State shared by the acceptor and every worker.
pub struct Shared {
    current: Mutex<Arc<Balancer>>,
    draining: AtomicBool,
    /// When the process started serving.
    pub started: Instant,
    /// The process-wide retry budget (it outlives configuration generations).
    pub budget: Budget,
    /// Hedged requests: token bucket, thread pool, latency samples.
    pub hedger: Hedger,
}

impl Shared {
    /// Shared state around a first balancer.
    pub fn new(balancer: Balancer) -> Self {
        Shared {
            current: Mutex::new(Arc::new(balancer)),
            draining: AtomicBool::new(false),
            started: Instant::now(),
            budget: Budget::default(),
            hedger: Hedger::new(),
        }
    }

    /// The balancer in force now.
    pub fn current(&self) -> Arc<Balancer> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replace the balancer; requests in flight keep the one they took.
    pub fn replace(&self, balancer: Balancer) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(balancer);
    }

    /// True once shutdown has begun.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Begin shutdown: stop accepting, finish what is in flight.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}
