//! The proxied request: attempts over the candidate hosts until one produces
//! real output, then the commit and the forwarding of the body.
//!
//! Guarantees: nothing reaches the client before the commit point (a whole
//! JSON body, or the first SSE event with output), so every failure before it
//! fails over invisibly; nothing after it is retried. A stream that fails
//! after the commit ends with an SSE `error` event and no `[DONE]`; a
//! non-SSE body that fails after the commit is cut off without its final
//! chunk. Either way a cut-off answer never looks complete. Attempts are
//! bounded by `maxAttempts` and `timeouts.totalMs`.

use std::io::Read;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::http::Response;
use ureq::Body;

use crate::hosts::Host;
use crate::keys::Key;
use crate::response::{valid_value, Responder};
use crate::retry::{self, Outcome};
use crate::state::Balancer;
use crate::streaming::{Preamble, Verdict};
use crate::upstream::{self, AttemptError, Failed, Outgoing};
use crate::watch;

/// Largest non-streamed body held back before it is committed anyway.
pub const JSON_HOLD_LIMIT: usize = 8 * 1024 * 1024;
/// Largest error body read from an upstream we are about to retry.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Size of one read from an upstream body.
const READ_SIZE: usize = 16 * 1024;

/// How a proxied request ended, for the log line.
#[derive(Debug, Default)]
pub struct Served {
    /// Name of the host that served, if one did.
    pub host: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The trail of attempts, as in `x-gaia-attempts`.
    pub trail: String,
    /// The client left before the end.
    pub client_gone: bool,
}

/// A client request ready to go upstream.
pub struct Proxied<'a> {
    /// What goes upstream.
    pub outgoing: Outgoing<'a>,
    /// The client socket, watched for departure during upstream waits.
    pub client: &'a TcpStream,
    /// When the request head was complete.
    pub started: Instant,
}

/// Trail of attempts, e.g. `asia:429,llama3b:200`.
#[derive(Default)]
struct Trail(String);

impl Trail {
    fn push(&mut self, host: &Host, key: Option<&Key>, what: &str) {
        if !self.0.is_empty() {
            self.0.push(',');
        }
        self.0.push_str(&host.spec.name);
        if let Some(k) = key {
            self.0.push('[');
            self.0.push_str(k.masked());
            self.0.push(']');
        }
        self.0.push(':');
        self.0.push_str(what);
    }
}

fn outcome_label(o: Outcome) -> String {
    match o {
        Outcome::Connect => "connect".into(),
        Outcome::Timeout => "timeout".into(),
        Outcome::Status(s) => s.to_string(),
        Outcome::Broken => "broken".into(),
    }
}

/// Why the attempt loop stopped without a committed answer.
enum Stop {
    ClientGone,
    Invalid(String),
}

/// Serve one proxied request; every response (success or error) is written to `out`.
pub fn serve(b: &Balancer, req: &Proxied<'_>, out: &mut Responder<'_, TcpStream>) -> Served {
    let _watch = watch::start(req.client.try_clone().ok());
    let mut served = Served::default();
    let mut trail = Trail::default();
    let result = attempts(b, req, out, &mut served, &mut trail);
    served.trail = trail.0;
    match result {
        Ok(()) => {}
        Err(Stop::ClientGone) => served.client_gone = true,
        Err(Stop::Invalid(msg)) => {
            let _ = out.send_error(400, "invalid_request", &msg);
        }
    }
    served
}

