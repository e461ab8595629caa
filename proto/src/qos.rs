//! QoS contracts (Nemesis-style): a domain is guaranteed `slice` of CPU time
//! every `period`, may use spare time when `extra` is set, and may use at most
//! `memory` bytes.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

/// The most memory one domain may ask for (4 GiB: a wasm32 linear memory).
pub const MAX_MEMORY: u64 = 4 << 30;
/// The shortest period a contract may have (1 ms).
pub const MIN_PERIOD_NS: u64 = 1_000_000;
/// The longest period a contract may have (10 s).
pub const MAX_PERIOD_NS: u64 = 10_000_000_000;

/// A QoS contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Contract {
    /// Period in nanoseconds.
    pub period_ns: u64,
    /// Guaranteed CPU time per period, in nanoseconds.
    pub slice_ns: u64,
    /// Whether the domain may also run in time nobody is guaranteed.
    pub extra: bool,
    /// Memory limit in bytes.
    pub memory: u64,
}

/// Why a contract is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContractError {
    /// Period zero, too short or too long.
    Period(u64),
    /// Slice zero or longer than the period.
    Slice {
        /// Slice.
        slice_ns: u64,
        /// Period.
        period_ns: u64,
    },
    /// Memory zero or beyond [`MAX_MEMORY`].
    Memory(u64),
    /// Text that is not `<slice>/<period>`.
    Syntax(alloc::string::String),
}

impl fmt::Display for ContractError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContractError::Period(p) => write!(
                f,
                "period {} must be between {} and {}",
                Ns(*p),
                Ns(MIN_PERIOD_NS),
                Ns(MAX_PERIOD_NS)
            ),
            ContractError::Slice {
                slice_ns,
                period_ns,
            } => write!(
                f,
                "slice {} must be more than zero and at most the period {}",
                Ns(*slice_ns),
                Ns(*period_ns)
            ),
            ContractError::Memory(m) => {
                write!(
                    f,
                    "memory {} must be more than zero and at most 4 GiB",
                    Bytes(*m)
                )
            }
            ContractError::Syntax(s) => write!(f, "{s}"),
        }
    }
}

impl core::error::Error for ContractError {}

impl Contract {
    /// Checks the contract's ranges.
    pub fn validate(&self) -> Result<(), ContractError> {
        if !(MIN_PERIOD_NS..=MAX_PERIOD_NS).contains(&self.period_ns) {
            return Err(ContractError::Period(self.period_ns));
        }
        if self.slice_ns == 0 || self.slice_ns > self.period_ns {
            return Err(ContractError::Slice {
                slice_ns: self.slice_ns,
                period_ns: self.period_ns,
            });
        }
        if self.memory == 0 || self.memory > MAX_MEMORY {
            return Err(ContractError::Memory(self.memory));
        }
        Ok(())
    }

    /// CPU share in parts per million (slice / period).
    pub fn share_ppm(&self) -> u64 {
        if self.period_ns == 0 {
            return 0;
        }
        ((self.slice_ns as u128 * 1_000_000) / self.period_ns as u128) as u64
    }
}

/// Formats nanoseconds as `10ms`, `1.5s`, `250us`.
#[derive(Debug, Clone, Copy)]
pub struct Ns(pub u64);

/// Bytes written in the largest binary unit that keeps them whole, or to
/// one decimal: `64MiB`, `1.5GiB`, `900GiB`, `1TiB`, `100B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        let n = self.0;
        for (unit, size) in UNITS {
            if n >= size {
                return if n.is_multiple_of(size) {
                    write!(f, "{}{unit}", n / size)
                } else {
                    write!(f, "{:.1}{unit}", n as f64 / size as f64)
                };
            }
        }
        write!(f, "{n}B")
    }
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= 1_000_000_000 && n.is_multiple_of(1_000_000_000) {
            write!(f, "{}s", n / 1_000_000_000)
        } else if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
            write!(f, "{}ms", n / 1_000_000)
        } else if n >= 1_000 && n.is_multiple_of(1_000) {
            write!(f, "{}us", n / 1_000)
        } else {
            write!(f, "{n}ns")
        }
    }
}

