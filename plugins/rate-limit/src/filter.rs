//! Proxy-wasm glue: reads the request through hostcalls, asks the [`Limiter`], and turns its
//! decision into a local reply or added headers, counters and log lines.

use crate::config::Config;
use crate::policy::{Action as Verdict, Limiter, Outcome};
use edge_core::headers::HeaderEdits;
use edge_core::throttle::Throttle;
use edge_host::host::{
    answer, edit_request_headers, edit_response_headers, load_config, namespace_and_seed, now_ns,
    warn_throttled, Action, Context, ContextType, Counters, HostRequest, HttpContext, RootContext,
    SharedData,
};
use std::rc::Rc;

/// The counters, and the throttle of this worker's warnings.
#[derive(Default)]
struct Metrics(Counters<Outcome>, Throttle);

#[derive(Default)]
pub struct RateLimitRoot {
    limiter: Option<Rc<Limiter>>,
    metrics: Rc<Metrics>,
}

impl Context for RateLimitRoot {}

impl RootContext for RateLimitRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = load_config("rate-limit", Config::parse) else {
            return false;
        };
        let (namespace, seed) = namespace_and_seed("rate-limit", "rate_limit");
        let metrics = Counters::define_sets(&Limiter::counter_sets(&config));
        log::info!(
            "rate-limit: {} rule(s), mode {:?}",
            config.rules.len(),
            config.mode
        );
        self.metrics = Rc::new(Metrics(metrics, Throttle::default()));
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
            response_headers: HeaderEdits::default(),
        }))
    }
}

pub struct RateLimitStream {
    limiter: Option<Rc<Limiter>>,
    metrics: Rc<Metrics>,
    response_headers: HeaderEdits,
}

impl Context for RateLimitStream {}

impl HttpContext for RateLimitStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(limiter) = self.limiter.clone() else {
            return Action::Continue;
        };
        let d = limiter.check(&HostRequest, now_ns(), &SharedData);
        for r in &d.results {
            self.metrics.0.add_in(r.rule, r.outcome, 1);
        }
        // Store failures come with every request while they last: one line per interval.
        if let Some(e) = d.errors.first() {
            warn_throttled(&self.metrics.1, || {
                format!(
                    "rate-limit: store failed, failureMode {:?} applies: {e}",
                    limiter.config.failure_mode
                )
            });
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
            Verdict::Continue { upstream, response } => {
                if !edit_request_headers(&upstream) {
                    warn_throttled(&self.metrics.1, || {
                        "rate-limit: the host refused a request header edit".into()
                    });
                }
                self.response_headers = response;
                Action::Continue
            }
            // A limited request (or `failureMode: deny`'s 503) never reaches the upstream,
            // even when the host refuses the reply: it is held until Envoy's stream timeout.
            Verdict::Reply(reply) => answer("rate-limit", &reply, Action::Pause),
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        // A refused quota header is not worth a line: the answer itself is unchanged.
        let _ = edit_response_headers(&std::mem::take(&mut self.response_headers));
        Action::Continue
    }
}
