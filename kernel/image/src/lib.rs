//! The hardware-independent parts of `metta-kernel`: reading the multiboot1 boot
//! information, the kernel command line and its strict configuration syntax
//! ([`bootcfg`]: also the join keys `metta.ctl`, `metta.token` with its
//! secret kept off the console, `metta.name`, `metta.heartbeats`), the choice
//! of heap memory ([`memory`]), timestamp and timer
//! arithmetic ([`time`]), the interrupt frame and exception reports
//! ([`exception`]), the RTC's calendar to Unix time ([`rtc`]), the retry policy
//! of the CPU's random-number instructions ([`hwrand`]), the exit codes,
//! page-table arithmetic for 4 KiB pages, guard pages and dirty-page tracking
//! ([`paging`]), and the native driver of the nucleus without its clock
//! ([`driver`]: routing, per-period accounting, fuel-rate tracking; with
//! [`stats`] for medians, percentiles and calibration arithmetic), the
//! test domains embedded in the image ([`testdomains`]), and the policy of
//! the link to the control plane ([`linkpolicy`]: backoff, which
//! failures are retried and which end the boot with which exit code, when
//! to renew the certificate), the domains the control plane places on the
//! node and what goes to and from it in each sync ([`node`]), and the
//! kernel's memory footprint ([`memory::Footprint`]).
//!
//! Everything here works on byte slices and plain integers, so it builds for the
//! kernel (`x86_64-unknown-none`, `no_std`) and for the host, where the unit tests
//! run:
//!
//! ```sh
//! cargo test --target x86_64-unknown-linux-gnu --manifest-path kernel/image/Cargo.toml --lib
//! ```
//!
//! The boot path itself (entry stub, serial console, TSC, interrupts, timer, and
//! the port and register accesses behind the RTC and entropy) lives in the
//! binary, `src/main.rs`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod bootcfg;
pub mod cmdline;
pub mod driver;
pub mod exception;
pub mod exit;
pub mod hwrand;
pub mod linkpolicy;
pub mod memory;
pub mod multiboot;
pub mod node;
pub mod paging;
pub mod rtc;
pub mod stats;
pub mod testdomains;
pub mod time;
