//! The domain API on the leader: vendors, images, `run` (placement and
//! counter-offers), `ps`, `logs`, `stop`, `call`. Calls about a running
//! domain are relayed to the node that runs it ([`NodeCall`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use metta_proto::{
    ApiError, ApiRequest, CounterOffer, DomainRuntime, DomainStatus, NodeCall, NodeId, Reply,
    Response, Right, Rights, RunSpec, Subject,
};
use metta_scheduler::{Cluster, NodeSpec, PlaceError, Request as PlaceRequest, Strategy};
use metta_trust::image::{user_caps, verify_image};
use metta_trust::UnixTime;

use super::{internal, Node};
use crate::domains::Reach;
use crate::registry::{Applied, Command, DomainRecord, Registry};

/// Largest module `image push` accepts.
pub const MAX_MODULE_BYTES: usize = 8 << 20;
/// How long `run` waits for the domain's first activation.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `ps` waits for each node's report.
pub const STATS_TIMEOUT: Duration = Duration::from_secs(2);

impl Node {
    /// Resolves a node given by name or id.
    fn find_node(&self, node: &str) -> Result<NodeId, ApiError> {
        let reg = self.registry();
        if let Some(n) = reg.nodes.values().find(|n| n.name == node) {
            return Ok(n.id);
        }
        let id = node
            .strip_prefix("node/")
            .unwrap_or(node)
            .parse::<NodeId>()
            .ok()
            .filter(|id| reg.nodes.contains_key(id));
        id.ok_or_else(|| ApiError::NotFound(format!("node {node:?}")))
    }

