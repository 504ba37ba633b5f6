//! [`SlotStore`] over proxy-wasm shared data: one store per vm id, shared by every worker
//! thread of one Envoy.
//!
//! Through [`crate::ffi`]: every status becomes a value and the plugin's `failureMode` decides.
use crate::ffi::{self, CAS_MISMATCH, NOT_FOUND, OK};
use alloc::format;
use edge_core::store::{Entry, SlotStore, StoreError, Write};

/// Shared data as a [`SlotStore`].
///
/// `create` writes with version `u32::MAX`: Envoy accepts any version for a key that does not
/// exist and rejects it for one that does (versions come from a counter that starts at 1, so
/// an existing key is at `u32::MAX` only after four billion writes, and only for one write).
pub struct SharedData;

fn failed(op: &str, key: &str, status: u32) -> StoreError {
    StoreError(format!("shared data {op} {key}: status {status}"))
}

impl SlotStore for SharedData {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        match ffi::get_shared_data(key) {
            (OK, value, version) => Ok(Some(Entry { value, version })),
            (NOT_FOUND, ..) => Ok(None),
            (s, ..) => Err(failed("get", key, s)),
        }
    }

    fn compare_and_swap(&self, key: &str, value: &[u8], version: u32) -> Result<Write, StoreError> {
        // Version 0 would be an unconditional write.
        match ffi::set_shared_data(key, value, version.max(1)) {
            OK => Ok(Write::Done),
            CAS_MISMATCH => Ok(Write::Conflict),
            s => Err(failed("set", key, s)),
        }
    }

    fn create(&self, key: &str, value: &[u8]) -> Result<Write, StoreError> {
        match ffi::set_shared_data(key, value, u32::MAX) {
            OK => Ok(Write::Done),
            CAS_MISMATCH => Ok(Write::Conflict),
            s => Err(failed("create", key, s)),
        }
    }
}
