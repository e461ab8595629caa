//! The policy of the native node's link to the control plane, without I/O:
//! how long to wait before trying again ([`Backoff`]), what an attempt's
//! outcome means ([`after_join`], [`after_sync`], [`after_renew`]): go on, retry after a backoff (and why, for the log), or
//! stop with a distinct exit code and a line that says what happened; and
//! when to renew the node's certificate ([`Renewal`]).
//!
//! The binary's `src/link.rs` does the I/O (smoltcp TCP, the clock, the
//! entropy, halting between polls) around the sans-IO `metta-link` session
//! and follows these verdicts. The rules:
//!
//! - **Retry** what time can mend: nothing listens at the address or the
//!   connection timed out ([`IoError`]), the connection was closed or reset
//!   (a control plane restarting), a TLS or frame failure on the way (the
//!   network's bytes), and `unavailable` answers (no leader yet).
//! - **Stop** on what it cannot: the server is not the cluster the token
//!   pins ([`ExitCode::PinMismatch`]), the cluster rejected the token
//!   ([`ExitCode::TokenRejected`]), or refused the node or its certificate
//!   otherwise ([`ExitCode::LinkRefused`]). Retrying those would only hide
//!   them.
//! - A **sync** (`Request::Sync`, the member phase's request, which is also
//!   its heartbeat): its answer must be work; `unavailable` is retried, any
//!   other refusal is final ([`ExitCode::LinkRefused`]).
//! - A failed **renewal** is never fatal: the certificate in use is still
//!   valid, so it is tried again after [`RENEW_RETRY_SECS`].

use alloc::format;
use alloc::string::String;
use core::fmt;

use metta_link::{
    interpret_join, interpret_renew, JoinError, JoinToken, Joined, LinkError, NodeKey,
};
use metta_proto::{ApiError, NodeWork, Reply, Response};

use crate::exit::ExitCode;

/// The first retry waits this long.
pub const BACKOFF_INITIAL_MS: u64 = 500;
/// Retries never wait longer than this.
pub const BACKOFF_MAX_MS: u64 = 8_000;

/// Exponential backoff: [`BACKOFF_INITIAL_MS`], doubling up to
/// [`BACKOFF_MAX_MS`], back to the start after a success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    next_ms: u64,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

impl Backoff {
    /// A backoff that starts at [`BACKOFF_INITIAL_MS`].
    pub const fn new() -> Backoff {
        Backoff {
            next_ms: BACKOFF_INITIAL_MS,
            failures: 0,
        }
    }

    /// Counts a failure and returns how long to wait before the next try.
    pub fn fail(&mut self) -> u64 {
        let wait = self.next_ms;
        self.next_ms = (self.next_ms * 2).min(BACKOFF_MAX_MS);
        self.failures += 1;
        wait
    }

    /// Failures since the last [`reset`](Self::reset).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// After a success: the next failure waits [`BACKOFF_INITIAL_MS`] again.
    pub fn reset(&mut self) {
        *self = Backoff::new();
    }
}

/// Milliseconds shown as seconds: `0.5 s`, `1 s`, `2.25 s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seconds(pub u64);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, ms) = (self.0 / 1000, self.0 % 1000);
        if ms == 0 {
            write!(f, "{s} s")
        } else {
            let mut frac = format!("{ms:03}");
            while frac.ends_with('0') {
                frac.pop();
            }
            write!(f, "{s}.{frac} s")
        }
    }
}

/// What went wrong below TLS (the TCP connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// The connection attempt was refused (a reset in answer to the SYN:
    /// nothing listens there).
    Refused,
    /// `what` did not happen within `ms` milliseconds.
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// How long.
        ms: u64,
    },
    /// The established connection was reset.
    Reset,
    /// The TCP stack cannot address the destination (no source address or
    /// route).
    Unaddressable,
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::Refused => f.write_str("connection refused"),
            IoError::Timeout { what, ms } => write!(f, "no {what} within {}", Seconds(*ms)),
            IoError::Reset => f.write_str("connection reset"),
            IoError::Unaddressable => f.write_str("no route to the address"),
        }
    }
}

/// Why one exchange (connect, handshake, request, answer) failed.
#[derive(Clone, Debug)]
pub enum AttemptError {
    /// The TCP connection.
    Io(IoError),
    /// The TLS session or the frames on it.
    Link(LinkError),
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptError::Io(e) => e.fmt(f),
            AttemptError::Link(e) => e.fmt(f),
        }
    }
}

impl From<IoError> for AttemptError {
    fn from(e: IoError) -> Self {
        AttemptError::Io(e)
    }
}

impl From<LinkError> for AttemptError {
    fn from(e: LinkError) -> Self {
        AttemptError::Link(e)
    }
}

