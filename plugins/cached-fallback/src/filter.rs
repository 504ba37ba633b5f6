//! Proxy-wasm glue: captures the covered request, asks the [`Fallback`] policy at request time
//! (circuit) and at response time (failure or storable), copies a storable body chunk by chunk
//! as it streams (never pausing it), keeps it once the stream has ended, and counts.

use crate::config::Config;
use crate::policy::{
    Answer, Counter, Covered, Fallback, Pending, RequestAction, ResponseAction, Served,
};
use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::vec::Vec;
use edge_core::problem::Reply;
use edge_core::request::RequestParts;
use edge_core::throttle::Throttle;
use edge_core::StoreError;
use edge_host::host::{
    answer, load_config, namespace_and_seed, now_ns, property, request_headers,
    response_body_chunk, response_status_and_headers, warn_throttled, Action, Context, Counters,
    HostRequest, HttpContext, RootContext, SharedData,
};

/// The counters, and the throttle of this worker's warnings.
#[derive(Default)]
struct Metrics(Counters<Counter>, Throttle);

impl Metrics {
    fn define() -> Metrics {
        Metrics(Counters::define("cached_fallback"), Throttle::default())
    }

    /// Store failures come with every request while they last: one line per interval.
    fn warn(&self, errors: &[StoreError]) {
        if let Some(e) = errors.first() {
            warn_throttled(&self.1, || {
                format!("cached-fallback: shared state unavailable, acting as if empty: {e}")
            });
        }
    }

    fn add(&self, c: Counter) {
        self.0.add(c, 1);
    }

    fn served(&self, s: Served) {
        if let Some(c) = s.counter() {
            self.add(c);
        }
    }
}

#[derive(Default)]
pub struct FallbackRoot {
    policy: Option<Rc<Fallback>>,
    metrics: Rc<Metrics>,
}

impl Context for FallbackRoot {}

impl RootContext for FallbackRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = load_config("cached-fallback", Config::parse) else {
            return false;
        };
        for w in &config.warnings {
            log::warn!("cached-fallback: {w}");
        }
        let (namespace, seed) = namespace_and_seed("cached-fallback", "cached_fallback");
        log::info!(
            "cached-fallback: {} route(s), {} entries, {} bytes, circuit breaker {}",
            config.routes.len(),
            config.max_entries,
            config.max_total_bytes,
            if config.circuit_breaker.is_some() {
                "on"
            } else {
                "off"
            }
        );
        self.metrics = Rc::new(Metrics::define());
        self.policy = Some(Rc::new(Fallback::new(config, &namespace, seed)));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FallbackStream {
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
            request: None,
            base: 0,
            probe: None,
            answered: false,
            pending: None,
        }))
    }
}

pub struct FallbackStream {
    policy: Option<Rc<Fallback>>,
    metrics: Rc<Metrics>,
    /// The covered request as captured (request headers cannot be read later).
    request: Option<RequestParts>,
    base: u64,
    /// This stream is the circuit's half-open probe and has not reported yet.
    probe: Option<u64>,
    /// This plugin answered; later callbacks see its own reply.
    answered: bool,
    /// The response being copied.
    pending: Option<Box<Pending>>,
}

impl Context for FallbackStream {}

impl FallbackStream {
    /// Answers with `r`; when Envoy refuses the reply (logged) the stream goes on untouched:
    /// the upstream's own answer is still better than none.
    fn reply(&mut self, r: &Reply) -> Action {
        let action = answer("cached-fallback", r, Action::Continue);
        self.answered = action == Action::Pause;
        action
    }
}

/// The request as plain data: every header, pseudo-headers included. The method and path
/// are read from `:method` and `:path` among them (`RequestParts` prefers those), so the
/// text fields stay empty rather than hold a second copy.
fn capture() -> RequestParts {
    RequestParts {
        headers: request_headers(),
        ..RequestParts::default()
    }
}

