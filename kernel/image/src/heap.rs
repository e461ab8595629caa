//! The kernel heap: [`talc`] as the allocator, over one range of RAM from
//! the multiboot memory map (chosen by [`metta_kernel::memory::heap_region`]
//! and mapped with 4 KiB pages by [`crate::mmu::split`]).
//!
//! # Stretches
//!
//! An allocation of at least [`STRETCH_MIN`] bytes (64 KiB) gets a *stretch*
//! of its own: it starts on a 4 KiB page boundary, is rounded up to whole
//! pages, and has an unmapped guard page right below and right above it
//! (laid out by [`Stretch`]), so a run off either end is a page fault, not
//! silent corruption of a neighbour. Every wasm linear memory is such an
//! allocation: wasmi keeps a domain's memory in a `Vec<u8>` whose size is a
//! multiple of 64 KiB, so the memory's pages are the stretch's pages and no
//! other object shares them — which is what makes the page-table Dirty bits
//! a per-domain record of written pages ([`crate::dirty`]). The guards are
//! mapped back before the block returns to talc (which keeps its free-list
//! data in freed blocks). A reallocation that involves a stretch is alloc +
//! copy + free: the block moves (see [`crate::dirty`] for `memory.grow`).
//!
//! Bytes in use (as asked for, without the guards and padding) are counted
//! for [`in_use`].

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering};

use metta_kernel::paging::{Stretch, STRETCH_MIN};
use talc::{ErrOnOom, Span, Talc, Talck};

use crate::mmu;

/// The kernel's allocator: talc, with stretches for large blocks.
struct KernelHeap {
    talc: Talck<spin::Mutex<()>, ErrOnOom>,
    in_use: AtomicUsize,
    peak: AtomicUsize,
    stretches: AtomicUsize,
}

#[global_allocator]
static ALLOCATOR: KernelHeap = KernelHeap {
    talc: Talc::new(ErrOnOom).lock(),
    in_use: AtomicUsize::new(0),
    peak: AtomicUsize::new(0),
    stretches: AtomicUsize::new(0),
};

/// Give the allocator the `len` bytes of RAM at physical address `base`; returns
/// the bytes it can hand out.
///
/// # Safety
/// The range must be identity-mapped RAM that nothing else uses for the rest of
/// the kernel's life (not the image, its stack, the loader's boot information, or
/// a device's memory), and `init` must be called once.
pub unsafe fn init(base: u64, len: u64) -> usize {
    let span = Span::from_base_size(base as *mut u8, len as usize);
    // SAFETY: the caller guarantees the range is unused, mapped RAM.
    match unsafe { ALLOCATOR.talc.lock().claim(span) } {
        Ok(heap) => heap.size(),
        Err(()) => 0,
    }
}

/// Heap use: bytes in use now, the most ever in use, and live stretches.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    /// Bytes allocated and not freed (as requested).
    pub in_use: usize,
    /// The largest `in_use` so far.
    pub peak: usize,
    /// Live allocations with a stretch (guard pages) of their own.
    pub stretches: usize,
}

/// Heap use now.
pub fn in_use() -> Usage {
    Usage {
        in_use: ALLOCATOR.in_use.load(Ordering::Relaxed),
        peak: ALLOCATOR.peak.load(Ordering::Relaxed),
        stretches: ALLOCATOR.stretches.load(Ordering::Relaxed),
    }
}

impl KernelHeap {
    fn count(&self, add: usize, sub: usize) {
        let now = self.in_use.fetch_add(add, Ordering::Relaxed) + add - sub;
        self.in_use.fetch_sub(sub, Ordering::Relaxed);
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// # Safety
    /// As [`GlobalAlloc::alloc`], for a layout of at least [`STRETCH_MIN`].
    unsafe fn alloc_stretch(&self, layout: Layout) -> *mut u8 {
        let Some(s) = Stretch::new(layout.size(), layout.align()) else {
            return core::ptr::null_mut();
        };
        let Ok(outer) = Layout::from_size_align(s.outer_size, s.outer_align) else {
            return core::ptr::null_mut();
        };
        // SAFETY: `outer` has a non-zero size.
        let block = unsafe { self.talc.alloc(outer) };
        if block.is_null() {
            return block;
        }
        // The whole block is ours until it is freed: talc touches nothing
        // inside an allocated block, so its guard pages can go.
        mmu::set_present(block as u64 + s.guard_lo as u64, false);
        mmu::set_present(block as u64 + s.guard_hi as u64, false);
        self.stretches.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `body` lies inside the block (Stretch's layout).
        unsafe { block.add(s.body) }
    }

    /// # Safety
    /// As [`GlobalAlloc::dealloc`], for a block from [`Self::alloc_stretch`].
    unsafe fn dealloc_stretch(&self, ptr: *mut u8, layout: Layout) {
        // Both were valid when the block was allocated.
        let s = Stretch::new(layout.size(), layout.align()).expect("stretch layout");
        let outer = Layout::from_size_align(s.outer_size, s.outer_align).expect("stretch layout");
        // SAFETY: `ptr` is `block + body` (alloc_stretch).
        let block = unsafe { ptr.sub(s.body) };
        // Map the guards back: talc writes into freed blocks.
        mmu::set_present(block as u64 + s.guard_lo as u64, true);
        mmu::set_present(block as u64 + s.guard_hi as u64, true);
        self.stretches.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: `block` came from talc with `outer`.
        unsafe { self.talc.dealloc(block, outer) }
    }
}

// SAFETY: small blocks are talc's; large ones are talc blocks of which only
// the page-aligned body is handed out (whole pages, aligned to at least the
// requested alignment), with the guards mapped back before the block returns
// to talc. `realloc` of a large block copies into a fresh one.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = if layout.size() >= STRETCH_MIN {
            // SAFETY: as the caller's.
            unsafe { self.alloc_stretch(layout) }
        } else {
            // SAFETY: as the caller's.
            unsafe { self.talc.alloc(layout) }
        };
        if !p.is_null() {
            self.count(layout.size(), 0);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= STRETCH_MIN {
            // SAFETY: as the caller's: it came from `alloc_stretch`.
            unsafe { self.dealloc_stretch(ptr, layout) }
        } else {
            // SAFETY: as the caller's: it came from talc.
            unsafe { self.talc.dealloc(ptr, layout) }
        }
        self.count(0, layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < STRETCH_MIN && new_size < STRETCH_MIN {
            // SAFETY: as the caller's: a talc block staying small.
            let p = unsafe { self.talc.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                self.count(new_size, layout.size());
            }
            return p;
        }
        // SAFETY: the caller guarantees `new_size` with the old alignment is
        // a valid layout.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new` has a non-zero size (the caller's).
        let p = unsafe { self.alloc(new) };
        if !p.is_null() {
            // SAFETY: both blocks are live, distinct, and at least this long.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        p
    }
}
