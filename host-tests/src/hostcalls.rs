//! Every `env` import of proxy-wasm ABI 0.2.1, registered on a wasmtime `Linker`. Each returns
//! the `WasmResult` Envoy returns in the same situation; guest memory is only touched through
//! the bounds-checked helpers below, and data handed to the guest is allocated by the guest's
//! own allocator export.

use crate::abi::{self, map, LogLevel, MetricType, Status};
use crate::state::{
    CalloutReply, CalloutRequest, Effect, EventKind, GrpcReply, GrpcRequest, GrpcState, HeaderMap,
    LocalReply, Metric, Queue, VmState, REQ, RESP,
};
use crate::{properties, wasi};
use std::time::Duration;
use wasmtime::{Caller, Extern, Linker};

pub(crate) type C<'a> = Caller<'a, VmState>;

/// A hostcall either returns a status to the guest or traps it.
pub(crate) enum Fail {
    Status(Status),
    Trap(wasmtime::Error),
}

impl From<Status> for Fail {
    fn from(s: Status) -> Self {
        Fail::Status(s)
    }
}

pub(crate) type R = Result<(), Fail>;

fn finish(r: R) -> wasmtime::Result<u32> {
    match r {
        Ok(()) => Ok(Status::Ok.code()),
        Err(Fail::Status(s)) => Ok(s.code()),
        Err(Fail::Trap(e)) => Err(e),
    }
}

// ---- guest memory -------------------------------------------------------------------------

fn memory(c: &mut C) -> Result<wasmtime::Memory, Fail> {
    c.get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or(Fail::Status(Status::InvalidMemoryAccess))
}

/// Copies `len` bytes at `ptr` out of guest memory; out of bounds is InvalidMemoryAccess.
pub(crate) fn read(c: &mut C, ptr: u32, len: u32) -> Result<Vec<u8>, Fail> {
    let m = memory(c)?;
    m.data(&*c)
        .get(ptr as usize..)
        .and_then(|s| s.get(..len as usize))
        .map(<[u8]>::to_vec)
        .ok_or(Fail::Status(Status::InvalidMemoryAccess))
}

pub(crate) fn write(c: &mut C, ptr: u32, bytes: &[u8]) -> R {
    let m = memory(c)?;
    let dst = m
        .data_mut(&mut *c)
        .get_mut(ptr as usize..)
        .and_then(|s| s.get_mut(..bytes.len()))
        .ok_or(Fail::Status(Status::InvalidMemoryAccess))?;
    dst.copy_from_slice(bytes);
    Ok(())
}

pub(crate) fn write_u32(c: &mut C, ptr: u32, v: u32) -> R {
    write(c, ptr, &v.to_le_bytes())
}

fn write_u64(c: &mut C, ptr: u32, v: u64) -> R {
    write(c, ptr, &v.to_le_bytes())
}

/// Allocates `len` bytes in the guest with its allocator (`malloc`, else
/// `proxy_on_memory_allocate`, Envoy's order). A trap in the allocator traps the caller.
fn alloc(c: &mut C, len: u32) -> Result<u32, Fail> {
    let f = c
        .get_export("malloc")
        .or_else(|| c.get_export("proxy_on_memory_allocate"))
        .and_then(Extern::into_func)
        .ok_or(Fail::Status(Status::InvalidMemoryAccess))?;
    let f = f
        .typed::<u32, u32>(&*c)
        .map_err(|_| Fail::Status(Status::InvalidMemoryAccess))?;
    *c.data_mut()
        .hostcalls
        .entry("(guest allocation)")
        .or_default() += 1;
    let p = f.call(&mut *c, len).map_err(Fail::Trap)?;
    if p == 0 {
        return Err(Fail::Status(Status::InvalidMemoryAccess));
    }
    Ok(p)
}

/// Hands bytes to the guest: allocate, copy, then write pointer and size to the return slots.
/// Empty data is returned as pointer 0, size 0 (the Rust SDK reads that as `None`).
pub(crate) fn give(c: &mut C, bytes: &[u8], ptr_slot: u32, size_slot: u32) -> R {
    let addr = if bytes.is_empty() {
        0
    } else {
        let addr = alloc(c, bytes.len() as u32)?;
        write(c, addr, bytes)?;
        addr
    };
    write_u32(c, ptr_slot, addr)?;
    write_u32(c, size_slot, bytes.len() as u32)
}

fn read_str(c: &mut C, ptr: u32, len: u32) -> Result<String, Fail> {
    String::from_utf8(read(c, ptr, len)?).map_err(|_| Fail::Status(Status::BadArgument))
}

/// Reads serialised pairs. Like Envoy, over 1024 pairs or 1 MiB counts as malformed.
fn read_map(c: &mut C, ptr: u32, len: u32) -> Result<HeaderMap, Fail> {
    let bytes = read(c, ptr, len)?;
    if bytes.len() > 1024 * 1024 {
        return Err(Status::BadArgument.into());
    }
    abi::decode_map(&bytes)
        .filter(|m| m.len() <= 1024)
        .ok_or(Fail::Status(Status::BadArgument))
}

