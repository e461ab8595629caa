//! The kernel's configuration, parsed strictly from the command line.
//!
//! # Syntax
//!
//! The command line is a list of words separated by ASCII whitespace. The first
//! word is the image name, which multiboot loaders put there by convention (QEMU
//! `-kernel` passes `"<path> <-append string>"`, iPXE and GRUB `"<image> <args>"`);
//! it is never interpreted. Every other word must be one of:
//!
//! | word               | meaning                                                      |
//! |--------------------|--------------------------------------------------------------|
//! | `net=dhcp`         | bring up the NIC (virtio-net) and get an IPv4 lease by DHCP  |
//! | `net=off`          | do not configure the network (the default)                   |
//! | `console=ttyS0`    | the console is COM1 (the only console there is; accepted for Linux-style command lines) |
//! | `metta.test=<label>` | a free-form label for test harnesses; ignored              |
//! | `panic-test`       | panic after boot, to exercise the panic path                 |
//! | `test=<self-test>` | run a self-test after boot instead of the network ([`SelfTest`]): `timer`, `pagefault`, `ud`, `doublefault`, `domains`, `dirty`, `snapshot`, `bench` |
//! | `metta.ctl=<ip>:<port>` | join the cluster whose control plane listens (TLS over TCP) at this IPv4 address and port, then sync with it (heartbeats) and run the domains it places here; needs `net=dhcp` and `metta.token` |
//! | `metta.token=<token>` | the join token, `metta1.<id>.<secret>.<pin>` as `mettactl token create` prints it (parsed as strictly as `mettactl join` does); needs `metta.ctl` |
//! | `metta.name=<name>` | the node's name (1-63 of `a-z`, `0-9`, `-`, not starting with `-`); default `native-<mac>` |
//! | `metta.heartbeats=<n>` | exit with the success code after `n` acknowledged syncs (heartbeats; 1-1000000), for tests and benchmarks; default: until stopped |
//!
//! Anything else is an error: an unknown key or flag, a key without `=value` or
//! with an empty value, a flag with a value, an unknown value, a key given
//! twice, `metta.ctl` without `net=dhcp` or without `metta.token` (and the
//! other `metta.*` keys without `metta.ctl`), or `metta.ctl` with `test=`.
//! The kernel prints the error on the console and exits with the boot-failure
//! code (QEMU status 37) instead of guessing.
//!
//! # Secrets
//!
//! The token's secret is a bearer credential: it must never reach the serial
//! console. Errors about `metta.token` never quote its value, and
//! [`Redacted`] is the command line as the kernel echoes it, with the secret
//! replaced by `<secret>` (the token id and the CA pin are not secret).
//!
//! # Before the heap
//!
//! The kernel parses its command line before it has a heap, so nothing here
//! allocates: the token is checked in place ([`TokenText`], the same grammar
//! and errors as `metta_link::JoinToken`, which a host test holds them to)
//! and turned into a `JoinToken` later ([`TokenText::token`]); node names
//! follow `metta_proto::ids::check_name` (also held to it by a test).

use core::fmt;
use core::str::FromStr;

use metta_link::{JoinToken, TokenParseError};

/// A join token's text, checked (`metta1.<id>.<secret>.<pin>`: 8, 32 and 64
/// lowercase hex digits) without allocating. `Debug` hides the secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenText<'a>(&'a str);

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl<'a> TokenText<'a> {
    /// Checks `s` as `metta_link::JoinToken::from_str` does, with the same
    /// errors, without allocating.
    pub fn check(s: &'a str) -> Result<TokenText<'a>, TokenParseError> {
        if s.split('.').next() != Some(metta_link::token::TOKEN_PREFIX) {
            return Err(TokenParseError::Prefix);
        }
        let n = s.split('.').count();
        if n != 4 {
            return Err(TokenParseError::Parts(n));
        }
        let mut parts = s.split('.').skip(1);
        let mut next = |len, err| match parts.next() {
            Some(p) if lower_hex(p, len) => Ok(()),
            _ => Err(err),
        };
        next(8, TokenParseError::Id)?;
        next(32, TokenParseError::Secret)?;
        next(64, TokenParseError::Pin)?;
        Ok(TokenText(s))
    }

    fn part(&self, i: usize) -> &'a str {
        self.0.split('.').nth(i).unwrap_or("")
    }

    /// The token id (not secret).
    pub fn id(&self) -> &'a str {
        self.part(1)
    }

    /// The CA pin, 64 hex digits (not secret).
    pub fn pin(&self) -> &'a str {
        self.part(3)
    }

    /// The token (allocates: call once the heap exists).
    pub fn token(&self) -> Result<JoinToken, TokenParseError> {
        self.0.parse()
    }
}

