//! Writing HTTP/1.1 responses to a client socket.
//!
//! Guarantees: every header value we emit is checked for CR, LF and other
//! control bytes (an upstream can never inject a header or split a response);
//! bodies go out either with a Content-Length or as chunks, each chunk written
//! in one `write` and sent at once (the socket has `TCP_NODELAY`, and nothing
//! here buffers across chunks). Errors are OpenAI-shaped JSON.

use std::io::{self, Write};

/// One response header; values from upstreams must pass [`valid_value`].
pub type HeaderPair<'a> = (&'a str, &'a str);

/// True when `value` may be sent as a header value: visible ASCII, space, tab.
pub fn valid_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// Reason phrase for the statuses we send ourselves.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// OpenAI `error.type` for a status we produce.
fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 | 504 => "timeout_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        400 | 405 | 414 | 417 | 422 | 431 | 501 | 505 => "invalid_request_error",
        _ => "upstream_error",
    }
}

/// The OpenAI-shaped JSON body for an error we produce.
pub fn error_body(status: u16, code: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "error": { "message": message, "type": error_type(status), "code": code }
    });
    let mut out = body.to_string().into_bytes();
    out.push(b'\n');
    out
}

/// Append `n` in decimal, as `write!("{n}")` would (without the formatting
/// machinery, which cost more than the rest of a response head).
fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
}

