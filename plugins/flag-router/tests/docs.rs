//! The README is the plugin's reference: its examples are the files in `examples/`, the plugin
//! accepts them (or refuses them with the error the README quotes), and what the README says
//! they mean holds.

use edge_core::ConfigError;
use flag_router::config::Config;

#[cfg(test)]
#[macro_use]
#[path = "../../readme_examples.rs"]
mod readme_examples;

readme_test!(
    Config::parse,
    [("source.", r#"{"headers":{"f":"x-f"},"source":{"zzz":1}}"#)]
);

#[test]
fn the_rollout_example_fetches_the_flag_it_does_not_define() -> Result<(), ConfigError> {
    let c = Config::parse(include_str!("../examples/checkout-rollout.json").as_bytes())?;
    assert!(c.flags.flags.contains_key("new-checkout"));
    assert!(!c.flags.flags.contains_key("search-v2"));
    assert!(c
        .headers
        .contains(&("search-v2".into(), "x-route-search".into())));
    let s = c.source.unwrap();
    assert_eq!(
        (s.authority.as_str(), s.poll_ms(), s.timeout_ms()),
        ("flags.internal", 5_000, 1_000)
    );
    Ok(())
}

#[test]
fn a_source_alone_polls_its_cluster_every_30_s_with_a_5_s_timeout() -> Result<(), ConfigError> {
    let c = Config::parse(include_str!("../examples/fetched-flags.json").as_bytes())?;
    assert!(c.flags.flags.is_empty());
    let s = c.source.unwrap();
    assert_eq!(
        (s.cluster.as_str(), s.authority.as_str(), s.path.as_str()),
        ("flags", "flags", "/flags.json")
    );
    assert_eq!((s.poll_ms(), s.timeout_ms()), (30_000, 5_000));
    Ok(())
}

#[test]
fn the_typed_context_example_nests_and_types_its_attributes() -> Result<(), ConfigError> {
    use edge_core::RequestParts;
    use flag_router::policy::decide;
    let c = Config::parse(include_str!("../examples/typed-context.json").as_bytes())?;
    let route = |age: &str| {
        let req = RequestParts::new("GET", "/")
            .header("x-user-age", age)
            .header("cookie", "beta=true");
        let d = decide(&c, &c.flags, &req, 0);
        (
            d.edits.get("x-route-checkout").map(str::to_string),
            d.type_errors.len(),
        )
    };
    assert_eq!(route("42"), (Some("v2".into()), 0));
    assert_eq!(route("forty"), (Some("v1".into()), 1));
    Ok(())
}

#[test]
fn an_unknown_field_of_a_context_attribute_lists_type() {
    let e = Config::parse(br#"{"headers":{"f":"x-f"},"source":{"cluster":"c","path":"/f"},"context":{"a":{"zzz":1}}}"#)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.starts_with("context.a: unknown field `zzz`") && e.contains("`type`"),
        "{e}"
    );
}
