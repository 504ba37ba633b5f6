//! The four policies in one filter: the separate plugins' glue as stages of one pipeline, in
//! the README's order, so a request pays one set of VM crossings and one read of its headers.
#![doc = include_str!("../README.md")]
#![no_std]

use alloc::string::ToString;
extern crate alloc;
#[cfg(test)]
extern crate std;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
/// The sections of the configuration, in the order the stages run.
pub use edge_core::config::SECTIONS;

#[cfg(target_family = "wasm")]
edge_host::host::main!(
    "rateLimit" => rate_limit::filter::RateLimitRoot,
    "flagRouter" => flag_router::filter::FlagRouterRoot,
    "idempotency" => idempotency::filter::IdempotencyRoot,
    "cachedFallback" => cached_fallback::filter::FallbackRoot,
);

/// Reads a configuration as `edge.wasm` does at load, without a host: each section with its
/// plugin's own parser. The warnings it would log (each with its plugin's prefix), or the
/// error it would log.
pub fn check(config: &[u8]) -> Result<Vec<String>, String> {
    let sections = edge_core::config::split_sections(config, &SECTIONS)?;
    let mut warnings = Vec::new();
    for (section, bytes) in SECTIONS.iter().zip(sections) {
        let Some(bytes) = bytes else { continue };
        let named = |e: edge_core::ConfigError| e.in_section(section).to_string();
        let (plugin, found) = match *section {
            "rateLimit" => (
                "rate-limit",
                rate_limit::config::Config::parse(&bytes)
                    .map(|_| Vec::new())
                    .map_err(named)?,
            ),
            "flagRouter" => (
                "flag-router",
                flag_router::config::Config::parse(&bytes)
                    .map(|_| Vec::new())
                    .map_err(named)?,
            ),
            "idempotency" => (
                "idempotency",
                idempotency::config::Config::parse(&bytes)
                    .map(|c| c.warnings)
                    .map_err(named)?,
            ),
            _ => (
                "cached-fallback",
                cached_fallback::config::Config::parse(&bytes)
                    .map(|c| c.warnings)
                    .map_err(named)?,
            ),
        };
        warnings.extend(found.into_iter().map(|w| format!("{plugin}: {w}")));
    }
    Ok(warnings)
}
