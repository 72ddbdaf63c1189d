//! Configuration: the three files of the config directory, flags and
//! environment, resolved once into one immutable [`Config`].
//!
//! Every default lives in [`Settings::default`], each with its doc. Loading
//! never panics: any problem becomes a [`ConfigError`] that names the file,
//! the field and, for JSON, the line and column, in words a user can act on.
//!
//! Validation happens inside the JSON parse (hand-written serde visitors)
//! rather than on a parsed tree, because only then does serde_json know where
//! in the file it is: a weight of 0, a duplicate host or an unknown field is
//! reported at its own line and column, not just by name. No secret is ever
//! echoed in an error or in [`render`]; [`mask`] is the one way to show one.

use std::collections::BTreeMap;

pub use crate::keys::mask;
use std::fmt;
use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::CertificateDer;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

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

impl Strategy {
    /// Every strategy, in the order the docs list them.
    pub const ALL: [Strategy; 4] = [
        Strategy::RoundRobin,
        Strategy::LeastLoaded,
        Strategy::Latency,
        Strategy::Random,
    ];

    /// The name used in `balancer.json`, e.g. `"round-robin"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastLoaded => "least-loaded",
            Strategy::Latency => "latency",
            Strategy::Random => "random",
        }
    }

    /// The strategy named `name` as in `balancer.json`, if any.
    pub fn from_name(name: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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

/// Hedged requests (`hedge.afterMs` in balancer.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hedge {
    /// No hedging (`0`).
    Off,
    /// Hedge after this long without output.
    After(Duration),
    /// Hedge after the host's recent p95 time to first byte, at least 500 ms (`"auto"`).
    Auto,
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

/// Extra trusted root certificates, read from `caFile` when the config is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFile {
    /// The file as resolved (absolute or joined to the config directory).
    pub path: PathBuf,
    /// Its certificates, DER-encoded, in file order.
    pub roots: Vec<CertificateDer<'static>>,
}

/// As `check` and the reload log show it: the path and how many certificates
/// (never their bytes).
impl fmt::Display for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.roots.len();
        let plural = if n == 1 { "" } else { "s" };
        write!(f, "{} ({n} certificate{plural})", self.path.display())
    }
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
    /// When to start a hedge attempt on another host. Defaults to off.
    pub hedge: Hedge,
    /// Largest accepted request body. Defaults to 16 MiB.
    pub max_body_bytes: u64,
    /// How often every host's `GET /v1/models` is polled (±10 % jitter);
    /// `None` = model discovery off. Defaults to 60 s.
    pub discovery_interval: Option<Duration>,
    /// Roots trusted for `https` hosts besides the built-in Mozilla ones. Defaults to none.
    pub ca_file: Option<CaFile>,
    /// Time a client has to send a whole request head. Defaults to 10 s.
    pub head_timeout: Duration,
    /// How long an idle keep-alive connection is kept. Defaults to 5 s.
    pub keep_alive: Duration,
    /// Longest silence while reading a request body. Defaults to 10 s.
    pub body_timeout: Duration,
    /// Longest time one response write may block on a client that does not
    /// read; then the connection is dropped. Defaults to 30 s.
    pub write_timeout: Duration,
    /// Connections one client address may hold open at once. Defaults to 64.
    pub max_connections_per_client: usize,
    /// Accepted connections that may wait for a free worker. Defaults to 1024.
    pub queue_size: usize,
    /// How long an accepted connection may wait for a worker before 503. Defaults to 3 s.
    pub queue_wait: Duration,
    /// A stream still without its first token this long gets its response head
    /// and `: keep-alive` comments; `None` = never. Defaults to 10 s.
    pub stream_keep_alive_after: Option<Duration>,
    /// Interval of those `: keep-alive` comments. Defaults to 15 s.
    pub stream_keep_alive_every: Duration,
    /// After SIGTERM or SIGINT, how long requests in flight may take to finish
    /// before the process exits anyway. Defaults to 30 s.
    pub shutdown_grace: Duration,
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
            hedge: Hedge::Off,
            max_body_bytes: 16 * 1024 * 1024,
            discovery_interval: Some(Duration::from_secs(60)),
            ca_file: None,
            head_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_connections_per_client: 64,
            queue_size: 1024,
            queue_wait: Duration::from_secs(3),
            stream_keep_alive_after: Some(Duration::from_secs(10)),
            stream_keep_alive_every: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(30),
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

impl Overrides {
    /// Write every value that is set over `settings` (flags and environment beat the file).
    pub fn apply(&self, settings: &mut Settings) {
        let Overrides {
            port,
            bind,
            workers,
        } = self;
        if let Some(port) = port {
            settings.port = *port;
        }
        if let Some(bind) = bind {
            settings.bind = *bind;
        }
        if let Some(workers) = workers {
            settings.workers = *workers;
        }
    }
}

/// File name of the required host list inside the config directory.
pub const HOSTS_FILE: &str = "hosts.json";
/// File name of the optional global key pool.
pub const API_KEYS_FILE: &str = "api-keys.json";
/// File name of the optional settings file.
pub const BALANCER_FILE: &str = "balancer.json";

/// Largest `*Ms` value accepted (24 h): far beyond any sane deadline, and
/// small enough that `Instant::now() + d` can never overflow and panic.
pub const MAX_MS: u64 = 86_400_000;
/// Largest `workers` value accepted (flag or file).
pub const MAX_WORKERS: usize = 4096;
/// Largest `maxAttempts` value accepted.
pub const MAX_ATTEMPTS: u32 = 20;
/// Largest host `weight` accepted; keeps weighted sums far from overflow.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Largest `maxBodyBytes` accepted (1 GiB).
pub const MAX_BODY_BYTES: u64 = 1 << 30;
/// Shortest `discoveryIntervalMs` other than 0 (off).
pub const MIN_DISCOVERY_INTERVAL: Duration = Duration::from_secs(1);
/// Largest `hosts.json`, `api-keys.json` or `balancer.json` accepted (16 MiB):
/// thousands of hosts fit, and the reloader, which reads each file every
/// second, never reads more than this.
pub const MAX_CONFIG_FILE_BYTES: u64 = 16 << 20;
/// Largest `caFile` accepted (1 MiB): a whole public CA bundle is ~220 KB,
/// and the cap keeps a mistyped path (a log, a disk image) from filling memory.
pub const MAX_CA_FILE_BYTES: u64 = 1 << 20;

/// Every field `balancer.json` accepts at its top level, in documentation order.
pub const BALANCER_FIELDS: [&str; 23] = [
    "bind",
    "port",
    "workers",
    "clientKeys",
    "open",
    "adminKey",
    "strategy",
    "maxAttempts",
    "timeouts",
    "hedge",
    "maxBodyBytes",
    "discoveryIntervalMs",
    "caFile",
    "headTimeoutMs",
    "keepAliveMs",
    "bodyTimeoutMs",
    "writeTimeoutMs",
    "maxConnectionsPerClient",
    "queueSize",
    "queueWaitMs",
    "streamKeepAliveAfterMs",
    "streamKeepAliveEveryMs",
    "shutdownGraceMs",
];
const TIMEOUT_FIELDS: [&str; 4] = ["connectMs", "firstByteMs", "idleMs", "totalMs"];
const HEDGE_FIELDS: [&str; 1] = ["afterMs"];
const HOST_FIELDS: [&str; 6] = ["url", "weight", "name", "backup", "apiKeys", "models"];
const KEY_FILE_FIELDS: [&str; 1] = ["apiKeys"];
const KEY_FIELDS: [&str; 3] = ["key", "description", "isActive"];
const HOSTS_FILE_FIELDS: [&str; 1] = ["hosts"];

/// Load and validate the config directory, applying `overrides` on top.
///
/// `hosts.json` is required; `api-keys.json` and `balancer.json` are optional.
/// Precedence: `overrides` > `balancer.json` > [`Settings::default`].
pub fn load(dir: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
    // Errors name files by absolute path, so a message stays clear whatever the
    // working directory of whoever reads it (`absolute` does not touch the disk).
    let files = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    // `--config config/hosts.json` is an easy slip; the OS would only say
    // "Not a directory" about a path that ends in hosts.json/hosts.json.
    if std::fs::metadata(dir).is_ok_and(|m| !m.is_dir()) {
        return Err(ConfigError {
            file: files,
            field: None,
            position: None,
            message: format!(
                "not a directory; --config (or GAIA_CONFIG_DIR) names the directory that \
                 holds {HOSTS_FILE}, {API_KEYS_FILE} and {BALANCER_FILE}"
            ),
        });
    }
    let hosts_path = files.join(HOSTS_FILE);
    let hosts = match read_text(&hosts_path)? {
        Some(text) => parse_file(&hosts_path, &text, HostsFile)?,
        None => {
            let mut message = String::from(
                "file not found; it is required and lists the upstream hosts, \
                 e.g. {\"hosts\": [\"asia\", \"http://127.0.0.1:8080\"]}",
            );
            if !dir.is_dir() {
                message.push_str(&format!(
                    " (the config directory {} does not exist: pass --config DIR or set GAIA_CONFIG_DIR)",
                    dir.display()
                ));
            }
            return Err(ConfigError {
                file: hosts_path,
                field: None,
                position: None,
                message,
            });
        }
    };
    let keys_path = files.join(API_KEYS_FILE);
    let api_keys = match read_text(&keys_path)? {
        Some(text) => parse_file(&keys_path, &text, ApiKeysFile)?,
        None => Vec::new(),
    };
    let balancer_path = files.join(BALANCER_FILE);
    let mut settings = match read_text(&balancer_path)? {
        Some(text) => parse_file(&balancer_path, &text, BalancerFile { dir: &files })?,
        None => Settings::default(),
    };
    overrides.apply(&mut settings);
    Ok(Config {
        dir: dir.to_path_buf(),
        hosts,
        api_keys,
        settings,
    })
}

/// The resolved configuration as `gaia-balancer check` prints it: every
/// setting under its `balancer.json` name, every key masked.
pub fn render(config: &Config) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = render_into(config, &mut out);
    out
}

fn render_into(config: &Config, out: &mut String) -> fmt::Result {
    let Config {
        dir,
        hosts,
        api_keys,
        settings,
    } = config;
    writeln!(out, "config directory: {}", dir.display())?;
    writeln!(out, "hosts ({}):", hosts.len())?;
    let width = hosts
        .iter()
        .map(|h| h.name.chars().count())
        .max()
        .unwrap_or(0);
    for host in hosts {
        let HostSpec {
            name,
            base_url,
            weight,
            backup,
            api_keys,
            models,
        } = host;
        write!(out, "  {name:<width$}  {base_url}  weight={weight}")?;
        if *backup {
            write!(out, "  backup")?;
        }
        if let Some(keys) = api_keys {
            write!(out, "  apiKeys=[{}]", mask_list(keys))?;
        }
        if !models.is_empty() {
            let pairs: Vec<String> = models.iter().map(|(a, b)| format!("{a} -> {b}")).collect();
            write!(out, "  models={{{}}}", pairs.join(", "))?;
        }
        writeln!(out)?;
    }
    if api_keys.is_empty() {
        writeln!(
            out,
            "api keys: none active (requests go upstream without Authorization)"
        )?;
    } else {
        writeln!(
            out,
            "api keys ({} active): {}",
            api_keys.len(),
            mask_list(api_keys)
        )?;
    }
    let Settings {
        bind,
        port,
        workers,
        client_keys,
        open,
        admin_key,
        strategy,
        max_attempts,
        timeouts,
        hedge,
        max_body_bytes,
        discovery_interval,
        ca_file,
        head_timeout,
        keep_alive,
        body_timeout,
        write_timeout,
        max_connections_per_client,
        queue_size,
        queue_wait,
        stream_keep_alive_after,
        stream_keep_alive_every,
        shutdown_grace,
    } = settings;
    let Timeouts {
        connect,
        first_byte,
        idle,
        total,
    } = timeouts;
    let ms = |d: &Duration| d.as_millis().to_string();
    let admin = match admin_key {
        Some(key) => mask(key),
        None => "none (admin endpoints from loopback only)".to_string(),
    };
    let hedge = match hedge {
        Hedge::Off => "0 (off)".to_string(),
        Hedge::After(d) => ms(d),
        Hedge::Auto => "auto (the host's p95 time to first byte, at least 500 ms)".to_string(),
    };
    let keep_alive_after = match stream_keep_alive_after {
        Some(d) => ms(d),
        None => "0 (off)".to_string(),
    };
    let discovery = match discovery_interval {
        Some(d) => ms(d),
        None => "0 (off)".to_string(),
    };
    let ca = match ca_file {
        Some(ca) => ca.to_string(),
        None => "none (built-in Mozilla roots only)".to_string(),
    };
    let rows: [(&str, String); 26] = [
        ("bind", bind.to_string()),
        ("port", port.to_string()),
        ("workers", workers.to_string()),
        ("clientKeys", format!("[{}]", mask_list(client_keys))),
        ("open", open.to_string()),
        ("adminKey", admin),
        ("strategy", strategy.to_string()),
        ("maxAttempts", max_attempts.to_string()),
        ("timeouts.connectMs", ms(connect)),
        ("timeouts.firstByteMs", ms(first_byte)),
        ("timeouts.idleMs", ms(idle)),
        ("timeouts.totalMs", ms(total)),
        ("hedge.afterMs", hedge),
        ("maxBodyBytes", max_body_bytes.to_string()),
        ("discoveryIntervalMs", discovery),
        ("caFile", ca),
        ("headTimeoutMs", ms(head_timeout)),
        ("keepAliveMs", ms(keep_alive)),
        ("bodyTimeoutMs", ms(body_timeout)),
        ("writeTimeoutMs", ms(write_timeout)),
        (
            "maxConnectionsPerClient",
            max_connections_per_client.to_string(),
        ),
        ("queueSize", queue_size.to_string()),
        ("queueWaitMs", ms(queue_wait)),
        ("streamKeepAliveAfterMs", keep_alive_after),
        ("streamKeepAliveEveryMs", ms(stream_keep_alive_every)),
        ("shutdownGraceMs", ms(shutdown_grace)),
    ];
    writeln!(out, "settings:")?;
    for (name, value) in rows {
        writeln!(out, "  {name:<24} {value}")?;
    }
    Ok(())
}

