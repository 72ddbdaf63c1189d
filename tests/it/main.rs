//! Integration tests: the real balancer in-process, real upstreams on loopback.

mod fake;
mod util;

mod cli;
mod hostile;
mod metrics;
mod ops;
mod proxy;
mod reload;
mod resilience;
mod streaming;
