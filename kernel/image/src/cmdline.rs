//! The kernel command line: whitespace-separated words, `flag` or `key=value`.
//!
//! Multiboot loaders conventionally put the image name first (QEMU `-kernel` passes
//! `"<path> <-append string>"`, iPXE `"<image name> <args>"`); it is just another
//! word here.

/// A kernel command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cmdline<'a>(pub &'a str);

impl<'a> Cmdline<'a> {
    /// Decode the raw bytes (without the NUL terminator); invalid UTF-8 is cut at
    /// the first bad byte.
    pub fn from_bytes(bytes: &'a [u8]) -> Self {
        match core::str::from_utf8(bytes) {
            Ok(s) => Cmdline(s),
            Err(e) => {
                // `valid_up_to` is a char boundary, so this cannot fail.
                Cmdline(core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""))
            }
        }
    }

    /// The words, in order.
    pub fn words(&self) -> impl Iterator<Item = &'a str> {
        self.0.split_ascii_whitespace()
    }

    /// Whether the word `name` appears on its own (not as a prefix, not as a key).
    pub fn has_flag(&self, name: &str) -> bool {
        self.words().any(|w| w == name)
    }

    /// The value of the last `key=value` word for `key`.
    pub fn value(&self, key: &str) -> Option<&'a str> {
        self.words()
            .filter_map(|w| w.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_whole_words() {
        let c = Cmdline("/tmp/panic-test/metta-kernel  quiet\tpanic-test");
        assert!(c.has_flag("panic-test"));
        assert!(c.has_flag("quiet"));
        assert!(!c.has_flag("panic"));
        let c = Cmdline("/tmp/panic-test/metta-kernel panic-tests");
        assert!(!c.has_flag("panic-test"));
        assert!(!Cmdline("").has_flag("panic-test"));
    }

    #[test]
    fn values() {
        let c = Cmdline("k log=debug node=3 log=info novalue");
        assert_eq!(c.value("log"), Some("info"));
        assert_eq!(c.value("node"), Some("3"));
        assert_eq!(c.value("novalue"), None);
        assert_eq!(c.value("missing"), None);
    }

    #[test]
    fn bad_utf8_is_truncated() {
        assert_eq!(Cmdline::from_bytes(b"abc def").0, "abc def");
        assert_eq!(Cmdline::from_bytes(b"abc \xff def").0, "abc ");
    }
}
