//! The four policies in one filter: the separate plugins' glue as stages of one pipeline, in
//! the README's order, so a request pays one set of VM crossings and one read of its headers.
#![doc = include_str!("../README.md")]

/// The sections of the configuration, in the order the stages run.
pub const SECTIONS: [&str; 4] = ["rateLimit", "flagRouter", "idempotency", "cachedFallback"];

#[cfg(all(feature = "host", target_family = "wasm"))]
edge_host::host::main!(
    "rateLimit" => rate_limit::filter::RateLimitRoot,
    "flagRouter" => flag_router::filter::FlagRouterRoot,
    "idempotency" => idempotency::filter::IdempotencyRoot,
    "cachedFallback" => cached_fallback::filter::FallbackRoot,
);
