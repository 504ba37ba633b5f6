//! One proxy-wasm filter that drives several plugins' glue in order (`edge.wasm`: four). Each
//! stage is the plugin's own root and stream contexts, exactly as its separate module runs
//! them; what the pipeline adds is what Envoy's filter chain would otherwise do between
//! filters:
//!
//! - request callbacks run stage by stage in order, response callbacks in reverse, and only
//!   for the stages the request reached (a stage that answers at request time gets its own
//!   reply's response callbacks, the stages after it none, as in Envoy's chain);
//! - a stage that pauses holds the stages after it; its resume (from a callout answer) runs
//!   them before the stream goes on, as Envoy's `continueDecoding` would;
//! - callout answers go to the stage that made the call, ticks to each stage at its own
//!   period on one host timer, and each stage reads its own section of the configuration.
//!
//! Outside a pipeline (a separate module) nothing is intercepted: every call goes to the host
//! as the plugin made it.

use crate::bus;
use crate::dispatch::{Action, Context, HttpContext, RootContext};
use alloc::boxed::Box;
use alloc::vec::Vec;
use edge_core::config::split_sections;

/// A plugin's root context under the name of its configuration section.
pub struct Stage {
    pub section: &'static str,
    pub root: Box<dyn RootContext>,
}

/// The pipeline's root context: owns each stage's root.
pub struct PipelineRoot {
    stages: Vec<Stage>,
    /// The stages configured (a combined filter leaves out those whose section is absent).
    on: Vec<usize>,
    /// Per configured stage, the tick period it asked for and when its next tick is due.
    ticks: Vec<Option<(u64, u64)>>,
    /// Root-context callouts in flight: (token, stage).
    calls: Vec<(u32, usize)>,
}

impl PipelineRoot {
    /// One filter of several stages, each configured by its section.
    pub fn combined(stages: Vec<Stage>) -> PipelineRoot {
        bus::record_tokens();
        PipelineRoot {
            stages,
            on: Vec::new(),
            ticks: Vec::new(),
            calls: Vec::new(),
        }
    }

    /// Runs `f` on stage `i`'s root, recording the callouts it starts as that stage's.
    fn on_stage(&mut self, i: usize, f: impl FnOnce(&mut dyn RootContext)) {
        let Some(stage) = self.stages.get_mut(i) else {
            return;
        };
        bus::start_tokens();
        f(stage.root.as_mut());
        let calls = &mut self.calls;
        bus::take_tokens(|t| calls.push((t, i)));
    }

    /// Reads the combined configuration: an object of sections, each a plugin's whole
    /// configuration, each optional. A stage whose section is absent is off.
    fn configure_combined(&mut self) -> bool {
        let raw = crate::host::plugin_configuration();
        let mut sections = match split_sections(&raw, &self.section_names()) {
            Ok(s) => s,
            Err(why) => {
                log::error!("edge: configuration rejected: {why}");
                return false;
            }
        };
        self.on.clear();
        self.ticks.clear();
        for i in 0..self.stages.len() {
            let Some(bytes) = sections.get_mut(i).and_then(Option::take) else {
                continue;
            };
            let section = self.stages.get(i).map_or("", |s| s.section);
            bus::configuring(section, bytes);
            let mut ok = false;
            self.on_stage(i, |root| ok = root.on_configure(0));
            let tick = bus::done_configuring();
            if !ok {
                return false;
            }
            self.on.push(i);
            self.ticks
                .push(tick.map(|ms| (u64::from(ms) * 1_000_000, 0)));
        }
        if self.on.is_empty() {
            log::warn!("edge: no section configured; every policy is off");
        }
        let periods: Vec<u64> = self.ticks.iter().flatten().map(|(p, _)| *p).collect();
        if let Some(period) = periods.iter().copied().reduce(gcd) {
            let ms = u32::try_from((period / 1_000_000).max(1)).unwrap_or(u32::MAX);
            if let Err(status) = crate::host::set_tick_period_ms(ms) {
                log::error!(
                    "edge: configuration rejected: the host refused the timer (status {status})"
                );
                return false;
            }
        }
        true
    }

