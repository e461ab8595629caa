//! `routing::ReplyTokens::send_local` on a real nucleus.

mod common;

use common::{contract, image, nucleus, EMPTY, MS};
use metta_nucleus::routing::{route_in, Local, ReplyTokens};
use metta_nucleus::{Caps, Undeliverable};
use metta_proto::abi;

#[test]
fn a_message_goes_to_the_serving_domain_with_a_token_or_comes_back() {
    let mut n = nucleus();
    let img = image(EMPTY);
    let c = contract(MS, 10 * MS, false);
    let a = n
        .spawn("a", &img, c, Caps::with_channels(["/a"]), 0)
        .unwrap();
    let b = n
        .spawn("b", &img, c, Caps::with_channels(["/svc"]), 0)
        .unwrap();
    assert_eq!(route_in(&n, a, "/svc/x"), Some(b));
    let mut tokens = ReplyTokens::new();
    let sent = tokens.send_local(&mut n, a, "/svc/x", b"hi".to_vec(), 'a', 0);
    assert_eq!(sent, Local::Delivered(b));
    assert_eq!(tokens.len(), 1);
    // Nobody else serves /a: the payload comes back, no token kept.
    let back = tokens.send_local(&mut n, a, "/a", b"x".to_vec(), 'a', 0);
    assert_eq!(back, Local::NoRoute(b"x".to_vec()));
    assert_eq!(tokens.len(), 1);
    // Refused (too big, then a full inbox): the token is forgotten again.
    let big = vec![0; abi::MAX_MESSAGE + 1];
    let r = tokens.send_local(&mut n, a, "/svc", big, 'a', 0);
    assert!(
        matches!(r, Local::Refused(Undeliverable::TooBig(_))),
        "{r:?}"
    );
    assert_eq!(tokens.len(), 1);
    let full = (0..abi::INBOX_DEPTH + 1)
        .map(|_| tokens.send_local(&mut n, a, "/svc", vec![], 'a', 0))
        .last()
        .unwrap();
    assert!(
        matches!(full, Local::Refused(Undeliverable::Full(_))),
        "{full:?}"
    );
    assert_eq!(tokens.len(), abi::INBOX_DEPTH);
}
