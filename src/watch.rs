//! Keeps a blocking upstream read interruptible.
//!
//! ureq blocks the worker thread while it waits for an upstream's response
//! head or its next body chunk, possibly for minutes. This module wraps every
//! upstream transport so that such a wait is cut into slices of at most one
//! [`TICK`]; between slices it asks the thread's current [`Watch`] whether the
//! client has gone, a deadline has passed or the process is stopping. Any of
//! those aborts the upstream read at once (the connection is dropped, which is
//! what tells the upstream to stop generating). Guarantee: a departed client
//! or a passed deadline is noticed within one tick, in every phase of an
//! upstream exchange, with no extra thread.

use std::cell::RefCell;
use std::fmt;
use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::unversioned::transport::time::Duration as UreqDuration;
use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, NextTimeout, Transport};
use ureq::Error;

/// Longest uninterrupted wait on an upstream.
pub const TICK: Duration = Duration::from_millis(250);
/// How often a worker looks whether its running hedge has won.
const HEDGE_POLL: Duration = Duration::from_millis(5);

/// Why a watched upstream read was abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// The client closed its connection.
    ClientGone,
    /// The watch deadline passed (first output or total time).
    Deadline,
    /// A hedge of the same request won, or this hedge was cancelled.
    Preempted,
}

/// What the current thread's upstream reads are checked against.
pub struct Watch {
    client: Option<TcpStream>,
    deadline: Option<Instant>,
    aborted: Option<Abort>,
    early: Option<Early>,
    hedge: Option<WatchedHedge>,
    cancel: Option<Arc<AtomicBool>>,
}

/// A hedge to launch at `at`, and the slot where it reports.
struct WatchedHedge {
    at: Instant,
    launch: Option<Box<dyn FnOnce()>>,
    slot: Arc<crate::hedge::Slot>,
}

/// An early commit of a slow stream: its head, then `: keep-alive` comments,
/// written by the watch itself while the worker is blocked upstream.
struct Early {
    at: Instant,
    every: Duration,
    head: Vec<u8>,
    chunked: bool,
    sent: bool,
    next: Instant,
}

/// One SSE comment, as a chunk and as raw bytes.
const COMMENT_CHUNKED: &[u8] = b"e\r\n: keep-alive\n\n\r\n";
const COMMENT_RAW: &[u8] = b": keep-alive\n\n";

thread_local! {
    static CURRENT: RefCell<Option<Watch>> = const { RefCell::new(None) };
}

/// Clears the thread's watch when dropped.
pub struct WatchGuard(());

impl Drop for WatchGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

/// Watch `client` (a clone of the client socket) for this thread's upstream reads.
pub fn start(client: Option<TcpStream>) -> WatchGuard {
    CURRENT.with(|c| {
        *c.borrow_mut() = Some(Watch {
            client,
            deadline: None,
            aborted: None,
            early: None,
            hedge: None,
            cancel: None,
        })
    });
    WatchGuard(())
}

/// Start a new request on this thread's watch, keeping its client socket:
/// a connection installs the watch once (one `dup` per connection, not per
/// request). Returns a guard that installs one for `client` when the thread
/// has none.
pub fn begin(client: &TcpStream) -> Option<WatchGuard> {
    let reset = CURRENT.with(|c| {
        let mut slot = c.borrow_mut();
        let Some(w) = slot.as_mut() else {
            return false;
        };
        w.deadline = None;
        w.aborted = None;
        w.early = None;
        w.hedge = None;
        w.cancel = None;
        true
    });
    (!reset).then(|| start(client.try_clone().ok()))
}

/// Set (or clear) the deadline after which upstream reads are abandoned.
pub fn set_deadline(deadline: Option<Instant>) {
    CURRENT.with(|c| {
        if let Some(w) = c.borrow_mut().as_mut() {
            w.deadline = deadline;
            w.aborted = None;
        }
    });
}

