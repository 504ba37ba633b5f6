//! Envoy's rate limit service messages (`envoy.service.ratelimit.v3`, the fields the rate limit
//! plugin sends and reads; the same field numbers as the published protos).
//!
//! A crate of their own so that their code, which prost's derive generates in the crate that
//! defines them, is built for size (`[profile.release.package.rls-proto]` in the workspace's
//! `Cargo.toml`): only a rule with a global part runs it, once per call to the service, whose
//! round trip costs far more than the instructions. The encoder and decoder are instantiated
//! here, by [`encode_request`] and [`decode_response`], for the same reason.

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

use alloc::string::String;
use alloc::vec::Vec;
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

/// `request` as protobuf bytes.
#[inline(never)]
pub fn encode_request(request: &RateLimitRequest) -> Vec<u8> {
    request.encode_to_vec()
}

/// The response in `body`, or prost's error when it is not one.
#[inline(never)]
pub fn decode_response(body: &[u8]) -> Result<RateLimitResponse, prost::DecodeError> {
    RateLimitResponse::decode(body)
}

impl RateLimitRequest {
    /// A sent request's domain and first descriptor's entries, for tests (empty when `bytes`
    /// is not a request).
    pub fn decode_message(bytes: &[u8]) -> (String, Vec<(String, String)>) {
        let r = RateLimitRequest::decode(bytes).unwrap_or_default();
        let entries = r
            .descriptors
            .first()
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.clone()))
                    .collect()
            })
            .unwrap_or_default();
        (r.domain, entries)
    }
}
