//! Join tokens.
//!
//! A token is written `metta1.<id>.<secret>.<pin>`: an 8-hex-digit id, a 128-bit
//! secret (32 hex digits) and the cluster CA's [`CaPin`] (64 hex digits). The
//! joining machine uses the pin to authenticate the cluster
//! ([`crate::verifier::PinnedServerVerifier`]) and sends only the
//! [`credential`](JoinToken::credential) `<id>.<secret>`; the registry stores a
//! [`TokenRecord`] with a hash of the secret, never the secret itself, and admits
//! the joiner if [`check_token`] passes.

use core::fmt;
use core::str::FromStr;

use metta_proto::{Role, Subject, TokenRejection};
use serde::{Deserialize, Serialize};

use crate::ca::{decode_lower_hex, CaPin};
use crate::UnixTime;

/// The token text's version prefix.
pub const TOKEN_PREFIX: &str = "metta1";

/// The blake3 key-derivation context for stored secret hashes.
const SECRET_HASH_CONTEXT: &str = "metta join-token secret v1";

/// Why a token text does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenParseError {
    /// It does not start with `metta1.`.
    #[error("not a Metta join token: it must start with \"metta1.\"")]
    Prefix,
    /// It does not have the four dot-separated parts.
    #[error("malformed join token: expected metta1.<id>.<secret>.<pin> (4 parts separated by '.'), found {0} parts")]
    Parts(usize),
    /// The id is not 8 lowercase hex digits.
    #[error("malformed join token: the id must be 8 lowercase hex digits")]
    Id,
    /// The secret is not 32 lowercase hex digits.
    #[error("malformed join token: the secret must be 32 lowercase hex digits")]
    Secret,
    /// The pin is not 64 lowercase hex digits.
    #[error("malformed join token: the CA pin must be 64 lowercase hex digits")]
    Pin,
}

/// A join token as handed to an operator.
///
/// `Display` writes the full token text, secret included; `Debug` hides the
/// secret.
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
        write!(
            f,
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.id,
            hex::encode(self.secret),
            self.pin
        )
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
            id: id.to_string(),
            secret,
            pin: CaPin(pin),
        })
    }
}

impl JoinToken {
    /// A fresh token for the cluster whose CA has `pin`.
    pub fn generate<R: rand::CryptoRng + ?Sized>(rng: &mut R, pin: CaPin) -> JoinToken {
        let mut id = [0u8; 4];
        rng.fill_bytes(&mut id);
        let mut secret = [0u8; 16];
        rng.fill_bytes(&mut secret);
        JoinToken {
            id: hex::encode(id),
            secret,
            pin,
        }
    }

    /// What the joiner sends: `<id>.<secret hex>` (the pin stays with it).
    pub fn credential(&self) -> String {
        format!("{}.{}", self.id, hex::encode(self.secret))
    }

    /// The registry record for this token.
    pub fn record(
        &self,
        role: Role,
        expires_at: UnixTime,
        uses: u32,
        created_by: Subject,
    ) -> TokenRecord {
        TokenRecord {
            id: self.id.clone(),
            secret_hash: secret_hash(&self.secret),
            role,
            expires_at,
            uses_left: uses,
            revoked: false,
            created_by,
        }
    }
}

/// Parses a credential `<id>.<secret hex>` as sent in a join request.
pub fn parse_credential(s: &str) -> Result<(String, [u8; 16]), TokenRejection> {
    let (id, secret) = s.split_once('.').ok_or(TokenRejection::Malformed)?;
    decode_lower_hex::<4>(id).ok_or(TokenRejection::Malformed)?;
    let secret = decode_lower_hex::<16>(secret).ok_or(TokenRejection::Malformed)?;
    Ok((id.to_string(), secret))
}

/// The hash of a token secret as stored in the registry (blake3 key derivation
/// with a Metta-specific context).
pub fn secret_hash(secret: &[u8; 16]) -> [u8; 32] {
    blake3::derive_key(SECRET_HASH_CONTEXT, secret)
}

/// A token as the registry stores it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    /// Id.
    pub id: String,
    /// [`secret_hash`] of the secret.
    pub secret_hash: [u8; 32],
    /// Role granted to whoever joins with it.
    pub role: Role,
    /// Expiry (unix seconds): void from this instant on.
    pub expires_at: UnixTime,
    /// Joins left.
    pub uses_left: u32,
    /// Revoked by an operator.
    pub revoked: bool,
    /// Who created it.
    pub created_by: Subject,
}

/// Checks a presented secret against the record found under the token's id.
///
/// In order: unknown (no record, or the secret does not match — compared in
/// constant time), revoked, expired (`now >= expires_at`), used up. The caller
/// decrements `uses_left` when it admits the joiner.
pub fn check_token(
    rec: Option<&TokenRecord>,
    secret: &[u8; 16],
    now: UnixTime,
) -> Result<(), TokenRejection> {
    check_token_hash(rec, &secret_hash(secret), now)
}

