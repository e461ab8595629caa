//! Entropy for the kernel: [`fill`] a buffer from the CPU's `RDSEED` (preferred)
//! or `RDRAND`, after checking CPUID for them. The retry and fallback policy is
//! [`metta_kernel::hwrand::fill`]; without either instruction [`fill`] returns
//! [`EntropyError::Unsupported`] for the caller to report.

use core::arch::asm;
use core::sync::atomic::{AtomicU8, Ordering};

pub use metta_kernel::hwrand::EntropyError;
use metta_kernel::hwrand::{self, Features, Instruction};

use crate::cpu::cpuid;

/// CPUID results, cached: bit 0 RDSEED, bit 1 RDRAND, bit 7 "probed".
static FEATURES: AtomicU8 = AtomicU8::new(0);
const PROBED: u8 = 0x80;

/// Which of the instructions this CPU has.
pub fn features() -> Features {
    let mut bits = FEATURES.load(Ordering::Relaxed);
    if bits & PROBED == 0 {
        let rdseed = cpuid(7, 0).ebx & (1 << 18) != 0;
        let rdrand = cpuid(1, 0).ecx & (1 << 30) != 0;
        bits = PROBED | u8::from(rdseed) | u8::from(rdrand) << 1;
        FEATURES.store(bits, Ordering::Relaxed);
    }
    Features {
        rdseed: bits & 1 != 0,
        rdrand: bits & 2 != 0,
    }
}

/// One try of `insn`: the value, or `None` if the CPU reported failure (CF clear).
fn step(insn: Instruction) -> Option<u64> {
    let value: u64;
    let ok: u8;
    // SAFETY: `fill` only asks for instructions that `features` found in CPUID;
    // they write the destination register and flags, nothing else.
    unsafe {
        match insn {
            Instruction::Rdseed => asm!(
                "rdseed {v}", "setc {ok}",
                v = out(reg) value, ok = out(reg_byte) ok,
                options(nomem, nostack)
            ),
            Instruction::Rdrand => asm!(
                "rdrand {v}", "setc {ok}",
                v = out(reg) value, ok = out(reg_byte) ok,
                options(nomem, nostack)
            ),
        }
    }
    (ok != 0).then_some(value)
}

/// Fill `buf` with hardware random bytes (`RDSEED`, falling back to `RDRAND`
/// word by word). On error, `buf` is zeroed.
pub fn fill(buf: &mut [u8]) -> Result<(), EntropyError> {
    hwrand::fill(buf, features(), step)
}
