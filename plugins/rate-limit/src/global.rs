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

use std::collections::{HashMap, VecDeque};

use edge_core::key::KeyPart;
use edge_core::RequestView;
use prost::Message;

/// `RateLimitRequest` (envoy.service.ratelimit.v3).
#[derive(Clone, PartialEq, Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

/// `RateLimitDescriptor` (envoy.extensions.common.ratelimit.v3).
#[derive(Clone, PartialEq, Message)]
pub struct RateLimitDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
}

/// `RateLimitDescriptor.Entry`.
#[derive(Clone, PartialEq, Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `RateLimitResponse`, the fields the plugin reads.
#[derive(Clone, PartialEq, Message)]
pub struct RateLimitResponse {
    #[prost(int32, tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
}

/// `RateLimitResponse.DescriptorStatus`.
#[derive(Clone, PartialEq, Message)]
pub struct DescriptorStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<RateLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<ProtoDuration>,
}

/// `RateLimitResponse.RateLimit`.
#[derive(Clone, PartialEq, Message)]
pub struct RateLimit {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(int32, tag = "2")]
    pub unit: i32,
    #[prost(string, tag = "3")]
    pub name: String,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, Message)]
pub struct ProtoDuration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

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
            value: String::from_utf8_lossy(&value).into_owned(),
        });
    }
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors: vec![RateLimitDescriptor { entries }],
        hits_addend: 1,
    }
    .encode_to_vec()
}

/// The service's quota for the descriptor, when it sent one (envoyproxy/ratelimit does;
/// Limitador does not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the window resets, rounded up.
    pub reset_secs: u64,
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

/// The answer in a successful reply's bytes.
pub fn answer(body: &[u8]) -> Result<Answer, Failure> {
    let r = RateLimitResponse::decode(body).map_err(|_| Failure::Malformed)?;
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
        })
    });
    Ok(if r.overall_code == CODE_OVER_LIMIT {
        Answer::Limited(quota)
    } else {
        Answer::Allowed(quota)
    })
}

/// A failed call, by the gRPC status the host reported.
pub fn failure(status: u32, message: &str) -> Failure {
    if status == GRPC_UNAVAILABLE && message == "upstream request timeout" {
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

/// Clients the service has limited, remembered per VM until their window resets, so a limited
/// client costs no call per request. Bounded: past `max` entries the oldest is forgotten (it
/// costs one more call, never a wrong answer).
#[derive(Debug)]
pub struct DenyCache {
    until: HashMap<u64, u64>,
    order: VecDeque<(u64, u64)>,
    max: usize,
}

impl DenyCache {
    pub fn new(max: usize) -> DenyCache {
        DenyCache {
            until: HashMap::new(),
            order: VecDeque::new(),
            max,
        }
    }

    /// The time (ns) until which `key` is limited, if it is at `now`.
    pub fn limited_until(&mut self, key: u64, now_ns: u64) -> Option<u64> {
        match self.until.get(&key) {
            Some(&until) if until > now_ns => Some(until),
            Some(_) => {
                self.until.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Remembers that `key` is limited until `until_ns`.
    pub fn remember(&mut self, key: u64, until_ns: u64) {
        if self.max == 0 {
            return;
        }
        while self.until.len() >= self.max && !self.until.contains_key(&key) {
            let Some((old, at)) = self.order.pop_front() else {
                break;
            };
            // Only the entry this queue slot was written for: a later remember moved it.
            if self.until.get(&old) == Some(&at) {
                self.until.remove(&old);
            }
        }
        if self.until.insert(key, until_ns) == Some(until_ns) {
            return;
        }
        self.order.push_back((key, until_ns));
        // The queue holds stale slots of re-remembered keys; keep it within twice the bound.
        if self.order.len() > self.max.saturating_mul(2) {
            let live = &self.until;
            self.order.retain(|(k, at)| live.get(k) == Some(at));
        }
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(failure(14, "upstream connect error"), Failure::Error);
        assert_eq!(failure(13, ""), Failure::Error);
    }

    #[test]
    fn the_deny_cache_forgets_at_reset_and_stays_bounded() {
        let mut c = DenyCache::new(2);
        c.remember(1, 100);
        assert_eq!(c.limited_until(1, 50), Some(100));
        assert_eq!(c.limited_until(1, 100), None, "reset reached");
        assert!(c.is_empty());
        c.remember(1, 100);
        c.remember(2, 100);
        c.remember(3, 100);
        assert_eq!(c.len(), 2);
        assert_eq!(c.limited_until(1, 0), None, "the oldest was forgotten");
        assert_eq!(c.limited_until(3, 0), Some(100));
        // Re-remembering a key does not let its stale slot evict it later.
        for _ in 0..10 {
            c.remember(3, 200);
        }
        c.remember(4, 100);
        assert_eq!(c.limited_until(3, 0), Some(200));
        assert!(c.order.len() <= 4);
        let mut off = DenyCache::new(0);
        off.remember(1, 100);
        assert_eq!(off.limited_until(1, 0), None);
    }
}
