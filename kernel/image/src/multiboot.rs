//! Multiboot1 boot information, read from byte slices.
//!
//! The loader passes the physical address of the information structure in EBX
//! (multiboot specification 0.6.96, §3.3). The kernel turns the addresses it finds
//! into slices (the first GiB is identity-mapped) and hands them to the parsers
//! here; nothing in this module touches memory on its own.

use core::fmt;

/// The value a multiboot1 loader leaves in EAX.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;

/// Bytes of the information structure this kernel reads: up to and including
/// `boot_loader_name` (offset 64).
pub const INFO_LEN: usize = 68;

/// `flags` bit: `mem_lower` / `mem_upper` are valid.
pub const FLAG_MEM: u32 = 1 << 0;
/// `flags` bit: `cmdline` is valid.
pub const FLAG_CMDLINE: u32 = 1 << 2;
/// `flags` bit: `mmap_length` / `mmap_addr` are valid.
pub const FLAG_MMAP: u32 = 1 << 6;
/// `flags` bit: `boot_loader_name` is valid.
pub const FLAG_LOADER_NAME: u32 = 1 << 9;

/// The fields of the multiboot information structure the kernel uses. Fields whose
/// `flags` bit is clear are `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    /// The raw `flags` word.
    pub flags: u32,
    /// `(mem_lower, mem_upper)` in KiB: memory below 1 MiB, and contiguous memory
    /// above 1 MiB.
    pub mem_kib: Option<(u32, u32)>,
    /// Physical address of the NUL-terminated command line.
    pub cmdline: Option<u32>,
    /// Physical address and length in bytes of the memory map.
    pub mmap: Option<(u32, u32)>,
    /// Physical address of the NUL-terminated boot loader name.
    pub boot_loader_name: Option<u32>,
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let b = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    let lo = u32_at(bytes, offset)?;
    let hi = u32_at(bytes, offset + 4)?;
    Some(u64::from(hi) << 32 | u64::from(lo))
}

impl Info {
    /// Parse the first [`INFO_LEN`] bytes of the information structure.
    /// `None` if `bytes` is shorter than that.
    pub fn parse(bytes: &[u8]) -> Option<Info> {
        if bytes.len() < INFO_LEN {
            return None;
        }
        let flags = u32_at(bytes, 0)?;
        let when = |bit: u32| flags & bit != 0;
        Some(Info {
            flags,
            mem_kib: if when(FLAG_MEM) {
                Some((u32_at(bytes, 4)?, u32_at(bytes, 8)?))
            } else {
                None
            },
            cmdline: if when(FLAG_CMDLINE) {
                u32_at(bytes, 16)
            } else {
                None
            },
            mmap: if when(FLAG_MMAP) {
                Some((u32_at(bytes, 48)?, u32_at(bytes, 44)?))
            } else {
                None
            },
            boot_loader_name: if when(FLAG_LOADER_NAME) {
                u32_at(bytes, 64)
            } else {
                None
            },
        })
    }
}

/// The type of a memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Type 1: RAM the OS may use.
    Available,
    /// Type 2 (and any type this list does not know): do not touch.
    Reserved,
    /// Type 3: ACPI tables; usable once they have been read.
    AcpiReclaimable,
    /// Type 4: ACPI non-volatile storage, preserved across sleep.
    AcpiNvs,
    /// Type 5: defective RAM.
    BadMemory,
    /// Any other type value.
    Other(u32),
}

impl From<u32> for RegionKind {
    fn from(kind: u32) -> Self {
        match kind {
            1 => RegionKind::Available,
            2 => RegionKind::Reserved,
            3 => RegionKind::AcpiReclaimable,
            4 => RegionKind::AcpiNvs,
            5 => RegionKind::BadMemory,
            other => RegionKind::Other(other),
        }
    }
}

