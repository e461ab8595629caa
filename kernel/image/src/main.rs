//! `metta-kernel`: the Metta native kernel image: boot, interrupts and a timer
//! tick, the wall clock, hardware entropy, a heap on 4 KiB pages, the nucleus
//! (the same wasm domains, EDF scheduler and snapshots as `mettad`) with
//! dirty-page tracking, PCI, a virtio-net NIC configured by DHCP, and the
//! join to a Metta cluster over TLS 1.3 on TCP, then running the domains the
//! control plane places on the node.
//!
//! # Boot path
//!
//! 1. A multiboot1 loader (QEMU `-kernel`, or iPXE chained over PXE) finds the
//!    multiboot header in the first 8 KiB of the file. The header uses the
//!    "a.out kludge" (flag bit 16), so the loader copies the image to 1 MiB itself
//!    instead of parsing the ELF64 file it cannot load (see [`boot`] and
//!    `linker.ld`).
//! 2. The 32-bit entry stub `_start` ([`boot`]) checks the magic and long-mode
//!    support, identity-maps the first 4 GiB with 2 MiB pages (RAM is used below
//!    1 GiB, the rest is for device registers), enters long mode and calls
//!    [`kmain`].
//! 3. [`kmain`] brings up the COM1 console ([`serial`]) and the interrupt
//!    machinery ([`interrupts`]: a GDT with a TSS whose IST stacks take #DF, NMI
//!    and #MC ([`gdt`]), an IDT whose 256 vectors enter through assembly stubs,
//!    the 8259 PICs remapped to 0x20-0x2f and masked ([`pic`])); from here on a
//!    CPU exception prints a report (vector, RIP, error code decoded, CR2 for
//!    page faults, registers) and exits with the panic code. It calibrates the
//!    TSC against PIT channel 2 ([`tsc`]) for log timestamps and [`timer::now_ns`],
//!    prints the banner `metta-kernel <version> booted`, the loader name and the
//!    command line, which it parses strictly ([`metta_kernel::bootcfg`] documents
//!    the syntax: `net=dhcp|off`, `console=ttyS0`, `metta.test=<label>`,
//!    `panic-test`, `test=timer|pagefault|ud|doublefault|domains|dirty|
//!    snapshot|bench`, and the join: `metta.ctl=<ip>:<port>`,
//!    `metta.token=<token>`, `metta.name=<name>`, `metta.heartbeats=<n>`;
//!    any other word is rejected with a message and the boot-failure code).
//!    The echo shows the token's id and CA pin, never its secret.
//! 4. It starts the time base ([`timer`]): the local APIC ([`apic`]) timer,
//!    calibrated against the TSC, raises a periodic tick at [`timer::TICK_HZ`]
//!    (1 kHz); then it enables interrupts. It prints the wall clock from the CMOS
//!    RTC ([`cmos`]; `rtc: <ISO 8601> (unix <seconds>)`) and shows that the
//!    hardware entropy source works ([`entropy`]: `RDSEED`, else `RDRAND`; two
//!    16-byte draws differ, never printed) or says that the CPU has none.
//! 5. Then it prints the multiboot memory map, takes the largest free RAM range
//!    below 1 GiB, remaps it with 4 KiB pages ([`mmu`]: page tables from the
//!    range's front) and gives the rest to the heap ([`heap`], talc; `alloc` is
//!    available from here on). Allocations of 64 KiB and more — every domain's
//!    linear memory — are *stretches*: page-aligned, whole pages, with an
//!    unmapped guard page on each side, so the CPU's Dirty bits tell which
//!    pages of a domain's memory were written ([`dirty`]).
//!    `panic-test` panics here, to exercise the panic path; `test=<name>` runs
//!    that self-test ([`selftest`]) and exits. Otherwise it lists every PCI
//!    function on bus 0 and behind its bridges ([`pci`], ports 0xCF8/0xCFC)
//!    and notes the first virtio-net function (1af4:1000 or 1af4:1041).
//!    With `metta.ctl` it first (before the PCI scan) makes the node's key
//!    from RDSEED/RDRAND ([`link::Identity`]); a CPU without them ends the
//!    boot here with the no-entropy code.
//! 6. With `net=dhcp` it drives that NIC with `virtio-drivers` (PCI transport,
//!    virtio 1.0 capabilities) as a `smoltcp` device ([`net`]), prints its MAC,
//!    busy-polls DHCP for up to 10 s and prints `net: dhcp lease <ip>/<prefix>
//!    gw <gw>`. Without a NIC, or without a lease in time, it exits with the
//!    network-failure code. With `net=off` (the default) the network is left
//!    alone. Otherwise it exits QEMU through `isa-debug-exit` with the success
//!    code.
//! 7. With `metta.ctl` it joins the cluster and serves it ([`link`], on a
//!    stack of its own): TCP to the control plane, a TLS 1.3 session pinned
//!    to the token's CA (`metta-link`: rustls unbuffered, RustCrypto),
//!    certificates checked against the RTC; `joined cluster <c> as
//!    node/<id> in <ms> ms (certificate until <date>)`; it calibrates the
//!    fuel rate, then syncs on a
//!    member session with the issued certificate: each `Request::Sync` is
//!    its heartbeat (1 CPU, the usable memory of the memory map) and reports
//!    its domains, and the answer brings the domains to start and stop and
//!    messages for them; the domains run while the link waits. After the
//!    first sync it prints its idle memory (`memory: ...`). Until
//!    stopped (or `metta.heartbeats` syncs acknowledged, then the success
//!    code). The certificate is renewed at two thirds of its lifetime. An
//!    unreachable or restarting control plane is retried with backoff and
//!    the reason on serial (the domains keep running); the wrong cluster, a
//!    rejected token or a refused node end the boot with their own exit
//!    codes.
//!
//! # Domains
//!
//! The nucleus (`kernel/nucleus`, shared with `mettad`) runs here under the
//! native driver ([`native`], around the clock-free core
//! [`metta_kernel::driver`]): fuel calibrated against the TSC, the activation
//! loop on [`timer::now_ns`] halting until the nucleus's next wake-up, routing
//! between local domains, logs on serial prefixed with the domain's name.
//! Joined to a cluster, it runs the domains the control plane places on the
//! node ([`metta_kernel::node`], [`native::Runner`]): messages no local
//! domain serves go to the control plane, which routes them. Without a
//! cluster, the test domains built into the image (`domains/*.wat`,
//! [`metta_kernel::testdomains`]) run in the self-tests
//! `test=domains|dirty|snapshot|bench` ([`domaintest`]); either way on a
//! 1 MiB stack of their own with a guard page ([`stack`]).
//!
//! Exit codes (QEMU exits with `(value << 1) | 1`): success 33, panic or CPU
//! exception 35, boot failure (entry stub, or a rejected command line) 37,
//! network failure 39, no hardware entropy for the node key 41, the server is
//! not the cluster the token pins 43, the token was rejected 45, the node was
//! refused otherwise 47; see [`metta_kernel::exit`].
//!
//! Build and test: `kernel/image/test.sh` builds with `cargo build --release`
//! inside `kernel/image` (whose `.cargo/config.toml` selects the target), runs the
//! host unit tests, and boots the image in QEMU: with `-kernel`, with
//! `panic-test`, on a CPU without long mode, with `net=dhcp` on QEMU's user-mode
//! network, with `net=dhcp` and no NIC, with a bad command line, with `-cpu max`
//! (RDRAND), with each self-test (the fault reports, the timer, the domains on
//! the nucleus, dirty pages, snapshot/restore, the activation benchmark),
//! joining a real `mettad` (and its failures: a restart under it, the wrong
//! pin, a used or unknown token, nothing listening, no entropy, malformed
//! join keys), and chained from iPXE. Cargo takes that config from the working directory, so
//! `--manifest-path` from elsewhere would build for the host; the binary
//! refuses to compile there, saying so. The pure code (command line, memory
//! map, exception reports, calendar arithmetic, entropy retry policy,
//! page-table arithmetic, the driver's routing and accounting, percentiles and
//! calibration arithmetic, the link's backoff and failure verdicts) lives in the library half of this crate
//! (`src/lib.rs`) and is unit-tested on the host, the driver with the test
//! domains on the real nucleus and a fake clock.
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

