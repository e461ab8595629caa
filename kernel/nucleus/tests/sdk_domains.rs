//! The SDK's example domains (real Rust-compiled wasm, with a private
//! `__stack_pointer`) load, run, and survive snapshot/restore. They are
//! build outputs (`domains/build.sh` writes `domains/out/*.wasm`; the
//! project's test command runs it first). Outside CI the test skips when they
//! have not been built; under CI (`CI` set) a missing file fails it.

mod common;

use std::path::PathBuf;

use common::*;
use metta_nucleus::{Caps, DomainId, GlobalKind, Image, Message, Nucleus, ReplyToken, Step};

fn built(name: &str) -> Option<Vec<u8>> {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../../domains/out/{name}.wasm"));
    match std::fs::read(&p) {
        Ok(b) => Some(b),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("{}: {e} (scripts/test builds it first)", p.display())
        }
        Err(_) => {
            eprintln!("skipping: {} not built (run domains/build.sh)", p.display());
            None
        }
    }
}

#[test]
fn every_example_domain_loads_and_its_stack_pointer_is_captured() {
    for name in ["counter", "pingpong", "dirtier", "spin"] {
        let Some(bytes) = built(name) else { return };
        let img = Image::load(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            img.mutable_globals().contains(&(0, GlobalKind::I32)),
            "{name}: {:?}",
            img.mutable_globals()
        );
    }
}

/// Sends `req` to the counter and returns its answer.
fn ask(n: &mut Nucleus, id: DomainId, now: &mut u64, req: &str) -> String {
    n.deliver(
        id,
        Message {
            channel: "/svc/counter".into(),
            payload: req.as_bytes().to_vec(),
            reply: Some(ReplyToken(7)),
        },
        *now,
    )
    .unwrap();
    let until = *now + 20 * MS;
    run_until(n, now, until, |_, _| {});
    let out = n.take_outbox();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].reply, Some(ReplyToken(7)));
    String::from_utf8(out[0].payload.clone()).unwrap()
}

#[test]
fn the_counter_service_keeps_counting_across_a_restore() {
    let Some(bytes) = built("counter") else {
        return;
    };
    let img = Image::load(&bytes).unwrap();
    let caps = Caps {
        log: true,
        clock: true,
        channels: vec!["/svc/counter".into()],
    };
    let c = contract(5 * MS, 10 * MS, false);
    let mut a = nucleus();
    let id = a.spawn("counter", &img, c, caps, 0).unwrap();
    let mut now = 0;
    assert_eq!(ask(&mut a, id, &mut now, "incr"), "1");
    assert_eq!(ask(&mut a, id, &mut now, "add 41"), "42");
    assert_eq!(ask(&mut a, id, &mut now, "bogus"), "err unknown command");
    let logs = a.take_logs();
    assert!(logs.iter().any(|l| l.text == "counter: up"), "{logs:?}");

    let snap = a.snapshot(id).unwrap().unwrap();
    let mut b = Nucleus::new(1_000_000, RATE);
    let id2 = b
        .restore("counter", &Image::load(&bytes).unwrap(), snap, 0)
        .unwrap();
    let mut now = 0;
    assert_eq!(ask(&mut b, id2, &mut now, "get"), "42");
    assert_eq!(ask(&mut b, id2, &mut now, "incr"), "43");
    assert!(matches!(b.step(now), Step::Idle { .. }));
    assert_eq!(b.domain(id2).unwrap().stats().traps, 0);
}
