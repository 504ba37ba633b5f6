//! Effects: what a callback asked for once it returns (continue, close, local reply), and
//! local replies themselves, which turn a stream around or replace its response.

use super::api::{details, Part};
use super::chain::{Chain, Stage};
use super::{Edge, Phase};
use crate::state::{header_value, Direction, Effect, HeaderMap, LocalReply, VmRef};
use anyhow::Result;

/// The response headers of a local reply: its status, its own headers, and for a body the
/// content type (unless given) and length Envoy adds. To a gRPC request Envoy answers in
/// gRPC instead ([`grpc_reply_headers`]).
fn reply_headers(reply: &LocalReply, grpc: bool) -> HeaderMap {
    if grpc {
        let code = u32::try_from(reply.grpc_status)
            .ok()
            .filter(|code| *code <= MAX_GRPC_STATUS);
        return grpc_reply_headers(reply.status, code, &reply.headers, &reply.body);
    }
    let mut headers: HeaderMap = vec![(b":status".to_vec(), reply.status.to_string().into_bytes())];
    headers.extend(reply.headers.iter().cloned());
    if !reply.body.is_empty() {
        if !headers.iter().any(|(name, _)| name == b"content-type") {
            headers.push((b"content-type".to_vec(), b"text/plain".to_vec()));
        }
        headers.push((
            b"content-length".to_vec(),
            reply.body.len().to_string().into_bytes(),
        ));
    }
    headers
}

/// The highest gRPC status Envoy knows (16, Unauthenticated); a plugin's -1 (or anything
/// else out of range) means "none given", and Envoy derives one from the HTTP status.
const MAX_GRPC_STATUS: u32 = 16;

/// Whether Envoy treats the request as gRPC: its `content-type` is `application/grpc`,
/// optionally followed by `+format` or `;parameters` (Envoy's `hasGrpcContentType`).
pub(super) fn is_grpc_request(headers: &HeaderMap) -> bool {
    header_value(headers, "content-type").is_some_and(|value| {
        value
            .strip_prefix("application/grpc")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
    })
}

/// Envoy's mapping of an HTTP status to a gRPC status for its own replies
/// (`Grpc::Utility::httpToGrpcStatus`).
pub(crate) fn http_to_grpc_status(status: u16) -> u32 {
    match status {
        400 => 13,                   // Internal
        401 => 16,                   // Unauthenticated
        403 => 7,                    // PermissionDenied
        404 => 12,                   // Unimplemented
        429 | 502 | 503 | 504 => 14, // Unavailable
        _ => 2,                      // Unknown
    }
}