/// Pairs as Envoy reads them where malformed input is not an error: an empty list.
fn read_map_lenient(c: &mut C, ptr: u32, len: u32) -> Result<HeaderMap, Fail> {
    match read_map(c, ptr, len) {
        Err(Fail::Status(Status::BadArgument)) => Ok(Vec::new()),
        other => other,
    }
}

fn lower(k: &[u8]) -> Vec<u8> {
    k.to_ascii_lowercase()
}

// ---- registration -------------------------------------------------------------------------

macro_rules! env {
    ($l:expr, $name:literal, $f:ident ($($a:ident : $t:ty),*)) => {
        $l.func_wrap("env", $name, |mut c: C<'_>, $($a: $t),*| -> wasmtime::Result<u32> {
            *c.data_mut().hostcalls.entry($name).or_default() += 1;
            finish($f(&mut c, $($a),*))
        })?;
    };
}

/// Registers every `env` import and the WASI subset Envoy offers.
pub(crate) fn link(l: &mut Linker<VmState>) -> wasmtime::Result<()> {
    // Logging (spec: "Logging")
    env!(l, "proxy_log", log(level: u32, ptr: u32, len: u32));
    env!(l, "proxy_get_log_level", get_log_level(ret: u32));
    // Clock and timers (spec: "Clock", "Timers")
    env!(l, "proxy_get_current_time_nanoseconds", get_time(ret: u32));
    env!(l, "proxy_set_tick_period_milliseconds", set_tick(period: u32));
    // Buffers (spec: "Buffers")
    env!(l, "proxy_get_buffer_bytes", get_buffer_bytes(t: u32, start: u32, max: u32, rp: u32, rs: u32));
    env!(l, "proxy_set_buffer_bytes", set_buffer_bytes(t: u32, start: u32, size: u32, p: u32, len: u32));
    env!(l, "proxy_get_buffer_status", get_buffer_status(t: u32, rs: u32, rf: u32));
    // Header maps (spec: "HTTP fields")
    env!(l, "proxy_get_header_map_pairs", get_map_pairs(t: u32, rp: u32, rs: u32));
    env!(l, "proxy_set_header_map_pairs", set_map_pairs(t: u32, p: u32, len: u32));
    env!(l, "proxy_get_header_map_size", get_map_size(t: u32, rs: u32));
    env!(l, "proxy_get_header_map_value", get_map_value(t: u32, kp: u32, kl: u32, rp: u32, rs: u32));
    env!(l, "proxy_replace_header_map_value", replace_map_value(t: u32, kp: u32, kl: u32, vp: u32, vl: u32));
    env!(l, "proxy_add_header_map_value", add_map_value(t: u32, kp: u32, kl: u32, vp: u32, vl: u32));
    env!(l, "proxy_remove_header_map_value", remove_map_value(t: u32, kp: u32, kl: u32));
    // Properties (spec: "Properties")
    env!(l, "proxy_get_property", get_property(pp: u32, pl: u32, rp: u32, rs: u32));
    env!(l, "proxy_set_property", set_property(pp: u32, pl: u32, vp: u32, vl: u32));
    // Shared data (spec: "Shared data")
    env!(l, "proxy_get_shared_data", get_shared_data(kp: u32, kl: u32, rp: u32, rs: u32, rc: u32));
    env!(l, "proxy_set_shared_data", set_shared_data(kp: u32, kl: u32, vp: u32, vl: u32, cas: u32));
    // Shared queues (spec: "Shared queues")
    env!(l, "proxy_register_shared_queue", register_queue(np: u32, nl: u32, ret: u32));
    env!(l, "proxy_resolve_shared_queue", resolve_queue(vp: u32, vl: u32, np: u32, nl: u32, ret: u32));
    env!(l, "proxy_enqueue_shared_queue", enqueue(id: u32, vp: u32, vl: u32));
    env!(l, "proxy_dequeue_shared_queue", dequeue(id: u32, rp: u32, rs: u32));
    // Stream control (spec: "HTTP stream control")
    env!(l, "proxy_continue_stream", continue_stream(t: u32));
    env!(l, "proxy_close_stream", close_stream(t: u32));
    env!(l, "proxy_send_local_response", send_local_response(
        status: u32, dp: u32, dl: u32, bp: u32, bl: u32, hp: u32, hl: u32, grpc: i32));
    // HTTP callouts (spec: "HTTP callouts")
    env!(l, "proxy_http_call", http_call(
        up: u32, ul: u32, hp: u32, hl: u32, bp: u32, bl: u32, tp: u32, tl: u32, timeout: u32, ret: u32));
    // gRPC callouts (spec: "gRPC callouts")
    env!(l, "proxy_grpc_call", grpc_call(
        up: u32, ul: u32, sp: u32, sl: u32, mp: u32, ml: u32, ip: u32, il: u32, gp: u32, gl: u32, timeout: u32, ret: u32));
    env!(l, "proxy_grpc_stream", grpc_stream(
        up: u32, ul: u32, sp: u32, sl: u32, mp: u32, ml: u32, ip: u32, il: u32, ret: u32));
    env!(l, "proxy_grpc_send", grpc_send(token: u32, mp: u32, ml: u32, end: u32));
    env!(l, "proxy_grpc_cancel", grpc_cancel(token: u32));
    env!(l, "proxy_grpc_close", grpc_close(token: u32));
    env!(l, "proxy_get_status", get_status(rc: u32, rp: u32, rs: u32));
    // Contexts (spec: "Contexts")
    env!(l, "proxy_set_effective_context", set_effective_context(id: u32));
    env!(l, "proxy_done", done());
    // Foreign functions (spec: "Foreign function interface")
    env!(l, "proxy_call_foreign_function", call_foreign(np: u32, nl: u32, ap: u32, al: u32, rp: u32, rs: u32));
    // Metrics (spec: "Metrics")
    env!(l, "proxy_define_metric", define_metric(t: u32, np: u32, nl: u32, ret: u32));
    env!(l, "proxy_increment_metric", increment_metric(id: u32, offset: i64));
    env!(l, "proxy_record_metric", record_metric(id: u32, value: u64));
    env!(l, "proxy_get_metric", get_metric(id: u32, ret: u32));
    // Emscripten/threads shims Envoy registers for every module.
    l.func_wrap("env", "pthread_equal", |_: C<'_>, a: u32, b: u32| {
        u32::from(a == b)
    })?;
    l.func_wrap(
        "env",
        "emscripten_notify_memory_growth",
        |_: C<'_>, _: u32| {},
    )?;
    wasi::link(l)
}

