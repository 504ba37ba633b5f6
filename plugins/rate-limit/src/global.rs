//! The fleet-wide side of a rule: Envoy's rate limit service protocol
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), which envoyproxy/ratelimit,
//! Limitador and `envoy/ratelimit-service` answer. This module is pure: the descriptor a rule
//! sends, the messages (prost, the same field numbers as the published protos), what an answer
//! or a failure means, and the per-VM memory of clients the service has limited.
//!
//! The descriptor of a rule is the rule's name, then its key parts in order: entry `rule` =
//! the rule's name; a header part's entry key is the header's name (`x-api-key`), a cookie
//! part's the cookie's name, `{"source": "clientIp"}` is `client_ip`, `{"source": "path"}` is
//! `path` and `{"source": "method"}` is `method`. An absent part is sent with an empty value,
//! so absent clients share one count, as they share one local bucket.

use alloc::string::String;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use edge_core::key::KeyPart;
use edge_core::{ConfigError, Node, RequestView};
pub use rls_proto::{
    DescriptorStatus, Entry, ProtoDuration, RateLimit, RateLimitDescriptor, RateLimitRequest,
    RateLimitResponse,
};

/// The gRPC method the plugin calls, as `proxy_grpc_call` takes it.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

const CODE_OVER_LIMIT: i32 = 2;
/// gRPC UNAVAILABLE: what Envoy reports for a refused connection and for a callout timeout.
const GRPC_UNAVAILABLE: u32 = 14;

/// The entry key of a key part in the descriptor.
pub fn entry_key(part: &KeyPart) -> &str {
    match part {
        KeyPart::ClientIp => "client_ip",
        KeyPart::Path => "path",
        KeyPart::Method => "method",
        KeyPart::Header(name) | KeyPart::Cookie(name) => name,
    }
}

/// The request a rule sends for `req`: one descriptor, one hit.
pub fn request(domain: &str, rule: &str, parts: &[KeyPart], req: &impl RequestView) -> Vec<u8> {
    let mut entries = Vec::with_capacity(parts.len() + 1);
    entries.push(Entry {
        key: "rule".to_string(),
        value: rule.to_string(),
    });
    for part in parts {
        let value = part.value(req).unwrap_or_default();
        entries.push(Entry {
            key: entry_key(part).to_string(),
            value: edge_core::text::into_text(value),
        });
    }
    rls_proto::encode_request(&RateLimitRequest {
        domain: domain.to_string(),
        descriptors: vec![RateLimitDescriptor { entries }],
        hits_addend: 1,
    })
}

/// The service's quota for the descriptor, when it sent one (envoyproxy/ratelimit does;
/// Limitador does not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the window resets, rounded up.
    pub reset_secs: u64,
    /// The window of `limit`, from its unit (`None` for a unit this plugin does not know).
    pub window_secs: Option<u64>,
}

/// Seconds of a `RateLimitResponse.RateLimit.Unit`.
fn unit_secs(unit: i32) -> Option<u64> {
    Some(match unit {
        1 => 1,
        2 => 60,
        3 => 3_600,
        4 => 86_400,
        5 => 2_592_000,
        6 => 31_536_000,
        7 => 604_800,
        _ => return None,
    })
}

/// What the service said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Allowed(Option<Quota>),
    Limited(Option<Quota>),
}

/// Why there is no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The callout's timeout fired: Envoy reports status 14 "upstream request timeout".
    Timeout,
    /// Any other gRPC error (a refused connection is also 14, without that message).
    Error,
    /// A reply that is not a `RateLimitResponse`.
    Malformed,
}

impl Failure {
    /// For a log line.
    pub fn describe(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Error => "error",
            Failure::Malformed => "malformed answer",
        }
    }
}

/// The answer in a successful reply's bytes.
pub fn answer(body: &[u8]) -> Result<Answer, Failure> {
    let r = rls_proto::decode_response(body).map_err(|_| Failure::Malformed)?;
    let quota = r.statuses.first().and_then(|s| {
        let limit = s.current_limit.as_ref()?;
        let reset = s.duration_until_reset.as_ref().map_or(0, |d| {
            let secs = u64::try_from(d.seconds).unwrap_or(0);
            secs + u64::from(d.nanos > 0)
        });
        Some(Quota {
            limit: limit.requests_per_unit,
            remaining: s.limit_remaining,
            reset_secs: reset,
            window_secs: unit_secs(limit.unit),
        })
    });
    Ok(if r.overall_code == CODE_OVER_LIMIT {
        Answer::Limited(quota)
    } else {
        Answer::Allowed(quota)
    })
}

/// A failed call, by the gRPC status the host reported. Envoy 1.40 words a callout timeout
/// `upstream request timeout{response_timeout}` (its response details appended).
pub fn failure(status: u32, message: &str) -> Failure {
    if status == GRPC_UNAVAILABLE && message.starts_with("upstream request timeout") {
        Failure::Timeout
    } else {
        Failure::Error
    }
}

/// What a rule does while the service fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureMode {
    /// The local bucket alone decides: an outage degrades to per-proxy limits, not to none.
    Local,
    /// Allow.
    Open,
    /// 503.
    Closed,
}

