//! Describing an edge before it starts: plugins in chain order, workers, the upstream and
//! clusters, Envoy's limits. `build` starts every VM the way Envoy does.

use super::api::{Plugin, Upstream, UpstreamFn, UpstreamRequest};
use super::upstream::EmulatedUpstream;
use super::Edge;
use crate::abi::{LogLevel, Status};
use crate::state::{
    CalloutHandler, CalloutReply, CalloutRequest, ForeignFn, GrpcHandler, GrpcReply, GrpcRequest,
    HostShared, PluginInfo, VmRef,
};
use crate::vm::Vm;
use anyhow::Result;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// Builds an [`Edge`]: plugins in chain order, workers, upstream and clusters.
pub struct EdgeBuilder {
    plugins: Vec<Plugin>,
    workers: usize,
    seed: u64,
    start_ns: u64,
    upstream: UpstreamFn,
    clusters: Vec<(String, CalloutHandler)>,
    grpc: Vec<(String, GrpcHandler)>,
    foreign: Vec<(String, ForeignFn)>,
    buffer_limit: usize,
    route_timeout: Duration,
    log_level: LogLevel,
}

impl EdgeBuilder {
    /// Adds a plugin at the end of the chain.
    pub fn plugin(mut self, p: Plugin) -> Self {
        self.plugins.push(p);
        self
    }
    /// Number of worker threads sharing shared data and queues. Each plugin runs one VM per
    /// worker plus one on Envoy's main thread, which ticks and makes callouts but takes no
    /// streams (its logs and callouts carry worker index `n`).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }
    /// Seed of `random_get` (and of generated request ids).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Wall-clock time at start, ns since the Unix epoch.
    pub fn start_time_ns(mut self, ns: u64) -> Self {
        self.start_ns = ns;
        self
    }
    /// The upstream's behaviour (default: 200 with body `ok`).
    pub fn upstream(mut self, f: impl FnMut(&UpstreamRequest) -> Upstream + 'static) -> Self {
        self.upstream = Box::new(f);
        self
    }
    /// A cluster plugins may `proxy_http_call`; unknown clusters get BadArgument.
    pub fn cluster(
        mut self,
        name: &str,
        f: impl FnMut(&CalloutRequest) -> CalloutReply + 'static,
    ) -> Self {
        self.clusters.push((name.into(), Box::new(f)));
        self
    }
    /// A gRPC cluster for `proxy_grpc_call` / `proxy_grpc_stream`.
    pub fn grpc_cluster(
        mut self,
        name: &str,
        f: impl FnMut(&GrpcRequest) -> GrpcReply + 'static,
    ) -> Self {
        self.grpc.push((name.into(), Box::new(f)));
        self
    }
    /// A function plugins reach with `proxy_call_foreign_function`.
    pub fn foreign(
        mut self,
        name: &str,
        f: impl FnMut(&[u8]) -> Result<Vec<u8>, Status> + 'static,
    ) -> Self {
        self.foreign.push((name.into(), Box::new(f)));
        self
    }
    /// Envoy's per-stream buffer limit (default 1 MiB): over it, 413 or 500.
    pub fn buffer_limit(mut self, bytes: usize) -> Self {
        self.buffer_limit = bytes;
        self
    }
    /// Envoy's route timeout (default 15 s).
    pub fn route_timeout(mut self, d: Duration) -> Self {
        self.route_timeout = d;
        self
    }
    /// The level `proxy_get_log_level` reports (default info).
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = level;
        self
    }

    /// Starts every VM on every worker: `_initialize`, `proxy_on_context_create` (root),
    /// `proxy_on_vm_start`, `proxy_on_configure`. A rejected configuration is an error carrying
    /// the plugin's logged reason.
    pub fn build(self) -> Result<Edge> {
        let mut shared = HostShared::new(self.seed, self.start_ns);
        shared.buffer_limit = self.buffer_limit;
        shared.log_level = self.log_level;
        shared.clusters.extend(self.clusters);
        shared.grpc_clusters.extend(self.grpc);
        shared.foreign.extend(self.foreign);
        let host = Rc::new(RefCell::new(shared));
        let plugins: Vec<Rc<PluginInfo>> = self
            .plugins
            .iter()
            .map(|p| Rc::new(p.info.clone()))
            .collect();
        // Envoy starts each plugin on its main thread first (where it loads the configuration,
        // ticks and makes its callouts, but never sees a stream), then on every worker: N
        // workers run N + 1 VMs. The main thread's VMs come last here, at index N.
        let start = |w: usize| -> Result<Vec<Vm>> {
            let mut vms = Vec::new();
            for (i, p) in self.plugins.iter().enumerate() {
                let me = VmRef {
                    worker: w,
                    plugin: i,
                };
                vms.push(Vm::start(&p.module, host.clone(), me, plugins[i].clone())?);
            }
            Ok(vms)
        };
        let main = start(self.workers)?;
        let mut workers = Vec::new();
        for w in 0..self.workers {
            workers.push(start(w)?);
        }
        workers.push(main);
        let mut edge = Edge {
            host,
            plugins,
            workers,
            stream_workers: self.workers,
            upstream: EmulatedUpstream::new(self.upstream, self.route_timeout),
            flights: HashMap::new(),
            owners: HashMap::new(),
            next_flight: 1,
            next_worker: 0,
        };
        edge.apply_all_effects();
        Ok(edge)
    }
}

impl Edge {
    /// Starts describing an edge; `.build()` loads every plugin.
    pub fn builder() -> EdgeBuilder {
        EdgeBuilder {
            plugins: Vec::new(),
            workers: 1,
            seed: 1,
            start_ns: 1_767_225_600_000_000_000, // 2026-01-01T00:00:00Z
            upstream: Box::new(|_| Upstream::ok("ok")),
            clusters: Vec::new(),
            grpc: Vec::new(),
            foreign: Vec::new(),
            buffer_limit: 1024 * 1024,
            route_timeout: Duration::from_secs(15),
            log_level: LogLevel::Info,
        }
    }
}