// ---- logging, clock, timers ---------------------------------------------------------------

fn log(c: &mut C, level: u32, ptr: u32, len: u32) -> R {
    let level = LogLevel::from_u32(level).ok_or(Status::BadArgument)?;
    let msg = read(c, ptr, len)?;
    c.data()
        .log(level, String::from_utf8_lossy(&msg).into_owned());
    Ok(())
}

fn get_log_level(c: &mut C, ret: u32) -> R {
    let level = c.data().host.borrow().log_level as u32;
    write_u32(c, ret, level)
}

fn get_time(c: &mut C, ret: u32) -> R {
    let now = c.data().host.borrow().realtime_ns;
    write_u64(c, ret, now)
}

fn set_tick(c: &mut C, period: u32) -> R {
    let now = c.data().host.borrow().monotonic_ns;
    let s = c.data_mut();
    s.tick_period_ms = u64::from(period);
    s.next_tick_ns = (period > 0).then(|| now + u64::from(period) * 1_000_000);
    Ok(())
}

// ---- buffers ------------------------------------------------------------------------------

/// The bytes a buffer type names in the current callback, or NotFound.
fn buffer_of(s: &VmState, t: u32) -> Result<Vec<u8>, Fail> {
    let found = match t {
        abi::buffer::REQUEST_BODY | abi::buffer::RESPONSE_BODY => {
            let dir = if t == abi::buffer::REQUEST_BODY {
                REQ
            } else {
                RESP
            };
            // Envoy always has a body buffer: outside the body callback it is empty.
            let Some(b) = s.bindings.get(&s.effective).filter(|b| b.body == Some(dir)) else {
                return Ok(Vec::new());
            };
            let ex = b.exchange.borrow();
            Some(ex.data[dir].get(b.filter).cloned().unwrap_or_default())
        }
        abi::buffer::CALL_RESPONSE_BODY => s.buffers.call_body.clone(),
        abi::buffer::GRPC_RECEIVE => Some(s.buffers.grpc_message.clone().unwrap_or_default()),
        abi::buffer::VM_CONFIGURATION => Some(s.plugin.vm_config.clone()),
        abi::buffer::PLUGIN_CONFIGURATION => {
            s.buffers.plugin_config.then(|| s.plugin.config.clone())
        }
        abi::buffer::CALL_DATA => Some(s.buffers.call_data.clone().unwrap_or_default()),
        abi::buffer::DOWNSTREAM_DATA | abi::buffer::UPSTREAM_DATA => Some(Vec::new()),
        _ => return Err(Status::BadArgument.into()),
    };
    found.ok_or(Fail::Status(Status::NotFound))
}

fn get_buffer_bytes(c: &mut C, t: u32, start: u32, max: u32, rp: u32, rs: u32) -> R {
    let buf = buffer_of(c.data(), t)?;
    // Envoy clamps: past the end, or beyond it, yields fewer (or no) bytes, never an error.
    let start = (start as usize).min(buf.len());
    let end = start.saturating_add(max as usize).min(buf.len());
    let slice = buf.get(start..end).unwrap_or_default().to_vec();
    give(c, &slice, rp, rs)
}

fn get_buffer_status(c: &mut C, t: u32, rs: u32, rf: u32) -> R {
    let buf = buffer_of(c.data(), t)?;
    write_u32(c, rs, buf.len() as u32)?;
    write_u32(c, rf, 0)
}

