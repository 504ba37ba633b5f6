//! Stream control: continuing or closing a paused stream, and local replies.

use super::headers::lower;
use super::memory::{read, read_pairs_lenient, HostcallError};
use crate::abi::{stream, Status};
use crate::state::{Direction, Effect, LocalReply, VmState};
use wasmtime::{Caller, Linker};

pub(super) fn link(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    // § Common stream operations: resumes a paused direction.
    import!(linker, "proxy_continue_stream", stream_effect(stream_type: u32),
        StreamControl::Continue);
    // § Common stream operations: resets the stream.
    import!(linker, "proxy_close_stream", stream_effect(stream_type: u32),
        StreamControl::Close);
    // § HTTP: answers the client instead of the upstream.
    import!(linker, "proxy_send_local_response", send_local_response(
        status_code: u32, status_code_details_data: u32, status_code_details_size: u32,
        body_data: u32, body_size: u32, serialized_headers_data: u32,
        serialized_headers_size: u32, grpc_status: i32));
    Ok(())
}

/// What a plugin asks of its stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamControl {
    Continue,
    Close,
}

/// A continue or close, queued until the callback returns.
fn stream_effect(
    caller: &mut Caller<'_, VmState>,
    stream_type: u32,
    control: StreamControl,
) -> Result<(), HostcallError> {
    let close = control == StreamControl::Close;
    let state = caller.data_mut();
    let direction = match stream_type {
        stream::REQUEST => Direction::Request,
        stream::RESPONSE => Direction::Response,
        stream::UPSTREAM if !close => return Err(Status::Unimplemented.into()),
        stream::DOWNSTREAM | stream::UPSTREAM => return Ok(()),
        _ => return Err(Status::BadArgument.into()),
    };
    let context = state.effective;
    // From a root context (no stream) Envoy accepts the call and does nothing.
    let Some(binding) = state.bindings.get_mut(&context) else {
        return Ok(());
    };
    if !close {
        // Continuing drops Envoy's pointers to the request maps at once (for either
        // direction: Envoy clears the request side in both cases).
        binding.let_go_of_request();
    }
    state.effects.push(if close {
        Effect::Close { context }
    } else {
        Effect::Continue { context, direction }
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)] // the ABI's signature
fn send_local_response(
    caller: &mut Caller<'_, VmState>,
    status_code: u32,
    status_code_details_data: u32,
    status_code_details_size: u32,
    body_data: u32,
    body_size: u32,
    serialized_headers_data: u32,
    serialized_headers_size: u32,
    grpc_status: i32,
) -> Result<(), HostcallError> {
    let details = read(caller, status_code_details_data, status_code_details_size)?;
    let details = String::from_utf8_lossy(&details).into_owned();
    let body = read(caller, body_data, body_size)?;
    let headers = read_pairs_lenient(caller, serialized_headers_data, serialized_headers_size)?;
    if let Some(fault) = caller.data().host.borrow().local_reply_fault {
        return Err(fault.into());
    }
    let state = caller.data_mut();
    let context = state.effective;
    // From a root context there is no stream to answer: Envoy returns Ok and does nothing.
    if !state.bindings.contains_key(&context) {
        return Ok(());
    }
    let status = u16::try_from(status_code).unwrap_or(u16::MAX);
    // Envoy replaces whitespace in details, as it does for every response code detail.
    let details = details
        .chars()
        .map(|ch| if ch.is_whitespace() { '_' } else { ch })
        .collect();
    let headers = headers
        .into_iter()
        .map(|(name, value)| (lower(&name), value))
        .collect();
    state.effects.push(Effect::LocalReply {
        context,
        reply: LocalReply {
            status,
            details,
            body,
            headers,
            grpc_status,
        },
    });
    Ok(())
}
