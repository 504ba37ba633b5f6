//! [`SlotStore`] over proxy-wasm shared data: one store per vm id, shared by every worker
//! thread of one Envoy.

use crate::store::{Entry, SlotStore, StoreError, Write};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

/// Shared data as a [`SlotStore`].
///
/// `create` writes with version `u32::MAX`: Envoy accepts any version for a key that does not
/// exist and rejects it for one that does (versions come from a counter that starts at 1, so
/// an existing key is at `u32::MAX` only after four billion writes, and only for one write).
pub struct SharedData;

fn failed(op: &str, key: &str, status: Status) -> StoreError {
    StoreError(format!("shared data {op} {key}: {status:?}"))
}

impl SlotStore for SharedData {
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), Some(version))) => Ok(Some(Entry { value, version })),
            Ok((None, Some(version))) => Ok(Some(Entry {
                value: Vec::new(),
                version,
            })),
            Ok((_, None)) => Ok(None),
            Err(status) => Err(failed("get", key, status)),
        }
    }

    fn compare_and_swap(&self, key: &str, value: &[u8], version: u32) -> Result<Write, StoreError> {
        // Version 0 would be an unconditional write.
        match hostcalls::set_shared_data(key, Some(value), Some(version.max(1))) {
            Ok(()) => Ok(Write::Done),
            Err(Status::CasMismatch) => Ok(Write::Conflict),
            Err(status) => Err(failed("set", key, status)),
        }
    }

    fn create(&self, key: &str, value: &[u8]) -> Result<Write, StoreError> {
        match hostcalls::set_shared_data(key, Some(value), Some(u32::MAX)) {
            Ok(()) => Ok(Write::Done),
            Err(Status::CasMismatch) => Ok(Write::Conflict),
            Err(status) => Err(failed("create", key, status)),
        }
    }
}
