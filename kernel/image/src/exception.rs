//! CPU exceptions and interrupts as plain data: the register frame the kernel's
//! interrupt stubs save, the names of the 32 exception vectors, which of them
//! push an error code, the decoding of page-fault and selector error codes, and
//! the report printed when an exception stops the kernel.
//!
//! The binary's interrupt stubs (`src/interrupts.rs`) build an [`InterruptFrame`]
//! on the stack and hand a pointer to it to the Rust dispatcher; everything that
//! turns such a frame into words is here, so it is unit-tested on the host.

use core::fmt;

/// Vectors 0-31 are reserved for CPU exceptions.
pub const EXCEPTION_VECTORS: u8 = 32;

/// Vector of the page fault (#PF), whose faulting address is in CR2.
pub const PAGE_FAULT: u8 = 14;
/// Vector of the double fault (#DF).
pub const DOUBLE_FAULT: u8 = 8;

/// The registers saved on interrupt entry, lowest address first: what the stub
/// pushed (general registers, vector, error code), then what the CPU pushed.
///
/// The layout is shared with the assembly in `src/interrupts.rs` (which pushes
/// `rax` first and `r15` last, so `r15` is at the lowest address); the unit tests
/// pin the offsets.
///
/// The general registers (`r15` to `rax`) are the interrupted code's, as the stub
/// pushed them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
#[allow(missing_docs)] // the general registers: their names say it all
pub struct InterruptFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    /// The vector number (pushed by the per-vector stub).
    pub vector: u64,
    /// The CPU's error code, or 0 pushed by the stub for vectors without one.
    pub error_code: u64,
    /// Where the interrupted code resumes (for faults: the faulting instruction).
    pub rip: u64,
    /// Code segment of the interrupted code.
    pub cs: u64,
    /// RFLAGS of the interrupted code.
    pub rflags: u64,
    /// Stack pointer of the interrupted code.
    pub rsp: u64,
    /// Stack segment of the interrupted code.
    pub ss: u64,
}

/// Size of [`InterruptFrame`] in bytes: a multiple of 16, so the stack stays
/// 16-byte aligned when the stub calls the dispatcher.
pub const FRAME_SIZE: usize = core::mem::size_of::<InterruptFrame>();

/// Mnemonic and name of exception `vector`, or `None` for vectors 32-255 (and
/// "reserved" ones get a name saying so).
pub fn exception_name(vector: u8) -> Option<(&'static str, &'static str)> {
    Some(match vector {
        0 => ("#DE", "divide error"),
        1 => ("#DB", "debug"),
        2 => ("NMI", "non-maskable interrupt"),
        3 => ("#BP", "breakpoint"),
        4 => ("#OF", "overflow"),
        5 => ("#BR", "bound range exceeded"),
        6 => ("#UD", "invalid opcode"),
        7 => ("#NM", "device not available"),
        8 => ("#DF", "double fault"),
        9 => ("#CSO", "coprocessor segment overrun"),
        10 => ("#TS", "invalid TSS"),
        11 => ("#NP", "segment not present"),
        12 => ("#SS", "stack-segment fault"),
        13 => ("#GP", "general protection fault"),
        14 => ("#PF", "page fault"),
        16 => ("#MF", "x87 floating-point error"),
        17 => ("#AC", "alignment check"),
        18 => ("#MC", "machine check"),
        19 => ("#XM", "SIMD floating-point exception"),
        20 => ("#VE", "virtualization exception"),
        21 => ("#CP", "control protection exception"),
        28 => ("#HV", "hypervisor injection exception"),
        29 => ("#VC", "VMM communication exception"),
        30 => ("#SX", "security exception"),
        15 | 22..=27 | 31 => ("#??", "reserved exception"),
        _ => return None,
    })
}

/// Whether the CPU pushes an error code when delivering exception `vector`
/// (Intel SDM vol. 3 §6.15; AMD APM vol. 2 §8.2). The stubs push a 0 for the
/// others so every frame has the same layout.
pub const fn pushes_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// A page-fault error code, decoded.
///
/// Displays as e.g. `write to non-present page in kernel mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFaultCode(pub u64);

impl PageFaultCode {
    /// Bit 0: the page was present (a protection violation), else not present.
    pub const PRESENT: u64 = 1 << 0;
    /// Bit 1: the access was a write, else a read.
    pub const WRITE: u64 = 1 << 1;
    /// Bit 2: the access was made in user mode (CPL 3).
    pub const USER: u64 = 1 << 2;
    /// Bit 3: a reserved bit was set in a paging-structure entry.
    pub const RESERVED_BIT: u64 = 1 << 3;
    /// Bit 4: the access was an instruction fetch.
    pub const INSTRUCTION_FETCH: u64 = 1 << 4;
    /// Bit 5: a protection-key violation.
    pub const PROTECTION_KEY: u64 = 1 << 5;
    /// Bit 6: a shadow-stack access.
    pub const SHADOW_STACK: u64 = 1 << 6;
    /// Bit 15: an SGX access-control violation.
    pub const SGX: u64 = 1 << 15;

