//! The README is the plugin's reference: its examples are the files in `examples/`, the plugin
//! accepts them (or refuses them with the error the README quotes), and what the README says
//! they mean holds.

use edge_core::key::KeyPart;
use edge_core::ConfigError;
use edge_core::RequestParts;
use rate_limit::config::{Config, Mode};

#[cfg(test)]
#[macro_use]
#[path = "../../readme_examples.rs"]
mod readme_examples;

readme_test!(
    Config::parse,
    [
        ("rules[].", r#"{"rules":[{"zzz":1}]}"#),
        (
            "rules[].limit.",
            r#"{"rules":[{"name":"a","limit":{"zzz":1}}]}"#
        ),
        (
            "rules[].global.",
            r#"{"rules":[{"name":"a","limit":{"requests":1,"window":"1s"},"global":{"zzz":1}}]}"#
        ),
    ]
);

#[test]
fn the_full_example_limits_free_tier_api_calls_per_client_and_key() -> Result<(), ConfigError> {
    let c = Config::parse(include_str!("../examples/api-per-client.json").as_bytes())?;
    let rule = &c.rules[0];
    let request = |method: &str, path: &str, tier: &str| {
        RequestParts::new(method, path).header("x-tier", tier)
    };
    assert!(rule.route.matches(&request("GET", "/api/orders", "free")));
    assert!(rule.route.matches(&request("POST", "/api/orders", "free")));
    assert!(!rule
        .route
        .matches(&request("DELETE", "/api/orders", "free")));
    assert!(!rule.route.matches(&request("GET", "/api/orders", "pro")));
    assert!(!rule.route.matches(&request("GET", "/health", "free")));
    assert_eq!(
        rule.key,
        [KeyPart::ClientIp, KeyPart::Header("x-api-key".into())]
    );
    // 20 at once, refilled at 100 a minute.
    assert_eq!((rule.limit.burst, rule.limit.requests), (20, 100));
    assert_eq!(rule.limit.window_ns, 60_000_000_000);
    Ok(())
}

#[test]
fn the_minimal_example_takes_the_documented_defaults() -> Result<(), ConfigError> {
    let c = Config::parse(include_str!("../examples/per-client-ip.json").as_bytes())?;
    let rule = &c.rules[0];
    // Without `burst`: 10 at once, then one a second.
    assert_eq!(rule.limit.burst, rule.limit.requests);
    assert_eq!(rule.limit.window_ns / rule.limit.requests, 1_000_000_000);
    assert_eq!((rule.status, rule.max_keys), (429, 65_536));
    assert!(c.response_headers);
    assert_eq!(c.mode, Mode::Enforce);
    Ok(())
}
