//! Hot reload of the config directory: changes to `hosts.json`,
//! `api-keys.json` and `balancer.json`, and to the `caFile` that
//! `balancer.json` names, take effect while running, within [`POLL`] plus
//! [`SETTLE`], without dropping a request.
//!
//! Why polling: it needs no platform API (inotify would need a crate or
//! `unsafe`), it works on every filesystem including Kubernetes' projected
//! volumes (whose atomic symlink swaps many watchers miss), and four small
//! files a second cost nothing. A file's stamp is its length, modification
//! time and a hash of its content; a file that appears or disappears counts
//! as a change, and a stamp must hold still for [`SETTLE`] before it is read,
//! so an editor caught halfway through a write is not reported as an error.
//! The CA file's path comes from `balancer.json` as it is on disk, not from
//! the configuration in force, so that a CA file created after a refused
//! `balancer.json` named it is noticed too.
//!
//! Guarantees: the new configuration goes through `config::load` with the
//! command line's overrides, exactly as at start; if it fails, the old one
//! stays in force and the same message `check` prints is logged once per
//! change (not once per poll). A good one is swapped in atomically
//! ([`Shared::replace`]); requests in flight finish on the generation they
//! took. Hosts whose name and URL are unchanged keep their health, counters
//! and in-flight counts, shared with the old generation so that what its
//! requests still meet counts in the new one ([`Hosts::reloaded`]); the
//! global key pool is kept (keys rejected with 401/403 stay out, cooldowns
//! stay) unless `api-keys.json` changed, in which case a new pool brings
//! every key back.
//! The upstream agent (its connection pool) is kept unless what it was
//! built from changed: the timeouts or the `caFile` certificates. Listener
//! settings (`bind`, `port`, `workers`, `queueSize`,
//! `maxConnectionsPerClient`) cannot change on a live socket and worker
//! pool: a change is logged as needing a restart and the running values
//! stay in force.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{self, Config, Overrides, Settings, API_KEYS_FILE, BALANCER_FILE, HOSTS_FILE};
use crate::discovery;
use crate::hosts::Hosts;
use crate::keys::KeyPool;
use crate::state::{Balancer, Shared};
use crate::upstream;

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_secs(1);
/// How long a changed file must stay the same before it is read.
pub const SETTLE: Duration = Duration::from_millis(100);
/// Longest time the reloader thread goes without looking at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The three files, in the order of [`Stamps`].
const FILES: [&str; 3] = [HOSTS_FILE, API_KEYS_FILE, BALANCER_FILE];
/// Index of `hosts.json` in [`Stamps`].
const HOSTS: usize = 0;
/// Index of `api-keys.json` in [`Stamps`].
const KEYS: usize = 1;
/// Index of `balancer.json` in [`Stamps`].
const BALANCER: usize = 2;
/// Index of the file `caFile` names in [`Stamps`], after the three.
const CA: usize = 3;

/// What a file looked like: `None` when it does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    hash: u64,
}

type Stamps = [Option<Stamp>; 4];

