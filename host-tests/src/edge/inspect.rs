//! Inspection: what the upstream and clusters received, what plugins logged and counted,
//! what shared data holds, what each VM cost; and the knobs a test turns while the edge
//! runs (faults, staged races, replaced upstreams).

use super::api::{Upstream, UpstreamRequest};
use super::Edge;
use crate::abi::Status;
use crate::state::{CalloutReply, CalloutRequest, GrpcRequest, LogRecord};
use crate::vm::CallbackCost;
use std::collections::BTreeMap;

impl Edge {
    /// Every request the upstream received, in order.
    pub fn upstream_requests(&self) -> &[UpstreamRequest] {
        &self.upstream.received
    }

    /// Forgets the recorded upstream requests and log lines, so a long run (a flood of a
    /// million requests) keeps constant memory.
    pub fn clear_records(&mut self) {
        self.upstream.received.clear();
        self.host.borrow_mut().logs.clear();
    }

    /// Replaces the upstream's behaviour.
    pub fn set_upstream(&mut self, f: impl FnMut(&UpstreamRequest) -> Upstream + 'static) {
        self.upstream.behaviour = Box::new(f);
    }

    /// Replaces (or adds) a callout cluster's behaviour.
    pub fn set_cluster(
        &mut self,
        name: &str,
        f: impl FnMut(&CalloutRequest) -> CalloutReply + 'static,
    ) {
        self.host
            .borrow_mut()
            .clusters
            .insert(name.into(), Box::new(f));
    }

    /// Every `proxy_http_call` request plugins made, in order.
    pub fn callouts(&self) -> Vec<CalloutRequest> {
        self.host.borrow().callouts.clone()
    }

    /// Every gRPC message plugins sent.
    pub fn grpc_sent(&self) -> Vec<GrpcRequest> {
        self.host.borrow().grpc_sent.clone()
    }

    /// Everything plugins logged.
    pub fn logs(&self) -> Vec<LogRecord> {
        self.host.borrow().logs.clone()
    }

