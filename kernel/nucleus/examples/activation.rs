//! Empty-activation round trip: how long the nucleus takes to activate a
//! domain whose entry returns immediately.
//!
//! `cargo run --release -p metta-nucleus --example activation [ACTIVATIONS]`
//!
//! Measures, 5 repetitions of N activations each (default 1,000,000), timed
//! in blocks of 1,000:
//! - `Domain::activate`: set fuel, call `metta_activate`, read fuel, classify;
//! - `Nucleus::step`: the same plus the EDF decision, fuel conversion and
//!   accounting (the domain returns `RUN_MORE`, so it is always runnable);
//!
//! and calibrates the fuel rate (fuel per ns) on a spinning domain, the
//! number a driver passes to `Nucleus::new`.

use std::time::Instant;

use metta_nucleus::{Caps, Domain, DomainId, FuelRate, Image, Nucleus, Outcome, Runtime, Step};
use metta_proto::{abi, Contract};

const BLOCK: usize = 1_000;

fn image(wat: &str) -> Image {
    Image::load(&wat::parse_str(wat).expect("WAT")).expect("image")
}

fn contract() -> Contract {
    Contract {
        period_ns: 100_000_000,
        slice_ns: 100_000_000,
        extra: true,
        memory: 1 << 20,
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `f` `n` times in blocks; returns the median ns per call over blocks.
fn measure(n: usize, mut f: impl FnMut()) -> f64 {
    let mut per_call = Vec::with_capacity(n / BLOCK);
    for _ in 0..n / BLOCK {
        let t = Instant::now();
        for _ in 0..BLOCK {
            f();
        }
        per_call.push(t.elapsed().as_nanos() as f64 / BLOCK as f64);
    }
    median(&mut per_call)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("ACTIVATIONS must be a number"))
        .unwrap_or(1_000_000)
        .max(BLOCK);

    let empty = image(
        r#"(module (memory (export "memory") 1)
            (func (export "metta_activate") (param i32) (result i32) i32.const 1))"#,
    );

    let mut rt = Runtime::new();
    let mut d = Domain::new(
        &mut rt,
        DomainId(1),
        "empty",
        &empty,
        contract(),
        Caps::none(),
    )
    .expect("domain");
    let mut activate = Vec::new();
    for _ in 0..5 {
        activate.push(measure(n, || {
            let a = d.activate(0, abi::REASON_CONTINUE, 1_000_000);
            debug_assert_eq!(a.outcome, Outcome::More);
            std::hint::black_box(a);
        }));
    }

    let clock = Instant::now();
    let now = || clock.elapsed().as_nanos() as u64;
    let mut nucleus = Nucleus::new(1_000_000, FuelRate::new(1, 1));
    nucleus
        .spawn("empty", &empty, contract(), Caps::none(), now())
        .expect("spawn");
    let mut step = Vec::new();
    for _ in 0..5 {
        step.push(measure(n, || {
            let s = nucleus.step(now());
            debug_assert!(matches!(s, Step::Ran { .. }));
            std::hint::black_box(s);
        }));
    }

    // Fuel rate: a spinning domain with 100M fuel, timed.
    let spin = image(
        r#"(module (memory (export "memory") 1)
            (func (export "metta_activate") (param i32) (result i32)
              (local $i i32)
              (loop $l
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br $l))
              i32.const 0))"#,
    );
    let mut s = Domain::new(
        &mut rt,
        DomainId(2),
        "spin",
        &spin,
        contract(),
        Caps::none(),
    )
    .expect("domain");
    let mut rates = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let a = s.activate(0, abi::REASON_START, 100_000_000);
        let ns = t.elapsed().as_nanos() as f64;
        assert_eq!(a.outcome, Outcome::OutOfFuel);
        rates.push(a.fuel_used as f64 / ns);
    }

    let show = |name: &str, v: &[f64]| {
        let mut sorted = v.to_vec();
        let med = median(&mut sorted);
        println!(
            "{name:<22} median {med:7.1} ns   (reps: {})",
            v.iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    println!(
        "empty activation round trip, {n} activations x 5, median of {BLOCK}-activation blocks"
    );
    show("Domain::activate", &activate);
    show("Nucleus::step", &step);
    let mut r = rates.clone();
    println!(
        "fuel rate (spin loop)  median {:7.3} fuel/ns (reps: {})",
        median(&mut r),
        rates
            .iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
