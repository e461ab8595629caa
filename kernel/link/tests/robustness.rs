//! Bytes from the network never make a session panic.

mod common;

use common::*;
use metta_link::{LinkConfig, Session};
use metta_proto::{ApiRequest, Request, Subject};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random chunks in place of a server.
    #[test]
    fn random_chunks_never_panic(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..12),
        record_header in any::<bool>(),
    ) {
        let pin = metta_link::CaPin([7; 32]);
        let mut s = Session::new(&LinkConfig::join(pin), T0, &entropy()).unwrap();
        s.send_frame(&Request::Api(ApiRequest::Status)).unwrap();
        for (i, c) in chunks.iter().enumerate() {
            let mut c = c.clone();
            if record_header && i == 0 {
                // look like a handshake record so rustls parses deeper
                let mut hdr = vec![22, 3, 3, (c.len() >> 8) as u8, c.len() as u8];
                hdr.append(&mut c);
                c = hdr;
            }
            let _ = s.receive(&c);
            let _ = s.take_transmit();
            let _ = s.poll_response();
        }
        let _ = s.connection_closed();
    }
}

/// A real server flight with bytes flipped: the session fails cleanly.
#[test]
fn mutated_server_flights_never_panic() {
    let ca = ca("lab");
    let server_party = party(&ca, Subject::Node(1), 3600, true);
    let cfg = server_config(&ca, &server_party, T0);
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut failures = 0;
    for round in 0..200 {
        let mut client = Session::new(&LinkConfig::join(pin(&ca)), T0, &entropy()).unwrap();
        client
            .send_frame(&Request::Api(ApiRequest::Status))
            .unwrap();
        let mut server = Server::new(cfg.clone());
        server.feed(&client.take_transmit());
        let mut flight = server.take();
        for _ in 0..=(round % 4) {
            let i = (next() as usize) % flight.len();
            flight[i] ^= 1 << (next() % 8);
        }
        // delivered in uneven pieces
        let mut rest = &flight[..];
        while !rest.is_empty() {
            let n = ((next() as usize) % 700 + 1).min(rest.len());
            let (piece, tail) = rest.split_at(n);
            rest = tail;
            if client.receive(piece).is_err() {
                failures += 1;
                break;
            }
        }
        let _ = client.take_transmit();
    }
    // almost every flipped bit breaks the handshake (a flip inside padding or
    // an ignored field may not)
    assert!(failures > 150, "{failures}");
}
