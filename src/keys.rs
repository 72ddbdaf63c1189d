//! Upstream API keys: rotation and masking.
//!
//! A [`KeyPool`] is either the global pool from `api-keys.json` or the keys
//! one host owns in `hosts.json`; a host only ever draws from its own pool, so
//! a provider's key never reaches another host. Keys rotate round-robin with
//! one atomic cursor (no lock on the request path). Keys never leave this
//! module whole except to go into an upstream `Authorization` header: every
//! printable form is [`mask`]ed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One upstream key.
#[derive(Debug)]
pub struct Key {
    secret: String,
    masked: String,
}

impl Key {
    /// A key from its secret.
    pub fn new(secret: String) -> Self {
        let masked = mask(&secret);
        Key { secret, masked }
    }

    /// The secret, for the upstream `Authorization` header only.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The masked form, safe for logs, headers, metrics and `/status`.
    pub fn masked(&self) -> &str {
        &self.masked
    }
}

/// A secret reduced to its last 4 characters, or `****` when it is too short
/// for 4 characters to be a small part of it.
pub fn mask(secret: &str) -> String {
    let n = secret.chars().count();
    if n < 12 {
        return "****".to_string();
    }
    let tail: String = secret.chars().skip(n - 4).collect();
    format!("...{tail}")
}

/// A set of keys used in rotation.
#[derive(Debug, Default)]
pub struct KeyPool {
    keys: Vec<Arc<Key>>,
    cursor: AtomicUsize,
}

impl KeyPool {
    /// A pool over these secrets, in order.
    pub fn new(secrets: &[String]) -> Self {
        KeyPool {
            keys: secrets
                .iter()
                .map(|s| Arc::new(Key::new(s.clone())))
                .collect(),
            cursor: AtomicUsize::new(0),
        }
    }

    /// True when there are no keys (requests go without `Authorization`).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// All keys, for `/status`.
    pub fn keys(&self) -> &[Arc<Key>] {
        &self.keys
    }

    /// The next key in rotation, skipping any in `avoid` while another exists.
    pub fn next(&self, avoid: &[Arc<Key>]) -> Option<Arc<Key>> {
        let n = self.keys.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.keys[(start + i) % n])
            .find(|k| !avoid.iter().any(|a| Arc::ptr_eq(a, k)))
            .or_else(|| Some(&self.keys[start % n]))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_shows_only_the_last_four() {
        assert_eq!(mask("gaia-abcdefghijkl-WXYZ"), "...WXYZ");
        assert_eq!(mask("short"), "****");
        assert_eq!(mask("héllo-wörld-ÿÿÿÿ"), "...ÿÿÿÿ");
    }

    #[test]
    fn rotation_visits_every_key_in_turn() {
        let pool = KeyPool::new(&["a".into(), "b".into(), "c".into()]);
        let seen: Vec<String> = (0..6)
            .map(|_| pool.next(&[]).unwrap().secret().to_string())
            .collect();
        assert_eq!(seen, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn rotation_avoids_keys_already_tried() {
        let pool = KeyPool::new(&["a".into(), "b".into()]);
        let a = pool.next(&[]).unwrap();
        assert_eq!(a.secret(), "a");
        // The cursor now points at b; avoiding b must yield a.
        let b = pool.next(&[]).unwrap();
        let again = pool.next(std::slice::from_ref(&b)).unwrap();
        assert_eq!(again.secret(), "a");
        // Avoiding everything still yields a key rather than none.
        assert!(pool.next(&[a, b]).is_some());
    }
}
