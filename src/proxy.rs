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

use crate::cooldowns;
use crate::hosts::{Candidate, Host, Verdict};
use crate::keys::Key;
use crate::metrics;
use crate::response::{valid_value, Responder};
use crate::retry::{self, KeyFault, Outcome, RetryTicket};
use crate::state::{Balancer, Shared};
use crate::streaming::{Preamble, Verdict as Preview};
use crate::upstream::{self, AttemptError, Failed, Outgoing};
use crate::watch;

/// Headers of every SSE response we send.
const SSE_HEADERS: &[(&str, &str)] = &[
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
];

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
    /// The upstream failed after the commit.
    pub cut: bool,
}

/// A client request ready to go upstream.
pub struct Proxied<'a> {
    /// What goes upstream.
    pub outgoing: Outgoing<'a>,
    /// The client socket, watched for departure during upstream waits.
    pub client: &'a TcpStream,
    /// When the request head was complete.
    pub started: Instant,
    /// The client asked for a stream (`"stream": true`).
    pub stream: bool,
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
pub fn serve(
    shared: &Shared,
    b: &Balancer,
    req: &Proxied<'_>,
    out: &mut Responder<'_, TcpStream>,
) -> Served {
    let _watch = watch::start(req.client.try_clone().ok());
    let _ticket = shared.budget.request();
    let mut served = Served::default();
    let mut trail = Trail::default();
    let result = attempts(shared, b, req, out, &mut served, &mut trail);
    served.trail = trail.0;
    end_early(out);
    match result {
        Ok(()) => {}
        Err(Stop::ClientGone) => served.client_gone = true,
        Err(Stop::Invalid(msg)) => send_error(out, 400, "invalid_request", &msg),
    }
    served
}

fn attempts(
    shared: &Shared,
    b: &Balancer,
    req: &Proxied<'_>,
    out: &mut Responder<'_, TcpStream>,
    served: &mut Served,
    trail: &mut Trail,
) -> Result<(), Stop> {
    let settings = &b.config.settings;
    let deadline = req.started + settings.timeouts.total;
    let mut last: Option<Failed> = None;
    let mut candidates = b.hosts.candidates();
    let mut _retry: Option<RetryTicket<'_>> = None;
    if let (true, Some(after)) = (req.stream, settings.stream_keep_alive_after) {
        // A slow first token: commit the head early and keep the line warm,
        // while failover stays invisible until the first data event.
        let head = out.stream_head(200, SSE_HEADERS);
        let chunked = out.chunked();
        watch::set_early(
            req.started + after,
            settings.stream_keep_alive_every,
            head,
            chunked,
        );
    }
    while served.attempts < settings.max_attempts {
        let Some(c) = candidates.next() else {
            // Every host or key is cooling (or disabled): wait if that fits.
            match candidates.retry_at() {
                Some(at) if at < deadline => {
                    pause_until(at, deadline)?;
                    continue;
                }
                at => return finish_unavailable(out, trail, at, last.as_ref()),
            }
        };
        if served.attempts > 0 && !shared.budget.allows() {
            b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
            log::warn!(
                "retry budget spent; giving up after {} attempts",
                served.attempts
            );
            return finish_failed(out, trail, served.attempts, last, true);
        }
        // Waiting only helps a host that failed itself; a new key needs no pause.
        let host_failed = last
            .as_ref()
            .is_some_and(|f| retry::decide(f.outcome).host_failure);
        if c.repeat && host_failed {
            let floor = settings.timeouts.connect.min(Duration::from_secs(1));
            let pause = pause_until(
                Instant::now() + retry::backoff(served.attempts, floor),
                deadline,
            );
            if pause.is_err() {
                b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
            }
            pause?;
        }
        if served.attempts > 0 {
            // The ticket is taken after any pause: a sleeping request must
            // not hold one of the few concurrent retry slots.
            _retry = None;
            let slot_wait = (Instant::now() + retry::RETRY_SLOT_WAIT).min(deadline);
            match shared.budget.retry(slot_wait) {
                Some(ticket) => _retry = Some(ticket),
                None => {
                    b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
                    log::warn!(
                        "retry budget spent; giving up after {} attempts",
                        served.attempts
                    );
                    return finish_failed(out, trail, served.attempts, last, true);
                }
            }
        }
        if Instant::now() >= deadline {
            b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
            return finish_timeout(out, trail, last.as_ref());
        }
        served.attempts += 1;
        let key = c.key.as_deref();
        let begun = metrics::attempt_begins();
        let result = attempt(b, req, &c.host, key, deadline, out, trail);
        observe(b, &c.host, begun, &result);
        let failure = match result {
            Ok(end) => {
                let (verdict, detail) = match &end {
                    Delivered::Complete => (Verdict::Success, None),
                    Delivered::Cut(why) => (Verdict::Failure, Some(why.as_str())),
                };
                b.hosts.record(&c.host, verdict, c.probe, detail);
                if let Some(k) = &c.key {
                    k.succeeded();
                }
                served.host = Some(c.host.spec.name.clone());
                served.cut = matches!(end, Delivered::Cut(_));
                return Ok(());
            }
            Err(AttemptError::ClientGone) => {
                b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
                return Err(Stop::ClientGone);
            }
            Err(AttemptError::Invalid(msg)) => {
                b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
                return Err(Stop::Invalid(msg));
            }
            Err(AttemptError::Failed(f)) => f,
        };
        trail.push(&c.host, key, &outcome_label(failure.outcome));
        learn(b, &c, &failure);
        log::debug!("attempt {} failed: {}", served.attempts, failure.detail);
        last = Some(failure);
        if Instant::now() >= deadline {
            return finish_timeout(out, trail, last.as_ref());
        }
    }
    finish_failed(out, trail, served.attempts, last, false)
}

