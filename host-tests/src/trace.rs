//! Per-request traces: every callback the host made into a VM, its return value, and inside
//! it each hostcall in order with what sets its cost in Envoy (map and header name, property
//! path, shared-data key and value length, buffer range, metric name, the guest allocations
//! made to hand data over). The bench replays them in Envoy (`bench/replay`) to measure a
//! path's crossings apart from its instructions.

use crate::abi;
use crate::hostcalls::memory::HostcallError;
use crate::state::VmState;
use serde_json::{json, Map, Value};
use wasmtime::{Caller, Extern};

/// One callback into the VM, as recorded.
#[derive(Clone, Debug)]
pub struct TracedCallback {
    /// The export called (`proxy_on_request_headers`, ...).
    pub callback: &'static str,
    /// What it returned (an action for stream callbacks), if anything.
    pub returned: Option<u32>,
    /// Wasm instructions it ran (fuel).
    pub fuel: u64,
    /// Its hostcalls and the host's guest allocations, in order: objects with `op` and the
    /// fields that determine the call's cost.
    pub calls: Vec<Value>,
}

impl TracedCallback {
    /// The callback as JSON, as `bench/replay` reads it.
    pub fn to_json(&self) -> Value {
        json!({
            "callback": self.callback,
            "returned": self.returned,
            "fuel": self.fuel,
            "calls": self.calls,
        })
    }
}

fn bytes(caller: &mut Caller<'_, VmState>, data: i64, size: i64) -> Vec<u8> {
    let Some(memory) = caller.get_export("memory").and_then(Extern::into_memory) else {
        return Vec::new();
    };
    let (start, len) = (data as usize, size as usize);
    memory
        .data(&*caller)
        .get(start..)
        .and_then(|rest| rest.get(..len))
        .map(<[u8]>::to_vec)
        .unwrap_or_default()
}

fn text(caller: &mut Caller<'_, VmState>, data: i64, size: i64) -> String {
    String::from_utf8_lossy(&bytes(caller, data, size)).into_owned()
}

fn u32_at(caller: &mut Caller<'_, VmState>, at: i64) -> i64 {
    let b = bytes(caller, at, 4);
    b.try_into()
        .map_or(0, |b: [u8; 4]| i64::from(u32::from_le_bytes(b)))
}

fn metric_name(caller: &Caller<'_, VmState>, id: i64) -> String {
    let host = caller.data().host.borrow();
    host.metric_ids
        .keys()
        .find(|(_, m)| i64::from(*m) == id)
        .map(|(name, _)| name.clone())
        .unwrap_or_default()
}

/// Where a data-returning hostcall writes the size of its answer (argument index).
fn return_size_arg(op: &str) -> Option<usize> {
    match op {
        "get_header_map_value" => Some(4),
        "get_header_map_pairs" => Some(2),
        "get_property" => Some(3),
        "get_shared_data" => Some(3),
        "get_buffer_bytes" => Some(4),
        _ => None,
    }
}