/// What to do after an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<T> {
    /// It worked.
    Done(T),
    /// Try again after the backoff; why it failed, for the log.
    Retry(String),
    /// Stop: print `message` and exit with `code`.
    Fatal {
        /// The exit code.
        code: ExitCode,
        /// The line to print.
        message: String,
    },
}

/// The line printed when the server is not the pinned cluster.
pub const PIN_REFUSAL: &str = "join refused: the server is not the cluster pinned by the token";

fn fatal<T>(code: ExitCode, message: String) -> Verdict<T> {
    Verdict::Fatal { code, message }
}

/// What a failure means: a [`Verdict`] that is never `Done`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Try again after the backoff; why it failed, for the log.
    Retry(String),
    /// Stop: print `message` and exit with `code`.
    Fatal {
        /// The exit code.
        code: ExitCode,
        /// The line to print.
        message: String,
    },
}

impl<T> From<Failure> for Verdict<T> {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Retry(why) => Verdict::Retry(why),
            Failure::Fatal { code, message } => Verdict::Fatal { code, message },
        }
    }
}

/// What a failed exchange means. `joining`: on the pinned session of a join
/// (else a member session with the node's certificate).
pub fn after_failure(e: AttemptError, joining: bool) -> Failure {
    let stop = |code, message| Failure::Fatal { code, message };
    let link = match e {
        AttemptError::Io(io) => return Failure::Retry(format!("{io}")),
        AttemptError::Link(l) => l,
    };
    match link {
        LinkError::PinMismatch => stop(ExitCode::PinMismatch, PIN_REFUSAL.into()),
        LinkError::NoEntropy => stop(ExitCode::NoEntropy, format!("link: {link}")),
        LinkError::CertificateRejected(p) => stop(
            ExitCode::LinkRefused,
            format!(
                "{}: the server's certificate was rejected: {p}",
                if joining { "join refused" } else { "link" }
            ),
        ),
        LinkError::ServerAlert(a) if joining => stop(
            ExitCode::LinkRefused,
            format!("join refused: the server ended the handshake with TLS alert {a:?}"),
        ),
        LinkError::ServerAlert(a) => stop(
            ExitCode::LinkRefused,
            format!("link: the cluster refused this node's certificate (TLS alert {a:?})"),
        ),
        e @ (LinkError::HandshakeFailed(_)
        | LinkError::Tls(_)
        | LinkError::BadFrame(_)
        | LinkError::Unsolicited
        | LinkError::PeerClosed { .. }) => Failure::Retry(format!("{e}")),
        e => stop(ExitCode::LinkRefused, format!("link: {e}")),
    }
}

/// What the answer to a join request means (checked with
/// [`interpret_join`] against the token's pin, our key and `now`).
pub fn after_join(
    answer: Result<Response, AttemptError>,
    token: &JoinToken,
    key: &NodeKey,
    now: u64,
) -> Verdict<Joined> {
    let resp = match answer {
        Ok(r) => r,
        Err(e) => return after_failure(e, true).into(),
    };
    match interpret_join(resp, token, key, now) {
        Ok(j) => Verdict::Done(j),
        Err(JoinError::PinMismatch) => fatal(ExitCode::PinMismatch, PIN_REFUSAL.into()),
        Err(JoinError::Refused(ApiError::Token(r))) => fatal(
            ExitCode::TokenRejected,
            format!("join refused: the cluster rejected token {}: {r}", token.id),
        ),
        Err(JoinError::Refused(ApiError::Unavailable(why))) => {
            Verdict::Retry(format!("the cluster is unavailable: {why}"))
        }
        Err(e) => fatal(ExitCode::LinkRefused, format!("join refused: {e}")),
    }
}

/// What the answer to a sync means: the work in it, or what a failure
/// means.
pub fn after_sync(answer: Result<Response, AttemptError>) -> Verdict<NodeWork> {
    let resp = match answer {
        Ok(r) => r,
        Err(e) => return after_failure(e, false).into(),
    };
    match resp {
        Ok(Reply::Work(w)) => Verdict::Done(w),
        Ok(other) => fatal(
            ExitCode::LinkRefused,
            format!(
                "link: the cluster answered a sync with {}, not work: is it older than this kernel?",
                reply_name(&other)
            ),
        ),
        Err(ApiError::Unavailable(why)) => {
            Verdict::Retry(format!("the cluster is unavailable: {why}"))
        }
        Err(e) => fatal(
            ExitCode::LinkRefused,
            format!("link: the cluster refused the sync: {e}"),
        ),
    }
}

