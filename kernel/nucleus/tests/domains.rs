//! Domains and host functions: traps, fuel, memory limits, capabilities,
//! channels, faults.

mod common;

use common::*;
use metta_nucleus::{
    Caps, Domain, DomainId, LogOrigin, Message, Nucleus, Outcome, ReplyToken, Runtime, Step,
    Undeliverable,
};
use metta_proto::abi;

fn solo(wat: &str, caps: Caps) -> Domain {
    let mut rt = Runtime::new();
    Domain::new(
        &mut rt,
        DomainId(1),
        "t",
        &image(wat),
        contract(MS, 10 * MS, false),
        caps,
    )
    .unwrap()
}

#[test]
fn activation_outcomes_and_reasons() {
    let mut d = solo(
        r#"(module (memory (export "memory") 1)
            (func (export "metta_activate") (param $r i32) (result i32)
              (i32.store (i32.const 0) (local.get $r))
              (i32.eq (local.get $r) (i32.const 0))))"#,
        Caps::none(),
    );
    assert_eq!(d.wants(0), Some(abi::REASON_START));
    let a = d.activate(0, abi::REASON_START, 1_000);
    assert_eq!(a.outcome, Outcome::More);
    assert!(a.fuel_used > 0 && a.fuel_used < 100, "{a:?}");
    assert_eq!(d.wants(0), Some(abi::REASON_CONTINUE));
    assert_eq!(
        d.activate(0, abi::REASON_CONTINUE, 1_000).outcome,
        Outcome::Idle
    );
    assert_eq!(read_i32(d.memory(), 0), abi::REASON_CONTINUE);
    assert_eq!(d.wants(0), None);
    d.deliver(Message {
        channel: "/a".into(),
        payload: vec![1],
        reply: None,
    })
    .unwrap();
    assert_eq!(d.wants(0), Some(abi::REASON_EVENTS));
    assert_eq!(d.stats().activations, 2);
}

#[test]
fn a_bad_return_value_fails_the_domain() {
    let mut d = solo(
        r#"(module (memory (export "memory") 1)
            (func (export "metta_activate") (param i32) (result i32) i32.const 7))"#,
        Caps::none(),
    );
    let a = d.activate(0, abi::REASON_START, 1_000);
    assert!(
        matches!(a.outcome, Outcome::Trapped(ref r) if r.contains("returned 7")),
        "{a:?}"
    );
    assert!(d.failure().is_some());
}

#[test]
fn preempted_activations_resume_where_they_stopped() {
    // Sums 1..=100000 in a *local* (on the wasm stack, not in memory): only
    // a resumed call can finish with the right total.
    let mut d = solo(
        r#"(module (memory (export "memory") 1)
            (func (export "metta_activate") (param i32) (result i32)
              (local $i i32) (local $sum i64)
              (loop $l
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (local.set $sum (i64.add (local.get $sum) (i64.extend_i32_u (local.get $i))))
                (br_if $l (i32.lt_u (local.get $i) (i32.const 100000))))
              (i64.store (i32.const 0) (local.get $sum))
              i32.const 0))"#,
        Caps::none(),
    );
    let mut preemptions = 0;
    let mut total_fuel = 0;
    loop {
        let a = d.activate(0, abi::REASON_START, 10_000);
        total_fuel += a.fuel_used;
        assert!(a.fuel_used <= 10_000);
        match a.outcome {
            Outcome::OutOfFuel => {
                preemptions += 1;
                assert!(!d.at_boundary());
                assert!(matches!(
                    d.snapshot(),
                    Err(metta_nucleus::SnapshotError::MidActivation)
                ));
            }
            Outcome::Idle => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(preemptions >= 10, "{preemptions}");
    assert_eq!(d.stats().preemptions, preemptions);
    assert_eq!(d.stats().fuel_used, total_fuel);
    let sum = u64::from_le_bytes(d.memory()[0..8].try_into().unwrap());
    assert_eq!(sum, 100_000 * 100_001 / 2);
    assert!(d.at_boundary());
}

#[test]
fn an_instruction_bigger_than_one_budget_still_completes() {
    // memory.fill of 8 MiB costs 131072 fuel in one instruction; budgets of
    // 1000 must be credited until it fits, instead of stalling forever.
    let mut rt = Runtime::new();
    let mut c = contract(MS, 10 * MS, false);
    c.memory = 16 << 20;
    let mut d = Domain::new(
        &mut rt,
        DomainId(1),
        "fill",
        &image(
            r#"(module (memory (export "memory") 128)
                (func (export "metta_activate") (param i32) (result i32)
                  (memory.fill (i32.const 0) (i32.const 9) (i32.const 8388608))
                  i32.const 0))"#,
        ),
        c,
        Caps::none(),
    )
    .unwrap();
    let mut rounds = 0;
    while d.activate(0, 0, 1_000).outcome == Outcome::OutOfFuel {
        rounds += 1;
        assert!(rounds < 1_000, "stalled");
    }
    assert!(rounds > 100, "{rounds}");
    assert!(d.memory()[..8 << 20].iter().all(|&b| b == 9));
}

