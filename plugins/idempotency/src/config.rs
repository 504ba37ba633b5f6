//! The plugin configuration, read and checked once at load; every error names its field.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use edge_core::config::{StatusBounds, Statuses};
use edge_core::key::KeyPart;
use edge_core::route::Route;
use edge_core::{parse_json, ConfigError, Node};

use crate::etcd::EtcdConfig;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Covered requests: any route matches (empty: every path), and the method is listed.
    pub routes: Vec<Route>,
    pub methods: Vec<String>,
    pub header: String,
    pub required: bool,
    pub scope: Vec<KeyPart>,
    pub ttl_ns: u64,
    pub in_flight_timeout_ns: u64,
    pub fingerprint: bool,
    pub max_key_length: usize,
    pub max_body_bytes: u64,
    pub max_entries: u32,
    pub max_total_bytes: u64,
    /// Response bodies one worker holds in copies at once.
    pub max_buffered_bytes: u64,
    /// Statuses whose responses are kept (`storeStatuses`, default 2xx-4xx).
    pub store_statuses: Statuses,
    /// `store.etcd`: records in etcd, shared by every Envoy of a fleet (`None`: this
    /// Envoy's shared data).
    pub store: Option<EtcdConfig>,
    /// What the configuration said that still works but is deprecated, for the log.
    pub warnings: Vec<String>,
}

/// What `storeStatuses` may list: any status.
const STORE_STATUSES: StatusBounds<'static> = StatusBounds {
    lo: 100,
    hi: 599,
    what: "a status",
};

const FIELDS: &[&str] = &[
    "routes",
    "methods",
    "header",
    "required",
    "scope",
    "ttl",
    "inFlightTimeout",
    "fingerprint",
    "maxKeyLength",
    "maxBodyBytes",
    "maxEntries",
    "maxTotalBytes",
    "maxBufferedBytes",
    "storeStatuses",
    "store",
];

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let json = parse_json(bytes)?;
        let o = Node::root(&json).obj(FIELDS)?;
        let methods = o.methods("methods", &["POST", "PATCH"], &[], "")?;
        let scope = if o.has("scope") {
            o.list("scope", KeyPart::read)?
        } else {
            vec![KeyPart::Header("authorization".into())]
        };
        let ttl_ns = o
            .opt("ttl", |n| n.positive_duration_ns())?
            .unwrap_or(DAY_NS);
        let in_flight_timeout_ns = o
            .opt("inFlightTimeout", |n| n.positive_duration_ns())?
            .unwrap_or(30_000_000_000);
        let limits = o.byte_limits(128 << 20)?;
        let store_statuses = o.statuses("storeStatuses", &STORE_STATUSES, |_| None)?;
        let mut warnings = Vec::new();
        warnings.extend(store_statuses.as_ref().and_then(|l| l.deprecated.clone()));
        Ok(Config {
            routes: o.list("routes", Route::read)?,
            methods,
            header: o
                .opt("header", |n| n.header_name())?
                .unwrap_or_else(|| "idempotency-key".into()),
            required: o.opt("required", |n| n.bool())?.unwrap_or(false),
            scope,
            ttl_ns,
            in_flight_timeout_ns,
            fingerprint: o
                .opt("fingerprint", |n| {
                    n.one_of(&[("body", true), ("none", false)])
                })?
                .unwrap_or(true),
            max_key_length: o
                .opt("maxKeyLength", |n| n.u64_in(1, 8192))?
                .map_or(255, |v| usize::try_from(v).unwrap_or(255)),
            max_body_bytes: limits.max_body,
            max_entries: o
                .opt("maxEntries", |n| n.u64_in(1, 1 << 24))?
                .map_or(100_000, |v| u32::try_from(v).unwrap_or(100_000)),
            max_total_bytes: limits.max_total,
            max_buffered_bytes: limits.max_buffered,
            store_statuses: store_statuses
                .map_or_else(|| Statuses(vec![(200, 499)]), |l| l.statuses),
            store: o.opt("store", EtcdConfig::read_store)?.flatten(),
            warnings,
        })
    }
}

