//! One request at a time over a byte stream: the rule for TLS 1.3 over TCP.
//!
//! Over QUIC every request gets a fresh bidirectional stream, so requests never
//! wait for each other and need no ids. A TCP connection is a single ordered
//! byte stream, so native nodes (which cannot speak QUIC) follow a stricter
//! rule on it:
//!
//! 1. the client sends **one** request frame ([`Request`]);
//! 2. the server answers with **exactly one** response frame ([`Response`]);
//! 3. only then may the client send its next request.
//!
//! The frames are the same length-prefixed postcard frames as on QUIC
//! ([`crate::frame`], at most [`MAX_FRAME_LEN`]), the TLS handshake is the
//! same (ALPN [`crate::ALPN`], the same certificates), and a request means the
//! same thing on either transport. The server never sends a frame that is not
//! the answer to a request. A frame the server cannot parse is answered with
//! an error response, after which the server closes the connection (the byte
//! stream is out of sync). A client that sends a request before the previous
//! answer arrived gains nothing: the server reads the next request only after
//! writing the current answer.
//!
//! [`ClientExchange`] and [`ServerExchange`] hold that rule with no I/O: the
//! caller moves the bytes (tokio in `mettad`, rustls's unbuffered API on a bare
//! metal kernel) and the exchange says what they mean.

use alloc::vec::Vec;
use core::fmt;

use crate::frame::{self, FrameDecoder, FrameError, MAX_FRAME_LEN};
use crate::msg::{Request, Response};

/// A violation of the one-at-a-time rule, or bytes that are not a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExchangeError {
    /// A request was about to be sent while the previous one is unanswered
    /// (client), or a request taken while the previous one is unanswered
    /// (server).
    Busy,
    /// The server sent bytes while no request was outstanding.
    Unsolicited,
    /// A response was about to be sent with no request outstanding.
    NoRequest,
    /// The stream ended while a request was unanswered or inside a frame.
    Closed {
        /// Whether a request was outstanding.
        awaiting: bool,
        /// Bytes of an incomplete frame left over.
        partial: usize,
    },
    /// The bytes are not a valid frame of the expected message type.
    Frame(FrameError),
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExchangeError::Busy => f.write_str("the previous request is not answered yet"),
            ExchangeError::Unsolicited => f.write_str("the server sent a frame nobody asked for"),
            ExchangeError::NoRequest => f.write_str("no request to answer"),
            ExchangeError::Closed { awaiting, partial } => {
                f.write_str("the connection closed")?;
                if *awaiting {
                    f.write_str(" before the answer arrived")?;
                }
                if *partial > 0 {
                    write!(f, " inside a frame ({partial} bytes of it arrived)")?;
                }
                Ok(())
            }
            ExchangeError::Frame(e) => write!(f, "bad frame: {e}"),
        }
    }
}

impl core::error::Error for ExchangeError {}

impl From<FrameError> for ExchangeError {
    fn from(e: FrameError) -> Self {
        ExchangeError::Frame(e)
    }
}

/// The client side: encodes requests, and turns received bytes into the
/// response to the outstanding one.
#[derive(Debug, Clone)]
pub struct ClientExchange {
    decoder: FrameDecoder,
    awaiting: bool,
}

impl Default for ClientExchange {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl ClientExchange {
    /// An exchange accepting responses of up to `max` bytes (capped at
    /// [`MAX_FRAME_LEN`]).
    pub fn new(max: usize) -> Self {
        ClientExchange {
            decoder: FrameDecoder::new(max),
            awaiting: false,
        }
    }

    /// The frame to send for `req`. Fails with [`ExchangeError::Busy`] while
    /// the previous request is unanswered.
    pub fn request(&mut self, req: &Request) -> Result<Vec<u8>, ExchangeError> {
        if self.awaiting {
            return Err(ExchangeError::Busy);
        }
        let bytes = frame::encode(req)?;
        self.awaiting = true;
        Ok(bytes)
    }

    /// Whether a request is waiting for its response.
    pub fn awaiting(&self) -> bool {
        self.awaiting
    }

    /// Feeds received bytes; returns the response once it is complete.
    /// Bytes with no request outstanding are [`ExchangeError::Unsolicited`].
    /// After an error the connection is out of sync and must be closed.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Option<Response>, ExchangeError> {
        if !self.awaiting && !bytes.is_empty() {
            return Err(ExchangeError::Unsolicited);
        }
        self.decoder.push(bytes);
        match self.decoder.next_message::<Response>()? {
            Some(r) => {
                self.awaiting = false;
                if self.decoder.buffered() > 0 {
                    return Err(ExchangeError::Unsolicited);
                }
                Ok(Some(r))
            }
            None => Ok(None),
        }
    }

    /// Call when the stream ended: fine between exchanges, an error while a
    /// response is due.
    pub fn closed(&self) -> Result<(), ExchangeError> {
        if self.awaiting || self.decoder.buffered() > 0 {
            Err(ExchangeError::Closed {
                awaiting: self.awaiting,
                partial: self.decoder.buffered(),
            })
        } else {
            Ok(())
        }
    }
}

/// The server side: turns received bytes into requests, one at a time, and
/// encodes the answer to each.
#[derive(Debug, Clone)]
pub struct ServerExchange {
    decoder: FrameDecoder,
    answering: bool,
}

