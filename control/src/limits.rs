//! Bounds on what peers that have proved nothing can make a node hold, and
//! rate limits on join and renewal attempts. Pure: time comes in as an
//! argument; the QUIC and TCP servers ([`crate::node`]) hold one
//! [`ConnBudget`] each and one [`Attempts`] per node.
//!
//! The bounds, per listener:
//!
//! - **handshakes in progress**: at most [`PENDING_PER_SOURCE`] per source
//!   address and [`PENDING_MAX`] in all; each must finish within
//!   [`HANDSHAKE_TIMEOUT`];
//! - **anonymous connections** (no client certificate: they may only join):
//!   at most [`ANONYMOUS_PER_SOURCE`] per source address and
//!   [`ANONYMOUS_MAX`] in all, each closed after [`ANONYMOUS_LIFETIME`],
//!   with frames of at most [`ANONYMOUS_MAX_FRAME`] bytes and (QUIC)
//!   [`ANONYMOUS_STREAMS`] streams and a [`ANONYMOUS_WINDOW`] receive window;
//!   so anonymous peers hold at most about
//!   `ANONYMOUS_MAX × (ANONYMOUS_WINDOW + ANONYMOUS_STREAMS × ANONYMOUS_MAX_FRAME)`
//!   (32 MiB) of a node's memory;
//! - **authenticated connections** are counted apart (TCP:
//!   [`crate::tcp::MAX_CONNECTIONS`]), so members are served while anonymous
//!   peers hold every anonymous slot.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A TLS handshake (QUIC or TCP) must finish within this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress from one source address.
pub const PENDING_PER_SOURCE: usize = 16;
/// Handshakes in progress in all.
pub const PENDING_MAX: usize = 128;
/// Anonymous connections from one source address.
pub const ANONYMOUS_PER_SOURCE: usize = 8;
/// Anonymous connections in all.
pub const ANONYMOUS_MAX: usize = 64;
/// An anonymous connection is closed this long after its handshake (a join
/// takes well under a second; a relayed one at most the forwarding window).
pub const ANONYMOUS_LIFETIME: Duration = Duration::from_secs(20);
/// The largest frame accepted from a peer without a certificate (a join
/// request is a few KiB).
pub const ANONYMOUS_MAX_FRAME: usize = 64 * 1024;
/// Concurrent QUIC streams an anonymous peer may open.
pub const ANONYMOUS_STREAMS: u32 = 4;
/// An anonymous QUIC connection's receive window (bytes in flight).
pub const ANONYMOUS_WINDOW: u32 = 256 * 1024;
/// Bytes of frames one member (one identity, over all its QUIC
/// connections) may have in progress at once: four frames of the largest
/// size.
pub const MEMBER_FRAME_BUDGET: usize = 4 * metta_proto::MAX_FRAME_LEN;
/// TLS/TCP connections one member identity may hold at once (a native node
/// needs one, two while it reconnects).
pub const MEMBER_TCP_PER_SUBJECT: usize = 8;
/// QUIC connections one member identity may hold at once (a node keeps one
/// to each peer; each `mettactl` run opens one; `metta-bench` opens 64
/// clients as the admin).
pub const MEMBER_QUIC_PER_SUBJECT: usize = 256;
/// Concurrent QUIC streams a member may open.
pub const MEMBER_STREAMS: u32 = 256;
/// A member's QUIC connection receive window.
pub const MEMBER_WINDOW: u32 = 16 * 1024 * 1024;

/// Which budget refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Too many handshakes from this source.
    SourceHandshakes,
    /// Too many handshakes in all.
    Handshakes,
    /// Too many anonymous connections from this source.
    SourceAnonymous,
    /// Too many anonymous connections in all.
    Anonymous,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Busy::SourceHandshakes => "too many handshakes in progress from this address",
            Busy::Handshakes => "too many handshakes in progress",
            Busy::SourceAnonymous => "too many anonymous connections from this address",
            Busy::Anonymous => "too many anonymous connections",
        })
    }
}

/// What counts as one source: an IPv4 address, or an IPv6 /64 (one host
/// is given a whole /64 and can pick any address in it).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
            }
        },
    }
}

/// Counts per source and in all, with caps.
#[derive(Debug)]
struct Counter {
    per: HashMap<IpAddr, usize>,
    total: usize,
    per_cap: usize,
    cap: usize,
}

