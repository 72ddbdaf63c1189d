//! The health lane: `/healthz` and `/readyz` answered while every worker is busy.
//!
//! With every worker held by long streams, a new connection waits in the
//! queue (up to `queueWaitMs`) and is then refused with 503. A liveness probe
//! that waits or gets 503 makes an orchestrator restart a balancer that is
//! doing its job, cutting every stream it carries. So while the pool is
//! saturated the acceptor passes new connections through this lane first:
//! one thread that looks at the first bytes of each (a peek, which consumes
//! nothing), answers a complete `GET` or `HEAD` of `/healthz` or `/readyz`
//! itself and closes, and queues every other connection as the acceptor
//! would have, with its accept time unchanged.
//!
//! Guarantees: the lane never blocks on a client (sockets are non-blocking
//! while they are here, and the answer's write has a short timeout); a
//! connection spends at most [`LOOK_LIMIT`] here (plus a tick); the lane
//! looks at most at [`LANE_CAP`] connections, and a new one displaces the
//! one that has waited longest, which gets a last look (a health check is
//! still answered) and goes on to the queue, so a flood of silent
//! connections cannot keep a health check out; at most [`LANE_CHANNEL`]
//! more wait in its channel, and when the lane falls that far behind the
//! acceptor moves the oldest of those on to the queue; a panic while
//! answering ends that answer, not the lane.

use std::io::{self, Read};
use std::net::TcpStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::metrics;
use crate::request::{self, Framing};
use crate::response::Responder;
use crate::routes;
use crate::server::{self, Conn};
use crate::state::Shared;

/// Connections the lane looks at at once.
pub const LANE_CAP: usize = 32;
/// Connections that may wait in the lane's channel; when it is full the
/// acceptor moves the one that has waited longest on to the queue.
pub const LANE_CHANNEL: usize = 128;
/// Longest a connection waits here for enough bytes to tell what it asks.
pub const LOOK_LIMIT: Duration = Duration::from_millis(100);
/// How often connections without a verdict are looked at again.
const TICK: Duration = Duration::from_millis(5);
/// Bytes peeked; a health check's head is far smaller.
const PEEK_BYTES: usize = 1024;
/// Longest the lane spends writing one answer.
const WRITE_LIMIT: Duration = Duration::from_millis(100);

/// A health check found in a connection's first bytes.
#[derive(Debug, PartialEq, Eq)]
struct Check {
    /// Length of its head, consumed before answering.
    len: usize,
    route: metrics::Route,
    head_only: bool,
    http10: bool,
    /// The client's `X-Request-Id`, if any.
    id: Option<String>,
}

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
enum Look {
    /// Too few bytes yet to tell.
    Wait,
    /// A complete health check, for a worker-free answer.
    Health(Check),
    /// Anything else: a worker's job.
    Queue,
    /// Closed or broken before it asked anything.
    Drop,
}

/// Run the lane until the acceptor hangs up; then queue what is left and return.
pub(crate) fn run(rx: &Receiver<Conn>, queue: &Sender<Conn>, shared: &Arc<Shared>) {
    let mut pending: Vec<Conn> = Vec::new();
    let mut buf = [0u8; PEEK_BYTES];
    loop {
        let received = if pending.is_empty() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(TICK)
        };
        match received {
            Ok(conn) => admit(shared, queue, &mut pending, conn),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                for conn in pending.drain(..) {
                    forward(shared, queue, conn);
                }
                return;
            }
        }
        // Whatever else arrived meanwhile: a burst costs one pass of peeks.
        for _ in 0..LANE_CHANNEL {
            let Ok(conn) = rx.try_recv() else { break };
            admit(shared, queue, &mut pending, conn);
        }
        let mut i = 0;
        while i < pending.len() {
            match look(&pending[i].stream, &mut buf) {
                Look::Wait if pending[i].accepted.elapsed() < LOOK_LIMIT => i += 1,
                seen => settle(shared, queue, pending.swap_remove(i), seen),
            }
        }
    }
}

/// Take `conn` in to be looked at. When the lane is full, the connection
/// that has waited longest leaves first, after a last look (a health check
/// is still answered), so connections that send nothing cannot keep a
/// health check out of the lane.
fn admit(shared: &Shared, queue: &Sender<Conn>, pending: &mut Vec<Conn>, conn: Conn) {
    if conn.stream.set_nonblocking(true).is_err() {
        server::enqueue(shared, queue, conn);
        return;
    }
    if pending.len() >= LANE_CAP {
        let oldest = (0..pending.len()).min_by_key(|&i| pending[i].accepted);
        if let Some(i) = oldest {
            let conn = pending.swap_remove(i);
            let mut buf = [0u8; PEEK_BYTES];
            let seen = look(&conn.stream, &mut buf);
            settle(shared, queue, conn, seen);
        }
    }
    pending.push(conn);
}

/// Let `conn` leave the lane as `seen` says: answered, dropped, or queued
/// (also when it is still too early to tell).
fn settle(shared: &Shared, queue: &Sender<Conn>, conn: Conn, seen: Look) {
    match seen {
        Look::Health(check) => answer(shared, conn, check),
        Look::Drop => drop(conn),
        Look::Wait | Look::Queue => forward(shared, queue, conn),
    }
}

/// Back to blocking, and into the worker queue (or shed when it is full).
fn forward(shared: &Shared, queue: &Sender<Conn>, conn: Conn) {
    // A worker must get a blocking socket: its reads would fail at once otherwise.
    if let Err(e) = conn.stream.set_nonblocking(false) {
        log::warn!("health lane: dropping a connection that cannot block again: {e}");
        return;
    }
    server::enqueue(shared, queue, conn);
}

