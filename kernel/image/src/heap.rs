//! The kernel heap: [`talc`] as the global allocator, over one range of RAM from
//! the multiboot memory map (chosen by [`metta_kernel::memory::heap_region`]).

use talc::{ErrOnOom, Span, Talc, Talck};

#[global_allocator]
static ALLOCATOR: Talck<spin::Mutex<()>, ErrOnOom> = Talc::new(ErrOnOom).lock();

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
    match unsafe { ALLOCATOR.lock().claim(span) } {
        Ok(heap) => heap.size(),
        Err(()) => 0,
    }
}
