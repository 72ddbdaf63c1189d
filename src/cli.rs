//! Command line and environment: turns argv and the process environment into
//! one [`Invocation`] before anything else runs.
//!
//! It exists so that `main` stays thin and so that precedence is decided in
//! one place: a flag beats its environment variable, which beats
//! `balancer.json` (applied later by [`crate::config::load`] through
//! [`Overrides`]), which beats [`Settings::default`].
//! Parsing is pure (the environment comes in as a function), never panics, and
//! every mistake becomes a one-paragraph [`CliError`] that points to `--help`.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use log::LevelFilter;

use crate::config::{self, Overrides, Settings, MAX_WORKERS};

/// Config directory used when neither `--config` nor `GAIA_CONFIG_DIR` is given.
pub const DEFAULT_CONFIG_DIR: &str = "./config";

/// What the user asked the program to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Serve (no subcommand).
    Run,
    /// Validate the config directory and print it resolved, keys masked.
    Check,
    /// Print [`help_text`].
    Help,
    /// Print [`version_text`].
    Version,
}

/// A parsed command line with the environment applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// What to do.
    pub command: Command,
    /// `--config`, else `GAIA_CONFIG_DIR`, else [`DEFAULT_CONFIG_DIR`].
    pub config_dir: PathBuf,
    /// Flag and environment values that beat `balancer.json`.
    pub overrides: Overrides,
    /// `LOG_LEVEL`, else `info` when `NODE_ENV=production`, else `debug`.
    pub log_level: LevelFilter,
}

/// A command-line or environment mistake, phrased so the user can fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    message: String,
}

impl CliError {
    fn new(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
        }
    }

    /// What is wrong, without the pointer to `--help`.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}. Run `gaia-balancer --help` for usage.", self.message)
    }
}

impl std::error::Error for CliError {}

/// Flags that take a value.
const VALUE_FLAGS: [&str; 4] = ["--config", "--port", "--bind", "--workers"];
/// Flags that take none.
const BARE_FLAGS: [&str; 4] = ["--help", "-h", "--version", "-V"];
/// Log level names accepted in `LOG_LEVEL`.
const LOG_LEVELS: [(&str, LevelFilter); 5] = [
    ("error", LevelFilter::Error),
    ("warn", LevelFilter::Warn),
    ("info", LevelFilter::Info),
    ("debug", LevelFilter::Debug),
    ("trace", LevelFilter::Trace),
];

/// Flag values as given, before the environment fills the gaps.
#[derive(Default)]
struct Flags {
    check: bool,
    config: Option<PathBuf>,
    port: Option<u16>,
    bind: Option<IpAddr>,
    workers: Option<usize>,
}

/// Parse `args` (without argv\[0\]) and apply `env` (a variable's value, if set).
///
/// `--help` and `--version` stop parsing where they appear and ignore the
/// environment, so help is reachable even when the environment is broken.
pub fn parse(
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Invocation, CliError> {
    let mut flags = Flags::default();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(early(Command::Help)),
            "-V" | "--version" => return Ok(early(Command::Version)),
            "check" if !flags.check => flags.check = true,
            "check" => return Err(CliError::new("`check` is given twice")),
            a if a.starts_with('-') && a != "-" => {
                let (name, inline) = match a.split_once('=') {
                    Some((name, value)) => (name, Some(value.to_string())),
                    None => (a, None),
                };
                if BARE_FLAGS.contains(&name) {
                    return Err(CliError::new(format!("`{name}` takes no value")));
                }
                if !VALUE_FLAGS.contains(&name) {
                    return Err(unknown_flag(name));
                }
                let value = match inline {
                    Some(value) => value,
                    None => match rest.next() {
                        Some(value) if !value.starts_with("--") => value.clone(),
                        _ => {
                            return Err(CliError::new(format!(
                                "`{name}` needs a value, e.g. `{name} {}` or `{name}={}`",
                                example(name),
                                example(name)
                            )))
                        }
                    },
                };
                set_flag(&mut flags, name, &value)?;
            }
            other => {
                return Err(CliError::new(format!(
                    "unexpected argument {other:?}; the only command is `check`"
                )))
            }
        }
    }
    resolve(flags, env)
}