/// Append `n` in lowercase hex, as `write!("{n:x}")` would.
fn push_hex(buf: &mut Vec<u8>, mut n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = HEX[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
}

fn push_header(buf: &mut Vec<u8>, name: &str, value: &str) {
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(value.as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// Largest buffer [`Responder::into_scratch`] gives back: heads and small
/// bodies fit; a large body's buffer is freed rather than held by an idle
/// connection.
const SCRATCH_KEPT: usize = 8 * 1024;

/// A connection's buffers for its next response (see [`Responder::with_scratch`]).
#[derive(Debug, Default)]
pub struct Scratch {
    buf: Vec<u8>,
    extra: Vec<u8>,
}

/// Response writer for one request on one connection.
pub struct Responder<'a, W: Write> {
    out: &'a mut W,
    /// Whether the connection stays open after this response.
    keep_alive: bool,
    /// HEAD request: send the head only.
    head_only: bool,
    /// HTTP/1.0 client: no chunked coding; the body ends at close.
    http10: bool,
    state: State,
    /// Scratch buffer reused for heads and chunk framing.
    buf: Vec<u8>,
    /// Header lines added to every response (e.g. X-Request-Id), ready to send.
    extra: Vec<u8>,
    status: u16,
    bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Fresh,
    Chunked,
    UntilClose,
    Done,
}

/// A status whose response never has a body.
fn bodiless(status: u16) -> bool {
    matches!(status, 100..=199 | 204 | 304)
}

impl<'a, W: Write> Responder<'a, W> {
    /// A writer for one response.
    pub fn new(out: &'a mut W, keep_alive: bool, head_only: bool, http10: bool) -> Self {
        Self::with_scratch(out, keep_alive, head_only, http10, Scratch::default())
    }

    /// [`Responder::new`], writing with the buffers of the connection's
    /// last response instead of allocating its own.
    pub fn with_scratch(
        out: &'a mut W,
        keep_alive: bool,
        head_only: bool,
        http10: bool,
        scratch: Scratch,
    ) -> Self {
        let Scratch { mut buf, mut extra } = scratch;
        buf.clear();
        extra.clear();
        buf.reserve(512);
        Responder {
            out,
            keep_alive,
            head_only,
            http10,
            state: State::Fresh,
            buf,
            extra,
            status: 0,
            bytes: 0,
        }
    }

    /// The buffers, for the connection's next response (unless they grew
    /// large).
    pub fn into_scratch(self) -> Scratch {
        let small = |b: Vec<u8>| {
            if b.capacity() <= SCRATCH_KEPT {
                b
            } else {
                Vec::new()
            }
        };
        Scratch {
            buf: small(self.buf),
            extra: small(self.extra),
        }
    }

    /// Add a header to whatever response is sent (names and values are checked).
    pub fn add_header(&mut self, name: &str, value: &str) {
        if valid_value(value.as_bytes()) && valid_value(name.as_bytes()) {
            if self.extra.is_empty() {
                self.extra.reserve(256);
            }
            push_header(&mut self.extra, name, value);
        }
    }

    /// Make the connection close after this response.
    pub fn close_after(&mut self) {
        self.keep_alive = false;
    }

    /// Whether the connection can be reused after this response.
    pub fn keep_alive(&self) -> bool {
        self.keep_alive && self.state == State::Done
    }

    /// True once a status line has been written.
    pub fn started(&self) -> bool {
        self.state != State::Fresh
    }

    /// The status sent, 0 before any.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Body bytes written so far.
    pub fn body_bytes(&self) -> u64 {
        self.bytes
    }

    fn head(&mut self, status: u16, headers: &[HeaderPair<'_>], length: Option<usize>) {
        self.status = status;
        self.buf.clear();
        self.buf.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(&mut self.buf, status.into());
        self.buf.push(b' ');
        self.buf.extend_from_slice(reason(status).as_bytes());
        self.buf.extend_from_slice(b"\r\n");
        for &(name, value) in headers {
            if valid_value(value.as_bytes()) && valid_value(name.as_bytes()) {
                push_header(&mut self.buf, name, value);
            }
        }
        self.buf.extend_from_slice(&self.extra);
        match length {
            // No body, and no length either (RFC 9110 8.6: a 204 must not
            // carry one; a 304's would describe a body it does not have).
            _ if bodiless(status) => {}
            Some(n) => {
                self.buf.extend_from_slice(b"Content-Length: ");
                push_decimal(&mut self.buf, n as u64);
                self.buf.extend_from_slice(b"\r\n");
            }
            None if !self.http10 => self
                .buf
                .extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
            None => self.keep_alive = false,
        }
        if !self.keep_alive {
            self.buf.extend_from_slice(b"Connection: close\r\n");
        } else if self.http10 {
            self.buf.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        self.buf.extend_from_slice(b"\r\n");
    }

    /// Tell a client that sent `Expect: 100-continue` to go on with its body.
    pub fn continue_100(&mut self) -> io::Result<()> {
        self.out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        self.out.flush()
    }

    /// Send a whole response with a Content-Length body, in one write.
    pub fn send(&mut self, status: u16, headers: &[HeaderPair<'_>], body: &[u8]) -> io::Result<()> {
        if self.state != State::Fresh {
            return Err(io::Error::other("response already started"));
        }
        self.head(status, headers, Some(body.len()));
        if !self.head_only && !bodiless(status) {
            self.buf.extend_from_slice(body);
            self.bytes += body.len() as u64;
        }
        self.state = State::Done;
        self.out.write_all(&self.buf)?;
        self.out.flush()
    }

    /// True when answering a HEAD request (no body is ever written).
    pub fn head_only(&self) -> bool {
        self.head_only
    }

    /// Send an OpenAI-shaped error.
    pub fn send_error(&mut self, status: u16, code: &str, message: &str) -> io::Result<()> {
        let body = error_body(status, code, message);
        self.send(status, &[("Content-Type", "application/json")], &body)
    }

    /// Send the head of a response whose body follows in [`Self::chunk`] calls.
    pub fn start_stream(&mut self, status: u16, headers: &[HeaderPair<'_>]) -> io::Result<()> {
        if self.state != State::Fresh {
            return Err(io::Error::other("response already started"));
        }
        self.head(status, headers, None);
        self.state = if self.head_only {
            State::Done
        } else if self.http10 {
            State::UntilClose
        } else {
            State::Chunked
        };
        self.out.write_all(&self.buf)?;
        self.out.flush()
    }

    /// Send the head of a body of `length` bytes that follows in
    /// [`Self::chunk`] calls, written as they come (no chunked coding). For
    /// an HTTP/1.0 client a close-delimited body that is cut short looks
    /// complete; with its length declared, a cut shows. The connection
    /// closes after it. Answering HEAD, this is the whole response: the
    /// length the GET's body would have (as the upstream said), not 0.
    pub fn start_sized(
        &mut self,
        status: u16,
        headers: &[HeaderPair<'_>],
        length: u64,
    ) -> io::Result<()> {
        if self.state != State::Fresh {
            return Err(io::Error::other("response already started"));
        }
        let length = usize::try_from(length).map_err(io::Error::other)?;
        self.keep_alive &= self.head_only;
        self.head(status, headers, Some(length));
        self.state = if self.head_only {
            State::Done
        } else {
            State::UntilClose
        };
        self.out.write_all(&self.buf)?;
        self.out.flush()
    }

    /// The bytes [`Self::start_stream`] would send, for someone else to send
    /// (the watch commits slow streams early); see [`Self::adopt_stream`].
    pub fn stream_head(&mut self, status: u16, headers: &[HeaderPair<'_>]) -> Vec<u8> {
        self.head(status, headers, None);
        std::mem::take(&mut self.buf)
    }

    /// Whether a streamed body uses chunked coding (not for HTTP/1.0).
    pub fn chunked(&self) -> bool {
        !self.http10
    }

    /// Take over a stream whose head [`Self::stream_head`] produced and
    /// someone else already sent.
    pub fn adopt_stream(&mut self, status: u16) {
        if self.state == State::Fresh {
            self.status = status;
            self.state = if self.head_only {
                State::Done
            } else if self.http10 {
                self.keep_alive = false;
                State::UntilClose
            } else {
                State::Chunked
            };
        }
    }

    /// Write one body chunk and send it at once.
    pub fn chunk(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        match self.state {
            State::Chunked => {
                self.buf.clear();
                push_hex(&mut self.buf, data.len() as u64);
                self.buf.extend_from_slice(b"\r\n");
                self.buf.extend_from_slice(data);
                self.buf.extend_from_slice(b"\r\n");
                self.out.write_all(&self.buf)?;
            }
            State::UntilClose => self.out.write_all(data)?,
            State::Done => return Ok(()),
            State::Fresh => return Err(io::Error::other("stream not started")),
        }
        self.bytes += data.len() as u64;
        self.out.flush()
    }

    /// End a streamed body cleanly.
    pub fn finish(&mut self) -> io::Result<()> {
        let was = self.state;
        self.state = State::Done;
        match was {
            State::Chunked => {
                self.out.write_all(b"0\r\n\r\n")?;
                self.out.flush()
            }
            State::UntilClose => {
                self.keep_alive = false;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Abandon a streamed body: the connection must close without the final chunk,
    /// so the client sees a truncated transfer rather than a complete one.
    pub fn abort(&mut self) {
        self.keep_alive = false;
        self.state = State::Done;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_as_format_writes_them() {
        for n in [
            0,
            1,
            9,
            10,
            15,
            16,
            99,
            100,
            200,
            255,
            4096,
            65535,
            u64::MAX,
        ] {
            let (mut dec, mut hex) = (Vec::new(), Vec::new());
            push_decimal(&mut dec, n);
            push_hex(&mut hex, n);
            assert_eq!(dec, format!("{n}").into_bytes());
            assert_eq!(hex, format!("{n:x}").into_bytes());
        }
    }

    #[test]
    fn a_response_written_with_scratch_carries_nothing_of_the_last() {
        let mut wire = Vec::new();
        let mut out = Responder::new(&mut wire, true, false, false);
        out.add_header("X-Request-Id", "first");
        out.send(404, &[("Content-Type", "text/plain")], &[b'x'; 100])
            .unwrap();
        let scratch = out.into_scratch();
        let mut wire = Vec::new();
        let mut out = Responder::with_scratch(&mut wire, true, false, false, scratch);
        out.add_header("X-Request-Id", "second");
        out.send(200, &[], b"ok").unwrap();
        assert_eq!(
            wire,
            b"HTTP/1.1 200 OK\r\nX-Request-Id: second\r\nContent-Length: 2\r\n\r\nok"
        );
        // A large body's buffer is not kept.
        let mut out = Responder::new(&mut wire, true, false, false);
        out.send(200, &[], &vec![b'x'; 2 * SCRATCH_KEPT]).unwrap();
        assert_eq!(out.into_scratch().buf.capacity(), 0);
    }

    #[test]
    fn head_and_chunks_are_framed_as_before() {
        let mut wire = Vec::new();
        let mut out = Responder::new(&mut wire, true, false, false);
        out.add_header("X-Request-Id", "abc");
        out.send(200, &[("Content-Type", "application/json")], b"{}")
            .unwrap();
        assert_eq!(
            wire,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: abc\r\n\
              Content-Length: 2\r\n\r\n{}"
        );
        let mut wire = Vec::new();
        let mut out = Responder::new(&mut wire, false, false, false);
        out.start_stream(299, &[]).unwrap();
        out.chunk(&[b'x'; 26]).unwrap();
        out.finish().unwrap();
        let mut want =
            b"HTTP/1.1 299 \r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n1a\r\n"
                .to_vec();
        want.extend_from_slice(&[b'x'; 26]);
        want.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(wire, want);
    }
}
