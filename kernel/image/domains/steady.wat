;; A domain that always wants CPU: a bounded loop, then RUN_MORE (the GREEDY
;; domain of control/src/hosted.rs's tests). Given a contract without `extra`
;; it should get exactly its slice every period.
(module (memory (export "memory") 1)
  (func (export "metta_activate") (param i32) (result i32)
    (local $i i32)
    (loop $l
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 100000))))
    i32.const 1))