    fn has(self, bit: u64) -> bool {
        self.0 & bit != 0
    }
}

impl fmt::Display for PageFaultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let access = if self.has(Self::INSTRUCTION_FETCH) {
            "instruction fetch from"
        } else if self.has(Self::WRITE) {
            "write to"
        } else {
            "read from"
        };
        let page = if self.has(Self::PRESENT) {
            "present page (protection violation)"
        } else {
            "non-present page"
        };
        let mode = if self.has(Self::USER) {
            "user"
        } else {
            "kernel"
        };
        write!(f, "{access} {page} in {mode} mode")?;
        for (bit, what) in [
            (Self::RESERVED_BIT, "reserved bit set in a paging entry"),
            (Self::PROTECTION_KEY, "protection-key violation"),
            (Self::SHADOW_STACK, "shadow-stack access"),
            (Self::SGX, "SGX access violation"),
        ] {
            if self.has(bit) {
                write!(f, ", {what}")?;
            }
        }
        Ok(())
    }
}

/// The selector error code of #TS, #NP, #SS and #GP: which descriptor was at
/// fault. A #GP that has nothing to do with a segment selector pushes 0.
///
/// Displays as e.g. `GDT selector 0x18 (index 3)` or `IDT vector 0x40, external event`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectorCode(pub u64);

impl fmt::Display for SelectorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = self.0;
        if code == 0 {
            return f.write_str("not selector-related");
        }
        let index = (code >> 3) & 0x1FFF;
        match (code >> 1) & 0b11 {
            0b00 => write!(f, "GDT selector {:#x} (index {index})", code & 0xFFF8)?,
            0b10 => write!(
                f,
                "LDT selector {:#x} (index {index})",
                code & 0xFFF8 | 0b100
            )?,
            _ => write!(f, "IDT vector {index:#x}")?,
        }
        if code & 1 != 0 {
            f.write_str(", external event")?;
        }
        Ok(())
    }
}

