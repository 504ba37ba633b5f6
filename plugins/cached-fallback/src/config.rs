//! The cached-fallback configuration, read through edge-core's path-naming JSON reader and
//! validated once into [`Config`]. Every field is optional; the defaults are the constants
//! below (and the crate's README, its reference).

use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;
use edge_core::config::{StatusBounds, Statuses};
use edge_core::route::Route;
use edge_core::{parse_json, ConfigError, Node};

pub const DEFAULT_METHODS: [&str; 2] = ["GET", "HEAD"];
pub const DEFAULT_FAIL_STATUSES: [u16; 4] = [500, 502, 503, 504];
pub const DEFAULT_MAX_STALE_NS: u64 = 3_600 * 1_000_000_000;
pub const DEFAULT_MAX_ENTRIES: u64 = 10_000;
/// 16 Mi index slots is already a very large shared-data map; more is a typo.
pub const MAX_ENTRIES_LIMIT: u64 = 1 << 24;
pub const DEFAULT_MAX_TOTAL_BYTES: u64 = 64 << 20;
pub const DEFAULT_STATIC_STATUS: u16 = 503;
pub const DEFAULT_CB_FAILURES: u32 = 5;
pub const DEFAULT_CB_WINDOW_NS: u64 = 10_000_000_000;
pub const DEFAULT_CB_OPEN_NS: u64 = 30_000_000_000;

/// What counts as a failure of the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailOn {
    pub statuses: Vec<u16>,
    pub upstream_reset: bool,
    pub timeout: bool,
}

/// What goes into the cache key besides method, host and path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpec {
    /// Request headers (lower-case).
    pub headers: Vec<String>,
    /// Whether the query string is part of the key.
    pub query: bool,
}

/// The answer when no stored response can be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticFallback {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The circuit breaker's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breaker {
    pub failures: u32,
    pub window_ns: u64,
    pub open_ns: u64,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub routes: Vec<Route>,
    pub methods: Vec<String>,
    pub fail_on: FailOn,
    /// Statuses kept; `None` is every 2xx but 206.
    pub store_statuses: Option<Statuses>,
    pub max_stale_ns: u64,
    pub key: KeySpec,
    pub max_entries: u32,
    pub max_body_bytes: u64,
    pub max_total_bytes: u64,
    /// Response bodies one worker holds in copies at once.
    pub max_buffered_bytes: u64,
    pub static_fallback: Option<StaticFallback>,
    /// `None`: no circuit breaker (the default).
    pub circuit_breaker: Option<Breaker>,
    /// What the configuration said that still works but is deprecated, for the log.
    pub warnings: Vec<String>,
}

impl Config {
    /// Whether a response with `status` is kept. A range in `storeStatuses` never keeps 206
    /// or 304, which cannot be listed on their own either.
    pub fn stores_status(&self, status: u16) -> bool {
        match &self.store_statuses {
            Some(list) => list.contains(status) && status != 206 && status != 304,
            None => (200..300).contains(&status) && status != 206,
        }
    }
}

