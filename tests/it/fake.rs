//! A scriptable fake upstream on plain `std::net`, for fault injection at the
//! byte level: any status and headers, SSE streams with delays, cuts in the
//! middle of a chunked body, hangs, closes without an answer, and a record of
//! every request and of when the balancer closed each connection.
//!
//! The same script can be served over HTTPS (rustls, with the test
//! certificates in `tests/tls/`): [`Upstream::start_tls`]. Faults stay faults
//! at the TCP level under TLS: a cut or a close sends no `close_notify`, so
//! the client sees a truncated stream, not an orderly end.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// A request as the fake upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One step of a scripted streamed body.
#[derive(Debug, Clone)]
pub enum Step {
    /// Send these bytes as one chunk, flushed.
    Send(Vec<u8>),
    /// Send these bytes as a chunk this many times (large bodies without
    /// holding them in memory).
    Repeat(Vec<u8>, usize),
    /// Stay silent this long (while watching for the peer closing).
    Sleep(Duration),
    /// Close the connection here, without the final chunk (over TLS, without
    /// `close_notify` either: a truncated stream).
    Cut,
}

/// What the fake upstream does with one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A whole response with Content-Length.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// A chunked response (SSE when the content type says so), step by step.
    Chunked {
        status: u16,
        content_type: String,
        steps: Vec<Step>,
    },
    /// Read the request, then say nothing for this long, then close.
    Hang(Duration),
    /// Close the connection without answering (over TLS, without
    /// `close_notify`).
    Close,
    /// Say nothing for this long (the response head included), then reply.
    Delayed(Duration, Box<Reply>),
    /// Write these steps' bytes exactly as given (no framing added; the
    /// script writes its own status line, headers and body), then close.
    Raw(Vec<Step>),
    /// Reply, then close the connection without having said `Connection:
    /// close` (as a server whose keep-alive timeout just ran out does; over
    /// TLS it sends `close_notify` first, as such a server does).
    Closing(Box<Reply>),
}

impl Reply {
    pub fn json(status: u16, body: &str) -> Reply {
        Reply::Full {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        if let Reply::Full { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }

    pub fn sse(steps: Vec<Step>) -> Reply {
        Reply::Chunked {
            status: 200,
            content_type: "text/event-stream".into(),
            steps,
        }
    }
}

/// An SSE event with content `text`.
pub fn content_event(text: &str) -> Vec<u8> {
    format!(
        "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}},\"finish_reason\":null}}]}}\n\n",
        serde_json::to_string(text).unwrap()
    )
    .into_bytes()
}

/// The role-only preamble event most servers send first.
pub fn role_event() -> Vec<u8> {
    b"data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"},\"finish_reason\":null}]}\n\n".to_vec()
}

/// A final event with a finish reason, then `[DONE]`.
pub fn finish_events() -> Vec<u8> {
    b"data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n".to_vec()
}

type Handler = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

struct Inner {
    seen: Mutex<Vec<Seen>>,
    /// When the peer closed a connection in the middle of a reply.
    peer_closed: Mutex<Vec<Instant>>,
    /// When each `Step::Send` was written, in order.
    sent: Mutex<Vec<Instant>>,
    count: AtomicUsize,
    /// TCP connections accepted (before any TLS handshake on them).
    accepted: AtomicUsize,
    /// Connections closed after a `Reply::Closing`.
    closed: AtomicUsize,
    stop: AtomicBool,
    handler: Box<Handler>,
}

/// Which test certificate (in `tests/tls/`) a TLS fake upstream presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cert {
    /// `server.pem`, signed by `ca.pem` ([`ca_pem_path`]).
    Server,
    /// `other-server.pem`, signed by `other-ca.pem`: refused by a client that
    /// trusts only `ca.pem`.
    Other,
}

impl Cert {
    /// This certificate's server configuration (ring, TLS 1.2 and 1.3).
    pub fn server_config(self) -> Arc<ServerConfig> {
        let name = match self {
            Cert::Server => "server",
            Cert::Other => "other-server",
        };
        let chain = CertificateDer::pem_file_iter(tls_file(&format!("{name}.pem")))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(tls_file(&format!("{name}.key"))).unwrap();
        // An explicit provider rather than the process default, so that the
        // fake installs nothing process-wide that the balancer under test
        // would then find already there.
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
        Arc::new(config)
    }
}

/// Absolute path of a file in `tests/tls/` (test certificates and keys).
pub fn tls_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tls")
        .join(name)
}

/// Absolute path of `tests/tls/ca.pem`, the CA that signed [`Cert::Server`].
pub fn ca_pem_path() -> PathBuf {
    tls_file("ca.pem")
}

