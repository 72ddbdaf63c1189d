//! The TCP connection under every upstream exchange (ureq's transport layer),
//! and the one-syscall liveness probe shared with the client side.
//!
//! Why it exists: ureq's own TCP transport spent about nine syscalls per
//! proxied request beyond the data itself: a socket timeout set before every
//! write (its deadlines shrink, so the value always differs) and a
//! three-syscall probe (non-blocking on, read, non-blocking off) each time a
//! connection enters and leaves the pool. On loopback that was a large share
//! of the balancer's CPU. What it guarantees:
//! - a request's head and a body of up to [`COALESCE`] bytes leave in one
//!   `write` (one packet and one wake-up upstream instead of two);
//! - a socket timeout is only set when its value changes, which on the fast
//!   path is never (reads and writes wait one watch tick at a time);
//! - no single write waits longer than [`WRITE_STALL`] or past ureq's
//!   deadline, and while one waits the thread's watch runs ([`WriteClock`]);
//! - a pooled connection is probed with one non-blocking `MSG_PEEK` just
//!   before its next request is written, outside the pool's lock
//!   ([`crate::pool`]); one the
//!   upstream closed (or sent stray bytes on) meanwhile is replaced by a
//!   fresh connection to the same address (or, for a host given by name,
//!   where the name cache says it points now) before any byte of the request
//!   leaves, so a stale keep-alive costs no failed attempt; one with unsent
//!   output is never reused;
//! - a connection holds little memory while it waits for and reads a
//!   response ([`LinkBuffers`]): ureq's own buffers allocate and zero both
//!   directions in full (2 × 32 KiB) for a connection's whole life, which
//!   was most of the memory of an open stream; one going back to the pool
//!   keeps at most [`INPUT_START`] of input, however large its last answer.
//!
//! TLS runs on top of [`Link`] (`tls.rs`), so https upstreams get the same.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use ureq::unversioned::transport::time::Duration as UreqDuration;
use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, NextTimeout, Transport};
use ureq::Error;

use crate::watch::TICK;

/// Longest one write to an upstream may make no progress.
pub const WRITE_STALL: Duration = Duration::from_secs(20);
/// Output up to this size waits to leave with what follows (the body after
/// the head), at the latest when the response is awaited.
pub const COALESCE: usize = 16 * 1024;
/// Capacity of `pending` kept after a flush: a request head and a small
/// body; what a larger body needed is freed again.
const PENDING_KEPT: usize = 4 * 1024;
/// Shortest share of the connect timeout an address gets when the host
/// resolved to several.
const MIN_PER_ADDRESS: Duration = Duration::from_millis(10);
/// First size of a connection's input buffer: a response head and an SSE
/// event or two fit; it doubles (up to ureq's `input_buffer_size`) each time
/// a read fills it, so large bodies still move in large reads.
pub const INPUT_START: usize = 4 * 1024;
/// Room for a chunked request body on its way into the output buffer (ureq
/// reads it into this scratch space first; its own buffers keep 10 KiB).
const SCRATCH: usize = 10 * 1024;
/// Output buffers kept for the next request; any more are freed. Sending is
/// brief, so few are in use at once even with thousands of open streams.
const SPARE_OUTPUTS: usize = 16;

/// Output buffers (output plus scratch) not lent to a connection.
static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// What a non-blocking peek at a socket found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// Nothing to read: open and quiet.
    Quiet,
    /// Bytes are waiting.
    Data,
    /// The peer closed, or the socket failed.
    Closed,
}

/// Look at a socket without blocking and without consuming: one syscall,
/// whatever its blocking mode and timeouts (`MSG_PEEK | MSG_DONTWAIT`).
pub fn peek(stream: &TcpStream) -> Peek {
    let mut byte = [MaybeUninit::<u8>::uninit()];
    loop {
        return match SockRef::from(stream)
            .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        {
            Ok(0) => Peek::Closed,
            Ok(_) => Peek::Data,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Peek::Quiet,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => Peek::Closed,
        };
    }
}

/// Opens plain TCP connections for ureq (first in the connector chain).
#[derive(Debug, Default)]
pub struct LinkConnector;

impl Connector<()> for LinkConnector {
    type Out = Link;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<()>,
    ) -> Result<Option<Link>, Error> {
        // One budget for TCP and TLS together (`timeouts.connectMs`): the
        // handshake that may follow ends by this too (see `Link::connect_by`).
        // A wait for the name's first lookup came out of it already.
        let now = Instant::now();
        let by = connect_deadline(
            now,
            details.timeout.after,
            crate::resolve::take_waited(),
            details.config.timeouts().connect,
        );
        let timeout = NextTimeout {
            after: by.map_or(UreqDuration::NotHappening, |by| {
                UreqDuration::Exact(by.saturating_duration_since(now))
            }),
            ..details.timeout
        };
        let (stream, peer) = connect(&details.addrs, timeout)?;
        let config = details.config;
        Ok(Some(Link::new(
            stream,
            peer,
            crate::resolve::name_of(details.uri),
            config.timeouts().connect,
            by,
            LinkBuffers::new(config.input_buffer_size(), config.output_buffer_size()),
        )))
    }
}

