//! `metta-kernel`: the Metta native kernel image. This step is the boot layer only.
//!
//! # Boot path
//!
//! 1. A multiboot1 loader (QEMU `-kernel`, or iPXE chained over PXE) finds the
//!    multiboot header in the first 8 KiB of the file. The header uses the
//!    "a.out kludge" (flag bit 16), so the loader copies the image to 1 MiB itself
//!    instead of parsing the ELF64 file it cannot load (see [`boot`] and
//!    `linker.ld`).
//! 2. The 32-bit entry stub `_start` ([`boot`]) checks the magic and long-mode
//!    support, identity-maps the first GiB with 2 MiB pages, enters long mode and
//!    calls [`kmain`].
//! 3. [`kmain`] brings up the COM1 console ([`serial`]), calibrates the TSC
//!    against PIT channel 2 ([`tsc`]) for log timestamps, prints the banner
//!    `metta-kernel <version> booted`, the loader name, the command line and the
//!    multiboot memory map, and exits QEMU through `isa-debug-exit` with the
//!    success code. The kernel command line word `panic-test` makes it panic
//!    instead, to exercise the panic path.
//!
//! Exit codes (QEMU exits with `(value << 1) | 1`): success 33, panic 35, boot
//! failure in the entry stub 37; see [`metta_kernel::exit`].
//!
//! Build and test: `kernel/image/test.sh` builds with `cargo build --release`
//! inside `kernel/image` (whose `.cargo/config.toml` selects the target), runs the
//! host unit tests, and boots the image in QEMU: with `-kernel`, with
//! `panic-test`, on a CPU without long mode, and chained from iPXE. Cargo takes
//! that config from the working directory, so `--manifest-path` from elsewhere
//! would build for the host; the binary refuses to compile there, saying so. The
//! parsing code lives in the library half of this crate (`src/lib.rs`) and is
//! unit-tested on the host.
#![no_std]
#![no_main]
#![forbid(unsafe_op_in_unsafe_fn)]

// Cargo reads `.cargo/config.toml` from the working directory, not from the
// manifest's: run cargo inside kernel/image, or pass the target (and the rustflags
// of that config) yourself.
#[cfg(not(target_os = "none"))]
compile_error!(
    "the metta-kernel binary builds for x86_64-unknown-none only: run cargo from \
     kernel/image (its .cargo/config.toml sets the target and linker script)"
);

mod boot;
mod port;
mod serial;
mod tsc;

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use metta_kernel::cmdline::Cmdline;
use metta_kernel::exit::{ExitCode, DEBUG_EXIT_PORT};
use metta_kernel::multiboot::{self, Bytes, Info, MemoryMap, BOOTLOADER_MAGIC, INFO_LEN};

/// The first GiB is identity-mapped by the entry stub; nothing above is mapped.
const MAPPED_LIMIT: u64 = 1 << 30;
/// Longest C string (command line, loader name) the kernel reads.
const MAX_C_STRING: usize = 4096;

/// The Rust entry point, called by the entry stub in long mode on the boot stack.
/// `multiboot_magic` is the loader's EAX, `info_addr` its EBX (physical address of
/// the multiboot information structure).
extern "C" fn kmain(multiboot_magic: u32, info_addr: u64) -> ! {
    serial::CONSOLE.init();
    let cal = tsc::calibrate();
    kprintln!("metta-kernel {} booted", env!("CARGO_PKG_VERSION"));
    if cal.measured {
        kprintln!(
            "tsc: {}.{:03} MHz (calibrated against PIT channel 2 over ~10 ms)",
            cal.hz / 1_000_000,
            cal.hz / 1_000 % 1_000
        );
    } else {
        kprintln!(
            "tsc: PIT did not answer; assuming {} MHz, timestamps are approximate",
            tsc::FALLBACK_HZ / 1_000_000
        );
    }

    // The entry stub only calls kmain with the right magic; check anyway.
    assert_eq!(multiboot_magic, BOOTLOADER_MAGIC, "bad multiboot magic");
    let info = phys_bytes(info_addr, INFO_LEN)
        .and_then(Info::parse)
        .expect("multiboot information structure outside the first GiB");

    if let Some(name) = info.boot_loader_name.and_then(c_string_at) {
        kprintln!("loader: {}", Cmdline::from_bytes(name).0);
    }
    let cmdline = info
        .cmdline
        .and_then(c_string_at)
        .map(Cmdline::from_bytes)
        .unwrap_or(Cmdline(""));
    kprintln!("cmdline: \"{}\"", cmdline.0);

    print_memory_map(&info);

    if cmdline.has_flag("panic-test") {
        panic!("panic-test requested on the kernel command line");
    }

    kprintln!("boot complete, exiting");
    exit_qemu(ExitCode::Success)
}

