//! HTTP and gRPC calls to clusters: each answer is scheduled as an event for the root
//! context, as Envoy delivers it there.

use super::headers::lower;
use super::memory::HostcallError;
use super::memory::{hand_over, read, read_pairs, read_pairs_lenient, read_text, write_u32};
use super::with_handler;
use crate::abi::Status;
use crate::state::{
    CalloutReply, CalloutRequest, EventKind, GrpcReply, GrpcRequest, GrpcState, HeaderMap, VmState,
};
use std::time::Duration;
use wasmtime::{Caller, Linker};

pub(super) fn link(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    // § HTTP calls: a request to a cluster, answered by proxy_on_http_call_response.
    import!(linker, "proxy_http_call", http_call(
        upstream_name_data: u32, upstream_name_size: u32, serialized_headers_data: u32,
        serialized_headers_size: u32, body_data: u32, body_size: u32,
        serialized_trailers_data: u32, serialized_trailers_size: u32, timeout: u32,
        return_call_id: u32));
    // § gRPC calls: a unary call.
    import!(linker, "proxy_grpc_call", grpc_call(
        upstream_name_data: u32, upstream_name_size: u32, service_name_data: u32,
        service_name_size: u32, method_name_data: u32, method_name_size: u32,
        serialized_initial_metadata_data: u32, serialized_initial_metadata_size: u32,
        message_data: u32, message_size: u32, timeout: u32, return_call_id: u32));
    // § gRPC calls: opens a stream.
    import!(linker, "proxy_grpc_stream", grpc_stream(
        upstream_name_data: u32, upstream_name_size: u32, service_name_data: u32,
        service_name_size: u32, method_name_data: u32, method_name_size: u32,
        serialized_initial_metadata_data: u32, serialized_initial_metadata_size: u32,
        return_stream_id: u32));
    // § gRPC calls: a message on an open stream.
    import!(linker, "proxy_grpc_send", grpc_send(
        stream_id: u32, message_data: u32, message_size: u32, end_stream: u32));
    // § gRPC calls: cancels a call or stream.
    import!(linker, "proxy_grpc_cancel", grpc_cancel(call_or_stream_id: u32));
    // § gRPC calls: closes a call or stream (the harness has nothing to flush: a cancel).
    import!(linker, "proxy_grpc_close", grpc_cancel(call_or_stream_id: u32));
    // § Common stream operations: the status of the callout being answered.
    import!(linker, "proxy_get_status", get_status(
        return_status_code: u32, return_status_message_data: u32,
        return_status_message_size: u32));
    Ok(())
}

/// How `abi_misuse` names a call to a cluster the host does not have: both hosts refuse it
/// alike, so a scenario would agree while testing nothing (the scenario runner fails on it).
pub(crate) const UNDECLARED: &str = "call to undeclared cluster";

/// Which kind of call a token stands for (its low two bits).
#[derive(Clone, Copy)]
enum CallKind {
    Http = 0,
    GrpcCall = 1,
    GrpcStream = 2,
}

/// Envoy's callout tokens: a per-VM counter shifted left 2, tagged with the call's kind.
fn new_token(state: &mut VmState, kind: CallKind) -> u32 {
    let counter = state.next_token;
    state.next_token = state.next_token.wrapping_add(1).max(1);
    (counter << 2) | kind as u32
}