#[test]
fn memory_grow_stops_at_the_contract() {
    let mut rt = Runtime::new();
    let mut c = contract(MS, 10 * MS, false);
    c.memory = 2 * 65536;
    let mut d = Domain::new(
        &mut rt,
        DomainId(1),
        "grow",
        &image(
            r#"(module (memory (export "memory") 1)
                (func (export "metta_activate") (param i32) (result i32)
                  (i32.store (i32.const 0) (memory.grow (i32.const 1)))
                  (i32.store (i32.const 4) (memory.grow (i32.const 1)))
                  (i32.store (i32.const 8) (memory.grow (i32.const 1000)))
                  (i32.store (i32.const 12) (memory.size))
                  i32.const 0))"#,
        ),
        c,
        Caps::none(),
    )
    .unwrap();
    assert_eq!(d.activate(0, 0, 10_000).outcome, Outcome::Idle);
    let m = d.memory();
    assert_eq!(
        [
            read_i32(m, 0),
            read_i32(m, 4),
            read_i32(m, 8),
            read_i32(m, 12)
        ],
        [1, -1, -1, 2]
    );
    assert_eq!(m.len(), 2 * 65536);
}

const CAPS_WAT: &str = r#"(module
  (import "metta" "open" (func $open (param i32 i32) (result i32)))
  (import "metta" "now" (func $now (result i64)))
  (import "metta" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "/x")
  (data (i32.const 200) "/svc/a")
  (data (i32.const 300) "hello")
  (func (export "metta_activate") (param i32) (result i32)
    (i32.store (i32.const 0) (call $open (i32.const 100) (i32.const 2)))
    (i32.store (i32.const 4) (call $open (i32.const 200) (i32.const 6)))
    (i64.store (i32.const 8) (call $now))
    (call $log (i32.const 300) (i32.const 5))
    i32.const 0))"#;

#[test]
fn capability_denials_return_err_denied_and_are_counted_and_logged() {
    let caps = Caps {
        log: true,
        clock: false,
        channels: vec!["/svc".into()],
    };
    let mut d = solo(CAPS_WAT, caps);
    assert_eq!(d.activate(42, 0, 10_000).outcome, Outcome::Idle);
    let m = d.memory();
    assert_eq!(read_i32(m, 0), abi::ERR_DENIED);
    assert_eq!(read_i32(m, 4), 0, "first handle");
    assert_eq!(
        i64::from_le_bytes(m[8..16].try_into().unwrap()),
        i64::from(abi::ERR_DENIED)
    );
    assert_eq!(d.stats().denials, 2);
    let logs = d.take_logs();
    let texts: Vec<(&LogOrigin, &str)> =
        logs.iter().map(|l| (&l.origin, l.text.as_str())).collect();
    assert_eq!(
        texts,
        [
            (&LogOrigin::Nucleus, "denied: open /x"),
            (&LogOrigin::Nucleus, "denied: now"),
            (&LogOrigin::Domain, "hello"),
        ]
    );
    assert!(logs
        .iter()
        .all(|l| l.domain == DomainId(1) && l.at_ns == 42));

    // With every capability: open works and now() is the activation's now.
    let mut d = solo(CAPS_WAT, all_caps());
    d.activate(42, 0, 10_000);
    let m = d.memory();
    assert_eq!((read_i32(m, 0), read_i32(m, 4)), (0, 1));
    assert_eq!(i64::from_le_bytes(m[8..16].try_into().unwrap()), 42);
    assert_eq!(d.stats().denials, 0);

    // Without `log`, logging is a counted denial too.
    let mut d = solo(
        CAPS_WAT,
        Caps {
            log: false,
            clock: true,
            channels: vec!["/".into()],
        },
    );
    d.activate(0, 0, 10_000);
    assert_eq!(d.stats().denials, 1);
    assert_eq!(d.take_logs()[0].text, "denied: log");
}

