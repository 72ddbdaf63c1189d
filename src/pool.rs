//! Idle upstream connections, kept here under ureq instead of in ureq's pool.
//!
//! ureq's pool is one list for all hosts behind one lock, and every request
//! runs over all of it twice (on the way out and on the way back), counting
//! the idle connections of each host against each other host
//! (`update_position_per_host`): the cost grows with idle connections times
//! hosts, and every worker waits for it. With 20 hosts and 8 workers that
//! was 74 % of the balancer's instructions (252k per request, against 57k
//! with one host); with the default 256 workers a pool can hold 2,048 idle
//! connections. ureq also handed out the least recently used connection, so
//! none ever sat idle long enough to be closed. ureq's pool is therefore
//! given no room (`max_idle_connections(0)`): each connection it would have
//! kept comes back here when ureq drops it.
//!
//! Guarantees: a connection is kept only after ureq found its exchange
//! complete (it asks [`Transport::is_open`] on the way back, with nothing
//! unread); it is reused only for the same scheme and authority; taking and
//! returning cost a hash lookup and a push or pop under one short lock;
//! the most recently used connection goes out first, so the ones left over
//! after a burst sit idle and are closed after `max_idle` (within a
//! [`SWEEP`] more, by a thread of the pool's own when no request comes); at most
//! `per_host` idle connections per destination and `total` in all; none is
//! reused once [`MAX_LIFE`] old (a host that moved to a new address, found
//! by the name cache, is reached there within that time). A connection
//! taken out is asked [`Transport::is_open`] again, which arms the probe our
//! transports run before the next write (see [`crate::transport`]).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, Instant};

use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, Transport,
};
use ureq::Error;

/// Age after which a connection is closed instead of reused, as nginx's
/// `keepalive_time` (1 h there): addresses change, and a connection made
/// before a change would otherwise serve for as long as traffic keeps it busy.
pub const MAX_LIFE: Duration = Duration::from_secs(300);
/// How often idle connections of every destination are looked over for age,
/// not only those of the destination a request goes to.
const SWEEP: Duration = Duration::from_secs(1);

/// Connects through `inner` only when no idle connection to the same
/// destination is at hand; what it hands out comes back to it.
pub struct PoolingConnector<C> {
    inner: C,
    idle: Arc<Idle>,
}

impl<C> PoolingConnector<C> {
    /// Keep up to `per_host` idle connections per destination and `total` in
    /// all, each for at most `max_idle`.
    pub fn new(inner: C, per_host: usize, total: usize, max_idle: Duration) -> Self {
        let idle = Idle::new(per_host, total, max_idle);
        start_sweeper(Arc::downgrade(&idle));
        PoolingConnector { inner, idle }
    }
}

/// Sweep `idle` every [`SWEEP`] on a thread of its own until it is gone:
/// requests sweep only as they pass, so after the last one of a burst its
/// idle connections (up to `total`) would stay open until the next request,
/// however far off. Without the thread (none could be started) they still
/// go then.
fn start_sweeper(idle: Weak<Idle>) {
    let started = thread::Builder::new()
        .name("pool-sweep".into())
        .spawn(move || loop {
            thread::sleep(SWEEP);
            let Some(idle) = idle.upgrade() else {
                return;
            };
            let stale = idle.sweep_now(Instant::now());
            // Not kept across the sleep: the agent's end ends the pool.
            drop(idle);
            drop(stale);
        });
    if let Err(e) = started {
        log::warn!("idle upstream connections are closed only when requests pass: {e}");
    }
}

impl<C: fmt::Debug> fmt::Debug for PoolingConnector<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolingConnector")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<C> Connector<()> for PoolingConnector<C>
where
    C: Connector<()>,
{
    type Out = Pooled;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<()>,
    ) -> Result<Option<Pooled>, Error> {
        let tls = details.needs_tls();
        let authority = details.uri.authority().map_or("", |a| a.as_str());
        let now = Instant::now();
        let (found, stale) = self.idle.take(tls, authority, now);
        drop(stale);
        if let Some(parked) = found {
            return Ok(Some(Pooled {
                transport: Some(parked.transport),
                dest: parked.dest,
                tls,
                born: parked.born,
                home: Arc::downgrade(&self.idle),
                reusable: false,
            }));
        }
        let Some(transport) = self.inner.connect(details, chained)? else {
            return Ok(None);
        };
        Ok(Some(Pooled {
            transport: Some(Box::new(transport)),
            dest: Arc::from(authority),
            tls,
            born: now,
            home: Arc::downgrade(&self.idle),
            reusable: false,
        }))
    }
}

