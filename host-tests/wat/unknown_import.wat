;; Imports a hostcall no proxy-wasm host offers: loading must fail and name it.
(module
  (import "env" "proxy_teleport" (func (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
)
