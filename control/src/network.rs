//! openraft's network over the Metta transport: each Raft RPC is one
//! [`Request::Raft`] frame on a fresh QUIC stream of the (cached, mTLS)
//! connection to the target member.

use std::sync::{Arc, RwLock};

use metta_proto::{RaftRpc, Reply, Request, Role, Subject};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{de::DeserializeOwned, Serialize};

use crate::raft_types::TypeConfig;
use crate::registry::Registry;
use crate::transport::{Transport, TransportError};

/// Encodes a Raft message for the wire.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(v)
}

/// Decodes a Raft message from the wire.
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(b)
}

/// Makes a [`Network`] per target.
#[derive(Debug, Clone)]
pub struct NetworkFactory {
    /// The node's transport.
    pub transport: Arc<Transport>,
    /// The registry: which targets are control nodes.
    pub registry: Arc<RwLock<Registry>>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Network {
        Network {
            transport: self.transport.clone(),
            registry: self.registry.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

/// The connection to one member.
#[derive(Debug)]
pub struct Network {
    transport: Arc<Transport>,
    registry: Arc<RwLock<Registry>>,
    target: u64,
    addr: String,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<u64, BasicNode, RaftError<u64, E>>;

impl Network {
    /// Whether the target is a control node (a voter, which may tell a
    /// leader or candidate about a newer term). A worker is a learner only:
    /// what it says about votes is not believed.
    fn target_votes(&self) -> bool {
        self.registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .nodes
            .get(&self.target)
            .is_some_and(|n| n.role == Role::Control)
    }

    /// A learner claiming a newer vote: treated as unreachable, so a
    /// worker's certificate cannot make a leader step down.
    fn disbelieved<E: std::error::Error>(&self, what: &str) -> RpcErr<E> {
        let e = std::io::Error::other(format!(
            "node/{} is not a voter and answered with {what}; not believed",
            self.target
        ));
        tracing::warn!("{e}");
        RPCError::Unreachable(Unreachable::new(&e))
    }

    async fn rpc<Req, Resp, E>(
        &self,
        wrap: fn(Vec<u8>) -> RaftRpc,
        req: &Req,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let bytes = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        // The server must be the node this connection is for.
        let reply = match self
            .transport
            .call_node(
                &self.addr,
                &Subject::Node(self.target),
                &Request::Raft(wrap(bytes)),
            )
            .await
        {
            Ok(r) => r,
            Err(
                e @ (TransportError::Connect { .. }
                | TransportError::Refused { .. }
                | TransportError::Resolve { .. }),
            ) => return Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => return Err(RPCError::Network(NetworkError::new(&e))),
        };
        match reply {
            Ok(Reply::Raft(b)) => {
                let r: Result<Resp, RaftError<u64, E>> =
                    decode(&b).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(other) => Err(RPCError::Network(NetworkError::new(
                &std::io::Error::other(format!("unexpected reply to a Raft RPC: {other:?}")),
            ))),
            Err(api) => Err(RPCError::Unreachable(Unreachable::new(&api))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        let r: AppendEntriesResponse<u64> = self.rpc(RaftRpc::AppendEntries, &rpc).await?;
        if matches!(r, AppendEntriesResponse::HigherVote(_)) && !self.target_votes() {
            return Err(self.disbelieved("a higher vote"));
        }
        Ok(r)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        let r: InstallSnapshotResponse<u64> = self.rpc(RaftRpc::InstallSnapshot, &rpc).await?;
        if r.vote > rpc.vote && !self.target_votes() {
            return Err(self.disbelieved("a higher vote"));
        }
        Ok(r)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr> {
        let r: VoteResponse<u64> = self.rpc(RaftRpc::Vote, &rpc).await?;
        if r.vote > rpc.vote && !self.target_votes() {
            return Err(self.disbelieved("a higher vote"));
        }
        Ok(r)
    }
}
