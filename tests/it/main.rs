//! Integration tests: the real balancer in-process, real upstreams on loopback.

mod fake;
mod util;

mod cli;
mod hostile;
mod matrix;
mod ops;
mod proxy;
mod resilience;
mod streaming;
