//! The raw imports of module `"metta"` (ABI v1), exactly as the nucleus
//! provides them. Everything here is `unsafe` and speaks in pointers and
//! negative error codes; the rest of the crate wraps it.
//!
//! On `wasm32` these are real imports. On any other target (host builds, docs,
//! `cargo test`) there is nothing to import from: outside tests the stubs panic,
//! and in this crate's own tests they are backed by an in-memory fake nucleus
//! (`fake`) so the safe wrappers can be tested on the host.
//!
//! Pointers are `*const u8` / `*mut u8` and lengths `usize`, which on `wasm32`
//! are the ABI's `i32` offsets into the domain's memory.

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "metta")]
unsafe extern "C" {
    /// `log(ptr, len)`: one UTF-8 log line.
    #[link_name = "log"]
    pub fn log(ptr: *const u8, len: usize);
    /// `now() -> i64`: monotonic nanoseconds.
    #[link_name = "now"]
    pub fn now() -> i64;
    /// `timer(deadline_ns)`: wake at the deadline; negative cancels.
    #[link_name = "timer"]
    pub fn timer(deadline_ns: i64);
    /// `open(name_ptr, name_len) -> handle | error`.
    #[link_name = "open"]
    pub fn open(name_ptr: *const u8, name_len: usize) -> i32;
    /// `send(chan, ptr, len) -> 0 | error`.
    #[link_name = "send"]
    pub fn send(chan: i32, ptr: *const u8, len: usize) -> i32;
    /// `recv(chan, ptr, cap) -> len | error`.
    #[link_name = "recv"]
    pub fn recv(chan: i32, ptr: *mut u8, cap: usize) -> i32;
    /// `peek(chan) -> len | error`.
    #[link_name = "peek"]
    pub fn peek(chan: i32) -> i32;
    /// `reply_to(chan) -> handle | error`.
    #[link_name = "reply_to"]
    pub fn reply_to(chan: i32) -> i32;
}

#[cfg(all(not(target_arch = "wasm32"), not(test)))]
mod host {
    //! Off wasm32 and outside tests there is no nucleus: every call panics.

    fn absent(name: &str) -> ! {
        panic!("metta import `{name}` called outside a wasm32 domain")
    }

    /// Stub of the `log` import.
    ///
    /// # Safety
    /// None needed; it panics.
    pub unsafe fn log(_ptr: *const u8, _len: usize) {
        absent("log")
    }
    /// Stub of the `now` import.
    ///
    /// # Safety
    /// None needed; it panics.
    pub unsafe fn now() -> i64 {
        absent("now")
    }
    /// Stub of the `timer` import.
    ///
    /// # Safety
    /// None needed; it panics.
    pub unsafe fn timer(_deadline_ns: i64) {
        absent("timer")
    }
    /// Stub of the `open` import.
    ///
    /// # Safety
    /// None needed; it panics.
    pub unsafe fn open(_name_ptr: *const u8, _name_len: usize) -> i32 {
        absent("open")
    }
    /// Stub of the `send` import.
    ///
    /// # Safety
    /// None needed; it panics.
    pub unsafe fn send(_chan: i32, _ptr: *const u8, _len: usize) -> i32 {
        absent("send")
    }
    /// Stub of the `recv` import.
    ///
    /// # Safety
    /// None needed; it panics.
    pub unsafe fn recv(_chan: i32, _ptr: *mut u8, _cap: usize) -> i32 {
        absent("recv")
    }
    /// Stub of the `peek` import.
    ///
    /// # Safety
    /// None needed; it panics.
    pub unsafe fn peek(_chan: i32) -> i32 {
        absent("peek")
    }
    /// Stub of the `reply_to` import.
    ///
    /// # Safety
    /// None needed; it panics.
    pub unsafe fn reply_to(_chan: i32) -> i32 {
        absent("reply_to")
    }
}

#[cfg(all(not(target_arch = "wasm32"), not(test)))]
pub use host::*;

#[cfg(all(not(target_arch = "wasm32"), test))]
pub use fake::{log, now, open, peek, recv, reply_to, send, timer};

/// An in-memory nucleus for host tests (one per test thread).
///
/// Names must be registered with [`fake::serve`] before `open` resolves them;
/// every `open` hands out a fresh handle. Messages are delivered to a name
/// with [`fake::deliver`] (tagged with a sender), and everything sent is
/// recorded per destination name; `reply_to` yields a handle whose name is
/// `reply:<sender>`. [`fake::restore`] invalidates every handle, as a restore
/// on a nucleus that does not keep handles would.
#[cfg(all(not(target_arch = "wasm32"), test))]
pub mod fake {
    extern crate std;

    use crate::abi::*;
    use std::cell::RefCell;
    use std::collections::{BTreeMap, VecDeque};
    use std::string::{String, ToString};
    use std::vec::Vec;

    #[derive(Default)]
    struct Host {
        logs: Vec<String>,
        now: i64,
        timer: Option<i64>,
        served: BTreeMap<String, VecDeque<(String, Vec<u8>)>>,
        denied: Vec<String>,
        handles: Vec<Option<String>>,
        last_sender: BTreeMap<String, String>,
        sent: Vec<(String, Vec<u8>)>,
        full: bool,
    }

    std::thread_local! {
        static HOST: RefCell<Host> = RefCell::new(Host::default());
    }

    fn with<T>(f: impl FnOnce(&mut Host) -> T) -> T {
        HOST.with(|h| f(&mut h.borrow_mut()))
    }