/// The stamp of the file at `path`, from what reading it gave.
fn stamp(path: &Path, read: io::Result<Vec<u8>>) -> Option<Stamp> {
    let mut h = DefaultHasher::new();
    let (len, modified) = match read {
        Ok(bytes) => {
            bytes.hash(&mut h);
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            (bytes.len() as u64, modified)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        // Unreadable: config::load reports it; the error kind is its stamp,
        // so a change of permissions is noticed too.
        Err(e) => {
            e.kind().to_string().hash(&mut h);
            (0, None)
        }
    };
    Some(Stamp {
        len,
        modified,
        hash: h.finish(),
    })
}

fn stamps(dir: &Path) -> Stamps {
    let mut out: Stamps = [None; 4];
    let mut ca = None;
    for (i, name) in FILES.iter().enumerate() {
        let path = dir.join(name);
        // As config::load reads them: a FIFO or a device put in place of a
        // file must not stall this thread (and shutdown, which joins it).
        let read = config::read_config_file(&path);
        if i == BALANCER {
            ca = read
                .as_ref()
                .ok()
                .and_then(|bytes| config::ca_file_named(dir, bytes));
        }
        out[i] = stamp(&path, read);
    }
    // Read as config::load reads it (regular files only, size capped), so a
    // caFile pointing at a device cannot stall this thread.
    out[CA] = ca.and_then(|path| {
        let read = config::read_ca_file(&path);
        stamp(&path, read)
    });
    out
}

/// What the reloader did, for `/status` and the metrics.
#[derive(Debug, Default)]
pub struct ReloadStatus {
    checks: AtomicU64,
    applied: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ReloadStatus {
    /// Polls of the files so far.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// Changes applied so far.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// Changes refused (invalid) so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The message of the change refused last, while no good one followed it.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }
}

/// The settings bound to the socket and the worker pool at start.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listener {
    bind: IpAddr,
    port: u16,
    workers: usize,
    queue_size: usize,
    max_connections_per_client: usize,
}

impl Listener {
    fn of(s: &Settings) -> Self {
        Listener {
            bind: s.bind,
            port: s.port,
            workers: s.workers,
            queue_size: s.queue_size,
            max_connections_per_client: s.max_connections_per_client,
        }
    }

    /// Put the running values back into `s`; describe what differed.
    fn pin(&self, s: &mut Settings) -> Vec<String> {
        let mut changed = Vec::new();
        let mut pin = |name: &str, new: String, old: String| {
            if new != old {
                changed.push(format!("{name} {new} (running: {old})"));
            }
        };
        pin("bind", s.bind.to_string(), self.bind.to_string());
        pin("port", s.port.to_string(), self.port.to_string());
        pin("workers", s.workers.to_string(), self.workers.to_string());
        pin(
            "queueSize",
            s.queue_size.to_string(),
            self.queue_size.to_string(),
        );
        pin(
            "maxConnectionsPerClient",
            s.max_connections_per_client.to_string(),
            self.max_connections_per_client.to_string(),
        );
        s.bind = self.bind;
        s.port = self.port;
        s.workers = self.workers;
        s.queue_size = self.queue_size;
        s.max_connections_per_client = self.max_connections_per_client;
        changed
    }
}

/// What one [`Reloader::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Nothing changed (or the change left the configuration as it was).
    Unchanged,
    /// A file is still changing; looked at again on the next poll.
    Settling,
    /// The change was applied: this generation is in force.
    Applied(u64),
    /// The change is invalid; the configuration in force stays.
    Rejected,
}

/// Watches one config directory and swaps good changes into [`Shared`].
pub struct Reloader {
    shared: Arc<Shared>,
    dir: PathBuf,
    overrides: Overrides,
    listener: Listener,
    /// Stamps last acted on (applied, found unchanged, or refused).
    seen: Option<Stamps>,
    /// Stamps of the configuration in force, once known.
    applied: Option<Stamps>,
    /// The listener changes last logged as needing a restart.
    pending_restart: Vec<String>,
    /// Set by [`Handle::reload_now`] (SIGHUP): the next check reads the
    /// files as if each had been rewritten.
    force: Arc<AtomicBool>,
}

