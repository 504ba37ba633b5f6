//! Contexts, logging, clocks, timers and foreign functions, plus the Emscripten shims Envoy
//! registers for every module.

use super::memory::{hand_over, read, read_text, write_u32, write_u64, HostcallError};
use super::with_handler;
use crate::abi::{LogLevel, Status};
use crate::state::{Effect, VmState};
use wasmtime::{Caller, Linker};

pub(super) fn link(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    // § Logging: a message at a level.
    import!(linker, "proxy_log", log(log_level: u32, message_data: u32, message_size: u32));
    // § Logging: the host's level, so plugins skip lines it would drop.
    import!(linker, "proxy_get_log_level", get_log_level(return_log_level: u32));
    // § Clocks: wall time in ns (deprecated for WASI's clock_time_get, still used).
    import!(linker, "proxy_get_current_time_nanoseconds", get_current_time(return_time: u32));
    // § Timers: the root context's proxy_on_tick period.
    import!(linker, "proxy_set_tick_period_milliseconds", set_tick_period(tick_period: u32));
    // § Context lifecycle: which context later hostcalls act for.
    import!(linker, "proxy_set_effective_context", set_effective_context(context_id: u32));
    // § Context lifecycle: a context asked to finish after proxy_on_done returned false.
    import!(linker, "proxy_done", done());
    // § Foreign function interface: a host function by name.
    import!(linker, "proxy_call_foreign_function", call_foreign_function(
        name_data: u32, name_size: u32, arguments_data: u32, arguments_size: u32,
        return_results_data: u32, return_results_size: u32));
    // Emscripten/threads shims (not in the spec; Envoy provides them).
    linker.func_wrap(
        "env",
        "pthread_equal",
        |_: Caller<'_, VmState>, left: u32, right: u32| u32::from(left == right),
    )?;
    linker.func_wrap(
        "env",
        "emscripten_notify_memory_growth",
        |_: Caller<'_, VmState>, _memory_index: u32| {},
    )?;
    Ok(())
}

fn log(
    caller: &mut Caller<'_, VmState>,
    log_level: u32,
    message_data: u32,
    message_size: u32,
) -> Result<(), HostcallError> {
    let level = LogLevel::from_u32(log_level).ok_or(Status::BadArgument)?;
    let message = read(caller, message_data, message_size)?;
    caller
        .data()
        .log(level, String::from_utf8_lossy(&message).into_owned());
    Ok(())
}

fn get_log_level(
    caller: &mut Caller<'_, VmState>,
    return_log_level: u32,
) -> Result<(), HostcallError> {
    let level = caller.data().host.borrow().log_level as u32;
    write_u32(caller, return_log_level, level)
}

fn get_current_time(
    caller: &mut Caller<'_, VmState>,
    return_time: u32,
) -> Result<(), HostcallError> {
    let now = caller.data().host.borrow().realtime_ns;
    write_u64(caller, return_time, now)
}

fn set_tick_period(
    caller: &mut Caller<'_, VmState>,
    tick_period: u32,
) -> Result<(), HostcallError> {
    let now = caller.data().host.borrow().monotonic_ns;
    let state = caller.data_mut();
    state.tick_period_ms = u64::from(tick_period);
    state.next_tick_ns = (tick_period > 0).then(|| now + u64::from(tick_period) * 1_000_000);
    Ok(())
}

fn set_effective_context(
    caller: &mut Caller<'_, VmState>,
    context_id: u32,
) -> Result<(), HostcallError> {
    let state = caller.data_mut();
    if context_id != 0 && !state.is_context(context_id) {
        return Err(Status::BadArgument.into());
    }
    state.effective = context_id;
    Ok(())
}

/// Only meaningful while a root context is shutting down, which the harness never starts:
/// Envoy then answers NotFound.
fn done(caller: &mut Caller<'_, VmState>) -> Result<(), HostcallError> {
    let state = caller.data_mut();
    let context = state.effective;
    state.effects.push(Effect::Done { context });
    Err(Status::NotFound.into())
}

fn call_foreign_function(
    caller: &mut Caller<'_, VmState>,
    name_data: u32,
    name_size: u32,
    arguments_data: u32,
    arguments_size: u32,
    return_results_data: u32,
    return_results_size: u32,
) -> Result<(), HostcallError> {
    let name = read_text(caller, name_data, name_size)?;
    let arguments = read(caller, arguments_data, arguments_size)?;
    let result = with_handler(
        |host| &mut host.foreign,
        caller.data(),
        &name,
        |function| function(&arguments),
    )
    .ok_or(Status::NotFound)?;
    let results = result.map_err(HostcallError::Status)?;
    hand_over(caller, &results, return_results_data, return_results_size)
}
