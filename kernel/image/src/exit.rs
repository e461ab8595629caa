//! Exit codes reported through QEMU's `isa-debug-exit` device.
//!
//! The kernel writes a value `v` to I/O port [`DEBUG_EXIT_PORT`] (the device must be
//! configured as `-device isa-debug-exit,iobase=0xf4,iosize=0x04`); QEMU then exits
//! with status `(v << 1) | 1`. Status 0 therefore cannot be produced this way, and a
//! QEMU that exits 0 after `-no-reboot` means a triple fault (reset), not success.
//!
//! | outcome                                  | value written | QEMU exit status |
//! |------------------------------------------|---------------|------------------|
//! | [`ExitCode::Success`]: booted and done   | `0x10`        | 33               |
//! | [`ExitCode::Panic`]: Rust panic, CPU exception, or unexpected interrupt | `0x11` | 35 |
//! | [`ExitCode::BootFailure`]: entry stub refused to boot (no multiboot magic, no long mode), or the command line was rejected | `0x12` | 37 |
//! | [`ExitCode::NetFailure`]: `net=dhcp` asked for, but no supported NIC, or no DHCP lease in time | `0x13` | 39 |
//! | [`ExitCode::NoEntropy`]: `metta.ctl` given, but the CPU has no RDSEED/RDRAND (or they keep failing): no key can be made | `0x14` | 41 |
//! | [`ExitCode::PinMismatch`]: the control plane is not the cluster the token pins (wrong cluster, or a man in the middle) | `0x15` | 43 |
//! | [`ExitCode::TokenRejected`]: the cluster rejected the join token (unknown, expired, used up, revoked) | `0x16` | 45 |
//! | [`ExitCode::LinkRefused`]: the cluster refused the node otherwise (its name, its certificate, a removed node), or the link failed for good | `0x17` | 47 |
//!
//! On real hardware (no such device) the write does nothing and the kernel halts.

/// The I/O port of QEMU's `isa-debug-exit` device as the test harness configures it.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// What the kernel reports when it asks QEMU to exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// The kernel booted and finished its work.
    Success = 0x10,
    /// A Rust panic (the panic handler printed `PANIC: <message> at
    /// <file:line>`), or a CPU exception or unexpected interrupt (the handler
    /// printed `EXCEPTION: ...`, see [`crate::exception::Report`]).
    Panic = 0x11,
    /// The 32-bit entry stub refused to continue (written from assembly), or the
    /// kernel command line was rejected.
    BootFailure = 0x12,
    /// The network was asked for (`net=dhcp`) and could not be brought up.
    NetFailure = 0x13,
    /// A join was asked for (`metta.ctl`) but there is no hardware entropy
    /// to make the node's key from.
    NoEntropy = 0x14,
    /// The control plane did not present the CA pinned by the join token.
    PinMismatch = 0x15,
    /// The cluster rejected the join token.
    TokenRejected = 0x16,
    /// The cluster refused the node for another reason, or the link failed
    /// in a way retrying cannot mend.
    LinkRefused = 0x17,
}

impl ExitCode {
    /// The value written to the device.
    pub const fn value(self) -> u32 {
        self as u32
    }

    /// The exit status QEMU reports for this code: `(value << 1) | 1`.
    pub const fn qemu_status(self) -> i32 {
        ((self as u32) << 1 | 1) as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_statuses_are_distinct_and_odd() {
        assert_eq!(ExitCode::Success.qemu_status(), 33);
        assert_eq!(ExitCode::Panic.qemu_status(), 35);
        assert_eq!(ExitCode::BootFailure.qemu_status(), 37);
        assert_eq!(ExitCode::NetFailure.qemu_status(), 39);
        assert_eq!(ExitCode::NoEntropy.qemu_status(), 41);
        assert_eq!(ExitCode::PinMismatch.qemu_status(), 43);
        assert_eq!(ExitCode::TokenRejected.qemu_status(), 45);
        assert_eq!(ExitCode::LinkRefused.qemu_status(), 47);
    }
}
