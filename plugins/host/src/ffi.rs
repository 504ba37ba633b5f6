//! The hostcalls plugins make on the request path, imported directly rather than through the
//! SDK's wrappers, which panic (trapping the VM for every later request) on any status they do
//! not expect. Each wrapper returns the raw status; callers turn it into a value and decide.
//! With the allocator (`alloc`), this is the crate's only `unsafe` code.
#![allow(unsafe_code)]

use edge_core::request::{serialized_count, walk_serialized};

pub const OK: u32 = 0;
pub const NOT_FOUND: u32 = 1;
pub const CAS_MISMATCH: u32 = 8;
/// Header map types of the ABI.
pub const REQUEST_HEADERS: u32 = 0;
pub const RESPONSE_HEADERS: u32 = 2;
pub const HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
/// Buffer types of the ABI.
pub const REQUEST_BODY: u32 = 0;
pub const RESPONSE_BODY: u32 = 1;
pub const HTTP_CALL_RESPONSE_BODY: u32 = 4;
pub const GRPC_RECEIVE_BUFFER: u32 = 5;
/// What native builds (unit tests, tools) answer: there is no host.
#[cfg(not(target_arch = "wasm32"))]
const UNIMPLEMENTED: u32 = 12;

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_details_data: *const u8,
        status_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_get_status(
        return_status_code: *mut u32,
        return_status_message_data: *mut *mut u8,
        return_status_message_size: *mut usize,
    ) -> u32;
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_get_status(_: *mut u32, _: *mut *mut u8, _: *mut usize) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_continue_stream(_: u32) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_get_current_time_nanoseconds(_: *mut u64) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_log(_: u32, _: *const u8, _: usize) -> u32 {
    UNIMPLEMENTED
}
#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_get_log_level(_: *mut u32) -> u32 {
    UNIMPLEMENTED
}
#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_define_metric(_: u32, _: *const u8, _: usize, _: *mut u32) -> u32 {
    UNIMPLEMENTED
}
#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_increment_metric(_: u32, _: i64) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_set_tick_period_milliseconds(_: u32) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_replace_header_map_value(
    _: u32,
    _: *const u8,
    _: usize,
    _: *const u8,
    _: usize,
) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_remove_header_map_value(_: u32, _: *const u8, _: usize) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::too_many_arguments)]
unsafe fn proxy_send_local_response(
    _: u32,
    _: *const u8,
    _: usize,
    _: *const u8,
    _: usize,
    _: *const u8,
    _: usize,
    _: i32,
) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_get_header_map_pairs(_: u32, _: *mut *mut u8, _: *mut usize) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_get_buffer_bytes(
    _: u32,
    _: usize,
    _: usize,
    _: *mut *mut u8,
    _: *mut usize,
) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_get_shared_data(
    _: *const u8,
    _: usize,
    _: *mut *mut u8,
    _: *mut usize,
    _: *mut u32,
) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_set_shared_data(_: *const u8, _: usize, _: *const u8, _: usize, _: u32) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_get_header_map_value(
    _: u32,
    _: *const u8,
    _: usize,
    _: *mut *mut u8,
    _: *mut usize,
) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_get_property(_: *const u8, _: usize, _: *mut *mut u8, _: *mut usize) -> u32 {
    UNIMPLEMENTED
}

/// Takes ownership of bytes the host returned.
///
/// SAFETY (for callers): on OK the host allocated `size` bytes at `data` through this module's
/// own `proxy_on_memory_allocate` export (the SDK's, a `Vec` allocation), so the buffer is ours
/// to own and free, exactly as the SDK itself does.
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// `proxy_get_shared_data`: (status, value, version).
pub fn get_shared_data(key: &str) -> (u32, Vec<u8>, u32) {
    let (mut data, mut size, mut version) = (std::ptr::null_mut(), 0usize, 0u32);
    // SAFETY: live slice and out-pointers to locals.
    let status = unsafe {
        proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut version)
    };
    if status != OK {
        return (status, Vec::new(), 0);
    }
    // SAFETY: see `owned`.
    (status, unsafe { owned(data, size) }, version)
}

/// `proxy_set_shared_data`: the status.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> u32 {
    // SAFETY: live slices; the host only reads them.
    unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) }
}

