//! The kernel's own memory, from real figures, for the `memory:` line the
//! link prints once the node is idle ([`metta_kernel::memory::Footprint`]
//! adds them up): the image's extent and the entry stub's page tables and
//! stack from linker symbols, the IST stacks' size, the page tables
//! [`crate::mmu::split`] took for the heap, the stack [`crate::stack::run`]
//! allocated, and the heap allocator's counters.

use core::sync::atomic::{AtomicU64, Ordering};

use metta_kernel::memory::Footprint;

use crate::{gdt, heap, stack};

extern "C" {
    /// First byte of the image (linker.ld).
    static __image_start: u8;
    /// End of `.bss` (linker.ld).
    static __bss_end: u8;
    /// The entry stub's PML4; its PDPT and PDs follow, then the boot stack
    /// (boot.rs).
    static metta_boot_pml4: u8;
    /// Bottom of the boot stack (boot.rs).
    static metta_boot_stack: u8;
    /// Top of the boot stack (boot.rs).
    static metta_boot_stack_top: u8;
}

/// Bytes of page tables `mmu::split` took from the heap's range.
static HEAP_TABLES: AtomicU64 = AtomicU64::new(0);
/// Heap peak before the stack of [`stack::run`] was allocated.
static PEAK_BEFORE_STACK: AtomicU64 = AtomicU64::new(0);
/// Whether that stack is allocated.
static STACK_LIVE: AtomicU64 = AtomicU64::new(0);

/// Notes the page tables the heap's 4 KiB mapping took.
pub fn set_heap_tables(tables: usize) {
    HEAP_TABLES.store(tables as u64 * 4096, Ordering::Relaxed);
}

/// Notes the heap's peak just before [`stack::run`] allocates its stack
/// (which then stays allocated while the caller runs on it).
pub fn before_stack() {
    PEAK_BEFORE_STACK.store(heap::in_use().peak as u64, Ordering::Relaxed);
    STACK_LIVE.store(stack::STACK_SIZE as u64, Ordering::Relaxed);
}

/// The footprint now.
pub fn footprint() -> Footprint {
    let addr = |p: *const u8| p as u64;
    let image = addr(&raw const __bss_end) - addr(&raw const __image_start);
    let boot_tables = addr(&raw const metta_boot_stack) - addr(&raw const metta_boot_pml4);
    let boot_stack = addr(&raw const metta_boot_stack_top) - addr(&raw const metta_boot_stack);
    let h = heap::in_use();
    let stack_live = STACK_LIVE.load(Ordering::Relaxed);
    Footprint {
        image,
        boot_tables,
        boot_stacks: boot_stack + gdt::ist_bytes() as u64,
        heap_tables: HEAP_TABLES.load(Ordering::Relaxed),
        heap_stack: stack_live,
        heap_in_use: h.in_use as u64,
        heap_peak: h.peak as u64,
        heap_peak_before_stack: if stack_live > 0 {
            PEAK_BEFORE_STACK.load(Ordering::Relaxed)
        } else {
            h.peak as u64
        },
    }
}
