//! Cheap, non-cryptographic randomness for backoff jitter, tie-breaks and
//! request ids. Each thread has its own xorshift state seeded from the clock
//! and the thread, so no lock is taken and no crate is needed. Never used for
//! anything secret.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    static STATE: Cell<u64> = Cell::new(initial());
}

fn initial() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // RandomState mixes in per-process randomness from the OS.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(nanos);
    h.write(format!("{:?}", std::thread::current().id()).as_bytes());
    h.finish() | 1
}

/// A uniformly distributed `u64`.
pub fn next_u64() -> u64 {
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

/// A value in `0..n` (0 when `n` is 0).
pub fn below(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        next_u64() % n
    }
}

/// A fresh request id: 16 lowercase hex digits.
pub fn request_id() -> String {
    // By hand rather than `format!("{:016x}")`: one per request, and the
    // formatting machinery cost more than the rest of the id.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = next_u64();
    let mut id = String::with_capacity(16);
    for shift in (0..16).rev().map(|i| i * 4) {
        id.push(char::from(HEX[(n >> shift) as usize & 0xf]));
    }
    id
}

/// Make this thread's sequence repeatable (tests); 0 is replaced, since
/// xorshift would stay at 0 forever.
pub fn seed(seed: u64) {
    STATE.with(|s| {
        s.set(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_16_lowercase_hex_digits_of_the_next_number() {
        for seed_value in [1, 0x0123_4567_89ab_cdef, u64::MAX] {
            seed(seed_value);
            let id = request_id();
            seed(seed_value);
            assert_eq!(id, format!("{:016x}", next_u64()));
        }
    }
}
