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

use ureq::http::header;

use crate::cooldowns;
use crate::discovery;
use crate::hedge;
use crate::hosts::{Candidate, Host, InFlight, Verdict};
use crate::keys::{self, Key};
use crate::metrics;
use crate::model;
use crate::response::{valid_value, Responder};
use crate::retry::{self, KeyFault, Outcome, RetryTicket};
use crate::state::{Balancer, Shared};
use crate::streaming::{Events, Preamble, Verdict as Preview};
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
/// Size of one read from an upstream body: one page, as nginx's default
/// `proxy_buffer_size`; SSE events are a few hundred bytes, and a large JSON
/// body takes more reads, not more memory. Each thread keeps one such buffer
/// (see [`ReadBuf`]).
const READ_SIZE: usize = 4 * 1024;

thread_local! {
    /// This thread's upstream read buffer while no [`ReadBuf`] has it.
    static READ_BUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The thread's upstream read buffer, lent out and given back on drop.
///
/// Why: a thread serves one response at a time, so one buffer per thread
/// suffices; a fresh zeroed buffer per response, or one on the stack (whose
/// pages stay resident for the thread's life), cost every open stream its
/// own copy, and then some.
struct ReadBuf(Vec<u8>);

impl ReadBuf {
    fn take() -> ReadBuf {
        let mut buf = READ_BUF.take();
        buf.resize(READ_SIZE, 0);
        ReadBuf(buf)
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        READ_BUF.set(std::mem::take(&mut self.0));
    }
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for ReadBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

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
    /// The body `outgoing` borrows, shared with a hedge thread if one starts.
    pub body: Arc<Vec<u8>>,
    /// The client socket, watched for departure during upstream waits.
    pub client: &'a TcpStream,
    /// When the request head was complete.
    pub started: Instant,
    /// The client asked for a stream (`"stream": true`).
    pub stream: bool,
    /// The body's top-level `model`, which decides the eligible hosts.
    pub model: Option<Arc<str>>,
}

/// Trail of attempts, e.g. `asia:429,llama3b:200`.
#[derive(Default)]
pub(crate) struct Trail(String);

impl Trail {
    /// An entry for a hedge attempt.
    fn push_hedge(&mut self, host: &Host, key: Option<&Key>, what: &str) {
        self.push(host, key, what);
        if let Some(colon) = self.0.rfind(':') {
            self.0.insert_str(colon, "(hedge)");
        }
    }

    fn push(&mut self, host: &Host, key: Option<&Key>, what: &str) {
        if !self.0.is_empty() {
            self.0.push(',');
        }
        self.0.push_str(&host.spec.name);
        if host.spec.backup {
            self.0.push_str("(backup)");
        }
        if let Some(k) = key {
            self.0.push('[');
            self.0.push_str(k.masked());
            self.0.push(']');
        }
        self.0.push(':');
        self.0.push_str(what);
    }
}

pub(crate) fn outcome_label(o: Outcome) -> String {
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
    shared: &Arc<Shared>,
    b: &Arc<Balancer>,
    req: &Proxied<'_>,
    out: &mut Responder<'_, TcpStream>,
) -> Served {
    let _watch = watch::begin(req.client);
    let _ticket = shared.budget.request();
    shared.hedger.deposit();
    let mut served = Served::default();
    let mut trail = Trail(String::with_capacity(96));
    let result = attempts(shared, b, req, out, &mut served, &mut trail);
    served.trail = trail.0;
    end_early(out);
    match result {
        Ok(()) => {}
        Err(Stop::ClientGone) => served.client_gone = true,
        Err(Stop::Invalid(msg)) => send_error(out, 400, "invalid_request", &msg),
    }
    // A 200 that no host served is a stream committed early (keep-alive
    // comments) whose error went out as an SSE event: a failed answer, as
    // a stream cut after its first token is, whatever its status line says.
    if served.host.is_none() && !served.client_gone && out.status() == 200 {
        served.cut = true;
    }
    served
}

fn attempts(
    shared: &Arc<Shared>,
    b: &Arc<Balancer>,
    req: &Proxied<'_>,
    out: &mut Responder<'_, TcpStream>,
    served: &mut Served,
    trail: &mut Trail,
) -> Result<(), Stop> {
    let settings = &b.config.settings;
    let deadline = req.started + settings.timeouts.total;
    let mut last: Option<Failed> = None;
    // The last 404, quoted when every host has answered 404.
    let mut not_found: Option<String> = None;
    // Some host refused the request as such (401/403 with no key to change).
    let mut refused = false;
    // Every failed attempt so far was a rate limit (429, or 503 with
    // `Retry-After`): if attempts run out, the client learns when to come back.
    let mut limited = true;
    // Pauses before going back to a failed host: the backoff doubles with each.
    let mut pauses = 0u32;
    let mut candidates = b.hosts.candidates().for_model(req.model.clone());
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
        let Some(mut c) = candidates.next() else {
            // Every host said it does not know the model: no attempt can help.
            let model = req.model.as_deref();
            if let Some(m) = model.filter(|m| discovery::refused_everywhere(&b.hosts, m)) {
                return finish_unknown_model(out, trail, m);
            }
            // Every host or key is cooling (or disabled): wait if that fits.
            match candidates.retry_at() {
                Some(at) if at < deadline => {
                    pause_until(at, deadline)?;
                    continue;
                }
                // The hosts left answered 404: that is the answer.
                _ if not_found.is_some() => {
                    return finish_not_found(out, trail, not_found.unwrap_or_default());
                }
                None if refused => {
                    return finish_failed(out, trail, served.attempts, last, GaveUp::Refused);
                }
                at => return finish_unavailable(out, trail, at, last.as_ref(), None),
            }
        };
        if served.attempts > 0 && !shared.budget.allows() {
            b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
            log::warn!(
                "retry budget spent; giving up after {} attempts",
                served.attempts
            );
            return finish_failed(out, trail, served.attempts, last, GaveUp::Budget);
        }
        // Waiting only helps a host that failed itself (whatever another
        // host said since); a new key needs no pause.
        if c.repeat && candidates.failed_before(c.host.index) {
            pauses += 1;
            let turnaround = settings.timeouts.connect.min(Duration::from_secs(1));
            let resume = Instant::now() + retry::backoff(pauses, turnaround);
            if resume >= deadline {
                // No attempt fits after the pause: say so now, not at the deadline.
                b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
                if limited && last.is_some() {
                    let at = candidates.free_at();
                    let why = Some((served.attempts, GaveUp::NoTime));
                    return finish_unavailable(out, trail, at, last.as_ref(), why);
                }
                return finish_failed(out, trail, served.attempts, last, GaveUp::NoTime);
            }
            let pause = pause_until(resume, deadline);
            if pause.is_err() {
                b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
            }
            pause?;
        }
        let mut ticket: Option<RetryTicket<'_>> = None;
        if served.attempts > 0 {
            // The ticket is taken after any pause: a sleeping request must
            // not hold one of the few concurrent retry slots.
            let slot_wait = (Instant::now() + retry::RETRY_SLOT_WAIT).min(deadline);
            match shared.budget.retry(slot_wait) {
                Some(t) => ticket = Some(t),
                None => {
                    b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
                    log::warn!(
                        "retry budget spent; giving up after {} attempts",
                        served.attempts
                    );
                    return finish_failed(out, trail, served.attempts, last, GaveUp::Budget);
                }
            }
        }
        if Instant::now() >= deadline {
            b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
            return finish_timeout(out, trail, last.as_ref());
        }
        served.attempts += 1;
        // One hedge per request, on its first attempt.
        let slot = if served.attempts == 1 {
            hedge::arm(shared, b, req, &c, deadline)
        } else {
            None
        };
        let begun = metrics::attempt_begins();
        let result = attempt(
            shared,
            b,
            req,
            &mut c,
            deadline,
            slot.as_ref(),
            ticket,
            out,
            trail,
        );
        observe(b, &c.host, begun, &result);
        // A hedge that failed tried its host for this request too: later
        // attempts pause before it, or leave it out after a 404, as if the
        // request had tried it itself.
        if let Some((host, _, outcome)) = slot.as_ref().and_then(|s| s.failure()) {
            // Its `Retry-After` is not kept: only its 429 counts as a rate limit.
            limited &= is_rate_limit(outcome, None);
            candidates.learn(host.index, outcome);
            if outcome == Outcome::Status(404) {
                candidates.settle(host.index);
            }
        }
        let failure = match result {
            Ok(end) => {
                if let Delivered::Hedged { host, cut, .. } = &end {
                    // The hedge's host is credited or blamed in
                    // `commit_hedge`; the attempt it outran was only slower.
                    served.host = Some(host.clone());
                    served.attempts += 1;
                    served.cut = *cut;
                    return Ok(());
                }
                if let Delivered::Abandoned { host, hedged, .. } = end {
                    if hedged {
                        served.attempts += 1; // counted as for Hedged
                    } else {
                        b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
                    }
                    served.host = Some(host);
                    return Err(Stop::ClientGone);
                }
                let (verdict, detail) = match &end {
                    Delivered::Cut(why) => (Verdict::Failure, Some(why.as_str())),
                    _ => (Verdict::Success, None),
                };
                b.hosts.record(&c.host, verdict, c.probe, detail);
                if let Some(k) = &c.key {
                    b.hosts.succeeded(&c.host, k);
                }
                served.host = Some(c.host.spec.name.clone());
                served.cut = matches!(end, Delivered::Cut(_));
                return Ok(());
            }
            Err(AttemptError::ClientGone) | Err(AttemptError::Preempted) => {
                b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
                return Err(Stop::ClientGone);
            }
            Err(AttemptError::Invalid(msg)) => {
                b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
                return Err(Stop::Invalid(msg));
            }
            Err(AttemptError::Recorded(f) | AttemptError::HedgeFailed(f)) => {
                // Already in the trail and learned from (a hedge was waited
                // on, or won the race and then failed): one more attempt.
                served.attempts += 1;
                candidates.learn(c.host.index, f.outcome);
                limited &= is_rate_limit(f.outcome, f.retry_after);
                last = Some(f);
                continue;
            }
            Err(AttemptError::Failed(f)) => f,
        };
        trail.push(&c.host, c.key.as_deref(), &outcome_label(failure.outcome));
        learn(b, &c, &failure, req.model.as_ref());
        candidates.learn(c.host.index, failure.outcome);
        match failure.outcome {
            Outcome::Status(404) => {
                // Another key or a pause would get the same 404 from this host.
                candidates.settle(c.host.index);
                not_found = Some(last_word(&failure));
            }
            Outcome::Status(401 | 403) if c.key.is_none() => {
                // No pool key to switch to: it would refuse the same request again.
                candidates.settle(c.host.index);
                refused = true;
            }
            _ => {}
        }
        log::debug!("attempt {} failed: {}", served.attempts, failure.detail);
        limited &= is_rate_limit(failure.outcome, failure.retry_after);
        last = Some(failure);
        if Instant::now() >= deadline {
            return finish_timeout(out, trail, last.as_ref());
        }
    }
    match not_found {
        // The last answer was a 404: attempts ran out on hosts without it.
        Some(word) if last.as_ref().map(|f| f.outcome) == Some(Outcome::Status(404)) => {
            finish_not_found(out, trail, word)
        }
        // Only rate limits stood in the way: a 503 saying when one frees up.
        _ if limited && last.is_some() => {
            let why = Some((served.attempts, GaveUp::MaxAttempts));
            finish_unavailable(out, trail, candidates.free_at(), last.as_ref(), why)
        }
        _ => finish_failed(out, trail, served.attempts, last, GaveUp::MaxAttempts),
    }
}

