//! The serial console: a 16550 UART on COM1, and `kprintln!`, which prefixes
//! every line with the time since boot.

use core::fmt::{self, Write};
use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, Ordering};

use metta_kernel::time::Timestamp;

use crate::port::{inb, outb};

/// I/O base of COM1.
const COM1: u16 = 0x3F8;

/// A 16550-compatible UART at an I/O base. It holds no state of its own, so any
/// number of handles may exist; [`LOCK`] keeps log lines whole.
#[derive(Clone, Copy, Debug)]
pub struct Uart {
    base: u16,
}

/// The console UART.
pub const CONSOLE: Uart = Uart { base: COM1 };

impl Uart {
    /// 115200 baud, 8N1, FIFOs on, interrupts off.
    pub fn init(&self) {
        let b = self.base;
        // SAFETY: COM1's registers (base..base+7) belong to this driver alone;
        // this is the standard 16550 programming sequence.
        unsafe {
            outb(b + 1, 0x00); // IER: no interrupts
            outb(b + 3, 0x80); // LCR: DLAB on, to set the divisor
            outb(b, 0x01); // divisor low: 115200 / 1
            outb(b + 1, 0x00); // divisor high
            outb(b + 3, 0x03); // LCR: 8 data bits, no parity, 1 stop bit, DLAB off
            outb(b + 2, 0xC7); // FCR: enable and clear FIFOs, 14-byte threshold
            outb(b + 4, 0x03); // MCR: DTR | RTS (OUT2 off: no IRQ)
        }
    }

    /// Send one byte, waiting (boundedly, in case no UART answers) for room in the
    /// transmitter.
    pub fn write_byte(&self, byte: u8) {
        for _ in 0..100_000 {
            // SAFETY: reading the line status register has no side effects.
            if unsafe { inb(self.base + 5) } & 0x20 != 0 {
                break;
            }
            spin_loop();
        }
        // SAFETY: writing the transmit holding register sends the byte.
        unsafe { outb(self.base, byte) }
    }
}

impl Write for Uart {
    /// Writes `s`, turning `\n` into `\r\n` for terminals.
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                self.write_byte(b'\r');
            }
            self.write_byte(byte);
        }
        Ok(())
    }
}

/// Serialises log lines (for when there is more than one CPU or an interrupt
/// handler that logs).
static LOCK: AtomicBool = AtomicBool::new(false);

/// Prefixes each line it is given with the record's timestamp.
struct LineWriter {
    uart: Uart,
    stamp: Timestamp,
    at_line_start: bool,
}

impl Write for LineWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for line in s.split_inclusive('\n') {
            if self.at_line_start {
                write!(self.uart, "{} ", self.stamp)?;
            }
            self.uart.write_str(line)?;
            self.at_line_start = line.ends_with('\n');
        }
        Ok(())
    }
}

/// Write one log record (one or more lines, each with the timestamp) and a newline.
fn write_record(args: fmt::Arguments<'_>) {
    let stamp = Timestamp {
        micros: crate::tsc::micros_since_boot(),
    };
    let mut w = LineWriter {
        uart: CONSOLE,
        stamp,
        at_line_start: true,
    };
    // The UART writer never fails; a failing `Display` impl just cuts the line.
    let _ = w.write_fmt(args);
    let _ = w.uart.write_str("\n");
}

/// Log a record under the console lock; use [`kprintln!`](crate::kprintln).
pub fn print(args: fmt::Arguments<'_>) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spin_loop();
    }
    write_record(args);
    LOCK.store(false, Ordering::Release);
}

/// Log a record without taking the console lock: for the panic handler, which may
/// run while the lock is held (a panic inside a `Display` impl being logged).
pub fn print_unlocked(args: fmt::Arguments<'_>) {
    write_record(args);
}

/// Print a line on the serial console, prefixed with `[seconds.micros]` since boot.
#[macro_export]
macro_rules! kprintln {
    ($($arg:tt)*) => {
        $crate::serial::print(format_args!($($arg)*))
    };
}
