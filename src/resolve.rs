//! Name resolution for the upstream agent, off the request path.
//!
//! ureq asks its resolver for the address of every request, pooled
//! connection or not, and its default resolver asks the OS each time, on a
//! new thread when a timeout is set. For a host given by name (every Gaia
//! node) that was a lookup and a thread per request: through `localhost`
//! (answered from `/etc/hosts`) 0.20 of nginx's throughput at 16
//! connections and 8.4× its CPU per request, against 0.79 and 1.67× with
//! this cache (`bench/run.sh --host-name localhost`); a remote DNS server
//! adds its round trip to every request, and a slow one piles up a blocked
//! thread per request. Here IP literals are answered at once and names come from a
//! process-wide cache, looked up again in the background.
//!
//! Guarantees: at most one lookup per name runs at a time, each on its own
//! short-lived thread; a request waits for DNS only while a name has no
//! address yet, and then no longer than its resolve timeout and never past
//! its watch (client gone, deadline, hedge due); addresses once known are
//! used until a lookup gives others, so a DNS outage does not take down
//! hosts whose addresses are known.

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::time::Duration as UreqDuration;
use ureq::unversioned::transport::NextTimeout;
use ureq::Error;

use crate::config::default_port;
use crate::transport;

/// How long a name's addresses serve before the next request that uses
/// them starts a lookup (in the background: requests go on using them).
pub const REFRESH: Duration = Duration::from_secs(30);
/// After a failed lookup, the pause before the next one for the same name;
/// meanwhile requests use the addresses known, or fail at once without any.
pub const RETRY: Duration = Duration::from_secs(1);
/// Names no request has asked for this long are forgotten (hosts a reload removed).
const FORGET: Duration = Duration::from_secs(3600);
/// Most addresses kept per name and family (ureq takes no more of the
/// family it wants).
const MOST: usize = 16;

thread_local! {
    /// When this thread's request began waiting for a name's first lookup.
    static WAITED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// When the current thread's last resolution began waiting for a lookup
/// (`None`: it was answered at once); taken, so asked once, by the connect
/// that follows, which counts the wait against the same `connectMs`.
pub fn take_waited() -> Option<Instant> {
    WAITED.with(Cell::take)
}

/// A blocking name lookup: the OS's, or a test's stand-in.
type Lookup = Box<dyn Fn(&str) -> io::Result<Vec<IpAddr>> + Send + Sync>;

/// Answers IP literals directly and names from [`Names`].
#[derive(Debug)]
pub struct CachedResolver {
    names: Arc<Names>,
}

impl Default for CachedResolver {
    fn default() -> Self {
        CachedResolver {
            names: Arc::clone(names()),
        }
    }
}

/// The process's name cache, shared by every agent (reloads keep it).
fn names() -> &'static Arc<Names> {
    static NAMES: OnceLock<Arc<Names>> = OnceLock::new();
    NAMES.get_or_init(|| Names::new(Box::new(os_lookup), REFRESH))
}

fn os_lookup(name: &str) -> io::Result<Vec<IpAddr>> {
    Ok((name, 0).to_socket_addrs()?.map(|a| a.ip()).collect())
}

/// Start looking up the names among `base_urls` that are not known yet, so
/// the first requests to them find their addresses ready.
pub fn warm<'a>(base_urls: impl Iterator<Item = &'a str>) {
    for url in base_urls {
        if let Some((host, _)) = url.parse::<Uri>().ok().as_ref().and_then(target) {
            if host.parse::<IpAddr>().is_err() {
                names().prefetch(host);
            }
        }
    }
}

/// The host name `uri` names, when it is a name and not an IP literal.
pub fn name_of(uri: &Uri) -> Option<Arc<str>> {
    let (host, _) = target(uri)?;
    host.parse::<IpAddr>().is_err().then(|| Arc::from(host))
}

/// The addresses the cache holds for `name` now, with `port`: no lookup and
/// no wait (empty when none is known).
pub fn known(name: &str, port: u16) -> Vec<SocketAddr> {
    names().known(name, port)
}

/// The host (brackets of an IPv6 literal removed) and port `uri` names.
fn target(uri: &Uri) -> Option<(&str, u16)> {
    let authority = uri.authority()?;
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = authority
        .port_u16()
        .or_else(|| uri.scheme_str().and_then(default_port))?;
    Some((host, port))
}

