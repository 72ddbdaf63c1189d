//! Model discovery: which host serves which model, learned for free from
//! each host's `GET /v1/models` (no tokens spent), and the routing rule built
//! on it.
//!
//! Gaia nodes each serve particular models; without this a request for a
//! model a node lacks costs a round trip and a failover. One thread polls
//! every host of the configuration in force at start and then every
//! `discoveryIntervalMs` (±10 % jitter, so many balancers do not poll in
//! step), with one of the host's own pool keys and a short overall timeout,
//! and keeps per host the set of model ids it last listed in OpenAI list
//! format. Guarantees:
//!
//! - Nothing on the request path calls an upstream for this: routing and
//!   `GET /v1/models` read only what was already learned.
//! - A bad answer (refused, timeout, non-200, not a list, too large) is no
//!   information: the last good list stays, and the host's health and keys
//!   are left alone (many servers do not implement `/v1/models`, or protect
//!   it differently from inference).
//! - Routing for model M: when some host declares M (lists it, or names it in
//!   its `models` map), only hosts that declare M or have not answered yet
//!   are eligible; when none does, every host is (the upstream decides). A
//!   404 whose body says the model is unknown excludes (host, M) until that
//!   host's next discovery round (or one interval, when discovery is off or
//!   failing); excluded hosts are never eligible for M.
//! - An ejected host whose ejection time is over is polled at once, and a
//!   valid list readmits it the way a successful probe request would
//!   (through [`Hosts::record`], so the ejection accounting holds) — without
//!   risking live traffic on it.
//! - Discovery off (`discoveryIntervalMs: 0`): no polling, every host is
//!   eligible for every model (but for 404 exclusions), and `/v1/models` is
//!   forwarded upstream as before.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::hosts::{Host, HostState, Hosts, Verdict};
use crate::rng;
use crate::state::{Balancer, Shared};

/// How often hosts are polled when `discoveryIntervalMs` is not set.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// Longest a whole `/v1/models` exchange may take, connect included.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest model list read (OpenRouter's, with descriptions, is a few MB).
const MAX_LIST_BYTES: u64 = 16 * 1024 * 1024;
/// Most model ids kept per host.
const MAX_MODELS: usize = 10_000;
/// Longest model id kept; longer ones are junk, not names.
const MAX_ID_LEN: usize = 256;
/// Hosts polled at the same time, so that one round is not the sum of
/// every host's timeout.
const PARALLEL: usize = 8;
/// Longest sleep of the discovery thread between looks at its schedule,
/// the drain flag and the configuration generation.
const TICK: Duration = Duration::from_millis(250);
/// Most model-unknown exclusions remembered per host. Clients choose the
/// names, so without a cap a stream of made-up ones would grow the list (and
/// the scan every request makes of it) until the next round.
const MAX_EXCLUDED: usize = 256;
/// Bytes of an error body searched for "model not found" wordings.
const ERROR_SCAN: usize = 4096;
/// Models whose routes a table remembers (see [`Routes`]).
const ROUTES_KEPT: usize = 8;

/// Moves whenever a catalog changes (see [`Catalog::change`]): a route
/// worked out while it had one value holds as long as it keeps it.
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// What one host is known to serve; kept in [`Host::catalog`].
#[derive(Default)]
pub struct Catalog(Mutex<Known>);

/// A model id with its hash, computed once: a request looks its model up in
/// every host's list, and hashing the name once per host cost more than the
/// rest of choosing a host. The hash is keyed with a per-process random key,
/// as std's default is, so upstreams cannot line their ids up on one bucket.
#[derive(Debug, Clone)]
pub struct ModelId {
    hash: u64,
    name: Arc<str>,
}

impl ModelId {
    /// `name`, hashed.
    pub fn new(name: Arc<str>) -> Self {
        static KEY: OnceLock<RandomState> = OnceLock::new();
        let hash = KEY.get_or_init(RandomState::new).hash_one(&*name);
        ModelId { hash, name }
    }
}

impl PartialEq for ModelId {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.name == other.name
    }
}

