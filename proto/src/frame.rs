//! Length-prefixed postcard frames.
//!
//! A frame is a 4-byte big-endian payload length followed by that many bytes of
//! postcard-encoded message. Lengths above [`MAX_FRAME_LEN`] (or a caller's lower
//! limit) are rejected *before* any payload is buffered, so a peer cannot make us
//! allocate more than the limit. Zero-length frames are rejected too: no message
//! encodes to nothing.

use alloc::vec::Vec;
use core::fmt;

use serde::{de::DeserializeOwned, Serialize};

/// Size of the length prefix in bytes.
pub const HEADER_LEN: usize = 4;

/// The largest payload any Metta peer accepts (16 MiB): enough for a Raft
/// append batch or a snapshot chunk, small enough to bound memory per stream.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Why bytes could not be turned into a message (or a message into bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than the limit.
    TooLarge {
        /// Announced payload length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A zero-length frame.
    Empty,
    /// The stream ended inside a frame.
    Truncated {
        /// Bytes of the frame (header included) that did arrive.
        have: usize,
    },
    /// The payload is not a valid encoding of the expected message type: an
    /// unknown message variant, a bad field, or trailing garbage.
    Malformed(postcard::Error),
    /// The message could not be encoded.
    Encode(postcard::Error),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the {max}-byte limit")
            }
            FrameError::Empty => f.write_str("empty frame"),
            FrameError::Truncated { have } => {
                write!(f, "stream ended inside a frame after {have} bytes")
            }
            FrameError::Malformed(e) => write!(f, "malformed or unknown message: {e}"),
            FrameError::Encode(e) => write!(f, "cannot encode message: {e}"),
        }
    }
}

impl core::error::Error for FrameError {}

/// Encodes `msg` as one frame (header + payload).
pub fn encode<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out =
        postcard::to_extend(msg, alloc::vec![0u8; HEADER_LEN]).map_err(FrameError::Encode)?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes one message from a frame *payload* (no header). The whole payload
/// must be consumed: trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.is_empty() {
        return Err(FrameError::Empty);
    }
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(msg)
}

/// Parses a frame header, checking the announced length against `max`.
pub fn parse_header(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    let max = max.min(MAX_FRAME_LEN);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// An incremental frame decoder: feed it bytes as they arrive, take whole
/// payloads out. Sans-IO: the caller owns the socket.
///
/// After an error the decoder is poisoned (the stream is out of sync) and keeps
/// returning that error.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
    error: Option<FrameError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// A decoder that accepts payloads up to `max` bytes (capped at [`MAX_FRAME_LEN`]).
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max: max.min(MAX_FRAME_LEN),
            error: None,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.error.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes buffered but not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next complete payload, if one has arrived.
    pub fn next_payload(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&self.buf[..HEADER_LEN]);
        let len = match parse_header(header, self.max) {
            Ok(len) => len,
            Err(e) => {
                self.error = Some(e.clone());
                self.buf = Vec::new();
                return Err(e);
            }
        };
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(payload))
    }

    /// Takes and decodes the next complete message.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_payload()? {
            Some(p) => decode(&p).map(Some),
            None => Ok(None),
        }
    }

    /// Call at end of stream: an error if a partial frame is left over.
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                have: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{ApiRequest, Request};
    use proptest::prelude::*;

    #[test]
    fn roundtrip_through_decoder_in_pieces() {
        let req = Request::Api(ApiRequest::Nodes);
        let bytes = encode(&req).unwrap();
        let mut d = FrameDecoder::default();
        for b in &bytes[..bytes.len() - 1] {
            d.push(core::slice::from_ref(b));
            assert_eq!(d.next_message::<Request>().unwrap(), None);
        }
        d.push(&bytes[bytes.len() - 1..]);
        assert_eq!(d.next_message::<Request>().unwrap(), Some(req));
        d.finish().unwrap();
    }

    #[test]
    fn oversized_header_is_rejected_before_buffering() {
        let mut d = FrameDecoder::new(1024);
        d.push(&(1025u32).to_be_bytes());
        assert_eq!(
            d.next_payload(),
            Err(FrameError::TooLarge {
                len: 1025,
                max: 1024
            })
        );
        // poisoned: further bytes are ignored, the error sticks
        d.push(&[0; 10]);
        assert!(d.next_payload().is_err());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn empty_frame_is_rejected() {
        let mut d = FrameDecoder::default();
        d.push(&[0, 0, 0, 0]);
        assert_eq!(d.next_payload(), Err(FrameError::Empty));
    }

    #[test]
    fn unknown_message_type_is_malformed() {
        // variant index 200 of Request does not exist
        let mut d = FrameDecoder::default();
        d.push(&[0, 0, 0, 2, 200, 1]);
        assert!(matches!(
            d.next_message::<Request>(),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut bytes = encode(&Request::Api(ApiRequest::Nodes)).unwrap();
        bytes.push(0);
        let len = (bytes.len() - HEADER_LEN) as u32;
        bytes[..4].copy_from_slice(&len.to_be_bytes());
        let mut d = FrameDecoder::default();
        d.push(&bytes);
        assert!(matches!(
            d.next_message::<Request>(),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn truncated_stream_is_reported() {
        let bytes = encode(&Request::Api(ApiRequest::Nodes)).unwrap();
        let mut d = FrameDecoder::default();
        d.push(&bytes[..bytes.len() - 1]);
        assert_eq!(d.next_payload(), Ok(None));
        assert!(matches!(d.finish(), Err(FrameError::Truncated { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut d = FrameDecoder::new(4096);
            for c in &chunks {
                d.push(c);
                while let Ok(Some(_)) = d.next_message::<Request>() {}
            }
        }

        #[test]
        fn kv_put_roundtrips(key in ".{0,40}", value in proptest::collection::vec(any::<u8>(), 0..300)) {
            let req = Request::Api(ApiRequest::KvPut { key, value });
            let bytes = encode(&req).unwrap();
            let mut d = FrameDecoder::default();
            d.push(&bytes);
            prop_assert_eq!(d.next_message::<Request>().unwrap(), Some(req));
        }
    }
}
