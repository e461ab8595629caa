;; The fuel calibration loop (the same module as control/src/hosted.rs's
;; SPIN_WASM and kernel/nucleus/examples/activation.rs): an endless add loop,
;; preempted only by fuel. Also the greedy `extra` domain of test=domains.
(module (memory (export "memory") 1)
  (func (export "metta_activate") (param i32) (result i32)
    (local $i i32)
    (loop $l
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l))
    i32.const 0))