impl Eq for ModelId {}

impl Hash for ModelId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The hasher of a set of [`ModelId`]s: passes their own hash through.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        // Not reached: a ModelId writes one u64. Still a hash, should it be.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A host's model list.
type Models = HashSet<ModelId, BuildHasherDefault<PassThrough>>;

#[derive(Default)]
struct Known {
    /// The ids of the last valid list; `None` until the host answered once.
    models: Option<Models>,
    /// Models this host said it does not know: (model, since, until).
    excluded: Vec<(Arc<str>, Instant, Instant)>,
}

impl Known {
    fn excludes(&self, model: &str, now: Instant) -> bool {
        self.exclusion_end(model, now).is_some()
    }

    /// When the host stops excluding `model`, if it does at `now`.
    fn exclusion_end(&self, model: &str, now: Instant) -> Option<Instant> {
        self.excluded
            .iter()
            .filter(|(m, _, until)| **m == *model && *until > now)
            .map(|(_, _, until)| *until)
            .max()
    }
}

/// A catalog locked to be changed: dropped (still under the lock), it
/// moves [`EPOCH`], so no remembered route outlives what it was made of.
struct Change<'a>(MutexGuard<'a, Known>);

impl Deref for Change<'_> {
    type Target = Known;
    fn deref(&self) -> &Known {
        &self.0
    }
}

impl DerefMut for Change<'_> {
    fn deref_mut(&mut self) -> &mut Known {
        &mut self.0
    }
}

impl Drop for Change<'_> {
    fn drop(&mut self) {
        EPOCH.fetch_add(1, Ordering::Release);
    }
}

impl fmt::Debug for Catalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = self.lock();
        f.debug_struct("Catalog")
            .field("models", &k.models.as_ref().map(HashSet::len))
            .field("excluded", &k.excluded.len())
            .finish()
    }
}

impl Catalog {
    /// The catalog, locked to be read.
    fn lock(&self) -> MutexGuard<'_, Known> {
        // Every state is valid, so a panic elsewhere leaves nothing to repair.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The catalog, locked to be changed (see [`Change`]).
    fn change(&self) -> Change<'_> {
        Change(self.lock())
    }

    /// The models the host listed last, sorted; `None` before its first answer.
    pub fn models(&self) -> Option<Vec<String>> {
        let k = self.lock();
        let mut ids: Vec<String> = k
            .models
            .as_ref()?
            .iter()
            .map(|m| m.name.to_string())
            .collect();
        ids.sort();
        Some(ids)
    }

    /// Keep `model` off this host until `until` or its next discovery round.
    pub fn exclude(&self, model: &Arc<str>, until: Instant) {
        let now = Instant::now();
        let mut k = self.change();
        k.excluded.retain(|(m, _, u)| *u > now && **m != **model);
        if k.excluded.len() >= MAX_EXCLUDED {
            // The oldest goes: at worst that host is asked about it once more.
            k.excluded.remove(0);
        }
        k.excluded.push((model.clone(), now, until));
    }

    /// A discovery round that started at `started` ended; `listed` is the
    /// valid list it got, if any. Returns true when the list changed.
    fn round(&self, started: Instant, listed: Option<HashSet<Box<str>>>) -> bool {
        let listed: Option<Models> =
            listed.map(|ids| ids.into_iter().map(|id| ModelId::new(id.into())).collect());
        let mut k = self.change();
        // Exclusions learned while the poll was under way are newer news.
        k.excluded.retain(|(_, since, _)| *since > started);
        match listed {
            Some(ids) if k.models.as_ref() != Some(&ids) => {
                k.models = Some(ids);
                true
            }
            _ => false,
        }
    }
}

/// What one host's catalog says of one model, for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It declares the model: it listed it, or its `models` map names it,
    /// and it has not since said it does not know it.
    Declares,
    /// It has not answered a list yet: it may serve anything.
    Unlisted,
    /// Its list lacks the model: it may serve it only when no host declares it.
    Undeclared,
    /// It said it does not know the model: never.
    Excluded,
}

