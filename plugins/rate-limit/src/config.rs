//! The rate-limit configuration: serde shapes as users write them, validated once into
//! [`Config`] with errors that name the field.

use crate::bucket::Limit;
use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;
use edge_core::key::KeyPart;
use edge_core::route::Route;
use edge_core::{parse_json, ConfigError, Node};

/// The largest `maxKeys`: 16 Mi slots of ~80 bytes is over a GiB of shared memory.
pub const MAX_KEYS_LIMIT: u64 = 1 << 24;
pub const DEFAULT_MAX_KEYS: u64 = 65_536;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

impl Mode {
    /// The words of `mode`.
    pub const WORDS: [(&'static str, Mode); 2] =
        [("enforce", Mode::Enforce), ("shadow", Mode::Shadow)];
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailureMode {
    #[default]
    Allow,
    Deny,
}

impl FailureMode {
    /// The words of `failureMode`.
    pub const WORDS: [(&'static str, FailureMode); 2] =
        [("allow", FailureMode::Allow), ("deny", FailureMode::Deny)];
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
    /// The fleet-wide part: a rate limit service also decides (`None`: this proxy alone).
    pub global: Option<crate::global::Global>,
}

fn error_status(n: Node<'_>) -> Result<u32, ConfigError> {
    n.status_in(400, 599, "an error status").map(u32::from)
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
        let json = parse_json(bytes)?;
        let root = Node::root(&json);
        let o = root.obj(&["mode", "failureMode", "responseHeaders", "status", "rules"])?;
        let status = o.opt("status", error_status)?.unwrap_or(429);
        let mode = o
            .opt("mode", |n| n.one_of(&Mode::WORDS))?
            .unwrap_or_default();
        let failure_mode = o
            .opt("failureMode", |n| n.one_of(&FailureMode::WORDS))?
            .unwrap_or_default();
        let response_headers = o.opt("responseHeaders", |n| n.bool())?.unwrap_or(true);
        if !o.has("rules") {
            return Err(o.err("rules", "required: list at least one rule"));
        }
        let rules = o.list("rules", |n| read_rule(n, status))?;
        if rules.is_empty() {
            return Err(o.err("rules", "must list at least one rule"));
        }
        for (i, r) in rules.iter().enumerate() {
            if rules.iter().take(i).any(|x| x.name == r.name) {
                return Err(ConfigError::new(
                    format!("rules[{i}].name"),
                    format!("\"{}\" is used by an earlier rule", r.name),
                ));
            }
        }
        Ok(Config {
            mode,
            failure_mode,
            response_headers,
            rules,
        })
    }
}

fn read_rule(n: Node<'_>, default_status: u32) -> Result<Rule, ConfigError> {
    let o = n.obj(&[
        "name", "match", "key", "limit", "maxKeys", "status", "global",
    ])?;
    let name = o.req("name", |n| {
        let s = n.str()?;
        if valid_name(s) {
            Ok(s.to_string())
        } else {
            Err(n.err(format!(
                "\"{s}\" must be 1-64 characters of A-Z a-z 0-9 - _ ."
            )))
        }
    })?;
    let (limit, window_secs) = o.req("limit", |n| {
        let l = n.obj(&["requests", "window", "burst"])?;
        let requests = l.req("requests", |n| {
            let r = n.u64()?;
            if r == 0 {
                Err(n.err("must be > 0 (to block a route, use an Envoy route)"))
            } else {
                Ok(r)
            }
        })?;
        let window_ns = l.req("window", |n| n.positive_duration_ns())?;
        let burst = l
            .opt("burst", |n| match n.u64()? {
                0 => Err(n.err("must be > 0")),
                b => Ok(b),
            })?
            .unwrap_or(requests);

        Ok((
            Limit {
                requests,
                window_ns,
                burst,
            },
            crate::bucket::ceil_secs(window_ns).max(1),
        ))
    })?;
    let max_keys = o
        .opt("maxKeys", |n| n.u64_in(1, MAX_KEYS_LIMIT))?
        .unwrap_or(DEFAULT_MAX_KEYS);
    Ok(Rule {
        name,
        route: o.opt("match", Route::read)?.unwrap_or_default(),
        key: o.list("key", KeyPart::read)?,
        limit,
        max_keys: u32::try_from(max_keys).unwrap_or(u32::MAX),
        status: o.opt("status", error_status)?.unwrap_or(default_status),
        window_secs,
        global: o.opt("global", crate::global::Global::read)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's full example, read from the file the README shows.
    const EXAMPLE: &str = include_str!("../examples/api-per-client.json");

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
        assert_eq!(
            r.key,
            [KeyPart::ClientIp, KeyPart::Header("x-api-key".into())]
        );
        assert_eq!(
            (c.mode, c.failure_mode),
            (Mode::Enforce, FailureMode::Allow)
        );
        // The match: GET or POST under /api/ from the free tier.
        let req = |m: &str, p: &str, tier: &str| {
            edge_core::RequestParts::new(m, p).header("x-tier", tier)
        };
        assert!(r.route.matches(&req("GET", "/api/orders", "free")));
        assert!(!r.route.matches(&req("GET", "/health", "free")));
        assert!(!r.route.matches(&req("DELETE", "/api/orders", "free")));
        assert!(!r.route.matches(&req("GET", "/api/orders", "pro")));
    }

    #[test]
    fn defaults_are_enforce_allow_headers_429_and_burst_equal_to_requests() {
        let c = Config::parse(br#"{"rules":[{"name":"a","limit":{"requests":5,"window":"1s"}}]}"#)
            .unwrap();
        assert_eq!(c.mode, Mode::Enforce);
        assert_eq!(c.failure_mode, FailureMode::Allow);
        assert!(c.response_headers);
        assert_eq!(c.rules[0].status, 429);
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
            .starts_with("rules[0].limit.requests: expected a whole number"));
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
        assert!(err(r#"{"mode":"log","rules":[]}"#).starts_with("mode: unknown value \"log\""));
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
