//! A VM's globals. A proxy-wasm VM runs one thread, so in the modules a global is a plain
//! static; native builds (unit tests, run on parallel threads) keep one per thread.
#![allow(unsafe_code)]

#[cfg(all(target_arch = "wasm32", target_feature = "atomics"))]
compile_error!("edge-host's globals assume a VM without threads");

/// `static NAME: T = const { INIT };`, reached with `NAME.with(|v| ..)` as a thread-local is.
macro_rules! vm_local {
    ($(#[$m:meta])* static $name:ident: $t:ty = const { $init:expr };) => {
        #[cfg(target_arch = "wasm32")]
        $(#[$m])*
        static $name: $crate::local::Local<$t> = $crate::local::Local::new($init);
        #[cfg(not(target_arch = "wasm32"))]
        std::thread_local! {
            $(#[$m])*
            static $name: $t = const { $init };
        }
    };
}
pub(crate) use vm_local;

#[cfg(target_arch = "wasm32")]
pub struct Local<T>(T);

// SAFETY: on wasm32 without the atomics feature (checked above) there is one thread, so a
// value is never reached from two at once.
#[cfg(target_arch = "wasm32")]
unsafe impl<T> Sync for Local<T> {}

#[cfg(target_arch = "wasm32")]
impl<T> Local<T> {
    pub const fn new(value: T) -> Self {
        Local(value)
    }

    pub fn with<R>(&'static self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.0)
    }
}
