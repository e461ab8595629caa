;; Writes a known set of 4 KiB pages of its memory, one set per activation
;; (test=dirty); memory starts at 2 wasm pages (128 KiB = 32 4 KiB pages).
;;   activation 1: offsets 0x0000, 0x5000, 0x5008, 0x13000 (pages 0, 5, 19)
;;   activation 2: offset 0x2000 (page 2)
;;   activation 3: memory.grow by 1 wasm page (48 4 KiB pages), no store
;;   activation 4: offset 0x21000 (page 33, in the grown part)
;;   later: nothing
(module
  (memory (export "memory") 2)
  (global $n (mut i32) (i32.const 0))
  (func (export "metta_activate") (param i32) (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (if (i32.eq (global.get $n) (i32.const 1))
      (then
        (i32.store (i32.const 0x0000) (i32.const 0x11111111))
        (i32.store (i32.const 0x5000) (i32.const 0x22222222))
        (i32.store (i32.const 0x5008) (i32.const 0x33333333))
        (i32.store (i32.const 0x13000) (i32.const 0x44444444))))
    (if (i32.eq (global.get $n) (i32.const 2))
      (then (i32.store (i32.const 0x2000) (i32.const 0x55555555))))
    (if (i32.eq (global.get $n) (i32.const 3))
      (then (drop (memory.grow (i32.const 1)))))
    (if (i32.eq (global.get $n) (i32.const 4))
      (then (i32.store (i32.const 0x21000) (i32.const 0x66666666))))
    i32.const 0))