fn set_buffer_bytes(c: &mut C, t: u32, start: u32, size: u32, p: u32, len: u32) -> R {
    let data = read(c, p, len)?;
    let s = c.data();
    let dir = match t {
        abi::buffer::REQUEST_BODY => REQ,
        abi::buffer::RESPONSE_BODY => RESP,
        // Network buffers exist but are empty for HTTP filters: writes go nowhere.
        abi::buffer::DOWNSTREAM_DATA | abi::buffer::UPSTREAM_DATA | abi::buffer::GRPC_RECEIVE => {
            return Ok(())
        }
        // String-backed buffers are immutable; unknown types are bad arguments.
        _ => return Err(Status::BadArgument.into()),
    };
    // Outside the body callback the buffer is an empty scratch: the write is accepted and lost.
    let Some(b) = s.bindings.get(&s.effective).filter(|b| b.body == Some(dir)) else {
        return Ok(());
    };
    let mut ex = b.exchange.borrow_mut();
    let buf = ex.data[dir]
        .get_mut(b.filter)
        .ok_or(Fail::Status(Status::NotFound))?;
    // Envoy's rules: start 0 drains `size` bytes then prepends; start at or past the end appends.
    if start == 0 {
        let drain = (size as usize).min(buf.len());
        buf.drain(..drain);
        buf.splice(0..0, data);
    } else if start as usize >= buf.len() {
        buf.extend_from_slice(&data);
    } else {
        return Err(Status::BadArgument.into());
    }
    Ok(())
}

// ---- header maps --------------------------------------------------------------------------

/// Runs `f` on the map `t` of the effective context. Maps of the stream are reachable only while
/// Envoy still holds them for this filter; call maps only inside the callout callback.
fn with_map<T>(
    c: &mut C,
    t: u32,
    write: bool,
    f: impl FnOnce(&mut HeaderMap) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let s = c.data_mut();
    match t {
        map::REQUEST_HEADERS
        | map::REQUEST_TRAILERS
        | map::RESPONSE_HEADERS
        | map::RESPONSE_TRAILERS => {
            let b = s.bindings.get(&s.effective).ok_or(Status::BadArgument)?;
            let i = t as usize;
            // In the access-log phase request/response headers and response trailers are
            // readable; request trailers are gone (NotFound); nothing is writable.
            let in_log = b.log_phase && !write && t != map::REQUEST_TRAILERS;
            let readable = b.open.get(i).copied().unwrap_or(false) || in_log;
            if !readable {
                s.misuse(format!(
                    "header map {t} used outside the callback that holds it (Envoy: status {})",
                    if b.log_phase && !write { 1 } else { 2 }
                ));
                return Err(if b.log_phase && t == map::REQUEST_TRAILERS && !write {
                    Status::NotFound.into()
                } else {
                    Status::BadArgument.into()
                });
            }
            let mut ex = b.exchange.borrow_mut();
            let m = ex
                .maps
                .get_mut(i)
                .ok_or(Fail::Status(Status::BadArgument))?;
            f(m)
        }
        map::CALL_RESPONSE_HEADERS..=map::CALL_RESPONSE_TRAILERS
        | map::GRPC_INITIAL_METADATA..=map::GRPC_TRAILING_METADATA
            if write =>
        {
            Err(Status::BadArgument.into())
        }
        map::CALL_RESPONSE_HEADERS => {
            let m = s.buffers.call_headers.as_mut().ok_or(Status::NotFound)?;
            f(m)
        }
        map::CALL_RESPONSE_TRAILERS => {
            let m = s.buffers.call_trailers.as_mut().ok_or(Status::NotFound)?;
            f(m)
        }
        map::GRPC_INITIAL_METADATA => {
            let m = s.buffers.grpc_initial.as_mut().ok_or(Status::NotFound)?;
            f(m)
        }
        map::GRPC_TRAILING_METADATA => {
            let m = s.buffers.grpc_trailing.as_mut().ok_or(Status::NotFound)?;
            f(m)
        }
        _ => Err(Status::BadArgument.into()),
    }
}

/// Never fails for a known type: an unavailable or empty map comes back empty (pointer 0).
fn get_map_pairs(c: &mut C, t: u32, rp: u32, rs: u32) -> R {
    if t > map::CALL_RESPONSE_TRAILERS {
        return Err(Status::BadArgument.into());
    }
    let bytes = match with_map(c, t, false, |m| Ok(abi::encode_map(m))) {
        Ok(b) if b.len() > 4 => b,
        Ok(_) => Vec::new(),
        Err(Fail::Trap(e)) => return Err(Fail::Trap(e)),
        Err(Fail::Status(_)) => Vec::new(),
    };
    give(c, &bytes, rp, rs)
}

/// Envoy reads malformed pairs as an empty list, so a malformed set clears the map.
fn set_map_pairs(c: &mut C, t: u32, p: u32, len: u32) -> R {
    let pairs = read_map(c, p, len).or_else(|e| match e {
        Fail::Status(Status::BadArgument) => Ok(Vec::new()),
        other => Err(other),
    })?;
    with_map(c, t, true, |m| {
        m.clear();
        m.extend(pairs.into_iter().map(|(k, v)| (lower(&k), v)));
        Ok(())
    })
}

