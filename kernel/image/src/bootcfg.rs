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
//!
//! Anything else is an error: an unknown key or flag, a key without `=value` or
//! with an empty value, a flag with a value, an unknown value, or a key given
//! twice. The kernel prints the error on the console and exits with the
//! boot-failure code (QEMU status 37) instead of guessing.

use core::fmt;

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

/// The configuration read from the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootConfig<'a> {
    /// `net=`.
    pub net: NetMode,
    /// `metta.test=`, if given.
    pub test_label: Option<&'a str>,
    /// `panic-test`.
    pub panic_test: bool,
    /// `test=`, if given.
    pub self_test: Option<SelfTest>,
}

/// Why a command line was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

impl fmt::Display for ConfigError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::UnknownKey(k) => write!(
                f,
                "unknown key `{k}` (known: net=, console=, metta.test=, panic-test, test=)"
            ),
            ConfigError::MissingValue(k) => write!(f, "`{k}` needs a value: `{k}=<value>`"),
            ConfigError::UnexpectedValue(k) => write!(f, "`{k}` is a flag and takes no value"),
            ConfigError::BadValue(k, v, ok) => {
                write!(f, "bad value `{v}` for `{k}` (accepted: {ok})")
            }
            ConfigError::Duplicate(k) => write!(f, "`{k}` given more than once"),
        }
    }
}

impl<'a> BootConfig<'a> {
    /// Parse the whole command line (image name first).
    pub fn parse(cmdline: &'a str) -> Result<Self, ConfigError<'a>> {
        let mut cfg = BootConfig::default();
        // Bit per key, to reject duplicates.
        let mut seen = 0u8;
        let mut once = |bit: u8, key: &'a str| {
            if seen & bit != 0 {
                return Err(ConfigError::Duplicate(key));
            }
            seen |= bit;
            Ok(())
        };
        for word in cmdline.split_ascii_whitespace().skip(1) {
            let (key, value) = match word.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (word, None),
            };
            match key {
                "net" | "console" | "metta.test" | "test" => {
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
        Ok(cfg)
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
}
