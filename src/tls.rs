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
//!   deadline;
//! - a request's records leave in one write when they fit in
//!   [`COALESCE`](crate::transport::COALESCE), as on plain connections;
//! - a body the peer ends without `close_notify` is an error (a cut-off
//!   answer), never a clean end;
//! - a pooled connection is reused only if nothing but TLS housekeeping
//!   (such as TLS 1.3 session tickets) arrived while it was idle.

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

use crate::transport::{is_timeout, peek, write_error, Link, Peek, COALESCE, WRITE_STALL};

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
    while tls.is_handshaking() {
        let mut io = Deadlined { link, deadline };
        if let Err(e) = tls.complete_io(&mut io) {
            return Err(match rustls_error(&e) {
                Some(tls_error) => Error::Rustls(tls_error),
                None if is_timeout(&e) => Error::Timeout(reason),
                None => Error::Io(e),
            });
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
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?.unwrap_or(WRITE_STALL);
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
        let tls = shake(
            &config,
            &name,
            &mut link,
            deadline_of(&timeout),
            timeout.reason,
        )?;
        Ok(TlsLink {
            link,
            tls,
            unsent: 0,
            used: false,
        })
    }

    /// Write every pending record; the write timeout is [`WRITE_STALL`] or
    /// `timeout`, whichever is nearer.
    fn flush(&mut self, timeout: &NextTimeout) -> Result<(), Error> {
        if !self.tls.wants_write() {
            self.unsent = 0;
            return Ok(());
        }
        self.link.set_write_timeout(timeout)?;
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.link.stream()) {
                Ok(0) => return Err(Error::Io(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(write_error(e, timeout.reason)),
            }
        }
        self.unsent = 0;
        Ok(())
    }

    /// Encrypt `amount` bytes of the output buffer; records leave now only
    /// when more than [`COALESCE`] bytes wait or rustls will take no more.
    fn transmit(&mut self, amount: usize, timeout: &NextTimeout) -> Result<(), Error> {
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
    /// true if that was all it was and the connection can be reused.
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
        let result = self.transmit(amount, &timeout);
        self.link.give_back_output();
        result
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        self.used = true;
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
                Err(e) => return Err(Error::Io(e)),
            }
            match self.tls.read_tls(&mut self.link.stream()) {
                // Ok(0): rustls notes the EOF and the reader reports it above.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => return Err(Error::Timeout(timeout.reason)),
                Err(e) => return Err(Error::Io(e)),
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

    /// As [`Link::is_open`]: only the question at pool checkout probes.
    fn is_open(&mut self) -> bool {
        if self.unsent > 0 || self.tls.wants_write() {
            return false;
        }
        if std::mem::replace(&mut self.used, false) {
            return true;
        }
        match peek(self.link.stream()) {
            Peek::Quiet => true,
            Peek::Closed => false,
            Peek::Data => self.absorb_idle_input(),
        }
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

    /// A TlsLink to a fresh loopback TLS server, the server's end, and the
    /// listener (for reconnects).
    fn tls_pair() -> (TlsLink, Far, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let link = Link::dial(listener.local_addr().unwrap());
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

    /// One request and its answer over `tls`, both arriving intact.
    fn exchange(tls: &mut TlsLink, far: &mut Far) {
        transmit(tls, b"GET / HTTP/1.1\r\n\r\n");
        let answer = thread::scope(|s| {
            let server = s.spawn(|| {
                let got = far_reads(far, 18);
                far.write_all(b"ok").unwrap();
                far.flush().unwrap();
                got
            });
            let answer = receive(tls, 2);
            assert_eq!(server.join().unwrap(), b"GET / HTTP/1.1\r\n\r\n");
            answer
        });
        assert_eq!(answer, b"ok");
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
        transmit(&mut tls, b"GET / HTTP/1.1\r\n\r\n");
        // Encrypted but not written: the head waits for a body to join it.
        assert_eq!(peek(far.get_ref()), Peek::Quiet);
        // An exchange abandoned now would leave a request half-sent.
        assert!(!tls.is_open(), "unsent records");
        let server = thread::spawn(move || {
            let got = far_reads(&mut far, 18);
            far.write_all(b"ok").unwrap();
            far.flush().unwrap();
            (got, far)
        });
        assert_eq!(receive(&mut tls, 2), b"ok");
        let (got, _far) = server.join().unwrap();
        assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
        assert!(tls.is_open(), "all sent and answered: back to the pool");
    }

    /// A link whose server answered a request with "answer" and then ended
    /// the connection: with `close_notify` first, or (a cut at the TCP
    /// level) without; the answer has been received.
    fn answered_then_ended(close_notify: bool) -> TlsLink {
        let (mut tls, mut far, _listener) = tls_pair();
        transmit(&mut tls, b"GET / HTTP/1.1\r\n\r\n");
        let server = thread::spawn(move || {
            far_reads(&mut far, 18);
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
            Err(Error::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}"),
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
        exchange(&mut tls, &mut far);
        no_new_connection(&listener);
        assert!(tls.is_open(), "back to the pool");
        assert!(tls.is_open(), "and out again");
        exchange(&mut tls, &mut far);
        no_new_connection(&listener);
    }

    /// The handshake, like the connect before it, ends by the connect
    /// deadline: a server that accepts but never speaks costs no more.
    #[test]
    fn a_silent_server_times_the_handshake_out_as_a_connect_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let link = Link::dial(listener.local_addr().unwrap());
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
}