impl Admission {
    /// May the host take a request for the model? `declared`: some host
    /// declares it (health does not matter: an ejected host that serves it
    /// is still the right place once it is back).
    pub fn admits(self, declared: bool) -> bool {
        match self {
            Admission::Declares | Admission::Unlisted => true,
            Admission::Undeclared => !declared,
            Admission::Excluded => false,
        }
    }
}

/// What `host` says of `model`: one look at its catalog, from which a
/// request learns both whether some host declares the model and which
/// hosts may take it.
#[cfg(test)]
pub(crate) fn admission(host: &Host, model: &ModelId, now: Instant) -> Admission {
    admission_until(host, model, now).0
}

/// [`admission`], and when an exclusion it reports ends.
fn admission_until(host: &Host, model: &ModelId, now: Instant) -> (Admission, Option<Instant>) {
    let k = host.catalog.lock();
    if let Some(end) = k.exclusion_end(&model.name, now) {
        (Admission::Excluded, Some(end))
    } else if host.spec.models.contains_key(&*model.name)
        || k.models.as_ref().is_some_and(|m| m.contains(model))
    {
        (Admission::Declares, None)
    } else if k.models.is_none() {
        (Admission::Unlisted, None)
    } else {
        (Admission::Undeclared, None)
    }
}

/// The routes of the last models a host table was asked for. Working a
/// route out locks every host's catalog and looks the model up in it;
/// requests mostly ask for the same few models, and catalogs change about
/// once a discovery interval, so a request reuses the route of an earlier
/// one while no catalog changed and no exclusion it counted has ended.
#[derive(Default)]
pub struct Routes(Mutex<Kept>);

#[derive(Default)]
struct Kept {
    routes: Vec<Route>,
    /// The route replaced next once [`ROUTES_KEPT`] are kept.
    next: usize,
}

/// What the hosts of a table said of one model.
struct Route {
    model: ModelId,
    /// [`EPOCH`] before it was worked out.
    epoch: u64,
    /// The `now` it was worked out for: it holds from then (an exclusion
    /// that had ended by then had ended for any later `now` too)...
    since: Instant,
    /// ...until the first end of an exclusion it counted.
    until: Option<Instant>,
    /// Per host, by index: may it take the model.
    admitted: Arc<[bool]>,
}

impl fmt::Debug for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Routes")
    }
}

