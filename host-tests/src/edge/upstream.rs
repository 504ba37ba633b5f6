//! The emulated upstream: it receives the request as the chain let it through and answers
//! as scripted, or fails the way a real cluster does (reset, refused, route timeout), with
//! Envoy's own status, body, flags and details for each failure.

use super::api::{details, flags, Upstream, UpstreamFn, UpstreamRequest};
use super::chain::Chain;
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
            UpstreamRequest {
                headers: exchange.maps.request_headers.clone(),
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
        // A response to HEAD has no body (the upstream codec reads none, and Envoy's own
        // replies send headers only): filters get the headers with end of stream.
        let (chunks, trailers) = if request.method() == "HEAD" {
            (Vec::new(), Vec::new())
        } else {
            (answer.chunks, answer.trailers)
        };
        let flight = self.flight(id)?;
        if flight.phase != Phase::Upstream {
            return Ok(()); // a plugin replied while the clock moved
        }
        let mut headers: HeaderMap =
            vec![(b":status".to_vec(), answer.status.to_string().into_bytes())];
        headers.extend(to_header_map(answer.headers));
        let has_trailers = !trailers.is_empty();
        {
            let mut exchange = flight.exchange.borrow_mut();
            exchange.maps.response_headers = headers;
            exchange.maps.response_trailers = to_header_map(trailers);
            exchange.response_code = Some(answer.status);
            exchange.code_details = answer.details.into();
            exchange.response_flags = answer.flags;
            exchange.response_bytes = chunks.iter().map(|c| c.len() as u64).sum();
        }
        flight.chains.response = Chain::new(response_order, chunks, has_trailers);
        flight.phase = Phase::Response;
        self.close_request_maps(id)
    }
}
