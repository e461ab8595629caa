//! Routing between the domains of one nucleus, as both drivers do it
//! (`control/src/hosted.rs` and `kernel/image/src/driver.rs`): which local
//! domain serves a channel name ([`route_to`], [`route_in`]), and the table
//! of outstanding reply tokens ([`ReplyTokens`]).
//!
//! A message sent on a name (no reply token) goes to the *other* live domain
//! whose channel capability covers the name with the longest prefix (ties:
//! the lowest id): the nucleus does not say which names a domain has opened,
//! so the capability is what says it may serve the name. The driver mints a
//! [`ReplyToken`] for the receiver, remembering where its answer goes; the
//! answer comes back out carrying the token.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use crate::domain::Undeliverable;
use crate::nucleus::Nucleus;
use crate::types::{Caps, DomainId, Message, ReplyToken};

/// Outstanding reply tokens a [`ReplyTokens`] keeps; beyond this the oldest
/// are forgotten.
pub const MAX_TOKENS: usize = 65_536;

/// The domain that serves `channel` for a message from `from`, among
/// `candidates` (`(id, capabilities, alive)`): the other live domain whose
/// channel capability covers the name with the longest prefix (on segment
/// boundaries, as [`Caps::may_open`]); among equals the lowest id.
pub fn route_to<'a>(
    from: DomainId,
    channel: &str,
    candidates: impl Iterator<Item = (DomainId, &'a Caps, bool)>,
) -> Option<DomainId> {
    candidates
        .filter(|&(id, _, alive)| id != from && alive)
        .filter_map(|(id, caps, _)| {
            let best = caps
                .channels
                .iter()
                .filter(|p| Caps::with_channels([p.as_str()]).may_open(channel))
                .map(String::len)
                .max()?;
            Some((best, id))
        })
        .max_by_key(|&(len, id)| (len, core::cmp::Reverse(id)))
        .map(|(_, id)| id)
}

/// [`route_to`] among the domains of `n` (a domain is alive until it
/// fails).
pub fn route_in(n: &Nucleus, from: DomainId, channel: &str) -> Option<DomainId> {
    let candidates = n
        .domains()
        .map(|(id, d)| (id, d.caps(), d.failure().is_none()));
    route_to(from, channel, candidates)
}

/// What [`ReplyTokens::send_local`] did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// Queued for this domain, with a reply token.
    Delivered(DomainId),
    /// The domain that serves the name did not take it (its token is
    /// forgotten again).
    Refused(Undeliverable),
    /// No local domain serves the name: the payload, back.
    NoRoute(Vec<u8>),
}

/// Outstanding reply tokens and where each one's answer goes (`D`, the
/// driver's own idea of a destination). Tokens are numbered from 1 and never
/// reused; each is redeemed once. When [`MAX_TOKENS`] (or the limit given to
/// [`ReplyTokens::with_limit`]) are outstanding, minting forgets the oldest.
#[derive(Debug, Clone)]
pub struct ReplyTokens<D> {
    tokens: BTreeMap<u64, D>,
    next: u64,
    limit: usize,
}

impl<D> Default for ReplyTokens<D> {
    fn default() -> ReplyTokens<D> {
        ReplyTokens::new()
    }
}

impl<D> ReplyTokens<D> {
    /// An empty table of up to [`MAX_TOKENS`].
    pub fn new() -> ReplyTokens<D> {
        ReplyTokens::with_limit(MAX_TOKENS)
    }

    /// An empty table of up to `limit` tokens (at least 1).
    pub fn with_limit(limit: usize) -> ReplyTokens<D> {
        ReplyTokens {
            tokens: BTreeMap::new(),
            next: 1,
            limit: limit.max(1),
        }
    }

    /// A new token whose answer goes to `dest`; forgets the oldest
    /// outstanding one if the table is full.
    pub fn mint(&mut self, dest: D) -> ReplyToken {
        if self.tokens.len() >= self.limit {
            self.tokens.pop_first();
        }
        let t = self.next;
        self.next += 1;
        self.tokens.insert(t, dest);
        ReplyToken(t)
    }

    /// Sends a message `from` wrote on `channel` (without a reply token) to
    /// the local domain of `n` that serves the name ([`route_in`]), with a
    /// token minted for `dest`, where its answer goes; a token the receiver
    /// did not take is forgotten again.
    pub fn send_local(
        &mut self,
        n: &mut Nucleus,
        from: DomainId,
        channel: &str,
        payload: Vec<u8>,
        dest: D,
        now: u64,
    ) -> Local {
        let Some(to) = route_in(n, from, channel) else {
            return Local::NoRoute(payload);
        };
        let token = self.mint(dest);
        let msg = Message {
            channel: String::from(channel),
            payload,
            reply: Some(token),
        };
        match n.deliver(to, msg, now) {
            Ok(()) => Local::Delivered(to),
            Err(e) => {
                self.take(token.0);
                Local::Refused(e)
            }
        }
    }