/// Parses `250us`, `10ms`, `2s`, `100ns`.
pub fn parse_ns(s: &str) -> Result<u64, ContractError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
        ContractError::Syntax(alloc::format!("{s:?} needs a unit: ns, us, ms or s"))
    })?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| ContractError::Syntax(alloc::format!("bad number in {s:?}")))?;
    let mult = match unit {
        "ns" => 1,
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        _ => {
            return Err(ContractError::Syntax(alloc::format!(
                "bad unit in {s:?}: use ns, us, ms or s"
            )))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| ContractError::Syntax(alloc::format!("{s:?} is too long")))
}

/// Parses the CPU part of a contract, `<slice>/<period>` (e.g. `10ms/100ms`),
/// into `(slice_ns, period_ns)`.
pub fn parse_cpu(s: &str) -> Result<(u64, u64), ContractError> {
    let (slice, period) = s.split_once('/').ok_or_else(|| {
        ContractError::Syntax(alloc::format!(
            "CPU contract {s:?} must be <slice>/<period>, e.g. 10ms/100ms"
        ))
    })?;
    Ok((parse_ns(slice)?, parse_ns(period)?))
}

impl fmt::Display for Contract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ns(self.slice_ns), Ns(self.period_ns))?;
        if self.extra {
            f.write_str("+extra")?;
        }
        write!(f, " {}MiB", self.memory >> 20)
    }
}

impl FromStr for Contract {
    type Err = ContractError;
    /// `10ms/100ms[+extra] <bytes>` is not the CLI syntax; this parses the CPU
    /// part with a default 64 MiB memory, for tests and tools.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (cpu, extra) = match s.strip_suffix("+extra") {
            Some(c) => (c, true),
            None => (s, false),
        };
        let (slice_ns, period_ns) = parse_cpu(cpu)?;
        let c = Contract {
            period_ns,
            slice_ns,
            extra,
            memory: 64 << 20,
        };
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_read_like_the_units_users_type() {
        use alloc::string::ToString;
        assert_eq!(Bytes(64 << 20).to_string(), "64MiB");
        assert_eq!(Bytes(900 << 30).to_string(), "900GiB");
        assert_eq!(Bytes(1 << 40).to_string(), "1TiB");
        assert_eq!(Bytes(3 << 29).to_string(), "1.5GiB");
        assert_eq!(Bytes(100).to_string(), "100B");
        assert_eq!(
            ContractError::Memory(900 << 30).to_string(),
            "memory 900GiB must be more than zero and at most 4 GiB"
        );
    }

    use super::*;

    #[test]
    fn parses_and_displays() {
        let c: Contract = "10ms/100ms+extra".parse().unwrap();
        assert_eq!(
            (c.slice_ns, c.period_ns, c.extra),
            (10_000_000, 100_000_000, true)
        );
        assert_eq!(c.to_string(), "10ms/100ms+extra 64MiB");
        assert_eq!(c.share_ppm(), 100_000);
        assert_eq!(parse_ns("250us").unwrap(), 250_000);
    }

    #[test]
    fn out_of_range_contracts_are_refused() {
        for bad in [
            "0ms/100ms",
            "200ms/100ms",
            "1ms/0ms",
            "1ms/20s",
            "10/100ms",
            "10ms-100ms",
            "10parsec/1s",
        ] {
            assert!(bad.parse::<Contract>().is_err(), "{bad}");
        }
        let mut c: Contract = "1ms/10ms".parse().unwrap();
        c.memory = 0;
        assert_eq!(c.validate(), Err(ContractError::Memory(0)));
        c.memory = MAX_MEMORY + 1;
        assert!(c.validate().is_err());
    }
}
