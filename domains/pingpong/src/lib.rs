//! # pingpong: ordered message exchange between two domains
//!
//! One module, two roles. Run two instances; the role of each is chosen by
//! the first message it gets:
//!
//! - **ping**: told `start <N>` on its **`/ctl`**, it sends `ping <n>` to
//!   **`/svc/pong`** for n = 1, 2, ... (at most 16 unanswered at a time) and
//!   reads the answers on **`/svc/ping`**.
//! - **pong**: on the first `ping <n>` it reads from **`/svc/pong`** it
//!   becomes the pong side and from then on answers every `ping <n>` with
//!   `pong <n>` sent to **`/svc/ping`**.
//!
//! Until it has a role an instance reads only `/ctl` and `/svc/pong`; the ping
//! side never reads `/svc/pong` and the pong side never reads `/svc/ping`, so
//! the two instances never take each other's messages even if a name is one
//! shared queue. (Both roles open both names: the ping side sends to
//! `/svc/pong`, the pong side to `/svc/ping`.)
//!
//! Numbering is global and never restarts: a second `start <N>` sends N more
//! pings continuing from the last number. Each side checks that the numbers it
//! receives are exactly 1, 2, 3, ... with no gap or duplicate; it logs
//!
//! - `pingpong: <n> ok` whenever an in-order `n` is a multiple of 100,
//! - `pingpong: GAP expected <a> got <b>` when the number is not the expected
//!   one (it then expects `b + 1`),
//! - `pingpong: done <n>` (ping side) when every ping sent so far is answered.
//!
//! `/ctl` requests (each answered on `reply_to`):
//!
//! | request     | answer |
//! |-------------|--------|
//! | `start <N>` | `ok`, or `err pong side` / `err bad number` |
//! | `status`    | `ping sent <s> acked <a> target <t> gaps <g>`, `pong seen <n> gaps <g>`, or `idle` |
//! | other       | `err unknown command` |
//!
//! Messages on `/svc/ping` and `/svc/pong` are ASCII `ping <n>` / `pong <n>`,
//! `n` unsigned decimal. All state (role, counters) is in linear memory; a
//! message that cannot be sent because the destination queue is full is
//! retried on the next activation (the domain returns `Run::More`).
//!
//! Capabilities: `channel:/ctl`, `channel:/svc/ping`, `channel:/svc/pong`,
//! `log`.
#![no_std]

use metta_sdk::text::{parse_u64, Buf, Command};
use metta_sdk::{entry, log, Error, NamedChannel, Reason, Run, StateCell};

static CTL: NamedChannel = NamedChannel::new("/ctl");
/// Where the ping side reads answers and the pong side sends them.
static PING: NamedChannel = NamedChannel::new("/svc/ping");
/// Where the pong side reads pings and the ping side sends them.
static PONG: NamedChannel = NamedChannel::new("/svc/pong");

/// Unanswered pings the ping side allows itself.
const WINDOW: u64 = 16;
/// Messages read per channel per activation.
const BATCH: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Undecided,
    Ping,
    Pong,
}

#[derive(Debug)]
struct State {
    role: Role,
    /// Ping: the next number to send (numbers start at 1).
    next_send: u64,
    /// Ping: send up to this number, inclusive.
    target: u64,
    /// The next number expected: pongs on the ping side, pings on the pong side.
    expect: u64,
    /// Out-of-order numbers seen.
    gaps: u64,
    /// Pong: an answer not sent yet (destination full).
    unsent_pong: Option<u64>,
    /// Ping: `done` was logged for the current target.
    done_logged: bool,
}

static STATE: StateCell<State> = StateCell::new(State {
    role: Role::Undecided,
    next_send: 1,
    target: 0,
    expect: 1,
    gaps: 0,
    unsent_pong: None,
    done_logged: true,
});

entry!(activate);

/// One activation: see the crate docs.
fn activate(_reason: Reason) -> Run {
    STATE.with(|s| {
        control(s);
        match s.role {
            Role::Undecided => {
                // Only a ping can make us the pong side.
                let more = serve_pings(s);
                Run::more_if(more)
            }
            Role::Ping => {
                let more_in = read_pongs(s);
                let more_out = send_pings(s);
                Run::more_if(more_in || more_out)
            }
            Role::Pong => Run::more_if(serve_pings(s)),
        }
    })
}