fn look(stream: &TcpStream, buf: &mut [u8]) -> Look {
    match stream.peek(buf) {
        Ok(0) => Look::Drop,
        Ok(n) => classify(&buf[..n], n == buf.len()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Look::Wait
        }
        Err(_) => Look::Drop,
    }
}

/// The request lines the lane answers.
const HEALTH_LINES: [&[u8]; 4] = [
    b"GET /healthz",
    b"GET /readyz",
    b"HEAD /healthz",
    b"HEAD /readyz",
];

/// Decide from the bytes seen so far; `full` when no more fit in the peek.
fn classify(bytes: &[u8], full: bool) -> Look {
    let maybe = HEALTH_LINES
        .iter()
        .any(|line| line.starts_with(bytes) || bytes.starts_with(line));
    if !maybe {
        return Look::Queue;
    }
    // The worker's own parser, so that nothing a worker refuses (a missing
    // or repeated Host, duplicate Content-Length, bare LF, ...) gets 200 here.
    let limits = server::head_limits(u64::MAX);
    let (head, len) = match request::parse_prefix(bytes, &limits) {
        Ok(Some(parsed)) => parsed,
        Ok(None) if !full => return Look::Wait,
        // Too long for the peek, or refused: the worker says why.
        _ => return Look::Queue,
    };
    if len < bytes.len() {
        // Pipelined requests behind it: a worker serves the whole connection.
        return Look::Queue;
    }
    let route = match routes::path_of(&head.target) {
        "/healthz" => metrics::Route::Healthz,
        "/readyz" => metrics::Route::Readyz,
        _ => return Look::Queue,
    };
    // A body (or anything unusual about framing) is the worker's to refuse.
    if !matches!(head.framing, Framing::None | Framing::Length(0)) {
        return Look::Queue;
    }
    let id = head.header_str("x-request-id").map(str::to_string);
    Look::Health(Check {
        len,
        route,
        head_only: head.method == "HEAD",
        http10: head.minor_version == 0,
        id,
    })
}

/// Answer a health check; a panic ends that answer, never the lane.
fn answer(shared: &Shared, conn: Conn, check: Check) {
    let answered = catch_unwind(AssertUnwindSafe(|| reply(shared, conn.stream, check)));
    if answered.is_err() {
        log::error!("health lane: panic while answering a health check");
    }
}

/// Consume the head (its bytes are there already), answer it, and close.
fn reply(shared: &Shared, mut stream: TcpStream, check: Check) {
    let Check {
        len,
        route,
        head_only,
        http10,
        id,
    } = check;
    let started = Instant::now();
    let mut head = [0u8; PEEK_BYTES];
    let Some(head) = head.get_mut(..len) else {
        return;
    };
    if stream.read_exact(head).is_err()
        || stream.set_nonblocking(false).is_err()
        || stream.set_write_timeout(Some(WRITE_LIMIT)).is_err()
    {
        return;
    }
    metrics::begin_request();
    let b = shared.current();
    let (status, body) = routes::health(shared, &b, route == metrics::Route::Readyz);
    let id = server::request_id(id.as_deref());
    let mut out = Responder::new(&mut stream, false, head_only, http10);
    out.add_header("X-Request-Id", &id);
    let text = [("Content-Type", "text/plain; charset=utf-8")];
    let _ = out.send(status, &text, body.as_bytes());
    shared.metrics.request(route, status, started, false, false);
    log::info!(
        "{id} {} {} {status} host=- attempts=0 {}ms (health lane: every worker busy)",
        if head_only { "HEAD" } else { "GET" },
        if route == metrics::Route::Readyz {
            "/readyz"
        } else {
            "/healthz"
        },
        started.elapsed().as_millis()
    );
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_bodiless_health_checks_are_answered_here() {
        let text = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let health = classify(text, false);
        assert!(
            matches!(health, Look::Health(Check { len, route: metrics::Route::Healthz, head_only: false, http10: false, id: None }) if len == text.len()),
            "{health:?}"
        );
        let ready = classify(
            b"HEAD /readyz?x=1 HTTP/1.0\r\nX-Request-Id: r1\r\n\r\n",
            false,
        );
        assert!(
            matches!(&ready, Look::Health(Check { route: metrics::Route::Readyz, head_only: true, http10: true, id: Some(id), .. }) if id == "r1"),
            "{ready:?}"
        );
        for waiting in [
            &b"G"[..],
            b"GET /heal",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        ] {
            assert_eq!(classify(waiting, false), Look::Wait, "{waiting:?}");
        }
        for queued in [
            &b"POST /v1/chat/completions HTTP/1.1\r\n\r\n"[..],
            b"GET /healthzz HTTP/1.1\r\n\r\n",
            b"GET /status HTTP/1.1\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n",
            b"\x16\x03\x01",
        ] {
            assert_eq!(classify(queued, false), Look::Queue, "{queued:?}");
        }
        // So does a connection with a request pipelined behind the check.
        let pipelined = b"GET /healthz HTTP/1.1\r\n\r\nGET /v1/models HTTP/1.1\r\n\r\n";
        assert_eq!(classify(pipelined, false), Look::Queue);
        // So does anything a worker would refuse.
        for refused in [
            &b"GET /healthz HTTP/1.1\r\n\r\n"[..],
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET /readyz HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            b"GET /healthz HTTP/1.1\nHost: a\n\n",
            b"GET /healthz#x HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(classify(refused, false), Look::Queue, "{refused:?}");
        }
        // A head that does not fit the peek goes to a worker.
        assert_eq!(
            classify(b"GET /healthz HTTP/1.1\r\nA: b", true),
            Look::Queue
        );
    }
}