/// Envoy's percent-encoding of `grpc-message`: bytes outside printable ASCII, and `%`.
fn grpc_percent_encode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for &b in text {
        if (b' '..=b'~').contains(&b) && b != b'%' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

/// A local reply to a gRPC request, as Envoy sends it: `200` headers that end the stream
/// (gRPC's trailers-only form) with `content-type: application/grpc`, `grpc-status` (the one
/// given, else derived from `status`) and the body text as `grpc-message`; no body and no
/// `content-length`. The reply's own headers stay, and a `grpc-status` among them wins.
pub(crate) fn grpc_reply_headers(
    status: u16,
    grpc_status: Option<u32>,
    own: &HeaderMap,
    body: &[u8],
) -> HeaderMap {
    let mut headers: HeaderMap = vec![(b":status".to_vec(), b"200".to_vec())];
    headers.extend(
        own.iter()
            .filter(|(name, _)| name != b"content-type" && name != b"content-length")
            .cloned(),
    );
    headers.push((b"content-type".to_vec(), b"application/grpc".to_vec()));
    if !headers.iter().any(|(name, _)| name == b"grpc-status") {
        let code = grpc_status.unwrap_or_else(|| http_to_grpc_status(status));
        headers.push((b"grpc-status".to_vec(), code.to_string().into_bytes()));
    }
    let message = body.strip_suffix(b"\n").unwrap_or(body);
    if !message.is_empty() {
        headers.push((b"grpc-message".to_vec(), grpc_percent_encode(message)));
    }
    headers
}

impl Edge {
    pub(super) fn apply_all_effects(&mut self) {
        for worker in 0..self.workers.len() {
            for plugin in 0..self.plugins.len() {
                self.apply_effects(worker, plugin);
            }
        }
    }

    /// Acts on what the last callback of the VM (worker, plugin) asked for.
    pub(super) fn apply_effects(&mut self, worker: usize, plugin: usize) {
        let effects: Vec<Effect> = self.workers[worker][plugin]
            .store
            .data_mut()
            .effects
            .drain(..)
            .collect();
        for effect in effects {
            let context = match &effect {
                Effect::Continue { context, .. }
                | Effect::Close { context }
                | Effect::LocalReply { context, .. }
                | Effect::Done { context } => *context,
            };
            let Some(&id) = self.owners.get(&(VmRef { worker, plugin }, context)) else {
                continue;
            };
            let _ = self.apply_effect(id, plugin, effect);
        }
    }

    fn apply_effect(&mut self, id: u64, filter: usize, effect: Effect) -> Result<()> {
        let flight = self.flight(id)?;
        match effect {
            Effect::Continue { direction, .. } => self.resume(id, filter, direction)?,
            Effect::Close { .. } => {
                if matches!(flight.phase, Phase::Log | Phase::Complete) {
                    return Ok(());
                }
                flight.reset = true;
                {
                    // Envoy names the reset unless something already explained the stream.
                    let mut exchange = flight.exchange.borrow_mut();
                    if exchange.code_details.is_empty() {
                        exchange.code_details = details::WASM_CLOSE.into();
                    }
                }
                flight.response = Some(flight.downstream(Vec::new(), true));
                flight.phase = Phase::Log;
            }
            Effect::LocalReply { reply, .. } => {
                let direction = if flight.phase == Phase::Response {
                    Direction::Response
                } else {
                    Direction::Request
                };
                self.local_reply(id, direction, filter, reply)?;
            }
            Effect::Done { .. } => {}
        }
        Ok(())
    }

    /// `proxy_continue_stream`: the filter lets go of what it paused in the direction running
    /// now (a continue for the other direction does nothing).
    fn resume(&mut self, id: u64, filter: usize, direction: Direction) -> Result<()> {
        let flight = self.flight(id)?;
        let active = match flight.phase {
            Phase::Request => direction == Direction::Request,
            Phase::Response => direction == Direction::Response,
            _ => false,
        };
        if !active {
            return Ok(());
        }
        let chain = &mut flight.chains[direction];
        let Some(position) = chain.position_of(filter) else {
            return Ok(());
        };
        let progress = &chain.filters[position];
        if progress.headers == Stage::Paused {
            self.advance_filter(id, direction, position, Part::Headers, true)?;
            let flight = self.flight(id)?;
            // Data held behind the paused headers now reaches this filter.
            if !flight.exchange.borrow().data[direction][filter].is_empty() {
                flight.chains[direction].filters[position].data_waiting = true;
            }
        } else if progress.buffering {
            chain.filters[position].buffering = false;
            chain.pass_data(position, &mut flight.exchange.borrow_mut().data[direction]);
            self.release_body(id, filter)?;
        } else if progress.trailers == Stage::Paused {
            self.advance_filter(id, direction, position, Part::Trailers, true)?;
        }
        Ok(())
    }

    /// The filter let its buffered body go: Envoy no longer shows it that buffer.
    fn release_body(&mut self, id: u64, filter: usize) -> Result<()> {
        let flight = self.flight(id)?;
        let (worker, context) = (flight.worker, flight.filters[filter].context);
        if let Some(binding) = self.workers[worker][filter]
            .store
            .data_mut()
            .bindings
            .get_mut(&context)
        {
            binding.body = None;
        }
        Ok(())
    }

    /// A local reply from `filter`. During the request it travels the response path from that
    /// filter back to the first; once the response has started it replaces it directly.
    pub(super) fn local_reply(
        &mut self,
        id: u64,
        direction: Direction,
        filter: usize,
        reply: LocalReply,
    ) -> Result<()> {
        let host = self.host.clone();
        let flight = self.flight(id)?;
        if matches!(flight.phase, Phase::Log | Phase::Complete) {
            return Ok(());
        }
        // Envoy answers a HEAD request with the reply's headers only (content-length kept):
        // no filter sees its body, and neither does the client.
        let (head, grpc) = {
            let request = &flight.exchange.borrow().maps.request_headers;
            (
                header_value(request, ":method") == Some("HEAD"),
                is_grpc_request(request),
            )
        };
        let headers = reply_headers(&reply, grpc);
        // A gRPC reply is headers only: the body went into `grpc-message`.
        let head = head || grpc;
        {
            let mut exchange = flight.exchange.borrow_mut();
            exchange.response_code = Some(reply.status);
            exchange.code_details = reply.details.clone();
            exchange.response_flags = 0;
            exchange.response_bytes = reply.body.len() as u64;
        }
        if flight.replied && direction == Direction::Request {
            host.borrow_mut().misuse.push(format!(
                "stream {id}: a second local reply from plugin {filter}"
            ));
        }
        if direction == Direction::Response || flight.replied {
            // Response already under way: Envoy sends the reply straight to the client.
            {
                let mut exchange = flight.exchange.borrow_mut();
                exchange.maps.response_headers = headers;
                exchange.maps.response_trailers.clear();
            }
            let body = if head { Vec::new() } else { reply.body };
            flight.response = Some(flight.downstream(body, false));
            flight.phase = Phase::Log;
            return Ok(());
        }
        flight.replied = true;
        flight.exchange.borrow_mut().maps.response_headers = headers;
        let order: Vec<usize> = (0..=filter).rev().collect();
        let chunks = if reply.body.is_empty() || head {
            vec![]
        } else {
            vec![reply.body]
        };
        flight.chains.response = Chain::new(order, chunks, false);
        flight.phase = Phase::Response;
        self.close_request_maps(id)
    }

    /// When a request ends early, no filter may touch the request maps any more.
    pub(super) fn close_request_maps(&mut self, id: u64) -> Result<()> {
        let flight = self.flight(id)?;
        let worker = flight.worker;
        let contexts = flight.contexts();
        for (filter, context) in contexts.iter().enumerate() {
            if *context == 0 {
                continue;
            }
            if let Some(binding) = self.workers[worker][filter]
                .store
                .data_mut()
                .bindings
                .get_mut(context)
            {
                binding.let_go_of_request();
            }
        }
        Ok(())
    }
}