/// When a connect begun `now` must be done: ureq's connect timeout
/// (`after`) counts from the end of name resolution, so when the request
/// waited for a name's first lookup (since `waited`), lookup and connect
/// share `budget` (`timeouts.connectMs`) instead of taking it twice.
fn connect_deadline(
    now: Instant,
    after: UreqDuration,
    waited: Option<Instant>,
    budget: Option<Duration>,
) -> Option<Instant> {
    let ureqs = match after {
        UreqDuration::Exact(d) => now.checked_add(d),
        UreqDuration::NotHappening => None,
    };
    let shared = waited
        .zip(budget)
        .and_then(|(since, b)| since.checked_add(b));
    match (ureqs, shared) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Try each address in turn; earlier ones get half of the time left (the
/// last gets all of it), so one black-holed address cannot eat the budget.
fn connect(addrs: &[SocketAddr], timeout: NextTimeout) -> Result<(TcpStream, SocketAddr), Error> {
    let deadline = match timeout.after {
        UreqDuration::Exact(d) => Instant::now().checked_add(d),
        UreqDuration::NotHappening => None,
    };
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        let result = match deadline {
            None => connect_one(addr, None),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::Timeout(timeout.reason));
                }
                let share = if i + 1 < addrs.len() {
                    (left / 2).max(MIN_PER_ADDRESS).min(left)
                } else {
                    left
                };
                connect_one(addr, Instant::now().checked_add(share))
            }
        };
        match result {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok((stream, *addr));
            }
            // The watch ended the wait: no other address may be tried.
            Err(e) if crate::watch::aborted().is_some() => return Err(Error::Io(e)),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) if is_timeout(&e) => Error::Timeout(timeout.reason),
        Some(e) => Error::Io(unreachable("connect", e)),
        None => Error::ConnectionFailed,
    })
}

/// Connect to `addr` by `end` (`None`: as long as the kernel tries), in
/// slices of at most one watch tick ([`crate::watch::next_wake`]), running
/// the thread's watch between them as during any upstream wait: a departed
/// client or a passed deadline ends the connect, a hedge due starts. A
/// blocking connect returns when `SO_SNDTIMEO` runs out, with the attempt
/// still under way (Linux); connecting again waits for that same attempt.
fn connect_one(addr: &SocketAddr, end: Option<Instant>) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    let target = SockAddr::from(*addr);
    loop {
        let mut slice = crate::watch::next_wake();
        if let Some(end) = end {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            slice = slice.min(left.max(Duration::from_millis(1)));
        }
        socket.set_write_timeout(Some(slice))?;
        match socket.connect(&target) {
            Ok(()) => break,
            // Connected between two slices.
            Err(e) if e.raw_os_error() == Some(libc::EISCONN) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The slice ran out with the attempt still under way.
            Err(e)
                if is_timeout(&e)
                    || matches!(e.raw_os_error(), Some(libc::EINPROGRESS | libc::EALREADY)) =>
            {
                if let Some(why) = crate::watch::interruption() {
                    return Err(why);
                }
            }
            Err(e) => return Err(e),
        }
    }
    // The writes to come set their own timeout (see `Link::set_write_timeout_to`,
    // whose cache starts empty, so the slice left here is always replaced).
    Ok(socket.into())
}

/// An upstream that could not be reached at all: its name did not resolve,
/// or no address of it took the connection (unreachable network or host).
/// ureq has no error variant for these that keeps the OS's reason, so it
/// travels inside an `io::Error` of the same kind, marked, so that
/// `upstream::classify` counts a connect failure (README: "connect refused,
/// DNS or TLS failure, connect timeout") rather than a broken answer.
#[derive(Debug)]
pub struct Unreachable {
    step: &'static str,
    cause: io::Error,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.step, self.cause)
    }
}

impl std::error::Error for Unreachable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.cause)
    }
}

/// `cause`, marked as a failure to reach the upstream during `step`.
pub fn unreachable(step: &'static str, cause: io::Error) -> io::Error {
    io::Error::new(cause.kind(), Unreachable { step, cause })
}

/// Whether `e` came from [`unreachable`].
pub fn is_unreachable(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Unreachable>())
}

pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A connection's buffers, as ureq's [`Buffers`] asks for them, sized to
/// what is in use rather than to the configured maximum:
/// - the output buffer is needed only while a request is being written out
///   (`transmit_output` copies or writes it at once), so it is borrowed from
///   a process-wide spare list and given back after each transmit, instead of
///   being held by every open stream and every pooled connection;
/// - the input buffer starts at [`INPUT_START`] and doubles when a read fills
///   it, up to the configured size, so a stream of small events holds 4 KiB.
///
/// Safe Rust only hands out initialised bytes, so a buffer is zeroed once
/// when it is allocated or grown (ureq does the same for its own), never per
/// request.
pub struct LinkBuffers {
    input: Vec<u8>,
    /// End of the bytes read into `input`.
    filled: usize,
    /// End of the bytes ureq has consumed.
    consumed: usize,
    input_max: usize,
    /// The free space handed out by the last `input_append_buf`.
    offered: usize,
    /// The last read filled all the space it was offered.
    full: bool,
    /// The last `input_consume` consumed something (ureq's `can_use_input`).
    progress: bool,
    /// Output and scratch space while lent to this connection.
    output: Option<Vec<u8>>,
    output_size: usize,
}

impl LinkBuffers {
    /// Buffers that grow to at most `input_max` in and write `output_size` out.
    pub fn new(input_max: usize, output_size: usize) -> Self {
        LinkBuffers {
            input: Vec::new(),
            filled: 0,
            consumed: 0,
            input_max: input_max.max(1),
            offered: 0,
            full: false,
            progress: false,
            output: None,
            output_size: output_size.max(1),
        }
    }