impl Counter {
    fn new(per_cap: usize, cap: usize) -> Counter {
        Counter {
            per: HashMap::new(),
            total: 0,
            per_cap,
            cap,
        }
    }

    /// Takes a place for `ip`: `Err(true)` if the source is full, `Err(false)`
    /// if everything is.
    fn take(&mut self, ip: IpAddr) -> Result<(), bool> {
        let ip = source_of(ip);
        let n = self.per.get(&ip).copied().unwrap_or(0);
        if n >= self.per_cap {
            return Err(true);
        }
        if self.total >= self.cap {
            return Err(false);
        }
        self.per.insert(ip, n + 1);
        self.total += 1;
        Ok(())
    }

    fn give(&mut self, ip: IpAddr) {
        let ip = source_of(ip);
        if let Some(n) = self.per.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per.remove(&ip);
            }
            self.total -= 1;
        }
    }
}

/// The refusal of a [`Counter`]: `source` full, or all of it.
fn busy(source_full: bool, source: Busy, all: Busy) -> Busy {
    if source_full {
        source
    } else {
        all
    }
}

/// What one listener's unauthenticated peers hold: handshakes in progress
/// and anonymous connections, per source and in all.
#[derive(Debug)]
pub struct ConnBudget {
    pending: Counter,
    anonymous: Counter,
}

impl Default for ConnBudget {
    fn default() -> Self {
        ConnBudget::new(
            PENDING_PER_SOURCE,
            PENDING_MAX,
            ANONYMOUS_PER_SOURCE,
            ANONYMOUS_MAX,
        )
    }
}

impl ConnBudget {
    /// A budget with these caps.
    pub fn new(
        pending_per_source: usize,
        pending_max: usize,
        anonymous_per_source: usize,
        anonymous_max: usize,
    ) -> ConnBudget {
        ConnBudget {
            pending: Counter::new(pending_per_source, pending_max),
            anonymous: Counter::new(anonymous_per_source, anonymous_max),
        }
    }

    /// A handshake from `ip` begins.
    pub fn begin_handshake(&mut self, ip: IpAddr) -> Result<(), Busy> {
        self.pending
            .take(ip)
            .map_err(|source| busy(source, Busy::SourceHandshakes, Busy::Handshakes))
    }

    /// A handshake from `ip` ended (either way).
    pub fn end_handshake(&mut self, ip: IpAddr) {
        self.pending.give(ip);
    }

    /// An anonymous connection from `ip` is established.
    pub fn admit_anonymous(&mut self, ip: IpAddr) -> Result<(), Busy> {
        self.anonymous
            .take(ip)
            .map_err(|source| busy(source, Busy::SourceAnonymous, Busy::Anonymous))
    }

    /// An anonymous connection from `ip` ended.
    pub fn end_anonymous(&mut self, ip: IpAddr) {
        self.anonymous.give(ip);
    }

    /// Handshakes in progress and anonymous connections now.
    pub fn load(&self) -> (usize, usize) {
        (self.pending.total, self.anonymous.total)
    }
}

/// A shared [`ConnBudget`] handing out places that give themselves back
/// when dropped.
#[derive(Debug, Clone, Default)]
pub struct SharedBudget(Arc<Mutex<ConnBudget>>);

/// A place in a [`SharedBudget`]; given back on drop.
#[derive(Debug)]
pub struct Place {
    budget: Arc<Mutex<ConnBudget>>,
    ip: IpAddr,
    anonymous: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        if self.anonymous {
            b.end_anonymous(self.ip);
        } else {
            b.end_handshake(self.ip);
        }
    }
}

impl SharedBudget {
    /// A handshake place for `ip`.
    pub fn handshake(&self, ip: IpAddr) -> Result<Place, Busy> {
        self.lock().begin_handshake(ip)?;
        Ok(Place {
            budget: self.0.clone(),
            ip,
            anonymous: false,
        })
    }

    /// An anonymous-connection place for `ip`.
    pub fn anonymous(&self, ip: IpAddr) -> Result<Place, Busy> {
        self.lock().admit_anonymous(ip)?;
        Ok(Place {
            budget: self.0.clone(),
            ip,
            anonymous: true,
        })
    }