/// A failure that says "not now" rather than "broken": a 429, or a 503
/// with `Retry-After` (which cools the host as a 429 does, see [`learn`]).
fn is_rate_limit(outcome: Outcome, retry_after: Option<Duration>) -> bool {
    match outcome {
        Outcome::Status(429) => true,
        Outcome::Status(503) => retry_after.is_some(),
        _ => false,
    }
}

/// Apply what a failed attempt says about its host, key and model.
pub(crate) fn learn(b: &Balancer, c: &Candidate, f: &Failed, model: Option<&Arc<str>>) {
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
                match b.hosts.rejected(&c.host, k) {
                    crate::hosts::Scope::Key => log::warn!(
                        "key {} rejected by {}; out of rotation until the key file changes",
                        k.masked(),
                        c.host.spec.name
                    ),
                    _ => log::warn!(
                        "key {} rejected by {}; not sent there for {} s (out of rotation \
                         once a second host rejects it)",
                        k.masked(),
                        c.host.spec.name,
                        crate::hosts::REJECTED_PAIR_COOLDOWN.as_secs()
                    ),
                }
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
    if let (Outcome::Status(404), Some(m), Some(body)) = (f.outcome, model, &f.error_body) {
        if discovery::says_model_unknown(body) {
            discovery::exclude(b, &c.host, m);
        }
    }
    if f.outcome == Outcome::Status(503) {
        if let Some(hint) = f.retry_after {
            b.hosts
                .cool_host(&c.host, hint.max(crate::cooldowns::MIN_COOLDOWN));
            b.metrics.cooldown(crate::hosts::Scope::Host);
        }
    }
}

