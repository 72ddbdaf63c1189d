//! Name resolution for the upstream agent without a thread per request.
//!
//! ureq resolves the host of every request, pooled connection or not, and
//! its default resolver enforces `timeout_resolve` by spawning a thread for
//! each lookup. For a host given as an IP address (the usual case for local
//! nodes, and every benchmark) that thread was the largest single cost of a
//! proxied request: a clone, a stack mapping and several futex waits, to
//! parse a literal. Literals are answered here directly; names still go
//! through ureq's resolver, unchanged, timeout and all.

use std::net::{IpAddr, SocketAddr};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;
use ureq::Error;

use crate::transport;

/// IP literals answered at once; names delegated to [`DefaultResolver`].
#[derive(Debug, Default)]
pub struct LiteralFirst {
    names: DefaultResolver,
}

/// The address of `uri` when its host is an IP literal with a known port.
fn literal(uri: &Uri) -> Option<SocketAddr> {
    let authority = uri.authority()?;
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip: IpAddr = host.parse().ok()?;
    let port = authority.port_u16().or(match uri.scheme_str()? {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    })?;
    Some(SocketAddr::new(ip, port))
}

impl Resolver for LiteralFirst {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, Error> {
        let Some(addr) = literal(uri) else {
            // The OS's lookup error arrives as plain I/O; marked, it counts
            // as a connect failure like a refused port.
            return self
                .names
                .resolve(uri, config, timeout)
                .map_err(|e| match e {
                    Error::Io(io) => Error::Io(transport::unreachable("name resolution", io)),
                    other => other,
                });
        };
        let mut out = self.empty();
        for a in config.ip_family().keep_wanted(std::iter::once(addr)) {
            out.push(a);
        }
        if out.is_empty() {
            Err(Error::HostNotFound)
        } else {
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(u: &str) -> Option<SocketAddr> {
        literal(&u.parse().unwrap())
    }

    #[test]
    fn literals_are_parsed_and_names_are_not() {
        assert_eq!(
            lit("http://127.0.0.1:8080/v1/x"),
            Some(([127, 0, 0, 1], 8080).into())
        );
        assert_eq!(lit("http://10.0.0.2/v1"), Some(([10, 0, 0, 2], 80).into()));
        assert_eq!(
            lit("https://10.0.0.2/v1"),
            Some(([10, 0, 0, 2], 443).into())
        );
        assert_eq!(
            lit("http://[::1]:9000/"),
            Some(SocketAddr::new("::1".parse().unwrap(), 9000))
        );
        assert_eq!(lit("https://asia.gaia.domains/v1"), None);
        assert_eq!(lit("http://localhost:8080/"), None);
    }
}
