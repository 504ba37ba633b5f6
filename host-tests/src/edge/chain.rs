//! The filter chain of one direction, as Envoy's filter manager iterates it: headers, then
//! body data, then trailers pass from filter to filter; a filter that pauses holds what is
//! behind it, one that buffers sees the body grow in its own callbacks. [`Chain`] is the pure
//! iteration state; the `Edge` functions below run the callback it names and record the result.

use super::api::{details, Callback, Part};
use super::{Edge, Phase};
use crate::abi::action;
use crate::state::{Binding, Direction, Effect, LocalReply, StreamMap, VmRef};
use crate::vm::Outcome;
use anyhow::{anyhow, Result};
use std::collections::VecDeque;

/// Where one filter is with headers or trailers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stage {
    NotYet,
    Ready,
    Paused,
    Done,
}

/// How far one filter of the chain has got in one direction.
pub(super) struct FilterProgress {
    /// The filter's index in the plugin list.
    pub filter: usize,
    pub headers: Stage,
    /// Body data reached the filter since its last body callback.
    pub data_waiting: bool,
    /// The end of the body has reached the filter.
    pub end_reached: bool,
    /// A body callback has told the filter the body ended.
    pub end_told: bool,
    /// The filter holds the body (its last body callback paused).
    pub buffering: bool,
    pub trailers: Stage,
}

/// The iteration state of one direction, filters in the order they run.
pub(super) struct Chain {
    pub filters: Vec<FilterProgress>,
    has_body: bool,
    has_trailers: bool,
    /// Body chunks the direction has not fed to the first filter yet.
    source: VecDeque<Vec<u8>>,
    fed_all: bool,
    /// What has passed the last filter: the body, and whether headers and the end went out.
    pub delivered_body: Vec<u8>,
    /// The headers have passed the last filter (in the response: the client has them).
    pub delivered_headers: bool,
    delivered_end: bool,
}

/// What the chain can run next.
enum Next {
    Run {
        position: usize,
        part: Part,
    },
    /// The buffering filter at `position` holds more than the buffer limit.
    Overflow {
        position: usize,
    },
    Blocked,
}

impl Chain {
    /// A direction through `order` (plugin indices) carrying these body chunks.
    pub fn new(order: Vec<usize>, chunks: Vec<Vec<u8>>, has_trailers: bool) -> Chain {
        let filters = order
            .into_iter()
            .map(|filter| FilterProgress {
                filter,
                headers: Stage::NotYet,
                data_waiting: false,
                end_reached: false,
                end_told: false,
                buffering: false,
                trailers: Stage::NotYet,
            })
            .collect();
        let mut chain = Chain {
            filters,
            has_body: !chunks.is_empty(),
            has_trailers,
            source: chunks.into(),
            fed_all: false,
            delivered_body: Vec::new(),
            delivered_headers: false,
            delivered_end: false,
        };
        match chain.filters.first_mut() {
            Some(first) => first.headers = Stage::Ready,
            None => chain.delivered_headers = true,
        }
        chain
    }

    /// The chain of no filters that never runs (a response not started yet).
    pub fn idle() -> Chain {
        Chain::new(Vec::new(), Vec::new(), false)
    }

    pub fn position_of(&self, filter: usize) -> Option<usize> {
        self.filters.iter().position(|p| p.filter == filter)
    }

    fn headers_end_stream(&self) -> bool {
        !self.has_body && !self.has_trailers
    }

    /// Everything has passed the last filter.
    pub fn done(&self) -> bool {
        self.delivered_headers && (self.delivered_end || self.headers_end_stream())
    }

    /// The first callback that can run, in chain order. `held` is the body data waiting at
    /// each filter (by plugin index).
    fn next(&self, held: &[Vec<u8>], buffer_limit: usize) -> Next {
        for (position, progress) in self.filters.iter().enumerate() {
            if progress.headers == Stage::Ready {
                return Next::Run {
                    position,
                    part: Part::Headers,
                };
            }
            if progress.headers != Stage::Done {
                return Next::Blocked;
            }
            let untold_end = progress.end_reached && !progress.end_told;
            if self.has_body && (progress.data_waiting || untold_end) {
                let size = held.get(progress.filter).map_or(0, Vec::len);
                if progress.buffering && size > buffer_limit {
                    return Next::Overflow { position };
                }
                return Next::Run {
                    position,
                    part: Part::Body,
                };
            }
            if progress.buffering || (self.has_body && !progress.end_reached) {
                return Next::Blocked;
            }
            if self.has_trailers {
                match progress.trailers {
                    Stage::Ready => {
                        return Next::Run {
                            position,
                            part: Part::Trailers,
                        }
                    }
                    Stage::Done => {}
                    Stage::NotYet | Stage::Paused => return Next::Blocked,
                }
            }
        }
        Next::Blocked
    }