fn mask_list(keys: &[String]) -> String {
    let masked: Vec<String> = keys.iter().map(|k| mask(k)).collect();
    masked.join(", ")
}

/// The file's text; `None` when it does not exist. A UTF-8 byte order mark is
/// dropped (Windows editors write one; JSON forbids it).
fn read_text(path: &Path) -> Result<Option<String>, ConfigError> {
    let bytes = match read_config_file(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ConfigError {
                file: path.to_path_buf(),
                field: None,
                position: None,
                message: format!("cannot read the file: {e}"),
            })
        }
    };
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(Some(text.to_string())),
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
            let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let column = 1 + String::from_utf8_lossy(&valid[line_start..])
                .chars()
                .count();
            Err(ConfigError {
                file: path.to_path_buf(),
                field: None,
                position: Some((line, column)),
                message: "the file is not valid UTF-8; save it as UTF-8".to_string(),
            })
        }
    }
}

fn parse_file<S: Shape>(path: &Path, text: &str, shape: S) -> Result<S::Out, ConfigError> {
    // An empty file (a `touch`, a failed write) would otherwise read as
    // "invalid JSON: EOF while parsing a value".
    if text.trim().is_empty() {
        return Err(ConfigError {
            file: path.to_path_buf(),
            field: None,
            position: None,
            message: format!("the file is empty; it must hold {}", shape.expected()),
        });
    }
    let mut de = serde_json::Deserializer::from_str(text);
    Via(shape)
        .deserialize(&mut de)
        .and_then(|out| de.end().map(|()| out))
        .map_err(|e| {
            let mut error = json_error(path, &e);
            if error.field.is_none() && comment_at(text, e.line(), e.column()) {
                error
                    .message
                    .push_str("; JSON has no comments: remove the // or /* */ text");
            }
            error
        })
}

/// Whether a `//` or `/*` starts at serde_json's error position (1-based
/// line, byte column): a comment, which editors and other tools allow.
fn comment_at(text: &str, line: usize, column: usize) -> bool {
    let Some(rest) = text.split('\n').nth(line.saturating_sub(1)) else {
        return false;
    };
    let at = rest.get(column.saturating_sub(1)..).unwrap_or("");
    at.starts_with("//") || at.starts_with("/*")
}

/// Separates the field path from the message inside a serde error text: the
/// only channel from a visitor to here is `de::Error::custom(String)`.
const MARK: char = '\u{1}';

fn json_error(path: &Path, e: &serde_json::Error) -> ConfigError {
    let (line, column) = (e.line(), e.column());
    let mut text = e.to_string();
    let suffix = format!(" at line {line} column {column}");
    if line != 0 && text.ends_with(&suffix) {
        text.truncate(text.len() - suffix.len());
    }
    let (field, message) = match text.strip_prefix(MARK).and_then(|t| t.split_once(MARK)) {
        Some((field, message)) => (
            (!field.is_empty()).then(|| field.to_string()),
            message.to_string(),
        ),
        None => match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                (None, format!("invalid JSON: {text}"))
            }
            _ => (None, text),
        },
    };
    ConfigError {
        file: path.to_path_buf(),
        field,
        // serde_json counts a position before a line's first character as column 0.
        position: (line != 0).then_some((line, column.max(1))),
        message,
    }
}

/// An error at `path` carrying `message`; serde_json adds the position.
fn fail<E: de::Error>(path: &str, message: impl fmt::Display) -> E {
    E::custom(format_args!("{MARK}{path}{MARK}{message}"))
}

/// The last segment of a field path, to start a message with (`weight` for
/// `hosts[2].weight`). Paths holding user-chosen names stay whole.
fn leaf(path: &str) -> &str {
    if path.is_empty() {
        return "the file";
    }
    if path.contains('"') {
        return path;
    }
    path.rsplit('.').next().unwrap_or(path)
}

fn join(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key.len() <= 60
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match (plain, path.is_empty()) {
        (true, true) => key.to_string(),
        (true, false) => format!("{path}.{key}"),
        // Quoted and escaped: a user's key must not break the path (or the
        // MARK framing of the error text), nor spread over lines.
        (false, _) => format!("{path}[{}]", quote(key)),
    }
}

/// A user-supplied, non-secret string for an error message: quoted, escaped, shortened.
fn quote(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() > MAX {
        let head: String = s.chars().take(MAX).collect();
        format!("{:?}...", head)
    } else {
        format!("{s:?}")
    }
}

/// A JSON value that is not an array or object.
enum Scalar {
    Null,
    Bool(bool),
    UInt(u64),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Scalar {
    /// For "got ..." in messages; strings are not echoed, they may be secrets.
    fn describe(&self) -> String {
        match self {
            Scalar::Null => "null".to_string(),
            Scalar::Bool(b) => b.to_string(),
            Scalar::UInt(n) => n.to_string(),
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(x) => format!("{x:?}"),
            Scalar::Str(_) => "a string".to_string(),
        }
    }
}

/// What one JSON value at a known field path must look like, and what it
/// becomes. Each method rejects by default, naming the path and what was expected.
trait Shape: Sized {
    type Out;
    fn path(&self) -> &str;
    fn expected(&self) -> String;
    fn scalar<E: de::Error>(self, got: Scalar) -> Result<Self::Out, E> {
        Err(wrong_type(&self, &got.describe()))
    }
    fn seq<'de, A: SeqAccess<'de>>(self, _seq: A) -> Result<Self::Out, A::Error> {
        Err(wrong_type(&self, "an array"))
    }
    fn map<'de, A: MapAccess<'de>>(self, _map: A) -> Result<Self::Out, A::Error> {
        Err(wrong_type(&self, "an object"))
    }
}

fn wrong_type<S: Shape, E: de::Error>(shape: &S, got: &str) -> E {
    let path = shape.path();
    fail(
        path,
        format!("{} must be {}, got {got}", leaf(path), shape.expected()),
    )
}

/// Adapts a [`Shape`] to serde: always `deserialize_any`, so every JSON type
/// reaches the shape and a wrong one is reported with the field path.
struct Via<S>(S);

impl<'de, S: Shape> DeserializeSeed<'de> for Via<S> {
    type Value = S::Out;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<S::Out, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, S: Shape> Visitor<'de> for Via<S> {
    type Value = S::Out;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.expected())
    }
    fn visit_unit<E: de::Error>(self) -> Result<S::Out, E> {
        self.0.scalar(Scalar::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<S::Out, E> {
        self.0.scalar(Scalar::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<S::Out, E> {
        self.0.scalar(Scalar::Bool(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<S::Out, E> {
        self.0.scalar(Scalar::UInt(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<S::Out, E> {
        self.0.scalar(Scalar::Int(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<S::Out, E> {
        self.0.scalar(Scalar::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<S::Out, E> {
        self.0.scalar(Scalar::Str(v.to_string()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<S::Out, A::Error> {
        self.0.seq(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<S::Out, A::Error> {
        self.0.map(map)
    }
}

/// Walk an object's fields: unknown and repeated fields are errors (with a
/// spelling hint); `each` gets the map, the field name and its path and must
/// consume the value.
fn fields<'de, A, F>(map: &mut A, path: &str, known: &[&str], each: F) -> Result<(), A::Error>
where
    A: MapAccess<'de>,
    F: FnMut(&mut A, &str, &str) -> Result<(), A::Error>,
{
    fields_with(map, path, known, Unknown::Refuse, each)
}

/// What to do with a field that is not in the known list.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unknown {
    /// An error naming the field.
    Refuse,
    /// Skipped, unless it looks like a typo of a known field (then an error):
    /// for objects other tools write too, such as the original project's keys.
    SkipUnlessTypo,
}

fn fields_with<'de, A, F>(
    map: &mut A,
    path: &str,
    known: &[&str],
    unknown: Unknown,
    mut each: F,
) -> Result<(), A::Error>
where
    A: MapAccess<'de>,
    F: FnMut(&mut A, &str, &str) -> Result<(), A::Error>,
{
    let mut seen: Vec<String> = Vec::new();
    while let Some(key) = map.next_key::<String>()? {
        let child = join(path, &key);
        if !known.contains(&key.as_str()) {
            let hint = suggest(&key, known).or_else(|| state_word(&key, known));
            if unknown == Unknown::SkipUnlessTypo && hint.is_none() {
                map.next_value::<serde::de::IgnoredAny>()?;
                continue;
            }
            let mut message = format!("unknown field {}", quote(&key));
            if let Some(hint) = hint {
                message.push_str(&format!("; did you mean \"{hint}\"?"));
            }
            message.push_str(&format!("; expected one of: {}", known.join(", ")));
            return Err(fail(&child, message));
        }
        if seen.contains(&key) {
            return Err(fail(
                &child,
                format!("field \"{key}\" appears twice; keep one"),
            ));
        }
        each(map, &key, &child)?;
        seen.push(key);
    }
    Ok(())
}

/// `isActive` when `word` says on or off in other words (`enabled: false`,
/// `disabled: true`): skipped, such a field would send a key meant to be off.
fn state_word<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    const STATE_WORDS: [&str; 6] = [
        "enabled",
        "disabled",
        "inactive",
        "isenabled",
        "isdisabled",
        "isinactive",
    ];
    if !STATE_WORDS.iter().any(|w| folded(word).eq(w.chars())) {
        return None;
    }
    known.iter().copied().find(|k| *k == "isActive")
}

/// `s` lower-cased without `_` and `-`: how field names are compared.
fn folded(s: &str) -> impl Iterator<Item = char> + '_ {
    s.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
}

/// The known name `word` was probably meant to be: the same apart from case,
/// `_` and `-`, or within two typos (one for short names). Shared with the CLI.
pub(crate) fn suggest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    let norm = |s: &str| -> Vec<char> { folded(s).collect() };
    let want = norm(word);
    // Long words are not typos of field names; bounding them bounds the work.
    if want.is_empty() || want.len() > 64 {
        return None;
    }
    let budget = if want.len() <= 4 { 1 } else { 2 };
    known
        .iter()
        .map(|k| (typos(&want, &norm(k)), *k))
        .filter(|(d, _)| *d <= budget)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Edit distance counting an adjacent swap as one typo (optimal string alignment).
fn typos(a: &[char], b: &[char]) -> usize {
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

/// An integer in `min..=max`.
struct Int<'p> {
    path: &'p str,
    min: u64,
    max: u64,
}

impl Shape for Int<'_> {
    type Out = u64;
    fn path(&self) -> &str {
        self.path
    }
    fn expected(&self) -> String {
        if self.max == u64::MAX {
            format!("an integer >= {}", self.min)
        } else {
            format!("an integer from {} to {}", self.min, self.max)
        }
    }
    fn scalar<E: de::Error>(self, got: Scalar) -> Result<u64, E> {
        let name = leaf(self.path);
        match got {
            Scalar::UInt(n) if (self.min..=self.max).contains(&n) => Ok(n),
            Scalar::UInt(n) if n > self.max => Err(fail(
                self.path,
                format!("{name} must be an integer <= {}, got {n}", self.max),
            )),
            Scalar::UInt(_) | Scalar::Int(_) => Err(fail(
                self.path,
                format!(
                    "{name} must be an integer >= {}, got {}",
                    self.min,
                    got.describe()
                ),
            )),
            other => Err(wrong_type(&self, &other.describe())),
        }
    }
}

fn int<'de, A: MapAccess<'de>>(
    map: &mut A,
    path: &str,
    min: u64,
    max: u64,
) -> Result<u64, A::Error> {
    map.next_value_seed(Via(Int { path, min, max }))
}

/// A duration in whole milliseconds, `min..=MAX_MS`.
fn millis<'de, A: MapAccess<'de>>(map: &mut A, path: &str, min: u64) -> Result<Duration, A::Error> {
    int(map, path, min, MAX_MS).map(Duration::from_millis)
}

/// Saturating narrowing for values already range-checked by [`Int`].
fn narrow<T: TryFrom<u64> + Copy>(n: u64, max: T) -> T {
    T::try_from(n).unwrap_or(max)
}

struct Bool<'p>(&'p str);

impl Shape for Bool<'_> {
    type Out = bool;
    fn path(&self) -> &str {
        self.0
    }
    fn expected(&self) -> String {
        "true or false".to_string()
    }
    fn scalar<E: de::Error>(self, got: Scalar) -> Result<bool, E> {
        match got {
            Scalar::Bool(b) => Ok(b),
            other => Err(wrong_type(&self, &other.describe())),
        }
    }
}

/// A string; `nonempty` also refuses blank ones and control characters.
struct Text<'p> {
    path: &'p str,
    nonempty: bool,
}

impl Shape for Text<'_> {
    type Out = String;
    fn path(&self) -> &str {
        self.path
    }
    fn expected(&self) -> String {
        if self.nonempty {
            "a non-empty string".to_string()
        } else {
            "a string".to_string()
        }
    }
    fn scalar<E: de::Error>(self, got: Scalar) -> Result<String, E> {
        match got {
            Scalar::Str(s) if !self.nonempty => Ok(s),
            Scalar::Str(s) if s.trim().is_empty() => Err(fail(
                self.path,
                format!("{} must not be empty", leaf(self.path)),
            )),
            Scalar::Str(s) if s.chars().any(char::is_control) => Err(fail(
                self.path,
                format!("{} must not contain control characters", leaf(self.path)),
            )),
            Scalar::Str(s) => Ok(s),
            other => Err(wrong_type(&self, &other.describe())),
        }
    }
}

/// Why `s` cannot be a key; keys go into `Authorization` headers, so only
/// visible ASCII is allowed. The message never contains the key.
fn check_secret(path: &str, s: &str) -> Result<(), String> {
    let name = leaf(path);
    if s.is_empty() {
        return Err(format!("{name} must not be an empty string"));
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{name} must contain only printable ASCII characters without spaces \
             (it goes into an Authorization header)"
        ));
    }
    Ok(())
}

/// A key (pool, host or client key); `nullable` lets `null` mean "none".
struct Secret<'p> {
    path: &'p str,
    nullable: bool,
}

impl Shape for Secret<'_> {
    type Out = Option<String>;
    fn path(&self) -> &str {
        self.path
    }
    fn expected(&self) -> String {
        if self.nullable {
            "a key string or null".to_string()
        } else {
            "a key string".to_string()
        }
    }
    fn scalar<E: de::Error>(self, got: Scalar) -> Result<Option<String>, E> {
        match got {
            Scalar::Null if self.nullable => Ok(None),
            Scalar::Str(s) => match check_secret(self.path, &s) {
                Ok(()) => Ok(Some(s)),
                Err(message) => Err(fail(self.path, message)),
            },
            other => Err(wrong_type(&self, &other.describe())),
        }
    }
}

fn secret<'de, A: MapAccess<'de>>(map: &mut A, path: &str) -> Result<String, A::Error> {
    match map.next_value_seed(Via(Secret {
        path,
        nullable: false,
    }))? {
        Some(key) => Ok(key),
        None => Err(fail(path, format!("{} must be a key string", leaf(path)))),
    }
}

/// An array of distinct keys; `allow_empty` for `clientKeys`, not for a host's `apiKeys`.
struct SecretList<'p> {
    path: &'p str,
    allow_empty: bool,
}

impl Shape for SecretList<'_> {
    type Out = Vec<String>;
    fn path(&self) -> &str {
        self.path
    }
    fn expected(&self) -> String {
        "an array of key strings".to_string()
    }
    fn seq<'de, A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut keys: Vec<String> = Vec::new();
        loop {
            let child = format!("{}[{}]", self.path, keys.len());
            let shape = ListedSecret {
                path: &child,
                list: self.path,
                seen: &keys,
            };
            let Some(key) = seq.next_element_seed(Via(shape))? else {
                break;
            };
            keys.push(key);
        }
        if keys.is_empty() && !self.allow_empty {
            return Err(fail(
                self.path,
                format!(
                    "{} must list at least one key (leave the field out to use the global pool)",
                    leaf(self.path)
                ),
            ));
        }
        Ok(keys)
    }
}

/// One key of a [`SecretList`]; checked against the keys before it here, so
/// that a duplicate is reported at its own position.
struct ListedSecret<'p> {
    path: &'p str,
    list: &'p str,
    seen: &'p [String],
}

impl Shape for ListedSecret<'_> {
    type Out = String;
    fn path(&self) -> &str {
        self.path
    }
    fn expected(&self) -> String {
        "a key string".to_string()
    }
    fn scalar<E: de::Error>(self, got: Scalar) -> Result<String, E> {
        let Scalar::Str(key) = got else {
            return Err(wrong_type(&self, &got.describe()));
        };
        check_secret(self.path, &key).map_err(|m| fail(self.path, m))?;
        if let Some(first) = self.seen.iter().position(|k| *k == key) {
            return Err(fail(
                self.path,
                format!(
                    "{} is the same key as {}[{first}]; list each key once",
                    self.path, self.list
                ),
            ));
        }
        Ok(key)
    }
}

/// A host's `models`: requested name -> the name this host uses.
struct Models<'p>(&'p str);