    /// Handshakes in progress and anonymous connections now.
    pub fn load(&self) -> (usize, usize) {
        self.lock().load()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnBudget> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A token bucket per key: `burst` attempts at once, then `per_sec` a
/// second. At most `max_keys` keys are remembered (the longest idle are
/// forgotten first).
#[derive(Debug)]
pub struct Buckets<K> {
    /// Per key: tokens, when they were counted, and whether the last
    /// attempt was refused.
    map: HashMap<K, (f64, Instant, bool)>,
    burst: f64,
    per_sec: f64,
    max_keys: usize,
}

/// One attempt on a bucket `(tokens, counted at, refused since the last
/// success)`: refill it up to `burst` at `rate` since it was counted, then
/// allow (spending a token if `spend`) or refuse, saying when to retry.
fn attempt(
    (tokens, last, refused): &mut (f64, Instant, bool),
    burst: f64,
    rate: f64,
    now: Instant,
    spend: bool,
) -> Result<(), Limited> {
    *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * rate).min(burst);
    *last = now;
    if *tokens >= 1.0 {
        if spend {
            *tokens -= 1.0;
            *refused = false;
        }
        return Ok(());
    }
    let first = !*refused;
    *refused = true;
    Err(Limited {
        retry_after: Duration::from_secs_f64(((1.0 - *tokens) / rate).min(3600.0)),
        first,
    })
}

/// An attempt refused by a [`Buckets`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limited {
    /// When the next attempt would be allowed.
    pub retry_after: Duration,
    /// The first refusal since the key's attempts were last allowed (log
    /// this one; the rest are the same story).
    pub first: bool,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// Buckets of `burst` refilled at `per_sec`.
    pub fn new(burst: u32, per_sec: f64, max_keys: usize) -> Buckets<K> {
        Buckets {
            map: HashMap::new(),
            burst: f64::from(burst),
            per_sec,
            max_keys,
        }
    }

    /// One attempt for `key` at `now`. A refused attempt costs nothing.
    pub fn take(&mut self, key: &K, now: Instant) -> Result<(), Limited> {
        if !self.map.contains_key(key) && self.map.len() >= self.max_keys {
            self.forget_idle(now);
        }
        let bucket = self
            .map
            .entry(key.clone())
            .or_insert((self.burst, now, false));
        attempt(bucket, self.burst, self.per_sec, now, true)
    }

    /// Whether `key` may make an attempt at `now`, without spending one
    /// (for limits that count only failures: [`take`](Self::take) after a
    /// failure).
    pub fn check(&mut self, key: &K, now: Instant) -> Result<(), Limited> {
        match self.map.get_mut(key) {
            Some(bucket) => attempt(bucket, self.burst, self.per_sec, now, false),
            None => Ok(()),
        }
    }

    /// Forgets keys whose bucket is full again, or else the longest idle.
    fn forget_idle(&mut self, now: Instant) {
        let (burst, rate) = (self.burst, self.per_sec);
        self.map.retain(|_, (t, last, _)| {
            *t + now.saturating_duration_since(*last).as_secs_f64() * rate < burst
        });
        while self.map.len() >= self.max_keys {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, (_, last, _))| *last)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.map.remove(&k),
                None => break,
            };
        }
    }
}

/// Join attempts a source address may make at once, then per second.
pub const JOIN_SOURCE_BURST: u32 = 20;
/// The refill of [`JOIN_SOURCE_BURST`], attempts per second.
pub const JOIN_SOURCE_PER_SEC: f64 = 2.0;
/// Failed join attempts with one token id at once, then per second (a
/// multi-use token's good joins do not count).
pub const JOIN_TOKEN_BURST: u32 = 5;
/// The refill of [`JOIN_TOKEN_BURST`], attempts per second.
pub const JOIN_TOKEN_PER_SEC: f64 = 0.5;
/// Renewals one node may ask for at once, then per second.
pub const RENEW_BURST: u32 = 3;
/// The refill of [`RENEW_BURST`], attempts per second.
pub const RENEW_PER_SEC: f64 = 0.1;

