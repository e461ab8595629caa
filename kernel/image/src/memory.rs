//! Choosing the physical memory the kernel heap may use.

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
}
