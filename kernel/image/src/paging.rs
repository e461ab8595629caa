//! x86-64 page-table arithmetic, for the kernel's 4 KiB pages, guard pages
//! and dirty-page tracking: entry bits, splitting a 2 MiB page into 512
//! 4 KiB ones, the 4 KiB pages a byte range covers, the layout of a guarded
//! allocation ([`Stretch`]), and collecting (and clearing) the Dirty bits of
//! a range ([`take_dirty`]).
//!
//! Entries are `AtomicU64`s: the CPU sets the Accessed and Dirty bits of an
//! entry behind the kernel's back, so clearing one must be an atomic
//! read-modify-write (`lock and`), never a plain load and store that could
//! lose a Dirty bit the CPU set in between. The functions here take the page
//! tables as a closure from a virtual address to its entry, so the host
//! tests run them on a fake table (a `Vec<AtomicU64>`) and the kernel on the
//! real one (`src/mmu.rs`).

use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};

/// A small page.
pub const PAGE: u64 = 4096;
/// A large page (a page-directory entry with [`HUGE`] set).
pub const LARGE_PAGE: u64 = 2 << 20;
/// Entries per table.
pub const ENTRIES: usize = 512;

/// Bit 0: present.
pub const PRESENT: u64 = 1 << 0;
/// Bit 1: writable.
pub const WRITABLE: u64 = 1 << 1;
/// Bit 2: user-accessible.
pub const USER: u64 = 1 << 2;
/// Bit 3: write-through.
pub const WRITE_THROUGH: u64 = 1 << 3;
/// Bit 4: cache disabled.
pub const CACHE_DISABLE: u64 = 1 << 4;
/// Bit 5: accessed (set by the CPU).
pub const ACCESSED: u64 = 1 << 5;
/// Bit 6: dirty (set by the CPU on a write through a leaf entry).
pub const DIRTY: u64 = 1 << 6;
/// Bit 7 of a PDPT/PD entry: it maps a large page. (Bit 7 of a 4 KiB PTE is
/// its PAT bit.)
pub const HUGE: u64 = 1 << 7;
/// Bit 8: global.
pub const GLOBAL: u64 = 1 << 8;
/// Bit 12 of a large-page entry: its PAT bit.
pub const LARGE_PAT: u64 = 1 << 12;
/// Bit 7 of a 4 KiB entry: its PAT bit.
pub const SMALL_PAT: u64 = 1 << 7;
/// Bit 63: no-execute.
pub const NO_EXECUTE: u64 = 1 << 63;
/// The physical-address bits of an entry that points at a table or a 4 KiB
/// page.
pub const ADDRESS: u64 = 0x000F_FFFF_FFFF_F000;
/// The physical-address bits of a 2 MiB page entry.
pub const LARGE_ADDRESS: u64 = 0x000F_FFFF_FFE0_0000;

/// The four table indices of `va`: PML4, PDPT, PD, PT.
pub fn indices(va: u64) -> [usize; 4] {
    [39, 30, 21, 12].map(|shift| ((va >> shift) & 0x1FF) as usize)
}

/// The 512 entries of a page table that maps the 2 MiB page of `pde` with
/// 4 KiB pages, same addresses and the same attributes (present, writable,
/// user, caching, global, PAT, no-execute), Accessed and Dirty clear.
pub fn split_large(pde: u64) -> impl Iterator<Item = u64> {
    let base = pde & LARGE_ADDRESS;
    let mut flags =
        pde & (PRESENT | WRITABLE | USER | WRITE_THROUGH | CACHE_DISABLE | GLOBAL | NO_EXECUTE);
    if pde & LARGE_PAT != 0 {
        flags |= SMALL_PAT;
    }
    (0..ENTRIES as u64).map(move |i| (base + i * PAGE) | flags)
}

/// The page-directory entry that points at the page table at `table` and
/// replaces the large-page entry `old`: present, and writable and user as
/// `old` was (the leaf entries carry the rest).
pub fn table_entry(table: u64, old: u64) -> u64 {
    (table & ADDRESS) | PRESENT | (old & (WRITABLE | USER))
}

/// The 4 KiB page numbers (address / [`PAGE`]) that `[base, base + len)`
/// touches.
pub fn pages_of(base: u64, len: u64) -> Range<u64> {
    if len == 0 {
        return base / PAGE..base / PAGE;
    }
    base / PAGE..(base + len).div_ceil(PAGE)
}

/// Allocations of at least this many bytes get a stretch of their own:
/// 4 KiB-aligned, whole pages, an unmapped guard page before and after
/// (every wasm linear memory is one: its size is a multiple of 64 KiB).
pub const STRETCH_MIN: usize = 64 * 1024;

