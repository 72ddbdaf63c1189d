//! Which endpoint a request is for, and who may call it.
//!
//! Decided from the request head alone, before any body is read, so a
//! rejected request never costs a body read: unknown path 404, wrong method
//! 405, protected mode 403, missing or wrong client key 401, admin endpoints
//! without the admin key (or loopback) 403. Client keys are compared in
//! constant time.

use std::net::IpAddr;

use crate::request::Head;
use crate::state::{Balancer, Shared};

/// What a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Any `/v1/*` path: proxied upstream.
    Proxy,
    /// `GET /healthz`.
    Healthz,
    /// `GET /readyz`.
    Readyz,
    /// `GET /status` (admin).
    Status,
}

/// A request refused before its body is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP status.
    pub status: u16,
    /// OpenAI error `code`.
    pub code: &'static str,
    /// What the caller can do about it.
    pub message: String,
    /// `Allow` header for 405.
    pub allow: Option<&'static str>,
}

fn reject(status: u16, code: &'static str, message: impl Into<String>) -> Rejection {
    Rejection {
        status,
        code,
        message: message.into(),
        allow: None,
    }
}

/// The path part of a request target.
pub fn path_of(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or(target)
}

/// True for loopback peers, IPv4-mapped IPv6 included.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

fn bearer(head: &Head) -> Option<&str> {
    let value = head.header_str("authorization")?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Equal without leaking where the first difference is.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decide the route for a request head from `peer`.
pub fn route(b: &Balancer, head: &Head, peer: IpAddr) -> Result<Route, Rejection> {
    let path = path_of(&head.target);
    let settings = &b.config.settings;
    let get_only = |route: Route| {
        if matches!(head.method.as_str(), "GET" | "HEAD") {
            Ok(route)
        } else {
            Err(Rejection {
                allow: Some("GET, HEAD"),
                ..reject(405, "method_not_allowed", format!("{path} accepts GET only"))
            })
        }
    };
    let route = match path {
        "/healthz" => return get_only(Route::Healthz),
        "/readyz" => return get_only(Route::Readyz),
        "/status" => get_only(Route::Status)?,
        p if p == "/v1" || p.starts_with("/v1/") => {
            if p.split('/').any(|seg| seg == "." || seg == "..") || p.contains("//") {
                return Err(reject(400, "invalid_path", "path segments '.', '..' and empty segments are not allowed"));
            }
            if p == "/v1/models" && head.method != "GET" {
                return Err(Rejection {
                    allow: Some("GET"),
                    ..reject(405, "method_not_allowed", "/v1/models accepts GET only")
                });
            }
            Route::Proxy
        }
        _ => {
            return Err(reject(
                404,
                "not_found",
                format!("no endpoint at {path}; the API is under /v1/"),
            ))
        }
    };
    if route == Route::Status {
        return match (&settings.admin_key, bearer(head)) {
            (Some(key), Some(token)) if same_secret(key, token) => Ok(route),
            (Some(_), _) => Err(reject(401, "invalid_admin_key", "this endpoint needs Authorization: Bearer <adminKey>")),
            (None, _) if is_loopback(peer) => Ok(route),
            (None, _) => Err(reject(403, "admin_loopback_only", "admin endpoints answer loopback clients only; set adminKey in balancer.json to allow remote access")),
        };
    }
    if !settings.client_keys.is_empty() {
        let ok = bearer(head).is_some_and(|t| settings.client_keys.iter().any(|k| same_secret(k, t)));
        return if ok {
            Ok(route)
        } else {
            Err(reject(401, "invalid_api_key", "missing or unknown client key: send Authorization: Bearer <one of clientKeys>"))
        };
    }
    if !settings.open && !is_loopback(peer) {
        return Err(reject(403, "protected_mode", "gaia-balancer is in protected mode: it serves loopback clients only because no clientKeys are configured. Add \"clientKeys\": [\"...\"] to balancer.json (clients then send Authorization: Bearer <key>), or set \"open\": true to serve everyone without keys"));
    }
    Ok(route)
}

/// Body of `GET /readyz`: status and text.
pub fn readiness(shared: &Shared, b: &Balancer) -> (u16, &'static str) {
    if shared.draining() {
        (503, "draining\n")
    } else if b.hosts.all().is_empty() {
        (503, "no routable host\n")
    } else {
        (200, "ready\n")
    }
}

/// Body of `GET /status`.
pub fn status_json(shared: &Shared, b: &Balancer) -> Vec<u8> {
    use std::sync::atomic::Ordering::Relaxed;
    let hosts: Vec<serde_json::Value> = b
        .hosts
        .all()
        .iter()
        .map(|h| {
            serde_json::json!({
                "name": h.spec.name,
                "url": h.spec.base_url,
                "weight": h.spec.weight,
                "backup": h.spec.backup,
                "state": "up",
                "inFlight": h.in_flight.load(Relaxed),
                "failures": h.failures.load(Relaxed),
                "successes": h.successes.load(Relaxed),
                "keys": h.spec.api_keys.as_ref().map(|_| h.keys.keys().iter().map(|k| k.masked()).collect::<Vec<_>>()),
            })
        })
        .collect();
    let keys: Vec<serde_json::Value> = b
        .keys
        .keys()
        .iter()
        .map(|k| serde_json::json!({ "key": k.masked(), "state": "active" }))
        .collect();
    let body = serde_json::json!({
        "uptimeSeconds": shared.started.elapsed().as_secs(),
        "draining": shared.draining(),
        "strategy": format!("{:?}", b.config.settings.strategy),
        "hosts": hosts,
        "keys": keys,
    });
    let mut out = body.to_string().into_bytes();
    out.push(b'\n');
    out
}