    /// Records the callback of `part` at `position`: `go` passes what it handled on, otherwise
    /// the filter holds it. `held` is the direction's body data by plugin index.
    fn advance(&mut self, position: usize, part: Part, go: bool, held: &mut [Vec<u8>]) {
        let Some(progress) = self.filters.get_mut(position) else {
            return;
        };
        match part {
            Part::Headers if go => {
                progress.headers = Stage::Done;
                self.pass_headers(position);
            }
            Part::Headers => progress.headers = Stage::Paused,
            Part::Body => {
                progress.data_waiting = false;
                if progress.end_reached {
                    progress.end_told = true;
                }
                progress.buffering = !go;
                if go {
                    self.pass_data(position, held);
                }
            }
            Part::Trailers if go => {
                progress.trailers = Stage::Done;
                self.pass_trailers(position);
            }
            Part::Trailers => progress.trailers = Stage::Paused,
        }
    }

    /// Headers passed `position`: the next filter may run them, or they go out.
    fn pass_headers(&mut self, position: usize) {
        match self.filters.get_mut(position + 1) {
            Some(next) => next.headers = Stage::Ready,
            None => self.delivered_headers = true,
        }
    }

    /// Body data (and the end of stream) moves from `position` to the next filter or out.
    pub fn pass_data(&mut self, position: usize, held: &mut [Vec<u8>]) {
        let has_trailers = self.has_trailers;
        let Some(progress) = self.filters.get_mut(position) else {
            return;
        };
        let data = held
            .get_mut(progress.filter)
            .map(std::mem::take)
            .unwrap_or_default();
        let end = progress.end_reached;
        if end && has_trailers && progress.trailers == Stage::NotYet {
            progress.trailers = Stage::Ready;
        }
        match self.filters.get_mut(position + 1) {
            Some(next) => {
                if !data.is_empty() {
                    if let Some(waiting) = held.get_mut(next.filter) {
                        waiting.extend_from_slice(&data);
                    }
                    next.data_waiting = true;
                }
                if end {
                    next.end_reached = true;
                }
            }
            None => {
                self.delivered_body.extend_from_slice(&data);
                if end && !has_trailers {
                    self.delivered_end = true;
                }
            }
        }
    }

    fn pass_trailers(&mut self, position: usize) {
        match self.filters.get_mut(position + 1) {
            Some(next) => next.trailers = Stage::Ready,
            None => self.delivered_end = true,
        }
    }

    /// Feeds the next source chunk to the first filter once it has absorbed the last one.
    /// Returns whether anything was fed.
    fn feed(&mut self, held: &mut [Vec<u8>]) -> bool {
        if self.fed_all || self.headers_end_stream() {
            return false;
        }
        let has_body = self.has_body;
        let has_trailers = self.has_trailers;
        let Some(first) = self.filters.first_mut() else {
            // No filters: everything goes straight through.
            while let Some(chunk) = self.source.pop_front() {
                self.delivered_body.extend_from_slice(&chunk);
            }
            self.fed_all = true;
            self.delivered_end = true;
            return true;
        };
        // A filter that is buffering sees each new chunk in its own callback; behind paused
        // headers Envoy just accumulates, and the filter gets it all at once after the continue.
        if first.data_waiting && first.headers != Stage::Paused {
            return false;
        }
        match self.source.pop_front() {
            Some(chunk) => {
                if let Some(waiting) = held.get_mut(first.filter) {
                    waiting.extend_from_slice(&chunk);
                }
                first.data_waiting = true;
                if self.source.is_empty() {
                    first.end_reached = true;
                    self.fed_all = true;
                }
            }
            None => {
                self.fed_all = true;
                first.end_reached = true;
                if !has_body && has_trailers {
                    first.trailers = Stage::Ready;
                }
            }
        }
        true
    }
}

/// A local reply Envoy itself sends on a filter's behalf.
fn envoy_reply(status: u16, details: &str, body: &[u8]) -> LocalReply {
    LocalReply {
        status,
        details: details.into(),
        body: body.to_vec(),
        headers: Vec::new(),
        grpc_status: -1,
    }
}

