//! The WASI preview1 subset Envoy offers a proxy-wasm module: stdout/stderr into the log,
//! environment from the VM config, empty args, the host clock, seeded randomness, proc_exit.

use crate::abi::LogLevel;
use crate::hostcalls::{read, write, write_u32, C};
use crate::state::VmState;
use wasmtime::Linker;

const SUCCESS: u32 = 0;
const BADF: u32 = 8;
const FAULT: u32 = 21;
const INVAL: u32 = 28;
const NOENT: u32 = 44;
const NOSYS: u32 = 52;
const NOTSUP: u32 = 58;

const W: &str = "wasi_snapshot_preview1";

fn errno<T>(r: Result<T, crate::hostcalls::Fail>) -> u32 {
    match r {
        Ok(_) => SUCCESS,
        Err(_) => FAULT,
    }
}

pub(crate) fn link(l: &mut Linker<VmState>) -> wasmtime::Result<()> {
    // fd_write: fd 1 → info log, fd 2 → error log (Envoy logs each write as one line).
    l.func_wrap(
        W,
        "fd_write",
        |mut c: C<'_>, fd: u32, iovs: u32, n: u32, ret: u32| -> u32 {
            let level = match fd {
                1 => LogLevel::Info,
                2 => LogLevel::Error,
                _ => return BADF,
            };
            let mut text = Vec::new();
            for i in 0..n {
                let Ok(iov) = read(&mut c, iovs.wrapping_add(i * 8), 8) else {
                    return FAULT;
                };
                let ptr = u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                match read(&mut c, ptr, len) {
                    Ok(b) => text.extend_from_slice(&b),
                    Err(_) => return FAULT,
                }
            }
            let written = text.len() as u32;
            let line = String::from_utf8_lossy(&text)
                .trim_end_matches('\n')
                .to_string();
            if !line.is_empty() {
                c.data().log(level, line);
            }
            errno(write_u32(&mut c, ret, written))
        },
    )?;
    l.func_wrap(W, "fd_read", |_: C<'_>, _: u32, _: u32, _: u32, _: u32| {
        NOSYS
    })?;
    l.func_wrap(W, "fd_close", |_: C<'_>, _: u32| SUCCESS)?;
    l.func_wrap(W, "fd_seek", |_: C<'_>, _: u32, _: i64, _: u32, _: u32| {
        SUCCESS
    })?;
    l.func_wrap(
        W,
        "fd_fdstat_get",
        |mut c: C<'_>, fd: u32, ret: u32| -> u32 {
            if fd != 1 && fd != 2 {
                return BADF;
            }
            // As Envoy: filetype 0, no flags, rights_base FD_WRITE (64).
            let mut stat = [0u8; 24];
            stat[8] = 64;
            errno(write(&mut c, ret, &stat))
        },
    )?;
    l.func_wrap(W, "fd_fdstat_set_flags", |_: C<'_>, _: u32, _: u32| NOSYS)?;
    l.func_wrap(W, "fd_prestat_get", |_: C<'_>, _: u32, _: u32| BADF)?;
    l.func_wrap(
        W,
        "fd_prestat_dir_name",
        |_: C<'_>, _: u32, _: u32, _: u32| NOSYS,
    )?;
    l.func_wrap(
        W,
        "path_open",
        |_: C<'_>, _: u32, _: u32, _: u32, _: u32, _: u32, _: i64, _: i64, _: u32, _: u32| NOENT,
    )?;
    l.func_wrap(
        W,
        "environ_sizes_get",
        |mut c: C<'_>, count: u32, size: u32| -> u32 {
            let env = env_strings(c.data());
            let total: usize = env.iter().map(Vec::len).sum();
            errno(
                write_u32(&mut c, count, env.len() as u32)
                    .and_then(|_| write_u32(&mut c, size, total as u32)),
            )
        },
    )?;
    l.func_wrap(
        W,
        "environ_get",
        |mut c: C<'_>, ptrs: u32, buf: u32| -> u32 {
            let env = env_strings(c.data());
            let mut at = buf;
            for (i, s) in env.iter().enumerate() {
                if write_u32(&mut c, ptrs.wrapping_add(i as u32 * 4), at).is_err()
                    || write(&mut c, at, s).is_err()
                {
                    return FAULT;
                }
                at = at.wrapping_add(s.len() as u32);
            }
            SUCCESS
        },
    )?;
    l.func_wrap(
        W,
        "args_sizes_get",
        |mut c: C<'_>, count: u32, size: u32| -> u32 {
            errno(write_u32(&mut c, count, 0).and_then(|_| write_u32(&mut c, size, 0)))
        },
    )?;
    l.func_wrap(W, "args_get", |_: C<'_>, _: u32, _: u32| SUCCESS)?;
    l.func_wrap(
        W,
        "clock_time_get",
        |mut c: C<'_>, id: u32, _precision: u64, ret: u32| -> u32 {
            let now = {
                let host = c.data().host.borrow();
                match id {
                    0 => host.realtime_ns,
                    1 => host.monotonic_ns,
                    _ => return NOTSUP,
                }
            };
            errno(write(&mut c, ret, &now.to_le_bytes()))
        },
    )?;
    l.func_wrap(W, "random_get", |mut c: C<'_>, ptr: u32, len: u32| -> u32 {
        if len > 64 * 1024 {
            return INVAL;
        }
        let mut buf = vec![0u8; len as usize];
        c.data().host.borrow_mut().rng.fill(&mut buf);
        errno(write(&mut c, ptr, &buf))
    })?;
    l.func_wrap(W, "sched_yield", |_: C<'_>| SUCCESS)?;
    l.func_wrap(
        W,
        "poll_oneoff",
        |mut c: C<'_>, _: u32, _: u32, _: u32, n: u32| -> u32 { errno(write_u32(&mut c, n, 0)) },
    )?;
    l.func_wrap(
        W,
        "proc_exit",
        // Envoy returns from proc_exit (the guest usually traps right after).
        |mut c: C<'_>, code: u32| {
            c.data().log(LogLevel::Trace, format!("proc_exit({code})"));
            c.data_mut().exit_code = Some(code);
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
