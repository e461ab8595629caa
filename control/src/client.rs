//! The API client used by `mettactl`: mTLS with the credentials of a client
//! config, trying the listed endpoints in order until one answers.

use std::sync::{Arc, RwLock};

use metta_proto::{ApiError, ApiRequest, Reply, Request, Subject};
use metta_trust::{NodeKey, RevocationList};

use crate::config::ClientConfig;
use crate::transport::{self, CallError, Credentials, ServerTrust, Transport, TransportError};

/// An API client.
#[derive(Debug)]
pub struct Client {
    transport: Arc<Transport>,
    endpoints: Vec<String>,
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

    /// Makes a call, trying each endpoint until one is reachable. An answer
    /// (success or [`ApiError`]) from any node ends the search — except
    /// "unavailable", which moves on to the next endpoint.
    pub async fn call(&self, call: ApiRequest) -> Result<Reply, CallError> {
        let req = Request::Api(call);
        let mut last = None;
        for ep in &self.endpoints {
            match self.transport.call_api(ep, &req).await {
                Ok(r) => return Ok(r),
                Err(CallError::Api(ApiError::Unavailable(m))) => {
                    last = Some(CallError::Api(ApiError::Unavailable(m)))
                }
                Err(CallError::Api(e)) => return Err(CallError::Api(e)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(CallError::Api(ApiError::Unavailable(
            "no endpoints configured".into(),
        ))))
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.transport.close();
    }
}
