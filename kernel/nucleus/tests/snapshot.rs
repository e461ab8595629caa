//! Snapshots: capture at a boundary, restore into a fresh nucleus, refuse
//! tampering.

mod common;

use common::*;
use metta_nucleus::{
    memory_root, Caps, GlobalValue, Message, Nucleus, ReplyToken, RestoreError, SnapshotError,
    SpawnError, Step,
};

/// Keeps one count in memory (at 0) and one in a private mutable global; each
/// activation bumps both, copies the global to 4 (and an i64 global to 16),
/// sets a far timer (so the timer is captured too) and asks for more.
const COUNTER: &str = r#"(module
  (import "metta" "open" (func $open (param i32 i32) (result i32)))
  (import "metta" "timer" (func $timer (param i64)))
  (memory (export "memory") 1)
  (global $count (mut i32) (i32.const 0))
  (global $wide (mut i64) (i64.const 1000))
  (global $half (mut f32) (f32.const 0.5))
  (data (i32.const 100) "/svc/count")
  (func (export "metta_activate") (param $r i32) (result i32)
    (if (i32.eq (local.get $r) (i32.const 0))
      (then (i32.store (i32.const 12) (call $open (i32.const 100) (i32.const 10)))))
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (global.set $wide (i64.add (global.get $wide) (i64.const 1)))
    (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1)))
    (i32.store (i32.const 4) (global.get $count))
    (i64.store (i32.const 16) (global.get $wide))
    (call $timer (i64.const 999000000000))
    i32.const 1))"#;

fn counts(n: &Nucleus, id: metta_nucleus::DomainId) -> (i32, i32, i64) {
    let m = n.domain(id).unwrap().memory();
    (
        read_i32(m, 0),
        read_i32(m, 4),
        i64::from_le_bytes(m[16..24].try_into().unwrap()),
    )
}

