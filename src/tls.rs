//! TLS for https upstreams: which roots are trusted, the handshake within
//! the connect timeout, and encrypted I/O over a [`Link`].
//!
//! Why our own and not ureq's rustls transport: ureq's keeps its own pair of
//! plaintext buffers (input and output, zeroed in full, 72 KiB at our sizes)
//! for each TLS connection's whole life, on top of the buffers of the TCP
//! transport under it, so an open stream to an https node cost about twice
//! what a plain one did. Here the plaintext lives in the [`Link`]'s
//! [`LinkBuffers`](crate::transport::LinkBuffers) (small while a stream
//! trickles, the output lent only while sending) and ciphertext goes straight
//! between the socket and rustls, with no buffer of ours in between.
//!
//! What it guarantees:
//! - certificates are always verified: against the Mozilla roots compiled in
//!   (no system store is read) plus those of `caFile`; there is no switch to
//!   turn verification off;
//! - the handshake, every read and every write of it, ends by the connect
//!   deadline, and while it waits the thread's watch runs as during any
//!   upstream wait (a departed client or a passed deadline ends it, a hedge
//!   due starts);
//! - a request's records leave in one write when they fit in
//!   [`COALESCE`](crate::transport::COALESCE), as on plain connections;
//! - a body the peer ends without `close_notify` is an error (a cut-off
//!   answer), never a clean end;
//! - a pooled connection is probed just before its next request is written,
//!   outside the pool's lock (as a plain one, see `transport.rs`); if
//!   anything but TLS housekeeping (such as TLS 1.3 session tickets or a key
//!   update) arrived while it was idle, or the upstream closed it, it is
//!   replaced by a new connection to the same address with a new handshake
//!   (same settings, same server name), all by the connect deadline and
//!   before any record of the request leaves.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use ureq::unversioned::transport::time::Duration as UreqDuration;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, NextTimeout, Transport,
};
use ureq::Error;

use crate::transport::{
    is_timeout, peek, read_error, stopped_reading, write_error, Link, Peek, WriteClock, COALESCE,
    WRITE_STALL,
};
use crate::watch;

