//! The node key (ECDSA P-256) and its certificate signing request.
//!
//! A native node makes its key at boot from entropy the caller supplies (the
//! kernel reads RDSEED/RDRAND): [`NodeKey::from_entropy`] hashes those bytes
//! into a scalar, so the same bytes always give the same key and nothing here
//! reads a random source. The key never leaves the node; the cluster sees its
//! public key in a PKCS#10 request ([`NodeKey::csr_pem`]), which the cluster CA
//! checks for a valid self-signature (proof of possession) and a P-256 key,
//! and otherwise ignores: the identity in the certificate is the CA's choice.
//!
//! Signatures are ECDSA P-256 with SHA-256, DER-encoded, with RFC 6979
//! deterministic nonces (signing needs no randomness).

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use const_oid::db::{rfc4519, rfc5912};
use der::asn1::{Any, BitString, SetOfVec};
use der::pem::LineEnding;
use der::{Decode, Encode, Tag};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::{Signer, SigningKey as TlsSigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use sha2::{Digest, Sha256};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::name::{RdnSequence, RelativeDistinguishedName};
use x509_cert::request::{CertReq, CertReqInfo, Version};
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use zeroize::Zeroizing;

/// The fewest entropy bytes [`NodeKey::from_entropy`] accepts.
pub const MIN_KEY_ENTROPY: usize = 32;

/// The longest common name a CSR may carry (X.520 `ub-common-name`).
pub const MAX_COMMON_NAME: usize = 64;

const KEY_CONTEXT: &[u8] = b"metta-link node key v1";

/// Why a key operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// Fewer than [`MIN_KEY_ENTROPY`] entropy bytes were supplied.
    NotEnoughEntropy {
        /// How many were supplied.
        got: usize,
    },
    /// The bytes are not a PKCS#8 ECDSA P-256 private key.
    InvalidPrivateKey,
    /// The CSR's common name is empty, too long, or has control characters.
    InvalidCommonName,
    /// DER encoding failed (cannot happen for well-formed inputs).
    Encoding,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::NotEnoughEntropy { got } => write!(
                f,
                "a node key needs at least {MIN_KEY_ENTROPY} bytes of entropy, got {got}"
            ),
            KeyError::InvalidPrivateKey => {
                f.write_str("not a PKCS#8 DER private key holding an ECDSA P-256 key")
            }
            KeyError::InvalidCommonName => write!(
                f,
                "the request's common name must be 1 to {MAX_COMMON_NAME} printable characters"
            ),
            KeyError::Encoding => f.write_str("cannot DER-encode the certificate request"),
        }
    }
}

impl core::error::Error for KeyError {}

/// A node's ECDSA P-256 private key.
///
/// `Debug` shows a fingerprint of the public key, never the secret.
#[derive(Clone)]
pub struct NodeKey {
    signing: SigningKey,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fp = blake3::hash(&self.spki_der());
        write!(f, "NodeKey(p256, public key {})", &fp.to_hex()[..16])
    }
}

impl NodeKey {
    /// Derives a key from `entropy` (at least [`MIN_KEY_ENTROPY`] bytes of
    /// real randomness: RDSEED output on the native kernel).
    ///
    /// The scalar is SHA-256 of a fixed context, a counter and the entropy;
    /// the (astronomically rare, about 2^-32) value outside `1..n` moves the
    /// counter on.
    pub fn from_entropy(entropy: &[u8]) -> Result<NodeKey, KeyError> {
        if entropy.len() < MIN_KEY_ENTROPY {
            return Err(KeyError::NotEnoughEntropy { got: entropy.len() });
        }
        for counter in 0u32..64 {
            let mut h = Sha256::new();
            h.update(KEY_CONTEXT);
            h.update(counter.to_be_bytes());
            h.update(entropy);
            let d = Zeroizing::new(h.finalize());
            if let Ok(signing) = SigningKey::from_bytes(&d) {
                return Ok(NodeKey { signing });
            }
        }
        // 64 consecutive out-of-range hashes: the entropy source is broken
        // in a way a hash cannot be (this does not happen).
        Err(KeyError::NotEnoughEntropy { got: entropy.len() })
    }