/// Why retrying stopped before `timeouts.totalMs` ran out.
#[derive(Clone, Copy)]
enum GaveUp {
    MaxAttempts,
    Budget,
    /// The backoff before the next attempt would end past the deadline.
    NoTime,
    /// Every host left refused the request (401/403 without a key to change).
    Refused,
}

fn finish_failed(
    out: &mut Responder<'_, TcpStream>,
    trail: &Trail,
    attempts: u32,
    last: Option<Failed>,
    why: GaveUp,
) -> Result<(), Stop> {
    let detail = last
        .as_ref()
        .map_or_else(|| "no upstream host".to_string(), last_word);
    let msg = format!(
        "all {attempts} attempts failed ({}); last: {detail}",
        why.text()
    );
    send_proxy_error(out, trail, 502, "upstream_failed", &msg)
}

impl GaveUp {
    fn text(self) -> &'static str {
        match self {
            GaveUp::MaxAttempts => "maxAttempts reached",
            GaveUp::Budget => "retry budget spent",
            GaveUp::NoTime => "no time left in timeouts.totalMs for another attempt after backoff",
            GaveUp::Refused => "every host left refused it, and there is no pool key to change",
        }
    }
}

/// A failed attempt's detail, with the upstream's own words (they help the
/// client more than ours).
fn last_word(f: &Failed) -> String {
    let mut detail = f.detail.clone();
    if let Some(body) = &f.error_body {
        let excerpt = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        if !excerpt.trim().is_empty() {
            detail = format!("{detail}: {}", excerpt.trim());
        }
    }
    detail
}

fn finish_not_found(
    out: &mut Responder<'_, TcpStream>,
    trail: &Trail,
    last: String,
) -> Result<(), Stop> {
    let msg = format!("the upstream hosts asked answered 404; last: {last}");
    send_proxy_error(out, trail, 404, "not_found", &msg)
}

