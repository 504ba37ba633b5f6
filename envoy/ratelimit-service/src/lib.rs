//! A rate limit service for Envoy and the edge bundle's rate-limit plugin:
//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` over gRPC, configured with
//! envoyproxy/ratelimit's YAML and counting fixed windows in Redis.
//!
//! Counting is exact under concurrency: each descriptor is one Lua script in Redis that adds
//! the hits and sets the window's expiry on its first hit, and a request is admitted iff the new
//! count is within the limit. Nothing reads a count and then writes it back, so two replicas of
//! this service (or two calls at once) never admit more than the limit between them. When Redis
//! fails or does not answer within the timeout, the call fails with gRPC `UNAVAILABLE`, which
//! clients treat as the service failing (the plugin's `failureMode` applies).

pub mod config;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use redis::aio::ConnectionManager;
use tonic::{Request, Response, Status};

use config::{Config, Limit, Unit};

/// Adds ARGV[1] hits to the window's counter, gives a new window its expiry (ARGV[2] seconds),
/// and returns the new count: one atomic step per descriptor.
const HIT_SCRIPT: &str = r"
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n == tonumber(ARGV[1]) then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return n
";

/// The gRPC service over one configuration and one Redis.
pub struct Service {
    config: Arc<Config>,
    redis: ConnectionManager,
    script: redis::Script,
    prefix: String,
    warned_domain: AtomicBool,
}

impl Service {
    /// Connects to Redis (`redis://HOST:PORT`); each Redis command gives up after `timeout`.
    pub async fn connect(
        config: Config,
        redis_url: &str,
        timeout: Duration,
    ) -> anyhow::Result<Service> {
        let client = redis::Client::open(redis_url)?;
        let settings = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(0);
        let redis = ConnectionManager::new_with_config(client, settings).await?;
        Ok(Service {
            config: Arc::new(config),
            redis,
            script: redis::Script::new(HIT_SCRIPT),
            prefix: "ratelimit:".to_string(),
            warned_domain: AtomicBool::new(false),
        })
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> RateLimitServiceServer<Service> {
        RateLimitServiceServer::new(self)
    }

    async fn status_of(
        &self,
        descriptor: &RateLimitDescriptor,
        hits: u64,
        now: Duration,
    ) -> Result<DescriptorStatus, Status> {
        let entries: Vec<(String, String)> = descriptor
            .entries
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect();
        let ok = DescriptorStatus {
            code: Code::Ok as i32,
            ..DescriptorStatus::default()
        };
        let (name, requests, unit, shadow) = match self.config.limit_for(&entries) {
            None | Some(Limit::Unlimited { .. }) => return Ok(ok),
            Some(Limit::Counted {
                name,
                requests,
                unit,
                shadow,
            }) => (name, *requests, *unit, *shadow),
        };
        let window = unit.seconds();
        let start = now.as_secs() / window * window;
        let key = self.counter_key(&entries, start);
        let mut conn = self.redis.clone();
        let count: u64 = self
            .script
            .key(&key)
            .arg(hits)
            .arg(window)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| Status::unavailable(format!("redis: {e}")))?;
        let over = count > u64::from(requests);
        let reset = Duration::from_secs(start + window).saturating_sub(now);
        Ok(DescriptorStatus {
            code: if over && !shadow {
                Code::OverLimit
            } else {
                Code::Ok
            } as i32,
            current_limit: Some(RateLimit {
                name: name.clone(),
                requests_per_unit: requests,
                unit: proto_unit(unit) as i32,
            }),
            limit_remaining: u64::from(requests).saturating_sub(count) as u32,
            duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: reset.as_secs() as i64,
                nanos: reset.subsec_nanos() as i32,
            }),
            ..DescriptorStatus::default()
        })
    }

    /// `ratelimit:<domain>_<key>_<value>_..._<window start>`: one counter per descriptor value
    /// and window, shared by every replica that uses this Redis.
    fn counter_key(&self, entries: &[(String, String)], start: u64) -> String {
        let mut key = format!("{}{}_", self.prefix, self.config.domain);
        for (k, v) in entries {
            key.push_str(k);
            key.push('_');
            key.push_str(v);
            key.push('_');
        }
        key.push_str(&start.to_string());
        key
    }
}

fn proto_unit(unit: Unit) -> rate_limit::Unit {
    match unit {
        Unit::Second => rate_limit::Unit::Second,
        Unit::Minute => rate_limit::Unit::Minute,
        Unit::Hour => rate_limit::Unit::Hour,
        Unit::Day => rate_limit::Unit::Day,
        Unit::Week => rate_limit::Unit::Week,
        Unit::Month => rate_limit::Unit::Month,
        Unit::Year => rate_limit::Unit::Year,
    }
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        if request.domain != self.config.domain {
            // As envoyproxy/ratelimit does: a domain without configuration limits nothing. Said
            // once, since it is almost always a typo in the client's configuration.
            if !self.warned_domain.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "ratelimit-service: requests for domain '{}', configured: '{}'; they are not limited",
                    request.domain, self.config.domain
                );
            }
            let ok = DescriptorStatus {
                code: Code::Ok as i32,
                ..DescriptorStatus::default()
            };
            return Ok(Response::new(RateLimitResponse {
                overall_code: Code::Ok as i32,
                statuses: vec![ok; request.descriptors.len()],
                ..RateLimitResponse::default()
            }));
        }
        if request.descriptors.is_empty() {
            return Err(Status::invalid_argument(
                "rate limit descriptor list must not be empty",
            ));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // hits_addend 0 means 1, per the protocol; a descriptor may carry its own.
        let hits = u64::from(request.hits_addend.max(1));
        let mut statuses = Vec::with_capacity(request.descriptors.len());
        for d in &request.descriptors {
            let own = d.hits_addend.map(|h| h.value);
            statuses.push(self.status_of(d, own.unwrap_or(hits), now).await?);
        }
        let over = statuses.iter().any(|s| s.code == Code::OverLimit as i32);
        Ok(Response::new(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            ..RateLimitResponse::default()
        }))
    }
}
