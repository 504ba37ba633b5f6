//! The rate-limit configuration: serde shapes as users write them, validated once into
//! [`Config`] with errors that name the field.

use crate::bucket::Limit;
use edge_common::key::{compile_key, KeyPart, KeyPartSpec};
use edge_common::route::{Route, RouteSpec};
use edge_common::{parse_duration, parse_json, ConfigError};
use serde::Deserialize;

/// The largest `maxKeys`: 16 Mi slots of ~80 bytes is over a GiB of shared memory.
pub const MAX_KEYS_LIMIT: u64 = 1 << 24;
pub const DEFAULT_MAX_KEYS: u64 = 65_536;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigSpec {
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    failure_mode: FailureMode,
    #[serde(default = "yes")]
    response_headers: bool,
    status: Option<u32>,
    rules: Option<Vec<RuleSpec>>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuleSpec {
    name: String,
    #[serde(rename = "match", default)]
    route: RouteSpec,
    #[serde(default)]
    key: Vec<KeyPartSpec>,
    limit: LimitSpec,
    max_keys: Option<u64>,
    status: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LimitSpec {
    requests: u64,
    window: String,
    burst: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    #[default]
    Allow,
    Deny,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    pub failure_mode: FailureMode,
    pub response_headers: bool,
    pub rules: Vec<Rule>,
}

/// A validated rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub route: Route,
    pub key: Vec<KeyPart>,
    pub limit: Limit,
    pub max_keys: u32,
    pub status: u32,
    /// The `w` of `RateLimit-Policy`: the window in whole seconds (at least 1).
    pub window_secs: u64,
}

fn check_status(status: Option<u32>, field: &str, default: u32) -> Result<u32, ConfigError> {
    match status {
        None => Ok(default),
        Some(s) if (400..=599).contains(&s) => Ok(s),
        Some(s) => Err(ConfigError::new(
            field,
            format!("{s} is not an error status (use 400-599)"),
        )),
    }
}

/// Rule names appear in metric names and quoted in RateLimit headers, so they stay simple.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let spec: ConfigSpec = parse_json(bytes)?;
        let status = check_status(spec.status, "status", 429)?;
        let specs = spec
            .rules
            .ok_or_else(|| ConfigError::new("rules", "required: list at least one rule"))?;
        if specs.is_empty() {
            return Err(ConfigError::new("rules", "must list at least one rule"));
        }
        let mut rules: Vec<Rule> = Vec::with_capacity(specs.len());
        for (i, r) in specs.iter().enumerate() {
            let f = format!("rules[{i}]");
            if !valid_name(&r.name) {
                return Err(ConfigError::new(
                    format!("{f}.name"),
                    format!(
                        "\"{}\" must be 1-64 characters of A-Z a-z 0-9 - _ .",
                        r.name
                    ),
                ));
            }
            if rules.iter().any(|x| x.name == r.name) {
                return Err(ConfigError::new(
                    format!("{f}.name"),
                    format!("\"{}\" is used by an earlier rule", r.name),
                ));
            }
            let window = parse_duration(&r.limit.window)
                .map_err(|e| ConfigError::new(format!("{f}.limit.window"), e))?;
            let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
            if window_ns == 0 {
                return Err(ConfigError::new(
                    format!("{f}.limit.window"),
                    "must be longer than 0",
                ));
            }
            if r.limit.requests == 0 {
                return Err(ConfigError::new(
                    format!("{f}.limit.requests"),
                    "must be > 0 (to block a route, use an Envoy route)",
                ));
            }
            let burst = r.limit.burst.unwrap_or(r.limit.requests);
            if burst == 0 {
                return Err(ConfigError::new(format!("{f}.limit.burst"), "must be > 0"));
            }
            let max_keys = r.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
            if max_keys == 0 || max_keys > MAX_KEYS_LIMIT {
                return Err(ConfigError::new(
                    format!("{f}.maxKeys"),
                    format!("{max_keys} is out of range (1-{MAX_KEYS_LIMIT})"),
                ));
            }
            rules.push(Rule {
                name: r.name.clone(),
                route: Route::compile(&r.route, &format!("{f}.match"))?,
                key: compile_key(&r.key, &format!("{f}.key"))?,
                limit: Limit {
                    requests: r.limit.requests,
                    window_ns,
                    burst,
                },
                max_keys: u32::try_from(max_keys).unwrap_or(u32::MAX),
                status: check_status(r.status, &format!("{f}.status"), status)?,
                window_secs: window_ns.div_ceil(1_000_000_000).max(1),
            });
        }
        Ok(Config {
            mode: spec.mode,
            failure_mode: spec.failure_mode,
            response_headers: spec.response_headers,
            rules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{
      "mode": "enforce",
      "failureMode": "allow",
      "responseHeaders": true,
      "rules": [
        {
          "name": "api-per-client",
          "match": { "pathPrefix": "/api/", "methods": ["GET", "POST"], "headers": { "x-tier": "free" } },
          "key": [ { "source": "clientIp" }, { "header": "x-api-key" } ],
          "limit": { "requests": 100, "window": "60s", "burst": 20 },
          "maxKeys": 65536
        }
      ]
    }"#;

    fn err(json: &str) -> String {
        Config::parse(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn the_documented_example_parses_with_its_values() {
        let c = Config::parse(EXAMPLE.as_bytes()).unwrap();
        let r = &c.rules[0];
        assert_eq!(
            r.limit,
            Limit {
                requests: 100,
                window_ns: 60_000_000_000,
                burst: 20
            }
        );
        assert_eq!((r.max_keys, r.status, r.window_secs), (65_536, 429, 60));
        assert_eq!(r.key.len(), 2);
    }

    #[test]
    fn defaults_are_enforce_allow_headers_429_and_burst_equal_to_requests() {
        let c = Config::parse(br#"{"rules":[{"name":"a","limit":{"requests":5,"window":"1s"}}]}"#)
            .unwrap();
        assert_eq!(c.mode, Mode::Enforce);
        assert_eq!(c.failure_mode, FailureMode::Allow);
        assert!(c.response_headers);
        assert_eq!(c.rules[0].limit.burst, 5);
        assert_eq!(c.rules[0].max_keys, 65_536);
        assert!(c.rules[0].key.is_empty());
    }

    #[test]
    fn sub_second_windows_report_at_least_one_second() {
        let c = Config::parse(
            br#"{"rules":[{"name":"a","limit":{"requests":5,"window":"500ms"}},
                          {"name":"b","limit":{"requests":5,"window":"1500ms"}}]}"#,
        )
        .unwrap();
        assert_eq!(c.rules[0].window_secs, 1);
        assert_eq!(c.rules[1].window_secs, 2);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let rule = |body: &str| format!(r#"{{"rules":[{{"name":"a",{body}}}]}}"#);
        assert!(err("{}").starts_with("rules: required"));
        assert!(err(r#"{"rules":[]}"#).starts_with("rules: must list"));
        assert!(err(&rule(r#""limit":{"requests":0,"window":"1s"}"#))
            .starts_with("rules[0].limit.requests:"));
        assert!(err(&rule(r#""limit":{"requests":1,"window":"1"}"#))
            .starts_with("rules[0].limit.window: \"1\" has no unit"));
        assert!(err(&rule(r#""limit":{"requests":1,"window":"0s"}"#))
            .starts_with("rules[0].limit.window:"));
        assert!(
            err(&rule(r#""limit":{"requests":1,"window":"1s","burst":0}"#))
                .starts_with("rules[0].limit.burst:")
        );
        assert!(err(&rule(r#""limit":{"requests":"1","window":"1s"}"#))
            .starts_with("rules[0].limit.requests: invalid type"));
        assert!(
            err(&rule(r#""limit":{"requests":1,"window":"1s"},"maxKeys":0"#))
                .starts_with("rules[0].maxKeys:")
        );
        assert!(err(&rule(
            r#""limit":{"requests":1,"window":"1s"},"key":[{"source":"ip"}]"#
        ))
        .starts_with("rules[0].key[0].source:"));
        assert!(err(&rule(
            r#""limit":{"requests":1,"window":"1s"},"match":{"pathPrefix":"x"}"#
        ))
        .starts_with("rules[0].match.pathPrefix:"));
        assert!(
            err(&rule(r#""limit":{"requests":1,"window":"1s"},"limt":1"#))
                .contains("unknown field `limt`")
        );
        assert!(err(r#"{"mode":"log","rules":[]}"#).starts_with("mode: unknown variant"));
        assert!(err(
            r#"{"status":200,"rules":[{"name":"a","limit":{"requests":1,"window":"1s"}}]}"#
        )
        .starts_with("status: 200 is not an error status"));
        assert!(
            err(r#"{"rules":[{"name":"a b","limit":{"requests":1,"window":"1s"}}]}"#)
                .starts_with("rules[0].name:")
        );
        assert!(err(
            r#"{"rules":[{"name":"a","limit":{"requests":1,"window":"1s"}},
                                 {"name":"a","limit":{"requests":1,"window":"1s"}}]}"#
        )
        .starts_with("rules[1].name: \"a\" is used"));
    }
}