/// The rustls client settings every https connection of one agent shares.
pub fn client_config(extra_roots: &[CertificateDer<'static>]) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let (_, ignored) = roots.add_parsable_certificates(extra_roots.iter().cloned());
    if ignored > 0 {
        log::warn!(
            "caFile: {ignored} certificate(s) cannot serve as a trust anchor and are ignored"
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Wraps a [`Link`] in TLS for https hosts; plain ones pass through untouched
/// (second in the connector chain).
#[derive(Debug)]
pub struct TlsConnector {
    /// Why https cannot work, when the settings could not be built.
    config: Result<Arc<ClientConfig>, String>,
}

impl TlsConnector {
    /// A connector trusting the built-in roots and `extra_roots`.
    pub fn new(extra_roots: &[CertificateDer<'static>]) -> Self {
        TlsConnector {
            config: client_config(extra_roots).map(Arc::new),
        }
    }
}

impl Connector<Link> for TlsConnector {
    type Out = Either<Link, TlsLink>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<Link>,
    ) -> Result<Option<Self::Out>, Error> {
        match chained {
            Some(link) if !details.needs_tls() => Ok(Some(Either::A(link))),
            Some(link) => handshake(&self.config, details, link).map(|t| Some(Either::B(t))),
            None => Ok(None),
        }
    }
}

/// Kept out of line so that plain connections never touch the handshake's
/// large stack frame (its pages would stay resident in every worker).
#[inline(never)]
fn handshake(
    config: &Result<Arc<ClientConfig>, String>,
    details: &ConnectionDetails,
    link: Link,
) -> Result<TlsLink, Error> {
    let config = match config {
        Ok(config) => config.clone(),
        Err(why) => {
            log::error!("{why}");
            return Err(Error::Tls("TLS could not be set up (see the log)"));
        }
    };
    let host = details.uri.host().unwrap_or_default();
    // An IPv6 literal comes bracketed; rustls wants the bare address.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| Error::Tls("the host is not a valid TLS server name"))?;
    TlsLink::establish(config, name, link, details.timeout)
}

/// Shake hands with the server at the other end of `link` as `name`; every
/// read and write of it ends by `deadline` (else a `reason` timeout).
fn shake(
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    link: &mut Link,
    deadline: Option<Instant>,
    reason: ureq::Timeout,
) -> Result<ClientConnection, Error> {
    let mut tls = ClientConnection::new(config.clone(), name.clone())?;
    // Reads wait in watch slices (see `Deadlined`), so the wait needs an end.
    let deadline = deadline.or_else(|| Instant::now().checked_add(WRITE_STALL));
    while tls.is_handshaking() {
        let mut io = Deadlined { link, deadline };
        let Err(e) = tls.complete_io(&mut io) else {
            continue;
        };
        if let Some(tls_error) = rustls_error(&e) {
            return Err(Error::Rustls(tls_error));
        }
        if !is_timeout(&e) {
            return Err(Error::Io(e));
        }
        if deadline.is_none_or(|d| Instant::now() >= d) {
            return Err(Error::Timeout(reason));
        }
        // A slice ended with the handshake still waiting: the watch's turn,
        // as between ureq's reads (a departed client, a deadline, a hedge
        // due now, keep-alive comments). A timed-out read leaves rustls's
        // state as it was, so the handshake resumes where it stood.
        if let Some(why) = watch::interruption() {
            return Err(Error::Io(why));
        }
    }
    Ok(tls)
}

/// When a wait of `timeout` from now ends (`None`: never).
fn deadline_of(timeout: &NextTimeout) -> Option<Instant> {
    match timeout.after {
        UreqDuration::Exact(d) => Instant::now().checked_add(d),
        UreqDuration::NotHappening => None,
    }
}

/// The rustls error inside an I/O error from `complete_io`, if that is what it is.
fn rustls_error(e: &io::Error) -> Option<rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
}

/// The socket of a [`Link`] with every read and write bounded by one deadline.
struct Deadlined<'a> {
    link: &'a mut Link,
    deadline: Option<Instant>,
}

impl Deadlined<'_> {
    /// Time left, or a timeout error when none is.
    fn left(&self) -> io::Result<Option<Duration>> {
        match self.deadline {
            None => Ok(None),
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Ok(Some(left)),
                _ => Err(io::ErrorKind::TimedOut.into()),
            },
        }
    }
}

impl Read for Deadlined<'_> {
    /// Waits at most one watch slice ([`watch::next_wake`]); [`shake`] runs
    /// the watch between slices.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?.unwrap_or(WRITE_STALL).min(watch::next_wake());
        self.link.set_read_timeout(Some(left))?;
        self.link.stream().read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?.unwrap_or(WRITE_STALL);
        self.link.set_write_timeout_to(left)?;
        self.link.stream().write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let left = self.left()?.unwrap_or(WRITE_STALL);
        self.link.set_write_timeout_to(left)?;
        self.link.stream().write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One https upstream connection as ureq sees it: plaintext in the
/// [`Link`]'s buffers, records to and from its socket.
pub struct TlsLink {
    link: Link,
    tls: ClientConnection,
    /// Plaintext handed to rustls since its records last left (see [`COALESCE`]).
    unsent: usize,
    /// I/O happened since the last liveness question.
    used: bool,
    /// Taken from the pool: probe before the next record is written.
    recheck: bool,
    /// The upstream stopped taking the request (see
    /// [`stopped_reading`](crate::transport::stopped_reading)): what is left
    /// of it is dropped, and the link is never reused.
    refused: bool,
    /// What the handshake was made with, to make it again over a new
    /// connection when a pooled one went stale.
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl fmt::Debug for TlsLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsLink").field("link", &self.link).finish()
    }
}

