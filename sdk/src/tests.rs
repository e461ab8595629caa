//! Host tests: error mapping, the ABI mirror against `proto/src/abi.rs`, and
//! the channel wrappers against the fake nucleus in `sys::fake`.

extern crate std;

use crate::sys::fake;
use crate::*;
use std::string::{String, ToString};
use std::vec::Vec;
use std::{format, vec};

#[test]
fn error_codes_round_trip() {
    for code in -8..=-1 {
        let e = Error::from_code(code).expect("negative is an error");
        assert_eq!(e.code(), code);
    }
    assert_eq!(Error::from_code(-1), Some(Error::Denied));
    assert_eq!(Error::from_code(-2), Some(Error::BadChannel));
    assert_eq!(Error::from_code(-3), Some(Error::Empty));
    assert_eq!(Error::from_code(-4), Some(Error::TooBig));
    assert_eq!(Error::from_code(-5), Some(Error::Fault));
    assert_eq!(Error::from_code(-6), Some(Error::Full));
    assert_eq!(Error::from_code(-7), Some(Error::NoEntry));
    assert_eq!(Error::from_code(-8), Some(Error::Unknown(-8)));
    assert_eq!(Error::from_code(i32::MIN), Some(Error::Unknown(i32::MIN)));
    assert_eq!(Error::from_code(0), None);
    assert_eq!(Error::from_code(7), None);
    assert_eq!(Error::check(5), Ok(5));
    assert_eq!(Error::check(-6), Err(Error::Full));
    assert_eq!(Error::Unknown(-99).to_string(), "unknown error -99");
    assert_eq!(Error::TooBig.to_string(), "too big");
}

#[test]
fn reason_and_run_values() {
    for raw in -1..6 {
        assert_eq!(Reason::from_raw(raw).raw(), raw);
    }
    assert_eq!(Reason::from_raw(abi::REASON_START), Reason::Start);
    assert_eq!(Reason::from_raw(abi::REASON_CONTINUE), Reason::Continue);
    assert_eq!(Reason::from_raw(9), Reason::Other(9));
    assert_eq!(Run::Idle.raw(), abi::RUN_IDLE);
    assert_eq!(Run::More.raw(), abi::RUN_MORE);
    assert_eq!(Run::more_if(true), Run::More);
}

/// Every constant of `proto/src/abi.rs` (the definition of ABI v1) has the
/// same value here, and this mirror has nothing extra.
#[test]
fn abi_matches_proto() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/src/abi.rs");
    let src = std::fs::read_to_string(path).expect("read proto/src/abi.rs");
    let mut proto: Vec<(String, String)> = Vec::new();
    // Constants may span lines: join everything, split on `pub const`.
    let flat: String = src
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join(" ");
    for item in flat.split("pub const ").skip(1) {
        let item = item.rsplit_once(';').map_or(item, |(item, _)| item);
        let (name, rest) = item.split_once(':').expect("NAME: TYPE = VALUE");
        let value = rest.split_once('=').expect("= VALUE").1;
        proto.push((name.trim().to_string(), normalize(value)));
    }
    let mirror: Vec<(&str, String)> = vec![
        ("MODULE", format!("{:?}", abi::MODULE)),
        ("ACTIVATE", format!("{:?}", abi::ACTIVATE)),
        ("MEMORY", format!("{:?}", abi::MEMORY)),
        ("REASON_START", abi::REASON_START.to_string()),
        ("REASON_EVENTS", abi::REASON_EVENTS.to_string()),
        ("REASON_TIMER", abi::REASON_TIMER.to_string()),
        ("REASON_CONTINUE", abi::REASON_CONTINUE.to_string()),
        ("RUN_IDLE", abi::RUN_IDLE.to_string()),
        ("RUN_MORE", abi::RUN_MORE.to_string()),
        ("LOG", format!("{:?}", abi::LOG)),
        ("NOW", format!("{:?}", abi::NOW)),
        ("TIMER", format!("{:?}", abi::TIMER)),
        ("OPEN", format!("{:?}", abi::OPEN)),
        ("SEND", format!("{:?}", abi::SEND)),
        ("RECV", format!("{:?}", abi::RECV)),
        ("PEEK", format!("{:?}", abi::PEEK)),
        ("REPLY", format!("{:?}", abi::REPLY)),
        ("ERR_DENIED", abi::ERR_DENIED.to_string()),
        ("ERR_BADCHAN", abi::ERR_BADCHAN.to_string()),
        ("ERR_EMPTY", abi::ERR_EMPTY.to_string()),
        ("ERR_TOO_BIG", abi::ERR_TOO_BIG.to_string()),
        ("ERR_FAULT", abi::ERR_FAULT.to_string()),
        ("ERR_FULL", abi::ERR_FULL.to_string()),
        ("ERR_NOENT", abi::ERR_NOENT.to_string()),
        ("MAX_MESSAGE", abi::MAX_MESSAGE.to_string()),
        ("INBOX_DEPTH", abi::INBOX_DEPTH.to_string()),
        ("IMPORTS", format!("{:?}", abi::IMPORTS)),
    ];
    let resolve = |v: &str| -> String {
        // `IMPORTS` is a list of names of other constants: substitute them.
        if let Some(list) = v.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
            let items: Vec<String> = list
                .split(',')
                .map(|n| n.trim())
                .filter(|n| !n.is_empty())
                .map(|n| {
                    proto
                        .iter()
                        .find(|(k, _)| k == n)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_else(|| n.to_string())
                })
                .collect();
            format!("[{}]", items.join(", "))
        } else {
            v.to_string()
        }
    };
    for (name, value) in &proto {
        let ours = mirror.iter().find(|(n, _)| n == name).unwrap_or_else(|| {
            panic!("proto ABI constant {name} is not mirrored in sdk/src/abi.rs")
        });
        assert_eq!(
            resolve(value),
            ours.1,
            "ABI constant {name} differs between proto and sdk"
        );
    }
    for (name, _) in &mirror {
        assert!(
            proto.iter().any(|(n, _)| n == name),
            "sdk/src/abi.rs has {name}, which proto/src/abi.rs no longer defines"
        );
    }
    assert_eq!(proto.len(), mirror.len());
}

