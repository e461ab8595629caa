//! The host side of ABI v1: per-domain state the host functions work on, and
//! the functions themselves.
//!
//! Every pointer/length pair is checked against the domain's memory before
//! use ([`abi::ERR_FAULT`] otherwise — never a panic, never a trap of the
//! node). Copies are charged to the domain's fuel at wasmi's own rate for
//! `memory.copy` (64 bytes per unit), so a domain cannot hide work in host
//! calls. No host function returns an error to wasmi: the ABI reports
//! everything through return values.

use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::ops::Range;

use metta_proto::abi;
use wasmi::{Caller, Linker, Memory, StoreLimits};

use crate::types::{Caps, DomainId, LogLine, LogOrigin, Message, Outgoing, ReplyToken, Stats};

/// Channel handles a domain may hold at once.
pub const MAX_CHANNELS: usize = 256;
/// Longest channel name, bytes.
pub const MAX_NAME: usize = 256;
/// Messages one domain may have waiting in its outbox ([`abi::ERR_FULL`]
/// beyond).
pub const MAX_OUTBOX: usize = abi::INBOX_DEPTH;
/// Bytes one domain may have waiting in its outbox.
pub const MAX_OUTBOX_BYTES: usize = 4 << 20;
/// Log lines kept per domain before the oldest are dropped.
pub const MAX_LOG_LINES: usize = 1024;
/// Longest log line kept, bytes (longer lines are truncated).
pub const MAX_LOG_LINE: usize = 4096;
/// Bytes copied per unit of fuel (wasmi's `memory.copy` rate).
const BYTES_PER_FUEL: u64 = 64;

/// One entry of a domain's channel table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Channel {
    pub name: String,
    /// `Some`: a single-use reply handle answering this token.
    pub reply: Option<ReplyToken>,
    /// Token of the last message received on this handle.
    pub last_reply: Option<ReplyToken>,
}

/// Everything the host functions of one domain touch.
#[derive(Debug)]
pub(crate) struct HostState {
    pub id: DomainId,
    pub caps: Caps,
    pub memory: Option<Memory>,
    pub limits: StoreLimits,
    /// The `now` of the current activation (never decreases).
    pub now: u64,
    pub inbox: VecDeque<Message>,
    pub channels: Vec<Option<Channel>>,
    pub outbox: Vec<Outgoing>,
    pub outbox_bytes: usize,
    pub logs: VecDeque<LogLine>,
    pub timer: Option<u64>,
    pub stats: Stats,
}

impl HostState {
    pub fn new(id: DomainId, caps: Caps, limits: StoreLimits) -> HostState {
        HostState {
            id,
            caps,
            memory: None,
            limits,
            now: 0,
            inbox: VecDeque::new(),
            channels: Vec::new(),
            outbox: Vec::new(),
            outbox_bytes: 0,
            logs: VecDeque::new(),
            timer: None,
            stats: Stats::default(),
        }
    }

    /// Appends a log line, dropping the oldest when full.
    pub fn log(&mut self, origin: LogOrigin, mut text: String) {
        if text.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        if self.logs.len() >= MAX_LOG_LINES {
            self.logs.pop_front();
            self.stats.logs_dropped += 1;
        }
        self.logs.push_back(LogLine {
            domain: self.id,
            at_ns: self.now,
            origin,
            text,
        });
    }

    fn deny(&mut self, what: String) -> i32 {
        self.stats.denials += 1;
        self.log(LogOrigin::Nucleus, alloc::format!("denied: {what}"));
        abi::ERR_DENIED
    }

    fn fault(&mut self, call: &str) -> i32 {
        self.stats.faults += 1;
        self.log(
            LogOrigin::Nucleus,
            alloc::format!("fault: {call}: pointer outside memory"),
        );
        abi::ERR_FAULT
    }

    fn channel(&self, handle: i32) -> Option<&Channel> {
        usize::try_from(handle)
            .ok()
            .and_then(|h| self.channels.get(h))
            .and_then(Option::as_ref)
    }