/// A connection on loan to ureq; dropped, it goes back to its pool if ureq
/// last found it fit for another exchange.
pub struct Pooled {
    /// `None` only once dropped.
    transport: Option<Box<dyn Transport>>,
    dest: Arc<str>,
    tls: bool,
    born: Instant,
    /// Weak: a connection outliving its agent is simply closed.
    home: Weak<Idle>,
    /// ureq's last question, [`Transport::is_open`], was answered yes, and no
    /// I/O came after it.
    reusable: bool,
}

impl fmt::Debug for Pooled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pooled")
            .field("dest", &self.dest)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl Pooled {
    fn inner(&mut self) -> &mut dyn Transport {
        // Only a dropped connection has none, and nothing calls it then.
        &mut **self
            .transport
            .get_or_insert_with(|| Box::new(Closed(LazyBuffers::new(1, 1))))
    }
}

impl Transport for Pooled {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner().buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        self.reusable = false;
        self.inner().transmit_output(amount, timeout)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        self.reusable = false;
        self.inner().await_input(timeout)
    }

    /// ureq asks only when it would keep the connection (the exchange is
    /// complete and nothing is left unread), right before dropping it.
    fn is_open(&mut self) -> bool {
        self.reusable = self.inner().is_open();
        self.reusable
    }

    fn is_tls(&self) -> bool {
        self.transport.as_ref().is_some_and(|t| t.is_tls())
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if !self.reusable {
            return;
        }
        let Some(idle) = self.home.upgrade() else {
            return;
        };
        let Some(transport) = self.transport.take() else {
            return;
        };
        let parked = Parked {
            transport,
            dest: self.dest.clone(),
            born: self.born,
            since: Instant::now(),
        };
        // Closed outside our lock (a close is a syscall); ureq's is held
        // here, so `put` closes no more than this one or its destination's oldest.
        let closed = idle.put(self.tls, parked);
        drop(closed);
    }
}

/// Stands in for a connection that is gone.
#[derive(Debug)]
struct Closed(LazyBuffers);

impl Transport for Closed {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.0
    }

    fn transmit_output(&mut self, _: usize, _: NextTimeout) -> Result<(), Error> {
        Err(Error::ConnectionFailed)
    }

    fn await_input(&mut self, _: NextTimeout) -> Result<bool, Error> {
        Err(Error::ConnectionFailed)
    }

    fn is_open(&mut self) -> bool {
        false
    }
}

/// An idle connection.
struct Parked {
    transport: Box<dyn Transport>,
    dest: Arc<str>,
    born: Instant,
    /// When it went idle.
    since: Instant,
}

/// The idle connections of one agent.
struct Idle {
    per_host: usize,
    total: usize,
    max_idle: Duration,
    table: Mutex<Table>,
}

/// FNV-1a, for the table's keys: they are the authorities of hosts.json,
/// never a client's input, so no defence against chosen collisions is
/// needed, and SipHash (the default) cost more than the rest of a lookup,
/// which every request makes twice.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

struct Table {
    /// By authority: plain and TLS connections, oldest idle first.
    by_dest: HashMap<Arc<str>, [VecDeque<Parked>; 2], BuildHasherDefault<Fnv>>,
    /// Idle connections in all.
    count: usize,
    /// When every destination was last looked over.
    swept: Instant,
}

