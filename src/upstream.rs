//! One attempt against one upstream host: the shared ureq agent, the
//! outgoing request, and the translation of ureq's errors into the
//! [`Outcome`](crate::retry::Outcome)s the retry policy understands.
//!
//! Guarantees: one agent (one connection pool) for all workers; status codes
//! come back as responses, never as errors; no proxy is taken from the
//! environment (keys would leak through it), no redirect is followed, no body
//! is decompressed; every wait is bounded (connect here, everything else by
//! the thread's [`watch`](crate::watch) deadline); the client's own
//! `Authorization` never reaches an upstream.

use std::time::Duration;

use ureq::config::AutoHeaderValue;
use ureq::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ureq::http::{self, Method, Response, Uri};
use ureq::unversioned::transport::Connector;
use ureq::{Agent, Body};

use crate::config::Settings;
use crate::hosts::Host;
use crate::keys::Key;
use crate::pool::PoolingConnector;
use crate::request::Headers;
use crate::resolve::CachedResolver;
use crate::retry::Outcome;
use crate::tls::TlsConnector;
use crate::transport::{self, LinkConnector};
use crate::watch::{self, Abort};

/// Largest upstream response head (status line and headers) accepted; a
/// larger one fails the attempt as "response head larger than 16 KiB" (nginx
/// answers 502 "upstream sent too big header" past its 4 or 8 KiB).
pub const RESPONSE_HEAD_LIMIT: usize = 16 * 1024;
/// Most a connection's input buffer grows to (it starts at 4 KiB, see
/// [`crate::transport::LinkBuffers`]). Larger than [`RESPONSE_HEAD_LIMIT`]:
/// ureq only reports a head as too large while the buffer has room for more
/// of it (a full buffer would read as a disconnect instead).
pub const INPUT_BUFFER: usize = 32 * 1024;
/// Output buffer: holds the whole forwarded request head, which is the
/// client's (at most [`MAX_HEAD`](crate::server::MAX_HEAD)) minus the headers
/// we drop, plus ours (`Authorization`, `X-Request-Id`, `Host`,
/// `Content-Length`, `User-Agent`, `Accept-Encoding`). Lent only while a request is sent.
pub const OUTPUT_BUFFER: usize = crate::server::MAX_HEAD + 8 * 1024;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The `Host` header of requests to `base_url`, as ureq would make it (the
/// port only when not the scheme's default), made once per host rather than
/// by ureq per request; `None` leaves it to ureq.
pub fn host_header(base_url: &str) -> Option<HeaderValue> {
    let uri: Uri = base_url.parse().ok()?;
    let host = uri.host()?;
    let default = crate::config::default_port(uri.scheme_str()?)?;
    match uri.port_u16() {
        Some(port) if port != default => HeaderValue::try_from(format!("{host}:{port}")).ok(),
        _ => HeaderValue::try_from(host).ok(),
    }
}

/// How long an upstream connection is kept idle for the next request.
pub const IDLE_FOR: Duration = Duration::from_secs(15);

/// Whether a request header is never forwarded: hop-by-hop, framing, and
/// the client's credentials. Matched on a lowercased copy on the stack
/// (the compiler tests the length, then the bytes): every field of every
/// request is asked, and a search through a list of the names cost some
/// 50 instructions more per field.
fn dropped(name: &str) -> bool {
    // As long as the longest name below; a longer one is none of them.
    let mut buf = [0u8; 19];
    let Some(lower) = buf.get_mut(..name.len()) else {
        return false;
    };
    lower.copy_from_slice(name.as_bytes());
    lower.make_ascii_lowercase();
    matches!(
        &*lower,
        b"host"
            | b"authorization"
            | b"connection"
            | b"keep-alive"
            | b"proxy-connection"
            | b"proxy-authorization"
            | b"te"
            | b"trailer"
            | b"transfer-encoding"
            | b"upgrade"
            | b"content-length"
            | b"expect"
            | b"accept-encoding"
            | b"x-request-id"
            | b"cookie"
    )
}

/// The shared agent, configured as NOTES section 1 says.
pub fn agent(settings: &Settings) -> Agent {
    let per_host = (settings.workers / 2).clamp(4, 256);
    let config = Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .max_redirects(0)
        .no_delay(true)
        .user_agent(AutoHeaderValue::Provided(std::sync::Arc::new(format!(
            "gaia-balancer/{}",
            env!("CARGO_PKG_VERSION")
        ))))
        .accept(AutoHeaderValue::None)
        // No header would mean "any coding" (RFC 9110 12.5.3); bodies pass
        // through without their Content-Encoding and are read (SSE, key
        // masking), so ask for them as they are.
        .accept_encoding(AutoHeaderValue::Provided(std::sync::Arc::new(
            "identity".to_string(),
        )))
        .input_buffer_size(INPUT_BUFFER)
        .output_buffer_size(OUTPUT_BUFFER)
        .max_response_header_size(RESPONSE_HEAD_LIMIT)
        // Idle connections are kept by `pool`, not by ureq (see there why).
        .max_idle_connections(0)
        .timeout_connect(Some(settings.timeouts.connect))
        .timeout_resolve(Some(settings.timeouts.connect))
        // Sending is bounded by these; waiting for output by the watch deadline.
        .timeout_send_request(Some(Duration::from_secs(30)))
        .timeout_send_body(Some(Duration::from_secs(120)))
        .timeout_recv_response(Some(settings.timeouts.first_byte))
        .build();
    // Our TCP transport (cached timeouts, coalesced writes, cheap probes),
    // TLS over it for https hosts, and the watch over both.
    let connector = LinkConnector
        .chain(TlsConnector::new(
            settings.ca_file.as_ref().map_or(&[][..], |c| &c.roots[..]),
        ))
        .chain(watch::WatchConnector);
    let pooled = PoolingConnector::new(connector, per_host, per_host * 16, IDLE_FOR);
    Agent::with_parts(config, pooled, CachedResolver::default())
}

/// What is sent upstream, the same for every attempt of one request (but
/// for the body of a host that renames models).
#[derive(Clone, Copy)]
pub struct Outgoing<'a> {
    /// Request method.
    pub method: &'a str,
    /// Path and query, starting with `/v1/`.
    pub path: &'a str,
    /// The client's headers (filtered here).
    pub headers: &'a Headers,
    /// The body, byte for byte.
    pub body: &'a [u8],
    /// Our request id, sent as `X-Request-Id`.
    pub request_id: &'a str,
}

