//! Properties: `proxy_get_property` paths with Envoy's encodings (strings as raw bytes,
//! integers as 8-byte little-endian, booleans as one byte, timestamps as int64 nanoseconds,
//! maps in the ABI's pair format; path segments arrive joined by NUL), and the values a
//! plugin sets on its stream.

use super::memory::{hand_over, read, HostcallError};
use crate::abi::{encode_map, Status};
use crate::state::{header_value, Exchange, HeaderMap, VmState};
use wasmtime::{Caller, Linker};

pub(super) fn link(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    // § Properties: the value at a path.
    import!(linker, "proxy_get_property", get_property(
        path_data: u32, path_size: u32, return_value_data: u32, return_value_size: u32));
    // § Properties: a value on the stream, readable back at that path.
    import!(linker, "proxy_set_property", set_property(
        path_data: u32, path_size: u32, value_data: u32, value_size: u32));
    Ok(())
}

fn get_property(
    caller: &mut Caller<'_, VmState>,
    path_data: u32,
    path_size: u32,
    return_value_data: u32,
    return_value_size: u32,
) -> Result<(), HostcallError> {
    let path = read(caller, path_data, path_size)?;
    let value = lookup(caller.data(), &path).ok_or(Status::NotFound)?;
    hand_over(caller, &value, return_value_data, return_value_size)
}

fn set_property(
    caller: &mut Caller<'_, VmState>,
    path_data: u32,
    path_size: u32,
    value_data: u32,
    value_size: u32,
) -> Result<(), HostcallError> {
    let path = read(caller, path_data, path_size)?;
    let value = read(caller, value_data, value_size)?;
    let state = caller.data();
    let binding = state
        .bindings
        .get(&state.effective)
        .ok_or(Status::NotFound)?;
    binding.exchange.borrow_mut().properties.insert(path, value);
    Ok(())
}

/// Integers are 8-byte little-endian, as Envoy encodes them.
fn int(value: i64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

/// The value at `path`, or `None` (the hostcall then returns NotFound).
fn lookup(state: &VmState, path: &[u8]) -> Option<Vec<u8>> {
    let segments: Vec<&[u8]> = path.split(|b| *b == 0).collect();
    let segment = |index: usize| -> &[u8] { segments.get(index).copied().unwrap_or(&[]) };
    match (segment(0), segments.len()) {
        (b"plugin_name", 1) => return Some(state.plugin.name.clone().into_bytes()),
        (b"plugin_root_id", 1) => return Some(state.plugin.root_id.clone().into_bytes()),
        (b"plugin_vm_id", 1) => return Some(state.plugin.vm_id.clone().into_bytes()),
        _ => {}
    }
    let binding = state.bindings.get(&state.effective)?;
    let exchange = binding.exchange.borrow();
    if let Some(value) = exchange.properties.get(path) {
        return Some(value.clone());
    }
    stream_property(&exchange, &segments, state.host.borrow().monotonic_ns)
}

/// A property of the stream, from its headers and stream info.
fn stream_property(exchange: &Exchange, segments: &[&[u8]], now_ns: u64) -> Option<Vec<u8>> {
    let request = &exchange.maps.request_headers;
    let header = |name: &str| header_value(request, name).map(|value| value.as_bytes().to_vec());
    let segment = |index: usize| -> &[u8] { segments.get(index).copied().unwrap_or(&[]) };
    let path = header_value(request, ":path").unwrap_or("");
    let (url_path, query) = path.split_once('?').unwrap_or((path, ""));
    match (segment(0), segment(1)) {
        (b"request", b"path") => header(":path"),
        (b"request", b"url_path") => Some(url_path.as_bytes().to_vec()),
        (b"request", b"query") => Some(query.as_bytes().to_vec()),
        (b"request", b"host") => header(":authority"),
        (b"request", b"scheme") => header(":scheme"),
        (b"request", b"method") => header(":method"),
        (b"request", b"referer") => header("referer"),
        (b"request", b"useragent") => header("user-agent"),
        (b"request", b"id") => header("x-request-id"),
        (b"request", b"protocol") => Some(exchange.protocol.clone().into_bytes()),
        (b"request", b"time") => Some(int(exchange.start_ns as i64)),
        (b"request", b"duration") => exchange
            .response_code
            .map(|_| int(now_ns.saturating_sub(exchange.start_ns) as i64)),
        (b"request", b"size") => match header("content-length") {
            Some(value) => std::str::from_utf8(&value)
                .ok()?
                .parse::<i64>()
                .ok()
                .map(int),
            None => Some(int(exchange.request_bytes as i64)),
        },
        (b"request", b"headers") if segments.len() == 2 => Some(encode_map(request)),
        (b"request", b"headers") => joined(request, segment(2)),
        (b"response", b"code") => exchange.response_code.map(|code| int(i64::from(code))),
        (b"response", b"code_details") => exchange
            .response_code
            .map(|_| exchange.code_details.clone().into_bytes()),
        (b"response", b"flags") => exchange
            .response_code
            .map(|_| int(exchange.response_flags as i64)),
        (b"response", b"size") => exchange
            .response_code
            .map(|_| int(exchange.response_bytes as i64)),
        (b"response", b"headers") if segments.len() == 2 => exchange
            .response_code
            .map(|_| encode_map(&exchange.maps.response_headers)),
        (b"response", b"headers") => joined(&exchange.maps.response_headers, segment(2)),
        (b"source", b"address") => Some(exchange.peer.source.clone().into_bytes()),
        (b"source", b"port") => port_of(&exchange.peer.source).map(int),
        (b"destination", b"address") => Some(exchange.peer.destination.clone().into_bytes()),
        (b"destination", b"port") => port_of(&exchange.peer.destination).map(int),
        (b"connection", b"id") => Some(int(exchange.connection_id as i64)),
        (b"connection_id", b"") => Some(int(exchange.connection_id as i64)),
        (b"connection", b"mtls") => Some(vec![0]),
        (b"connection", b"requested_server_name") => Some(Vec::new()),
        _ => None,
    }
}

/// All values of a header joined with ",", as Envoy's `request.headers.<name>` does.
fn joined(map: &HeaderMap, name: &[u8]) -> Option<Vec<u8>> {
    let name = name.to_ascii_lowercase();
    let values: Vec<&[u8]> = map
        .iter()
        .filter(|(key, _)| *key == name)
        .map(|(_, value)| value.as_slice())
        .collect();
    (!values.is_empty()).then(|| values.join(&b","[..]))
}

/// Port of an `ip:port` or `[ipv6]:port` address.
fn port_of(address: &str) -> Option<i64> {
    address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
}
