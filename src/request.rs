//! Strict HTTP/1.1 request reading: the request head with httparse, then the
//! body by Content-Length or chunked framing.
//!
//! Guarantees: every read is bounded (line, head, header count, body size,
//! time); ambiguous framing is refused rather than guessed; a truncated body is
//! an error, never a short body. Bytes after one request stay buffered for the
//! next (pipelining), so nothing is lost or parsed twice. The head buffer never
//! holds more than the head limit plus one read, and a declared body length is
//! never allocated up front, so no header value can make us allocate.
//!
//! We check line structure ourselves before httparse sees the head, because
//! httparse tolerates bare LF, which is how front ends and back ends come to
//! disagree about where a request ends. `Upgrade` is ignored (we never switch
//! protocols), so such a request is served as an ordinary one.

#[cfg(test)]
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read};
use std::net::TcpStream;
use std::ops::Range;
use std::time::{Duration, Instant};

/// Most bytes asked of the source in one read into the internal buffer; the
/// buffer grows by this much only as a request needs it. A typical head (under
/// 1 KiB) fits one read, and the buffer stays with its connection (a stream
/// included) for the connection's life.
const READ_CHUNK: usize = 4 * 1024;
/// Largest step by which a body buffer grows ahead of the data.
const BODY_STEP: u64 = 64 * 1024;
/// Header slots on the stack; heads with more fields use the heap.
const HEADER_SLOTS: usize = 64;

/// A byte source whose read timeout can be set (a socket, or a slice in tests).
pub trait Source: Read {
    /// Set how long the next read may block; `None` blocks forever.
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Source for TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

impl Source for &[u8] {
    fn set_read_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

impl Source for io::Cursor<Vec<u8>> {
    fn set_read_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// One step of a scripted source: bytes, or an error such as a simulated timeout.
#[cfg(test)]
#[derive(Debug, Clone)]
pub(crate) enum Piece {
    /// Bytes returned by the next reads (split if the reader asks for fewer).
    Data(Vec<u8>),
    /// An error returned by one read (`WouldBlock`/`TimedOut` simulate a timeout).
    Fail(io::ErrorKind),
}

/// A source that replays pieces, for tests of split heads and timeouts.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Pieces {
    pieces: VecDeque<Piece>,
    /// Every read timeout set so far, in order.
    pub(crate) timeouts: Vec<Option<Duration>>,
}

#[cfg(test)]
impl Pieces {
    /// A source that yields these pieces, then EOF.
    pub(crate) fn new(pieces: impl IntoIterator<Item = Piece>) -> Self {
        Pieces {
            pieces: pieces.into_iter().collect(),
            timeouts: Vec::new(),
        }
    }

    /// A source that yields `bytes` in pieces of `size` bytes, then EOF.
    pub(crate) fn split(bytes: &[u8], size: usize) -> Self {
        Pieces::new(bytes.chunks(size.max(1)).map(|c| Piece::Data(c.to_vec())))
    }
}

#[cfg(test)]
impl Read for Pieces {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self.pieces.front_mut() {
            None => Ok(0),
            Some(Piece::Fail(kind)) => {
                let kind = *kind;
                self.pieces.pop_front();
                Err(kind.into())
            }
            Some(Piece::Data(data)) => {
                let n = data.len().min(out.len());
                out[..n].copy_from_slice(&data[..n]);
                data.drain(..n);
                if data.is_empty() {
                    self.pieces.pop_front();
                }
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
impl Source for Pieces {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.timeouts.push(timeout);
        Ok(())
    }
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

impl Limits {
    /// Most bytes the internal buffer may hold: a full head (or line) plus one read.
    fn buffer_cap(&self) -> usize {
        self.max_head
            .max(self.max_line.saturating_add(2))
            .saturating_add(READ_CHUNK)
    }
}

/// A request's header fields in order, as received: names as sent (compare
/// case-insensitively) and raw value bytes. Kept in three buffers rather
/// than two allocations per field, since every request carries a dozen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    names: String,
    values: Vec<u8>,
    /// Per field: where its name ends in `names` and its value in `values`.
    ends: Vec<(usize, usize)>,
}

impl Headers {
    /// Room for `fields` fields.
    pub fn with_capacity(fields: usize) -> Self {
        Headers {
            names: String::with_capacity(fields * 16),
            values: Vec::with_capacity(fields * 32),
            ends: Vec::with_capacity(fields),
        }
    }

    /// Remove every field, keeping the buffers.
    pub fn clear(&mut self) {
        self.names.clear();
        self.values.clear();
        self.ends.clear();
    }

    /// Append a field.
    pub fn push(&mut self, name: &str, value: &[u8]) {
        self.names.push_str(name);
        self.values.extend_from_slice(value);
        self.ends.push((self.names.len(), self.values.len()));
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when there are no fields.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The fields in order, as (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        let mut from = (0, 0);
        self.ends.iter().map(move |&(name_end, value_end)| {
            let field = (
                self.names.get(from.0..name_end).unwrap_or(""),
                self.values.get(from.1..value_end).unwrap_or(&[]),
            );
            from = (name_end, value_end);
            field
        })
    }
}

impl<'a> FromIterator<(&'a str, &'a [u8])> for Headers {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a [u8])>>(fields: I) -> Self {
        let mut headers = Headers::default();
        for (name, value) in fields {
            headers.push(name, value);
        }
        headers
    }
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
    /// Request target in origin form, e.g. `/v1/models?x=1` (`*` only for OPTIONS).
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields in order (including any `Upgrade`, which is otherwise ignored).
    pub headers: Headers,
    /// Body framing.
    pub framing: Framing,
    /// Whether the connection may be reused after this request.
    pub keep_alive: bool,
    /// The client sent `Expect: 100-continue` (HTTP/1.1 only).
    pub expect_continue: bool,
}

impl Head {
    /// Value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Like [`Head::header`], but only if the value is valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// Most bytes of buffers a connection keeps from one head for the next.
const SPARE_KEPT: usize = 8 * 1024;

/// The buffers of a head that was served, kept by its connection's
/// [`Reader`] for the next head: a keep-alive connection reads a head per
/// request, and allocating its five buffers anew cost more than parsing it.
#[derive(Debug, Default)]
struct Spare {
    method: String,
    target: String,
    headers: Headers,
}

/// Why a request could not be read.
#[derive(Debug)]
pub enum RequestError {
    /// The connection closed or stayed idle before any byte of a new request.
    Idle,
    /// Socket error; nothing can be answered.
    Io(io::Error),
    /// The head did not arrive within the head deadline.
    HeadTimeout,
    /// A body read timed out or the body deadline passed.
    BodyTimeout,
    /// The connection closed in the middle of the head.
    IncompleteHead,
    /// The request line is longer than `max_line`.
    RequestLineTooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// A header line is longer than `max_line`.
    HeaderLineTooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// The head is larger than `max_head`.
    HeadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// More header fields than `max_headers`.
    TooManyHeaders {
        /// The limit in fields.
        limit: usize,
    },
    /// A line ends in LF without CR, or a CR is not followed by LF.
    BareLineEnding,
    /// A control byte (NUL, DEL, ...) in the head; HTAB is allowed only in values.
    ControlByte,
    /// A header line starts with whitespace (obsolete line folding).
    ObsFold,
    /// The request line is not `METHOD SP target SP HTTP/x.y`.
    MalformedRequestLine,
    /// A header name is not a token directly followed by `:`.
    BadHeaderName,
    /// The target is not origin-form, absolute-form, or `*` with OPTIONS.
    BadTarget,
    /// A well-formed version other than HTTP/1.0 or HTTP/1.1.
    VersionNotSupported,
    /// HTTP/1.1 without a Host header.
    MissingHost,
    /// More than one Host header.
    DuplicateHost,
    /// Both Content-Length and Transfer-Encoding.
    LengthWithTransferEncoding,
    /// Transfer-Encoding in an HTTP/1.0 request.
    TransferEncodingOnHttp10,
    /// A Transfer-Encoding other than exactly one `chunked`.
    UnsupportedTransferEncoding,
    /// A Content-Length that is not one decimal number fitting in u64.
    BadContentLength,
    /// More than one Content-Length header, equal or not.
    DuplicateContentLength,
    /// The body (declared or received) is larger than `max_body`.
    BodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// An `Expect` other than `100-continue`.
    ExpectationFailed,
    /// The connection closed before the whole body arrived.
    TruncatedBody,
    /// A chunk size line is not hex digits with optional extensions.
    BadChunkSize,
    /// A chunk size line is longer than `max_line`.
    ChunkLineTooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// Chunk data not followed by CRLF.
    MissingChunkCrlf,
    /// A trailer line is not a valid header field.
    BadTrailer,
    /// A trailer line is longer than `max_line`.
    TrailerLineTooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// The trailer section is larger than `max_head`.
    TrailersTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}

impl RequestError {
    /// Status to answer with; `None` means close without answering.
    pub fn status(&self) -> Option<u16> {
        use RequestError::*;
        Some(match self {
            Idle | Io(_) => return None,
            HeadTimeout | BodyTimeout => 408,
            RequestLineTooLong { .. } => 414,
            HeaderLineTooLong { .. }
            | HeadTooLarge { .. }
            | TooManyHeaders { .. }
            | TrailerLineTooLong { .. }
            | TrailersTooLarge { .. } => 431,
            BodyTooLarge { .. } => 413,
            ExpectationFailed => 417,
            UnsupportedTransferEncoding => 501,
            VersionNotSupported => 505,
            IncompleteHead
            | BareLineEnding
            | ControlByte
            | ObsFold
            | MalformedRequestLine
            | BadHeaderName
            | BadTarget
            | MissingHost
            | DuplicateHost
            | LengthWithTransferEncoding
            | TransferEncodingOnHttp10
            | BadContentLength
            | DuplicateContentLength
            | TruncatedBody
            | BadChunkSize
            | ChunkLineTooLong { .. }
            | MissingChunkCrlf
            | BadTrailer => 400,
        })
    }