impl TlsLink {
    /// TLS over `link` to the server `name`, the handshake done within `timeout`.
    fn establish(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        mut link: Link,
        timeout: NextTimeout,
    ) -> Result<TlsLink, Error> {
        // The TCP connect under it used part of the same budget
        // (`timeouts.connectMs` is TCP and TLS together); `timeout` would
        // start it afresh.
        let deadline = match (link.connect_by(), deadline_of(&timeout)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let tls = shake(&config, &name, &mut link, deadline, timeout.reason)?;
        Ok(TlsLink {
            link,
            tls,
            unsent: 0,
            used: false,
            recheck: false,
            refused: false,
            config,
            name,
        })
    }

    /// For a connection just taken from the pool: if the upstream closed it,
    /// or sent anything but TLS housekeeping, while it sat idle, connect
    /// afresh to the same address and shake hands again, by the connect
    /// deadline. Nothing of the request has left yet, so this is always
    /// safe. Here rather than in [`Transport::is_open`] for the reason
    /// [`Link`]'s own probe is: that is asked under the pool's lock.
    fn ensure_fresh(&mut self) -> Result<(), Error> {
        if !std::mem::replace(&mut self.recheck, false) {
            return Ok(());
        }
        let fresh = match peek(self.link.stream()) {
            Peek::Quiet => true,
            Peek::Closed => false,
            Peek::Data => self.absorb_idle_input(),
        };
        if fresh {
            return Ok(());
        }
        // One deadline for both: together they are this request's connect.
        // Should either fail, ureq drops the connection with the error, so
        // a new socket under the old TLS state is never used.
        let deadline = self.link.connect_deadline();
        self.link.reconnect(deadline)?;
        self.tls = shake(
            &self.config,
            &self.name,
            &mut self.link,
            deadline,
            ureq::Timeout::Connect,
        )?;
        self.unsent = 0;
        Ok(())
    }

    /// Write every pending record; a write that makes no progress ends
    /// after [`WRITE_STALL`] or at `timeout`, whichever is nearer, and the
    /// watch runs while it waits ([`WriteClock`]).
    fn flush(&mut self, timeout: &NextTimeout) -> Result<(), Error> {
        if !self.tls.wants_write() || self.refused {
            self.unsent = 0;
            return Ok(());
        }
        self.link.set_write_timeout(timeout)?;
        let mut clock = WriteClock::start(timeout);
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.link.stream()) {
                Ok(0) => return Err(Error::Io(io::ErrorKind::WriteZero.into())),
                Ok(_) => clock.progressed(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    if let Err(e) = clock.slice_ended(e) {
                        return Err(write_error(e, timeout.reason));
                    }
                }
                Err(e) if stopped_reading(&e) => {
                    log::debug!("upstream stopped reading the request: {e}");
                    self.refused = true;
                    break;
                }
                Err(e) => return Err(write_error(e, timeout.reason)),
            }
        }
        self.unsent = 0;
        Ok(())
    }

    /// Encrypt `amount` bytes of the output buffer; records leave now only
    /// when more than [`COALESCE`] bytes wait or rustls will take no more.
    fn transmit(&mut self, amount: usize, timeout: &NextTimeout) -> Result<(), Error> {
        if self.refused {
            return Ok(());
        }
        let mut done = 0;
        while done < amount {
            let plain = &self.link.buffers_mut().output()[done..amount];
            let n = self.tls.writer().write(plain)?;
            if n == 0 && !self.tls.wants_write() {
                return Err(Error::Io(io::ErrorKind::WriteZero.into()));
            }
            done += n;
            self.unsent += n;
            if n == 0 || self.unsent > COALESCE {
                // rustls's send buffer is full, or enough waits for a write.
                self.flush(timeout)?;
            }
        }
        Ok(())
    }

    /// Take in TLS housekeeping that arrived while the connection was idle;
    /// true if that was all it was and the connection can be reused. The
    /// key update the peer may ask for in return is not pending output:
    /// rustls sends it just ahead of the next record (the request's). Any
    /// other reply owed (a refusal to renegotiate, an alert) is: such a
    /// connection is not reused.
    fn absorb_idle_input(&mut self) -> bool {
        // `peek` saw bytes, so this read does not block.
        match self.tls.read_tls(&mut self.link.stream()) {
            Ok(n) if n > 0 => {}
            _ => return false,
        }
        match self.tls.process_new_packets() {
            Ok(state) => {
                state.plaintext_bytes_to_read() == 0
                    && !state.peer_has_closed()
                    && !self.tls.wants_write()
                    && peek(self.link.stream()) == Peek::Quiet
            }
            Err(_) => false,
        }
    }
}

