//! Which 4 KiB pages of a domain's linear memory were written since the last
//! look, from the page tables' Dirty bits: what pre-copy migration sends in
//! its rounds.
//!
//! # Finding the stretch
//!
//! A domain's memory is a heap stretch ([`crate::heap`]): wasmi allocates it
//! as one `Vec<u8>` of whole 64 KiB wasm pages, which the kernel allocator
//! places on a 4 KiB boundary, with guard pages around it, sharing its pages
//! with nothing else. Its base and length are those of the slice
//! [`Domain::memory`] returns; page `i` of the answer is the bytes
//! `[i * 4096, (i + 1) * 4096)` of that slice. The heap is mapped with 4 KiB
//! pages ([`crate::mmu::split`]), so each has its own Dirty bit.
//!
//! # What counts as written
//!
//! Any write through the mapping: the domain's stores, and the nucleus
//! writing into the memory for it (a received message, restored memory).
//! The first call after a domain starts reports every page (creating the
//! memory zeroed it).
//!
//! # `memory.grow`
//!
//! Growing can move the memory: the `Vec` is reallocated, which is a fresh
//! stretch, the old contents copied in and the new pages zeroed. [`take`]
//! reads the base from the domain on every call, so it follows the move; all
//! pages of the new stretch read as written the first time after it, which
//! is what a pre-copy round needs anyway (the old copy is gone). Pages are
//! always reported relative to the current base.

use alloc::vec::Vec;

use metta_kernel::paging::take_dirty;
use metta_nucleus::Domain;

use crate::mmu;

/// Indices of the 4 KiB pages of `domain`'s linear memory written since the
/// last call; clears their Dirty bits and flushes their TLB entries.
pub fn take(domain: &Domain) -> Vec<u32> {
    let memory = domain.memory();
    take_dirty(
        memory.as_ptr() as u64,
        memory.len() as u64,
        mmu::entry,
        mmu::invlpg,
    )
}
