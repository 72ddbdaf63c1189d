//! Integration tests: the real balancer in-process, real upstreams on loopback.

mod fake;
mod util;

mod hostile;
mod proxy;
mod streaming;
