//! Which endpoint a request is for, and who may call it.
//!
//! Decided from the request head alone, before any body is read, so a
//! rejected request never costs a body read: unknown path 404, wrong method
//! 405, protected mode 403, missing or wrong client key 401, admin endpoints
//! without the admin key 401 (each 401 with a Bearer `WWW-Authenticate`),
//! or, with no admin key set, from a peer other than loopback 403. Keys are
//! compared in constant time. `/status` and `/metrics` follow the admin rule: with
//! `adminKey` set they need `Authorization: Bearer <adminKey>` from any peer,
//! loopback included; without it they answer loopback peers only.

use std::net::IpAddr;

use crate::config::Settings;
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
    /// `GET /v1/models`, answered from model discovery (client rules of `/v1/*`).
    Models,
    /// `GET /metrics` (admin).
    Metrics,
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
    /// `WWW-Authenticate` header for 401 (RFC 9110 requires one).
    pub challenge: Option<&'static str>,
}

fn reject(status: u16, code: &'static str, message: impl Into<String>) -> Rejection {
    Rejection {
        status,
        code,
        message: message.into(),
        allow: None,
        challenge: None,
    }
}

/// The challenges of the two 401s: both keys go in `Authorization: Bearer`,
/// and the realms tell a client which of them was asked for.
const CLIENT_CHALLENGE: &str = "Bearer realm=\"gaia-balancer\"";
const ADMIN_CHALLENGE: &str = "Bearer realm=\"gaia-balancer admin\"";

