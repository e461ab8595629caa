//! # spin: a greedy CPU load
//!
//! Burns CPU doing integer arithmetic (an xorshift64 step per iteration) and
//! counts the iterations in linear memory. Two modes, chosen on `/ctl`:
//!
//! - **chunked** (the default, `chunk <n>` with n > 0, initially 100 000):
//!   every activation runs `n` iterations and returns `Run::More` — always
//!   runnable, so it takes every cycle the scheduler will give it, yet it
//!   stops at activation boundaries where it can be snapshotted or migrated.
//!   One iteration costs about 34 units of wasmi fuel, so the default chunk is
//!   about 3.4 million.
//! - **forever** (`chunk 0`): the next activation loops and never returns on
//!   its own; only the nucleus's fuel metering preempts it. The counters are
//!   updated in memory on every iteration, so progress stays observable. On a
//!   nucleus that *resumes* a preempted activation (the wasmi nucleus does),
//!   that activation never ends: the domain reads no more `/ctl` messages and
//!   cannot be snapshotted or migrated (there is always a wasm stack). On one
//!   that aborts it instead, the next activation starts afresh and reads
//!   `/ctl` first.
//!
//! **`/ctl` requests** (ASCII, each answered on `reply_to`):
//!
//! | request     | effect | answer |
//! |-------------|--------|--------|
//! | `chunk <n>` | iterations per activation, 0 = forever | `ok` / `err bad number` |
//! | `stop`      | stop spinning (idle until the next `/ctl` message) | `ok` |
//! | `go`        | spin again | `ok` |
//! | `get`       | — | `iters <total iterations> activations <count> chunk <n>` |
//! | other       | — | `err unknown command` |
//!
//! The `/ctl` channel is optional: without the capability it just spins.
//! Capabilities: `channel:/ctl` (optional).
#![no_std]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use metta_sdk::text::{Buf, Command};
use metta_sdk::{entry, Error, NamedChannel, Reason, Run};

static CTL: NamedChannel = NamedChannel::new("/ctl");

/// Iterations done, ever.
static ITERS: AtomicU64 = AtomicU64::new(0);
/// Activations, ever.
static ACTIVATIONS: AtomicU64 = AtomicU64::new(0);
/// The xorshift state.
static X: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
/// Iterations per activation; 0 = never return.
static CHUNK: AtomicU64 = AtomicU64::new(100_000);
static STOPPED: AtomicBool = AtomicBool::new(false);

entry!(activate);

/// One activation: see the crate docs.
fn activate(_reason: Reason) -> Run {
    ACTIVATIONS.store(ACTIVATIONS.load(Relaxed) + 1, Relaxed);
    control();
    if STOPPED.load(Relaxed) {
        return Run::Idle;
    }
    match CHUNK.load(Relaxed) {
        0 => loop {
            step();
        },
        n => {
            for _ in 0..n {
                step();
            }
            Run::More
        }
    }
}

/// One iteration: an xorshift64 step and the counter, both in memory.
#[inline(always)]
fn step() {
    let mut x = X.load(Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    X.store(x, Relaxed);
    ITERS.store(ITERS.load(Relaxed) + 1, Relaxed);
}

/// Handle `/ctl` requests.
fn control() {
    for _ in 0..64 {
        let mut req = [0u8; 64];
        let n = match CTL.recv(&mut req) {
            Ok(Some(n)) => n,
            Ok(None) => return,
            Err(Error::TooBig) => {
                let _ = CTL.skip();
                let _ = CTL.reply(b"err too big");
                continue;
            }
            Err(_) => return,
        };
        let mut out = Buf::<96>::new();
        let cmd = Command::parse(&req[..n]);
        match cmd.verb {
            b"chunk" => match cmd.arg_u64() {
                Some(c) => {
                    CHUNK.store(c, Relaxed);
                    out.push_str("ok");
                }
                None => {
                    out.push_str("err bad number");
                }
            },
            b"stop" | b"go" => {
                STOPPED.store(cmd.verb == b"stop", Relaxed);
                out.push_str("ok");
            }
            b"get" => {
                out.push_str("iters ")
                    .push_u64(ITERS.load(Relaxed))
                    .push_str(" activations ")
                    .push_u64(ACTIVATIONS.load(Relaxed))
                    .push_str(" chunk ")
                    .push_u64(CHUNK.load(Relaxed));
            }
            _ => {
                out.push_str("err unknown command");
            }
        }
        let _ = CTL.reply(out.as_bytes());
    }
}