    /// The output-plus-scratch buffer, borrowed from the spare list (or
    /// allocated) on first use since the last transmit.
    fn lent(&mut self) -> &mut Vec<u8> {
        let size = self.output_size + SCRATCH;
        self.output.get_or_insert_with(|| {
            let spare = SPARE.lock().unwrap_or_else(|e| e.into_inner()).pop();
            // A spare of another size comes from a config with other sizes.
            spare
                .filter(|b| b.len() == size)
                .unwrap_or_else(|| vec![0; size])
        })
    }

    /// Give the output buffer back: what it held has been sent or copied.
    fn give_back(&mut self) {
        if let Some(buf) = self.output.take() {
            let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
            if spare.len() < SPARE_OUTPUTS {
                spare.push(buf);
            }
        }
    }

    /// The connection is going idle: an input buffer grown past
    /// [`INPUT_START`] for a large response or a fast stream is freed (the
    /// next read starts small again), so that a connection parked in the
    /// pool holds at most that much, however large its last answer was.
    /// Only when nothing is left unread in it.
    pub fn shed(&mut self) {
        if self.consumed == self.filled && self.input.len() > INPUT_START {
            self.input = Vec::new();
            self.consumed = 0;
            self.filled = 0;
            self.full = false;
        }
    }

    /// Bytes allocated for input now (for tests).
    #[cfg(test)]
    pub(crate) fn input_capacity(&self) -> usize {
        self.input.len()
    }
}

impl Drop for LinkBuffers {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl fmt::Debug for LinkBuffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkBuffers")
            .field("input", &self.input.len())
            .field("unconsumed", &(self.filled - self.consumed))
            .field("output_lent", &self.output.is_some())
            .finish()
    }
}

impl Buffers for LinkBuffers {
    fn output(&mut self) -> &mut [u8] {
        let size = self.output_size;
        &mut self.lent()[..size]
    }

    fn input(&self) -> &[u8] {
        &self.input[self.consumed..self.filled]
    }

    fn input_append_buf(&mut self) -> &mut [u8] {
        if self.consumed == self.filled {
            self.consumed = 0;
            self.filled = 0;
        } else if self.consumed > 0 && self.filled > self.input.len() / 2 {
            // Move the unconsumed tail to the front (as ureq's ConsumeBuf does).
            self.input.copy_within(self.consumed..self.filled, 0);
            self.filled -= self.consumed;
            self.consumed = 0;
        }
        let no_room = self.filled == self.input.len();
        if (no_room || self.full) && self.input.len() < self.input_max {
            let size = (self.input.len() * 2).max(INPUT_START).min(self.input_max);
            self.input.resize(size, 0);
        }
        self.full = false;
        self.offered = self.input.len() - self.filled;
        &mut self.input[self.filled..]
    }

    fn input_appended(&mut self, amount: usize) {
        self.full = amount > 0 && amount >= self.offered;
        self.filled = (self.filled + amount).min(self.input.len());
    }

    fn input_consume(&mut self, amount: usize) {
        self.progress = amount > 0;
        self.consumed = (self.consumed + amount).min(self.filled);
    }

    fn tmp_and_output(&mut self) -> (&mut [u8], &mut [u8]) {
        let size = self.output_size;
        let (output, tmp) = self.lent().split_at_mut(size);
        (tmp, output)
    }

    fn can_use_input(&self) -> bool {
        self.filled > self.consumed && self.progress
    }
}

/// One upstream TCP connection as ureq sees it.
pub struct Link {
    stream: TcpStream,
    /// The address `stream` is connected to (a stale pooled connection is
    /// replaced by a new one to the same address, while its name still
    /// points there).
    peer: SocketAddr,
    /// The host name it was reached by (`None`: an IP literal): a
    /// replacement goes where the name cache says the name points now.
    name: Option<Arc<str>>,
    /// ureq's connect timeout, for that replacement.
    connect_timeout: Option<Duration>,
    /// When the connect that made this link must be done, a TLS handshake
    /// over it included (`None`: never).
    connect_by: Option<Instant>,
    /// Taken from the pool: probe before the next byte is written.
    recheck: bool,
    buffers: LinkBuffers,
    /// Output accepted but not yet written (see [`COALESCE`]).
    pending: Vec<u8>,
    /// The read timeout currently set on the socket.
    read_timeout: Option<Duration>,
    /// The write timeout currently set on the socket.
    write_timeout: Option<Duration>,
    /// I/O happened since the last liveness question.
    used: bool,
    /// The upstream stopped taking the request (see [`Link::stopped_reading`]):
    /// what is left of it is dropped, and the link is never reused.
    refused: bool,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link").field("peer", &self.peer).finish()
    }
}

impl Link {
    /// A link over `stream`, just connected to `peer`.
    fn new(
        stream: TcpStream,
        peer: SocketAddr,
        name: Option<Arc<str>>,
        connect_timeout: Option<Duration>,
        connect_by: Option<Instant>,
        buffers: LinkBuffers,
    ) -> Link {
        Link {
            stream,
            peer,
            name,
            connect_timeout,
            connect_by,
            recheck: false,
            buffers,
            pending: Vec::new(),
            read_timeout: None,
            write_timeout: None,
            used: false,
            refused: false,
        }
    }

    /// A link to `addr` as the unit tests use it (1 KiB of input at most,
    /// 64 KiB of output), its connect begun now with `connect_timeout`.
    #[cfg(test)]
    pub(crate) fn dial(addr: SocketAddr, connect_timeout: Duration) -> Link {
        let by = Instant::now().checked_add(connect_timeout);
        let (stream, peer) = connect(&[addr], NextTimeout::default()).unwrap();
        assert_eq!(peer, addr);
        Link::new(
            stream,
            peer,
            None,
            Some(connect_timeout),
            by,
            LinkBuffers::new(1024, 64 * 1024),
        )
    }

