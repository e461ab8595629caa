//! Merkle roots over linear memory.
//!
//! Memory is cut into [`CHUNK`] (64 KiB, one wasm page) chunks. Each chunk
//! hashes to a leaf (blake3 over a tag, its index and its bytes); leaves pair
//! up level by level (an odd last node is promoted); the root binds the tree
//! and the total length. Migration compares [`chunk_hashes`] of two memories
//! to copy only the chunks that differ, then checks [`memory_root`].

use alloc::vec::Vec;

/// Chunk size: one wasm page.
pub const CHUNK: usize = 64 * 1024;

/// A blake3 hash.
pub type Hash = [u8; 32];

/// The leaf hash of chunk `index`.
pub fn chunk_hash(index: u64, chunk: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"metta memory chunk v1\0");
    h.update(&index.to_le_bytes());
    h.update(chunk);
    *h.finalize().as_bytes()
}

/// Leaf hashes of every chunk of `memory` (the last may be short).
pub fn chunk_hashes(memory: &[u8]) -> Vec<Hash> {
    memory
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| chunk_hash(i as u64, c))
        .collect()
}

/// The root over leaf hashes of a memory of `len` bytes.
pub fn root_of(leaves: &[Hash], len: u64) -> Hash {
    let mut level: Vec<Hash> = leaves.to_vec();
    while level.len() > 1 {
        let mut next = Vec::with_capacity(level.len().div_ceil(2));
        for pair in level.chunks(2) {
            match pair {
                [l, r] => {
                    let mut h = blake3::Hasher::new();
                    h.update(b"metta memory node v1\0");
                    h.update(l);
                    h.update(r);
                    next.push(*h.finalize().as_bytes());
                }
                [one] => next.push(*one),
                _ => unreachable!("chunks(2) yields one or two"),
            }
        }
        level = next;
    }
    let tree = level.first().copied().unwrap_or([0; 32]);
    let mut h = blake3::Hasher::new();
    h.update(b"metta memory root v1\0");
    h.update(&len.to_le_bytes());
    h.update(&tree);
    *h.finalize().as_bytes()
}

/// The Merkle root of `memory`.
pub fn memory_root(memory: &[u8]) -> Hash {
    root_of(&chunk_hashes(memory), memory.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_changes_with_any_byte_and_length() {
        let mut m = vec![0u8; 5 * CHUNK];
        let r0 = memory_root(&m);
        assert_eq!(r0, memory_root(&m));
        for pos in [0, CHUNK - 1, CHUNK, 3 * CHUNK + 7, 5 * CHUNK - 1] {
            m[pos] ^= 1;
            assert_ne!(memory_root(&m), r0, "flip at {pos}");
            m[pos] ^= 1;
        }
        assert_ne!(memory_root(&m[..4 * CHUNK]), r0);
        assert_ne!(memory_root(&[]), memory_root(&[0]));
    }

    #[test]
    fn chunk_hashes_locate_changes() {
        let a = vec![7u8; 4 * CHUNK];
        let mut b = a.clone();
        b[2 * CHUNK + 10] = 8;
        let (ha, hb) = (chunk_hashes(&a), chunk_hashes(&b));
        let differing: Vec<usize> = (0..4).filter(|&i| ha[i] != hb[i]).collect();
        assert_eq!(differing, vec![2]);
        // Identical chunks at different positions hash differently.
        assert_ne!(ha[0], ha[1]);
        assert_eq!(root_of(&hb, b.len() as u64), memory_root(&b));
    }
}