/// `proxy_get_header_map_value` on map `map`: the value, or `None` for any status but OK.
pub fn get_header(map: u32, name: &str) -> Option<Vec<u8>> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
    // SAFETY: live slice and out-pointers to locals.
    let status =
        unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) };
    // SAFETY: see `owned`.
    (status == OK).then(|| unsafe { owned(data, size) })
}

/// `proxy_get_property` for a path of segments (joined with NUL, as the ABI wants).
pub fn get_property(path: &[&str]) -> Option<Vec<u8>> {
    let joined = path.join("\0");
    let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
    // SAFETY: live slice and out-pointers to locals.
    let status = unsafe { proxy_get_property(joined.as_ptr(), joined.len(), &mut data, &mut size) };
    // SAFETY: see `owned`.
    (status == OK).then(|| unsafe { owned(data, size) })
}

/// `proxy_get_header_map_pairs` on map `map`: every (name, value), or `None` for any status
/// but OK (or a malformed answer).
pub fn get_header_pairs(map: u32) -> Option<Vec<(String, Vec<u8>)>> {
    decode_pairs(&get_header_pairs_raw(map)?)
}

/// `proxy_get_header_map_pairs` as the host serialised it (see [`decode_pairs`]), or `None`
/// for any status but OK.
pub fn get_header_pairs_raw(map: u32) -> Option<Vec<u8>> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
    // SAFETY: out-pointers to locals.
    let status = unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) };
    // SAFETY: see `owned`.
    (status == OK).then(|| unsafe { owned(data, size) })
}

/// `proxy_get_buffer_bytes`: up to `max` bytes from `start`, or `None` for any status but OK.
pub fn get_buffer(buffer: u32, start: usize, max: usize) -> Option<Vec<u8>> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
    // SAFETY: out-pointers to locals.
    let status = unsafe { proxy_get_buffer_bytes(buffer, start, max, &mut data, &mut size) };
    // SAFETY: see `owned`.
    (status == OK).then(|| unsafe { owned(data, size) })
}

/// `proxy_get_status`: the last callout's status code and message (code 2, Unknown, with no
/// message when the host cannot say).
pub fn status() -> (u32, String) {
    let (mut code, mut data, mut size) = (0u32, std::ptr::null_mut(), 0usize);
    // SAFETY: out-pointers to locals.
    let status = unsafe { proxy_get_status(&mut code, &mut data, &mut size) };
    if status != OK {
        return (2, String::new());
    }
    // SAFETY: see `owned`.
    let message = unsafe { owned(data, size) };
    (code, edge_core::text::into_text(message))
}

/// The host's wall clock in nanoseconds, or `None` for any status but OK.
pub fn current_time_ns() -> Option<u64> {
    let mut t = 0u64;
    // SAFETY: out-pointer to a local.
    (unsafe { proxy_get_current_time_nanoseconds(&mut t) } == OK).then_some(t)
}

/// Writes a log line at `level` (0 trace … 5 critical): the status.
pub fn log(level: u32, message: &str) -> u32 {
    // SAFETY: `message` outlives the call.
    unsafe { proxy_log(level, message.as_ptr(), message.len()) }
}

/// The host's log level (0 trace … 5 critical), `None` when it cannot say.
pub fn log_level() -> Option<u32> {
    let mut level = 0u32;
    // SAFETY: out-pointer to a local.
    (unsafe { proxy_get_log_level(&mut level) } == OK).then_some(level)
}