impl Default for ServerExchange {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl ServerExchange {
    /// An exchange accepting requests of up to `max` bytes (capped at
    /// [`MAX_FRAME_LEN`]).
    pub fn new(max: usize) -> Self {
        ServerExchange {
            decoder: FrameDecoder::new(max),
            answering: false,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.decoder.push(bytes);
    }

    /// Bytes of a request received but not yet complete (0: between
    /// requests).
    pub fn partial(&self) -> usize {
        self.decoder.buffered()
    }

    /// Whether a request was taken and its answer is still due.
    pub fn answering(&self) -> bool {
        self.answering
    }

    /// The next complete request, if one has arrived. A frame error also
    /// makes an answer due (the server reports the error with
    /// [`respond`](Self::respond), then closes: the stream is out of sync and
    /// every later call returns the same error).
    pub fn next_request(&mut self) -> Result<Option<Request>, ExchangeError> {
        if self.answering {
            return Err(ExchangeError::Busy);
        }
        match self.decoder.next_message::<Request>() {
            Ok(Some(r)) => {
                self.answering = true;
                Ok(Some(r))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.answering = true;
                Err(ExchangeError::Frame(e))
            }
        }
    }

    /// The frame answering the outstanding request.
    pub fn respond(&mut self, resp: &Response) -> Result<Vec<u8>, ExchangeError> {
        if !self.answering {
            return Err(ExchangeError::NoRequest);
        }
        let bytes = frame::encode(resp)?;
        self.answering = false;
        Ok(bytes)
    }

    /// Call when the stream ended: fine between requests, an error inside one.
    pub fn closed(&self) -> Result<(), ExchangeError> {
        if self.decoder.buffered() > 0 {
            Err(ExchangeError::Closed {
                awaiting: false,
                partial: self.decoder.buffered(),
            })
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{ApiError, ApiRequest, Reply};

    fn pair() -> (ClientExchange, ServerExchange) {
        (ClientExchange::default(), ServerExchange::default())
    }

    #[test]
    fn one_request_one_response_in_pieces() {
        let (mut c, mut s) = pair();
        for _ in 0..3 {
            let req = Request::Api(ApiRequest::Nodes);
            let bytes = c.request(&req).unwrap();
            for b in &bytes {
                assert_eq!(s.next_request().unwrap(), None);
                s.push(core::slice::from_ref(b));
            }
            assert_eq!(s.next_request().unwrap(), Some(req));
            let resp: Response = Ok(Reply::Done);
            let out = s.respond(&resp).unwrap();
            let (a, b) = out.split_at(3);
            assert_eq!(c.receive(a).unwrap(), None);
            assert_eq!(c.receive(b).unwrap(), Some(resp));
            c.closed().unwrap();
            s.closed().unwrap();
        }
    }

    #[test]
    fn client_may_not_send_before_the_answer() {
        let mut c = ClientExchange::default();
        c.request(&Request::Api(ApiRequest::Nodes)).unwrap();
        assert_eq!(
            c.request(&Request::Api(ApiRequest::Nodes)),
            Err(ExchangeError::Busy)
        );
        assert!(matches!(
            c.closed(),
            Err(ExchangeError::Closed { awaiting: true, .. })
        ));
    }

    #[test]
    fn unsolicited_bytes_are_an_error() {
        let mut c = ClientExchange::default();
        assert_eq!(c.receive(&[0, 0, 0, 1, 0]), Err(ExchangeError::Unsolicited));
        // A response followed by more bytes: the extra bytes were not asked for.
        let mut c = ClientExchange::default();
        c.request(&Request::Api(ApiRequest::Nodes)).unwrap();
        let mut bytes = frame::encode(&Response::Ok(Reply::Done)).unwrap();
        bytes.extend_from_slice(&[0, 0]);
        assert_eq!(c.receive(&bytes), Err(ExchangeError::Unsolicited));
    }

    #[test]
    fn pipelined_requests_are_taken_in_order_after_each_answer() {
        let (mut c1, mut s) = pair();
        let mut c2 = ClientExchange::default();
        let a = Request::Api(ApiRequest::Nodes);
        let b = Request::Api(ApiRequest::Status);
        s.push(&c1.request(&a).unwrap());
        s.push(&c2.request(&b).unwrap());
        assert_eq!(s.next_request().unwrap(), Some(a));
        assert_eq!(s.next_request(), Err(ExchangeError::Busy));
        s.respond(&Ok(Reply::Done)).unwrap();
        assert_eq!(s.next_request().unwrap(), Some(b));
        assert_eq!(
            s.respond(&Ok(Reply::Done)).map(|_| ()),
            Ok(()),
            "one answer per request"
        );
        assert_eq!(s.respond(&Ok(Reply::Done)), Err(ExchangeError::NoRequest));
    }

    #[test]
    fn bad_frame_gets_one_error_answer_then_stays_broken() {
        let mut s = ServerExchange::new(1024);
        s.push(&(1_000_000u32).to_be_bytes());
        assert!(matches!(
            s.next_request(),
            Err(ExchangeError::Frame(FrameError::TooLarge { .. }))
        ));
        let resp: Response = Err(ApiError::InvalidArgument("bad frame".into()));
        s.respond(&resp).unwrap();
        assert!(s.next_request().is_err());
    }

    #[test]
    fn stream_ending_inside_a_request_is_reported() {
        let mut s = ServerExchange::default();
        s.push(&[0, 0]);
        assert_eq!(s.next_request().unwrap(), None);
        assert_eq!(s.partial(), 2);
        assert_eq!(
            s.closed(),
            Err(ExchangeError::Closed {
                awaiting: false,
                partial: 2
            })
        );
    }
}
