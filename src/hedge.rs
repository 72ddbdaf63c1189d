//! Hedged requests: when the first attempt of a request has produced nothing
//! after `hedge.afterMs` (or, with `"auto"`, after the host's recent p95 time
//! to first byte, at least 500 ms), a second attempt starts on another host.
//! Whichever reaches its commit point first is sent to the client; the other
//! is cancelled and its connection closed at once.
//!
//! Guarantees: at most one hedge per request, only before the commit; hedges
//! are at most 5 % of requests (a token bucket filled by every request); they
//! run on a small pool of their own threads, so they never take a worker from
//! a normal request (a busy pool means no hedge, never a wait). The worker's
//! watch (see [`crate::watch`]) launches the hedge at the right moment and cuts
//! the first attempt short when the hedge wins.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::config::Hedge;
use crate::hosts::{Candidate, Host, Verdict};
use crate::keys::Key;
use crate::metrics;
use crate::proxy::{self, Proxied, Ready};
use crate::request::Headers;
use crate::retry::Outcome;
use crate::state::{Balancer, Shared};
use crate::upstream::{AttemptError, Outgoing};
use crate::watch;

/// Share of requests that may be hedged.
pub const HEDGE_RATIO: f64 = 0.05;
/// Most hedges that can be saved up for a burst.
pub const HEDGE_BURST: f64 = 5.0;
/// The shortest `"auto"` hedge delay.
pub const AUTO_FLOOR: Duration = Duration::from_millis(500);
/// Samples of time to first byte kept per host for `"auto"`.
const SAMPLES: usize = 100;
/// Samples needed before `"auto"` hedges at all.
const MIN_SAMPLES: usize = 20;
/// Hedge threads.
pub const HEDGE_THREADS: usize = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data: whatever panicked while holding it left it usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Process-wide hedging state: the token bucket, the pool, the latency samples.
pub struct Hedger {
    tokens: Mutex<f64>,
    jobs: Sender<Job>,
    samples: Mutex<HashMap<String, VecDeque<Duration>>>,
}

impl Default for Hedger {
    fn default() -> Self {
        Self::new()
    }
}

impl Hedger {
    /// Start the hedge threads.
    pub fn new() -> Self {
        // A rendezvous channel: a job is handed over only to a thread idle
        // in `recv`, never queued behind busy ones (a queued hedge would make
        // the worker wait for it, and start late, after it was cancelled).
        let (jobs, rx) = crossbeam_channel::bounded::<Job>(0);
        for i in 0..HEDGE_THREADS {
            let rx: Receiver<Job> = rx.clone();
            let spawned = thread::Builder::new()
                .name(format!("hedge-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        // A panic in one hedge must not take the thread with it.
                        let slot = job.slot.clone();
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(job)))
                            .is_err()
                        {
                            slot.finish(SlotState::Skipped);
                        }
                    }
                });
            if let Err(e) = spawned {
                log::warn!("cannot start hedge thread: {e}; hedging runs with fewer threads");
            }
        }
        Hedger {
            tokens: Mutex::new(1.0),
            jobs,
            samples: Mutex::new(HashMap::new()),
        }
    }

    /// Every request earns a twentieth of a hedge.
    pub fn deposit(&self) {
        let mut t = lock(&self.tokens);
        *t = (*t + HEDGE_RATIO).min(HEDGE_BURST);
    }

    fn take_token(&self) -> bool {
        let mut t = lock(&self.tokens);
        if *t >= 1.0 {
            *t -= 1.0;
            true
        } else {
            false
        }
    }

    fn refund(&self) {
        let mut t = lock(&self.tokens);
        *t = (*t + 1.0).min(HEDGE_BURST);
    }

    /// Record a time to first byte of `host`.
    pub fn observe(&self, host: &str, d: Duration) {
        let mut all = lock(&self.samples);
        // Looked up by `&str` first: the name is copied only for a new host.
        let v = match all.get_mut(host) {
            Some(v) => v,
            None => all.entry(host.to_string()).or_default(),
        };
        if v.len() == SAMPLES {
            v.pop_front();
        }
        v.push_back(d);
    }

    /// The p95 time to first byte of `host`, once there are enough samples.
    pub fn p95(&self, host: &str) -> Option<Duration> {
        let all = lock(&self.samples);
        let v = all.get(host)?;
        if v.len() < MIN_SAMPLES {
            return None;
        }
        let mut sorted: Vec<Duration> = v.iter().copied().collect();
        sorted.sort();
        sorted.get(sorted.len() * 95 / 100).copied()
    }

    fn launch(&self, job: Job) {
        if !self.take_token() {
            job.slot.finish(SlotState::Skipped);
            return;
        }
        let slot = job.slot.clone();
        slot.finish(SlotState::Running);
        match self.jobs.try_send(job) {
            Ok(()) => log::debug!("hedge launched"),
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                self.refund();
                job.slot.finish(SlotState::Skipped);
            }
        }
    }
}