/// From `at` on, if the stream has not committed, send `head` to the client,
/// then a `: keep-alive` comment every `every` (chunked unless HTTP/1.0).
pub fn set_early(at: Instant, every: Duration, head: Vec<u8>, chunked: bool) {
    CURRENT.with(|c| {
        if let Some(w) = c.borrow_mut().as_mut() {
            w.early = Some(Early {
                at,
                every,
                head,
                chunked,
                sent: false,
                next: at,
            });
        }
    });
}

/// Stop the keep-alive comments (the stream commits for real); returns
/// whether the head was already sent.
pub fn clear_early() -> bool {
    CURRENT.with(|c| {
        c.borrow_mut()
            .as_mut()
            .and_then(|w| w.early.take())
            .is_some_and(|e| e.sent)
    })
}

/// Launch a hedge through `launch` at `at`; abandon the upstream read once
/// `slot` holds a hedge that reached its commit point.
pub fn set_hedge(at: Instant, launch: Box<dyn FnOnce()>, slot: Arc<crate::hedge::Slot>) {
    CURRENT.with(|c| {
        if let Some(w) = c.borrow_mut().as_mut() {
            w.hedge = Some(WatchedHedge {
                at,
                launch: Some(launch),
                slot,
            });
        }
    });
}

/// Forget the hedge (the attempt is over or committed).
pub fn clear_hedge() {
    CURRENT.with(|c| {
        if let Some(w) = c.borrow_mut().as_mut() {
            w.hedge = None;
        }
    });
}

/// Abandon upstream reads on this thread once `flag` is set (hedge threads).
pub fn set_cancel(flag: Arc<AtomicBool>) {
    CURRENT.with(|c| {
        if let Some(w) = c.borrow_mut().as_mut() {
            w.cancel = Some(flag);
        }
    });
}

/// Whether the early head has been sent.
pub fn early_sent() -> bool {
    CURRENT.with(|c| {
        c.borrow()
            .as_ref()
            .and_then(|w| w.early.as_ref())
            .is_some_and(|e| e.sent)
    })
}

/// While not waiting on an upstream: send keep-alives that are due and
/// report whether the client has gone.
pub fn poll_client() -> bool {
    CURRENT.with(|c| {
        let mut slot = c.borrow_mut();
        let Some(w) = slot.as_mut() else {
            return false;
        };
        w.client.as_ref().is_some_and(peer_closed) || !keep_alive(w, Instant::now())
    })
}

/// How long the current thread's upstream wait may last before something on
/// the watch is due (at most [`TICK`], at least 1 ms).
pub(crate) fn next_wake() -> Duration {
    CURRENT.with(|c| {
        let slot = c.borrow();
        let Some(w) = slot.as_ref() else {
            return TICK;
        };
        let now = Instant::now();
        // Once a hedge runs, look often whether it has won (only hedged
        // requests, at most 5 %, pay for this).
        let hedge = w.hedge.as_ref().map(|h| {
            if h.launch.is_some() {
                h.at
            } else {
                now + HEDGE_POLL
            }
        });
        let early = w.early.as_ref().map(|e| e.next.max(e.at));
        [w.deadline, hedge, early]
            .into_iter()
            .flatten()
            .map(|at| at.saturating_duration_since(now))
            .fold(TICK, Duration::min)
            .max(Duration::from_millis(1))
    })
}

/// Launch a due hedge; true once the hedge holds a result to commit.
fn hedge_won(w: &mut Watch, now: Instant) -> bool {
    let Some(h) = w.hedge.as_mut() else {
        return false;
    };
    if now >= h.at {
        if let Some(launch) = h.launch.take() {
            launch();
        }
    }
    h.slot.is_ready()
}

/// Write what the early commit owes the client now; false if the write failed.
fn keep_alive(w: &mut Watch, now: Instant) -> bool {
    let (Some(e), Some(client)) = (w.early.as_mut(), w.client.as_ref()) else {
        return true;
    };
    if now < e.at || now < e.next {
        return true;
    }
    let mut out = Vec::new();
    if !e.sent {
        out.extend_from_slice(&e.head);
        e.sent = true;
    }
    out.extend_from_slice(if e.chunked {
        COMMENT_CHUNKED
    } else {
        COMMENT_RAW
    });
    e.next = now + e.every;
    let mut client = client;
    client.write_all(&out).and_then(|()| client.flush()).is_ok()
}