/// The chain's side of a stream's step, run by `Edge::step`.
pub(super) enum Pumped {
    Ran(Callback),
    /// Nothing ran, but the phase or the chain moved: look again.
    Moved,
    Waiting,
}

impl Edge {
    /// One step of the direction `direction` of stream `id`: a callback, else feeding the next
    /// body chunk, else the end of the direction.
    pub(super) fn pump(&mut self, id: u64, direction: Direction) -> Result<Pumped> {
        if let Some(callback) = self.run_next_callback(id, direction)? {
            return Ok(Pumped::Ran(callback));
        }
        let flight = self.flight(id)?;
        if !matches!(flight.phase, Phase::Request | Phase::Response) {
            return Ok(Pumped::Moved);
        }
        let chain = &mut flight.chains[direction];
        if chain.feed(&mut flight.exchange.borrow_mut().data[direction]) {
            return Ok(Pumped::Moved);
        }
        if chain.done() {
            flight.phase = match direction {
                Direction::Request => Phase::Upstream,
                Direction::Response => Phase::Log,
            };
            return Ok(Pumped::Moved);
        }
        Ok(Pumped::Waiting)
    }

    /// Runs at most one callback of `direction` for the stream; `None` when nothing can run.
    fn run_next_callback(&mut self, id: u64, direction: Direction) -> Result<Option<Callback>> {
        let buffer_limit = self.host.borrow().buffer_limit;
        let flight = self.flight(id)?;
        let chain = &flight.chains[direction];
        let (position, part, args) = {
            let exchange = flight.exchange.borrow();
            match chain.next(&exchange.data[direction], buffer_limit) {
                Next::Blocked => return Ok(None),
                Next::Overflow { position } => {
                    drop(exchange);
                    self.overflow(id, direction, position)?;
                    return Ok(Some(Callback::BufferLimit));
                }
                Next::Run { position, part } => {
                    let args = match part {
                        Part::Headers => {
                            let count = exchange.maps[StreamMap::headers(direction)].len();
                            vec![count as u32, u32::from(chain.headers_end_stream())]
                        }
                        Part::Body => {
                            let progress = &chain.filters[position];
                            let size = exchange.data[direction][progress.filter].len();
                            let end = progress.end_reached && !chain.has_trailers;
                            vec![size as u32, u32::from(end)]
                        }
                        Part::Trailers => {
                            vec![exchange.maps[StreamMap::trailers(direction)].len() as u32]
                        }
                    };
                    (position, part, args)
                }
            }
        };
        self.run_filter(id, direction, position, part, &args)?;
        Ok(Some(Callback::of(direction, part)))
    }

    /// Runs one stream callback of the filter at `position` and applies its result and
    /// effects.
    fn run_filter(
        &mut self,
        id: u64,
        direction: Direction,
        position: usize,
        part: Part,
        args: &[u32],
    ) -> Result<()> {
        let flight = self.flight(id)?;
        let filter = flight.chains[direction].filters[position].filter;
        let worker = flight.worker;
        if flight.filters[filter].skipped {
            return self.advance_filter(id, direction, position, part, true);
        }
        if self.workers[worker][filter].store.data().failed {
            // A failed VM without fail_open answers every stream with 503.
            return self.fail_stream(id, direction, position);
        }
        let context = self.ensure_context(id, filter)?;
        {
            let binding = self.binding(worker, filter, context)?;
            match part {
                Part::Body => binding.body = Some(direction),
                Part::Headers => binding.open[StreamMap::headers(direction)] = true,
                Part::Trailers => binding.open[StreamMap::trailers(direction)] = true,
            }
        }
        let export = Callback::of(direction, part).export().unwrap_or_default();
        let mut call_args = vec![context];
        call_args.extend_from_slice(args);
        let vm = &mut self.workers[worker][filter];
        let outcome = vm.call(export, context, &call_args);
        let fuel = vm.last_fuel;
        self.flight(id)?.fuel += fuel;
        match outcome {
            Outcome::Trapped(_) => {
                if self.plugins[filter].fail_open {
                    self.flight(id)?.filters[filter].skipped = true;
                    self.advance_filter(id, direction, position, part, true)?;
                } else {
                    self.fail_stream(id, direction, position)?;
                }
            }
            Outcome::Returned(action) => {
                // A local reply forces the callback to stop, whatever it returned.
                let replied = self.workers[worker][filter]
                    .store
                    .data()
                    .effects
                    .iter()
                    .any(|effect| matches!(effect, Effect::LocalReply { .. }));
                let go = !replied && action.unwrap_or(action::CONTINUE) == action::CONTINUE;
                self.advance_filter(id, direction, position, part, go)?;
            }
        }
        self.apply_effects(worker, filter);
        Ok(())
    }

