//! Randomness for TLS: a ChaCha20 generator seeded by the caller.
//!
//! rustls wants its random source as a `&'static` object (handshake nonces,
//! key-exchange secrets), so the generator state is one process-wide pool.
//! The pool never gathers entropy itself: the caller mixes bytes in with
//! [`add_entropy`] (the kernel reads RDSEED/RDRAND; every [`crate::Session`]
//! mixes in the 32 bytes it is created with). Until at least
//! [`MIN_SEED_LEN`] bytes have been mixed in one call, the pool refuses to
//! produce output and handshakes fail with a clear error rather than running
//! on a predictable key.
//!
//! Output is ChaCha20 keystream under the pool key; after each request the
//! first 32 bytes of that keystream replace the key ("fast key erasure"), so
//! earlier outputs cannot be recomputed from the state that remains.

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::ChaCha20;
use rustls::crypto::{GetRandomFailed, SecureRandom};
use sha2::{Digest, Sha256};
use spin::Mutex;
use zeroize::Zeroize;

/// The fewest bytes one [`add_entropy`] call must bring before the pool counts
/// as seeded.
pub const MIN_SEED_LEN: usize = 32;

const MIX_CONTEXT: &[u8] = b"metta-link rng mix v1";

struct Pool {
    key: [u8; 32],
    seeded: bool,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    key: [0; 32],
    seeded: false,
});

/// Mixes `bytes` into the pool (SHA-256 of the old key and the new bytes).
/// Mixing never lowers the pool's entropy, so calling it with weak or repeated
/// bytes is harmless; a call with at least [`MIN_SEED_LEN`] bytes marks the
/// pool seeded.
pub fn add_entropy(bytes: &[u8]) {
    let mut pool = POOL.lock();
    let mut h = Sha256::new();
    h.update(MIX_CONTEXT);
    h.update(pool.key);
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
    pool.key = h.finalize().into();
    if bytes.len() >= MIN_SEED_LEN {
        pool.seeded = true;
    }
}

/// Whether the pool has been seeded.
pub fn is_seeded() -> bool {
    POOL.lock().seeded
}

/// Fills `buf` with random bytes, or fails if the pool was never seeded.
pub(crate) fn fill(buf: &mut [u8]) -> Result<(), GetRandomFailed> {
    fill_from(&mut POOL.lock(), buf)
}

fn fill_from(pool: &mut Pool, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
    if !pool.seeded {
        return Err(GetRandomFailed);
    }
    let mut cipher = ChaCha20::new(&pool.key.into(), &[0u8; 12].into());
    let mut next = [0u8; 32];
    cipher.apply_keystream(&mut next);
    buf.fill(0);
    // 256 GiB of keystream per request is far beyond any TLS need; a longer
    // request fails instead of wrapping the block counter.
    let ok = cipher.try_apply_keystream(buf).is_ok();
    pool.key = next;
    next.zeroize();
    if ok {
        Ok(())
    } else {
        buf.fill(0);
        Err(GetRandomFailed)
    }
}

/// The pool as rustls's random source.
#[derive(Debug)]
pub(crate) struct PoolRandom;

impl SecureRandom for PoolRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        fill(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_differ_and_are_not_zero() {
        add_entropy(&[7u8; 32]);
        assert!(is_seeded());
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        fill(&mut a).unwrap();
        fill(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 64]);
        let mut empty = [0u8; 0];
        fill(&mut empty).unwrap();
    }

    #[test]
    fn unseeded_pool_refuses() {
        let mut pool = Pool {
            key: [0; 32],
            seeded: false,
        };
        let mut buf = [1u8; 8];
        assert!(fill_from(&mut pool, &mut buf).is_err());
        pool.seeded = true;
        fill_from(&mut pool, &mut buf).unwrap();
        // the key moved on (fast key erasure)
        assert_ne!(pool.key, [0; 32]);
    }
}
