//! The ABI itself: the hostcalls plugins make, imported directly (the SDK's wrappers panic,
//! trapping the VM for every later request, on any status they do not expect), and the
//! callbacks the module exports. Each wrapper returns the raw status; callers turn it into a
//! value and decide. With the allocator (`alloc`), this is the crate's only `unsafe` code.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
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
pub const PLUGIN_CONFIGURATION: u32 = 7;
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
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_grpc_call(
        upstream_data: *const u8,
        upstream_size: usize,
        service_data: *const u8,
        service_size: usize,
        method_data: *const u8,
        method_size: usize,
        metadata_data: *const u8,
        metadata_size: usize,
        message_data: *const u8,
        message_size: usize,
        timeout_ms: u32,
        return_token: *mut u32,
    ) -> u32;
}

// The linker's constructor entry (not a host import).
#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
extern "C" {
    fn __wasm_call_ctors();
}

/// Native builds have one context at a time: making it effective always works.
#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_set_effective_context(_: u32) -> u32 {
    OK
}

#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::too_many_arguments)]
unsafe fn proxy_http_call(
    _: *const u8,
    _: usize,
    _: *const u8,
    _: usize,
    _: *const u8,
    _: usize,
    _: *const u8,
    _: usize,
    _: u32,
    _: *mut u32,
) -> u32 {
    UNIMPLEMENTED
}

#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::too_many_arguments)]
unsafe fn proxy_grpc_call(
    _: *const u8,
    _: usize,
    _: *const u8,
    _: usize,
    _: *const u8,
    _: usize,
    _: *const u8,
    _: usize,
    _: *const u8,
    _: usize,
    _: u32,
    _: *mut u32,
) -> u32 {
    UNIMPLEMENTED
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
/// own `proxy_on_memory_allocate` export (a boxed slice of exactly `size` bytes), so the buffer
/// is ours to own and free.
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// `proxy_get_shared_data`: (status, value, version).
pub fn get_shared_data(key: &str) -> (u32, Vec<u8>, u32) {
    let (mut data, mut size, mut version) = (core::ptr::null_mut(), 0usize, 0u32);
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
    let (mut data, mut size) = (core::ptr::null_mut(), 0usize);
    // SAFETY: live slice and out-pointers to locals.
    let status =
        unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) };
    // SAFETY: see `owned`.
    (status == OK).then(|| unsafe { owned(data, size) })
}

/// `proxy_get_property` for a path of segments (joined with NUL, as the ABI wants).
pub fn get_property(path: &[&str]) -> Option<Vec<u8>> {
    let joined = path.join("\0");
    let (mut data, mut size) = (core::ptr::null_mut(), 0usize);
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
    let (mut data, mut size) = (core::ptr::null_mut(), 0usize);
    // SAFETY: out-pointers to locals.
    let status = unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) };
    // SAFETY: see `owned`.
    (status == OK).then(|| unsafe { owned(data, size) })
}

/// `proxy_get_buffer_bytes`: up to `max` bytes from `start`, or `None` for any status but OK.
pub fn get_buffer(buffer: u32, start: usize, max: usize) -> Option<Vec<u8>> {
    let (mut data, mut size) = (core::ptr::null_mut(), 0usize);
    // SAFETY: out-pointers to locals.
    let status = unsafe { proxy_get_buffer_bytes(buffer, start, max, &mut data, &mut size) };
    // SAFETY: see `owned`.
    (status == OK).then(|| unsafe { owned(data, size) })
}

/// `proxy_get_status`: the last callout's status code and message (code 2, Unknown, with no
/// message when the host cannot say).
pub fn status() -> (u32, String) {
    let (mut code, mut data, mut size) = (0u32, core::ptr::null_mut(), 0usize);
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
    define_metric(0, name)
}

/// Defines a metric of `kind` (0 counter, 1 gauge, 2 histogram): its id, or `None` when the
/// host refuses.
pub fn define_metric(kind: u32, name: &str) -> Option<u32> {
    let mut id = 0u32;
    // SAFETY: `name` outlives the call; out-pointer to a local.
    let status = unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) };
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
            core::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        )
    }
}

/// Makes context `id` the one later hostcalls act on (a callout's answer is read through the
/// context that made it): the status.
pub fn set_effective_context(id: u32) -> u32 {
    // SAFETY: a plain value.
    unsafe { proxy_set_effective_context(id) }
}

/// `proxy_http_call` (no trailers): the callout's token, or the refusing status.
pub fn http_call(
    cluster: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
    timeout_ms: u32,
) -> Result<u32, u32> {
    let map = encode_pairs(headers);
    let mut token = 0u32;
    // SAFETY: live slices the host only reads; out-pointer to a local.
    let status = unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            map.as_ptr(),
            map.len(),
            body.as_ptr(),
            body.len(),
            core::ptr::null(),
            0,
            timeout_ms,
            &mut token,
        )
    };
    if status == OK {
        Ok(token)
    } else {
        Err(status)
    }
}

/// `proxy_grpc_call` (unary, no initial metadata): the callout's token, or the refusing
/// status.
pub fn grpc_call(
    cluster: &str,
    service: &str,
    method: &str,
    message: &[u8],
    timeout_ms: u32,
) -> Result<u32, u32> {
    let mut token = 0u32;
    // SAFETY: live slices the host only reads; out-pointer to a local.
    let status = unsafe {
        proxy_grpc_call(
            cluster.as_ptr(),
            cluster.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            core::ptr::null(),
            0,
            message.as_ptr(),
            message.len(),
            timeout_ms,
            &mut token,
        )
    };
    if status == OK {
        Ok(token)
    } else {
        Err(status)
    }
}