impl fmt::Debug for TokenText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenText(metta1.{}.<secret>.{})", self.id(), self.pin())
    }
}

/// Whether `name` is a valid node name: 1-63 of `a-z`, `0-9`, `-`, not
/// starting with `-` (`metta_proto::ids::check_name`, without allocating).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

/// What to do with the network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetMode {
    /// Leave the network alone (`net=off`, or no `net=` word).
    #[default]
    Off,
    /// Bring up the NIC and run DHCP (`net=dhcp`).
    Dhcp,
}

/// A self-test the kernel runs after boot (`test=<name>`), for the boot tests in
/// `test.sh`. The fault tests end in the exception report and the panic exit
/// code; the others end with the success code, or the panic code if a check
/// failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfTest {
    /// `test=timer`: wait for timer ticks with `hlt` in between and print their
    /// rate measured by the TSC; then a deadline and a `sleep_until`.
    Timer,
    /// `test=pagefault`: write to an unmapped address (a #PF report).
    PageFault,
    /// `test=ud`: execute `ud2` (a #UD report).
    InvalidOpcode,
    /// `test=doublefault`: fault with an unusable stack, so the #PF cannot be
    /// delivered and becomes a #DF, handled on its own IST stack.
    DoubleFault,
    /// `test=domains`: run the embedded test domains on the nucleus for ~1 s
    /// (a counter and its client, a greedy `extra` domain, a 2 ms / 10 ms
    /// domain, one that traps) and check the contracts, the round trips and
    /// that the trap stayed local.
    Domains,
    /// `test=dirty`: a domain writes known pages; the page-table Dirty bits
    /// must report exactly those, relative to its memory, also after a
    /// `memory.grow` moved it.
    Dirty,
    /// `test=snapshot`: snapshot a counter at an activation boundary, restore
    /// it into a fresh nucleus, check the memory root and that the count
    /// continues.
    Snapshot,
    /// `test=bench`: the median time of an empty activation on this machine.
    Bench,
}

impl SelfTest {
    /// The accepted values of `test=`.
    pub const NAMES: &'static str =
        "timer, pagefault, ud, doublefault, domains, dirty, snapshot, bench";

    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "timer" => SelfTest::Timer,
            "pagefault" => SelfTest::PageFault,
            "ud" => SelfTest::InvalidOpcode,
            "doublefault" => SelfTest::DoubleFault,
            "domains" => SelfTest::Domains,
            "dirty" => SelfTest::Dirty,
            "snapshot" => SelfTest::Snapshot,
            "bench" => SelfTest::Bench,
            _ => return None,
        })
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SelfTest::Timer => "timer",
            SelfTest::PageFault => "pagefault",
            SelfTest::InvalidOpcode => "ud",
            SelfTest::DoubleFault => "doublefault",
            SelfTest::Domains => "domains",
            SelfTest::Dirty => "dirty",
            SelfTest::Snapshot => "snapshot",
            SelfTest::Bench => "bench",
        }
    }
}

/// The control plane's address: an IPv4 literal and a TCP port
/// (`metta.ctl=10.0.2.2:7001`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtlAddr {
    /// The IPv4 address (a unicast address: not 0.0.0.0, not multicast or
    /// broadcast).
    pub ip: [u8; 4],
    /// The TCP port (1-65535).
    pub port: u16,
}

