//! The floor of the design: the least a proxy built like gaia-balancer (one
//! acceptor thread, a bounded channel, a fixed pool of worker threads that
//! each block on one client connection at a time) can cost. It parses just
//! enough HTTP/1.1 to find where each message ends (Content-Length or
//! chunked), keeps one upstream connection per worker, and does nothing
//! else: no routing, no retries, no checks, no metrics.
//!
//! It answers a question the table otherwise cannot: how much of the gap to
//! nginx is the thread-per-connection design itself (this column), and how
//! much is the work the balancer does per request (the difference between
//! this column and the balancer's). With `Upstream::Ureq` the upstream side
//! is a plain ureq agent instead, with nothing else changed: what the HTTP
//! client alone adds. With `Upstream::Agent` it is the balancer's own agent
//! (`upstream::agent`: ureq over our transport, pool and name cache), so the
//! column is the least any balancer built on the fixed design (blocking ureq
//! to the upstream) can cost; what the balancer costs beyond it is its own
//! routing, retries, metrics and checks. It is a yardstick for the benchmark,
//! never something to deploy: it trusts both sides completely.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;

/// Worker threads, as the balancer gets in the bench.
const WORKERS: usize = 256;
/// Most headers either side may send.
const HEADERS: usize = 64;

/// How the floor talks to the upstream.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// Its own socket per worker, bytes passed through as they are.
    Raw,
    /// One shared ureq agent with its own TCP transport and pool, the answer
    /// written back with its length, or chunked when it is a stream.
    Ureq,
    /// As `Ureq`, with the agent the balancer itself builds (default settings).
    Agent,
}

/// Serve on `listen`, forwarding to `upstream`, until killed.
pub fn serve(listen: SocketAddr, upstream: SocketAddr, how: Upstream) -> Result<(), String> {
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    serve_listener(listener, upstream, how)
}

/// Serve on a bound `listener`, forwarding to `upstream`.
pub fn serve_listener(
    listener: TcpListener,
    upstream: SocketAddr,
    how: Upstream,
) -> Result<(), String> {
    let (tx, rx) = crossbeam_channel::bounded::<TcpStream>(1024);
    let agent: ureq::Agent = match how {
        Upstream::Agent => gaia_balancer::upstream::agent(&gaia_balancer::config::Settings {
            workers: WORKERS,
            ..Default::default()
        }),
        _ => ureq::Agent::config_builder()
            .http_status_as_error(false)
            .no_delay(true)
            .max_idle_connections(WORKERS * 2)
            .max_idle_connections_per_host(WORKERS)
            .build()
            .into(),
    };
    for i in 0..WORKERS {
        let rx = rx.clone();
        let agent = agent.clone();
        thread::Builder::new()
            .name(format!("floor-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut up = None;
                while let Ok(client) = rx.recv() {
                    let served = match how {
                        Upstream::Raw => serve_client(client, upstream, &mut up),
                        Upstream::Ureq | Upstream::Agent => {
                            serve_with_ureq(client, upstream, &agent)
                        }
                    };
                    // A broken upstream connection is made afresh for the next client.
                    if served.is_err() {
                        up = None;
                    }
                }
            })
            .map_err(|e| format!("spawn: {e}"))?;
    }
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if tx.send(conn).is_err() {
            break;
        }
    }
    Ok(())
}

/// Relay requests of one keep-alive client until it closes. `Err` when the
/// upstream connection can no longer be trusted.
fn serve_client(
    mut client: TcpStream,
    upstream: SocketAddr,
    up: &mut Option<TcpStream>,
) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut from_client = Vec::with_capacity(4096);
    let mut from_up = Vec::with_capacity(4096);
    loop {
        let Some(framing) = read_head(&mut client, &mut from_client, true)? else {
            return Ok(()); // the client closed between requests
        };
        let conn = match up {
            Some(c) => c,
            None => {
                let c = TcpStream::connect(upstream)?;
                c.set_nodelay(true)?;
                up.insert(c)
            }
        };
        relay(&mut client, &mut from_client, conn, framing)?;
        let Some(framing) = read_head(conn, &mut from_up, false)? else {
            return Err(io::ErrorKind::UnexpectedEof.into());
        };
        relay(conn, &mut from_up, &mut client, framing)?;
    }
}

