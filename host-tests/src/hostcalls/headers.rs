//! HTTP fields: the stream's four header maps, and the maps of callout and gRPC responses.

use super::memory::{hand_over, read, read_pairs_lenient, write_u32, HostcallError};
use crate::abi::{self, map, Status};
use crate::state::{HeaderMap, StreamMap, VmState};
use wasmtime::{Caller, Linker};

pub(super) fn link(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    // § HTTP fields: every pair of a map, serialised.
    import!(linker, "proxy_get_header_map_pairs", get_header_map_pairs(
        map_id: u32, return_serialized_pairs_data: u32, return_serialized_pairs_size: u32));
    // § HTTP fields: replaces every pair of a map.
    import!(linker, "proxy_set_header_map_pairs", set_header_map_pairs(
        map_id: u32, serialized_pairs_data: u32, serialized_pairs_size: u32));
    // § HTTP fields: the byte size of a map.
    import!(linker, "proxy_get_header_map_size", get_header_map_size(
        map_id: u32, return_serialized_pairs_size: u32));
    // § HTTP fields: the first value of a key.
    import!(linker, "proxy_get_header_map_value", get_header_map_value(
        map_id: u32, key_data: u32, key_size: u32, return_value_data: u32, return_value_size: u32));
    // § HTTP fields: sets a key to one value.
    import!(linker, "proxy_replace_header_map_value", set_header_map_value(
        map_id: u32, key_data: u32, key_size: u32, value_data: u32, value_size: u32),
        ValueEdit::Replace);
    // § HTTP fields: adds a value to a key.
    import!(linker, "proxy_add_header_map_value", set_header_map_value(
        map_id: u32, key_data: u32, key_size: u32, value_data: u32, value_size: u32),
        ValueEdit::Add);
    // § HTTP fields: removes a key.
    import!(linker, "proxy_remove_header_map_value", remove_header_map_value(
        map_id: u32, key_data: u32, key_size: u32));
    Ok(())
}

/// Header names are stored lower-cased, as Envoy's codecs do.
pub(super) fn lower(name: &[u8]) -> Vec<u8> {
    name.to_ascii_lowercase()
}

/// Runs `edit` on the map `map_id` of the effective context. Maps of the stream are reachable
/// only while Envoy still holds them for this filter; call maps only inside the callout
/// callback.
fn with_map<T>(
    caller: &mut Caller<'_, VmState>,
    map_id: u32,
    write: bool,
    edit: impl FnOnce(&mut HeaderMap) -> Result<T, HostcallError>,
) -> Result<T, HostcallError> {
    let state = caller.data_mut();
    if let Some(stream_map) = StreamMap::from_abi(map_id) {
        let binding = state
            .bindings
            .get(&state.effective)
            .ok_or(Status::BadArgument)?;
        // In the access-log phase request/response headers and response trailers are
        // readable; request trailers are gone (NotFound); nothing is writable.
        let request_trailers = stream_map == StreamMap::RequestTrailers;
        let in_log = binding.log_phase && !write && !request_trailers;
        if !(binding.open[stream_map] || in_log) {
            state.misuse(format!(
                "header map {map_id} used outside the callback that holds it (Envoy: status {})",
                if binding.log_phase && !write { 1 } else { 2 }
            ));
            return Err(if binding.log_phase && request_trailers && !write {
                Status::NotFound.into()
            } else {
                Status::BadArgument.into()
            });
        }
        let mut exchange = binding.exchange.borrow_mut();
        return edit(&mut exchange.maps[stream_map]);
    }
    let held = match map_id {
        map::CALL_RESPONSE_HEADERS..=map::CALL_RESPONSE_TRAILERS
        | map::GRPC_INITIAL_METADATA..=map::GRPC_TRAILING_METADATA
            if write =>
        {
            return Err(Status::BadArgument.into())
        }
        map::CALL_RESPONSE_HEADERS => &mut state.buffers.call_headers,
        map::CALL_RESPONSE_TRAILERS => &mut state.buffers.call_trailers,
        map::GRPC_INITIAL_METADATA => &mut state.buffers.grpc_initial,
        map::GRPC_TRAILING_METADATA => &mut state.buffers.grpc_trailing,
        _ => return Err(Status::BadArgument.into()),
    };
    edit(held.as_mut().ok_or(Status::NotFound)?)
}

/// A value with CR or LF in a stream's header map: Envoy 1.40 stores it and its HTTP/1.1
/// codec writes it raw, so the peer reads the rest as headers of its own (header injection).
/// The harness does the same split on the wire and reports it here.
fn note_line_breaks(state: &VmState, map_id: u32, key: &[u8], value: &[u8]) {
    if StreamMap::from_abi(map_id).is_some() && value.iter().any(|b| *b == b'\r' || *b == b'\n') {
        state.misuse(format!(
            "header {:?} in map {map_id} set with CR/LF in its value: Envoy writes it raw, and \
             the peer reads the text after the line break as separate headers (header \
             injection)",
            String::from_utf8_lossy(key)
        ));
    }
}

