#!/usr/bin/env bash
# Builds metta-link for the bare-metal target (x86_64-unknown-none) on the
# stable toolchain of rust-toolchain.toml, as the native kernel will.
#
# The target is soft-float without SSE, so no crate may compile SIMD code:
#   - sha2 and blake3 get that from target-specific features in Cargo.toml
#     (`force-soft`, `pure`);
#   - aes, polyval (AES-GCM), poly1305, chacha20 and curve25519-dalek from the
#     cfgs below (their portable backends).
# All five cfgs are needed: leaving any one out fails the build (LLVM: "Do not
# know how to split the result of this operator!"). The kernel image must pass
# the same RUSTFLAGS when it depends on this crate.
#
#   kernel/link/check-bare.sh            debug build
#   kernel/link/check-bare.sh --release  release build
set -euo pipefail
cd "$(dirname "$0")/../.."
export RUSTFLAGS='--cfg curve25519_dalek_backend="serial" --cfg aes_force_soft --cfg polyval_force_soft --cfg poly1305_force_soft --cfg chacha20_force_soft'
exec cargo build -p metta-link --target x86_64-unknown-none "$@"