/// What the kernel prints when an exception (or an interrupt it does not
/// expect) stops it: a headline naming the vector and the faulting instruction,
/// a line decoding the error code (with CR2 for page faults), and the saved
/// registers. Each line of its `Display` output ends in a newline except the
/// last.
#[derive(Clone, Copy, Debug)]
pub struct Report<'a> {
    /// The saved frame.
    pub frame: &'a InterruptFrame,
    /// CR2, read by the handler for page faults (`None` for other vectors).
    pub cr2: Option<u64>,
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.frame;
        let vector = r.vector as u8;
        match exception_name(vector) {
            Some((mnemonic, name)) => write!(
                f,
                "EXCEPTION: {mnemonic} {name} (vector {vector}) at rip {:#018x}",
                r.rip
            )?,
            None => write!(
                f,
                "EXCEPTION: unexpected interrupt (vector {vector:#04x}) at rip {:#018x}",
                r.rip
            )?,
        }
        match vector {
            PAGE_FAULT => {
                write!(f, "\n  page fault: {}", PageFaultCode(r.error_code))?;
                match self.cr2 {
                    Some(addr) => write!(f, ", address (CR2) {addr:#018x}")?,
                    None => f.write_str(", address unknown")?,
                }
                write!(f, "; error code {:#x}", r.error_code)?;
            }
            10..=13 => write!(
                f,
                "\n  error code {:#x}: {}",
                r.error_code,
                SelectorCode(r.error_code)
            )?,
            v if v < EXCEPTION_VECTORS && pushes_error_code(v) => {
                write!(f, "\n  error code {:#x}", r.error_code)?
            }
            _ => {}
        }
        write!(
            f,
            "\n  cs {:#06x} rflags {:#010x} rsp {:#018x} ss {:#06x}",
            r.cs, r.rflags, r.rsp, r.ss
        )?;
        let regs = [
            ("rax", r.rax),
            ("rbx", r.rbx),
            ("rcx", r.rcx),
            ("rdx", r.rdx),
            ("rsi", r.rsi),
            ("rdi", r.rdi),
            ("rbp", r.rbp),
            ("r8", r.r8),
            ("r9", r.r9),
            ("r10", r.r10),
            ("r11", r.r11),
            ("r12", r.r12),
            ("r13", r.r13),
            ("r14", r.r14),
            ("r15", r.r15),
        ];
        for line in regs.chunks(4) {
            f.write_str("\n ")?;
            for (name, value) in line {
                write!(f, " {name:>3} {value:#018x}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn frame_layout_matches_the_stubs() {
        // 15 general registers, vector, error code, then the CPU's 5 words.
        assert_eq!(FRAME_SIZE, 22 * 8);
        assert_eq!(FRAME_SIZE % 16, 0);
        assert_eq!(offset_of!(InterruptFrame, r15), 0);
        assert_eq!(offset_of!(InterruptFrame, rax), 14 * 8);
        assert_eq!(offset_of!(InterruptFrame, vector), 15 * 8);
        assert_eq!(offset_of!(InterruptFrame, error_code), 16 * 8);
        assert_eq!(offset_of!(InterruptFrame, rip), 17 * 8);
        assert_eq!(offset_of!(InterruptFrame, ss), 21 * 8);
    }

    #[test]
    fn names_and_error_codes() {
        assert_eq!(exception_name(0), Some(("#DE", "divide error")));
        assert_eq!(exception_name(6), Some(("#UD", "invalid opcode")));
        assert_eq!(exception_name(8), Some(("#DF", "double fault")));
        assert_eq!(exception_name(13).unwrap().0, "#GP");
        assert_eq!(exception_name(14), Some(("#PF", "page fault")));
        assert_eq!(exception_name(15).unwrap().1, "reserved exception");
        assert_eq!(exception_name(31).unwrap().1, "reserved exception");
        assert_eq!(exception_name(32), None);
        assert_eq!(exception_name(255), None);
        let with_code: Vec<u8> = (0..=255).filter(|&v| pushes_error_code(v)).collect();
        assert_eq!(with_code, [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
    }

    #[test]
    fn page_fault_codes() {
        assert_eq!(
            PageFaultCode(0b10).to_string(),
            "write to non-present page in kernel mode"
        );
        assert_eq!(
            PageFaultCode(0).to_string(),
            "read from non-present page in kernel mode"
        );
        assert_eq!(
            PageFaultCode(0b111).to_string(),
            "write to present page (protection violation) in user mode"
        );
        assert_eq!(
            PageFaultCode(0b1_0001).to_string(),
            "instruction fetch from present page (protection violation) in kernel mode"
        );
        assert_eq!(
            PageFaultCode(0b1001).to_string(),
            "read from present page (protection violation) in kernel mode, \
             reserved bit set in a paging entry"
        );
        assert_eq!(
            PageFaultCode(1 << 5 | 1 << 6 | 1 << 15 | 1).to_string(),
            "read from present page (protection violation) in kernel mode, \
             protection-key violation, shadow-stack access, SGX access violation"
        );
    }

    #[test]
    fn selector_codes() {
        assert_eq!(SelectorCode(0).to_string(), "not selector-related");
        assert_eq!(
            SelectorCode(0x18).to_string(),
            "GDT selector 0x18 (index 3)"
        );
        assert_eq!(
            SelectorCode(0x1C).to_string(),
            "LDT selector 0x1c (index 3)"
        );
        // IDT entry 0x40, raised by an external event: (0x40 << 3) | 0b010 | 1.
        assert_eq!(
            SelectorCode(0x40 << 3 | 0b011).to_string(),
            "IDT vector 0x40, external event"
        );
    }

    #[test]
    fn page_fault_report() {
        let frame = InterruptFrame {
            vector: 14,
            error_code: 0b10,
            rip: 0x10_2345,
            cs: 0x08,
            rflags: 0x10046,
            rsp: 0x1f_ff00,
            ss: 0x10,
            rax: 0xdead,
            r15: 15,
            ..InterruptFrame::default()
        };
        let text = Report {
            frame: &frame,
            cr2: Some(0xde_adbe_e000),
        }
        .to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "EXCEPTION: #PF page fault (vector 14) at rip 0x0000000000102345"
        );
        assert_eq!(
            lines[1],
            "  page fault: write to non-present page in kernel mode, \
             address (CR2) 0x000000deadbee000; error code 0x2"
        );
        assert_eq!(
            lines[2],
            "  cs 0x0008 rflags 0x00010046 rsp 0x00000000001fff00 ss 0x0010"
        );
        assert!(lines[3].starts_with("  rax 0x000000000000dead rbx 0x0000000000000000"));
        assert!(lines[6].ends_with("r15 0x000000000000000f"));
        assert_eq!(lines.len(), 7);
        assert!(!text.ends_with('\n'));
    }

    #[test]
    fn other_reports() {
        let ud = InterruptFrame {
            vector: 6,
            ..InterruptFrame::default()
        };
        let text = Report {
            frame: &ud,
            cr2: None,
        }
        .to_string();
        assert!(text.starts_with("EXCEPTION: #UD invalid opcode (vector 6) at rip 0x"));
        assert!(!text.contains("error code"));
        let gp = InterruptFrame {
            vector: 13,
            error_code: 0x18,
            ..InterruptFrame::default()
        };
        let text = Report {
            frame: &gp,
            cr2: None,
        }
        .to_string();
        assert!(text.contains("\n  error code 0x18: GDT selector 0x18 (index 3)\n"));
        let df = InterruptFrame {
            vector: 8,
            ..InterruptFrame::default()
        };
        let text = Report {
            frame: &df,
            cr2: None,
        }
        .to_string();
        assert!(text.starts_with("EXCEPTION: #DF double fault (vector 8)"));
        assert!(text.contains("\n  error code 0x0\n"));
        let odd = InterruptFrame {
            vector: 0x41,
            ..InterruptFrame::default()
        };
        let text = Report {
            frame: &odd,
            cr2: None,
        }
        .to_string();
        assert!(text.starts_with("EXCEPTION: unexpected interrupt (vector 0x41) at rip"));
    }
}
