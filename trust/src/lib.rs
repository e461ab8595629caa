//! Metta trust: who may talk to a cluster, and what they may do there.
//!
//! Every Metta cluster has one **cluster CA** ([`ca::ClusterCa`]): a self-signed
//! ECDSA P-256 certificate whose URI SAN `metta://<cluster>/ca` names the cluster.
//! Control nodes hold its key and sign **node and user certificates** for keys the
//! holders generated themselves ([`keys::NodeKey`], [`keys::make_csr`]). An issued
//! certificate carries exactly one identity, the URI SAN
//! `metta://<cluster>/node/<id>` or `metta://<cluster>/user/<name>`, whatever the
//! request asked for.
//!
//! Connections are mutual TLS. [`verifier`] plugs into rustls: the chain is checked
//! against the cluster CA by webpki, then [`cert::check_cert`] enforces the Metta
//! rules (right cluster, validity window, key purpose, not revoked). A machine that
//! is not yet a member connects without a certificate and may only join, using a
//! **join token** ([`token::JoinToken`]) that also carries the CA's [`ca::CaPin`]
//! so the joiner can authenticate the cluster before it trusts anything it is told
//! ([`verifier::PinnedServerVerifier`]).
//!
//! What an authenticated subject may do is decided by **grants** ([`grants`]):
//! signed capabilities chained from the cluster admin, each link only narrowing
//! rights, resources and lifetime.
//!
//! What a domain's *code* may do is decided by **code authority** ([`image`]):
//! a vendor signs a manifest naming the module's hash and the capabilities the
//! code may use; a domain runs with the intersection of that and what the
//! launching user holds.
//!
//! # Design rules
//!
//! - **Pure logic.** Nothing here does I/O or reads the clock: time comes in as
//!   [`UnixTime`] seconds, randomness through a caller's RNG (key generation uses
//!   the system RNG of `ring`). The rustls verifiers use the time rustls passes in.
//! - **One error type per area**, every variant with a message a user can act on:
//!   [`keys::KeyError`], [`ca::CaError`], [`cert::CertError`],
//!   [`verifier::VerifierError`], [`token::TokenParseError`],
//!   [`grants::GrantError`], [`grants::Denied`], [`image::ImageError`].
//! - **ECDSA P-256 everywhere**, signatures DER-encoded, public keys as
//!   SubjectPublicKeyInfo DER.
//! - No `unsafe`, no panics on untrusted input.
//!
//! Module map:
//! - [`keys`]: node/user keys, raw signatures, CSRs;
//! - [`ca`]: the cluster CA, certificate issuance, CA pins;
//! - [`cert`]: post-chain certificate checks and the revocation list;
//! - [`verifier`]: rustls client/server certificate verifiers;
//! - [`token`]: join tokens and their registry records;
//! - [`grants`]: grant signing, chain verification and authorization;
//! - [`image`]: signed domain images, trusted vendors, domain capabilities.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod ca;
pub mod cert;
pub mod grants;
pub mod image;
pub mod keys;
pub mod token;
pub mod verifier;

pub use ca::{ca_cluster_name, csr_public_key, CaError, CaPin, ClusterCa, IssuedCert};
pub use cert::{check_cert, parse_cert, CertError, CertInfo, Purpose, RevocationList};
pub use grants::{authorize, grant_id, sign_grant, verify_grant, Denied, GrantError, GrantView};
pub use image::{
    effective_caps, sign_manifest, user_caps, verify_image, ImageError, VendorSet, VerifiedImage,
};
pub use keys::{make_csr, verify_signature, KeyError, NodeKey};
pub use token::{check_token, check_token_hash, JoinToken, TokenParseError, TokenRecord};
pub use verifier::{
    cert_error, describe_tls_error, ClusterClientVerifier, ClusterServerVerifier,
    PinnedServerVerifier, SharedRevocations, VerifierError,
};

/// Seconds since the Unix epoch. Every check takes the current time as an
/// argument; nothing in this crate reads the clock.
pub type UnixTime = u64;

/// Clock skew tolerated when issuing certificates: `not_before` is set this many
/// seconds before the issuing node's `now`.
pub const CLOCK_SKEW_SECS: u64 = 300;