/// 503 with `Retry-After`: the seconds until `at` (at least 1), when a
/// cooling host or key frees up. `limited` is set when attempts ran out
/// (how many, and what stopped them) with every one of them rate-limited.
fn finish_unavailable(
    out: &mut Responder<'_, TcpStream>,
    trail: &Trail,
    at: Option<Instant>,
    last: Option<&Failed>,
    limited: Option<(u32, GaveUp)>,
) -> Result<(), Stop> {
    let wait = at.map(|t| t.saturating_duration_since(Instant::now()));
    let secs = wait.map_or(1, |w| w.as_secs_f64().ceil().max(1.0) as u64);
    out.add_header("Retry-After", &secs.to_string());
    let detail = last.map_or("", |f| f.detail.as_str());
    let msg = match (limited, wait) {
        (Some((attempts, why)), _) => {
            // Quoted as the 502 quotes it: the upstream's own words say
            // which limit was hit.
            let detail = last.map(last_word).unwrap_or_default();
            format!(
                "every upstream host or key tried is rate-limited: all {attempts} attempts \
                 got a 429 or a 503 with Retry-After ({}); retry in {secs}s; last: {detail}",
                why.text()
            )
        }
        (None, Some(_)) => {
            format!("every upstream host or key is cooling down; retry in {secs}s; last: {detail}")
        }
        (None, None) => format!("no upstream host or key is usable; last: {detail}"),
    };
    send_proxy_error(out, trail, 503, "no_upstream_available", &msg)
}