/// A failed attempt: the outcome for the retry policy plus words for the log.
#[derive(Debug)]
pub struct Failed {
    /// How it failed.
    pub outcome: Outcome,
    /// What happened, for logs and the final error message (no secrets).
    pub detail: String,
    /// The upstream's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
    /// The upstream's error body (bounded), quoted when retrying stops.
    pub error_body: Option<Vec<u8>>,
}

/// Why an attempt produced nothing.
#[derive(Debug)]
pub enum AttemptError {
    /// The host failed; maybe try another.
    Failed(Failed),
    /// The client went away; stop everything.
    ClientGone,
    /// The request cannot be sent to any host (e.g. an unsendable header).
    Invalid(String),
    /// Another attempt of the same request won (a hedge), or this hedge was cancelled.
    Preempted,
    /// A failure already put in the trail and learned from.
    Recorded(Failed),
    /// This attempt was outrun by its hedge, which then failed before its
    /// answer reached the client: the hedge's failure, already put in the
    /// trail and learned from (nothing is blamed on the outrun attempt).
    HedgeFailed(Failed),
}

/// Send one attempt and wait for the response head.
pub fn send(
    agent: &Agent,
    host: &Host,
    key: Option<&Key>,
    out: &Outgoing<'_>,
) -> Result<Response<Body>, AttemptError> {
    // Assembled in place rather than with `http::request::Builder`, which
    // moves the whole request through every call; checked in the builder's
    // order (method, URI, then each header name before its value), so the
    // first invalid part is the one reported, as before.
    let method = Method::from_bytes(out.method.as_bytes()).map_err(invalid)?;
    let uri = Uri::try_from(host.url(out.path)).map_err(invalid)?;
    // Fields the client's `Connection` header names are hop-by-hop too
    // (RFC 9110 section 7.6.1); `close` and `keep-alive` name no field we would send.
    let named: Vec<&[u8]> = out
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive"))
        .collect();
    let mut headers = HeaderMap::with_capacity(out.headers.len() + 3);
    for (name, value) in out.headers.iter() {
        let hop = dropped(name)
            || named
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name.as_bytes()));
        if !hop {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(invalid)?;
            let value = HeaderValue::from_bytes(value).map_err(invalid)?;
            headers.append(name, value);
        }
    }
    let id = HeaderValue::from_str(out.request_id).map_err(invalid)?;
    headers.append(X_REQUEST_ID, id);
    if let Some(value) = &host.host_header {
        headers.append(header::HOST, value.clone());
    }
    if let Some(key) = key {
        let bearer = match key.bearer() {
            Some(value) => value.clone(),
            // Not a valid header value: reported as unsendable.
            None => HeaderValue::try_from(format!("Bearer {}", key.secret())).map_err(invalid)?,
        };
        headers.append(header::AUTHORIZATION, bearer);
    }
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.headers = headers;
    if out.body.is_empty() && matches!(out.method, "GET" | "HEAD" | "DELETE") {
        agent.run(http::Request::from_parts(parts, ()))
    } else {
        agent.run(http::Request::from_parts(parts, out.body))
    }
    .map_err(|e| classify(e, host))
}

fn invalid(e: impl Into<http::Error>) -> AttemptError {
    let e: http::Error = e.into();
    AttemptError::Invalid(format!("request cannot be forwarded: {e}"))
}