    /// Whether the connection must be closed after answering.
    ///
    /// Always true: after any of these the position of the next request in the
    /// stream is unknown (its body, or the rest of its head, is unread), and
    /// guessing it is exactly how requests get smuggled.
    pub fn must_close(&self) -> bool {
        true
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use RequestError::*;
        match self {
            Idle => f.write_str("connection idle before a request arrived"),
            Io(e) => write!(f, "connection error: {e}"),
            HeadTimeout => f.write_str("request head not received in time"),
            BodyTimeout => f.write_str("request body not received in time"),
            IncompleteHead => f.write_str("connection closed before the request head was complete"),
            RequestLineTooLong { limit } => write!(f, "request line exceeds {limit} bytes"),
            HeaderLineTooLong { limit } => write!(f, "a request header line exceeds {limit} bytes"),
            HeadTooLarge { limit } => write!(f, "request header block exceeds {limit} bytes"),
            TooManyHeaders { limit } => write!(f, "request has more than {limit} header fields"),
            BareLineEnding => f.write_str("every line of the request head must end with CRLF"),
            ControlByte => f.write_str("control character in the request head"),
            ObsFold => f.write_str("folded header lines (obs-fold) are not accepted"),
            MalformedRequestLine => {
                f.write_str("malformed request line (expected `METHOD /path HTTP/1.1`)")
            }
            BadHeaderName => {
                f.write_str("malformed header name (a token directly followed by `:`)")
            }
            BadTarget => f.write_str("request target must be a path such as /v1/models"),
            VersionNotSupported => f.write_str("only HTTP/1.0 and HTTP/1.1 are supported"),
            MissingHost => f.write_str("HTTP/1.1 request without a Host header"),
            DuplicateHost => f.write_str("more than one Host header"),
            LengthWithTransferEncoding => {
                f.write_str("Content-Length and Transfer-Encoding must not both be sent")
            }
            TransferEncodingOnHttp10 => {
                f.write_str("Transfer-Encoding is not allowed in an HTTP/1.0 request")
            }
            UnsupportedTransferEncoding => {
                f.write_str("only `Transfer-Encoding: chunked` is supported")
            }
            BadContentLength => f.write_str("Content-Length must be one decimal number"),
            DuplicateContentLength => f.write_str("more than one Content-Length header"),
            BodyTooLarge { limit } => write!(f, "request body exceeds {limit} bytes"),
            ExpectationFailed => f.write_str("only `Expect: 100-continue` is supported"),
            TruncatedBody => f.write_str("connection closed before the request body was complete"),
            BadChunkSize => f.write_str("malformed chunk size line in chunked body"),
            ChunkLineTooLong { limit } => write!(f, "chunk size line exceeds {limit} bytes"),
            MissingChunkCrlf => f.write_str("chunk data not followed by CRLF"),
            BadTrailer => f.write_str("malformed trailer field in chunked body"),
            TrailerLineTooLong { limit } => write!(f, "a trailer line exceeds {limit} bytes"),
            TrailersTooLarge { limit } => write!(f, "trailer section exceeds {limit} bytes"),
        }
    }
}

impl std::error::Error for RequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RequestError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// A buffered reader over one connection.
pub struct Reader<S: Source> {
    source: S,
    /// Zero-filled storage; `buf[start..end]` holds bytes read but not consumed.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Buffers for the next head (see [`Reader::recycle`]).
    spare: Spare,
}

impl<S: Source> Reader<S> {
    /// Wrap a source.
    pub fn new(source: S) -> Self {
        Reader {
            source,
            buf: Vec::new(),
            start: 0,
            end: 0,
            spare: Spare::default(),
        }
    }

    /// Give back a head that was served, so that the next one read here
    /// reuses its buffers instead of allocating its own. Those of a large
    /// head are freed instead: an idle keep-alive connection should not
    /// hold on to what its largest request once needed (nginx frees its
    /// large header buffers between requests too).
    pub fn recycle(&mut self, head: Head) {
        let held = head.method.capacity()
            + head.target.capacity()
            + head.headers.names.capacity()
            + head.headers.values.capacity()
            + head.headers.ends.capacity() * std::mem::size_of::<(usize, usize)>();
        self.spare = if held <= SPARE_KEPT {
            Spare {
                method: head.method,
                target: head.target,
                headers: head.headers,
            }
        } else {
            Spare::default()
        };
    }

    /// The source.
    pub fn get_ref(&self) -> &S {
        &self.source
    }

    /// The source, e.g. to write a response on the same socket.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// Bytes read from the source but not yet consumed (a body or the next request).
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Read one head; wait up to `idle` for its first byte, then up to `head_time` for the rest.
    pub fn read_head(
        &mut self,
        limits: &Limits,
        idle: Duration,
        head_time: Duration,
    ) -> Result<Head, RequestError> {
        self.read_head_by(limits, idle, head_time, None)
    }

    /// [`Reader::read_head`], with the whole head due by `by` at the latest:
    /// a connection's first head is due `headTimeoutMs` after its accept, not
    /// after its first byte (nginx's `client_header_timeout`, HAProxy's
    /// `timeout http-request`).
    pub fn read_head_by(
        &mut self,
        limits: &Limits,
        idle: Duration,
        head_time: Duration,
        by: Option<Instant>,
    ) -> Result<Head, RequestError> {
        let idle_deadline = after(Instant::now(), idle);
        let idle_deadline = by.map_or(idle_deadline, |by| idle_deadline.min(by));
        let mut head_deadline = None;
        let mut scan = Scan::default();
        let mut skipped = 0;
        let head_len = loop {
            if scan.pos == 0 {
                // RFC 9112 2.2: ignore empty lines before a request line (some
                // clients send CRLF after a POST body); bounded so it cannot spin.
                while self.buf[self.start..self.end].starts_with(b"\r\n") {
                    self.start += 2;
                    skipped += 2;
                    if skipped > limits.max_line {
                        return Err(RequestError::MalformedRequestLine);
                    }
                }
            }
            if let Some(len) = scan.advance(&self.buf[self.start..self.end], limits)? {
                break len;
            }
            // A lone CR may still be an empty line to skip, so it does not start a request.
            let pending = &self.buf[self.start..self.end];
            if head_deadline.is_none() && !pending.is_empty() && pending != b"\r" {
                let due = after(Instant::now(), head_time);
                head_deadline = Some(by.map_or(due, |by| due.min(by)));
            }
            match self.fill(
                limits,
                head_deadline.unwrap_or(idle_deadline),
                Duration::MAX,
            ) {
                Ok(0) if head_deadline.is_none() => return Err(RequestError::Idle),
                Ok(0) => return Err(RequestError::IncompleteHead),
                Ok(_) => {}
                Err(e) if is_timeout(&e) && head_deadline.is_none() => {
                    return Err(RequestError::Idle)
                }
                Err(e) if is_timeout(&e) => return Err(RequestError::HeadTimeout),
                Err(e) => return Err(RequestError::Io(e)),
            }
        };
        let head = parse_head(
            &self.buf[self.start..self.start + head_len],
            scan.headers,
            limits,
            std::mem::take(&mut self.spare),
        )?;
        self.start += head_len;
        Ok(head)
    }

