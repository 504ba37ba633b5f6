//! Proxy-wasm glue: the root context owns the flags (bootstrap, then each good fetch) and polls
//! the source; each request context evaluates against the flags current when it began.

use crate::config::Config;
use crate::flags::{FlagSet, Reason};
use crate::policy::decide;
use crate::source::{Fetched, Poller};
use edge_common::host::{follow_host_log_level, now_ns, plugin_configuration, HostRequest};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MapType, MetricType};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Counters defined on first use (names come from the flags, bounded by the flag file).
#[derive(Default)]
pub struct Metrics {
    ids: HashMap<String, Option<u32>>,
    /// Flags whose evaluation error was logged at warning level (then at debug: one broken
    /// flag must not flood the log at request rate).
    warned: std::collections::HashSet<String>,
}

/// Stat names keep to characters Envoy's stat tags do not split on.
fn stat_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Metrics {
    fn inc(&mut self, name: &str) {
        let id = *self
            .ids
            .entry(name.to_string())
            .or_insert_with(|| hostcalls::define_metric(MetricType::Counter, name).ok());
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }
}

#[derive(Default)]
pub struct FlagRouterRoot {
    config: Option<Rc<Config>>,
    flags: Rc<FlagSet>,
    poller: Poller,
    in_flight: Option<u32>,
    metrics: Rc<RefCell<Metrics>>,
}

impl FlagRouterRoot {
    fn fetch(&mut self) {
        let Some(source) = self.config.as_ref().and_then(|c| c.source.clone()) else {
            return;
        };
        if self.in_flight.is_some() {
            return;
        }
        let headers = self.poller.request(&source);
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.metrics.borrow_mut().inc("flag_router.source_fetches");
        match hostcalls::dispatch_http_call(&source.cluster, headers, None, vec![], source.timeout)
        {
            Ok(token) => self.in_flight = Some(token),
            Err(status) => {
                self.metrics.borrow_mut().inc("flag_router.source_errors");
                log::warn!(
                    "flag-router: cannot fetch flags from cluster {}: {status:?}; keeping the last good flags",
                    source.cluster
                );
            }
        }
    }
}

impl Context for FlagRouterRoot {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        if self.in_flight != Some(token) {
            return;
        }
        self.in_flight = None;
        let header = |name: &str| {
            hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, name)
                .ok()
                .flatten()
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        let status = header(":status").and_then(|s| s.parse::<u32>().ok());
        let etag = header("etag");
        let body = if body_size > 0 {
            hostcalls::get_buffer(
                proxy_wasm::types::BufferType::HttpCallResponseBody,
                0,
                body_size,
            )
            .ok()
            .flatten()
            .unwrap_or_default()
        } else {
            Vec::new()
        };
        match self.poller.reply(status, etag, &body) {
            Fetched::Updated(set) => {
                log::info!("flag-router: flags updated ({} flags)", set.flags.len());
                self.flags = Rc::new(set);
                self.metrics.borrow_mut().inc("flag_router.source_updates");
            }
            Fetched::NotModified => {}
            Fetched::Failed(why) => {
                self.metrics.borrow_mut().inc("flag_router.source_errors");
                log::warn!("flag-router: flag fetch failed: {why}; keeping the last good flags");
            }
        }
    }
}

impl RootContext for FlagRouterRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        follow_host_log_level();
        let mut config = match Config::parse(&plugin_configuration()) {
            Ok(c) => c,
            Err(e) => {
                log::error!("flag-router: configuration rejected: {e}");
                return false;
            }
        };
        self.flags = Rc::new(std::mem::take(&mut config.flags));
        let poll = config.source.as_ref().map(|s| s.poll_interval);
        self.config = Some(Rc::new(config));
        if let Some(every) = poll {
            let _ = hostcalls::set_tick_period(every);
            self.fetch();
        }
        true
    }

    fn on_tick(&mut self) {
        self.fetch();
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FlagRouterStream {
            config: self.config.clone(),
            flags: self.flags.clone(),
            metrics: self.metrics.clone(),
        }))
    }
}

pub struct FlagRouterStream {
    config: Option<Rc<Config>>,
    flags: Rc<FlagSet>,
    metrics: Rc<RefCell<Metrics>>,
}

impl Context for FlagRouterStream {}

impl HttpContext for FlagRouterStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            return Action::Continue;
        };
        let d = decide(&config, &self.flags, &HostRequest, now_ns() / 1_000_000_000);
        for h in &d.remove {
            self.set_http_request_header(h, None);
        }
        for (h, v) in &d.set {
            self.set_http_request_header(h, Some(v));
        }
        let mut metrics = self.metrics.borrow_mut();
        for e in &d.evaluations {
            let outcome = match (&e.variant, e.reason) {
                (Some(v), _) => format!("variant.{}", stat_part(v)),
                (None, Reason::Disabled) => "disabled".into(),
                (None, Reason::NotFound) => "not_found".into(),
                (None, Reason::Error) => "error".into(),
                (None, _) => "no_default".into(),
            };
            metrics.inc(&format!("flag_router.{}.{outcome}", stat_part(&e.flag)));
            if let Some(err) = &e.error {
                if metrics.warned.insert(e.flag.clone()) {
                    log::warn!("flag-router: flag {} failed to evaluate: {err}", e.flag);
                } else {
                    log::debug!("flag-router: flag {} failed to evaluate: {err}", e.flag);
                }
            }
            log::debug!(
                "flag-router: flag {} variant {} reason {:?}",
                e.flag,
                e.variant.as_deref().unwrap_or("-"),
                e.reason
            );
        }
        Action::Continue
    }
}