/// Why a `metta.ctl` value is not an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrError {
    /// No `:<port>`.
    NoPort,
    /// The part before `:` is not four dot-separated decimal numbers of
    /// 0-255 (without leading zeros).
    BadIp,
    /// The address is 0.0.0.0, multicast or broadcast.
    NotUnicast,
    /// The port is not a decimal number of 1-65535 (without leading zeros).
    BadPort,
}

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddrError::NoPort => "no port: expected <IPv4 address>:<port>, e.g. 10.0.2.2:7001",
            AddrError::BadIp => {
                "not an IPv4 address: expected four numbers 0-255 separated by dots, without leading zeros (host names are not resolved)"
            }
            AddrError::NotUnicast => "not a unicast address (0.0.0.0, multicast or broadcast)",
            AddrError::BadPort => "the port must be a number from 1 to 65535, without leading zeros",
        })
    }
}

/// A decimal number without sign, leading zeros (except `0` itself) or other
/// characters, at most `max`.
fn decimal(s: &str, max: u64) -> Option<u64> {
    let ok = !s.is_empty()
        && s.len() <= 10
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    let n = if ok {
        s.parse::<u64>().ok()?
    } else {
        return None;
    };
    (n <= max).then_some(n)
}

impl FromStr for CtlAddr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        let (ip, port) = s.rsplit_once(':').ok_or(AddrError::NoPort)?;
        let mut octets = [0u8; 4];
        let mut parts = ip.split('.');
        for o in &mut octets {
            let part = parts.next().ok_or(AddrError::BadIp)?;
            *o = decimal(part, 255).ok_or(AddrError::BadIp)? as u8;
        }
        if parts.next().is_some() {
            return Err(AddrError::BadIp);
        }
        if octets == [0; 4] || octets == [255; 4] || (224..=239).contains(&octets[0]) {
            return Err(AddrError::NotUnicast);
        }
        let port = match decimal(port, 65_535) {
            Some(p) if p > 0 => p as u16,
            _ => return Err(AddrError::BadPort),
        };
        Ok(CtlAddr { ip: octets, port })
    }
}

impl fmt::Display for CtlAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.ip;
        write!(f, "{a}.{b}.{c}.{d}:{}", self.port)
    }
}

/// The most heartbeats `metta.heartbeats` may ask for.
pub const MAX_HEARTBEATS: u64 = 1_000_000;

/// What to join (`metta.ctl`, `metta.token`, `metta.name`, `metta.heartbeats`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinConfig<'a> {
    /// The control plane.
    pub ctl: CtlAddr,
    /// The join token, checked (`Debug` hides its secret).
    pub token: TokenText<'a>,
    /// The node name, if given (else derived from the MAC: [`default_node_name`]).
    pub name: Option<&'a str>,
    /// Acknowledged syncs (heartbeats) before exiting; `None`: until stopped.
    pub heartbeats: Option<u64>,
}

/// The node name used when `metta.name` is not given: `native-` and the
/// MAC's 12 lowercase hex digits (`native-5254001234ab`).
pub fn default_node_name(mac: [u8; 6]) -> alloc::string::String {
    let mut s = alloc::string::String::from("native-");
    for b in mac {
        s.push_str(&alloc::format!("{b:02x}"));
    }
    s
}

/// The configuration read from the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootConfig<'a> {
    /// `net=`.
    pub net: NetMode,
    /// `metta.test=`, if given.
    pub test_label: Option<&'a str>,
    /// `panic-test`.
    pub panic_test: bool,
    /// `test=`, if given.
    pub self_test: Option<SelfTest>,
    /// `metta.ctl=` and the keys that go with it, if given.
    pub join: Option<JoinConfig<'a>>,
}

