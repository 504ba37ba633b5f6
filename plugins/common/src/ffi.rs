//! The hostcalls plugins make on the request path, imported directly rather than through the
//! SDK's wrappers, which panic (trapping the VM for every later request) on any status they do
//! not expect. Each wrapper returns the raw status; callers turn it into a value and decide.
//! This is the crate's only `unsafe` code.
#![allow(unsafe_code)]

pub const OK: u32 = 0;
pub const NOT_FOUND: u32 = 1;
pub const CAS_MISMATCH: u32 = 8;
/// Header map types of the ABI.
pub const REQUEST_HEADERS: u32 = 0;
pub const HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
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
