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
    mut link: Link,
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
    let mut tls = ClientConnection::new(config, name)?;
    let deadline = match details.timeout.after {
        UreqDuration::Exact(d) => Instant::now().checked_add(d),
        UreqDuration::NotHappening => None,
    };
    let reason = details.timeout.reason;
    while tls.is_handshaking() {
        let mut io = Deadlined {
            link: &mut link,
            deadline,
        };
        match tls.complete_io(&mut io) {
            Ok(_) => {}
            Err(e) => {
                return Err(match rustls_error(&e) {
                    Some(tls_error) => Error::Rustls(tls_error),
                    None if is_timeout(&e) => Error::Timeout(reason),
                    None => Error::Io(e),
                });
            }
        }
    }
    Ok(TlsLink {
        link,
        tls,
        unsent: 0,
        used: false,
    })
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
