//! Helpers for small text messages (`verb arg`, decimal numbers) without a
//! heap and without `core::fmt` (which costs several KiB of wasm).
//!
//! ```
//! use metta_sdk::text::{Buf, Command};
//!
//! let cmd = Command::parse(b"add -5\n");
//! assert_eq!(cmd.verb, b"add");
//! assert_eq!(cmd.arg_i64(), Some(-5));
//!
//! let mut out = Buf::<32>::new();
//! out.push_str("ok ").push_i64(-5);
//! assert_eq!(out.as_str(), "ok -5");
//! ```

use core::fmt;

/// A message split into its first word and the rest.
///
/// Leading and trailing ASCII whitespace (including a final newline) is
/// ignored; `verb` is everything up to the first space, `arg` the rest with
/// the spaces after the verb removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command<'a> {
    /// The first word (may be empty for an empty message).
    pub verb: &'a [u8],
    /// The rest (may be empty).
    pub arg: &'a [u8],
}

impl<'a> Command<'a> {
    /// Split `msg` into verb and argument.
    pub fn parse(msg: &'a [u8]) -> Command<'a> {
        let msg = msg.trim_ascii();
        match msg.iter().position(|&b| b == b' ') {
            Some(i) => Command {
                verb: &msg[..i],
                arg: msg[i + 1..].trim_ascii_start(),
            },
            None => Command {
                verb: msg,
                arg: &[],
            },
        }
    }

    /// The argument as an unsigned decimal number.
    pub fn arg_u64(&self) -> Option<u64> {
        parse_u64(self.arg)
    }

    /// The argument as a signed decimal number.
    pub fn arg_i64(&self) -> Option<i64> {
        parse_i64(self.arg)
    }
}

/// Parse an unsigned decimal number: ASCII digits only (no sign, no spaces),
/// at least one, no overflow.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// Parse a signed decimal number: an optional `-` or `+` then
/// [`parse_u64`]'s digits, within `i64`.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    match s {
        [b'-', rest @ ..] => {
            let n = parse_u64(rest)?;
            if n == 1 << 63 {
                Some(i64::MIN)
            } else {
                i64::try_from(n).ok().map(|n| -n)
            }
        }
        [b'+', rest @ ..] => i64::try_from(parse_u64(rest)?).ok(),
        _ => i64::try_from(parse_u64(s)?).ok(),
    }
}

/// A fixed-capacity byte buffer for building messages and log lines.
///
/// Pushing beyond the capacity truncates (at a UTF-8 character boundary for
/// `&str` input) and sets [`overflowed`](Buf::overflowed); it never panics.
/// Implements [`core::fmt::Write`] for the cases where `core::fmt` is worth
/// its size (see [`logf!`](crate::logf)).
#[derive(Clone)]
pub struct Buf<const N: usize> {
    bytes: [u8; N],
    len: usize,
    overflowed: bool,
}

impl<const N: usize> Default for Buf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> fmt::Debug for Buf<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buf")
            .field("bytes", &self.as_bytes())
            .field("overflowed", &self.overflowed)
            .finish()
    }
}

impl<const N: usize> Buf<N> {
    /// An empty buffer.
    pub const fn new() -> Self {
        Buf {
            bytes: [0; N],
            len: 0,
            overflowed: false,
        }
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The contents as text; `""` if non-UTF-8 bytes were pushed with
    /// [`push`](Buf::push).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    /// Bytes written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Some input did not fit and was dropped.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Empty the buffer.
    pub fn clear(&mut self) -> &mut Self {
        self.len = 0;
        self.overflowed = false;
        self
    }

    /// Append raw bytes (truncated to the room left).
    pub fn push(&mut self, b: &[u8]) -> &mut Self {
        let room = N - self.len;
        let n = b.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        if n < b.len() {
            self.overflowed = true;
        }
        self
    }

    /// Append text, truncated at a character boundary if it does not fit.
    pub fn push_str(&mut self, s: &str) -> &mut Self {
        let room = N - self.len;
        if s.len() <= room {
            return self.push(s.as_bytes());
        }
        let mut cut = room;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.push(&s.as_bytes()[..cut]);
        self.overflowed = true;
        self
    }

    /// Append `n` in decimal.
    pub fn push_u64(&mut self, n: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let s = format_u64(n, &mut digits);
        self.push(s.as_bytes())
    }

    /// Append `n` in decimal, with a `-` if negative.
    pub fn push_i64(&mut self, n: i64) -> &mut Self {
        if n < 0 {
            self.push(b"-");
        }
        self.push_u64(n.unsigned_abs())
    }
}

impl<const N: usize> fmt::Write for Buf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_str(s);
        if self.overflowed {
            Err(fmt::Error)
        } else {
            Ok(())
        }
    }
}

/// Write `n` in decimal into `out` and return the digits.
pub fn format_u64(mut n: u64, out: &mut [u8; 20]) -> &str {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    core::str::from_utf8(&out[i..]).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn command_split() {
        assert_eq!(
            Command::parse(b"  add   42 \n"),
            Command {
                verb: b"add",
                arg: b"42"
            }
        );
        assert_eq!(
            Command::parse(b"get"),
            Command {
                verb: b"get",
                arg: b""
            }
        );
        assert_eq!(
            Command::parse(b""),
            Command {
                verb: b"",
                arg: b""
            }
        );
        assert_eq!(Command::parse(b"say a b").arg, b"a b");
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"1 2"), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i64(b"-9223372036854775809"), None);
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"9223372036854775808"), None);
        assert_eq!(parse_i64(b"+7"), Some(7));
        assert_eq!(parse_i64(b"-"), None);
        for n in [0u64, 1, 9, 10, 99, 100, 12345, u64::MAX] {
            let mut d = [0; 20];
            assert_eq!(parse_u64(format_u64(n, &mut d).as_bytes()), Some(n));
        }
    }

    #[test]
    fn buf_truncates_without_panicking() {
        let mut b = Buf::<8>::new();
        b.push_str("pong ").push_u64(1234567);
        assert_eq!(b.as_str(), "pong 123");
        assert!(b.overflowed());
        let mut b = Buf::<4>::new();
        b.push_str("aé€"); // 1 + 2 + 3 bytes: the euro sign does not fit
        assert_eq!(b.as_str(), "aé");
        assert!(b.overflowed());
        let mut b = Buf::<16>::new();
        b.push_i64(i64::MIN);
        assert_eq!(b.as_str(), "-922337203685477");
        let mut b = Buf::<32>::new();
        let x = "x";
        write!(b, "{x} {}", -3).unwrap();
        assert_eq!(b.as_str(), "x -3");
        assert!(Buf::<2>::new().write_str("abc").is_err());
    }
}
