//! The `gaia-balancer` binary: parse the command line, then run, check,
//! or print help or the version. Everything else lives in the library.
//!
//! Running ends only by a signal: SIGTERM or SIGINT drains (the listener
//! closes, requests in flight finish for up to `shutdownGraceMs`) and the
//! process exits 0, also when the grace ran out, because the stop was asked
//! for and systemd or Kubernetes should not record it as a failure. A second
//! signal during the drain exits at once with status 1. SIGHUP re-reads the
//! configuration at once, as if every file had been rewritten (as nginx and
//! HAProxy reload on it); it never stops the process.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Instant;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use gaia_balancer::cli::{self, Command};
use gaia_balancer::{config, logging, routes, server};

fn main() -> ExitCode {
    // args_os: a non-UTF-8 argument must be an error message, not a panic.
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let inv = match cli::parse(&args, &cli::process_env) {
        Ok(inv) => inv,
        Err(e) => {
            eprintln!("gaia-balancer: {e}");
            return ExitCode::from(2);
        }
    };
    match inv.command {
        Command::Help => output(&cli::help_text()),
        Command::Version => output(&format!("{}\n", cli::version_text())),
        Command::Check => match config::load(&inv.config_dir, &inv.overrides) {
            Ok(config) => output(&config::render(&config)),
            Err(e) => {
                eprintln!("gaia-balancer: invalid configuration: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run => run(&inv),
    }
}

/// Write `text` to stdout and exit 0. Not `print!`, which panics when the
/// write fails: `check | head` on a long host list (the reader leaves
/// early), or a full disk. A reader that left had what it wanted (exit 0);
/// any other failure is said on stderr (exit 1).
fn output(text: &str) -> ExitCode {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gaia-balancer: cannot write to standard output: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(inv: &cli::Invocation) -> ExitCode {
    logging::init(inv.log_level);
    // Installed before the listener opens, so a signal during startup
    // drains instead of killing the process with the default action.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("gaia-balancer: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = match config::load(&inv.config_dir, &inv.overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("gaia-balancer: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    if config.api_keys.is_empty() {
        // Name what is actually missing: the file, or an active key in it.
        let file = config.dir.join(config::API_KEYS_FILE);
        if file.exists() {
            log::warn!(
                "no active key in {}: requests go upstream without Authorization",
                file.display()
            );
        } else {
            log::warn!(
                "no {} in {}: requests go upstream without Authorization",
                config::API_KEYS_FILE,
                config.dir.display()
            );
        }
    }
    if let Some(warning) = routes::protected_mode_warning(&config.settings) {
        log::warn!("{warning}");
    }
    let server =
        match server::start_with_reload(config, inv.config_dir.clone(), inv.overrides.clone()) {
            Ok(server) => server,
            Err(e) => {
                eprintln!("gaia-balancer: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
    let signal = loop {
        match signals.forever().next() {
            Some(SIGHUP) => {
                log::info!("SIGHUP received: re-reading the configuration");
                server.reload_now();
            }
            Some(signal) => break signal,
            None => {
                // The iterator only ends when closed through a handle, which nothing does.
                server.wait();
                return ExitCode::SUCCESS;
            }
        }
    };
    // Read at signal time, so a reloaded configuration's grace applies.
    let grace = server.shared().current().config.settings.shutdown_grace;
    log::info!(
        "{} received: draining (grace {} ms)",
        signal_name(signal),
        grace.as_millis()
    );
    // An operator pressing Ctrl-C twice wants out now, not in 30 s.
    std::thread::spawn(move || {
        if let Some(again) = signals.forever().find(|s| *s != SIGHUP) {
            log::warn!(
                "{} received again while draining: exiting now",
                signal_name(again)
            );
            std::process::exit(1);
        }
    });
    let started = Instant::now();
    if server.shutdown(grace) {
        log::info!("drained in {} ms; exiting", started.elapsed().as_millis());
    } else {
        log::warn!(
            "grace of {} ms ran out with requests still in flight; exiting",
            grace.as_millis()
        );
    }
    ExitCode::SUCCESS
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        _ => "signal",
    }
}