fn finish_unknown_model(
    out: &mut Responder<'_, TcpStream>,
    trail: &Trail,
    model: &str,
) -> Result<(), Stop> {
    let msg = format!(
        "no upstream host serves the model {model:?}: each said it does not know it (they are asked again at their next model discovery)"
    );
    send_proxy_error(out, trail, 404, "model_not_found", &msg)
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

/// One attempt on the worker: run it to its commit point (a hedge may win
/// meanwhile), then commit whichever attempt got there first.
#[allow(clippy::too_many_arguments)]
fn attempt(
    shared: &Shared,
    b: &Arc<Balancer>,
    req: &Proxied<'_>,
    c: &mut Candidate,
    deadline: Instant,
    hedge: Option<&Arc<hedge::Slot>>,
    retry: Option<RetryTicket<'_>>,
    out: &mut Responder<'_, TcpStream>,
    trail: &mut Trail,
) -> Result<Delivered, AttemptError> {
    let first = run_to_commit(b, &req.outgoing, &c.host, c.key.as_ref(), deadline);
    // From here on no hedge may start: this attempt has its outcome.
    watch::clear_hedge();
    let ready = match (first, hedge) {
        (Ok(ready), _) => {
            if let Some(slot) = hedge {
                slot.cancel();
            }
            note_first_byte(shared, &ready);
            if c.probe {
                // The probe reached real output: the host is back now, not
                // when a stream that may run for minutes ends. What the rest
                // of it shows is recorded as for any request.
                b.hosts.record(&c.host, Verdict::Alive, true, None);
                c.probe = false;
            }
            ready
        }
        (Err(AttemptError::Preempted), Some(slot)) => {
            // The hedge reached its commit point first; this attempt was cut.
            b.hosts.record(&c.host, Verdict::Unknown, c.probe, None);
            trail.push(&c.host, c.key.as_deref(), "outrun");
            return commit_hedge(b, slot, retry, out, trail);
        }
        (Err(AttemptError::Failed(f)), Some(slot)) if slot.launched() => {
            // This attempt failed while a hedge is under way: that hedge is
            // now the best next attempt.
            trail.push(&c.host, c.key.as_deref(), &outcome_label(f.outcome));
            learn(b, c, &f, req.model.as_ref());
            match slot.wait(deadline) {
                Ok(()) => {
                    // This attempt's failure is counted on its host, the
                    // hedge's outcome on its own (in `commit_hedge`).
                    return match commit_hedge(b, slot, retry, out, trail) {
                        Ok(Delivered::Hedged { host, cut, .. }) => Ok(Delivered::Hedged {
                            host,
                            cut,
                            first_failed: Some(f.outcome),
                        }),
                        Ok(Delivered::Abandoned { host, hedged, .. }) => Ok(Delivered::Abandoned {
                            host,
                            hedged,
                            first_failed: Some(f.outcome),
                        }),
                        Err(AttemptError::HedgeFailed(_)) => Err(AttemptError::Recorded(f)),
                        other => other,
                    };
                }
                Err(AttemptError::Failed(_)) => {
                    hedge_trail(slot, trail);
                    return Err(AttemptError::Recorded(f));
                }
                Err(e) => return Err(e),
            }
        }
        (Err(e), slot) => {
            if let Some(slot) = slot {
                slot.cancel();
            }
            return Err(e);
        }
    };
    commit(ready, retry, out, trail)
}

/// Feed the time to first byte to the hedge's "auto" delay.
fn note_first_byte(shared: &Shared, ready: &Ready) {
    shared
        .hedger
        .observe(&ready.host.spec.name, ready.first_byte);
}

/// Commit the result a hedge left in `slot`. The hedge's host is credited
/// or blamed here (health, metrics, trail), never the attempt it outran.
fn commit_hedge(
    b: &Balancer,
    slot: &hedge::Slot,
    retry: Option<RetryTicket<'_>>,
    out: &mut Responder<'_, TcpStream>,
    trail: &mut Trail,
) -> Result<Delivered, AttemptError> {
    let Some(ready) = slot.take_ready() else {
        hedge_trail(slot, trail);
        return Err(upstream::failure_text("the hedge produced nothing"));
    };
    let c = Candidate {
        host: ready.host.clone(),
        key: ready.key.clone(),
        probe: false,
        repeat: false,
    };
    let (status, first_byte) = (ready.status, ready.first_byte);
    let end = commit(ready, retry, out, trail);
    let outcome = match &end {
        Ok(Delivered::Complete | Delivered::Hedged { .. }) => Some(metrics::AttemptOutcome::Ok),
        Ok(Delivered::Cut(_)) => Some(metrics::AttemptOutcome::Broken),
        Err(AttemptError::Failed(f)) => Some(metrics::AttemptOutcome::of(f.outcome)),
        Ok(Delivered::Abandoned { .. }) | Err(_) => None,
    };
    b.metrics
        .hedge_attempt(b, &c.host, outcome, status, Some(first_byte), end.is_ok());
    match end {
        Ok(Delivered::Complete) => {
            b.hosts.record(&c.host, Verdict::Success, false, None);
            if let Some(k) = &c.key {
                b.hosts.succeeded(&c.host, k);
            }
            Ok(Delivered::Hedged {
                host: c.host.spec.name.clone(),
                cut: false,
                first_failed: None,
            })
        }
        Ok(Delivered::Cut(why)) => {
            b.hosts.record(&c.host, Verdict::Failure, false, Some(&why));
            Ok(Delivered::Hedged {
                host: c.host.spec.name.clone(),
                cut: true,
                first_failed: None,
            })
        }
        Err(AttemptError::Failed(f)) => {
            // Not passed on after all (e.g. a stream committed early got a
            // JSON answer): the hedge's host failed, not the one it outran.
            trail.push_hedge(&c.host, c.key.as_deref(), &outcome_label(f.outcome));
            learn(b, &c, &f, None);
            Err(AttemptError::HedgeFailed(f))
        }
        other => {
            b.hosts.record(&c.host, Verdict::Unknown, false, None);
            other
        }
    }
}

/// Put a failed hedge in the trail.
fn hedge_trail(slot: &hedge::Slot, trail: &mut Trail) {
    if let Some((host, key, outcome)) = slot.failure() {
        trail.push_hedge(&host, key.as_deref(), &outcome_label(outcome));
    }
}

/// An attempt that reached its commit point; nothing of it has reached the client.
pub struct Ready {
    /// The host that produced it.
    pub host: Arc<Host>,
    /// The key it was sent with.
    pub key: Option<Arc<Key>>,
    /// Upstream status.
    pub status: u16,
    /// Checked Content-Type, empty when absent or unsafe.
    pub content_type: String,
    /// The upstream's `Content-Length`, for the answer to a HEAD request.
    pub length: Option<u64>,
    /// An SSE stream (preamble held in `held`).
    pub sse: bool,
    /// Bytes read so far: the whole body, or the preamble up to the first output.
    pub held: Vec<u8>,
    /// The rest of the body, when it has not ended yet.
    pub rest: Option<ureq::BodyReader<'static>>,
    /// Time from sending the request to the response head.
    pub first_byte: Duration,
    /// When the response head arrived (on whichever thread ran the attempt).
    pub head_at: Instant,
    /// Idle timeout for the rest of the body.
    pub idle: Duration,
    /// This came from a hedge attempt.
    pub hedged: bool,
    /// Keeps the host counted in flight until the body has been passed on.
    pub busy: InFlight,
}

/// Send an attempt and read until its commit point: the whole body (up to
/// [`JSON_HOLD_LIMIT`]), or for SSE the first event with output. Used by
/// workers and hedge threads alike; it never touches the client.
pub fn run_to_commit(
    b: &Balancer,
    outgoing: &Outgoing<'_>,
    host: &Arc<Host>,
    key: Option<&Arc<Key>>,
    deadline: Instant,
) -> Result<Ready, AttemptError> {
    let t = &b.config.settings.timeouts;
    let _busy = host.busy(); // moved into `Ready`: counted until the body is passed on
    let sent = Instant::now();
    let first_output = (sent + t.first_byte).min(deadline);
    watch::set_deadline(Some(first_output));
    // A host with its own model names gets the body with only `model` changed.
    let renamed = if host.spec.models.is_empty() {
        None
    } else {
        model::rewrite_model(outgoing.body, &host.spec.models)
    };
    let outgoing = match &renamed {
        Some(body) => Outgoing { body, ..*outgoing },
        None => *outgoing,
    };
    let response = upstream::send(&b.agent, host, key.map(|k| &**k), &outgoing)?;
    _busy.first_byte();
    let head_at = Instant::now();
    let first_byte = head_at.saturating_duration_since(sent);
    let status = response.status().as_u16();
    metrics::mark_head(status);
    if status < 200 {
        // ureq consumes interim answers (100, 103); one that comes back is a
        // 101 nobody asked for (`Upgrade` is never forwarded). Passed on, it
        // would tell the client its connection switched protocols.
        return Err(upstream::failure(
            Outcome::Broken,
            &format!("status {status} as a final answer"),
            host,
        ));
    }
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.as_bytes())
        .filter(|v| valid_value(v))
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or("")
        .to_string();
    if (300..400).contains(&status) && status != 304 {
        return Err(redirected(&response, status, host, key));
    }
    // Beside a Transfer-Encoding the Content-Length is not the body's
    // (RFC 9112 6.3; ureq frames such a body by its chunks): never declared.
    let length = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .filter(|_| !response.headers().contains_key(header::TRANSFER_ENCODING))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if retry::decide(Outcome::Status(status)).retry {
        let retry_after = cooldowns::retry_after(response.headers());
        // Read the error (bounded): it may be the last word, and a body read
        // to its end lets the connection go back to the pool.
        watch::set_deadline(Some((Instant::now() + t.idle).min(deadline)));
        let mut body = response.into_body().into_reader();
        let mut body =
            read_bounded(&mut body, ERROR_BODY_LIMIT).map_or_else(|_| Vec::new(), |(b, _)| b);
        if let Some(k) = key {
            keys::redact(&mut body, k);
        }
        return Err(AttemptError::Failed(Failed {
            outcome: Outcome::Status(status),
            detail: format!("{}: status {status}", host.spec.name),
            retry_after,
            error_body: Some(body),
        }));
    }
    let sse = (200..300).contains(&status) && is_sse(&content_type);
    let mut reader = response.into_body().into_reader();
    let mut held = Vec::new();
    let mut chunk = ReadBuf::take();
    let mut preamble = Preamble::default();
    if sse {
        watch::set_deadline(Some(first_output));
    }
    loop {
        if !sse {
            watch::set_deadline(Some((Instant::now() + t.idle).min(deadline)));
        }
        let n = reader
            .read(&mut chunk)
            .map_err(|e| upstream::classify_read(e, host))?;
        if n == 0 {
            if sse {
                return Err(upstream::failure(
                    Outcome::Broken,
                    "stream ended before any output",
                    host,
                ));
            }
            break;
        }
        if sse {
            match preamble.push(&chunk[..n]) {
                Preview::Hold => continue,
                Preview::Error(msg) => {
                    // Quoted in the final error and the log: it may quote the key.
                    let mut msg = msg.into_bytes();
                    if let Some(k) = key {
                        keys::redact(&mut msg, k);
                    }
                    return Err(upstream::failure(
                        Outcome::Broken,
                        &format!(
                            "error event before output: {}",
                            String::from_utf8_lossy(&msg)
                        ),
                        host,
                    ));
                }
                Preview::Commit => {
                    held = preamble.take();
                    break;
                }
            }
        }
        held.extend_from_slice(&chunk[..n]);
        if held.len() >= JSON_HOLD_LIMIT {
            break;
        }
    }
    let ended = !sse && held.len() < JSON_HOLD_LIMIT;
    if let (true, true, Some(k)) = (ended, status >= 400, key) {
        // A whole error answer is passed through, so it may quote the key
        // (one too large to hold is masked as it goes, see `Relay`).
        keys::redact(&mut held, k);
    }
    Ok(Ready {
        host: host.clone(),
        key: key.cloned(),
        status,
        content_type,
        length,
        sse,
        held,
        rest: (!ended).then_some(reader),
        first_byte,
        head_at,
        idle: t.idle,
        hedged: false,
        busy: _busy,
    })
}

