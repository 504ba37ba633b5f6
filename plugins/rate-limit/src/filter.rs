//! Proxy-wasm glue: reads the request through hostcalls, asks the [`Limiter`], and turns its
//! decision into a local reply or added headers, counters and log lines.

use crate::config::Config;
use crate::global::{self, DenyCache, Failure};
use crate::policy::{
    Action as Verdict, Ask, GlobalAnswer, GlobalOutcome, Limiter, Outcome, Pending,
};
use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::time::Duration;
use edge_core::headers::HeaderEdits;
use edge_core::throttle::Throttle;
use edge_host::host::{
    answer, edit_request_headers, edit_response_headers, grpc_call, grpc_response, grpc_status,
    load_config, namespace_and_seed, now_ns, resume_request, warn_throttled, Action, Context,
    Counters, HostRequest, HttpContext, RootContext, SharedData,
};

/// The counters, and the throttle of this worker's warnings.
#[derive(Default)]
struct Metrics(Counters<Outcome>, Throttle, Counters<GlobalOutcome>);

#[derive(Default)]
pub struct RateLimitRoot {
    limiter: Option<Rc<Limiter>>,
    metrics: Rc<Metrics>,
    /// Per rule, the clients the rate limit service limited (this VM's memory of them).
    denied: Rc<RefCell<Vec<DenyCache>>>,
}

/// A request waiting for the rate limit service.
struct Waiting {
    pending: Pending,
    answers: Vec<Option<GlobalAnswer>>,
    /// (gRPC token, index of its check).
    calls: Vec<(u32, usize)>,
    /// The last failed call's gRPC status and message, for the warning.
    failure: Option<(u32, String)>,
}

impl Context for RateLimitRoot {}

impl RootContext for RateLimitRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = load_config("rate-limit", Config::parse) else {
            return false;
        };
        let (namespace, seed) = namespace_and_seed("rate-limit", "rate_limit");
        let metrics = Counters::define_sets(&Limiter::counter_sets(&config));
        let global_metrics = Counters::define_sets(&Limiter::global_counter_sets(&config));
        let caches = config
            .rules
            .iter()
            .map(|r| DenyCache::new(r.global.as_ref().map_or(0, |g| g.deny_cache_size)))
            .collect();
        log::info!(
            "rate-limit: {} rule(s), mode {:?}",
            config.rules.len(),
            config.mode
        );
        self.metrics = Rc::new(Metrics(metrics, Throttle::default(), global_metrics));
        self.denied = Rc::new(RefCell::new(caches));
        self.limiter = Some(Rc::new(Limiter::new(config, &namespace, seed)));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(RateLimitStream {
            limiter: self.limiter.clone(),
            metrics: self.metrics.clone(),
            denied: self.denied.clone(),
            response_headers: HeaderEdits::default(),
            waiting: None,
        }))
    }
}

pub struct RateLimitStream {
    limiter: Option<Rc<Limiter>>,
    metrics: Rc<Metrics>,
    denied: Rc<RefCell<Vec<DenyCache>>>,
    response_headers: HeaderEdits,
    waiting: Option<Waiting>,
}