/// As [`serve_client`], with a ureq agent on the upstream side: the request
/// rebuilt for ureq, the answer written back with its length, or chunked
/// one upstream read at a time when it is a stream.
fn serve_with_ureq(
    mut client: TcpStream,
    upstream: SocketAddr,
    agent: &ureq::Agent,
) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut from_client = Vec::with_capacity(4096);
    let mut body = vec![0u8; 4096];
    loop {
        let Some(framing) = read_head(&mut client, &mut from_client, true)? else {
            return Ok(());
        };
        let Framing::Length(length) = framing else {
            return Err(io::ErrorKind::InvalidData.into());
        };
        while from_client.len() < head_len(&from_client) + length {
            if fill(&mut client, &mut from_client)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let head = head_len(&from_client);
        let mut headers = [httparse::EMPTY_HEADER; HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        parsed
            .parse(&from_client)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut request = ureq::http::Request::builder()
            .method(parsed.method.unwrap_or("GET"))
            .uri(format!("http://{upstream}{}", parsed.path.unwrap_or("/")));
        for h in parsed.headers.iter() {
            if !h.name.eq_ignore_ascii_case("host")
                && !h.name.eq_ignore_ascii_case("content-length")
            {
                request = request.header(h.name, h.value);
            }
        }
        let request = request
            .body(&from_client[head..head + length])
            .map_err(io::Error::other)?;
        let response = agent.run(request).map_err(io::Error::other)?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        let mut reader = response.into_body().into_reader();
        let mut out = format!("HTTP/1.1 {status} OK\r\ncontent-type: ").into_bytes();
        out.extend_from_slice(&content_type);
        if content_type.starts_with(b"text/event-stream") {
            out.extend_from_slice(b"\r\ntransfer-encoding: chunked\r\n\r\n");
            client.write_all(&out)?;
            loop {
                let n = reader.read(&mut body)?;
                let mut chunk = format!("{n:x}\r\n").into_bytes();
                chunk.extend_from_slice(&body[..n]);
                chunk.extend_from_slice(b"\r\n");
                client.write_all(&chunk)?;
                if n == 0 {
                    break;
                }
            }
        } else {
            let mut whole = Vec::new();
            reader.read_to_end(&mut whole)?;
            out.extend_from_slice(
                format!("\r\ncontent-length: {}\r\n\r\n", whole.len()).as_bytes(),
            );
            out.extend_from_slice(&whole);
            client.write_all(&out)?;
        }
        from_client.drain(..head + length);
    }
}

/// Where the head at the start of `buf` ends (it is known to be whole).
fn head_len(buf: &[u8]) -> usize {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(buf.len(), |p| p + 4)
}

/// How a message's body ends.
#[derive(Clone, Copy)]
enum Framing {
    Length(usize),
    Chunked,
}

/// Read until `buf` holds a whole head; `None` when the peer closed before
/// sending a byte of it.
fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>, request: bool) -> io::Result<Option<Framing>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; HEADERS];
        let parsed = if request {
            httparse::Request::new(&mut headers).parse(buf)
        } else {
            httparse::Response::new(&mut headers).parse(buf)
        };
        match parsed {
            Ok(httparse::Status::Complete(_)) => return Ok(Some(framing(&headers))),
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        if fill(s, buf)? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

fn framing(headers: &[httparse::Header<'_>]) -> Framing {
    let value = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if value("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case(b"chunked")) {
        return Framing::Chunked;
    }
    let length = value("content-length")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse().ok());
    Framing::Length(length.unwrap_or(0))
}

fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut tmp = [0u8; 8192];
    let n = s.read(&mut tmp)?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n)
}

/// Pass on one message whose head is at the start of `buf`: whole when its
/// length is known, one read at a time when chunked. What follows the
/// message stays in `buf`.
fn relay(
    from: &mut TcpStream,
    buf: &mut Vec<u8>,
    to: &mut TcpStream,
    framing: Framing,
) -> io::Result<()> {
    let head_end = head_len(buf);
    match framing {
        Framing::Length(n) => {
            while buf.len() < head_end + n {
                if fill(from, buf)? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            to.write_all(&buf[..head_end + n])?;
            buf.drain(..head_end + n);
        }
        Framing::Chunked => {
            let mut at = head_end; // where the next chunk-size line starts
            loop {
                match chunks_end(buf, at) {
                    Scan::Done(end) => {
                        to.write_all(&buf[..end])?;
                        buf.drain(..end);
                        return Ok(());
                    }
                    Scan::More(next) => {
                        // Pass on whole chunks now, as a streaming proxy must.
                        to.write_all(&buf[..next])?;
                        buf.drain(..next);
                        at = 0;
                    }
                }
                if fill(from, buf)? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }
    Ok(())
}

enum Scan {
    /// The message ends at this offset.
    Done(usize),
    /// Every chunk before this offset is whole; more is needed.
    More(usize),
}

/// Walk the chunks of `buf` from `at` (no trailers, as the fake upstream sends).
fn chunks_end(buf: &[u8], mut at: usize) -> Scan {
    loop {
        let Some(line) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return Scan::More(at);
        };
        let size = std::str::from_utf8(&buf[at..at + line])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok());
        let Some(size) = size else {
            return Scan::More(at);
        };
        let end = at + line + 2 + size + 2;
        if buf.len() < end {
            return Scan::More(at);
        }
        if size == 0 {
            return Scan::Done(end);
        }
        at = end;
    }
}
