//! gaia-balancer: one reliable OpenAI-compatible endpoint in front of many
//! upstream LLM nodes, with key rotation, retries and failover, on plain
//! threads and blocking I/O.

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod cooldowns;
pub mod discovery;
pub mod health_lane;
pub mod hedge;
pub mod hosts;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod request;
pub mod resolve;
pub mod response;
pub mod retry;
pub mod rng;
pub mod routes;
pub mod selection;
pub mod server;
pub mod state;
pub mod streaming;
pub mod tls;
pub mod transport;
pub mod upstream;
pub mod watch;