    pub(super) async fn label_node(
        &self,
        node: &str,
        key: String,
        value: Option<String>,
    ) -> Response {
        let id = self.find_node(node)?;
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        };
        if !ok(&key) || value.as_deref().is_some_and(|v| !ok(v)) {
            return Err(ApiError::InvalidArgument(
                "label keys and values are 1-63 characters of [A-Za-z0-9-_./]".into(),
            ));
        }
        self.write(Command::NodeLabel { id, key, value }).await?;
        Ok(Reply::Done)
    }

    /// Sends `call` to node `id` (or serves it here).
    async fn node_call(&self, id: NodeId, call: NodeCall) -> Response {
        if id == self.cfg.node_id {
            return self.domains.serve(call).await;
        }
        match self.domains.reach(id, call) {
            Reach::Native(call) => self.native.serve(id, call).await,
            Reach::Remote(addr, req, expect) => self
                .transport
                .call_node(&addr, &expect, &req)
                .await
                .unwrap_or_else(|e| {
                    let name = self
                        .registry()
                        .nodes
                        .get(&id)
                        .map_or_else(|| format!("node/{id}"), |n| n.name.clone());
                    Err(ApiError::Unavailable(format!(
                        "node {name} ({addr}) unreachable: {e}"
                    )))
                }),
            Reach::Gone => Err(ApiError::NotFound(format!("node/{id}"))),
        }
    }

    /// The domain `name`, if `subject` launched it or holds `right` on
    /// `/domains/<name>`.
    fn domain_for(
        &self,
        subject: &Subject,
        name: &str,
        right: Right,
        now: UnixTime,
    ) -> Result<DomainRecord, ApiError> {
        let reg = self.registry();
        let rec = reg.domains.get(name).cloned();
        match rec {
            Some(d) if d.owner == *subject => Ok(d),
            Some(d) => {
                reg.authorize(subject, Rights::of(right), &format!("/domains/{name}"), now)?;
                Ok(d)
            }
            None => {
                // Do not tell who may not look whether the name exists.
                reg.authorize(subject, Rights::of(right), &format!("/domains/{name}"), now)?;
                Err(ApiError::NotFound(format!("domain {name}")))
            }
        }
    }

    pub(super) async fn domain_call(
        self: &Arc<Self>,
        subject: Subject,
        call: ApiRequest,
        now: UnixTime,
    ) -> Response {
        match call {
            ApiRequest::VendorAdd { name, spki_der } => {
                self.write(Command::VendorAdd { name, spki_der }).await?;
                Ok(Reply::Done)
            }
            ApiRequest::VendorRemove { name } => {
                self.write(Command::VendorRemove { name }).await?;
                Ok(Reply::Done)
            }
            ApiRequest::Vendors => Ok(Reply::Vendors(self.registry().vendor_infos())),
            ApiRequest::ImagePush { manifest, wasm } => {
                if wasm.len() > MAX_MODULE_BYTES {
                    return Err(ApiError::ImageRejected(format!(
                        "the module is {} bytes; the limit is {MAX_MODULE_BYTES}",
                        wasm.len()
                    )));
                }
                verify_image(&manifest, &wasm, &self.registry().vendors)
                    .map_err(|e| ApiError::ImageRejected(e.to_string()))?;
                metta_nucleus::Image::load(&wasm)
                    .map_err(|e| ApiError::ImageRejected(format!("not a domain module: {e}")))?;
                let name = manifest.manifest.name.clone();
                self.write(Command::ImagePut {
                    signed: manifest,
                    wasm,
                    pushed_by: subject,
                })
                .await?;
                let reg = self.registry();
                let info = reg
                    .images
                    .get(&name)
                    .map(|r| reg.image_info(r))
                    .ok_or_else(|| internal("image vanished after push"))?;
                Ok(Reply::Images(vec![info]))
            }
            ApiRequest::Images => {
                let reg = self.registry();
                Ok(Reply::Images(
                    reg.images.values().map(|r| reg.image_info(r)).collect(),
                ))
            }
            ApiRequest::Run(spec) => self.run(subject, spec, now).await,
            ApiRequest::Ps => self.ps(&subject, now).await,
            ApiRequest::Logs { name, after } => {
                let d = self.domain_for(&subject, &name, Right::Read, now)?;
                self.node_call(d.node, NodeCall::Logs { name, after }).await
            }
            ApiRequest::Stop { name } => {
                self.domain_for(&subject, &name, Right::Write, now)?;
                self.write(Command::DomainRemove { name }).await?;
                Ok(Reply::Done)
            }
            ApiRequest::Call {
                name,
                channel,
                payload,
                timeout_ms,
            } => {
                let d = self.domain_for(&subject, &name, Right::Write, now)?;
                let channel = match channel {
                    Some(c) => c,
                    None => d.caps.channels.first().cloned().ok_or_else(|| {
                        ApiError::InvalidArgument(format!(
                            "domain {name} may open no channel, so it cannot be called"
                        ))
                    })?,
                };
                if !d.caps.may_open(&channel) {
                    return Err(ApiError::InvalidArgument(format!(
                        "domain {name} cannot open {channel} (its channels: {})",
                        d.caps.channels.join(", ")
                    )));
                }
                let timeout_ms = timeout_ms.clamp(1, 60_000);
                self.node_call(
                    d.node,
                    NodeCall::Call {
                        name,
                        channel,
                        payload,
                        timeout_ms,
                    },
                )
                .await
            }
            other => Err(internal(format!("not a domain call: {other:?}"))),
        }
    }

    /// The scheduler's view: every node (up or not, with its labels) and
    /// every placed domain.
    fn cluster_view(&self) -> Result<Cluster, ApiError> {
        let up: BTreeMap<NodeId, bool> = self
            .node_statuses()
            .into_iter()
            .map(|s| (s.id, s.up))
            .collect();
        let reg = self.registry();
        let mut c = Cluster::new();
        for n in reg.nodes.values() {
            let mut spec = NodeSpec::new(
                n.id,
                n.name.clone(),
                n.kind,
                n.resources.arch.clone(),
                n.resources.cpus.max(1),
                n.resources.memory_bytes,
            )
            .with_up(up.get(&n.id).copied().unwrap_or(false));
            for (k, v) in &n.labels {
                spec = spec.with_label(k.clone(), v.clone());
            }
            c.add_node(spec).map_err(internal)?;
        }
        for d in reg.domains.values() {
            c.allocate(d.node, d.lane, d.name.clone(), d.contract)
                .map_err(internal)?;
        }
        Ok(c)
    }

    async fn run(&self, subject: Subject, spec: RunSpec, now: UnixTime) -> Response {
        metta_proto::ids::check_name("domain", &spec.name)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        spec.contract
            .validate()
            .map_err(|e| ApiError::InvalidArgument(format!("contract: {e}")))?;
        let pinned = spec
            .node
            .as_deref()
            .map(|n| self.find_node(n))
            .transpose()?;
        let lock = self.place_lock.lock().await;
        let (image, caps) = {
            let reg = self.registry();
            if reg.domains.contains_key(&spec.name) {
                return Err(ApiError::AlreadyExists(format!("domain {}", spec.name)));
            }
            let image = reg
                .images
                .get(&spec.image)
                .cloned()
                .ok_or_else(|| ApiError::NotFound(format!("image {}", spec.image)))?;
            // The vendor must still be trusted, with the same key.
            let wasm = reg
                .blobs
                .get(&image.signed.manifest.module_hash)
                .ok_or_else(|| internal("image module missing"))?;
            let verified = verify_image(&image.signed, wasm, &reg.vendors)
                .map_err(|e| ApiError::ImageRejected(e.to_string()))?;
            let caps = verified.effective_caps(&user_caps(&subject, &*reg, now));
            (image, caps)
        };
        let mut req = PlaceRequest::new(spec.contract);
        if let Some(id) = pinned {
            req = req.on_node(id);
        }
        for (k, v) in &spec.labels {
            req = req.with_label(k.clone(), v.clone());
        }
        let cluster = self.cluster_view()?;
        let (placement, contract) = match cluster.place(&req, Strategy::Spread) {
            Ok(p) => (p, spec.contract),
            Err(PlaceError::CounterOffer(offer)) if spec.accept_offer => {
                let p = cluster
                    .place(&offer.accept(&req), Strategy::Spread)
                    .map_err(|e| ApiError::Unplaceable {
                        reason: e.to_string(),
                        offer: None,
                    })?;
                (p, offer.contract)
            }
            Err(PlaceError::CounterOffer(offer)) => {
                return Err(ApiError::Unplaceable {
                    reason: PlaceError::CounterOffer(offer.clone()).to_string(),
                    offer: Some(CounterOffer {
                        node: offer.node,
                        node_name: offer.node_name,
                        contract: offer.contract,
                    }),
                })
            }
            Err(PlaceError::InvalidContract(e)) => {
                return Err(ApiError::InvalidArgument(format!("contract: {e}")))
            }
            Err(e) => {
                return Err(ApiError::Unplaceable {
                    reason: e.to_string(),
                    offer: None,
                })
            }
        };
        let rec = DomainRecord {
            name: spec.name.clone(),
            image: spec.image.clone(),
            version: image.signed.manifest.version.clone(),
            module_hash: image.signed.manifest.module_hash,
            node: placement.node,
            lane: placement.lane,
            contract,
            caps,
            owner: subject,
            epoch: 0,
            created_at: now,
        };
        let epoch = match self.write(Command::DomainCreate(rec.clone())).await? {
            Applied::Placed(e) => e,
            other => return Err(internal(format!("unexpected apply result {other:?}"))),
        };
        drop(lock);
        let started = self
            .node_call(
                rec.node,
                NodeCall::WaitStarted {
                    name: rec.name.clone(),
                    epoch,
                    timeout_ms: START_TIMEOUT.as_millis() as u32,
                },
            )
            .await;
        let start_us = match started {
            Ok(Reply::Started { start_us }) => start_us,
            Ok(other) => return Err(internal(format!("unexpected start reply {other:?}"))),
            Err(e) => {
                // Nothing is left behind: the placement is undone.
                let _ = self
                    .write(Command::DomainRemove {
                        name: rec.name.clone(),
                    })
                    .await;
                let node = self.node_name(rec.node);
                return Err(ApiError::Domain(format!(
                    "{} could not start on {node}: {e}",
                    rec.name
                )));
            }
        };
        let reg = self.registry();
        let rec = reg
            .domains
            .get(&rec.name)
            .cloned()
            .ok_or_else(|| ApiError::Domain(format!("{} was stopped meanwhile", rec.name)))?;
        let mut status = status_of(&reg, &rec, None);
        status.runtime = Some(DomainRuntime {
            name: rec.name.clone(),
            epoch,
            state: "running".into(),
            cpu_ns: 0,
            delivered_ppm: None,
            activations: 1,
            memory_bytes: 0,
            start_us: Some(start_us),
            undelivered: 0,
            periods: 0,
            delivered_p5_ppm: None,
            real_p5_ppm: None,
            latency_p99_us: None,
        });
        Ok(Reply::Domains(vec![status]))
    }

    fn node_name(&self, id: NodeId) -> String {
        self.registry()
            .nodes
            .get(&id)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| format!("node/{id}"))
    }

    async fn ps(self: &Arc<Self>, subject: &Subject, now: UnixTime) -> Response {
        let visible: Vec<DomainRecord> = {
            let reg = self.registry();
            reg.domains
                .values()
                .filter(|d| {
                    d.owner == *subject
                        || reg
                            .authorize(
                                subject,
                                Rights::of(Right::Read),
                                &format!("/domains/{}", d.name),
                                now,
                            )
                            .is_ok()
                })
                .cloned()
                .collect()
        };
        let mut nodes: Vec<NodeId> = visible.iter().map(|d| d.node).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let mut set = tokio::task::JoinSet::new();
        for id in nodes {
            let node = self.clone();
            set.spawn(async move {
                let r = tokio::time::timeout(STATS_TIMEOUT, node.node_call(id, NodeCall::Stats));
                (id, r.await)
            });
        }
        let mut reports: BTreeMap<(NodeId, String), DomainRuntime> = BTreeMap::new();
        while let Some(r) = set.join_next().await {
            if let Ok((id, Ok(Ok(Reply::Runtime(rows))))) = r {
                for row in rows {
                    reports.insert((id, row.name.clone()), row);
                }
            }
        }
        let reg = self.registry();
        Ok(Reply::Domains(
            visible
                .iter()
                .map(|d| {
                    let rt = reports
                        .remove(&(d.node, d.name.clone()))
                        .filter(|r| r.epoch == d.epoch);
                    status_of(&reg, d, rt)
                })
                .collect(),
        ))
    }
}

/// A `ps` row.
fn status_of(reg: &Registry, d: &DomainRecord, runtime: Option<DomainRuntime>) -> DomainStatus {
    DomainStatus {
        name: d.name.clone(),
        image: format!("{}:{}", d.image, d.version),
        module_hash: hex::encode(d.module_hash),
        node: d.node,
        node_name: reg
            .nodes
            .get(&d.node)
            .map(|n| n.name.clone())
            .unwrap_or_default(),
        lane: d.lane,
        contract: d.contract,
        caps: d.caps.clone(),
        owner: d.owner.clone(),
        epoch: d.epoch,
        runtime,
    }
}
