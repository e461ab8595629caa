//! The page tables at run time: 4 KiB pages over the heap, guard pages, and
//! the Dirty bits that [`crate::dirty`] reads.
//!
//! The entry stub maps the first 4 GiB 1:1 with 2 MiB pages (`boot.rs`).
//! [`split`] remaps the heap's range with 4 KiB pages before the heap is
//! given to the allocator, so that (1) the CPU keeps a Dirty bit per 4 KiB
//! page of every domain's memory, and (2) single pages can be unmapped as
//! guards around large allocations ([`crate::heap`]). The page tables it
//! needs (one per 2 MiB, 4 KiB each: 64 for a 128 MiB heap) are taken from
//! the front of the heap's range. Addresses stay identity-mapped; only the
//! granularity changes. The kernel runs on one CPU, so a changed entry needs
//! only this CPU's TLB entry flushed (`invlpg`, or a CR3 reload after
//! replacing large pages).
//!
//! Entries are read and written as `AtomicU64` (see
//! [`metta_kernel::paging`]): the CPU sets Accessed and Dirty bits in them
//! concurrently with the kernel.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use metta_kernel::paging::{self as pt, ENTRIES, HUGE, LARGE_PAGE, PAGE, PRESENT};

/// A page table (any level), as the CPU sees it.
type Table = [AtomicU64; ENTRIES];

/// The table at physical address `phys`.
///
/// # Safety
/// `phys` must be the address of a live page table (reachable from CR3, or
/// about to be installed), which lies in the identity-mapped first GiB.
unsafe fn table(phys: u64) -> &'static Table {
    // SAFETY: by the caller; a table is 4 KiB of u64 entries, 4 KiB-aligned,
    // and `AtomicU64` has the layout of `u64`.
    unsafe { &*(phys as *const Table) }
}

fn cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 at CPL 0 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Flushes the whole TLB (no global pages are used) by reloading CR3.
fn flush_all() {
    // SAFETY: writing back the current CR3 keeps the same address space and
    // only drops cached translations.
    unsafe { asm!("mov cr3, {}", in(reg) cr3(), options(nostack, preserves_flags)) };
}

/// Flushes the TLB entry of the page holding `va`.
pub fn invlpg(va: u64) {
    // SAFETY: INVLPG only drops a cached translation.
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) };
}

/// The page-directory entry that maps `va`, if the tables above it exist.
fn pd_entry(va: u64) -> Option<&'static AtomicU64> {
    let [i4, i3, i2, _] = pt::indices(va);
    // SAFETY: CR3 holds the live PML4 (the boot stub's, in .bss below 1 GiB).
    let pml4 = unsafe { table(cr3() & pt::ADDRESS) };
    let e = pml4[i4].load(Ordering::Relaxed);
    if e & PRESENT == 0 {
        return None;
    }
    // SAFETY: a present PML4 entry points at a live PDPT (boot stub, .bss).
    let pdpt = unsafe { table(e & pt::ADDRESS) };
    let e = pdpt[i3].load(Ordering::Relaxed);
    if e & PRESENT == 0 || e & HUGE != 0 {
        return None;
    }
    // SAFETY: a present, non-huge PDPT entry points at a live page directory.
    let pd = unsafe { table(e & pt::ADDRESS) };
    Some(&pd[i2])
}

/// The 4 KiB page-table entry that maps `va` (present or not), or `None` if
/// `va` is not mapped with 4 KiB pages (a 2 MiB page, or nothing).
pub fn entry(va: u64) -> Option<&'static AtomicU64> {
    let e = pd_entry(va)?.load(Ordering::Relaxed);
    if e & PRESENT == 0 || e & HUGE != 0 {
        return None;
    }
    // SAFETY: a present, non-huge PD entry points at a live page table (one
    // that `split` installed).
    let t = unsafe { table(e & pt::ADDRESS) };
    Some(&t[pt::indices(va)[3]])
}

/// Maps (`present`) or unmaps the 4 KiB page at `va`, keeping its address
/// and attributes; `false` if `va` has no 4 KiB entry.
pub fn set_present(va: u64, present: bool) -> bool {
    let Some(e) = entry(va) else {
        return false;
    };
    if pt::set_present(e, present) {
        invlpg(va);
    }
    true
}

/// Remaps `[base, base + len)` (4 KiB-aligned, below 1 GiB, free RAM) with
/// 4 KiB pages, taking the page tables from its front. Returns the part left
/// for the heap and the number of tables used.
///
/// # Safety
/// `[base, base + len)` must be identity-mapped free RAM that nothing else
/// uses; call once, before the heap exists.
pub unsafe fn split(base: u64, len: u64) -> (u64, u64, usize) {
    let first = base & !(LARGE_PAGE - 1);
    let end = base + len;
    let chunks = (end.div_ceil(LARGE_PAGE) * LARGE_PAGE - first) / LARGE_PAGE;
    let mut next_table = base;
    let mut used = 0;
    for i in 0..chunks {
        let va = first + i * LARGE_PAGE;
        let Some(pde) = pd_entry(va) else {
            continue;
        };
        let old = pde.load(Ordering::Relaxed);
        if old & PRESENT == 0 || old & HUGE == 0 {
            continue;
        }
        if next_table + PAGE > end {
            break;
        }
        // SAFETY: the page at `next_table` is free RAM of the range (by the
        // caller), not yet handed out, and 4 KiB-aligned; it becomes a page
        // table here.
        let t = unsafe { table(next_table) };
        for (slot, pte) in t.iter().zip(pt::split_large(old)) {
            slot.store(pte, Ordering::Relaxed);
        }
        // The new table maps the same addresses with the same attributes, so
        // whatever the TLB holds until the flush below stays right.
        pde.store(pt::table_entry(next_table, old), Ordering::Release);
        next_table += PAGE;
        used += 1;
    }
    flush_all();
    (next_table, end - next_table, used)
}