/// Honours width and alignment (`{:<16}`), except for [`RegionKind::Other`].
impl fmt::Display for RegionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionKind::Available => f.pad("available"),
            RegionKind::Reserved => f.pad("reserved"),
            RegionKind::AcpiReclaimable => f.pad("ACPI reclaimable"),
            RegionKind::AcpiNvs => f.pad("ACPI NVS"),
            RegionKind::BadMemory => f.pad("bad memory"),
            RegionKind::Other(t) => write!(f, "type {t}"),
        }
    }
}

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Physical start address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the memory is.
    pub kind: RegionKind,
}

impl Region {
    /// The last byte of the region (inclusive), saturating.
    pub fn last(&self) -> u64 {
        self.base.saturating_add(self.len.saturating_sub(1))
    }
}

/// An iterator over the multiboot memory map: entries of `size: u32` followed by
/// `size` bytes holding `base_addr: u64, length: u64, type: u32`. Iteration stops
/// at the end of the buffer or at the first malformed entry (`size` < 20, or an
/// entry that runs past the end).
#[derive(Clone, Debug)]
pub struct MemoryMap<'a> {
    rest: &'a [u8],
}

impl<'a> MemoryMap<'a> {
    /// The memory map stored in `bytes` (`mmap_length` bytes at `mmap_addr`).
    pub fn new(bytes: &'a [u8]) -> Self {
        MemoryMap { rest: bytes }
    }

    /// Total bytes of [`RegionKind::Available`] memory. Overlapping entries (which
    /// firmware should not report) would be counted twice.
    pub fn usable_bytes(&self) -> u64 {
        self.clone()
            .filter(|r| r.kind == RegionKind::Available)
            .fold(0u64, |sum, r| sum.saturating_add(r.len))
    }
}

impl Iterator for MemoryMap<'_> {
    type Item = Region;

    fn next(&mut self) -> Option<Region> {
        let size = usize::try_from(u32_at(self.rest, 0)?).ok()?;
        let entry = match self.rest.get(4..4usize.checked_add(size)?) {
            Some(entry) if size >= 20 => entry,
            _ => {
                self.rest = &[];
                return None;
            }
        };
        let region = Region {
            base: u64_at(entry, 0)?,
            len: u64_at(entry, 8)?,
            kind: RegionKind::from(u32_at(entry, 16)?),
        };
        self.rest = &self.rest[4 + size..];
        Some(region)
    }
}

/// A byte count printed with a binary unit and one (truncated) decimal:
/// `512 B`, `639.0 KiB`, `127.8 MiB`, `3.0 GiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, unit) in UNITS {
            if self.0 >= unit {
                let tenths = u128::from(self.0) * 10 / u128::from(unit);
                return write!(f, "{}.{} {name}", tenths / 10, tenths % 10);
            }
        }
        write!(f, "{} B", self.0)
    }
}

