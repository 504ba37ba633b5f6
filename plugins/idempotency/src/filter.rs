//! Proxy-wasm glue: reads the request (and its body, for the fingerprint), asks the policy,
//! answers or forwards, then copies the response as it streams and keeps it when complete.

use crate::config::Config;
use crate::etcd::fleet_seed;
use crate::fleet::{EtcdStream, Fleet, Tally};
use crate::policy::{
    Begin, BodyFingerprint, BodyPlan, Claim, Completion, Counter, Fate, Feed, Idempotency,
    Identify, Problem,
};
use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use edge_core::problem::Reply;
use edge_core::stored::ResponseCopy;
use edge_core::throttle::Throttle;
use edge_core::RequestView;
use edge_host::host::{
    answer, load_config, namespace_and_seed, now_ns, property, request_body, response_body_chunk,
    response_status_and_headers, set_tick_period_ms, warn_throttled, Action, Context, Counters,
    HostRequest, HttpContext, RootContext, SharedData,
};

/// The counters, and the throttle of this worker's warnings.
#[derive(Default)]
struct Metrics(Counters<Counter>, Throttle);

impl Metrics {
    fn define() -> Metrics {
        Metrics(Counters::define("idempotency"), Throttle::default())
    }

    /// Warnings that can come with every request (a failing store): one line per interval.
    fn warn(&self, line: impl FnOnce() -> String) {
        warn_throttled(&self.1, line);
    }

    fn add(&self, c: Counter, n: u64) {
        self.0.add(c, n);
    }
}

impl Tally for Metrics {
    fn add(&self, c: Counter, n: u64) {
        Metrics::add(self, c, n);
    }

    fn warn(&self, line: &dyn Fn() -> String) {
        Metrics::warn(self, line);
    }
}

#[derive(Default)]
pub struct IdempotencyRoot {
    policy: Option<Rc<Idempotency>>,
    metrics: Rc<Metrics>,
    /// The etcd store, when configured.
    fleet: Option<Rc<Fleet>>,
}

impl Context for IdempotencyRoot {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        if let Some(fleet) = &self.fleet {
            fleet.root_answer(token, body_size);
        }
    }
}

impl RootContext for IdempotencyRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = load_config("idempotency", Config::parse) else {
            return false;
        };
        for w in &config.warnings {
            log::warn!("idempotency: {w}");
        }
        let (namespace, mut seed) = namespace_and_seed("idempotency", "idempotency");
        self.metrics = Rc::new(Metrics::define());
        self.fleet = None;
        if let Some(etcd) = &config.store {
            log::info!(
                "idempotency: header {}, {} route(s), records in etcd (cluster {}, prefix {})",
                config.header,
                config.routes.len(),
                etcd.cluster,
                etcd.prefix
            );
            // Every proxy of the fleet must name a key's record alike.
            seed = fleet_seed(&etcd.prefix);
            let fleet = Fleet::new(etcd.clone(), config.in_flight_timeout_ns, config.ttl_ns);
            if let Err(status) = set_tick_period_ms(fleet.tick_ms()) {
                log::warn!("idempotency: no tick ({status}): leases are granted on demand");
            }
            self.fleet = Some(Rc::new(fleet));
        } else {
            log::info!(
                "idempotency: header {}, {} route(s), up to {} records",
                config.header,
                config.routes.len(),
                config.max_entries
            );
        }
        self.policy = Some(Rc::new(Idempotency::new(config, &namespace, seed)));
        true
    }

    fn on_tick(&mut self) {
        if let Some(fleet) = &self.fleet {
            fleet.tick();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        if let (Some(policy), Some(fleet)) = (&self.policy, &self.fleet) {
            let tally: Rc<dyn Tally> = self.metrics.clone();
            return Some(Box::new(EtcdStream::new(
                policy.clone(),
                fleet.clone(),
                tally,
            )));
        }
        Some(Box::new(IdempotencyStream {
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
            phase: Phase::Idle,
        }))
    }
}