impl HttpContext for FallbackStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        // The path, method, key headers and the captured request: one read of the headers.
        let _once = edge_host::host::read_request_once();
        if !policy.covers(&HostRequest) {
            return Action::Continue;
        }
        let req = capture();
        self.base = policy.base_key(&req);
        let at = Covered {
            req: &req,
            base: self.base,
        };
        let d = policy.on_request(at, now_ns(), &SharedData);
        self.metrics.warn(&d.errors);
        self.request = Some(req);
        match d.action {
            RequestAction::Forward { probe } => {
                if probe.is_some() {
                    log::debug!("cached-fallback: circuit half-open, probing the upstream");
                }
                self.probe = probe;
                Action::Continue
            }
            RequestAction::Answer { reply, served } => {
                self.metrics.add(Counter::CircuitShortCircuited);
                self.metrics.served(served);
                self.reply(&reply)
            }
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let (Some(policy), Some(req)) = (self.policy.clone(), self.request.as_ref()) else {
            return Action::Continue;
        };
        if self.answered {
            return Action::Continue;
        }
        let (Some(status), all) = response_status_and_headers() else {
            return Action::Continue;
        };
        let details = property(&["response", "code_details"]);
        let headers = if policy.wants_headers(status, details.as_deref()) {
            all
        } else {
            Vec::new()
        };
        let now = now_ns();
        let at = Covered {
            req,
            base: self.base,
        };
        let answer = Answer {
            status,
            details: details.as_deref(),
            headers,
        };
        let d = policy.on_response(at, self.probe, answer, now, &SharedData);
        self.metrics.warn(&d.errors);
        if d.settled {
            self.probe = None;
        }
        if d.circuit_opened {
            log::info!("cached-fallback: circuit opened");
            self.metrics.add(Counter::CircuitOpened);
        }
        match d.action {
            ResponseAction::Replace { reply, served } => {
                log::debug!(
                    "cached-fallback: replaced a failed answer ({status}, {})",
                    details.as_deref().unwrap_or("-")
                );
                self.metrics.served(served);
                return self.reply(&reply);
            }
            ResponseAction::PassThrough => self.metrics.add(Counter::PassedThrough),
            ResponseAction::Collect(mut p) => {
                if end_of_stream {
                    p.copy.end();
                }
                self.pending = Some(p);
            }
            ResponseAction::Skipped(why) => {
                log::debug!("cached-fallback: not kept: {}", why.reason());
                self.metrics.add(Counter::StoreSkipped);
            }
            ResponseAction::Ignore => {}
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(p) = self.pending.as_mut() {
            if let Some(why) = p
                .copy
                .body(body_size, end_of_stream, || response_body_chunk(body_size))
            {
                log::debug!("cached-fallback: not kept: {}", why.reason());
                self.pending = None;
                self.metrics.add(Counter::StoreSkipped);
            }
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        if let Some(p) = self.pending.as_mut() {
            p.copy.end();
        }
        Action::Continue
    }

    /// After the client has the whole response: keep it (the shared-data writes never delay
    /// it), and hand back a probe that never reported.
    fn on_log(&mut self) {
        let Some(policy) = self.policy.clone() else {
            return;
        };
        if self.probe.is_none() && self.pending.is_none() {
            return;
        }
        // A copy is kept as of its receipt (the policy's): only a probe's hand-back reads the
        // clock again.
        if let Some(token) = self.probe.take() {
            if let Err(e) = policy.abandon_probe(token, now_ns(), &SharedData) {
                self.metrics.warn(&[e]);
            }
        }
        let Some(p) = self.pending.take() else {
            return;
        };
        match policy.store(*p, &SharedData) {
            Ok(true) => self.metrics.add(Counter::Stored),
            Ok(false) => self.metrics.add(Counter::StoreSkipped),
            Err(e) => {
                self.metrics.warn(&[e]);
                self.metrics.add(Counter::StoreSkipped);
            }
        }
    }
}
