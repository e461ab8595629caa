;; A client of /svc/counter: sends "incr" on start, and again for every
;; answer, 100 times in all. Memory: offset 128 the number of answers (i32),
;; offset 136 the last answer (i64). Logs "client: 100 round trips" at the end.
(module
  (import "metta" "log" (func $log (param i32 i32)))
  (import "metta" "open" (func $open (param i32 i32) (result i32)))
  (import "metta" "send" (func $send (param i32 i32 i32) (result i32)))
  (import "metta" "recv" (func $recv (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "/svc/counter")
  (data (i32.const 16) "incr")
  (data (i32.const 32) "client: 100 round trips")
  (func (export "metta_activate") (param $reason i32) (result i32)
    (local $ch i32) (local $n i32)
    (local.set $ch (call $open (i32.const 0) (i32.const 12)))
    (if (i32.eqz (local.get $reason))
      (then (drop (call $send (local.get $ch) (i32.const 16) (i32.const 4)))))
    (block $done
      (loop $l
        (local.set $n (call $recv (local.get $ch) (i32.const 136) (i32.const 8)))
        (br_if $done (i32.lt_s (local.get $n) (i32.const 0)))
        (i32.store (i32.const 128) (i32.add (i32.load (i32.const 128)) (i32.const 1)))
        (if (i32.lt_u (i32.load (i32.const 128)) (i32.const 100))
          (then (drop (call $send (local.get $ch) (i32.const 16) (i32.const 4))))
          (else (call $log (i32.const 32) (i32.const 23))))
        (br $l)))
    i32.const 0))
