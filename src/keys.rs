//! Upstream API keys: rotation, health and masking.
//!
//! A [`KeyPool`] is either the global pool from `api-keys.json` or the keys
//! one host owns in `hosts.json`; a host only ever draws from its own pool, so
//! a provider's key never reaches another host. Keys rotate round-robin over
//! the usable ones with one atomic cursor. A key rejected with 401/403 is out
//! of rotation until the key file changes (a reload builds a new pool); a
//! rate-limited key cools down (see [`crate::cooldowns`]). Key health is
//! separate from host health. Keys never leave this module whole except to go
//! into an upstream `Authorization` header: every printable form is masked.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ureq::http::HeaderValue;

use crate::cooldowns::Cooldown;

/// How long a 429 on one host is remembered as evidence against a key.
pub const EVIDENCE_WINDOW: Duration = Duration::from_secs(60);

/// One upstream key.
#[derive(Debug)]
pub struct Key {
    /// Position in its pool.
    pub index: usize,
    secret: String,
    masked: String,
    /// `Bearer <secret>` as a header value, made once (`None`: the secret
    /// cannot be one, and the request fails as unsendable).
    bearer: Option<HeaderValue>,
    state: Mutex<KeyState>,
}

/// A key's health.
#[derive(Debug, Default)]
pub struct KeyState {
    /// Rejected with 401/403: never used again from this pool.
    pub disabled: bool,
    /// Rate-limit cooldown of the key itself.
    pub cooldown: Cooldown,
    /// Hosts that answered 429 with this key recently (base URL, when): by
    /// URL for the reason given at `rejected_by`.
    pub limited_by: Vec<(String, Instant)>,
    /// Hosts that rejected this key (401/403), by base URL: not by index,
    /// which a reload that adds, removes or reorders hosts gives to another
    /// host while this key (and what it learned) is kept.
    pub rejected_by: Vec<String>,
}

impl Key {
    fn new(index: usize, secret: String) -> Self {
        let masked = mask(&secret);
        let bearer = HeaderValue::try_from(format!("Bearer {secret}"))
            .ok()
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        Key {
            index,
            secret,
            masked,
            bearer,
            state: Mutex::new(KeyState::default()),
        }
    }

    /// The secret, for the upstream `Authorization` header only.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The upstream `Authorization` header's value, when the secret makes one.
    pub fn bearer(&self) -> Option<&HeaderValue> {
        self.bearer.as_ref()
    }

    /// The masked form, safe for logs, headers, metrics and `/status`.
    pub fn masked(&self) -> &str {
        &self.masked
    }

    /// The key's health, locked.
    pub fn state(&self) -> MutexGuard<'_, KeyState> {
        // Every state is valid, so a panic elsewhere leaves nothing to repair.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Usable now: not disabled and not cooling.
    pub fn usable(&self, now: Instant) -> bool {
        let s = self.state();
        !s.disabled && !s.cooldown.active(now)
    }

    /// When the key is usable again (`now` if it is): `None` when disabled.
    pub fn usable_from(&self, now: Instant) -> Option<Instant> {
        let s = self.state();
        (!s.disabled).then(|| s.cooldown.until(now).unwrap_or(now))
    }

    /// The key just worked: forget its rate-limit history, so only 429s in a
    /// row, not scattered ones, add up to a key cooldown.
    pub fn succeeded(&self) {
        let mut s = self.state();
        s.limited_by.clear();
        s.cooldown.reset();
    }

    /// Take the key out of rotation (401/403).
    pub fn disable(&self) {
        self.state().disabled = true;
    }

    /// Record that the host at `base_url` rejected this key; returns how
    /// many distinct hosts have.
    pub fn rejected_by(&self, base_url: &str) -> usize {
        let mut s = self.state();
        if !s.rejected_by.iter().any(|u| u == base_url) {
            s.rejected_by.push(base_url.to_string());
        }
        s.rejected_by.len()
    }

    /// Record that the host at `base_url` rate-limited this key; returns how
    /// many distinct hosts did so within the evidence window.
    pub fn limited_by(&self, base_url: &str, now: Instant) -> usize {
        let mut s = self.state();
        s.limited_by
            .retain(|(h, at)| h != base_url && now.duration_since(*at) < EVIDENCE_WINDOW);
        s.limited_by.push((base_url.to_string(), now));
        s.limited_by.len()
    }
}

/// A secret reduced to its last 4 characters, or `****` when it is shorter
/// than 12 characters (then 4 characters would give too much away).
pub fn mask(secret: &str) -> String {
    let n = secret.chars().count();
    if n < 12 {
        return "****".to_string();
    }
    let tail: String = secret.chars().skip(n - 4).collect();
    format!("...{tail}")
}

/// Replace every occurrence of `key`'s secret in `body` by its masked form:
/// an upstream that echoes the key it was sent (in a 401 body, say) must not
/// hand a pool key to the client. Returns true when something was replaced.
pub fn redact(body: &mut Vec<u8>, key: &Key) -> bool {
    let secret = key.secret().as_bytes();
    if secret.is_empty() || !body.windows(secret.len()).any(|w| w == secret) {
        return false;
    }
    let mut r = Redactor::new(key);
    let mut masked = r.push(body);
    masked.extend(r.finish());
    *body = masked;
    true
}

/// [`redact`] for a body that passes through in pieces (an error answer
/// too large to hold whole): a copy of the key split between two pieces is
/// masked too. Holds back at most the key's length less one byte, and only
/// while those bytes could still be the start of the key.
pub struct Redactor {
    secret: Vec<u8>,
    masked: Vec<u8>,
    /// The tail of the last piece that may begin a copy of the key.
    carry: Vec<u8>,
}

