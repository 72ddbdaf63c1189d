//! Strict HTTP/1.1 request reading: the request head with httparse, then the
//! body by Content-Length or chunked framing.
//!
//! Guarantees: every read is bounded (line, head, header count, body size,
//! time); ambiguous framing is refused rather than guessed; a truncated body is
//! an error, never a short body. Bytes after one request stay buffered for the
//! next (pipelining), so nothing is lost or parsed twice.

use std::io::{self, Read};
use std::time::{Duration, Instant};

/// A byte source whose read timeout can be set (a socket, or a slice in tests).
pub trait Source: Read {
    /// Set how long the next read may block; `None` blocks forever.
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

/// Size limits for one request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request line or header line. 8 KiB.
    pub max_line: usize,
    /// Largest head in all. 32 KiB.
    pub max_head: usize,
    /// Most header fields. 100.
    pub max_headers: usize,
    /// Largest body.
    pub max_body: u64,
}

/// One header field as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Name as sent by the client (compare case-insensitively).
    pub name: String,
    /// Raw value bytes.
    pub value: Vec<u8>,
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// A parsed, validated request head.
#[derive(Debug, Clone)]
pub struct Head {
    /// Method, e.g. `POST`.
    pub method: String,
    /// Request target in origin form, e.g. `/v1/models?x=1`.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields in order.
    pub headers: Vec<Header>,
    /// Body framing.
    pub framing: Framing,
    /// Whether the connection may be reused after this request.
    pub keep_alive: bool,
    /// The client sent `Expect: 100-continue`.
    pub expect_continue: bool,
}

/// Why a request could not be read.
#[derive(Debug)]
pub enum RequestError {
    /// The connection closed or stayed idle before any byte of a new request.
    Idle,
    /// Socket error; nothing can be answered.
    Io(io::Error),
    /// Placeholder until the parser lands.
    Unimplemented,
}

impl RequestError {
    /// Status to answer with; `None` means close silently.
    pub fn status(&self) -> Option<u16> {
        None
    }
    /// Whether the connection must close after the answer.
    pub fn must_close(&self) -> bool {
        true
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl Head {
    /// First header value by name, case-insensitive, if UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(&h.value).ok())
    }
}

/// A buffered reader over one connection.
pub struct Reader<S: Source> {
    /// The connection.
    pub source: S,
}

impl<S: Source> Reader<S> {
    /// Wrap a source.
    pub fn new(source: S) -> Self {
        Reader { source }
    }

    /// Read one head; wait up to `idle` for its first byte, then up to `head_time` for the rest.
    pub fn read_head(
        &mut self,
        limits: &Limits,
        idle: Duration,
        head_time: Duration,
    ) -> Result<Head, RequestError> {
        let _ = (limits, idle, head_time, Instant::now());
        Err(RequestError::Unimplemented)
    }

    /// Read a body.
    pub fn read_body(
        &mut self,
        framing: Framing,
        limits: &Limits,
        read_timeout: Duration,
        deadline: Instant,
    ) -> Result<Vec<u8>, RequestError> {
        let _ = (framing, limits, read_timeout, deadline);
        Err(RequestError::Unimplemented)
    }
}

impl Source for std::net::TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
}

impl<S: Source> Reader<S> {
    /// The source.
    pub fn get_ref(&self) -> &S {
        &self.source
    }
}