#[test]
fn pointers_out_of_bounds_get_err_fault() {
    let mut d = solo(
        r#"(module
          (import "metta" "open" (func $open (param i32 i32) (result i32)))
          (import "metta" "send" (func $send (param i32 i32 i32) (result i32)))
          (import "metta" "recv" (func $recv (param i32 i32 i32) (result i32)))
          (import "metta" "peek" (func $peek (param i32) (result i32)))
          (import "metta" "log" (func $log (param i32 i32)))
          (memory (export "memory") 1)
          (data (i32.const 100) "/svc/a")
          (func (export "metta_activate") (param i32) (result i32)
            (local $h i32)
            (local.set $h (call $open (i32.const 100) (i32.const 6)))
            (i32.store (i32.const 0) (call $send (local.get $h) (i32.const -16) (i32.const 100)))
            (i32.store (i32.const 4) (call $recv (local.get $h) (i32.const 65530) (i32.const 100)))
            (i32.store (i32.const 8) (call $open (i32.const 70000) (i32.const 4)))
            (i32.store (i32.const 12) (call $send (local.get $h) (i32.const 0) (i32.const 70000)))
            (i32.store (i32.const 16) (call $send (i32.const 99) (i32.const 0) (i32.const 1)))
            (i32.store (i32.const 20) (call $peek (local.get $h)))
            (i32.store (i32.const 24) (call $send (local.get $h) (i32.const 65535) (i32.const 2)))
            (i32.store (i32.const 28) (call $send (local.get $h) (i32.const 65535) (i32.const 1)))
            (call $log (i32.const -5) (i32.const 10))
            i32.const 0))"#,
        all_caps(),
    );
    assert_eq!(d.activate(0, 0, 10_000).outcome, Outcome::Idle);
    let m = d.memory();
    let got: Vec<i32> = (0..8).map(|i| read_i32(m, i * 4)).collect();
    assert_eq!(
        got,
        [
            abi::ERR_FAULT,
            abi::ERR_FAULT,
            abi::ERR_FAULT,
            abi::ERR_TOO_BIG,
            abi::ERR_BADCHAN,
            abi::ERR_EMPTY,
            abi::ERR_FAULT,
            0, // the very last byte is in bounds
        ]
    );
    assert_eq!(d.stats().faults, 5);
    assert!(d.failure().is_none());
    assert_eq!(d.take_outbox().len(), 1);
}

#[test]
fn inboxes_are_bounded() {
    let mut d = solo(EMPTY, Caps::none());
    let msg = || Message {
        channel: "/a".into(),
        payload: vec![0; 8],
        reply: None,
    };
    for _ in 0..abi::INBOX_DEPTH {
        d.deliver(msg()).unwrap();
    }
    assert!(matches!(d.deliver(msg()), Err(Undeliverable::Full(_))));
    let big = Message {
        channel: "/a".into(),
        payload: vec![0; abi::MAX_MESSAGE + 1],
        reply: None,
    };
    let mut d = solo(EMPTY, Caps::none());
    assert!(matches!(d.deliver(big), Err(Undeliverable::TooBig(_))));
}