/// A running fake upstream; stops when dropped.
pub struct Upstream {
    addr: std::net::SocketAddr,
    /// Serves HTTPS with this configuration when set.
    tls: Option<Arc<ServerConfig>>,
    inner: Arc<Inner>,
}

impl Upstream {
    /// Start a fake upstream; `handler` gets each request and its 0-based number.
    pub fn start(handler: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Upstream {
        Upstream::spawn(None, Box::new(handler))
    }

    /// [`Upstream::start`] over HTTPS, presenting [`Cert::Server`].
    pub fn start_tls(handler: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Upstream {
        Upstream::start_tls_with(Cert::Server, handler)
    }

    /// [`Upstream::start`] over HTTPS, presenting `cert`.
    pub fn start_tls_with(
        cert: Cert,
        handler: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
    ) -> Upstream {
        Upstream::spawn(Some(cert.server_config()), Box::new(handler))
    }

    fn spawn(tls: Option<Arc<ServerConfig>>, handler: Box<Handler>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            seen: Mutex::new(Vec::new()),
            peer_closed: Mutex::new(Vec::new()),
            sent: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            handler,
        });
        let acc = inner.clone();
        let config = tls.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                if acc.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                acc.accepted.fetch_add(1, Ordering::SeqCst);
                let inner = acc.clone();
                let config = config.clone();
                // The handshake happens on the connection's first read, in
                // its own thread, so a slow or failing one blocks no other.
                thread::spawn(move || match config {
                    None => serve(stream, &inner),
                    Some(config) => {
                        let conn = ServerConnection::new(config).unwrap();
                        serve(StreamOwned::new(conn, stream), &inner)
                    }
                });
            }
        });
        Upstream { addr, tls, inner }
    }

    /// Always answer with this reply.
    pub fn always(reply: Reply) -> Upstream {
        Upstream::start(move |_, _| reply.clone())
    }

    /// Always answer with this reply, over HTTPS ([`Cert::Server`]).
    pub fn always_tls(reply: Reply) -> Upstream {
        Upstream::start_tls(move |_, _| reply.clone())
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.inner.seen.lock().unwrap().clone()
    }

    /// Connections closed after a `Reply::Closing`, so far.
    pub fn closed(&self) -> usize {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far, plain or TLS (over TLS, each is
    /// also one handshake): how often a client opened a new connection
    /// rather than reusing one. The connection `Drop` makes to wake the
    /// accept loop is not counted.
    pub fn accepted(&self) -> usize {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    pub fn hits(&self) -> usize {
        self.inner.count.load(Ordering::SeqCst)
    }

    pub fn peer_closed(&self) -> Vec<Instant> {
        self.inner.peer_closed.lock().unwrap().clone()
    }

    pub fn sent(&self) -> Vec<Instant> {
        self.inner.sent.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// A URL on which nothing listens: connections are refused.
pub fn refused_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// A connection the fake serves: plain TCP, or TLS over it.
trait Conn: Read + Write {
    /// The TCP socket under it, for peeks, timeouts and cuts. Cutting it
    /// bypasses TLS, so the peer gets no `close_notify`: a truncated stream.
    fn tcp(&self) -> &TcpStream;

    /// Bytes wait on the socket while the fake is silent: true if they end
    /// the connection. Plain request bytes cannot say so (false).
    fn pending_ends(&mut self) -> bool {
        false
    }

    /// End the connection in order (after `Reply::Closing`).
    fn close_orderly(&mut self) {
        let _ = self.tcp().shutdown(Shutdown::Both);
    }
}

impl Conn for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Conn for StreamOwned<ServerConnection, TcpStream> {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }

    /// A TLS peer may send `close_notify` before its FIN: left unread, that
    /// alert would keep a peek from ever seeing the end. Reading the records
    /// into rustls (which keeps any request bytes for the next read) tells a
    /// `close_notify` apart and lets the next peek see the FIN.
    fn pending_ends(&mut self) -> bool {
        match self.conn.read_tls(&mut self.sock) {
            Ok(0) => true,
            Ok(_) => self
                .conn
                .process_new_packets()
                .map_or(true, |state| state.peer_has_closed()),
            // A timeout, or rustls' plaintext buffer is full: nothing said.
            Err(_) => false,
        }
    }

    fn close_orderly(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush();
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

fn read_request(reader: &mut impl BufRead) -> Option<Seen> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':')?;
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Seen {
        method,
        path,
        headers,
        body,
    })
}

/// How a script of steps ended.
#[derive(PartialEq, Eq)]
enum Played {
    /// Every step was played.
    Done,
    /// A `Step::Cut`.
    Cut,
    /// The peer closed (noted in `peer_closed`).
    PeerGone,
}

/// Play `steps` on `out`, each piece of data passed through `frame` first.
fn play(
    steps: Vec<Step>,
    out: &mut impl Conn,
    inner: &Inner,
    frame: impl Fn(&[u8]) -> Vec<u8>,
) -> Played {
    let gone = || {
        inner.peer_closed.lock().unwrap().push(Instant::now());
        Played::PeerGone
    };
    for step in steps {
        match step {
            Step::Send(bytes) => {
                inner.sent.lock().unwrap().push(Instant::now());
                if out
                    .write_all(&frame(&bytes))
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    return gone();
                }
            }
            Step::Repeat(bytes, times) => {
                let data = frame(&bytes);
                for _ in 0..times {
                    if out.write_all(&data).is_err() {
                        return gone();
                    }
                }
            }
            Step::Sleep(d) => {
                if watch_sleep(out, d) {
                    return gone();
                }
            }
            Step::Cut => return Played::Cut,
        }
    }
    Played::Done
}

/// One chunk of a chunked body.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut c = format!("{:x}\r\n", data.len()).into_bytes();
    c.extend_from_slice(data);
    c.extend_from_slice(b"\r\n");
    c
}

