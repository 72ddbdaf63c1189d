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
use std::time::{Duration, Instant};

use ureq::unversioned::transport::time::Duration as UreqDuration;
use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, NextTimeout, Transport};
use ureq::Error;

/// Longest uninterrupted wait on an upstream.
pub const TICK: Duration = Duration::from_millis(250);

/// Why a watched upstream read was abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// The client closed its connection.
    ClientGone,
    /// The watch deadline passed (first output or total time).
    Deadline,
}

/// What the current thread's upstream reads are checked against.
pub struct Watch {
    client: Option<TcpStream>,
    deadline: Option<Instant>,
    aborted: Option<Abort>,
    early: Option<Early>,
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
        })
    });
    WatchGuard(())
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
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    };
    closed || stream.set_nonblocking(false).is_err()
}

fn check() -> Option<Abort> {
    CURRENT.with(|c| {
        let mut slot = c.borrow_mut();
        let w = slot.as_mut()?;
        let now = Instant::now();
        let why = if w.deadline.is_some_and(|d| now >= d) {
            Some(Abort::Deadline)
        } else if w.client.as_ref().is_some_and(peer_closed) || !keep_alive(w, now) {
            Some(Abort::ClientGone)
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

impl Connector<Box<dyn Transport>> for WatchConnector {
    type Out = WatchedTransport;

    fn connect(
        &self,
        _details: &ConnectionDetails,
        chained: Option<Box<dyn Transport>>,
    ) -> Result<Option<Self::Out>, Error> {
        Ok(chained.map(WatchedTransport))
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
            if let Some(why) = check() {
                return Err(Error::Io(aborted_error(why)));
            }
            let left = match full.after {
                UreqDuration::Exact(total) => Some(total.saturating_sub(started.elapsed())),
                UreqDuration::NotHappening => None,
            };
            let last = left.is_some_and(|l| l <= TICK);
            let slice = NextTimeout {
                after: UreqDuration::Exact(left.map_or(TICK, |l| l.min(TICK))),
                reason: full.reason,
                per_read: None,
                per_write: timeout.per_write,
            };
            match self.0.await_input(slice) {
                Err(Error::Timeout(_)) if !last => continue,
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

fn aborted_error(why: Abort) -> io::Error {
    match why {
        Abort::ClientGone => io::Error::new(io::ErrorKind::ConnectionAborted, "client went away"),
        Abort::Deadline => io::Error::new(io::ErrorKind::TimedOut, "deadline passed"),
    }
}