/// Print the multiboot memory map and the total usable memory.
fn print_memory_map(info: &Info) {
    let Some(bytes) = info
        .mmap
        .and_then(|(addr, len)| phys_bytes(addr.into(), len as usize))
    else {
        match info.mem_kib {
            Some((lower, upper)) => kprintln!(
                "memory map: none from the loader; mem_lower {lower} KiB, mem_upper {upper} KiB"
            ),
            None => kprintln!("memory map: none from the loader"),
        }
        return;
    };
    let map = MemoryMap::new(bytes);
    kprintln!("memory map ({} entries):", map.clone().count());
    for r in map.clone() {
        kprintln!(
            "  {:#018x}-{:#018x}  {:<16}  {}",
            r.base,
            r.last(),
            r.kind,
            Bytes(r.len)
        );
    }
    let usable = map.usable_bytes();
    kprintln!("usable memory: {} bytes ({})", usable, Bytes(usable));
}

/// `len` bytes of physical memory at `addr`, if they lie in the identity map.
fn phys_bytes(addr: u64, len: usize) -> Option<&'static [u8]> {
    let end = addr.checked_add(len as u64)?;
    if addr == 0 || end > MAPPED_LIMIT {
        return None;
    }
    // SAFETY: the range is identity-mapped (first GiB) and was handed to us by the
    // loader (multiboot info, memory map), which keeps it out of the image and
    // .bss; the kernel never writes there (it has no allocator yet).
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
}

/// The NUL-terminated string at physical address `addr` (without the NUL), read
/// byte by byte so as not to touch memory past its end; at most [`MAX_C_STRING`]
/// bytes.
fn c_string_at(addr: u32) -> Option<&'static [u8]> {
    let addr = u64::from(addr);
    let limit = (MAPPED_LIMIT.checked_sub(addr)?).min(MAX_C_STRING as u64) as usize;
    let mut len = 0;
    while len < limit {
        // SAFETY: `addr + len` is below MAPPED_LIMIT, hence identity-mapped; the
        // loader placed a string here.
        let byte = unsafe { core::ptr::read_volatile((addr as *const u8).add(len)) };
        if byte == 0 {
            break;
        }
        len += 1;
    }
    phys_bytes(addr, len).map(multiboot::c_str)
}

/// Exit QEMU through `isa-debug-exit` with `code`; on hardware, halt.
fn exit_qemu(code: ExitCode) -> ! {
    // SAFETY: port 0xf4 is QEMU's isa-debug-exit device when configured as the
    // test harness does; on a PC without it the port is unused and the write is
    // ignored.
    unsafe { port::outl(DEBUG_EXIT_PORT, code.value()) };
    loop {
        // SAFETY: halting with interrupts off stops this CPU; nothing is pending.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Set by the first panic, so that a panic while reporting one exits at once.
static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        exit_qemu(ExitCode::Panic);
    }
    match info.location() {
        Some(loc) => serial::print_unlocked(format_args!(
            "PANIC: {} at {}:{}",
            info.message(),
            loc.file(),
            loc.line()
        )),
        None => serial::print_unlocked(format_args!("PANIC: {} at <unknown>", info.message())),
    }
    exit_qemu(ExitCode::Panic)
}
