;; Calls hostcalls with bad and edge-case arguments from on_vm_start and logs each status as
;; "name=code", so tests can compare them with Envoy's. Memory: 0..1024 scratch, 1024.. strings.
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_map_value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_map_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_resolve_shared_queue" (func $resolve (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $dequeue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $increment (param i32 i64) (result i32)))
  (import "env" "proxy_set_effective_context" (func $set_ctx (param i32) (result i32)))
  (import "env" "proxy_call_foreign_function" (func $foreign (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 1024) "key")
  (data (i32.const 1040) "value")
  (data (i32.const 1056) "nocluster")
  (data (i32.const 1072) "q")
  (data (i32.const 1088) "nofn")
  (data (i32.const 1104) "no\00such")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  ;; Writes "<tag>=<code>" at 512 and logs it; tags are two letters.
  (func $report (param $tag i32) (param $code i32)
    (i32.store16 (i32.const 512) (local.get $tag))
    (i32.store8 (i32.const 514) (i32.const 61))
    (i32.store8 (i32.const 515) (i32.add (i32.const 48) (i32.div_u (local.get $code) (i32.const 10))))
    (i32.store8 (i32.const 516) (i32.add (i32.const 48) (i32.rem_u (local.get $code) (i32.const 10))))
    (drop (call $log (i32.const 2) (i32.const 512) (i32.const 5))))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    ;; "mt": unknown map type → BadArgument (02)
    (call $report (i32.const 0x746d) (call $get_map_value (i32.const 99) (i32.const 1024) (i32.const 3) (i32.const 0) (i32.const 4)))
    ;; "rc": request headers from the root context → BadArgument (02)
    (call $report (i32.const 0x6372) (call $get_map_value (i32.const 0) (i32.const 1024) (i32.const 3) (i32.const 0) (i32.const 4)))
    ;; "pp": pairs of an unavailable map → Ok (00), empty
    (call $report (i32.const 0x7070) (call $get_map_pairs (i32.const 0) (i32.const 0) (i32.const 4)))
    ;; "bp": key pointer out of bounds → InvalidMemoryAccess (06)
    (call $report (i32.const 0x7062) (call $get_shared (i32.const 0x7fffff00) (i32.const 64) (i32.const 0) (i32.const 4) (i32.const 8)))
    ;; "bl": length past memory end → 06
    (call $report (i32.const 0x6c62) (call $get_shared (i32.const 1024) (i32.const 0x10000) (i32.const 0) (i32.const 4) (i32.const 8)))
    ;; "rs": return slot out of bounds → 06
    (call $report (i32.const 0x7372) (call $now (i32.const 0xfffffff0)))
    ;; "bt": unknown buffer type → 02
    (call $report (i32.const 0x7462) (call $get_buffer (i32.const 42) (i32.const 0) (i32.const 10) (i32.const 0) (i32.const 4)))
    ;; "pc": plugin configuration outside on_configure → NotFound (01)
    (call $report (i32.const 0x6370) (call $get_buffer (i32.const 7) (i32.const 0) (i32.const 10) (i32.const 0) (i32.const 4)))
    ;; "sm": shared data missing → 01
    (call $report (i32.const 0x6d73) (call $get_shared (i32.const 1024) (i32.const 3) (i32.const 0) (i32.const 4) (i32.const 8)))
    ;; "sn": new key with an arbitrary cas → Ok (00)
    (call $report (i32.const 0x6e73) (call $set_shared (i32.const 1024) (i32.const 3) (i32.const 1040) (i32.const 5) (i32.const 12345)))
    ;; "ss": existing key with a stale cas → CasMismatch (08)
    (call $report (i32.const 0x7373) (call $set_shared (i32.const 1024) (i32.const 3) (i32.const 1040) (i32.const 5) (i32.const 12345)))
    ;; "qr": resolve an unknown queue → 01
    (call $report (i32.const 0x7271) (call $resolve (i32.const 0) (i32.const 0) (i32.const 1072) (i32.const 1) (i32.const 0)))
    ;; "qd": dequeue an unknown queue → 01
    (call $report (i32.const 0x6471) (call $dequeue (i32.const 77) (i32.const 0) (i32.const 4)))
    ;; "md": metric type 9 → 02
    (call $report (i32.const 0x646d) (call $define (i32.const 9) (i32.const 1024) (i32.const 3) (i32.const 0)))
    ;; "mi": increment an unknown metric → 01
    (call $report (i32.const 0x696d) (call $increment (i32.const 1234) (i64.const 1)))
    ;; "ec": effective context that does not exist → 02
    (call $report (i32.const 0x6365) (call $set_ctx (i32.const 77)))
    ;; "ff": unknown foreign function → 01
    (call $report (i32.const 0x6666) (call $foreign (i32.const 1088) (i32.const 4) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 4)))
    ;; "hc": http call to an unknown cluster → 02
    (call $report (i32.const 0x6368) (call $http_call (i32.const 1056) (i32.const 9) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 0)))
    ;; "gp": unknown property → 01
    (call $report (i32.const 0x7067) (call $get_property (i32.const 1104) (i32.const 7) (i32.const 0) (i32.const 4)))
    ;; "cs": continue_stream(9) → 02 ; "cu": continue upstream → Unimplemented (12)
    (call $report (i32.const 0x7363) (call $continue (i32.const 9)))
    (call $report (i32.const 0x7563) (call $continue (i32.const 3)))
    (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
)