/// Methods forwarded on `/v1/*` paths.
pub const PROXIED_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
const PROXIED_ALLOW: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// `.` or `..`, also percent-encoded (`%2e`), which an upstream may decode
/// and resolve to a path outside `/v1/`; whatever follows a `;` (a path
/// parameter) is not part of the name.
fn is_dot_segment(seg: &str) -> bool {
    let mut rest = seg.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() && rest[0] != b';' {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1] == b'2' && rest[2] | 0x20 == b'e' {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// Whether a `/v1/*` path has a `.` or `..` segment as an upstream may see
/// it: besides `/`, a backslash (WHATWG URL parsers, Node among them, read
/// it as `/`) and an encoded `/` or `\` (`%2f`, `%5c`, which nginx decodes
/// before resolving dot segments) separate segments, and a `;` path
/// parameter (`..;`, which Tomcat and Jetty read as `..`) is not part of the
/// segment's name. One pass, no allocation: this runs on every request.
fn has_dot_segment(path: &str) -> bool {
    let bytes = path.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        let encoded = bytes.len() - i >= 3
            && bytes[i] == b'%'
            && ((bytes[i + 1] == b'2' && bytes[i + 2] | 0x20 == b'f')
                || (bytes[i + 1] == b'5' && bytes[i + 2] | 0x20 == b'c'));
        let width = if encoded {
            3
        } else if matches!(bytes[i], b'/' | b'\\') {
            1
        } else {
            i += 1;
            continue;
        };
        if is_dot_segment(&path[start..i]) {
            return true;
        }
        i += width;
        start = i;
    }
    is_dot_segment(&path[start..])
}

/// The path part of a request target.
pub fn path_of(target: &str) -> &str {
    // Bytes, not chars: both are ASCII, and a char search costs more than
    // the rest of routing.
    let end = target
        .bytes()
        .position(|b| b == b'?' || b == b'#')
        .unwrap_or(target.len());
    &target[..end]
}

/// The warning for a start that listens beyond loopback in protected mode:
/// every client that can now connect gets 403 until `clientKeys` or `open`
/// is set, which an operator following `--bind 0.0.0.0` should learn from
/// the log at start, not from the first remote client (as Redis warns).
pub fn protected_mode_warning(settings: &Settings) -> Option<String> {
    if settings.open || !settings.client_keys.is_empty() || is_loopback(settings.bind) {
        return None;
    }
    Some(format!(
        "listening on {} in protected mode: clients other than loopback get 403 \
         until balancer.json sets \"clientKeys\" (or \"open\": true on a trusted network)",
        settings.bind
    ))
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
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
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
                ..reject(
                    405,
                    "method_not_allowed",
                    format!("{path} accepts GET only"),
                )
            })
        }
    };
    let route = match path {
        "/healthz" => return get_only(Route::Healthz),
        "/readyz" => return get_only(Route::Readyz),
        "/status" => get_only(Route::Status)?,
        "/metrics" => get_only(Route::Metrics)?,
        p if p == "/v1" || p.starts_with("/v1/") => {
            if has_dot_segment(p) || p.contains("//") {
                return Err(reject(
                    400,
                    "invalid_path",
                    "path segments '.', '..' and empty segments are not allowed",
                ));
            }
            // A NUL names nothing, and a C-string upstream would cut the
            // path there (after the pool key was added).
            if p.as_bytes().windows(3).any(|w| w == b"%00") {
                return Err(reject(
                    400,
                    "invalid_path",
                    "an encoded NUL (%00) is not allowed in a path",
                ));
            }
            if !PROXIED_METHODS.contains(&head.method.as_str()) {
                // TRACE would echo the client's headers (keys included);
                // CONNECT is not for an API; anything else the upstream
                // client cannot send, and no host is to blame for that.
                return Err(Rejection {
                    allow: Some(PROXIED_ALLOW),
                    ..reject(
                        405,
                        "method_not_allowed",
                        format!("/v1/* accepts {PROXIED_ALLOW}"),
                    )
                });
            }
            if p == "/v1/models" && head.method != "GET" {
                return Err(Rejection {
                    allow: Some("GET"),
                    ..reject(405, "method_not_allowed", "/v1/models accepts GET only")
                });
            }
            if p == "/v1/models" && settings.discovery_interval.is_some() {
                Route::Models
            } else {
                Route::Proxy
            }
        }
        _ => {
            return Err(reject(
                404,
                "not_found",
                format!("no endpoint at {path}; the API is under /v1/"),
            ))
        }
    };
    if matches!(route, Route::Status | Route::Metrics) {
        return match (&settings.admin_key, bearer(head)) {
            (Some(key), Some(token)) if same_secret(key, token) => Ok(route),
            (Some(_), _) => Err(Rejection {
                challenge: Some(ADMIN_CHALLENGE),
                ..reject(401, "invalid_admin_key", "this endpoint needs Authorization: Bearer <adminKey>")
            }),
            (None, _) if is_loopback(peer) => Ok(route),
            (None, _) => Err(reject(403, "admin_loopback_only", "admin endpoints answer loopback clients only; set adminKey in balancer.json to allow remote access")),
        };
    }
    if !settings.client_keys.is_empty() {
        let ok =
            bearer(head).is_some_and(|t| settings.client_keys.iter().any(|k| same_secret(k, t)));
        return if ok {
            Ok(route)
        } else {
            Err(Rejection {
                challenge: Some(CLIENT_CHALLENGE),
                ..reject(
                    401,
                    "invalid_api_key",
                    "missing or unknown client key: send Authorization: Bearer <one of clientKeys>",
                )
            })
        };
    }
    if !settings.open && !is_loopback(peer) {
        return Err(reject(403, "protected_mode", "gaia-balancer is in protected mode: it serves loopback clients only because no clientKeys are configured. Add \"clientKeys\": [\"...\"] to balancer.json (clients then send Authorization: Bearer <key>), or set \"open\": true to serve everyone without keys"));
    }
    Ok(route)
}

/// The answer to `/healthz` (200 while the process serves) or, with
/// `ready`, to `/readyz` ([`readiness`]).
pub fn health(shared: &Shared, b: &Balancer, ready: bool) -> (u16, &'static str) {
    if ready {
        readiness(shared, b)
    } else {
        (200, "ok\n")
    }
}

/// Body of `GET /readyz`: status and text.
pub fn readiness(shared: &Shared, b: &Balancer) -> (u16, &'static str) {
    if shared.draining() {
        (503, "draining\n")
    } else if !b.hosts.any_routable() {
        (503, "no routable host\n")
    } else {
        (200, "ready\n")
    }
}