/// Apply what a failed attempt says about its host and key.
fn learn(b: &Balancer, c: &Candidate, f: &Failed) {
    let decision = retry::decide(f.outcome);
    let verdict = if decision.host_failure {
        Verdict::Failure
    } else {
        Verdict::Alive
    };
    b.hosts.record(&c.host, verdict, c.probe, Some(&f.detail));
    match decision.key {
        KeyFault::Rejected => {
            if let Some(k) = &c.key {
                k.disable();
                log::warn!(
                    "key {} rejected by {}; out of rotation until the key file changes",
                    k.masked(),
                    c.host.spec.name
                );
            }
        }
        KeyFault::RateLimited => {
            let scope = b
                .hosts
                .rate_limited(&c.host, c.key.as_deref(), f.retry_after);
            b.metrics.cooldown(scope);
            log::info!("429 from {}: cooling the {scope:?}", c.host.spec.name);
        }
        KeyFault::None => {}
    }
    if f.outcome == Outcome::Status(503) {
        if let Some(hint) = f.retry_after {
            b.hosts
                .cool_host(&c.host, hint.max(crate::cooldowns::MIN_COOLDOWN));
            b.metrics.cooldown(crate::hosts::Scope::Host);
        }
    }
}

fn finish_failed(
    out: &mut Responder<'_, TcpStream>,
    trail: &Trail,
    attempts: u32,
    last: Option<Failed>,
    budget_spent: bool,
) -> Result<(), Stop> {
    let mut detail = last
        .as_ref()
        .map_or_else(|| "no upstream host".to_string(), |f| f.detail.clone());
    // The last upstream's own words help the client more than ours.
    if let Some(body) = last.as_ref().and_then(|f| f.error_body.as_ref()) {
        let excerpt = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        if !excerpt.trim().is_empty() {
            detail = format!("{detail}: {}", excerpt.trim());
        }
    }
    let why = if budget_spent {
        "retry budget spent"
    } else {
        "maxAttempts reached"
    };
    let msg = format!("all {attempts} attempts failed ({why}); last: {detail}");
    send_proxy_error(out, trail, 502, "upstream_failed", &msg)
}