enum Phase {
    /// Not ours (or already answered).
    Idle,
    /// Fingerprinting the request body before deciding.
    Reading {
        key: u64,
        body: Box<BodyFingerprint>,
    },
    /// Forwarded under a claim; waiting for the response.
    Claimed(Claim),
    /// Copying the response as it streams.
    Copying { claim: Claim, copy: ResponseCopy },
}

pub struct IdempotencyStream {
    policy: Option<Rc<Idempotency>>,
    metrics: Rc<Metrics>,
    phase: Phase,
}

impl Context for IdempotencyStream {}

impl IdempotencyStream {
    /// A refused reply still holds the request: forwarded, it would run unguarded (Envoy's
    /// stream timeout ends it).
    fn reply(&mut self, r: &Reply) -> Action {
        self.phase = Phase::Idle;
        answer("idempotency", r, Action::Pause)
    }

    fn refuse(&mut self, policy: &Idempotency, problem: Problem, detail: &str) -> Action {
        self.metrics.add(problem.counter(), 1);
        if problem == Problem::Unavailable {
            self.metrics.warn(|| format!("idempotency: 503: {detail}"));
        }
        self.reply(&problem.reply(&policy.config.header, detail))
    }

    fn decide(&mut self, policy: &Idempotency, key: u64, fingerprint: Option<[u8; 32]>) -> Action {
        let begin = policy.begin(&SharedData, key, fingerprint, now_ns());
        self.metrics
            .add(Counter::Evicted, policy.table().take_evictions());
        match begin {
            Begin::Forward(claim) => {
                self.metrics.add(Counter::Forwarded, 1);
                self.phase = Phase::Claimed(claim);
                Action::Continue
            }
            Begin::Replay(reply) => {
                self.metrics.add(Counter::Replayed, 1);
                self.reply(&reply)
            }
            Begin::Refuse(problem, detail) => self.refuse(policy, problem, &detail),
        }
    }

    fn release(&mut self, why: &str) {
        let (Some(policy), Phase::Claimed(claim) | Phase::Copying { claim, .. }) = (
            self.policy.clone(),
            core::mem::replace(&mut self.phase, Phase::Idle),
        ) else {
            return;
        };
        match policy.release(&SharedData, &claim) {
            Ok(true) => {
                self.metrics.add(Counter::Released, 1);
                log::debug!("idempotency: key released: {why}");
            }
            Ok(false) => self.metrics.add(Counter::Lost, 1),
            Err(e) => self
                .metrics
                .warn(|| format!("idempotency: cannot release a key ({why}): {e}")),
        }
    }

    /// The body ended with trailers.
    fn finish_reading(&mut self) -> Action {
        let (Some(policy), Phase::Reading { key, body }) = (
            self.policy.clone(),
            core::mem::replace(&mut self.phase, Phase::Idle),
        ) else {
            return Action::Continue;
        };
        self.decide(&policy, key, Some(body.finish()))
    }

    fn finish_response(&mut self) {
        let (Some(policy), Phase::Copying { claim, copy }) = (
            self.policy.clone(),
            core::mem::replace(&mut self.phase, Phase::Idle),
        ) else {
            return;
        };
        match policy.complete(&SharedData, &claim, copy.finish(), now_ns()) {
            Ok(Completion::Stored) => self.metrics.add(Counter::Stored, 1),
            Ok(Completion::StoredWithoutResponse) => {
                self.metrics.add(Counter::Stored, 1);
                self.metrics.warn(|| {
                    "idempotency: a response could not be kept whole (maxBodyBytes, \
                     maxBufferedBytes, maxTotalBytes, or the stream was cut short); duplicates \
                     of its key get 409"
                        .into()
                });
            }
            Ok(Completion::Lost) => {
                self.metrics.add(Counter::Lost, 1);
                self.metrics.warn(|| {
                    "idempotency: a request outlived inFlightTimeout and its key was taken by a retry"
                        .into()
                });
            }
            // The application has run: releasing the key would let a retry run it again.
            // The claim stays until `inFlightTimeout` (duplicates get 409 meanwhile) and is
            // then counted as lost.
            Err(e) => {
                self.metrics.add(Counter::Unrecorded, 1);
                self.metrics.warn(|| {
                    format!("idempotency: cannot record a completed request, its key stays claimed: {e}")
                });
            }
        }
        self.metrics
            .add(Counter::Evicted, policy.table().take_evictions());
    }
}