/// Whether a response's `Content-Type` says SSE: `text/event-stream` in
/// any case, parameters or not (compared in place: this runs on every
/// response).
fn is_sse(content_type: &str) -> bool {
    const SSE: &[u8] = b"text/event-stream";
    content_type
        .trim_start()
        .as_bytes()
        .get(..SSE.len())
        .is_some_and(|t| t.eq_ignore_ascii_case(SSE))
}

/// Longest part of a redirect's `Location` quoted in the attempt's detail.
const LOCATION_SHOWN: usize = 200;

/// A redirect as an attempt's answer: a failure of the host, never passed
/// on. It says the URL in `hosts.json` is not the node's (`http://` for an
/// `https://` node, a moved path); the client could not follow it anyway,
/// as only `Content-Type` is passed back, and a client that did would leave
/// the balancer and its keys behind. The detail (the 502's last word) says
/// where it pointed.
fn redirected(
    response: &ureq::http::Response<ureq::Body>,
    status: u16,
    host: &Host,
    key: Option<&Arc<Key>>,
) -> AttemptError {
    let mut location = response
        .headers()
        .get("location")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    if let Some(cut) = location
        .char_indices()
        .nth(LOCATION_SHOWN)
        .map(|(at, _)| at)
    {
        location.truncate(cut);
        location.push_str("...");
    }
    if let Some(k) = key {
        // A node may echo what it was sent; the detail reaches the client.
        let mut bytes = location.into_bytes();
        keys::redact(&mut bytes, k);
        location = String::from_utf8_lossy(&bytes).into_owned();
    }
    let what = if location.is_empty() {
        format!("status {status} (a redirect without Location): check the host's URL in hosts.json")
    } else {
        format!("status {status} redirecting to {location}: use that URL in hosts.json")
    };
    upstream::failure(Outcome::Broken, &what, host)
}

