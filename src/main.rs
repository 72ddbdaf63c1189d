//! The `gaia-balancer` binary: parse the command line, then run, check,
//! or print help or the version. Everything else lives in the library.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use gaia_balancer::cli::{self, Command};
use gaia_balancer::{config, logging, server};

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
        Command::Help => {
            print!("{}", cli::help_text());
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("{}", cli::version_text());
            ExitCode::SUCCESS
        }
        Command::Check => match config::load(&inv.config_dir, &inv.overrides) {
            Ok(config) => {
                print!("{}", config::render(&config));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("gaia-balancer: invalid configuration: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run => run(&inv),
    }
}

fn run(inv: &cli::Invocation) -> ExitCode {
    logging::init(inv.log_level);
    let config = match config::load(&inv.config_dir, &inv.overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("gaia-balancer: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    if config.api_keys.is_empty() {
        log::warn!(
            "no active key in {}: requests go upstream without Authorization",
            config.dir.join(config::API_KEYS_FILE).display()
        );
    }
    let server = match server::start(config) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("gaia-balancer: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    server.wait();
    ExitCode::SUCCESS
}