/// The reason the last upstream read on this thread was abandoned, if it was.
pub fn aborted() -> Option<Abort> {
    CURRENT.with(|c| c.borrow().as_ref().and_then(|w| w.aborted))
}

/// True when the peer has closed (EOF or error); pipelined bytes do not count.
pub fn peer_closed(stream: &TcpStream) -> bool {
    crate::transport::peek(stream) == crate::transport::Peek::Closed
}

fn check() -> Option<Abort> {
    CURRENT.with(|c| {
        let mut slot = c.borrow_mut();
        let w = slot.as_mut()?;
        let now = Instant::now();
        // A hedge due now launches even if the first attempt's deadline is
        // also up: it is that attempt's best replacement.
        let won = hedge_won(w, now);
        let why = if w.deadline.is_some_and(|d| now >= d) {
            Some(Abort::Deadline)
        } else if w.client.as_ref().is_some_and(peer_closed) || !keep_alive(w, now) {
            Some(Abort::ClientGone)
        } else if w.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) || won {
            Some(Abort::Preempted)
        } else {
            None
        };
        if why.is_some() {
            w.aborted = why;
        }
        why
    })
}

/// Wraps the transports made by the connector before it (see [`Connector::chain`]).
#[derive(Debug, Default)]
pub struct WatchConnector;

impl<In: Transport> Connector<In> for WatchConnector {
    type Out = WatchedTransport;

    fn connect(
        &self,
        _details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, Error> {
        Ok(chained.map(|t| WatchedTransport(Box::new(t))))
    }
}

/// A transport whose input waits are sliced into ticks and checked between them.
pub struct WatchedTransport(Box<dyn Transport>);

impl fmt::Debug for WatchedTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("WatchedTransport").field(&self.0).finish()
    }
}

impl Transport for WatchedTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.0.buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        self.0.transmit_output(amount, timeout)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        let full = timeout.for_read();
        let started = Instant::now();
        loop {
            let left = match full.after {
                UreqDuration::Exact(total) => Some(total.saturating_sub(started.elapsed())),
                UreqDuration::NotHappening => None,
            };
            // Wake for whatever is due first: a tick, a deadline, a hedge, a keep-alive.
            let tick = next_wake();
            let last = left.is_some_and(|l| l <= tick);
            let slice = NextTimeout {
                after: UreqDuration::Exact(left.map_or(tick, |l| l.min(tick))),
                reason: full.reason,
                per_read: None,
                per_write: timeout.per_write,
            };
            // Checks run only when a slice ends without input: a read that
            // finds data at once (the common case) costs no extra syscall.
            match self.0.await_input(slice) {
                Err(Error::Timeout(_)) if !last => {
                    if let Some(why) = check() {
                        return Err(Error::Io(aborted_error(why)));
                    }
                }
                other => return other,
            }
        }
    }

    fn is_open(&mut self) -> bool {
        self.0.is_open()
    }

    fn is_tls(&self) -> bool {
        self.0.is_tls()
    }
}

/// For an upstream wait outside ureq's reads (a TLS handshake), between two
/// slices of at most [`next_wake`]: run the watch's checks (a hedge due is
/// launched, keep-alives are written) and return the error that abandons
/// the wait, if one is due.
pub(crate) fn interruption() -> Option<io::Error> {
    check().map(aborted_error)
}

fn aborted_error(why: Abort) -> io::Error {
    match why {
        // Not `ConnectionAborted`: ureq's body reader takes that for the
        // upstream's orderly close, the clean end of a body without a length.
        Abort::ClientGone => io::Error::other("client went away"),
        Abort::Deadline => io::Error::new(io::ErrorKind::TimedOut, "deadline passed"),
        // Not `Interrupted`: readers retry those.
        Abort::Preempted => io::Error::other("another attempt won"),
    }
}
