//! The live balancer: the configuration in force with the host table, key
//! pools and upstream agent built from it, plus process-wide flags.
//!
//! A request takes one `Arc<Balancer>` when it starts and keeps it to the end,
//! so a configuration swapped in meanwhile never changes a request halfway.
//! Metrics, the retry budget and the reload bookkeeping belong to the process,
//! not to a generation: they live in [`Shared`] and survive every swap.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crate::config::Config;
use crate::hedge::Hedger;
use crate::hosts::Hosts;
use crate::keys::KeyPool;
use crate::metrics::{HostSeries, Metrics};
use crate::reload::ReloadStatus;
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
    /// Metric series of each host, by host index (filled when installed in [`Shared`]).
    pub series: Vec<Arc<HostSeries>>,
    /// The process-wide metrics (the one in [`Shared`] once installed).
    pub metrics: Arc<Metrics>,
    /// Generation number: 1 for the first configuration, +1 per reload (set when installed).
    pub generation: u64,
    /// When this generation was installed.
    pub loaded_at: SystemTime,
}

impl Balancer {
    /// Build everything a configuration describes.
    pub fn new(config: Config) -> Self {
        let keys = Arc::new(KeyPool::new(&config.api_keys));
        let hosts = Hosts::new(&config.hosts, &keys, config.settings.strategy);
        let agent = upstream::agent(&config.settings);
        Balancer::from_parts(config, hosts, keys, agent)
    }

    /// A balancer from parts built elsewhere (a reload carries some over).
    pub fn from_parts(
        config: Config,
        hosts: Hosts,
        keys: Arc<KeyPool>,
        agent: ureq::Agent,
    ) -> Self {
        // Names are looked up now, so no first request waits for DNS.
        crate::resolve::warm(config.hosts.iter().map(|h| h.base_url.as_str()));
        Balancer {
            config,
            hosts,
            keys,
            agent,
            series: Vec::new(),
            metrics: Arc::default(),
            generation: 0,
            loaded_at: SystemTime::now(),
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
    /// The process-wide metrics.
    pub metrics: Arc<Metrics>,
    /// What the config reloader did.
    pub reload: ReloadStatus,
    /// The last generation number handed out.
    generations: AtomicU64,
}

impl Shared {
    /// Shared state around a first balancer.
    pub fn new(balancer: Balancer) -> Self {
        let metrics = Arc::new(Metrics::default());
        let generations = AtomicU64::new(0);
        let first = Self::install(&metrics, &generations, balancer);
        Shared {
            current: Mutex::new(first),
            draining: AtomicBool::new(false),
            started: Instant::now(),
            budget: Budget::default(),
            hedger: Hedger::new(),
            metrics,
            reload: ReloadStatus::default(),
            generations,
        }
    }

    /// Hand a balancer the process-wide metrics, its hosts' series and its
    /// generation number. Done here, once per generation, so that requests
    /// find their host series by index without a lock.
    fn install(metrics: &Arc<Metrics>, generations: &AtomicU64, mut b: Balancer) -> Arc<Balancer> {
        b.metrics = metrics.clone();
        b.series = b
            .hosts
            .all()
            .iter()
            .map(|h| metrics.host(&h.spec.name))
            .collect();
        b.generation = generations.fetch_add(1, Ordering::Relaxed) + 1;
        b.loaded_at = SystemTime::now();
        Arc::new(b)
    }

    /// The balancer in force now.
    pub fn current(&self) -> Arc<Balancer> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replace the balancer; requests in flight keep the one they took.
    /// Returns the generation number it got.
    pub fn replace(&self, balancer: Balancer) -> u64 {
        let b = Self::install(&self.metrics, &self.generations, balancer);
        let generation = b.generation;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = b;
        generation
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