/// Sleep `d` while watching `conn` for the peer closing; true if it closed.
fn watch_sleep(conn: &mut impl Conn, d: Duration) -> bool {
    let end = Instant::now() + d;
    let mut byte = [0u8; 1];
    while Instant::now() < end {
        let left = end - Instant::now();
        let _ = conn.tcp().set_read_timeout(Some(
            left.min(Duration::from_millis(10))
                .max(Duration::from_millis(1)),
        ));
        match conn.tcp().peek(&mut byte) {
            Ok(0) => return true,
            Ok(_) if conn.pending_ends() => return true,
            Ok(_) => thread::sleep(Duration::from_millis(5)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    // The socket is shared with the request reader: a short timeout left
    // behind would make it drop the next keep-alive request.
    let _ = conn.tcp().set_read_timeout(None);
    false
}

fn serve(stream: impl Conn, inner: &Inner) {
    let _ = stream.tcp().set_nodelay(true);
    // One object reads and writes: a TLS connection cannot be split in two
    // as a socket can. Writes go past the read buffer, straight to `out`.
    let mut reader = BufReader::new(stream);
    loop {
        let Some(seen) = read_request(&mut reader) else {
            return;
        };
        let out = reader.get_mut();
        let n = inner.count.fetch_add(1, Ordering::SeqCst);
        inner.seen.lock().unwrap().push(seen.clone());
        let mut reply = (inner.handler)(&seen, n);
        let mut close_after = false;
        if let Reply::Closing(next) = reply {
            reply = *next;
            close_after = true;
        }
        while let Reply::Delayed(d, next) = reply {
            if watch_sleep(out, d) {
                inner.peer_closed.lock().unwrap().push(Instant::now());
                return;
            }
            reply = *next;
        }
        match reply {
            Reply::Full {
                status,
                headers,
                body,
            } => {
                let mut head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let mut all = head.into_bytes();
                all.extend_from_slice(&body);
                if out.write_all(&all).is_err() {
                    return;
                }
            }
            Reply::Chunked {
                status,
                content_type,
                steps,
            } => {
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
                );
                if out.write_all(head.as_bytes()).is_err() {
                    return;
                }
                match play(steps, out, inner, chunk) {
                    Played::PeerGone => return,
                    Played::Cut => {
                        let _ = out.tcp().shutdown(Shutdown::Both);
                        return;
                    }
                    Played::Done => {
                        if out.write_all(b"0\r\n\r\n").is_err() {
                            return;
                        }
                    }
                }
            }
            Reply::Hang(d) => {
                if watch_sleep(out, d) {
                    inner.peer_closed.lock().unwrap().push(Instant::now());
                }
                return;
            }
            Reply::Close => {
                let _ = out.tcp().shutdown(Shutdown::Both);
                return;
            }
            Reply::Raw(steps) => {
                if play(steps, out, inner, <[u8]>::to_vec) != Played::PeerGone {
                    let _ = out.flush();
                    let _ = out.tcp().shutdown(Shutdown::Both);
                }
                return;
            }
            Reply::Delayed(..) | Reply::Closing(..) => unreachable!("unwrapped above"),
        }
        if close_after {
            out.close_orderly();
            inner.closed.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
}