/// The variant of a reply, for messages.
fn reply_name(r: &Reply) -> &'static str {
    match r {
        Reply::Done => "Done",
        Reply::Work(_) => "Work",
        Reply::Cert { .. } => "Cert",
        Reply::Joined(_) => "Joined",
        _ => "another reply",
    }
}

/// Wait this long after a failed renewal before trying again, s.
pub const RENEW_RETRY_SECS: u64 = 30;

/// When to renew the certificate: at two thirds of its lifetime, counted
/// from when the node received it (its `not_before` lies 5 minutes back
/// for clock skew, and a short-lived certificate would be due at once);
/// after a failure, [`RENEW_RETRY_SECS`] later. Times are unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewal {
    due_at: u64,
}

impl Renewal {
    /// For a certificate received at `received` that expires at `not_after`.
    pub fn new(received: u64, not_after: u64) -> Renewal {
        let lifetime = not_after.saturating_sub(received);
        Renewal {
            due_at: received + lifetime * 2 / 3,
        }
    }

    /// When it is due.
    pub fn due_at(&self) -> u64 {
        self.due_at
    }

    /// Whether it is due at `now`.
    pub fn due(&self, now: u64) -> bool {
        now >= self.due_at
    }

    /// A renewal attempt failed at `now`: try again later.
    pub fn failed(&mut self, now: u64) {
        self.due_at = now + RENEW_RETRY_SECS;
    }
}