/// Never fails for a known type: an unavailable or empty map comes back empty (address 0).
fn get_header_map_pairs(
    caller: &mut Caller<'_, VmState>,
    map_id: u32,
    return_serialized_pairs_data: u32,
    return_serialized_pairs_size: u32,
) -> Result<(), HostcallError> {
    if map_id > map::CALL_RESPONSE_TRAILERS {
        return Err(Status::BadArgument.into());
    }
    let serialized = match with_map(caller, map_id, false, |pairs| Ok(abi::encode_map(pairs))) {
        Ok(bytes) if bytes.len() > 4 => bytes,
        Ok(_) => Vec::new(),
        Err(HostcallError::Trap(error)) => return Err(HostcallError::Trap(error)),
        Err(HostcallError::Status(_)) => Vec::new(),
    };
    hand_over(
        caller,
        &serialized,
        return_serialized_pairs_data,
        return_serialized_pairs_size,
    )
}

/// Envoy reads malformed pairs as an empty list, so a malformed set clears the map.
fn set_header_map_pairs(
    caller: &mut Caller<'_, VmState>,
    map_id: u32,
    serialized_pairs_data: u32,
    serialized_pairs_size: u32,
) -> Result<(), HostcallError> {
    let pairs = read_pairs_lenient(caller, serialized_pairs_data, serialized_pairs_size)?;
    for (key, value) in &pairs {
        note_line_breaks(caller.data(), map_id, key, value);
    }
    with_map(caller, map_id, true, |map| {
        map.clear();
        map.extend(pairs.into_iter().map(|(key, value)| (lower(&key), value)));
        Ok(())
    })
}

/// Envoy reports the map's byte size (keys + values), and only for the four stream maps.
fn get_header_map_size(
    caller: &mut Caller<'_, VmState>,
    map_id: u32,
    return_serialized_pairs_size: u32,
) -> Result<(), HostcallError> {
    if map_id > map::RESPONSE_TRAILERS {
        return Err(Status::BadArgument.into());
    }
    let size = with_map(caller, map_id, false, |map| {
        Ok(map
            .iter()
            .map(|(key, value)| key.len() + value.len())
            .sum::<usize>())
    })?;
    write_u32(caller, return_serialized_pairs_size, size as u32)
}

fn get_header_map_value(
    caller: &mut Caller<'_, VmState>,
    map_id: u32,
    key_data: u32,
    key_size: u32,
    return_value_data: u32,
    return_value_size: u32,
) -> Result<(), HostcallError> {
    let key = lower(&read(caller, key_data, key_size)?);
    let value = with_map(caller, map_id, false, |map| {
        map.iter()
            .find(|(name, _)| *name == key)
            .map(|(_, value)| value.clone())
            .ok_or(HostcallError::Status(Status::NotFound))
    })?;
    hand_over(caller, &value, return_value_data, return_value_size)
}

/// How a value joins a key's values.
enum ValueEdit {
    /// The first value becomes it and the others go (a new key is added).
    Replace,
    /// It is added after them.
    Add,
}

fn set_header_map_value(
    caller: &mut Caller<'_, VmState>,
    map_id: u32,
    key_data: u32,
    key_size: u32,
    value_data: u32,
    value_size: u32,
    edit: ValueEdit,
) -> Result<(), HostcallError> {
    let key = lower(&read(caller, key_data, key_size)?);
    let value = read(caller, value_data, value_size)?;
    note_line_breaks(caller.data(), map_id, &key, &value);
    with_map(caller, map_id, true, |map| {
        let first = map.iter().position(|(name, _)| *name == key);
        match (edit, first) {
            (ValueEdit::Replace, Some(first)) => {
                if let Some(slot) = map.get_mut(first) {
                    slot.1 = value;
                }
                let mut index = 0;
                map.retain(|(name, _)| {
                    index += 1;
                    index - 1 == first || *name != key
                });
            }
            (ValueEdit::Replace, None) | (ValueEdit::Add, _) => map.push((key, value)),
        }
        Ok(())
    })
}

fn remove_header_map_value(
    caller: &mut Caller<'_, VmState>,
    map_id: u32,
    key_data: u32,
    key_size: u32,
) -> Result<(), HostcallError> {
    let key = lower(&read(caller, key_data, key_size)?);
    with_map(caller, map_id, true, |map| {
        map.retain(|(name, _)| *name != key);
        Ok(())
    })
}
