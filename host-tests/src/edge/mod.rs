//! The request-level API: a filter chain of plugins on N workers in front of an emulated
//! upstream, laid out as the rooms of Envoy's filter manager:
//!
//! - [`api`]: the vocabulary (plugins, requests, responses, the upstream's behaviour, steps);
//! - [`builder`]: describing an edge and starting its VMs;
//! - this module: a stream's lifecycle (begin, step, finish, reset, teardown);
//! - [`chain`]: filter iteration per direction (request callbacks in chain order, response
//!   callbacks in reverse; pauses and buffering);
//! - [`upstream`]: the upstream's answer or failure;
//! - [`events`]: the clock, timers, callout answers and queue notifications;
//! - [`effects`]: what a callback asked for (continue, close, local reply);
//! - [`inspect`]: metrics, logs, shared data and costs, for tests to look at.

mod api;
mod builder;
mod chain;
mod codec;
mod effects;
mod events;
mod inspect;
mod upstream;

pub use api::{
    details, flags, Callback, FlightId, Plugin, Request, Response, Step, Upstream, UpstreamRequest,
};
pub use builder::EdgeBuilder;

use crate::state::{
    header_value, Direction, Exchange, ExchangeRef, HeaderMap, HostShared, Peer, PerDirection,
    PerMap, PluginInfo, VmRef,
};
use crate::vm::Vm;
use anyhow::{anyhow, bail, Result};
use chain::{Chain, Pumped, Stage};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use upstream::EmulatedUpstream;

/// Where a stream is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Request,
    Upstream,
    Response,
    Log,
    Complete,
}

/// One filter's part in a stream.
#[derive(Clone, Copy)]
struct FilterStream {
    /// Its stream context on the worker's VM (0: not created yet).
    context: u32,
    /// It no longer runs for this stream (its VM failed with fail_open).
    skipped: bool,
}

/// One stream in flight on one worker.
struct Flight {
    worker: usize,
    exchange: ExchangeRef,
    /// Each filter's part in the stream, by plugin index.
    filters: Vec<FilterStream>,
    chains: PerDirection<Chain>,
    phase: Phase,
    /// A filter already sent a local reply during the request.
    replied: bool,
    reset: bool,
    fuel: u64,
    response: Option<Response>,
}

impl Flight {
    /// Each filter's stream context (0: none), by plugin index.
    fn contexts(&self) -> Vec<u32> {
        self.filters.iter().map(|filter| filter.context).collect()
    }

    /// The response the client gets, from the exchange as it stands (a reset carries no
    /// status, headers or trailers).
    fn downstream(&self, body: Vec<u8>, reset: bool) -> Response {
        let exchange = self.exchange.borrow();
        let (status, headers, trailers) = if reset {
            (0, Vec::new(), Vec::new())
        } else {
            let headers = if exchange.protocol == "HTTP/1.1" {
                codec::as_http1_peer_sees(&exchange.maps.response_headers)
            } else {
                exchange.maps.response_headers.clone()
            };
            let status = header_value(&headers, ":status").and_then(|s| s.parse().ok());
            (
                status.unwrap_or(0),
                headers,
                exchange.maps.response_trailers.clone(),
            )
        };
        let head = header_value(&exchange.maps.request_headers, ":method") == Some("HEAD");
        let bodiless = head || matches!(status, 100..=199 | 204 | 304);
        let (body, cut_short) = if reset || bodiless || exchange.protocol != "HTTP/1.1" {
            (body, false)
        } else {
            codec::as_http1_client_reads(&headers, body)
        };
        Response {
            status,
            headers,
            body,
            trailers,
            details: exchange.code_details.clone(),
            reset: reset || cut_short,
            worker: self.worker,
            fuel: 0,
        }
    }
}