fn attempts(
    b: &Balancer,
    req: &Proxied<'_>,
    out: &mut Responder<'_, TcpStream>,
    served: &mut Served,
    trail: &mut Trail,
) -> Result<(), Stop> {
    let settings = &b.config.settings;
    let deadline = req.started + settings.timeouts.total;
    let mut tried_hosts: Vec<usize> = Vec::new();
    let mut avoid_keys: Vec<Arc<Key>> = Vec::new();
    let mut last: Option<Failed> = None;
    let mut candidates = b.hosts.candidates();
    while served.attempts < settings.max_attempts {
        let Some(host) = candidates.next() else {
            break;
        };
        let repeat = tried_hosts.contains(&host.index);
        // Waiting only helps a host that failed itself; a new key needs no pause.
        let host_failed = last
            .as_ref()
            .is_some_and(|f| retry::decide(f.outcome).host_failure);
        if repeat && host_failed {
            let floor = settings.timeouts.connect.min(Duration::from_secs(1));
            pause(retry::backoff(served.attempts, floor), deadline)?;
        }
        if !repeat {
            tried_hosts.push(host.index);
        }
        if Instant::now() >= deadline {
            return finish_timeout(out, trail, last.as_ref());
        }
        served.attempts += 1;
        let key = host.keys.next(&avoid_keys);
        let failure = match attempt(b, req, &host, key.as_deref(), deadline, out, trail) {
            Ok(()) => {
                served.host = Some(host.spec.name.clone());
                return Ok(());
            }
            Err(AttemptError::ClientGone) => return Err(Stop::ClientGone),
            Err(AttemptError::Invalid(msg)) => return Err(Stop::Invalid(msg)),
            Err(AttemptError::Failed(f)) => f,
        };
        trail.push(&host, key.as_deref(), &outcome_label(failure.outcome));
        let decision = retry::decide(failure.outcome);
        if decision.host_failure {
            host.failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if decision.key != retry::KeyFault::None {
            if let Some(k) = key {
                avoid_keys.push(k);
            }
        }
        log::debug!("attempt {} failed: {}", served.attempts, failure.detail);
        last = Some(failure);
        if Instant::now() >= deadline {
            return finish_timeout(out, trail, last.as_ref());
        }
    }
    let detail = last.map_or_else(|| "no upstream host".to_string(), |f| f.detail);
    let msg = format!("all {} attempts failed; last: {detail}", served.attempts);
    send_proxy_error(out, trail, 502, "upstream_failed", &msg)
}

fn finish_timeout(
    out: &mut Responder<'_, TcpStream>,
    trail: &Trail,
    last: Option<&Failed>,
) -> Result<(), Stop> {
    let detail = last.map_or("", |f| f.detail.as_str());
    let msg = format!("timeouts.totalMs ran out before an upstream answered; last: {detail}");
    send_proxy_error(out, trail, 504, "timeout", &msg)
}

fn send_proxy_error(
    out: &mut Responder<'_, TcpStream>,
    trail: &Trail,
    status: u16,
    code: &str,
    msg: &str,
) -> Result<(), Stop> {
    out.add_header("x-gaia-attempts", &trail.0);
    // The balancer already retried: SDKs should not multiply that.
    out.add_header("x-should-retry", "false");
    let _ = out.send_error(status, code, msg);
    Ok(())
}

/// Sleep before retrying the same host, without outliving the client or the deadline.
fn pause(d: Duration, deadline: Instant) -> Result<(), Stop> {
    let until = (Instant::now() + d).min(deadline);
    loop {
        if watch::client_gone() {
            return Err(Stop::ClientGone);
        }
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        std::thread::sleep((until - now).min(watch::TICK));
    }
}

fn attempt(
    b: &Balancer,
    req: &Proxied<'_>,
    host: &Arc<Host>,
    key: Option<&Key>,
    deadline: Instant,
    out: &mut Responder<'_, TcpStream>,
    trail: &mut Trail,
) -> Result<(), AttemptError> {
    let t = &b.config.settings.timeouts;
    let _busy = host.busy();
    let first_output = (Instant::now() + t.first_byte).min(deadline);
    watch::set_deadline(Some(first_output));
    let response = upstream::send(&b.agent, host, key, &req.outgoing)?;
    let status = response.status().as_u16();
    let decision = retry::decide(Outcome::Status(status));
    if decision.retry {
        // Read a little of the error so the connection can go back to the pool.
        watch::set_deadline(Some((Instant::now() + t.idle).min(deadline)));
        let mut body = response.into_body().into_reader();
        let _ = read_bounded(&mut body, ERROR_BODY_LIMIT);
        return Err(AttemptError::Failed(Failed {
            outcome: Outcome::Status(status),
            detail: format!("{}: status {status}", host.spec.name),
        }));
    }
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.as_bytes())
        .filter(|v| valid_value(v))
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("")
        .to_string();
    let is_sse = (200..300).contains(&status)
        && content_type
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("text/event-stream");
    let ctx = Commit {
        host,
        key,
        status,
        content_type: &content_type,
        idle: t.idle,
        deadline: first_output,
        total: deadline,
    };
    if is_sse {
        forward_stream(ctx, response, out, trail)
    } else {
        forward_whole(ctx, response, out, trail)
    }
}

/// What the commit needs to know about the winning attempt.
struct Commit<'a> {
    host: &'a Host,
    key: Option<&'a Key>,
    status: u16,
    content_type: &'a str,
    idle: Duration,
    /// Until the commit: the first-output deadline (never past the total).
    deadline: Instant,
    /// The whole request's deadline, which ends at the commit.
    total: Instant,
}

impl Commit<'_> {
    fn headers(&self, trail: &mut Trail, sse: bool, out: &mut Responder<'_, TcpStream>) {
        trail.push(self.host, self.key, &self.status.to_string());
        out.add_header("x-gaia-upstream", &self.host.spec.name);
        out.add_header("x-gaia-attempts", &trail.0);
        if sse {
            out.add_header("Cache-Control", "no-cache");
            out.add_header("X-Accel-Buffering", "no");
        }
    }

    fn content_type_header(&self) -> Vec<(&str, &str)> {
        if self.content_type.is_empty() {
            Vec::new()
        } else {
            vec![("Content-Type", self.content_type)]
        }
    }
}

