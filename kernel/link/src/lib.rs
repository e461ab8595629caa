//! The native node's link to the Metta control plane.
//!
//! A PXE-booted `metta-kernel` cannot speak QUIC (quinn-proto has no `no_std`
//! mode), so it reaches the control plane over **TLS 1.3 on TCP**, on the same
//! `host:port` as the QUIC listener, with the same certificates, the same
//! ALPN (`metta/1`) and the same length-prefixed postcard frames
//! ([`metta_proto::frame`]), one request and one response at a time. This
//! crate is everything of that link except the TCP socket and the clock:
//!
//! - [`NodeKey`]: the node's ECDSA P-256 key, derived from entropy the caller
//!   supplies (RDSEED at boot), and its PKCS#10 CSR;
//! - [`JoinToken`] / [`CaPin`]: the join token, parsed as strictly as
//!   `metta-trust` does;
//! - [`Session`]: a TLS client session over rustls's *unbuffered* API with
//!   a RustCrypto [`provider()`]; the caller feeds it received bytes and
//!   takes bytes to send, and exchanges [`metta_proto::Request`] /
//!   [`metta_proto::Response`] frames on top;
//! - [`ServerTrust`]: how the server is authenticated — *pinned* to the CA in
//!   the join token (joining) or to the cluster CA (a member) — with the
//!   Metta certificate rules of [`cert`];
//! - [`join_request`] / [`interpret_join`] / [`heartbeat_request`] /
//!   [`interpret_ack`] / [`renew_request`] / [`interpret_renew`]: the
//!   requests a native node makes (its `Request::Sync` is built by the
//!   kernel from `metta-proto` types).
//!
//! # Design
//!
//! **Sans-IO.** Nothing here opens a socket, reads a clock or a random
//! source. The caller passes `now` (unix seconds, from the RTC) to
//! [`Session::new`] / [`Session::set_time`], and entropy to
//! [`NodeKey::from_entropy`] and [`Session::new`]. Host tests therefore run
//! real handshakes against a real rustls server through in-memory pipes.
//!
//! **One process-wide random pool.** rustls takes its random source as a
//! `&'static` object, so [`rng`] is a single ChaCha20 generator with fast key
//! erasure, seeded and re-seeded only by the caller ([`rng::add_entropy`];
//! every [`Session::new`] mixes in its 32 bytes). Before the first 32-byte
//! seed it refuses to produce output and handshakes fail with
//! [`LinkError::NoEntropy`].
//!
//! **What the provider holds.** Only what interoperates with `mettad` (rustls +
//! ring, TLS 1.3 only): TLS13_CHACHA20_POLY1305_SHA256 and
//! TLS13_AES_128_GCM_SHA256; X25519 and secp256r1; ECDSA P-256/SHA-256
//! signatures (Metta keys are all P-256); PKCS#8 P-256 client keys.
//!
//! **Errors say what happened.** The verifier records *why* it refused a
//! server on the side (rustls only carries a generic certificate error), so
//! a failed join reports [`LinkError::PinMismatch`] or
//! [`LinkError::CertificateRejected`] with the Metta reason; a server that
//! refuses us shows as [`LinkError::ServerAlert`]; garbage from the network
//! as [`LinkError::HandshakeFailed`], [`LinkError::Tls`] or
//! [`LinkError::BadFrame`], never as a panic (a property test feeds random
//! bytes). Errors are sticky: a failed session stays failed.
//!
//! **No session resumption.** Every connection is a full handshake, so both
//! sides re-check certificates (expiry, revocation on the server) each time,
//! as between hosted nodes.
//!
//! # Building for the bare target
//!
//! `ring` does not build for `x86_64-unknown-none`; the RustCrypto crates do,
//! once their SIMD code is switched off (the target is soft-float, without
//! SSE: LLVM fails with "Do not know how to split the result of this
//! operator!" on vector code). `sha2` (`force-soft`) and `blake3` (`pure`)
//! get that through target-specific features in this crate's `Cargo.toml`;
//! the others only through `--cfg` flags, all five of which are needed (each
//! one left out fails the build: in `curve25519-dalek`, `aes`, `polyval`,
//! `poly1305`, and for `chacha20` in this crate, where its generic code is
//! instantiated). From the workspace root, on the stable toolchain (the same
//! command is `kernel/link/check-bare.sh`):
//!
//! ```text
//! RUSTFLAGS='--cfg curve25519_dalek_backend="serial" --cfg aes_force_soft --cfg polyval_force_soft --cfg poly1305_force_soft --cfg chacha20_force_soft' \
//!     cargo build -p metta-link --target x86_64-unknown-none
//! ```
//!
//! The kernel image (its own workspace) must pass the same flags when it
//! depends on this crate.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod cert;
mod error;
pub mod join;
pub mod key;
mod provider;
pub mod rng;
pub mod session;
pub mod token;
mod verify;

pub use cert::{CertProblem, LeafInfo};
pub use error::LinkError;
pub use join::{
    heartbeat_request, interpret_ack, interpret_join, interpret_renew, join_request, renew_request,
    AckError, JoinError, Joined,
};
pub use key::{KeyError, NodeKey};
pub use provider::provider;
pub use session::{ClientIdentity, LinkConfig, Phase, Session};
pub use token::{CaPin, JoinToken, TokenParseError};
pub use verify::ServerTrust;