    /// # Safety
    /// `ptr..ptr+len` must be a live byte slice for `'a`.
    unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
        // SAFETY: guaranteed by the caller.
        unsafe { core::slice::from_raw_parts(ptr, len) }
    }

    fn name_of(h: &Host, chan: i32) -> Option<String> {
        usize::try_from(chan)
            .ok()
            .and_then(|i| h.handles.get(i).cloned().flatten())
    }

    /// Forget all state of this thread's fake nucleus.
    pub fn reset() {
        with(|h| *h = Host::default());
    }
    /// Make `name` resolvable by `open`.
    pub fn serve(name: &str) {
        with(|h| {
            h.served.entry(name.to_string()).or_default();
        });
    }
    /// Make `open(name)` fail with `ERR_DENIED`.
    pub fn deny(name: &str) {
        with(|h| h.denied.push(name.to_string()));
    }
    /// Queue `msg` from `sender` on the served name `name`.
    pub fn deliver(name: &str, sender: &str, msg: &[u8]) {
        with(|h| {
            h.served
                .get_mut(name)
                .expect("deliver to a name not served")
                .push_back((sender.to_string(), msg.to_vec()))
        });
    }
    /// Everything sent so far, as `(destination name, message)`, drained.
    pub fn take_sent() -> Vec<(String, Vec<u8>)> {
        with(|h| core::mem::take(&mut h.sent))
    }
    /// Every log line so far, drained.
    pub fn take_logs() -> Vec<String> {
        with(|h| core::mem::take(&mut h.logs))
    }
    /// Set the clock.
    pub fn set_now(ns: i64) {
        with(|h| h.now = ns);
    }
    /// The armed timer deadline, if any.
    pub fn timer_deadline() -> Option<i64> {
        with(|h| h.timer)
    }
    /// Make every `send` fail with `ERR_FULL` (or stop doing so).
    pub fn set_full(full: bool) {
        with(|h| h.full = full);
    }
    /// Invalidate every handle handed out so far.
    pub fn restore() {
        with(|h| h.handles.iter_mut().for_each(|s| *s = None));
    }

    /// Fake `log`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be a live byte slice.
    pub unsafe fn log(ptr: *const u8, len: usize) {
        // SAFETY: guaranteed by the caller.
        let line = String::from_utf8_lossy(unsafe { bytes(ptr, len) }).into_owned();
        with(|h| h.logs.push(line));
    }
    /// Fake `now`.
    ///
    /// # Safety
    /// None.
    pub unsafe fn now() -> i64 {
        with(|h| h.now)
    }
    /// Fake `timer`.
    ///
    /// # Safety
    /// None.
    pub unsafe fn timer(deadline_ns: i64) {
        with(|h| h.timer = (deadline_ns >= 0).then_some(deadline_ns));
    }
    /// Fake `open`.
    ///
    /// # Safety
    /// `name_ptr..name_ptr+name_len` must be a live byte slice.
    pub unsafe fn open(name_ptr: *const u8, name_len: usize) -> i32 {
        // SAFETY: guaranteed by the caller.
        let Ok(name) = core::str::from_utf8(unsafe { bytes(name_ptr, name_len) }) else {
            return ERR_NOENT;
        };
        with(|h| {
            if h.denied.iter().any(|d| d == name) {
                return ERR_DENIED;
            }
            if !h.served.contains_key(name) && !name.starts_with("reply:") {
                return ERR_NOENT;
            }
            h.handles.push(Some(name.to_string()));
            (h.handles.len() - 1) as i32
        })
    }
    /// Fake `send`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be a live byte slice.
    pub unsafe fn send(chan: i32, ptr: *const u8, len: usize) -> i32 {
        // SAFETY: guaranteed by the caller.
        let msg = unsafe { bytes(ptr, len) }.to_vec();
        with(|h| {
            let Some(name) = name_of(h, chan) else {
                return ERR_BADCHAN;
            };
            if msg.len() > MAX_MESSAGE {
                return ERR_TOO_BIG;
            }
            if h.full {
                return ERR_FULL;
            }
            h.sent.push((name, msg));
            0
        })
    }
    /// Fake `recv`.
    ///
    /// # Safety
    /// `ptr..ptr+cap` must be a live, writable byte slice.
    pub unsafe fn recv(chan: i32, ptr: *mut u8, cap: usize) -> i32 {
        with(|h| {
            let Some(name) = name_of(h, chan) else {
                return ERR_BADCHAN;
            };
            let Some(queue) = h.served.get_mut(&name) else {
                return ERR_EMPTY;
            };
            let Some((_, msg)) = queue.front() else {
                return ERR_EMPTY;
            };
            if msg.len() > cap {
                return ERR_TOO_BIG;
            }
            let (sender, msg) = queue.pop_front().expect("front exists");
            // SAFETY: the caller guarantees `cap` writable bytes at `ptr`, and
            // `msg.len() <= cap`.
            unsafe { core::ptr::copy_nonoverlapping(msg.as_ptr(), ptr, msg.len()) };
            h.last_sender.insert(name, sender);
            msg.len() as i32
        })
    }
    /// Fake `peek`.
    ///
    /// # Safety
    /// None.
    pub unsafe fn peek(chan: i32) -> i32 {
        with(|h| {
            let Some(name) = name_of(h, chan) else {
                return ERR_BADCHAN;
            };
            match h.served.get(&name).and_then(|q| q.front()) {
                Some((_, msg)) => msg.len() as i32,
                None => ERR_EMPTY,
            }
        })
    }
    /// Fake `reply_to`.
    ///
    /// # Safety
    /// None.
    pub unsafe fn reply_to(chan: i32) -> i32 {
        with(|h| {
            let Some(name) = name_of(h, chan) else {
                return ERR_BADCHAN;
            };
            let Some(sender) = h.last_sender.get(&name) else {
                return ERR_NOENT;
            };
            let reply = std::format!("reply:{sender}");
            h.handles.push(Some(reply));
            (h.handles.len() - 1) as i32
        })
    }
}