    /// Read the whole body of the request whose head was just read.
    ///
    /// Each read waits at most `read_timeout` and never past `deadline`.
    pub fn read_body(
        &mut self,
        framing: Framing,
        limits: &Limits,
        read_timeout: Duration,
        deadline: Instant,
    ) -> Result<Vec<u8>, RequestError> {
        match framing {
            Framing::None => Ok(Vec::new()),
            Framing::Length(n) => {
                if n > limits.max_body {
                    return Err(RequestError::BodyTooLarge {
                        limit: limits.max_body,
                    });
                }
                let mut body = Vec::with_capacity(n.min(BODY_STEP) as usize);
                self.read_exact_into(&mut body, n, read_timeout, deadline)?;
                Ok(body)
            }
            Framing::Chunked => self.read_chunked(limits, read_timeout, deadline),
        }
    }

    /// Append exactly `n` body bytes: buffered ones first, the rest straight
    /// from the source so large bodies are copied once.
    fn read_exact_into(
        &mut self,
        body: &mut Vec<u8>,
        n: u64,
        read_timeout: Duration,
        deadline: Instant,
    ) -> Result<(), RequestError> {
        let from_buf = (self.end - self.start).min(usize::try_from(n).unwrap_or(usize::MAX));
        body.extend_from_slice(&self.buf[self.start..self.start + from_buf]);
        self.start += from_buf;
        let mut left = n - from_buf as u64;
        let mut filled = body.len();
        while left > 0 {
            if body.len() == filled {
                // Grow only a step ahead of what arrived, so a declared length costs nothing.
                body.resize(filled + left.min(BODY_STEP) as usize, 0);
            }
            let room = (body.len() - filled).min(usize::try_from(left).unwrap_or(usize::MAX));
            match read_before(
                &mut self.source,
                &mut body[filled..filled + room],
                deadline,
                read_timeout,
            ) {
                Ok(0) => return Err(RequestError::TruncatedBody),
                Ok(got) => {
                    filled += got;
                    left -= got as u64;
                }
                Err(e) => return Err(body_io_error(e)),
            }
        }
        body.truncate(filled);
        Ok(())
    }

    fn read_chunked(
        &mut self,
        limits: &Limits,
        read_timeout: Duration,
        deadline: Instant,
    ) -> Result<Vec<u8>, RequestError> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line(limits, LineKind::ChunkSize, read_timeout, deadline)?;
            let size = parse_chunk_size(&self.buf[line])?;
            if size == 0 {
                break;
            }
            if size > limits.max_body - body.len() as u64 {
                return Err(RequestError::BodyTooLarge {
                    limit: limits.max_body,
                });
            }
            self.read_exact_into(&mut body, size, read_timeout, deadline)?;
            while self.end - self.start < 2 {
                match self.fill(limits, deadline, read_timeout) {
                    Ok(0) => return Err(RequestError::TruncatedBody),
                    Ok(_) => {}
                    Err(e) => return Err(body_io_error(e)),
                }
            }
            if &self.buf[self.start..self.start + 2] != b"\r\n" {
                return Err(RequestError::MissingChunkCrlf);
            }
            self.start += 2;
        }
        let mut trailer_bytes = 0;
        loop {
            let line = self.read_line(limits, LineKind::Trailer, read_timeout, deadline)?;
            trailer_bytes += line.len() + 2;
            if trailer_bytes > limits.max_head {
                return Err(RequestError::TrailersTooLarge {
                    limit: limits.max_head,
                });
            }
            if line.is_empty() {
                return Ok(body);
            }
            check_trailer(&self.buf[line])?;
        }
    }

    /// Consume one CRLF-terminated line and return its range (without CRLF),
    /// valid until the next read into the buffer.
    fn read_line(
        &mut self,
        limits: &Limits,
        kind: LineKind,
        read_timeout: Duration,
        deadline: Instant,
    ) -> Result<Range<usize>, RequestError> {
        let too_long = || match kind {
            LineKind::ChunkSize => RequestError::ChunkLineTooLong {
                limit: limits.max_line,
            },
            LineKind::Trailer => RequestError::TrailerLineTooLong {
                limit: limits.max_line,
            },
        };
        let mut searched = 0;
        loop {
            let pending = &self.buf[self.start..self.end];
            if let Some(i) = pending[searched..].iter().position(|&b| b == b'\n') {
                let i = searched + i;
                if i == 0 || pending[i - 1] != b'\r' {
                    return Err(match kind {
                        LineKind::ChunkSize => RequestError::BadChunkSize,
                        LineKind::Trailer => RequestError::BadTrailer,
                    });
                }
                if i - 1 > limits.max_line {
                    return Err(too_long());
                }
                let line = self.start..self.start + i - 1;
                self.start += i + 1;
                return Ok(line);
            }
            if pending.len() > limits.max_line.saturating_add(1) {
                return Err(too_long());
            }
            searched = pending.len();
            match self.fill(limits, deadline, read_timeout) {
                Ok(0) => return Err(RequestError::TruncatedBody),
                Ok(_) => {}
                Err(e) => return Err(body_io_error(e)),
            }
        }
    }