    fn alloc_handle(&mut self, ch: Channel) -> i32 {
        if let Some(free) = self.channels.iter().position(Option::is_none) {
            self.channels[free] = Some(ch);
            return free as i32;
        }
        if self.channels.len() >= MAX_CHANNELS {
            return abi::ERR_FULL;
        }
        self.channels.push(Some(ch));
        (self.channels.len() - 1) as i32
    }

    /// Index in the inbox of the next message for `name`.
    fn next_for(&self, name: &str) -> Option<usize> {
        self.inbox.iter().position(|m| m.channel == name)
    }
}

/// `[ptr, ptr + len)` as a range of a memory of `size` bytes, if inside.
/// Pointers and lengths are unsigned 32-bit (wasm32).
fn span(ptr: i32, len: u32, size: usize) -> Option<Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start.checked_add(len as usize)?;
    (end <= size).then_some(start..end)
}

/// Takes `len / 64` fuel from the running activation (down to zero: the next
/// instruction then runs out).
fn charge_copy(caller: &mut Caller<'_, HostState>, len: usize) {
    let cost = len as u64 / BYTES_PER_FUEL;
    if cost == 0 {
        return;
    }
    if let Ok(fuel) = caller.get_fuel() {
        // Setting fuel cannot fail when fuel metering is enabled, which the
        // nucleus's engine configuration guarantees.
        let _ = caller.set_fuel(fuel.saturating_sub(cost));
    }
}

fn memory_and_state<'a>(
    caller: &'a mut Caller<'_, HostState>,
) -> Option<(&'a mut [u8], &'a mut HostState)> {
    let memory = caller.data().memory?;
    Some(memory.data_and_store_mut(caller))
}

/// Registers the ABI v1 host functions.
pub(crate) fn define(linker: &mut Linker<HostState>) -> Result<(), wasmi::errors::LinkerError> {
    linker.func_wrap(abi::MODULE, abi::LOG, host_log)?;
    linker.func_wrap(abi::MODULE, abi::NOW, host_now)?;
    linker.func_wrap(abi::MODULE, abi::TIMER, host_timer)?;
    linker.func_wrap(abi::MODULE, abi::OPEN, host_open)?;
    linker.func_wrap(abi::MODULE, abi::SEND, host_send)?;
    linker.func_wrap(abi::MODULE, abi::RECV, host_recv)?;
    linker.func_wrap(abi::MODULE, abi::PEEK, host_peek)?;
    linker.func_wrap(abi::MODULE, abi::REPLY, host_reply_to)?;
    Ok(())
}

fn host_log(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) {
    let Some((mem, st)) = memory_and_state(&mut caller) else {
        return;
    };
    if !st.caps.log {
        st.deny("log".to_string());
        return;
    }
    let Some(r) = span(ptr, len as u32, mem.len()) else {
        st.fault("log");
        return;
    };
    let n = r.len();
    let keep = r.start..r.start + n.min(MAX_LOG_LINE);
    let text = String::from_utf8_lossy(&mem[keep]).into_owned();
    st.log(LogOrigin::Domain, text);
    charge_copy(&mut caller, n);
}

fn host_now(mut caller: Caller<'_, HostState>) -> i64 {
    let st = caller.data_mut();
    if !st.caps.clock {
        return i64::from(st.deny("now".to_string()));
    }
    i64::try_from(st.now).unwrap_or(i64::MAX)
}

fn host_timer(mut caller: Caller<'_, HostState>, deadline: i64) {
    caller.data_mut().timer = u64::try_from(deadline).ok();
}

fn host_open(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) -> i32 {
    let Some((mem, st)) = memory_and_state(&mut caller) else {
        return abi::ERR_FAULT;
    };
    if len < 0 {
        return st.fault("open");
    }
    if len as usize > MAX_NAME {
        return abi::ERR_NOENT;
    }
    let Some(r) = span(ptr, len as u32, mem.len()) else {
        return st.fault("open");
    };
    let Ok(name) = core::str::from_utf8(&mem[r]) else {
        return abi::ERR_NOENT;
    };
    if !name.starts_with('/') {
        return abi::ERR_NOENT;
    }
    if !st.caps.may_open(name) {
        return st.deny(alloc::format!("open {name}"));
    }
    if let Some(h) = st.channels.iter().position(|c| {
        c.as_ref()
            .is_some_and(|c| c.reply.is_none() && c.name == name)
    }) {
        return h as i32;
    }
    let name = name.to_string();
    st.alloc_handle(Channel {
        name,
        reply: None,
        last_reply: None,
    })
}