    /// True when some log line contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.host
            .borrow()
            .logs
            .iter()
            .any(|l| l.message.contains(needle))
    }

    /// A metric's value by the name the plugin defined (Envoy: `wasmcustom.<name>`).
    pub fn metric(&self, name: &str) -> Option<u64> {
        self.host
            .borrow()
            .metrics
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
    }

    /// Samples recorded into a histogram.
    pub fn histogram(&self, name: &str) -> Vec<u64> {
        self.host
            .borrow()
            .metrics
            .iter()
            .filter(|m| m.name == name)
            .flat_map(|m| m.samples.clone())
            .collect()
    }

    /// A shared-data value and its cas, in the scope of `vm_id`.
    pub fn shared_data(&self, vm_id: &str, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        self.host
            .borrow()
            .shared_data
            .get(vm_id)
            .and_then(|m| m.get(key))
            .cloned()
    }

    /// Every shared-data key in the scope of `vm_id` with the size of its value, sorted: how
    /// a test checks what a plugin keeps, not what the plugin says it keeps.
    pub fn shared_data_sizes(&self, vm_id: &str) -> Vec<(Vec<u8>, usize)> {
        let host = self.host.borrow();
        let mut out: Vec<(Vec<u8>, usize)> = host
            .shared_data
            .get(vm_id)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.0.len())).collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Makes every shared-data get and set fail with `status` (`None` heals the store): how
    /// a plugin's `failureMode` is tested. Envoy itself fails these calls only on bad input.
    pub fn fail_shared_data(&mut self, status: Option<Status>) {
        self.host.borrow_mut().shared_data_fault = status;
    }

    /// Makes every local reply a plugin sends fail with `status` (`None`: replies go out
    /// again), to test what a plugin does with a request whose answer the host refused.
    pub fn fail_local_replies(&mut self, status: Option<Status>) {
        self.host.borrow_mut().local_reply_fault = status;
    }

    /// Stages the race Envoy's worker threads run *inside* a callback, between a plugin's read
    /// and its write, which interleaving at callback boundaries cannot reach: each of the next
    /// `n` compare-and-swaps that would succeed instead finds that another worker made the very
    /// same write first (the value lands, with a new cas) and gets CasMismatch. A plugin that
    /// re-reads and decides again stays exact; one that ignores the mismatch double-spends.
    pub fn stage_races(&mut self, n: u32) {
        self.host.borrow_mut().staged_races = n;
    }

    /// How many staged races have been run (0 means the plugin never compare-and-swapped).
    pub fn races_run(&self) -> u32 {
        self.host.borrow().races_run
    }

    /// Number of shared-data keys and their total bytes (key + value) in `vm_id`'s scope.
    pub fn shared_data_usage(&self, vm_id: &str) -> (usize, usize) {
        self.host
            .borrow()
            .shared_data
            .get(vm_id)
            .map(|m| (m.len(), m.iter().map(|(k, v)| k.len() + v.0.len()).sum()))
            .unwrap_or((0, 0))
    }

    /// How many shared-data keys of `vm_id`'s scope are `prefix` followed by a number: the
    /// slots of a table whose keys end in their index (`idempotency/r/s/41`).
    pub fn shared_keys_numbered(&self, vm_id: &str, prefix: &str) -> usize {
        self.host.borrow().shared_data.get(vm_id).map_or(0, |m| {
            m.keys()
                .filter(|k| {
                    k.strip_prefix(prefix.as_bytes())
                        .is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit))
                })
                .count()
        })
    }

    /// Whether the VM of `plugin` on `worker` has trapped (`worker_count()`: the main thread).
    pub fn vm_failed(&self, worker: usize, plugin: usize) -> bool {
        self.workers[worker][plugin].store.data().failed
    }

    /// Fuel spent per callback export, summed over every worker's VM of `plugin`.
    pub fn costs(&self, plugin: usize) -> BTreeMap<&'static str, CallbackCost> {
        let mut out: BTreeMap<&'static str, CallbackCost> = BTreeMap::new();
        for vms in &self.workers {
            for (k, v) in &vms[plugin].costs {
                let e = out.entry(k).or_default();
                e.calls += v.calls;
                e.fuel += v.fuel;
            }
        }
        out
    }

    /// Calls per hostcall (and host-made guest allocations), summed over every worker's VM of
    /// `plugin`: the crossings between Envoy and the VM that a request costs.
    pub fn hostcalls(&self, plugin: usize) -> BTreeMap<&'static str, u64> {
        let mut out: BTreeMap<&'static str, u64> = BTreeMap::new();
        for vms in &self.workers {
            for (k, v) in &vms[plugin].store.data().hostcalls {
                *out.entry(k).or_default() += v;
            }
        }
        out
    }

    /// Starts recording, in every VM, each callback and its hostcalls (see [`Edge::take_trace`]).
    pub fn start_trace(&mut self) {
        for vms in &mut self.workers {
            for vm in vms.iter_mut() {
                vm.store.data_mut().trace = Some(Vec::new());
            }
        }
    }

    /// The callbacks `plugin`'s VMs ran since tracing started or the last take, in order per
    /// worker (one request runs on one worker); tracing goes on.
    pub fn take_trace(&mut self, plugin: usize) -> Vec<crate::TracedCallback> {
        let mut out = Vec::new();
        for vms in &mut self.workers {
            if let Some(trace) = vms
                .get_mut(plugin)
                .and_then(|vm| vm.store.data_mut().trace.as_mut())
            {
                out.append(trace);
            }
        }
        out
    }

    /// Places where a plugin used the ABI in a way Envoy would refuse or ignore.
    pub fn abi_misuse(&self) -> Vec<String> {
        self.host.borrow().misuse.clone()
    }

    /// Host clock: wall time in ns since the epoch.
    pub fn now_ns(&self) -> u64 {
        self.host.borrow().realtime_ns
    }

    /// Number of workers (streams run on these; the main thread's VMs are extra).
    pub fn worker_count(&self) -> usize {
        self.stream_workers
    }

    /// Memory pages (64 KiB) of the VM of `plugin` on `worker` (`worker_count()`: the main
    /// thread).
    pub fn memory_pages(&mut self, worker: usize, plugin: usize) -> u64 {
        self.workers[worker][plugin].memory_pages()
    }
}