extern crate alloc;

mod apic;
mod boot;
mod cmos;
mod cpu;
mod dirty;
mod domaintest;
mod entropy;
mod gdt;
mod heap;
mod interrupts;
mod link;
mod memstat;
mod mmu;
mod native;
mod net;
mod pci;
mod pic;
mod port;
mod selftest;
mod serial;
mod stack;
mod timer;
mod tsc;

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use metta_kernel::bootcfg::{default_node_name, BootConfig, JoinConfig, NetMode, Redacted};
use metta_kernel::cmdline::Cmdline;
use metta_kernel::exit::{ExitCode, DEBUG_EXIT_PORT};
use metta_kernel::memory::heap_region;
use metta_kernel::multiboot::{self, Bytes, Info, MemoryMap, BOOTLOADER_MAGIC, INFO_LEN};
use virtio_drivers::transport::pci::bus::DeviceFunction;

/// The kernel reads and allocates RAM only in the first GiB. (The entry stub
/// identity-maps the first 4 GiB, [`MMIO_LIMIT`], for device registers.)
const MAPPED_LIMIT: u64 = 1 << 30;
/// End of the entry stub's identity map: MMIO (PCI BARs) must lie below.
pub const MMIO_LIMIT: u64 = 4 << 30;
/// The heap never starts below 1 MiB (real-mode memory, BIOS data, VGA).
const HEAP_FLOOR: u64 = 1 << 20;
/// How long `net=dhcp` waits for a lease.
const DHCP_TIMEOUT_SECS: u64 = 10;

