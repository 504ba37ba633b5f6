//! The WASI preview1 subset Envoy offers a proxy-wasm module: stdout/stderr into the log,
//! environment from the VM config, empty args, the host clock, seeded randomness, proc_exit.

use crate::abi::LogLevel;
use crate::hostcalls::memory::{read, write, write_u32, HostcallError};
use crate::state::VmState;
use wasmtime::{Caller, Linker};

const SUCCESS: u32 = 0;
const BADF: u32 = 8;
const FAULT: u32 = 21;
const INVAL: u32 = 28;
const NOENT: u32 = 44;
const NOSYS: u32 = 52;
const NOTSUP: u32 = 58;

const WASI: &str = "wasi_snapshot_preview1";

/// WASI's answer for a memory access: a fault when it was out of bounds.
fn errno<T>(result: Result<T, HostcallError>) -> u32 {
    match result {
        Ok(_) => SUCCESS,
        Err(_) => FAULT,
    }
}

/// Registers the `wasi_snapshot_preview1` imports (proxy-wasm ABI v0.2.1 § Logging, Clocks,
/// Randomness and Environment variables name the ones plugins rely on).
pub(crate) fn link(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    // § Logging: fd 1 → info log, fd 2 → error log (Envoy logs each write as one line).
    linker.func_wrap(
        WASI,
        "fd_write",
        |mut caller: Caller<'_, VmState>, fd: u32, iovs: u32, n: u32, ret: u32| -> u32 {
            let level = match fd {
                1 => LogLevel::Info,
                2 => LogLevel::Error,
                _ => return BADF,
            };
            let mut text = Vec::new();
            for i in 0..n {
                let Ok(iov) = read(&mut caller, iovs.wrapping_add(i * 8), 8) else {
                    return FAULT;
                };
                let ptr = u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                match read(&mut caller, ptr, len) {
                    Ok(b) => text.extend_from_slice(&b),
                    Err(_) => return FAULT,
                }
            }
            let written = text.len() as u32;
            let line = String::from_utf8_lossy(&text)
                .trim_end_matches('\n')
                .to_string();
            if !line.is_empty() {
                caller.data().log(level, line);
            }
            errno(write_u32(&mut caller, ret, written))
        },
    )?;
    // Not in the spec, answered as Envoy does: no input, no files, stdout/stderr only.
    linker.func_wrap(
        WASI,
        "fd_read",
        |_: Caller<'_, VmState>, _: u32, _: u32, _: u32, _: u32| NOSYS,
    )?;
    linker.func_wrap(WASI, "fd_close", |_: Caller<'_, VmState>, _: u32| SUCCESS)?;
    linker.func_wrap(
        WASI,
        "fd_seek",
        |_: Caller<'_, VmState>, _: u32, _: i64, _: u32, _: u32| SUCCESS,
    )?;
    linker.func_wrap(
        WASI,
        "fd_fdstat_get",
        |mut caller: Caller<'_, VmState>, fd: u32, ret: u32| -> u32 {
            if fd != 1 && fd != 2 {
                return BADF;
            }
            // As Envoy: filetype 0, no flags, rights_base FD_WRITE (64).
            let mut stat = [0u8; 24];
            stat[8] = 64;
            errno(write(&mut caller, ret, &stat))
        },
    )?;
    linker.func_wrap(
        WASI,
        "fd_fdstat_set_flags",
        |_: Caller<'_, VmState>, _: u32, _: u32| NOSYS,
    )?;
    linker.func_wrap(
        WASI,
        "fd_prestat_get",
        |_: Caller<'_, VmState>, _: u32, _: u32| BADF,
    )?;
    linker.func_wrap(
        WASI,
        "fd_prestat_dir_name",
        |_: Caller<'_, VmState>, _: u32, _: u32, _: u32| NOSYS,
    )?;
    linker.func_wrap(
        WASI,
        "path_open",
        |_: Caller<'_, VmState>,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: i64,
         _: i64,
         _: u32,
         _: u32| NOENT,
    )?;
    // § Environment variables: count and size of the VM's variables.
    linker.func_wrap(
        WASI,
        "environ_sizes_get",
        |mut caller: Caller<'_, VmState>, count: u32, size: u32| -> u32 {
            let env = env_strings(caller.data());
            let total: usize = env.iter().map(Vec::len).sum();
            errno(
                write_u32(&mut caller, count, env.len() as u32)
                    .and_then(|_| write_u32(&mut caller, size, total as u32)),
            )
        },
    )?;
    // § Environment variables: the VM's variables.
    linker.func_wrap(
        WASI,
        "environ_get",
        |mut caller: Caller<'_, VmState>, ptrs: u32, buf: u32| -> u32 {
            let env = env_strings(caller.data());
            let mut at = buf;
            for (i, s) in env.iter().enumerate() {
                if write_u32(&mut caller, ptrs.wrapping_add(i as u32 * 4), at).is_err()
                    || write(&mut caller, at, s).is_err()
                {
                    return FAULT;
                }
                at = at.wrapping_add(s.len() as u32);
            }
            SUCCESS
        },
    )?;
    // Not in the spec: no arguments.
    linker.func_wrap(
        WASI,
        "args_sizes_get",
        |mut caller: Caller<'_, VmState>, count: u32, size: u32| -> u32 {
            errno(write_u32(&mut caller, count, 0).and_then(|_| write_u32(&mut caller, size, 0)))
        },
    )?;
    linker.func_wrap(
        WASI,
        "args_get",
        |_: Caller<'_, VmState>, _: u32, _: u32| SUCCESS,
    )?;
    // § Clocks: realtime (0) and monotonic (1) host time.
    linker.func_wrap(
        WASI,
        "clock_time_get",
        |mut caller: Caller<'_, VmState>, id: u32, _precision: u64, ret: u32| -> u32 {
            let now = {
                let host = caller.data().host.borrow();
                match id {
                    0 => host.realtime_ns,
                    1 => host.monotonic_ns,
                    _ => return NOTSUP,
                }
            };
            errno(write(&mut caller, ret, &now.to_le_bytes()))
        },
    )?;
    // § Randomness: the edge's seeded generator.
    linker.func_wrap(
        WASI,
        "random_get",
        |mut caller: Caller<'_, VmState>, ptr: u32, len: u32| -> u32 {
            if len > 64 * 1024 {
                return INVAL;
            }
            let mut buf = vec![0u8; len as usize];
            caller.data().host.borrow_mut().rng.fill(&mut buf);
            errno(write(&mut caller, ptr, &buf))
        },
    )?;
    linker.func_wrap(WASI, "sched_yield", |_: Caller<'_, VmState>| SUCCESS)?;
    linker.func_wrap(
        WASI,
        "poll_oneoff",
        |mut caller: Caller<'_, VmState>, _: u32, _: u32, _: u32, n: u32| -> u32 {
            errno(write_u32(&mut caller, n, 0))
        },
    )?;
    linker.func_wrap(
        WASI,
        "proc_exit",
        // Envoy returns from proc_exit (the guest usually traps right after).
        |mut caller: Caller<'_, VmState>, code: u32| {
            caller
                .data()
                .log(LogLevel::Trace, format!("proc_exit({code})"));
            caller.data_mut().exit_code = Some(code);
        },
    )?;
    Ok(())
}

/// `KEY=VALUE\0` strings of the VM's configured environment variables.
fn env_strings(s: &VmState) -> Vec<Vec<u8>> {
    s.plugin
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}\0").into_bytes())
        .collect()
}
