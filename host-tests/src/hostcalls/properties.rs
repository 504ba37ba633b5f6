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

fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// The value at `path`, or `None` (the hostcall then returns NotFound).
fn lookup(s: &VmState, path: &[u8]) -> Option<Vec<u8>> {
    let segs: Vec<&[u8]> = path.split(|b| *b == 0).collect();
    let seg = |i: usize| -> &[u8] { segs.get(i).copied().unwrap_or(&[]) };
    match (seg(0), segs.len()) {
        (b"plugin_name", 1) => return Some(s.plugin.name.clone().into_bytes()),
        (b"plugin_root_id", 1) => return Some(s.plugin.root_id.clone().into_bytes()),
        (b"plugin_vm_id", 1) => return Some(s.plugin.vm_id.clone().into_bytes()),
        _ => {}
    }
    let b = s.bindings.get(&s.effective)?;
    let ex = b.exchange.borrow();
    if let Some(v) = ex.properties.get(path) {
        return Some(v.clone());
    }
    stream_property(&ex, &segs, s.host.borrow().monotonic_ns)
}

fn stream_property(ex: &Exchange, segs: &[&[u8]], now_ns: u64) -> Option<Vec<u8>> {
    let req = &ex.maps.request_headers;
    let hdr = |name: &str| header_value(req, name).map(|v| v.as_bytes().to_vec());
    let seg = |i: usize| -> &[u8] { segs.get(i).copied().unwrap_or(&[]) };
    let path = header_value(req, ":path").unwrap_or("");
    let (url_path, query) = path.split_once('?').unwrap_or((path, ""));
    match (seg(0), seg(1)) {
        (b"request", b"path") => hdr(":path"),
        (b"request", b"url_path") => Some(url_path.as_bytes().to_vec()),
        (b"request", b"query") => Some(query.as_bytes().to_vec()),
        (b"request", b"host") => hdr(":authority"),
        (b"request", b"scheme") => hdr(":scheme"),
        (b"request", b"method") => hdr(":method"),
        (b"request", b"referer") => hdr("referer"),
        (b"request", b"useragent") => hdr("user-agent"),
        (b"request", b"id") => hdr("x-request-id"),
        (b"request", b"protocol") => Some(ex.protocol.clone().into_bytes()),
        (b"request", b"time") => Some(int(ex.start_ns as i64)),
        (b"request", b"duration") => ex
            .response_code
            .map(|_| int(now_ns.saturating_sub(ex.start_ns) as i64)),
        (b"request", b"size") => match hdr("content-length") {
            Some(v) => std::str::from_utf8(&v).ok()?.parse::<i64>().ok().map(int),
            None => Some(int(ex.request_bytes as i64)),
        },
        (b"request", b"headers") if segs.len() == 2 => Some(encode_map(req)),
        (b"request", b"headers") => joined(req, seg(2)),
        (b"response", b"code") => ex.response_code.map(|c| int(i64::from(c))),
        (b"response", b"code_details") => ex
            .response_code
            .map(|_| ex.code_details.clone().into_bytes()),
        (b"response", b"flags") => ex.response_code.map(|_| int(ex.response_flags as i64)),
        (b"response", b"size") => ex.response_code.map(|_| int(ex.response_bytes as i64)),
        (b"response", b"headers") if segs.len() == 2 => ex
            .response_code
            .map(|_| encode_map(&ex.maps.response_headers)),
        (b"response", b"headers") => joined(&ex.maps.response_headers, seg(2)),
        (b"source", b"address") => Some(ex.peer.source.clone().into_bytes()),
        (b"source", b"port") => port_of(&ex.peer.source).map(int),
        (b"destination", b"address") => Some(ex.peer.destination.clone().into_bytes()),
        (b"destination", b"port") => port_of(&ex.peer.destination).map(int),
        (b"connection", b"id") => Some(int(ex.connection_id as i64)),
        (b"connection_id", b"") => Some(int(ex.connection_id as i64)),
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
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v.as_slice())
        .collect();
    (!values.is_empty()).then(|| values.join(&b","[..]))
}

/// Port of an `ip:port` or `[ipv6]:port` address.
fn port_of(addr: &str) -> Option<i64> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}