impl Routes {
    /// The memo, unless another request is using it: never worth a wait.
    fn try_lock(&self) -> Option<MutexGuard<'_, Kept>> {
        match self.0.try_lock() {
            Ok(kept) => Some(kept),
            // Every state is valid, so a panic elsewhere leaves nothing to repair.
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Per host of `hosts` (by position: the table these routes belong
    /// to), whether it may take a request for `model` at `now` (see
    /// [`Admission::admits`]): remembered, or worked out and remembered.
    pub fn admitted(&self, hosts: &[Arc<Host>], model: &ModelId, now: Instant) -> Arc<[bool]> {
        // Read before the catalogs: a change made while they are read
        // moves it past what the new route records, so that is not kept long.
        let epoch = EPOCH.load(Ordering::Acquire);
        if let Some(kept) = self.try_lock() {
            let holds = |r: &&Route| {
                r.model == *model
                    && r.epoch == epoch
                    && r.since <= now
                    && r.until.is_none_or(|u| now < u)
                    && r.admitted.len() == hosts.len()
            };
            if let Some(r) = kept.routes.iter().find(holds) {
                return r.admitted.clone();
            }
        }
        let mut until: Option<Instant> = None;
        let admissions: Vec<Admission> = hosts
            .iter()
            .map(|host| {
                let (a, end) = admission_until(host, model, now);
                if let Some(end) = end {
                    until = Some(until.map_or(end, |u| u.min(end)));
                }
                a
            })
            .collect();
        let declared = admissions.contains(&Admission::Declares);
        let admitted: Arc<[bool]> = admissions.iter().map(|a| a.admits(declared)).collect();
        // A name no list can hold is junk a client sent: not worth keeping
        // (see `exclude`).
        if model.name.len() > MAX_ID_LEN {
            return admitted;
        }
        let route = Route {
            model: model.clone(),
            epoch,
            since: now,
            until,
            admitted: admitted.clone(),
        };
        if let Some(mut kept) = self.try_lock() {
            let kept = &mut *kept;
            if let Some(old) = kept.routes.iter_mut().find(|r| r.model == *model) {
                *old = route;
            } else if kept.routes.len() < ROUTES_KEPT {
                kept.routes.push(route);
            } else {
                let at = kept.next % ROUTES_KEPT;
                if let Some(slot) = kept.routes.get_mut(at) {
                    *slot = route;
                }
                kept.next = at + 1;
            }
        }
        admitted
    }
}

/// True when any host declares `model` (see [`Admission::admits`]): the
/// old two-pass question, kept for tests to check [`Routes`] against.
#[cfg(test)]
pub(crate) fn declared_anywhere(hosts: &[Arc<Host>], model: &str, now: Instant) -> bool {
    let model = ModelId::new(model.into());
    hosts
        .iter()
        .any(|h| admission(h, &model, now) == Admission::Declares)
}

/// May `host` take a request for `model`? `declared` is
/// [`declared_anywhere`] for the same model. (The request path asks
/// [`Routes::admitted`] instead; this is for tests.)
#[cfg(test)]
pub(crate) fn admits(host: &Host, model: &str, declared: bool, now: Instant) -> bool {
    admission(host, &ModelId::new(model.into()), now).admits(declared)
}

/// True when every host said it does not know `model` (so no attempt can help).
pub fn refused_everywhere(hosts: &Hosts, model: &str) -> bool {
    let now = Instant::now();
    !hosts.all().is_empty()
        && hosts
            .all()
            .iter()
            .all(|h| h.catalog.lock().excludes(model, now))
}

/// Does a 404 body say the requested model is unknown? The wordings of
/// OpenAI and Groq (`model_not_found`, "does not exist"), vLLM and LlamaEdge
/// ("does not exist"), Ollama ("model ... not found"), OpenRouter ("no
/// endpoints found", "not a valid model").
pub fn says_model_unknown(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&body[..body.len().min(ERROR_SCAN)]).to_ascii_lowercase();
    text.contains("model_not_found")
        || text.contains("no endpoints found")
        || (text.contains("model")
            && [
                "not found",
                "does not exist",
                "unknown model",
                "no such model",
                "not a valid model",
            ]
            .iter()
            .any(|p| text.contains(p)))
}

/// Exclude (`host`, `model`) after a model-unknown 404, until the host's next
/// discovery round (bounded by one interval plus jitter).
pub fn exclude(b: &Balancer, host: &Host, model: &Arc<str>) {
    // Discovery keeps no longer id (see `parse_list`), so such a name is
    // junk; remembering and logging it would hold and print whatever a
    // client put in `model`, up to maxBodyBytes, once per host.
    if model.len() > MAX_ID_LEN {
        return;
    }
    let interval = b
        .config
        .settings
        .discovery_interval
        .unwrap_or(DEFAULT_INTERVAL);
    host.catalog
        .exclude(model, Instant::now() + interval + interval / 10);
    log::info!(
        "host {} does not know model {model:?}: not routed there until its next discovery",
        host.spec.name
    );
}

/// Body of `GET /v1/models`: the union over routable hosts (backups
/// included: a model only a backup serves is still served) of the models
/// they listed and the names of their `models` maps, sorted.
pub fn models_json(b: &Balancer) -> Vec<u8> {
    let now = Instant::now();
    // In panic mode ejections are ignored for routing, so here too.
    let panic = b.hosts.panic_mode(now);
    let mut ids: BTreeSet<String> = BTreeSet::new();
    for host in b.hosts.all() {
        let ejected = matches!(host.health().state, HostState::Ejected(until) if until > now);
        if ejected && !panic {
            continue;
        }
        let k = host.catalog.lock();
        let listed = k.models.iter().flatten().map(|m| &*m.name);
        let mapped = host.spec.models.keys().map(String::as_str);
        for id in listed.chain(mapped).filter(|m| !k.excludes(m, now)) {
            if !ids.contains(id) {
                ids.insert(id.to_string());
            }
        }
    }
    let data: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            serde_json::json!({
                "id": id, "object": "model", "created": 0, "owned_by": "gaia-balancer"
            })
        })
        .collect();
    let mut out = serde_json::json!({ "object": "list", "data": data })
        .to_string()
        .into_bytes();
    out.push(b'\n');
    out
}

