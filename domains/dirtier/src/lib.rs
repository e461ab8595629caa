//! # dirtier: dirties memory at a set rate, and proves it all survived
//!
//! A test load for snapshots and live migration. It owns a **region** of
//! `span` logical **pages of 4 KiB** (the granularity a native node's
//! page-table dirty bits have; 16 of them make one 64 KiB wasm page), grown
//! at the end of linear memory with `memory.grow`. While running, every
//! activation writes the next `rate` pages of the region, cycling through it,
//! and returns `Run::More`.
//!
//! **Pattern.** A sweep counter `gen` (u32, starting at 1) increases each time
//! the write cursor wraps to page 0. Page `p` written during sweep `g` holds,
//! as 512 little-endian u64 words, `word[i] = (p << 32 | g) ^ ((i + 1) *
//! 0x9E3779B97F4A7C15)` (wrapping). At any moment page `p` must therefore hold
//! sweep `gen` if `p < cursor`, else sweep `gen - 1` — unless the region has
//! not yet been swept once since the last `span`, in which case pages at or
//! beyond the cursor are not written yet and not checked. A page that a
//! migration failed to copy (zero, or a stale earlier sweep) fails the check.
//!
//! **`/ctl` requests** (ASCII, each answered on `reply_to`):
//!
//! | request     | effect | answer |
//! |-------------|--------|--------|
//! | `rate <n>`  | write `n` pages per activation (0 stops) | `ok` |
//! | `span <n>`  | use `n` pages, growing memory if needed; restarts the sweep at page 0 with a new `gen` | `ok`, `err nomem` (memory limit), `err bad number` (not a number, or above 262144 = 1 GiB) |
//! | `verify`    | check every written page against the pattern, 64 pages per activation (writing continues meanwhile) | when done: `ok <pages checked>` or `bad <first bad page>`; `err busy` if a verify is running; `err interrupted` if a `span` arrives first |
//! | `status`    | — | `rate <r> span <s> cursor <c> gen <g> written <w>` |
//! | other       | — | `err unknown command` |
//!
//! Cost (wasmi fuel): about 11 000 per page written, 14 000 per page
//! verified.
//!
//! It runs (returns `Run::More`) while `rate > 0 && span > 0` or a verify is
//! in progress; otherwise it is idle until the next `/ctl` message. All state
//! (settings, cursor, sweep, the region's address) is in linear memory.
//!
//! Capabilities: `channel:/ctl`, `log` (optional); a memory contract of at
//! least `span × 4 KiB` plus the initial 192 KiB.
#![no_std]

use core::arch::wasm32;
use metta_sdk::text::{Buf, Command};
use metta_sdk::{entry, log, Channel, Error, NamedChannel, Reason, Run, StateCell};

static CTL: NamedChannel = NamedChannel::new("/ctl");

/// Logical page size.
const PAGE: usize = 4096;
/// u64 words per page.
const WORDS: usize = PAGE / 8;
/// Logical pages per 64 KiB wasm page.
const PER_WASM_PAGE: u32 = 16;
/// Largest span: 1 GiB of region.
const MAX_SPAN: u32 = 1 << 18;
/// Pages checked per activation by `verify`.
const VERIFY_CHUNK: u32 = 64;

#[derive(Debug)]
struct Verify {
    /// Where to answer.
    reply: Channel,
    /// Next page to check.
    next: u32,
    /// Written pages checked so far.
    checked: u32,
}

#[derive(Debug)]
struct State {
    rate: u32,
    span: u32,
    /// Byte address of page 0 of the region (0: no region yet).
    base: usize,
    /// Pages the region has room for.
    capacity: u32,
    /// Next page to write.
    cursor: u32,
    /// Current sweep.
    gen: u32,
    /// `gen` when the current span started: `gen > epoch` means the region
    /// has been swept completely at least once.
    epoch: u32,
    verify: Option<Verify>,
}

static STATE: StateCell<State> = StateCell::new(State {
    rate: 0,
    span: 0,
    base: 0,
    capacity: 0,
    cursor: 0,
    gen: 1,
    epoch: 1,
    verify: None,
});

entry!(activate);

/// One activation: see the crate docs.
fn activate(_reason: Reason) -> Run {
    STATE.with(|s| {
        control(s);
        if s.rate > 0 && s.span > 0 {
            s.write(s.rate.min(s.span));
        }
        if s.verify.is_some() {
            s.verify_step();
        }
        Run::more_if((s.rate > 0 && s.span > 0) || s.verify.is_some())
    })
}

