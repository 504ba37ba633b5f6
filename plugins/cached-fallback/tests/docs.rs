//! The README is the plugin's reference: its examples are the files in `examples/`, the plugin
//! accepts them (or refuses them with the error the README quotes), and what the README says
//! they mean holds.

use cached_fallback::config::{Breaker, Config};
use edge_core::ConfigError;

#[cfg(test)]
#[macro_use]
#[path = "../../readme_examples.rs"]
mod readme_examples;

const SECOND_NS: u64 = 1_000_000_000;
/// The circuit breaker of the full example, and of `{}`.
const FIVE_IN_10_S_OPENS_FOR_30_S: Breaker = Breaker {
    failures: 5,
    window_ns: 10 * SECOND_NS,
    open_ns: 30 * SECOND_NS,
};

readme_test!(
    Config::parse,
    |c| c.warnings,
    [
        ("failOn.", r#"{"failOn":{"zzz":1}}"#),
        ("key.", r#"{"key":{"zzz":1}}"#),
        ("staticFallback.", r#"{"staticFallback":{"zzz":1}}"#),
        ("circuitBreaker.", r#"{"circuitBreaker":{"zzz":1}}"#),
    ]
);

#[test]
fn the_full_example_serves_an_hour_old_answer_or_the_static_503() -> Result<(), ConfigError> {
    let c = Config::parse(include_str!("../examples/recommendations.json").as_bytes())?;
    assert_eq!(c.max_stale_ns, 3_600 * SECOND_NS);
    assert_eq!(c.key.headers, ["accept-language"]);
    assert_eq!(c.static_fallback.map(|s| s.status), Some(503));
    assert_eq!(c.circuit_breaker, Some(FIVE_IN_10_S_OPENS_FOR_30_S));
    Ok(())
}

#[test]
fn an_empty_circuit_breaker_is_on_with_the_documented_defaults() -> Result<(), ConfigError> {
    let c = Config::parse(include_str!("../examples/circuit-defaults.json").as_bytes())?;
    assert_eq!(c.circuit_breaker, Some(FIVE_IN_10_S_OPENS_FOR_30_S));
    assert_eq!(c.methods, ["GET", "HEAD"]);
    // Every 2xx but 206 is kept.
    assert!((200..300).all(|s| c.stores_status(s) == (s != 206)));
    assert!(!c.stores_status(301) && !c.stores_status(404));
    assert_eq!(c.max_stale_ns, 3_600 * SECOND_NS);
    assert_eq!(
        (c.max_entries, c.max_body_bytes, c.max_total_bytes),
        (10_000, 1 << 20, 64 << 20)
    );
    assert_eq!(c.max_buffered_bytes, 32 << 20);
    assert_eq!(c.static_fallback, None);
    Ok(())
}

#[test]
fn a_status_class_keeps_every_status_in_it_but_206() -> Result<(), ConfigError> {
    let c = Config::parse(include_str!("../examples/kept-statuses.json").as_bytes())?;
    assert!((200..300).all(|s| c.stores_status(s) == (s != 206)));
    assert!(c.stores_status(301));
    assert!(!c.stores_status(302) && !c.stores_status(304));
    Ok(())
}