/// The bytes of a NUL-terminated string starting at the front of `bytes`, without
/// the terminator; all of `bytes` if there is none.
pub fn c_str(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(out: &mut Vec<u8>, base: u64, len: u64, kind: u32) {
        out.extend_from_slice(&20u32.to_le_bytes());
        out.extend_from_slice(&base.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
    }

    /// The map QEMU 7.2 (SeaBIOS) reports for `-m 128M`.
    fn qemu_map() -> Vec<u8> {
        let mut m = Vec::new();
        entry(&mut m, 0, 0x9fc00, 1);
        entry(&mut m, 0x9fc00, 0x400, 2);
        entry(&mut m, 0xf0000, 0x10000, 2);
        entry(&mut m, 0x100000, 0x7ee0000, 1);
        entry(&mut m, 0x7fe0000, 0x20000, 2);
        entry(&mut m, 0xfffc0000, 0x40000, 2);
        m
    }

    #[test]
    fn memory_map_entries_and_total() {
        let bytes = qemu_map();
        let map = MemoryMap::new(&bytes);
        let regions: Vec<Region> = map.clone().collect();
        assert_eq!(regions.len(), 6);
        assert_eq!(
            regions[3],
            Region {
                base: 0x100000,
                len: 0x7ee0000,
                kind: RegionKind::Available
            }
        );
        assert_eq!(regions[3].last(), 0x7fdffff);
        assert_eq!(regions[5].kind, RegionKind::Reserved);
        assert_eq!(map.usable_bytes(), 0x9fc00 + 0x7ee0000);
    }

    #[test]
    fn memory_map_honours_entry_size() {
        // An entry with a larger `size` (extra trailing bytes) is skipped correctly.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&24u32.to_le_bytes());
        bytes.extend_from_slice(&0x1000u64.to_le_bytes());
        bytes.extend_from_slice(&0x2000u64.to_le_bytes());
        bytes.extend_from_slice(&7u32.to_le_bytes());
        bytes.extend_from_slice(&[0xAA; 4]);
        entry(&mut bytes, 0x100000, 0x100000, 1);
        let regions: Vec<Region> = MemoryMap::new(&bytes).collect();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].kind, RegionKind::Other(7));
        assert_eq!(regions[1].base, 0x100000);
    }

    #[test]
    fn memory_map_stops_at_malformed_entries() {
        let mut bytes = qemu_map();
        bytes.truncate(24 * 2 + 10); // third entry cut short
        assert_eq!(MemoryMap::new(&bytes).count(), 2);

        let mut bytes = Vec::new();
        bytes.extend_from_slice(&8u32.to_le_bytes()); // size too small
        bytes.extend_from_slice(&[0; 8]);
        entry(&mut bytes, 0, 0x1000, 1);
        assert_eq!(MemoryMap::new(&bytes).count(), 0);

        assert_eq!(MemoryMap::new(&[]).count(), 0);
        assert_eq!(MemoryMap::new(&[1, 2]).count(), 0);
        // `size` near u32::MAX must not overflow.
        assert_eq!(MemoryMap::new(&u32::MAX.to_le_bytes()).count(), 0);
    }

    #[test]
    fn info_fields_follow_flags() {
        let mut b = [0u8; INFO_LEN];
        let flags = FLAG_MEM | FLAG_CMDLINE | FLAG_MMAP | FLAG_LOADER_NAME;
        b[0..4].copy_from_slice(&flags.to_le_bytes());
        b[4..8].copy_from_slice(&639u32.to_le_bytes());
        b[8..12].copy_from_slice(&130_944u32.to_le_bytes());
        b[16..20].copy_from_slice(&0x9000u32.to_le_bytes());
        b[44..48].copy_from_slice(&144u32.to_le_bytes());
        b[48..52].copy_from_slice(&0x9100u32.to_le_bytes());
        b[64..68].copy_from_slice(&0x9200u32.to_le_bytes());
        let info = Info::parse(&b).unwrap();
        assert_eq!(info.mem_kib, Some((639, 130_944)));
        assert_eq!(info.cmdline, Some(0x9000));
        assert_eq!(info.mmap, Some((0x9100, 144)));
        assert_eq!(info.boot_loader_name, Some(0x9200));

        b[0..4].copy_from_slice(&FLAG_CMDLINE.to_le_bytes());
        let info = Info::parse(&b).unwrap();
        assert_eq!(info.mem_kib, None);
        assert_eq!(info.cmdline, Some(0x9000));
        assert_eq!(info.mmap, None);
        assert_eq!(info.boot_loader_name, None);

        assert_eq!(Info::parse(&b[..INFO_LEN - 1]), None);
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(0x9fc00).to_string(), "639.0 KiB");
        assert_eq!(Bytes(0x7ee0000).to_string(), "126.8 MiB");
        assert_eq!(Bytes(3 << 30).to_string(), "3.0 GiB");
    }

    #[test]
    fn c_strings() {
        assert_eq!(c_str(b"abc\0def"), b"abc");
        assert_eq!(c_str(b"abc"), b"abc");
        assert_eq!(c_str(b"\0"), b"");
    }
}