const FIELDS: [&str; 12] = [
    "routes",
    "methods",
    "failOn",
    "storeStatuses",
    "maxStale",
    "key",
    "maxEntries",
    "maxBodyBytes",
    "maxTotalBytes",
    "maxBufferedBytes",
    "staticFallback",
    "circuitBreaker",
];

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let json = parse_json(bytes)?;
        let o = Node::root(&json).obj(&FIELDS)?;
        let routes = o.list("routes", Route::read)?;
        if o.has("routes") && routes.is_empty() {
            return Err(o.err(
                "routes",
                "must list at least one route (omit it to cover every path)",
            ));
        }
        let methods = o.methods(
            "methods",
            &DEFAULT_METHODS,
            &DEFAULT_METHODS,
            "only GET and HEAD responses can be replayed (the key has no request body)",
        )?;
        let fail_on = o
            .opt("failOn", |n| {
                let f = n.obj(&["statuses", "upstreamReset", "timeout"])?;
                Ok(FailOn {
                    statuses: if f.has("statuses") {
                        f.list("statuses", |n| n.status_in(400, 599, "an error status"))?
                    } else {
                        DEFAULT_FAIL_STATUSES.to_vec()
                    },
                    upstream_reset: f.opt("upstreamReset", |n| n.bool())?.unwrap_or(true),
                    timeout: f.opt("timeout", |n| n.bool())?.unwrap_or(true),
                })
            })?
            .unwrap_or(FailOn {
                statuses: DEFAULT_FAIL_STATUSES.to_vec(),
                upstream_reset: true,
                timeout: true,
            });
        let store_statuses = o.statuses("storeStatuses", &STORE_STATUSES, |range| match range {
            (206, 206) => Some("206 cannot be kept: a partial response is not the whole resource"),
            (304, 304) => Some("304 cannot be kept: it has no content to replay"),
            _ => None,
        })?;
        let mut warnings = Vec::new();
        warnings.extend(store_statuses.as_ref().and_then(|l| l.deprecated.clone()));
        let max_stale_ns = o
            .opt("maxStale", |n| n.duration_ns())?
            .unwrap_or(DEFAULT_MAX_STALE_NS);
        let key = o
            .opt("key", |n| {
                let k = n.obj(&["headers", "query"])?;
                Ok(KeySpec {
                    headers: k.list("headers", |n| n.header_name())?,
                    query: k.opt("query", |n| n.bool())?.unwrap_or(true),
                })
            })?
            .unwrap_or(KeySpec {
                headers: Vec::new(),
                query: true,
            });
        let max_entries = o
            .opt("maxEntries", |n| n.u64_in(1, MAX_ENTRIES_LIMIT))?
            .unwrap_or(DEFAULT_MAX_ENTRIES);
        let limits = o.byte_limits(DEFAULT_MAX_TOTAL_BYTES)?;
        let static_fallback = o.opt("staticFallback", |n| {
            let s = n.obj(&["status", "headers", "body"])?;
            Ok(StaticFallback {
                status: s
                    .opt("status", |n| n.status_in(200, 599, "a status"))?
                    .unwrap_or(DEFAULT_STATIC_STATUS),
                headers: s.entries("headers", |k, n| {
                    Ok((n.header_named(k)?, n.str()?.to_string()))
                })?,
                body: s
                    .opt("body", |n| n.str().map(|b| b.as_bytes().to_vec()))?
                    .unwrap_or_default(),
            })
        })?;
        let circuit_breaker = o.opt("circuitBreaker", |n| {
            let c = n.obj(&["failures", "window", "openFor"])?;
            Ok(Breaker {
                failures: c
                    .opt("failures", |n| n.u64_in(1, 1_000_000))?
                    .map_or(DEFAULT_CB_FAILURES, |f| {
                        u32::try_from(f).unwrap_or(u32::MAX)
                    }),
                window_ns: c
                    .opt("window", |n| n.positive_duration_ns())?
                    .unwrap_or(DEFAULT_CB_WINDOW_NS),
                open_ns: c
                    .opt("openFor", |n| n.positive_duration_ns())?
                    .unwrap_or(DEFAULT_CB_OPEN_NS),
            })
        })?;
        Ok(Config {
            routes,
            methods,
            fail_on,
            store_statuses: store_statuses.map(|l| l.statuses),
            max_stale_ns,
            key,
            max_entries: u32::try_from(max_entries).unwrap_or(u32::MAX),
            max_body_bytes: limits.max_body,
            max_total_bytes: limits.max_total,
            max_buffered_bytes: limits.max_buffered,
            static_fallback,
            circuit_breaker,
            warnings,
        })
    }
}