/// Envoy reports the map's byte size (keys + values), and only for the four stream maps.
fn get_map_size(c: &mut C, t: u32, rs: u32) -> R {
    if t > map::RESPONSE_TRAILERS {
        return Err(Status::BadArgument.into());
    }
    let size = with_map(c, t, false, |m| {
        Ok(m.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>())
    })?;
    write_u32(c, rs, size as u32)
}

fn get_map_value(c: &mut C, t: u32, kp: u32, kl: u32, rp: u32, rs: u32) -> R {
    let key = lower(&read(c, kp, kl)?);
    let value = with_map(c, t, false, |m| {
        m.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .ok_or(Fail::Status(Status::NotFound))
    })?;
    give(c, &value, rp, rs)
}

fn replace_map_value(c: &mut C, t: u32, kp: u32, kl: u32, vp: u32, vl: u32) -> R {
    let key = lower(&read(c, kp, kl)?);
    let value = read(c, vp, vl)?;
    with_map(c, t, true, |m| {
        match m.iter().position(|(k, _)| *k == key) {
            Some(first) => {
                if let Some(slot) = m.get_mut(first) {
                    slot.1 = value;
                }
                let mut i = 0;
                m.retain(|(k, _)| {
                    i += 1;
                    i - 1 == first || *k != key
                });
            }
            None => m.push((key, value)),
        }
        Ok(())
    })
}

fn add_map_value(c: &mut C, t: u32, kp: u32, kl: u32, vp: u32, vl: u32) -> R {
    let key = lower(&read(c, kp, kl)?);
    let value = read(c, vp, vl)?;
    with_map(c, t, true, |m| {
        m.push((key, value));
        Ok(())
    })
}

fn remove_map_value(c: &mut C, t: u32, kp: u32, kl: u32) -> R {
    let key = lower(&read(c, kp, kl)?);
    with_map(c, t, true, |m| {
        m.retain(|(k, _)| *k != key);
        Ok(())
    })
}

// ---- properties ---------------------------------------------------------------------------

fn get_property(c: &mut C, pp: u32, pl: u32, rp: u32, rs: u32) -> R {
    let path = read(c, pp, pl)?;
    let value = properties::get(c.data(), &path).ok_or(Status::NotFound)?;
    give(c, &value, rp, rs)
}

fn set_property(c: &mut C, pp: u32, pl: u32, vp: u32, vl: u32) -> R {
    let path = read(c, pp, pl)?;
    let value = read(c, vp, vl)?;
    let s = c.data();
    let b = s.bindings.get(&s.effective).ok_or(Status::NotFound)?;
    b.exchange.borrow_mut().properties.insert(path, value);
    Ok(())
}

// ---- shared data --------------------------------------------------------------------------

fn get_shared_data(c: &mut C, kp: u32, kl: u32, rp: u32, rs: u32, rc: u32) -> R {
    let key = read(c, kp, kl)?;
    if let Some(fault) = c.data().host.borrow().shared_data_fault {
        return Err(fault.into());
    }
    let found = {
        let s = c.data();
        let host = s.host.borrow();
        host.shared_data
            .get(&s.plugin.vm_id)
            .and_then(|m| m.get(&key))
            .cloned()
    };
    let (value, cas) = found.ok_or(Status::NotFound)?;
    give(c, &value, rp, rs)?;
    write_u32(c, rc, cas)
}

fn set_shared_data(c: &mut C, kp: u32, kl: u32, vp: u32, vl: u32, cas: u32) -> R {
    let key = read(c, kp, kl)?;
    let value = read(c, vp, vl)?;
    let s = c.data();
    let mut host = s.host.borrow_mut();
    if let Some(fault) = host.shared_data_fault {
        return Err(fault.into());
    }
    let next = host.take_cas();
    let staged = host.staged_races > 0;
    let scope = host.shared_data.entry(s.plugin.vm_id.clone()).or_default();
    match scope.get_mut(&key) {
        // A stale cas on an existing key loses; a new key accepts any cas (Envoy's rule).
        Some(entry) => {
            if cas != 0 && cas != entry.1 {
                return Err(Status::CasMismatch.into());
            }
            if cas != 0 && staged {
                // Another worker wrote the very same update first; this write loses.
                *entry = (value, next);
                host.staged_races -= 1;
                host.races_run += 1;
                return Err(Status::CasMismatch.into());
            }
            *entry = (value, next);
        }
        None => {
            scope.insert(key, (value, next));
        }
    }
    Ok(())
}

// ---- shared queues ------------------------------------------------------------------------

fn register_queue(c: &mut C, np: u32, nl: u32, ret: u32) -> R {
    let name = read_str(c, np, nl)?;
    let s = c.data();
    // A stream context registers on behalf of its root: notifications go to the root.
    let owner = (s.me, s.root_context);
    let id = {
        let mut host = s.host.borrow_mut();
        let vm_id = s.plugin.vm_id.clone();
        match host
            .queues
            .iter()
            .position(|q| q.vm_id == vm_id && q.name == name)
        {
            Some(i) => {
                if let Some(q) = host.queues.get_mut(i) {
                    q.owner = owner;
                }
                i as u32 + 1
            }
            None => {
                host.queues.push(Queue {
                    vm_id,
                    name,
                    owner,
                    items: Default::default(),
                });
                host.queues.len() as u32
            }
        }
    };
    write_u32(c, ret, id)
}

