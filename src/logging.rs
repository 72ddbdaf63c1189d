//! Process logging to stderr, with the upstream HTTP and TLS libraries capped
//! at `debug`: at `trace`, `ureq_proto` hex-dumps raw requests with their
//! `Authorization` header, and no log level may ever print a whole pool key.
//! Their `debug` comes only with `LOG_LEVEL=trace`: they write eleven lines
//! per proxied request there, which at `debug`, the default level, had cut
//! throughput to less than half (14k against 32k requests/s at 16
//! connections) and buried the balancer's own lines.
//!
//! A failed write to stderr never reaches the caller. simple_logger writes
//! with `eprintln!`, which panics when the write fails: the reader of a pipe
//! went away (`2>&1 | tee`, a log shipper restarted) or the disk of a log
//! file is full. Every thread logs (workers, the acceptor), so each such
//! panic killed a thread, and within a few requests the process stopped
//! answering while staying alive. [`Guarded`] catches that panic, drops the
//! line, and skips logging for [`BROKEN_PAUSE`] before trying stderr again,
//! so a stderr that stays broken costs one caught panic a second.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use log::{LevelFilter, Log, Metadata, Record};
use simple_logger::SimpleLogger;

/// Modules whose trace output would contain secrets.
const CAPPED: &[&str] = &["ureq", "ureq_proto", "rustls"];

/// How long logging is skipped after a write to stderr failed.
pub const BROKEN_PAUSE: Duration = Duration::from_secs(1);

/// Install the logger at `level`; a second call is ignored.
pub fn init(level: LevelFilter) {
    let capped = library_level(level);
    let mut logger = SimpleLogger::new().with_level(level).with_utc_timestamps();
    for module in CAPPED {
        logger = logger.with_module_level(module, capped);
    }
    let max = logger.max_level();
    if log::set_boxed_logger(Box::new(Guarded::new(logger))).is_ok() {
        log::set_max_level(max);
    }
}

/// The level of the [`CAPPED`] libraries when the process logs at `level`:
/// never their `trace`, and their `debug` only when everything is wanted.
fn library_level(level: LevelFilter) -> LevelFilter {
    if level >= LevelFilter::Trace {
        LevelFilter::Debug
    } else {
        level.min(LevelFilter::Info)
    }
}

/// A logger whose failures to write are dropped lines, never panics.
pub struct Guarded<L> {
    inner: L,
    /// Milliseconds after [`epoch`] before which nothing is written (0: none).
    paused_until: AtomicU64,
}

impl<L: Log> Guarded<L> {
    /// Guard `inner`.
    pub fn new(inner: L) -> Self {
        Guarded {
            inner,
            paused_until: AtomicU64::new(0),
        }
    }
}

/// A fixed instant to count pause deadlines from, so they fit in an atomic.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl<L: Log> Log for Guarded<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        if now_ms() < self.paused_until.load(Ordering::Relaxed) {
            return;
        }
        if catch_unwind(AssertUnwindSafe(|| self.inner.log(record))).is_err() {
            let until = now_ms().saturating_add(BROKEN_PAUSE.as_millis() as u64);
            self.paused_until.store(until, Ordering::Relaxed);
        }
    }

    fn flush(&self) {
        let _ = catch_unwind(AssertUnwindSafe(|| self.inner.flush()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Panics on every line, as `eprintln!` does on a broken stderr.
    struct Broken(AtomicUsize);

    impl Log for Broken {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn log(&self, _: &Record<'_>) {
            self.0.fetch_add(1, Ordering::Relaxed);
            panic!("failed printing to stderr: Broken pipe (os error 32)");
        }
        fn flush(&self) {}
    }

    #[test]
    fn libraries_log_their_debug_only_at_trace_and_never_their_trace() {
        use LevelFilter as L;
        let cases = [
            (L::Off, L::Off),
            (L::Error, L::Error),
            (L::Warn, L::Warn),
            (L::Info, L::Info),
            (L::Debug, L::Info),
            (L::Trace, L::Debug),
        ];
        for (process, library) in cases {
            assert_eq!(library_level(process), library, "at {process}");
        }
    }

    #[test]
    fn a_panicking_write_is_dropped_and_pauses_logging() {
        let guarded = Guarded::new(Broken(AtomicUsize::new(0)));
        let record = Record::builder()
            .args(format_args!("a line"))
            .level(log::Level::Info)
            .build();
        for _ in 0..100 {
            guarded.log(&record);
        }
        // Tried once, then paused: one panic, not one per line.
        assert_eq!(guarded.inner.0.load(Ordering::Relaxed), 1);
    }
}