/// A proxy-wasm host that behaves like Envoy: plugins chained on N workers in front of an
/// emulated upstream, with one shared-data store, queue set, clock and metric set.
pub struct Edge {
    host: Rc<RefCell<HostShared>>,
    plugins: Vec<Rc<PluginInfo>>,
    /// The VMs of each worker, one per plugin in chain order, then those of the main thread.
    workers: Vec<Vec<Vm>>,
    /// Workers that take streams (the last entry of `workers` is the main thread).
    stream_workers: usize,
    upstream: EmulatedUpstream,
    flights: HashMap<u64, Flight>,
    /// A VM's stream context → the stream it belongs to.
    owners: HashMap<(VmRef, u32), u64>,
    next_flight: u64,
    next_worker: usize,
}

/// The request headers Envoy's codec and connection manager hand the first filter.
fn downstream_request_headers(request: &Request, host: &mut HostShared) -> HeaderMap {
    let authority = (
        b":authority".to_vec(),
        request.authority.clone().into_bytes(),
    );
    let path = (b":path".to_vec(), request.path.clone().into_bytes());
    let method = (b":method".to_vec(), request.method.clone().into_bytes());
    let scheme = (b":scheme".to_vec(), b"http".to_vec());
    // The HTTP/2 codec keeps the client's order: the h2 crate's (and tonic's, hyper's).
    let mut headers: HeaderMap = if request.protocol == "HTTP/2" {
        vec![method, scheme, authority, path]
    } else {
        vec![authority, path, method, scheme]
    };
    // Envoy 1.40's HTTP/1.1 codec takes a chunked body's `transfer-encoding` out of the headers
    // filters see (the upstream codec frames the body again).
    headers.extend(
        request
            .headers
            .iter()
            .filter(|(name, value)| {
                name.as_slice() != b"transfer-encoding" || !value.eq_ignore_ascii_case(b"chunked")
            })
            .cloned(),
    );
    // The connection manager sets x-forwarded-proto, then generates the request id.
    headers.push((b"x-forwarded-proto".to_vec(), b"http".to_vec()));
    if !headers.iter().any(|(name, _)| name == b"x-request-id") {
        let mut random = [0u8; 16];
        host.rng.fill(&mut random);
        headers.push((b"x-request-id".to_vec(), uuid(&random).into_bytes()));
    }
    headers
}

impl Edge {
    /// Sends a request through the whole lifecycle and returns the downstream response:
    /// `proxy_on_context_create`, `proxy_on_request_headers|body|trailers` in chain order, the
    /// upstream, `proxy_on_response_headers|body|trailers` in reverse, then `proxy_on_log`,
    /// `proxy_on_done`, `proxy_on_delete`. Runs due events (`proxy_on_http_call_response`,
    /// `proxy_on_tick`, `proxy_on_queue_ready`, gRPC callbacks) first and whenever the stream
    /// waits on a pause.
    pub fn send(&mut self, req: Request) -> Result<Response> {
        self.run_pending()?;
        let id = self.begin(req)?;
        self.finish(id)
    }

    /// Shorthand for `send(Request::get(path))`.
    pub fn get(&mut self, path: &str) -> Result<Response> {
        self.send(Request::get(path))
    }