    fn section_names(&self) -> Vec<&'static str> {
        self.stages.iter().map(|s| s.section).collect()
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Context for PipelineRoot {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, trailers: usize) {
        let Some(at) = self.calls.iter().position(|(t, _)| *t == token) else {
            return;
        };
        let (_, i) = self.calls.swap_remove(at);
        self.on_stage(i, |root| {
            root.on_http_call_response(token, headers, body, trailers)
        });
    }

    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        let Some(at) = self.calls.iter().position(|(t, _)| *t == token) else {
            return;
        };
        let (_, i) = self.calls.swap_remove(at);
        self.on_stage(i, |root| root.on_grpc_call_response(token, status, size));
    }
}

impl RootContext for PipelineRoot {
    fn on_vm_start(&mut self, size: usize) -> bool {
        self.stages.iter_mut().all(|s| s.root.on_vm_start(size))
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        self.configure_combined()
    }

    fn on_tick(&mut self) {
        let now = crate::host::now_ns();
        for k in 0..self.on.len() {
            let (Some(&i), Some(Some((period, due)))) = (self.on.get(k), self.ticks.get_mut(k))
            else {
                continue;
            };
            // Half a period of slack: the host's timer is not exact.
            if now.saturating_add(*period / 2) < *due {
                continue;
            }
            *due = now.saturating_add(*period);
            self.on_stage(i, |root| root.on_tick());
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let stages: Vec<Box<dyn HttpContext>> = self
            .on
            .iter()
            .filter_map(|&i| self.stages.get(i))
            .filter_map(|s| s.root.create_http_context(context_id))
            .collect();
        Some(Box::new(PipelineStream {
            stages,
            reached: 0,
            paused: None,
            calls: Vec::new(),
        }))
    }
}

/// Where a stream callback was when a stage paused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    RequestHeaders(usize, bool),
    RequestBody(usize, bool),
    RequestTrailers(usize),
    ResponseHeaders(usize, bool),
    ResponseBody(usize, bool),
    ResponseTrailers(usize),
}

impl Phase {
    fn is_request(self) -> bool {
        matches!(
            self,
            Phase::RequestHeaders(..) | Phase::RequestBody(..) | Phase::RequestTrailers(_)
        )
    }
}

pub struct PipelineStream {
    stages: Vec<Box<dyn HttpContext>>,
    /// How many stages the request reached (their request headers ran).
    reached: usize,
    /// The phase a stage paused and which stage.
    paused: Option<(Phase, usize)>,
    /// Callouts in flight: (token, stage).
    calls: Vec<(u32, usize)>,
}

impl PipelineStream {
    fn call(stage: &mut dyn HttpContext, phase: Phase) -> Action {
        match phase {
            Phase::RequestHeaders(n, eos) => stage.on_http_request_headers(n, eos),
            Phase::RequestBody(n, eos) => stage.on_http_request_body(n, eos),
            Phase::RequestTrailers(n) => stage.on_http_request_trailers(n),
            Phase::ResponseHeaders(n, eos) => stage.on_http_response_headers(n, eos),
            Phase::ResponseBody(n, eos) => stage.on_http_response_body(n, eos),
            Phase::ResponseTrailers(n) => stage.on_http_response_trailers(n),
        }
    }

    /// Runs `phase` from stage `from` on: forward for the request, backward for the response,
    /// until a stage pauses.
    fn run(&mut self, phase: Phase, from: usize) -> Action {
        let request = phase.is_request();
        // Stages `from..len` for the request; `from` down to 0 (within those reached) for the
        // response. Counted, not collected: this runs on every callback.
        let (mut i, count) = if request {
            (from, self.stages.len().saturating_sub(from))
        } else if self.reached == 0 {
            (0, 0)
        } else {
            let top = from.min(self.reached - 1);
            (top, top + 1)
        };
        let headers = matches!(phase, Phase::RequestHeaders(..));
        for _ in 0..count {
            let at = i;
            i = if request { i + 1 } else { i.wrapping_sub(1) };
            if headers {
                self.reached = self.reached.max(at + 1);
            }
            let Some(stage) = self.stages.get_mut(at) else {
                continue;
            };
            bus::start_tokens();
            let action = Self::call(stage.as_mut(), phase);
            let calls = &mut self.calls;
            bus::take_tokens(|t| calls.push((t, at)));
            if action != Action::Continue {
                self.paused = Some((phase, at));
                return action;
            }
        }
        self.paused = None;
        Action::Continue
    }

