//! Filling buffers from the CPU's random-number instructions, with retries.
//!
//! `RDSEED` returns conditioned entropy straight from the hardware source and is
//! preferred (key material); `RDRAND` returns the output of a DRBG reseeded from
//! that source. Both may fail transiently (carry flag clear) when the source is
//! drained; Intel's guidance is to retry `RDRAND` up to 10 times, and `RDSEED`
//! more, with a pause in between. Each 64-bit word is taken from `RDSEED` if it
//! succeeds within [`RDSEED_RETRIES`] tries, else from `RDRAND` within
//! [`RDRAND_RETRIES`]; if both fail, [`fill`] gives up with
//! [`EntropyError::Exhausted`] rather than hand out anything weaker.
//!
//! The instructions themselves (and the CPUID checks) are in the binary's
//! `entropy` module (`src/entropy.rs`, whose `entropy::fill(&mut [u8])` is what
//! the kernel calls); the policy here takes them as a closure, so it is
//! unit-tested on the host with fake sources.

use core::fmt;

/// Tries of `RDSEED` per 64-bit word before falling back to `RDRAND`.
pub const RDSEED_RETRIES: u32 = 100;
/// Tries of `RDRAND` per 64-bit word (Intel's recommendation).
pub const RDRAND_RETRIES: u32 = 10;

/// Which random-number instructions the CPU has (CPUID).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// CPUID.(EAX=07H, ECX=0):EBX bit 18.
    pub rdseed: bool,
    /// CPUID.01H:ECX bit 30.
    pub rdrand: bool,
}

/// One of the instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instruction {
    /// `RDSEED`.
    Rdseed,
    /// `RDRAND`.
    Rdrand,
}

/// Why no random bytes could be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntropyError {
    /// The CPU has neither `RDSEED` nor `RDRAND`.
    Unsupported,
    /// Every try of every available instruction failed for one word (the
    /// hardware source is drained, or broken).
    Exhausted,
}

impl fmt::Display for EntropyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntropyError::Unsupported => f.write_str("this CPU has neither RDSEED nor RDRAND"),
            EntropyError::Exhausted => write!(
                f,
                "RDSEED/RDRAND kept failing ({RDSEED_RETRIES}/{RDRAND_RETRIES} tries for one word)"
            ),
        }
    }
}

impl fmt::Display for Features {
    /// `RDSEED and RDRAND`, `RDRAND only`, `RDSEED only`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match (self.rdseed, self.rdrand) {
            (true, true) => "RDSEED and RDRAND",
            (true, false) => "RDSEED only",
            (false, true) => "RDRAND only",
            (false, false) => "none",
        })
    }
}

/// Fill `buf` with random bytes, one 64-bit word at a time, using `step` to run
/// one try of an instruction (`None` when it reports failure). On error `buf` is
/// zeroed, so a partly filled buffer is never mistaken for a random one.
pub fn fill(
    buf: &mut [u8],
    features: Features,
    mut step: impl FnMut(Instruction) -> Option<u64>,
) -> Result<(), EntropyError> {
    if !features.rdseed && !features.rdrand {
        return Err(EntropyError::Unsupported);
    }
    let mut word = || {
        let mut attempt = |insn, tries| {
            (0..tries).find_map(|i| {
                if i > 0 {
                    core::hint::spin_loop();
                }
                step(insn)
            })
        };
        let seed = if features.rdseed {
            attempt(Instruction::Rdseed, RDSEED_RETRIES)
        } else {
            None
        };
        seed.or_else(|| {
            if features.rdrand {
                attempt(Instruction::Rdrand, RDRAND_RETRIES)
            } else {
                None
            }
        })
    };
    for chunk in buf.chunks_mut(8) {
        match word() {
            Some(w) => chunk.copy_from_slice(&w.to_le_bytes()[..chunk.len()]),
            None => {
                buf.fill(0);
                return Err(EntropyError::Exhausted);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: Features = Features {
        rdseed: true,
        rdrand: true,
    };

    #[test]
    fn unsupported() {
        let mut buf = [1u8; 4];
        assert_eq!(
            fill(&mut buf, Features::default(), |_| Some(7)),
            Err(EntropyError::Unsupported)
        );
        assert!(EntropyError::Unsupported
            .to_string()
            .contains("neither RDSEED nor RDRAND"));
    }

    #[test]
    fn rdseed_preferred_and_partial_words() {
        let mut n = 0u64;
        let mut buf = [0u8; 13];
        fill(&mut buf, BOTH, |insn| {
            assert_eq!(insn, Instruction::Rdseed);
            n += 1;
            Some(0x0101_0101_0101_0101 * n)
        })
        .unwrap();
        assert_eq!(buf[..8], [1; 8]);
        assert_eq!(buf[8..], [2; 5]);
        assert_eq!(n, 2);
    }

    #[test]
    fn falls_back_to_rdrand_when_rdseed_is_drained() {
        let (mut seeds, mut rands) = (0, 0);
        let mut buf = [0u8; 8];
        fill(&mut buf, BOTH, |insn| match insn {
            Instruction::Rdseed => {
                seeds += 1;
                None
            }
            Instruction::Rdrand => {
                rands += 1;
                (rands == 3).then_some(u64::MAX)
            }
        })
        .unwrap();
        assert_eq!(buf, [0xFF; 8]);
        assert_eq!((seeds, rands), (RDSEED_RETRIES, 3));
    }

    #[test]
    fn rdseed_retried_before_falling_back() {
        let mut tries = 0;
        let mut buf = [0u8; 8];
        fill(&mut buf, BOTH, |insn| {
            assert_eq!(insn, Instruction::Rdseed);
            tries += 1;
            (tries == 50).then_some(5)
        })
        .unwrap();
        assert_eq!(buf[0], 5);
    }

    #[test]
    fn rdrand_only() {
        let mut buf = [0u8; 3];
        let only = Features {
            rdseed: false,
            rdrand: true,
        };
        fill(&mut buf, only, |insn| {
            assert_eq!(insn, Instruction::Rdrand);
            Some(0x00AB_CDEF)
        })
        .unwrap();
        assert_eq!(buf, [0xEF, 0xCD, 0xAB]);
        assert_eq!(only.to_string(), "RDRAND only");
        assert_eq!(BOTH.to_string(), "RDSEED and RDRAND");
    }

    #[test]
    fn exhausted_zeroes_the_buffer() {
        let mut words = 0;
        let mut buf = [0u8; 24];
        let err = fill(&mut buf, BOTH, |_| {
            words += 1;
            // The first word succeeds at once, then the source is dry.
            (words == 1).then_some(u64::MAX)
        });
        assert_eq!(err, Err(EntropyError::Exhausted));
        assert_eq!(buf, [0; 24]);
        assert_eq!(words, 1 + RDSEED_RETRIES + RDRAND_RETRIES);
    }
}