impl Resolver for CachedResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, Error> {
        WAITED.with(|w| w.set(None));
        let Some((host, port)) = target(uri) else {
            return Err(Error::HostNotFound);
        };
        let mut out = self.empty();
        let family = config.ip_family();
        let mut keep = |ip: IpAddr| {
            let addr = SocketAddr::new(ip, port);
            if family.keep_wanted(std::iter::once(addr)).next().is_some() {
                let _ = out.try_push(addr);
            }
        };
        match host.parse::<IpAddr>() {
            Ok(ip) => keep(ip),
            Err(_) => {
                let by = match timeout.after {
                    UreqDuration::Exact(d) => Instant::now().checked_add(d),
                    UreqDuration::NotHappening => None,
                };
                self.names.addresses(host, by, timeout.reason, &mut keep)?;
            }
        }
        if out.is_empty() {
            Err(Error::HostNotFound)
        } else {
            Ok(out)
        }
    }
}

/// Why the last lookup of a name gave no address.
#[derive(Debug, Clone)]
enum Failure {
    /// The lookup succeeded with no address.
    NoAddress,
    /// The OS's error, kept as its kind and words (`io::Error` is not `Clone`).
    Io(io::ErrorKind, String),
}

impl Failure {
    fn error(&self) -> Error {
        match self {
            Failure::NoAddress => Error::HostNotFound,
            // Marked, it counts as a connect failure like a refused port.
            Failure::Io(kind, text) => Error::Io(transport::unreachable(
                "name resolution",
                io::Error::new(*kind, text.clone()),
            )),
        }
    }
}

/// What is known of one name.
#[derive(Debug)]
struct Entry {
    /// The addresses of the last lookup that found any (empty: none yet).
    ips: Vec<IpAddr>,
    /// A lookup is running.
    looking: bool,
    /// When the next lookup may start (`None`: now).
    next_lookup: Option<Instant>,
    /// Why the last lookup found nothing, if it did.
    failure: Option<Failure>,
    /// When a request last asked.
    used_at: Instant,
}

/// Names and their addresses, with at most one lookup per name under way.
pub struct Names {
    lookup: Lookup,
    refresh: Duration,
    table: Mutex<HashMap<String, Entry>>,
    /// Signalled when a lookup ends.
    done: Condvar,
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Names").finish_non_exhaustive()
    }
}

impl Names {
    fn new(lookup: Lookup, refresh: Duration) -> Arc<Names> {
        Arc::new(Names {
            lookup,
            refresh,
            table: Mutex::new(HashMap::new()),
            done: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // Every state is valid, so a panic elsewhere leaves nothing to repair.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn known(&self, name: &str, port: u16) -> Vec<SocketAddr> {
        self.lock().get(name).map_or_else(Vec::new, |e| {
            e.ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()
        })
    }

    /// For tests: `name` resolves to `ips`, and is not looked up for a day.
    #[cfg(test)]
    pub(crate) fn remember(name: &str, ips: Vec<IpAddr>) {
        let now = Instant::now();
        names().lock().insert(
            name.to_owned(),
            Entry {
                ips,
                looking: false,
                next_lookup: now.checked_add(Duration::from_secs(86_400)),
                failure: None,
                used_at: now,
            },
        );
    }

    /// Start a lookup of `name` if one is due, without waiting for it.
    fn prefetch(self: &Arc<Self>, name: &str) {
        let mut table = self.lock();
        self.entry(&mut table, name, Instant::now());
    }

    /// `name`'s entry, marked as used at `now`, with a lookup started if one
    /// is due; `None` only if the table cannot hold it.
    fn entry<'t>(
        self: &Arc<Self>,
        table: &'t mut HashMap<String, Entry>,
        name: &str,
        now: Instant,
    ) -> Option<&'t mut Entry> {
        if !table.contains_key(name) {
            table.retain(|_, e| e.looking || now.saturating_duration_since(e.used_at) < FORGET);
            table.insert(
                name.to_owned(),
                Entry {
                    ips: Vec::new(),
                    looking: false,
                    next_lookup: None,
                    failure: None,
                    used_at: now,
                },
            );
        }
        let entry = table.get_mut(name)?;
        entry.used_at = now;
        if !entry.looking && entry.next_lookup.is_none_or(|at| now >= at) {
            entry.looking = true;
            let names = Arc::clone(self);
            let owned = name.to_owned();
            let started = thread::Builder::new()
                .name("dns-lookup".into())
                .spawn(move || {
                    let result = (names.lookup)(&owned);
                    names.learn(&owned, result);
                });
            if let Err(e) = started {
                entry.looking = false;
                entry.next_lookup = now.checked_add(RETRY);
                entry.failure = Some(Failure::Io(
                    e.kind(),
                    format!("cannot start a lookup thread: {e}"),
                ));
            }
        }
        Some(entry)
    }