impl RateLimitStream {
    /// Acts on what the filter decided: forward with the edits, or answer. `Pause` holds a
    /// request whose reply the host refused (it must not reach the upstream unguarded).
    fn act(&mut self, verdict: Verdict) -> Action {
        match verdict {
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

    /// Asks the rate limit service about each check the deny cache does not answer, and
    /// pauses; or settles at once when nothing needs asking.
    fn ask(&mut self, limiter: &Limiter, pending: Pending) -> Action {
        let plan = limiter.plan(&pending, &mut self.denied.borrow_mut(), now_ns());
        let mut answers = Vec::with_capacity(plan.len());
        let mut calls = Vec::new();
        for (i, ask) in plan.into_iter().enumerate() {
            let (cluster, timeout_ms, message) = match ask {
                Ask::Known(answer) => {
                    answers.push(Some(answer));
                    continue;
                }
                Ask::Call {
                    cluster,
                    timeout_ms,
                    message,
                } => (cluster, timeout_ms, message),
            };
            let timeout = Duration::from_millis(u64::from(timeout_ms));
            match grpc_call(cluster, global::SERVICE, global::METHOD, message, timeout) {
                Ok(token) => {
                    calls.push((token, i));
                    answers.push(None);
                }
                Err(status) => {
                    warn_throttled(&self.metrics.1, || {
                        format!(
                            "rate-limit: the host refused the call to cluster {cluster} (status {})",
                            status as u32
                        )
                    });
                    answers.push(Some(GlobalAnswer::Failed(Failure::Error)));
                }
            }
        }
        self.waiting = Some(Waiting {
            pending,
            answers,
            calls,
            failure: None,
        });
        match self.settle_if_answered(limiter) {
            Some(action) => action,
            None => Action::Pause,
        }
    }

    /// Once every check has its answer: counts, remembers denials, and decides.
    fn settle_if_answered(&mut self, limiter: &Limiter) -> Option<Action> {
        let waiting = self.waiting.as_ref()?;
        if waiting.answers.iter().any(Option::is_none) {
            return None;
        }
        let waiting = self.waiting.take()?;
        let status = waiting.failure;
        let answers: Vec<GlobalAnswer> = waiting.answers.into_iter().flatten().collect();
        let failed = answers.iter().find_map(|a| match a {
            GlobalAnswer::Failed(f) => Some(*f),
            _ => None,
        });
        let now = now_ns();
        let settled = limiter.settle(waiting.pending, &answers, now, &SharedData);
        for (rule, outcome) in &settled.outcomes {
            self.metrics.2.add_in(*rule, *outcome, 1);
        }
        if let Some(f) = failed {
            warn_throttled(&self.metrics.1, || {
                let (code, message) = status.clone().unwrap_or_default();
                format!(
                    "rate-limit: the rate limit service failed ({}, gRPC status {code} {}); \
                     each rule's failureMode applies",
                    f.describe(),
                    edge_core::problem::json_string(&message)
                )
            });
        }
        let mut caches = self.denied.borrow_mut();
        for (rule, key, denied) in settled.remember {
            if let Some(c) = caches.get_mut(rule) {
                c.remember(key, denied);
            }
        }
        drop(caches);
        Some(self.act(settled.action))
    }
}

impl Context for RateLimitStream {
    fn on_grpc_call_response(&mut self, token: u32, status_code: u32, response_size: usize) {
        let Some(limiter) = self.limiter.clone() else {
            return;
        };
        let Some(waiting) = self.waiting.as_mut() else {
            return;
        };
        let Some(&(_, i)) = waiting.calls.iter().find(|(t, _)| *t == token) else {
            return;
        };
        let got = if status_code == 0 {
            match global::answer(&grpc_response(response_size)) {
                Ok(a) => GlobalAnswer::Service(a),
                Err(f) => GlobalAnswer::Failed(f),
            }
        } else {
            let (code, message) = grpc_status();
            let failed = GlobalAnswer::Failed(global::failure(code, &message));
            waiting.failure = Some((code, message.chars().take(120).collect()));
            failed
        };
        if let Some(slot) = waiting.answers.get_mut(i) {
            *slot = Some(got);
        }
        if let Some(action) = self.settle_if_answered(&limiter) {
            // Forwarding resumes the paused request; an answer was sent by `act`.
            if action == Action::Continue && !resume_request() {
                warn_throttled(&self.metrics.1, || {
                    "rate-limit: the host refused to resume a request".into()
                });
            }
        }
    }
}

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
        match d.pending {
            Some(pending) => self.ask(&limiter, pending),
            None => self.act(d.action),
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        // A refused quota header is not worth a line: the answer itself is unchanged.
        let _ = edit_response_headers(&core::mem::take(&mut self.response_headers));
        Action::Continue
    }
}
