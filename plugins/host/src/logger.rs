//! The `log` facade over the raw log import. The SDK's logger unwraps the host's
//! status on every line, so a refused log call would trap the VM mid-request; here a refused
//! line is dropped.

use crate::ffi;
use alloc::string::ToString;

struct HostLogger;

static LOGGER: HostLogger = HostLogger;

/// Installs the logger (once per VM; later calls only keep the level) at `trace`, until
/// [`follow_host_level`] narrows it at configure time.
pub fn init() {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Trace);
}

/// Follows the host's level (Envoy's `wasm` component), so disabled lines cost nothing.
pub fn follow_host_level() {
    if let Some(level) = ffi::log_level() {
        log::set_max_level(match level {
            0 => log::LevelFilter::Trace,
            1 => log::LevelFilter::Debug,
            2 => log::LevelFilter::Info,
            3 => log::LevelFilter::Warn,
            4 => log::LevelFilter::Error,
            _ => log::LevelFilter::Off,
        });
    }
}

impl log::Log for HostLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Trace => 0,
            log::Level::Debug => 1,
            log::Level::Info => 2,
            log::Level::Warn => 3,
            log::Level::Error => 4,
        };
        let _ = ffi::log(level, &record.args().to_string());
    }

    fn flush(&self) {}
}