    /// Give `name`'s addresses to `keep`, waiting (until `by`, and within the
    /// thread's watch) only while none is known and a lookup runs.
    fn addresses(
        self: &Arc<Self>,
        name: &str,
        by: Option<Instant>,
        reason: ureq::Timeout,
        keep: &mut impl FnMut(IpAddr),
    ) -> Result<(), Error> {
        let mut table = self.lock();
        loop {
            let now = Instant::now();
            let Some(entry) = self.entry(&mut table, name, now) else {
                return Err(Error::HostNotFound);
            };
            if !entry.ips.is_empty() {
                entry.ips.iter().copied().for_each(&mut *keep);
                return Ok(());
            }
            if !entry.looking {
                let failure = entry.failure.clone().unwrap_or(Failure::NoAddress);
                return Err(failure.error());
            }
            if WAITED.with(Cell::get).is_none() {
                WAITED.with(|w| w.set(Some(now)));
            }
            let mut slice = crate::watch::next_wake();
            if let Some(by) = by {
                let left = by.saturating_duration_since(now);
                if left.is_zero() {
                    return Err(Error::Timeout(reason));
                }
                slice = slice.min(left);
            }
            table = self
                .done
                .wait_timeout(table, slice)
                .map_or_else(|e| e.into_inner().0, |(t, _)| t);
            // Outside the lock: the watch may launch a hedge, which resolves too.
            drop(table);
            if let Some(why) = crate::watch::interruption() {
                return Err(Error::Io(why));
            }
            table = self.lock();
        }
    }

    /// Record the end of a lookup of `name` and wake whoever waits for it.
    fn learn(&self, name: &str, result: io::Result<Vec<IpAddr>>) {
        let now = Instant::now();
        let mut table = self.lock();
        if let Some(entry) = table.get_mut(name) {
            entry.looking = false;
            match result {
                Ok(mut ips) if !ips.is_empty() => {
                    // Per family, before the agent's family is picked: the
                    // first sixteen of a longer list may all be of the other.
                    let (mut v4, mut v6) = (0, 0);
                    ips.retain(|ip| {
                        let n = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
                        *n += 1;
                        *n <= MOST
                    });
                    if ips != entry.ips {
                        log::debug!("{name} resolves to {ips:?}");
                    }
                    if entry.failure.take().is_some() && !entry.ips.is_empty() {
                        log::info!("looking up {name} works again");
                    }
                    entry.ips = ips;
                    entry.next_lookup = now.checked_add(self.refresh);
                }
                other => {
                    let failure = match other {
                        Err(e) => Failure::Io(e.kind(), e.to_string()),
                        Ok(_) => Failure::NoAddress,
                    };
                    if entry.failure.is_none() {
                        let known = if entry.ips.is_empty() {
                            ""
                        } else {
                            "; its last known addresses stay in use"
                        };
                        log::warn!("looking up {name} failed: {}{known}", failure.error());
                    }
                    entry.failure = Some(failure);
                    entry.next_lookup = now.checked_add(RETRY);
                }
            }
        }
        drop(table);
        self.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    const V4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);

    fn resolver(names: &Arc<Names>) -> CachedResolver {
        CachedResolver {
            names: Arc::clone(names),
        }
    }

    fn within(ms: u64) -> NextTimeout {
        NextTimeout {
            after: UreqDuration::Exact(Duration::from_millis(ms)),
            reason: ureq::Timeout::Resolve,
            ..NextTimeout::default()
        }
    }

    fn ask(r: &CachedResolver, url: &str, ms: u64) -> Result<Vec<SocketAddr>, Error> {
        let uri: Uri = url.parse().expect("a test URL");
        r.resolve(&uri, &Config::default(), within(ms))
            .map(|a| a.iter().copied().collect())
    }

    /// A lookup that counts its calls and answers from `answer`.
    fn counting(
        answer: impl Fn(usize) -> io::Result<Vec<IpAddr>> + Send + Sync + 'static,
    ) -> (Arc<AtomicUsize>, Lookup) {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let lookup: Lookup = Box::new(move |_| answer(seen.fetch_add(1, Ordering::SeqCst)));
        (calls, lookup)
    }