/// Translate a ureq error into what the retry policy needs.
pub fn classify(e: ureq::Error, host: &Host) -> AttemptError {
    use ureq::Error as E;
    if let Some(why) = watch::aborted() {
        return match why {
            Abort::ClientGone => AttemptError::ClientGone,
            Abort::Preempted => AttemptError::Preempted,
            Abort::Deadline => failed(Outcome::Timeout, "no response before the deadline", host),
        };
    }
    match e {
        E::Timeout(t) => match t {
            ureq::Timeout::Connect | ureq::Timeout::Resolve => {
                failed(Outcome::Connect, "connect timed out", host)
            }
            other => failed(Outcome::Timeout, &format!("timed out ({other:?})"), host),
        },
        E::HostNotFound => failed(Outcome::Connect, "host name not found", host),
        E::ConnectionFailed => failed(Outcome::Connect, "connection failed", host),
        E::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                failed(Outcome::Connect, "connection refused", host)
            }
            _ if transport::is_unreachable(&io) => failed(Outcome::Connect, &io.to_string(), host),
            _ => failed(Outcome::Broken, &format!("i/o error: {io}"), host),
        },
        E::Rustls(ref tls) => {
            let hint = certificate_hint(tls);
            failed(Outcome::Connect, &format!("TLS failed: {e}{hint}"), host)
        }
        E::Tls(_) | E::Pem(_) => failed(Outcome::Connect, &format!("TLS failed: {e}"), host),
        E::LargeResponseHeader(_, limit) => failed(
            Outcome::Broken,
            &format!("response head larger than {} KiB", limit / 1024),
            host,
        ),
        E::BadUri(_) | E::Http(_) => {
            AttemptError::Invalid(format!("request cannot be forwarded: {e}"))
        }
        other => failed(Outcome::Broken, &format!("{other}"), host),
    }
}

/// What to change for the certificate refusals an operator meets when
/// adding a node with a private CA or a self-signed certificate (README,
/// "Upstream TLS"); rustls names them only by their variant.
fn certificate_hint(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(cert) = e else {
        return "";
    };
    match cert {
        C::UnknownIssuer => {
            " (the certificate does not chain to a trusted root: put the node's CA, \
             or its self-signed certificate, in caFile)"
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            " (the certificate's subjectAltName does not name the host of the URL in hosts.json)"
        }
        // webpki's own error, which rustls carries as an opaque `Other`; its
        // name is the only handle short of depending on webpki directly.
        C::Other(other) if format!("{other:?}").contains("CaUsedAsEndEntity") => {
            " (the node's own certificate is marked as a CA, which rustls refuses: \
             reissue it with basicConstraints=critical,CA:FALSE)"
        }
        _ => "",
    }
}

fn failed(outcome: Outcome, what: &str, host: &Host) -> AttemptError {
    AttemptError::Failed(Failed {
        outcome,
        detail: format!("{}: {what}", host.spec.name),
        retry_after: None,
        error_body: None,
    })
}

/// A failure with no host to blame (the hedge machinery itself).
pub fn failure_text(what: &str) -> AttemptError {
    AttemptError::Failed(Failed {
        outcome: Outcome::Broken,
        detail: what.to_string(),
        retry_after: None,
        error_body: None,
    })
}

/// A failure with an explanation, for outcomes found after the response head.
pub fn failure(outcome: Outcome, what: &str, host: &Host) -> AttemptError {
    failed(outcome, what, host)
}

/// Translate an error while reading a response body.
pub fn classify_read(e: std::io::Error, host: &Host) -> AttemptError {
    if let Some(why) = watch::aborted() {
        return match why {
            Abort::ClientGone => AttemptError::ClientGone,
            Abort::Preempted => AttemptError::Preempted,
            Abort::Deadline => failed(Outcome::Timeout, "upstream went silent", host),
        };
    }
    failed(Outcome::Broken, &format!("response broke off: {e}"), host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_framing_and_credential_fields_are_dropped_in_any_case() {
        for name in [
            "host",
            "authorization",
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "content-length",
            "expect",
            "accept-encoding",
            "x-request-id",
            "cookie",
        ] {
            assert!(dropped(name), "{name}");
            assert!(dropped(&name.to_ascii_uppercase()), "{name}");
        }
        for name in [
            "",
            "t",
            "hosts",
            "content-type",
            "x-request-ids",
            "proxy-authorizations",
            "x-stainless-package-version",
            "accept",
            "user-agent",
        ] {
            assert!(!dropped(name), "{name}");
        }
    }

    #[test]
    fn the_host_header_names_the_port_only_when_it_is_not_the_default() {
        for (url, want) in [
            ("http://127.0.0.1:8080", "127.0.0.1:8080"),
            ("https://asia.gaia.domains", "asia.gaia.domains"),
            ("https://node.example:443/api", "node.example"),
            ("http://node.example:80", "node.example"),
            ("https://node.example:80", "node.example:80"),
            ("http://[::1]:9000/api", "[::1]:9000"),
        ] {
            let got = host_header(url).map(|v| v.to_str().unwrap().to_string());
            assert_eq!(got.as_deref(), Some(want), "{url}");
        }
    }
}