fn resolve_queue(c: &mut C, vp: u32, vl: u32, np: u32, nl: u32, ret: u32) -> R {
    let vm_id = read_str(c, vp, vl)?;
    let name = read_str(c, np, nl)?;
    let id = {
        let host = c.data().host.borrow();
        host.queues
            .iter()
            .position(|q| q.vm_id == vm_id && q.name == name)
            .ok_or(Status::NotFound)? as u32
            + 1
    };
    write_u32(c, ret, id)
}

fn enqueue(c: &mut C, id: u32, vp: u32, vl: u32) -> R {
    let value = read(c, vp, vl)?;
    let mut host = c.data().host.borrow_mut();
    let q = host
        .queues
        .get_mut((id as usize).wrapping_sub(1))
        .ok_or(Status::NotFound)?;
    q.items.push_back(value);
    let owner = q.owner;
    host.schedule(0, owner, EventKind::QueueReady { queue: id });
    Ok(())
}

fn dequeue(c: &mut C, id: u32, rp: u32, rs: u32) -> R {
    let item = {
        let mut host = c.data().host.borrow_mut();
        let q = host
            .queues
            .get_mut((id as usize).wrapping_sub(1))
            .ok_or(Status::NotFound)?;
        q.items.pop_front().ok_or(Status::Empty)?
    };
    give(c, &item, rp, rs)
}

// ---- stream control and local replies -----------------------------------------------------

fn stream_effect(c: &mut C, t: u32, close: bool) -> R {
    let s = c.data_mut();
    let dir = match t {
        abi::stream::REQUEST => REQ,
        abi::stream::RESPONSE => RESP,
        abi::stream::UPSTREAM if !close => return Err(Status::Unimplemented.into()),
        abi::stream::DOWNSTREAM | abi::stream::UPSTREAM => return Ok(()),
        _ => return Err(Status::BadArgument.into()),
    };
    let context = s.effective;
    // From a root context (no stream) Envoy accepts the call and does nothing.
    let Some(b) = s.bindings.get_mut(&context) else {
        return Ok(());
    };
    if !close {
        // Continuing drops Envoy's pointers to the request maps at once (for either
        // direction: Envoy clears the request side in both cases).
        b.open[0] = false;
        b.open[1] = false;
        if b.body == Some(REQ) {
            b.body = None;
        }
    }
    s.effects.push(if close {
        Effect::Close { context }
    } else {
        Effect::Continue { context, dir }
    });
    Ok(())
}

fn continue_stream(c: &mut C, t: u32) -> R {
    stream_effect(c, t, false)
}

fn close_stream(c: &mut C, t: u32) -> R {
    stream_effect(c, t, true)
}

#[allow(clippy::too_many_arguments)]
fn send_local_response(
    c: &mut C,
    status: u32,
    dp: u32,
    dl: u32,
    bp: u32,
    bl: u32,
    hp: u32,
    hl: u32,
    grpc: i32,
) -> R {
    let details = String::from_utf8_lossy(&read(c, dp, dl)?).into_owned();
    let body = read(c, bp, bl)?;
    let headers = read_map_lenient(c, hp, hl)?;
    if let Some(fault) = c.data().host.borrow().local_reply_fault {
        return Err(fault.into());
    }
    let s = c.data_mut();
    let context = s.effective;
    // From a root context there is no stream to answer: Envoy returns Ok and does nothing.
    if !s.bindings.contains_key(&context) {
        return Ok(());
    }
    let status = u16::try_from(status).unwrap_or(u16::MAX);
    // Envoy replaces whitespace in details, as it does for every response code detail.
    let details = details
        .chars()
        .map(|ch| if ch.is_whitespace() { '_' } else { ch })
        .collect();
    let headers = headers.into_iter().map(|(k, v)| (lower(&k), v)).collect();
    s.effects.push(Effect::LocalReply {
        context,
        reply: LocalReply {
            status,
            details,
            body,
            headers,
            grpc_status: grpc,
        },
    });
    Ok(())
}

// ---- HTTP and gRPC callouts ---------------------------------------------------------------

/// Envoy's callout tokens: a per-VM counter shifted left 2, tagged 0 for HTTP calls, 1 for
/// gRPC calls and 2 for gRPC streams.
fn new_token(s: &mut VmState, tag: u32) -> u32 {
    let n = s.next_token;
    s.next_token = s.next_token.wrapping_add(1).max(1);
    (n << 2) | tag
}