/// Rate limits on join attempts (per source address, per token id) and on
/// renewals (per node).
#[derive(Debug)]
pub struct Attempts {
    /// Join attempts per source address.
    pub join_source: Buckets<IpAddr>,
    /// Failed join attempts per token id.
    pub join_token: Buckets<String>,
    /// Renewals per node.
    pub renew: Buckets<u64>,
    /// Changes of a node's address (each one a registry write) per node.
    pub addr_change: Buckets<u64>,
}

impl Default for Attempts {
    fn default() -> Self {
        Attempts {
            join_source: Buckets::new(JOIN_SOURCE_BURST, JOIN_SOURCE_PER_SEC, 4096),
            join_token: Buckets::new(JOIN_TOKEN_BURST, JOIN_TOKEN_PER_SEC, 4096),
            renew: Buckets::new(RENEW_BURST, RENEW_PER_SEC, 4096),
            addr_change: Buckets::new(RENEW_BURST, RENEW_PER_SEC, 4096),
        }
    }
}

/// A map that remembers at most `max` entries, forgetting the oldest
/// inserted first: what a peer may redeem later (reply tokens handed out),
/// kept bounded whatever the peer does.
#[derive(Debug)]
pub struct Recent<K, V> {
    map: HashMap<K, (u64, V)>,
    order: std::collections::VecDeque<(u64, K)>,
    next: u64,
    max: usize,
}

impl<K: Hash + Eq + Clone, V> Recent<K, V> {
    /// An empty map of at most `max` entries.
    pub fn new(max: usize) -> Recent<K, V> {
        Recent {
            map: HashMap::new(),
            order: std::collections::VecDeque::new(),
            next: 0,
            max,
        }
    }

    /// Remembers `key` → `value`.
    pub fn insert(&mut self, key: K, value: V) {
        let seq = self.next;
        self.next += 1;
        self.map.insert(key.clone(), (seq, value));
        self.order.push_back((seq, key));
        // Every entry of `order` stands for at most one of `map`, so this
        // bounds both.
        while self.order.len() > self.max {
            if let Some((s, old)) = self.order.pop_front() {
                if self.map.get(&old).is_some_and(|(cur, _)| *cur == s) {
                    self.map.remove(&old);
                }
            }
        }
    }

    /// Takes `key`'s value if `pred` accepts it (it is then forgotten).
    pub fn take_if(&mut self, key: &K, pred: impl FnOnce(&V) -> bool) -> Option<V> {
        if !self.map.get(key).is_some_and(|(_, v)| pred(v)) {
            return None;
        }
        self.map.remove(key).map(|(_, v)| v)
    }