    /// Read once into the buffer, moving pending bytes to the front first so the
    /// buffer stays within `limits.buffer_cap()`.
    fn fill(
        &mut self,
        limits: &Limits,
        deadline: Instant,
        per_read: Duration,
    ) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let want = limits.buffer_cap().min(self.end + READ_CHUNK);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        if self.end == self.buf.len() {
            // Callers stop before pending data reaches the cap; this is a bug guard.
            return Err(io::Error::other("request buffer full"));
        }
        let n = read_before(
            &mut self.source,
            &mut self.buf[self.end..],
            deadline,
            per_read,
        )?;
        self.end += n;
        Ok(n)
    }
}

/// Which line of a chunked body is being read, for error choice.
#[derive(Clone, Copy)]
enum LineKind {
    ChunkSize,
    Trailer,
}

/// Incremental check of the head's line structure, kept across reads so each
/// byte is looked at once. Offsets are relative to the start of the head.
#[derive(Default)]
struct Scan {
    pos: usize,
    line_start: usize,
    headers: usize,
}

impl Scan {
    /// Check new bytes; return the head length once the empty line is seen.
    fn advance(&mut self, data: &[u8], limits: &Limits) -> Result<Option<usize>, RequestError> {
        while self.pos < data.len() {
            // Nearly every byte of a head is a visible one, which needs no
            // look beyond this test; only control bytes (CR, LF, HTAB and
            // the refused ones) go through the match below.
            match first_ctl(&data[self.pos..]) {
                Some(plain) => self.pos += plain,
                None => {
                    self.pos = data.len();
                    break;
                }
            }
            let in_request_line = self.line_start == 0;
            match data[self.pos] {
                b'\n' => {
                    if self.pos == self.line_start || data[self.pos - 1] != b'\r' {
                        return Err(RequestError::BareLineEnding);
                    }
                    let len = self.pos - 1 - self.line_start;
                    if len > limits.max_line {
                        return Err(if in_request_line {
                            RequestError::RequestLineTooLong {
                                limit: limits.max_line,
                            }
                        } else {
                            RequestError::HeaderLineTooLong {
                                limit: limits.max_line,
                            }
                        });
                    }
                    if !in_request_line {
                        if len == 0 {
                            let head_len = self.pos + 1;
                            if head_len > limits.max_head {
                                return Err(RequestError::HeadTooLarge {
                                    limit: limits.max_head,
                                });
                            }
                            return Ok(Some(head_len));
                        }
                        if matches!(data[self.line_start], b' ' | b'\t') {
                            return Err(RequestError::ObsFold);
                        }
                        self.headers += 1;
                        if self.headers > limits.max_headers {
                            return Err(RequestError::TooManyHeaders {
                                limit: limits.max_headers,
                            });
                        }
                    }
                    self.line_start = self.pos + 1;
                }
                b'\r' => match data.get(self.pos + 1) {
                    Some(b'\n') => {}
                    Some(_) => return Err(RequestError::BareLineEnding),
                    None => break,
                },
                b'\t' if !in_request_line => {}
                0..=0x1f | 0x7f => return Err(RequestError::ControlByte),
                _ => {}
            }
            self.pos += 1;
        }
        if data.len() - self.line_start > limits.max_line.saturating_add(1) {
            return Err(if self.line_start == 0 {
                RequestError::RequestLineTooLong {
                    limit: limits.max_line,
                }
            } else {
                RequestError::HeaderLineTooLong {
                    limit: limits.max_line,
                }
            });
        }
        if data.len() >= limits.max_head {
            return Err(RequestError::HeadTooLarge {
                limit: limits.max_head,
            });
        }
        Ok(None)
    }
}

/// The request head at the very start of `bytes`, checked exactly as
/// [`Reader::read_head`] checks one (no empty lines are skipped before it),
/// with its length; `Ok(None)` while it is incomplete. For a caller that
/// must not answer a head a worker would refuse (the health lane).
pub fn parse_prefix(bytes: &[u8], limits: &Limits) -> Result<Option<(Head, usize)>, RequestError> {
    let mut scan = Scan::default();
    let Some(len) = scan.advance(bytes, limits)? else {
        return Ok(None);
    };
    let head = parse_head(&bytes[..len], scan.headers, limits, Spare::default())?;
    Ok(Some((head, len)))
}

/// Parse and validate a complete head whose line structure `Scan` accepted,
/// into the buffers of `spare`.
fn parse_head(
    bytes: &[u8],
    count: usize,
    limits: &Limits,
    spare: Spare,
) -> Result<Head, RequestError> {
    let mut stack = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let mut heap;
    let slots: &mut [httparse::Header] = if count <= HEADER_SLOTS {
        &mut stack[..count]
    } else {
        heap = vec![httparse::EMPTY_HEADER; count];
        &mut heap
    };
    let mut req = httparse::Request::new(slots);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) if n == bytes.len() => {}
        Ok(_) => return Err(RequestError::MalformedRequestLine),
        Err(httparse::Error::Version) => return Err(version_error(bytes)),
        Err(httparse::Error::HeaderName) => return Err(RequestError::BadHeaderName),
        Err(httparse::Error::HeaderValue) => return Err(RequestError::ControlByte),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(RequestError::TooManyHeaders {
                limit: limits.max_headers,
            })
        }
        Err(_) => return Err(RequestError::MalformedRequestLine),
    }
    let (Some(method), Some(path), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(RequestError::MalformedRequestLine);
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(RequestError::MalformedRequestLine);
    }
    let Spare {
        method: mut method_buf,
        mut target,
        mut headers,
    } = spare;
    origin_form(method, path, &mut target)?;

    let mut hosts = 0;
    let mut lengths = 0;
    let mut length = None;
    let mut encodings = 0;
    let mut chunked = false;
    let mut expect_continue = false;
    let mut bad_expect = false;
    let mut close = false;
    let mut keep = false;
    headers.clear();
    if headers.ends.capacity() == 0 {
        headers = Headers::with_capacity(req.headers.len());
    }
    for h in req.headers.iter() {
        let name = h.name;
        let value = trim_ows(h.value);
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            length = parse_decimal(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            encodings += 1;
            chunked = value.eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
            } else {
                bad_expect = true;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',').map(trim_ows) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        headers.push(name, h.value);
    }

    if hosts > 1 {
        return Err(RequestError::DuplicateHost);
    }
    if hosts == 0 && minor_version == 1 {
        return Err(RequestError::MissingHost);
    }
    let framing = if encodings > 0 {
        if lengths > 0 {
            return Err(RequestError::LengthWithTransferEncoding);
        }
        if minor_version == 0 {
            return Err(RequestError::TransferEncodingOnHttp10);
        }
        if encodings > 1 || !chunked {
            return Err(RequestError::UnsupportedTransferEncoding);
        }
        Framing::Chunked
    } else if lengths > 1 {
        return Err(RequestError::DuplicateContentLength);
    } else if lengths == 1 {
        let n = length.ok_or(RequestError::BadContentLength)?;
        if n > limits.max_body {
            return Err(RequestError::BodyTooLarge {
                limit: limits.max_body,
            });
        }
        Framing::Length(n)
    } else {
        Framing::None
    };
    if bad_expect {
        return Err(RequestError::ExpectationFailed);
    }
    method_buf.clear();
    method_buf.push_str(method);
    Ok(Head {
        method: method_buf,
        target,
        minor_version,
        headers,
        framing,
        // RFC 9110 10.1.1: a 100-continue expectation in HTTP/1.0 is ignored.
        expect_continue: expect_continue && minor_version == 1,
        keep_alive: !close && (minor_version == 1 || keep),
    })
}

/// 505 for a well-formed `HTTP/d[.d]` we do not speak, 400 for anything else.
fn version_error(head: &[u8]) -> RequestError {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
    let well_formed = match version.strip_prefix(b"HTTP/") {
        Some([major, b'.', minor]) => major.is_ascii_digit() && minor.is_ascii_digit(),
        Some([major]) => major.is_ascii_digit(),
        _ => false,
    };
    if well_formed {
        RequestError::VersionNotSupported
    } else {
        RequestError::MalformedRequestLine
    }
}

/// Reduce a request target to origin form, into `out`; absolute-form keeps
/// only path and query.
fn origin_form(method: &str, target: &str, out: &mut String) -> Result<(), RequestError> {
    // httparse lets obs-text and `#` through; neither belongs in a request target.
    if !target
        .bytes()
        .all(|b| (0x21..0x7f).contains(&b) && b != b'#')
    {
        return Err(RequestError::BadTarget);
    }
    out.clear();
    if target.starts_with('/') {
        out.push_str(target);
        return Ok(());
    }
    if target == "*" {
        return if method == "OPTIONS" {
            out.push_str(target);
            Ok(())
        } else {
            Err(RequestError::BadTarget)
        };
    }
    let rest = strip_prefix_ci(target, "http://")
        .or_else(|| strip_prefix_ci(target, "https://"))
        .ok_or(RequestError::BadTarget)?;
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    // RFC 9110 4.2.4: userinfo is deprecated in http(s) URIs.
    if authority.is_empty() || authority.contains('@') {
        return Err(RequestError::BadTarget);
    }
    if !path.starts_with('/') {
        out.push('/');
    }
    out.push_str(path);
    Ok(())
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// RFC 9110 5.6.2 token character.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = v.iter().position(|b| !is_ows(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !is_ows(b)).map_or(start, |i| i + 1);
    &v[start..end]
}

/// `1*DIGIT` as u64; `None` for anything else, including overflow.
fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// `1*HEXDIG [ ";" extensions ]`; extensions are ignored but must be free of control bytes.
fn parse_chunk_size(line: &[u8]) -> Result<u64, RequestError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(RequestError::BadChunkSize);
    }
    let (hex, ext) = line.split_at(digits);
    if !(ext.is_empty() || ext[0] == b';') || ext.iter().any(|&b| is_ctl(b) && b != b'\t') {
        return Err(RequestError::BadChunkSize);
    }
    hex.iter()
        .try_fold(0u64, |n, &b| {
            let d = (b as char).to_digit(16)?;
            n.checked_mul(16)?.checked_add(u64::from(d))
        })
        .ok_or(RequestError::BadChunkSize)
}

/// A trailer line must look like a header field: token, `:`, value without controls.
fn check_trailer(line: &[u8]) -> Result<(), RequestError> {
    let name_len = line.iter().take_while(|&&b| is_tchar(b)).count();
    let ok = name_len > 0
        && line.get(name_len) == Some(&b':')
        && !line[name_len..].iter().any(|&b| is_ctl(b) && b != b'\t');
    if ok {
        Ok(())
    } else {
        Err(RequestError::BadTrailer)
    }
}

