//! The edge plugins' way to the proxy-wasm host, through one door: [`host`]. Behind it, the
//! ABI (`ffi`: the raw imports and the exported callbacks), the callbacks' routing to contexts
//! ([`dispatch`]), shared data as edge-core's `SlotStore`, the logger and the counters;
//! each hostcall's status becomes a value, never a trap. `ffi` and the modules' allocator
//! (`alloc`) hold the crate's only `unsafe`.

#[cfg(any(target_arch = "wasm32", test))]
mod alloc;
mod bus;
pub mod dispatch;
/// Public for the bench's replay filter only, which makes the plugins' hostcalls without their
/// policies; plugins go through [`host`].
#[doc(hidden)]
pub mod ffi;
pub mod host;
mod logger;
mod metrics;
pub mod pipeline;
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
                ::std::boxed::Box::new(<$root as ::std::default::Default>::default())
            });
        }
    };
    ($($section:expr => $root:ty),+ $(,)?) => {
        /// WASI's reactor entry: the host runs it once, before any callback.
        #[no_mangle]
        pub extern "C" fn _initialize() {
            $crate::host::start(|_| {
                ::std::boxed::Box::new($crate::pipeline::PipelineRoot::combined(::std::vec![$(
                    $crate::pipeline::Stage {
                        section: $section,
                        root: ::std::boxed::Box::new(<$root as ::std::default::Default>::default()),
                    }
                ),+]))
            });
        }
    };
}
