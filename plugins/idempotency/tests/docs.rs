//! The README is the plugin's reference: its examples are the files in `examples/`, the plugin
//! accepts them (or refuses them with the error the README quotes), and what the README says
//! they mean holds.

use edge_core::key::KeyPart;
use edge_core::ConfigError;
use idempotency::config::Config;

#[cfg(test)]
#[macro_use]
#[path = "../../readme_examples.rs"]
mod readme_examples;

const SECOND_NS: u64 = 1_000_000_000;

readme_test!(Config::parse, |c| c.warnings, []);

#[test]
fn the_full_example_requires_a_key_and_replays_for_a_day() -> Result<(), ConfigError> {
    let c = Config::parse(include_str!("../examples/payments.json").as_bytes())?;
    assert!(c.required);
    assert_eq!(c.methods, ["POST", "PATCH"]);
    assert_eq!(c.ttl_ns, 86_400 * SECOND_NS);
    Ok(())
}

#[test]
fn the_demo_config_takes_the_documented_defaults() -> Result<(), ConfigError> {
    let c = Config::parse(include_str!("../examples/required-key.json").as_bytes())?;
    assert_eq!(c.methods, ["POST", "PATCH"]);
    assert_eq!(c.header, "idempotency-key");
    assert_eq!(c.scope, [KeyPart::Header("authorization".into())]);
    assert_eq!(c.ttl_ns, 3_600 * SECOND_NS);
    assert!(c.fingerprint, "a reused key with another body gets 422");
    assert_eq!(c.in_flight_timeout_ns, 30 * SECOND_NS);
    // 2xx to 4xx are kept; a 5xx gives the key back.
    assert!((200..500).all(|s| c.store_statuses.contains(s)));
    assert!(!(500..600).any(|s| c.store_statuses.contains(s)));
    Ok(())
}

#[test]
fn the_old_status_string_is_read_as_the_list_it_stands_for() -> Result<(), ConfigError> {
    let old = Config::parse(include_str!("../examples/status-string.json").as_bytes())?;
    let list =
        Config::parse(br#"{"routes":[{"pathPrefix":"/payments"}],"storeStatuses":["2xx","409"]}"#)?;
    assert_eq!(old.store_statuses, list.store_statuses);
    assert!(old.store_statuses.contains(204) && old.store_statuses.contains(409));
    assert!(!old.store_statuses.contains(404));
    assert!(list.warnings.is_empty());
    Ok(())
}