/// What `storeStatuses` may list: successes and redirects (not 206 or 304 on their own).
const STORE_STATUSES: StatusBounds<'static> = StatusBounds {
    lo: 200,
    hi: 399,
    what: "a success status",
};

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// The README's full example, read from the file the README shows.
    pub const EXAMPLE: &str = include_str!("../examples/recommendations.json");

    fn err(json: &str) -> String {
        Config::parse(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn the_documented_example_parses_with_its_values() {
        let c = Config::parse(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.methods, ["GET", "HEAD"]);
        assert_eq!(c.fail_on.statuses, [500, 502, 503, 504]);
        assert_eq!(c.max_stale_ns, 3_600_000_000_000);
        assert_eq!(c.key.headers, ["accept-language"]);
        assert_eq!(
            (c.max_entries, c.max_body_bytes, c.max_total_bytes),
            (10_000, 1 << 20, 64 << 20)
        );
        let s = c.static_fallback.unwrap();
        assert_eq!(s.status, 503);
        assert_eq!(
            s.headers,
            [("content-type".to_string(), "application/json".to_string())]
        );
        assert_eq!(
            c.circuit_breaker,
            Some(Breaker {
                failures: 5,
                window_ns: 10_000_000_000,
                open_ns: 30_000_000_000
            })
        );
    }

    #[test]
    fn an_empty_config_has_the_documented_defaults() {
        let c = Config::parse(b"{}").unwrap();
        assert!(c.routes.is_empty());
        assert_eq!(c.methods, ["GET", "HEAD"]);
        assert_eq!(
            c.fail_on,
            FailOn {
                statuses: vec![500, 502, 503, 504],
                upstream_reset: true,
                timeout: true
            }
        );
        assert_eq!(c.max_stale_ns, DEFAULT_MAX_STALE_NS);
        assert_eq!(
            c.key,
            KeySpec {
                headers: vec![],
                query: true
            }
        );
        assert_eq!(c.max_entries, 10_000);
        assert_eq!((c.max_body_bytes, c.max_total_bytes), (1 << 20, 64 << 20));
        assert_eq!(c.static_fallback, None);
        assert_eq!(c.circuit_breaker, None);
        assert!(c.stores_status(200) && c.stores_status(204) && !c.stores_status(206));
        assert!(!c.stores_status(301) && !c.stores_status(404));
        let c = Config::parse(br#"{"circuitBreaker":{},"staticFallback":{}}"#).unwrap();
        assert_eq!(
            c.circuit_breaker,
            Some(Breaker {
                failures: 5,
                window_ns: DEFAULT_CB_WINDOW_NS,
                open_ns: DEFAULT_CB_OPEN_NS
            })
        );
        assert_eq!(
            c.static_fallback,
            Some(StaticFallback {
                status: 503,
                headers: vec![],
                body: vec![]
            })
        );
        // A small byte budget caps the default body size.
        let c = Config::parse(br#"{"maxTotalBytes":1000}"#).unwrap();
        assert_eq!(c.max_body_bytes, 1000);
        let c = Config::parse(br#"{"storeStatuses":[200,301]}"#).unwrap();
        assert!(c.stores_status(301) && !c.stores_status(204));
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn store_statuses_take_ranges_and_the_old_string_form_with_a_warning() {
        let c = Config::parse(br#"{"storeStatuses":["2xx", 301, "307-308"]}"#).unwrap();
        assert!(c.stores_status(200) && c.stores_status(299) && c.stores_status(308));
        // A range keeps no partial answer; what is not listed is not kept.
        assert!(!c.stores_status(206) && !c.stores_status(302));
        assert!(c.warnings.is_empty());
        let c = Config::parse(br#"{"storeStatuses":"200-204, 301"}"#).unwrap();
        assert!(c.stores_status(204) && c.stores_status(301) && !c.stores_status(205));
        assert_eq!(
            c.warnings,
            [
                "storeStatuses: a string of statuses is deprecated and will be refused in a \
              later release; write a list: [\"200-204\", \"301\"]"
            ]
        );
        assert!(err(r#"{"storeStatuses":"200, 206"}"#).starts_with("storeStatuses: 206 cannot"));
        assert!(err(r#"{"storeStatuses":["3xx-2xx"]}"#)
            .starts_with("storeStatuses[0]: \"3xx-2xx\" is an empty range"));
    }

    #[test]
    fn bad_configs_name_the_field() {
        assert!(err(r#"{"routes":[]}"#).starts_with("routes: must list"));
        assert!(
            err(r#"{"maxTotalBytes":1000000000,"maxBodyBytes":67108865}"#)
                .starts_with("maxBodyBytes: must be between 1 and 67108864")
        );
        assert!(err(r#"{"routes":[{"pathPrefix":"api"}]}"#).starts_with("routes[0].pathPrefix:"));
        assert!(err(r#"{"methods":["POST"]}"#).starts_with("methods[0]: \"POST\" cannot"));
        assert!(err(r#"{"methods":[]}"#).starts_with("methods: must list"));
        assert!(err(r#"{"failOn":{"statuses":[200]}}"#)
            .starts_with("failOn.statuses[0]: 200 is not an error status"));
        assert!(err(r#"{"failOn":{"timeout":"yes"}}"#).starts_with("failOn.timeout: expected"));
        assert!(err(r#"{"failOn":{"reset":true}}"#).contains("unknown field `reset`"));
        assert!(err(r#"{"storeStatuses":[200,206]}"#).starts_with("storeStatuses[1]: 206"));
        assert!(err(r#"{"storeStatuses":[500]}"#).starts_with("storeStatuses[0]: 500 is not"));
        assert!(err(r#"{"storeStatuses":[]}"#).starts_with("storeStatuses: must list"));
        assert!(err(r#"{"maxStale":"1"}"#).starts_with("maxStale: \"1\" has no unit"));
        assert!(err(r#"{"key":{"headers":["a b"]}}"#).starts_with("key.headers[0]:"));
        assert!(err(r#"{"key":{"cookies":[]}}"#).starts_with("key: unknown field `cookies`"));
        assert!(err(r#"{"maxEntries":0}"#).starts_with("maxEntries: must be between 1 and"));
        assert!(err(r#"{"maxTotalBytes":0}"#).starts_with("maxTotalBytes:"));
        assert!(err(r#"{"maxTotalBytes":100,"maxBodyBytes":101}"#)
            .starts_with("maxBodyBytes: must be between 1 and 100"));
        assert!(err(r#"{"staticFallback":{"status":99}}"#).starts_with("staticFallback.status:"));
        assert!(err(r#"{"staticFallback":{"headers":{"a b":"x"}}}"#)
            .starts_with("staticFallback.headers.a b:"));
        assert!(err(r#"{"staticFallback":{"body":1}}"#).starts_with("staticFallback.body:"));
        assert!(err(r#"{"circuitBreaker":{"failures":0}}"#)
            .starts_with("circuitBreaker.failures: must be between 1 and"));
        assert!(err(r#"{"circuitBreaker":{"window":"0s"}}"#)
            .starts_with("circuitBreaker.window: must be longer than 0"));
        assert!(err(r#"{"circuitBreaker":{"openFor":"5"}}"#).starts_with("circuitBreaker.openFor:"));
        assert!(err(r#"{"maxstale":"1h"}"#).contains("unknown field `maxstale`"));
        assert!(err("").starts_with("configuration: missing"));
    }
}