extern "C" {
    /// First byte of the image (linker.ld).
    static __image_start: u8;
    /// End of `.bss`, the end of the image in memory (linker.ld).
    static __bss_end: u8;
}
/// Longest C string (command line, loader name) the kernel reads.
const MAX_C_STRING: usize = 4096;

/// The Rust entry point, called by the entry stub in long mode on the boot stack.
/// `multiboot_magic` is the loader's EAX, `info_addr` its EBX (physical address of
/// the multiboot information structure).
extern "C" fn kmain(multiboot_magic: u32, info_addr: u64) -> ! {
    serial::CONSOLE.init();
    interrupts::init();
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

    kprintln!(
        "interrupts: IDT with 256 vectors; #DF, NMI and #MC on IST stacks; \
         8259 PICs remapped to {:#04x}-{:#04x} and masked",
        pic::BASE,
        pic::BASE + pic::LINES - 1
    );

    // The entry stub only calls kmain with the right magic; check anyway.
    assert_eq!(multiboot_magic, BOOTLOADER_MAGIC, "bad multiboot magic");
    let info = phys_bytes(info_addr, INFO_LEN)
        .and_then(Info::parse)
        .expect("multiboot information structure outside the first GiB");

    if let Some(name) = info.boot_loader_name.and_then(c_string_at) {
        kprintln!("loader: {}", Cmdline::from_bytes(name).0);
    }
    let cmdline_bytes = info.cmdline.and_then(c_string_at);
    let cmdline = cmdline_bytes
        .map(Cmdline::from_bytes)
        .unwrap_or(Cmdline(""));
    // The token's secret never reaches the console.
    kprintln!("cmdline: \"{}\"", Redacted(cmdline.0));
    let config = match BootConfig::parse(cmdline.0) {
        Ok(config) => config,
        Err(e) => {
            kprintln!("cmdline: error: {e}");
            exit_qemu(ExitCode::BootFailure)
        }
    };

    start_timer(cal.hz);
    print_wall_clock();
    print_entropy_proof();

    let usable = print_memory_map(&info);
    init_heap(&info, info_addr, cmdline_bytes);

    if config.panic_test {
        panic!("panic-test requested on the kernel command line");
    }
    if let Some(test) = config.self_test {
        exit_qemu(selftest::run(test));
    }
    // The key first: without hardware entropy there is no point in
    // bringing up the network.
    let identity = match &config.join {
        Some(_) => match link::Identity::create() {
            Ok(id) => Some(id),
            Err(code) => exit_qemu(code),
        },
        None => None,
    };

    let nic = scan_pci();
    let code = match config.net {
        NetMode::Dhcp => match (bring_up_network(nic), &config.join, identity) {
            (Err(code), _, _) => code,
            (Ok(mut net), Some(join), Some(id)) => run_link(&mut net, join, id, usable),
            (Ok(_), _, _) => ExitCode::Success,
        },
        NetMode::Off => {
            match nic {
                Some(df) => kprintln!("net: virtio-net at {df} left unconfigured (net=off)"),
                None => kprintln!("net: no supported NIC found"),
            }
            ExitCode::Success
        }
    };

    let u = heap::in_use();
    kprintln!(
        "heap: {} bytes in use after boot (peak {})",
        u.in_use,
        u.peak
    );
    if code == ExitCode::Success {
        kprintln!("boot complete, exiting");
    }
    exit_qemu(code)
}