/// Send what `ready` holds and pass the rest of its body through.
fn commit(
    ready: Ready,
    retry: Option<RetryTicket<'_>>,
    out: &mut Responder<'_, TcpStream>,
    trail: &mut Trail,
) -> Result<Delivered, AttemptError> {
    let (name, hedged) = (ready.host.spec.name.clone(), ready.hedged);
    // Past this point the answer is the host's: a client that leaves
    // abandons it, and the log still names who served it.
    match pass_on(ready, retry, out, trail) {
        Err(AttemptError::ClientGone) => Ok(Delivered::Abandoned {
            host: name,
            hedged,
            first_failed: None,
        }),
        other => other,
    }
}

fn pass_on(
    ready: Ready,
    retry: Option<RetryTicket<'_>>,
    out: &mut Responder<'_, TcpStream>,
    trail: &mut Trail,
) -> Result<Delivered, AttemptError> {
    // A retry that reached real output is no longer a retry in the budget's
    // sense: its slot frees now, not when its stream ends minutes later.
    drop(retry);
    sync_early(out);
    let Ready {
        host,
        key,
        status,
        content_type,
        length,
        sse,
        held,
        rest,
        idle,
        hedged,
        head_at,
        busy: _busy,
        ..
    } = ready;
    // The head of the answer the client gets: a hedge's arrived on its own
    // thread, so the worker's per-attempt mark does not have it.
    metrics::mark_served_head(head_at);
    let label = status.to_string();
    let push = |trail: &mut Trail| {
        if hedged {
            trail.push_hedge(&host, key.as_deref(), &label);
        } else {
            trail.push(&host, key.as_deref(), &label);
        }
    };
    if out.started() && !sse {
        // A stream committed early (keep-alives sent) got a non-SSE answer:
        // a 2xx body cannot become events, so try another host; an error
        // passed through becomes the final SSE error event.
        if (200..300).contains(&status) {
            return Err(upstream::failure(
                Outcome::Broken,
                "answered a stream request without a stream",
                &host,
            ));
        }
        push(trail);
        let message = serde_json::from_slice::<serde_json::Value>(&held)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&held).into_owned());
        send_error(out, status, "upstream_error", &message);
        return Ok(Delivered::Complete);
    }
    if sse {
        metrics::mark_first_event();
    }
    end_early(out);
    push(trail);
    out.add_header("x-gaia-upstream", &host.spec.name);
    out.add_header("x-gaia-attempts", &trail.0);
    if sse {
        for (name, value) in &SSE_HEADERS[1..] {
            out.add_header(name, value);
        }
    }
    let ct = [("Content-Type", content_type.as_str())];
    let headers: &[(&str, &str)] = if content_type.is_empty() { &[] } else { &ct };
    let Some(mut reader) = rest else {
        // A failed write (the client left, or stopped reading past
        // writeTimeoutMs) is the client's doing: counted and logged as 499.
        let sent = match length {
            Some(n) if out.head_only() && held.is_empty() => out.start_sized(status, headers, n),
            _ => out.send(status, headers, &held),
        };
        return match sent {
            Ok(()) => Ok(Delivered::Complete),
            Err(_) => Err(AttemptError::ClientGone),
        };
    };
    let mut relay = match key.as_deref() {
        _ if sse => Relay::Events(Events::default()),
        Some(k) if status >= 400 => Relay::Masked(keys::Redactor::new(k)),
        _ => Relay::Plain,
    };
    // An HTTP/1.0 client has no chunked coding to show a cut: declare the
    // upstream's length instead (unless masking a key changes it).
    let sized = length.filter(|_| matches!(relay, Relay::Plain) && !out.chunked());
    let started = out.started()
        || match sized {
            Some(n) => out.start_sized(status, headers, n).is_ok(),
            None => out.start_stream(status, headers).is_ok(),
        };
    if !started || relay.pass(&held, out).is_err() {
        return Err(AttemptError::ClientGone);
    }
    drop(held);
    let mut chunk = ReadBuf::take();
    let name = host.spec.name.clone();
    pump(
        &mut reader,
        &mut chunk,
        relay,
        idle,
        out,
        &host,
        move |out, why, before| {
            if sse {
                let mut event = before.to_vec();
                event.extend_from_slice(&stream_error_event(&name, why));
                let _ = out.chunk(&event);
                let _ = out.finish();
                out.close_after();
            } else {
                out.abort();
            }
        },
    )
}