/// Start the discovery thread. It holds the shared state weakly and ends
/// when the process drains or the state is gone.
pub fn start(shared: &Arc<Shared>) -> io::Result<JoinHandle<()>> {
    let weak = Arc::downgrade(shared);
    thread::Builder::new()
        .name("discovery".into())
        .spawn(move || run(&weak))
}

/// When each host of one configuration generation is polled next.
struct Schedule {
    b: Arc<Balancer>,
    next: Vec<Instant>,
    /// The ejection end already probed, per host, so it is probed once.
    probed: Vec<Option<Instant>>,
}

fn run(weak: &Weak<Shared>) {
    let mut schedule: Option<Schedule> = None;
    loop {
        let b = match weak.upgrade() {
            Some(shared) if !shared.draining() => shared.current(),
            _ => return,
        };
        let now = Instant::now();
        let s = match schedule.take() {
            Some(s) if Arc::ptr_eq(&s.b, &b) => s,
            old => {
                // A new generation (start or reload): poll it all at once;
                // until then its hosts keep what the old ones had learned.
                if let Some(old) = old {
                    carry_over(&old.b.hosts, &b.hosts);
                }
                let n = b.hosts.all().len();
                Schedule {
                    b: b.clone(),
                    next: vec![now; n],
                    probed: vec![None; n],
                }
            }
        };
        let s = schedule.insert(s);
        let Some(interval) = b.config.settings.discovery_interval else {
            thread::sleep(TICK);
            continue;
        };
        let mut due = Vec::new();
        for host in b.hosts.all() {
            let i = host.index;
            let ended = match host.health().state {
                HostState::Ejected(until) if until <= now => Some(until),
                _ => None,
            };
            let probe = ended.is_some() && s.probed.get(i).copied().flatten() != ended;
            if probe || s.next.get(i).is_some_and(|t| *t <= now) {
                if let Some(p) = s.probed.get_mut(i) {
                    *p = ended.or(*p);
                }
                due.push(host.clone());
            }
        }
        poll_all(&b, &due);
        for host in &due {
            if let Some(t) = s.next.get_mut(host.index) {
                *t = Instant::now() + jittered(interval);
            }
        }
        let wake = s.next.iter().min().copied();
        let now = Instant::now();
        let nap = wake.map_or(TICK, |t| t.saturating_duration_since(now).min(TICK));
        thread::sleep(nap.max(Duration::from_millis(5)));
    }
}

/// `interval` ± 10 %.
fn jittered(interval: Duration) -> Duration {
    let tenth = u64::try_from(interval.as_millis() / 10).unwrap_or(u64::MAX / 4);
    let offset = rng::below(tenth.saturating_mul(2).saturating_add(1));
    (interval + Duration::from_millis(offset)).saturating_sub(Duration::from_millis(tenth))
}

/// After a reload, hosts with the same URL keep what was learned about them:
/// their last list and the models they refused. Called when the next
/// generation is built (so it is never without them, even while this
/// thread is busy with a slow poll), and again here (a no-op then).
pub fn carry_over(old: &Hosts, new: &Hosts) {
    for host in new.all() {
        let Some(before) = old
            .all()
            .iter()
            .find(|h| h.spec.base_url == host.spec.base_url)
        else {
            continue;
        };
        if std::ptr::eq(&**before, &**host) {
            continue;
        }
        let (models, excluded) = {
            let k = before.catalog.lock();
            (k.models.clone(), k.excluded.clone())
        };
        let mut k = host.catalog.change();
        if k.models.is_none() {
            k.models = models;
        }
        for e in excluded {
            if !k.excluded.iter().any(|(m, _, _)| *m == e.0) {
                k.excluded.push(e);
            }
        }
    }
}

