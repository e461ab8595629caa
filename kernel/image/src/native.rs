//! The native driver of the nucleus: the bare-metal twin of
//! `control/src/hosted.rs`, around the clock-free core in
//! [`metta_kernel::driver`].
//!
//! - **Calibration** ([`calibrate`]), the hosted method on the TSC: the
//!   spin-loop domain (the same module as hosted's `SPIN_WASM`) runs once to
//!   warm up and to size the runs, then [`CALIBRATION_RUNS`] times with the
//!   fuel that takes about [`CALIBRATION_TARGET_NS`] (hosted uses a fixed
//!   20 M fuel, which under TCG, ~50x slower, would take seconds); the
//!   median fuel/ns is the start-up [`FuelRate`] (fuel per 1,000,000 ns). The
//!   driver then tracks it with an EWMA of the activations it times.
//! - **Activation loop** ([`run_until`]): [`Driver::poll`] with
//!   [`timer::now_ns`] as the clock; when the nucleus is idle the CPU halts
//!   (`timer::set_deadline` + `timer::idle_until`) until the wake-up it gave
//!   (a replenishment or a domain's timer), which the 1 kHz tick honours to
//!   within one tick; between turns the domains' log lines go to the serial
//!   console, prefixed with the domain's name.
//! - **Routing** between local domains is the core's (longest-prefix channel
//!   capability, reply tokens). In the self-tests a message no local domain
//!   serves is dropped and noted in the sender's log; on a node joined to a
//!   cluster it goes to the control plane instead.
//! - **Serving a cluster** ([`Runner`]): the domains the control plane
//!   places on the node ([`metta_kernel::node::Node`], which owns the
//!   driver) run while the link (`src/link.rs`) waits for the network: each
//!   of its waits is one [`Runner::wait`], which runs activations for about
//!   [`SERVICE_NS`] (the link is serviced at least that often) or, when the
//!   domains are idle, halts until the next timer tick. The EDF schedule is
//!   the nucleus's; the kernel's own work (TLS, TCP, applying what the
//!   control plane sends) runs between activations, in the share the
//!   driver's capacity leaves free ([`SERVED`]: 95 %, the scheduler's lane
//!   capacity).

use alloc::string::{String, ToString};

use metta_kernel::driver::{Config, Driver, Poll};
use metta_kernel::node::Node;
use metta_kernel::stats::{self, RATE_SCALE_NS};
use metta_kernel::testdomains;
use metta_nucleus::{Caps, Domain, DomainId, FuelRate, Image, Runtime};
use metta_proto::{abi, Contract};

use crate::{kprintln, timer};

/// Calibration runs whose median is taken (after one warm-up run).
pub const CALIBRATION_RUNS: usize = 5;
/// How long each calibration run should take.
pub const CALIBRATION_TARGET_NS: u64 = 20_000_000;
/// Fuel of the warm-up run, which sizes the others.
const WARMUP_FUEL: u64 = 200_000;

/// The result of [`calibrate`].
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    /// The fuel rate to start with.
    pub rate: FuelRate,
    /// The same, fuel per [`RATE_SCALE_NS`].
    pub per_scale: u64,
    /// Fuel per run.
    pub fuel: u64,
    /// Each run's rate, fuel per [`RATE_SCALE_NS`].
    pub runs: [u64; CALIBRATION_RUNS],
}

/// Measures fuel per ns on the spin loop (see the module docs).
pub fn calibrate() -> Result<Calibration, String> {
    let image = Image::load(testdomains::SPIN).map_err(|e| e.to_string())?;
    let mut rt = Runtime::new();
    let contract = Contract {
        period_ns: 100_000_000,
        slice_ns: 100_000_000,
        extra: false,
        memory: 1 << 20,
    };
    let mut d = Domain::new(
        &mut rt,
        DomainId(0),
        "calibrate",
        &image,
        contract,
        Caps::none(),
    )
    .map_err(|e| e.to_string())?;
    let t = timer::now_ns();
    let a = d.activate(0, abi::REASON_START, WARMUP_FUEL);
    let ns = timer::now_ns() - t;
    let fuel = stats::scale_fuel(a.fuel_used, ns, CALIBRATION_TARGET_NS, WARMUP_FUEL, 1 << 34);
    let mut runs = [0; CALIBRATION_RUNS];
    for r in &mut runs {
        let t = timer::now_ns();
        let a = d.activate(0, abi::REASON_CONTINUE, fuel);
        *r = stats::rate_per_scale(a.fuel_used, timer::now_ns() - t);
    }
    let mut sorted = runs;
    let per_scale = stats::median(&mut sorted);
    Ok(Calibration {
        rate: FuelRate::new(per_scale, RATE_SCALE_NS),
        per_scale,
        fuel,
        runs,
    })
}