/// Handle `/ctl` requests.
fn control(s: &mut State) {
    for _ in 0..BATCH {
        let mut req = [0u8; 64];
        let n = match CTL.recv(&mut req) {
            Ok(Some(n)) => n,
            Ok(None) => return,
            Err(Error::TooBig) => {
                let _ = CTL.skip();
                continue;
            }
            Err(_) => return, // no /ctl capability: fine
        };
        let mut out = Buf::<96>::new();
        let cmd = Command::parse(&req[..n]);
        match cmd.verb {
            b"start" => match (s.role, cmd.arg_u64()) {
                (Role::Pong, _) => {
                    out.push_str("err pong side");
                }
                (_, None) => {
                    out.push_str("err bad number");
                }
                (_, Some(count)) => {
                    s.role = Role::Ping;
                    s.target = s.next_send - 1 + count;
                    s.done_logged = count == 0;
                    out.push_str("ok");
                }
            },
            b"status" => match s.role {
                Role::Undecided => {
                    out.push_str("idle");
                }
                Role::Ping => {
                    out.push_str("ping sent ")
                        .push_u64(s.next_send - 1)
                        .push_str(" acked ")
                        .push_u64(s.expect - 1)
                        .push_str(" target ")
                        .push_u64(s.target)
                        .push_str(" gaps ")
                        .push_u64(s.gaps);
                }
                Role::Pong => {
                    out.push_str("pong seen ")
                        .push_u64(s.expect - 1)
                        .push_str(" gaps ")
                        .push_u64(s.gaps);
                }
            },
            _ => {
                out.push_str("err unknown command");
            }
        }
        let _ = CTL.reply(out.as_bytes());
    }
}

/// Ping side: send pings while the window allows; true if blocked on a full
/// queue (retry soon).
fn send_pings(s: &mut State) -> bool {
    while s.next_send <= s.target && s.next_send - s.expect.min(s.next_send) < WINDOW {
        let mut msg = Buf::<32>::new();
        msg.push_str("ping ").push_u64(s.next_send);
        match PONG.send(msg.as_bytes()) {
            Ok(()) => s.next_send += 1,
            Err(Error::Full) => return true,
            Err(e) => {
                log_error("send ping", e);
                return false;
            }
        }
    }
    false
}

/// Ping side: check the answers; true if more may be queued.
fn read_pongs(s: &mut State) -> bool {
    for _ in 0..BATCH {
        let mut msg = [0u8; 32];
        match PING.recv(&mut msg) {
            Ok(Some(n)) => match number(&msg[..n], b"pong") {
                Some(k) => {
                    check(s, k);
                    if s.expect > s.target && s.next_send > s.target && !s.done_logged {
                        s.done_logged = true;
                        let mut line = Buf::<48>::new();
                        line.push_str("pingpong: done ").push_u64(s.target);
                        log(line.as_str());
                    }
                }
                None => log("pingpong: bad message on /svc/ping"),
            },
            Ok(None) => return false,
            Err(Error::TooBig) => {
                let _ = PING.skip();
                log("pingpong: bad message on /svc/ping");
            }
            Err(e) => {
                log_error("recv /svc/ping", e);
                return false;
            }
        }
    }
    true
}

/// Pong side (or undecided): answer pings; true if more work is left.
fn serve_pings(s: &mut State) -> bool {
    if let Some(k) = s.unsent_pong {
        if !send_pong(s, k) {
            return true;
        }
    }
    for _ in 0..BATCH {
        let mut msg = [0u8; 32];
        match PONG.recv(&mut msg) {
            Ok(Some(n)) => match number(&msg[..n], b"ping") {
                Some(k) => {
                    s.role = Role::Pong;
                    check(s, k);
                    if !send_pong(s, k) {
                        return true;
                    }
                }
                None => log("pingpong: bad message on /svc/pong"),
            },
            Ok(None) => return false,
            Err(Error::TooBig) => {
                let _ = PONG.skip();
                log("pingpong: bad message on /svc/pong");
            }
            Err(e) => {
                // An undecided instance without access to /svc/pong is
                // simply a future ping side.
                if s.role == Role::Pong {
                    log_error("recv /svc/pong", e);
                }
                return false;
            }
        }
    }
    true
}

/// Send `pong <k>`; on a full queue keep it for later and return false.
fn send_pong(s: &mut State, k: u64) -> bool {
    let mut msg = Buf::<32>::new();
    msg.push_str("pong ").push_u64(k);
    match PING.send(msg.as_bytes()) {
        Ok(()) => {
            s.unsent_pong = None;
            true
        }
        Err(Error::Full) => {
            s.unsent_pong = Some(k);
            false
        }
        Err(e) => {
            log_error("send pong", e);
            s.unsent_pong = None;
            true
        }
    }
}

/// Record number `k` against the expected one and log progress or a gap.
fn check(s: &mut State, k: u64) {
    let mut line = Buf::<80>::new();
    if k == s.expect {
        if k.is_multiple_of(100) {
            line.push_str("pingpong: ").push_u64(k).push_str(" ok");
            log(line.as_str());
        }
    } else {
        s.gaps += 1;
        line.push_str("pingpong: GAP expected ")
            .push_u64(s.expect)
            .push_str(" got ")
            .push_u64(k);
        log(line.as_str());
    }
    s.expect = k.saturating_add(1);
}

/// `<word> <n>` → `n`.
fn number(msg: &[u8], word: &[u8]) -> Option<u64> {
    let cmd = Command::parse(msg);
    if cmd.verb == word {
        parse_u64(cmd.arg)
    } else {
        None
    }
}

fn log_error(what: &str, e: Error) {
    let mut line = Buf::<80>::new();
    line.push_str("pingpong: ")
        .push_str(what)
        .push_str(": ")
        .push_str(e.as_str());
    log(line.as_str());
}
