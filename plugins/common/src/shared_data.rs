//! [`SlotStore`] over proxy-wasm shared data: one store per vm id, shared by every worker
//! thread of one Envoy.
//!
//! The two imports are called directly rather than through the SDK's wrappers, which panic
//! (trapping the VM for every later request) on any status they do not expect; here every
//! status becomes a value and the plugin's `failureMode` decides.
#![allow(unsafe_code)]

use crate::store::{Entry, SlotStore, StoreError, Write};

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;

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
}

/// Native builds (unit tests, tools) have no host: every call reports "unimplemented".
#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_get_shared_data(
    _: *const u8,
    _: usize,
    _: *mut *mut u8,
    _: *mut usize,
    _: *mut u32,
) -> u32 {
    12
}

#[cfg(not(target_arch = "wasm32"))]
unsafe fn proxy_set_shared_data(_: *const u8, _: usize, _: *const u8, _: usize, _: u32) -> u32 {
    12
}

/// Shared data as a [`SlotStore`].
///
/// `create` writes with version `u32::MAX`: Envoy accepts any version for a key that does not
/// exist and rejects it for one that does (versions come from a counter that starts at 1, so
/// an existing key is at `u32::MAX` only after four billion writes, and only for one write).
pub struct SharedData;

fn failed(op: &str, key: &str, status: u32) -> StoreError {
    StoreError(format!("shared data {op} {key}: status {status}"))
}

fn set(key: &str, value: &[u8], cas: u32) -> u32 {
    // SAFETY: pointers and lengths come from live slices; the host only reads them.
    unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) }
}

impl SlotStore for SharedData {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        let mut version: u32 = 0;
        // SAFETY: the out-pointers are live locals; on OK the host has allocated `size` bytes
        // at `data` through this module's own `proxy_on_memory_allocate`, so the buffer is
        // ours to own and free, exactly as the SDK does.
        let status = unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut version)
        };
        match status {
            OK => {
                let value = if data.is_null() || size == 0 {
                    Vec::new()
                } else {
                    unsafe { Vec::from_raw_parts(data, size, size) }
                };
                Ok(Some(Entry { value, version }))
            }
            NOT_FOUND => Ok(None),
            s => Err(failed("get", key, s)),
        }
    }

    fn compare_and_swap(&self, key: &str, value: &[u8], version: u32) -> Result<Write, StoreError> {
        // Version 0 would be an unconditional write.
        match set(key, value, version.max(1)) {
            OK => Ok(Write::Done),
            CAS_MISMATCH => Ok(Write::Conflict),
            s => Err(failed("set", key, s)),
        }
    }

    fn create(&self, key: &str, value: &[u8]) -> Result<Write, StoreError> {
        match set(key, value, u32::MAX) {
            OK => Ok(Write::Done),
            CAS_MISMATCH => Ok(Write::Conflict),
            s => Err(failed("create", key, s)),
        }
    }
}