impl Reloader {
    /// A reloader of `dir` (with the command line's `overrides`) for the
    /// server whose state is `shared`; listener settings are those in force now.
    pub fn new(shared: Arc<Shared>, dir: PathBuf, overrides: Overrides) -> Self {
        let listener = Listener::of(&shared.current().config.settings);
        Reloader {
            shared,
            dir,
            overrides,
            listener,
            seen: None,
            applied: None,
            pending_restart: Vec::new(),
            force: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Look at the files once and apply a change if there is a good one.
    ///
    /// The first check always loads the directory and compares the result
    /// with the configuration in force, so a change made between start and
    /// the first poll is not missed.
    pub fn check(&mut self) -> Check {
        self.shared.reload.checks.fetch_add(1, Ordering::Relaxed);
        let now = stamps(&self.dir);
        let forced = self.force.swap(false, Ordering::AcqRel);
        if !forced && self.seen == Some(now) {
            return Check::Unchanged;
        }
        if self.seen.is_some() {
            thread::sleep(SETTLE);
            if stamps(&self.dir) != now {
                if forced {
                    self.force.store(true, Ordering::Release); // still asked for
                }
                return Check::Settling;
            }
        }
        self.seen = Some(now);
        let old = self.shared.current();
        let mut config = match config::load(&self.dir, &self.overrides) {
            Ok(config) => config,
            Err(e) => {
                self.shared.reload.failed.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "invalid configuration: {e}; keeping the configuration in force (generation {})",
                    old.generation
                );
                self.shared.reload.set_error(Some(e.to_string()));
                return Check::Rejected;
            }
        };
        let was_refused = self.shared.reload.last_error().is_some();
        self.shared.reload.set_error(None);
        let restart = self.listener.pin(&mut config.settings);
        if !restart.is_empty() && restart != self.pending_restart {
            log::warn!(
                "configuration change needs a restart to take effect: {}; running values kept",
                restart.join(", ")
            );
        }
        self.pending_restart = restart;
        // A rewritten key file brings its rejected keys back, even unchanged:
        // api-keys.json for the global pool, hosts.json for hosts' own keys.
        let rewritten = |file: usize| {
            forced
                || self
                    .applied
                    .is_some_and(|applied| applied[file] != now[file])
        };
        let files = KeyFiles {
            global: rewritten(KEYS),
            own: rewritten(HOSTS),
        };
        self.applied = Some(now);
        if !files.global && !files.own && config == old.config {
            // A refused change undone: the error logged last is no longer
            // true, and nothing else would say so.
            if was_refused {
                log::info!(
                    "configuration valid again; the one in force (generation {}) is unchanged",
                    old.generation
                );
            }
            return Check::Unchanged;
        }
        let summary = describe(&old.config, &config, files.global);
        let keys_gone = config.api_keys.is_empty() && !old.config.api_keys.is_empty();
        let generation = self.shared.replace(rebuild(&old, config, files));
        self.shared.reload.applied.fetch_add(1, Ordering::Relaxed);
        if keys_gone {
            log::warn!("configuration reloaded (generation {generation}): {summary}");
        } else {
            log::info!("configuration reloaded (generation {generation}): {summary}");
        }
        Check::Applied(generation)
    }

    /// Run [`Reloader::check`] every [`POLL`] on a thread of its own, until
    /// the handle is stopped or dropped, or the server drains.
    pub fn spawn(mut self) -> io::Result<Handle> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let force = self.force.clone();
        let thread = thread::Builder::new()
            .name("reload".into())
            .spawn(move || loop {
                let next = Instant::now() + POLL;
                self.check();
                while Instant::now() < next {
                    if flag.load(Ordering::Relaxed) || self.shared.draining() {
                        return;
                    }
                    if self.force.load(Ordering::Acquire) {
                        break;
                    }
                    thread::sleep(STOP_POLL.min(next.saturating_duration_since(Instant::now())));
                }
            })?;
        Ok(Handle {
            stop,
            force,
            thread: Some(thread),
        })
    }
}

/// A running reloader thread; stopped when dropped.
#[derive(Debug)]
pub struct Handle {
    stop: Arc<AtomicBool>,
    force: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// Re-read the files within [`STOP_POLL`], as if each had been
    /// rewritten: a good configuration is applied even when unchanged, so
    /// keys rejected with 401/403 come back (what SIGHUP asks for).
    pub fn reload_now(&self) {
        self.force.store(true, Ordering::Release);
    }

    /// Stop the thread and wait for it (at most one check).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Which key files were rewritten since the last generation.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyFiles {
    /// `api-keys.json`: the global pool starts afresh.
    pub global: bool,
    /// `hosts.json`: hosts' own pools start afresh.
    pub own: bool,
}

/// The next generation: `config`, with what is unchanged carried over from `old`.
pub fn rebuild(old: &Balancer, config: Config, files: KeyFiles) -> Balancer {
    let keys = if files.global || config.api_keys != old.config.api_keys {
        Arc::new(KeyPool::new(&config.api_keys))
    } else {
        old.keys.clone()
    };
    let strategy = config.settings.strategy;
    let hosts = Hosts::reloaded(&config.hosts, &keys, &old.hosts, strategy, files.own);
    discovery::carry_over(&old.hosts, &hosts);
    let (was, is) = (&old.config.settings, &config.settings);
    let agent = if same_agent(was, is) {
        old.agent.clone()
    } else {
        upstream::agent(is)
    };
    Balancer::from_parts(config, hosts, keys, agent)
}

/// Whether an agent built from `was` serves `is` as well: true unless a
/// setting the agent is built from changed (the trusted roots go into its
/// TLS setup when it is built). Rebuilding drops the idle upstream
/// connections, so it is done only then.
fn same_agent(was: &Settings, is: &Settings) -> bool {
    was.timeouts == is.timeouts && was.workers == is.workers && was.ca_file == is.ca_file
}

