//! Feeds arbitrary bytes to the domain image loader — what `mettactl image
//! push` hands the cluster — and runs whatever loads for a few activations
//! with little fuel: nothing may panic, hang or grow past the contract.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metta_nucleus::{Caps, FuelRate, Image, Nucleus, Step};
use metta_proto::Contract;

fuzz_target!(|data: &[u8]| {
    let Ok(image) = Image::load(data) else {
        return;
    };
    let mut n = Nucleus::new(900_000, FuelRate::new(1, 1_000));
    let contract = Contract {
        period_ns: 10_000_000,
        slice_ns: 1_000_000,
        extra: false,
        memory: 4 << 20,
    };
    if n.spawn("fuzz", &image, contract, Caps::with_channels(["/"]), 0).is_err() {
        return;
    }
    let mut now = 0;
    for _ in 0..8 {
        match n.step(now) {
            Step::Ran { .. } => {}
            Step::Idle { until } => now = until.unwrap_or(now + 10_000_000),
        }
        now += 100_000;
        let _ = n.take_outbox();
        let _ = n.take_logs();
    }
});
