//! The self-tests selected with `test=<name>` on the command line, for
//! `test.sh` ([`SelfTest`] lists them). The timer test returns the success
//! code; the fault tests never return: the exception handler reports the fault
//! and exits with the panic code. The nucleus tests (`domains`, `dirty`,
//! `snapshot`, `bench`) are in [`crate::domaintest`] and run on a stack of
//! their own ([`crate::stack`]).

use core::arch::asm;

use metta_kernel::bootcfg::SelfTest;
use metta_kernel::exit::ExitCode;

use crate::{domaintest, interrupts, kprintln, stack, timer};

/// An address outside the identity map (first 4 GiB): PML4 entry 1 is empty.
/// It is canonical, so touching it is a page fault, not a #GP.
const UNMAPPED: u64 = 0x0000_00de_adbe_e000;
/// Ticks the timer test measures.
const TIMER_TEST_TICKS: u64 = 50;
/// How far ahead the timer test arms its deadline, and sleeps.
const DEADLINE_AHEAD_NS: u64 = 10_000_000;
const SLEEP_NS: u64 = 5_000_000;

/// Run `test`; only the timer test returns.
pub fn run(test: SelfTest) -> ExitCode {
    kprintln!("test: {}", test.name());
    match test {
        SelfTest::Timer => timer_test(),
        SelfTest::PageFault => page_fault(),
        SelfTest::InvalidOpcode => invalid_opcode(),
        SelfTest::DoubleFault => double_fault(),
        SelfTest::Domains => on_own_stack(domaintest::domains),
        SelfTest::Dirty => on_own_stack(domaintest::dirty),
        SelfTest::Snapshot => on_own_stack(domaintest::snapshot),
        SelfTest::Bench => on_own_stack(domaintest::bench),
    }
}

/// Runs `test` on a fresh [`stack::STACK_SIZE`] stack.
fn on_own_stack(test: fn() -> ExitCode) -> ExitCode {
    let mut code = ExitCode::Panic;
    stack::run(|| code = test());
    code
}

/// `a.bbb` with `digits` decimals, for `value / 10^digits`.
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

/// Wait for [`TIMER_TEST_TICKS`] ticks, halting in between, and print their
/// rate by the TSC; then a deadline and a sleep, and how late each ended.
fn timer_test() -> ExitCode {
    // Start on a tick edge.
    let first = timer::ticks();
    timer::idle_until(|| timer::ticks() != first);
    let (k0, t0) = (timer::ticks(), timer::now_ns());
    let mut wakeups = 0u64;
    timer::idle_until(|| {
        wakeups += 1;
        timer::ticks() >= k0 + TIMER_TEST_TICKS
    });
    let (k1, t1) = (timer::ticks(), timer::now_ns());
    let (n, ns) = (k1 - k0, (t1 - t0).max(1));
    let millihz = u128::from(n) * 1_000_000_000_000 / u128::from(ns);
    kprintln!(
        "timer-test: {n} ticks in {} ms by the TSC: {} Hz (nominal {} Hz), {} wake-ups from hlt",
        Fixed(ns / 1_000, 3),
        Fixed(millihz as u64, 3),
        timer::TICK_HZ,
        wakeups - 1
    );

    let deadline = timer::now_ns() + DEADLINE_AHEAD_NS;
    timer::set_deadline(deadline);
    timer::idle_until(timer::deadline_expired);
    kprintln!(
        "timer-test: deadline {} ms ahead fired {} ms late (resolution {} ms)",
        Fixed(DEADLINE_AHEAD_NS / 1_000, 3),
        Fixed((timer::now_ns() - deadline) / 1_000, 3),
        Fixed(timer::RESOLUTION_NS / 1_000, 3)
    );

    // A deadline cancelled before it is due must not fire during the sleep.
    timer::set_deadline(timer::now_ns() + SLEEP_NS / 2);
    timer::cancel_deadline();
    let wake = timer::now_ns() + SLEEP_NS;
    timer::sleep_until(wake);
    kprintln!(
        "timer-test: sleep_until {} ms ahead woke {} ms late",
        Fixed(SLEEP_NS / 1_000, 3),
        Fixed((timer::now_ns() - wake) / 1_000, 3)
    );
    if timer::deadline_expired() {
        kprintln!("timer-test: error: a cancelled deadline fired");
        return ExitCode::Panic;
    }
    kprintln!("timer-test: a cancelled deadline did not fire");
    kprintln!(
        "timer-test: {} ticks in all, {} spurious interrupts",
        timer::ticks(),
        interrupts::spurious_count()
    );
    ExitCode::Success
}

fn page_fault() -> ExitCode {
    kprintln!("test: writing to unmapped address {UNMAPPED:#018x}");
    // SAFETY: deliberately faults: nothing is mapped at UNMAPPED, so no memory
    // is written; the page-fault handler reports and exits, never returning here.
    unsafe { core::ptr::write_volatile(UNMAPPED as *mut u64, 0x5A5A) };
    panic!("the write to unmapped address {UNMAPPED:#x} did not fault")
}

fn invalid_opcode() -> ExitCode {
    kprintln!("test: executing ud2");
    // SAFETY: UD2 raises #UD, whose handler reports and exits.
    unsafe { asm!("ud2", options(nomem, nostack, noreturn)) }
}

fn double_fault() -> ExitCode {
    kprintln!("test: pushing onto a stack at unmapped address {UNMAPPED:#018x}");
    // SAFETY: deliberately faults: the push to the unmapped stack raises #PF,
    // whose delivery pushes onto that same stack and faults again, which makes
    // a #DF. Its handler runs on the IST1 stack, reports and exits; nothing
    // returns here, so the lost stack pointer does not matter.
    unsafe {
        asm!(
            "mov rsp, {bad}",
            "push rax",
            bad = in(reg) UNMAPPED,
            options(noreturn)
        )
    }
}
