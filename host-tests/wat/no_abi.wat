;; Exports no proxy_abi_version_* function: Envoy refuses such a module.
(module
  (memory (export "memory") 1)
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
)