impl Shape for Models<'_> {
    type Out = BTreeMap<String, String>;
    fn path(&self) -> &str {
        self.0
    }
    fn expected(&self) -> String {
        "an object mapping requested model names to this host's names, \
         e.g. {\"llama\": \"meta-llama/llama-3.1-8b-instruct\"}"
            .to_string()
    }
    fn map<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Out, A::Error> {
        let mut models = BTreeMap::new();
        while let Some(name) = map.next_key::<String>()? {
            let child = format!("{}[{}]", self.0, quote(&name));
            if name.trim().is_empty() {
                return Err(fail(&child, "model names must not be empty"));
            }
            if name.chars().any(char::is_control) {
                return Err(fail(
                    &child,
                    "model names must not contain control characters",
                ));
            }
            if models.contains_key(&name) {
                return Err(fail(
                    &child,
                    format!("model {} appears twice; keep one", quote(&name)),
                ));
            }
            let target = map.next_value_seed(Via(Text {
                path: &child,
                nonempty: true,
            }))?;
            models.insert(name, target);
        }
        Ok(models)
    }
}

/// A host string: a Gaia subdomain or a base URL.
struct HostUrl<'p>(&'p str);

impl Shape for HostUrl<'_> {
    type Out = (String, String);
    fn path(&self) -> &str {
        self.0
    }
    fn expected(&self) -> String {
        "a Gaia subdomain such as \"asia\" or a base URL such as \"https://node.example\""
            .to_string()
    }
    fn scalar<E: de::Error>(self, got: Scalar) -> Result<Self::Out, E> {
        match got {
            Scalar::Str(s) => {
                parse_host(&s).map_err(|m| fail(self.0, format!("{} {m}", leaf(self.0))))
            }
            other => Err(wrong_type(&self, &other.describe())),
        }
    }
}

/// The normalised base URL and default name of a `hosts.json` entry string.
/// The error completes a sentence that starts with the field name.
fn parse_host(s: &str) -> Result<(String, String), String> {
    match s.split_once("://") {
        None => parse_subdomain(s),
        Some((scheme, rest)) => parse_url(scheme, rest),
    }
}

fn parse_subdomain(s: &str) -> Result<(String, String), String> {
    let label = s.to_ascii_lowercase();
    let valid = !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    if valid {
        return Ok((format!("https://{label}.gaia.domains"), label));
    }
    let mut message = format!(
        "must be a Gaia subdomain such as \"asia\" (letters, digits and '-', at most 63) \
         or a base URL starting with http:// or https://, got {}",
        quote(s)
    );
    if s.contains('.') && !s.contains(char::is_whitespace) {
        message.push_str(&format!(
            "; for a full host name write a URL: \"https://{s}\""
        ));
    }
    Err(message)
}

/// The port a URL of `scheme` means when it names none.
pub fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

fn parse_url(scheme: &str, rest: &str) -> Result<(String, String), String> {
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "must start with http:// or https://, got {}",
            quote(&format!("{scheme}://"))
        ));
    }
    if rest.contains(['?', '#']) {
        return Err(
            "must not contain a query (?) or fragment (#); give the base URL only, \
                    e.g. \"https://node.example/v1\""
                .to_string(),
        );
    }
    if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".to_string());
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(
            "must not contain a user name or password (user@host); put keys in \"apiKeys\""
                .to_string(),
        );
    }
    let (host, port) = split_host_port(authority)?;
    let host = host.to_ascii_lowercase();
    // The scheme's own port is the same host without it (duplicates, names).
    let port = port.filter(|p| Some(*p) != default_port(&scheme));
    let host_port = match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    };
    let mut path = path.trim_end_matches('/');
    if let Some(stripped) = path.strip_suffix("/v1") {
        path = stripped.trim_end_matches('/');
    }
    let base = format!("{scheme}://{host_port}{path}");
    // Every request URL is this base plus `/v1/...`, parsed by the HTTP layer
    // when the request is built. A path it refuses would fail every request
    // to the host (answered 400, as if the client were at fault) while
    // `check` called the file valid, so it is refused here, with the character.
    if format!("{base}/v1/models")
        .parse::<ureq::http::Uri>()
        .is_err()
    {
        let root = format!("{scheme}://{host_port}/");
        let bad = path
            .chars()
            .find(|c| format!("{root}{c}").parse::<ureq::http::Uri>().is_err());
        return Err(match bad {
            Some(c) => {
                let mut utf8 = [0u8; 4];
                let encoded: String = c
                    .encode_utf8(&mut utf8)
                    .bytes()
                    .map(|b| format!("%{b:02X}"))
                    .collect();
                format!(
                    "has {} in its path, which a URL must percent-encode: write {encoded}",
                    quote(&c.to_string())
                )
            }
            None => format!("is not a valid URL: {}", quote(&base)),
        });
    }
    Ok((base, host_port))
}

fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let Some((addr, after)) = inner.split_once(']') else {
            return Err("has an IPv6 address without its closing ']'".to_string());
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!(
                "has an invalid IPv6 address {}",
                quote(&format!("[{addr}]"))
            ));
        }
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err("has text after the IPv6 address; expected :PORT".into()),
            },
        };
        (&authority[..addr.len() + 2], port)
    } else {
        match authority.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err("has an IPv6 address that is not in brackets, e.g. \
                            \"http://[::1]:8080\""
                    .to_string())
            }
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("has no host name, e.g. \"http://127.0.0.1:8080\"".to_string());
    }
    if !host.starts_with('[') {
        let valid = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            && !host.starts_with(['.', '-'])
            && !host.contains("..");
        if !valid {
            return Err(format!(
                "has an invalid host name {} (letters, digits, '-', '.' and '_' only)",
                quote(host)
            ));
        }
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n >= 1 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
            _ => {
                return Err(format!(
                    "has an invalid port {}; expected a number from 1 to 65535",
                    quote(p)
                ))
            }
        },
    };
    Ok((host, port))
}

/// One `hosts.json` entry: a string or an object with `url`, checked against
/// the entries before it (`seen`) so a duplicate is reported at its position.
struct HostEntry<'p> {
    path: &'p str,
    list: &'p str,
    seen: &'p [HostSpec],
}

impl HostEntry<'_> {
    fn unique<E: de::Error>(&self, host: HostSpec) -> Result<HostSpec, E> {
        let path = self.path;
        if let Some(first) = self.seen.iter().position(|h| h.base_url == host.base_url) {
            return Err(fail(
                path,
                format!(
                    "{path} has the same URL as {}[{first}] ({}); list each host once",
                    self.list, host.base_url
                ),
            ));
        }
        if let Some(first) = self.seen.iter().position(|h| h.name == host.name) {
            return Err(fail(
                path,
                format!(
                    "{path} has the same name as {}[{first}] ({}); give one of them \
                     a different \"name\"",
                    self.list,
                    quote(&host.name)
                ),
            ));
        }
        Ok(host)
    }
}

impl Shape for HostEntry<'_> {
    type Out = HostSpec;
    fn path(&self) -> &str {
        self.path
    }
    fn expected(&self) -> String {
        "a Gaia subdomain such as \"asia\", a base URL such as \"https://node.example\", \
         or an object such as {\"url\": \"https://node.example\", \"weight\": 2}"
            .to_string()
    }
    fn scalar<E: de::Error>(self, got: Scalar) -> Result<HostSpec, E> {
        let (base_url, name) = HostUrl(self.path).scalar(got)?;
        self.unique(HostSpec {
            name,
            base_url,
            weight: 1,
            backup: false,
            api_keys: None,
            models: BTreeMap::new(),
        })
    }
    fn map<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<HostSpec, A::Error> {
        let mut url = None;
        let mut name = None;
        let mut weight = 1;
        let mut backup = false;
        let mut api_keys = None;
        let mut models = BTreeMap::new();
        fields(&mut map, self.path, &HOST_FIELDS, |map, key, path| {
            match key {
                "url" => url = Some(map.next_value_seed(Via(HostUrl(path)))?),
                "name" => {
                    let given = map.next_value_seed(Via(Text {
                        path,
                        nonempty: true,
                    }))?;
                    // It is sent in `x-gaia-upstream` and written as one log
                    // field: a header drops other characters, a space splits the field.
                    if !given.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(fail(
                            path,
                            format!(
                                "name {} must be visible ASCII without spaces (it goes into the \
                                 x-gaia-upstream header and log lines), e.g. \"tokyo-1\"",
                                quote(&given)
                            ),
                        ));
                    }
                    name = Some(given)
                }
                "weight" => weight = narrow(int(map, path, 1, u64::from(MAX_WEIGHT))?, MAX_WEIGHT),
                "backup" => backup = map.next_value_seed(Via(Bool(path)))?,
                "apiKeys" => {
                    api_keys = Some(map.next_value_seed(Via(SecretList {
                        path,
                        allow_empty: false,
                    }))?)
                }
                _ => models = map.next_value_seed(Via(Models(path)))?,
            }
            Ok(())
        })?;
        let Some((base_url, default_name)) = url else {
            return Err(fail(
                self.path,
                format!(
                    "{} needs a \"url\", e.g. {{\"url\": \"https://node.example\", \"weight\": 2}}",
                    self.path
                ),
            ));
        };
        self.unique(HostSpec {
            name: name.unwrap_or(default_name),
            base_url,
            weight,
            backup,
            api_keys,
            models,
        })
    }
}

/// The `hosts` array: non-empty, no two entries with the same URL or name.
struct HostList<'p>(&'p str);

impl Shape for HostList<'_> {
    type Out = Vec<HostSpec>;
    fn path(&self) -> &str {
        self.0
    }
    fn expected(&self) -> String {
        "an array of hosts, e.g. [\"asia\", \"http://127.0.0.1:8080\"]".to_string()
    }
    fn seq<'de, A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<HostSpec>, A::Error> {
        let mut hosts: Vec<HostSpec> = Vec::new();
        loop {
            let child = format!("{}[{}]", self.0, hosts.len());
            let entry = HostEntry {
                path: &child,
                list: self.0,
                seen: &hosts,
            };
            let Some(host) = seq.next_element_seed(Via(entry))? else {
                break;
            };
            hosts.push(host);
        }
        if hosts.is_empty() {
            return Err(fail(
                self.0,
                format!(
                    "{} is empty; list at least one host, e.g. [\"asia\"]",
                    self.0
                ),
            ));
        }
        Ok(hosts)
    }
}

