//! Running code on a stack of its own: a heap stretch (so with an unmapped
//! guard page below it: an overflow faults on the guard, and the #PF that
//! cannot be pushed becomes a #DF, reported from its IST stack).
//!
//! The boot stack is 64 KiB; wasmi compiling and running domains wants
//! more (the hosted driver gives its activation thread 32 MiB, for
//! unoptimised builds), so the nucleus self-tests run on [`STACK_SIZE`].

use alloc::vec::Vec;
use core::arch::asm;

/// The size of the stack [`run`] provides.
pub const STACK_SIZE: usize = 1 << 20;

/// What the trampoline calls: a `&mut dyn FnMut()` behind a thin pointer.
type Job<'a> = &'a mut dyn FnMut();

extern "C" fn trampoline(job: *mut Job<'_>) {
    // SAFETY: `run` passes a pointer to its live `Job` and waits for this
    // call to return.
    let job = unsafe { &mut *job };
    job();
}

/// Calls `f` on a fresh [`STACK_SIZE`] stack and returns when it does.
pub fn run(mut f: impl FnMut()) {
    let stack: Vec<u8> = Vec::with_capacity(STACK_SIZE);
    // 16-byte aligned: the stretch is page-aligned and whole pages long.
    let top = (stack.as_ptr() as u64 + STACK_SIZE as u64) & !15;
    let mut job: Job<'_> = &mut f;
    // SAFETY: switches RSP to the top of `stack` (live until after the
    // call, and unused by anything else), calls the trampoline with the SysV
    // ABI (RSP 16-byte aligned at the call), and restores RSP from R12,
    // which the callee preserves. Interrupts may arrive meanwhile; they push
    // onto the new stack, which is fine. All caller-saved registers are
    // declared clobbered (clobber_abi).
    unsafe {
        asm!(
            "mov r12, rsp",
            "mov rsp, {top}",
            "call {tramp}",
            "mov rsp, r12",
            top = in(reg) top,
            tramp = sym trampoline,
            in("rdi") &raw mut job,
            out("r12") _,
            clobber_abi("C"),
        );
    }
    drop(stack);
}