impl Transport for TlsLink {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.link.buffers_mut()
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
        self.link.give_back_output();
        result
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        self.used = true;
        self.ensure_fresh()?;
        if self.unsent > 0 || self.tls.wants_write() {
            // No deadline of ureq's applies to this flush: WRITE_STALL does.
            self.flush(&NextTimeout::default())?;
        }
        let timeout = timeout.for_read();
        if timeout.after.is_zero() {
            return Err(Error::Timeout(timeout.reason));
        }
        self.link.set_read_timeout(timeout.not_zero().map(|d| *d))?;
        loop {
            // Plaintext rustls already decrypted comes first.
            match self
                .tls
                .reader()
                .read(self.link.buffers_mut().input_append_buf())
            {
                Ok(n) => {
                    // 0: the peer sent close_notify, a clean end.
                    self.link.buffers_mut().input_appended(n);
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // EOF without close_notify: the body may be cut off.
                Err(e) => return Err(read_error(e)),
            }
            match self.tls.read_tls(&mut self.link.stream()) {
                // Ok(0): rustls notes the EOF and the reader reports it above.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => return Err(Error::Timeout(timeout.reason)),
                Err(e) => return Err(read_error(e)),
            }
            if let Err(e) = self.tls.process_new_packets() {
                // Best effort: tell the peer why (rustls queued an alert).
                let _ = self.tls.write_tls(&mut self.link.stream());
                return Err(Error::Rustls(e));
            }
            if self.tls.wants_write() {
                // A reply rustls owes the peer (a key update, say).
                self.flush(&NextTimeout::default())?;
            }
        }
    }

    /// As [`Link`]'s: no syscall, either when the connection goes back to
    /// the pool or when it is taken out; the second arms the probe that runs
    /// before the next write ([`TlsLink::ensure_fresh`]).
    fn is_open(&mut self) -> bool {
        // Unsent records mean an exchange was abandoned half-way.
        if self.unsent > 0 || self.tls.wants_write() || self.refused {
            return false;
        }
        // Plaintext decrypted but not taken is what the upstream sent past
        // the answer: ureq only sees what reached its input buffer, so the
        // next request would read it as its answer. (No I/O: only records
        // already read are looked at.)
        if self
            .tls
            .process_new_packets()
            .map_or(true, |state| state.plaintext_bytes_to_read() > 0)
        {
            return false;
        }
        if !std::mem::replace(&mut self.used, false) {
            self.recheck = true;
        }
        self.link.buffers_mut().shed();
        true
    }

