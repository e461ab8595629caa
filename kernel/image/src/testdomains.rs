//! The test domains embedded in the image, compiled from `domains/*.wat` by
//! `build.rs` (each file's header says what the domain does). The self-tests
//! `test=domains|dirty|snapshot|bench` and the driver's host tests run them.

macro_rules! domain {
    ($(#[$doc:meta])* $name:ident, $file:literal) => {
        $(#[$doc])*
        pub const $name: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/", $file, ".wasm"));
    };
}

domain!(
    /// The fuel calibration loop: spins until the fuel runs out.
    SPIN,
    "spin"
);
domain!(
    /// Returns `RUN_MORE` at once: the empty activation.
    EMPTY,
    "empty"
);
domain!(
    /// A bounded loop, then `RUN_MORE`: always wants CPU.
    STEADY,
    "steady"
);
domain!(
    /// Serves `/svc/counter`: answers each request with the count (i64 LE).
    COUNTER,
    "counter"
);
domain!(
    /// Sends 100 requests to `/svc/counter`, one per answer.
    CLIENT,
    "client"
);
domain!(
    /// Traps 100 ms after its start.
    TRAP,
    "trap"
);
domain!(
    /// Writes known 4 KiB pages of its memory, a set per activation.
    DIRTY,
    "dirty"
);

/// Offset of the counter's count (i64 LE) in its memory.
pub const COUNTER_COUNT_AT: usize = 64;
/// Offset of the client's number of answers (u32 LE) in its memory.
pub const CLIENT_ANSWERS_AT: usize = 128;
/// Offset of the client's last answer (i64 LE) in its memory.
pub const CLIENT_LAST_AT: usize = 136;
/// Round trips the client makes.
pub const CLIENT_ROUNDS: u32 = 100;

/// The little-endian integer of `N` bytes at `at` in `memory` (0 if out of
/// range).
pub fn read_le<const N: usize>(memory: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = memory.get(at..at + N) {
        b[..N].copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

/// The pages `DIRTY` writes in its activations 1, 2 and 4 (activation 3
/// grows its memory from 32 to 48 4 KiB pages).
pub const DIRTY_EXPECTED: [&[u32]; 4] = [&[0, 5, 19], &[2], &[], &[33]];