    /// Loads a key from PKCS#8 DER.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<NodeKey, KeyError> {
        SigningKey::from_pkcs8_der(der)
            .map(|signing| NodeKey { signing })
            .map_err(|_| KeyError::InvalidPrivateKey)
    }

    /// The key as PKCS#8 DER. This is the secret.
    pub fn to_pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.signing
            .to_pkcs8_der()
            .map(|d| Zeroizing::new(d.as_bytes().to_vec()))
            .map_err(|_| KeyError::Encoding)
    }

    /// The public key as SubjectPublicKeyInfo DER (uncompressed point).
    pub fn spki_der(&self) -> Vec<u8> {
        // Encoding a valid P-256 public key cannot fail.
        self.signing
            .verifying_key()
            .to_public_key_der()
            .map(|d| d.into_vec())
            .unwrap_or_default()
    }

    /// Signs `msg` (ECDSA P-256, SHA-256), returning a DER signature.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let sig: Signature = self.signing.sign(msg);
        sig.to_der().as_bytes().to_vec()
    }

    /// A PKCS#10 certificate signing request (DER) for this key, with subject
    /// `CN=<common_name>` and no attributes, signed with the key itself.
    pub fn csr_der(&self, common_name: &str) -> Result<Vec<u8>, KeyError> {
        if common_name.is_empty()
            || common_name.len() > MAX_COMMON_NAME
            || common_name.chars().any(char::is_control)
        {
            return Err(KeyError::InvalidCommonName);
        }
        let enc = |_| KeyError::Encoding;
        let cn = AttributeTypeAndValue {
            oid: rfc4519::CN,
            value: Any::new(Tag::Utf8String, common_name.as_bytes()).map_err(enc)?,
        };
        let rdn = RelativeDistinguishedName(SetOfVec::try_from(alloc::vec![cn]).map_err(enc)?);
        let info = CertReqInfo {
            version: Version::V1,
            subject: RdnSequence(alloc::vec![rdn]),
            public_key: SubjectPublicKeyInfoOwned::from_der(&self.spki_der()).map_err(enc)?,
            attributes: SetOfVec::new(),
        };
        let tbs = info.to_der().map_err(enc)?;
        let signature = BitString::from_bytes(&self.sign(&tbs)).map_err(enc)?;
        CertReq {
            info,
            algorithm: AlgorithmIdentifierOwned {
                oid: rfc5912::ECDSA_WITH_SHA_256,
                parameters: None,
            },
            signature,
        }
        .to_der()
        .map_err(enc)
    }

    /// [`csr_der`](Self::csr_der) as PEM (`CERTIFICATE REQUEST`), the form
    /// [`metta_proto::JoinRequest::csr_pem`] carries.
    pub fn csr_pem(&self, common_name: &str) -> Result<String, KeyError> {
        let der = self.csr_der(common_name)?;
        der::pem::encode_string("CERTIFICATE REQUEST", LineEnding::LF, &der)
            .map_err(|_| KeyError::Encoding)
    }

    /// The key as rustls wants it for client authentication.
    pub(crate) fn tls_key(&self) -> Arc<dyn TlsSigningKey> {
        Arc::new(TlsKey {
            signing: self.signing.clone(),
            spki: self.spki_der(),
        })
    }

    /// Loads a PKCS#8 key for rustls (the provider's key loader).
    pub(crate) fn tls_key_from_pkcs8(der: &[u8]) -> Result<Arc<dyn TlsSigningKey>, KeyError> {
        Self::from_pkcs8_der(der).map(|k| k.tls_key())
    }
}

/// A P-256 key signing TLS 1.3 handshakes (`ecdsa_secp256r1_sha256`).
struct TlsKey {
    signing: SigningKey,
    spki: Vec<u8>,
}

impl fmt::Debug for TlsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsKey(p256)")
    }
}

impl TlsSigningKey for TlsKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| {
                Box::new(TlsSigner {
                    signing: self.signing.clone(),
                }) as Box<dyn Signer>
            })
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(&self.spki[..]))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

struct TlsSigner {
    signing: SigningKey,
}

impl fmt::Debug for TlsSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsSigner(ecdsa_secp256r1_sha256)")
    }
}

impl Signer for TlsSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let sig: Signature = self.signing.sign(message);
        Ok(sig.to_der().as_bytes().to_vec())
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier;

    #[test]
    fn same_entropy_same_key_and_short_entropy_refused() {
        let a = NodeKey::from_entropy(&[1u8; 32]).unwrap();
        let b = NodeKey::from_entropy(&[1u8; 32]).unwrap();
        let c = NodeKey::from_entropy(&[2u8; 32]).unwrap();
        assert_eq!(a.spki_der(), b.spki_der());
        assert_ne!(a.spki_der(), c.spki_der());
        assert_eq!(
            NodeKey::from_entropy(&[1u8; 31]).unwrap_err(),
            KeyError::NotEnoughEntropy { got: 31 }
        );
    }

    #[test]
    fn pkcs8_roundtrip_and_signature_verifies() {
        let k = NodeKey::from_entropy(&[9u8; 48]).unwrap();
        let der = k.to_pkcs8_der().unwrap();
        let k2 = NodeKey::from_pkcs8_der(&der).unwrap();
        assert_eq!(k.spki_der(), k2.spki_der());
        let sig = Signature::from_der(&k.sign(b"hello")).unwrap();
        k2.signing.verifying_key().verify(b"hello", &sig).unwrap();
        assert_eq!(
            NodeKey::from_pkcs8_der(b"junk").unwrap_err(),
            KeyError::InvalidPrivateKey
        );
        assert!(!format!("{k:?}").contains("Signing"));
    }

    #[test]
    fn csr_rejects_bad_common_names() {
        let k = NodeKey::from_entropy(&[3u8; 32]).unwrap();
        for bad in ["", "a\nb", &"x".repeat(65)] {
            assert_eq!(k.csr_der(bad).unwrap_err(), KeyError::InvalidCommonName);
        }
        let pem = k.csr_pem("node/0").unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----\n"));
    }
}