/// Read up to `limit` bytes; `Ok(true)` when the body ended within it.
fn read_bounded(reader: &mut impl Read, limit: usize) -> std::io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::new();
    let mut chunk = ReadBuf::take();
    while buf.len() < limit {
        let n = reader.read(&mut chunk)?;
        if n == 0 {
            return Ok((buf, true));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((buf, false))
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

/// How a committed body goes on to the client.
enum Relay {
    /// As it comes.
    Plain,
    /// An error body too large to hold, with the key masked as it goes.
    Masked(keys::Redactor),
    /// A stream, in whole events (see [`Events`]).
    Events(Events),
}

impl Relay {
    /// Pass `data` on, as far as it may go now.
    fn pass(&mut self, data: &[u8], out: &mut Responder<'_, TcpStream>) -> std::io::Result<()> {
        match self {
            Relay::Plain => out.chunk(data),
            Relay::Masked(r) => out.chunk(&r.push(data)),
            Relay::Events(e) => e.pass(data, |d| out.chunk(d)),
        }
    }

    /// The body ended cleanly: pass on what was held back.
    fn finish(&mut self, out: &mut Responder<'_, TcpStream>) -> std::io::Result<()> {
        match self {
            Relay::Plain => Ok(()),
            Relay::Masked(r) => out.chunk(&r.finish()),
            Relay::Events(e) => out.chunk(&e.finish()),
        }
    }

    /// The body was cut: drop what was held back; what must precede a final event.
    fn cut(&mut self) -> &'static [u8] {
        match self {
            Relay::Events(e) => e.cut(),
            _ => b"",
        }
    }
}

/// After the commit: copy every upstream chunk to the client at once,
/// through `relay`. `on_cut` ends the client response when the upstream
/// fails, after the bytes [`Relay::cut`] says must come first.
fn pump(
    reader: &mut impl Read,
    chunk: &mut [u8],
    mut relay: Relay,
    idle: Duration,
    out: &mut Responder<'_, TcpStream>,
    host: &Host,
    on_cut: impl FnOnce(&mut Responder<'_, TcpStream>, &str, &[u8]),
) -> Result<Delivered, AttemptError> {
    loop {
        watch::set_deadline(Some(Instant::now() + idle));
        match reader.read(chunk) {
            Ok(0) => {
                return if relay.finish(out).is_ok() && out.finish().is_ok() {
                    Ok(Delivered::Complete)
                } else {
                    Err(AttemptError::ClientGone)
                };
            }
            Ok(n) => {
                if relay.pass(&chunk[..n], out).is_err() {
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
                on_cut(out, &why, relay.cut());
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
    /// A hedge attempt on `host` won and its body reached the client.
    Hedged {
        host: String,
        /// It was cut off after the commit.
        cut: bool,
        /// How the first attempt failed while the hedge ran (`None`: outrun).
        first_failed: Option<Outcome>,
    },
    /// The upstream failed after the commit; the client saw the cut.
    Cut(String),
    /// The client went away after the commit; `host` had served it.
    Abandoned {
        host: String,
        /// `host` served a hedge attempt.
        hedged: bool,
        /// How the first attempt failed while the hedge ran (`None`: outrun).
        first_failed: Option<Outcome>,
    },
}

/// Metrics hook: count one attempt on `host` by how it ended. A client that
/// left says nothing about the host, so that attempt gets no outcome.
fn observe(b: &Balancer, host: &Host, begun: Instant, result: &Result<Delivered, AttemptError>) {
    let outcome = match result {
        // Refined by the head's status: a 4xx passed through is status_4xx.
        Ok(Delivered::Complete) => Some(metrics::AttemptOutcome::Ok),
        Ok(Delivered::Cut(_)) => Some(metrics::AttemptOutcome::Broken),
        Err(AttemptError::Failed(f) | AttemptError::Recorded(f)) => {
            Some(metrics::AttemptOutcome::of(f.outcome))
        }
        // Outrun by its hedge, which then failed (counted on its own host).
        Err(AttemptError::HedgeFailed(_)) => None,
        // Outrun by its hedge: the host was only slower, not wrong. A client
        // that left says nothing about the host either.
        // A first attempt that failed while its hedge ran counts as failed.
        Ok(Delivered::Hedged { first_failed, .. } | Delivered::Abandoned { first_failed, .. }) => {
            first_failed.map(metrics::AttemptOutcome::of)
        }
        Err(_) => None,
    };
    // This host's answer went to the client (a hedge that won is counted
    // on its own host, in `commit_hedge`).
    let served = matches!(
        result,
        Ok(Delivered::Complete | Delivered::Cut(_) | Delivered::Abandoned { hedged: false, .. })
    );
    b.metrics.attempt(b, host, begun, outcome, served);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_is_known_by_its_content_type_in_any_case() {
        for (ct, sse) in [
            ("text/event-stream", true),
            (" Text/Event-Stream; charset=utf-8", true),
            ("TEXT/EVENT-STREAM", true),
            ("text/event-streams", true),
            ("text/event-strea", false),
            ("application/json", false),
            ("", false),
            ("text/event-streä", false),
            ("téxt/event-stream", false),
        ] {
            let before = ct
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream");
            assert_eq!(is_sse(ct), sse, "{ct:?}");
            assert_eq!(before, sse, "{ct:?}: as the allocating test said");
        }
    }
}