fn step_n(n: &mut Nucleus, now: &mut u64, k: usize) {
    for _ in 0..k {
        match n.step(*now) {
            Step::Ran { charged_ns, .. } => *now += charged_ns,
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_restored_counter_continues_exactly_where_it_was() {
    let img = image(COUNTER);
    let caps = Caps::with_channels(["/svc"]);
    let mut a = nucleus();
    let id = a
        .spawn("counter", &img, contract(MS, 10 * MS, false), caps, 0)
        .unwrap();
    let mut now = 0;
    step_n(&mut a, &mut now, 5);
    assert_eq!(counts(&a, id), (5, 5, 1005));
    a.deliver(
        id,
        Message {
            channel: "/svc/count".into(),
            payload: b"queued".to_vec(),
            reply: Some(ReplyToken(9)),
        },
        now,
    )
    .unwrap();

    let snap = a.snapshot(id).unwrap().unwrap();
    assert_eq!(snap.memory.len(), 65536);
    assert_eq!(snap.memory_root, memory_root(&snap.memory));
    assert_eq!(
        snap.globals,
        vec![
            (0, GlobalValue::I32(5)),
            (1, GlobalValue::I64(1005)),
            (2, GlobalValue::F32(0.5f32.to_bits()))
        ]
    );
    assert_eq!(snap.inbox.len(), 1);
    assert_eq!(snap.channels.len(), 1);
    assert_eq!(snap.channels[0].name, "/svc/count");
    assert_eq!(snap.timer, Some(999_000_000_000));
    assert_eq!(snap.image_hash, img.hash());

    // Through the wire format and into a brand-new nucleus (a new engine).
    let bytes = postcard::to_allocvec(&snap).unwrap();
    let snap2: metta_nucleus::Snapshot = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(snap2, snap);
    let img2 = image(COUNTER);
    let mut b = nucleus();
    let id2 = b.restore("counter", &img2, snap2, 0).unwrap();
    let d = b.domain(id2).unwrap();
    assert_eq!(d.memory(), &snap.memory[..]);
    assert_eq!(d.inbox_len(), 1);
    assert_eq!(d.timer(), Some(999_000_000_000));
    let mut now = 0;
    step_n(&mut b, &mut now, 1);
    assert_eq!(
        counts(&b, id2),
        (6, 6, 1006),
        "memory and globals both continue"
    );
    step_n(&mut b, &mut now, 3);
    assert_eq!(counts(&b, id2), (9, 9, 1009));
    // The original keeps going independently.
    step_n(&mut a, &mut now, 1);
    assert_eq!(counts(&a, id), (6, 6, 1006));
    // The restored channel table still answers.
    assert_eq!(read_i32(b.domain(id2).unwrap().memory(), 12), 0);
}

#[test]
fn a_tampered_snapshot_is_refused() {
    let img = image(COUNTER);
    let mut a = nucleus();
    let id = a
        .spawn("counter", &img, contract(MS, 10 * MS, false), all_caps(), 0)
        .unwrap();
    let mut now = 0;
    step_n(&mut a, &mut now, 3);
    let snap = a.snapshot(id).unwrap().unwrap();

    let mut bad = snap.clone();
    bad.memory[40_000] ^= 0x01;
    let mut b = nucleus();
    assert_eq!(
        b.restore("x", &img, bad, 0),
        Err(SpawnError::Restore(RestoreError::MemoryRoot))
    );

    let mut bad = snap.clone();
    bad.memory.truncate(65536 - 1);
    bad.memory_root = memory_root(&bad.memory);
    assert!(matches!(
        b.restore("x", &img, bad, 0),
        Err(SpawnError::Restore(RestoreError::MemorySize { .. }))
    ));

    let mut bad = snap.clone();
    bad.globals.pop();
    assert!(matches!(
        b.restore("x", &img, bad, 0),
        Err(SpawnError::Restore(RestoreError::Globals(_)))
    ));

    let mut bad = snap.clone();
    bad.globals[0].1 = GlobalValue::I64(5);
    assert!(matches!(
        b.restore("x", &img, bad, 0),
        Err(SpawnError::Restore(RestoreError::Globals(_)))
    ));

    let other = image(EMPTY);
    assert_eq!(
        b.restore("x", &other, snap.clone(), 0),
        Err(SpawnError::Restore(RestoreError::ImageMismatch))
    );

    // Nothing was admitted by the refusals; the good snapshot restores.
    assert_eq!(b.scheduler().used_ppm(), 0);
    b.restore("x", &img, snap, 0).unwrap();
}

#[test]
fn snapshots_only_happen_at_boundaries() {
    let mut n = nucleus();
    let spin = n
        .spawn(
            "spin",
            &image(SPIN),
            contract(MS, 10 * MS, false),
            all_caps(),
            0,
        )
        .unwrap();
    let mut now = 0;
    step_n(&mut n, &mut now, 1);
    assert_eq!(n.snapshot(spin).unwrap(), Err(SnapshotError::MidActivation));

    let sender = n
        .spawn(
            "sender",
            &image(
                r#"(module
                  (import "metta" "open" (func $open (param i32 i32) (result i32)))
                  (import "metta" "send" (func $send (param i32 i32 i32) (result i32)))
                  (memory (export "memory") 1)
                  (data (i32.const 0) "/a")
                  (func (export "metta_activate") (param i32) (result i32)
                    (drop (call $send (call $open (i32.const 0) (i32.const 2)) (i32.const 0) (i32.const 2)))
                    i32.const 0))"#,
            ),
            contract(MS, 10 * MS, false),
            all_caps(),
            0,
        )
        .unwrap();
    run_until(&mut n, &mut now, 30 * MS, |_, _| {});
    assert_eq!(
        n.snapshot(sender).unwrap(),
        Err(SnapshotError::OutboxNotDrained)
    );
    n.take_outbox();
    assert!(n.snapshot(sender).unwrap().is_ok());

    let trap = n
        .spawn(
            "trap",
            &image(r#"(module (memory (export "memory") 1) (func (export "metta_activate") (param i32) (result i32) unreachable))"#),
            contract(MS, 10 * MS, false),
            all_caps(),
            now,
        )
        .unwrap();
    run_until(&mut n, &mut now, 60 * MS, |_, _| {});
    assert!(matches!(
        n.snapshot(trap).unwrap(),
        Err(SnapshotError::Failed(_))
    ));
}

#[test]
fn restored_memory_can_be_larger_than_the_initial_memory() {
    // Grows to 3 pages on start, writes into page 3.
    let wat = r#"(module (memory (export "memory") 1)
      (func (export "metta_activate") (param $r i32) (result i32)
        (if (i32.eq (local.get $r) (i32.const 0))
          (then (if (i32.eq (memory.size) (i32.const 1)) (then (drop (memory.grow (i32.const 2)))))))
        (i32.store (i32.const 150000) (i32.add (i32.load (i32.const 150000)) (i32.const 1)))
        i32.const 1))"#;
    let img = image(wat);
    let mut a = nucleus();
    // memory.grow is fuelled by the bytes it adds (2 pages: about 2 ms at the
    // test rate), so give it a larger slice.
    let id = a
        .spawn("g", &img, contract(5 * MS, 10 * MS, false), all_caps(), 0)
        .unwrap();
    let mut now = 0;
    run_until(&mut a, &mut now, 10 * MS, |_, _| {});
    // A small last budget may have preempted an activation: step on to a
    // boundary, as a driver about to migrate would.
    while !a.domain(id).unwrap().at_boundary() {
        if let Step::Ran { charged_ns, .. } = a.step(now) {
            now += charged_ns;
        } else {
            now += MS;
        }
    }
    assert!(read_i32(a.domain(id).unwrap().memory(), 150_000) >= 4);
    let before = read_i32(a.domain(id).unwrap().memory(), 150_000);
    let snap = a.snapshot(id).unwrap().unwrap();
    assert_eq!(snap.memory.len(), 3 * 65536);
    let mut b = nucleus();
    let id2 = b.restore("g", &img, snap, 0).unwrap();
    let mut now = 0;
    step_n(&mut b, &mut now, 1);
    assert_eq!(
        read_i32(b.domain(id2).unwrap().memory(), 150_000),
        before + 1
    );
}