/// Where the parts of a guarded allocation lie in the block the underlying
/// allocator hands out (offsets from its start):
///
/// ```text
/// | pad ... | guard | body (size rounded up to pages) | guard |
/// 0         lo      body                              hi      outer_size
/// ```
///
/// `body` is aligned to `max(align, PAGE)` when the block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stretch {
    /// Size of the whole block.
    pub outer_size: usize,
    /// Alignment to ask of the underlying allocator.
    pub outer_align: usize,
    /// Offset of the guard page below the body.
    pub guard_lo: usize,
    /// Offset of the body (what the caller gets).
    pub body: usize,
    /// Offset of the guard page above the body.
    pub guard_hi: usize,
}

impl Stretch {
    /// The layout for `size` bytes aligned to `align` (a power of two);
    /// `None` on overflow.
    pub fn new(size: usize, align: usize) -> Option<Stretch> {
        let page = PAGE as usize;
        let outer_align = align.max(page);
        let body_len = size.checked_add(page - 1)? & !(page - 1);
        let body = outer_align;
        let guard_hi = body.checked_add(body_len)?;
        Some(Stretch {
            outer_size: guard_hi.checked_add(page)?,
            outer_align,
            guard_lo: body - page,
            body,
            guard_hi,
        })
    }
}

/// The pages of `[base, base + len)` written since the last call, as
/// indices counted from the page of `base` (for a page-aligned `base`:
/// `offset / 4096`); their Dirty bits are cleared and `flush(va)` is called
/// for each (the kernel's `invlpg`: the TLB may hold the entry with Dirty
/// set, and would not set it again). `entry(va)` gives the 4 KiB entry that
/// maps `va`, or `None` if `va` is not mapped by a 4 KiB entry (a large page):
/// such pages are reported written every time, since nothing can tell.
pub fn take_dirty<'t>(
    base: u64,
    len: u64,
    mut entry: impl FnMut(u64) -> Option<&'t AtomicU64>,
    mut flush: impl FnMut(u64),
) -> Vec<u32> {
    let pages = pages_of(base, len);
    let first = pages.start;
    let mut dirty = Vec::new();
    for page in pages {
        let va = page * PAGE;
        let written = match entry(va) {
            Some(e) => {
                let was = e.fetch_and(!DIRTY, Ordering::AcqRel) & DIRTY != 0;
                if was {
                    flush(va);
                }
                was
            }
            None => true,
        };
        if written {
            dirty.push((page - first) as u32);
        }
    }
    dirty
}

