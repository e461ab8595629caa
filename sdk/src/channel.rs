//! Channels: [`Channel`] (a handle) and [`NamedChannel`] (a name whose handle
//! is opened lazily, cached in linear memory and re-opened when stale).

use crate::abi::MAX_MESSAGE;
use crate::{sys, Error};
use core::sync::atomic::{AtomicI32, Ordering};

/// A channel handle returned by the nucleus (`open` or `reply_to`).
///
/// A plain integer: copy it, store it in a `static`. Handles are nucleus state,
/// not domain state; whether they survive a snapshot/restore is the nucleus's
/// business — a stale one fails with [`Error::BadChannel`], which
/// [`NamedChannel`] handles by opening the name again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Channel(i32);

impl Channel {
    /// Open the channel `name` (e.g. `/svc/counter`) in the domain's namespace.
    ///
    /// Opening a name the domain already holds returns the same handle on
    /// the current nucleus. Errors: [`Error::Denied`] without a `channel:`
    /// capability covering the name, [`Error::NoEntry`] if it does not
    /// resolve (names start with `/`), [`Error::Full`] if the domain's handle
    /// table is full.
    pub fn open(name: &str) -> Result<Channel, Error> {
        // SAFETY: pointer and length come from one live `&str`.
        let ret = unsafe { sys::open(name.as_ptr(), name.len()) };
        Error::check(ret).map(|h| Channel(h as i32))
    }

    /// A channel from a raw handle (e.g. one kept in memory as an integer).
    pub const fn from_raw(handle: i32) -> Channel {
        Channel(handle)
    }

    /// The raw handle.
    pub const fn raw(self) -> i32 {
        self.0
    }

    /// Queue `msg` (at most [`MAX_MESSAGE`] bytes) on this channel.
    ///
    /// [`Error::Full`] means the receiver's queue is full: nothing was queued;
    /// retry in a later activation (return [`Run::More`](crate::Run::More) or
    /// set a timer).
    pub fn send(self, msg: &[u8]) -> Result<(), Error> {
        if msg.len() > MAX_MESSAGE {
            return Err(Error::TooBig);
        }
        // SAFETY: pointer and length come from one live slice.
        let ret = unsafe { sys::send(self.0, msg.as_ptr(), msg.len()) };
        Error::check(ret).map(drop)
    }

