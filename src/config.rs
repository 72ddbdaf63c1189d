//! Configuration: the three files of the config directory, flags and
//! environment, resolved once into one immutable [`Config`].
//!
//! Every default lives in [`Settings::default`], each with its doc. Loading
//! never panics: any problem becomes a [`ConfigError`] that names the file,
//! the field and, for JSON, the line and column, in words a user can act on.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How the next host is picked among the routable ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Smooth weighted round-robin (nginx's algorithm).
    RoundRobin,
    /// Fewest requests in flight.
    LeastLoaded,
    /// Lowest observed latency.
    Latency,
    /// Weighted random.
    Random,
}

/// One upstream node from `hosts.json`, validated and normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    /// Display name in logs, metrics and `/status`.
    pub name: String,
    /// Base URL with no trailing `/` and no trailing `/v1`, e.g. `https://asia.gaia.domains`.
    /// The request path (`/v1/...`) is appended to it.
    pub base_url: String,
    /// Relative weight, at least 1.
    pub weight: u32,
    /// Used only when no primary host can serve the request.
    pub backup: bool,
    /// Keys for this host only; `None` means the global pool.
    pub api_keys: Option<Vec<String>>,
    /// Requested model name -> the name this host uses.
    pub models: BTreeMap<String, String>,
}

/// Upstream timeouts (`timeouts.*` in balancer.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP+TLS connect to an upstream. Defaults to 5 s.
    pub connect: Duration,
    /// Request sent until the upstream's first real output. Defaults to 300 s.
    pub first_byte: Duration,
    /// Longest silence between two body chunks. Defaults to 120 s.
    pub idle: Duration,
    /// Whole request, all attempts and backoff, until committed. Defaults to 600 s.
    pub total: Duration,
}

/// Everything from `balancer.json`, flags and environment, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Listen address. Defaults to `127.0.0.1`.
    pub bind: IpAddr,
    /// Listen port. Defaults to 3000 (0 picks an ephemeral port).
    pub port: u16,
    /// Worker threads. Defaults to 256 (see [`DEFAULT_WORKERS`]).
    pub workers: usize,
    /// Client bearer tokens; when non-empty every `/v1/*` request needs one. Defaults to none.
    pub client_keys: Vec<String>,
    /// Let non-loopback clients in without client keys. Defaults to false.
    pub open: bool,
    /// Bearer token for admin endpoints; `None` means loopback only. Defaults to none.
    pub admin_key: Option<String>,
    /// Host selection strategy. Defaults to round-robin.
    pub strategy: Strategy,
    /// Attempts per request, the first included. Defaults to 5.
    pub max_attempts: u32,
    /// Upstream timeouts.
    pub timeouts: Timeouts,
    /// Start a hedge attempt after this long; `None` = off. Defaults to off.
    pub hedge_after: Option<Duration>,
    /// Largest accepted request body. Defaults to 16 MiB.
    pub max_body_bytes: u64,
    /// Time a client has to send a whole request head. Defaults to 10 s.
    pub head_timeout: Duration,
    /// How long an idle keep-alive connection is kept. Defaults to 5 s.
    pub keep_alive: Duration,
    /// Longest silence while reading a request body. Defaults to 10 s.
    pub body_timeout: Duration,
    /// Connections one client address may hold open at once. Defaults to 64.
    pub max_connections_per_client: usize,
    /// Accepted connections that may wait for a free worker. Defaults to 1024.
    pub queue_size: usize,
    /// How long an accepted connection may wait for a worker before 503. Defaults to 3 s.
    pub queue_wait: Duration,
}

/// Default worker count: each worker serves one connection (one stream) at a time.
pub const DEFAULT_WORKERS: usize = 256;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bind: IpAddr::from([127, 0, 0, 1]),
            port: 3000,
            workers: DEFAULT_WORKERS,
            client_keys: Vec::new(),
            open: false,
            admin_key: None,
            strategy: Strategy::RoundRobin,
            max_attempts: 5,
            timeouts: Timeouts {
                connect: Duration::from_millis(5_000),
                first_byte: Duration::from_millis(300_000),
                idle: Duration::from_millis(120_000),
                total: Duration::from_millis(600_000),
            },
            hedge_after: None,
            max_body_bytes: 16 * 1024 * 1024,
            head_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            max_connections_per_client: 64,
            queue_size: 1024,
            queue_wait: Duration::from_secs(3),
        }
    }
}

/// The whole resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The directory the files were read from.
    pub dir: PathBuf,
    /// Upstream hosts, in file order.
    pub hosts: Vec<HostSpec>,
    /// Active keys of the global pool (`isActive: false` already removed).
    pub api_keys: Vec<String>,
    /// Everything else.
    pub settings: Settings,
}

/// Values from flags and environment that beat `balancer.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--port` or `PORT`.
    pub port: Option<u16>,
    /// `--bind` or `BIND`.
    pub bind: Option<IpAddr>,
    /// `--workers`.
    pub workers: Option<usize>,
}

/// A configuration problem, phrased so the user can fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file at fault.
    pub file: PathBuf,
    /// The field at fault, e.g. `hosts[2].weight`, when known.
    pub field: Option<String>,
    /// 1-based line and column, for JSON problems.
    pub position: Option<(usize, usize)>,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Load and validate the config directory, applying `overrides` on top.
pub fn load(dir: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
    let _ = overrides;
    Err(ConfigError {
        file: dir.join("hosts.json"),
        field: None,
        position: None,
        message: "not implemented yet".into(),
    })
}
