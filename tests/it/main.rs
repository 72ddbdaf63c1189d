//! Integration tests: the real balancer in-process, real upstreams on loopback.

mod fake;
mod util;

mod backup;
mod bench;
mod cli;
mod discovery;
mod flood;
mod fuzz;
mod hedging;
mod hostile;
mod matrix;
mod metrics;
mod ops;
mod process;
mod proxy;
mod reload;
mod resilience;
mod security;
mod strategies;
mod streaming;
mod tls;