/// The whole of `hosts.json`.
struct HostsFile;

impl Shape for HostsFile {
    type Out = Vec<HostSpec>;
    fn path(&self) -> &str {
        ""
    }
    fn expected(&self) -> String {
        "an object such as {\"hosts\": [\"asia\"]}".to_string()
    }
    fn map<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<HostSpec>, A::Error> {
        let mut hosts = None;
        fields(&mut map, "", &HOSTS_FILE_FIELDS, |map, _, path| {
            hosts = Some(map.next_value_seed(Via(HostList(path)))?);
            Ok(())
        })?;
        hosts.ok_or_else(|| {
            fail(
                "hosts",
                "the file needs a \"hosts\" array, e.g. {\"hosts\": [\"asia\"]}",
            )
        })
    }
}

/// One `api-keys.json` entry: its key and whether it is active. An active key
/// is checked against the active keys before it (`seen`, with their indexes).
struct KeyEntry<'p> {
    path: &'p str,
    list: &'p str,
    seen: &'p [(String, usize)],
}

impl Shape for KeyEntry<'_> {
    type Out = (String, bool);
    fn path(&self) -> &str {
        self.path
    }
    fn expected(&self) -> String {
        "an object such as {\"key\": \"gaia-...\", \"description\": \"main\", \"isActive\": true}"
            .to_string()
    }
    fn map<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<(String, bool), A::Error> {
        let mut key = None;
        let mut active = true;
        // The original project writes more than these (e.g. `createdAt`).
        let unknown = Unknown::SkipUnlessTypo;
        fields_with(
            &mut map,
            self.path,
            &KEY_FIELDS,
            unknown,
            |map, field, path| {
                match field {
                    "key" => key = Some(secret(map, path)?),
                    "description" => {
                        map.next_value_seed(Via(Text {
                            path,
                            nonempty: false,
                        }))?;
                    }
                    _ => active = map.next_value_seed(Via(Bool(path)))?,
                }
                Ok(())
            },
        )?;
        let Some(key) = key else {
            return Err(fail(
                self.path,
                format!(
                    "{} needs a \"key\", e.g. {{\"key\": \"gaia-...\"}}",
                    self.path
                ),
            ));
        };
        if active {
            if let Some((_, first)) = self.seen.iter().find(|(k, _)| *k == key) {
                let path = format!("{}.key", self.path);
                return Err(fail(
                    &path,
                    format!(
                        "{path} is the same key as {}[{first}].key; list each key once \
                         (or set \"isActive\": false on one)",
                        self.list
                    ),
                ));
            }
        }
        Ok((key, active))
    }
}

/// The `apiKeys` array of `api-keys.json`: the active keys, no duplicates.
struct KeyList<'p>(&'p str);

impl Shape for KeyList<'_> {
    type Out = Vec<String>;
    fn path(&self) -> &str {
        self.0
    }
    fn expected(&self) -> String {
        "an array of key objects".to_string()
    }
    fn seq<'de, A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut active: Vec<(String, usize)> = Vec::new();
        for index in 0.. {
            let child = format!("{}[{index}]", self.0);
            let entry = KeyEntry {
                path: &child,
                list: self.0,
                seen: &active,
            };
            let Some((key, is_active)) = seq.next_element_seed(Via(entry))? else {
                break;
            };
            if is_active {
                active.push((key, index));
            }
        }
        Ok(active.into_iter().map(|(key, _)| key).collect())
    }
}

/// The whole of `api-keys.json`: the active keys of the global pool.
struct ApiKeysFile;

impl Shape for ApiKeysFile {
    type Out = Vec<String>;
    fn path(&self) -> &str {
        ""
    }
    fn expected(&self) -> String {
        "an object such as {\"apiKeys\": [{\"key\": \"gaia-...\"}]}".to_string()
    }
    fn map<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
        let mut keys = Vec::new();
        fields(&mut map, "", &KEY_FILE_FIELDS, |map, _, path| {
            keys = map.next_value_seed(Via(KeyList(path)))?;
            Ok(())
        })?;
        Ok(keys)
    }
}

struct StrategyName<'p>(&'p str);

impl Shape for StrategyName<'_> {
    type Out = Strategy;
    fn path(&self) -> &str {
        self.0
    }
    fn expected(&self) -> String {
        let names: Vec<String> = Strategy::ALL
            .iter()
            .map(|s| format!("\"{}\"", s.as_str()))
            .collect();
        format!("one of {}", names.join(", "))
    }
    fn scalar<E: de::Error>(self, got: Scalar) -> Result<Strategy, E> {
        let described = match &got {
            Scalar::Str(s) => match Strategy::from_name(s) {
                Some(strategy) => return Ok(strategy),
                None => quote(s),
            },
            other => other.describe(),
        };
        Err(wrong_type(&self, &described))
    }
}

struct IpAddress<'p>(&'p str);

impl Shape for IpAddress<'_> {
    type Out = IpAddr;
    fn path(&self) -> &str {
        self.0
    }
    fn expected(&self) -> String {
        "an IP address such as \"127.0.0.1\", \"0.0.0.0\" or \"::\" (host names are not resolved)"
            .to_string()
    }
    fn scalar<E: de::Error>(self, got: Scalar) -> Result<IpAddr, E> {
        let described = match &got {
            Scalar::Str(s) => match s.parse() {
                Ok(ip) => return Ok(ip),
                Err(_) => quote(s),
            },
            other => other.describe(),
        };
        Err(wrong_type(&self, &described))
    }
}

/// `timeouts` in `balancer.json`; fields left out keep their defaults.
struct TimeoutsShape<'p>(&'p str);

impl Shape for TimeoutsShape<'_> {
    type Out = Timeouts;
    fn path(&self) -> &str {
        self.0
    }
    fn expected(&self) -> String {
        "an object such as {\"connectMs\": 5000}".to_string()
    }
    fn map<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<Timeouts, A::Error> {
        let mut t = Settings::default().timeouts;
        fields(&mut map, self.0, &TIMEOUT_FIELDS, |map, key, path| {
            let value = millis(map, path, 1)?;
            match key {
                "connectMs" => t.connect = value,
                "firstByteMs" => t.first_byte = value,
                "idleMs" => t.idle = value,
                _ => t.total = value,
            }
            Ok(())
        })?;
        Ok(t)
    }
}

/// `hedge` in `balancer.json`; `afterMs: 0` turns hedging off.
struct HedgeShape<'p>(&'p str);

impl Shape for HedgeShape<'_> {
    type Out = Hedge;
    fn path(&self) -> &str {
        self.0
    }
    fn expected(&self) -> String {
        "an object such as {\"afterMs\": 0}".to_string()
    }
    fn map<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<Hedge, A::Error> {
        let mut hedge = Settings::default().hedge;
        fields(&mut map, self.0, &HEDGE_FIELDS, |map, _, path| {
            hedge = map.next_value_seed(Via(HedgeDelay(path)))?;
            Ok(())
        })?;
        Ok(hedge)
    }
}

/// `hedge.afterMs`: whole milliseconds (0 = off) or `"auto"`.
struct HedgeDelay<'p>(&'p str);

impl Shape for HedgeDelay<'_> {
    type Out = Hedge;
    fn path(&self) -> &str {
        self.0
    }
    fn expected(&self) -> String {
        format!("an integer from 0 to {MAX_MS}, or \"auto\"")
    }
    fn scalar<E: de::Error>(self, got: Scalar) -> Result<Hedge, E> {
        match got {
            Scalar::Str(s) if s == "auto" => Ok(Hedge::Auto),
            Scalar::UInt(0) => Ok(Hedge::Off),
            Scalar::UInt(n) if n <= MAX_MS => Ok(Hedge::After(Duration::from_millis(n))),
            Scalar::UInt(n) => Err(fail(
                self.0,
                format!("afterMs must be an integer <= {MAX_MS} or \"auto\", got {n}"),
            )),
            other => Err(fail(
                self.0,
                format!(
                    "afterMs must be an integer >= 0 or \"auto\", got {}",
                    other.describe()
                ),
            )),
        }
    }
}

/// `discoveryIntervalMs`: 0 (off) or at least [`MIN_DISCOVERY_INTERVAL`],
/// since polling faster than once a second only loads the hosts.
struct DiscoveryInterval<'p>(&'p str);

impl Shape for DiscoveryInterval<'_> {
    type Out = Option<Duration>;
    fn path(&self) -> &str {
        self.0
    }
    fn expected(&self) -> String {
        format!(
            "0 (off) or an integer from {} to {MAX_MS}",
            MIN_DISCOVERY_INTERVAL.as_millis()
        )
    }
    fn scalar<E: de::Error>(self, got: Scalar) -> Result<Option<Duration>, E> {
        let ms = Int {
            path: self.0,
            min: 0,
            max: MAX_MS,
        }
        .scalar(got)?;
        let d = Duration::from_millis(ms);
        if !d.is_zero() && d < MIN_DISCOVERY_INTERVAL {
            return Err(fail(
                self.0,
                format!(
                    "{} must be 0 (off) or an integer >= {}, got {ms}",
                    leaf(self.0),
                    MIN_DISCOVERY_INTERVAL.as_millis()
                ),
            ));
        }
        Ok((!d.is_zero()).then_some(d))
    }
}

/// `caFile`: `null` (none) or the path of a PEM file, relative to the config
/// directory `dir`. The file is read and parsed right here, so that `check`
/// and a reload report a bad file at the line of `caFile` in balancer.json.
struct CaFileShape<'p> {
    path: &'p str,
    dir: &'p Path,
}

impl Shape for CaFileShape<'_> {
    type Out = Option<CaFile>;
    fn path(&self) -> &str {
        self.path
    }
    fn expected(&self) -> String {
        "the path of a PEM file of root certificates, or null".to_string()
    }
    fn scalar<E: de::Error>(self, got: Scalar) -> Result<Option<CaFile>, E> {
        match got {
            Scalar::Null => Ok(None),
            Scalar::Str(s) => {
                let text = Text {
                    path: self.path,
                    nonempty: true,
                };
                let path = ca_file_path(self.dir, &text.scalar(Scalar::Str(s))?);
                match read_roots(&path) {
                    Ok(roots) => Ok(Some(CaFile { path, roots })),
                    Err(message) => Err(fail(self.path, format!("{}: {message}", leaf(self.path)))),
                }
            }
            other => Err(wrong_type(&self, &other.describe())),
        }
    }
}

/// Where a `caFile` value points: an absolute path as is, a relative one
/// inside the config directory (not the working directory, which differs
/// between a shell, systemd and a container).
fn ca_file_path(dir: &Path, value: &str) -> PathBuf {
    dir.join(value)
}

/// The `caFile` that `balancer.json` (its raw bytes) names, resolved against
/// `dir`; `None` when there is none or the file is not valid JSON. Lets the
/// reloader watch the CA file even while the config naming it is refused.
pub(crate) fn ca_file_named(dir: &Path, balancer_json: &[u8]) -> Option<PathBuf> {
    let bytes = balancer_json
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(balancer_json);
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let name = value.get("caFile")?.as_str()?;
    (!name.trim().is_empty()).then(|| ca_file_path(dir, name))
}

/// The bytes of a `caFile` (see [`read_regular`]).
pub(crate) fn read_ca_file(path: &Path) -> io::Result<Vec<u8>> {
    read_regular(path, MAX_CA_FILE_BYTES, "a file of root certificates")
}

/// The bytes of one of the three config files (see [`read_regular`]); the
/// reloader reads them with this too, every poll.
pub(crate) fn read_config_file(path: &Path) -> io::Result<Vec<u8>> {
    read_regular(path, MAX_CONFIG_FILE_BYTES, "a configuration file")
}

/// The bytes of the file at `path`, at most `max` of them. Only a regular
/// file is opened (symbolic links followed): a FIFO would block the loader
/// (and with it `check`, the reloader and shutdown, which waits for the
/// reloader) and a device such as `/dev/zero` might never end; the size is
/// capped for the same reason. `what` completes "too large for".
fn read_regular(path: &Path, max: u64, what: &str) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    if !std::fs::metadata(path)?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes, too large for {what}"),
        ));
    }
    Ok(bytes)
}

/// The certificates of the PEM file at `path`, in file order; the error
/// completes "caFile: ". Other PEM blocks (a key, a CRL) are skipped, as
/// every TLS tool does with a CA file, but a file with no certificate at
/// all, a broken block, or a block that is not an X.509 certificate is an
/// error: better refused by `check` than found at the first TLS handshake.
fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let bytes = read_ca_file(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    // Windows editors may start the file with a byte order mark, which would
    // hide the first BEGIN line from the PEM reader.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut roots = Vec::new();
    for item in CertificateDer::pem_slice_iter(bytes) {
        let cert = item.map_err(|e| {
            format!(
                "{shown} has a malformed PEM block after {} certificate(s): {}",
                roots.len(),
                pem_problem(&e)
            )
        })?;
        // The same check the TLS setup makes when it adds the root, done
        // here so that a bad one is reported with the file.
        if let Err(e) = rustls::RootCertStore::empty().add(cert.clone()) {
            return Err(format!(
                "certificate {} in {shown} is not a usable X.509 certificate: {e}",
                roots.len() + 1
            ));
        }
        roots.push(cert);
    }
    if roots.is_empty() {
        return Err(format!(
            "{shown} holds no PEM certificate (no -----BEGIN CERTIFICATE----- block)"
        ));
    }
    Ok(roots)
}

/// A PEM error in words; the library's own text shows lines as byte arrays.
fn pem_problem(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a BEGIN line has no matching END line".into(),
        pem::Error::IllegalSectionStart { .. } => "a BEGIN line is malformed".into(),
        pem::Error::Base64Decode(_) => "the text between BEGIN and END is not valid base64".into(),
        other => other.to_string(),
    }
}

