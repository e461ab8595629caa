;; An empty activation: returns RUN_MORE at once (test=bench, as in
;; kernel/nucleus/examples/activation.rs).
(module (memory (export "memory") 1)
  (func (export "metta_activate") (param i32) (result i32) i32.const 1))