    /// Entries remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn a_source_cannot_take_the_whole_budget_and_places_come_back() {
        let mut b = ConnBudget::new(2, 3, 1, 2);
        assert_eq!(b.begin_handshake(ip(1)), Ok(()));
        assert_eq!(b.begin_handshake(ip(1)), Ok(()));
        assert_eq!(b.begin_handshake(ip(1)), Err(Busy::SourceHandshakes));
        assert_eq!(b.begin_handshake(ip(2)), Ok(()));
        assert_eq!(b.begin_handshake(ip(3)), Err(Busy::Handshakes));
        b.end_handshake(ip(1));
        assert_eq!(b.begin_handshake(ip(3)), Ok(()));
        assert_eq!(b.admit_anonymous(ip(1)), Ok(()));
        assert_eq!(b.admit_anonymous(ip(1)), Err(Busy::SourceAnonymous));
        assert_eq!(b.admit_anonymous(ip(2)), Ok(()));
        assert_eq!(b.admit_anonymous(ip(3)), Err(Busy::Anonymous));
        assert_eq!(b.load(), (3, 2));
        b.end_anonymous(ip(2));
        b.end_anonymous(ip(9)); // never admitted: nothing to give back
        assert_eq!(b.admit_anonymous(ip(3)), Ok(()));
        assert_eq!(b.load(), (3, 2));
    }

    #[test]
    fn an_ipv6_source_is_its_64() {
        let mut b = ConnBudget::new(2, 100, 2, 100);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(b.admit_anonymous(a), Ok(()));
        assert_eq!(b.admit_anonymous(same64), Ok(()));
        assert_eq!(b.admit_anonymous(same64), Err(Busy::SourceAnonymous));
        assert_eq!(b.admit_anonymous(other64), Ok(()));
        b.end_anonymous(a);
        assert_eq!(b.admit_anonymous(same64), Ok(()));
        let mapped: IpAddr = "::ffff:127.0.0.7".parse().unwrap();
        assert_eq!(source_of(mapped), IpAddr::from([127, 0, 0, 7]));
    }

    #[test]
    fn shared_places_are_given_back_when_dropped() {
        let b = SharedBudget(Arc::new(Mutex::new(ConnBudget::new(1, 1, 1, 1))));
        let p = b.handshake(ip(1)).unwrap();
        assert_eq!(b.handshake(ip(2)).unwrap_err(), Busy::Handshakes);
        let a = b.anonymous(ip(1)).unwrap();
        assert_eq!(b.load(), (1, 1));
        drop((p, a));
        assert_eq!(b.load(), (0, 0));
        assert!(b.handshake(ip(2)).is_ok());
    }

    #[test]
    fn buckets_allow_a_burst_then_the_rate_and_say_when_to_retry() {
        let t0 = Instant::now();
        let mut b = Buckets::new(3, 2.0, 16);
        for _ in 0..3 {
            assert_eq!(b.take(&"k", t0), Ok(()));
        }
        let first = b.take(&"k", t0).unwrap_err();
        assert!(first.first);
        assert!(first.retry_after > Duration::ZERO && first.retry_after <= Duration::from_secs(1));
        let again = b.take(&"k", t0).unwrap_err();
        assert!(!again.first, "only the first refusal is reported as such");
        // Another key is not affected.
        assert_eq!(b.take(&"other", t0), Ok(()));
        // Refused attempts cost nothing: retrying every 100 ms gets
        // through once the rate allows (2/s: after 500 ms).
        let mut t = t0;
        let mut refused = 0;
        while b.take(&"k", t).is_err() {
            refused += 1;
            t += Duration::from_millis(100);
        }
        assert_eq!(t - t0, Duration::from_millis(500));
        assert_eq!(refused, 5);
        // 1.5 s refill three.
        let t1 = t + Duration::from_millis(1500);
        for _ in 0..3 {
            assert_eq!(b.take(&"k", t1), Ok(()));
        }
        let again = b.take(&"k", t1).unwrap_err();
        assert!(again.first, "the first refusal after a success is reported");
        // Long idle: the full burst again.
        let t2 = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.take(&"k", t2), Ok(()));
        }
    }

    #[test]
    fn recent_forgets_the_oldest_and_takes_only_what_matches() {
        let mut r = Recent::new(3);
        for k in 0..5u32 {
            r.insert(k, k * 10);
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.take_if(&0, |_| true), None, "the oldest are forgotten");
        assert_eq!(
            r.take_if(&3, |v| *v == 99),
            None,
            "a wrong value takes nothing"
        );
        assert_eq!(r.take_if(&3, |v| *v == 30), Some(30));
        assert_eq!(r.take_if(&3, |_| true), None, "taken once");
        // Taken and re-inserted keys do not make it grow.
        for _ in 0..100 {
            r.insert(7, 70);
            assert_eq!(r.take_if(&7, |_| true), Some(70));
        }
        r.insert(8, 80);
        assert!(r.len() <= 3 && r.order.len() <= 3);
        assert_eq!(r.take_if(&8, |_| true), Some(80));
    }

    #[test]
    fn a_failure_only_bucket_is_checked_without_spending() {
        let t0 = Instant::now();
        let mut b = Buckets::new(2, 1.0, 16);
        for _ in 0..10 {
            assert_eq!(b.check(&"tok", t0), Ok(()), "checks spend nothing");
        }
        b.take(&"tok", t0).unwrap();
        b.take(&"tok", t0).unwrap();
        let l = b.check(&"tok", t0).unwrap_err();
        assert!(l.first && l.retry_after <= Duration::from_secs(1));
        assert_eq!(b.check(&"tok", t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn buckets_remember_a_bounded_number_of_keys() {
        let t0 = Instant::now();
        let mut b = Buckets::new(1, 0.001, 4);
        for k in 0..100u32 {
            assert_eq!(b.take(&k, t0 + Duration::from_millis(k.into())), Ok(()));
            assert!(b.map.len() <= 4);
        }
        // The most recent key is still limited.
        assert!(b.take(&99, t0 + Duration::from_millis(100)).is_err());
    }
}