/// What the answer to a renewal means: the node with its new certificate;
/// otherwise why not, as a line for the log (never fatal: see the module
/// docs). A broken connection is the caller's to handle, like a sync's.
pub fn after_renew(
    resp: Response,
    joined: &Joined,
    key: &NodeKey,
    now: u64,
) -> Result<Joined, String> {
    interpret_renew(resp, joined, key, now).map_err(|e| match e {
        JoinError::Refused(e) => format!("the cluster refused it: {e}"),
        JoinError::UnexpectedReply => "the cluster did not answer with a certificate".into(),
        e => format!("the new certificate is unusable: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use metta_proto::{Reply, TokenRejection};

    const TOKEN: &str = "metta1.0a1b2c3d.00112233445566778899aabbccddeeff.000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..7).map(|_| b.fail()).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
        assert_eq!(b.failures(), 7);
        b.reset();
        assert_eq!((b.fail(), b.failures()), (500, 1));
    }

    #[test]
    fn seconds() {
        assert_eq!(Seconds(500).to_string(), "0.5 s");
        assert_eq!(Seconds(8000).to_string(), "8 s");
        assert_eq!(Seconds(2250).to_string(), "2.25 s");
        assert_eq!(Seconds(1).to_string(), "0.001 s");
        assert_eq!(
            IoError::Timeout {
                what: "TCP connection",
                ms: 3000
            }
            .to_string(),
            "no TCP connection within 3 s"
        );
    }

    fn code<T>(v: Verdict<T>) -> Option<ExitCode> {
        match v {
            Verdict::Fatal { code, .. } => Some(code),
            _ => None,
        }
    }

    #[test]
    fn join_verdicts() {
        let token: JoinToken = TOKEN.parse().unwrap();
        let key = NodeKey::from_entropy(&[9; 32]).unwrap();
        let join = |a| after_join(a, &token, &key, 1_700_000_000);
        // Transient: nothing listening, a reset, a restart, no leader.
        assert_eq!(
            join(Err(AttemptError::Io(IoError::Refused))),
            Verdict::Retry("connection refused".into())
        );
        assert!(matches!(
            join(Err(LinkError::PeerClosed {
                awaiting: true,
                partial: 0
            }
            .into())),
            Verdict::Retry(_)
        ));
        assert!(matches!(
            join(Ok(Err(ApiError::Unavailable("no leader".into())))),
            Verdict::Retry(m) if m.contains("no leader")
        ));
        // The wrong cluster: refused for good, with the documented line.
        assert_eq!(
            join(Err(LinkError::PinMismatch.into())),
            Verdict::Fatal {
                code: ExitCode::PinMismatch,
                message: PIN_REFUSAL.into()
            }
        );
        // A rejected token names the token id and the reason, not the secret.
        match join(Ok(Err(ApiError::Token(TokenRejection::Used)))) {
            Verdict::Fatal { code, message } => {
                assert_eq!(code, ExitCode::TokenRejected);
                assert_eq!(
                    message,
                    "join refused: the cluster rejected token 0a1b2c3d: token already used"
                );
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(
            code(join(Ok(Err(ApiError::Token(TokenRejection::Unknown))))),
            Some(ExitCode::TokenRejected)
        );
        assert_eq!(
            code(join(Ok(Err(ApiError::InvalidArgument("name".into()))))),
            Some(ExitCode::LinkRefused)
        );
        assert_eq!(code(join(Ok(Ok(Reply::Done)))), Some(ExitCode::LinkRefused));
        assert_eq!(
            code(join(Err(LinkError::ServerAlert(
                rustls::AlertDescription::NoApplicationProtocol
            )
            .into()))),
            Some(ExitCode::LinkRefused)
        );
    }

    #[test]
    fn failures() {
        assert_eq!(
            after_failure(IoError::Refused.into(), true),
            Failure::Retry("connection refused".into())
        );
        assert_eq!(
            after_failure(LinkError::PinMismatch.into(), true),
            Failure::Fatal {
                code: ExitCode::PinMismatch,
                message: PIN_REFUSAL.into()
            }
        );
        let v: Verdict<()> = after_failure(IoError::Reset.into(), false).into();
        assert_eq!(v, Verdict::Retry("connection reset".into()));
    }

    #[test]
    fn sync_verdicts() {
        let w = NodeWork {
            stop: vec!["c1".into()],
            ..NodeWork::default()
        };
        assert_eq!(after_sync(Ok(Ok(Reply::Work(w.clone())))), Verdict::Done(w));
        assert_eq!(
            after_sync(Err(AttemptError::Io(IoError::Timeout {
                what: "answer",
                ms: 5_500
            }))),
            Verdict::Retry("no answer within 5.5 s".into())
        );
        assert!(matches!(
            after_sync(Ok(Err(ApiError::Unavailable("election".into())))),
            Verdict::Retry(m) if m == "the cluster is unavailable: election"
        ));
        match after_sync(Ok(Ok(Reply::Done))) {
            Verdict::Fatal { code, message } => {
                assert_eq!(code, ExitCode::LinkRefused);
                assert_eq!(
                    message,
                    "link: the cluster answered a sync with Done, not work: is it older than this kernel?"
                );
            }
            v => panic!("{v:?}"),
        }
        match after_sync(Ok(Err(ApiError::InvalidArgument(
            "native nodes only".into(),
        )))) {
            Verdict::Fatal { code, message } => {
                assert_eq!(code, ExitCode::LinkRefused);
                assert_eq!(
                    message,
                    "link: the cluster refused the sync: invalid argument: native nodes only"
                );
            }
            v => panic!("{v:?}"),
        }
        match after_sync(Err(LinkError::ServerAlert(
            rustls::AlertDescription::CertificateRevoked,
        )
        .into()))
        {
            Verdict::Fatal { code, message } => {
                assert_eq!(code, ExitCode::LinkRefused);
                assert!(
                    message.contains("refused this node's certificate"),
                    "{message}"
                );
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(
            code(after_sync(Ok(Err(ApiError::Unauthenticated)))),
            Some(ExitCode::LinkRefused)
        );
        assert!(matches!(
            after_sync(Err(IoError::Reset.into())),
            Verdict::Retry(m) if m == "connection reset"
        ));
    }

    #[test]
    fn renewal_at_two_thirds_of_the_lifetime_as_received() {
        // A day's certificate received at t = 1,000.
        let mut r = Renewal::new(1_000, 1_000 + 86_400);
        assert_eq!(r.due_at(), 1_000 + 57_600);
        assert!(!r.due(1_000 + 57_599));
        assert!(r.due(1_000 + 57_600));
        r.failed(60_000);
        assert_eq!(r.due_at(), 60_000 + RENEW_RETRY_SECS);
        assert!(!r.due(60_029) && r.due(60_030));
        // A short one (mettactl init --cert-lifetime 30s): due 20 s after
        // it came, not at once.
        let r = Renewal::new(500, 530);
        assert!(!r.due(519) && r.due(520));
        // Already expired by our clock: due now.
        assert!(Renewal::new(900, 800).due(900));
    }

    #[test]
    fn renewal_answers() {
        let key = NodeKey::from_entropy(&[9; 32]).unwrap();
        let joined = Joined {
            node_id: 7,
            cluster: "lab".into(),
            role: metta_proto::Role::Worker,
            cert_der: vec![],
            cert_not_after: 0,
            ca_der: vec![],
            members: vec![],
        };
        let why = |r| after_renew(r, &joined, &key, 0).unwrap_err();
        assert_eq!(
            why(Err(ApiError::Unavailable("no leader".into()))),
            "the cluster refused it: unavailable: no leader"
        );
        assert_eq!(
            why(Ok(Reply::Done)),
            "the cluster did not answer with a certificate"
        );
        assert!(why(Ok(Reply::Cert {
            cert_pem: "junk".into(),
            not_after: 0
        }))
        .starts_with("the new certificate is unusable: "));
    }
}