/// A constant's value as the mirror prints it: products of integer literals
/// evaluated, string literals and lists kept.
fn normalize(v: &str) -> String {
    let v = v.trim();
    if v.split('*')
        .all(|f| f.trim().replace('_', "").parse::<i64>().is_ok())
    {
        let p: i64 = v
            .split('*')
            .map(|f| f.trim().replace('_', "").parse::<i64>().unwrap())
            .product();
        return p.to_string();
    }
    v.to_string()
}

#[test]
fn open_send_recv_reply() {
    fake::reset();
    fake::serve("/svc/a");
    fake::deny("/secret");
    assert_eq!(Channel::open("/nope"), Err(Error::NoEntry));
    assert_eq!(Channel::open("/secret"), Err(Error::Denied));
    let a = Channel::open("/svc/a").unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(a.recv(&mut buf), Ok(None));
    assert_eq!(a.peek(), Ok(None));
    assert_eq!(a.reply_to(), Err(Error::NoEntry));

    fake::deliver("/svc/a", "client", b"hello");
    assert_eq!(a.peek(), Ok(Some(5)));
    assert_eq!(a.recv(&mut buf), Ok(Some(5)));
    assert_eq!(&buf[..5], b"hello");
    a.reply(b"hi").unwrap();
    assert_eq!(
        fake::take_sent(),
        vec![("reply:client".to_string(), b"hi".to_vec())]
    );

    assert_eq!(Channel::from_raw(99).send(b"x"), Err(Error::BadChannel));
    fake::set_full(true);
    assert_eq!(a.send(b"x"), Err(Error::Full));
    fake::set_full(false);
    let huge = vec![0u8; MAX_MESSAGE + 1];
    assert_eq!(a.send(&huge), Err(Error::TooBig));
}

#[test]
fn too_big_stays_queued_until_skipped() {
    fake::reset();
    fake::serve("/svc/a");
    let a = Channel::open("/svc/a").unwrap();
    fake::deliver("/svc/a", "c", &[7u8; 100]);
    fake::deliver("/svc/a", "c", b"next");
    let mut small = [0u8; 16];
    assert_eq!(a.recv(&mut small), Err(Error::TooBig));
    assert_eq!(a.recv(&mut small), Err(Error::TooBig));
    assert_eq!(a.peek(), Ok(Some(100)));
    assert_eq!(a.skip(), Ok(Some(100)));
    assert_eq!(a.recv(&mut small), Ok(Some(4)));
    assert_eq!(a.skip(), Ok(None));
}

#[test]
fn named_channel_reopens_stale_handles() {
    fake::reset();
    fake::serve("/ctl");
    static CTL: NamedChannel = NamedChannel::new("/ctl");
    CTL.forget(); // statics are shared between test threads
    assert_eq!(CTL.cached(), None);
    let mut buf = [0u8; 16];
    assert_eq!(CTL.recv(&mut buf), Ok(None));
    let first = CTL.cached().expect("opened on first use");
    fake::deliver("/ctl", "admin", b"status");
    fake::restore(); // every handle is now stale
    assert_eq!(first.recv(&mut buf), Err(Error::BadChannel));
    assert_eq!(CTL.recv(&mut buf), Ok(Some(6)));
    assert_ne!(CTL.cached(), Some(first));
    CTL.reply(b"fine").unwrap();
    assert_eq!(
        fake::take_sent(),
        vec![("reply:admin".to_string(), b"fine".to_vec())]
    );
    CTL.forget();
}

#[test]
fn log_clock_and_timer() {
    fake::reset();
    log("plain");
    logf!("n={} s={}", 42, "x");
    let long = "y".repeat(400);
    logf!("{long}");
    let logs = fake::take_logs();
    assert_eq!(logs[0], "plain");
    assert_eq!(logs[1], "n=42 s=x");
    assert_eq!(logs[2].len(), 256);

    fake::set_now(1_000);
    assert_eq!(now(), 1_000);
    fake::set_now(abi::ERR_DENIED as i64);
    assert_eq!(try_now(), Err(Error::Denied));
    assert_eq!(now(), 0);

    set_timer(5_000);
    assert_eq!(fake::timer_deadline(), Some(5_000));
    set_timer(u64::MAX);
    assert_eq!(fake::timer_deadline(), Some(i64::MAX));
    cancel_timer();
    assert_eq!(fake::timer_deadline(), None);
}

mod entry_macro {
    use crate::{Reason, Run};

    crate::entry!(
        /// A handler that is busy only when continued.
        fn activate(reason: Reason) -> Run {
            Run::more_if(reason == Reason::Continue)
        }
    );

    #[test]
    fn emits_metta_activate() {
        assert_eq!(
            metta_activate(crate::abi::REASON_START),
            crate::abi::RUN_IDLE
        );
        assert_eq!(
            metta_activate(crate::abi::REASON_CONTINUE),
            crate::abi::RUN_MORE
        );
        assert_eq!(metta_activate(42), crate::abi::RUN_IDLE);
    }
}