#[allow(clippy::too_many_arguments)]
fn http_call(
    c: &mut C,
    up: u32,
    ul: u32,
    hp: u32,
    hl: u32,
    bp: u32,
    bl: u32,
    tp: u32,
    tl: u32,
    timeout: u32,
    ret: u32,
) -> R {
    write_u32(c, ret, 0)?;
    let cluster = read_str(c, up, ul)?;
    let headers: HeaderMap = read_map_lenient(c, hp, hl)?
        .into_iter()
        .map(|(k, v)| (lower(&k), v))
        .collect();
    let body = read(c, bp, bl)?;
    let trailers = read_map_lenient(c, tp, tl)?;
    if timeout > i32::MAX as u32 || !c.data().host.borrow().clusters.contains_key(&cluster) {
        return Err(Status::BadArgument.into());
    }
    for required in [&b":method"[..], b":path", b":authority"] {
        if !headers.iter().any(|(k, v)| k == required && !v.is_empty()) {
            return Err(Status::BadArgument.into());
        }
    }
    let req = CalloutRequest {
        cluster: cluster.clone(),
        headers,
        body,
        trailers,
        timeout: (timeout > 0).then(|| Duration::from_millis(u64::from(timeout))),
    };
    let s = c.data_mut();
    // The call belongs to the root context: that is where Envoy delivers the answer.
    let root = s.root_context;
    let me = s.me;
    let reply = {
        let mut host = s.host.borrow_mut();
        let mut handler = host.clusters.remove(&cluster).ok_or(Status::BadArgument)?;
        host.callouts.push(req.clone());
        drop(host);
        let reply = handler(&req);
        s.host.borrow_mut().clusters.insert(cluster, handler);
        reply
    };
    let token = new_token(s, 0);
    s.http_calls.insert(token, root);
    let timeout_ns = u64::from(timeout) * 1_000_000;
    let (delay, reply) = match reply {
        CalloutReply::Response { delay, .. } | CalloutReply::Fail { delay }
            if timeout == 0 || (delay.as_nanos() as u64) < timeout_ns =>
        {
            (delay.as_nanos() as u64, reply)
        }
        _ if timeout > 0 => (timeout_ns, CalloutReply::Hang),
        _ => (u64::MAX, CalloutReply::Hang),
    };
    if delay != u64::MAX {
        s.host
            .borrow_mut()
            .schedule(delay, (me, root), EventKind::Callout { token, reply });
    }
    write_u32(c, ret, token)
}

#[allow(clippy::too_many_arguments)]
fn grpc_call(
    c: &mut C,
    up: u32,
    ul: u32,
    sp: u32,
    sl: u32,
    mp: u32,
    ml: u32,
    ip: u32,
    il: u32,
    gp: u32,
    gl: u32,
    timeout: u32,
    ret: u32,
) -> R {
    let message = read(c, gp, gl)?;
    let token = start_grpc(c, [up, ul, sp, sl, mp, ml, ip, il], false)?;
    send_grpc(c, token, message, false, timeout)?;
    write_u32(c, ret, token)
}

#[allow(clippy::too_many_arguments)]
fn grpc_stream(
    c: &mut C,
    up: u32,
    ul: u32,
    sp: u32,
    sl: u32,
    mp: u32,
    ml: u32,
    ip: u32,
    il: u32,
    ret: u32,
) -> R {
    let token = start_grpc(c, [up, ul, sp, sl, mp, ml, ip, il], true)?;
    write_u32(c, ret, token)
}

/// Opens a gRPC call or stream from (pointer, length) pairs of cluster, service, method and
/// initial metadata.
fn start_grpc(c: &mut C, args: [u32; 8], stream: bool) -> Result<u32, Fail> {
    let [up, ul, sp, sl, mp, ml, ip, il] = args;
    let cluster = read_str(c, up, ul)?;
    let service = read_str(c, sp, sl)?;
    let method = read_str(c, mp, ml)?;
    let metadata = read_map(c, ip, il)?;
    let s = c.data_mut();
    if !s.host.borrow().grpc_clusters.contains_key(&cluster) {
        return Err(Status::ParseFailure.into());
    }
    let token = new_token(s, if stream { 2 } else { 1 });
    let context = s.root_context;
    s.grpc.insert(
        token,
        GrpcState {
            cluster,
            service,
            method,
            metadata,
            context,
        },
    );
    Ok(token)
}

fn send_grpc(c: &mut C, token: u32, message: Vec<u8>, stream: bool, timeout: u32) -> R {
    let s = c.data_mut();
    let g = s.grpc.get(&token).ok_or(Status::NotFound)?;
    let req = GrpcRequest {
        cluster: g.cluster.clone(),
        service: g.service.clone(),
        method: g.method.clone(),
        metadata: g.metadata.clone(),
        message,
        stream,
    };
    let target = (s.me, g.context);
    let mut host = s.host.borrow_mut();
    host.grpc_sent.push(req.clone());
    let mut handler = host
        .grpc_clusters
        .remove(&req.cluster)
        .ok_or(Status::BadArgument)?;
    drop(host);
    let reply = handler(&req);
    let mut host = s.host.borrow_mut();
    host.grpc_clusters.insert(req.cluster.clone(), handler);
    let timeout_ns = u64::from(timeout) * 1_000_000;
    let late = timeout > 0 && reply.delay.as_nanos() as u64 >= timeout_ns;
    let (delay, reply) = if late {
        (
            timeout_ns,
            GrpcReply {
                status: 4, // DEADLINE_EXCEEDED
                message: Vec::new(),
                delay: Duration::ZERO,
            },
        )
    } else {
        (reply.delay.as_nanos() as u64, reply)
    };
    host.schedule(delay, target, EventKind::Grpc { token, reply });
    Ok(())
}