const DAY_NS: u64 = 86_400 * 1_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn err(json: &str) -> String {
        Config::parse(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::parse(b"{}").unwrap();
        assert!(c.routes.is_empty());
        assert_eq!(c.methods, ["POST", "PATCH"]);
        assert_eq!(c.header, "idempotency-key");
        assert!(!c.required);
        assert_eq!(c.scope, [KeyPart::Header("authorization".into())]);
        assert_eq!(c.ttl_ns, 86_400_000_000_000);
        assert_eq!(c.in_flight_timeout_ns, 30_000_000_000);
        assert!(c.fingerprint);
        assert_eq!(
            (
                c.max_key_length,
                c.max_body_bytes,
                c.max_entries,
                c.max_total_bytes
            ),
            (255, 1 << 20, 100_000, 128 << 20)
        );
        assert!(c.store_statuses.contains(200) && c.store_statuses.contains(499));
        assert_eq!(c.store, None, "the local store");
        assert!(!c.store_statuses.contains(500) && !c.store_statuses.contains(199));
    }

    #[test]
    fn every_field_is_read_as_written() {
        let c = Config::parse(
            br#"{"routes":[{"pathPrefix":"/payments"}],"methods":["post","PATCH"],
            "header":"Idempotency-Key","required":true,"scope":[{"source":"clientIp"}],
            "ttl":"1h","inFlightTimeout":"5s","fingerprint":"none","maxKeyLength":64,
            "maxBodyBytes":1000,"maxEntries":10,"maxTotalBytes":5000,
            "storeStatuses":["200-204", 409]}"#,
        )
        .unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.methods, ["POST", "PATCH"]);
        assert_eq!(c.header, "idempotency-key");
        assert!(c.required && !c.fingerprint);
        assert_eq!(c.scope, [KeyPart::ClientIp]);
        assert_eq!(
            (c.ttl_ns, c.in_flight_timeout_ns),
            (3_600_000_000_000, 5_000_000_000)
        );
        assert_eq!(c.store_statuses, Statuses(vec![(200, 204), (409, 409)]));
        assert!(c.warnings.is_empty());
        assert_eq!(Config::parse(br#"{"scope":[]}"#).unwrap().scope, []);
    }

    #[test]
    fn store_statuses_as_the_old_string_are_read_with_a_deprecation_warning() {
        let c = Config::parse(br#"{"storeStatuses":"2xx, 409"}"#).unwrap();
        assert_eq!(c.store_statuses, Statuses(vec![(200, 299), (409, 409)]));
        assert_eq!(
            c.warnings,
            [
                "storeStatuses: a string of statuses is deprecated and will be refused in a \
              later release; write a list: [\"2xx\", \"409\"]"
            ]
        );
        let c = Config::parse(br#"{"storeStatuses":["2xx", "409"]}"#).unwrap();
        assert_eq!(c.store_statuses, Statuses(vec![(200, 299), (409, 409)]));
        assert!(c.warnings.is_empty());
        assert!(err(r#"{"storeStatuses":[700]}"#)
            .starts_with("storeStatuses[0]: 700 is not a status (100-599)"));
        assert!(err(r#"{"storeStatuses":["4xx-2xx"]}"#).starts_with("storeStatuses[0]:"));
    }

    #[test]
    fn bad_fields_are_named() {
        assert!(err(r#"{"ttl":"0s"}"#).starts_with("ttl:"));
        assert!(err(r#"{"maxBodyBytes":67108865}"#).starts_with("maxBodyBytes: must be between"));
        assert!(err(r#"{"inFlightTimeout":"soon"}"#).starts_with("inFlightTimeout:"));
        assert!(err(r#"{"fingerprint":"sha1"}"#).starts_with("fingerprint:"));
        assert!(err(r#"{"maxEntries":0}"#).starts_with("maxEntries: must be between"));
        assert!(err(r#"{"storeStatuses":"2xx-1xx"}"#)
            .starts_with("storeStatuses: \"2xx-1xx\" is an empty range"));
        assert!(err(r#"{"storeStatuses":"20x"}"#).starts_with("storeStatuses:"));
        assert!(err(r#"{"storeStatuses":"700"}"#).contains("outside 100-599"));
        assert!(err(r#"{"methods":[]}"#).starts_with("methods:"));
        assert!(err(r#"{"header":"bad header"}"#).starts_with("header:"));
        assert!(err(r#"{"scope":[{"source":"ip"}]}"#).starts_with("scope[0].source"));
        assert!(err(r#"{"routes":[{"prefix":"/x"}]}"#).starts_with("routes[0]"));
        assert!(err(r#"{"ttl":"1h","tll":"1h"}"#).contains("unknown field `tll`"));
        assert!(err("[").starts_with("configuration"), "{}", err("["));
        assert!(err(r#"{"store":{"etcd":{"cluster":""}}}"#).starts_with("store.etcd.cluster:"));
        assert!(err(r#"{"store":"etcd"}"#).starts_with("store: expected an object"));
    }
}