    fn start(&mut self, phase: Phase) -> Action {
        if self.stages.is_empty() {
            return Action::Continue;
        }
        let from = if phase.is_request() {
            0
        } else {
            self.reached.saturating_sub(1)
        };
        bus::one_clock(true);
        let action = self.run(phase, from);
        bus::one_clock(false);
        action
    }

    /// Delivers a callout's answer to the stage that made the call; when that stage resumes
    /// the phase it paused, the stages after it run before the stream goes on.
    fn answer(&mut self, token: u32, deliver: impl FnOnce(&mut dyn HttpContext)) {
        bus::one_clock(true);
        self.deliver(token, deliver);
        bus::one_clock(false);
    }

    fn deliver(&mut self, token: u32, deliver: impl FnOnce(&mut dyn HttpContext)) {
        let Some(at) = self.calls.iter().position(|(t, _)| *t == token) else {
            return;
        };
        let (_, i) = self.calls.swap_remove(at);
        let Some(stage) = self.stages.get_mut(i) else {
            return;
        };
        bus::intercept_resume(true);
        bus::start_tokens();
        deliver(stage.as_mut());
        let calls = &mut self.calls;
        bus::take_tokens(|t| calls.push((t, i)));
        let Some(request) = bus::intercept_resume(false) else {
            return;
        };
        match self.paused {
            Some((phase, at)) if at == i && phase.is_request() == request => {
                let next = if request {
                    Some(i + 1)
                } else {
                    i.checked_sub(1)
                };
                let headers = matches!(phase, Phase::RequestHeaders(..));
                bus::snapshot_request(headers);
                let action = match next {
                    Some(n) if request || n < self.reached => self.run(phase, n),
                    _ => {
                        self.paused = None;
                        Action::Continue
                    }
                };
                bus::snapshot_request(false);
                if action == Action::Continue {
                    self.paused = None;
                    let _ = bus::resume(request);
                }
            }
            // Not a pause this pipeline holds: the stream goes on as the stage asked.
            _ => {
                let _ = bus::resume(request);
            }
        }
    }
}

impl Context for PipelineStream {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, trailers: usize) {
        self.answer(token, |s| {
            s.on_http_call_response(token, headers, body, trailers)
        });
    }

    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        self.answer(token, |s| s.on_grpc_call_response(token, status, size));
    }
}

impl HttpContext for PipelineStream {
    fn on_http_request_headers(&mut self, headers: usize, end_of_stream: bool) -> Action {
        bus::snapshot_request(true);
        let action = self.start(Phase::RequestHeaders(headers, end_of_stream));
        bus::snapshot_request(false);
        action
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.start(Phase::RequestBody(size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, trailers: usize) -> Action {
        self.start(Phase::RequestTrailers(trailers))
    }

    fn on_http_response_headers(&mut self, headers: usize, end_of_stream: bool) -> Action {
        self.start(Phase::ResponseHeaders(headers, end_of_stream))
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.start(Phase::ResponseBody(size, end_of_stream))
    }

    fn on_http_response_trailers(&mut self, trailers: usize) -> Action {
        self.start(Phase::ResponseTrailers(trailers))
    }

    fn on_log(&mut self) {
        let reached = self.reached;
        bus::one_clock(true);
        for stage in self.stages.iter_mut().take(reached) {
            stage.on_log();
        }
        bus::one_clock(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_share_one_period() {
        assert_eq!([30_000u64, 1_000, 2_500].into_iter().reduce(gcd), Some(500));
    }
}
