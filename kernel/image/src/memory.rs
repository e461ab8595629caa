//! Choosing the physical memory the kernel heap may use, and the kernel's
//! memory footprint ([`Footprint`]).

use core::fmt;

use crate::multiboot::{MemoryMap, RegionKind};

/// The largest piece of available memory in `map` that lies within
/// `[floor, limit)` and overlaps none of the `reserved` ranges (each
/// `(start, end)`, end exclusive), with both ends aligned to `align` (a power of
/// two). Returns `(base, len)`, or `None` if nothing is left.
pub fn heap_region(
    map: MemoryMap<'_>,
    reserved: &[(u64, u64)],
    floor: u64,
    limit: u64,
    align: u64,
) -> Option<(u64, u64)> {
    let mut best: Option<(u64, u64)> = None;
    for region in map.filter(|r| r.kind == RegionKind::Available) {
        let mut start = region.base.max(floor);
        let end = region.base.saturating_add(region.len).min(limit);
        // Walk the free gaps of [start, end) between reserved ranges, lowest first.
        while start < end {
            // The reserved range overlapping [start, end) that starts lowest.
            let blocker = reserved
                .iter()
                .filter(|&&(s, e)| s < end && e > start)
                .min_by_key(|&&(s, _)| s);
            let gap_end = blocker.map_or(end, |&(s, _)| s.max(start));
            let base = align_up(start, align);
            let top = gap_end & !(align - 1);
            if top > base && best.is_none_or(|(_, len)| top - base > len) {
                best = Some((base, top - base));
            }
            match blocker {
                Some(&(_, e)) => start = e,
                None => break,
            }
        }
    }
    best
}

fn align_up(x: u64, align: u64) -> u64 {
    x.saturating_add(align - 1) & !(align - 1)
}

/// What the kernel itself occupies, from real figures (the binary's
/// `memstat.rs` gathers them: linker symbols, the page-table count, the
/// heap allocator's counters). Bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// The image in memory: code, data and `.bss` (`__image_start` to
    /// `__bss_end`), which holds the boot page tables and stacks below.
    pub image: u64,
    /// Page tables in `.bss` (the entry stub's).
    pub boot_tables: u64,
    /// Stacks in `.bss` (boot and IST).
    pub boot_stacks: u64,
    /// Page tables taken from the front of the heap's range (its 4 KiB
    /// mapping).
    pub heap_tables: u64,
    /// A stack allocated on the heap (counted in `heap_in_use`).
    pub heap_stack: u64,
    /// Heap bytes in use, as the allocator counts them (as requested).
    pub heap_in_use: u64,
    /// The most heap ever in use.
    pub heap_peak: u64,
    /// The most heap in use before `heap_stack` was allocated.
    pub heap_peak_before_stack: u64,
}

impl Footprint {
    /// Code and data: the image without its page tables and stacks.
    pub fn code_and_data(&self) -> u64 {
        self.image
            .saturating_sub(self.boot_tables)
            .saturating_sub(self.boot_stacks)
    }

    /// All page tables.
    pub fn page_tables(&self) -> u64 {
        self.boot_tables + self.heap_tables
    }

    /// All stacks.
    pub fn stacks(&self) -> u64 {
        self.boot_stacks + self.heap_stack
    }

    /// The heap in use besides the stack on it.
    pub fn heap(&self) -> u64 {
        self.heap_in_use.saturating_sub(self.heap_stack)
    }

    /// The peak of [`heap`](Self::heap): before the stack, or after it
    /// less the stack (exact either way, since the stack stays allocated).
    pub fn heap_peak(&self) -> u64 {
        self.heap_peak_before_stack
            .max(self.heap_peak.saturating_sub(self.heap_stack))
    }

    /// Everything, counted once.
    pub fn total(&self) -> u64 {
        self.code_and_data() + self.page_tables() + self.stacks() + self.heap()
    }
}