    /// A counting lookup that answers `127.0.0.1` once released (or after 10 s).
    fn gated() -> (mpsc::Sender<()>, Arc<AtomicUsize>, Lookup) {
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let (calls, lookup) = counting(move |_| {
            let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(10));
            Ok(vec![V4])
        });
        (release, calls, lookup)
    }

    /// Wait (bounded) until `cond` holds.
    fn until(cond: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < end, "condition not reached in 10 s");
            thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn literals_are_answered_without_a_lookup() {
        let (calls, lookup) = counting(|_| Ok(vec![V4]));
        let r = resolver(&Names::new(lookup, REFRESH));
        let v6: SocketAddr = "[::1]:9000".parse().unwrap();
        assert_eq!(ask(&r, "http://[::1]:9000/v1", 0).unwrap(), vec![v6]);
        let addr: SocketAddr = "10.0.0.2:443".parse().unwrap();
        assert_eq!(ask(&r, "https://10.0.0.2/v1", 0).unwrap(), vec![addr]);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_name_is_looked_up_once_for_many_requests_and_ports() {
        let (calls, lookup) = counting(|_| Ok(vec![V4, V6]));
        let r = resolver(&Names::new(lookup, REFRESH));
        for _ in 0..100 {
            let got = ask(&r, "http://node.example:8080/v1/models", 5_000).unwrap();
            assert_eq!(got, vec![(V4, 8080).into(), (V6, 8080).into()]);
        }
        let got = ask(&r, "https://node.example/v1", 5_000).unwrap();
        assert_eq!(got[0], (V4, 443).into());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn requests_arriving_during_the_first_lookup_share_it() {
        let (release, calls, lookup) = gated();
        let names = Names::new(lookup, REFRESH);
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let r = resolver(&names);
                thread::spawn(move || ask(&r, "http://slow.example:1/", 10_000))
            })
            .collect();
        until(|| calls.load(Ordering::SeqCst) == 1);
        release.send(()).unwrap();
        for w in waiters {
            assert_eq!(w.join().unwrap().unwrap(), vec![(V4, 1).into()]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_wait_for_a_lookup_is_told_to_the_connect_once() {
        let (release, calls, lookup) = gated();
        let r = resolver(&Names::new(lookup, REFRESH));
        let asker = thread::spawn(move || {
            let before = Instant::now();
            let got = ask(&r, "http://first.example/", 10_000);
            let waited = take_waited();
            // Answered from the cache now: no wait to tell.
            let again = ask(&r, "http://first.example/", 10_000);
            (before, got, waited, take_waited(), again)
        });
        // The asker started the lookup under the table's lock and holds it
        // until it waits, so its wait is under way before the answer can land.
        until(|| calls.load(Ordering::SeqCst) == 1);
        release.send(()).unwrap();
        let (before, got, waited, after_cached, again) = asker.join().unwrap();
        assert!(got.is_ok() && again.is_ok());
        let waited = waited.expect("the wait was recorded");
        assert!(waited >= before);
        assert_eq!(after_cached, None);
    }

    #[test]
    fn a_hung_first_lookup_ends_the_wait_at_the_timeout() {
        let (_release, calls, lookup) = gated();
        let r = resolver(&Names::new(lookup, REFRESH));
        for _ in 0..2 {
            match ask(&r, "http://hung.example/", 50) {
                Err(Error::Timeout(ureq::Timeout::Resolve)) => {}
                other => panic!("expected a resolve timeout, got {other:?}"),
            }
        }
        // The second request waited for the same lookup instead of starting one.
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_wait_for_the_first_lookup_ends_with_the_threads_watch() {
        let (_release, _, lookup) = gated();
        let r = resolver(&Names::new(lookup, REFRESH));
        let _watch = crate::watch::start(None);
        crate::watch::set_deadline(Some(Instant::now() + Duration::from_millis(50)));
        let started = Instant::now();
        assert!(matches!(
            ask(&r, "http://watched.example/", 10_000),
            Err(Error::Io(_))
        ));
        assert_eq!(crate::watch::aborted(), Some(crate::watch::Abort::Deadline));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn stale_addresses_serve_while_the_refresh_runs_and_when_it_fails() {
        let (calls, lookup) = counting(|n| match n {
            0 => Ok(vec![V4]),
            1 => Err(io::Error::other("SERVFAIL")),
            _ => Ok(vec![V6]),
        });
        // Everything is due for a refresh at once; failures pause RETRY.
        let r = resolver(&Names::new(lookup, Duration::ZERO));
        assert_eq!(ask(&r, "http://n.example:1/", 5_000).unwrap()[0].ip(), V4);
        // Due again: answered from the cache at once, the refresh (which fails) behind it.
        assert_eq!(ask(&r, "http://n.example:1/", 5_000).unwrap()[0].ip(), V4);
        until(|| calls.load(Ordering::SeqCst) == 2 && !r.names.lock()["n.example"].looking);
        // The failed refresh kept the old address and paused lookups.
        assert_eq!(ask(&r, "http://n.example:1/", 5_000).unwrap()[0].ip(), V4);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Once the pause is over, the next lookup's answer replaces it.
        r.names.lock().get_mut("n.example").unwrap().next_lookup = None;
        ask(&r, "http://n.example:1/", 5_000).unwrap();
        until(|| ask(&r, "http://n.example:1/", 5_000).unwrap()[0].ip() == V6);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_name_that_never_resolved_fails_as_unreachable_without_a_new_lookup_per_request() {
        let (calls, lookup) = counting(|n| match n {
            0 => Err(io::Error::other("failed to lookup address information")),
            _ => Ok(Vec::new()),
        });
        let r = resolver(&Names::new(lookup, REFRESH));
        for _ in 0..3 {
            match ask(&r, "http://gone.example/", 5_000) {
                Err(Error::Io(e)) => assert!(transport::is_unreachable(&e), "{e}"),
                other => panic!("expected an unreachable error, got {other:?}"),
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // After the pause, a lookup that finds no address is "host not found".
        r.names.lock().get_mut("gone.example").unwrap().next_lookup = None;
        assert!(matches!(
            ask(&r, "http://gone.example/", 5_000),
            Err(Error::HostNotFound)
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_agents_ip_family_filters_cached_addresses() {
        let (_, lookup) = counting(|_| Ok(vec![V6, V4]));
        let r = resolver(&Names::new(lookup, REFRESH));
        let uri: Uri = "http://dual.example:7/".parse().unwrap();
        let config = Config::builder()
            .ip_family(ureq::config::IpFamily::Ipv4Only)
            .build();
        let got = r.resolve(&uri, &config, within(5_000)).unwrap();
        assert_eq!(
            got.iter().copied().collect::<Vec<_>>(),
            vec![(V4, 7).into()]
        );
    }

    #[test]
    fn names_unused_for_an_hour_are_forgotten_when_a_new_one_comes() {
        let (_, lookup) = counting(|_| Ok(vec![V4]));
        let names = Names::new(lookup, REFRESH);
        let r = resolver(&names);
        ask(&r, "http://old.example/", 5_000).unwrap();
        let Some(long_ago) = Instant::now().checked_sub(FORGET + Duration::from_secs(1)) else {
            return; // a clock too young to go back an hour: nothing to test
        };
        names.lock().get_mut("old.example").unwrap().used_at = long_ago;
        ask(&r, "http://new.example/", 5_000).unwrap();
        let table = names.lock();
        assert!(!table.contains_key("old.example"));
        assert!(table.contains_key("new.example"));
    }

    #[test]
    fn the_wanted_family_is_kept_when_a_name_has_more_than_sixteen_addresses() {
        // Twenty IPv6 addresses first (as RFC 6724 orders them), then one IPv4.
        let mut many: Vec<IpAddr> = (1..=20u16)
            .map(|i| IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i)))
            .collect();
        many.push(V4);
        let (_, lookup) = counting(move |_| Ok(many.clone()));
        let r = resolver(&Names::new(lookup, REFRESH));
        let uri: Uri = "http://many.example:7/".parse().unwrap();
        let v4_only = Config::builder()
            .ip_family(ureq::config::IpFamily::Ipv4Only)
            .build();
        let got = r.resolve(&uri, &v4_only, within(5_000)).unwrap();
        assert_eq!(
            got.iter().copied().collect::<Vec<_>>(),
            vec![(V4, 7).into()]
        );
        // Any family: the first sixteen, in order, as ureq's own resolver gives.
        let got = r.resolve(&uri, &Config::default(), within(5_000)).unwrap();
        assert_eq!(got.len(), MOST);
        assert!(got.iter().all(|a| a.is_ipv6()));
    }
}