/// Start the local APIC timer's periodic tick and enable interrupts. (Runs
/// before the heap exists: no allocation here.)
fn start_timer(tsc_hz: u64) {
    match timer::init(tsc_hz) {
        Ok(t) => {
            kprintln!(
                "timer: local APIC ({}) timer counts at {}.{:03} MHz by the TSC; \
                 {} Hz tick on vector {:#04x} (count {}), deadline resolution {} us",
                t.mode,
                t.apic_hz / 1_000_000,
                t.apic_hz / 1_000 % 1_000,
                timer::TICK_HZ,
                interrupts::TIMER_VECTOR,
                t.count,
                timer::RESOLUTION_NS / 1_000
            );
        }
        Err(e) => kprintln!("timer: no tick: {e}; idling spins instead of halting"),
    }
    cpu::enable_interrupts();
}

/// Print the date and time of the CMOS RTC (UTC) and the Unix time.
fn print_wall_clock() {
    match cmos::read() {
        Ok(t) => kprintln!("rtc: {t} (unix {})", t.unix_seconds()),
        Err(e) => kprintln!("rtc: error: {e}"),
    }
}

/// Show that the hardware entropy source works: two draws differ. The values
/// themselves are never printed.
fn print_entropy_proof() {
    let features = entropy::features();
    let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
    match entropy::fill(&mut a).and_then(|()| entropy::fill(&mut b)) {
        Ok(()) if a != b => kprintln!("entropy: {features}; two 16-byte draws differ"),
        Ok(()) => kprintln!("entropy: error: two 16-byte draws from {features} are equal"),
        Err(e) => kprintln!("entropy: unavailable: {e}; continuing without hardware entropy"),
    }
}

/// Give the largest free piece of RAM below [`MAPPED_LIMIT`] to the heap: above
/// 1 MiB, and clear of the kernel image and of everything the loader handed over
/// (information structure, memory map, command line, loader name), which QEMU
/// places right after the image.
fn init_heap(info: &Info, info_addr: u64, cmdline: Option<&[u8]>) {
    let image = (
        (&raw const __image_start) as u64,
        (&raw const __bss_end) as u64,
    );
    let string = |s: &[u8]| (s.as_ptr() as u64, s.as_ptr() as u64 + s.len() as u64 + 1);
    let mut reserved = [image; 5];
    reserved[1] = (info_addr, info_addr + INFO_LEN as u64);
    if let Some((addr, len)) = info.mmap {
        reserved[2] = (addr.into(), u64::from(addr) + u64::from(len));
    }
    if let Some(s) = cmdline {
        reserved[3] = string(s);
    }
    if let Some(s) = info.boot_loader_name.and_then(c_string_at) {
        reserved[4] = string(s);
    }
    let Some(map) = info
        .mmap
        .and_then(|(addr, len)| phys_bytes(addr.into(), len as usize))
        .map(MemoryMap::new)
    else {
        panic!("no memory map from the loader: no memory for the heap");
    };
    let Some((base, len)) = heap_region(map, &reserved, HEAP_FLOOR, MAPPED_LIMIT, 4096) else {
        panic!("no free RAM for the heap");
    };
    // SAFETY: [base, base + len) is available RAM per the memory map, below the
    // identity-mapped limit, above 1 MiB, and clear of the image (with its stack
    // and page tables in .bss) and of the loader's data that the kernel still
    // reads; `init_heap` runs once, before anything allocates.
    let (heap_base, heap_len, tables) = unsafe { mmu::split(base, len) };
    memstat::set_heap_tables(tables);
    kprintln!(
        "paging: {:#x}-{:#x} remapped with 4 KiB pages ({} page tables, {} KiB, from its start)",
        base,
        base + len - 1,
        tables,
        tables * 4
    );
    // SAFETY: as above: what `split` left of the range is still unused RAM,
    // now mapped with 4 KiB pages.
    let size = unsafe { heap::init(heap_base, heap_len) };
    kprintln!(
        "heap: {} bytes ({}) at {:#x}-{:#x}",
        size,
        Bytes(size as u64),
        heap_base,
        heap_base + heap_len - 1
    );
}

