//! Loading a module once and running it as VMs: compile (`Engine` + `Module` + `InstancePre`),
//! instantiate per VM, start it the way Envoy does, and call its exports with fuel metering.

use crate::abi::LogLevel;
use crate::state::{CallbackBuffers, HostShared, PluginInfo, VmRef, VmState};
use anyhow::{anyhow, bail, Context as _, Result};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;
use wasmtime::{Engine, Func, InstancePre, Linker, Store, Val};

/// Fuel given to each callback; a callback that burns it all is treated as a trap (a plugin
/// stuck in a loop would hang an Envoy worker).
const FUEL_PER_CALLBACK: u64 = 10_000_000_000;

/// A compiled proxy-wasm module, ready to be instantiated as many VMs (cheap to clone).
#[derive(Clone)]
pub struct Module {
    pub(crate) inner: Rc<ModuleInner>,
}

pub(crate) struct ModuleInner {
    pub name: String,
    pub engine: Engine,
    pub pre: InstancePre<VmState>,
}

impl Module {
    /// Compiles a `.wasm` file. A missing file fails with the fix ("run ./build.sh").
    pub fn from_file(path: impl AsRef<Path>) -> Result<Module> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "cannot read wasm module {}: run ./build.sh first (it builds dist/ and target/modules/)",
                path.display()
            )
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into());
        Module::from_bytes(&name, &bytes)
    }

    /// Compiles a module from binary wasm or WAT text.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Module> {
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true);
        // For `perf record` of the guest's functions by name (bench/README.md, "Profiling").
        if std::env::var_os("EDGE_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| anyhow!("{e}"))?;
        let module = wasmtime::Module::new(&engine, bytes)
            .map_err(|e| anyhow!("cannot compile wasm module {name}: {e}"))?;
        let abi = ["proxy_abi_version_0_2_1", "proxy_abi_version_0_2_0"];
        if !module.exports().any(|e| abi.contains(&e.name())) {
            bail!("module {name} exports no supported proxy-wasm ABI version (proxy_abi_version_0_2_1)");
        }
        let mut linker = Linker::new(&engine);
        crate::hostcalls::link(&mut linker).map_err(|e| anyhow!("{e}"))?;
        crate::wasi::link(&mut linker).map_err(|e| anyhow!("{e}"))?;
        let pre = linker.instantiate_pre(&module).map_err(|e| {
            anyhow!("module {name} cannot be loaded: {e} (the host does not provide that import)")
        })?;
        Ok(Module {
            inner: Rc::new(ModuleInner {
                name: name.to_string(),
                engine,
                pre,
            }),
        })
    }

    /// The module's name (its file stem), used as the default plugin name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The functions the module imports, as `module.name` (`env.proxy_log`,
    /// `wasi_snapshot_preview1.fd_write`): what a host must define to instantiate it.
    pub fn imports(&self) -> Vec<String> {
        self.inner
            .pre
            .module()
            .imports()
            .map(|i| format!("{}.{}", i.module(), i.name()))
            .collect()
    }

    /// The names the module exports, in its order: what a replay of its traces must export.
    pub fn exports(&self) -> Vec<String> {
        self.inner
            .pre
            .module()
            .exports()
            .map(|e| e.name().to_string())
            .collect()
    }
}

/// How one guest callback ended.
pub(crate) enum Outcome {
    /// Returned normally (with its i32 result, if it has one).
    Returned(Option<u32>),
    /// Trapped: the VM is now failed.
    Trapped(String),
}

/// Per-callback cost, in wasmtime fuel (about one unit per wasm instruction).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallbackCost {
    pub calls: u64,
    pub fuel: u64,
}

/// One VM: an instance of a plugin on one worker.
pub(crate) struct Vm {
    pub store: Store<VmState>,
    funcs: HashMap<String, Func>,
    pub costs: BTreeMap<&'static str, CallbackCost>,
    /// Fuel the last callback used.
    pub last_fuel: u64,
    memory: Option<wasmtime::Memory>,
}

