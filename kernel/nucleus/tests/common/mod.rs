//! Shared helpers for the integration tests: WAT images, a fake clock driver.
#![allow(dead_code)]

use metta_nucleus::{Caps, FuelRate, Image, Nucleus, Step};
use metta_proto::Contract;

pub const US: u64 = 1_000;
pub const MS: u64 = 1_000_000;

/// One unit of fuel per microsecond: small budgets keep debug-build tests
/// fast while the scheduling arithmetic stays realistic.
pub const RATE: FuelRate = FuelRate::new(1, 1_000);

pub fn image(wat: &str) -> Image {
    Image::load(&wat::parse_str(wat).expect("valid WAT")).expect("valid image")
}

pub fn contract(slice: u64, period: u64, extra: bool) -> Contract {
    Contract {
        period_ns: period,
        slice_ns: slice,
        extra,
        memory: 1 << 20,
    }
}

pub fn nucleus() -> Nucleus {
    Nucleus::new(1_000_000, RATE)
}

pub fn all_caps() -> Caps {
    Caps::with_channels(["/"])
}

/// Steps `n` with a fake clock from `*now` until `until`, calling `f` on
/// every step that ran something (with the time it started).
pub fn run_until(n: &mut Nucleus, now: &mut u64, until: u64, mut f: impl FnMut(&Step, u64)) {
    while *now < until {
        let step = n.step(*now);
        match &step {
            Step::Ran { charged_ns, .. } => {
                f(&step, *now);
                *now += charged_ns;
            }
            Step::Idle { until: wake } => {
                *now = wake.unwrap_or(until).min(until).max(*now + 1);
            }
        }
    }
}

/// Reads the little-endian i32 at `addr` of a domain's memory.
pub fn read_i32(mem: &[u8], addr: usize) -> i32 {
    i32::from_le_bytes(mem[addr..addr + 4].try_into().unwrap())
}

/// Returns immediately, idle.
pub const EMPTY: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#;

/// Returns immediately, asking for more.
pub const BUSY_RETURN: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "metta_activate") (param i32) (result i32)
    (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1)))
    i32.const 1))"#;

/// Never returns.
pub const SPIN: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "metta_activate") (param i32) (result i32)
    (loop $l (br $l))
    i32.const 0))"#;
