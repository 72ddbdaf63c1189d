//! Process logging to stderr, with the upstream HTTP and TLS libraries capped
//! at `debug`: at `trace`, `ureq_proto` hex-dumps raw requests with their
//! `Authorization` header, and no log level may ever print a whole pool key.

use log::LevelFilter;
use simple_logger::SimpleLogger;

/// Modules whose trace output would contain secrets.
const CAPPED: &[&str] = &["ureq", "ureq_proto", "rustls"];

/// Install the logger at `level`; a second call is ignored.
pub fn init(level: LevelFilter) {
    let capped = level.min(LevelFilter::Debug);
    let mut logger = SimpleLogger::new().with_level(level).with_utc_timestamps();
    for module in CAPPED {
        logger = logger.with_module_level(module, capped);
    }
    let _ = logger.init();
}