/// One line on what a reload changed: hosts added and removed, keys, settings.
fn describe(old: &Config, new: &Config, keys_changed: bool) -> String {
    let mut parts = Vec::new();
    let names = |c: &Config| c.hosts.iter().map(|h| h.name.clone()).collect::<Vec<_>>();
    let (was, is) = (names(old), names(new));
    let added: Vec<&String> = is.iter().filter(|n| !was.contains(n)).collect();
    let removed: Vec<&String> = was.iter().filter(|n| !is.contains(n)).collect();
    if !added.is_empty() {
        parts.push(format!(
            "hosts added: {}",
            added
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !removed.is_empty() {
        parts.push(format!(
            "hosts removed: {}",
            removed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if added.is_empty() && removed.is_empty() && old.hosts != new.hosts {
        parts.push("host settings changed".into());
    }
    let renewed = keys_changed || old.api_keys != new.api_keys;
    // "Any more" only when there were keys: SIGHUP, or an edit of a file of
    // inactive keys, must not report keys lost that never were.
    if renewed && new.api_keys.is_empty() && !old.api_keys.is_empty() {
        parts.push("no active key any more: requests go upstream without Authorization".into());
    } else if renewed && new.api_keys.is_empty() {
        parts.push("still no active key: requests go upstream without Authorization".into());
    } else if renewed {
        parts.push(format!(
            "key file changed ({} active keys, every one in rotation)",
            new.api_keys.len()
        ));
    }
    if old.settings.ca_file != new.settings.ca_file {
        parts.push(match &new.settings.ca_file {
            Some(ca) => format!("caFile {ca}"),
            None => "no caFile any more (built-in roots only)".into(),
        });
    }
    // The CA file can change alone (its own stamp); say "settings" only
    // when something else in balancer.json did.
    let others = Settings {
        ca_file: new.settings.ca_file.clone(),
        ..old.settings.clone()
    };
    if others != new.settings {
        parts.push("balancer.json settings changed".into());
    }
    if parts.is_empty() {
        parts.push("no effective change".into());
    }
    format!("{} hosts; {}", new.hosts.len(), parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{test_roots, HostSpec};
    use crate::hosts::{HostState, Verdict, EJECT_AFTER};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use std::collections::BTreeMap;

    fn spec(name: &str) -> HostSpec {
        HostSpec {
            name: name.into(),
            base_url: format!("http://{name}"),
            weight: 1,
            backup: false,
            api_keys: None,
            models: BTreeMap::new(),
        }
    }

    fn config(hosts: &[&str], keys: &[&str]) -> Config {
        Config {
            dir: "t".into(),
            hosts: hosts.iter().map(|h| spec(h)).collect(),
            api_keys: keys.iter().map(|k| k.to_string()).collect(),
            settings: Settings::default(),
        }
    }

    #[test]
    fn moved_hosts_keep_health_and_share_in_flight() {
        let old = Balancer::new(config(&["a", "b", "c"], &["k-000000000001"]));
        let b = old.hosts.all()[1].clone();
        for _ in 0..EJECT_AFTER {
            old.hosts.record(&b, Verdict::Failure, false, Some("boom"));
        }
        assert_eq!(old.hosts.ejected(), 1);
        let busy = b.busy();
        old.keys.keys()[0].disable();
        // "a" goes away, so "b" moves from index 1 to 0; "d" is new.
        let new = rebuild(
            &old,
            config(&["b", "c", "d"], &["k-000000000001"]),
            KeyFiles::default(),
        );
        let nb = &new.hosts.all()[0];
        assert_eq!((nb.spec.name.as_str(), nb.index), ("b", 0));
        assert!(matches!(nb.health().state, HostState::Ejected(_)));
        assert_eq!(nb.failures.load(Ordering::Relaxed), EJECT_AFTER as u64);
        assert_eq!(new.hosts.ejected(), 1);
        assert_eq!(nb.in_flight.load(Ordering::Relaxed), 1);
        drop(busy);
        assert_eq!(nb.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(new.hosts.all()[2].health().state, HostState::Up);
        assert!(Arc::ptr_eq(&new.keys, &old.keys), "key file unchanged");
        assert!(new.keys.keys()[0].state().disabled);
        // The key file changed: a new pool, every key back.
        let newer = rebuild(
            &new,
            config(&["b", "c", "d"], &["k-000000000001"]),
            KeyFiles {
                global: true,
                own: false,
            },
        );
        assert!(!newer.keys.keys()[0].state().disabled);
    }

    #[test]
    fn own_key_pools_are_kept_while_their_keys_are_unchanged() {
        let mut c = config(&["a", "b"], &[]);
        c.hosts[0].api_keys = Some(vec!["own-000000000001".into()]);
        let old = Balancer::new(c.clone());
        old.hosts.all()[0].keys.keys()[0].disable();
        // Only api-keys.json rewritten: hosts' own pools are kept.
        let global = KeyFiles {
            global: true,
            own: false,
        };
        let same = rebuild(&old, c.clone(), global);
        assert!(same.hosts.all()[0].keys.keys()[0].state().disabled);
        c.hosts[0].api_keys = Some(vec!["own-000000000002".into()]);
        let changed = rebuild(&same, c.clone(), KeyFiles::default());
        assert!(!changed.hosts.all()[0].keys.keys()[0].state().disabled);
        // hosts.json rewritten (another host's weight, or a mere touch): its
        // own keys are its key file's, so a rejected one comes back.
        changed.hosts.all()[0].keys.keys()[0].disable();
        c.hosts[1].weight = 3;
        let rewritten = rebuild(
            &changed,
            c,
            KeyFiles {
                global: false,
                own: true,
            },
        );
        assert!(!rewritten.hosts.all()[0].keys.keys()[0].state().disabled);
    }

    #[test]
    fn listener_settings_are_pinned_and_reported() {
        let running = Settings::default();
        let listener = Listener::of(&running);
        let mut s = Settings {
            port: 4000,
            workers: 8,
            max_attempts: 2,
            ..Settings::default()
        };
        let changed = listener.pin(&mut s);
        assert_eq!(changed.len(), 2, "{changed:?}");
        assert!(changed[0].starts_with("port 4000"));
        assert_eq!((s.port, s.workers, s.max_attempts), (3000, 256, 2));
    }

    #[test]
    fn stamps_see_content_and_existence() {
        let dir = std::env::temp_dir().join(format!("gaia-reload-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let empty = stamps(&dir);
        assert_eq!(empty, [None, None, None, None]);
        std::fs::write(dir.join(HOSTS_FILE), "a").unwrap();
        let one = stamps(&dir);
        assert!(one[0].is_some() && one[1].is_none());
        std::fs::write(dir.join(HOSTS_FILE), "b").unwrap();
        assert_ne!(stamps(&dir)[0].map(|s| s.hash), one[0].map(|s| s.hash));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A scratch config directory for one test, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir()
                .join(format!("gaia-reload-unit-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).unwrap();
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn stamps_follow_the_ca_file_balancer_json_names() {
        let dir = Scratch::new("ca-stamps");
        dir.write(BALANCER_FILE, r#"{"caFile": "ca.pem"}"#);
        // Named but absent: nothing to stamp yet.
        assert_eq!(stamps(&dir.0)[CA], None);
        dir.write("ca.pem", test_roots::ONE);
        let one = stamps(&dir.0);
        assert!(one[CA].is_some());
        dir.write("ca.pem", test_roots::TWO);
        let two = stamps(&dir.0);
        // Same length, maybe the same mtime: the content hash tells them apart.
        assert_ne!(two[CA], one[CA]);
        assert_eq!(two[BALANCER], one[BALANCER]);
        // Named even while balancer.json is otherwise invalid.
        dir.write(BALANCER_FILE, r#"{"port": -1, "caFile": "ca.pem"}"#);
        assert_eq!(stamps(&dir.0)[CA], two[CA]);
        // No longer named: no longer watched.
        dir.write(BALANCER_FILE, "{}");
        assert_eq!(stamps(&dir.0)[CA], None);
    }

    #[test]
    fn editing_only_the_ca_file_is_picked_up_by_reload() {
        let dir = Scratch::new("ca-reload");
        dir.write(HOSTS_FILE, r#"{"hosts": ["http://127.0.0.1:9"]}"#);
        dir.write(
            BALANCER_FILE,
            r#"{"caFile": "ca.pem", "discoveryIntervalMs": 0}"#,
        );
        dir.write("ca.pem", test_roots::ONE);
        let config = config::load(&dir.0, &Overrides::default()).unwrap();
        let shared = Arc::new(Shared::new(Balancer::new(config)));
        let mut reloader = Reloader::new(shared.clone(), dir.0.clone(), Overrides::default());
        assert_eq!(reloader.check(), Check::Unchanged);
        let roots = |s: &Shared| {
            let ca = s.current().config.settings.ca_file.clone().unwrap();
            ca.roots.len()
        };
        assert_eq!(roots(&shared), 1);
        dir.write("ca.pem", &format!("{}{}", test_roots::ONE, test_roots::TWO));
        assert_eq!(reloader.check(), Check::Applied(2));
        assert_eq!(roots(&shared), 2);
        // A broken CA file is refused like any bad config file.
        dir.write("ca.pem", "garbage");
        assert_eq!(reloader.check(), Check::Rejected);
        let error = shared.reload.last_error().unwrap();
        assert!(error.contains("holds no PEM certificate"), "{error}");
        assert_eq!(roots(&shared), 2);
        dir.write("ca.pem", test_roots::TWO);
        assert_eq!(reloader.check(), Check::Applied(3));
        assert_eq!(roots(&shared), 1);
        assert_eq!(reloader.check(), Check::Unchanged);
    }

    #[test]
    fn the_agent_is_rebuilt_when_the_trusted_roots_change() {
        let ca = |path: &str, pem: &str| {
            Some(config::CaFile {
                path: path.into(),
                roots: vec![CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()],
            })
        };
        let base = Settings::default();
        let with = |ca_file| Settings {
            ca_file,
            ..Settings::default()
        };
        assert!(same_agent(&base, &base.clone()));
        assert!(same_agent(
            &base,
            &Settings {
                max_attempts: 2,
                ..Settings::default()
            }
        ));
        assert!(!same_agent(&base, &with(ca("/a.pem", test_roots::ONE))));
        assert!(!same_agent(&with(ca("/a.pem", test_roots::ONE)), &base));
        assert!(same_agent(
            &with(ca("/a.pem", test_roots::ONE)),
            &with(ca("/a.pem", test_roots::ONE))
        ));
        assert!(!same_agent(
            &with(ca("/a.pem", test_roots::ONE)),
            &with(ca("/a.pem", test_roots::TWO))
        ));
        assert!(!same_agent(
            &with(ca("/a.pem", test_roots::ONE)),
            &with(ca("/b.pem", test_roots::ONE))
        ));
        let mut slower = base.clone();
        slower.timeouts.connect = Duration::from_secs(9);
        assert!(!same_agent(&base, &slower));
    }

    #[test]
    fn describe_reports_keys_lost_only_when_there_were_some() {
        let none = config(&["a"], &[]);
        let some = config(&["a"], &["k-000000000001"]);
        // SIGHUP (or a rewritten file) with no active key before or after.
        let said = describe(&none, &none, true);
        assert!(!said.contains("any more"), "{said}");
        assert!(said.contains("still no active key"), "{said}");
        let said = describe(&some, &none, true);
        assert!(said.contains("no active key any more"), "{said}");
        let said = describe(&none, &some, true);
        assert!(said.contains("1 active keys"), "{said}");
        assert_eq!(
            describe(&none, &none, false),
            "1 hosts; no effective change"
        );
    }

    #[test]
    fn describe_names_a_ca_file_change_apart_from_other_settings() {
        let old = config(&["a"], &[]);
        let mut new = old.clone();
        new.settings.ca_file = Some(config::CaFile {
            path: "/etc/ca.pem".into(),
            roots: vec![CertificateDer::from_pem_slice(test_roots::ONE.as_bytes()).unwrap()],
        });
        let said = describe(&old, &new, false);
        assert!(
            said.contains("caFile /etc/ca.pem (1 certificate)"),
            "{said}"
        );
        assert!(!said.contains("settings changed"), "{said}");
        new.settings.max_attempts = 2;
        let said = describe(&old, &new, false);
        assert!(said.contains("balancer.json settings changed"), "{said}");
        let said = describe(&new, &old, false);
        assert!(said.contains("no caFile any more"), "{said}");
    }
}
