//! The server side of the host tests: a real rustls (ring) server configured
//! like `mettad`'s listener (`metta_control::transport::server_config`: TLS
//! 1.3 only, ALPN `metta/1`, client certificates optional but verified by
//! `metta_trust::ClusterClientVerifier`, no session resumption), with
//! certificates from `metta_trust::ClusterCa`, wired to a
//! `metta_link::Session` through in-memory byte pipes.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metta_link::{LinkError, Session};
use metta_proto::{frame, FrameDecoder, Request, Response, Subject, ALPN};
use metta_trust::{make_csr, ClusterCa, ClusterClientVerifier, NodeKey, RevocationList};
use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::time_provider::TimeProvider;
use rustls::{ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, UnixTime};

pub const T0: u64 = 1_700_000_000;

#[derive(Debug)]
pub struct FixedTime(pub u64);

impl TimeProvider for FixedTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(Duration::from_secs(self.0)))
    }
}

/// A fresh 32 bytes of "entropy" per call (tests need distinct, not secret).
pub fn entropy() -> [u8; 32] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    *blake3::hash(&n.to_le_bytes()).as_bytes()
}

pub fn ca(cluster: &str) -> ClusterCa {
    ClusterCa::create(cluster, T0, 86400 * 365).unwrap()
}

/// A server's certificate chain (leaf, then the CA unless `with_ca` is false) and key.
pub struct Party {
    pub key: NodeKey,
    pub chain: Vec<CertificateDer<'static>>,
}

pub fn party(ca: &ClusterCa, subject: Subject, lifetime: u64, with_ca: bool) -> Party {
    let key = NodeKey::generate().unwrap();
    let csr = make_csr(&key, &subject, ca.cluster()).unwrap();
    // Servers in these tests are control nodes, as the link requires.
    let cert = match subject {
        Subject::Node(id) => {
            ca.issue_node(&csr, id, metta_proto::Role::Control, T0, lifetime, [3; 16])
        }
        _ => ca.issue(&csr, &subject, T0, lifetime, [3; 16]),
    }
    .unwrap();
    let mut chain = vec![CertificateDer::from(cert.der)];
    if with_ca {
        chain.push(CertificateDer::from(ca.cert_der().to_vec()));
    }
    Party { key, chain }
}

/// mettad's server settings, with `provider` and a fixed clock.
pub fn server_config_with(
    provider: CryptoProvider,
    trust_ca: &ClusterCa,
    me: &Party,
    now: u64,
) -> Arc<ServerConfig> {
    let verifier = ClusterClientVerifier::new(
        trust_ca.cert_der(),
        Arc::new(RwLock::new(RevocationList::default())),
    )
    .unwrap();
    let mut tls = ServerConfig::builder_with_details(Arc::new(provider), Arc::new(FixedTime(now)))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(me.chain.clone(), me.key.tls_private_key())
        .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.session_storage = Arc::new(NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Arc::new(tls)
}

pub fn server_config(trust_ca: &ClusterCa, me: &Party, now: u64) -> Arc<ServerConfig> {
    server_config_with(rustls::crypto::ring::default_provider(), trust_ca, me, now)
}

/// The server end: a rustls connection and a request decoder.
pub struct Server {
    pub conn: ServerConnection,
    pub decoder: FrameDecoder,
    /// The first error the server hit, if any.
    pub error: Option<rustls::Error>,
}

impl Server {
    pub fn new(cfg: Arc<ServerConfig>) -> Server {
        Server {
            conn: ServerConnection::new(cfg).unwrap(),
            decoder: FrameDecoder::default(),
            error: None,
        }
    }

    /// Feeds TLS bytes from the client.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        let mut buf = [0u8; 4096];
        while !bytes.is_empty() && self.error.is_none() {
            match self.conn.read_tls(&mut bytes) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Err(e) = self.conn.process_new_packets() {
                self.error = Some(e);
            }
            // rustls bounds its plaintext buffer: drain it as we go.
            loop {
                match self.conn.reader().read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => self.decoder.push(&buf[..n]),
                }
            }
        }
    }

    /// TLS bytes for the client.
    pub fn take(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut out).is_err() {
                break;
            }
        }
        out
    }

    /// The next complete request, if one arrived.
    pub fn request(&mut self) -> Option<Request> {
        self.decoder.next_message::<Request>().unwrap()
    }

    /// Sends a response frame.
    pub fn respond(&mut self, resp: &Response) {
        self.send_raw(&frame::encode(resp).unwrap());
    }

    /// Sends raw application bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.conn.writer().write_all(bytes).unwrap();
    }

    /// The subject of the client's certificate, if it sent one.
    pub fn peer_subject(&self) -> Option<Subject> {
        self.conn
            .peer_certificates()
            .map(|c| metta_trust::parse_cert(&c[0]).unwrap().subject)
    }
}

/// Moves bytes both ways until neither side has anything to say or the
/// client fails.
pub fn pump(client: &mut Session, server: &mut Server) -> Result<(), LinkError> {
    for _ in 0..64 {
        let out = client.take_transmit();
        if !out.is_empty() {
            server.feed(&out);
        }
        let back = server.take();
        if !back.is_empty() {
            if let Err(e) = client.receive(&back) {
                // deliver the alert that tells the server why
                server.feed(&client.take_transmit());
                return Err(e);
            }
        }
        if out.is_empty() && back.is_empty() {
            return Ok(());
        }
    }
    panic!("the two ends kept talking");
}

/// The CA's pin as this crate spells it.
pub fn pin(ca: &ClusterCa) -> metta_link::CaPin {
    metta_link::CaPin(ca.pin().0)
}