    /// Moves the direction's iteration past the callback just run (`go`) or stops it there,
    /// and lets go of what Envoy no longer shows the filter.
    pub(super) fn advance_filter(
        &mut self,
        id: u64,
        direction: Direction,
        position: usize,
        part: Part,
        go: bool,
    ) -> Result<()> {
        let flight = self.flight(id)?;
        let worker = flight.worker;
        let chain = &mut flight.chains[direction];
        chain.advance(
            position,
            part,
            go,
            &mut flight.exchange.borrow_mut().data[direction],
        );
        let progress = &chain.filters[position];
        let filter = progress.filter;
        let (headers_done, buffering) = (progress.headers == Stage::Done, progress.buffering);
        let context = flight.filters[filter].context;
        if context == 0 {
            return Ok(());
        }
        if let Some(binding) = self.workers[worker][filter]
            .store
            .data_mut()
            .bindings
            .get_mut(&context)
        {
            // Envoy lets go of the header map once the filter continues past its headers.
            if headers_done {
                binding.open[StreamMap::headers(direction)] = false;
            }
            if part == Part::Trailers && go {
                binding.open[StreamMap::trailers(direction)] = false;
            }
            if part == Part::Body && !buffering {
                binding.body = None;
            }
        }
        Ok(())
    }

    /// The filter's stream context, created (`proxy_on_context_create`) on first use.
    fn ensure_context(&mut self, id: u64, filter: usize) -> Result<u32> {
        let flight = self.flight(id)?;
        if flight.filters[filter].context != 0 {
            return Ok(flight.filters[filter].context);
        }
        let worker = flight.worker;
        let exchange = flight.exchange.clone();
        let vm = &mut self.workers[worker][filter];
        let state = vm.store.data_mut();
        let context = state.next_context;
        state.next_context += 1;
        let root = state.root_context;
        state.bindings.insert(
            context,
            Binding {
                exchange,
                filter,
                open: Default::default(),
                body: None,
                log_phase: false,
            },
        );
        let _ = vm.call("proxy_on_context_create", context, &[context, root]);
        let fuel = vm.last_fuel;
        let vm_ref = VmRef {
            worker,
            plugin: filter,
        };
        self.owners.insert((vm_ref, context), id);
        let flight = self.flight(id)?;
        flight.filters[filter].context = context;
        flight.fuel += fuel;
        Ok(context)
    }

    fn binding(&mut self, worker: usize, filter: usize, context: u32) -> Result<&mut Binding> {
        self.workers[worker][filter]
            .store
            .data_mut()
            .bindings
            .get_mut(&context)
            .ok_or_else(|| anyhow!("missing binding"))
    }

    /// Envoy's failStream: a 503 local reply with details `wasm_fail_stream`.
    pub(super) fn fail_stream(
        &mut self,
        id: u64,
        direction: Direction,
        position: usize,
    ) -> Result<()> {
        let flight = self.flight(id)?;
        let filter = flight.chains[direction].filters[position].filter;
        flight.filters[filter].skipped = true;
        let reply = envoy_reply(503, details::WASM_FAIL, b"");
        self.local_reply(id, direction, filter, reply)
    }

    /// Envoy's answer to a filter that buffers more than the buffer limit. Once the response
    /// headers have gone to the client no reply can follow them: Envoy resets the stream
    /// (`rs_too_large`), and the client has the headers and whatever body passed.
    fn overflow(&mut self, id: u64, direction: Direction, position: usize) -> Result<()> {
        let flight = self.flight(id)?;
        let filter = flight.chains[direction].filters[position].filter;
        if direction == Direction::Response && flight.chains.response.delivered_headers {
            flight.exchange.borrow_mut().code_details = details::RESPONSE_TOO_LARGE.into();
            let body = std::mem::take(&mut flight.chains.response.delivered_body);
            let mut response = flight.downstream(body, false);
            response.reset = true;
            flight.response = Some(response);
            flight.reset = true;
            flight.phase = Phase::Log;
            return Ok(());
        }
        let (status, details, body) = match direction {
            Direction::Request => (413, details::REQUEST_TOO_LARGE, "Payload Too Large"),
            Direction::Response => (500, details::RESPONSE_TOO_LARGE, "Internal Server Error"),
        };
        let reply = envoy_reply(status, details, body.as_bytes());
        self.local_reply(id, direction, filter, reply)
    }
}