/// Poll `hosts`, at most [`PARALLEL`] at a time.
fn poll_all(b: &Balancer, hosts: &[Arc<Host>]) {
    for batch in hosts.chunks(PARALLEL) {
        thread::scope(|scope| {
            for host in batch {
                let spawned = thread::Builder::new()
                    .name("discovery-poll".into())
                    .spawn_scoped(scope, || discover(b, host));
                if spawned.is_err() {
                    discover(b, host); // no thread to spare: poll in line
                }
            }
        });
    }
}

/// One discovery round for one host: poll, store, maybe readmit.
fn discover(b: &Balancer, host: &Host) {
    let started = Instant::now();
    let listed = match poll(b, host) {
        Poll::Skipped => return,
        Poll::Failed(why) => {
            log::debug!("discovery: {}: {why}", host.spec.name);
            None
        }
        Poll::Listed(ids) => Some(ids),
    };
    let valid = listed.is_some();
    let count = listed.as_ref().map_or(0, HashSet::len);
    if host.catalog.round(started, listed) {
        log::info!("discovery: {} serves {count} models", host.spec.name);
    }
    if valid {
        readmit(b, host);
    }
}

/// A valid list from a host whose ejection is over readmits it, as the
/// success of its probe request would. Hosts still ejected, hosts already up
/// (their failure count is live traffic's business) and hosts whose probe
/// request is under way are left alone.
fn readmit(b: &Balancer, host: &Host) {
    let due = {
        let h = host.health();
        match h.state {
            HostState::Ejected(until) => until <= Instant::now(),
            HostState::Probing => !h.probe_in_flight,
            HostState::Up => false,
        }
    };
    if due {
        log::info!(
            "discovery: {} answered its model list after its ejection",
            host.spec.name
        );
        // Alive, not Success: a model list proves the host answers, not that
        // it produced output, so it neither counts as a served request nor
        // clears a rate-limit cooldown.
        b.hosts.record(host, Verdict::Alive, false, None);
    }
}

enum Poll {
    /// Not asked (no usable key in the host's pool).
    Skipped,
    /// Asked; the answer says nothing.
    Failed(String),
    /// A valid list.
    Listed(HashSet<Box<str>>),
}

fn poll(b: &Balancer, host: &Host) -> Poll {
    let key = if host.keys.is_empty() {
        None
    } else {
        match host.keys.next(Instant::now(), |_| true) {
            Some(k) => Some(k),
            None => return Poll::Skipped,
        }
    };
    let mut request = b
        .agent
        .get(host.url("/v1/models"))
        .config()
        .timeout_global(Some(POLL_TIMEOUT))
        .build();
    if let Some(k) = &key {
        request = request.header("authorization", format!("Bearer {}", k.secret()));
    }
    let mut response = match request.call() {
        Ok(r) => r,
        Err(e) => return Poll::Failed(e.to_string()),
    };
    let status = response.status().as_u16();
    // Read to the end (bounded) either way: that returns the connection to the pool.
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_LIST_BYTES)
        .read_to_vec();
    match (status, body) {
        (200, Ok(body)) => parse_list(&body).map_or_else(
            || Poll::Failed("the answer is not a model list".into()),
            Poll::Listed,
        ),
        (200, Err(e)) => Poll::Failed(format!("reading the list failed: {e}")),
        (status, _) => Poll::Failed(format!("status {status}")),
    }
}

/// The ids of an OpenAI model list, `{"data": [{"id": "..."}, ...]}`;
/// `None` unless the body is an object with a `data` array. Entries without
/// a usable string `id` are skipped.
pub fn parse_list(body: &[u8]) -> Option<HashSet<Box<str>>> {
    let list: List = serde_json::from_slice(body).ok()?;
    let ids = list
        .data
        .into_iter()
        .filter_map(|e| e.0)
        .filter(|id| id.len() <= MAX_ID_LEN && !id.trim().is_empty())
        .filter(|id| !id.chars().any(char::is_control))
        .take(MAX_MODELS)
        .collect();
    Some(ids)
}

