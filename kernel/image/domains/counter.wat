;; A counter service on /svc/counter (like domains/counter, in WAT): every
;; request (at most 64 bytes, content ignored) adds one to the count (an i64
;; at offset 64 of memory) and is answered on reply_to with the new count,
;; 8 bytes little-endian. Logs "counter: up" on each start (also after a
;; restore: the count lives in memory and survives it).
(module
  (import "metta" "log" (func $log (param i32 i32)))
  (import "metta" "open" (func $open (param i32 i32) (result i32)))
  (import "metta" "send" (func $send (param i32 i32 i32) (result i32)))
  (import "metta" "recv" (func $recv (param i32 i32 i32) (result i32)))
  (import "metta" "reply_to" (func $reply_to (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "/svc/counter")
  (data (i32.const 16) "counter: up")
  (func (export "metta_activate") (param $reason i32) (result i32)
    (local $ch i32) (local $n i32)
    (if (i32.eqz (local.get $reason))
      (then (call $log (i32.const 16) (i32.const 11))))
    (local.set $ch (call $open (i32.const 0) (i32.const 12)))
    (block $done
      (loop $l
        (local.set $n (call $recv (local.get $ch) (i32.const 1024) (i32.const 64)))
        (br_if $done (i32.lt_s (local.get $n) (i32.const 0)))
        (i64.store (i32.const 64) (i64.add (i64.load (i32.const 64)) (i64.const 1)))
        (drop (call $send (call $reply_to (local.get $ch)) (i32.const 64) (i32.const 8)))
        (br $l)))
    i32.const 0))