/// Runs the module's static constructors (WASI's reactor start), before anything else.
pub fn call_ctors() {
    #[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
    // SAFETY: wasi-libc's constructor entry, run once from `_initialize` as its ABI asks.
    unsafe {
        __wasm_call_ctors();
    }
}

/// The callbacks the host calls, each handed to [`crate::dispatch`]. Envoy passes booleans
/// as 0 or 1 in an i32; they are read as "not zero", which no host value can make invalid.
#[cfg(target_arch = "wasm32")]
mod exports {
    use crate::dispatch as d;

    #[no_mangle]
    pub extern "C" fn proxy_abi_version_0_2_1() {}

    /// Where the host puts the bytes it returns: `owned` takes them back as a `Vec` of exactly
    /// this size. Out of memory is a null the host turns into a failed hostcall (which the
    /// wrappers read as absent), not a trap.
    #[no_mangle]
    pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
        let Ok(layout) = alloc::alloc::Layout::array::<u8>(size) else {
            return core::ptr::null_mut();
        };
        if size == 0 {
            return core::ptr::NonNull::<u8>::dangling().as_ptr();
        }
        // SAFETY: a layout of non-zero size; a null result is passed on, never dereferenced.
        unsafe { alloc::alloc::alloc(layout) }
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_context_create(id: u32, root_id: u32) {
        d::create(id, root_id);
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_vm_start(id: u32, size: usize) -> u32 {
        u32::from(d::with_root(id, |r| r.on_vm_start(size)).unwrap_or(false))
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_configure(id: u32, size: usize) -> u32 {
        u32::from(d::with_root(id, |r| r.on_configure(size)).unwrap_or(false))
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_tick(id: u32) {
        d::with_root(id, |r| r.on_tick());
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_request_headers(id: u32, headers: usize, eos: u32) -> u32 {
        d::stream_action(id, |s| s.on_http_request_headers(headers, eos != 0))
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_request_body(id: u32, size: usize, eos: u32) -> u32 {
        d::stream_action(id, |s| s.on_http_request_body(size, eos != 0))
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_request_trailers(id: u32, trailers: usize) -> u32 {
        d::stream_action(id, |s| s.on_http_request_trailers(trailers))
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_response_headers(id: u32, headers: usize, eos: u32) -> u32 {
        d::stream_action(id, |s| s.on_http_response_headers(headers, eos != 0))
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_response_body(id: u32, size: usize, eos: u32) -> u32 {
        d::stream_action(id, |s| s.on_http_response_body(size, eos != 0))
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_response_trailers(id: u32, trailers: usize) -> u32 {
        d::stream_action(id, |s| s.on_http_response_trailers(trailers))
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_log(id: u32) {
        d::with_stream(id, |s| s.on_log());
    }

    /// Every context is done when the host asks: none holds work past its stream.
    #[no_mangle]
    pub extern "C" fn proxy_on_done(_id: u32) -> u32 {
        1
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_delete(id: u32) {
        d::delete(id);
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_http_call_response(
        _id: u32,
        token: u32,
        headers: usize,
        body: usize,
        trailers: usize,
    ) {
        d::http_call_response(token, headers, body, trailers);
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_grpc_receive(_id: u32, token: u32, size: usize) {
        d::grpc_receive(token, size);
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_grpc_close(_id: u32, token: u32, status: u32) {
        d::grpc_close(token, status);
    }
}

/// Hostcalls no plugin makes, for the bench's replay filter, which makes whatever a trace
/// recorded. Each returns the host's status (natively: unimplemented).
pub mod replayed {
    #[cfg(target_arch = "wasm32")]
    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_add_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
        fn proxy_get_metric(metric_id: u32, return_value: *mut u64) -> u32;
        fn proxy_set_buffer_bytes(
            buffer_type: u32,
            start: usize,
            size: usize,
            data: *const u8,
            data_size: usize,
        ) -> u32;
    }

    pub fn add_header(map: u32, name: &str, value: &[u8]) -> u32 {
        #[cfg(target_arch = "wasm32")]
        {
            // SAFETY: live slices; the host only reads them.
            unsafe {
                proxy_add_header_map_value(
                    map,
                    name.as_ptr(),
                    name.len(),
                    value.as_ptr(),
                    value.len(),
                )
            }
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = (map, name, value);
            super::UNIMPLEMENTED
        }
    }

    pub fn record_metric(id: u32, value: u64) -> u32 {
        #[cfg(target_arch = "wasm32")]
        {
            // SAFETY: plain values.
            unsafe { proxy_record_metric(id, value) }
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = (id, value);
            super::UNIMPLEMENTED
        }
    }

    pub fn get_metric(id: u32) -> u32 {
        let mut value = 0u64;
        #[cfg(target_arch = "wasm32")]
        {
            // SAFETY: out-pointer to a local.
            unsafe { proxy_get_metric(id, &mut value) }
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = (id, &mut value);
            super::UNIMPLEMENTED
        }
    }

    pub fn set_buffer(buffer: u32, start: usize, size: usize, data: &[u8]) -> u32 {
        #[cfg(target_arch = "wasm32")]
        {
            // SAFETY: a live slice; the host only reads it.
            unsafe { proxy_set_buffer_bytes(buffer, start, size, data.as_ptr(), data.len()) }
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = (buffer, start, size, data);
            super::UNIMPLEMENTED
        }
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
    use alloc::vec;

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