#[derive(Deserialize)]
struct List {
    data: Vec<Entry>,
}

/// One element of `data`: its string `id` if it has one; anything else is
/// read and ignored, so one odd entry does not spoil the list.
struct Entry(Option<Box<str>>);

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Entry, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a model entry")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entry, A::Error> {
                let mut id = None;
                while let Some(key) = map.next_key::<Box<str>>()? {
                    let value: serde_json::Value = if &*key == "id" {
                        map.next_value()?
                    } else {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    };
                    id = value.as_str().map(Box::from);
                }
                Ok(Entry(id))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Entry, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Entry(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Entry, E> {
                Ok(Entry(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Entry, E> {
                Ok(Entry(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Entry, E> {
                Ok(Entry(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Entry, E> {
                Ok(Entry(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Entry, E> {
                Ok(Entry(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Entry, E> {
                Ok(Entry(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostSpec;
    use crate::keys::KeyPool;
    use std::collections::BTreeMap;

    fn table(n: usize) -> Hosts {
        let specs: Vec<HostSpec> = (0..n)
            .map(|i| HostSpec {
                name: format!("h{i}"),
                base_url: format!("http://h{i}"),
                weight: 1,
                backup: false,
                api_keys: None,
                models: BTreeMap::new(),
            })
            .collect();
        Hosts::new(
            &specs,
            &Arc::new(KeyPool::new(&[])),
            crate::config::Strategy::RoundRobin,
        )
    }

    fn ids(list: &[&str]) -> Option<HashSet<Box<str>>> {
        Some(list.iter().map(|s| Box::from(*s)).collect())
    }

    #[test]
    fn parses_openai_lists_and_tolerates_junk() {
        let body = br#"{"object":"list","data":[{"id":"a","object":"model","created":1,"owned_by":"x","meta":{"id":"no"}},{"id":"b"},{"id":7},{"name":"c"},"d",null,[1],{"id":""},{"id":"x\ny"}]}"#;
        assert_eq!(parse_list(body), ids(&["a", "b"]));
        assert_eq!(parse_list(br#"{"data":[]}"#), ids(&[]));
        for junk in [
            &b""[..],
            b"<html>",
            b"[]",
            b"{}",
            b"{\"data\":{}}",
            b"{\"data\":[",
            b"null",
        ] {
            assert_eq!(parse_list(junk), None, "{}", String::from_utf8_lossy(junk));
        }
        let long = format!(
            r#"{{"data":[{{"id":"{}"}},{{"id":"ok"}}]}}"#,
            "x".repeat(300)
        );
        assert_eq!(parse_list(long.as_bytes()), ids(&["ok"]));
    }

    #[test]
    fn model_unknown_wordings() {
        for yes in [
            r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
            r#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","code":404}"#,
            r#"{"error":"model \"llama3\" not found, try pulling it first"}"#,
            r#"{"error":{"message":"No endpoints found for x-ai/grok:free.","code":404}}"#,
            "Unknown model: foo",
        ] {
            assert!(says_model_unknown(yes.as_bytes()), "{yes}");
        }
        for no in [
            r#"{"detail":"Not Found"}"#,
            "404 page not found",
            r#"{"error":{"message":"no"}}"#,
            "",
        ] {
            assert!(!says_model_unknown(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn routing_rule() {
        let hosts = table(3);
        let [a, b, c] = [0, 1, 2].map(|i| hosts.all()[i].clone());
        let now = Instant::now();
        let start = now - Duration::from_secs(1);
        // Nobody answered: every host for every model.
        assert!(!declared_anywhere(hosts.all(), "m", now));
        assert!(admits(&a, "m", false, now));
        a.catalog.round(start, ids(&["m"]));
        b.catalog.round(start, ids(&["n"]));
        let d = declared_anywhere(hosts.all(), "m", now);
        assert!(d);
        assert!(admits(&a, "m", d, now));
        assert!(!admits(&b, "m", d, now), "answered without m");
        assert!(admits(&c, "m", d, now), "not answered: accepts anything");
        // A model nobody declares goes anywhere.
        assert!(!declared_anywhere(hosts.all(), "z", now));
        assert!(admits(&b, "z", false, now));
        // Exclusion: a no longer declares m, so nobody does, but a stays out.
        let m: Arc<str> = Arc::from("m");
        a.catalog.exclude(&m, now + Duration::from_secs(60));
        assert!(!declared_anywhere(hosts.all(), "m", Instant::now()));
        assert!(!admits(&a, "m", false, Instant::now()));
        assert!(admits(&b, "m", false, Instant::now()));
        assert!(!refused_everywhere(&hosts, "m"));
        for h in [&b, &c] {
            h.catalog.exclude(&m, now + Duration::from_secs(60));
        }
        assert!(refused_everywhere(&hosts, "m"));
        // The next round clears exclusions made before it started.
        a.catalog.round(Instant::now(), None);
        assert!(admits(&a, "m", true, Instant::now()));
        assert!(!refused_everywhere(&hosts, "m"));
    }

    #[test]
    fn exclusions_newer_than_the_round_survive_it() {
        let hosts = table(1);
        let a = &hosts.all()[0];
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        a.catalog
            .exclude(&Arc::from("m"), Instant::now() + Duration::from_secs(60));
        a.catalog.round(started, ids(&["m"]));
        assert!(!admits(a, "m", true, Instant::now()));
    }

    /// A remembered route gives what working it out afresh would, after
    /// every list and exclusion change and once an exclusion ends.
    #[test]
    fn remembered_routes_follow_catalog_changes_and_exclusion_ends() {
        let hosts = table(3);
        let [a, b, _] = [0, 1, 2].map(|i| hosts.all()[i].clone());
        let routes = Routes::default();
        let (m, n): (Arc<str>, Arc<str>) = (Arc::from("m"), Arc::from("n"));
        let (mid, nid) = (ModelId::new(m.clone()), ModelId::new(n.clone()));
        // The route of `model` at `at`, checked against the rule host by host.
        let route = |model: &ModelId, at: Instant| {
            let got = routes.admitted(hosts.all(), model, at);
            let declared = declared_anywhere(hosts.all(), &model.name, at);
            let want: Vec<bool> = hosts
                .all()
                .iter()
                .map(|h| admits(h, &model.name, declared, at))
                .collect();
            assert_eq!(*got, *want, "{}", model.name);
            want
        };
        let now = Instant::now();
        let start = now - Duration::from_secs(1);
        assert_eq!(route(&mid, now), [true, true, true], "nobody listed");
        a.catalog.round(start, ids(&["m"]));
        b.catalog.round(start, ids(&["n"]));
        assert_eq!(route(&mid, now), [true, false, true]);
        assert_eq!(route(&nid, now), [false, true, true]);
        assert_eq!(route(&mid, now), [true, false, true], "both kept");
        // Excluded on a for a minute: then nobody declares m.
        let end = Instant::now() + Duration::from_secs(60);
        a.catalog.exclude(&m, end);
        let now = Instant::now();
        assert_eq!(route(&mid, now), [false, true, true]);
        assert_eq!(route(&mid, now), [false, true, true], "remembered");
        // The exclusion ends with no catalog change: a is back.
        assert_eq!(route(&mid, end), [true, false, true]);
        assert_eq!(
            route(&mid, end - Duration::from_secs(1)),
            [false, true, true]
        );
        // A new list.
        b.catalog.round(Instant::now(), ids(&["m", "n"]));
        assert_eq!(route(&mid, end), [true, true, true]);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let i = Duration::from_secs(60);
        for _ in 0..1000 {
            let j = jittered(i);
            assert!(
                j >= Duration::from_secs(54) && j <= Duration::from_secs(66),
                "{j:?}"
            );
        }
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }
}
