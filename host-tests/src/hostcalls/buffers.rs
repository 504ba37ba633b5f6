//! Buffers: stream bodies, callout and gRPC bodies, and the plugin's configurations.

use super::memory::{hand_over, read, write_u32, HostcallError};
use crate::abi::{buffer, Status};
use crate::state::{Direction, VmState};
use wasmtime::{Caller, Linker};

pub(super) fn link(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    // § Buffers: up to max_size bytes of a buffer from start.
    import!(linker, "proxy_get_buffer_bytes", get_buffer_bytes(
        buffer_id: u32, start: u32, max_size: u32, return_value_data: u32, return_value_size: u32));
    // § Buffers: replaces size bytes at start (prepend, append, replace).
    import!(linker, "proxy_set_buffer_bytes", set_buffer_bytes(
        buffer_id: u32, start: u32, size: u32, value_data: u32, value_size: u32));
    // § Buffers: a buffer's size.
    import!(linker, "proxy_get_buffer_status", get_buffer_status(
        buffer_id: u32, return_buffer_size: u32, return_ignored: u32));
    Ok(())
}

/// The stream body a buffer type names, if it names one.
fn body_direction(buffer_id: u32) -> Option<Direction> {
    match buffer_id {
        buffer::REQUEST_BODY => Some(Direction::Request),
        buffer::RESPONSE_BODY => Some(Direction::Response),
        _ => None,
    }
}

/// The bytes a buffer type names in the current callback, or NotFound.
fn buffer_contents(state: &VmState, buffer_id: u32) -> Result<Vec<u8>, HostcallError> {
    if let Some(direction) = body_direction(buffer_id) {
        // Envoy always has a body buffer: outside the body callback it is empty.
        let Some(binding) = state
            .bindings
            .get(&state.effective)
            .filter(|binding| binding.body == Some(direction))
        else {
            return Ok(Vec::new());
        };
        let exchange = binding.exchange.borrow();
        return Ok(exchange.data[direction]
            .get(binding.filter)
            .cloned()
            .unwrap_or_default());
    }
    let found = match buffer_id {
        buffer::CALL_RESPONSE_BODY => state.buffers.call_body.clone(),
        buffer::GRPC_RECEIVE => Some(state.buffers.grpc_message.clone().unwrap_or_default()),
        buffer::VM_CONFIGURATION => Some(state.plugin.vm_config.clone()),
        buffer::PLUGIN_CONFIGURATION => state
            .buffers
            .plugin_config
            .then(|| state.plugin.config.clone()),
        buffer::CALL_DATA => Some(state.buffers.call_data.clone().unwrap_or_default()),
        buffer::DOWNSTREAM_DATA | buffer::UPSTREAM_DATA => Some(Vec::new()),
        _ => return Err(Status::BadArgument.into()),
    };
    found.ok_or(HostcallError::Status(Status::NotFound))
}

fn get_buffer_bytes(
    caller: &mut Caller<'_, VmState>,
    buffer_id: u32,
    start: u32,
    max_size: u32,
    return_value_data: u32,
    return_value_size: u32,
) -> Result<(), HostcallError> {
    let contents = buffer_contents(caller.data(), buffer_id)?;
    // Envoy clamps: past the end, or beyond it, yields fewer (or no) bytes, never an error.
    let start = (start as usize).min(contents.len());
    let end = start.saturating_add(max_size as usize).min(contents.len());
    let slice = contents.get(start..end).unwrap_or_default().to_vec();
    hand_over(caller, &slice, return_value_data, return_value_size)
}

fn get_buffer_status(
    caller: &mut Caller<'_, VmState>,
    buffer_id: u32,
    return_buffer_size: u32,
    return_ignored: u32,
) -> Result<(), HostcallError> {
    let contents = buffer_contents(caller.data(), buffer_id)?;
    write_u32(caller, return_buffer_size, contents.len() as u32)?;
    write_u32(caller, return_ignored, 0)
}

fn set_buffer_bytes(
    caller: &mut Caller<'_, VmState>,
    buffer_id: u32,
    start: u32,
    size: u32,
    value_data: u32,
    value_size: u32,
) -> Result<(), HostcallError> {
    let value = read(caller, value_data, value_size)?;
    let Some(direction) = body_direction(buffer_id) else {
        return match buffer_id {
            // Network buffers exist but are empty for HTTP filters: writes go nowhere.
            buffer::DOWNSTREAM_DATA | buffer::UPSTREAM_DATA | buffer::GRPC_RECEIVE => Ok(()),
            // String-backed buffers are immutable; unknown types are bad arguments.
            _ => Err(Status::BadArgument.into()),
        };
    };
    let state = caller.data();
    // Outside the body callback the buffer is an empty scratch: the write is accepted and lost.
    let Some(binding) = state
        .bindings
        .get(&state.effective)
        .filter(|binding| binding.body == Some(direction))
    else {
        return Ok(());
    };
    let mut exchange = binding.exchange.borrow_mut();
    let body = exchange.data[direction]
        .get_mut(binding.filter)
        .ok_or(HostcallError::Status(Status::NotFound))?;
    // Envoy's rules: start 0 drains `size` bytes then prepends; start at or past the end appends.
    if start == 0 {
        let drained = (size as usize).min(body.len());
        body.drain(..drained);
        body.splice(0..0, value);
    } else if start as usize >= body.len() {
        body.extend_from_slice(&value);
    } else {
        return Err(Status::BadArgument.into());
    }
    Ok(())
}
