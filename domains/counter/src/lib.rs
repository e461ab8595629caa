//! # counter: a counter service
//!
//! Serves channel **`/svc/counter`**. Requests are ASCII text (leading and
//! trailing whitespace, e.g. a final newline, is ignored):
//!
//! | request   | effect                                   |
//! |-----------|------------------------------------------|
//! | `incr`    | count += 1                               |
//! | `add <n>` | count += n (`n` signed decimal `i64`, wrapping) |
//! | `get`     | nothing                                  |
//!
//! Every request gets exactly one answer, sent on `reply_to`: the count
//! *after* the request as signed decimal text (`42`, `-3`), or
//! `err unknown command`, `err bad number`, `err too big` (a request longer
//! than 64 bytes is dropped unread; the count is unchanged).
//!
//! State: the count is one `static` atomic in linear memory, starting at 0 —
//! it survives snapshot, restore and migration with the memory, and `Start`
//! does not reset it. A reply that cannot be sent because the client's queue
//! is full is kept (one slot) and retried first on the next activation, which
//! the domain asks for with `Run::More`; no further request is read meanwhile.
//!
//! Capabilities: `channel:/svc/counter`, `log` (optional).
#![no_std]

use core::sync::atomic::{AtomicI64, Ordering};
use metta_sdk::text::{Buf, Command};
use metta_sdk::{entry, log, Channel, Error, NamedChannel, Reason, Run, StateCell};

/// The service channel.
static SVC: NamedChannel = NamedChannel::new("/svc/counter");
/// The count.
static COUNT: AtomicI64 = AtomicI64::new(0);
/// A reply waiting for room in the client's queue.
static PENDING: StateCell<Option<(Channel, Reply)>> = StateCell::new(None);

/// Longest request read; longer ones are answered `err too big`.
const MAX_REQUEST: usize = 64;
/// Requests handled per activation before yielding with `Run::More`.
const BATCH: usize = 256;

type Reply = Buf<24>;

entry!(activate);

/// One activation: see the crate docs.
fn activate(reason: Reason) -> Run {
    if reason == Reason::Start {
        log("counter: up");
    }
    if !flush_pending() {
        return Run::More;
    }
    for _ in 0..BATCH {
        let mut req = [0u8; MAX_REQUEST];
        let reply = match SVC.recv(&mut req) {
            Ok(Some(n)) => handle(&req[..n]),
            Ok(None) => return Run::Idle,
            Err(Error::TooBig) => {
                let _ = SVC.skip();
                err("too big")
            }
            Err(e) => {
                log_error("recv", e);
                return Run::Idle;
            }
        };
        match SVC.reply_to() {
            Ok(to) => {
                if !send_reply(to, reply) {
                    return Run::More;
                }
            }
            Err(e) => log_error("reply_to", e),
        }
    }
    Run::More
}

/// Apply one request; the answer to send.
fn handle(req: &[u8]) -> Reply {
    let cmd = Command::parse(req);
    let value = match cmd.verb {
        b"incr" => add(1),
        b"get" => COUNT.load(Ordering::Relaxed),
        b"add" => match cmd.arg_i64() {
            Some(n) => add(n),
            None => return err("bad number"),
        },
        _ => return err("unknown command"),
    };
    let mut out = Reply::new();
    out.push_i64(value);
    out
}

/// count += n (wrapping); the new count.
fn add(n: i64) -> i64 {
    let v = COUNT.load(Ordering::Relaxed).wrapping_add(n);
    COUNT.store(v, Ordering::Relaxed);
    v
}

fn err(why: &str) -> Reply {
    let mut out = Reply::new();
    out.push_str("err ").push_str(why);
    out
}

/// Send `reply`; if the client's queue is full keep it for later and return
/// false.
fn send_reply(to: Channel, reply: Reply) -> bool {
    match to.send(reply.as_bytes()) {
        Ok(()) => true,
        Err(Error::Full) => {
            PENDING.with(|p| *p = Some((to, reply)));
            false
        }
        Err(e) => {
            log_error("reply", e);
            true
        }
    }
}

/// Retry the pending reply, if any; false if it is still blocked.
fn flush_pending() -> bool {
    match PENDING.with(|p| p.take()) {
        Some((to, reply)) => send_reply(to, reply),
        None => true,
    }
}

fn log_error(what: &str, e: Error) {
    let mut line = Buf::<64>::new();
    line.push_str("counter: ")
        .push_str(what)
        .push_str(": ")
        .push_str(e.as_str());
    log(line.as_str());
}