/// Why a command line was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError<'a> {
    /// A word that is neither a known key nor a known flag.
    UnknownKey(&'a str),
    /// A known key without `=value`, or with an empty value.
    MissingValue(&'a str),
    /// A known flag written as `flag=value`.
    UnexpectedValue(&'a str),
    /// A known key with a value it does not take: `(key, value, accepted values)`.
    BadValue(&'a str, &'a str, &'static str),
    /// A key or flag given more than once.
    Duplicate(&'a str),
    /// `metta.ctl` is not `<IPv4>:<port>`: `(value, why)`.
    BadAddress(&'a str, AddrError),
    /// `metta.token` does not parse (its value is never quoted: it holds a
    /// secret).
    BadToken(TokenParseError),
    /// A key that needs another one: `(key, what it needs)`.
    Requires(&'static str, &'static str),
    /// Two keys that exclude each other.
    Conflict(&'static str, &'static str),
}

impl fmt::Display for ConfigError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::UnknownKey(k) => write!(
                f,
                "unknown key `{k}` (known: net=, console=, metta.test=, panic-test, test=, \
                 metta.ctl=, metta.token=, metta.name=, metta.heartbeats=)"
            ),
            ConfigError::MissingValue(k) => write!(f, "`{k}` needs a value: `{k}=<value>`"),
            ConfigError::UnexpectedValue(k) => write!(f, "`{k}` is a flag and takes no value"),
            ConfigError::BadValue(k, v, ok) => {
                write!(f, "bad value `{v}` for `{k}` (accepted: {ok})")
            }
            ConfigError::Duplicate(k) => write!(f, "`{k}` given more than once"),
            ConfigError::BadAddress(v, why) => {
                write!(f, "bad value `{v}` for `metta.ctl`: {why}")
            }
            ConfigError::BadToken(e) => write!(
                f,
                "bad value for `metta.token` (not shown: it holds a secret): {e}"
            ),
            ConfigError::Requires(k, what) => write!(f, "`{k}` requires {what}"),
            ConfigError::Conflict(a, b) => write!(f, "`{a}` and `{b}` exclude each other"),
        }
    }
}

impl<'a> BootConfig<'a> {
    /// Parse the whole command line (image name first).
    pub fn parse(cmdline: &'a str) -> Result<Self, ConfigError<'a>> {
        let mut cfg = BootConfig::default();
        // Bit per key, to reject duplicates.
        let mut seen = 0u16;
        let mut once = |bit: u16, key: &'a str| {
            if seen & bit != 0 {
                return Err(ConfigError::Duplicate(key));
            }
            seen |= bit;
            Ok(())
        };
        let mut ctl = None;
        let mut token = None;
        let mut name = None;
        let mut heartbeats = None;
        for word in cmdline.split_ascii_whitespace().skip(1) {
            let (key, value) = match word.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (word, None),
            };
            match key {
                "net" | "console" | "metta.test" | "test" | "metta.ctl" | "metta.token"
                | "metta.name" | "metta.heartbeats" => {
                    let value = match value {
                        Some(v) if !v.is_empty() => v,
                        _ => return Err(ConfigError::MissingValue(key)),
                    };
                    match key {
                        "net" => {
                            once(1, key)?;
                            cfg.net = match value {
                                "dhcp" => NetMode::Dhcp,
                                "off" => NetMode::Off,
                                v => return Err(ConfigError::BadValue(key, v, "dhcp, off")),
                            };
                        }
                        "console" => {
                            once(2, key)?;
                            if value != "ttyS0" {
                                return Err(ConfigError::BadValue(key, value, "ttyS0"));
                            }
                        }
                        "test" => {
                            once(16, key)?;
                            cfg.self_test =
                                Some(SelfTest::parse(value).ok_or(ConfigError::BadValue(
                                    key,
                                    value,
                                    SelfTest::NAMES,
                                ))?);
                        }
                        "metta.ctl" => {
                            once(32, key)?;
                            ctl = Some(
                                value
                                    .parse::<CtlAddr>()
                                    .map_err(|e| ConfigError::BadAddress(value, e))?,
                            );
                        }
                        "metta.token" => {
                            once(64, key)?;
                            token = Some(TokenText::check(value).map_err(ConfigError::BadToken)?);
                        }
                        "metta.name" => {
                            once(128, key)?;
                            if !valid_name(value) {
                                return Err(ConfigError::BadValue(
                                    key,
                                    value,
                                    "1-63 characters of a-z, 0-9 and '-', not starting with '-'",
                                ));
                            }
                            name = Some(value);
                        }
                        "metta.heartbeats" => {
                            once(256, key)?;
                            match decimal(value, MAX_HEARTBEATS) {
                                Some(n) if n > 0 => heartbeats = Some(n),
                                _ => {
                                    return Err(ConfigError::BadValue(
                                        key,
                                        value,
                                        "a number from 1 to 1000000",
                                    ))
                                }
                            }
                        }
                        _ => {
                            once(4, key)?;
                            cfg.test_label = Some(value);
                        }
                    }
                }
                "panic-test" => {
                    if value.is_some() {
                        return Err(ConfigError::UnexpectedValue(key));
                    }
                    once(8, key)?;
                    cfg.panic_test = true;
                }
                _ => return Err(ConfigError::UnknownKey(word)),
            }
        }
        match (ctl, token) {
            (Some(ctl), Some(token)) => {
                if cfg.net != NetMode::Dhcp {
                    return Err(ConfigError::Requires("metta.ctl", "`net=dhcp`"));
                }
                if cfg.self_test.is_some() {
                    return Err(ConfigError::Conflict("metta.ctl", "test"));
                }
                cfg.join = Some(JoinConfig {
                    ctl,
                    token,
                    name,
                    heartbeats,
                });
            }
            (Some(_), None) => {
                return Err(ConfigError::Requires("metta.ctl", "`metta.token=<token>`"))
            }
            (None, Some(_)) => {
                return Err(ConfigError::Requires(
                    "metta.token",
                    "`metta.ctl=<ip>:<port>`",
                ))
            }
            (None, None) => {
                if name.is_some() {
                    return Err(ConfigError::Requires(
                        "metta.name",
                        "`metta.ctl=<ip>:<port>`",
                    ));
                }
                if heartbeats.is_some() {
                    return Err(ConfigError::Requires(
                        "metta.heartbeats",
                        "`metta.ctl=<ip>:<port>`",
                    ));
                }
            }
        }
        Ok(cfg)
    }
}

/// A command line as the kernel echoes it: every `metta.token=` value shown
/// as `metta1.<id>.<secret>.<pin>` with the literal text `<secret>` in place
/// of the secret, or as `<not shown>` if it does not parse as a token. The
/// rest is shown as is.
#[derive(Clone, Copy, Debug)]
pub struct Redacted<'a>(pub &'a str);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find("metta.token=") {
            // Only where a word starts: `xmetta.token=` is another word.
            let starts_word = at == 0 || rest.as_bytes()[at - 1].is_ascii_whitespace();
            let value_at = at + "metta.token=".len();
            f.write_str(&rest[..value_at])?;
            let tail = &rest[value_at..];
            let end = tail
                .find(|c: char| c.is_ascii_whitespace())
                .unwrap_or(tail.len());
            if starts_word {
                match TokenText::check(&tail[..end]) {
                    Ok(t) => write!(f, "metta1.{}.<secret>.{}", t.id(), t.pin())?,
                    Err(_) => f.write_str("<not shown>")?,
                }
                rest = &tail[end..];
            } else {
                rest = tail;
            }
        }
        f.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_image_name() {
        assert_eq!(BootConfig::parse(""), Ok(BootConfig::default()));
        // The first word is the image name, whatever it looks like.
        assert_eq!(
            BootConfig::parse("/tmp/x/metta-kernel "),
            Ok(BootConfig::default())
        );
        assert_eq!(BootConfig::parse("net=bogus"), Ok(BootConfig::default()));
    }

    #[test]
    fn known_words() {
        let c = BootConfig::parse("k console=ttyS0 metta.test=boot net=dhcp panic-test").unwrap();
        assert_eq!(c.net, NetMode::Dhcp);
        assert_eq!(c.test_label, Some("boot"));
        assert!(c.panic_test);
        assert_eq!(BootConfig::parse("k net=off").unwrap().net, NetMode::Off);
        assert_eq!(c.self_test, None);
        for (word, test) in [
            ("test=timer", SelfTest::Timer),
            ("test=pagefault", SelfTest::PageFault),
            ("test=ud", SelfTest::InvalidOpcode),
            ("test=doublefault", SelfTest::DoubleFault),
            ("test=domains", SelfTest::Domains),
            ("test=dirty", SelfTest::Dirty),
            ("test=snapshot", SelfTest::Snapshot),
            ("test=bench", SelfTest::Bench),
        ] {
            let line = format!("k metta.test=x {word}");
            let c = BootConfig::parse(&line).unwrap();
            assert_eq!(c.self_test, Some(test));
            assert_eq!(c.test_label, Some("x"));
            assert_eq!(format!("test={}", test.name()), word);
        }
    }

    #[test]
    fn strict() {
        use ConfigError::*;
        assert_eq!(BootConfig::parse("k bogus=1"), Err(UnknownKey("bogus=1")));
        assert_eq!(BootConfig::parse("k quiet"), Err(UnknownKey("quiet")));
        assert_eq!(BootConfig::parse("k net"), Err(MissingValue("net")));
        assert_eq!(BootConfig::parse("k net="), Err(MissingValue("net")));
        assert_eq!(
            BootConfig::parse("k net=static"),
            Err(BadValue("net", "static", "dhcp, off"))
        );
        assert_eq!(
            BootConfig::parse("k console=tty0"),
            Err(BadValue("console", "tty0", "ttyS0"))
        );
        assert_eq!(
            BootConfig::parse("k panic-test=1"),
            Err(UnexpectedValue("panic-test"))
        );
        assert_eq!(
            BootConfig::parse("k net=dhcp net=off"),
            Err(Duplicate("net"))
        );
        assert_eq!(
            BootConfig::parse("k panic-test panic-test"),
            Err(Duplicate("panic-test"))
        );
        assert_eq!(
            BootConfig::parse("k test=gp"),
            Err(BadValue("test", "gp", SelfTest::NAMES))
        );
        assert_eq!(BootConfig::parse("k test"), Err(MissingValue("test")));
        assert_eq!(
            BootConfig::parse("k test=ud test=timer"),
            Err(Duplicate("test"))
        );
        assert!(UnknownKey("x").to_string().contains("unknown key `x`"));
    }

    const TOKEN: &str = "metta1.0a1b2c3d.00112233445566778899aabbccddeeff.000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const SECRET: &str = "00112233445566778899aabbccddeeff";

    #[test]
    fn join_keys() {
        let line = format!("k net=dhcp metta.ctl=10.0.2.2:7001 metta.token={TOKEN}");
        let c = BootConfig::parse(&line).unwrap();
        let j = c.join.unwrap();
        assert_eq!(
            j.ctl,
            CtlAddr {
                ip: [10, 0, 2, 2],
                port: 7001
            }
        );
        assert_eq!(j.ctl.to_string(), "10.0.2.2:7001");
        assert_eq!(j.token.id(), "0a1b2c3d");
        assert_eq!(j.token.token().unwrap().to_string(), TOKEN);
        assert!(!format!("{:?}", j.token).contains(SECRET));
        assert_eq!((j.name, j.heartbeats), (None, None));
        let line = format!(
            "k metta.heartbeats=3 metta.name=rack-1 metta.token={TOKEN} net=dhcp metta.ctl=192.168.1.10:65535"
        );
        let j = BootConfig::parse(&line).unwrap().join.unwrap();
        assert_eq!((j.name, j.heartbeats), (Some("rack-1"), Some(3)));
        assert_eq!(j.ctl.port, 65535);
        assert_eq!(
            default_node_name([0x52, 0x54, 0, 0x12, 0x34, 0xab]),
            "native-5254001234ab"
        );
        // Without metta.ctl there is no join.
        assert_eq!(BootConfig::parse("k net=dhcp").unwrap().join, None);
    }

    #[test]
    fn ctl_addresses() {
        use AddrError::*;
        for (v, e) in [
            ("10.0.2.2", NoPort),
            ("10.0.2.2:", BadPort),
            ("10.0.2.2:0", BadPort),
            ("10.0.2.2:65536", BadPort),
            ("10.0.2.2:07001", BadPort),
            ("10.0.2.2:+7", BadPort),
            ("10.0.2.300:7001", BadIp),
            ("10.0.2:7001", BadIp),
            ("10.0.2.2.1:7001", BadIp),
            ("10.0.02.2:7001", BadIp),
            ("ctl.lab:7001", BadIp),
            ("[::1]:7001", BadIp),
            ("0.0.0.0:7001", NotUnicast),
            ("255.255.255.255:7001", NotUnicast),
            ("224.0.0.1:7001", NotUnicast),
        ] {
            assert_eq!(v.parse::<CtlAddr>(), Err(e), "{v}");
        }
        assert_eq!(
            "0.1.2.3:1".parse::<CtlAddr>(),
            Ok(CtlAddr {
                ip: [0, 1, 2, 3],
                port: 1
            })
        );
    }

    #[test]
    fn join_keys_strict() {
        use ConfigError::*;
        let parse = |s: &str| BootConfig::parse(s).map(|_| ()).map_err(|e| e.to_string());
        let ok = format!("net=dhcp metta.ctl=10.0.2.2:7001 metta.token={TOKEN}");
        assert_eq!(parse(&format!("k {ok}")), Ok(()));
        let e = BootConfig::parse("k net=dhcp metta.ctl=10.0.2.300:7001").unwrap_err();
        assert_eq!(e, BadAddress("10.0.2.300:7001", AddrError::BadIp));
        assert!(e
            .to_string()
            .starts_with("bad value `10.0.2.300:7001` for `metta.ctl`: not an IPv4 address"));
        // A bad token: the error says what is wrong, never the value.
        let bad = TOKEN.replace("0a1b2c3d", "0a1b2c3");
        let line = format!("k net=dhcp metta.ctl=10.0.2.2:1 metta.token={bad}");
        let e = BootConfig::parse(&line).unwrap_err();
        assert_eq!(e, BadToken(TokenParseError::Id));
        let msg = e.to_string();
        assert!(
            msg.contains("the id must be 8 lowercase hex digits"),
            "{msg}"
        );
        assert!(!msg.contains(SECRET) && !msg.contains("0a1b2c3"), "{msg}");
        assert_eq!(
            BootConfig::parse("k net=dhcp metta.token=metta1"),
            Err(BadToken(TokenParseError::Parts(1)))
        );
        // What goes with what.
        assert_eq!(
            BootConfig::parse(&format!("k metta.ctl=10.0.2.2:1 metta.token={TOKEN}")),
            Err(Requires("metta.ctl", "`net=dhcp`"))
        );
        assert_eq!(
            BootConfig::parse("k net=dhcp metta.ctl=10.0.2.2:1"),
            Err(Requires("metta.ctl", "`metta.token=<token>`"))
        );
        assert_eq!(
            BootConfig::parse(&format!("k net=dhcp metta.token={TOKEN}")),
            Err(Requires("metta.token", "`metta.ctl=<ip>:<port>`"))
        );
        assert_eq!(
            BootConfig::parse("k metta.name=x"),
            Err(Requires("metta.name", "`metta.ctl=<ip>:<port>`"))
        );
        assert_eq!(
            BootConfig::parse("k metta.heartbeats=2"),
            Err(Requires("metta.heartbeats", "`metta.ctl=<ip>:<port>`"))
        );
        assert_eq!(
            BootConfig::parse(&format!("k {ok} test=timer")),
            Err(Conflict("metta.ctl", "test"))
        );
        assert_eq!(
            BootConfig::parse(&format!("k {ok} metta.ctl=10.0.2.2:2")),
            Err(Duplicate("metta.ctl"))
        );
        assert_eq!(
            BootConfig::parse(&format!("k {ok} metta.token={TOKEN}")),
            Err(Duplicate("metta.token"))
        );
        assert_eq!(
            BootConfig::parse("k metta.ctl="),
            Err(MissingValue("metta.ctl"))
        );
        for bad in ["Rack", "-x", "a_b", &"x".repeat(64)] {
            assert!(matches!(
                BootConfig::parse(&format!("k {ok} metta.name={bad}")),
                Err(BadValue("metta.name", _, _))
            ));
        }
        for bad in ["0", "-1", "01", "1000001", "x"] {
            assert!(matches!(
                BootConfig::parse(&format!("k {ok} metta.heartbeats={bad}")),
                Err(BadValue("metta.heartbeats", _, _))
            ));
        }
    }

    /// The in-place check agrees with metta-link's parser, error for error.
    #[test]
    fn token_check_matches_metta_link() {
        let mut cases = alloc::vec![
            String::new(),
            "metta1".into(),
            "metta1.".into(),
            "metta2.a.b.c".into(),
            format!(" {TOKEN}"),
            format!("{TOKEN} "),
            format!("{TOKEN}."),
            format!("{TOKEN}.x"),
            TOKEN.to_uppercase(),
            TOKEN.replace("0a1b2c3d", "0A1B2C3D"),
            TOKEN.replace("0a1b2c3d", "0a1b2c3"),
            TOKEN.replace(SECRET, "g0112233445566778899aabbccddeeff"),
            TOKEN.replace(SECRET, ""),
            format!("{TOKEN}0"),
            TOKEN.replace("1e1f", "1e1F"),
            "metta1...".into(),
            TOKEN.into(),
        ];
        // Every single-character deletion and a few substitutions.
        for i in 0..TOKEN.len() {
            let mut t = String::from(TOKEN);
            t.remove(i);
            cases.push(t);
            for c in ['.', 'g', 'A', '0'] {
                let mut t = String::from(TOKEN);
                t.replace_range(i..i + 1, c.encode_utf8(&mut [0; 4]));
                cases.push(t);
            }
        }
        for c in &cases {
            assert_eq!(
                TokenText::check(c).map(|_| ()),
                c.parse::<JoinToken>().map(|_| ()),
                "{c:?}"
            );
        }
    }

    #[test]
    fn names_match_check_name() {
        let long = "a".repeat(63);
        let too_long = "a".repeat(64);
        for n in [
            "", "a", "-a", "a-", "rack-1", "Rack", "a_b", "a.b", "é", &long, &too_long, "0",
        ] {
            assert_eq!(
                valid_name(n),
                metta_proto::ids::check_name("node", n).is_ok(),
                "{n:?}"
            );
        }
    }

    #[test]
    fn redacted_echo_hides_the_secret() {
        let line = format!("/k net=dhcp metta.token={TOKEN} metta.ctl=10.0.2.2:1");
        let shown = Redacted(&line).to_string();
        assert!(!shown.contains(SECRET), "{shown}");
        assert_eq!(
            shown,
            "/k net=dhcp metta.token=metta1.0a1b2c3d.<secret>.000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f metta.ctl=10.0.2.2:1"
        );
        // A malformed token is not shown at all; other words stay.
        let line = format!("k metta.token={SECRET}x metta.token=metta1.{SECRET}");
        assert_eq!(
            Redacted(&line).to_string(),
            "k metta.token=<not shown> metta.token=<not shown>"
        );
        assert_eq!(Redacted("k net=dhcp").to_string(), "k net=dhcp");
        assert_eq!(
            Redacted("k xmetta.token=abc").to_string(),
            "k xmetta.token=abc"
        );
        assert_eq!(
            Redacted("metta.token=").to_string(),
            "metta.token=<not shown>"
        );
    }
}
