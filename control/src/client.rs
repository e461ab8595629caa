//! The API client used by `mettactl`: mTLS with the credentials of a client
//! config, trying the listed endpoints in order until one answers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use metta_proto::{ApiError, ApiRequest, Reply, Request, Subject};
use metta_trust::{NodeKey, RevocationList};

use crate::config::ClientConfig;
use crate::transport::{self, CallError, Credentials, ServerTrust, Transport, TransportError};

/// How long [`Client::call`] keeps retrying while no node can serve a call.
pub const RETRY_WINDOW: Duration = Duration::from_secs(6);

/// An API client.
#[derive(Debug)]
pub struct Client {
    transport: Arc<Transport>,
    endpoints: Vec<String>,
    preferred: AtomicUsize,
    key: NodeKey,
    subject: Subject,
    cluster: String,
}

impl Client {
    /// Builds a client from a config.
    pub fn new(cfg: &ClientConfig) -> Result<Client, TransportError> {
        let key = NodeKey::from_pem(&cfg.key_pem)
            .map_err(|e| TransportError::Tls(format!("client key: {e}")))?;
        let creds = Credentials::from_pem(&cfg.cert_pem, &cfg.ca_pem, &key)?;
        let ca_der = metta_trust::cert::pem_to_der(&cfg.ca_pem)
            .map_err(|e| TransportError::Tls(format!("client CA: {e}")))?;
        let client = transport::client_config(
            Some(&creds),
            &ServerTrust::Cluster {
                ca_der,
                revoked: Arc::new(RwLock::new(RevocationList::default())),
            },
        )?;
        let subject = cfg
            .subject()
            .ok_or_else(|| TransportError::Tls(format!("bad subject {:?}", cfg.subject)))?;
        Ok(Client {
            transport: Transport::client(client)?,
            endpoints: cfg.endpoints.clone(),
            preferred: AtomicUsize::new(0),
            key,
            subject,
            cluster: cfg.cluster.clone(),
        })
    }

    /// Who this client is.
    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    /// The cluster name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The client's key (to sign grants).
    pub fn key(&self) -> &NodeKey {
        &self.key
    }

    /// Makes a call, trying each endpoint until one answers. An answer
    /// (success or [`ApiError`]) ends the search — except "unavailable" (no
    /// leader yet), which moves on. Rounds over the endpoints repeat for up to
    /// [`RETRY_WINDOW`], so a call made during an election waits for it. The
    /// endpoint that answered last is tried first next time.
    pub async fn call(&self, call: ApiRequest) -> Result<Reply, CallError> {
        let req = Request::Api(call);
        let deadline = Instant::now() + RETRY_WINDOW;
        let n = self.endpoints.len();
        loop {
            let mut last = None;
            let first = self.preferred.load(Ordering::Relaxed);
            for k in 0..n {
                let i = (first + k) % n;
                match self.transport.call_api(&self.endpoints[i], &req).await {
                    Ok(r) => {
                        self.preferred.store(i, Ordering::Relaxed);
                        return Ok(r);
                    }
                    Err(CallError::Api(ApiError::Unavailable(m))) => {
                        last = Some(CallError::Api(ApiError::Unavailable(m)))
                    }
                    Err(CallError::Api(e)) => return Err(CallError::Api(e)),
                    // Every node shares the CA and the revocation list: a
                    // refusal by one is a refusal by all.
                    Err(e @ CallError::Transport(TransportError::Refused { .. })) => return Err(e),
                    Err(e) => last = Some(e),
                }
            }
            let err = last.unwrap_or(CallError::Api(ApiError::Unavailable(
                "no endpoints configured".into(),
            )));
            if Instant::now() + Duration::from_millis(100) >= deadline {
                return Err(err);
            }
            // Bounded back-off before the next round; the deadline ends it.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.transport.close();
    }
}