    /// When the connect that made this link must be done, TLS included.
    pub(crate) fn connect_by(&self) -> Option<Instant> {
        self.connect_by
    }

    /// For a connection just taken from the pool: if the upstream closed it
    /// (or sent stray bytes) while it sat idle, connect afresh to the same
    /// address. Nothing of the request has left yet, so this is always safe,
    /// and ureq never learns the difference. The probe runs here rather than
    /// in [`Transport::is_open`] because that is asked under the pool's lock:
    /// a syscall there, with a thread preempted on its way out of it, had
    /// every other worker queue on the lock (0.5 futex calls per request at
    /// 16 connections, when it was ureq's pool).
    fn ensure_fresh(&mut self) -> Result<(), Error> {
        if !std::mem::replace(&mut self.recheck, false) {
            return Ok(());
        }
        if peek(&self.stream) == Peek::Quiet {
            return Ok(());
        }
        self.reconnect(self.connect_deadline())
    }

    /// When a connect started now must be done (`None`: never), by ureq's
    /// connect timeout.
    pub(crate) fn connect_deadline(&self) -> Option<Instant> {
        self.connect_timeout
            .and_then(|timeout| Instant::now().checked_add(timeout))
    }

    /// Replace the socket of a pooled connection found stale by a new
    /// connection, made by `deadline`: to the same address, unless the host
    /// name it was reached by points elsewhere now (the host moved, and its
    /// old address may refuse).
    pub(crate) fn reconnect(&mut self, deadline: Option<Instant>) -> Result<(), Error> {
        log::debug!(
            "pooled connection to {} went stale; reconnecting",
            self.peer
        );
        let timeout = NextTimeout {
            after: deadline.map_or(UreqDuration::NotHappening, |d| {
                UreqDuration::Exact(d.saturating_duration_since(Instant::now()))
            }),
            reason: ureq::Timeout::Connect,
            ..NextTimeout::default()
        };
        let now_at = self.name.as_deref().map_or_else(Vec::new, |name| {
            crate::resolve::known(name, self.peer.port())
        });
        let addrs = if now_at.is_empty() || now_at.contains(&self.peer) {
            vec![self.peer]
        } else {
            now_at
        };
        let (stream, peer) = connect(&addrs, timeout)?;
        self.stream = stream;
        self.peer = peer;
        self.read_timeout = None;
        self.write_timeout = None;
        Ok(())
    }

    /// Stage `amount` bytes of the output buffer for sending (see [`COALESCE`]).
    fn transmit(&mut self, amount: usize, timeout: &NextTimeout) -> Result<(), Error> {
        if self.refused {
            return Ok(());
        }
        let amount = amount.min(self.buffers.output_size);
        if self.pending.len() + amount <= COALESCE {
            let output = &self.buffers.output()[..amount];
            self.pending.extend_from_slice(output);
            return Ok(());
        }
        self.send(amount, timeout)
    }

    /// Write what is pending, then the first `amount` bytes of the output
    /// buffer, and empty `pending`.
    fn send(&mut self, amount: usize, timeout: &NextTimeout) -> Result<(), Error> {
        self.set_write_timeout(timeout)?;
        // Not for a flush alone: that would borrow an output buffer for nothing.
        let output: &[u8] = if amount == 0 {
            &[]
        } else {
            &self.buffers.output()[..amount]
        };
        let mut clock = WriteClock::start(timeout);
        match write_both(&self.stream, &self.pending, output, &mut clock) {
            Ok(()) => {}
            Err(e) if stopped_reading(&e) => {
                log::debug!("{} stopped reading the request: {e}", self.peer);
                self.refused = true;
            }
            Err(e) => return Err(write_error(e, timeout.reason)),
        }
        self.clear_pending();
        Ok(())
    }

    /// Empty `pending` after it was sent; a large one (a body of up to
    /// [`COALESCE`]) is freed rather than kept for the connection's life.
    fn clear_pending(&mut self) {
        if self.pending.capacity() > PENDING_KEPT {
            self.pending = Vec::new();
        } else {
            self.pending.clear();
        }
    }

    /// The socket.
    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// The buffers ureq reads from and writes into.
    pub(crate) fn buffers_mut(&mut self) -> &mut LinkBuffers {
        &mut self.buffers
    }

    /// Give the output buffer back after a transmit (see [`LinkBuffers`]).
    pub(crate) fn give_back_output(&mut self) {
        self.buffers.give_back();
    }

    /// Set the socket's read timeout, unless it already has this value.
    pub(crate) fn set_read_timeout(&mut self, wanted: Option<Duration>) -> io::Result<()> {
        if wanted != self.read_timeout {
            self.stream.set_read_timeout(wanted)?;
            self.read_timeout = wanted;
        }
        Ok(())
    }

    /// Set the write timeout for ureq's `timeout`: one watch tick unless
    /// its deadline is nearer (a value that stays the same from request to
    /// request, so the syscall is skipped). A write that waits longer is
    /// resumed, tick by tick, by a [`WriteClock`].
    pub(crate) fn set_write_timeout(&mut self, timeout: &NextTimeout) -> io::Result<()> {
        let wanted = match timeout.after {
            UreqDuration::Exact(d) if d < TICK => d.max(Duration::from_millis(1)),
            _ => TICK,
        };
        self.set_write_timeout_to(wanted)
    }

    /// Set the socket's write timeout, unless it already has this value.
    pub(crate) fn set_write_timeout_to(&mut self, wanted: Duration) -> io::Result<()> {
        if Some(wanted) != self.write_timeout {
            self.stream.set_write_timeout(Some(wanted))?;
            self.write_timeout = Some(wanted);
        }
        Ok(())
    }
}