/// Where a hedge leaves its result for the worker.
pub struct Slot {
    state: Mutex<SlotState>,
    changed: Condvar,
    cancelled: Arc<AtomicBool>,
}

enum SlotState {
    Armed,
    Running,
    Ready(Box<Ready>),
    Failed(Arc<Host>, Option<Arc<Key>>, Outcome),
    Skipped,
    Taken,
}

impl Slot {
    fn new() -> Self {
        Slot {
            state: Mutex::new(SlotState::Armed),
            changed: Condvar::new(),
            cancelled: Arc::new(AtomicBool::new(false)),
        }
    }

    fn finish(&self, to: SlotState) {
        let mut st = lock(&self.state);
        if matches!(to, SlotState::Ready(_)) && self.cancelled.load(Ordering::Relaxed) {
            return; // dropping the result closes the loser's connection
        }
        *st = to;
        self.changed.notify_all();
    }

    /// A hedge attempt is (or was) under way.
    pub fn launched(&self) -> bool {
        matches!(
            *lock(&self.state),
            SlotState::Running | SlotState::Ready(_) | SlotState::Failed(..)
        )
    }

    /// The hedge reached its commit point.
    pub fn is_ready(&self) -> bool {
        matches!(*lock(&self.state), SlotState::Ready(_))
    }

    /// The first attempt won (or the request ended): stop the hedge.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        let mut st = lock(&self.state);
        if matches!(*st, SlotState::Ready(_)) {
            *st = SlotState::Taken;
        }
    }

    /// Wait for a running hedge: `Ok` when it is ready to commit.
    pub fn wait(&self, deadline: Instant) -> Result<(), AttemptError> {
        let mut st = lock(&self.state);
        loop {
            match &*st {
                SlotState::Ready(_) => return Ok(()),
                SlotState::Running | SlotState::Armed => {}
                _ => return Err(crate::upstream::failure_text("the hedge failed")),
            }
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                self.cancel();
                return Err(crate::upstream::failure_text("the hedge ran out of time"));
            }
            st = self
                .changed
                .wait_timeout(st, (deadline - now).min(watch::TICK))
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
            drop(st);
            if watch::poll_client() {
                self.cancel();
                return Err(AttemptError::ClientGone);
            }
            st = lock(&self.state);
        }
    }

    /// Take the hedge's result to commit it.
    pub fn take_ready(&self) -> Option<Ready> {
        let mut st = lock(&self.state);
        match std::mem::replace(&mut *st, SlotState::Taken) {
            SlotState::Ready(r) => Some(*r),
            other => {
                *st = other;
                None
            }
        }
    }

    /// What a failed hedge tried, for the trail.
    pub fn failure(&self) -> Option<(Arc<Host>, Option<Arc<Key>>, Outcome)> {
        match &*lock(&self.state) {
            SlotState::Failed(h, k, o) => Some((h.clone(), k.clone(), *o)),
            _ => None,
        }
    }
}