impl HttpContext for IdempotencyStream {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        // The key, method, path and more: one read of the request's headers.
        let _once = edge_host::host::read_request_once();
        let key = match policy.identify(&HostRequest) {
            Identify::Skip => return Action::Continue,
            Identify::Refuse(problem, detail) => return self.refuse(&policy, problem, &detail),
            Identify::Key(k) => k,
        };
        match policy.body_plan(
            end_of_stream,
            HostRequest.header("content-length").as_deref(),
        ) {
            BodyPlan::Decide(fingerprint) => self.decide(&policy, key, fingerprint),
            BodyPlan::Refuse(problem, detail) => self.refuse(&policy, problem, &detail),
            // Headers go on (a paused filter gets no body in Envoy); the body is held here
            // until it is complete, and Envoy's buffer filter placed after this one keeps the
            // upstream from seeing even the headers before the decision.
            BodyPlan::Read(_) if policy.held(&SharedData, key, now_ns()) => self.refuse(
                &policy,
                Problem::InFlight,
                "the first request with this key has not completed yet; retry later",
            ),
            BodyPlan::Read(body) => {
                self.phase = Phase::Reading { key, body };
                Action::Continue
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        let Phase::Reading { key, body } = &mut self.phase else {
            return Action::Continue;
        };
        let key = *key;
        let fed = body.feed(body_size, end_of_stream, |start, len| {
            request_body(start, len)
        });
        match fed {
            Feed::More => Action::Pause,
            Feed::Done(fingerprint) => {
                self.phase = Phase::Idle;
                self.decide(&policy, key, Some(fingerprint))
            }
            Feed::Refuse(problem, detail) => self.refuse(&policy, problem, &detail),
        }
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        if matches!(self.phase, Phase::Reading { .. }) {
            return self.finish_reading();
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let (Some(policy), Phase::Claimed(_)) = (self.policy.clone(), &self.phase) else {
            return Action::Continue;
        };
        // No readable status is no status the policy keeps: the key goes back.
        let (status, headers) = response_status_and_headers();
        let status = status.unwrap_or(0);
        let details = property(&["response", "code_details"]);
        if let Fate::Release(why) = policy.response_fate(status, details.as_deref()) {
            self.release(why);
            return Action::Continue;
        }
        let Phase::Claimed(claim) = core::mem::replace(&mut self.phase, Phase::Idle) else {
            return Action::Continue;
        };
        let mut copy = policy.copy(status, headers);
        if end_of_stream {
            copy.end();
        }
        self.phase = Phase::Copying { claim, copy };
        if end_of_stream {
            self.finish_response();
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Phase::Copying { copy, .. } = &mut self.phase else {
            return Action::Continue;
        };
        // A copy given up (too large, over the budget) is reported when the response ends.
        let _ = copy.body(body_size, end_of_stream, || response_body_chunk(body_size));
        if end_of_stream {
            self.finish_response();
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        if let Phase::Copying { copy, .. } = &mut self.phase {
            copy.end();
        }
        self.finish_response();
        Action::Continue
    }

    fn on_log(&mut self) {
        let Some(policy) = self.policy.clone() else {
            return;
        };
        // A copy still in progress is cut short; `complete` records it without its response.
        let started = matches!(self.phase, Phase::Copying { .. });
        match policy.cut_short(started) {
            Fate::Keep => self.finish_response(),
            Fate::Release(why) => self.release(why),
        }
    }
}
