//! Cooldowns: how long a rate-limited key, host or (host, key) pair stays out
//! of rotation, and how `Retry-After` is read.
//!
//! A cooldown never shortens: a new hit keeps the later of the old and the new
//! deadline (LiteLLM #40130 shortened it). Without a hint the cooldown starts
//! at 1 s and doubles per repeat up to 60 s; with a `Retry-After` the hint is
//! honoured, floored at 1 s, and still grows on repeats; nothing exceeds 300 s.
//! A success clears the repeat count.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Shortest cooldown.
pub const MIN_COOLDOWN: Duration = Duration::from_secs(1);
/// Longest cooldown from repeats without a hint.
pub const MAX_UNHINTED: Duration = Duration::from_secs(60);
/// Longest cooldown of any kind; longer `Retry-After` values are capped to it.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(300);

/// One cooldown timer with its repeat count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cooldown {
    until: Option<Instant>,
    strikes: u32,
}

impl Cooldown {
    /// Start or extend the cooldown after a rate limit; returns its length.
    pub fn hit(&mut self, now: Instant, hint: Option<Duration>) -> Duration {
        self.strikes = self.strikes.saturating_add(1);
        let doubling = MIN_COOLDOWN
            .saturating_mul(1u32 << (self.strikes - 1).min(10))
            .min(MAX_UNHINTED);
        let length = hint
            .map_or(doubling, |h| h.max(doubling))
            .clamp(MIN_COOLDOWN, MAX_COOLDOWN);
        let until = now + length;
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
        length
    }

    /// Cool down for exactly `length` (capped), keeping a later deadline.
    pub fn extend(&mut self, now: Instant, length: Duration) {
        let until = now + length.min(MAX_COOLDOWN);
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
    }

    /// Forget the repeat count after a success.
    pub fn reset(&mut self) {
        self.strikes = 0;
    }

    /// True while cooling.
    pub fn active(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| u > now)
    }

    /// When the cooldown ends, if it is active.
    pub fn until(&self, now: Instant) -> Option<Instant> {
        self.until.filter(|u| *u > now)
    }

    /// When the cooldown ends or ended, if it was ever started: the
    /// instant from which it is inactive, whatever the time now.
    pub fn deadline(&self) -> Option<Instant> {
        self.until
    }
}

/// Read `retry-after-ms`, then `Retry-After` (seconds or an HTTP date).
/// Values that cannot be read are ignored; the caller caps the result.
pub fn retry_after(headers: &ureq::http::HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_millis(ms.min(1e9) as u64));
        }
    }
    parse_retry_after(get("retry-after")?, SystemTime::now())
}

/// `Retry-After` as delay-seconds or an IMF-fixdate, relative to `now`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits beyond u64 still mean "a very long time": capped, not ignored.
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs.min(1_000_000)));
    }
    let at = parse_http_date(value)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// Seconds since the epoch of an HTTP-date: the IMF-fixdate
/// `Sun, 06 Nov 1994 08:49:37 GMT`, or one of the two obsolete forms that
/// RFC 9110 (5.6.7) says a recipient must still accept, RFC 850's
/// `Sunday, 06-Nov-94 08:49:37 GMT` and asctime's `Sun Nov  6 08:49:37 1994`.
fn parse_http_date(value: &str) -> Option<u64> {
    let parts: Vec<&str> = value.split_whitespace().collect();
    let (day, month, year, time) = match parts.as_slice() {
        [weekday, day, month, year, time, "GMT"] if weekday.ends_with(',') => {
            (*day, *month, year.parse::<u64>().ok()?, *time)
        }
        [weekday, date, time, "GMT"] if weekday.ends_with(',') => {
            let mut d = date.split('-');
            let (day, month, yy) = (d.next()?, d.next()?, d.next()?);
            if d.next().is_some() || yy.len() != 2 {
                return None;
            }
            // Two digits: the century that puts it nearest now (RFC 9110
            // says not more than 50 years ahead; a Retry-After is soon).
            let yy: u64 = yy.parse().ok()?;
            (
                day,
                month,
                if yy < 70 { 2000 + yy } else { 1900 + yy },
                *time,
            )
        }
        [_, month, day, time, year] => (*day, *month, year.parse::<u64>().ok()?, *time),
        _ => return None,
    };
    let day: u64 = day.parse().ok()?;
    let month = match month {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let mut hms = time.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some()
        || !(1970..=9999).contains(&year)
        || day == 0
        || day > 31
        || h > 23
        || m > 59
        || s > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhinted_cooldowns_double_to_a_minute() {
        let now = Instant::now();
        let mut c = Cooldown::default();
        let lengths: Vec<u64> = (0..9).map(|_| c.hit(now, None).as_secs()).collect();
        assert_eq!(lengths, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        c.reset();
        assert_eq!(c.hit(now, None).as_secs(), 1);
    }

    #[test]
    fn hints_are_floored_capped_and_never_shorten() {
        let now = Instant::now();
        let mut c = Cooldown::default();
        assert_eq!(c.hit(now, Some(Duration::ZERO)), MIN_COOLDOWN);
        let mut c = Cooldown::default();
        assert_eq!(c.hit(now, Some(Duration::from_secs(3600))), MAX_COOLDOWN);
        let mut c = Cooldown::default();
        c.hit(now, Some(Duration::from_secs(30)));
        c.hit(now, Some(Duration::from_secs(1)));
        assert!(
            c.until(now).unwrap() >= now + Duration::from_secs(30),
            "kept the later deadline"
        );
        assert!(c.active(now));
        assert!(!c.active(now + Duration::from_secs(31)));
    }

    #[test]
    fn retry_after_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("1000000000000", now),
            Some(Duration::from_secs(1_000_000))
        );
        assert_eq!(
            parse_retry_after("100000000000000000000000", now),
            Some(Duration::from_secs(1_000_000)),
            "beyond u64: still long, not ignored"
        );
        assert_eq!(parse_retry_after("+5", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
        // The obsolete forms RFC 9110 still makes a recipient accept.
        for obsolete in ["Sunday, 06-Nov-94 08:50:07 GMT", "Sun Nov  6 08:50:07 1994"] {
            assert_eq!(
                parse_retry_after(obsolete, now),
                Some(Duration::from_secs(30)),
                "{obsolete}"
            );
        }
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 UTC", now),
            None
        );
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-1994 08:50:07 GMT", now),
            None
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(
            parse_retry_after("Sun, 32 Nov 1994 08:49:37 GMT", now),
            None
        );
        let mut h = ureq::http::HeaderMap::new();
        h.insert("retry-after-ms", "1500".parse().unwrap());
        h.insert("retry-after", "9".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        h.remove("retry-after-ms");
        assert_eq!(retry_after(&h), Some(Duration::from_secs(9)));
    }

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 11, 26), 20_783);
    }
}