impl Redactor {
    /// A redactor for `key`.
    pub fn new(key: &Key) -> Redactor {
        Redactor {
            secret: key.secret().as_bytes().to_vec(),
            masked: key.masked().as_bytes().to_vec(),
            carry: Vec::new(),
        }
    }

    /// The next piece, masked: what is safe to pass on now.
    pub fn push(&mut self, piece: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(piece);
        let n = self.secret.len();
        if n == 0 {
            return buf;
        }
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        while i < buf.len() {
            let rest = &buf[i..];
            if rest.starts_with(&self.secret) {
                out.extend_from_slice(&self.masked);
                i += n;
            } else if rest.len() < n && self.secret.starts_with(rest) {
                self.carry = rest.to_vec();
                break;
            } else {
                out.push(buf[i]);
                i += 1;
            }
        }
        out
    }

    /// The body ended: what was held back (never a whole key).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.carry)
    }
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
                .enumerate()
                .map(|(i, s)| Arc::new(Key::new(i, s.clone())))
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

    /// The next usable key in rotation that `accept` allows (e.g. not tried
    /// yet, pair not cooling). `None` when no key qualifies.
    pub fn next(&self, now: Instant, accept: impl Fn(&Key) -> bool) -> Option<Arc<Key>> {
        let n = self.keys.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        let (skipped, key) = (0..n)
            .map(|i| (i, &self.keys[(start + i) % n]))
            .find(|(_, k)| k.usable(now) && accept(k))?;
        // Move the cursor past the key taken, not just one step: else the
        // key after one that is out gets that key's turn as well as its own
        // (two thirds of the traffic of three keys with one out).
        if skipped > 0 {
            self.cursor.fetch_add(skipped, Ordering::Relaxed);
        }
        Some(key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authorization_value_is_made_once_and_marked_sensitive() {
        let pool = KeyPool::new(&["gaia-abcdef123456".to_string()]);
        let key = &pool.keys()[0];
        let value = key.bearer().expect("a valid header value");
        assert_eq!(value.to_str().unwrap(), "Bearer gaia-abcdef123456");
        assert!(value.is_sensitive());
    }

    #[test]
    fn mask_shows_only_the_last_four() {
        assert_eq!(mask("gaia-abcdefghijkl-WXYZ"), "...WXYZ");
        assert_eq!(mask("short"), "****");
        assert_eq!(mask("héllo-wörld-ÿÿÿÿ"), "...ÿÿÿÿ");
    }

    #[test]
    fn redact_masks_every_copy_of_the_key_and_nothing_else() {
        let key = Key::new(0, "gaia-secret-key-0000-WXYZ".into());
        let mut body =
            b"bad key gaia-secret-key-0000-WXYZ (gaia-secret-key-0000-WXYZ) gaia-secret".to_vec();
        assert!(redact(&mut body, &key));
        assert_eq!(body, b"bad key ...WXYZ (...WXYZ) gaia-secret");
        let mut clean = b"nothing to see".to_vec();
        assert!(!redact(&mut clean, &key));
        assert_eq!(clean, b"nothing to see");
    }

    #[test]
    fn redactor_masks_a_key_split_between_pieces() {
        let key = Key::new(0, "gaia-secret-key-0000-WXYZ".into());
        let body = b"a gaia-secret-key-0000-WXYZ b gaia-secret-key-0000-WXYZ c gaia-secret";
        for cut in 0..body.len() {
            for second in cut..body.len() {
                let mut r = Redactor::new(&key);
                let mut out = r.push(&body[..cut]);
                out.extend(r.push(&body[cut..second]));
                out.extend(r.push(&body[second..]));
                out.extend(r.finish());
                assert_eq!(out, b"a ...WXYZ b ...WXYZ c gaia-secret", "{cut} {second}");
            }
        }
    }

    fn secret(k: Option<Arc<Key>>) -> String {
        k.unwrap().secret().to_string()
    }

    #[test]
    fn rotation_visits_every_key_in_turn() {
        let pool = KeyPool::new(&["a".into(), "b".into(), "c".into()]);
        let now = Instant::now();
        let seen: Vec<String> = (0..6).map(|_| secret(pool.next(now, |_| true))).collect();
        assert_eq!(seen, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn rotation_skips_disabled_cooling_and_refused_keys() {
        let pool = KeyPool::new(&["a".into(), "b".into(), "c".into()]);
        let now = Instant::now();
        pool.keys()[0].disable();
        pool.keys()[1].state().cooldown.hit(now, None);
        for _ in 0..4 {
            assert_eq!(secret(pool.next(now, |_| true)), "c");
        }
        assert!(pool.next(now, |k| k.index != 2).is_none());
        // The cooling key comes back; the disabled one never does.
        let later = now + Duration::from_secs(2);
        let seen: Vec<String> = (0..4).map(|_| secret(pool.next(later, |_| true))).collect();
        assert!(seen.contains(&"b".to_string()) && !seen.contains(&"a".to_string()));
        assert_eq!(pool.keys()[0].usable_from(now), None);
        assert!(pool.keys()[1].usable_from(now) > Some(now));
        assert_eq!(pool.keys()[2].usable_from(now), Some(now));
    }

    #[test]
    fn evidence_counts_distinct_hosts_in_the_window() {
        let pool = KeyPool::new(&["a".into()]);
        let k = &pool.keys()[0];
        let now = Instant::now();
        assert_eq!(k.limited_by("http://a", now), 1);
        assert_eq!(
            k.limited_by("http://a", now),
            1,
            "same host twice is one host"
        );
        assert_eq!(k.limited_by("http://b", now), 2);
        let later = now + EVIDENCE_WINDOW + Duration::from_secs(1);
        assert_eq!(k.limited_by("http://c", later), 1);
    }
}
