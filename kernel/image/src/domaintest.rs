//! The self-tests of the nucleus on bare metal (`test=domains|dirty|
//! snapshot|bench`), on the test domains embedded in the image
//! ([`metta_kernel::testdomains`]). Each prints its figures and returns the
//! success code, or the panic code after a line `<test>: FAIL: <why>`.
//! They run on a 1 MiB stack of their own ([`crate::stack`]).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use metta_kernel::driver::{contract_report, Config, Driver, DriverError, Poll};
use metta_kernel::exit::ExitCode;
use metta_kernel::paging::PAGE;
use metta_kernel::stats::{self, Percent, RATE_SCALE_NS};
use metta_kernel::testdomains::{self as td, read_le};
use metta_nucleus::accounting;
use metta_nucleus::{memory_root, Caps, Domain, DomainId, FuelRate, Image, Nucleus, Runtime, Step};
use metta_proto::{abi, Contract};

use crate::{dirty, heap, kprintln, mmu, native, timer, tsc};

/// Result of a test body: `Err(why)` fails it.
type Check = Result<(), String>;

/// Fails with `why` unless `cond`.
fn ensure(cond: bool, why: impl FnOnce() -> String) -> Check {
    if cond {
        Ok(())
    } else {
        Err(why())
    }
}

fn ms(ns: u64) -> Fixed {
    Fixed(ns / 1_000, 3)
}

fn us(ns: u64) -> Fixed {
    Fixed(ns, 3)
}

/// `value / 10^digits` with `digits` decimals.
struct Fixed(u64, u32);

impl core::fmt::Display for Fixed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let scale = 10u64.pow(self.1);
        write!(
            f,
            "{}.{:0width$}",
            self.0 / scale,
            self.0 % scale,
            width = self.1 as usize
        )
    }
}

/// Runs a test body and turns its outcome into an exit code.
fn finish(name: &str, r: Check) -> ExitCode {
    let u = heap::in_use();
    kprintln!(
        "{name}: heap {} bytes in use (peak {}), {} stretches",
        u.in_use,
        u.peak,
        u.stretches
    );
    match r {
        Ok(()) => {
            kprintln!("{name}: ok");
            ExitCode::Success
        }
        Err(why) => {
            kprintln!("{name}: FAIL: {why}");
            ExitCode::Panic
        }
    }
}

fn contract(slice_ms: u64, period_ms: u64, extra: bool) -> Contract {
    Contract {
        period_ns: period_ms * 1_000_000,
        slice_ns: slice_ms * 1_000_000,
        extra,
        memory: 1 << 20,
    }
}

fn err(e: DriverError) -> String {
    e.to_string()
}

/// A driver with a fixed fuel rate (0.1 fuel/ns: a 1 ms quantum is 100,000
/// fuel, plenty for the small test activations), no recalibration.
fn fixed_driver() -> Driver {
    Driver::new(
        Config {
            recalibrate: false,
            ..Config::default()
        },
        FuelRate::new(1, 10),
    )
}

/// Polls until domain `id` has run one activation (at most 1,000 turns).
fn step_domain(d: &mut Driver, id: DomainId) -> Check {
    for _ in 0..1_000 {
        match d.poll(&mut timer::now_ns) {
            Poll::Ran { domain, .. } if domain == id => {
                native::print_lines(d);
                return Ok(());
            }
            Poll::Ran { .. } => {}
            Poll::Idle { until: None } => break,
            Poll::Idle { until: Some(t) } => timer::sleep_until(t),
        }
    }
    Err(format!("domain {id} did not run"))
}

/// Polls until the nucleus has nothing to do but timers, or `limit_ns` passed.
fn run_idle(d: &mut Driver, limit_ns: u64) {
    let end = timer::now_ns() + limit_ns;
    while timer::now_ns() < end {
        match d.poll(&mut timer::now_ns) {
            Poll::Ran { .. } => {}
            Poll::Idle { until } if until.is_none_or(|t| t > timer::now_ns()) => break,
            Poll::Idle { .. } => {}
        }
    }
    native::print_lines(d);
}