/// A read error as ureq gets it. ureq's body reader takes `UnexpectedEof`,
/// `ConnectionReset` and `ConnectionAborted` for the peer's orderly close,
/// which ends a body without a length (no `Content-Length`, not chunked)
/// cleanly: a cut-off answer would look complete. Those kinds are passed as
/// `Other` instead, so the read fails (a reset, or a TLS peer gone without
/// `close_notify`, is a cut, never an end).
pub(crate) fn read_error(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => {
            Error::Io(io::Error::other(format!("connection cut: {e}")))
        }
        _ => Error::Io(e),
    }
}

/// A write error that says the upstream stopped reading the request: it
/// closed, perhaps after answering early (a 413 for a body it will not
/// take, read from its head alone). The caller drops the rest of the
/// request and lets ureq read on: an answer that came is that upstream's
/// answer (passed on as such, not a broken attempt blamed on the host);
/// without one, the read fails as the write would have.
pub(crate) fn stopped_reading(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

pub(crate) fn write_error(e: io::Error, reason: ureq::Timeout) -> Error {
    if is_timeout(&e) {
        Error::Timeout(reason)
    } else {
        Error::Io(e)
    }
}

/// When a write to an upstream that is blocked must give up: after
/// [`WRITE_STALL`] without progress, or at ureq's deadline. Between the
/// slices the socket's write timeout cuts it into (see
/// [`Link::set_write_timeout`]) the thread's watch runs, as during any
/// upstream wait: a departed client or a passed deadline ends the write, a
/// hedge due starts (a host that takes no more of a large body is outrun,
/// not waited on).
pub(crate) struct WriteClock {
    /// ureq's deadline for this write, if it has one.
    end: Option<Instant>,
    /// When the write has made no progress for too long.
    stall: Option<Instant>,
}

impl WriteClock {
    /// The clock for a write under ureq's `timeout`, started now.
    pub(crate) fn start(timeout: &NextTimeout) -> WriteClock {
        let now = Instant::now();
        WriteClock {
            end: match timeout.after {
                UreqDuration::Exact(d) => now.checked_add(d),
                UreqDuration::NotHappening => None,
            },
            stall: now.checked_add(WRITE_STALL),
        }
    }

    /// Some bytes left: the stall clock starts again.
    pub(crate) fn progressed(&mut self) {
        self.stall = Instant::now().checked_add(WRITE_STALL);
    }

    /// A slice ended with nothing written (`e`, a timeout): `Err` to stop
    /// the write (`e` at a deadline, the watch's reason when it aborts),
    /// `Ok` to wait one more slice.
    pub(crate) fn slice_ended(&self, e: io::Error) -> io::Result<()> {
        let now = Instant::now();
        if self.stall.is_some_and(|s| now >= s) || self.end.is_some_and(|d| now >= d) {
            return Err(e);
        }
        match crate::watch::interruption() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

/// `write_all` of `first` then `second`, with `writev` while both have bytes
/// left, for as long as `clock` allows.
fn write_both(
    mut stream: &TcpStream,
    first: &[u8],
    second: &[u8],
    clock: &mut WriteClock,
) -> io::Result<()> {
    let (mut a, mut b) = (0, 0);
    while a < first.len() || b < second.len() {
        let result = if a == first.len() {
            stream.write(&second[b..])
        } else if b == second.len() {
            stream.write(&first[a..])
        } else {
            stream.write_vectored(&[IoSlice::new(&first[a..]), IoSlice::new(&second[b..])])
        };
        match result {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                let from_first = n.min(first.len() - a);
                a += from_first;
                b += n - from_first;
                clock.progressed();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => clock.slice_ended(e)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Transport for Link {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        let timeout = timeout.for_write();
        if timeout.after.is_zero() {
            return Err(Error::Timeout(timeout.reason));
        }
        self.used = true;
        let result = self
            .ensure_fresh()
            .and_then(|()| self.transmit(amount, &timeout));
        // Sent or copied (or failed, and the exchange is over): the output
        // buffer is free for another connection until the next request.
        self.buffers.give_back();
        result
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        self.used = true;
        self.ensure_fresh()?;
        if !self.pending.is_empty() {
            // No deadline of ureq's applies to this flush: WRITE_STALL does.
            self.send(0, &NextTimeout::default())?;
        }
        let timeout = timeout.for_read();
        if timeout.after.is_zero() {
            return Err(Error::Timeout(timeout.reason));
        }
        self.set_read_timeout(timeout.not_zero().map(|d| *d))?;
        let result = loop {
            match (&self.stream).read(self.buffers.input_append_buf()) {
                // A signal (Linux does not restart reads that have a timeout):
                // wait again, at most one more slice.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match result {
            Ok(n) => {
                self.buffers.input_appended(n);
                Ok(n > 0)
            }
            Err(e) if is_timeout(&e) => Err(Error::Timeout(timeout.reason)),
            Err(e) => Err(read_error(e)),
        }
    }

    /// Asked twice per exchange: by ureq when the connection goes back to
    /// the pool (right after I/O), and by the pool ([`crate::pool`]) when it
    /// is taken out for the next request, both without a syscall. The second
    /// arms the probe that runs before the next write
    /// ([`Link::ensure_fresh`]): outside the pool's lock, it
    /// sees a close that came while the connection sat idle, and a dead
    /// connection parked in the pool meanwhile costs nothing.
    fn is_open(&mut self) -> bool {
        // Unsent output means an exchange was abandoned half-way.
        if !self.pending.is_empty() || self.refused {
            return false;
        }
        if !std::mem::replace(&mut self.used, false) {
            self.recheck = true;
        }
        self.buffers.shed();
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// A Link to a fresh loopback listener, and the accepted far end.
    fn pair() -> (Link, TcpStream) {
        let (link, far, _) = pair_listening();
        (link, far)
    }

    /// As [`pair`], keeping the listener for reconnects.
    fn pair_listening() -> (Link, TcpStream, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let link = Link::dial(listener.local_addr().unwrap(), Duration::from_secs(5));
        let (far, _) = listener.accept().unwrap();
        (link, far, listener)
    }

    pub(crate) fn budget(secs: u64) -> NextTimeout {
        NextTimeout {
            after: UreqDuration::Exact(Duration::from_secs(secs)),
            ..NextTimeout::default()
        }
    }

    /// Stage `bytes` in ureq's output buffer and transmit them.
    fn transmit(link: &mut Link, bytes: &[u8], timeout: NextTimeout) {
        link.buffers.output()[..bytes.len()].copy_from_slice(bytes);
        link.transmit_output(bytes.len(), timeout).unwrap();
    }

    fn read_exactly(far: &mut TcpStream, n: usize) -> Vec<u8> {
        far.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![0; n];
        far.read_exact(&mut got).unwrap();
        got
    }

    #[test]
    fn a_wait_for_the_first_lookup_comes_out_of_the_connect_budget() {
        let now = Instant::now();
        let budget = Some(Duration::from_secs(5));
        let ureqs = UreqDuration::Exact(Duration::from_secs(5));
        // No wait: ureq's deadline as it is.
        assert_eq!(
            connect_deadline(now, ureqs, None, budget),
            now.checked_add(Duration::from_secs(5))
        );
        // Waited 3 s for the lookup: 2 s left for the connect, not 5.
        let since = now.checked_sub(Duration::from_secs(3));
        if let Some(since) = since {
            assert_eq!(
                connect_deadline(now, ureqs, Some(since), budget),
                now.checked_add(Duration::from_secs(2))
            );
        }
        // No connect timeout at all: none.
        assert_eq!(
            connect_deadline(now, UreqDuration::NotHappening, since, None),
            None
        );
    }

    #[test]
    fn head_and_small_body_leave_together_when_the_answer_is_awaited() {
        let (mut link, mut far) = pair();
        transmit(&mut link, b"POST / HTTP/1.1\r\n\r\n", budget(30));
        transmit(&mut link, b"{\"a\":1}", budget(120));
        // Nothing has left yet: the far end has nothing to read.
        assert_eq!(peek(&far), Peek::Quiet);
        let answer = thread::spawn(move || {
            let got = read_exactly(&mut far, 26);
            far.write_all(b"ok").unwrap();
            (got, far)
        });
        assert!(link.await_input(budget(5)).unwrap());
        let (got, _far) = answer.join().unwrap();
        assert_eq!(got, b"POST / HTTP/1.1\r\n\r\n{\"a\":1}");
        assert_eq!(link.buffers.input(), b"ok");
        // One write timeout for both budgets: no setsockopt per request.
        assert_eq!(link.write_timeout, Some(TICK));
        // (The kernel keeps it in its own ticks: 250 ms may read back as 252.)
        let set = link.stream.write_timeout().unwrap().unwrap();
        assert!(set >= TICK && set < TICK * 2, "{set:?}");
    }

    #[test]
    fn large_output_is_written_at_once_with_what_was_pending() {
        let (mut link, mut far) = pair();
        transmit(&mut link, b"HEAD", budget(30));
        let body = vec![b'x'; COALESCE + 1];
        transmit(&mut link, &body, budget(120));
        let got = read_exactly(&mut far, 4 + body.len());
        assert_eq!(&got[..4], b"HEAD");
        assert!(got[4..].iter().all(|&b| b == b'x'));
        assert!(link.pending.is_empty());
    }

    #[test]
    fn a_near_deadline_shortens_the_write_timeout() {
        let (mut link, mut far) = pair();
        let body = vec![b'y'; COALESCE + 1];
        let near = NextTimeout {
            after: UreqDuration::Exact(Duration::from_millis(100)),
            ..NextTimeout::default()
        };
        transmit(&mut link, &body, near);
        assert_eq!(
            link.stream.write_timeout().unwrap(),
            Some(Duration::from_millis(100))
        );
        read_exactly(&mut far, body.len());
    }

    #[test]
    fn a_write_the_upstream_does_not_take_ends_at_the_deadline_in_slices() {
        let (mut link, _far) = pair();
        // Far more than the socket buffers hold, and the far end never reads.
        link.buffers = LinkBuffers::new(1024, 8 * 1024 * 1024);
        let body = vec![b'q'; 8 * 1024 * 1024];
        let deadline = NextTimeout {
            after: UreqDuration::Exact(Duration::from_millis(600)),
            reason: ureq::Timeout::SendBody,
            ..NextTimeout::default()
        };
        let started = Instant::now();
        link.buffers.output()[..body.len()].copy_from_slice(&body);
        match link.transmit_output(body.len(), deadline) {
            Err(Error::Timeout(ureq::Timeout::SendBody)) => {}
            other => panic!("expected a send-body timeout, got {other:?}"),
        }
        // Each slice is shorter than the deadline; they add up to it.
        assert!(link.write_timeout <= Some(TICK));
        assert!(started.elapsed() >= Duration::from_millis(600));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn input_starts_small_and_doubles_only_when_a_read_fills_it() {
        let mut b = LinkBuffers::new(32 * 1024, 1024);
        assert_eq!(b.input_capacity(), 0, "nothing allocated before use");
        assert_eq!(b.input_append_buf().len(), INPUT_START);
        // Small reads, consumed as they come: the buffer stays as it is.
        for _ in 0..10 {
            let free = b.input_append_buf();
            free[..3].copy_from_slice(b"abc");
            b.input_appended(3);
            assert_eq!(b.input(), b"abc");
            b.input_consume(3);
        }
        assert_eq!(b.input_capacity(), INPUT_START);
        // A read that fills all it was offered: the next offer is twice as large.
        let n = b.input_append_buf().len();
        b.input_appended(n);
        assert_eq!(b.input().len(), INPUT_START);
        assert_eq!(b.input_append_buf().len(), INPUT_START);
        assert_eq!(b.input_capacity(), 2 * INPUT_START);
        // Unconsumed bytes survive the growth and the shift to the front.
        b.input_consume(INPUT_START - 2);
        assert_eq!(b.input().len(), 2);
        // Growth stops at the maximum.
        for _ in 0..10 {
            let n = b.input_append_buf().len();
            b.input_appended(n);
            let all = b.input().len();
            b.input_consume(all);
        }
        assert_eq!(b.input_capacity(), 32 * 1024);
    }

    #[test]
    fn a_grown_input_is_freed_when_the_connection_goes_idle_with_nothing_unread() {
        let mut b = LinkBuffers::new(32 * 1024, 1024);
        // Grow it with full reads, leaving two bytes unread.
        for _ in 0..3 {
            let n = b.input_append_buf().len();
            b.input_appended(n);
            let all = b.input().len();
            b.input_consume(all - 2);
        }
        assert!(b.input_capacity() > INPUT_START);
        b.shed();
        assert_eq!(b.input(), &[0, 0], "unread bytes are never dropped");
        assert!(b.input_capacity() > INPUT_START);
        b.input_consume(2);
        b.shed();
        assert_eq!(b.input_capacity(), 0, "freed once all is read");
        assert_eq!(
            b.input_append_buf().len(),
            INPUT_START,
            "starts small again"
        );
        // A buffer that never grew is kept: the next small answer reuses it.
        b.input_appended(10);
        b.input_consume(10);
        b.shed();
        assert_eq!(b.input_capacity(), INPUT_START);
    }

    #[test]
    fn a_link_going_back_to_the_pool_sheds_its_grown_input() {
        let (mut link, _far) = pair();
        let b = link.buffers_mut();
        *b = LinkBuffers::new(32 * 1024, 1024);
        for _ in 0..3 {
            let n = b.input_append_buf().len();
            b.input_appended(n);
            let all = b.input().len();
            b.input_consume(all);
        }
        assert!(link.buffers_mut().input_capacity() > INPUT_START);
        assert!(link.is_open());
        assert_eq!(link.buffers_mut().input_capacity(), 0);
    }

    #[test]
    fn input_keeps_unconsumed_bytes_in_order_across_shifts() {
        let mut b = LinkBuffers::new(INPUT_START, 1024);
        let mut sent = Vec::new();
        let mut got = Vec::new();
        let mut next = 0u8;
        for round in 0..200 {
            let free = b.input_append_buf();
            let n = free.len().min(1 + round * 37 % 900);
            for byte in &mut free[..n] {
                *byte = next;
                sent.push(next);
                next = next.wrapping_add(1);
            }
            b.input_appended(n);
            let take = b.input().len() * 2 / 3;
            got.extend_from_slice(&b.input()[..take]);
            b.input_consume(take);
            assert_eq!(b.can_use_input(), take > 0 && !b.input().is_empty());
        }
        got.extend_from_slice(b.input());
        assert_eq!(got, sent);
        assert_eq!(b.input_capacity(), INPUT_START, "capped at its maximum");
    }

    #[test]
    fn output_is_lent_only_while_a_request_is_sent() {
        let (mut link, mut far) = pair();
        assert!(link.buffers.output.is_none());
        assert_eq!(link.buffers.output().len(), 64 * 1024);
        let (tmp, out) = link.buffers.tmp_and_output();
        assert_eq!((tmp.len(), out.len()), (SCRATCH, 64 * 1024));
        transmit(&mut link, b"POST / HTTP/1.1\r\n\r\n", budget(30));
        assert!(link.buffers.output.is_none(), "given back after transmit");
        // A body larger than COALESCE leaves at once; its pending copy of the
        // head is freed afterwards if it grew large.
        let body = vec![b'z'; COALESCE + 1];
        transmit(&mut link, &body, budget(120));
        assert!(link.buffers.output.is_none());
        assert!(link.pending.is_empty());
        read_exactly(&mut far, 19 + body.len());
        let small = vec![b'w'; PENDING_KEPT + 1];
        transmit(&mut link, &small, budget(30));
        assert!(link.pending.capacity() > PENDING_KEPT);
        let answer = thread::spawn(move || {
            read_exactly(&mut far, PENDING_KEPT + 1);
            far.write_all(b"ok").unwrap();
            far
        });
        assert!(link.await_input(budget(5)).unwrap());
        let _far = answer.join().unwrap();
        assert_eq!(
            link.pending.capacity(),
            0,
            "a large pending buffer is freed"
        );
    }

    /// Wait (bounded) until a peek at `link`'s socket sees `want`.
    pub(crate) fn wait_peek(link: &Link, want: Peek) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while peek(&link.stream) != want && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(peek(&link.stream), want);
    }

    /// The next connection to `listener`, waited for at most 5 s.
    pub(crate) fn accept_within(listener: &TcpListener) -> TcpStream {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    return s;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("no new connection: {e}"),
            }
        }
    }

    /// Send `bytes` as a request on `link` (staged, then flushed).
    fn send_now(link: &mut Link, bytes: &[u8]) {
        transmit(link, bytes, budget(30));
        link.send(0, &budget(30)).unwrap();
    }

    #[test]
    fn a_quiet_pooled_connection_is_kept_for_the_next_request() {
        let (mut link, mut far, listener) = pair_listening();
        send_now(&mut link, b"one");
        assert_eq!(read_exactly(&mut far, 3), b"one");
        assert!(link.is_open(), "return to the pool");
        assert!(link.is_open(), "taken out of the pool");
        send_now(&mut link, b"two");
        assert_eq!(read_exactly(&mut far, 3), b"two", "same connection");
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "no new connection was made");
    }

    #[test]
    fn a_pooled_connection_the_upstream_closed_is_replaced_before_sending() {
        let (mut link, mut far, listener) = pair_listening();
        send_now(&mut link, b"one");
        assert_eq!(read_exactly(&mut far, 3), b"one");
        assert!(link.is_open(), "return to the pool");
        drop(far);
        wait_peek(&link, Peek::Closed);
        // Asking costs no syscall (ureq holds its pool lock meanwhile)...
        assert!(link.is_open(), "taken out of the pool");
        // ...and the first write finds the close and reconnects.
        send_now(&mut link, b"two");
        let mut fresh = accept_within(&listener);
        assert_eq!(read_exactly(&mut fresh, 3), b"two");
    }

    /// Two listeners on one port, 127.0.0.1 and ::1: a host's old address
    /// and the one its name points to now.
    fn old_and_new_address() -> Option<(TcpListener, TcpListener)> {
        (0..20).find_map(|_| {
            let old = TcpListener::bind("127.0.0.1:0").ok()?;
            let port = old.local_addr().ok()?.port();
            let new = TcpListener::bind(("::1", port)).ok()?;
            Some((old, new))
        })
    }

    #[test]
    fn a_stale_pooled_connection_goes_where_its_name_points_now() {
        let Some((old, new)) = old_and_new_address() else {
            return; // no IPv6 loopback here: nothing to test
        };
        let mut link = Link::dial(old.local_addr().unwrap(), Duration::from_secs(5));
        link.name = Some(Arc::from("moved.transport.test"));
        crate::resolve::Names::remember(
            "moved.transport.test",
            vec![std::net::Ipv6Addr::LOCALHOST.into()],
        );
        let mut far = accept_within(&old);
        send_now(&mut link, b"one");
        assert_eq!(read_exactly(&mut far, 3), b"one");
        assert!(link.is_open(), "return to the pool");
        // The host moved: its old address closed the connection and refuses.
        drop(far);
        drop(old);
        wait_peek(&link, Peek::Closed);
        assert!(link.is_open(), "taken out of the pool");
        send_now(&mut link, b"two");
        let mut moved = accept_within(&new);
        assert_eq!(read_exactly(&mut moved, 3), b"two");
    }

    #[test]
    fn stray_bytes_on_a_pooled_connection_are_never_read_as_an_answer() {
        let (mut link, mut far, listener) = pair_listening();
        send_now(&mut link, b"one");
        assert_eq!(read_exactly(&mut far, 3), b"one");
        assert!(link.is_open());
        far.write_all(b"junk").unwrap();
        wait_peek(&link, Peek::Data);
        assert!(link.is_open());
        send_now(&mut link, b"two");
        let mut fresh = accept_within(&listener);
        assert_eq!(read_exactly(&mut fresh, 3), b"two");
        fresh.write_all(b"answer").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while link.buffers.input().len() < 6 && Instant::now() < deadline {
            link.await_input(budget(5)).unwrap();
        }
        assert_eq!(link.buffers.input(), b"answer");
    }

    #[test]
    fn a_connection_that_cannot_be_replaced_fails_as_a_connect_error() {
        let (mut link, far, listener) = pair_listening();
        send_now(&mut link, b"one");
        assert!(link.is_open());
        drop(far);
        drop(listener);
        wait_peek(&link, Peek::Closed);
        assert!(link.is_open());
        let err = link
            .transmit_output(0, budget(30))
            .expect_err("nobody listens any more");
        assert!(matches!(err, Error::Io(_)), "{err:?}");
    }

    #[test]
    fn unsent_output_is_never_reused() {
        let (mut link, _far) = pair();
        transmit(&mut link, b"GET / HTTP/1.1\r\n", budget(30));
        assert!(!link.is_open());
    }

    #[test]
    fn a_silent_upstream_times_out_as_the_reason_given() {
        let (mut link, _far) = pair();
        let short = NextTimeout {
            after: UreqDuration::Exact(Duration::from_millis(20)),
            reason: ureq::Timeout::RecvResponse,
            ..NextTimeout::default()
        };
        match link.await_input(short) {
            Err(Error::Timeout(ureq::Timeout::RecvResponse)) => {}
            other => panic!("expected a RecvResponse timeout, got {other:?}"),
        }
    }

    #[test]
    fn refused_connects_are_io_errors_and_each_address_is_tried() {
        // Bind then drop: nothing listens there now.
        let dead = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        match connect(&[dead], budget(2)) {
            Err(Error::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            other => panic!("expected refused, got {other:?}"),
        }
        let live = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = live.local_addr().unwrap();
        let (stream, peer) = connect(&[dead, addr], budget(2)).unwrap();
        assert!(stream.nodelay().unwrap());
        assert_eq!(peer, addr, "the address that answered is kept");
    }
}