fn finish_unavailable(
    out: &mut Responder<'_, TcpStream>,
    trail: &Trail,
    at: Option<Instant>,
    last: Option<&Failed>,
) -> Result<(), Stop> {
    let wait = at.map(|t| t.saturating_duration_since(Instant::now()));
    let secs = wait.map_or(1, |w| w.as_secs_f64().ceil().max(1.0) as u64);
    out.add_header("Retry-After", &secs.to_string());
    let detail = last.map_or("", |f| f.detail.as_str());
    let msg = match wait {
        Some(_) => {
            format!("every upstream host or key is cooling down; retry in {secs}s; last: {detail}")
        }
        None => format!("no upstream host or key is usable; last: {detail}"),
    };
    send_proxy_error(out, trail, 503, "no_upstream_available", &msg)
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
    send_error(out, status, code, msg);
    Ok(())
}

/// If the watch committed a slow stream early, the responder takes it over
/// (the keep-alive comments go on until [`end_early`]).
fn sync_early(out: &mut Responder<'_, TcpStream>) {
    if watch::early_sent() {
        out.adopt_stream(200);
    }
}

/// Stop the keep-alive comments: the response is being committed or ended.
fn end_early(out: &mut Responder<'_, TcpStream>) {
    if watch::clear_early() {
        out.adopt_stream(200);
    }
}

/// An error as a response, or as a final SSE event when a stream was
/// already committed early (no `[DONE]` follows, so it cannot pass for an answer).
fn send_error(out: &mut Responder<'_, TcpStream>, status: u16, code: &str, msg: &str) {
    end_early(out);
    if out.started() {
        let body = serde_json::json!({
            "error": { "message": msg, "type": "upstream_error", "code": code, "status": status }
        });
        let _ = out.chunk(format!("data: {body}\n\n").as_bytes());
        let _ = out.finish();
        out.close_after();
    } else {
        let _ = out.send_error(status, code, msg);
    }
}