/// Defines a counter named `name`: its id, or `None` when the host refuses (the SDK's wrapper
/// would trap on an unexpected status).
pub fn define_counter(name: &str) -> Option<u32> {
    const COUNTER: u32 = 0;
    let mut id = 0u32;
    // SAFETY: `name` outlives the call; out-pointer to a local.
    let status = unsafe { proxy_define_metric(COUNTER, name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

/// Asks for `on_tick` every `ms` milliseconds (0 stops it): the status.
pub fn set_tick_period_ms(ms: u32) -> u32 {
    // SAFETY: a plain value.
    unsafe { proxy_set_tick_period_milliseconds(ms) }
}

/// Stream types of `proxy_continue_stream`.
pub const STREAM_REQUEST: u32 = 0;
pub const STREAM_RESPONSE: u32 = 1;

/// Resumes a paused request (`STREAM_REQUEST`) or response: the status.
pub fn continue_stream(stream: u32) -> u32 {
    // SAFETY: a plain value.
    unsafe { proxy_continue_stream(stream) }
}

/// Adds `offset` to metric `id`: the status.
pub fn increment_metric(id: u32, offset: i64) -> u32 {
    // SAFETY: plain values.
    unsafe { proxy_increment_metric(id, offset) }
}

/// Sets header `name` of map `map` to `value` (replacing every value), or removes it for
/// `None`: the status.
pub fn set_header(map: u32, name: &str, value: Option<&[u8]>) -> u32 {
    // SAFETY: live slices; the host only reads them.
    unsafe {
        match value {
            Some(v) => {
                proxy_replace_header_map_value(map, name.as_ptr(), name.len(), v.as_ptr(), v.len())
            }
            None => proxy_remove_header_map_value(map, name.as_ptr(), name.len()),
        }
    }
}

/// `proxy_send_local_response` (no details, not gRPC): the status. Header values may be any
/// bytes, as stored responses carry them.
pub fn send_local_response(status: u32, headers: &[(&str, &[u8])], body: &[u8]) -> u32 {
    let map = encode_pairs(headers);
    // SAFETY: live slices; the host only reads them.
    unsafe {
        proxy_send_local_response(
            status,
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        )
    }
}

/// The ABI's serialised header map (see [`walk_serialized`]).
pub fn encode_pairs(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let word = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = Vec::new();
    out.extend_from_slice(&word(pairs.len()));
    for (k, v) in pairs {
        out.extend_from_slice(&word(k.len()));
        out.extend_from_slice(&word(v.len()));
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// The first value of header `name` in serialised pairs, without decoding the others: `None`
/// when the bytes are malformed before it, `Some(None)` when the header is absent.
pub fn find_pair<'a>(bytes: &'a [u8], name: &str) -> Option<Option<&'a [u8]>> {
    let mut found = None;
    walk_serialized(bytes, |p| {
        if p.name == name.as_bytes() {
            found = Some(p.value);
        }
        found.is_none()
    })?;
    Some(found)
}

/// Every pair of the ABI's serialised header map (see [`walk_serialized`]) as owned text and
/// bytes.
pub fn decode_pairs(bytes: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::with_capacity(serialized_count(bytes));
    walk_serialized(bytes, |p| {
        out.push((edge_core::text::to_text(p.name), p.value.to_vec()));
        true
    })?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pair_is_found_without_decoding_the_rest() {
        let mut b = Vec::new();
        b.extend_from_slice(&2u32.to_le_bytes());
        for n in [1u32, 2, 2, 0] {
            b.extend_from_slice(&n.to_le_bytes());
        }
        b.extend_from_slice(b"a\0xy\0ok\0\0");
        assert_eq!(find_pair(&b, "a"), Some(Some(&b"xy"[..])));
        assert_eq!(find_pair(&b, "ok"), Some(Some(&b""[..])));
        assert_eq!(find_pair(&b, "x"), Some(None));
        assert_eq!(find_pair(&b[..b.len() - 3], "ok"), None);
        assert_eq!(find_pair(&[], "a"), Some(None));
    }

    #[test]
    fn header_pairs_decode_and_malformed_ones_do_not() {
        let mut b = Vec::new();
        b.extend_from_slice(&2u32.to_le_bytes());
        for n in [1u32, 2, 2, 0] {
            b.extend_from_slice(&n.to_le_bytes());
        }
        b.extend_from_slice(b"a\0xy\0ok\0\0");
        assert_eq!(
            decode_pairs(&b),
            Some(vec![
                ("a".into(), b"xy".to_vec()),
                ("ok".into(), Vec::new())
            ])
        );
        for cut in 1..b.len() - 1 {
            assert_eq!(decode_pairs(&b[..cut]), None, "cut at {cut}");
        }
        assert_eq!(decode_pairs(&[255, 255, 255, 255]), None);
        let pairs: [(&str, &[u8]); 2] = [("a", b"xy"), ("ok", b"")];
        assert_eq!(encode_pairs(&pairs), b);
    }
}