#[allow(clippy::too_many_arguments)] // the ABI's signature
fn http_call(
    caller: &mut Caller<'_, VmState>,
    upstream_name_data: u32,
    upstream_name_size: u32,
    serialized_headers_data: u32,
    serialized_headers_size: u32,
    body_data: u32,
    body_size: u32,
    serialized_trailers_data: u32,
    serialized_trailers_size: u32,
    timeout: u32,
    return_call_id: u32,
) -> Result<(), HostcallError> {
    write_u32(caller, return_call_id, 0)?;
    let cluster = read_text(caller, upstream_name_data, upstream_name_size)?;
    let headers: HeaderMap =
        read_pairs_lenient(caller, serialized_headers_data, serialized_headers_size)?
            .into_iter()
            .map(|(name, value)| (lower(&name), value))
            .collect();
    let body = read(caller, body_data, body_size)?;
    let trailers = read_pairs_lenient(caller, serialized_trailers_data, serialized_trailers_size)?;
    if !caller.data().host.borrow().clusters.contains_key(&cluster) {
        caller
            .data()
            .misuse(format!("{UNDECLARED} {cluster:?} (Envoy: BadArgument)"));
        return Err(Status::BadArgument.into());
    }
    if timeout > i32::MAX as u32 {
        return Err(Status::BadArgument.into());
    }
    for required in [&b":method"[..], b":path", b":authority"] {
        if !headers
            .iter()
            .any(|(name, value)| name == required && !value.is_empty())
        {
            return Err(Status::BadArgument.into());
        }
    }
    let request = CalloutRequest {
        cluster: cluster.clone(),
        headers,
        body,
        trailers,
        timeout: (timeout > 0).then(|| Duration::from_millis(u64::from(timeout))),
    };
    let state = caller.data_mut();
    // The call belongs to the root context: that is where Envoy delivers the answer.
    let root = state.root_context;
    let me = state.me;
    state.host.borrow_mut().callouts.push(request.clone());
    let reply = with_handler(
        |host| &mut host.clusters,
        state,
        &cluster,
        |handler| handler(&request),
    )
    .ok_or(Status::BadArgument)?;
    let token = new_token(state, CallKind::Http);
    state.http_calls.insert(token, root);
    let timeout_ns = u64::from(timeout) * 1_000_000;
    let (delay_ns, reply) = match reply {
        CalloutReply::Response { delay, .. } | CalloutReply::Fail { delay }
            if timeout == 0 || (delay.as_nanos() as u64) < timeout_ns =>
        {
            (delay.as_nanos() as u64, reply)
        }
        _ if timeout > 0 => (timeout_ns, CalloutReply::Hang),
        _ => (u64::MAX, CalloutReply::Hang),
    };
    if delay_ns != u64::MAX {
        state
            .host
            .borrow_mut()
            .schedule(delay_ns, (me, root), EventKind::Callout { token, reply });
    }
    write_u32(caller, return_call_id, token)
}

/// Where a gRPC call goes: (address, size) pairs of cluster, service, method and initial
/// metadata, as the two opening imports receive them.
struct GrpcTarget {
    upstream_name: (u32, u32),
    service_name: (u32, u32),
    method_name: (u32, u32),
    initial_metadata: (u32, u32),
}

#[allow(clippy::too_many_arguments)] // the ABI's signature
fn grpc_call(
    caller: &mut Caller<'_, VmState>,
    upstream_name_data: u32,
    upstream_name_size: u32,
    service_name_data: u32,
    service_name_size: u32,
    method_name_data: u32,
    method_name_size: u32,
    serialized_initial_metadata_data: u32,
    serialized_initial_metadata_size: u32,
    message_data: u32,
    message_size: u32,
    timeout: u32,
    return_call_id: u32,
) -> Result<(), HostcallError> {
    let message = read(caller, message_data, message_size)?;
    let target = GrpcTarget {
        upstream_name: (upstream_name_data, upstream_name_size),
        service_name: (service_name_data, service_name_size),
        method_name: (method_name_data, method_name_size),
        initial_metadata: (
            serialized_initial_metadata_data,
            serialized_initial_metadata_size,
        ),
    };
    let token = open_grpc(caller, target, CallKind::GrpcCall)?;
    send_grpc(caller, token, message, false, timeout)?;
    write_u32(caller, return_call_id, token)
}

#[allow(clippy::too_many_arguments)] // the ABI's signature
fn grpc_stream(
    caller: &mut Caller<'_, VmState>,
    upstream_name_data: u32,
    upstream_name_size: u32,
    service_name_data: u32,
    service_name_size: u32,
    method_name_data: u32,
    method_name_size: u32,
    serialized_initial_metadata_data: u32,
    serialized_initial_metadata_size: u32,
    return_stream_id: u32,
) -> Result<(), HostcallError> {
    let target = GrpcTarget {
        upstream_name: (upstream_name_data, upstream_name_size),
        service_name: (service_name_data, service_name_size),
        method_name: (method_name_data, method_name_size),
        initial_metadata: (
            serialized_initial_metadata_data,
            serialized_initial_metadata_size,
        ),
    };
    let token = open_grpc(caller, target, CallKind::GrpcStream)?;
    write_u32(caller, return_stream_id, token)
}

