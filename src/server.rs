//! The HTTP/1.1 server: one acceptor thread, a bounded queue, a dispatcher
//! thread that hands queued connections to a pool of worker threads capped
//! at `workers`, and the keep-alive loop of one connection.
//!
//! The pool starts with [`INITIAL_WORKERS`] threads and grows on demand, up
//! to `workers`: after handing a connection to the last idle worker, the
//! dispatcher starts one more, so the next connection finds a thread ready
//! (starting one took 56 µs on average here, 1.8 ms at worst); a
//! connection that still finds none gets a thread started for it. Started
//! threads never exit before a drain (no idle timeout, so no churn and
//! nothing to tune); an idle thread costs about 10 KiB of RSS, which is why
//! 256 of them are not started up front.
//!
//! Guarantees: the acceptor never exits on an accept error (EMFILE included:
//! it backs off 5 ms doubling to 1 s and goes on); a full queue, a connection
//! that waited `queueWaitMs` for a worker (answered at that moment, even while
//! every worker is busy for minutes), or a client over its connection limit
//! gets an immediate 503 with `Retry-After` instead of silence; every socket
//! has `TCP_NODELAY` and read/write timeouts; a panic while serving a request
//! ends that request and its connection, never the worker. While a connection
//! waits for a worker, idle and slow connections give theirs up after
//! [`HEAD_GRACE`], so they cannot starve the pool.
//!
//! While every worker is busy, the acceptor passes new connections through
//! the [`crate::health_lane`] first, so health checks are answered without a
//! worker; everything else is queued from there as it would have been.
//!
//! [`start_with_reload`] also runs the config reloader ([`crate::reload`]) on
//! its own thread; it stops when the server drains.
//!
//! Shutdown ([`Server::shutdown`]) drains: the listener is closed at once (new
//! connections are refused, so a load balancer in front fails over instead of
//! queueing), requests in flight run to their end, connections that were
//! accepted already are served, and idle keep-alive connections are closed
//! within [`DRAIN_POLL`].

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::config::{Config, Overrides};
use crate::discovery;
use crate::health_lane;
use crate::metrics::{self, Shed};
use crate::proxy::{self, Proxied};
use crate::reload::{self, Reloader};
use crate::request::{Framing, Head, Limits, Reader, RequestError, Source};
use crate::response::{Responder, Scratch};
use crate::rng;
use crate::routes::{self, Route};
use crate::state::{Balancer, Shared};
use crate::upstream::Outgoing;
use crate::watch;

/// Longest request line or header line.
pub const MAX_LINE: usize = 8 * 1024;
/// Largest request head.
pub const MAX_HEAD: usize = 32 * 1024;
/// Most request header fields.
pub const MAX_HEADERS: usize = 100;
/// Longest time to receive a whole request body.
pub const BODY_DEADLINE: Duration = Duration::from_secs(120);
/// Stack of each worker thread; requests are shallow, so small stacks keep RSS low.
const WORKER_STACK: usize = 256 * 1024;
/// Worker threads started with the server (at most `workers`); the others
/// start when a connection finds every started one busy.
pub const INITIAL_WORKERS: usize = 4;
/// Longest a blocked client read goes without looking at the drain flag and
/// at connections waiting for a worker; the only read timeout a client socket
/// normally has, so setting it costs one syscall per connection.
pub const CLIENT_SLICE: Duration = Duration::from_millis(100);
/// Longest time an idle keep-alive connection goes without looking at the
/// drain flag, so that a shutdown is not held up by `keepAliveMs`.
pub const DRAIN_POLL: Duration = CLIENT_SLICE;
/// While another connection waits for a worker, how long a connection may
/// hold its worker without a complete request head: counted from its accept
/// (first request) or from the end of its previous response (keep-alive).
/// Past it, an idle connection is closed (a fresh one gets 503) and a partial
/// head gets 408, so idle and slowloris connections cannot starve the pool.
pub const HEAD_GRACE: Duration = Duration::from_secs(1);
/// How long [`Server::shutdown`] keeps trying to wake the acceptor.
const WAKE_LIMIT: Duration = Duration::from_secs(3);

/// A running server.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    dispatcher: Option<JoinHandle<()>>,
    pool: Arc<Pool>,
    /// A handle on the queue, to report its depth.
    queue: Receiver<Conn>,
    /// The config reloader, when started with [`start_with_reload`].
    reloader: Option<reload::Handle>,
    /// The dispatcher holds a connection that no worker has taken yet.
    waiting: Arc<AtomicBool>,
}

