//! Every `env` import of proxy-wasm ABI 0.2.1, one module per area of the spec
//! (`abi-versions/v0.2.1/README.md`; each import names its section there). Each returns the
//! status Envoy returns in the same situation, and reaches guest memory only through
//! [`memory`].

pub(crate) mod memory;

use crate::state::{HostShared, VmState};
use std::collections::BTreeMap;
use wasmtime::Linker;

/// Registers one `env` import: counts the call (a host/VM crossing Envoy pays for), runs the
/// implementation and turns its result into the status code or trap the guest sees. Values
/// after the parameter list are passed after the guest's arguments, so that imports differing
/// only in what they do share one implementation.
macro_rules! import {
    ($linker:expr, $name:literal, $implementation:ident ($($parameter:ident : $type:ty),*)
        $(, $extra:expr)*) => {
        $linker.func_wrap(
            "env",
            $name,
            |mut caller: wasmtime::Caller<'_, crate::state::VmState>, $($parameter: $type),*|
                -> wasmtime::Result<u32> {
                *caller.data_mut().hostcalls.entry($name).or_default() += 1;
                let args = [$($parameter as i64),*];
                let traced = crate::trace::before(&mut caller, $name, &args);
                let result = $implementation(&mut caller $(, $parameter)* $(, $extra)*);
                crate::trace::after(&mut caller, traced, &args, &result);
                crate::hostcalls::memory::status_code(result)
            },
        )?;
    };
}

mod buffers;
mod callouts;
pub(crate) use callouts::UNDECLARED;
mod contexts;
mod headers;
mod metrics;
mod properties;
mod shared;
mod stream;

/// Registers every `env` import (WASI is linked by [`crate::wasi`]).
pub(crate) fn link(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    contexts::link(linker)?;
    buffers::link(linker)?;
    headers::link(linker)?;
    properties::link(linker)?;
    shared::link(linker)?;
    stream::link(linker)?;
    callouts::link(linker)?;
    metrics::link(linker)
}

/// Calls a scripted handler taken out of its table while it runs, so that it may itself
/// reach the host.
fn with_handler<H, T>(
    table: impl Fn(&mut HostShared) -> &mut BTreeMap<String, H>,
    state: &VmState,
    name: &str,
    call: impl FnOnce(&mut H) -> T,
) -> Option<T> {
    let mut handler = table(&mut state.host.borrow_mut()).remove(name)?;
    let answer = call(&mut handler);
    table(&mut state.host.borrow_mut()).insert(name.to_string(), handler);
    Some(answer)
}