/// Apply the environment under the flags.
fn resolve(flags: Flags, env: &dyn Fn(&str) -> Option<String>) -> Result<Invocation, CliError> {
    // An empty variable counts as unset, as shells and container runtimes
    // often export empty values.
    let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let config_dir = flags
        .config
        .or_else(|| var("GAIA_CONFIG_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_DIR));
    let port = match (flags.port, var("PORT")) {
        (Some(port), _) => Some(port),
        (None, Some(value)) => Some(parse_port(&value).ok_or_else(|| {
            CliError::new(format!(
                "environment variable PORT must be a port number from 0 to 65535, got {value:?}"
            ))
        })?),
        (None, None) => None,
    };
    let bind = match (flags.bind, var("BIND")) {
        (Some(bind), _) => Some(bind),
        (None, Some(value)) => Some(value.trim().parse().map_err(|_| {
            CliError::new(format!(
                "environment variable BIND must be an IP address such as 127.0.0.1, 0.0.0.0 \
                 or ::, got {value:?}"
            ))
        })?),
        (None, None) => None,
    };
    let log_level = match var("LOG_LEVEL") {
        Some(value) => parse_log_level(&value).ok_or_else(|| {
            let names: Vec<&str> = LOG_LEVELS.iter().map(|(n, _)| *n).collect();
            CliError::new(format!(
                "environment variable LOG_LEVEL must be one of {}, got {value:?}",
                names.join(", ")
            ))
        })?,
        None => match var("NODE_ENV") {
            Some(mode) if mode.trim().eq_ignore_ascii_case("production") => LevelFilter::Info,
            _ => LevelFilter::Debug,
        },
    };
    Ok(Invocation {
        command: if flags.check {
            Command::Check
        } else {
            Command::Run
        },
        config_dir,
        overrides: Overrides {
            port,
            bind,
            workers: flags.workers,
        },
        log_level,
    })
}

fn early(command: Command) -> Invocation {
    Invocation {
        command,
        config_dir: PathBuf::from(DEFAULT_CONFIG_DIR),
        overrides: Overrides::default(),
        log_level: LevelFilter::Info,
    }
}

fn set_flag(flags: &mut Flags, name: &str, value: &str) -> Result<(), CliError> {
    match name {
        "--config" => {
            if value.is_empty() {
                return Err(CliError::new(
                    "`--config` needs a directory, got an empty value",
                ));
            }
            flags.config = Some(PathBuf::from(value));
        }
        "--port" => {
            flags.port = Some(parse_port(value).ok_or_else(|| {
                CliError::new(format!(
                    "`--port` must be a port number from 0 to 65535, got {value:?}"
                ))
            })?);
        }
        "--bind" => {
            flags.bind = Some(value.trim().parse().map_err(|_| {
                CliError::new(format!(
                    "`--bind` must be an IP address such as 127.0.0.1, 0.0.0.0 or ::, got {value:?}"
                ))
            })?);
        }
        _ => {
            let workers = value
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_WORKERS).contains(n));
            flags.workers = Some(workers.ok_or_else(|| {
                CliError::new(format!(
                    "`--workers` must be an integer from 1 to {MAX_WORKERS}, got {value:?}"
                ))
            })?);
        }
    }
    Ok(())
}

fn parse_port(value: &str) -> Option<u16> {
    let value = value.trim();
    // u16::from_str accepts a leading '+'; a port is digits only.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn parse_log_level(value: &str) -> Option<LevelFilter> {
    let value = value.trim();
    LOG_LEVELS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(value))
        .map(|(_, level)| *level)
}

fn example(flag: &str) -> &'static str {
    match flag {
        "--config" => "./config",
        "--port" => "3000",
        "--bind" => "0.0.0.0",
        _ => "64",
    }
}

fn unknown_flag(name: &str) -> CliError {
    let known: Vec<&str> = VALUE_FLAGS
        .iter()
        .chain(BARE_FLAGS.iter())
        .copied()
        .filter(|f| f.starts_with("--"))
        .collect();
    let bare = name.trim_start_matches('-');
    // A prefix such as `--conf` is a likely abbreviation; otherwise look for typos.
    let hint = known
        .iter()
        .copied()
        .find(|f| bare.len() >= 3 && f[2..].starts_with(bare))
        .or_else(|| config::suggest(name, &known));
    match hint {
        Some(hint) => CliError::new(format!("unknown flag `{name}` (did you mean `{hint}`?)")),
        None => CliError::new(format!(
            "unknown flag `{name}`; the flags are --config, --port, --bind, --workers, \
             --help and --version"
        )),
    }
}

/// The environment variable `name`, for [`parse`]; a value that is not valid
/// Unicode is passed on lossily rather than silently ignored.
pub fn process_env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(value) => Some(value),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(value)) => Some(value.to_string_lossy().into_owned()),
    }
}