    /// Creates a stream without running any callback: drive it with [`Edge::step`] to
    /// interleave streams of different workers at callback boundaries.
    pub fn begin(&mut self, req: Request) -> Result<FlightId> {
        let filters = self.plugins.len();
        let worker = match req.worker {
            Some(w) if w < self.stream_workers => w,
            Some(w) => bail!("no worker {w}: the edge has {}", self.stream_workers),
            None => {
                let w = self.next_worker % self.stream_workers;
                self.next_worker += 1;
                w
            }
        };
        let id = self.next_flight;
        self.next_flight += 1;
        let request_headers = downstream_request_headers(&req, &mut self.host.borrow_mut());
        let exchange = Exchange {
            maps: PerMap {
                request_headers,
                request_trailers: req.trailers.clone(),
                response_headers: Vec::new(),
                response_trailers: Vec::new(),
            },
            data: PerDirection {
                request: vec![Vec::new(); filters],
                response: vec![Vec::new(); filters],
            },
            peer: Peer {
                source: req
                    .source
                    .clone()
                    .unwrap_or_else(|| "127.0.0.1:40000".into()),
                destination: "127.0.0.1:10000".into(),
            },
            start_ns: self.host.borrow().realtime_ns,
            response_code: None,
            code_details: String::new(),
            response_flags: 0,
            properties: req.properties.iter().cloned().collect(),
            request_bytes: req.chunks.iter().map(|c| c.len() as u64).sum(),
            response_bytes: 0,
            protocol: req.protocol.clone(),
            connection_id: id,
        };
        let order: Vec<usize> = (0..filters).collect();
        let flight = Flight {
            worker,
            exchange: Rc::new(RefCell::new(exchange)),
            filters: (0..filters)
                .map(|plugin| FilterStream {
                    context: 0,
                    skipped: self.workers[worker][plugin].store.data().failed
                        && self.plugins[plugin].fail_open,
                })
                .collect(),
            chains: PerDirection {
                request: Chain::new(order, req.chunks.clone(), !req.trailers.is_empty()),
                response: Chain::idle(),
            },
            phase: Phase::Request,
            replied: false,
            reset: false,
            fuel: 0,
            response: None,
        };
        self.flights.insert(id, flight);
        Ok(FlightId(id))
    }

    /// Runs the next single callback of a stream (one `proxy_on_*` export of one filter, or
    /// a host stage such as the upstream exchange) and says which; streams of different
    /// workers can be interleaved.
    pub fn step(&mut self, id: FlightId) -> Result<Step> {
        loop {
            let Some(flight) = self.flights.get(&id.0) else {
                bail!("unknown stream {id:?}");
            };
            let direction = match flight.phase {
                Phase::Request => Direction::Request,
                Phase::Response => Direction::Response,
                Phase::Upstream => {
                    self.exchange_upstream(id.0)?;
                    return Ok(Step::Ran(Callback::Upstream));
                }
                Phase::Log => {
                    self.end_stream(id.0)?;
                    return Ok(Step::Ran(Callback::Log));
                }
                Phase::Complete => return Ok(Step::Done),
            };
            match self.pump(id.0, direction)? {
                Pumped::Ran(callback) => return Ok(Step::Ran(callback)),
                Pumped::Moved => continue,
                Pumped::Waiting => return Ok(Step::Waiting),
            }
        }
    }

    /// Runs `a` on worker 0 and `b` on worker 1 one callback at a time, `next(n)` choosing
    /// which (0 or 1) runs the n-th step (a stream with no callback left yields to the
    /// other), then finishes both: how races between workers are staged.
    pub fn interleave(
        &mut self,
        a: Request,
        b: Request,
        mut next: impl FnMut(usize) -> usize,
    ) -> Result<[Response; 2]> {
        let ids = [self.begin(a.worker(0))?, self.begin(b.worker(1))?];
        let mut idle = [false, false];
        let mut n = 0;
        while !(idle[0] && idle[1]) {
            let k = next(n).min(1);
            n += 1;
            let which = if idle[k] { 1 - k } else { k };
            if !matches!(self.step(ids[which])?, Step::Ran(_)) {
                idle[which] = true;
            }
        }
        let [x, y] = ids;
        Ok([self.finish(x)?, self.finish(y)?])
    }

    /// Drives a stream to its end (running events while it waits) and returns its response.
    pub fn finish(&mut self, id: FlightId) -> Result<Response> {
        let mut waited_ns = 0u64;
        loop {
            match self.step(id)? {
                Step::Ran(_) => {}
                Step::Done => break,
                Step::Waiting => {
                    let before = self.host.borrow().monotonic_ns;
                    if !self.run_next_event()? || waited_ns > 300_000_000_000 {
                        bail!(
                            "stream stalled: a plugin paused it and nothing continues it\n{}",
                            self.describe(id.0)
                        );
                    }
                    waited_ns += self.host.borrow().monotonic_ns - before;
                }
            }
        }
        self.take_response(id.0)
    }