impl FailureMode {
    /// The words of `global.failureMode`.
    pub const WORDS: [(&'static str, FailureMode); 3] = [
        ("local", FailureMode::Local),
        ("open", FailureMode::Open),
        ("closed", FailureMode::Closed),
    ];
}

/// A rule's `global` part: which service decides, and what happens while it fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Global {
    /// The Envoy cluster of the service (HTTP/2).
    pub cluster: String,
    /// The `domain` of every request, as the service's configuration names it.
    pub domain: String,
    pub timeout_ms: u32,
    pub failure_mode: FailureMode,
    /// Limited clients remembered per VM (0: none, every request asks).
    pub deny_cache_size: usize,
}

/// Envoy's own rate limit filter waits 20 ms by default; the edge adds a little for a service
/// one hop away.
pub const DEFAULT_TIMEOUT_MS: u32 = 50;
pub const DEFAULT_DENY_CACHE_SIZE: u64 = 10_000;

impl Global {
    pub fn read(n: Node<'_>) -> Result<Global, ConfigError> {
        let o = n.obj(&[
            "cluster",
            "domain",
            "timeout",
            "failureMode",
            "denyCacheSize",
        ])?;
        let name = |n: Node<'_>| -> Result<String, ConfigError> {
            let s = n.str()?.trim();
            if s.is_empty() {
                Err(n.err("must not be empty"))
            } else {
                Ok(s.to_string())
            }
        };
        let cluster = o.req("cluster", name)?;
        let domain = o.req("domain", name)?;
        let timeout_ms = o
            .opt("timeout", |n| {
                let ns = n.positive_duration_ns()?;
                if !(1_000_000..=10_000_000_000).contains(&ns) {
                    return Err(n.err("must be between 1ms and 10s"));
                }
                Ok(u32::try_from(ns / 1_000_000).unwrap_or(u32::MAX))
            })?
            .unwrap_or(DEFAULT_TIMEOUT_MS);
        let failure_mode = o
            .opt("failureMode", |n| n.one_of(&FailureMode::WORDS))?
            .unwrap_or(FailureMode::Local);
        let deny_cache_size = o
            .opt("denyCacheSize", |n| n.u64_in(0, 1_000_000))?
            .unwrap_or(DEFAULT_DENY_CACHE_SIZE);
        Ok(Global {
            cluster,
            domain,
            timeout_ms,
            failure_mode,
            deny_cache_size: usize::try_from(deny_cache_size).unwrap_or(usize::MAX),
        })
    }
}

/// A client the service limited: until when, and the quota it was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denied {
    pub until_ns: u64,
    pub quota: Option<Quota>,
}

/// Clients the service has limited, remembered per VM until their window resets, so a limited
/// client costs no call per request. Bounded: `max` slots, a key in slot `key % max`; a client
/// that lands on another's slot replaces it, which costs that one a call again, never a wrong
/// answer. The slots are allocated at the first denial.
#[derive(Debug)]
pub struct DenyCache {
    slots: Vec<Option<(u64, Denied)>>,
    max: usize,
}

impl DenyCache {
    pub fn new(max: usize) -> DenyCache {
        DenyCache {
            slots: Vec::new(),
            max,
        }
    }

    fn slot(&self, key: u64) -> usize {
        usize::try_from(key % self.max.max(1) as u64).unwrap_or(0)
    }

    /// Whether `key` is limited at `now_ns`, and what it was told.
    pub fn get(&mut self, key: u64, now_ns: u64) -> Option<Denied> {
        let i = self.slot(key);
        let slot = self.slots.get_mut(i)?;
        match *slot {
            Some((k, d)) if k == key && d.until_ns > now_ns => Some(d),
            Some((k, _)) if k == key => {
                *slot = None;
                None
            }
            _ => None,
        }
    }