/// Read up to `limit` bytes; `Ok(true)` when the body ended within it.
fn read_bounded(reader: &mut impl Read, limit: usize) -> std::io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; READ_SIZE];
    while buf.len() < limit {
        let n = reader.read(&mut chunk)?;
        if n == 0 {
            return Ok((buf, true));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((buf, false))
}

/// A non-SSE body: held back whole (up to [`JSON_HOLD_LIMIT`]) then sent.
fn forward_whole(
    ctx: Commit<'_>,
    response: Response<Body>,
    out: &mut Responder<'_, TcpStream>,
    trail: &mut Trail,
) -> Result<(), AttemptError> {
    let mut reader = response.into_body().into_reader();
    let mut held = Vec::new();
    let mut chunk = vec![0u8; READ_SIZE];
    loop {
        watch::set_deadline(Some((Instant::now() + ctx.idle).min(ctx.total)));
        let n = reader
            .read(&mut chunk)
            .map_err(|e| upstream::classify_read(e, ctx.host))?;
        if n == 0 {
            ctx.headers(trail, false, out);
            let _ = out.send(ctx.status, &ctx.content_type_header(), &held);
            return Ok(());
        }
        held.extend_from_slice(&chunk[..n]);
        if held.len() >= JSON_HOLD_LIMIT {
            break;
        }
    }
    // Too large to hold: commit now and pass the rest through.
    ctx.headers(trail, false, out);
    if out
        .start_stream(ctx.status, &ctx.content_type_header())
        .is_err()
        || out.chunk(&held).is_err()
    {
        return Err(AttemptError::ClientGone);
    }
    drop(held);
    pump(
        &mut reader,
        &mut chunk,
        ctx.idle,
        out,
        ctx.host,
        |out, _| out.abort(),
    )
}

/// An SSE body: preamble held back until the first event with output.
fn forward_stream(
    ctx: Commit<'_>,
    response: Response<Body>,
    out: &mut Responder<'_, TcpStream>,
    trail: &mut Trail,
) -> Result<(), AttemptError> {
    let mut reader = response.into_body().into_reader();
    let mut preamble = Preamble::default();
    let mut chunk = vec![0u8; READ_SIZE];
    watch::set_deadline(Some(ctx.deadline));
    loop {
        let n = reader
            .read(&mut chunk)
            .map_err(|e| upstream::classify_read(e, ctx.host))?;
        if n == 0 {
            return Err(AttemptError::Failed(Failed {
                outcome: Outcome::Broken,
                detail: format!("{}: stream ended before any output", ctx.host.spec.name),
            }));
        }
        match preamble.push(&chunk[..n]) {
            Verdict::Hold => continue,
            Verdict::Error(msg) => {
                return Err(AttemptError::Failed(Failed {
                    outcome: Outcome::Broken,
                    detail: format!("{}: error event before output: {msg}", ctx.host.spec.name),
                }))
            }
            Verdict::Commit => break,
        }
    }
    ctx.headers(trail, true, out);
    if out
        .start_stream(ctx.status, &ctx.content_type_header())
        .is_err()
        || out.chunk(&preamble.take()).is_err()
    {
        return Err(AttemptError::ClientGone);
    }
    let name = ctx.host.spec.name.clone();
    pump(
        &mut reader,
        &mut chunk,
        ctx.idle,
        out,
        ctx.host,
        move |out, why| {
            let event = stream_error_event(&name, why);
            let _ = out.chunk(&event);
            let _ = out.finish();
            out.close_after();
        },
    )
}

/// The SSE event that ends a stream cut off after the commit (no `[DONE]` follows).
fn stream_error_event(host: &str, why: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "error": {
            "message": format!("upstream {host} failed mid-stream: {why}; the answer is incomplete"),
            "type": "upstream_error",
            "code": "stream_interrupted",
        }
    });
    format!("data: {body}\n\n").into_bytes()
}

/// After the commit: copy every upstream chunk to the client at once.
/// `on_cut` ends the client response when the upstream fails.
fn pump(
    reader: &mut impl Read,
    chunk: &mut [u8],
    idle: Duration,
    out: &mut Responder<'_, TcpStream>,
    host: &Host,
    on_cut: impl FnOnce(&mut Responder<'_, TcpStream>, &str),
) -> Result<(), AttemptError> {
    loop {
        watch::set_deadline(Some(Instant::now() + idle));
        match reader.read(chunk) {
            Ok(0) => {
                host.successes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return if out.finish().is_ok() {
                    Ok(())
                } else {
                    Err(AttemptError::ClientGone)
                };
            }
            Ok(n) => {
                if out.chunk(&chunk[..n]).is_err() {
                    return Err(AttemptError::ClientGone);
                }
            }
            Err(e) => {
                if watch::aborted() == Some(watch::Abort::ClientGone) {
                    return Err(AttemptError::ClientGone);
                }
                host.failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let why = if watch::aborted().is_some() {
                    "no data within timeouts.idleMs".to_string()
                } else {
                    e.to_string()
                };
                log::warn!("stream from {} cut after commit: {why}", host.spec.name);
                on_cut(out, &why);
                // The answer was committed: the request is over, not retried.
                return Ok(());
            }
        }
    }
}
