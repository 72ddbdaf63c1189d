//! Seeded fuzzing of the running server over real sockets: 2,000 mutated
//! requests (bit flips, inserted and removed bytes, splices, truncation,
//! repeated lines, pipelined extras) from 8 concurrent clients. The parser
//! alone gets 100,000 cases in `src/request.rs`; this proves the whole server
//! path (reader, routing, proxying, response writing, keep-alive, timeouts)
//! answers every one with a 2xx, 4xx or 5xx or a close, in bounded time, and
//! keeps serving throughout.

use std::time::{Duration, Instant};

use crate::fake::{Reply, Upstream};
use crate::matrix::exchange;
use crate::util::{request, start};

/// xorshift64*: deterministic, no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const SEEDS: &[&[u8]] = &[
    b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"input\":\"x\"}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\n{\"a\":\r\n3\r\n12}\r\n0\r\nT: v\r\n\r\n",
    b"GET /v1/models HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /readyz HTTP/1.0\r\n\r\n",
    b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}GET /healthz HTTP/1.1\r\nHost: b\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET http://h/status?q HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HEAD /v1/models HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc\r\nAuthorization: Bearer x\r\n\r\n",
];

const INTERESTING: &[u8] = b"\r\n:; ,\t\x000123456789aAfF-+xX/";

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 => {
                let b = if rng.below(2) == 0 {
                    INTERESTING[rng.below(INTERESTING.len())]
                } else {
                    rng.next() as u8
                };
                input.insert(rng.below(len + 1), b);
            }
            2 if len > 0 => {
                input.remove(rng.below(len));
            }
            3 => {
                let other = SEEDS[rng.below(SEEDS.len())];
                input.truncate(rng.below(len + 1));
                input.extend_from_slice(&other[rng.below(other.len())..]);
            }
            4 => input.truncate(rng.below(len + 1)),
            5 if len > 0 => {
                // Repeat one line (header floods, duplicate framing headers).
                let at = rng.below(len);
                let start = input[..at]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1);
                let end = input[at..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(len, |i| at + i + 1);
                let line = input[start..end].to_vec();
                for _ in 0..1 + rng.below(150) {
                    input.splice(end..end, line.iter().copied());
                }
            }
            _ => input.extend_from_slice(SEEDS[rng.below(SEEDS.len())]),
        }
    }
}

#[test]
fn two_thousand_mutated_requests_over_sockets() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &[], |c| {
        let s = &mut c.settings;
        s.workers = 16;
        s.head_timeout = Duration::from_millis(200);
        s.body_timeout = Duration::from_millis(200);
        s.keep_alive = Duration::from_millis(200);
        s.max_body_bytes = 64 * 1024;
        // Some mutants break every attempt (the fake upstream drops a head
        // with non-UTF-8 values): a short turn-around keeps their five
        // attempts' backoff (1.1-2.2 s) within the exchange's 5 s.
        s.timeouts.connect = Duration::from_millis(200);
    });
    let addr = bal.addr;
    let began = Instant::now();
    let threads = 8;
    let per_thread = 250;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1));
                let mut by_status = std::collections::BTreeMap::new();
                let mut bad = Vec::new();
                let mut input = Vec::new();
                for case in 0..per_thread {
                    input.clear();
                    input.extend_from_slice(SEEDS[rng.below(SEEDS.len())]);
                    mutate(&mut rng, &mut input);
                    // Most clients end their input (a half-close, which the
                    // balancer takes as the client leaving once a request is
                    // proxied, as nginx does); some go silent instead and
                    // the server's timeouts must end those.
                    let half_close = rng.below(4) != 0;
                    let got = exchange(addr, &input, half_close, Duration::from_secs(5));
                    let well_formed = got.text.is_empty() || got.text.starts_with("HTTP/1.1 ");
                    let classes_ok = got
                        .statuses
                        .iter()
                        .all(|s| *s == 100 || (200..300).contains(s) || (400..600).contains(s));
                    if !(well_formed && classes_ok && got.closed) {
                        bad.push(format!(
                            "{:?} -> statuses {:?}, closed {}: {:?}",
                            String::from_utf8_lossy(&input),
                            got.statuses,
                            got.closed,
                            got.text.chars().take(200).collect::<String>()
                        ));
                    }
                    let key = match got.statuses.last() {
                        Some(s) => s.to_string(),
                        None => "close".to_string(),
                    };
                    *by_status.entry(key).or_insert(0) += 1;
                    if case % 50 == 49 {
                        let r = request(addr, "GET", "/healthz", &[], b"");
                        assert_eq!(r.status, 200, "the server stopped serving");
                    }
                }
                (by_status, bad)
            })
        })
        .collect();
    let mut total = std::collections::BTreeMap::new();
    let mut bad = Vec::new();
    for h in handles {
        let (by_status, b) = h.join().unwrap();
        for (k, v) in by_status {
            *total.entry(k).or_insert(0) += v;
        }
        bad.extend(b);
    }
    let elapsed = began.elapsed();
    eprintln!(
        "server fuzz: {} cases in {elapsed:?}, last status per connection {total:?}, upstream got {}",
        threads * per_thread,
        up.hits()
    );
    assert!(
        bad.is_empty(),
        "{} bad answers, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
    // Both valid and refused inputs were reached.
    assert!(total.get("200").copied().unwrap_or(0) > 50, "{total:?}");
    assert!(up.hits() > 100, "proxied requests were reached");
    assert!(total.get("400").copied().unwrap_or(0) > 100, "{total:?}");
    assert_eq!(request(addr, "GET", "/healthz", &[], b"").status, 200);
}
