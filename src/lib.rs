//! gaia-balancer: one reliable OpenAI-compatible endpoint in front of many
//! upstream LLM nodes, with key rotation, retries and failover, on plain
//! threads and blocking I/O.

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod request;