/// Handle `/ctl` requests.
fn control(s: &mut State) {
    for _ in 0..256 {
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
        match (cmd.verb, cmd.arg_u64().and_then(|n| u32::try_from(n).ok())) {
            (b"rate", Some(rate)) => {
                s.rate = rate;
                out.push_str("ok");
            }
            (b"span", Some(span)) if span <= MAX_SPAN => {
                if let Some(v) = s.verify.take() {
                    let _ = v.reply.send(b"err interrupted");
                }
                if s.grow_to(span) {
                    s.span = span;
                    s.cursor = 0;
                    s.gen = s.gen.wrapping_add(1);
                    s.epoch = s.gen;
                    out.push_str("ok");
                } else {
                    out.push_str("err nomem");
                }
            }
            (b"rate" | b"span", _) => {
                out.push_str("err bad number");
            }
            (b"verify", _) => {
                if s.verify.is_some() {
                    out.push_str("err busy");
                } else {
                    match CTL.reply_to() {
                        Ok(reply) => {
                            s.verify = Some(Verify {
                                reply,
                                next: 0,
                                checked: 0,
                            });
                        }
                        Err(e) => log_error("reply_to", e),
                    }
                    continue; // answered when done
                }
            }
            (b"status", _) => {
                out.push_str("rate ")
                    .push_u64(s.rate.into())
                    .push_str(" span ")
                    .push_u64(s.span.into())
                    .push_str(" cursor ")
                    .push_u64(s.cursor.into())
                    .push_str(" gen ")
                    .push_u64(s.gen.into())
                    .push_str(" written ")
                    .push_u64(s.written().into());
            }
            _ => {
                out.push_str("err unknown command");
            }
        }
        let _ = CTL.reply(out.as_bytes());
    }
}

impl State {
    /// Pages that hold the pattern.
    fn written(&self) -> u32 {
        if self.gen != self.epoch {
            self.span
        } else {
            self.cursor
        }
    }

    /// The sweep page `p` must hold, or `None` if it is not written yet.
    fn expected_gen(&self, p: u32) -> Option<u32> {
        if p < self.cursor {
            Some(self.gen)
        } else if self.gen != self.epoch {
            Some(self.gen.wrapping_sub(1))
        } else {
            None
        }
    }

    /// Make the region at least `span` pages long.
    fn grow_to(&mut self, span: u32) -> bool {
        if span <= self.capacity {
            return true;
        }
        let need = span.div_ceil(PER_WASM_PAGE) - self.capacity / PER_WASM_PAGE;
        let Some(end) = wasm32::memory_size(0).checked_mul(65536) else {
            return false; // 4 GiB already
        };
        if self.base != 0 && self.base + self.capacity as usize * PAGE != end {
            // Something else grew memory after the region: it cannot extend
            // in place. (Nothing in this domain does.)
            return false;
        }
        let old = wasm32::memory_grow(0, need as usize);
        if old == usize::MAX {
            return false;
        }
        if self.base == 0 {
            self.base = old * 65536;
        }
        self.capacity += need * PER_WASM_PAGE;
        true
    }

    /// Pointer to word 0 of page `p`.
    fn page(&self, p: u32) -> *mut u64 {
        debug_assert!(p < self.capacity);
        (self.base + p as usize * PAGE) as *mut u64
    }

    /// Write the next `n` pages (`n <= span`).
    fn write(&mut self, n: u32) {
        for _ in 0..n {
            let p = self.cursor;
            let words = self.page(p);
            for i in 0..WORDS {
                // SAFETY: `p < span <= capacity`, so the page lies inside the
                // region this domain grew with `memory.grow` and that nothing
                // else in the domain uses; `i < WORDS` stays inside the page
                // and every address is 8-byte aligned (base is 64 KiB
                // aligned).
                unsafe { words.add(i).write(pattern(p, self.gen, i)) };
            }
            self.cursor += 1;
            if self.cursor == self.span {
                self.cursor = 0;
                self.gen = self.gen.wrapping_add(1);
            }
        }
    }

    /// Check up to VERIFY_CHUNK pages; answer when done or at the first bad
    /// page.
    fn verify_step(&mut self) {
        let Some(mut v) = self.verify.take() else {
            return;
        };
        let end = self.span.min(v.next.saturating_add(VERIFY_CHUNK));
        while v.next < end {
            let p = v.next;
            if let Some(g) = self.expected_gen(p) {
                let words = self.page(p);
                for i in 0..WORDS {
                    // SAFETY: as in `write`: inside page `p` of the region.
                    if unsafe { words.add(i).read() } != pattern(p, g, i) {
                        let mut out = Buf::<24>::new();
                        out.push_str("bad ").push_u64(p.into());
                        answer(v.reply, &out);
                        return;
                    }
                }
                v.checked += 1;
            }
            v.next += 1;
        }
        if v.next >= self.span {
            let mut out = Buf::<24>::new();
            out.push_str("ok ").push_u64(v.checked.into());
            answer(v.reply, &out);
        } else {
            self.verify = Some(v);
        }
    }
}

/// Word `i` of page `p` written in sweep `g`.
fn pattern(p: u32, g: u32, i: usize) -> u64 {
    ((u64::from(p) << 32) | u64::from(g)) ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn answer(to: Channel, msg: &Buf<24>) {
    if let Err(e) = to.send(msg.as_bytes()) {
        log_error("verify answer", e);
    }
    let mut line = Buf::<48>::new();
    line.push_str("dirtier: verify ").push(msg.as_bytes());
    log(line.as_str());
}

fn log_error(what: &str, e: Error) {
    let mut line = Buf::<80>::new();
    line.push_str("dirtier: ")
        .push_str(what)
        .push_str(": ")
        .push_str(e.as_str());
    log(line.as_str());
}