/// One accepted connection waiting for a worker.
pub(crate) struct Conn {
    /// The client's socket.
    pub(crate) stream: TcpStream,
    peer: SocketAddr,
    /// When it was accepted: the queue wait counts from here.
    pub(crate) accepted: Instant,
    _slot: Option<Slot>,
}

/// Why the listener could not open, naming the address (the port may come
/// from a flag, the environment or balancer.json) and the usual remedy.
fn listen_error(addr: SocketAddr, e: io::Error) -> io::Error {
    let hint = match e.kind() {
        io::ErrorKind::AddrInUse => {
            "; another process (perhaps another gaia-balancer) listens there: \
             stop it, or choose another port with --port, PORT or \"port\" in balancer.json"
        }
        io::ErrorKind::PermissionDenied => {
            "; ports below 1024 need root or CAP_NET_BIND_SERVICE: \
             choose a higher port with --port, PORT or \"port\" in balancer.json"
        }
        io::ErrorKind::AddrNotAvailable => {
            "; no interface of this machine has that address: \
             bind to one of its own addresses, 127.0.0.1 or 0.0.0.0"
        }
        _ => "",
    };
    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}{hint}"))
}

/// Start serving `config` on its bind address and port.
pub fn start(config: Config) -> io::Result<Server> {
    let settings = config.settings.clone();
    let wanted = SocketAddr::new(settings.bind, settings.port);
    let listener = TcpListener::bind(wanted).map_err(|e| listen_error(wanted, e))?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared::new(Balancer::new(config)));
    discovery::start(&shared)?;
    // The queue holds queueSize connections in the channel, plus the one in
    // the dispatcher's hand. (A zero-capacity channel would shed a connection
    // that arrives while the dispatcher is busy handing one over.)
    let (tx, rx) = crossbeam_channel::bounded::<Conn>(settings.queue_size.max(1));
    // Rendezvous: a connection passes only to a worker that is ready for it.
    let (handoff_tx, handoff_rx) = crossbeam_channel::bounded::<Conn>(0);
    let waiting = Arc::new(AtomicBool::new(false));
    let pool = Arc::new(Pool {
        cap: settings.workers.max(1),
        handles: Mutex::new(Vec::new()),
        idle: AtomicUsize::new(0),
        busy: AtomicUsize::new(0),
        handoff: handoff_rx,
        shared: shared.clone(),
        waiting: waiting.clone(),
    });
    for _ in 0..INITIAL_WORKERS.min(pool.cap) {
        pool.grow()?;
    }
    let dispatcher = {
        let (rx, shared, waiting, pool) =
            (rx.clone(), shared.clone(), waiting.clone(), pool.clone());
        thread::Builder::new()
            .name("dispatcher".into())
            .stack_size(WORKER_STACK)
            .spawn(move || dispatch(&rx, &handoff_tx, &shared, &waiting, &pool))?
    };
    let limiter = Arc::new(Limiter::new(settings.max_connections_per_client));
    let (lane_tx, lane_rx) = crossbeam_channel::bounded::<Conn>(health_lane::LANE_CHANNEL);
    let lane = Lane {
        tx: lane_tx,
        rx: lane_rx.clone(),
        pool: pool.clone(),
    };
    {
        let (tx, shared) = (tx.clone(), shared.clone());
        thread::Builder::new()
            .name("health-lane".into())
            .stack_size(WORKER_STACK)
            .spawn(move || health_lane::run(&lane_rx, &tx, &shared))?;
    }
    let acceptor = {
        let shared = shared.clone();
        thread::Builder::new()
            .name("acceptor".into())
            .spawn(move || accept_loop(listener, &shared, &tx, &lane, &limiter))?
    };
    log::info!(
        "listening on http://{addr} with up to {} workers ({} started)",
        pool.cap,
        pool.started()
    );
    Ok(Server {
        addr,
        shared,
        acceptor: Some(acceptor),
        dispatcher: Some(dispatcher),
        pool,
        queue: rx,
        reloader: None,
        waiting,
    })
}

/// Start serving `config`, and reload it from `dir` (with the command line's
/// `overrides`, as `config` was loaded) whenever its files change.
pub fn start_with_reload(config: Config, dir: PathBuf, overrides: Overrides) -> io::Result<Server> {
    let mut server = start(config)?;
    match Reloader::new(server.shared.clone(), dir, overrides).spawn() {
        Ok(handle) => server.reloader = Some(handle),
        Err(e) => {
            server.shutdown(Duration::ZERO);
            return Err(e);
        }
    }
    Ok(server)
}

impl Server {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accepted connections waiting for a worker.
    pub fn queue_depth(&self) -> usize {
        self.queue.len() + usize::from(self.waiting.load(Ordering::Relaxed))
    }