/// How long `test=domains` runs the domains.
const DOMAINS_RUN_NS: u64 = 1_000_000_000;
/// The share of its slice the 2 ms / 10 ms domain must get in a period...
const SLICE_SHARE_PPM: u64 = 900_000;
/// ... in at least this share of the complete periods.
const PERIODS_MET_PPM: u64 = 900_000;

/// `test=domains`.
pub fn domains() -> ExitCode {
    let r = domains_body();
    finish("domains", r)
}

fn domains_body() -> Check {
    let cal = native::calibrate()?;
    kprintln!(
        "domains: fuel rate {} fuel/ms by the TSC: median of {} runs of {} fuel (~{} ms each); runs {:?}",
        cal.per_scale,
        native::CALIBRATION_RUNS,
        cal.fuel,
        native::CALIBRATION_TARGET_NS / 1_000_000,
        cal.runs
    );
    let mut d = Driver::new(Config::default(), cal.rate);
    let svc = Caps::with_channels(["/svc/counter"]);
    let t0 = timer::now_ns();
    let spawn = |d: &mut Driver, name: &str, wasm: &[u8], c: Contract, caps: Caps| {
        d.spawn(name, wasm, c, caps, timer::now_ns())
            .map_err(|e| format!("{name}: {e}"))
    };
    spawn(
        &mut d,
        "counter",
        td::COUNTER,
        contract(1, 10, false),
        svc.clone(),
    )?;
    spawn(&mut d, "client", td::CLIENT, contract(1, 10, false), svc)?;
    spawn(
        &mut d,
        "greedy",
        td::SPIN,
        contract(1, 10, true),
        Caps::none(),
    )?;
    spawn(
        &mut d,
        "steady",
        td::STEADY,
        contract(2, 10, false),
        Caps::none(),
    )?;
    let clock_only = Caps {
        clock: true,
        ..Caps::none()
    };
    spawn(&mut d, "trap", td::TRAP, contract(1, 10, false), clock_only)?;
    let spawned = timer::now_ns();
    kprintln!(
        "domains: 5 domains spawned in {} ms: counter 1/10 ms, client 1/10 ms, greedy 1/10 ms + extra, steady 2/10 ms, trap 1/10 ms",
        ms(spawned - t0)
    );
    let ls = native::run_until(&mut d, spawned + DOMAINS_RUN_NS);
    let end = timer::now_ns();
    let elapsed = end - spawned;
    kprintln!(
        "domains: ran {} ms: {} activations, {} idle halts ({} ms idle); fuel rate now {} fuel/ms",
        ms(elapsed),
        ls.activations,
        ls.idles,
        ms(ls.idle_ns),
        d.rate_per_scale()
    );

    let u = heap::in_use();
    kprintln!(
        "domains: heap {} bytes in use with the 5 domains live (of which {} KiB this test's stack), {} stretches",
        u.in_use,
        crate::stack::STACK_SIZE / 1024,
        u.stretches
    );
    let mut failures = Vec::new();
    for name in ["counter", "client", "greedy", "steady", "trap"] {
        let id = d.id(name).map_err(err)?;
        let rec = d.record(id).ok_or("no record")?;
        let dom = d.nucleus().domain(id).ok_or("no domain")?;
        let c = rec.contract;
        let due = c.slice_ns * elapsed / c.period_ns;
        let rep = contract_report(&rec.periods, &c, end, SLICE_SHARE_PPM);
        let state = match dom.failure() {
            Some(why) => format!("failed: {why}"),
            None => "running".to_string(),
        };
        let st = dom.stats();
        kprintln!(
            "domains: {name:<7} contract {}/{} ms{}: charged {} ms guaranteed + {} ms extra, real {} ms, due {} ms ({} of due); {} activations, {} preempted; {} fuel/ms of real time; {}",
            c.slice_ns / 1_000_000,
            c.period_ns / 1_000_000,
            if c.extra { " + extra" } else { "" },
            ms(rec.guaranteed_ns),
            ms(rec.extra_ns),
            ms(rec.real_ns),
            ms(due),
            Percent(accounting::ppm(rec.guaranteed_ns, due)),
            st.activations,
            st.preemptions,
            stats::rate_per_scale(st.fuel_used, rec.real_ns),
            state
        );
        // Per-period figures mean something for the domains that always
        // want CPU; the others run when a message or their timer comes.
        if matches!(name, "greedy" | "steady") {
            kprintln!(
                "domains: {name:<7} periods: {}/{} got >= {} of the slice charged ({}/{} by wall time); activation latency median {} us, p99 {} us (max {} us); wall time {} of charged",
                rep.met,
                rep.periods,
                Percent(SLICE_SHARE_PPM),
                rep.met_real,
                rep.periods,
                us(rep.p50_latency_ns),
                us(rep.p99_latency_ns),
                us(rep.max_latency_ns),
                Percent(accounting::ppm(rep.real_ns, rep.charged_ns.max(1)))
            );
        }
        if name == "steady" {
            let met_ppm = accounting::ppm(rep.met, rep.periods);
            kprintln!(
                "domains: steady got >= {} of its slice (charged) in {} of {} periods ({}; needed {}); by wall time in {}; p99 activation latency {} us",
                Percent(SLICE_SHARE_PPM),
                rep.met,
                rep.periods,
                Percent(met_ppm),
                Percent(PERIODS_MET_PPM),
                rep.met_real,
                us(rep.p99_latency_ns)
            );
            if rep.periods < 50 || met_ppm < PERIODS_MET_PPM {
                failures.push(format!(
                    "steady met its slice in {}/{} periods",
                    rep.met, rep.periods
                ));
            }
        }
        if name == "greedy" && rec.extra_ns == 0 {
            failures.push("greedy got no spare time".into());
        }
        if name != "trap" && dom.failure().is_some() {
            failures.push(format!("{name} failed"));
        }
        if name == "trap" && dom.failure().is_none() {
            failures.push("trap did not trap".into());
        }
    }

    // Round trips between two domains.
    let client = d.id("client").map_err(err)?;
    let mem = d.nucleus().domain(client).ok_or("no client")?.memory();
    let answers = read_le::<4>(mem, td::CLIENT_ANSWERS_AT);
    let last = read_le::<8>(mem, td::CLIENT_LAST_AT);
    kprintln!(
        "domains: client -> counter: {answers} round trips, last count {last} (want {} and {})",
        td::CLIENT_ROUNDS,
        td::CLIENT_ROUNDS
    );
    if answers != u64::from(td::CLIENT_ROUNDS) || last != u64::from(td::CLIENT_ROUNDS) {
        failures.push(format!("{answers} round trips, last {last}"));
    }
    // The trap is reported and the others ran after it.
    let steady = d.id("steady").map_err(err)?;
    let after_trap = d.record(steady).map_or(0, |r| {
        r.periods
            .records()
            .iter()
            .filter(|p| p.start_ns > spawned + 200_000_000)
            .count()
    });
    kprintln!("domains: trap failed for good; steady ran in {after_trap} periods after it");
    if after_trap < 50 {
        failures.push(format!("steady ran in {after_trap} periods after the trap"));
    }
    match failures.is_empty() {
        true => Ok(()),
        false => Err(failures.join("; ")),
    }
}