    /// The client goes away (or the upstream resets mid-response): the stream ends where it
    /// stands, and as in Envoy every filter that saw it gets `proxy_on_log`, `proxy_on_done`
    /// and `proxy_on_delete`, with no further header or body callbacks.
    pub fn reset(&mut self, id: FlightId) -> Result<Response> {
        let flight = self.flight(id.0)?;
        if flight.phase != Phase::Complete {
            flight.reset = true;
            self.end_stream(id.0)?;
        }
        self.take_response(id.0)
    }

    fn flight(&mut self, id: u64) -> Result<&mut Flight> {
        self.flights
            .get_mut(&id)
            .ok_or_else(|| anyhow!("unknown stream {id}"))
    }

    /// Forgets an ended stream and hands back its response.
    fn take_response(&mut self, id: u64) -> Result<Response> {
        let flight = self
            .flights
            .remove(&id)
            .ok_or_else(|| anyhow!("unknown stream"))?;
        self.owners.retain(|_, owner| *owner != id);
        flight
            .response
            .ok_or_else(|| anyhow!("stream ended without a response"))
    }

    /// Access-log phase then teardown: on_log for each filter, then on_done and on_delete.
    fn end_stream(&mut self, id: u64) -> Result<()> {
        let flight = self.flight(id)?;
        let worker = flight.worker;
        if flight.response.is_none() {
            let body = std::mem::take(&mut flight.chains.response.delivered_body);
            flight.response = Some(flight.downstream(body, flight.reset));
        }
        let contexts = flight.contexts();
        for (filter, context) in contexts.iter().enumerate() {
            if *context == 0 || self.workers[worker][filter].store.data().failed {
                continue;
            }
            let vm = &mut self.workers[worker][filter];
            if let Some(binding) = vm.store.data_mut().bindings.get_mut(context) {
                binding.log_phase = true;
                binding.open = PerMap::default();
                binding.body = None;
            }
            let _ = vm.call("proxy_on_log", *context, &[*context]);
            let fuel = vm.last_fuel;
            self.flight(id)?.fuel += fuel;
            self.apply_effects(worker, filter);
        }
        for (filter, context) in contexts.iter().enumerate() {
            if *context == 0 {
                continue;
            }
            let vm = &mut self.workers[worker][filter];
            if !vm.store.data().failed {
                let _ = vm.call("proxy_on_done", *context, &[*context]);
                let _ = vm.call("proxy_on_delete", *context, &[*context]);
            }
            vm.store.data_mut().bindings.remove(context);
            let _ = vm.store.data_mut().effects.drain(..);
        }
        let flight = self.flight(id)?;
        let fuel = flight.fuel;
        if let Some(response) = flight.response.as_mut() {
            response.fuel = fuel;
        }
        flight.phase = Phase::Complete;
        Ok(())
    }

    /// Where a stalled stream stands, for the error that reports it.
    fn describe(&self, id: u64) -> String {
        let Some(flight) = self.flights.get(&id) else {
            return String::new();
        };
        let mut out = format!("phase {:?}", flight.phase);
        for (direction, name) in [
            (Direction::Request, "request"),
            (Direction::Response, "response"),
        ] {
            for progress in &flight.chains[direction].filters {
                let plugin = &self.plugins[progress.filter].name;
                if progress.headers == Stage::Paused {
                    out += &format!("; {plugin} paused the {name} headers");
                }
                if progress.buffering && progress.end_told {
                    out += &format!("; {plugin} holds the whole {name} body");
                }
            }
        }
        out
    }
}

/// An `x-request-id` in Envoy's UUID v4 form.
fn uuid(random: &[u8; 16]) -> String {
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}