/// Everything a hedge thread needs, owned.
struct Job {
    shared: Arc<Shared>,
    b: Arc<Balancer>,
    method: String,
    path: String,
    headers: Headers,
    body: Arc<Vec<u8>>,
    request_id: String,
    model: Option<Arc<str>>,
    exclude: usize,
    deadline: Instant,
    slot: Arc<Slot>,
}

/// Prepare a hedge for the first attempt `c` of `req`, to be launched by the
/// worker's watch when the delay has passed; `None` when hedging does not apply.
pub fn arm(
    shared: &Arc<Shared>,
    b: &Arc<Balancer>,
    req: &Proxied<'_>,
    c: &Candidate,
    deadline: Instant,
) -> Option<Arc<Slot>> {
    let delay = match b.config.settings.hedge {
        Hedge::Off => return None,
        Hedge::After(d) => d,
        Hedge::Auto => shared.hedger.p95(&c.host.spec.name)?.max(AUTO_FLOOR),
    };
    // A hedge is an attempt of its own: `maxAttempts: 1` leaves no room for it.
    if b.config.settings.max_attempts < 2
        || b.hosts.all().iter().filter(|h| !h.spec.backup).count() < 2
    {
        return None;
    }
    let at = Instant::now() + delay;
    if at >= deadline {
        return None;
    }
    let slot = Arc::new(Slot::new());
    let shared = shared.clone();
    let job = Job {
        shared: shared.clone(),
        b: b.clone(),
        method: req.outgoing.method.to_string(),
        path: req.outgoing.path.to_string(),
        headers: req.outgoing.headers.clone(),
        body: req.body.clone(),
        request_id: req.outgoing.request_id.to_string(),
        model: req.model.clone(),
        exclude: c.host.index,
        deadline,
        slot: slot.clone(),
    };
    watch::set_hedge(
        at,
        Box::new(move || shared.hedger.launch(job)),
        slot.clone(),
    );
    Some(slot)
}

/// A hedge thread's work: one attempt on another host, up to its commit point.
fn run(job: Job) {
    let _watch = watch::start(None);
    watch::set_cancel(job.slot.cancelled.clone());
    let b = &job.b;
    // A hedge that never leaves (cancelled first, or nowhere to go) gives
    // its token back: the 5 % is of hedges sent, not of hedges tried.
    if job.slot.cancelled.load(Ordering::Relaxed) {
        job.shared.hedger.refund();
        job.slot.finish(SlotState::Skipped);
        return;
    }
    let mut candidates = b.hosts.candidates().for_model(job.model.clone());
    let mut chosen = None;
    for _ in 0..b.hosts.all().len() {
        let Some(c) = candidates.next() else { break };
        // A hedge copies a request a primary is still serving, so no
        // primary is out of options: a backup is no place for it.
        if c.host.index == job.exclude || c.probe || c.repeat || c.host.spec.backup {
            b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
            continue;
        }
        chosen = Some(c);
        break;
    }
    let Some(c) = chosen else {
        job.shared.hedger.refund();
        job.slot.finish(SlotState::Skipped);
        return;
    };
    let outgoing = Outgoing {
        method: &job.method,
        path: &job.path,
        headers: &job.headers,
        body: &job.body,
        request_id: &job.request_id,
    };
    let begun = metrics::attempt_begins();
    match proxy::run_to_commit(b, &outgoing, &c.host, c.key.as_ref(), job.deadline) {
        Ok(mut ready) => {
            ready.hedged = true;
            job.slot.finish(SlotState::Ready(Box::new(ready)));
        }
        Err(AttemptError::Failed(f)) => {
            proxy::learn(b, &c, &f, job.model.as_ref());
            // Counted here, on this thread's own marks (a winner is counted
            // when the worker commits it).
            let outcome = metrics::AttemptOutcome::of(f.outcome);
            b.metrics.attempt(b, &c.host, begun, Some(outcome), false);
            metrics::begin_request();
            job.slot
                .finish(SlotState::Failed(c.host.clone(), c.key.clone(), f.outcome));
        }
        Err(_) => {
            b.hosts.record(&c.host, Verdict::Unknown, false, None);
            job.slot.finish(SlotState::Skipped);
        }
    }
}