impl Vm {
    /// Instantiates and starts a VM: `_initialize`/`_start`, root context, `on_vm_start`,
    /// `on_configure`. A `false` fails with the plugin's own log lines as the reason.
    pub fn start(
        module: &Module,
        host: Rc<RefCell<HostShared>>,
        me: VmRef,
        plugin: Rc<PluginInfo>,
    ) -> Result<Vm> {
        let state = VmState {
            host: host.clone(),
            me,
            plugin: plugin.clone(),
            root_context: 1,
            next_context: 2,
            active: 0,
            effective: 0,
            bindings: HashMap::new(),
            buffers: CallbackBuffers::default(),
            tick_period_ms: 0,
            next_tick_ns: None,
            next_token: 1,
            http_calls: HashMap::new(),
            grpc: HashMap::new(),
            effects: Vec::new(),
            status: (0, Vec::new()),
            failed: false,
            starting: true,
            exit_code: None,
            hostcalls: BTreeMap::new(),
            trace: None,
        };
        let mut store = Store::new(&module.inner.engine, state);
        store
            .set_fuel(FUEL_PER_CALLBACK)
            .map_err(|e| anyhow!("{e}"))?;
        let instance = module
            .inner
            .pre
            .instantiate(&mut store)
            .map_err(|e| anyhow!("cannot instantiate {}: {e}", plugin.name))?;
        let mut funcs = HashMap::new();
        let names: Vec<String> = module
            .inner
            .pre
            .module()
            .exports()
            .map(|e| e.name().to_string())
            .collect();
        for name in names {
            if let Some(f) = instance.get_func(&mut store, &name) {
                funcs.insert(name, f);
            }
        }
        let mut vm = Vm {
            store,
            funcs,
            costs: BTreeMap::new(),
            last_fuel: 0,
            memory: None,
        };
        vm.memory = instance.get_memory(&mut vm.store, "memory");
        let log_since = host.borrow().logs.len();
        for start in ["_initialize", "_start"] {
            if vm.funcs.contains_key(start) {
                if let Outcome::Trapped(e) = vm.call(start, 0, &[]) {
                    bail!("{}: {start} trapped: {e}", plugin.name);
                }
                break;
            }
        }
        vm.store.data_mut().starting = false;
        let root = vm.store.data().root_context;
        let reason = |vm: &Vm, what: &str| -> anyhow::Error {
            let logs = vm.store.data().host.borrow();
            let said: Vec<&str> = logs
                .logs
                .iter()
                .skip(log_since)
                .filter(|l| l.level >= LogLevel::Warn)
                .map(|l| l.message.as_str())
                .collect();
            anyhow!("plugin {} {what}: {}", plugin.name, said.join("; "))
        };
        if let Outcome::Trapped(e) = vm.call("proxy_on_context_create", root, &[root, 0]) {
            bail!("{}: proxy_on_context_create trapped: {e}", plugin.name);
        }
        let vm_config_len = plugin.vm_config.len() as u32;
        match vm.call("proxy_on_vm_start", root, &[root, vm_config_len]) {
            Outcome::Returned(Some(0)) => {
                return Err(reason(&vm, "failed to start (on_vm_start returned false)"))
            }
            Outcome::Trapped(e) => bail!("{}: proxy_on_vm_start trapped: {e}", plugin.name),
            _ => {}
        }
        vm.store.data_mut().buffers.plugin_config = true;
        let config_len = plugin.config.len() as u32;
        let configured = vm.call("proxy_on_configure", root, &[root, config_len]);
        vm.store.data_mut().buffers.plugin_config = false;
        match configured {
            Outcome::Returned(Some(0)) => Err(reason(&vm, "rejected its configuration")),
            Outcome::Trapped(e) => Err(anyhow!("{}: proxy_on_configure trapped: {e}", plugin.name)),
            _ => Ok(vm),
        }
    }

    /// Size of the VM's linear memory in 64 KiB pages.
    pub fn memory_pages(&mut self) -> u64 {
        self.memory.map_or(0, |m| m.size(&self.store))
    }

    /// Calls an export with `context` as the active and effective context. A missing export
    /// returns `Returned(None)`, as Envoy treats absent callbacks as "continue".
    pub fn call(&mut self, export: &'static str, context: u32, args: &[u32]) -> Outcome {
        let Some(f) = self.funcs.get(export).cloned() else {
            self.last_fuel = 0;
            return Outcome::Returned(None);
        };
        if self.store.data().failed {
            return Outcome::Trapped("VM already failed".into());
        }
        {
            let s = self.store.data_mut();
            s.active = context;
            s.effective = context;
        }
        let ty = f.ty(&self.store);
        let params: Vec<Val> = ty
            .params()
            .enumerate()
            .map(|(i, t)| {
                let v = args.get(i).copied().unwrap_or(0);
                match t {
                    wasmtime::ValType::I64 => Val::I64(i64::from(v)),
                    _ => Val::I32(v as i32),
                }
            })
            .collect();
        let mut results: Vec<Val> = ty.results().map(|_| Val::I32(0)).collect();
        if let Some(trace) = self.store.data_mut().trace.as_mut() {
            trace.push(crate::trace::TracedCallback {
                callback: export,
                returned: None,
                fuel: 0,
                calls: Vec::new(),
            });
        }
        let _ = self.store.set_fuel(FUEL_PER_CALLBACK);
        let r = f.call(&mut self.store, &params, &mut results);
        let used = FUEL_PER_CALLBACK - self.store.get_fuel().unwrap_or(0);
        let returned = match &r {
            Ok(()) => results.first().and_then(|v| v.i32()).map(|v| v as u32),
            Err(_) => None,
        };
        if let Some(last) = self
            .store
            .data_mut()
            .trace
            .as_mut()
            .and_then(|t| t.last_mut())
        {
            last.returned = returned;
            last.fuel = used;
        }
        let cost = self.costs.entry(export).or_default();
        cost.calls += 1;
        cost.fuel += used;
        self.last_fuel = used;
        {
            let s = self.store.data_mut();
            s.active = 0;
            s.effective = 0;
        }
        match r {
            Ok(()) => Outcome::Returned(results.first().and_then(|v| v.i32()).map(|v| v as u32)),
            Err(e) => {
                let msg = match self.store.data().exit_code {
                    Some(code) => format!("proc_exit({code})"),
                    None => format!("{e:#}"),
                };
                let s = self.store.data_mut();
                s.failed = true;
                s.log(LogLevel::Error, format!("Function: {export} failed: {msg}"));
                Outcome::Trapped(msg)
            }
        }
    }
}