/// Opens a gRPC call or stream; an unknown cluster is ParseFailure, as in Envoy.
fn open_grpc(
    caller: &mut Caller<'_, VmState>,
    target: GrpcTarget,
    kind: CallKind,
) -> Result<u32, HostcallError> {
    let cluster = read_text(caller, target.upstream_name.0, target.upstream_name.1)?;
    let service = read_text(caller, target.service_name.0, target.service_name.1)?;
    let method = read_text(caller, target.method_name.0, target.method_name.1)?;
    let metadata = read_pairs(caller, target.initial_metadata.0, target.initial_metadata.1)?;
    let state = caller.data_mut();
    if !state.host.borrow().grpc_clusters.contains_key(&cluster) {
        state.misuse(format!(
            "{UNDECLARED} {cluster:?} (gRPC; Envoy: ParseFailure)"
        ));
        return Err(Status::ParseFailure.into());
    }
    let token = new_token(state, kind);
    let context = state.root_context;
    state.grpc.insert(
        token,
        GrpcState {
            cluster,
            service,
            method,
            metadata,
            context,
        },
    );
    Ok(token)
}

/// Sends one message of an open call and schedules the cluster's answer. One that comes after
/// `timeout` is, as in Envoy 1.40, gRPC status 14 (UNAVAILABLE) with the message
/// "upstream request timeout{response_timeout}" (its response details appended), not
/// DEADLINE_EXCEEDED: a plugin tells a timeout from a refused connection (also 14) only by
/// that message.
fn send_grpc(
    caller: &mut Caller<'_, VmState>,
    token: u32,
    message: Vec<u8>,
    stream: bool,
    timeout: u32,
) -> Result<(), HostcallError> {
    let state = caller.data_mut();
    let call = state.grpc.get(&token).ok_or(Status::NotFound)?;
    let request = GrpcRequest {
        cluster: call.cluster.clone(),
        service: call.service.clone(),
        method: call.method.clone(),
        metadata: call.metadata.clone(),
        message,
        stream,
    };
    let target = (state.me, call.context);
    state.host.borrow_mut().grpc_sent.push(request.clone());
    let reply = with_handler(
        |host| &mut host.grpc_clusters,
        state,
        &request.cluster,
        |handler| handler(&request),
    )
    .ok_or(Status::BadArgument)?;
    let timeout_ns = u64::from(timeout) * 1_000_000;
    let late = timeout > 0 && reply.delay.as_nanos() as u64 >= timeout_ns;
    let (delay_ns, reply) = if late {
        let timed_out = GrpcReply {
            status: 14,
            message: b"upstream request timeout{response_timeout}".to_vec(),
            delay: Duration::ZERO,
        };
        (timeout_ns, timed_out)
    } else {
        (reply.delay.as_nanos() as u64, reply)
    };
    state
        .host
        .borrow_mut()
        .schedule(delay_ns, target, EventKind::Grpc { token, reply });
    Ok(())
}

fn grpc_send(
    caller: &mut Caller<'_, VmState>,
    stream_id: u32,
    message_data: u32,
    message_size: u32,
    _end_stream: u32,
) -> Result<(), HostcallError> {
    let message = read(caller, message_data, message_size)?;
    if stream_id & 3 != CallKind::GrpcStream as u32 {
        return Err(Status::BadArgument.into());
    }
    send_grpc(caller, stream_id, message, true, 0)
}

fn grpc_cancel(
    caller: &mut Caller<'_, VmState>,
    call_or_stream_id: u32,
) -> Result<(), HostcallError> {
    caller
        .data_mut()
        .grpc
        .remove(&call_or_stream_id)
        .map(|_| ())
        .ok_or(Status::NotFound.into())
}

fn get_status(
    caller: &mut Caller<'_, VmState>,
    return_status_code: u32,
    return_status_message_data: u32,
    return_status_message_size: u32,
) -> Result<(), HostcallError> {
    let (code, message) = caller.data().status.clone();
    write_u32(caller, return_status_code, code)?;
    hand_over(
        caller,
        &message,
        return_status_message_data,
        return_status_message_size,
    )
}