/// Client: on start opens /svc/echo and sends "ping"; on events receives
/// into 200.. and stores the length at 4.
const CLIENT: &str = r#"(module
  (import "metta" "open" (func $open (param i32 i32) (result i32)))
  (import "metta" "send" (func $send (param i32 i32 i32) (result i32)))
  (import "metta" "recv" (func $recv (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "/svc/echo")
  (data (i32.const 120) "ping")
  (func (export "metta_activate") (param $r i32) (result i32)
    (if (i32.eq (local.get $r) (i32.const 0))
      (then
        (i32.store (i32.const 0) (call $open (i32.const 100) (i32.const 9)))
        (i32.store (i32.const 8) (call $send (i32.load (i32.const 0)) (i32.const 120) (i32.const 4))))
      (else
        (i32.store (i32.const 4) (call $recv (i32.load (i32.const 0)) (i32.const 200) (i32.const 64)))))
    i32.const 0))"#;

/// Server: opens /svc/echo on start; on events answers every request with
/// "pong" followed by the request, through a reply handle.
const SERVER: &str = r#"(module
  (import "metta" "open" (func $open (param i32 i32) (result i32)))
  (import "metta" "send" (func $send (param i32 i32 i32) (result i32)))
  (import "metta" "recv" (func $recv (param i32 i32 i32) (result i32)))
  (import "metta" "reply_to" (func $reply_to (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "/svc/echo")
  (data (i32.const 196) "pong")
  (func (export "metta_activate") (param $r i32) (result i32)
    (local $n i32) (local $h i32)
    (if (i32.eq (local.get $r) (i32.const 0))
      (then (i32.store (i32.const 0) (call $open (i32.const 100) (i32.const 9)))))
    (block $done
      (loop $next
        (local.set $n (call $recv (i32.load (i32.const 0)) (i32.const 200) (i32.const 64)))
        (br_if $done (i32.lt_s (local.get $n) (i32.const 0)))
        (local.set $h (call $reply_to (i32.load (i32.const 0))))
        (i32.store (i32.const 8) (call $send (local.get $h) (i32.const 196) (i32.add (local.get $n) (i32.const 4))))
        (i32.store (i32.const 12) (i32.add (i32.load (i32.const 12)) (i32.const 1)))
        (br $next)))
    i32.const 0))"#;

#[test]
fn request_and_reply_travel_through_outbox_and_deliver() {
    let mut n = nucleus();
    let caps = Caps::with_channels(["/svc/echo"]);
    let server = n
        .spawn(
            "server",
            &image(SERVER),
            contract(MS, 10 * MS, false),
            caps.clone(),
            0,
        )
        .unwrap();
    let client = n
        .spawn(
            "client",
            &image(CLIENT),
            contract(MS, 10 * MS, false),
            caps,
            0,
        )
        .unwrap();
    let mut now = 0;
    // Both start; the client's request leaves through the outbox.
    run_until(&mut n, &mut now, MS, |_, _| {});
    let out = n.take_outbox();
    assert_eq!(out.len(), 1);
    assert_eq!(
        (
            out[0].from,
            out[0].channel.as_str(),
            &out[0].payload[..],
            out[0].reply
        ),
        (client, "/svc/echo", &b"ping"[..], None)
    );

    // The driver routes by name and mints a reply token for the sender.
    let token = ReplyToken(u64::from(client.0));
    let req = out.into_iter().next().unwrap();
    n.deliver(
        server,
        Message {
            channel: req.channel,
            payload: req.payload,
            reply: Some(token),
        },
        now,
    )
    .unwrap();
    run_until(&mut n, &mut now, 2 * MS, |_, _| {});
    let out = n.take_outbox();
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].from, &out[0].payload[..], out[0].reply),
        (server, &b"pongping"[..], Some(token))
    );
    assert_eq!(read_i32(n.domain(server).unwrap().memory(), 12), 1);

    // The answer is routed by token, not by name, back to the client.
    let ans = out.into_iter().next().unwrap();
    let to = DomainId(ans.reply.unwrap().0 as u32);
    n.deliver(
        to,
        Message {
            channel: ans.channel,
            payload: ans.payload,
            reply: None,
        },
        now,
    )
    .unwrap();
    run_until(&mut n, &mut now, 3 * MS, |_, _| {});
    let m = n.domain(client).unwrap().memory();
    assert_eq!(read_i32(m, 4), 8);
    assert_eq!(&m[200..208], b"pongping");
    assert_eq!(n.domain(client).unwrap().stats().sent, 1);
    assert_eq!(n.domain(client).unwrap().stats().received, 1);
    assert_eq!(n.domain(server).unwrap().stats().received, 1);
}

