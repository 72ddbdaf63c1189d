//! Integration tests: the real balancer in-process, real upstreams on loopback.

mod fake;
mod util;

mod cli;
mod flood;
mod fuzz;
mod hostile;
mod matrix;
mod ops;
mod process;
mod proxy;
mod resilience;
mod streaming;