/// How a key looks in `/status`.
fn key_json(k: &crate::keys::Key, now: std::time::Instant) -> serde_json::Value {
    let st = k.state();
    let cooling = st
        .cooldown
        .until(now)
        .map(|u| u.duration_since(now).as_secs_f64());
    let state = if st.disabled {
        "disabled"
    } else if cooling.is_some() {
        "cooling"
    } else {
        "active"
    };
    serde_json::json!({ "key": k.masked(), "state": state, "cooldownSeconds": cooling })
}

/// Body of `GET /status`.
pub fn status_json(shared: &Shared, b: &Balancer) -> Vec<u8> {
    use crate::hosts::HostState;
    use std::sync::atomic::Ordering::Relaxed;
    let now = std::time::Instant::now();
    let hosts: Vec<serde_json::Value> = b
        .hosts
        .all()
        .iter()
        .map(|h| {
            let series = b.series.get(h.index);
            let latency = series.and_then(|s| s.latency());
            let health = h.health();
            let cooling = health
                .cooldown
                .until(now)
                .map(|u| u.duration_since(now).as_secs_f64());
            let (state, ejected_for) = match health.state {
                HostState::Up if cooling.is_some() => ("cooling", None),
                HostState::Up => ("up", None),
                HostState::Ejected(until) if until > now => {
                    ("ejected", Some(until.duration_since(now).as_secs_f64()))
                }
                HostState::Ejected(_) | HostState::Probing => ("probing", None),
            };
            // A key kept off this host alone (a 429 or a first 401/403 here).
            let pairs: Vec<serde_json::Value> = health
                .pairs
                .iter()
                .filter_map(|(k, c)| Some((h.keys.keys().get(*k)?, c.until(now)?)))
                .map(|(k, until)| {
                    let secs = until.duration_since(now).as_secs_f64();
                    serde_json::json!({ "key": k.masked(), "cooldownSeconds": secs })
                })
                .collect();
            let own_keys = h.spec.api_keys.as_ref().map(|_| {
                h.keys
                    .keys()
                    .iter()
                    .map(|k| key_json(k, now))
                    .collect::<Vec<_>>()
            });
            serde_json::json!({
                "name": h.spec.name,
                "url": h.spec.base_url,
                "weight": h.spec.weight,
                "backup": h.spec.backup,
                "state": state,
                "inFlight": h.in_flight.load(Relaxed),
                "successes": h.successes.load(Relaxed),
                "failures": h.failures.load(Relaxed),
                "consecutiveFailures": health.consecutive,
                "ejections": health.ejections,
                "ejectedSeconds": ejected_for,
                "cooldownSeconds": cooling,
                "lastFailure": health.last_failure,
                "models": h.catalog.models(),
                "keys": own_keys,
                "pairCooldowns": pairs,
                "attempts": series.map(|s| s.attempts()),
                "latencyMs": latency.map(|(avg, _)| (avg * 1e6).round() / 1e3),
                "lastLatencyMs": latency.map(|(_, last)| (last * 1e6).round() / 1e3),
            })
        })
        .collect();
    let keys: Vec<serde_json::Value> = b.keys.keys().iter().map(|k| key_json(k, now)).collect();
    let loaded = b
        .loaded_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let body = serde_json::json!({
        "uptimeSeconds": shared.started.elapsed().as_secs(),
        "draining": shared.draining(),
        "strategy": b.config.settings.strategy.as_str(),
        "hosts": hosts,
        "keys": keys,
        "totals": {
            "hosts": b.hosts.all().len(),
            "ejected": b.hosts.ejected(),
            "requests": shared.metrics.proxied_requests(),
            "requestsInFlight": shared.metrics.requests_in_flight(),
            "queueDepth": shared.metrics.queue_depth(),
            "retries": shared.budget.retries(),
            "retriesInFlight": shared.budget.retrying(),
            "budgetRefusals": shared.budget.refusals(),
        },
        "config": {
            "dir": b.config.dir.display().to_string(),
            "generation": b.generation,
            "loadedAtUnixSeconds": loaded,
            "loadedSecondsAgo": b.loaded_at.elapsed().map_or(0, |d| d.as_secs()),
            "reloads": shared.reload.applied(),
            "reloadErrors": shared.reload.failed(),
            "lastReloadError": shared.reload.last_error(),
        },
    });
    let mut out = body.to_string().into_bytes();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, HostSpec};
    use crate::request::Framing;

    fn balancer(tweak: impl FnOnce(&mut Settings)) -> Balancer {
        let mut settings = Settings::default();
        tweak(&mut settings);
        Balancer::new(Config {
            dir: "t".into(),
            hosts: vec![HostSpec {
                name: "a".into(),
                base_url: "http://127.0.0.1:9".into(),
                weight: 1,
                backup: false,
                api_keys: None,
                models: Default::default(),
            }],
            api_keys: vec![],
            settings,
        })
    }

    fn head(method: &str, target: &str, auth: Option<&str>) -> Head {
        Head {
            method: method.into(),
            target: target.into(),
            minor_version: 1,
            headers: auth
                .map(|a| ("Authorization", a.as_bytes()))
                .into_iter()
                .collect(),
            framing: Framing::None,
            keep_alive: true,
            expect_continue: false,
        }
    }

    const REMOTE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 7));
    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn protected_mode_refuses_remote_clients_without_client_keys() {
        let b = balancer(|_| {});
        let h = head("POST", "/v1/chat/completions", None);
        let rej = route(&b, &h, REMOTE).unwrap_err();
        assert_eq!(rej.status, 403);
        assert!(rej.message.contains("clientKeys"), "{}", rej.message);
        assert_eq!(route(&b, &h, LOCAL), Ok(Route::Proxy));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(route(&b, &h, mapped), Ok(Route::Proxy));
        // Health probes are not protected.
        assert_eq!(
            route(&b, &head("GET", "/healthz", None), REMOTE),
            Ok(Route::Healthz)
        );
    }

    #[test]
    fn listening_beyond_loopback_in_protected_mode_is_warned_at_start() {
        let with = |tweak: fn(&mut Settings)| {
            let mut s = Settings::default();
            tweak(&mut s);
            protected_mode_warning(&s)
        };
        assert_eq!(with(|_| {}), None, "127.0.0.1: nobody else can connect");
        let said = with(|s| s.bind = "0.0.0.0".parse().unwrap()).unwrap();
        assert!(said.contains("0.0.0.0") && said.contains("403"), "{said}");
        assert!(
            said.contains("clientKeys") && said.contains("open"),
            "{said}"
        );
        assert_eq!(
            with(|s| {
                s.bind = "0.0.0.0".parse().unwrap();
                s.client_keys = vec!["ck-1".into()];
            }),
            None
        );
        assert_eq!(
            with(|s| {
                s.bind = "::".parse().unwrap();
                s.open = true;
            }),
            None
        );
    }

    #[test]
    fn open_mode_and_client_keys_let_remote_clients_in() {
        let open = balancer(|s| s.open = true);
        let h = head("POST", "/v1/embeddings", None);
        assert_eq!(route(&open, &h, REMOTE), Ok(Route::Proxy));
        let keyed = balancer(|s| s.client_keys = vec!["ck-1".into()]);
        assert_eq!(route(&keyed, &h, REMOTE).unwrap_err().status, 401);
        assert_eq!(
            route(&keyed, &h, LOCAL).unwrap_err().status,
            401,
            "keys apply to loopback too"
        );
        let with = head("POST", "/v1/embeddings", Some("Bearer ck-1"));
        assert_eq!(route(&keyed, &with, REMOTE), Ok(Route::Proxy));
        let wrong = head("POST", "/v1/embeddings", Some("Bearer ck-2"));
        assert_eq!(route(&keyed, &wrong, REMOTE).unwrap_err().status, 401);
    }

    #[test]
    fn admin_endpoints_need_the_admin_key_or_loopback() {
        let b = balancer(|_| {});
        assert_eq!(
            route(&b, &head("GET", "/status", None), LOCAL),
            Ok(Route::Status)
        );
        assert_eq!(
            route(&b, &head("GET", "/status", None), REMOTE)
                .unwrap_err()
                .status,
            403
        );
        let keyed = balancer(|s| s.admin_key = Some("admin-secret".into()));
        assert_eq!(
            route(&keyed, &head("GET", "/status", None), LOCAL)
                .unwrap_err()
                .status,
            401
        );
        let ok = head("GET", "/status", Some("Bearer admin-secret"));
        assert_eq!(route(&keyed, &ok, REMOTE), Ok(Route::Status));
        // /metrics follows the same rule.
        assert_eq!(
            route(&b, &head("GET", "/metrics", None), LOCAL),
            Ok(Route::Metrics)
        );
        assert_eq!(
            route(&b, &head("GET", "/metrics", None), REMOTE)
                .unwrap_err()
                .status,
            403
        );
        let ok = head("GET", "/metrics", Some("Bearer admin-secret"));
        assert_eq!(route(&keyed, &ok, REMOTE), Ok(Route::Metrics));
    }

    #[test]
    fn paths_and_methods() {
        let b = balancer(|_| {});
        assert_eq!(
            route(&b, &head("GET", "/", None), LOCAL)
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            route(&b, &head("GET", "/v2/x", None), LOCAL)
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            route(&b, &head("POST", "/v1/models", None), LOCAL)
                .unwrap_err()
                .status,
            405
        );
        assert_eq!(
            route(&b, &head("GET", "/v1/models?x=1", None), LOCAL),
            Ok(Route::Models)
        );
        let off = balancer(|s| s.discovery_interval = None);
        assert_eq!(
            route(&off, &head("GET", "/v1/models", None), LOCAL),
            Ok(Route::Proxy),
            "discovery off: forwarded"
        );
        assert_eq!(
            route(&b, &head("GET", "/v1/models", None), REMOTE)
                .unwrap_err()
                .status,
            403,
            "the client rules of /v1/* apply"
        );
        assert_eq!(
            route(&b, &head("POST", "/v1/../admin", None), LOCAL)
                .unwrap_err()
                .status,
            400
        );
        for encoded in [
            "/v1/%2e%2e/admin",
            "/v1/.%2E/x",
            "/v1/chat/%2e",
            "/v1/a/%2E%2e",
            "/v1/..%2fadmin",
            "/v1/%2E%2E%2Fadmin",
            "/v1/..\\admin",
            "/v1/x/%2e%5c",
            "/v1/..;/admin",
            "/v1/..;x=1/admin",
            "/v1/models%00/x",
            "/v1/chat/completions%00.json",
        ] {
            let refused = route(&b, &head("POST", encoded, None), LOCAL);
            assert_eq!(refused.map_err(|r| r.status), Err(400), "{encoded}");
        }
        for fine in [
            "/v1/...",
            "/v1/a.b",
            "/v1/%2e%2ex",
            "/v1/%2",
            "/v1/%5",
            "/v1/models/org%2Fname",
            "/v1/a..%2fb",
            "/v1/x;y",
        ] {
            let ok = route(&b, &head("POST", fine, None), LOCAL);
            assert_eq!(ok, Ok(Route::Proxy), "{fine}");
        }
        assert_eq!(PROXIED_ALLOW, PROXIED_METHODS.join(", "));
        for method in PROXIED_METHODS {
            let ok = route(&b, &head(method, "/v1/files", None), LOCAL);
            assert_eq!(ok, Ok(Route::Proxy), "{method}");
        }
        for method in ["TRACE", "CONNECT", "FOO", "PROPFIND", "get"] {
            let refused = route(&b, &head(method, "/v1/files", None), LOCAL).unwrap_err();
            assert_eq!((refused.status, refused.allow), (405, Some(PROXIED_ALLOW)));
        }
        assert_eq!(
            route(&b, &head("PUT", "/healthz", None), LOCAL)
                .unwrap_err()
                .allow,
            Some("GET, HEAD")
        );
    }
}