    /// The shared state (for reloads and tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Worker threads started so far (they start on demand, up to `workers`).
    pub fn workers_started(&self) -> usize {
        self.pool.started()
    }

    /// Re-read the config directory now, as if every file had been
    /// rewritten (SIGHUP); false when this server has no reloader.
    pub fn reload_now(&self) -> bool {
        self.reloader.as_ref().map(|r| r.reload_now()).is_some()
    }

    /// Started workers waiting for a connection.
    pub fn idle_workers(&self) -> usize {
        self.pool.idle.load(Ordering::Acquire)
    }

    /// Block until the server stops (it only stops through [`Server::shutdown`]).
    pub fn wait(mut self) {
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        // The dispatcher first: once it is gone no worker can be added.
        if let Some(d) = self.dispatcher.take() {
            let _ = d.join();
        }
        for w in self.pool.take_handles() {
            let _ = w.join();
        }
    }

    /// Stop accepting, let requests in flight finish for up to `grace`.
    /// Returns true when every worker finished in time.
    ///
    /// When this returns, the listener is closed whatever the outcome; a
    /// worker still busy after `grace` is left running (the caller exits).
    pub fn shutdown(mut self, grace: Duration) -> bool {
        // No deadline at all for a grace too large to add (never from config).
        let deadline = Instant::now().checked_add(grace);
        self.shared.start_draining();
        // No reload may swap a configuration in while draining.
        if let Some(r) = self.reloader.take() {
            r.stop();
        }
        // Wake the acceptor out of accept() with a connection of our own; it
        // sees the flag, returns, and drops the listener. Retried, because a
        // wake-up connection can fail (descriptors exhausted, backlog full) and
        // a missed one would leave the port open.
        let wake = match self.addr.ip() {
            ip if ip.is_unspecified() => SocketAddr::new(
                if ip.is_ipv4() {
                    IpAddr::from([127, 0, 0, 1])
                } else {
                    IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
                },
                self.addr.port(),
            ),
            _ => self.addr,
        };
        if let Some(a) = self.acceptor.take() {
            let woken = Instant::now() + WAKE_LIMIT;
            while !a.is_finished() && Instant::now() < woken {
                let _ = TcpStream::connect_timeout(&wake, Duration::from_millis(200));
                let tick = Instant::now() + Duration::from_millis(100);
                while !a.is_finished() && Instant::now() < tick {
                    thread::sleep(Duration::from_millis(2));
                }
            }
            if a.is_finished() {
                let _ = a.join();
                log::info!(
                    "draining: listener closed, waiting up to {} ms for requests in flight",
                    grace.as_millis()
                );
            } else {
                log::warn!(
                    "draining: the acceptor did not stop; new connections are dropped unserved"
                );
            }
        }
        // The dispatcher is looked at first: while it runs it may still add
        // a worker; once it has finished, the pool's list is final.
        let finished = |server: &Server| {
            server.dispatcher.as_ref().is_none_or(|d| d.is_finished()) && server.pool.finished()
        };
        while deadline.is_none_or(|d| Instant::now() < d) && !finished(&self) {
            thread::sleep(Duration::from_millis(20));
        }
        let all = finished(&self);
        if let Some(d) = self.dispatcher.take_if(|d| d.is_finished()) {
            let _ = d.join();
        }
        for w in self.pool.take_handles() {
            if w.is_finished() {
                let _ = w.join();
            }
        }
        all
    }
}

/// The worker threads: started on demand up to `cap`, never stopped before
/// a drain (a thread that exited when idle would have to be started again
/// at the next burst, and the memory it frees is small).
struct Pool {
    cap: usize,
    handles: Mutex<Vec<JoinHandle<()>>>,
    /// Workers that announced themselves ready and were not handed a
    /// connection since: raised by a worker before it waits, lowered by the
    /// dispatcher for each handoff (so never an overcount of idle workers
    /// by a handoff the worker has not noticed yet).
    idle: AtomicUsize,
    /// Workers serving a connection (the health lane's test of saturation:
    /// exact from the start, unlike `idle`, which a worker raises only once
    /// its thread runs).
    busy: AtomicUsize,
    handoff: Receiver<Conn>,
    shared: Arc<Shared>,
    waiting: Arc<AtomicBool>,
}

impl Pool {
    /// Start one more worker unless the pool is at its cap. Ok(false) at
    /// the cap; an error when the thread could not be started.
    fn grow(self: &Arc<Self>) -> io::Result<bool> {
        let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        if handles.len() >= self.cap {
            return Ok(false);
        }
        let pool = self.clone();
        let handle = thread::Builder::new()
            .name(format!("worker-{}", handles.len()))
            .stack_size(WORKER_STACK)
            .spawn(move || worker(&pool))?;
        handles.push(handle);
        Ok(true)
    }

