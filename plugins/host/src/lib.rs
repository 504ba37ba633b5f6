//! The edge plugins' way to the proxy-wasm host, through one door: [`host`]. Behind it, the
//! raw imports (`ffi`), shared data as edge-core's `SlotStore`, the logger and the counters;
//! each hostcall's status becomes a value, never a trap. `ffi` and the modules' allocator
//! (`alloc`) hold the crate's only `unsafe`.

#[cfg(any(target_arch = "wasm32", test))]
mod alloc;
mod bus;
mod ffi;
pub mod host;
mod logger;
mod metrics;
pub mod pipeline;
mod shared_data;

/// The SDK, for [`host::main!`]'s expansion only.
#[doc(hidden)]
pub use proxy_wasm as __sdk;

/// See [`host::main!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __edge_main {
    // A separate module: the SDK drives the plugin's contexts directly (a one-stage pipeline
    // would instantiate every SDK default method a second time, for nothing).
    ($root:ty) => {
        $crate::__sdk::main! {{
            $crate::host::start(|_| {
                ::std::boxed::Box::new(<$root as ::std::default::Default>::default())
            });
        }}
    };
    ($($section:expr => $root:ty),+ $(,)?) => {
        $crate::__sdk::main! {{
            $crate::host::start(|_| {
                ::std::boxed::Box::new($crate::pipeline::PipelineRoot::combined(::std::vec![$(
                    $crate::pipeline::Stage {
                        section: $section,
                        root: ::std::boxed::Box::new(<$root as ::std::default::Default>::default()),
                    }
                ),+]))
            });
        }}
    };
}