/// `gaia-balancer <version>`, for `--version`.
pub fn version_text() -> String {
    format!("gaia-balancer {}", env!("CARGO_PKG_VERSION"))
}

/// Usage, flags, environment variables and defaults, for `--help`.
pub fn help_text() -> String {
    let d = Settings::default();
    format!(
        "{version}: one reliable OpenAI-compatible endpoint in front of many LLM nodes

USAGE:
    gaia-balancer [--config DIR] [--port N] [--bind ADDR] [--workers N]
    gaia-balancer check [--config DIR]
    gaia-balancer --help | --version

COMMANDS:
    (none)          run the balancer
    check           validate the config directory and print the resolved
                    configuration (keys masked); exit 0 if valid, 1 if not

FLAGS:
    --config DIR    config directory [env: GAIA_CONFIG_DIR] [default: {dir}]
    --port N        listen port, 0 picks a free one [env: PORT]
                    [default: balancer.json \"port\", else {port}]
    --bind ADDR     listen IP address [env: BIND]
                    [default: balancer.json \"bind\", else {bind}]
    --workers N     worker threads, 1 to {max_workers}
                    [default: balancer.json \"workers\", else {workers}]
    -h, --help      print this help
    -V, --version   print the version

    A value may follow its flag (--port 8080) or be joined to it
    (--port=8080). Given twice, the last value wins. Flags beat the
    environment, which beats balancer.json, which beats the defaults.

ENVIRONMENT:
    GAIA_CONFIG_DIR config directory, when --config is not given
    PORT            listen port, when --port is not given
    BIND            listen address, when --bind is not given
    LOG_LEVEL       error, warn, info, debug or trace (any case)
    NODE_ENV        when LOG_LEVEL is unset: \"production\" logs at info,
                    anything else at debug
    Empty variables count as unset.

CONFIG DIRECTORY:
    hosts.json      required: {{\"hosts\": [\"asia\", \"http://127.0.0.1:8080\",
                    {{\"url\": \"https://node.example\", \"weight\": 3}}]}}
    api-keys.json   optional: {{\"apiKeys\": [{{\"key\": \"gaia-...\", \"isActive\": true}}]}}
    balancer.json   optional: every other setting (see the README)
",
        version = version_text(),
        dir = DEFAULT_CONFIG_DIR,
        port = d.port,
        bind = d.bind,
        workers = d.workers,
        max_workers = MAX_WORKERS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn parse_with(list: &[&str], vars: &[(&str, &str)]) -> Result<Invocation, CliError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        parse(&args(list), &env)
    }

    fn ok(list: &[&str]) -> Invocation {
        parse_with(list, &[]).unwrap()
    }

    /// Assert the error text says `says` and points to --help.
    #[track_caller]
    fn assert_err(result: Result<Invocation, CliError>, says: &str) {
        let text = result.unwrap_err().to_string();
        assert!(text.contains(says), "expected {says:?} in: {text}");
        assert!(text.contains("gaia-balancer --help"), "{text}");
        assert!(!text.contains('\n'), "one paragraph: {text}");
    }

    #[test]
    fn no_arguments_run_with_defaults() {
        let inv = ok(&[]);
        assert_eq!(inv.command, Command::Run);
        assert_eq!(inv.config_dir, PathBuf::from("./config"));
        assert_eq!(inv.overrides, Overrides::default());
        assert_eq!(inv.log_level, LevelFilter::Debug);
    }

    #[test]
    fn check_command() {
        assert_eq!(ok(&["check"]).command, Command::Check);
        let inv = ok(&["check", "--config", "/etc/gaia"]);
        assert_eq!(inv.command, Command::Check);
        assert_eq!(inv.config_dir, PathBuf::from("/etc/gaia"));
        let inv = ok(&["--config=/etc/gaia", "check"]);
        assert_eq!(inv.command, Command::Check);
        assert_eq!(inv.config_dir, PathBuf::from("/etc/gaia"));
    }

    #[test]
    fn help_and_version() {
        for flag in ["--help", "-h"] {
            assert_eq!(ok(&[flag]).command, Command::Help);
            assert_eq!(ok(&["check", flag]).command, Command::Help);
        }
        for flag in ["--version", "-V"] {
            assert_eq!(ok(&[flag]).command, Command::Version);
        }
        // Help works even when the environment is broken.
        let inv = parse_with(&["--help"], &[("PORT", "nope"), ("LOG_LEVEL", "loud")]).unwrap();
        assert_eq!(inv.command, Command::Help);
        assert!(version_text().starts_with("gaia-balancer "));
        assert!(version_text().ends_with(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn both_value_forms() {
        for list in [
            &[
                "--port",
                "8080",
                "--bind",
                "::1",
                "--workers",
                "4",
                "--config",
                "cfg",
            ][..],
            &["--port=8080", "--bind=::1", "--workers=4", "--config=cfg"][..],
        ] {
            let inv = ok(list);
            assert_eq!(inv.command, Command::Run);
            assert_eq!(inv.overrides.port, Some(8080));
            assert_eq!(inv.overrides.bind, Some("::1".parse().unwrap()));
            assert_eq!(inv.overrides.workers, Some(4));
            assert_eq!(inv.config_dir, PathBuf::from("cfg"));
        }
        // A value may itself contain '='.
        assert_eq!(ok(&["--config=a=b"]).config_dir, PathBuf::from("a=b"));
        // Last value wins.
        assert_eq!(ok(&["--port", "1", "--port", "2"]).overrides.port, Some(2));
        assert_eq!(ok(&["--port", "0"]).overrides.port, Some(0));
    }

    #[test]
    fn flags_beat_environment() {
        let vars = [
            ("PORT", "7000"),
            ("BIND", "0.0.0.0"),
            ("GAIA_CONFIG_DIR", "/from/env"),
        ];
        let inv = parse_with(&[], &vars).unwrap();
        assert_eq!(inv.overrides.port, Some(7000));
        assert_eq!(inv.overrides.bind, Some(IpAddr::from([0, 0, 0, 0])));
        assert_eq!(inv.config_dir, PathBuf::from("/from/env"));
        let inv = parse_with(
            &[
                "--port",
                "8000",
                "--bind",
                "127.0.0.2",
                "--config",
                "/from/flag",
            ],
            &vars,
        )
        .unwrap();
        assert_eq!(inv.overrides.port, Some(8000));
        assert_eq!(inv.overrides.bind, Some(IpAddr::from([127, 0, 0, 2])));
        assert_eq!(inv.config_dir, PathBuf::from("/from/flag"));
        // A bad variable that a flag overrides is never read.
        let inv = parse_with(&["--port", "8000"], &[("PORT", "x")]).unwrap();
        assert_eq!(inv.overrides.port, Some(8000));
        // Empty variables count as unset.
        let inv = parse_with(&[], &[("PORT", ""), ("GAIA_CONFIG_DIR", "")]).unwrap();
        assert_eq!(inv.overrides.port, None);
        assert_eq!(inv.config_dir, PathBuf::from("./config"));
    }

    #[test]
    fn log_level_from_environment() {
        let level = |vars: &[(&str, &str)]| parse_with(&[], vars).unwrap().log_level;
        assert_eq!(level(&[]), LevelFilter::Debug);
        assert_eq!(level(&[("NODE_ENV", "production")]), LevelFilter::Info);
        assert_eq!(level(&[("NODE_ENV", "development")]), LevelFilter::Debug);
        assert_eq!(level(&[("LOG_LEVEL", "WARN")]), LevelFilter::Warn);
        assert_eq!(level(&[("LOG_LEVEL", "trace")]), LevelFilter::Trace);
        assert_eq!(level(&[("LOG_LEVEL", "Error")]), LevelFilter::Error);
        assert_eq!(
            level(&[("LOG_LEVEL", "debug"), ("NODE_ENV", "production")]),
            LevelFilter::Debug
        );
        assert_err(
            parse_with(&[], &[("LOG_LEVEL", "verbose")]),
            "environment variable LOG_LEVEL must be one of error, warn, info, debug, trace, got \"verbose\"",
        );
    }

    #[test]
    fn bad_environment_values_name_the_variable() {
        assert_err(
            parse_with(&[], &[("PORT", "http")]),
            "environment variable PORT must be a port number from 0 to 65535, got \"http\"",
        );
        assert_err(
            parse_with(&[], &[("PORT", "65536")]),
            "PORT must be a port number",
        );
        assert_err(
            parse_with(&[], &[("PORT", "+80")]),
            "PORT must be a port number",
        );
        assert_err(
            parse_with(&[], &[("BIND", "localhost")]),
            "environment variable BIND must be an IP address",
        );
    }

    #[test]
    fn bad_flags_are_errors() {
        assert_err(
            parse_with(&["--prot", "1"], &[]),
            "unknown flag `--prot` (did you mean `--port`?)",
        );
        assert_err(parse_with(&["--conf=x"], &[]), "did you mean `--config`?");
        assert_err(
            parse_with(&["--verbose"], &[]),
            "unknown flag `--verbose`; the flags are",
        );
        assert_err(parse_with(&["-p", "1"], &[]), "unknown flag `-p`");
        assert_err(
            parse_with(&["--port"], &[]),
            "`--port` needs a value, e.g. `--port 3000`",
        );
        assert_err(
            parse_with(&["--port", "--bind", "::"], &[]),
            "`--port` needs a value",
        );
        assert_err(
            parse_with(&["--port", "abc"], &[]),
            "`--port` must be a port number from 0 to 65535, got \"abc\"",
        );
        assert_err(
            parse_with(&["--port=70000"], &[]),
            "`--port` must be a port number",
        );
        assert_err(
            parse_with(&["--port="], &[]),
            "`--port` must be a port number",
        );
        assert_err(
            parse_with(&["--bind", "example.com"], &[]),
            "`--bind` must be an IP address",
        );
        assert_err(
            parse_with(&["--workers", "0"], &[]),
            "`--workers` must be an integer from 1 to 4096, got \"0\"",
        );
        assert_err(
            parse_with(&["--workers", "4097"], &[]),
            "`--workers` must be an integer from 1 to 4096",
        );
        assert_err(
            parse_with(&["--config="], &[]),
            "`--config` needs a directory",
        );
        assert_err(parse_with(&["--help=yes"], &[]), "`--help` takes no value");
        assert_err(
            parse_with(&["serve"], &[]),
            "unexpected argument \"serve\"; the only command is `check`",
        );
        assert_err(
            parse_with(&["check", "check"], &[]),
            "`check` is given twice",
        );
    }

    #[test]
    fn help_lists_flags_environment_and_defaults() {
        let help = help_text();
        for needle in [
            "gaia-balancer check [--config DIR]",
            "--config DIR",
            "--port N",
            "--bind ADDR",
            "--workers N",
            "--help",
            "--version",
            "GAIA_CONFIG_DIR",
            "PORT",
            "BIND",
            "LOG_LEVEL",
            "NODE_ENV",
            "default: ./config",
            "else 3000",
            "else 127.0.0.1",
            "else 256",
            "hosts.json",
            "api-keys.json",
            "balancer.json",
        ] {
            assert!(
                help.contains(needle),
                "{needle:?} missing from help:\n{help}"
            );
        }
    }

    /// A scratch config directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn with(files: &[(&str, &str)]) -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("gaia-balancer-cli-test-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, text) in files {
                std::fs::write(dir.join(name), text).unwrap();
            }
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn precedence_flag_then_env_then_file_then_default() {
        let hosts = ("hosts.json", r#"{"hosts": ["asia"]}"#);
        let with_file =
            TempDir::with(&[hosts, ("balancer.json", r#"{"port": 4000, "bind": "::1"}"#)]);
        let without_file = TempDir::with(&[hosts]);
        let resolve = |dir: &Path, list: &[&str], vars: &[(&str, &str)]| {
            let dir = dir.to_str().unwrap().to_string();
            let mut list: Vec<&str> = list.to_vec();
            list.extend(["--config", dir.as_str()]);
            let inv = parse_with(&list, vars).unwrap();
            crate::config::load(&inv.config_dir, &inv.overrides)
                .unwrap()
                .settings
        };
        let env = [("PORT", "5000"), ("BIND", "10.0.0.1")];
        let flags = ["--port", "6000", "--bind", "10.0.0.2"];

        let s = resolve(&without_file.0, &[], &[]);
        assert_eq!((s.port, s.bind), (3000, IpAddr::from([127, 0, 0, 1])));
        let s = resolve(&with_file.0, &[], &[]);
        assert_eq!((s.port, s.bind), (4000, "::1".parse().unwrap()));
        let s = resolve(&with_file.0, &[], &env);
        assert_eq!((s.port, s.bind), (5000, IpAddr::from([10, 0, 0, 1])));
        let s = resolve(&with_file.0, &flags, &env);
        assert_eq!((s.port, s.bind), (6000, IpAddr::from([10, 0, 0, 2])));
        let s = resolve(&with_file.0, &["--workers", "9"], &[]);
        assert_eq!(s.workers, 9);
    }
}