/// Sets (`present`) or clears the present bit of `e`; returns whether it
/// changed (the caller then flushes the TLB entry).
pub fn set_present(e: &AtomicU64, present: bool) -> bool {
    let old = if present {
        e.fetch_or(PRESENT, Ordering::AcqRel)
    } else {
        e.fetch_and(!PRESENT, Ordering::AcqRel)
    };
    (old & PRESENT != 0) != present
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_of_addresses() {
        assert_eq!(indices(0), [0, 0, 0, 0]);
        assert_eq!(indices(0x0000_00de_adbe_e000), [1, 378, 365, 494]);
        assert_eq!(indices(0x20_1000), [0, 0, 1, 1]);
        assert_eq!(indices((1 << 30) + 0x3000), [0, 1, 0, 3]);
    }

    #[test]
    fn splitting_keeps_addresses_and_attributes() {
        // The boot stub's 2 MiB entries: address | present | writable | huge.
        let pde = (3 << 21) | 0x83;
        let ptes: Vec<u64> = split_large(pde).collect();
        assert_eq!(ptes.len(), 512);
        assert_eq!(ptes[0], (3 << 21) | PRESENT | WRITABLE);
        assert_eq!(ptes[511], ((3 << 21) + 511 * 4096) | PRESENT | WRITABLE);
        // Accessed and dirty start clear; PAT moves from bit 12 to bit 7;
        // caching, global and NX are kept.
        let pde = (1 << 21)
            | PRESENT
            | ACCESSED
            | DIRTY
            | HUGE
            | LARGE_PAT
            | CACHE_DISABLE
            | GLOBAL
            | NO_EXECUTE;
        let pte = split_large(pde).nth(2).unwrap();
        assert_eq!(
            pte,
            ((1 << 21) + 8192) | PRESENT | SMALL_PAT | CACHE_DISABLE | GLOBAL | NO_EXECUTE
        );
        assert_eq!(table_entry(0x12_3000, 0x83), 0x12_3000 | PRESENT | WRITABLE);
    }

    #[test]
    fn page_ranges() {
        assert_eq!(pages_of(0x1000, 0x1000), 1..2);
        assert_eq!(pages_of(0x1000, 0x1001), 1..3);
        assert_eq!(pages_of(0x1fff, 2), 1..3);
        assert_eq!(pages_of(0x5000, 0), 5..5);
        assert_eq!(pages_of(0x20000, 128 * 1024).count(), 32);
    }

    #[test]
    fn stretch_layouts() {
        let s = Stretch::new(128 * 1024, 1).unwrap();
        assert_eq!(
            s,
            Stretch {
                outer_size: 4096 + 128 * 1024 + 4096,
                outer_align: 4096,
                guard_lo: 0,
                body: 4096,
                guard_hi: 4096 + 128 * 1024,
            }
        );
        // Sizes round up to pages; a larger alignment pads below the guard.
        let s = Stretch::new(65_537, 16384).unwrap();
        assert_eq!(s.body, 16384);
        assert_eq!(s.guard_lo, 16384 - 4096);
        assert_eq!(s.guard_hi, 16384 + 69_632);
        assert_eq!(s.outer_size, s.guard_hi + 4096);
        assert_eq!(s.outer_align, 16384);
        assert_eq!(Stretch::new(usize::MAX - 10, 1), None);
    }

    /// A fake page table: one 4 KiB entry per page of the first 1 MiB, except
    /// the 128 pages from 0x80000 "mapped by a large page".
    struct Fake(Vec<AtomicU64>);

    impl Fake {
        fn new() -> Fake {
            Fake(
                (0..256u64)
                    .map(|p| AtomicU64::new((p * PAGE) | PRESENT | WRITABLE))
                    .collect(),
            )
        }
        fn entry(&self, va: u64) -> Option<&AtomicU64> {
            let p = (va / PAGE) as usize;
            if (128..256).contains(&p) {
                return None;
            }
            self.0.get(p)
        }
        /// What the CPU does on a write.
        fn write(&self, va: u64) {
            self.0[(va / PAGE) as usize].fetch_or(ACCESSED | DIRTY, Ordering::Relaxed);
        }
    }

    #[test]
    fn dirty_pages_are_reported_once_relative_to_the_base() {
        let t = Fake::new();
        let base = 0x10000; // a stretch of 32 pages at page 16
        let len = 32 * PAGE;
        for off in [0x0000, 0x5000, 0x5008, 0x13000] {
            t.write(base + off);
        }
        t.write(base - PAGE); // outside the range: not reported, not cleared
        let mut flushed = Vec::new();
        let d = take_dirty(base, len, |va| t.entry(va), |va| flushed.push(va));
        assert_eq!(d, [0, 5, 19]);
        assert_eq!(flushed, [base, base + 0x5000, base + 0x13000]);
        assert_eq!(
            t.0[(base / PAGE) as usize].load(Ordering::Relaxed),
            base | PRESENT | WRITABLE | ACCESSED,
            "dirty cleared, the rest kept"
        );
        assert_ne!(t.0[15].load(Ordering::Relaxed) & DIRTY, 0);
        t.write(base + 0x2000);
        assert_eq!(take_dirty(base, len, |va| t.entry(va), |_| {}), [2]);
        assert!(take_dirty(base, len, |va| t.entry(va), |_| {}).is_empty());
        // An unaligned range counts from the page of its base.
        t.write(base + 0x3000);
        assert_eq!(
            take_dirty(base + 0x10, 0x3000, |va| t.entry(va), |_| {}),
            [3]
        );
        assert!(take_dirty(base, 0, |va| t.entry(va), |_| {}).is_empty());
    }

    #[test]
    fn pages_without_4k_entries_always_read_written() {
        let t = Fake::new();
        // Pages 126..130: two 4 KiB ones, then two in the "large page".
        let d = take_dirty(126 * PAGE, 4 * PAGE, |va| t.entry(va), |_| {});
        assert_eq!(d, [2, 3]);
        let d = take_dirty(126 * PAGE, 4 * PAGE, |va| t.entry(va), |_| {});
        assert_eq!(d, [2, 3]);
    }

    #[test]
    fn present_bit() {
        let e = AtomicU64::new(0x5000 | PRESENT | WRITABLE | DIRTY);
        assert!(set_present(&e, false));
        assert_eq!(e.load(Ordering::Relaxed), 0x5000 | WRITABLE | DIRTY);
        assert!(!set_present(&e, false));
        assert!(set_present(&e, true));
        assert!(!set_present(&e, true));
        assert_eq!(
            e.load(Ordering::Relaxed),
            0x5000 | PRESENT | WRITABLE | DIRTY
        );
    }
}