fn grpc_send(c: &mut C, token: u32, mp: u32, ml: u32, _end: u32) -> R {
    let message = read(c, mp, ml)?;
    if token & 3 != 2 {
        return Err(Status::BadArgument.into());
    }
    send_grpc(c, token, message, true, 0)
}

fn grpc_cancel(c: &mut C, token: u32) -> R {
    c.data_mut()
        .grpc
        .remove(&token)
        .map(|_| ())
        .ok_or(Status::NotFound.into())
}

fn grpc_close(c: &mut C, token: u32) -> R {
    grpc_cancel(c, token)
}

fn get_status(c: &mut C, rc: u32, rp: u32, rs: u32) -> R {
    let (code, msg) = c.data().status.clone();
    write_u32(c, rc, code)?;
    give(c, &msg, rp, rs)
}

// ---- contexts and foreign functions -------------------------------------------------------

fn set_effective_context(c: &mut C, id: u32) -> R {
    let s = c.data_mut();
    if id != 0 && !s.is_context(id) {
        return Err(Status::BadArgument.into());
    }
    s.effective = id;
    Ok(())
}

/// Only meaningful while a root context is shutting down, which the harness never starts:
/// Envoy then answers NotFound.
fn done(c: &mut C) -> R {
    let s = c.data_mut();
    let context = s.effective;
    s.effects.push(Effect::Done { context });
    Err(Status::NotFound.into())
}

fn call_foreign(c: &mut C, np: u32, nl: u32, ap: u32, al: u32, rp: u32, rs: u32) -> R {
    let name = read_str(c, np, nl)?;
    let args = read(c, ap, al)?;
    let result = {
        let host = &c.data().host;
        let mut f = host
            .borrow_mut()
            .foreign
            .remove(&name)
            .ok_or(Status::NotFound)?;
        let r = f(&args);
        host.borrow_mut().foreign.insert(name, f);
        r
    };
    let out = result.map_err(Fail::Status)?;
    give(c, &out, rp, rs)
}

// ---- metrics ------------------------------------------------------------------------------

fn define_metric(c: &mut C, t: u32, np: u32, nl: u32, ret: u32) -> R {
    let kind = MetricType::from_u32(t).ok_or(Status::BadArgument)?;
    let name = read_str(c, np, nl)?;
    // Each define gets a new id (type in the low 2 bits) naming the same underlying stat.
    let id = {
        let mut host = c.data().host.borrow_mut();
        let stat = match host
            .metrics
            .iter()
            .position(|m| m.name == name && m.kind == kind)
        {
            Some(i) => i,
            None => {
                host.metrics.push(Metric {
                    name: name.clone(),
                    kind,
                    value: 0,
                    samples: Vec::new(),
                });
                host.metrics.len() - 1
            }
        };
        let n = host.metric_ids.len() as u32 + 1;
        let id = (n << 2) | t;
        host.metric_ids.insert((name, id), stat as u32);
        id
    };
    write_u32(c, ret, id)
}

fn with_metric<T>(
    c: &mut C,
    id: u32,
    f: impl FnOnce(&mut Metric) -> Result<T, Fail>,
) -> Result<T, Fail> {
    let mut host = c.data().host.borrow_mut();
    let stat = host
        .metric_ids
        .iter()
        .find(|((_, i), _)| *i == id)
        .map(|(_, stat)| *stat as usize)
        .ok_or(Status::NotFound)?;
    let m = host.metrics.get_mut(stat).ok_or(Status::NotFound)?;
    f(m)
}

fn increment_metric(c: &mut C, id: u32, offset: i64) -> R {
    with_metric(c, id, |m| match m.kind {
        MetricType::Counter if offset > 0 => {
            m.value = m.value.wrapping_add(offset as u64);
            Ok(())
        }
        MetricType::Gauge => {
            m.value = m.value.saturating_add_signed(offset);
            Ok(())
        }
        _ => Err(Status::BadArgument.into()),
    })
}

fn record_metric(c: &mut C, id: u32, value: u64) -> R {
    with_metric(c, id, |m| {
        match m.kind {
            MetricType::Counter => m.value = m.value.wrapping_add(value),
            MetricType::Gauge => m.value = value,
            MetricType::Histogram => m.samples.push(value),
        }
        Ok(())
    })
}

fn get_metric(c: &mut C, id: u32, ret: u32) -> R {
    let v = with_metric(c, id, |m| match m.kind {
        MetricType::Histogram => Err(Status::BadArgument.into()),
        _ => Ok(m.value),
    })?;
    write_u64(c, ret, v)
}