/// Bytes as KiB, rounded up.
fn kib(b: u64) -> u64 {
    b.div_ceil(1024)
}

impl fmt::Display for Footprint {
    /// `image <KiB>, page tables <KiB>, stacks <KiB>, heap in use <KiB>
    /// (peak <KiB>), total <KiB>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "image {} KiB, page tables {} KiB, stacks {} KiB, heap in use {} KiB (peak {} KiB), total {} KiB",
            kib(self.code_and_data()),
            kib(self.page_tables()),
            kib(self.stacks()),
            kib(self.heap()),
            kib(self.heap_peak()),
            kib(self.total())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for &(base, len, kind) in entries {
            bytes.extend_from_slice(&20u32.to_le_bytes());
            bytes.extend_from_slice(&base.to_le_bytes());
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&kind.to_le_bytes());
        }
        bytes
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn largest_gap_avoiding_reservations() {
        // QEMU -m 128M: low memory, a hole, then 1 MiB..~128 MiB.
        let bytes = map(&[
            (0, 0x9fc00, 1),
            (0x9fc00, 0x400, 2),
            (0xf0000, 0x10000, 2),
            (MIB, 127 * MIB - 0x20000, 1),
            (0xfffc0000, 0x40000, 2),
        ]);
        let m = MemoryMap::new(&bytes);
        // Kernel image 1 MiB..1.5 MiB, boot info just after it.
        let reserved = [(MIB, MIB + MIB / 2), (MIB + MIB / 2, MIB + MIB / 2 + 300)];
        let (base, len) = heap_region(m, &reserved, MIB, 1 << 30, 4096).unwrap();
        assert_eq!(base, MIB + MIB / 2 + 4096);
        assert_eq!(base + len, (128 * MIB - 0x20000) & !4095);
        // Nothing below the floor, nothing above the limit.
        let m = MemoryMap::new(&bytes);
        let (base, len) = heap_region(m, &[], MIB, 64 * MIB, 4096).unwrap();
        assert_eq!((base, len), (MIB, 63 * MIB));
    }

    #[test]
    fn reservation_in_the_middle_picks_the_bigger_side() {
        let bytes = map(&[(0, 100 * MIB, 1)]);
        let reserved = [(60 * MIB, 61 * MIB), (10 * MIB, 11 * MIB)];
        let m = MemoryMap::new(&bytes);
        assert_eq!(
            heap_region(m, &reserved, 0, u64::MAX, 4096),
            Some((11 * MIB, 49 * MIB))
        );
    }

    #[test]
    fn nothing_usable() {
        let bytes = map(&[(0, 0x9fc00, 1), (MIB, MIB, 2)]);
        assert_eq!(
            heap_region(MemoryMap::new(&bytes), &[], MIB, 1 << 30, 4096),
            None
        );
        let bytes = map(&[(MIB, MIB, 1)]);
        assert_eq!(
            heap_region(MemoryMap::new(&bytes), &[(0, 4 * MIB)], MIB, 1 << 30, 4096),
            None
        );
    }

    #[test]
    fn footprint_counts_everything_once() {
        let f = Footprint {
            image: 2_000 * 1024,
            boot_tables: 24 * 1024,
            boot_stacks: 112 * 1024,
            heap_tables: 64 * 1024,
            heap_stack: 1024 * 1024,
            heap_in_use: 3_000 * 1024 + 1,
            heap_peak: 5_000 * 1024,
            heap_peak_before_stack: 500 * 1024,
        };
        assert_eq!(
            f.to_string(),
            "image 1864 KiB, page tables 88 KiB, stacks 1136 KiB, heap in use 1977 KiB (peak 3976 KiB), total 5065 KiB"
        );
        // A peak before the stack was allocated is kept as it was.
        let f = Footprint {
            heap_peak: 3_000 * 1024,
            heap_peak_before_stack: 2_500 * 1024,
            ..f
        };
        assert_eq!(f.heap_peak(), 2_500 * 1024);
    }
}