/// `test=dirty`.
pub fn dirty() -> ExitCode {
    let r = dirty_body();
    finish("dirty", r)
}

fn show(pages: &[u32]) -> String {
    if pages.len() > 8 {
        let contiguous = pages.iter().enumerate().all(|(i, p)| *p == i as u32);
        if contiguous {
            return format!("all {} pages (0..{})", pages.len(), pages.len());
        }
    }
    format!("{pages:?}")
}

/// Domain `id` of `d`.
fn domain(d: &Driver, id: DomainId) -> Result<&Domain, String> {
    d.nucleus()
        .domain(id)
        .ok_or_else(|| format!("no domain {id}"))
}

fn dirty_body() -> Check {
    let mut d = fixed_driver();
    let id = d
        .spawn(
            "dirty",
            td::DIRTY,
            contract(1, 10, false),
            Caps::none(),
            timer::now_ns(),
        )
        .map_err(err)?;
    let base = domain(&d, id)?.memory().as_ptr() as u64;
    let len = domain(&d, id)?.memory().len() as u64;
    let guard_mapped =
        mmu::entry(base - PAGE).map(|e| e.load(core::sync::atomic::Ordering::Relaxed) & 1);
    kprintln!(
        "dirty: memory at {base:#x}, {len} bytes ({} 4 KiB pages); guard page below {}",
        len / PAGE,
        match guard_mapped {
            Some(0) => "unmapped",
            Some(_) => "MAPPED",
            None => "not 4 KiB-mapped",
        }
    );
    ensure(base.is_multiple_of(PAGE), || {
        format!("memory at {base:#x} is not page-aligned")
    })?;
    ensure(guard_mapped == Some(0), || {
        "no guard page below the memory".into()
    })?;
    let fresh = dirty::take(domain(&d, id)?);
    kprintln!(
        "dirty: after spawn: {} (the memory was just zeroed)",
        show(&fresh)
    );
    ensure(fresh.len() as u64 == len / PAGE, || {
        format!("after spawn: {} pages, want all", fresh.len())
    })?;
    let again = dirty::take(domain(&d, id)?);
    ensure(again.is_empty(), || format!("second look: {again:?}"))?;

    let expect = |what: &str, got: &[u32], want: &[u32]| -> Check {
        kprintln!("dirty: {what}: {got:?} (want {want:?})");
        ensure(got == want, || format!("{what}: {got:?}, want {want:?}"))
    };
    step_domain(&mut d, id)?;
    let got = dirty::take(domain(&d, id)?);
    expect(
        "activation 1 (0x0000, 0x5000, 0x5008, 0x13000)",
        &got,
        td::DIRTY_EXPECTED[0],
    )?;
    d.deliver("dirty", "/wake", b"", 0, timer::now_ns())
        .map_err(err)?;
    step_domain(&mut d, id)?;
    let got = dirty::take(domain(&d, id)?);
    expect("activation 2 (0x2000)", &got, td::DIRTY_EXPECTED[1])?;
    let got = dirty::take(domain(&d, id)?);
    expect("no activation", &got, td::DIRTY_EXPECTED[2])?;

    // memory.grow: the memory moves; the tracker follows the new base.
    d.deliver("dirty", "/wake", b"", 0, timer::now_ns())
        .map_err(err)?;
    step_domain(&mut d, id)?;
    let (nbase, nlen) = {
        let m = domain(&d, id)?.memory();
        (m.as_ptr() as u64, m.len() as u64)
    };
    let got = dirty::take(domain(&d, id)?);
    kprintln!(
        "dirty: activation 3 (memory.grow 1): memory {} from {base:#x} to {nbase:#x}, {nlen} bytes; {}",
        if nbase == base { "stayed" } else { "moved" },
        show(&got)
    );
    ensure(nlen == len + 65536, || {
        format!("grown memory is {nlen} bytes")
    })?;
    ensure(nbase.is_multiple_of(PAGE), || {
        format!("grown memory at {nbase:#x}")
    })?;
    ensure(got.len() as u64 == nlen / PAGE, || {
        format!(
            "after the grow: {} pages, want all {}",
            got.len(),
            nlen / PAGE
        )
    })?;
    d.deliver("dirty", "/wake", b"", 0, timer::now_ns())
        .map_err(err)?;
    step_domain(&mut d, id)?;
    let got = dirty::take(domain(&d, id)?);
    expect("activation 4 (0x21000)", &got, td::DIRTY_EXPECTED[3])?;
    let mem = domain(&d, id)?.memory();
    let values = [0x0, 0x5000, 0x5008, 0x13000, 0x2000, 0x21000].map(|at| read_le::<4>(mem, at));
    kprintln!("dirty: values written: {values:x?}");
    ensure(
        values
            == [
                0x1111_1111,
                0x2222_2222,
                0x3333_3333,
                0x4444_4444,
                0x5555_5555,
                0x6666_6666,
            ],
        || format!("memory holds {values:x?}"),
    )
}

