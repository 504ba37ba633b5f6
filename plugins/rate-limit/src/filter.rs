//! Proxy-wasm glue: reads the request through hostcalls, asks the [`Limiter`], and turns its
//! decision into a local reply or added headers, counters and log lines.

use crate::config::Config;
use crate::policy::{Action as Verdict, Limiter, Outcome};
use edge_common::host::{
    follow_host_log_level, now_ns, plugin_configuration, root_id, send_response,
    set_request_header, set_response_header, HostRequest,
};
use edge_common::shared_data::SharedData;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MetricType};
use std::rc::Rc;

/// Counter ids per rule, in [`Outcome::ALL`] order.
type RuleMetrics = [Option<u32>; 4];

fn slot(o: Outcome) -> usize {
    Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0)
}

#[derive(Default)]
pub struct RateLimitRoot {
    limiter: Option<Rc<Limiter>>,
    metrics: Rc<Vec<RuleMetrics>>,
}

impl Context for RateLimitRoot {}

impl RootContext for RateLimitRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        follow_host_log_level();
        let config = match Config::parse(&plugin_configuration()) {
            Ok(c) => c,
            Err(e) => {
                log::error!("rate-limit: configuration rejected: {e}");
                return false;
            }
        };
        let namespace = format!("rate_limit/{}/", root_id());
        let random = getrandom::u64().unwrap_or(0x243f_6a88_85a3_08d3);
        let (seed, failed) = Limiter::shared_seed(&SharedData, &namespace, random);
        if let Some(e) = failed {
            log::warn!("rate-limit: cannot share the key seed ({e}); using this worker's own");
        }
        let metrics = config
            .rules
            .iter()
            .map(|r| {
                Outcome::ALL.map(|o| {
                    let name = format!("rate_limit.{}.{}", r.name, o.counter());
                    hostcalls::define_metric(MetricType::Counter, &name).ok()
                })
            })
            .collect();
        log::info!(
            "rate-limit: {} rule(s), mode {:?}",
            config.rules.len(),
            config.mode
        );
        self.metrics = Rc::new(metrics);
        self.limiter = Some(Rc::new(Limiter::new(config, &namespace, seed)));
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(RateLimitStream {
            limiter: self.limiter.clone(),
            metrics: self.metrics.clone(),
            response_headers: Vec::new(),
        }))
    }
}

pub struct RateLimitStream {
    limiter: Option<Rc<Limiter>>,
    metrics: Rc<Vec<RuleMetrics>>,
    response_headers: Vec<(String, String)>,
}

impl Context for RateLimitStream {}

impl HttpContext for RateLimitStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(limiter) = self.limiter.clone() else {
            return Action::Continue;
        };
        let d = limiter.check(&HostRequest, now_ns(), &SharedData);
        for r in &d.results {
            if let Some(Some(id)) = self
                .metrics
                .get(r.rule)
                .and_then(|m| m.get(slot(r.outcome)))
            {
                edge_common::host::count(*id, 1);
            }
        }
        for e in &d.errors {
            log::warn!(
                "rate-limit: store failed, failureMode {:?} applies: {e}",
                limiter.config.failure_mode
            );
        }
        if log::log_enabled!(log::Level::Debug) && !d.results.is_empty() {
            let parts: Vec<String> = d
                .results
                .iter()
                .map(|r| {
                    let name = limiter
                        .config
                        .rules
                        .get(r.rule)
                        .map_or("?", |x| x.name.as_str());
                    format!(
                        "{name} key={:016x} {:?} remaining={}{}",
                        r.key,
                        r.outcome,
                        r.remaining,
                        if r.overflow { " (overflow bucket)" } else { "" }
                    )
                })
                .collect();
            log::debug!("rate-limit: {}", parts.join("; "));
        }
        match d.action {
            Verdict::Continue {
                remove_upstream,
                upstream_headers,
                response_headers,
            } => {
                for k in &remove_upstream {
                    set_request_header(k, None);
                }
                for (k, v) in &upstream_headers {
                    set_request_header(k, Some(v.as_bytes()));
                }
                self.response_headers = response_headers;
                Action::Continue
            }
            Verdict::Reply {
                status,
                headers,
                body,
            } => {
                let headers: Vec<(&str, &[u8])> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_bytes()))
                    .collect();
                if send_response(status, &headers, &body) {
                    Action::Pause
                } else {
                    log::warn!("rate-limit: Envoy refused the local reply ({status})");
                    Action::Continue
                }
            }
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        for (k, v) in std::mem::take(&mut self.response_headers) {
            set_response_header(&k, Some(v.as_bytes()));
        }
        Action::Continue
    }
}