fn host_send(mut caller: Caller<'_, HostState>, chan: i32, ptr: i32, len: i32) -> i32 {
    let Some((mem, st)) = memory_and_state(&mut caller) else {
        return abi::ERR_FAULT;
    };
    let Some(ch) = st.channel(chan) else {
        return abi::ERR_BADCHAN;
    };
    let (name, reply) = (ch.name.clone(), ch.reply);
    if len < 0 {
        return st.fault("send");
    }
    let n = len as usize;
    if n > abi::MAX_MESSAGE {
        return abi::ERR_TOO_BIG;
    }
    let Some(r) = span(ptr, len as u32, mem.len()) else {
        return st.fault("send");
    };
    if st.outbox.len() >= MAX_OUTBOX || st.outbox_bytes + n > MAX_OUTBOX_BYTES {
        return abi::ERR_FULL;
    }
    let payload = mem[r].to_vec();
    st.outbox.push(Outgoing {
        from: st.id,
        channel: name,
        payload,
        reply,
    });
    st.outbox_bytes += n;
    st.stats.sent += 1;
    if reply.is_some() {
        // Reply handles answer once.
        st.channels[chan as usize] = None;
    }
    charge_copy(&mut caller, n);
    0
}

fn host_recv(mut caller: Caller<'_, HostState>, chan: i32, ptr: i32, cap: i32) -> i32 {
    let Some((mem, st)) = memory_and_state(&mut caller) else {
        return abi::ERR_FAULT;
    };
    let name = match st.channel(chan) {
        Some(ch) if ch.reply.is_none() => ch.name.clone(),
        // Unknown, or a reply handle (those are send-only).
        _ => return abi::ERR_BADCHAN,
    };
    let Some(buf) = span(ptr, cap as u32, mem.len()) else {
        return st.fault("recv");
    };
    let Some(i) = st.next_for(&name) else {
        return abi::ERR_EMPTY;
    };
    let n = st.inbox[i].payload.len();
    if n > buf.len() {
        return abi::ERR_TOO_BIG;
    }
    let Some(msg) = st.inbox.remove(i) else {
        return abi::ERR_EMPTY;
    };
    mem[buf.start..buf.start + n].copy_from_slice(&msg.payload);
    if let Some(Some(c)) = st.channels.get_mut(chan as usize) {
        c.last_reply = msg.reply;
    }
    st.stats.received += 1;
    charge_copy(&mut caller, n);
    n as i32
}

fn host_peek(caller: Caller<'_, HostState>, chan: i32) -> i32 {
    let st = caller.data();
    let Some(ch) = st.channel(chan) else {
        return abi::ERR_BADCHAN;
    };
    if ch.reply.is_some() {
        return abi::ERR_BADCHAN;
    }
    match st.next_for(&ch.name) {
        Some(i) => st.inbox[i].payload.len() as i32,
        None => abi::ERR_EMPTY,
    }
}

fn host_reply_to(mut caller: Caller<'_, HostState>, chan: i32) -> i32 {
    let st = caller.data_mut();
    let Some(ch) = st.channel(chan) else {
        return abi::ERR_BADCHAN;
    };
    if ch.reply.is_some() {
        return abi::ERR_BADCHAN;
    }
    let Some(token) = ch.last_reply else {
        return abi::ERR_NOENT;
    };
    let name = ch.name.clone();
    st.alloc_handle(Channel {
        name,
        reply: Some(token),
        last_reply: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_bounds_checked() {
        assert_eq!(span(0, 10, 10), Some(0..10));
        assert_eq!(span(10, 0, 10), Some(10..10));
        assert_eq!(span(11, 0, 10), None);
        assert_eq!(span(5, 6, 10), None);
        assert_eq!(span(-1, 1, 10), None);
        assert_eq!(span(1, u32::MAX, 100), None);
    }
}
