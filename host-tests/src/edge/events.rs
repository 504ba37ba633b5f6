//! The event loop: the host clock, and what falls due on it in time order (callout and gRPC
//! answers, queue notifications, root-context ticks).

use super::Edge;
use crate::state::{CalloutReply, EventKind, HeaderMap};
use crate::vm::Vm;
use anyhow::Result;
use std::time::Duration;

/// Envoy 1.40 answers a refused, reset or timed-out callout with its own local reply, not
/// with a failure (seen in the real-Envoy rig).
fn envoy_callout_reply(status: &[u8], body: &[u8]) -> (HeaderMap, Vec<u8>) {
    let headers = vec![
        (b":status".to_vec(), status.to_vec()),
        (b"content-type".to_vec(), b"text/plain".to_vec()),
    ];
    (headers, body.to_vec())
}

/// Runs the callback an event is for on its VM. `false` when the event no longer has a
/// target (a gRPC call cancelled since).
fn deliver(vm: &mut Vm, context: u32, kind: EventKind) -> bool {
    match kind {
        EventKind::QueueReady { queue } => {
            let _ = vm.call("proxy_on_queue_ready", context, &[context, queue]);
        }
        EventKind::Callout { token, reply } => {
            vm.store.data_mut().http_calls.remove(&token);
            let (headers, body, trailers) = match reply {
                CalloutReply::Response {
                    headers,
                    body,
                    trailers,
                    ..
                } => (headers, body, trailers),
                CalloutReply::Fail { .. } => {
                    let (headers, body) = envoy_callout_reply(
                        b"503",
                        b"upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                    );
                    (headers, body, Vec::new())
                }
                CalloutReply::Hang => {
                    let (headers, body) = envoy_callout_reply(b"504", b"upstream request timeout");
                    (headers, body, Vec::new())
                }
            };
            let args = [
                context,
                token,
                headers.len() as u32,
                body.len() as u32,
                trailers.len() as u32,
            ];
            {
                let state = vm.store.data_mut();
                state.status = (0, Vec::new());
                state.buffers.call_headers = Some(headers);
                state.buffers.call_trailers = Some(trailers);
                state.buffers.call_body = Some(body);
            }
            let _ = vm.call("proxy_on_http_call_response", context, &args);
            let state = vm.store.data_mut();
            state.buffers.call_headers = None;
            state.buffers.call_trailers = None;
            state.buffers.call_body = None;
        }
        EventKind::Grpc { token, reply } => {
            let state = vm.store.data_mut();
            if !state.grpc.contains_key(&token) {
                return false;
            }
            if reply.status == 0 {
                let size = reply.message.len() as u32;
                state.buffers.grpc_message = Some(reply.message);
                let _ = vm.call("proxy_on_grpc_receive", context, &[context, token, size]);
                vm.store.data_mut().buffers.grpc_message = None;
            } else {
                state.grpc.remove(&token);
                state.status = (reply.status, reply.message);
                let _ = vm.call(
                    "proxy_on_grpc_close",
                    context,
                    &[context, token, reply.status],
                );
            }
        }
    }
    true
}

impl Edge {
    /// Moves the host clock forward, running in time order what falls due: `proxy_on_tick`,
    /// `proxy_on_http_call_response`, `proxy_on_queue_ready`, `proxy_on_grpc_receive|close`.
    pub fn advance(&mut self, d: Duration) -> Result<()> {
        let target = self.host.borrow().monotonic_ns + d.as_nanos() as u64;
        while let Some(due) = self.next_due() {
            if due > target {
                break;
            }
            self.run_next_event()?;
        }
        let mut host = self.host.borrow_mut();
        let now = host.monotonic_ns;
        if target > now {
            host.realtime_ns += target - now;
            host.monotonic_ns = target;
        }
        Ok(())
    }

    /// Delivers every event already due (no clock movement).
    pub fn run_pending(&mut self) -> Result<()> {
        let now = self.host.borrow().monotonic_ns;
        while let Some(due) = self.next_due() {
            if due > now {
                break;
            }
            self.run_next_event()?;
        }
        Ok(())
    }

    fn next_due(&self) -> Option<u64> {
        let events = self.host.borrow().events.iter().map(|e| e.due_ns).min();
        let ticks = self
            .workers
            .iter()
            .flatten()
            .filter(|vm| !vm.store.data().failed)
            .filter_map(|vm| vm.store.data().next_tick_ns)
            .min();
        match (events, ticks) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the earliest event, moving the clock to it. `false` when nothing is scheduled.
    pub(super) fn run_next_event(&mut self) -> Result<bool> {
        let Some(due) = self.next_due() else {
            return Ok(false);
        };
        let event = {
            let mut host = self.host.borrow_mut();
            if due > host.monotonic_ns {
                let elapsed = due - host.monotonic_ns;
                host.realtime_ns += elapsed;
                host.monotonic_ns = due;
            }
            let earliest = host
                .events
                .iter()
                .enumerate()
                .filter(|(_, e)| e.due_ns <= due)
                .min_by_key(|(_, e)| (e.due_ns, e.seq))
                .map(|(index, _)| index);
            earliest.map(|index| host.events.remove(index))
        };
        match event {
            Some(event) => {
                let (vm_ref, context) = event.target;
                let (worker, plugin) = (vm_ref.worker, vm_ref.plugin);
                if deliver(&mut self.workers[worker][plugin], context, event.kind) {
                    self.apply_effects(worker, plugin);
                }
            }
            None => self.tick(due),
        }
        Ok(true)
    }

    /// Fires every root context whose timer is due at `due`.
    fn tick(&mut self, due: u64) {
        let mut due_vms = Vec::new();
        for (worker, vms) in self.workers.iter().enumerate() {
            for (plugin, vm) in vms.iter().enumerate() {
                let state = vm.store.data();
                if !state.failed && state.next_tick_ns.is_some_and(|t| t <= due) {
                    due_vms.push((worker, plugin));
                }
            }
        }
        for (worker, plugin) in due_vms {
            let vm = &mut self.workers[worker][plugin];
            let state = vm.store.data_mut();
            state.next_tick_ns = Some(due + state.tick_period_ms.max(1) * 1_000_000);
            let root = state.root_context;
            let _ = vm.call("proxy_on_tick", root, &[root]);
            self.apply_effects(worker, plugin);
        }
    }
}