#[test]
fn a_trapping_domain_does_not_disturb_the_others() {
    let mut n = nucleus();
    let healthy = n
        .spawn(
            "healthy",
            &image(BUSY_RETURN),
            contract(10 * MS, 100 * MS, false),
            all_caps(),
            0,
        )
        .unwrap();
    let traps = [
        ("unreachable", "(unreachable)"),
        ("oob", "(drop (i32.load (i32.const 70000)))"),
        ("div", "(drop (i32.div_s (i32.const 1) (i32.const 0)))"),
    ];
    let mut bad = Vec::new();
    for (name, body) in traps {
        let wat = format!(
            r#"(module (memory (export "memory") 1)
                (func (export "metta_activate") (param i32) (result i32) {body} i32.const 0))"#
        );
        bad.push(
            n.spawn(
                name,
                &image(&wat),
                contract(10 * MS, 100 * MS, false),
                all_caps(),
                0,
            )
            .unwrap(),
        );
    }
    let overflow = n
        .spawn(
            "overflow",
            &image(
                r#"(module (memory (export "memory") 1)
                    (func $f (param i32) (result i32) (call $f (local.get 0)))
                    (func (export "metta_activate") (param i32) (result i32) (call $f (local.get 0))))"#,
            ),
            contract(10 * MS, 100 * MS, false),
            all_caps(),
            0,
        )
        .unwrap();
    bad.push(overflow);
    assert_eq!(n.scheduler().used_ppm(), 500_000);
    let mut now = 0;
    let mut failures = 0;
    run_until(&mut n, &mut now, 300 * MS, |s, _| {
        if let Step::Ran { activation, .. } = s {
            if matches!(activation.outcome, Outcome::Trapped(_)) {
                failures += 1;
            }
        }
    });
    assert_eq!(failures, 4, "each bad domain traps exactly once");
    for id in &bad {
        let d = n.domain(*id).unwrap();
        assert!(d.failure().is_some(), "{id}");
        assert_eq!(d.stats().traps, 1);
        assert!(n.scheduler().entry(*id).is_none(), "share freed");
    }
    let reasons: Vec<String> = bad
        .iter()
        .map(|id| n.domain(*id).unwrap().failure().unwrap().to_lowercase())
        .collect();
    assert!(reasons[0].contains("unreachable"), "{reasons:?}");
    assert!(reasons[1].contains("out of bounds"), "{reasons:?}");
    assert!(reasons[2].contains("divi"), "{reasons:?}");
    assert!(reasons[3].contains("stack"), "{reasons:?}");
    assert!(matches!(
        n.deliver(
            bad[0],
            Message {
                channel: "/a".into(),
                payload: vec![],
                reply: None
            },
            now
        ),
        Err(Undeliverable::Failed(_))
    ));
    // The healthy domain kept running all along: 3 periods' worth of slices.
    let h = n.domain(healthy).unwrap();
    assert!(h.failure().is_none());
    assert!(h.stats().cpu_ns >= 30 * MS, "{:?}", h.stats());
    assert!(read_i32(h.memory(), 0) > 1000);
    assert_eq!(n.scheduler().used_ppm(), 100_000);
}

#[test]
fn an_infinite_loop_is_preempted_and_the_other_domain_gets_its_slice() {
    let mut n = nucleus();
    // A spinner that may also take spare time, and a 10ms/100ms spinner.
    let hog = n
        .spawn(
            "hog",
            &image(SPIN),
            contract(50 * MS, 100 * MS, true),
            all_caps(),
            0,
        )
        .unwrap();
    let mine = n
        .spawn(
            "mine",
            &image(SPIN),
            contract(10 * MS, 100 * MS, false),
            all_caps(),
            0,
        )
        .unwrap();
    let mut per_period = [(0u64, 0u64); 10];
    let mut now = 0;
    run_until(&mut n, &mut now, 1_000 * MS, |s, at| {
        if let Step::Ran {
            domain,
            activation,
            charged_ns,
            ..
        } = s
        {
            assert_eq!(
                activation.outcome,
                Outcome::OutOfFuel,
                "spinners never return"
            );
            let p = &mut per_period[(at / (100 * MS)) as usize];
            if *domain == mine {
                p.0 += charged_ns;
            } else {
                p.1 += charged_ns;
            }
        }
    });
    for (k, (m, h)) in per_period.iter().enumerate() {
        assert!(*m >= 10 * MS, "period {k}: mine got {m}");
        assert!(*h >= 50 * MS, "period {k}: hog got {h}");
    }
    // The hog soaked up the spare time (the CPU never idled).
    let total: u64 = per_period.iter().map(|(m, h)| m + h).sum();
    assert!(total >= 999 * MS, "{total}");
    assert!(n.domain(hog).unwrap().stats().preemptions > 100);
    assert!(n.domain(mine).unwrap().failure().is_none());
}