/// The whole of `balancer.json`, over [`Settings::default`]; `dir` is the
/// config directory, which a relative `caFile` is resolved against.
struct BalancerFile<'d> {
    dir: &'d Path,
}

impl Shape for BalancerFile<'_> {
    type Out = Settings;
    fn path(&self) -> &str {
        ""
    }
    fn expected(&self) -> String {
        "an object such as {\"strategy\": \"round-robin\"}".to_string()
    }
    fn map<'de, A: MapAccess<'de>>(self, mut map: A) -> Result<Settings, A::Error> {
        let mut s = Settings::default();
        fields(&mut map, "", &BALANCER_FIELDS, |map, key, path| {
            match key {
                "bind" => s.bind = map.next_value_seed(Via(IpAddress(path)))?,
                "port" => s.port = narrow(int(map, path, 0, u64::from(u16::MAX))?, u16::MAX),
                "workers" => {
                    s.workers = narrow(int(map, path, 1, MAX_WORKERS as u64)?, MAX_WORKERS)
                }
                "clientKeys" => {
                    s.client_keys = map.next_value_seed(Via(SecretList {
                        path,
                        allow_empty: true,
                    }))?
                }
                "open" => s.open = map.next_value_seed(Via(Bool(path)))?,
                "adminKey" => {
                    s.admin_key = map.next_value_seed(Via(Secret {
                        path,
                        nullable: true,
                    }))?
                }
                "strategy" => s.strategy = map.next_value_seed(Via(StrategyName(path)))?,
                "maxAttempts" => {
                    s.max_attempts =
                        narrow(int(map, path, 1, u64::from(MAX_ATTEMPTS))?, MAX_ATTEMPTS)
                }
                "timeouts" => s.timeouts = map.next_value_seed(Via(TimeoutsShape(path)))?,
                "hedge" => s.hedge = map.next_value_seed(Via(HedgeShape(path)))?,
                "maxBodyBytes" => s.max_body_bytes = int(map, path, 1, MAX_BODY_BYTES)?,
                "discoveryIntervalMs" => {
                    s.discovery_interval = map.next_value_seed(Via(DiscoveryInterval(path)))?
                }
                "caFile" => {
                    s.ca_file = map.next_value_seed(Via(CaFileShape {
                        path,
                        dir: self.dir,
                    }))?
                }
                "headTimeoutMs" => s.head_timeout = millis(map, path, 1)?,
                "keepAliveMs" => s.keep_alive = millis(map, path, 1)?,
                "bodyTimeoutMs" => s.body_timeout = millis(map, path, 1)?,
                "writeTimeoutMs" => s.write_timeout = millis(map, path, 1)?,
                "maxConnectionsPerClient" => {
                    s.max_connections_per_client =
                        narrow(int(map, path, 1, MAX_CONNECTIONS as u64)?, MAX_CONNECTIONS)
                }
                "queueSize" => {
                    s.queue_size = narrow(int(map, path, 1, MAX_QUEUE as u64)?, MAX_QUEUE)
                }
                "queueWaitMs" => s.queue_wait = millis(map, path, 1)?,
                "streamKeepAliveAfterMs" => {
                    let d = millis(map, path, 0)?;
                    s.stream_keep_alive_after = (!d.is_zero()).then_some(d);
                }
                "streamKeepAliveEveryMs" => s.stream_keep_alive_every = millis(map, path, 1)?,
                // 0 is allowed: exit as soon as the listener is closed.
                _ => s.shutdown_grace = millis(map, path, 0)?,
            }
            Ok(())
        })?;
        Ok(s)
    }
}

/// Largest `maxConnectionsPerClient` accepted.
pub const MAX_CONNECTIONS: usize = 1_000_000;
/// Largest `queueSize` accepted.
pub const MAX_QUEUE: usize = 1_000_000;

/// Two small self-signed P-256 root certificates (made once with `openssl
/// req -x509`, CN "gaia-balancer test root one" and "... two"; valid until
/// 2126), for tests of `caFile` here and in the reloader.
#[cfg(test)]
pub(crate) mod test_roots {
    /// The first root, PEM.
    pub const ONE: &str = "\
-----BEGIN CERTIFICATE-----
MIIBozCCAUmgAwIBAgIUbD39VSUJl/t+YH2FZbWIbxQm+hswCgYIKoZIzj0EAwIw
JjEkMCIGA1UEAwwbZ2FpYS1iYWxhbmNlciB0ZXN0IHJvb3Qgb25lMCAXDTI2MTEy
NjIwNDM1M1oYDzIxMjYxMTAyMjA0MzUzWjAmMSQwIgYDVQQDDBtnYWlhLWJhbGFu
Y2VyIHRlc3Qgcm9vdCBvbmUwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAS61wxH
TX9Kh/heeyo9cPR/fZDitr0ePM78aSTijJDOMNZ6ilQ0vwLd587K4ia+U3VHCTcZ
WFpSnOF6htAc8nQdo1MwUTAdBgNVHQ4EFgQUQgAVDuXOjuducdpyHq/HuhLHK7Uw
HwYDVR0jBBgwFoAUQgAVDuXOjuducdpyHq/HuhLHK7UwDwYDVR0TAQH/BAUwAwEB
/zAKBggqhkjOPQQDAgNIADBFAiEAire3xXK9NtxOtMqnnr5IezEBSlnt25ShsUsq
3DqU390CIAK3ru3oy+6mdz9UgIvxsC5wpDxJEE47UZwuYNPGLk8h
-----END CERTIFICATE-----
";
    /// The second root, PEM.
    pub const TWO: &str = "\
-----BEGIN CERTIFICATE-----
MIIBozCCAUmgAwIBAgIUbN7RJDOWI7md1m7Kd+l0rMEU2u8wCgYIKoZIzj0EAwIw
JjEkMCIGA1UEAwwbZ2FpYS1iYWxhbmNlciB0ZXN0IHJvb3QgdHdvMCAXDTI2MTEy
NjIwNDM1M1oYDzIxMjYxMTAyMjA0MzUzWjAmMSQwIgYDVQQDDBtnYWlhLWJhbGFu
Y2VyIHRlc3Qgcm9vdCB0d28wWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASG4g1J
5uq/GMaXM9daZaulb3UHAc4U69yJwBDRxp59Bdd9t1t66ftPOJZ9dPy/eu4sPfwb
K0Gy41kpTu5Y7dOxo1MwUTAdBgNVHQ4EFgQUVE9CYQQm03iEoUAJ2qDsJMPxTwww
HwYDVR0jBBgwFoAUVE9CYQQm03iEoUAJ2qDsJMPxTwwwDwYDVR0TAQH/BAUwAwEB
/zAKBggqhkjOPQQDAgNIADBFAiEApeNAOFn6ffqw3rizepcuR3LCzgv1u/oZN4C4
KDY0jToCID2gqycwKuJthdHHrnG96jiP8Q/OZ3jYLv3ukQ64E2Vc
-----END CERTIFICATE-----
";
    /// Length of each one's DER encoding (`openssl x509 -outform der | wc -c`).
    pub const DER_LEN: usize = 423;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A scratch config directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "gaia-balancer-config-test-{}-{n}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn with(files: &[(&str, &str)]) -> TempDir {
            let dir = TempDir::new();
            for (name, text) in files {
                std::fs::write(dir.0.join(name), text).unwrap();
            }
            dir
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn load_files(files: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = TempDir::with(files);
        load(&dir.0, &Overrides::default())
    }

    fn hosts(text: &str) -> Result<Vec<HostSpec>, ConfigError> {
        load_files(&[("hosts.json", text)]).map(|c| c.hosts)
    }

