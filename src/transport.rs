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
//!   path is never (reads wait one watch tick, writes [`WRITE_STALL`]);
//! - no single write waits longer than [`WRITE_STALL`] or past ureq's deadline;
//! - a pooled connection is probed with one non-blocking `MSG_PEEK`, and one
//!   with unsent output or unexpected input is never reused.
//!
//! TLS (rustls) runs on top of [`Link`], so HTTPS upstreams get the same.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::SockRef;
use ureq::unversioned::transport::time::Duration as UreqDuration;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, Transport,
};
use ureq::Error;

/// Longest one write to an upstream may make no progress.
pub const WRITE_STALL: Duration = Duration::from_secs(20);
/// Output up to this size waits to leave with what follows (the body after
/// the head), at the latest when the response is awaited.
pub const COALESCE: usize = 16 * 1024;
/// Shortest share of the connect timeout an address gets when the host
/// resolved to several.
const MIN_PER_ADDRESS: Duration = Duration::from_millis(10);

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
        let stream = connect(&details.addrs, details.timeout)?;
        let config = details.config;
        Ok(Some(Link {
            stream,
            buffers: LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size()),
            pending: Vec::new(),
            read_timeout: None,
            write_timeout: None,
            used: false,
        }))
    }
}

/// Try each address in turn; earlier ones get half of the time left (the
/// last gets all of it), so one black-holed address cannot eat the budget.
fn connect(addrs: &[SocketAddr], timeout: NextTimeout) -> Result<TcpStream, Error> {
    let deadline = match timeout.after {
        UreqDuration::Exact(d) => Instant::now().checked_add(d),
        UreqDuration::NotHappening => None,
    };
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        let result = match deadline {
            None => TcpStream::connect(addr),
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
                TcpStream::connect_timeout(addr, share)
            }
        };
        match result {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) if is_timeout(&e) => Error::Timeout(timeout.reason),
        Some(e) => Error::Io(e),
        None => Error::ConnectionFailed,
    })
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// One upstream TCP connection as ureq sees it.
pub struct Link {
    stream: TcpStream,
    buffers: LazyBuffers,
    /// Output accepted but not yet written (see [`COALESCE`]).
    pending: Vec<u8>,
    /// The read timeout currently set on the socket.
    read_timeout: Option<Duration>,
    /// The write timeout currently set on the socket.
    write_timeout: Option<Duration>,
    /// I/O happened since the last liveness question.
    used: bool,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.stream.peer_addr().ok())
            .finish()
    }
}

impl Link {
    fn set_read_timeout(&mut self, wanted: Option<Duration>) -> io::Result<()> {
        if wanted != self.read_timeout {
            self.stream.set_read_timeout(wanted)?;
            self.read_timeout = wanted;
        }
        Ok(())
    }

    /// Set the write timeout for ureq's `timeout`: [`WRITE_STALL`] unless
    /// its deadline is nearer (a value that stays the same from request to
    /// request, so the syscall is skipped).
    fn set_write_timeout(&mut self, timeout: &NextTimeout) -> io::Result<()> {
        let wanted = match timeout.after {
            UreqDuration::Exact(d) if d < WRITE_STALL => d.max(Duration::from_millis(1)),
            _ => WRITE_STALL,
        };
        if Some(wanted) != self.write_timeout {
            self.stream.set_write_timeout(Some(wanted))?;
            self.write_timeout = Some(wanted);
        }
        Ok(())
    }
}

fn write_error(e: io::Error, reason: ureq::Timeout) -> Error {
    if is_timeout(&e) {
        Error::Timeout(reason)
    } else {
        Error::Io(e)
    }
}

/// `write_all` of `first` then `second`, with `writev` while both have bytes left.
fn write_both(mut stream: &TcpStream, first: &[u8], second: &[u8]) -> io::Result<()> {
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
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
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
        if self.pending.len() + amount <= COALESCE {
            let output = &self.buffers.output()[..amount];
            self.pending.extend_from_slice(output);
            return Ok(());
        }
        self.set_write_timeout(&timeout)?;
        let output = &self.buffers.output()[..amount];
        write_both(&self.stream, &self.pending, output)
            .map_err(|e| write_error(e, timeout.reason))?;
        self.pending.clear();
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        self.used = true;
        if !self.pending.is_empty() {
            // No deadline of ureq's applies to this flush: WRITE_STALL does.
            let flush = NextTimeout::default();
            self.set_write_timeout(&flush)?;
            write_both(&self.stream, &self.pending, &[])
                .map_err(|e| write_error(e, flush.reason))?;
            self.pending.clear();
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
            Err(e) => Err(Error::Io(e)),
        }
    }

    /// ureq asks twice per exchange: when the connection goes back to the
    /// pool (right after I/O) and when it is taken out for the next request.
    /// Only the second probes the socket: it runs just before the connection
    /// is used, so it also sees a close that came while the connection sat
    /// idle, and a dead connection parked in the pool meanwhile costs nothing.
    fn is_open(&mut self) -> bool {
        // Unsent output means an exchange was abandoned half-way.
        if !self.pending.is_empty() {
            return false;
        }
        if std::mem::replace(&mut self.used, false) {
            return true;
        }
        peek(&self.stream) == Peek::Quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// A Link to a fresh loopback listener, and the accepted far end.
    fn pair() -> (Link, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = connect(&[addr], NextTimeout::default()).unwrap();
        let (far, _) = listener.accept().unwrap();
        let link = Link {
            stream,
            buffers: LazyBuffers::new(1024, 64 * 1024),
            pending: Vec::new(),
            read_timeout: None,
            write_timeout: None,
            used: false,
        };
        (link, far)
    }

    fn budget(secs: u64) -> NextTimeout {
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
        assert_eq!(link.write_timeout, Some(WRITE_STALL));
        assert_eq!(link.stream.write_timeout().unwrap(), Some(WRITE_STALL));
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
            after: UreqDuration::Exact(Duration::from_secs(3)),
            ..NextTimeout::default()
        };
        transmit(&mut link, &body, near);
        assert_eq!(
            link.stream.write_timeout().unwrap(),
            Some(Duration::from_secs(3))
        );
        read_exactly(&mut far, body.len());
    }

    #[test]
    fn probe_tells_quiet_from_stray_bytes_and_from_closed() {
        let (mut link, mut far) = pair();
        assert!(link.is_open());
        // After I/O, the first question (the return to the pool) is free;
        // the next (taking it out) probes and sees the stray bytes.
        link.used = true;
        far.write_all(b"junk").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while peek(&link.stream) != Peek::Data && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert!(link.is_open(), "returning to the pool does not probe");
        assert!(!link.is_open(), "stray bytes must not be reused");

        let (mut link, far) = pair();
        drop(far);
        let deadline = Instant::now() + Duration::from_secs(5);
        while link.is_open() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(peek(&link.stream), Peek::Closed);
        assert!(!link.is_open());
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
        let stream = connect(&[dead, live.local_addr().unwrap()], budget(2)).unwrap();
        assert!(stream.nodelay().unwrap());
    }
}