    fn started(&self) -> usize {
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Start one more worker, logging why not when that fails.
    fn grow_or_warn(self: &Arc<Self>) -> bool {
        self.grow().unwrap_or_else(|e| {
            log::warn!(
                "cannot start a worker thread ({e}); serving with {}",
                self.started()
            );
            false
        })
    }

    /// The dispatcher handed a connection to a waiting worker; start the
    /// next one ahead of need when that was the last idle worker.
    fn handed_over(self: &Arc<Self>) {
        let before = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or(0);
        if before <= 1 {
            self.grow_or_warn();
        }
    }

    fn finished(&self) -> bool {
        let handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        handles.iter().all(|w| w.is_finished())
    }

    fn take_handles(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *self.handles.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The acceptor's way into the [`health_lane`].
struct Lane {
    tx: Sender<Conn>,
    /// The lane channel's other end, to make room in it (see [`Lane::enter`]).
    rx: Receiver<Conn>,
    pool: Arc<Pool>,
}

impl Lane {
    /// A new connection would wait for a worker: connections are waiting
    /// already, or every worker is busy.
    fn saturated(&self, queue: &Sender<Conn>) -> bool {
        self.pool.waiting.load(Ordering::Relaxed)
            || !queue.is_empty()
            || self.pool.busy.load(Ordering::Acquire) >= self.pool.cap
    }

    /// Put `conn` in the lane. When the lane has fallen behind and its
    /// channel is full, the connection that has waited there longest goes on
    /// to the queue to make room: the newest is as likely to be a probe, and
    /// a steady flood must not keep every probe out. Returns what could not
    /// enter (the lane is gone).
    fn enter(&self, shared: &Shared, queue: &Sender<Conn>, conn: Conn) -> Result<(), Conn> {
        let conn = match self.tx.try_send(conn) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Disconnected(c)) => return Err(c),
            Err(TrySendError::Full(c)) => c,
        };
        if let Ok(oldest) = self.rx.try_recv() {
            enqueue(shared, queue, oldest);
        }
        self.tx.try_send(conn).map_err(|e| e.into_inner())
    }
}

/// Takes the listener by value: returning closes it, which is what makes new
/// connections be refused as soon as a drain begins.
fn accept_loop(
    listener: TcpListener,
    shared: &Shared,
    tx: &Sender<Conn>,
    lane: &Lane,
    limiter: &Arc<Limiter>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = listener.accept();
        if shared.draining() {
            // Closing the listener refuses new connections (the kernel resets
            // any still in the backlog); dropping tx lets idle workers finish
            // once the queue is empty.
            drop(listener);
            return;
        }
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let _ = stream.set_nodelay(true);
                let slot = if routes::is_loopback(peer.ip()) {
                    None
                } else {
                    match limiter.admit(peer.ip()) {
                        Some(slot) => Some(slot),
                        None => {
                            shared.metrics.shed(Shed::PerClient);
                            shed(stream, "too many connections from your address");
                            continue;
                        }
                    }
                };
                let conn = Conn {
                    stream,
                    peer,
                    accepted: Instant::now(),
                    _slot: slot,
                };
                // Every worker busy: a health check must not wait in line.
                let conn = if lane.saturated(tx) {
                    match lane.enter(shared, tx, conn) {
                        Ok(()) => continue,
                        Err(c) => c,
                    }
                } else {
                    conn
                };
                if !enqueue(shared, tx, conn) {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and friends: the pending connection stays in the
                // backlog; wait for descriptors to free up, then go on.
                log::warn!("accept failed: {e}; retrying in {backoff:?}");
                thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Queue a connection for a worker, or refuse it with 503 when the queue is
/// full; false when the queue is gone (the server drains).
pub(crate) fn enqueue(shared: &Shared, tx: &Sender<Conn>, conn: Conn) -> bool {
    // Counted before the send, so a worker's dequeue never comes first.
    shared.metrics.queued();
    match tx.try_send(conn) {
        Ok(()) => true,
        Err(TrySendError::Full(c)) => {
            shared.metrics.dequeued();
            shared.metrics.shed(Shed::QueueFull);
            shed(c.stream, "every worker is busy");
            true
        }
        Err(TrySendError::Disconnected(_)) => {
            shared.metrics.dequeued();
            false
        }
    }
}

/// The request limits of every client connection, with bodies up to `max_body`.
pub(crate) fn head_limits(max_body: u64) -> Limits {
    Limits {
        max_line: MAX_LINE,
        max_head: MAX_HEAD,
        max_headers: MAX_HEADERS,
        max_body,
    }
}

/// The client's `X-Request-Id` when it is usable (1 to 128 visible ASCII
/// characters), else a fresh one. No spaces: the id opens the request's
/// log line, whose fields are separated by spaces.
pub(crate) fn request_id(given: Option<&str>) -> String {
    given
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(rng::request_id, str::to_string)
}

/// Refuse a connection at once with 503 and `Retry-After`.
fn shed(mut stream: TcpStream, why: &str) {
    overloaded(&mut stream, why);
}

/// Answer 503 with `Retry-After` and close the sending side.
fn overloaded(stream: &mut TcpStream, why: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let mut out = Responder::new(stream, false, false, false);
    out.add_header("Retry-After", "1");
    let _ = out.send_error(
        503,
        "overloaded",
        &format!("gaia-balancer is overloaded ({why}); retry shortly"),
    );
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Hand queued connections to workers in order, starting a worker when none
/// is free and the pool is under its cap, and answer 503 to one that has
/// waited `queueWaitMs` without a worker taking it, at that moment (not
/// whenever a worker frees up, which can be minutes with long streams).
///
/// Returns when the acceptor is gone and the queue is empty; dropping the
/// handoff then lets idle workers finish.
fn dispatch(
    rx: &Receiver<Conn>,
    handoff: &Sender<Conn>,
    shared: &Shared,
    waiting: &AtomicBool,
    pool: &Arc<Pool>,
) {
    while let Ok(conn) = rx.recv() {
        // A worker blocked in recv takes it at once. (One that is just
        // finishing a connection is not there yet; starting a thread for
        // that race costs one idle thread, within the cap.)
        let conn = match handoff.try_send(conn) {
            Ok(()) => {
                pool.handed_over();
                continue;
            }
            Err(TrySendError::Full(conn)) => conn,
            Err(TrySendError::Disconnected(_)) => {
                shared.metrics.dequeued();
                return;
            }
        };
        let grown = pool.grow_or_warn();
        // Only a connection no new worker is coming for presses idle and
        // slow connections to give their workers up (see HEAD_GRACE).
        waiting.store(!grown, Ordering::Relaxed);
        let left = shared
            .current()
            .config
            .settings
            .queue_wait
            .saturating_sub(conn.accepted.elapsed());
        let sent = handoff.send_timeout(conn, left);
        waiting.store(false, Ordering::Relaxed);
        match sent {
            Ok(()) => pool.handed_over(),
            Err(SendTimeoutError::Timeout(c)) => {
                // It leaves the queue here, never reaching a worker (whose
                // dequeue and count it would otherwise have had).
                shared.metrics.dequeued();
                shared.metrics.shed(Shed::QueueWait);
                shed(c.stream, "waited too long for a worker");
            }
            Err(SendTimeoutError::Disconnected(_)) => {
                shared.metrics.dequeued();
                return;
            }
        }
    }
}

fn worker(pool: &Pool) {
    let (shared, rx, waiting) = (&pool.shared, &pool.handoff, &*pool.waiting);
    loop {
        pool.idle.fetch_add(1, Ordering::AcqRel);
        let Ok(conn) = rx.recv() else { return };
        shared.metrics.dequeued();
        let b = shared.current();
        if conn.accepted.elapsed() > b.config.settings.queue_wait {
            shared.metrics.shed(Shed::QueueWait);
            shed(conn.stream, "waited too long for a worker");
            continue;
        }
        pool.busy.fetch_add(1, Ordering::AcqRel);
        serve_connection(shared, conn, waiting);
        pool.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client socket as the request reader sees it.
///
/// Every read blocks in slices of [`CLIENT_SLICE`] with that one timeout set
/// on the socket, so the fast path (data already there, or arriving within
/// a slice) costs exactly one `recv` and no `setsockopt`; the reader's own
/// timeout is enforced between slices. Between slices it gives way: while
/// `yield_at` is set (a request head is awaited) and has passed, and another
/// connection waits for a worker, a read fails as a timeout at once, so the
/// worker moves on to the waiting connection; while `idle` (waiting for the
/// first byte of a keep-alive request), a drain ends the wait.
struct Client<'a> {
    stream: TcpStream,
    shared: &'a Shared,
    waiting: &'a AtomicBool,
    yield_at: Option<Instant>,
    /// Waiting for the first byte of a follow-up request.
    idle: bool,
    /// The timeout the reader asked for.
    timeout: Option<Duration>,
    /// The read timeout currently set on the socket.
    applied: Option<Duration>,
    /// The last read gave up for a waiting connection.
    yielded: bool,
}

impl Client<'_> {
    fn apply(&mut self, wait: Duration) -> io::Result<()> {
        if self.applied != Some(wait) {
            self.stream.set_read_timeout(Some(wait))?;
            self.applied = Some(wait);
        }
        Ok(())
    }
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut now = Instant::now();
        let end = self.timeout.map(|t| now + t);
        loop {
            let left = end.map(|e| e.saturating_duration_since(now));
            if left.is_some_and(|l| l.is_zero()) {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let pressed =
                self.yield_at.is_some_and(|at| now >= at) && self.waiting.load(Ordering::Relaxed);
            // Pressed: take what has arrived, wait for nothing more.
            let slice = if pressed {
                Duration::from_millis(1)
            } else {
                CLIENT_SLICE
            };
            let wait = match left {
                Some(l) if l < slice => l.max(Duration::from_millis(1)),
                _ => slice,
            };
            self.apply(wait)?;
            match self.stream.read(buf) {
                Err(e) if is_timeout(&e) => {
                    if pressed {
                        self.yielded = true;
                        return Err(e);
                    }
                    if self.idle && self.shared.draining() {
                        return Err(e);
                    }
                    now = Instant::now();
                }
                other => {
                    self.idle = false;
                    return other;
                }
            }
        }
    }
}

impl Source for Client<'_> {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        // Enforced between slices by `read`; no syscall here.
        self.timeout = timeout;
        Ok(())
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn serve_connection(shared: &Arc<Shared>, conn: Conn, waiting: &AtomicBool) {
    let Conn {
        stream,
        peer,
        accepted,
        ..
    } = conn;
    let mut stream = stream;
    let Ok(read_half) = stream.try_clone() else {
        // Descriptors ran out (EMFILE): say so instead of closing silently.
        overloaded(&mut stream, "out of file descriptors");
        return;
    };
    let write_timeout = shared.current().config.settings.write_timeout;
    let _ = stream.set_write_timeout(Some(write_timeout));
    // Upstream waits watch this socket; one clone serves every request here.
    let _watch = watch::start(stream.try_clone().ok());
    let mut writer = stream;
    let mut reader = Reader::new(Client {
        stream: read_half,
        shared,
        waiting,
        yield_at: Some(accepted + HEAD_GRACE),
        idle: false,
        timeout: None,
        applied: None,
        yielded: false,
    });
    let mut first = true;
    let mut scratch = Scratch::default();
    loop {
        let b = shared.current();
        let settings = &b.config.settings;
        let limits = head_limits(settings.max_body_bytes);
        let idle = if first {
            settings.head_timeout
        } else {
            settings.keep_alive
        };
        if !first {
            // Waiting for a follow-up request: a drain closes the connection
            // within CLIENT_SLICE instead of after keepAliveMs, and so does
            // another connection waiting for a worker past HEAD_GRACE.
            // Bytes already buffered (pipelining) are served without waiting.
            let client = reader.get_mut();
            client.yield_at = Some(Instant::now() + HEAD_GRACE);
            client.idle = true;
        }
        let fresh = std::mem::replace(&mut first, false);
        let due = if fresh {
            accepted.checked_add(settings.head_timeout)
        } else {
            None
        };
        let head = reader.read_head_by(&limits, idle, settings.head_timeout, due);
        let client = reader.get_mut();
        client.yield_at = None;
        client.idle = false;
        let head = match head {
            Ok(head) => head,
            Err(RequestError::Idle) if fresh && client.yielded => {
                // It never sent a byte; it may yet, so say why it was dropped.
                shared.metrics.shed(Shed::Idle);
                overloaded(&mut writer, "every worker is busy");
                return;
            }
            Err(e) => {
                if let Some(status) = e.status() {
                    let began = Instant::now();
                    let id = rng::request_id();
                    let mut out = Responder::new(&mut writer, false, false, false);
                    out.add_header("X-Request-Id", &id);
                    let _ = out.send_error(status, "bad_request", &e.to_string());
                    // The request line may be what was wrong: method and path unknown.
                    log::info!(
                        "{id} - - {status} host=- attempts=0 {}ms refused from {peer}: {e}",
                        began.elapsed().as_millis()
                    );
                    metrics::begin_request();
                    shared.metrics.request(
                        metrics::Route::Unknown,
                        status,
                        Instant::now(),
                        false,
                        false,
                    );
                }
                return;
            }
        };
        let started = Instant::now();
        metrics::begin_request();
        // A configuration swapped in while this connection sat idle applies
        // to the request that just arrived.
        let b = shared.current();
        let limits = Limits {
            max_body: b.config.settings.max_body_bytes,
            ..limits
        };
        let id = request_id(head.header_str("x-request-id"));
        let keep_alive = head.keep_alive && !shared.draining();
        let mut out = Responder::with_scratch(
            &mut writer,
            keep_alive,
            head.method == "HEAD",
            head.minor_version == 0,
            std::mem::take(&mut scratch),
        );
        out.add_header("X-Request-Id", &id);
        let ctx = Ctx {
            shared,
            b: &b,
            head: &head,
            peer,
            id: &id,
            started,
            limits: &limits,
        };
        let result = catch_unwind(AssertUnwindSafe(|| handle(&ctx, &mut reader, &mut out)));
        let served = match result {
            Ok(served) => served,
            Err(_) => {
                // The path only, as in the info line: a query may carry a client's key.
                log::error!(
                    "{id}: panic while serving {} {}",
                    head.method,
                    routes::path_of(&head.target)
                );
                if !out.started() {
                    let _ = out.send_error(
                        500,
                        "internal_error",
                        "internal error while serving this request",
                    );
                }
                out.close_after();
                proxy::Served::default()
            }
        };
        // Status 0: nothing was sent (the connection broke); the log and the
        // metrics both count it as the client's.
        let status = match out.status() {
            _ if served.client_gone => 499,
            0 => 499,
            sent => sent,
        };
        shared.metrics.request(
            metrics::Route::of(routes::path_of(&head.target)),
            status,
            started,
            served.cut,
            served.client_gone,
        );
        log::info!(
            "{id} {} {} {status} host={} attempts={} {}ms",
            head.method,
            routes::path_of(&head.target),
            served.host.as_deref().unwrap_or("-"),
            served.attempts,
            started.elapsed().as_millis()
        );
        if !out.keep_alive() || served.client_gone {
            return;
        }
        scratch = out.into_scratch();
        reader.recycle(head);
    }
}

/// Everything one request's handler needs besides its I/O.
struct Ctx<'a> {
    shared: &'a Arc<Shared>,
    b: &'a Arc<Balancer>,
    head: &'a Head,
    peer: SocketAddr,
    id: &'a str,
    started: Instant,
    limits: &'a Limits,
}

/// The fields of a JSON request body the balancer reads; the rest is skipped.
#[derive(Default)]
struct Probe {
    stream: Option<serde_json::Value>,
    /// The top-level `model` when it is a string given once: parsers
    /// disagree on which of two wins, so a repeated one routes nowhere in
    /// particular (as in [`crate::model`]).
    model: Option<Arc<str>>,
}

/// A top-level member name of a request body.
enum Member {
    Stream,
    Model,
    Other,
}

impl<'de> Deserialize<'de> for Member {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Member, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Member;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Member, E> {
                Ok(match name {
                    "stream" => Member::Stream,
                    "model" => Member::Model,
                    _ => Member::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Probe, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Probe;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Probe, A::Error> {
                let mut probe = Probe::default();
                let mut models = 0u32;
                while let Some(member) = map.next_key::<Member>()? {
                    match member {
                        Member::Stream if probe.stream.is_some() => {
                            return Err(de::Error::duplicate_field("stream"));
                        }
                        Member::Stream => probe.stream = Some(map.next_value()?),
                        Member::Model => {
                            models += 1;
                            let value: serde_json::Value = map.next_value()?;
                            probe.model = value.as_str().map(Arc::from);
                        }
                        Member::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                if models > 1 {
                    probe.model = None;
                }
                Ok(probe)
            }
        }
        d.deserialize_map(V)
    }
}

fn handle(
    ctx: &Ctx<'_>,
    reader: &mut Reader<Client<'_>>,
    out: &mut Responder<'_, TcpStream>,
) -> proxy::Served {
    let head = ctx.head;
    // Fault injection for the test suite: debug builds only, never in release.
    #[cfg(debug_assertions)]
    if head.header("x-gaia-debug-panic").is_some() {
        panic!("panic requested by x-gaia-debug-panic");
    }
    let route = routes::route(ctx.b, head, ctx.peer.ip());
    if route != Ok(Route::Proxy) && head.framing != Framing::None {
        // Answered here without reading the body (refused, or a local
        // endpoint): it must not be parsed as the next request (a smuggled
        // one would dodge a proxy in front).
        out.close_after();
    }
    let route = match route {
        Ok(route) => route,
        Err(rej) => {
            if let Some(allow) = rej.allow {
                out.add_header("Allow", allow);
            }
            if let Some(challenge) = rej.challenge {
                out.add_header("WWW-Authenticate", challenge);
            }
            let _ = out.send_error(rej.status, rej.code, &rej.message);
            return proxy::Served::default();
        }
    };
    let text = [("Content-Type", "text/plain; charset=utf-8")];
    let json = [("Content-Type", "application/json")];
    match route {
        Route::Healthz | Route::Readyz => {
            let (status, body) = routes::health(ctx.shared, ctx.b, route == Route::Readyz);
            let _ = out.send(status, &text, body.as_bytes());
        }
        Route::Status => {
            let _ = out.send(200, &json, &routes::status_json(ctx.shared, ctx.b));
        }
        Route::Models => {
            let _ = out.send(200, &json, &discovery::models_json(ctx.b));
        }
        Route::Metrics => {
            let exposition = [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")];
            let body = metrics::render(ctx.shared, ctx.b);
            let _ = out.send(200, &exposition, body.as_bytes());
        }
        Route::Proxy => return proxy_request(ctx, reader, out),
    }
    proxy::Served::default()
}

fn proxy_request(
    ctx: &Ctx<'_>,
    reader: &mut Reader<Client<'_>>,
    out: &mut Responder<'_, TcpStream>,
) -> proxy::Served {
    let head = ctx.head;
    let settings = &ctx.b.config.settings;
    let _in_flight = ctx.shared.metrics.in_flight();
    if head.expect_continue && head.framing != Framing::None && out.continue_100().is_err() {
        out.close_after();
        return proxy::Served::default();
    }
    let body_started = Instant::now();
    let deadline = body_started + BODY_DEADLINE;
    let body = match reader.read_body(head.framing, ctx.limits, settings.body_timeout, deadline) {
        // Shared so a hedge thread can send it too, without a copy.
        Ok(body) => Arc::new(body),
        Err(e) => {
            out.close_after();
            if let Some(status) = e.status() {
                let _ = out.send_error(status, "bad_request", &e.to_string());
            }
            return proxy::Served::default();
        }
    };
    let is_json = head.header_str("content-type").is_none_or(|ct| {
        ct.as_bytes()
            .windows(4)
            .any(|w| w.eq_ignore_ascii_case(b"json"))
    });
    let mut probe = Probe::default();
    if is_json && !body.is_empty() {
        match serde_json::from_slice::<Probe>(&body) {
            Ok(p) => probe = p,
            Err(e) => {
                let _ = out.send_error(
                    400,
                    "invalid_json",
                    &format!("request body is not a JSON object: {e}"),
                );
                return proxy::Served::default();
            }
        }
    }
    let stream = probe.stream == Some(serde_json::Value::Bool(true));
    let kind = if stream {
        metrics::Kind::Stream
    } else {
        metrics::Kind::Json
    };
    metrics::mark_proxied(kind, body_started.elapsed());
    let req = Proxied {
        outgoing: Outgoing {
            method: &head.method,
            path: &head.target,
            headers: &head.headers,
            body: &body[..],
            request_id: ctx.id,
        },
        body: body.clone(),
        client: &reader.get_ref().stream,
        started: ctx.started,
        stream,
        model: probe.model,
    };
    proxy::serve(ctx.shared, ctx.b, &req, out)
}

/// Counts open connections per client address.
struct Limiter {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; releases its place when dropped.
struct Slot {
    limiter: Arc<Limiter>,
    ip: IpAddr,
}

impl Limiter {
    fn new(max: usize) -> Self {
        Limiter {
            max: max.max(1),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            limiter: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reads_stream_and_a_single_string_model() {
        let probe = |body: &str| serde_json::from_str::<Probe>(body);
        let p =
            probe(r#"{"messages":[{"model":"inner"}],"mod\u0065l":"m","stream":true}"#).unwrap();
        assert_eq!(p.model.as_deref(), Some("m"));
        assert_eq!(p.stream, Some(serde_json::Value::Bool(true)));
        // Ambiguous or not a string: no model to route by, and no 400 either.
        for body in [
            r#"{"model":"a","model":"b"}"#,
            r#"{"model":7}"#,
            r#"{"model":null}"#,
        ] {
            assert_eq!(probe(body).unwrap().model, None, "{body}");
        }
        assert!(probe(r#"{"stream":true,"stream":false}"#).is_err());
        assert!(probe("[true]").is_err(), "an object, nothing else");
    }

    #[test]
    fn limiter_caps_and_releases_per_address() {
        let limiter = Arc::new(Limiter::new(2));
        let ip: IpAddr = [192, 0, 2, 1].into();
        let other: IpAddr = [192, 0, 2, 2].into();
        let a = limiter.admit(ip).unwrap();
        let _b = limiter.admit(ip).unwrap();
        assert!(limiter.admit(ip).is_none());
        assert!(limiter.admit(other).is_some());
        drop(a);
        assert!(limiter.admit(ip).is_some());
    }
}
