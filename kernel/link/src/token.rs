//! Join tokens and CA pins, parsed without `std`.
//!
//! The same text format and the same strictness as `metta_trust::JoinToken`
//! (a host test feeds both parsers the same inputs): `metta1.<id>.<secret>.<pin>`
//! with an 8-hex-digit id, a 32-hex-digit secret and a 64-hex-digit pin, all
//! lowercase, nothing around it. Trimming whitespace (a token pasted from a
//! terminal) is the caller's decision.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;

/// The token text's version prefix.
pub const TOKEN_PREFIX: &str = "metta1";

/// Why a token text does not parse. The variants match
/// `metta_trust::TokenParseError` one for one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenParseError {
    /// It does not start with `metta1.`.
    Prefix,
    /// It does not have four dot-separated parts (the count found).
    Parts(usize),
    /// The id is not 8 lowercase hex digits.
    Id,
    /// The secret is not 32 lowercase hex digits.
    Secret,
    /// The pin is not 64 lowercase hex digits.
    Pin,
}

impl fmt::Display for TokenParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenParseError::Prefix => {
                f.write_str("not a Metta join token: it must start with \"metta1.\"")
            }
            TokenParseError::Parts(n) => write!(
                f,
                "malformed join token: expected metta1.<id>.<secret>.<pin> (4 parts separated by '.'), found {n} parts"
            ),
            TokenParseError::Id => {
                f.write_str("malformed join token: the id must be 8 lowercase hex digits")
            }
            TokenParseError::Secret => {
                f.write_str("malformed join token: the secret must be 32 lowercase hex digits")
            }
            TokenParseError::Pin => {
                f.write_str("malformed join token: the CA pin must be 64 lowercase hex digits")
            }
        }
    }
}

impl core::error::Error for TokenParseError {}

/// Decodes exactly `N` bytes from `2N` lowercase hex digits.
pub(crate) fn decode_lower_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nibble(b[2 * i])? << 4) | nibble(b[2 * i + 1])?;
    }
    Some(out)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// The fingerprint of a cluster CA certificate: blake3 of its DER. Shown and
/// parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaPin(pub [u8; 32]);

impl CaPin {
    /// The pin of the certificate `der`.
    pub fn of_der(der: &[u8]) -> CaPin {
        CaPin(*blake3::hash(der).as_bytes())
    }

    /// Whether `der` is the pinned certificate (constant-time comparison).
    pub fn matches(&self, der: &[u8]) -> bool {
        blake3::hash(der) == blake3::Hash::from_bytes(self.0)
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaPin({self})")
    }
}

impl FromStr for CaPin {
    type Err = TokenParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_lower_hex::<32>(s)
            .map(CaPin)
            .ok_or(TokenParseError::Pin)
    }
}

/// A join token. `Display` writes the full text, secret included; `Debug`
/// hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// 8 lowercase hex digits.
    pub id: String,
    /// The secret.
    pub secret: [u8; 16],
    /// The cluster CA's pin.
    pub pin: CaPin,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("pin", &self.pin)
            .finish()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_PREFIX}.{}.", self.id)?;
        write_hex(f, &self.secret)?;
        write!(f, ".{}", self.pin)
    }
}

impl FromStr for JoinToken {
    type Err = TokenParseError;
    /// Parses the exact token text (no surrounding whitespace).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('.').collect();
        if parts.first() != Some(&TOKEN_PREFIX) {
            return Err(TokenParseError::Prefix);
        }
        let [_, id, secret, pin] = parts[..] else {
            return Err(TokenParseError::Parts(parts.len()));
        };
        decode_lower_hex::<4>(id).ok_or(TokenParseError::Id)?;
        let secret = decode_lower_hex::<16>(secret).ok_or(TokenParseError::Secret)?;
        let pin = decode_lower_hex::<32>(pin).ok_or(TokenParseError::Pin)?;
        Ok(JoinToken {
            id: String::from(id),
            secret,
            pin: CaPin(pin),
        })
    }
}

impl JoinToken {
    /// What the joiner sends: `<id>.<secret hex>` (the pin stays here).
    pub fn credential(&self) -> String {
        struct Cred<'a>(&'a JoinToken);
        impl fmt::Display for Cred<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}.", self.0.id)?;
                write_hex(f, &self.0.secret)
            }
        }
        alloc::format!("{}", Cred(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "metta1.0a1b2c3d.00112233445566778899aabbccddeeff.000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn parse_display_credential() {
        let t: JoinToken = TOKEN.parse().unwrap();
        assert_eq!(t.id, "0a1b2c3d");
        assert_eq!(t.secret[15], 0xff);
        assert_eq!(t.pin.0[31], 0x1f);
        assert_eq!(t.to_string(), TOKEN);
        assert_eq!(t.credential(), "0a1b2c3d.00112233445566778899aabbccddeeff");
        let dbg = alloc::format!("{t:?}");
        assert!(!dbg.contains("00112233445566778899aabbccddeeff"));
        assert_eq!(t.pin.to_string().parse::<CaPin>().unwrap(), t.pin);
    }

    #[test]
    fn strict() {
        assert_eq!("".parse::<JoinToken>(), Err(TokenParseError::Prefix));
        assert_eq!(
            alloc::format!(" {TOKEN}").parse::<JoinToken>(),
            Err(TokenParseError::Prefix)
        );
        assert_eq!(
            alloc::format!("{TOKEN}\n").parse::<JoinToken>(),
            Err(TokenParseError::Pin)
        );
        assert_eq!(
            TOKEN.to_uppercase().parse::<JoinToken>(),
            Err(TokenParseError::Prefix)
        );
        assert_eq!(
            alloc::format!("{TOKEN}.x").parse::<JoinToken>(),
            Err(TokenParseError::Parts(5))
        );
        assert_eq!(
            TOKEN.replace("0a1b2c3d", "0A1B2C3D").parse::<JoinToken>(),
            Err(TokenParseError::Id)
        );
    }

    #[test]
    fn pin_matches_der() {
        let pin = CaPin::of_der(b"cert");
        assert!(pin.matches(b"cert"));
        assert!(!pin.matches(b"cerT"));
    }
}