/// [`check_token`] given the secret's hash rather than the secret: what the
/// registry runs at apply time, so the replicated log never carries secrets.
pub fn check_token_hash(
    rec: Option<&TokenRecord>,
    presented_hash: &[u8; 32],
    now: UnixTime,
) -> Result<(), TokenRejection> {
    let rec = rec.ok_or(TokenRejection::Unknown)?;
    // blake3::Hash equality is constant-time.
    if blake3::Hash::from_bytes(*presented_hash) != blake3::Hash::from_bytes(rec.secret_hash) {
        return Err(TokenRejection::Unknown);
    }
    if rec.revoked {
        return Err(TokenRejection::Revoked);
    }
    if now >= rec.expires_at {
        return Err(TokenRejection::Expired);
    }
    if rec.uses_left == 0 {
        return Err(TokenRejection::Used);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn token() -> JoinToken {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        JoinToken::generate(&mut rng, CaPin([0xab; 32]))
    }

    #[test]
    fn display_parse_roundtrip() {
        let t = token();
        let s = t.to_string();
        assert!(s.starts_with("metta1."));
        assert_eq!(s.len(), 7 + 8 + 1 + 32 + 1 + 64);
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(&hex::encode(t.secret)));
        assert_eq!(t.id.len(), 8);
    }

    #[test]
    fn parse_errors() {
        let s = token().to_string();
        let parts: Vec<&str> = s.split('.').collect();
        let with = |i: usize, v: &str| {
            let mut p = parts.clone();
            p[i] = v;
            p.join(".")
        };
        assert_eq!(
            with(0, "metta2").parse::<JoinToken>(),
            Err(TokenParseError::Prefix)
        );
        assert_eq!("".parse::<JoinToken>(), Err(TokenParseError::Prefix));
        assert_eq!(
            format!("{s}.x").parse::<JoinToken>(),
            Err(TokenParseError::Parts(5))
        );
        assert_eq!(
            "metta1.abcdef01".parse::<JoinToken>(),
            Err(TokenParseError::Parts(2))
        );
        assert_eq!(
            with(1, "abc").parse::<JoinToken>(),
            Err(TokenParseError::Id)
        );
        assert_eq!(
            with(1, "ABCDEF01").parse::<JoinToken>(),
            Err(TokenParseError::Id)
        );
        assert_eq!(
            with(2, &"0".repeat(31)).parse::<JoinToken>(),
            Err(TokenParseError::Secret)
        );
        assert_eq!(
            with(2, &"z".repeat(32)).parse::<JoinToken>(),
            Err(TokenParseError::Secret)
        );
        assert_eq!(
            with(3, &"A".repeat(64)).parse::<JoinToken>(),
            Err(TokenParseError::Pin)
        );
        assert_eq!(
            format!(" {s}").parse::<JoinToken>(),
            Err(TokenParseError::Prefix)
        );
        assert_eq!(
            format!("{s}\n").parse::<JoinToken>(),
            Err(TokenParseError::Pin)
        );
    }

    #[test]
    fn credential_roundtrip() {
        let t = token();
        let c = t.credential();
        assert!(!c.contains(&t.pin.to_string()));
        assert_eq!(parse_credential(&c).unwrap(), (t.id.clone(), t.secret));
        for bad in [
            "",
            "abc",
            "abcdef01",
            "abcdef01.zz",
            &format!("{c}.x"),
            &c.to_uppercase(),
        ] {
            assert_eq!(
                parse_credential(bad),
                Err(TokenRejection::Malformed),
                "{bad}"
            );
        }
    }

    fn rec() -> (JoinToken, TokenRecord) {
        let t = token();
        let r = t.record(Role::Worker, 1000, 1, Subject::User("admin".into()));
        (t, r)
    }

    #[test]
    fn accepts_valid() {
        let (t, r) = rec();
        assert_eq!(check_token(Some(&r), &t.secret, 999), Ok(()));
    }

    #[test]
    fn rejects_unknown() {
        let (t, r) = rec();
        assert_eq!(
            check_token(None, &t.secret, 0),
            Err(TokenRejection::Unknown)
        );
        let mut wrong = t.secret;
        wrong[0] ^= 1;
        assert_eq!(
            check_token(Some(&r), &wrong, 0),
            Err(TokenRejection::Unknown)
        );
        // a wrong secret says "unknown" even when the token is also revoked etc.
        let r2 = TokenRecord {
            revoked: true,
            uses_left: 0,
            ..r
        };
        assert_eq!(
            check_token(Some(&r2), &wrong, 5000),
            Err(TokenRejection::Unknown)
        );
    }

    #[test]
    fn rejects_revoked() {
        let (t, r) = rec();
        let r = TokenRecord {
            revoked: true,
            uses_left: 0,
            ..r
        };
        assert_eq!(
            check_token(Some(&r), &t.secret, 5000),
            Err(TokenRejection::Revoked)
        );
    }

    #[test]
    fn rejects_expired() {
        let (t, r) = rec();
        let r = TokenRecord { uses_left: 0, ..r };
        assert_eq!(
            check_token(Some(&r), &t.secret, 1000),
            Err(TokenRejection::Expired)
        );
    }

    #[test]
    fn rejects_used() {
        let (t, r) = rec();
        let r = TokenRecord { uses_left: 0, ..r };
        assert_eq!(
            check_token(Some(&r), &t.secret, 999),
            Err(TokenRejection::Used)
        );
    }

    #[test]
    fn secret_hash_is_not_plain_blake3() {
        let s = [1u8; 16];
        assert_ne!(secret_hash(&s), *blake3::hash(&s).as_bytes());
    }
}