/// Records a hostcall's arguments before it runs; returns where its record is, for
/// [`after`]. Nothing is recorded unless the VM is tracing.
pub(crate) fn before(caller: &mut Caller<'_, VmState>, name: &str, a: &[i64]) -> Option<usize> {
    caller.data().trace.as_ref()?.last()?;
    let op = name.trim_start_matches("proxy_");
    let arg = |i: usize| a.get(i).copied().unwrap_or(0);
    let mut v = Map::new();
    v.insert("op".into(), json!(op));
    match op {
        "get_header_map_value" | "remove_header_map_value" => {
            v.insert("map".into(), json!(arg(0)));
            v.insert("name".into(), json!(text(caller, arg(1), arg(2))));
        }
        "replace_header_map_value" | "add_header_map_value" => {
            v.insert("map".into(), json!(arg(0)));
            v.insert("name".into(), json!(text(caller, arg(1), arg(2))));
            v.insert("len".into(), json!(arg(4)));
        }
        "get_header_map_pairs" | "get_header_map_size" => {
            v.insert("map".into(), json!(arg(0)));
        }
        "set_header_map_pairs" => {
            v.insert("map".into(), json!(arg(0)));
            v.insert("len".into(), json!(arg(2)));
        }
        "get_property" | "set_property" => {
            let path = bytes(caller, arg(0), arg(1));
            let segments: Vec<String> = path
                .split(|b| *b == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            v.insert("path".into(), json!(segments));
            if op == "set_property" {
                v.insert("len".into(), json!(arg(3)));
            }
        }
        "get_shared_data" => {
            v.insert("key".into(), json!(text(caller, arg(0), arg(1))));
        }
        "set_shared_data" => {
            v.insert("key".into(), json!(text(caller, arg(0), arg(1))));
            v.insert("len".into(), json!(arg(3)));
            v.insert("cas".into(), json!(arg(4) != 0));
        }
        "define_metric" => {
            v.insert("kind".into(), json!(arg(0)));
            v.insert("name".into(), json!(text(caller, arg(1), arg(2))));
        }
        "increment_metric" | "record_metric" | "get_metric" => {
            v.insert("name".into(), json!(metric_name(caller, arg(0))));
            v.insert("kind".into(), json!(arg(0) & 3));
            if op != "get_metric" {
                v.insert("value".into(), json!(arg(1)));
            }
        }
        "get_buffer_bytes" => {
            v.insert("buffer".into(), json!(arg(0)));
            v.insert("start".into(), json!(arg(1)));
            v.insert("max".into(), json!(arg(2)));
        }
        "set_buffer_bytes" => {
            v.insert("buffer".into(), json!(arg(0)));
            v.insert("start".into(), json!(arg(1)));
            v.insert("size".into(), json!(arg(2)));
            v.insert("len".into(), json!(arg(4)));
        }
        "get_buffer_status" | "continue_stream" | "close_stream" => {
            v.insert("target".into(), json!(arg(0)));
        }
        "send_local_response" => {
            v.insert("status".into(), json!(arg(0)));
            v.insert("details".into(), json!(text(caller, arg(1), arg(2))));
            v.insert("body".into(), json!(arg(4)));
            let pairs = abi::decode_map(&bytes(caller, arg(5), arg(6))).unwrap_or_default();
            let pairs: Vec<[String; 2]> = pairs
                .iter()
                .map(|(k, v)| {
                    [
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    ]
                })
                .collect();
            v.insert("headers".into(), json!(pairs));
            v.insert("grpc".into(), json!(arg(7)));
        }
        "log" => {
            v.insert("level".into(), json!(arg(0)));
            v.insert("len".into(), json!(arg(2)));
        }
        "get_current_time_nanoseconds" | "done" | "get_log_level" => {}
        _ => {
            v.insert("args".into(), json!(a));
        }
    }
    let calls = &mut caller.data_mut().trace.as_mut()?.last_mut()?.calls;
    calls.push(Value::Object(v));
    Some(calls.len() - 1)
}

/// Completes a hostcall's record: its status and, for a call that returned data, how many
/// bytes it returned.
pub(crate) fn after(
    caller: &mut Caller<'_, VmState>,
    at: Option<usize>,
    a: &[i64],
    result: &Result<(), HostcallError>,
) {
    let Some(at) = at else { return };
    let status = match result {
        Ok(()) => "ok".to_string(),
        Err(HostcallError::Status(s)) => format!("{s:?}"),
        Err(HostcallError::Trap(_)) => "trap".into(),
    };
    let op = caller
        .data()
        .trace
        .as_ref()
        .and_then(|t| t.last())
        .and_then(|c| c.calls.get(at))
        .and_then(|v| v.get("op"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let len = match (result, return_size_arg(&op)) {
        (Ok(()), Some(i)) => Some(u32_at(caller, a.get(i).copied().unwrap_or(0))),
        _ => None,
    };
    let record = caller
        .data_mut()
        .trace
        .as_mut()
        .and_then(|t| t.last_mut())
        .and_then(|c| c.calls.get_mut(at))
        .and_then(Value::as_object_mut);
    if let Some(record) = record {
        record.insert("status".into(), json!(status));
        if let Some(len) = len {
            record.insert("len".into(), json!(len));
        }
    }
}

/// Records a guest allocation the host made to hand data over.
pub(crate) fn allocation(state: &mut VmState, size: u32) {
    if let Some(current) = state.trace.as_mut().and_then(|t| t.last_mut()) {
        current
            .calls
            .push(json!({"op": "(guest allocation)", "size": size}));
    }
}

#[cfg(test)]
mod tests {
    use crate::{Edge, Module, Plugin, Request, Upstream};
    use serde_json::json;

    /// Reads one request header and pauses nothing: its trace is known exactly.
    const READER: &str = r#"(module
      (import "env" "proxy_get_header_map_value"
        (func $get (param i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (global $heap (mut i32) (i32.const 1024))
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) (local i32)
        global.get $heap local.set 1
        global.get $heap local.get 0 i32.add global.set $heap
        local.get 1)
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
      (func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 1)
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
        (drop (call $get (i32.const 0) (i32.const 16) (i32.const 6) (i32.const 100) (i32.const 104)))
        i32.const 0)
      (data (i32.const 16) "x-user"))"#;

    #[test]
    fn a_trace_names_each_callback_its_hostcalls_and_the_allocations_they_made() {
        let module = Module::from_bytes("reader", READER.as_bytes()).unwrap();
        let mut edge = Edge::builder()
            .plugin(Plugin::new(&module, ""))
            .upstream(|_| Upstream::ok("ok"))
            .build()
            .unwrap();
        edge.send(Request::get("/")).unwrap();
        assert!(
            edge.take_trace(0).is_empty(),
            "nothing is recorded before start_trace"
        );
        edge.start_trace();
        edge.send(Request::get("/").header("x-user", "abcd"))
            .unwrap();
        let trace = edge.take_trace(0);
        let names: Vec<&str> = trace.iter().map(|c| c.callback).collect();
        assert_eq!(
            names,
            ["proxy_on_context_create", "proxy_on_request_headers"]
        );
        let headers = &trace[1];
        assert_eq!(headers.returned, Some(0));
        assert!(headers.fuel > 0);
        assert_eq!(
            headers.calls,
            [
                json!({"op": "get_header_map_value", "map": 0, "name": "x-user", "status": "ok",
                       "len": 4}),
                json!({"op": "(guest allocation)", "size": 4}),
            ]
        );
        edge.send(Request::get("/")).unwrap();
        let missing = edge.take_trace(0);
        assert_eq!(
            missing[1].calls,
            [
                json!({"op": "get_header_map_value", "map": 0, "name": "x-user",
                    "status": "NotFound"})
            ]
        );
    }
}