    /// Take the next message into `buf`: `Ok(Some(len))`, or `Ok(None)` if
    /// nothing is queued.
    ///
    /// If the message is longer than `buf`, [`Error::TooBig`] is returned and
    /// the message **stays queued** (a domain that cannot take it must drop
    /// it with [`skip`](Channel::skip), or it will see it forever).
    pub fn recv(self, buf: &mut [u8]) -> Result<Option<usize>, Error> {
        let cap = buf.len().min(MAX_MESSAGE);
        // SAFETY: pointer and capacity come from one live, writable slice
        // (`cap <= buf.len()`).
        let ret = unsafe { sys::recv(self.0, buf.as_mut_ptr(), cap) };
        match Error::check(ret) {
            Ok(len) => Ok(Some(len as usize)),
            Err(Error::Empty) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The length of the next message without taking it, or `Ok(None)` if
    /// nothing is queued.
    pub fn peek(self) -> Result<Option<usize>, Error> {
        // SAFETY: no pointers involved.
        let ret = unsafe { sys::peek(self.0) };
        match Error::check(ret) {
            Ok(len) => Ok(Some(len as usize)),
            Err(Error::Empty) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Drop the next message, whatever its size: `Ok(Some(len))`, or
    /// `Ok(None)` if nothing is queued.
    ///
    /// Receives into a [`MAX_MESSAGE`]-byte scratch buffer in linear memory
    /// (64 KiB of zeroed memory, linked in only if `skip` is used).
    pub fn skip(self) -> Result<Option<usize>, Error> {
        static mut SCRATCH: [u8; MAX_MESSAGE] = [0; MAX_MESSAGE];
        // SAFETY: the nucleus writes at most MAX_MESSAGE bytes into SCRATCH;
        // no reference to SCRATCH is ever created (only this raw pointer) and
        // its contents are never read, so concurrent or re-entrant use could
        // not observe anything either (domains are single-threaded anyway).
        let ret = unsafe {
            sys::recv(
                self.0,
                core::ptr::addr_of_mut!(SCRATCH).cast::<u8>(),
                MAX_MESSAGE,
            )
        };
        match Error::check(ret) {
            Ok(len) => Ok(Some(len as usize)),
            Err(Error::Empty) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A handle on which to answer the sender of the last message received
    /// on this channel.
    ///
    /// Reply handles are send-only and single-use: the nucleus frees one when
    /// a `send` on it succeeds. ABI v1 has no `close`, so a reply handle whose
    /// send failed stays allocated until a later send on it succeeds — keep it
    /// and retry (e.g. after [`Error::Full`]) rather than dropping it.
    pub fn reply_to(self) -> Result<Channel, Error> {
        // SAFETY: no pointers involved.
        let ret = unsafe { sys::reply_to(self.0) };
        Error::check(ret).map(|h| Channel(h as i32))
    }

    /// Answer the sender of the last message received on this channel:
    /// [`reply_to`](Channel::reply_to) then [`send`](Channel::send). If the
    /// send fails the reply handle is lost to the domain (see `reply_to`);
    /// use the two calls separately to retry.
    pub fn reply(self, msg: &[u8]) -> Result<(), Error> {
        self.reply_to()?.send(msg)
    }
}

/// A channel by name, for a `static`: opened on first use, its handle cached
/// in linear memory, and opened again if the nucleus says the handle is stale
/// ([`Error::BadChannel`], e.g. after a restore).
///
/// ```
/// use metta_sdk::NamedChannel;
///
/// static SVC: NamedChannel = NamedChannel::new("/svc/counter");
/// // in the activation: while let Some(n) = SVC.recv(&mut buf)? { ... }
/// ```
#[derive(Debug)]
pub struct NamedChannel {
    name: &'static str,
    /// The open handle, or -1.
    handle: AtomicI32,
}

const CLOSED: i32 = -1;

impl NamedChannel {
    /// A channel named `name`, not yet opened.
    pub const fn new(name: &'static str) -> NamedChannel {
        NamedChannel {
            name,
            handle: AtomicI32::new(CLOSED),
        }
    }

    /// The name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The handle, opening the name if it is not open yet.
    pub fn get(&self) -> Result<Channel, Error> {
        let h = self.handle.load(Ordering::Relaxed);
        if h >= 0 {
            return Ok(Channel(h));
        }
        let ch = Channel::open(self.name)?;
        self.handle.store(ch.0, Ordering::Relaxed);
        Ok(ch)
    }

    /// The cached handle, if open; does not call the nucleus.
    pub fn cached(&self) -> Option<Channel> {
        let h = self.handle.load(Ordering::Relaxed);
        (h >= 0).then_some(Channel(h))
    }

    /// Forget the cached handle: the next use opens the name again.
    pub fn forget(&self) {
        self.handle.store(CLOSED, Ordering::Relaxed);
    }

    /// Run `op` on the handle; if it fails with [`Error::BadChannel`], open
    /// the name again and retry once.
    pub fn with<T>(&self, mut op: impl FnMut(Channel) -> Result<T, Error>) -> Result<T, Error> {
        match op(self.get()?) {
            Err(Error::BadChannel) => {
                self.forget();
                op(self.get()?)
            }
            r => r,
        }
    }

    /// [`Channel::send`] on this name.
    pub fn send(&self, msg: &[u8]) -> Result<(), Error> {
        self.with(|c| c.send(msg))
    }

    /// [`Channel::recv`] on this name.
    pub fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, Error> {
        self.with(|c| c.recv(buf))
    }

    /// [`Channel::peek`] on this name.
    pub fn peek(&self) -> Result<Option<usize>, Error> {
        self.with(Channel::peek)
    }

    /// [`Channel::skip`] on this name.
    pub fn skip(&self) -> Result<Option<usize>, Error> {
        self.with(Channel::skip)
    }

    /// [`Channel::reply_to`] on this name.
    pub fn reply_to(&self) -> Result<Channel, Error> {
        self.with(Channel::reply_to)
    }

    /// [`Channel::reply`] on this name.
    pub fn reply(&self, msg: &[u8]) -> Result<(), Error> {
        self.reply_to()?.send(msg)
    }
}