/// What [`run_until`] saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopStats {
    /// Activations run.
    pub activations: u64,
    /// Times the CPU halted because the nucleus was idle.
    pub idles: u64,
    /// Nanoseconds spent halted.
    pub idle_ns: u64,
}

/// Runs the activation loop until `end_ns` on [`timer::now_ns`].
pub fn run_until(d: &mut Driver, end_ns: u64) -> LoopStats {
    let mut s = LoopStats::default();
    loop {
        print_lines(d);
        let now = timer::now_ns();
        if now >= end_ns {
            return s;
        }
        match d.poll(&mut timer::now_ns) {
            Poll::Ran { .. } => s.activations += 1,
            Poll::Idle { until } => {
                let wake = until.unwrap_or(u64::MAX).min(end_ns);
                let now = timer::now_ns();
                if wake > now {
                    s.idles += 1;
                    timer::set_deadline(wake);
                    timer::idle_until(|| timer::deadline_expired() || timer::now_ns() >= wake);
                    timer::cancel_deadline();
                    s.idle_ns += timer::now_ns() - now;
                }
            }
        }
    }
}

/// The driver settings for domains the control plane places: admission up
/// to 95 % of the CPU (`metta-scheduler`'s `LANE_CAPACITY_PPM`, so whatever
/// the control plane admits the kernel admits), the fuel rate tracked,
/// messages without a local receiver sent to the control plane.
pub const SERVED: Config = Config {
    capacity_ppm: 950_000,
    quantum_ns: None,
    recalibrate: true,
    outbound: true,
};

/// The link services the network at least this often while domains run.
pub const SERVICE_NS: u64 = 1_000_000;

/// The placed domains, run while the link waits (see the module docs).
#[derive(Debug)]
pub struct Runner {
    /// The domains and what goes to and from the control plane.
    pub node: Node,
    /// What the activation loop did.
    pub stats: LoopStats,
    /// Whether the last [`Runner::wait`] found every domain waiting (it
    /// halted until a tick or a wake-up) rather than running one.
    pub idle: bool,
}

impl Runner {
    /// Runs `node`'s domains.
    pub fn new(node: Node) -> Runner {
        Runner {
            node,
            stats: LoopStats::default(),
            idle: false,
        }
    }

    /// Runs activations for about [`SERVICE_NS`], or until the domains are
    /// idle and then until the next timer tick (or their wake-up, which the
    /// tick honours), printing their lines.
    pub fn wait(&mut self) {
        let start = timer::now_ns();
        loop {
            let p = self.node.step(&mut timer::now_ns);
            self.print_lines();
            let now = timer::now_ns();
            match p {
                Poll::Ran { .. } => {
                    self.stats.activations += 1;
                    self.idle = false;
                    if now - start >= SERVICE_NS {
                        return;
                    }
                }
                Poll::Idle { until } => {
                    let wake = until.unwrap_or(u64::MAX);
                    if wake <= now {
                        if now - start >= SERVICE_NS {
                            return;
                        }
                        continue;
                    }
                    let tick = timer::ticks();
                    self.stats.idles += 1;
                    self.idle = true;
                    timer::idle_until(|| {
                        timer::ticks() != tick
                            || timer::now_ns() >= wake
                            || timer::now_ns() >= now + SERVICE_NS
                    });
                    self.stats.idle_ns += timer::now_ns() - now;
                    return;
                }
            }
        }
    }

    /// Prints the domains' lines (the node keeps them for the control
    /// plane too).
    fn print_lines(&mut self) {
        let (lines, dropped) = self.node.lines();
        for l in lines {
            kprintln!("{}: {}", l.domain, l.text);
        }
        if dropped > 0 {
            kprintln!("driver: {dropped} log lines dropped (console too slow)");
        }
    }
}

/// Prints the domains' log lines, `<domain>: <text>`.
pub fn print_lines(d: &mut Driver) {
    let (lines, dropped) = d.take_lines();
    for l in lines {
        kprintln!("{}: {}", l.domain, l.text);
    }
    if dropped > 0 {
        kprintln!("driver: {dropped} log lines dropped (console too slow)");
    }
}