/// List every PCI function (`pci: BB:DD.F vendor:device class CC.SS`) on bus
/// 0 and behind its bridges; the
/// first virtio-net function found, if any.
fn scan_pci() -> Option<DeviceFunction> {
    let root = pci::root();
    let mut nic = None;
    let mut count = 0;
    pci::for_each_function(&root, |df, f| {
        count += 1;
        kprintln!(
            "pci: {df} {:04x}:{:04x} class {:02x}.{:02x}",
            f.vendor_id,
            f.device_id,
            f.class,
            f.subclass
        );
        if nic.is_none()
            && f.vendor_id == net::VIRTIO_VENDOR
            && net::VIRTIO_NET_DEVICES.contains(&f.device_id)
        {
            nic = Some(df);
        }
    });
    kprintln!("pci: {count} functions");
    nic
}

/// `metta.ctl`: join the cluster and serve it ([`link`]), on a stack of its
/// own (TLS and the crypto want more than the boot stack).
fn run_link(
    net: &mut net::Net,
    join: &JoinConfig<'_>,
    id: link::Identity,
    usable: u64,
) -> ExitCode {
    let node = link::NodeInfo {
        name: match join.name {
            Some(n) => n.into(),
            None => default_node_name(net.mac()),
        },
        resources: metta_proto::NodeResources {
            // Only the boot CPU runs: that is what the node can offer.
            cpus: 1,
            memory_bytes: usable,
            arch: "x86_64".into(),
        },
        lease_ns: timer::now_ns(),
    };
    let mut id = Some(id);
    let mut code = ExitCode::Panic;
    memstat::before_stack();
    stack::run(|| {
        if let Some(id) = id.take() {
            code = link::run(net, join, id, &node);
        }
    });
    code
}

/// `net=dhcp`: bring up the virtio-net NIC and get a DHCP lease.
fn bring_up_network(nic: Option<DeviceFunction>) -> Result<net::Net, ExitCode> {
    let Some(df) = nic else {
        kprintln!("net: no supported NIC found");
        return Err(ExitCode::NetFailure);
    };
    let mut root = pci::root();
    let dev = match net::NetDevice::new(&mut root, df) {
        Ok(dev) => dev,
        Err(e) => {
            kprintln!("net: virtio-net at {df}: {e}");
            return Err(ExitCode::NetFailure);
        }
    };
    let m = dev.mac();
    kprintln!(
        "net: virtio-net at {df}, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5]
    );
    let timeout = smoltcp::time::Duration::from_secs(DHCP_TIMEOUT_SECS);
    match net::dhcp(dev, timeout) {
        Some(net) => {
            let lease = net.lease();
            match lease.router {
                Some(gw) => kprintln!("net: dhcp lease {} gw {gw}", lease.address),
                None => kprintln!("net: dhcp lease {} gw none", lease.address),
            }
            Ok(net)
        }
        None => {
            kprintln!("net: dhcp: no lease within {DHCP_TIMEOUT_SECS} s");
            Err(ExitCode::NetFailure)
        }
    }
}

/// Print the multiboot memory map and the total usable memory; returns it
/// (from `mem_lower`/`mem_upper` if there is no map).
fn print_memory_map(info: &Info) -> u64 {
    let Some(bytes) = info
        .mmap
        .and_then(|(addr, len)| phys_bytes(addr.into(), len as usize))
    else {
        match info.mem_kib {
            Some((lower, upper)) => {
                kprintln!(
                    "memory map: none from the loader; mem_lower {lower} KiB, mem_upper {upper} KiB"
                );
                return (u64::from(lower) + u64::from(upper)) * 1024;
            }
            None => kprintln!("memory map: none from the loader"),
        }
        return 0;
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
    usable
}

/// `len` bytes of physical memory at `addr`, if they lie in the identity map.
fn phys_bytes(addr: u64, len: usize) -> Option<&'static [u8]> {
    let end = addr.checked_add(len as u64)?;
    if addr == 0 || end > MAPPED_LIMIT {
        return None;
    }
    // SAFETY: the range is identity-mapped (first GiB) and was handed to us by the
    // loader (multiboot info, memory map), which keeps it out of the image and
    // .bss; the kernel never writes there (`init_heap` keeps the heap clear of
    // the loader's data).
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
    cpu::disable_interrupts();
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
    cpu::disable_interrupts();
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