    fn settings(text: &str) -> Result<Settings, ConfigError> {
        load_files(&[
            ("hosts.json", r#"{"hosts": ["asia"]}"#),
            ("balancer.json", text),
        ])
        .map(|c| c.settings)
    }

    fn keys(text: &str) -> Result<Vec<String>, ConfigError> {
        load_files(&[
            ("hosts.json", r#"{"hosts": ["asia"]}"#),
            ("api-keys.json", text),
        ])
        .map(|c| c.api_keys)
    }

    /// Assert the error names `file`, `field` and `position`, in the struct and
    /// in the Display text, and that the text contains `says`.
    #[track_caller]
    fn assert_err<T: fmt::Debug>(
        result: Result<T, ConfigError>,
        file: &str,
        field: Option<&str>,
        position: Option<(usize, usize)>,
        says: &str,
    ) -> String {
        let e = result.unwrap_err();
        let text = e.to_string();
        assert_eq!(
            e.file.file_name().and_then(|f| f.to_str()),
            Some(file),
            "{text}"
        );
        assert!(e.file.is_absolute(), "{text}");
        assert_eq!(e.field.as_deref(), field, "{text}");
        assert_eq!(e.position, position, "{text}");
        let shown_file = format!("{}", e.file.display());
        assert!(text.starts_with(&shown_file), "{text}");
        if let Some((line, col)) = position {
            assert!(text.contains(&format!("{file}:{line}:{col}: ")), "{text}");
        }
        if let Some(field) = field {
            assert!(text.contains(&format!("field `{field}`")), "{text}");
        }
        assert!(text.contains(says), "expected {says:?} in: {text}");
        assert!(!text.contains(MARK), "{text}");
        text
    }

    fn repo_config() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
    }

    #[test]
    fn shipped_config_loads_with_every_default() {
        let config = load(&repo_config(), &Overrides::default()).unwrap();
        let names: Vec<&str> = config.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "asia",
                "hyperliquid",
                "ukraine",
                "llama3b",
                "scroll",
                "nillion",
                "optimism",
                "sakura"
            ]
        );
        assert_eq!(config.hosts[3].base_url, "https://llama3b.gaia.domains");
        assert!(config.hosts.iter().all(|h| h.weight == 1 && !h.backup));
        // The placeholder key is inactive, so it is never sent.
        assert!(config.api_keys.is_empty());
        assert_eq!(config.settings, Settings::default());
    }

    #[test]
    fn shipped_balancer_json_spells_out_every_field() {
        let text = std::fs::read_to_string(repo_config().join("balancer.json")).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let sorted = |fields: &[&str]| -> Vec<String> {
            let mut k: Vec<String> = fields.iter().map(|s| s.to_string()).collect();
            k.sort();
            k
        };
        assert_eq!(keys(&value), sorted(&BALANCER_FIELDS));
        assert_eq!(keys(&value["timeouts"]), sorted(&TIMEOUT_FIELDS));
        assert_eq!(keys(&value["hedge"]), sorted(&HEDGE_FIELDS));
    }

    #[test]
    fn non_default_balancer_json_changes_every_setting() {
        let dir = TempDir::with(&[
            ("hosts.json", r#"{"hosts": ["asia"]}"#),
            ("ca.pem", test_roots::ONE),
            (
                "balancer.json",
                r#"{
              "bind": "0.0.0.0", "port": 8080, "workers": 32,
              "clientKeys": ["client-key-aaaaaaaa", "client-key-bbbbbbbb"],
              "open": true, "adminKey": "admin-key-cccccccc", "strategy": "least-loaded",
              "maxAttempts": 3,
              "timeouts": {"connectMs": 1, "firstByteMs": 2, "idleMs": 3, "totalMs": 4},
              "hedge": {"afterMs": 250}, "maxBodyBytes": 1024, "discoveryIntervalMs": 5000,
              "caFile": "ca.pem",
              "headTimeoutMs": 11, "keepAliveMs": 12, "bodyTimeoutMs": 13,
              "writeTimeoutMs": 18,
              "maxConnectionsPerClient": 7, "queueSize": 8, "queueWaitMs": 14,
              "streamKeepAliveAfterMs": 15, "streamKeepAliveEveryMs": 16,
              "shutdownGraceMs": 17
            }"#,
            ),
        ]);
        let s = load(&dir.0, &Overrides::default()).unwrap().settings;
        let ms = Duration::from_millis;
        let expected = Settings {
            bind: IpAddr::from([0, 0, 0, 0]),
            port: 8080,
            workers: 32,
            client_keys: vec!["client-key-aaaaaaaa".into(), "client-key-bbbbbbbb".into()],
            open: true,
            admin_key: Some("admin-key-cccccccc".into()),
            strategy: Strategy::LeastLoaded,
            max_attempts: 3,
            timeouts: Timeouts {
                connect: ms(1),
                first_byte: ms(2),
                idle: ms(3),
                total: ms(4),
            },
            hedge: Hedge::After(ms(250)),
            max_body_bytes: 1024,
            discovery_interval: Some(ms(5000)),
            ca_file: Some(CaFile {
                path: dir.0.join("ca.pem"),
                roots: vec![CertificateDer::from_pem_slice(test_roots::ONE.as_bytes()).unwrap()],
            }),
            head_timeout: ms(11),
            keep_alive: ms(12),
            body_timeout: ms(13),
            write_timeout: ms(18),
            max_connections_per_client: 7,
            queue_size: 8,
            queue_wait: ms(14),
            stream_keep_alive_after: Some(ms(15)),
            stream_keep_alive_every: ms(16),
            shutdown_grace: ms(17),
        };
        assert_eq!(s, expected);
        let off = settings(r#"{"streamKeepAliveAfterMs": 0}"#).unwrap();
        assert_eq!(off.stream_keep_alive_after, None);
        let off = settings(r#"{"discoveryIntervalMs": 0}"#).unwrap();
        assert_eq!(off.discovery_interval, None);
    }

    #[test]
    fn partial_objects_keep_the_other_defaults() {
        let s = settings(r#"{"timeouts": {"idleMs": 42}, "strategy": "random"}"#).unwrap();
        let d = Settings::default();
        assert_eq!(s.timeouts.idle, Duration::from_millis(42));
        assert_eq!(s.timeouts.connect, d.timeouts.connect);
        assert_eq!(s.timeouts.total, d.timeouts.total);
        assert_eq!(s.strategy, Strategy::Random);
        assert_eq!(s.port, d.port);
        assert_eq!(settings("{}").unwrap(), d);
    }

    #[test]
    fn every_strategy_name_round_trips() {
        for strategy in Strategy::ALL {
            let s = settings(&format!(r#"{{"strategy": "{strategy}"}}"#)).unwrap();
            assert_eq!(s.strategy, strategy);
        }
        assert_eq!(Strategy::from_name("fastest"), None);
    }

    #[test]
    fn hedge_zero_is_off_and_auto_is_auto() {
        assert_eq!(
            settings(r#"{"hedge": {"afterMs": 0}}"#).unwrap().hedge,
            Hedge::Off
        );
        assert_eq!(settings(r#"{"hedge": {}}"#).unwrap().hedge, Hedge::Off);
        assert_eq!(
            settings(r#"{"hedge": {"afterMs": "auto"}}"#).unwrap().hedge,
            Hedge::Auto
        );
        let err = settings(r#"{"hedge": {"afterMs": "soon"}}"#).unwrap_err();
        assert!(err.to_string().contains("auto"), "{err}");
    }

    #[test]
    fn admin_key_null_means_none() {
        assert_eq!(settings(r#"{"adminKey": null}"#).unwrap().admin_key, None);
    }

    #[test]
    fn gaia_subdomains_expand() {
        let h = hosts(r#"{"hosts": ["asia", "Llama3B", "node-1"]}"#).unwrap();
        assert_eq!(h[0].base_url, "https://asia.gaia.domains");
        assert_eq!(h[0].name, "asia");
        assert_eq!(h[1].base_url, "https://llama3b.gaia.domains");
        assert_eq!(h[1].name, "llama3b");
        assert_eq!(h[2].base_url, "https://node-1.gaia.domains");
        assert_eq!(h[0].weight, 1);
        assert!(!h[0].backup);
        assert_eq!(h[0].api_keys, None);
        assert!(h[0].models.is_empty());
    }

    #[test]
    fn urls_are_normalised_and_named_by_host() {
        let cases = [
            (
                "http://127.0.0.1:8080",
                "http://127.0.0.1:8080",
                "127.0.0.1:8080",
            ),
            (
                "https://node.example/",
                "https://node.example",
                "node.example",
            ),
            (
                "https://node.example/v1",
                "https://node.example",
                "node.example",
            ),
            (
                "https://node.example/v1/",
                "https://node.example",
                "node.example",
            ),
            (
                "https://openrouter.ai/api/v1",
                "https://openrouter.ai/api",
                "openrouter.ai",
            ),
            (
                "https://x.example/v1/v1",
                "https://x.example/v1",
                "x.example",
            ),
            (
                "https://x.example/v10",
                "https://x.example/v10",
                "x.example",
            ),
            (
                "HTTPS://Node.Example:8443/V1",
                "https://node.example:8443/V1",
                "node.example:8443",
            ),
            ("http://[::1]:8080/v1", "http://[::1]:8080", "[::1]:8080"),
            ("http://[::1]", "http://[::1]", "[::1]"),
            ("http://my_service:80", "http://my_service", "my_service"),
            ("https://n.example:443", "https://n.example", "n.example"),
            (
                "https://n.example:80",
                "https://n.example:80",
                "n.example:80",
            ),
        ];
        for (input, base, name) in cases {
            let (b, n) = parse_host(input).unwrap();
            assert_eq!((b.as_str(), n.as_str()), (base, name), "{input}");
        }
    }

    #[test]
    fn bad_host_strings_are_refused() {
        let cases = [
            ("ftp://node.example", "must start with http:// or https://"),
            ("https://node.example/v1?key=1", "must not contain a query"),
            ("https://node.example/#frag", "fragment"),
            ("https://user:pw@node.example", "user name or password"),
            ("https://node.example:0", "invalid port \"0\""),
            ("https://node.example:99999", "invalid port"),
            ("https://node.example:", "invalid port \"\""),
            ("https://node.example:80a", "invalid port"),
            ("https:///v1", "has no host name"),
            ("https://", "has no host name"),
            ("http://::1:8080", "not in brackets"),
            ("http://[::1", "closing ']'"),
            ("http://[zz]:80", "invalid IPv6"),
            ("http://node..example", "invalid host name"),
            ("http://node example", "spaces"),
            ("as ia", "Gaia subdomain"),
            ("", "Gaia subdomain"),
            ("-asia", "Gaia subdomain"),
            ("asia.gaia.domains", "\"https://asia.gaia.domains\""),
        ];
        for (input, says) in cases {
            let e = parse_host(input).unwrap_err();
            assert!(e.contains(says), "{input}: {e}");
        }
        let long = "a".repeat(64);
        assert!(parse_host(&long).is_err());
        assert!(parse_host(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn host_objects_take_every_field() {
        let h = hosts(
            r#"{"hosts": [
                "asia",
                {"url": "https://openrouter.ai/api/v1", "weight": 3, "name": "openrouter",
                 "backup": true, "apiKeys": ["sk-or-123456789012"],
                 "models": {"llama": "meta-llama/llama-3.1-8b-instruct"}},
                {"url": "llama3b"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(h.len(), 3);
        let or = &h[1];
        assert_eq!(or.name, "openrouter");
        assert_eq!(or.base_url, "https://openrouter.ai/api");
        assert_eq!(or.weight, 3);
        assert!(or.backup);
        assert_eq!(or.api_keys, Some(vec!["sk-or-123456789012".to_string()]));
        assert_eq!(
            or.models.get("llama").map(String::as_str),
            Some("meta-llama/llama-3.1-8b-instruct")
        );
        assert_eq!(h[2].name, "llama3b");
        assert_eq!(h[2].base_url, "https://llama3b.gaia.domains");
        assert_eq!(h[2].weight, 1);
    }

    #[test]
    fn weight_zero_is_refused_with_position() {
        let r = hosts("{\"hosts\": [\n  \"asia\",\n  {\"url\": \"llama3b\", \"weight\": 0}\n]}");
        assert_err(
            r,
            "hosts.json",
            Some("hosts[1].weight"),
            Some((3, 32)),
            "weight must be an integer >= 1, got 0",
        );
    }

    #[test]
    fn weight_must_be_a_positive_integer() {
        let cases = [
            ("-2", "weight must be an integer >= 1, got -2"),
            (
                "1.5",
                "weight must be an integer from 1 to 1000000, got 1.5",
            ),
            ("2.0", "got 2.0"),
            ("\"2\"", "got a string"),
            (
                "1000001",
                "weight must be an integer <= 1000000, got 1000001",
            ),
            ("null", "got null"),
            ("[1]", "got an array"),
        ];
        for (value, says) in cases {
            let text = format!("{{\"hosts\": [{{\"url\": \"asia\", \"weight\": {value}}}]}}");
            // The value starts at column 38; the position is its last
            // character, or its first for an array (refused unread).
            let col = if value.starts_with('[') {
                38
            } else {
                37 + value.len()
            };
            assert_err(
                hosts(&text),
                "hosts.json",
                Some("hosts[0].weight"),
                Some((1, col)),
                says,
            );
        }
    }

    #[test]
    fn a_default_port_is_the_same_host() {
        for text in [
            r#"{"hosts": ["asia", "https://asia.gaia.domains:443/v1"]}"#,
            r#"{"hosts": ["HTTP://127.0.0.1:80", "http://127.0.0.1"]}"#,
        ] {
            let e = hosts(text).unwrap_err().to_string();
            assert!(e.contains("hosts[1] has the same URL as hosts[0]"), "{e}");
        }
        // Another port, or the other scheme's default, is another host.
        let ok = hosts(
            r#"{"hosts": ["https://n.example:80", "http://n.example:443", "https://n.example"]}"#,
        );
        assert_eq!(ok.map(|h| h.len()).ok(), Some(3));
    }

    #[test]
    fn duplicate_hosts_are_refused() {
        let r =
            hosts("{\"hosts\": [\n\"asia\",\n\"llama3b\",\n\"https://asia.gaia.domains/v1/\"\n]}");
        assert_err(
            r,
            "hosts.json",
            Some("hosts[2]"),
            Some((4, 31)),
            "hosts[2] has the same URL as hosts[0] (https://asia.gaia.domains)",
        );
        let r = hosts(
            "{\"hosts\": [\n\"https://openrouter.ai/api\",\n\"https://openrouter.ai/other\"]}",
        );
        assert_err(
            r,
            "hosts.json",
            Some("hosts[1]"),
            Some((3, 29)),
            "hosts[1] has the same name as hosts[0] (\"openrouter.ai\")",
        );
        let r = hosts(r#"{"hosts": ["asia", {"url": "llama3b", "name": "asia"}]}"#);
        assert_err(
            r,
            "hosts.json",
            Some("hosts[1]"),
            Some((1, 53)),
            "same name",
        );
        // Same host, different names and paths: fine.
        let ok = hosts(
            r#"{"hosts": [{"url": "https://openrouter.ai/api", "name": "a"},
                          {"url": "https://openrouter.ai/other", "name": "b"}]}"#,
        );
        assert_eq!(ok.unwrap().len(), 2);
    }

    #[test]
    fn host_names_are_visible_ascii() {
        for name in ["my node", "東京", "a\u{a0}b"] {
            let text = format!(r#"{{"hosts": [{{"url": "asia", "name": "{name}"}}]}}"#);
            let e = hosts(&text).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("hosts[0].name"), "{e}");
            assert!(
                e.to_string().contains("visible ASCII without spaces"),
                "{e}"
            );
        }
        let ok = hosts(r#"{"hosts": [{"url": "asia", "name": "tokyo-1_(a100)"}]}"#);
        assert_eq!(ok.unwrap()[0].name, "tokyo-1_(a100)");
    }

    #[test]
    fn empty_host_list_is_refused() {
        assert_err(
            hosts("{\"hosts\": [\n]}"),
            "hosts.json",
            Some("hosts"),
            Some((2, 1)),
            "hosts is empty; list at least one host",
        );
        assert_err(
            hosts("{}"),
            "hosts.json",
            Some("hosts"),
            Some((1, 2)),
            "needs a \"hosts\" array",
        );
    }

    #[test]
    fn bad_urls_are_reported_at_their_position() {
        assert_err(
            hosts("{\"hosts\": [\n  \"ftp://x.example\"\n]}"),
            "hosts.json",
            Some("hosts[0]"),
            Some((2, 19)),
            "hosts[0] must start with http:// or https://, got \"ftp://\"",
        );
        assert_err(
            hosts("{\"hosts\": [{\"url\": \"http://x.example?a=1\"}]}"),
            "hosts.json",
            Some("hosts[0].url"),
            Some((1, 41)),
            "url must not contain a query",
        );
        assert_err(
            hosts("{\"hosts\": [{\"weight\": 2}]}"),
            "hosts.json",
            Some("hosts[0]"),
            Some((1, 24)),
            "hosts[0] needs a \"url\"",
        );
    }

    #[test]
    fn unknown_fields_are_refused_in_every_file() {
        assert_err(
            hosts("{\"hosts\": [\"asia\"], \"extra\": 1}"),
            "hosts.json",
            Some("extra"),
            Some((1, 27)),
            "unknown field \"extra\"; expected one of: hosts",
        );
        assert_err(
            hosts("{\"hosts\": [\n{\"url\": \"asia\",\n \"wieght\": 2}]}"),
            "hosts.json",
            Some("hosts[0].wieght"),
            Some((3, 9)),
            "unknown field \"wieght\"; did you mean \"weight\"?",
        );
        assert_err(
            hosts("{\"hosts\": [{\"url\": \"asia\", \"apikeys\": [\"k\"]}]}"),
            "hosts.json",
            Some("hosts[0].apikeys"),
            Some((1, 36)),
            "did you mean \"apiKeys\"?",
        );
        assert_err(
            keys("{\"apiKeys\": [], \"more\": []}"),
            "api-keys.json",
            Some("more"),
            Some((1, 22)),
            "unknown field \"more\"",
        );
        assert_err(
            keys("{\"apiKeys\": [{\"key\": \"k\", \"active\": true}]}"),
            "api-keys.json",
            Some("apiKeys[0].active"),
            Some((1, 34)),
            "unknown field \"active\"; did you mean \"isActive\"?",
        );
        // Other words for on and off would leave a key meant to be off in use.
        for field in ["enabled", "disabled", "is_disabled", "Inactive"] {
            assert_err(
                keys(&format!(
                    "{{\"apiKeys\": [{{\"key\": \"k\", \"{field}\": false}}]}}"
                )),
                "api-keys.json",
                Some(&format!("apiKeys[0].{field}")),
                Some((1, 28 + field.len())),
                &format!("unknown field \"{field}\"; did you mean \"isActive\"?"),
            );
        }
        assert_err(
            settings("{\n  \"max_attempts\": 3\n}"),
            "balancer.json",
            Some("max_attempts"),
            Some((2, 16)),
            "did you mean \"maxAttempts\"?",
        );
        assert_err(
            settings("{\"timeouts\": {\"connect\": 5}}"),
            "balancer.json",
            Some("timeouts.connect"),
            Some((1, 23)),
            "expected one of: connectMs, firstByteMs, idleMs, totalMs",
        );
        assert_err(
            settings("{\"hedge\": {\"after\": 5}}"),
            "balancer.json",
            Some("hedge.after"),
            Some((1, 18)),
            "unknown field \"after\"",
        );
    }

    #[test]
    fn suggestions_catch_case_separators_and_typos() {
        assert_eq!(suggest("apikeys", &HOST_FIELDS), Some("apiKeys"));
        assert_eq!(suggest("api_keys", &HOST_FIELDS), Some("apiKeys"));
        assert_eq!(suggest("wieght", &HOST_FIELDS), Some("weight"));
        assert_eq!(suggest("wight", &HOST_FIELDS), Some("weight"));
        assert_eq!(
            suggest("max_atempts", &BALANCER_FIELDS),
            Some("maxAttempts")
        );
        assert_eq!(suggest("colour", &HOST_FIELDS), None);
        assert_eq!(suggest("", &HOST_FIELDS), None);
        // Short names get one typo, not two.
        assert_eq!(suggest("prt", &["port"]), Some("port"));
        assert_eq!(suggest("pt", &["port"]), None);
    }

    #[test]
    fn odd_keys_cannot_garble_the_message() {
        let text = assert_err(
            settings("{\"a\\u0001b\\nc\": 1}"),
            "balancer.json",
            Some("[\"a\\u{1}b\\nc\"]"),
            Some((1, 14)),
            "unknown field \"a\\u{1}b\\nc\"",
        );
        assert!(!text.contains('\n'), "{text}");
        let long = "x".repeat(100_000);
        let text = assert_err(
            settings(&format!("{{\"{long}\": 1}}")),
            "balancer.json",
            Some(&format!("[\"{}\"...]", "x".repeat(60))),
            Some((1, 100_003)),
            "unknown field",
        );
        assert!(text.len() < 1000, "{}", text.len());
        assert_err(
            hosts("{\"hosts\": [{\"url\": \"asia\", \"models\": {\"a\\tb\": \"c\"}}]}"),
            "hosts.json",
            Some("hosts[0].models[\"a\\tb\"]"),
            Some((1, 44)),
            "must not contain control characters",
        );
    }

    #[test]
    fn repeated_fields_are_refused() {
        assert_err(
            settings("{\"port\": 1, \"port\": 2}"),
            "balancer.json",
            Some("port"),
            Some((1, 18)),
            "field \"port\" appears twice",
        );
    }

    #[test]
    fn wrong_types_name_the_field() {
        assert_err(
            hosts("{\"hosts\": \"asia\"}"),
            "hosts.json",
            Some("hosts"),
            Some((1, 16)),
            "hosts must be an array of hosts",
        );
        assert_err(
            hosts("[\"asia\"]"),
            "hosts.json",
            None,
            Some((1, 1)),
            "the file must be an object such as {\"hosts\": [\"asia\"]}, got an array",
        );
        assert_err(
            hosts("{\"hosts\": [{\"url\": \"asia\", \"backup\": \"yes\"}]}"),
            "hosts.json",
            Some("hosts[0].backup"),
            Some((1, 42)),
            "backup must be true or false, got a string",
        );
        assert_err(
            hosts("{\"hosts\": [{\"url\": \"asia\", \"models\": {\"a\": 1}}]}"),
            "hosts.json",
            Some("hosts[0].models[\"a\"]"),
            Some((1, 44)),
            "must be a non-empty string, got 1",
        );
        assert_err(
            hosts("{\"hosts\": [7]}"),
            "hosts.json",
            Some("hosts[0]"),
            Some((1, 12)),
            "hosts[0] must be a Gaia subdomain",
        );
        assert_err(
            settings("{\"open\": 1}"),
            "balancer.json",
            Some("open"),
            Some((1, 10)),
            "open must be true or false, got 1",
        );
        assert_err(
            settings("{\"clientKeys\": \"secret-client-key\"}"),
            "balancer.json",
            Some("clientKeys"),
            Some((1, 34)),
            "clientKeys must be an array of key strings, got a string",
        );
        assert_err(
            settings("{\"timeouts\": 5}"),
            "balancer.json",
            Some("timeouts"),
            Some((1, 14)),
            "timeouts must be an object",
        );
    }

    #[test]
    fn balancer_values_are_range_checked() {
        let cases = [
            ("{\"maxAttempts\": 0}", "maxAttempts", (1, 17), "maxAttempts must be an integer >= 1, got 0"),
            ("{\"maxAttempts\": 21}", "maxAttempts", (1, 18), "maxAttempts must be an integer <= 20, got 21"),
            ("{\"workers\": 0}", "workers", (1, 13), "workers must be an integer >= 1, got 0"),
            ("{\"workers\": 5000}", "workers", (1, 16), "workers must be an integer <= 4096, got 5000"),
            ("{\"port\": 65536}", "port", (1, 14), "port must be an integer <= 65535"),
            ("{\"maxBodyBytes\": 0}", "maxBodyBytes", (1, 18), "maxBodyBytes must be an integer >= 1"),
            ("{\"timeouts\": {\"connectMs\": 0}}", "timeouts.connectMs", (1, 28), "connectMs must be an integer >= 1, got 0"),
            ("{\"timeouts\": {\"totalMs\": 86400001}}", "timeouts.totalMs", (1, 33), "totalMs must be an integer <= 86400000"),
            ("{\"hedge\": {\"afterMs\": -1}}", "hedge.afterMs", (1, 24), "afterMs must be an integer >= 0 or \"auto\", got -1"),
            ("{\"queueWaitMs\": 0}", "queueWaitMs", (1, 17), "queueWaitMs must be an integer >= 1"),
            ("{\"discoveryIntervalMs\": 999}", "discoveryIntervalMs", (1, 27), "discoveryIntervalMs must be 0 (off) or an integer >= 1000, got 999"),
            ("{\"discoveryIntervalMs\": -1}", "discoveryIntervalMs", (1, 26), "discoveryIntervalMs must be an integer >= 0, got -1"),
            ("{\"shutdownGraceMs\": -1}", "shutdownGraceMs", (1, 22), "shutdownGraceMs must be an integer >= 0, got -1"),
            ("{\"shutdownGraceMs\": 86400001}", "shutdownGraceMs", (1, 28), "shutdownGraceMs must be an integer <= 86400000"),
            ("{\"queueSize\": 0}", "queueSize", (1, 15), "queueSize must be an integer >= 1"),
            ("{\"maxConnectionsPerClient\": 0}", "maxConnectionsPerClient", (1, 29), ">= 1, got 0"),
            ("{\"headTimeoutMs\": 0}", "headTimeoutMs", (1, 19), ">= 1, got 0"),
            ("{\"keepAliveMs\": 0}", "keepAliveMs", (1, 17), ">= 1, got 0"),
            ("{\"bodyTimeoutMs\": 0}", "bodyTimeoutMs", (1, 19), ">= 1, got 0"),
            ("{\"writeTimeoutMs\": 0}", "writeTimeoutMs", (1, 20), ">= 1, got 0"),
            ("{\"strategy\": \"fastest\"}", "strategy", (1, 22), "strategy must be one of \"round-robin\", \"least-loaded\", \"latency\", \"random\", got \"fastest\""),
            ("{\"bind\": \"localhost\"}", "bind", (1, 20), "bind must be an IP address"),
            ("{\"adminKey\": \"\"}", "adminKey", (1, 15), "adminKey must not be an empty string"),
            ("{\"clientKeys\": [\"\"]}", "clientKeys[0]", (1, 18), "clientKeys[0] must not be an empty string"),
        ];
        for (text, field, position, says) in cases {
            assert_err(
                settings(text),
                "balancer.json",
                Some(field),
                Some(position),
                says,
            );
        }
    }

    #[test]
    fn api_keys_file_rules() {
        let k = keys(
            r#"{"apiKeys": [
                {"key": "gaia-aaaaaaaaaaaa", "description": "main"},
                {"key": "gaia-bbbbbbbbbbbb", "isActive": false},
                {"key": "gaia-cccccccccccc", "isActive": true},
                {"key": "gaia-aaaaaaaaaaaa", "isActive": false}
            ]}"#,
        )
        .unwrap();
        assert_eq!(k, ["gaia-aaaaaaaaaaaa", "gaia-cccccccccccc"]);
        // Fields other tools (the original project) write are skipped.
        let k = keys(
            r#"{"apiKeys": [{"key": "gaia-dddddddddddd", "createdAt": "2025-01-01T00:00:00Z",
                "wallet": {"address": "0x1"}, "usage": [1, 2]}]}"#,
        )
        .unwrap();
        assert_eq!(k, ["gaia-dddddddddddd"]);
        assert_eq!(keys("{}").unwrap(), Vec::<String>::new());
        assert_eq!(keys("{\"apiKeys\": []}").unwrap(), Vec::<String>::new());
        // No file at all: no keys, not an error.
        let c = load_files(&[("hosts.json", r#"{"hosts": ["asia"]}"#)]).unwrap();
        assert!(c.api_keys.is_empty());
        assert_eq!(c.settings, Settings::default());
    }

    #[test]
    fn api_key_errors() {
        assert_err(
            keys("{\"apiKeys\": [\n{\"key\": \"\", \"isActive\": false}]}"),
            "api-keys.json",
            Some("apiKeys[0].key"),
            Some((2, 10)),
            "key must not be an empty string",
        );
        let text = assert_err(
            keys("{\"apiKeys\": [\n{\"key\": \"gaia-duplicate-1234\"},\n{\"key\": \"gaia-duplicate-1234\"}\n]}"),
            "api-keys.json",
            Some("apiKeys[1].key"),
            Some((3, 30)),
            "apiKeys[1].key is the same key as apiKeys[0].key",
        );
        assert!(!text.contains("gaia-duplicate-1234"), "{text}");
        assert_err(
            keys("{\"apiKeys\": [{\"description\": \"x\"}]}"),
            "api-keys.json",
            Some("apiKeys[0]"),
            Some((1, 33)),
            "apiKeys[0] needs a \"key\"",
        );
        let text = assert_err(
            keys("{\"apiKeys\": [{\"key\": \"gaia secret with spaces\"}]}"),
            "api-keys.json",
            Some("apiKeys[0].key"),
            Some((1, 46)),
            "printable ASCII characters without spaces",
        );
        assert!(!text.contains("secret"), "{text}");
        assert_err(
            keys("{\"apiKeys\": [\"gaia-key\"]}"),
            "api-keys.json",
            Some("apiKeys[0]"),
            Some((1, 23)),
            "apiKeys[0] must be an object",
        );
    }

    #[test]
    fn host_api_keys_rules() {
        assert_err(
            hosts("{\"hosts\": [{\"url\": \"asia\", \"apiKeys\": []}]}"),
            "hosts.json",
            Some("hosts[0].apiKeys"),
            Some((1, 40)),
            "apiKeys must list at least one key",
        );
        assert_err(
            hosts("{\"hosts\": [{\"url\": \"asia\", \"apiKeys\": [\"a\", \"\"]}]}"),
            "hosts.json",
            Some("hosts[0].apiKeys[1]"),
            Some((1, 46)),
            "apiKeys[1] must not be an empty string",
        );
        let text = assert_err(
            hosts("{\"hosts\": [{\"url\": \"asia\", \"apiKeys\": [\"sk-same-key-1\", \"sk-same-key-1\"]}]}"),
            "hosts.json",
            Some("hosts[0].apiKeys[1]"),
            Some((1, 71)),
            "is the same key as hosts[0].apiKeys[0]",
        );
        assert!(!text.contains("sk-same-key-1"), "{text}");
    }

    #[test]
    fn invalid_json_has_line_and_column() {
        assert_err(
            hosts("{\"hosts\": [\n  \"asia\",\n]}"),
            "hosts.json",
            None,
            Some((3, 1)),
            "invalid JSON: trailing comma",
        );
        assert_err(
            settings("{\"port\": 3000"),
            "balancer.json",
            None,
            Some((1, 13)),
            "invalid JSON: EOF while parsing an object",
        );
        assert_err(
            hosts(""),
            "hosts.json",
            None,
            None,
            "the file is empty; it must hold an object such as {\"hosts\"",
        );
        assert_err(
            keys("{\"apiKeys\": []} x"),
            "api-keys.json",
            None,
            Some((1, 17)),
            "invalid JSON: trailing characters",
        );
    }

    #[test]
    fn file_problems() {
        let dir = TempDir::new();
        assert_err(
            load(&dir.0, &Overrides::default()),
            "hosts.json",
            None,
            None,
            "file not found; it is required",
        );
        let missing = dir.0.join("nope");
        let text = assert_err(
            load(&missing, &Overrides::default()),
            "hosts.json",
            None,
            None,
            "does not exist",
        );
        assert!(text.contains("GAIA_CONFIG_DIR"), "{text}");
        // A directory where a file should be: unreadable.
        std::fs::write(dir.0.join("hosts.json"), r#"{"hosts": ["asia"]}"#).unwrap();
        std::fs::create_dir(dir.0.join("balancer.json")).unwrap();
        assert_err(
            load(&dir.0, &Overrides::default()),
            "balancer.json",
            None,
            None,
            "cannot read the file",
        );
    }

    #[test]
    fn relative_directories_are_named_in_full() {
        let e = load(Path::new("no-such-config-dir"), &Overrides::default()).unwrap_err();
        assert!(e.file.is_absolute(), "{e}");
        assert!(e.file.ends_with("no-such-config-dir/hosts.json"), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
        // Config::dir keeps the directory as given.
        let c = load(Path::new("config"), &Overrides::default()).unwrap();
        assert_eq!(c.dir, PathBuf::from("config"));
    }

    #[test]
    fn encoding_problems() {
        let dir = TempDir::new();
        std::fs::write(dir.0.join("hosts.json"), b"{\"hosts\":\n [\"as\xffia\"]}").unwrap();
        assert_err(
            load(&dir.0, &Overrides::default()),
            "hosts.json",
            None,
            Some((2, 6)),
            "not valid UTF-8",
        );
        std::fs::write(
            dir.0.join("hosts.json"),
            b"\xEF\xBB\xBF{\"hosts\": [\"asia\"]}",
        )
        .unwrap();
        assert_eq!(load(&dir.0, &Overrides::default()).unwrap().hosts.len(), 1);
    }

    #[test]
    fn precedence_overrides_then_file_then_default() {
        let files = [
            ("hosts.json", r#"{"hosts": ["asia"]}"#),
            (
                "balancer.json",
                r#"{"port": 4000, "bind": "0.0.0.0", "workers": 8}"#,
            ),
        ];
        let dir = TempDir::with(&files);
        let from_file = load(&dir.0, &Overrides::default()).unwrap().settings;
        assert_eq!(from_file.port, 4000);
        assert_eq!(from_file.bind, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(from_file.workers, 8);
        let overrides = Overrides {
            port: Some(5000),
            bind: Some(IpAddr::from([10, 0, 0, 1])),
            workers: Some(16),
        };
        let over = load(&dir.0, &overrides).unwrap().settings;
        assert_eq!(over.port, 5000);
        assert_eq!(over.bind, IpAddr::from([10, 0, 0, 1]));
        assert_eq!(over.workers, 16);
        // An override for one field leaves the file's other values alone.
        let port_only = Overrides {
            port: Some(5000),
            ..Overrides::default()
        };
        let mixed = load(&dir.0, &port_only).unwrap().settings;
        assert_eq!((mixed.port, mixed.workers), (5000, 8));
        // No file: defaults, still beaten by overrides.
        let bare = TempDir::with(&files[..1]);
        assert_eq!(
            load(&bare.0, &Overrides::default()).unwrap().settings.port,
            3000
        );
        assert_eq!(load(&bare.0, &port_only).unwrap().settings.port, 5000);
    }

    #[test]
    fn mask_secret_shows_at_most_the_last_four() {
        assert_eq!(mask("gaia-123456789abc"), "...9abc");
        assert_eq!(mask("123456789012"), "...9012");
        assert_eq!(mask("12345678901"), "****");
        assert_eq!(mask(""), "****");
        // Multi-byte characters: counted as characters, never split.
        assert_eq!(mask("ключключключ-ßéü"), "...-ßéü");
        assert_eq!(mask("ключключклю"), "****");
    }

    #[test]
    fn render_masks_every_secret() {
        let secrets = [
            "gaia-pool-key-0000000001",
            "gaia-pool-key-0000000002",
            "sk-or-host-key-777777777",
            "client-key-xxxxxxxx-1111",
            "admin-key-yyyyyyyy-2222",
            "short",
        ];
        let dir = TempDir::with(&[
            (
                "hosts.json",
                r#"{"hosts": ["asia", {"url": "https://openrouter.ai/api/v1", "backup": true,
                    "apiKeys": ["sk-or-host-key-777777777"], "models": {"llama": "meta/llama"}}]}"#,
            ),
            (
                "api-keys.json",
                r#"{"apiKeys": [{"key": "gaia-pool-key-0000000001"},
                                {"key": "gaia-pool-key-0000000002"}, {"key": "short"}]}"#,
            ),
            (
                "balancer.json",
                r#"{"clientKeys": ["client-key-xxxxxxxx-1111"],
                    "adminKey": "admin-key-yyyyyyyy-2222"}"#,
            ),
        ]);
        let config = load(&dir.0, &Overrides::default()).unwrap();
        let out = render(&config);
        for secret in secrets {
            assert!(!out.contains(secret), "{secret} leaked:\n{out}");
        }
        for tail in [
            "...0001", "...0002", "...7777", "...1111", "...2222", "****",
        ] {
            assert!(out.contains(tail), "{tail} missing:\n{out}");
        }
        assert!(out.contains("https://openrouter.ai/api"), "{out}");
        assert!(out.contains("backup"), "{out}");
        assert!(out.contains("llama -> meta/llama"), "{out}");
        // Debug would print keys whole; check that render is what shows them.
        assert!(format!("{config:?}").contains("gaia-pool-key-0000000001"));
    }

    #[test]
    fn render_shows_every_setting_by_its_file_name() {
        let config = load(&repo_config(), &Overrides::default()).unwrap();
        let out = render(&config);
        for field in BALANCER_FIELDS {
            if field == "timeouts" || field == "hedge" {
                continue;
            }
            assert!(
                out.contains(&format!("  {field} ")),
                "{field} missing:\n{out}"
            );
        }
        for field in TIMEOUT_FIELDS {
            assert!(out.contains(&format!("timeouts.{field}")), "{out}");
        }
        assert!(out.contains("hedge.afterMs"), "{out}");
        assert!(out.contains("https://sakura.gaia.domains"), "{out}");
        assert!(out.contains("none active"), "{out}");
        // "auto" shows its floor with the unit, as the README gives it.
        let (_dir, auto) = load_with(&[("balancer.json", r#"{"hedge": {"afterMs": "auto"}}"#)]);
        let out = render(&auto.unwrap());
        assert!(out.contains("at least 500 ms)"), "{out}");
    }

    /// Load a config directory holding `files` plus a minimal hosts.json.
    fn load_with(files: &[(&str, &str)]) -> (TempDir, Result<Config, ConfigError>) {
        let dir = TempDir::with(&[("hosts.json", r#"{"hosts": ["asia"]}"#)]);
        for (name, text) in files {
            let path = dir.0.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            std::fs::write(path, text).unwrap();
        }
        let result = load(&dir.0, &Overrides::default());
        (dir, result)
    }

    /// Whether `name` occurs in `der`: a subject common name is stored as plain text.
    fn holds(der: &[u8], name: &str) -> bool {
        der.windows(name.len()).any(|w| w == name.as_bytes())
    }

    #[test]
    fn ca_file_relative_path_is_read_from_the_config_dir() {
        let both = format!("{}{}", test_roots::ONE, test_roots::TWO);
        let (dir, config) = load_with(&[
            ("certs/private-ca.pem", &both),
            ("balancer.json", r#"{"caFile": "certs/private-ca.pem"}"#),
        ]);
        let config = config.unwrap();
        let ca = config.settings.ca_file.as_ref().unwrap();
        // Resolved against the config directory, whatever the working directory.
        assert_eq!(ca.path, dir.0.join("certs/private-ca.pem"));
        assert!(ca.path.is_absolute());
        assert_eq!(ca.roots.len(), 2);
        // File order kept, each a whole DER certificate.
        assert!(holds(&ca.roots[0], "gaia-balancer test root one"));
        assert!(holds(&ca.roots[1], "gaia-balancer test root two"));
        assert!(ca.roots.iter().all(|r| r.len() == test_roots::DER_LEN));
        let out = render(&config);
        let shown = format!(
            "  caFile                   {} (2 certificates)\n",
            ca.path.display()
        );
        assert!(out.contains(&shown), "{out}");
        // No caFile: none, and said so.
        let (_dir, config) = load_with(&[]);
        let config = config.unwrap();
        assert_eq!(config.settings.ca_file, None);
        assert!(render(&config)
            .contains("  caFile                   none (built-in Mozilla roots only)\n"));
        // null is the documented default.
        let (_dir, config) = load_with(&[("balancer.json", r#"{"caFile": null}"#)]);
        assert_eq!(config.unwrap().settings.ca_file, None);
    }

    #[test]
    fn ca_file_tolerates_other_blocks_crlf_and_a_byte_order_mark() {
        let windows = format!(
            "\u{feff}bundle for the lab\r\n-----BEGIN PRIVATE KEY-----\r\nAAAA\r\n-----END PRIVATE KEY-----\r\n{}",
            test_roots::TWO.replace('\n', "\r\n")
        );
        let (_dir, config) = load_with(&[
            ("ca.pem", &windows),
            ("balancer.json", r#"{"caFile": "ca.pem"}"#),
        ]);
        let roots = config.unwrap().settings.ca_file.unwrap().roots;
        assert_eq!(roots.len(), 1);
        assert!(holds(&roots[0], "gaia-balancer test root two"));
    }

    #[test]
    fn ca_file_absolute_path_is_used_as_is() {
        let elsewhere = TempDir::with(&[("root.crt", test_roots::ONE)]);
        let path = elsewhere.0.join("root.crt");
        let json = format!(r#"{{"caFile": {}}}"#, serde_json::to_string(&path).unwrap());
        let (dir, config) = load_with(&[("balancer.json", &json)]);
        let ca = config.unwrap().settings.ca_file.unwrap();
        assert_eq!(ca.path, path);
        assert!(!ca.path.starts_with(&dir.0));
        assert_eq!(ca.roots.len(), 1);
        assert!(holds(&ca.roots[0], "gaia-balancer test root one"));
    }

    #[test]
    fn ca_file_missing_is_reported_with_its_path() {
        let (dir, config) = load_with(&[("balancer.json", "{\n  \"caFile\": \"nope.pem\"\n}")]);
        let missing = dir.0.join("nope.pem");
        assert_err(
            config,
            "balancer.json",
            Some("caFile"),
            Some((2, 22)),
            &format!(
                "caFile: cannot read {}: No such file or directory",
                missing.display()
            ),
        );
        // A directory is not a CA file (and is not opened).
        let (dir, config) =
            load_with(&[("certs/x", ""), ("balancer.json", r#"{"caFile": "certs"}"#)]);
        assert_err(
            config,
            "balancer.json",
            Some("caFile"),
            Some((1, 18)),
            &format!(
                "caFile: cannot read {}: not a regular file",
                dir.0.join("certs").display()
            ),
        );
    }

    #[test]
    fn ca_file_without_certificates_is_an_error() {
        let key_only = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        for text in ["", "not a certificate\n", key_only] {
            let (dir, config) = load_with(&[
                ("ca.pem", text),
                ("balancer.json", r#"{"caFile": "ca.pem"}"#),
            ]);
            assert_err(
                config,
                "balancer.json",
                Some("caFile"),
                Some((1, 19)),
                &format!(
                    "caFile: {} holds no PEM certificate",
                    dir.0.join("ca.pem").display()
                ),
            );
        }
    }

    #[test]
    fn ca_file_malformed_pem_is_an_error() {
        let unterminated = test_roots::TWO.replace("-----END CERTIFICATE-----\n", "");
        let cases = [
            (format!("{}{unterminated}", test_roots::ONE), "malformed PEM block after 1 certificate(s): a BEGIN line has no matching END line"),
            ("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".to_string(), "malformed PEM block after 0 certificate(s): the text between BEGIN and END is not valid base64"),
            ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_string(), "certificate 1 in "),
        ];
        for (text, says) in cases {
            let (_dir, config) = load_with(&[
                ("ca.pem", &text),
                ("balancer.json", r#"{"caFile": "ca.pem"}"#),
            ]);
            let text = assert_err(config, "balancer.json", Some("caFile"), Some((1, 19)), says);
            assert!(text.contains("caFile: "), "{text}");
        }
        let (_dir, config) = load_with(&[
            (
                "ca.pem",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            ),
            ("balancer.json", r#"{"caFile": "ca.pem"}"#),
        ]);
        let text = config.unwrap_err().to_string();
        assert!(text.contains("is not a usable X.509 certificate"), "{text}");
    }

    #[test]
    fn ca_file_too_large_is_refused_before_parsing() {
        let big = format!(
            "{}{}",
            test_roots::ONE,
            " ".repeat(MAX_CA_FILE_BYTES as usize)
        );
        let (_dir, config) = load_with(&[
            ("ca.pem", &big),
            ("balancer.json", r#"{"caFile": "ca.pem"}"#),
        ]);
        let text = config.unwrap_err().to_string();
        assert!(text.contains("larger than 1048576 bytes"), "{text}");
    }

    #[test]
    fn ca_file_of_the_wrong_type_is_an_error() {
        let cases = [
            (
                "{\"caFile\": 1}",
                (1, 12),
                "caFile must be the path of a PEM file of root certificates, or null, got 1",
            ),
            (
                "{\"caFile\": true}",
                (1, 15),
                "caFile must be the path of a PEM file of root certificates, or null, got true",
            ),
            (
                "{\"caFile\": [\"ca.pem\"]}",
                (1, 12),
                "caFile must be the path of a PEM file of root certificates, or null, got an array",
            ),
            ("{\"caFile\": \"\"}", (1, 13), "caFile must not be empty"),
            ("{\"caFile\": \"  \"}", (1, 15), "caFile must not be empty"),
            (
                "{\"caFile\": \"a\\nb\"}",
                (1, 17),
                "caFile must not contain control characters",
            ),
            (
                "{\"cafile\": \"ca.pem\"}",
                (1, 9),
                "unknown field \"cafile\"; did you mean \"caFile\"?",
            ),
        ];
        for (text, position, says) in cases {
            let field = if says.starts_with("unknown") {
                "cafile"
            } else {
                "caFile"
            };
            assert_err(
                settings(text),
                "balancer.json",
                Some(field),
                Some(position),
                says,
            );
        }
    }

    #[test]
    fn ca_file_named_finds_what_balancer_json_names() {
        let dir = Path::new("/etc/gaia");
        let named = |text: &str| ca_file_named(dir, text.as_bytes());
        assert_eq!(named(r#"{"caFile": "ca.pem"}"#), Some(dir.join("ca.pem")));
        assert_eq!(
            named(r#"{"caFile": "/x/ca.pem"}"#),
            Some(PathBuf::from("/x/ca.pem"))
        );
        assert_eq!(named("\u{feff}{\"caFile\": \"a\"}"), Some(dir.join("a")));
        // Also while other fields are invalid: the reloader must still watch it.
        assert_eq!(
            named(r#"{"port": -1, "caFile": "ca.pem"}"#),
            Some(dir.join("ca.pem"))
        );
        for none in [
            r#"{}"#,
            r#"{"caFile": null}"#,
            r#"{"caFile": ""}"#,
            r#"{"caFile": 1}"#,
            "{",
            "",
        ] {
            assert_eq!(named(none), None, "{none}");
        }
    }

    #[test]
    fn overrides_apply_only_what_is_set() {
        let mut s = Settings::default();
        Overrides::default().apply(&mut s);
        assert_eq!(s, Settings::default());
        Overrides {
            workers: Some(3),
            ..Overrides::default()
        }
        .apply(&mut s);
        assert_eq!(s.workers, 3);
        assert_eq!(s.port, 3000);
    }
}
