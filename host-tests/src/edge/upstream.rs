//! The emulated upstream: it receives the request as the chain let it through and answers
//! as scripted, or fails the way a real cluster does (reset, refused, route timeout), with
//! Envoy's own status, body, flags and details for each failure.

use super::api::{details, flags, Upstream, UpstreamFn, UpstreamRequest};
use super::chain::Chain;
use super::effects::{grpc_reply_headers, is_grpc_request};
use super::{Edge, Phase};
use crate::state::HeaderMap;
use anyhow::Result;
use std::time::Duration;

/// The upstream's behaviour and what it received.
pub(super) struct EmulatedUpstream {
    pub behaviour: UpstreamFn,
    pub received: Vec<UpstreamRequest>,
    pub route_timeout: Duration,
}

impl EmulatedUpstream {
    pub fn new(behaviour: UpstreamFn, route_timeout: Duration) -> Self {
        EmulatedUpstream {
            behaviour,
            received: Vec::new(),
            route_timeout,
        }
    }
}

/// The response the upstream side produced, as the response filters will see it.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    chunks: Vec<Vec<u8>>,
    trailers: Vec<(String, String)>,
    details: &'static str,
    flags: u64,
    /// Host time that passes before it arrives (`None`: at once, no events run).
    wait: Option<Duration>,
}

/// Envoy's own answer to an upstream failure: a plain-text body.
fn failure(
    status: u16,
    body: &[u8],
    details: &'static str,
    flags: u64,
    wait: Option<Duration>,
) -> Answer {
    Answer {
        status,
        headers: vec![
            ("content-length".into(), body.len().to_string()),
            ("content-type".into(), "text/plain".into()),
        ],
        chunks: vec![body.to_vec()],
        trailers: Vec::new(),
        details,
        flags,
        wait,
    }
}

/// What the client side of Envoy gets for a scripted behaviour: an answer later than the
/// route timeout is the timeout's 504.
fn answer(scripted: Upstream, route_timeout: Duration) -> Answer {
    match scripted {
        Upstream::Respond {
            status,
            headers,
            chunks,
            trailers,
            delay,
        } if delay < route_timeout => Answer {
            status,
            headers,
            chunks,
            trailers,
            details: details::VIA_UPSTREAM,
            flags: 0,
            wait: (!delay.is_zero()).then_some(delay),
        },
        Upstream::Direct { status, body } => {
            let mut headers = vec![("content-length".into(), body.len().to_string())];
            if !body.is_empty() {
                headers.push(("content-type".into(), "text/plain".into()));
            }
            Answer {
                status,
                headers,
                chunks: if body.is_empty() { vec![] } else { vec![body] },
                trailers: Vec::new(),
                details: details::DIRECT_RESPONSE,
                flags: 0,
                wait: None,
            }
        }
        Upstream::Respond { .. } | Upstream::Hang => failure(
            504,
            b"upstream request timeout",
            details::TIMEOUT,
            flags::UPSTREAM_REQUEST_TIMEOUT,
            Some(route_timeout),
        ),
        Upstream::Reset => failure(
            503,
            b"upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            details::RESET,
            flags::UPSTREAM_CONNECTION_TERMINATION,
            None,
        ),
        Upstream::Refused => failure(
            503,
            b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure",
            details::REFUSED,
            flags::UPSTREAM_CONNECTION_FAILURE,
            None,
        ),
    }
}

/// The most body Envoy reads from an upstream connection at once (its socket read size): a
/// body arrives in pieces of at most this, each its own data callback, however the upstream
/// wrote it.
pub const READ_SIZE: usize = 16 * 1024;

/// Scripted chunks as Envoy's reads deliver them: none larger than [`READ_SIZE`].
fn as_read(chunks: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    chunks
        .into_iter()
        .flat_map(|chunk| {
            if chunk.len() <= READ_SIZE {
                vec![chunk]
            } else {
                chunk.chunks(READ_SIZE).map(<[u8]>::to_vec).collect()
            }
        })
        .collect()
}

