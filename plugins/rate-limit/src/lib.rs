//! Rate limiting: token buckets per client key, exact across Envoy's worker threads.

pub mod bucket;