/// `test=snapshot`.
pub fn snapshot() -> ExitCode {
    let r = snapshot_body();
    finish("snapshot", r)
}

/// Sends `n` requests to `name`'s counter (tags from `tag`) and returns the
/// counts answered, in tag order.
fn count(d: &mut Driver, name: &str, n: u64, tag: u64) -> Result<Vec<u64>, String> {
    for i in 0..n {
        d.deliver(name, "/svc/counter", b"incr", tag + i, timer::now_ns())
            .map_err(err)?;
    }
    run_idle(d, 1_000_000_000);
    let mut answers = d.take_answers();
    answers.sort();
    ensure(answers.len() as u64 == n, || {
        format!("{} answers to {n} requests", answers.len())
    })?;
    Ok(answers.iter().map(|(_, a)| read_le::<8>(a, 0)).collect())
}

fn hex(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

fn snapshot_body() -> Check {
    let svc = Caps::with_channels(["/svc/counter"]);
    let mut a = fixed_driver();
    let id = a
        .spawn(
            "counter",
            td::COUNTER,
            contract(1, 10, false),
            svc,
            timer::now_ns(),
        )
        .map_err(err)?;
    run_idle(&mut a, 100_000_000);
    let counts = count(&mut a, "counter", 5, 1)?;
    kprintln!("snapshot: counter answered {counts:?}");
    ensure(counts == [1, 2, 3, 4, 5], || format!("counts {counts:?}"))?;
    let dom = a.nucleus().domain(id).ok_or("no domain")?;
    ensure(dom.at_boundary(), || "not at an activation boundary".into())?;
    let t = timer::now_ns();
    let snap = a
        .nucleus()
        .snapshot(id)
        .ok_or("no domain")?
        .map_err(|e| e.to_string())?;
    let taken = timer::now_ns() - t;
    let bytes = postcard::to_allocvec(&snap).map_err(|e| e.to_string())?;
    kprintln!(
        "snapshot: taken at a boundary in {} us: memory {} bytes, {} globals, {} queued, {} channels; root {}; {} bytes as postcard",
        us(taken),
        snap.memory.len(),
        snap.globals.len(),
        snap.inbox.len(),
        snap.channels.len(),
        hex(&snap.memory_root),
        bytes.len()
    );
    let decoded: metta_nucleus::Snapshot =
        postcard::from_bytes(&bytes).map_err(|e| e.to_string())?;
    ensure(decoded == snap, || "postcard round trip changed it".into())?;

    // A tampered copy is refused.
    let mut bad = decoded.clone();
    bad.memory[100] ^= 1;
    let mut b = fixed_driver();
    match b.restore("counter", td::COUNTER, bad, timer::now_ns()) {
        Err(e) => kprintln!("snapshot: tampered memory refused: {e}"),
        Ok(_) => return Err("a tampered snapshot was restored".into()),
    }

    let t = timer::now_ns();
    let rid = b
        .restore("counter", td::COUNTER, decoded, timer::now_ns())
        .map_err(err)?;
    let restored = timer::now_ns() - t;
    let root = memory_root(b.nucleus().domain(rid).ok_or("no domain")?.memory());
    kprintln!(
        "snapshot: restored into a fresh nucleus in {} us; memory root {} ({})",
        us(restored),
        hex(&root),
        if root == snap.memory_root {
            "matches"
        } else {
            "DIFFERS"
        }
    );
    ensure(root == snap.memory_root, || "memory root differs".into())?;
    let original = count(&mut a, "counter", 3, 10)?;
    let copy = count(&mut b, "counter", 3, 10)?;
    kprintln!("snapshot: after restore, original answers {original:?}, restored answers {copy:?}");
    ensure(copy == [6, 7, 8] && original == copy, || {
        format!("restored {copy:?}, original {original:?}")
    })
}

/// `test=bench`: activations per repetition.
const BENCH_ACTIVATIONS: usize = 20_000;
/// Activations per timed block.
const BENCH_BLOCK: usize = 1_000;
/// Repetitions.
const BENCH_REPS: usize = 5;

/// `test=bench`.
pub fn bench() -> ExitCode {
    let r = bench_body();
    finish("bench", r)
}

/// The median over blocks of `f`'s time per call, in ps (ns × 1000).
fn measure(mut f: impl FnMut()) -> u64 {
    let mut blocks = Vec::with_capacity(BENCH_ACTIVATIONS / BENCH_BLOCK);
    for _ in 0..BENCH_ACTIVATIONS / BENCH_BLOCK {
        let t = tsc::rdtsc();
        for _ in 0..BENCH_BLOCK {
            f();
        }
        let ticks = tsc::rdtsc() - t;
        blocks.push(tsc::ticks_to_ns(ticks) * 1_000 / BENCH_BLOCK as u64);
    }
    stats::median(&mut blocks)
}

fn bench_body() -> Check {
    let image = Image::load(td::EMPTY).map_err(|e| e.to_string())?;
    let big = Contract {
        period_ns: 100_000_000,
        slice_ns: 100_000_000,
        extra: true,
        memory: 1 << 20,
    };
    let mut rt = Runtime::new();
    let mut dom = Domain::new(&mut rt, DomainId(1), "empty", &image, big, Caps::none())
        .map_err(|e| e.to_string())?;
    let mut activate = [0u64; BENCH_REPS];
    let mut bad = 0u64;
    for r in &mut activate {
        *r = measure(|| {
            let a = dom.activate(0, abi::REASON_CONTINUE, 1_000_000);
            if a.outcome != metta_nucleus::Outcome::More {
                bad += 1;
            }
        });
    }
    let mut n = Nucleus::new(1_000_000, FuelRate::new(1, 1));
    n.spawn("empty", &image, big, Caps::none(), timer::now_ns())
        .map_err(|e| e.to_string())?;
    let mut step = [0u64; BENCH_REPS];
    for r in &mut step {
        *r = measure(|| {
            if !matches!(n.step(timer::now_ns()), Step::Ran { .. }) {
                bad += 1;
            }
        });
    }
    let show = |v: &[u64; BENCH_REPS]| -> String {
        let mut s = *v;
        let m = stats::median(&mut s);
        let reps: Vec<String> = v
            .iter()
            .map(|x| format!("{}", Fixed(*x / 100, 1)))
            .collect();
        format!(
            "median {} ns (reps: {})",
            Fixed(m / 100, 1),
            reps.join(", ")
        )
    };
    kprintln!(
        "bench: empty activation round trip, {BENCH_ACTIVATIONS} activations x {BENCH_REPS}, median of {BENCH_BLOCK}-activation blocks (TSC)"
    );
    kprintln!("bench: Domain::activate {}", show(&activate));
    kprintln!("bench: Nucleus::step    {}", show(&step));
    let cal = native::calibrate()?;
    kprintln!(
        "bench: fuel rate (spin loop) {} fuel/ns (runs of {} fuel: {:?} per {} ns)",
        Fixed(cal.per_scale / 1_000, 3),
        cal.fuel,
        cal.runs,
        RATE_SCALE_NS
    );
    ensure(bad == 0, || {
        format!("{bad} activations did not return RUN_MORE")
    })
}