    /// Redeems `token`: where its answer goes, and the token is gone.
    pub fn take(&mut self, token: u64) -> Option<D> {
        self.tokens.remove(&token)
    }

    /// Redeems `token` only if `accept` takes its destination; otherwise
    /// (or if it is unknown) `None`, and the token stays as it was.
    pub fn take_if(&mut self, token: u64, accept: impl FnOnce(&D) -> bool) -> Option<D> {
        if self.tokens.get(&token).is_some_and(accept) {
            self.tokens.remove(&token)
        } else {
            None
        }
    }

    /// Forgets every token whose destination `keep` refuses.
    pub fn retain(&mut self, mut keep: impl FnMut(&D) -> bool) {
        self.tokens.retain(|_, d| keep(d));
    }

    /// Whether `token` is outstanding.
    pub fn contains(&self, token: u64) -> bool {
        self.tokens.contains_key(&token)
    }

    /// The outstanding tokens with their destinations, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &D)> {
        self.tokens.iter().map(|(t, d)| (*t, d))
    }

    /// How many are outstanding.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether none is outstanding.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(prefixes: &[&str]) -> Caps {
        Caps::with_channels(prefixes.iter().copied())
    }

    #[test]
    fn routes_by_longest_prefix_to_another_live_domain() {
        let a = caps(&["/svc"]);
        let b = caps(&["/svc/counter"]);
        let c = caps(&["/"]);
        let all = || {
            [
                (DomainId(1), &a, true),
                (DomainId(2), &b, true),
                (DomainId(3), &c, true),
            ]
            .into_iter()
        };
        assert_eq!(
            route_to(DomainId(9), "/svc/counter", all()),
            Some(DomainId(2))
        );
        // Never to the sender itself.
        assert_eq!(
            route_to(DomainId(2), "/svc/counter", all()),
            Some(DomainId(1))
        );
        assert_eq!(
            route_to(DomainId(9), "/svc/other", all()),
            Some(DomainId(1))
        );
        assert_eq!(route_to(DomainId(9), "/tmp", all()), Some(DomainId(3)));
        // Segment boundaries; failed domains; ties go to the lowest id.
        assert_eq!(
            route_to(DomainId(9), "/svcx", [(DomainId(1), &a, true)].into_iter()),
            None
        );
        assert_eq!(
            route_to(
                DomainId(9),
                "/svc/counter",
                [(DomainId(2), &b, false)].into_iter()
            ),
            None
        );
        let b2 = b.clone();
        let tie = [(DomainId(5), &b2, true), (DomainId(4), &b, true)];
        assert_eq!(
            route_to(DomainId(9), "/svc/counter", tie.into_iter()),
            Some(DomainId(4))
        );
        let n = Nucleus::new(900_000, crate::FuelRate::new(1, 1));
        assert_eq!(route_in(&n, DomainId(0), "/svc"), None);
    }

    #[test]
    fn tokens_are_redeemed_once_and_the_oldest_forgotten() {
        let mut t = ReplyTokens::with_limit(3);
        let a = t.mint('a');
        let b = t.mint('b');
        assert_eq!((a, b), (ReplyToken(1), ReplyToken(2)));
        assert_eq!(t.take(a.0), Some('a'));
        assert_eq!(t.take(a.0), None);
        // Only if accepted; otherwise it stays.
        assert_eq!(t.take_if(b.0, |d| *d == 'x'), None);
        assert!(t.contains(b.0));
        assert_eq!(t.take_if(b.0, |d| *d == 'b'), Some('b'));
        assert_eq!(t.take_if(b.0, |_| true), None);
        // Full at 3: the fourth forgets the oldest.
        for c in ['c', 'd', 'e', 'f'] {
            t.mint(c);
        }
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.iter().collect::<alloc::vec::Vec<_>>(),
            [(4, &'d'), (5, &'e'), (6, &'f')]
        );
        t.retain(|d| *d != 'e');
        assert!(!t.contains(5) && t.contains(4));
        t.retain(|_| false);
        assert!(t.is_empty());
        assert_eq!(ReplyTokens::<()>::new().limit, MAX_TOKENS);
        assert_eq!(ReplyTokens::<()>::with_limit(0).limit, 1);
        assert_eq!(ReplyTokens::<()>::default().mint(()), ReplyToken(1));
    }
}
