//! The hardware-independent parts of `metta-kernel`: reading the multiboot1 boot
//! information, the kernel command line and its strict configuration syntax
//! ([`bootcfg`]), the choice of heap memory ([`memory`]), timestamp arithmetic, and
//! the exit codes.
//!
//! Everything here works on byte slices and plain integers, so it builds for the
//! kernel (`x86_64-unknown-none`, `no_std`) and for the host, where the unit tests
//! run:
//!
//! ```sh
//! cargo test --target x86_64-unknown-linux-gnu --manifest-path kernel/image/Cargo.toml --lib
//! ```
//!
//! The boot path itself (entry stub, serial console, TSC) lives in the binary,
//! `src/main.rs`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]
#![forbid(unsafe_code)]

pub mod bootcfg;
pub mod cmdline;
pub mod exit;
pub mod memory;
pub mod multiboot;
pub mod time;
