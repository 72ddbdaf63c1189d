//! Integration tests: the real balancer in-process, real upstreams on loopback.

mod fake;
mod util;

mod backup;
mod cli;
mod hostile;
mod ops;
mod proxy;
mod resilience;
mod strategies;
mod streaming;
