//! Guest memory, the one way every import (and WASI) touches it: reads and writes are
//! bounds-checked, and data handed to the guest is allocated by the guest's own allocator.

use crate::abi::{self, Status};
use crate::state::{HeaderMap, VmState};
use wasmtime::{Caller, Extern};

/// Why a hostcall did not succeed: it returns a status to the guest, or traps it.
pub(crate) enum HostcallError {
    Status(Status),
    Trap(wasmtime::Error),
}

impl From<Status> for HostcallError {
    fn from(status: Status) -> Self {
        HostcallError::Status(status)
    }
}

/// What the guest sees of a hostcall: the status code, or the trap.
pub(crate) fn status_code(result: Result<(), HostcallError>) -> wasmtime::Result<u32> {
    match result {
        Ok(()) => Ok(Status::Ok.code()),
        Err(HostcallError::Status(status)) => Ok(status.code()),
        Err(HostcallError::Trap(error)) => Err(error),
    }
}

fn invalid_memory() -> HostcallError {
    HostcallError::Status(Status::InvalidMemoryAccess)
}

fn memory(caller: &mut Caller<'_, VmState>) -> Result<wasmtime::Memory, HostcallError> {
    caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(invalid_memory)
}

/// Copies `size` bytes at `data` out of guest memory; out of bounds is InvalidMemoryAccess.
pub(crate) fn read(
    caller: &mut Caller<'_, VmState>,
    data: u32,
    size: u32,
) -> Result<Vec<u8>, HostcallError> {
    let memory = memory(caller)?;
    memory
        .data(&*caller)
        .get(data as usize..)
        .and_then(|rest| rest.get(..size as usize))
        .map(<[u8]>::to_vec)
        .ok_or_else(invalid_memory)
}

/// Copies `bytes` into guest memory at `data`.
pub(crate) fn write(
    caller: &mut Caller<'_, VmState>,
    data: u32,
    bytes: &[u8],
) -> Result<(), HostcallError> {
    let memory = memory(caller)?;
    let destination = memory
        .data_mut(&mut *caller)
        .get_mut(data as usize..)
        .and_then(|rest| rest.get_mut(..bytes.len()))
        .ok_or_else(invalid_memory)?;
    destination.copy_from_slice(bytes);
    Ok(())
}

pub(crate) fn write_u32(
    caller: &mut Caller<'_, VmState>,
    data: u32,
    value: u32,
) -> Result<(), HostcallError> {
    write(caller, data, &value.to_le_bytes())
}

pub(crate) fn write_u64(
    caller: &mut Caller<'_, VmState>,
    data: u32,
    value: u64,
) -> Result<(), HostcallError> {
    write(caller, data, &value.to_le_bytes())
}

/// Allocates `size` bytes in the guest with its allocator (`malloc`, else
/// `proxy_on_memory_allocate`, Envoy's order). A trap in the allocator traps the caller.
fn allocate(caller: &mut Caller<'_, VmState>, size: u32) -> Result<u32, HostcallError> {
    let allocator = caller
        .get_export("malloc")
        .or_else(|| caller.get_export("proxy_on_memory_allocate"))
        .and_then(Extern::into_func)
        .ok_or_else(invalid_memory)?;
    let allocator = allocator
        .typed::<u32, u32>(&*caller)
        .map_err(|_| invalid_memory())?;
    *caller
        .data_mut()
        .hostcalls
        .entry("(guest allocation)")
        .or_default() += 1;
    crate::trace::allocation(caller.data_mut(), size);
    let address = allocator
        .call(&mut *caller, size)
        .map_err(HostcallError::Trap)?;
    if address == 0 {
        return Err(invalid_memory());
    }
    Ok(address)
}

/// Hands bytes to the guest: allocate, copy, then write address and size to the return slots.
/// Empty data is returned as address 0, size 0 (the Rust SDK reads that as `None`).
pub(crate) fn hand_over(
    caller: &mut Caller<'_, VmState>,
    bytes: &[u8],
    return_data: u32,
    return_size: u32,
) -> Result<(), HostcallError> {
    let address = if bytes.is_empty() {
        0
    } else {
        let address = allocate(caller, bytes.len() as u32)?;
        write(caller, address, bytes)?;
        address
    };
    write_u32(caller, return_data, address)?;
    write_u32(caller, return_size, bytes.len() as u32)
}

/// Reads UTF-8 text; anything else is BadArgument.
pub(crate) fn read_text(
    caller: &mut Caller<'_, VmState>,
    data: u32,
    size: u32,
) -> Result<String, HostcallError> {
    String::from_utf8(read(caller, data, size)?)
        .map_err(|_| HostcallError::Status(Status::BadArgument))
}

/// Reads serialised pairs. Like Envoy, over 1024 pairs or 1 MiB counts as malformed.
pub(crate) fn read_pairs(
    caller: &mut Caller<'_, VmState>,
    data: u32,
    size: u32,
) -> Result<HeaderMap, HostcallError> {
    let bytes = read(caller, data, size)?;
    if bytes.len() > 1024 * 1024 {
        return Err(Status::BadArgument.into());
    }
    abi::decode_map(&bytes)
        .filter(|pairs| pairs.len() <= 1024)
        .ok_or(HostcallError::Status(Status::BadArgument))
}

/// Pairs as Envoy reads them where malformed input is not an error: an empty list.
pub(crate) fn read_pairs_lenient(
    caller: &mut Caller<'_, VmState>,
    data: u32,
    size: u32,
) -> Result<HeaderMap, HostcallError> {
    match read_pairs(caller, data, size) {
        Err(HostcallError::Status(Status::BadArgument)) => Ok(Vec::new()),
        other => other,
    }
}
