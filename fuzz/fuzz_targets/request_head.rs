//! cargo-fuzz target: arbitrary bytes as one client connection's input to
//! the strict request reader (heads, bodies, pipelined requests), with the
//! server's real limits. The deterministic fuzz in `src/request.rs` runs in
//! `cargo test`; this one explores further with coverage guidance where a
//! nightly toolchain and cargo-fuzz exist.
//!
//! It checks what the server relies on: no panic, no unbounded allocation
//! (libFuzzer's `-rss_limit_mb` and `-malloc_limit_mb` catch those), every
//! refusal is a 4xx/5xx or a silent close, and nothing served exceeds a limit.

#![no_main]

use std::time::{Duration, Instant};

use gaia_balancer::request::{Limits, Reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_line: 8 * 1024,
        max_head: 32 * 1024,
        max_headers: 100,
        max_body: 1 << 20,
    };
    let sec = Duration::from_secs(1);
    let mut reader = Reader::new(data);
    // One connection carries at most as many requests as it has bytes.
    for _ in 0..=data.len() {
        let head = match reader.read_head(&limits, sec, sec) {
            Ok(head) => head,
            Err(e) => {
                assert!(e.status().is_none_or(|s| (400..600).contains(&s)), "{e:?}");
                return;
            }
        };
        assert!(head.headers.len() <= limits.max_headers);
        assert!(head.target.starts_with('/') || head.target == "*");
        match reader.read_body(head.framing, &limits, sec, Instant::now() + sec) {
            Ok(body) => assert!(body.len() as u64 <= limits.max_body),
            Err(e) => {
                assert!(e.status().is_none_or(|s| (400..600).contains(&s)), "{e:?}");
                return;
            }
        }
    }
});