impl Idle {
    fn new(per_host: usize, total: usize, max_idle: Duration) -> Arc<Idle> {
        Arc::new(Idle {
            per_host,
            total,
            max_idle,
            table: Mutex::new(Table {
                by_dest: HashMap::default(),
                count: 0,
                swept: Instant::now(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every state is valid, so a panic elsewhere leaves nothing to repair.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently parked usable connection to `dest`, and whatever
    /// was found too old on the way (for the caller to close unlocked).
    fn take(&self, tls: bool, dest: &str, now: Instant) -> (Option<Parked>, Vec<Parked>) {
        let mut stale = Vec::new();
        let mut table = self.lock();
        self.sweep(&mut table, now, &mut stale);
        let Table { by_dest, count, .. } = &mut *table;
        let Some(lists) = by_dest.get_mut(dest) else {
            return (None, stale);
        };
        let list = &mut lists[usize::from(tls)];
        self.expire(list, count, now, &mut stale);
        while let Some(mut parked) = list.pop_back() {
            *count -= 1;
            // Asked again with no I/O since: arms the transport's probe.
            if now.saturating_duration_since(parked.born) < MAX_LIFE && parked.transport.is_open() {
                return (Some(parked), stale);
            }
            stale.push(parked);
        }
        (None, stale)
    }

    /// Keep `parked`; returns what no longer fits (for the caller to close unlocked).
    fn put(&self, tls: bool, parked: Parked) -> Vec<Parked> {
        let mut stale = Vec::new();
        if parked.since.saturating_duration_since(parked.born) >= MAX_LIFE || self.per_host == 0 {
            stale.push(parked);
            return stale;
        }
        // No sweep here: ureq drops a connection it keeps while holding its
        // own pool's lock, which every request takes to connect, so what a
        // sweep closes would stall them all. `take` and the sweeper thread
        // sweep instead.
        let mut table = self.lock();
        if table.count >= self.total {
            stale.push(parked);
            return stale;
        }
        let Table { by_dest, count, .. } = &mut *table;
        let lists = match by_dest.get_mut(&*parked.dest) {
            Some(lists) => lists,
            None => by_dest.entry(parked.dest.clone()).or_default(),
        };
        let list = &mut lists[usize::from(tls)];
        if list.len() >= self.per_host {
            if let Some(oldest) = list.pop_front() {
                *count -= 1;
                stale.push(oldest);
            }
        }
        list.push_back(parked);
        *count += 1;
        stale
    }

    /// Move connections idle longer than `max_idle` from the front of `list` to `stale`.
    fn expire(
        &self,
        list: &mut VecDeque<Parked>,
        count: &mut usize,
        now: Instant,
        stale: &mut Vec<Parked>,
    ) {
        while list
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.since) >= self.max_idle)
        {
            if let Some(p) = list.pop_front() {
                *count -= 1;
                stale.push(p);
            }
        }
    }

    /// Expire idle connections as [`Idle::sweep`] does; returns them for
    /// the caller to close unlocked.
    fn sweep_now(&self, now: Instant) -> Vec<Parked> {
        let mut stale = Vec::new();
        let mut table = self.lock();
        self.sweep(&mut table, now, &mut stale);
        drop(table);
        stale
    }

    /// At most once per [`SWEEP`], expire the idle connections of every destination.
    fn sweep(&self, table: &mut Table, now: Instant, stale: &mut Vec<Parked>) {
        if now.saturating_duration_since(table.swept) < SWEEP {
            return;
        }
        table.swept = now;
        let Table { by_dest, count, .. } = table;
        for lists in by_dest.values_mut() {
            for list in lists.iter_mut() {
                self.expire(list, count, now, stale);
            }
        }
        by_dest.retain(|_, lists| lists.iter().any(|l| !l.is_empty()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A connection that counts the liveness questions it was asked.
    struct Fake {
        id: usize,
        open: bool,
        asked: Arc<AtomicUsize>,
        buffers: LazyBuffers,
    }

    /// Its id is what tests read back (through `dyn Transport`'s `Debug`).
    impl fmt::Debug for Fake {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "Fake {}", self.id)
        }
    }

    impl Transport for Fake {
        fn buffers(&mut self) -> &mut dyn Buffers {
            &mut self.buffers
        }
        fn transmit_output(&mut self, _: usize, _: NextTimeout) -> Result<(), Error> {
            Ok(())
        }
        fn await_input(&mut self, _: NextTimeout) -> Result<bool, Error> {
            Ok(true)
        }
        fn is_open(&mut self) -> bool {
            self.asked.fetch_add(1, Ordering::SeqCst);
            self.open
        }
    }

    /// A pool without its sweeper thread: tests drive its clock themselves.
    fn idle(per_host: usize, total: usize, max_idle: Duration) -> Arc<Idle> {
        Idle::new(per_host, total, max_idle)
    }

    /// A connection to `dest` (plain HTTP) on loan from `idle`, as ureq holds it.
    fn lent(idle: &Arc<Idle>, dest: &str, id: usize, asked: &Arc<AtomicUsize>) -> Pooled {
        Pooled {
            transport: Some(Box::new(Fake {
                id,
                open: true,
                asked: asked.clone(),
                buffers: LazyBuffers::new(1, 1),
            })),
            dest: Arc::from(dest),
            tls: false,
            born: Instant::now(),
            home: Arc::downgrade(idle),
            reusable: false,
        }
    }

    fn id_of(p: Parked) -> usize {
        let text = format!("{:?}", p.transport);
        text.strip_prefix("Fake ")
            .and_then(|t| t.parse().ok())
            .expect("a Fake")
    }

    /// ureq's end of an exchange: asked, kept, dropped.
    fn give_back(mut p: Pooled) {
        assert!(p.is_open());
        drop(p);
    }

    #[test]
    fn only_what_ureq_found_fit_comes_back_and_the_latest_goes_out_first() {
        let idle = idle(4, 64, Duration::from_secs(15));
        let asked = Arc::new(AtomicUsize::new(0));
        // Dropped without ureq's question: an exchange that did not complete.
        drop(lent(&idle, "a:1", 0, &asked));
        assert_eq!(idle.lock().count, 0);
        // Returned in the order 1, 2, 3: taken back 3, 2, 1.
        for id in 1..=3 {
            give_back(lent(&idle, "a:1", id, &asked));
        }
        assert_eq!(idle.lock().count, 3);
        let now = Instant::now();
        let order: Vec<usize> = (0..3)
            .filter_map(|_| idle.take(false, "a:1", now).0.map(id_of))
            .collect();
        assert_eq!(order, vec![3, 2, 1]);
        // Each was asked again on the way out (which arms the probe).
        assert_eq!(asked.load(Ordering::SeqCst), 6);
        assert!(idle.take(false, "a:1", now).0.is_none());
    }

    #[test]
    fn destinations_and_schemes_do_not_mix() {
        let idle = idle(4, 64, Duration::from_secs(15));
        let asked = Arc::new(AtomicUsize::new(0));
        give_back(lent(&idle, "a:1", 1, &asked));
        let now = Instant::now();
        assert!(idle.take(false, "b:1", now).0.is_none());
        assert!(idle.take(true, "a:1", now).0.is_none());
        assert_eq!(idle.take(false, "a:1", now).0.map(id_of), Some(1));
    }

    #[test]
    fn a_connection_that_went_stale_while_idle_is_closed_not_lent() {
        let idle = idle(4, 64, Duration::from_secs(15));
        let asked = Arc::new(AtomicUsize::new(0));
        give_back(lent(&idle, "a:1", 1, &asked));
        // Parked fit, then the upstream hung up while it sat idle.
        let hung_up = Parked {
            transport: Box::new(Fake {
                id: 2,
                open: false,
                asked: asked.clone(),
                buffers: LazyBuffers::new(1, 1),
            }),
            dest: Arc::from("a:1"),
            born: Instant::now(),
            since: Instant::now(),
        };
        assert!(idle.put(false, hung_up).is_empty());
        let (found, stale) = idle.take(false, "a:1", Instant::now());
        assert_eq!(found.map(id_of), Some(1));
        assert_eq!(stale.into_iter().map(id_of).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn limits_per_destination_in_all_and_in_time() {
        let asked = Arc::new(AtomicUsize::new(0));
        // Per destination: the oldest idle one makes room.
        let two = idle(2, 64, Duration::from_secs(15));
        for id in 1..=3 {
            give_back(lent(&two, "a:1", id, &asked));
        }
        let now = Instant::now();
        let left: Vec<usize> = (0..3)
            .filter_map(|_| two.take(false, "a:1", now).0.map(id_of))
            .collect();
        assert_eq!(left, vec![3, 2]);
        // In all: a full pool closes what comes back.
        let full = idle(4, 1, Duration::from_secs(15));
        give_back(lent(&full, "a:1", 1, &asked));
        give_back(lent(&full, "b:1", 2, &asked));
        assert_eq!(full.lock().count, 1);
        // In time: idle longer than max_idle, or older than MAX_LIFE.
        let brief = idle(4, 64, Duration::from_millis(1));
        give_back(lent(&brief, "a:1", 1, &asked));
        let later = Instant::now() + Duration::from_millis(5);
        let (found, stale) = brief.take(false, "a:1", later);
        assert!(found.is_none());
        assert_eq!(stale.len(), 1);
        let old = idle(4, 64, Duration::from_secs(15));
        let mut p = lent(&old, "a:1", 1, &asked);
        if let Some(born) = Instant::now().checked_sub(MAX_LIFE) {
            p.born = born;
            give_back(p);
            assert_eq!(old.lock().count, 0);
        }
    }

    #[test]
    fn idle_connections_of_every_destination_expire_by_the_sweep() {
        let idle = idle(4, 64, Duration::from_millis(1));
        let asked = Arc::new(AtomicUsize::new(0));
        give_back(lent(&idle, "a:1", 1, &asked));
        // Asked for another destination a sweep later: a's connection goes too.
        let later = Instant::now() + SWEEP + Duration::from_millis(5);
        let (found, stale) = idle.take(false, "b:1", later);
        assert!(found.is_none());
        assert_eq!(stale.len(), 1);
        assert_eq!(idle.lock().count, 0);
        assert!(idle.lock().by_dest.is_empty());
    }

    #[test]
    fn a_connection_outliving_its_agent_is_closed() {
        let idle = idle(4, 64, Duration::from_secs(15));
        let asked = Arc::new(AtomicUsize::new(0));
        let p = lent(&idle, "a:1", 1, &asked);
        drop(idle);
        give_back(p);
    }

    #[test]
    fn idle_connections_are_closed_after_max_idle_with_no_request_to_come() {
        let pool = PoolingConnector::new((), 4, 64, Duration::from_millis(1));
        let asked = Arc::new(AtomicUsize::new(0));
        give_back(lent(&pool.idle, "a:1", 1, &asked));
        give_back(lent(&pool.idle, "b:1", 2, &asked));
        // The last request of a burst has come and gone: nothing takes or
        // returns a connection from now on, yet both are closed.
        let end = Instant::now() + Duration::from_secs(10);
        while pool.idle.lock().count > 0 {
            assert!(
                Instant::now() < end,
                "idle connections still open after 10 s"
            );
            thread::sleep(Duration::from_millis(10));
        }
        assert!(pool.idle.lock().by_dest.is_empty());
    }

    #[test]
    fn a_connection_coming_back_closes_no_other_idle_one() {
        // ureq drops the connections it keeps while holding its own pool's
        // lock, which every request takes to connect: a return must not
        // close a sweep's worth of connections there.
        let idle = idle(4, 64, Duration::from_millis(1));
        let asked = Arc::new(AtomicUsize::new(0));
        give_back(lent(&idle, "a:1", 1, &asked));
        let later = Instant::now() + SWEEP + Duration::from_millis(5);
        let back = Parked {
            transport: Box::new(Fake {
                id: 2,
                open: true,
                asked: asked.clone(),
                buffers: LazyBuffers::new(1, 1),
            }),
            dest: Arc::from("b:1"),
            born: later,
            since: later,
        };
        assert!(idle.put(false, back).is_empty());
        // The next take (outside ureq's lock) closes it instead.
        let (found, stale) = idle.take(false, "b:1", later);
        assert_eq!(found.map(id_of), Some(2));
        assert_eq!(stale.into_iter().map(id_of).collect::<Vec<_>>(), vec![1]);
    }

    /// The count of idle connections is what `total` is checked against: one
    /// that drifted up would have the pool refuse every connection for good,
    /// one that drifted down would let it grow past `total`. Random takes and
    /// returns (fit and stale, young and old, two schemes, three
    /// destinations, time moving on) keep it equal to what the lists hold.
    #[test]
    fn the_idle_count_is_what_the_lists_hold_through_any_sequence() {
        let asked = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        for seed in 1..=50 {
            crate::rng::seed(seed);
            let idle = idle(3, 7, Duration::from_millis(50));
            let mut now = start;
            for _ in 0..300 {
                now += Duration::from_millis(crate::rng::below(30));
                let dest = ["a:1", "b:1", "c:1"][crate::rng::below(3) as usize];
                let tls = crate::rng::below(2) == 1;
                if crate::rng::below(3) == 0 {
                    drop(idle.take(tls, dest, now));
                } else {
                    let age = Duration::from_millis(crate::rng::below(2) * 400_000);
                    let back = Parked {
                        transport: Box::new(Fake {
                            id: 0,
                            open: crate::rng::below(5) != 0,
                            asked: asked.clone(),
                            buffers: LazyBuffers::new(1, 1),
                        }),
                        dest: Arc::from(dest),
                        born: now.checked_sub(age).unwrap_or(now),
                        since: now,
                    };
                    drop(idle.put(tls, back));
                }
                let table = idle.lock();
                let held: usize = table.by_dest.values().flatten().map(VecDeque::len).sum();
                assert_eq!(table.count, held, "seed {seed}");
                assert!(held <= 7, "seed {seed}");
            }
            // Emptied, it takes connections again.
            let later = now + Duration::from_secs(1) + SWEEP;
            for dest in ["a:1", "b:1", "c:1"] {
                for tls in [false, true] {
                    while idle.take(tls, dest, later).0.is_some() {}
                }
            }
            assert_eq!(idle.lock().count, 0, "seed {seed}");
            give_back(lent(&idle, "a:1", 1, &asked));
            assert_eq!(idle.lock().count, 1, "seed {seed}");
        }
    }
}