/// Sleep until `until` (never past `deadline`), without outliving the client.
fn pause_until(until: Instant, deadline: Instant) -> Result<(), Stop> {
    let until = until.min(deadline);
    loop {
        if watch::poll_client() {
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
) -> Result<Delivered, AttemptError> {
    let t = &b.config.settings.timeouts;
    let _busy = host.busy();
    let first_output = (Instant::now() + t.first_byte).min(deadline);
    watch::set_deadline(Some(first_output));
    let response = upstream::send(&b.agent, host, key, &req.outgoing)?;
    let status = response.status().as_u16();
    metrics::mark_head(status);
    let decision = retry::decide(Outcome::Status(status));
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.as_bytes())
        .filter(|v| valid_value(v))
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("")
        .to_string();
    if decision.retry {
        let retry_after = cooldowns::retry_after(response.headers());
        // Read the error (bounded): it may be the last word, and a body read
        // to its end lets the connection go back to the pool.
        watch::set_deadline(Some((Instant::now() + t.idle).min(deadline)));
        let mut body = response.into_body().into_reader();
        let body =
            read_bounded(&mut body, ERROR_BODY_LIMIT).map_or_else(|_| Vec::new(), |(b, _)| b);
        return Err(AttemptError::Failed(Failed {
            outcome: Outcome::Status(status),
            detail: format!("{}: status {status}", host.spec.name),
            retry_after,
            error_body: Some(body),
        }));
    }
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
    sync_early(out);
    if is_sse {
        forward_stream(ctx, response, out, trail)
    } else if out.started() {
        early_non_stream(ctx, response, out, trail)
    } else {
        forward_whole(ctx, response, out, trail)
    }
}

/// A stream committed early (keep-alives sent) got a non-SSE answer: a 2xx
/// body cannot become events, so try another host; an error passed through
/// becomes the final SSE error event.
fn early_non_stream(
    ctx: Commit<'_>,
    response: Response<Body>,
    out: &mut Responder<'_, TcpStream>,
    trail: &mut Trail,
) -> Result<Delivered, AttemptError> {
    if (200..300).contains(&ctx.status) {
        return Err(upstream::failure(
            Outcome::Broken,
            "answered a stream request without a stream",
            ctx.host,
        ));
    }
    watch::set_deadline(Some((Instant::now() + ctx.idle).min(ctx.total)));
    let mut reader = response.into_body().into_reader();
    let (body, _) = read_bounded(&mut reader, ERROR_BODY_LIMIT)
        .map_err(|e| upstream::classify_read(e, ctx.host))?;
    trail.push(ctx.host, ctx.key, &ctx.status.to_string());
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    send_error(out, ctx.status, "upstream_error", &message);
    Ok(Delivered::Complete)
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
            for (name, value) in &SSE_HEADERS[1..] {
                out.add_header(name, value);
            }
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
) -> Result<Delivered, AttemptError> {
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
            return Ok(Delivered::Complete);
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
) -> Result<Delivered, AttemptError> {
    let mut reader = response.into_body().into_reader();
    let mut preamble = Preamble::default();
    let mut chunk = vec![0u8; READ_SIZE];
    watch::set_deadline(Some(ctx.deadline));
    loop {
        let n = reader
            .read(&mut chunk)
            .map_err(|e| upstream::classify_read(e, ctx.host))?;
        if n == 0 {
            return Err(upstream::failure(
                Outcome::Broken,
                "stream ended before any output",
                ctx.host,
            ));
        }
        match preamble.push(&chunk[..n]) {
            Preview::Hold => continue,
            Preview::Error(msg) => {
                return Err(upstream::failure(
                    Outcome::Broken,
                    &format!("error event before output: {msg}"),
                    ctx.host,
                ))
            }
            Preview::Commit => break,
        }
    }
    metrics::mark_first_event();
    end_early(out);
    ctx.headers(trail, true, out);
    let started = out.started()
        || out
            .start_stream(ctx.status, &ctx.content_type_header())
            .is_ok();
    if !started || out.chunk(&preamble.take()).is_err() {
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
) -> Result<Delivered, AttemptError> {
    loop {
        watch::set_deadline(Some(Instant::now() + idle));
        match reader.read(chunk) {
            Ok(0) => {
                return if out.finish().is_ok() {
                    Ok(Delivered::Complete)
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
                let why = if watch::aborted().is_some() {
                    "no data within timeouts.idleMs".to_string()
                } else {
                    e.to_string()
                };
                log::warn!("stream from {} cut after commit: {why}", host.spec.name);
                on_cut(out, &why);
                // The answer was committed: the request is over, not retried.
                return Ok(Delivered::Cut(why));
            }
        }
    }
}

/// How a committed response ended.
#[derive(Debug)]
enum Delivered {
    /// The whole body reached the client.
    Complete,
    /// The upstream failed after the commit; the client saw the cut.
    Cut(String),
}

/// Metrics hook: count one attempt on `host` by how it ended. A client that
/// left says nothing about the host, so that attempt gets no outcome.
fn observe(b: &Balancer, host: &Host, begun: Instant, result: &Result<Delivered, AttemptError>) {
    let outcome = match result {
        // Refined by the head's status: a 4xx passed through is status_4xx.
        Ok(Delivered::Complete) => Some(metrics::AttemptOutcome::Ok),
        Ok(Delivered::Cut(_)) => Some(metrics::AttemptOutcome::Broken),
        Err(AttemptError::Failed(f)) => Some(metrics::AttemptOutcome::of(f.outcome)),
        Err(_) => None,
    };
    b.metrics.attempt(b, host, begun, outcome, result.is_ok());
}