/// What an application's answer carries and Envoy's router adds, past the scripted headers:
/// `content-length` for a body written in one piece (an HTTP/1.1 server's usual framing; a
/// body in `chunks` is chunked and has none, and Envoy's codec drops `transfer-encoding`), and
/// `x-envoy-upstream-service-time` (ms the upstream took).
fn router_headers(answer: &Answer) -> HeaderMap {
    let mut out = HeaderMap::new();
    let has = |name: &str| answer.headers.iter().any(|(n, _)| n == name);
    let bodiless = matches!(answer.status, 100..=199 | 204 | 304);
    if answer.chunks.len() <= 1 && !bodiless && !has("content-length") && !has("transfer-encoding")
    {
        let length: usize = answer.chunks.iter().map(Vec::len).sum();
        out.push((b"content-length".to_vec(), length.to_string().into_bytes()));
    }
    let took = answer.wait.unwrap_or_default().as_millis();
    out.push((
        b"x-envoy-upstream-service-time".to_vec(),
        took.to_string().into_bytes(),
    ));
    out
}

fn to_header_map(pairs: Vec<(String, String)>) -> HeaderMap {
    pairs
        .into_iter()
        .map(|(name, value)| (name.into_bytes(), value.into_bytes()))
        .collect()
}

impl Edge {
    /// The request has passed every filter: the upstream answers, the clock moves by its
    /// delay (events due meanwhile run) and the response starts back through the chain.
    pub(super) fn exchange_upstream(&mut self, id: u64) -> Result<()> {
        let response_order: Vec<usize> = (0..self.plugins.len()).rev().collect();
        let flight = self.flight(id)?;
        let request = {
            let exchange = flight.exchange.borrow();
            let mut headers = super::codec::as_http1_peer_sees(&exchange.maps.request_headers);
            // Envoy's HTTP/1.1 upstream codec frames a body of unknown length (an HTTP/2
            // client's without `content-length`) as chunked.
            let has = |name: &[u8]| headers.iter().any(|(n, _)| n.as_slice() == name);
            if !flight.chains.request.delivered_body.is_empty()
                && !has(b"content-length")
                && !has(b"transfer-encoding")
            {
                headers.push((b"transfer-encoding".to_vec(), b"chunked".to_vec()));
            }
            UpstreamRequest {
                headers,
                body: flight.chains.request.delivered_body.clone(),
                trailers: exchange.maps.request_trailers.clone(),
                worker: flight.worker,
            }
        };
        self.upstream.received.push(request.clone());
        let scripted = (self.upstream.behaviour)(&request);
        let answer = answer(scripted, self.upstream.route_timeout);
        if let Some(wait) = answer.wait {
            self.advance(wait)?;
        }
        let framing = if answer.details == details::VIA_UPSTREAM {
            router_headers(&answer)
        } else {
            HeaderMap::new()
        };
        // A response to HEAD has no body (the upstream codec reads none, and Envoy's own
        // replies send headers only): filters get the headers with end of stream.
        let (chunks, trailers) = if request.method() == "HEAD" {
            (Vec::new(), Vec::new())
        } else {
            (as_read(answer.chunks), answer.trailers)
        };
        let flight = self.flight(id)?;
        if flight.phase != Phase::Upstream {
            return Ok(()); // a plugin replied while the clock moved
        }
        // Envoy's own answer to a failure is a local reply: to a gRPC request it is gRPC
        // (`200`, `grpc-status: 14` for a refused, reset or timed-out upstream).
        let grpc_failure =
            answer.details != details::VIA_UPSTREAM && is_grpc_request(&request.headers);
        let (mut headers, chunks, trailers) = if grpc_failure {
            let body: Vec<u8> = chunks.concat();
            let headers = grpc_reply_headers(answer.status, None, &Vec::new(), &body);
            (headers, Vec::new(), Vec::new())
        } else {
            let mut headers: HeaderMap =
                vec![(b":status".to_vec(), answer.status.to_string().into_bytes())];
            headers.extend(to_header_map(answer.headers));
            headers.extend(framing);
            (headers, chunks, trailers)
        };
        let status = if grpc_failure { 200 } else { answer.status };
        let has_trailers = !trailers.is_empty();
        {
            let mut exchange = flight.exchange.borrow_mut();
            exchange.maps.response_headers = std::mem::take(&mut headers);
            exchange.maps.response_trailers = to_header_map(trailers);
            exchange.response_code = Some(status);
            exchange.code_details = answer.details.into();
            exchange.response_flags = answer.flags;
            exchange.response_bytes = chunks.iter().map(|c| c.len() as u64).sum();
        }
        flight.chains.response = Chain::new(response_order, chunks, has_trailers);
        flight.phase = Phase::Response;
        self.close_request_maps(id)
    }
}