#[test]
fn eight_greedy_wasm_neighbours_do_not_take_a_guaranteed_slice() {
    let mut n = nucleus();
    let mine = n
        .spawn(
            "mine",
            &image(BUSY_RETURN),
            contract(10 * MS, 100 * MS, false),
            all_caps(),
            0,
        )
        .unwrap();
    for i in 0..8 {
        n.spawn(
            &format!("greedy{i}"),
            &image(SPIN),
            contract(MS, 100 * MS, true),
            all_caps(),
            0,
        )
        .unwrap();
    }
    let mut got = [0u64; 10];
    let mut first_start = [u64::MAX; 10];
    let mut now = 0;
    run_until(&mut n, &mut now, 1_000 * MS, |s, at| {
        if let Step::Ran {
            domain, charged_ns, ..
        } = s
        {
            if *domain == mine {
                let k = (at / (100 * MS)) as usize;
                got[k] += charged_ns;
                first_start[k] = first_start[k].min(at);
            }
        }
    });
    for k in 0..10 {
        assert!(got[k] >= 10 * MS, "period {k}: {}", got[k]);
        assert!(first_start[k] < (k as u64 + 1) * 100 * MS);
    }
}

#[test]
fn timers_wake_domains() {
    // On start: timer(now + 5 ms). On timer: count at 0, re-arm.
    let wat = r#"(module
      (import "metta" "now" (func $now (result i64)))
      (import "metta" "timer" (func $timer (param i64)))
      (memory (export "memory") 1)
      (func (export "metta_activate") (param $r i32) (result i32)
        (if (i32.eq (local.get $r) (i32.const 2))
          (then (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1)))))
        (call $timer (i64.add (call $now) (i64.const 5000000)))
        i32.const 0))"#;
    let mut n = nucleus();
    let id = n
        .spawn(
            "ticker",
            &image(wat),
            contract(MS, 10 * MS, false),
            all_caps(),
            0,
        )
        .unwrap();
    let mut now = 0;
    assert!(matches!(n.step(now), Step::Ran { .. }));
    // The nucleus idles until the timer.
    match n.step(now + 10 * US) {
        Step::Idle { until } => assert_eq!(until, Some(5 * MS)),
        other => panic!("{other:?}"),
    }
    run_until(&mut n, &mut now, 51 * MS, |_, _| {});
    assert_eq!(read_i32(n.domain(id).unwrap().memory(), 0), 10);
}

#[test]
fn admission_control_refuses_overcommitment() {
    let mut n = Nucleus::new(500_000, RATE);
    let img = image(EMPTY);
    n.spawn("a", &img, contract(40 * MS, 100 * MS, false), all_caps(), 0)
        .unwrap();
    let e = n
        .spawn("b", &img, contract(20 * MS, 100 * MS, false), all_caps(), 0)
        .unwrap_err();
    assert!(e.to_string().contains("200000 ppm"), "{e}");
    let b = n
        .spawn("b", &img, contract(10 * MS, 100 * MS, false), all_caps(), 0)
        .unwrap();
    n.stop(b).unwrap();
    n.spawn("c", &img, contract(10 * MS, 100 * MS, false), all_caps(), 0)
        .unwrap();
}

#[test]
fn the_nucleus_is_send() {
    fn send<T: Send>() {}
    send::<Nucleus>();
    send::<metta_nucleus::Image>();
    send::<metta_nucleus::Snapshot>();
}