    fn is_tls(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tests::{accept_within, budget, wait_peek};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    use rustls::{ProtocolVersion, ServerConfig, ServerConnection, StreamOwned};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::thread;

    /// The path of a file of the test certificates (`tests/tls/`).
    macro_rules! tls_file {
        ($name:literal) => {
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls/", $name)
        };
    }

    /// The server end of a test connection.
    type Far = StreamOwned<ServerConnection, TcpStream>;

    /// The test server: `server.pem` (signed by `ca.pem`), TLS 1.2 and 1.3,
    /// session tickets as rustls sends them by default.
    fn server_config() -> Arc<ServerConfig> {
        let chain = CertificateDer::pem_file_iter(tls_file!("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(tls_file!("server.key")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }

    /// Our client settings with `ca.pem` added, as `caFile` would.
    fn trusting_test_ca() -> Arc<ClientConfig> {
        let ca = CertificateDer::from_pem_file(tls_file!("ca.pem")).unwrap();
        Arc::new(client_config(&[ca]).unwrap())
    }

    /// Shake hands as the test server on `tcp`, in a thread (the client's
    /// handshake blocks the test's).
    fn serve_handshake(tcp: TcpStream) -> thread::JoinHandle<Far> {
        thread::spawn(move || {
            // A test never hangs on a silent client.
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut far = StreamOwned::new(ServerConnection::new(server_config()).unwrap(), tcp);
            while far.conn.is_handshaking() {
                far.conn.complete_io(&mut far.sock).unwrap();
            }
            far
        })
    }

    /// The next connection to `listener` (within 5 s), hands shaken.
    fn next_far(listener: &TcpListener) -> Far {
        serve_handshake(accept_within(listener)).join().unwrap()
    }

    /// A TlsLink to a fresh loopback TLS server, the server's end, and the
    /// listener (for reconnects).
    fn tls_pair() -> (TlsLink, Far, TcpListener) {
        tls_pair_within(Duration::from_secs(5))
    }

    /// As [`tls_pair`], with this connect timeout (which bounds a reconnect).
    fn tls_pair_within(connect_timeout: Duration) -> (TlsLink, Far, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let link = Link::dial(listener.local_addr().unwrap(), connect_timeout);
        let server = serve_handshake(accept_within(&listener));
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let tls = TlsLink::establish(trusting_test_ca(), name, link, budget(5)).unwrap();
        (tls, server.join().unwrap(), listener)
    }

    /// Stage `bytes` in ureq's output buffer and transmit them.
    fn transmit(tls: &mut TlsLink, bytes: &[u8]) {
        tls.link.buffers_mut().output()[..bytes.len()].copy_from_slice(bytes);
        tls.transmit_output(bytes.len(), budget(30)).unwrap();
    }

    /// Await input until `n` plaintext bytes are in (each wait bounded),
    /// and consume them.
    fn receive(tls: &mut TlsLink, n: usize) -> Vec<u8> {
        while tls.link.buffers_mut().input().len() < n {
            assert!(
                tls.await_input(budget(5)).unwrap(),
                "the answer ended early"
            );
        }
        let got = tls.link.buffers_mut().input().to_vec();
        tls.link.buffers_mut().input_consume(got.len());
        got
    }

    /// `n` plaintext bytes as the server reads them.
    fn far_reads(far: &mut Far, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        far.read_exact(&mut got).unwrap();
        got
    }

    /// What the tests send as a request.
    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\n\r\n";

    /// The server's side of an exchange: the request arrives intact, "ok"
    /// goes back.
    fn answer(far: &mut Far) {
        assert_eq!(far_reads(far, REQUEST.len()), REQUEST);
        far.write_all(b"ok").unwrap();
        far.flush().unwrap();
    }

    /// One request over `tls` and its answer "ok", the server's side played
    /// by `server` in a thread meanwhile; what `server` returns.
    fn exchange<T: Send>(tls: &mut TlsLink, server: impl FnOnce() -> T + Send) -> T {
        thread::scope(|s| {
            let server = s.spawn(server);
            transmit(tls, REQUEST);
            assert_eq!(receive(tls, 2), b"ok");
            server.join().unwrap()
        })
    }

    /// No new connection reached `listener` (made non-blocking by
    /// `accept_within`).
    fn no_new_connection(listener: &TcpListener) {
        match listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("a new connection was made: {other:?}"),
        }
    }

    #[test]
    fn records_wait_for_the_answer_and_unsent_ones_keep_a_link_out_of_the_pool() {
        let (mut tls, mut far, _listener) = tls_pair();
        transmit(&mut tls, REQUEST);
        // Encrypted but not written: the head waits for a body to join it.
        assert_eq!(peek(far.get_ref()), Peek::Quiet);
        // An exchange abandoned now would leave a request half-sent.
        assert!(!tls.is_open(), "unsent records");
        let server = thread::spawn(move || answer(&mut far));
        assert_eq!(receive(&mut tls, 2), b"ok");
        server.join().unwrap();
        assert!(tls.is_open(), "all sent and answered: back to the pool");
    }

    #[test]
    fn a_tls_link_going_back_to_the_pool_sheds_its_grown_input() {
        let (mut tls, mut far, _listener) = tls_pair();
        exchange(&mut tls, || answer(&mut far));
        let b = tls.link.buffers_mut();
        *b = crate::transport::LinkBuffers::new(32 * 1024, 1024);
        for _ in 0..3 {
            let n = b.input_append_buf().len();
            b.input_appended(n);
            let all = b.input().len();
            b.input_consume(all);
        }
        assert!(tls.link.buffers_mut().input_capacity() > crate::transport::INPUT_START);
        assert!(tls.is_open());
        assert_eq!(tls.link.buffers_mut().input_capacity(), 0);
    }

    /// A link whose server answered a request with "answer" and then ended
    /// the connection: with `close_notify` first, or (a cut at the TCP
    /// level) without; the answer has been received.
    fn answered_then_ended(close_notify: bool) -> TlsLink {
        let (mut tls, mut far, _listener) = tls_pair();
        transmit(&mut tls, REQUEST);
        let server = thread::spawn(move || {
            far_reads(&mut far, REQUEST.len());
            far.write_all(b"answer").unwrap();
            if close_notify {
                far.conn.send_close_notify();
            }
            far.flush().unwrap();
            far.get_ref().shutdown(Shutdown::Both).unwrap();
        });
        assert_eq!(receive(&mut tls, 6), b"answer");
        server.join().unwrap();
        tls
    }

    #[test]
    fn eof_without_close_notify_is_an_error_not_a_clean_end() {
        let mut tls = answered_then_ended(false);
        match tls.await_input(budget(5)) {
            // Not UnexpectedEof: ureq's body reader takes that for an
            // orderly close, the end of a body without a length.
            Err(Error::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::Other, "{e}"),
            other => panic!("a cut-off answer passed for a complete one: {other:?}"),
        }
    }

    #[test]
    fn close_notify_is_a_clean_end() {
        let mut tls = answered_then_ended(true);
        assert!(
            !tls.await_input(budget(5)).unwrap(),
            "the end, and no error"
        );
    }

    /// A TLS 1.3 server sends session tickets once the handshake is done,
    /// possibly while the connection sits idle: they are housekeeping, not an
    /// answer nobody asked for, so the connection stays in service.
    #[test]
    fn a_session_ticket_arriving_while_idle_leaves_the_connection_usable() {
        let (mut tls, mut far, listener) = tls_pair();
        assert_eq!(tls.tls.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        // The tickets came after the client's last read, the handshake.
        wait_peek(&tls.link, Peek::Data);
        assert!(tls.is_open(), "taken out of the pool");
        exchange(&mut tls, || answer(&mut far));
        no_new_connection(&listener);
        assert!(tls.is_open(), "back to the pool");
        assert!(tls.is_open(), "and out again");
        exchange(&mut tls, || answer(&mut far));
        no_new_connection(&listener);
    }

    /// The handshake, like the connect before it, ends by the connect
    /// deadline: a server that accepts but never speaks costs no more.
    #[test]
    fn a_silent_server_times_the_handshake_out_as_a_connect_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let link = Link::dial(listener.local_addr().unwrap(), Duration::from_secs(5));
        let _silent = accept_within(&listener);
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let short = NextTimeout {
            after: UreqDuration::Exact(Duration::from_millis(200)),
            reason: ureq::Timeout::Connect,
            ..NextTimeout::default()
        };
        let started = Instant::now();
        match TlsLink::establish(trusting_test_ca(), name, link, short) {
            Err(Error::Timeout(ureq::Timeout::Connect)) => {}
            other => panic!("expected a connect timeout, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    /// `connectMs` bounds TCP and TLS together: a handshake after a connect
    /// that used up most of the budget gets only what is left of it, not
    /// the whole of ureq's connect timeout again.
    #[test]
    fn the_handshake_gets_what_the_tcp_connect_left_of_the_budget() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // The connect began with 300 ms to go; ureq hands the connector
        // chain the same (here: long) timeout at each step.
        let link = Link::dial(listener.local_addr().unwrap(), Duration::from_millis(300));
        let _silent = accept_within(&listener);
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let started = Instant::now();
        match TlsLink::establish(trusting_test_ca(), name, link, budget(5)) {
            Err(Error::Timeout(_)) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the handshake took {:?}",
            started.elapsed()
        );
    }

    /// A connection that served a request and went back to the pool, then
    /// was ended by its server with `close_notify` (as one whose keep-alive
    /// timeout ran out) or cut without; the next request, sent after it was
    /// taken out of the pool, goes over a new connection and a new handshake.
    fn replaced_after_idle_close(close_notify: bool) {
        let (mut tls, mut far, listener) = tls_pair();
        exchange(&mut tls, || answer(&mut far));
        assert!(tls.is_open(), "back to the pool");
        if close_notify {
            far.conn.send_close_notify();
            far.flush().unwrap();
        }
        far.get_ref().shutdown(Shutdown::Both).unwrap();
        wait_peek(
            &tls.link,
            if close_notify {
                Peek::Data
            } else {
                Peek::Closed
            },
        );
        // Asking costs no syscall (ureq holds its pool lock meanwhile)...
        assert!(tls.is_open(), "taken out of the pool");
        // ...and the first write finds the close and starts afresh.
        let mut fresh = exchange(&mut tls, || {
            let mut fresh = next_far(&listener);
            answer(&mut fresh);
            fresh
        });
        // The new connection is pooled and reused as any other.
        assert!(tls.is_open(), "back to the pool");
        assert!(tls.is_open(), "and out again");
        exchange(&mut tls, || answer(&mut fresh));
        no_new_connection(&listener);
    }

    #[test]
    fn a_pooled_connection_the_upstream_closed_is_replaced_before_sending() {
        replaced_after_idle_close(true);
    }

    #[test]
    fn a_pooled_connection_cut_without_close_notify_is_replaced_before_sending() {
        replaced_after_idle_close(false);
    }

    #[test]
    fn stray_data_on_a_pooled_connection_is_never_read_as_an_answer() {
        let (mut tls, mut far, listener) = tls_pair();
        exchange(&mut tls, || answer(&mut far));
        assert!(tls.is_open(), "back to the pool");
        far.write_all(b"junk").unwrap();
        far.flush().unwrap();
        wait_peek(&tls.link, Peek::Data);
        assert!(tls.is_open(), "taken out of the pool");
        // `exchange` checks that the answer is "ok", from the new connection.
        exchange(&mut tls, || answer(&mut next_far(&listener)));
    }

    /// A key update the server asks for while the connection is idle is
    /// housekeeping too: ours goes out just ahead of the next request, on
    /// the same connection, and the server reads the request with the new
    /// keys.
    #[test]
    fn a_key_update_arriving_while_idle_leaves_the_connection_usable() {
        let (mut tls, mut far, listener) = tls_pair();
        exchange(&mut tls, || answer(&mut far));
        assert!(tls.is_open(), "back to the pool");
        far.conn.refresh_traffic_keys().unwrap();
        far.flush().unwrap();
        wait_peek(&tls.link, Peek::Data);
        assert!(tls.is_open(), "taken out of the pool");
        exchange(&mut tls, || answer(&mut far));
        no_new_connection(&listener);
    }

    /// Replacing a stale connection is this request's connect: the new
    /// handshake too ends by the connect deadline.
    #[test]
    fn a_replacement_that_never_shakes_hands_fails_by_the_connect_deadline() {
        let (mut tls, mut far, listener) = tls_pair_within(Duration::from_millis(300));
        exchange(&mut tls, || answer(&mut far));
        assert!(tls.is_open(), "back to the pool");
        drop(far);
        wait_peek(&tls.link, Peek::Closed);
        assert!(tls.is_open(), "taken out of the pool");
        // The listener's backlog takes the connection; nobody answers on it.
        let started = Instant::now();
        match tls.transmit_output(0, budget(30)) {
            Err(Error::Timeout(ureq::Timeout::Connect)) => {}
            other => panic!("expected a connect timeout, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(listener);
    }
}