    /// Remembers that `key` is limited as `denied` says.
    pub fn remember(&mut self, key: u64, denied: Denied) {
        if self.max == 0 {
            return;
        }
        if self.slots.is_empty() {
            self.slots = vec![None; self.max];
        }
        let i = self.slot(key);
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = Some((key, denied));
        }
    }

    /// Clients remembered now (expired ones included until looked up).
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    struct Req(Vec<(&'static str, &'static str)>);
    impl RequestView for Req {
        fn header(&self, name: &str) -> Option<Vec<u8>> {
            self.0
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_bytes().to_vec())
        }
        fn method(&self) -> Vec<u8> {
            b"GET".to_vec()
        }
        fn raw_path(&self) -> Vec<u8> {
            b"/api/x?y=1".to_vec()
        }
        fn client_ip(&self) -> Option<String> {
            Some("10.0.0.1".into())
        }
    }

    #[test]
    fn the_descriptor_is_the_rule_then_its_key_parts_in_order() {
        let parts = [
            KeyPart::Header("x-api-key".into()),
            KeyPart::ClientIp,
            KeyPart::Path,
            KeyPart::Method,
            KeyPart::Cookie("session".into()),
        ];
        let bytes = request("edge", "per-key", &parts, &Req(vec![("x-api-key", "k1")]));
        let sent = RateLimitRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(sent.domain, "edge");
        assert_eq!(sent.hits_addend, 1);
        let entries: Vec<(&str, &str)> = sent.descriptors[0]
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            entries,
            [
                ("rule", "per-key"),
                ("x-api-key", "k1"),
                ("client_ip", "10.0.0.1"),
                ("path", "/api/x"),
                ("method", "GET"),
                ("session", ""),
            ]
        );
    }

    fn reply(code: i32, status: Option<(u32, u32, i64, i32)>) -> Vec<u8> {
        RateLimitResponse {
            overall_code: code,
            statuses: status
                .map(|(limit, remaining, secs, nanos)| DescriptorStatus {
                    code,
                    current_limit: Some(RateLimit {
                        requests_per_unit: limit,
                        unit: 2,
                        name: String::new(),
                    }),
                    limit_remaining: remaining,
                    duration_until_reset: Some(ProtoDuration {
                        seconds: secs,
                        nanos,
                    }),
                })
                .into_iter()
                .collect(),
        }
        .encode_to_vec()
    }

    #[test]
    fn answers_carry_the_services_quota_when_it_sends_one() {
        let q = |limit, remaining, reset_secs| Quota {
            limit,
            remaining,
            reset_secs,
            window_secs: Some(60),
        };
        assert_eq!(
            answer(&reply(1, Some((100, 42, 30, 0)))),
            Ok(Answer::Allowed(Some(q(100, 42, 30))))
        );
        assert_eq!(
            answer(&reply(2, Some((100, 0, 29, 500)))),
            Ok(Answer::Limited(Some(q(100, 0, 30)))),
            "a part second rounds up"
        );
        assert_eq!(answer(&reply(2, None)), Ok(Answer::Limited(None)));
        assert_eq!(
            answer(&[]),
            Ok(Answer::Allowed(None)),
            "an empty message is OK-less"
        );
        assert_eq!(answer(&[0xff, 0xff, 0xff]), Err(Failure::Malformed));
    }

    #[test]
    fn a_timeout_is_told_apart_from_other_failures() {
        assert_eq!(failure(14, "upstream request timeout"), Failure::Timeout);
        assert_eq!(
            failure(14, "upstream request timeout{response_timeout}"),
            Failure::Timeout,
            "as Envoy 1.40 words it"
        );
        assert_eq!(failure(14, "upstream connect error"), Failure::Error);
        assert_eq!(failure(13, ""), Failure::Error);
    }

    #[test]
    fn the_deny_cache_forgets_at_reset_and_stays_bounded() {
        let until = |until_ns| Denied {
            until_ns,
            quota: None,
        };
        let mut c = DenyCache::new(4);
        assert!(c.slots.is_empty(), "nothing allocated before a denial");
        c.remember(1, until(100));
        assert_eq!(c.get(1, 50), Some(until(100)));
        assert_eq!(c.get(1, 100), None, "reset reached");
        assert!(c.is_empty());
        // However many clients are limited, the cache holds at most its size.
        for k in 0..1_000 {
            c.remember(k, until(100));
        }
        assert_eq!(c.len(), 4);
        assert_eq!(c.slots.len(), 4);
        assert_eq!(c.get(999, 0), Some(until(100)));
        // A client whose slot another took is asked again (no answer), never given theirs.
        assert_eq!(c.get(3, 0), None);
        let mut off = DenyCache::new(0);
        off.remember(1, until(100));
        assert_eq!(off.get(1, 0), None);
    }

    fn global(json: &str) -> Result<Global, ConfigError> {
        let v = edge_core::parse_json(json.as_bytes())?;
        Global::read(Node::root(&v))
    }

    #[test]
    fn the_global_part_has_defaults_and_names_bad_fields() {
        let g = global(r#"{"cluster": "ratelimit", "domain": "edge"}"#).unwrap();
        assert_eq!(
            g,
            Global {
                cluster: "ratelimit".into(),
                domain: "edge".into(),
                timeout_ms: 50,
                failure_mode: FailureMode::Local,
                deny_cache_size: 10_000,
            }
        );
        let g = global(
            r#"{"cluster": "rls", "domain": "d", "timeout": "2s", "failureMode": "closed", "denyCacheSize": 0}"#,
        )
        .unwrap();
        assert_eq!(
            (g.timeout_ms, g.failure_mode, g.deny_cache_size),
            (2000, FailureMode::Closed, 0)
        );
        let err = |json: &str| global(json).unwrap_err().to_string();
        assert!(
            err(r#"{"domain": "d"}"#).starts_with("cluster:"),
            "{}",
            err(r#"{"domain": "d"}"#)
        );
        assert!(err(r#"{"cluster": "c", "domain": " "}"#).starts_with("domain: must not be empty"));
        assert!(err(r#"{"cluster": "c", "domain": "d", "timeout": "20s"}"#)
            .starts_with("timeout: must be between"));
        assert!(
            err(r#"{"cluster": "c", "domain": "d", "failureMode": "deny"}"#)
                .starts_with("failureMode:")
        );
        assert!(err(r#"{"cluster": "c", "domain": "d", "cache": 1}"#).contains("cache"));
    }
}
