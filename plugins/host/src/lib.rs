//! The edge plugins' way to the proxy-wasm host, through one door: [`host`]. Behind it, the
//! ABI (`ffi`: the raw imports and the exported callbacks), the callbacks' routing to contexts
//! ([`dispatch`]), shared data as edge-core's `SlotStore`, the logger and the counters;
//! each hostcall's status becomes a value, never a trap. `ffi`, the modules' allocator
//! (`pools`) and the VM's globals (`local`) hold the crate's only `unsafe`. The modules are
//! `no_std`: this crate also holds their panic handler.

#![no_std]

extern crate alloc;
// Native builds (unit tests, the tools) keep thread-locals and the system allocator.
#[cfg(not(target_arch = "wasm32"))]
extern crate std;

mod bus;
pub mod dispatch;
/// Public for the bench's replay filter only, which makes the plugins' hostcalls without their
/// policies; plugins go through [`host`].
#[doc(hidden)]
pub mod ffi;
pub mod host;
mod local;
mod logger;
mod metrics;
pub mod pipeline;
#[cfg(any(target_arch = "wasm32", test))]
mod pools;
mod shared_data;

/// See [`host::main!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __edge_main {
    // A separate module: the plugin's contexts are the module's (no pipeline in between).
    ($root:ty) => {
        /// WASI's reactor entry: the host runs it once, before any callback.
        #[no_mangle]
        pub extern "C" fn _initialize() {
            $crate::host::start(|_| {
                ::alloc::boxed::Box::new(<$root as ::core::default::Default>::default())
            });
        }
    };
    ($($section:expr => $root:ty),+ $(,)?) => {
        /// WASI's reactor entry: the host runs it once, before any callback.
        #[no_mangle]
        pub extern "C" fn _initialize() {
            $crate::host::start(|_| {
                ::alloc::boxed::Box::new($crate::pipeline::PipelineRoot::combined(::alloc::vec![$(
                    $crate::pipeline::Stage {
                        section: $section,
                        root: ::alloc::boxed::Box::new(<$root as ::core::default::Default>::default()),
                    }
                ),+]))
            });
        }
    };
}

/// The modules are `no_std`, and every one of them links this crate: the panic handler is
/// here, once. A panic traps, as it did with std and `panic = "abort"`, and Envoy logs the
/// trap with the callback it ended. The panic's message and location are not kept: with a
/// handler that is a bare trap, wasm-opt drops them at every call site, which is most of what
/// leaving std saves. Nothing on the request path panics (the workspace's lints).
#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}
