;; A domain that fails: on start it sets its timer 100 ms ahead; when the
;; timer fires it executes `unreachable` (a trap). The nucleus fails only it.
(module
  (import "metta" "now" (func $now (result i64)))
  (import "metta" "timer" (func $timer (param i64)))
  (memory (export "memory") 1)
  (func (export "metta_activate") (param $reason i32) (result i32)
    (if (i32.eqz (local.get $reason))
      (then
        (call $timer (i64.add (call $now) (i64.const 100000000)))
        (return (i32.const 0))))
    unreachable))