fn is_ctl(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// Where the first control byte ([`is_ctl`]) of `data` is. Eight bytes are
/// tested at a time: the head's checks look at every byte of it, nearly all
/// are visible ones, and a client SDK's head runs to half a kilobyte.
fn first_ctl(data: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut clean = 0;
    for chunk in data.chunks_exact(8) {
        let Ok(bytes) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let x = u64::from_le_bytes(bytes);
        let del = x ^ (ONES * 0x7f);
        // Nonzero exactly when some byte is below 0x20, or is 0x7f (zero
        // in `del`): the usual tests for "a byte less than n" and "a zero
        // byte", exact as to whether there is one (not as to where).
        let below = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        let zero = del.wrapping_sub(ONES) & !del & HIGH;
        if below | zero != 0 {
            break;
        }
        clean += 8;
    }
    data[clean..]
        .iter()
        .position(|&b| is_ctl(b))
        .map(|i| clean + i)
}

/// `now + d`, saturating (a year) so an absurd configured duration cannot panic.
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn body_io_error(e: io::Error) -> RequestError {
    if is_timeout(&e) {
        RequestError::BodyTimeout
    } else {
        RequestError::Io(e)
    }
}

/// One read that waits at most `per_read` and never past `deadline`.
fn read_before<S: Source>(
    source: &mut S,
    dst: &mut [u8],
    deadline: Instant,
    per_read: Duration,
) -> io::Result<usize> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .min(per_read);
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    source.set_read_timeout(Some(left))?;
    loop {
        match source.read(dst) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn limits() -> Limits {
        Limits {
            max_line: 8192,
            max_head: 32768,
            max_headers: 100,
            max_body: 1 << 20,
        }
    }

    fn head_with(bytes: &[u8], limits: &Limits) -> Result<Head, RequestError> {
        Reader::new(bytes).read_head(limits, SEC, SEC)
    }

    fn head(bytes: &[u8]) -> Result<Head, RequestError> {
        head_with(bytes, &limits())
    }

    #[test]
    fn first_ctl_finds_what_a_byte_by_byte_search_finds() {
        let naive = |d: &[u8]| d.iter().position(|&b| is_ctl(b));
        // Every byte value at every place of a run of visible bytes, then
        // after obs-text, at lengths around a word.
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 40] {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut data = vec![b'a'; len];
                    data[at] = b;
                    assert_eq!(first_ctl(&data), naive(&data), "{b:#x} at {at} of {len}");
                    data.iter_mut().take(at).for_each(|d| *d = 0x80 | b);
                    assert_eq!(first_ctl(&data), naive(&data), "{b:#x} after obs-text");
                }
            }
        }
    }

    #[test]
    fn a_recycled_head_leaves_nothing_in_the_next() {
        let wire: &[u8] = b"OPTIONS * HTTP/1.1\r\nHost: a\r\nX-Long-Name: 1234567890\r\n\
            Content-Length: 0\r\nConnection: keep-alive\r\n\r\n\
            GET http://b/v1/models HTTP/1.1\r\nHost: b\r\n\r\n\
            PUT /x HTTP/1.0\r\n\r\n";
        let mut r = Reader::new(wire);
        let first = r.read_head(&limits(), SEC, SEC).unwrap();
        let fields = |h: &Head| {
            h.headers
                .iter()
                .map(|(n, v)| format!("{n}={}", String::from_utf8_lossy(v)))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            (first.method.as_str(), first.target.as_str()),
            ("OPTIONS", "*")
        );
        assert_eq!(fields(&first).len(), 4);
        r.recycle(first);
        let second = r.read_head(&limits(), SEC, SEC).unwrap();
        assert_eq!(
            (second.method.as_str(), second.target.as_str()),
            ("GET", "/v1/models")
        );
        assert_eq!(fields(&second), ["Host=b"]);
        assert_eq!(second.framing, Framing::None);
        r.recycle(second);
        let third = r.read_head(&limits(), SEC, SEC).unwrap();
        assert_eq!(
            (third.method.as_str(), third.target.as_str()),
            ("PUT", "/x")
        );
        assert!(third.headers.is_empty() && !third.keep_alive);
    }

    #[test]
    fn a_large_head_leaves_no_buffers_behind_a_small_one_does() {
        // Two fields, each within the line limit, together over SPARE_KEPT.
        let v = "v".repeat(SPARE_KEPT * 3 / 4);
        let big = format!("POST /v1/x HTTP/1.1\r\nHost: a\r\nX-A: {v}\r\nX-B: {v}\r\n\r\n");
        let small = "GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n";
        let wire = format!("{big}{small}{small}");
        let mut r = Reader::new(wire.as_bytes());
        let first = r.read_head(&limits(), SEC, SEC).unwrap();
        r.recycle(first);
        assert_eq!(r.spare.headers.values.capacity(), 0, "large buffers freed");
        let second = r.read_head(&limits(), SEC, SEC).unwrap();
        r.recycle(second);
        assert!(r.spare.headers.values.capacity() > 0, "small buffers kept");
        let third = r.read_head(&limits(), SEC, SEC).unwrap();
        assert_eq!(third.target, "/v1/models");
    }

    /// Read one whole request (head and body).
    fn request(bytes: &[u8]) -> Result<(Head, Vec<u8>), RequestError> {
        let mut r = Reader::new(bytes);
        let h = r.read_head(&limits(), SEC, SEC)?;
        let body = r.read_body(h.framing, &limits(), SEC, Instant::now() + SEC)?;
        Ok((h, body))
    }

    /// The status a bad head gets.
    fn status(bytes: &[u8]) -> u16 {
        status_of(head(bytes))
    }

    fn status_of<T: fmt::Debug>(r: Result<T, RequestError>) -> u16 {
        let e = r.expect_err("request should be refused");
        assert!(e.must_close());
        assert!(!e.to_string().is_empty());
        e.status().expect("an answerable error")
    }

    /// A POST with the given extra header lines.
    fn post(extra: &str) -> Vec<u8> {
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n{extra}\r\n").into_bytes()
    }

    #[test]
    fn simple_get() {
        let h = head(b"GET /v1/models?x=1 HTTP/1.1\r\nHost: a\r\nX-A:  b c \r\n\r\n").unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/v1/models?x=1");
        assert_eq!(h.minor_version, 1);
        assert_eq!(h.framing, Framing::None);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
        assert_eq!(h.header("x-a"), Some(&b"b c"[..]));
        assert_eq!(h.header_str("HOST"), Some("a"));
        assert_eq!(h.header("missing"), None);
    }

    #[test]
    fn content_length_body() {
        let (h, body) = request(
            &post("Content-Length: 5\r\n")
                .into_iter()
                .chain(*b"hello")
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(h.framing, Framing::Length(5));
        assert_eq!(body, b"hello");
    }

    #[test]
    fn content_length_ows_trimmed() {
        let h = head(&post("Content-Length:  5 \t\r\n")).unwrap();
        assert_eq!(h.framing, Framing::Length(5));
        assert_eq!(
            head(&post("Content-Length: 0005\r\n")).unwrap().framing,
            Framing::Length(5)
        );
    }

    #[test]
    fn content_length_matrix() {
        for bad in [
            "5, 5",
            "5,5",
            "+5",
            "-1",
            "5 5",
            "",
            "0x5",
            "5a",
            "1e3",
            "18446744073709551616",
            "99999999999999999999999",
        ] {
            let got = head(&post(&format!("Content-Length: {bad}\r\n")));
            assert!(
                matches!(got, Err(RequestError::BadContentLength)),
                "{bad:?}: {got:?}"
            );
            assert_eq!(status_of(got), 400);
        }
        let max = head(&post("Content-Length: 18446744073709551615\r\n"));
        assert!(matches!(max, Err(RequestError::BodyTooLarge { .. })));
        for dup in [
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
        ] {
            let got = head(&post(dup));
            assert!(
                matches!(got, Err(RequestError::DuplicateContentLength)),
                "{got:?}"
            );
            assert_eq!(status_of(got), 400);
        }
    }

    #[test]
    fn huge_declared_length_is_413_from_the_head() {
        let mut input = post("Content-Length: 1000000000000\r\n");
        input.extend_from_slice(b"abc");
        let mut r = Reader::new(&input[..]);
        let lim = Limits {
            max_body: 1000,
            ..limits()
        };
        let e = r.read_head(&lim, SEC, SEC).unwrap_err();
        assert!(matches!(e, RequestError::BodyTooLarge { limit: 1000 }));
        assert_eq!(e.status(), Some(413));
        assert_eq!(e.to_string(), "request body exceeds 1000 bytes");
        // read_body refuses it as well, before reading.
        let e = r.read_body(
            Framing::Length(1_000_000_000_000),
            &lim,
            SEC,
            Instant::now() + SEC,
        );
        assert!(matches!(e, Err(RequestError::BodyTooLarge { .. })));
    }

    #[test]
    fn huge_allowed_length_never_allocates_up_front() {
        // Would abort the process if the declared length were allocated.
        let lim = Limits {
            max_body: u64::MAX,
            ..limits()
        };
        let mut r = Reader::new(&b"0123456789"[..]);
        let e = r.read_body(Framing::Length(1 << 50), &lim, SEC, Instant::now() + SEC);
        assert!(matches!(e, Err(RequestError::TruncatedBody)));
    }

    #[test]
    fn transfer_encoding_matrix() {
        let cases: &[(&str, u16)] = &[
            ("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400),
            ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400),
            ("Transfer-Encoding: gzip\r\n", 501),
            ("Transfer-Encoding: chunked, chunked\r\n", 501),
            ("Transfer-Encoding: gzip, chunked\r\n", 501),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                501,
            ),
            ("Transfer-Encoding: identity\r\n", 501),
            ("Transfer-Encoding: \r\n", 501),
            ("Transfer-Encoding: xchunked\r\n", 501),
        ];
        for (extra, want) in cases {
            assert_eq!(status(&post(extra)), *want, "{extra:?}");
        }
        for ok in ["chunked", "CHUNKED", " Chunked "] {
            let h = head(&post(&format!("Transfer-Encoding:{ok}\r\n"))).unwrap();
            assert_eq!(h.framing, Framing::Chunked);
        }
        let e = head(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert!(matches!(e, RequestError::TransferEncodingOnHttp10));
        assert_eq!(e.status(), Some(400));
    }

    #[test]
    fn host_rules() {
        assert!(matches!(
            head(b"GET / HTTP/1.1\r\n\r\n"),
            Err(RequestError::MissingHost)
        ));
        assert_eq!(status(b"GET / HTTP/1.1\r\nX: y\r\n\r\n"), 400);
        let two = b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n";
        assert!(matches!(head(two), Err(RequestError::DuplicateHost)));
        assert_eq!(status(two), 400);
        let h = head(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(h.minor_version, 0);
        assert!(!h.keep_alive);
    }

    #[test]
    fn line_endings_and_control_bytes() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
            b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\r\n",
        ];
        for c in cases {
            assert!(
                matches!(head(c), Err(RequestError::BareLineEnding)),
                "{:?}",
                String::from_utf8_lossy(c)
            );
            assert_eq!(status(c), 400);
        }
        let ctl: &[&[u8]] = &[
            b"GET /a\0b HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /a\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHo\0st: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\x1bb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\x7f\r\n\r\n",
            b"GET / HTTP/1.1\r\nX\x0b: a\r\nHost: a\r\n\r\n",
        ];
        for c in ctl {
            assert!(
                matches!(head(c), Err(RequestError::ControlByte)),
                "{:?}",
                String::from_utf8_lossy(c)
            );
            assert_eq!(status(c), 400);
        }
        // HTAB inside a value is fine.
        let h = head(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\tb\r\n\r\n").unwrap();
        assert_eq!(h.header("x"), Some(&b"a\tb"[..]));
    }

    #[test]
    fn header_name_rules() {
        for c in [
            &b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX(y): z\r\n\r\n",
        ] {
            assert!(
                matches!(head(c), Err(RequestError::BadHeaderName)),
                "{:?}",
                String::from_utf8_lossy(c)
            );
            assert_eq!(status(c), 400);
        }
        let fold = b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n";
        assert!(matches!(head(fold), Err(RequestError::ObsFold)));
        assert_eq!(status(fold), 400);
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n"),
            400
        );
    }

    #[test]
    fn size_limits() {
        let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9000));
        let e = head(long_target.as_bytes()).unwrap_err();
        assert!(matches!(
            e,
            RequestError::RequestLineTooLong { limit: 8192 }
        ));
        assert_eq!(e.status(), Some(414));
        // Refused without waiting for the end of the line.
        let partial = format!("GET /{}", "a".repeat(9000));
        assert_eq!(status(partial.as_bytes()), 414);

        let long_header = post(&format!("X: {}\r\n", "b".repeat(9000)));
        let e = head(&long_header).unwrap_err();
        assert!(matches!(e, RequestError::HeaderLineTooLong { .. }));
        assert_eq!(e.status(), Some(431));

        let block = post(&format!("X: {}\r\n", "b".repeat(8000)).repeat(5));
        let e = head(&block).unwrap_err();
        assert!(matches!(e, RequestError::HeadTooLarge { limit: 32768 }));
        assert_eq!(e.status(), Some(431));
        assert_eq!(e.to_string(), "request header block exceeds 32768 bytes");

        // Exactly at the limits is fine.
        let at = post(&format!("X: {}\r\n", "b".repeat(8189)));
        assert!(head(&at).is_ok());
        let over = post(&format!("X: {}\r\n", "b".repeat(8190)));
        assert_eq!(status(&over), 431);
    }

    #[test]
    fn header_count() {
        let hundred = post(&"X: y\r\n".repeat(99));
        assert_eq!(head(&hundred).unwrap().headers.len(), 100);
        let e = head(&post(&"X: y\r\n".repeat(100))).unwrap_err();
        assert!(matches!(e, RequestError::TooManyHeaders { limit: 100 }));
        assert_eq!(e.status(), Some(431));
        assert_eq!(status(&post(&"X: y\r\n".repeat(10_000))), 431);
        // More fields than the stack slots still parse when the limit allows.
        let lim = Limits {
            max_headers: 500,
            ..limits()
        };
        let many = head_with(&post(&"X: y\r\n".repeat(300)), &lim).unwrap();
        assert_eq!(many.headers.len(), 301);
    }

    #[test]
    fn versions() {
        for v in ["HTTP/2.0", "HTTP/0.9", "HTTP/1.2", "HTTP/3"] {
            let e = head(format!("GET / {v}\r\nHost: a\r\n\r\n").as_bytes()).unwrap_err();
            assert!(matches!(e, RequestError::VersionNotSupported), "{v}: {e:?}");
            assert_eq!(e.status(), Some(505));
        }
        for v in ["HTTP/1.1 ", "http/1.1", "HTTP/1.x", "HTTP/11", "FOO"] {
            assert_eq!(
                status(format!("GET / {v}\r\nHost: a\r\n\r\n").as_bytes()),
                400,
                "{v}"
            );
        }
        // An HTTP/0.9 simple request has no version at all.
        assert_eq!(status(b"GET /\r\n\r\n"), 400);
    }

    #[test]
    fn request_line_and_targets() {
        for bad in [
            &b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b" GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(status(bad), 400, "{:?}", String::from_utf8_lossy(bad));
        }
        let target = |t: &str, m: &str| {
            head(format!("{m} {t} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes()).map(|h| h.target)
        };
        assert_eq!(
            target("http://x.y/v1/models?a=b", "GET").unwrap(),
            "/v1/models?a=b"
        );
        assert_eq!(target("HTTPS://x.y:8080", "GET").unwrap(), "/");
        assert_eq!(target("http://x.y?q", "GET").unwrap(), "/?q");
        assert_eq!(target("*", "OPTIONS").unwrap(), "*");
        for bad in [
            "*",
            "v1/models",
            "x.y:443",
            "http://",
            "http:///p",
            "ftp://x/y",
            "http://u@x/",
            "/a#frag",
            "/\u{e9}",
        ] {
            let e = target(bad, "GET").unwrap_err();
            assert!(matches!(e, RequestError::BadTarget), "{bad}: {e:?}");
        }
        assert!(matches!(
            target("x.y:443", "CONNECT"),
            Err(RequestError::BadTarget)
        ));
    }

    #[test]
    fn expect_and_upgrade() {
        let h = head(&post("Expect: 100-Continue\r\nContent-Length: 1\r\n")).unwrap();
        assert!(h.expect_continue);
        let e = head(&post("Expect: foo\r\n")).unwrap_err();
        assert!(matches!(e, RequestError::ExpectationFailed));
        assert_eq!(e.status(), Some(417));
        let h = head(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").unwrap();
        assert!(!h.expect_continue);
        // Upgrade is ignored: an ordinary request, served on this connection.
        let h =
            head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                .unwrap();
        assert!(h.keep_alive);
        assert_eq!(h.framing, Framing::None);
        assert_eq!(h.header_str("upgrade"), Some("websocket"));
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |raw: &[u8]| head(raw).unwrap().keep_alive;
        assert!(ka(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!ka(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, CLOSE\r\n\r\n"
        ));
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(!ka(
            b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"
        ));
    }

    fn chunked(body: &[u8]) -> Vec<u8> {
        let mut v = post("Transfer-Encoding: chunked\r\n");
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn chunked_body() {
        let (_, body) = request(&chunked(
            b"5;name=\"v\"\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n",
        ))
        .unwrap();
        assert_eq!(body, b"hello0123456789");
        let (_, body) = request(&chunked(b"0\r\n\r\n")).unwrap();
        assert!(body.is_empty());
    }

    #[test]
    fn chunked_errors() {
        let cases: &[(&[u8], u16)] = &[
            (b"g\r\nhello\r\n0\r\n\r\n", 400),
            (b"-1\r\nhello\r\n0\r\n\r\n", 400),
            (b"0x5\r\nhello\r\n0\r\n\r\n", 400),
            (b" 5\r\nhello\r\n0\r\n\r\n", 400),
            (b"5 \r\nhello\r\n0\r\n\r\n", 400),
            (b"+5\r\nhello\r\n0\r\n\r\n", 400),
            (b"\r\nhello\r\n0\r\n\r\n", 400),
            (b"10000000000000000\r\nhello\r\n0\r\n\r\n", 400),
            (b"5\nhello\r\n0\r\n\r\n", 400),
            (b"5;a\x00\r\nhello\r\n0\r\n\r\n", 400),
            (b"5\r\nhelloXX0\r\n\r\n", 400),
            (b"5\r\nhello\n0\r\n\r\n", 400),
            (b"5\r\nhel", 400),
            (b"5\r\nhello\r\n", 400),
            (b"5\r\nhello\r\n0\r\n", 400),
            (b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n", 400),
            (b"5\r\nhello\r\n0\r\nX: a\nb\r\n\r\n", 400),
            (b"200000\r\n", 413),
        ];
        for (body, want) in cases {
            let got = request(&chunked(body));
            assert_eq!(status_of(got), *want, "{:?}", String::from_utf8_lossy(body));
        }
        assert!(matches!(
            request(&chunked(b"5\r\nhelloXX0\r\n\r\n")),
            Err(RequestError::MissingChunkCrlf)
        ));
        assert!(matches!(
            request(&chunked(b"5\r\nhel")),
            Err(RequestError::TruncatedBody)
        ));
        assert!(matches!(
            request(&chunked(b"fffffffffffffffff\r\n")),
            Err(RequestError::BadChunkSize)
        ));
        // Running total over max_body, with each chunk under it.
        let big = format!(
            "80000\r\n{}\r\n80000\r\n{}\r\n1\r\nx\r\n0\r\n\r\n",
            "a".repeat(0x80000),
            "b".repeat(0x80000)
        );
        assert!(matches!(
            request(&chunked(big.as_bytes())),
            Err(RequestError::BodyTooLarge { .. })
        ));
        // Extension and trailer sizes are bounded.
        let ext = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(9000));
        assert!(matches!(
            request(&chunked(ext.as_bytes())),
            Err(RequestError::ChunkLineTooLong { .. })
        ));
        let trailer = format!("0\r\nX: {}\r\n\r\n", "t".repeat(9000));
        let e = request(&chunked(trailer.as_bytes())).unwrap_err();
        assert!(matches!(e, RequestError::TrailerLineTooLong { .. }));
        assert_eq!(e.status(), Some(431));
        let trailers = format!("0\r\n{}\r\n", "X: 0123456789\r\n".repeat(3000));
        assert!(matches!(
            request(&chunked(trailers.as_bytes())),
            Err(RequestError::TrailersTooLarge { .. })
        ));
    }

    #[test]
    fn truncated_length_body() {
        let mut v = post("Content-Length: 10\r\n");
        v.extend_from_slice(b"short");
        let e = request(&v).unwrap_err();
        assert!(matches!(e, RequestError::TruncatedBody));
        assert_eq!(e.status(), Some(400));
    }

    #[test]
    fn pipelined_requests() {
        let mut v = post("Content-Length: 5\r\n");
        v.extend_from_slice(b"hello");
        v.extend_from_slice(&chunked(b"3\r\nabc\r\n0\r\n\r\n"));
        v.extend_from_slice(b"\r\nGET /last HTTP/1.1\r\nHost: a\r\n\r\n");
        for source in [
            Pieces::split(&v, v.len()),
            Pieces::split(&v, 1),
            Pieces::split(&v, 7),
        ] {
            let mut r = Reader::new(source);
            let lim = limits();
            let mut bodies = Vec::new();
            for _ in 0..3 {
                let h = r.read_head(&lim, SEC, SEC).unwrap();
                bodies.push((
                    h.target.clone(),
                    r.read_body(h.framing, &lim, SEC, Instant::now() + SEC)
                        .unwrap(),
                ));
            }
            assert_eq!(
                bodies[0],
                ("/v1/chat/completions".to_owned(), b"hello".to_vec())
            );
            assert_eq!(
                bodies[1],
                ("/v1/chat/completions".to_owned(), b"abc".to_vec())
            );
            assert_eq!(bodies[2], ("/last".to_owned(), Vec::new()));
            assert_eq!(r.buffered(), 0);
            assert!(matches!(
                r.read_head(&lim, SEC, SEC),
                Err(RequestError::Idle)
            ));
        }
    }

    #[test]
    fn leftover_bytes_stay_buffered() {
        let mut v = post("Content-Length: 3\r\n");
        v.extend_from_slice(b"abcGET");
        let mut r = Reader::new(&v[..]);
        let h = r.read_head(&limits(), SEC, SEC).unwrap();
        assert_eq!(r.buffered(), 6);
        r.read_body(h.framing, &limits(), SEC, Instant::now() + SEC)
            .unwrap();
        assert_eq!(r.buffered(), 3);
        assert!(matches!(
            r.read_head(&limits(), SEC, SEC),
            Err(RequestError::IncompleteHead)
        ));
    }

    #[test]
    fn head_in_one_byte_pieces() {
        let raw = b"GET /x HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n";
        let mut r = Reader::new(Pieces::split(raw, 1));
        let h = r.read_head(&limits(), SEC, SEC).unwrap();
        assert_eq!(h.target, "/x");
        assert_eq!(h.headers.len(), 2);
        // One timeout set before every read, each within the time left.
        let t = &r.get_ref().timeouts;
        assert_eq!(t.len(), raw.len());
        assert!(t.iter().all(|t| t.is_some_and(|d| d <= SEC)));
    }

    #[test]
    fn idle_and_head_timeouts() {
        let lim = limits();
        let timeout =
            |pieces: Vec<Piece>| Reader::new(Pieces::new(pieces)).read_head(&lim, SEC, SEC);
        use io::ErrorKind::{TimedOut, WouldBlock};
        assert!(matches!(
            timeout(vec![Piece::Fail(WouldBlock)]),
            Err(RequestError::Idle)
        ));
        assert!(matches!(
            timeout(vec![Piece::Fail(TimedOut)]),
            Err(RequestError::Idle)
        ));
        assert!(matches!(timeout(vec![]), Err(RequestError::Idle)));
        // Empty lines before a request do not start it.
        assert!(matches!(
            timeout(vec![Piece::Data(b"\r\n".to_vec()), Piece::Fail(WouldBlock)]),
            Err(RequestError::Idle)
        ));
        let mid = timeout(vec![
            Piece::Data(b"GET / HT".to_vec()),
            Piece::Fail(WouldBlock),
        ]);
        assert!(matches!(mid, Err(RequestError::HeadTimeout)));
        assert_eq!(status_of(mid), 408);
        let eof = timeout(vec![Piece::Data(b"GET / HT".to_vec())]);
        assert!(matches!(eof, Err(RequestError::IncompleteHead)));
        // Interrupted reads are retried.
        let ok = timeout(vec![
            Piece::Fail(io::ErrorKind::Interrupted),
            Piece::Data(b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        ]);
        assert!(ok.is_ok());
        let other = timeout(vec![Piece::Fail(io::ErrorKind::ConnectionReset)]);
        assert!(matches!(other, Err(RequestError::Io(_))));
        assert_eq!(other.unwrap_err().status(), None);
        // A zero head time means the head must arrive complete with its first byte.
        let mut r = Reader::new(Pieces::split(b"GET / HTTP/1.0\r\n\r\n", 4));
        assert!(matches!(
            r.read_head(&lim, SEC, Duration::ZERO),
            Err(RequestError::HeadTimeout)
        ));
    }

    #[test]
    fn body_timeouts() {
        let lim = limits();
        let mut v = post("Content-Length: 10\r\n");
        v.extend_from_slice(b"abc");
        let mut r = Reader::new(Pieces::new([
            Piece::Data(v),
            Piece::Fail(io::ErrorKind::WouldBlock),
        ]));
        let h = r.read_head(&lim, SEC, SEC).unwrap();
        let e = r
            .read_body(h.framing, &lim, SEC, Instant::now() + SEC)
            .unwrap_err();
        assert!(matches!(e, RequestError::BodyTimeout));
        assert_eq!(e.status(), Some(408));
        // A passed deadline stops reading even if data would come.
        let mut v = chunked(b"");
        let head_len = v.len();
        v.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\n");
        let mut r = Reader::new(Pieces::split(&v, head_len));
        let h = r.read_head(&lim, SEC, SEC).unwrap();
        let e = r
            .read_body(h.framing, &lim, SEC, Instant::now())
            .unwrap_err();
        assert!(matches!(e, RequestError::BodyTimeout));
        // Per-read timeouts never exceed read_timeout.
        let mut r = Reader::new(Pieces::split(&v, 3));
        let h = r.read_head(&lim, SEC, SEC).unwrap();
        let per = Duration::from_millis(50);
        assert_eq!(
            r.read_body(h.framing, &lim, per, Instant::now() + SEC)
                .unwrap(),
            b"hello"
        );
        assert!(r
            .get_ref()
            .timeouts
            .iter()
            .rev()
            .take(5)
            .all(|t| t.is_some_and(|d| d <= per)));
    }

    #[test]
    fn real_socket_timeouts() {
        use std::io::Write;
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut r = Reader::new(server);
        let short = Duration::from_millis(50);
        let t = Instant::now();
        assert!(matches!(
            r.read_head(&limits(), short, SEC),
            Err(RequestError::Idle)
        ));
        assert!(t.elapsed() < SEC);
        client.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let t = Instant::now();
        assert!(matches!(
            r.read_head(&limits(), SEC, short),
            Err(RequestError::HeadTimeout)
        ));
        assert!(t.elapsed() >= short && t.elapsed() < SEC);
        // A head sent in two writes on a fresh connection is read whole.
        let mut client = TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        let writer = std::thread::spawn(move || {
            client.write_all(b"GET /s HTTP/1.1\r\n").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            client.write_all(b"Host: a\r\n\r\n").unwrap();
            client
        });
        let h = Reader::new(server).read_head(&limits(), SEC, SEC).unwrap();
        assert_eq!(h.target, "/s");
        drop(writer.join().unwrap());
    }

    #[test]
    fn buffer_stays_bounded_under_slow_drip() {
        let lim = Limits {
            max_line: 64,
            max_head: 256,
            max_headers: 8,
            max_body: 1024,
        };
        let drip = post(&"X: y\r\n".repeat(200));
        for size in [1, 5, 100, 10_000] {
            let mut r = Reader::new(Pieces::split(&drip, size));
            assert!(r.read_head(&lim, SEC, SEC).is_err());
            assert!(r.buf.len() <= lim.max_head + READ_CHUNK);
        }
    }

    /// xorshift64*: deterministic, no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    const SEEDS: &[&[u8]] = &[
        b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n3\r\nabc\r\n0\r\nT: v\r\n\r\n",
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
        b"POST /y HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabcGET /z HTTP/1.1\r\nHost: b\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"GET http://h/p?q HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n\r\n",
    ];

    const INTERESTING: &[u8] = b"\r\n:; ,\t\x000123456789aAfF-+xX/";

    fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
        for _ in 0..1 + rng.below(4) {
            let len = input.len();
            match rng.below(7) {
                0 if len > 0 => {
                    let i = rng.below(len);
                    input[i] ^= 1 << rng.below(8);
                }
                1 => {
                    let b = if rng.below(2) == 0 {
                        INTERESTING[rng.below(INTERESTING.len())]
                    } else {
                        rng.next() as u8
                    };
                    input.insert(rng.below(len + 1), b);
                }
                2 if len > 0 => {
                    input.remove(rng.below(len));
                }
                3 => {
                    let other = SEEDS[rng.below(SEEDS.len())];
                    let cut = rng.below(len + 1);
                    input.truncate(cut);
                    input.extend_from_slice(&other[rng.below(other.len())..]);
                }
                4 => input.truncate(rng.below(len + 1)),
                5 if len > 0 => {
                    // Repeat one line many times (header floods, duplicate framing).
                    let at = rng.below(len);
                    let start = input[..at]
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |i| i + 1);
                    let end = input[at..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(len, |i| at + i + 1);
                    let line = input[start..end].to_vec();
                    for _ in 0..1 + rng.below(40) {
                        input.splice(end..end, line.iter().copied());
                    }
                }
                _ => {
                    let other = SEEDS[rng.below(SEEDS.len())];
                    input.extend_from_slice(other);
                }
            }
        }
    }

    /// What a connection yielded: the requests served, then how it ended.
    #[derive(Debug, PartialEq)]
    struct Outcome {
        served: Vec<(String, Vec<u8>)>,
        /// `None`: closed silently (idle or EOF between requests).
        refused: Option<u16>,
    }

    fn run_case<S: Source>(r: &mut Reader<S>, lim: &Limits) -> Outcome {
        let deadline = Instant::now() + SEC;
        let mut served = Vec::new();
        loop {
            let result = r
                .read_head(lim, SEC, SEC)
                .and_then(|h| r.read_body(h.framing, lim, SEC, deadline).map(|b| (h, b)));
            assert!(r.buf.len() <= lim.max_head + READ_CHUNK);
            assert!(r.start <= r.end && r.end <= r.buf.len());
            match result {
                Ok((h, body)) => {
                    assert!(body.len() as u64 <= lim.max_body);
                    // Memory follows the bytes received, never the length declared.
                    assert!(body.capacity() <= 2 * (body.len() + BODY_STEP as usize));
                    assert!(h.headers.len() <= lim.max_headers);
                    assert!(h.target.starts_with('/') || h.target == "*");
                    served.push((h.target, body));
                }
                Err(e) => {
                    let refused = e.status();
                    assert!(refused.is_none_or(|s| (400..600).contains(&s)), "{e:?}");
                    return Outcome { served, refused };
                }
            }
        }
    }

    #[test]
    fn fuzz_mutated_requests() {
        let lim = Limits {
            max_line: 200,
            max_head: 600,
            max_headers: 12,
            max_body: 300,
        };
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let started = Instant::now();
        let (mut served, mut refused) = (0, 0);
        let mut input = Vec::new();
        for case in 0..100_000 {
            input.clear();
            input.extend_from_slice(SEEDS[rng.below(SEEDS.len())]);
            mutate(&mut rng, &mut input);
            let whole = run_case(&mut Reader::new(&input[..]), &lim);
            if case % 8 == 0 {
                // How the bytes are split across reads must not change which
                // requests are served (the status of a refusal may differ:
                // a line can be seen too long before a bad byte later in it).
                let split = Pieces::split(&input, 1 + rng.below(16));
                let pieces = run_case(&mut Reader::new(split), &lim);
                assert_eq!(whole.served, pieces.served, "{input:?}");
                assert_eq!(
                    whole.refused.is_some(),
                    pieces.refused.is_some(),
                    "{input:?}"
                );
            }
            served += usize::from(!whole.served.is_empty());
            refused += usize::from(whole.refused.is_some());
        }
        let elapsed = started.elapsed();
        eprintln!("fuzz: 100000 cases in {elapsed:?}, {served} served, {refused} refused");
        // The mutator must keep reaching both valid and invalid requests.
        assert!(served > 20_000 && refused > 20_000, "{served} {refused}");
    }

    /// Requests that declare large bodies (within and beyond the limit) and
    /// send little of them.
    const BIG_SEEDS: &[&[u8]] = &[
        b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nContent-Length: 16000000\r\n\r\n{\"input\":",
        b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffff\r\n{\"a\":1}",
        b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999\r\n\r\n{}",
    ];

    #[test]
    fn fuzz_with_the_server_limits() {
        // The server's real limits (8 KiB line, 32 KiB head, 100 headers,
        // 16 MiB body): declared sizes within the body limit are accepted
        // and must cost memory only as bytes arrive.
        let lim = Limits {
            max_line: 8 * 1024,
            max_head: 32 * 1024,
            max_headers: 100,
            max_body: 16 * 1024 * 1024,
        };
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut refused = 0;
        let mut input = Vec::new();
        for _ in 0..20_000 {
            input.clear();
            let all = SEEDS.len() + BIG_SEEDS.len();
            let i = rng.below(all);
            input.extend_from_slice(
                SEEDS
                    .get(i)
                    .copied()
                    .unwrap_or_else(|| BIG_SEEDS[i - SEEDS.len()]),
            );
            mutate(&mut rng, &mut input);
            let outcome = run_case(&mut Reader::new(&input[..]), &lim);
            refused += usize::from(outcome.refused.is_some());
        }
        assert!(refused > 5_000, "{refused}");
    }
}
