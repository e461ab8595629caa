//! Small CPU primitives: CPUID, model-specific registers, CR2, and the interrupt
//! flag.

use core::arch::asm;

/// The registers CPUID returns.
#[derive(Clone, Copy, Debug)]
pub struct Cpuid {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// CPUID leaf `leaf`, subleaf `subleaf`; all zero for a leaf above the maximum
/// the CPU reports (instead of whatever the CPU returns then).
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let max = if leaf >= 0x8000_0000 { 0x8000_0000 } else { 0 };
    if leaf > raw_cpuid(max, 0).eax {
        return Cpuid {
            eax: 0,
            ebx: 0,
            ecx: 0,
            edx: 0,
        };
    }
    raw_cpuid(leaf, subleaf)
}

fn raw_cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    Cpuid {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// Read model-specific register `msr`.
///
/// # Safety
/// The MSR must exist on this CPU (else #GP); some reads have side effects.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller vouches for the MSR; RDMSR touches no memory.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// Write model-specific register `msr`.
///
/// # Safety
/// The MSR must exist and `value` must be valid for it; the write can change how
/// the CPU works in any way the MSR controls.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller vouches for the MSR and the value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// CR2: the linear address of the last page fault.
pub fn cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 at CPL 0 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Disable maskable interrupts.
pub fn disable_interrupts() {
    // SAFETY: CLI only clears RFLAGS.IF; it is allowed at CPL 0. (Not `nomem`: it
    // orders memory accesses around critical sections.)
    unsafe { asm!("cli", options(nostack)) };
}

/// Enable maskable interrupts. Only after the IDT is loaded (`interrupts::init`).
pub fn enable_interrupts() {
    // SAFETY: STI only sets RFLAGS.IF; every vector has a handler once the IDT is
    // loaded, which callers ensure.
    unsafe { asm!("sti", options(nostack)) };
}

/// Whether maskable interrupts are enabled (RFLAGS.IF).
pub fn interrupts_enabled() -> bool {
    let rflags: u64;
    // SAFETY: PUSHFQ/POP reads RFLAGS through the stack and restores RSP.
    unsafe { asm!("pushfq", "pop {}", out(reg) rflags, options(nomem, preserves_flags)) };
    rflags & (1 << 9) != 0
}

/// Enable interrupts and halt until the next one, atomically: an interrupt that
/// becomes pending right after STI (in its one-instruction shadow) still wakes the
/// HLT. Call with interrupts disabled after checking the condition to wait for,
/// so that no wake-up is lost between the check and the halt. Returns with
/// interrupts enabled.
pub fn enable_interrupts_and_halt() {
    // SAFETY: as for `enable_interrupts`; HLT waits for an interrupt.
    unsafe { asm!("sti", "hlt", options(nostack)) };
}
