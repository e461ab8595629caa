//! The registry: the replicated state of a trust group, and the commands that
//! change it.
//!
//! Pure logic. [`Registry::apply`] is the Raft state machine's transition
//! function: deterministic, given the command alone. Anything that depends on
//! time carries the proposer's clock reading *in the command* (`now`), so every
//! replica reaches the same verdict, and a token or grant check made at apply
//! time is made once, in log order — which is what makes two machines racing
//! with one single-use token end with exactly one admitted.
//!
//! A failed command changes nothing: every `apply` arm checks everything first
//! and mutates last.

use std::collections::{BTreeMap, BTreeSet};

use metta_proto::{
    ApiError, CapSet, Contract, GrantId, GrantInfo, ImageInfo, NodeId, NodeKind, NodeResources,
    Role, SignedGrant, SignedManifest, Subject, TokenInfo, TokenRejection, UserInfo, VendorInfo,
};
use metta_trust::{
    grants::{grant_id, verify_grant, GrantView},
    image::{verify_image, VendorSet},
    RevocationList, TokenRecord, UnixTime,
};
use serde::{Deserialize, Serialize};

/// A node admitted to the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Id (also its Raft id).
    pub id: NodeId,
    /// Human name.
    pub name: String,
    /// Role from its token.
    pub role: Role,
    /// Runtime.
    pub kind: NodeKind,
    /// Address members reach it at.
    pub addr: String,
    /// Hardware at join (heartbeats refresh the leader's live view).
    pub resources: NodeResources,
    /// Its public key (SPKI DER).
    pub spki_der: Vec<u8>,
    /// Expiry of its newest certificate.
    pub cert_not_after: UnixTime,
    /// When it was admitted.
    pub joined_at: UnixTime,
    /// Operator labels (`mettactl nodes label`), matched by `run --label`.
    pub labels: BTreeMap<String, String>,
}

/// A user holding a client config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Name.
    pub name: String,
    /// Public key (SPKI DER): grants the user issues are checked against it.
    pub spki_der: Vec<u8>,
    /// Expiry of the user's certificate.
    pub cert_not_after: UnixTime,
}

/// A stored grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    /// The signed grant.
    pub signed: SignedGrant,
    /// Revoked.
    pub revoked: bool,
}

/// A stored image: the signed manifest; the module is in
/// [`Registry::blobs`] under the manifest's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The vendor-signed manifest.
    pub signed: SignedManifest,
    /// Who pushed it.
    pub pushed_by: Subject,
    /// Module size in bytes.
    pub size: u64,
}

/// A domain placed on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRecord {
    /// Name (unique in the cluster).
    pub name: String,
    /// Image name.
    pub image: String,
    /// Image version at launch.
    pub version: String,
    /// The module it runs (a key of [`Registry::blobs`]).
    pub module_hash: [u8; 32],
    /// Node.
    pub node: NodeId,
    /// CPU lane on the node.
    pub lane: u32,
    /// Contract.
    pub contract: Contract,
    /// What it may use: policy(user, vendor), fixed at launch.
    pub caps: CapSet,
    /// Who launched it.
    pub owner: Subject,
    /// Incarnation, assigned at apply time from [`Registry::next_epoch`].
    pub epoch: u64,
    /// When it was launched.
    pub created_at: UnixTime,
}

/// A node's details when it is admitted (the id is allocated by the registry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    /// Name.
    pub name: String,
    /// Runtime.
    pub kind: NodeKind,
    /// Address.
    pub addr: String,
    /// Hardware.
    pub resources: NodeResources,
    /// Public key from its CSR (SPKI DER).
    pub spki_der: Vec<u8>,
}

/// A change to the registry: the Raft log's application data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// The first entry of a new cluster: the CA, the admin, the first node.
    Bootstrap {
        /// Cluster name.
        cluster: String,
        /// CA certificate (PEM).
        ca_cert_pem: String,
        /// The admin user.
        admin: UserRecord,
        /// The first node (a control node, id 1).
        node: Admission,
        /// Its certificate's expiry.
        node_cert_not_after: UnixTime,
        /// Clock reading of the proposer.
        now: UnixTime,
    },
    /// Store a new join token (hashed).
    TokenCreate(TokenRecord),
    /// Revoke a token.
    TokenRevoke {
        /// Token id.
        id: String,
    },
    /// Admit a node, consuming one use of its token — in this same entry.
    AdmitNode {
        /// The token presented.
        token_id: String,
        /// Hash of the secret presented (checked against the stored hash here,
        /// at apply time, in log order).
        secret_hash: [u8; 32],
        /// The node.
        node: Admission,
        /// Clock reading of the proposer.
        now: UnixTime,
    },
    /// A certificate was issued to a node (at join or renewal).
    NodeCert {
        /// Node.
        id: NodeId,
        /// Expiry.
        not_after: UnixTime,
    },
    /// A node's address changed.
    NodeAddr {
        /// Node.
        id: NodeId,
        /// New address.
        addr: String,
    },
    /// Remove a node and revoke its identity.
    NodeRemove {
        /// Node.
        id: NodeId,
    },
    /// Add a user.
    UserAdd(UserRecord),
    /// Store a grant after verifying its chain at `now`.
    GrantAdd {
        /// The grant.
        signed: SignedGrant,
        /// Clock reading of the proposer.
        now: UnixTime,
    },
    /// Revoke a grant.
    GrantRevoke {
        /// Id.
        id: GrantId,
    },
    /// Revoke a subject: its certificates stop working on every node.
    RevokeSubject(Subject),
    /// Write a key.
    KvPut {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Several commands in one log entry (group commit), applied in order,
    /// each on its own: one refused command does not affect the others.
    Batch(Vec<Command>),
    // New variants go last: log entries are postcard, which encodes the
    // variant index.
    /// Set (`Some`) or remove (`None`) a node's label.
    NodeLabel {
        /// Node.
        id: NodeId,
        /// Label key.
        key: String,
        /// Value.
        value: Option<String>,
    },
    /// Trust a vendor's image-signing key (replacing any older key).
    VendorAdd {
        /// Vendor name.
        name: String,
        /// Public key (SPKI DER).
        spki_der: Vec<u8>,
    },
    /// Stop trusting a vendor.
    VendorRemove {
        /// Vendor name.
        name: String,
    },
    /// Store an image after verifying it against the trusted vendors, here,
    /// in log order (a vendor removed just before is not trusted).
    ImagePut {
        /// The signed manifest.
        signed: SignedManifest,
        /// The module.
        wasm: Vec<u8>,
        /// Who pushed it.
        pushed_by: Subject,
    },
    /// Place a domain (its `epoch` is assigned here). Admission is checked
    /// again against the node's recorded hardware, so a placement computed
    /// on a stale view never overcommits a lane.
    DomainCreate(DomainRecord),
    /// Remove a domain.
    DomainRemove {
        /// Name.
        name: String,
    },
}

/// What applying a command produced (the Raft response type).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Nothing to report (also the result of blank and membership entries).
    #[default]
    Done,
    /// A node was admitted with this id.
    Admitted(NodeId),
    /// A grant was stored under this id.
    Granted(GrantId),
    /// A domain was placed with this epoch.
    Placed(u64),
    /// The command was refused; nothing changed.
    Refused(ApiError),
    /// One result per command of a [`Command::Batch`].
    Batch(Vec<Applied>),
}

/// The replicated registry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    /// Cluster name (empty until bootstrapped).
    pub cluster: String,
    /// CA certificate (PEM).
    pub ca_cert_pem: String,
    /// The admin, root of every grant chain.
    pub admin: Option<Subject>,
    /// Next node id to allocate.
    pub next_node_id: NodeId,
    /// Admitted nodes (removed ones are dropped; their ids stay revoked).
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Join tokens by id.
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Users by name.
    pub users: BTreeMap<String, UserRecord>,
    /// Grants by id.
    pub grants: BTreeMap<GrantId, GrantRecord>,
    /// Revoked subjects and serials.
    pub revoked: RevocationList,
    /// The general key space.
    pub kv: BTreeMap<String, Vec<u8>>,
    /// Vendors whose signed images this cluster runs.
    pub vendors: VendorSet,
    /// Images by name (the latest pushed version).
    pub images: BTreeMap<String, ImageRecord>,
    /// Modules by blake3 hash: content-addressed, kept while an image or a
    /// domain refers to them.
    pub blobs: BTreeMap<[u8; 32], Vec<u8>>,
    /// Domains by name.
    pub domains: BTreeMap<String, DomainRecord>,
    /// The next domain epoch.
    pub next_epoch: u64,
}

fn refuse(e: ApiError) -> Applied {
    Applied::Refused(e)
}

impl Registry {
    /// Applies one command. Refused commands leave the registry unchanged.
    pub fn apply(&mut self, cmd: &Command) -> Applied {
        match cmd {
            Command::Bootstrap {
                cluster,
                ca_cert_pem,
                admin,
                node,
                node_cert_not_after,
                now,
            } => {
                if !self.cluster.is_empty() {
                    return refuse(ApiError::AlreadyExists("cluster is bootstrapped".into()));
                }
                self.cluster = cluster.clone();
                self.ca_cert_pem = ca_cert_pem.clone();
                self.admin = Some(Subject::User(admin.name.clone()));
                self.users.insert(admin.name.clone(), admin.clone());
                self.nodes.insert(
                    1,
                    NodeRecord {
                        id: 1,
                        name: node.name.clone(),
                        role: Role::Control,
                        kind: node.kind,
                        addr: node.addr.clone(),
                        resources: node.resources.clone(),
                        spki_der: node.spki_der.clone(),
                        cert_not_after: *node_cert_not_after,
                        joined_at: *now,
                        labels: BTreeMap::new(),
                    },
                );
                self.next_node_id = 2;
                Applied::Admitted(1)
            }
            Command::TokenCreate(rec) => {
                if self.tokens.contains_key(&rec.id) {
                    return refuse(ApiError::AlreadyExists(format!("token {}", rec.id)));
                }
                self.tokens.insert(rec.id.clone(), rec.clone());
                Applied::Done
            }
            Command::TokenRevoke { id } => match self.tokens.get_mut(id) {
                Some(t) => {
                    t.revoked = true;
                    Applied::Done
                }
                None => refuse(ApiError::NotFound(format!("token {id}"))),
            },
            Command::AdmitNode {
                token_id,
                secret_hash,
                node,
                now,
            } => {
                let rec = self.tokens.get(token_id);
                if let Err(r) = metta_trust::check_token_hash(rec, secret_hash, *now) {
                    return refuse(ApiError::Token(r));
                }
                if self.nodes.values().any(|n| n.name == node.name) {
                    return refuse(ApiError::AlreadyExists(format!(
                        "a node named {:?}",
                        node.name
                    )));
                }
                let Some(rec) = self.tokens.get_mut(token_id) else {
                    return refuse(ApiError::Token(TokenRejection::Unknown));
                };
                rec.uses_left -= 1;
                let role = rec.role;
                let id = self.next_node_id;
                self.next_node_id += 1;
                self.nodes.insert(
                    id,
                    NodeRecord {
                        id,
                        name: node.name.clone(),
                        role,
                        kind: node.kind,
                        addr: node.addr.clone(),
                        resources: node.resources.clone(),
                        spki_der: node.spki_der.clone(),
                        cert_not_after: 0,
                        joined_at: *now,
                        labels: BTreeMap::new(),
                    },
                );
                Applied::Admitted(id)
            }
            Command::NodeCert { id, not_after } => match self.nodes.get_mut(id) {
                Some(n) => {
                    n.cert_not_after = *not_after;
                    Applied::Done
                }
                None => refuse(ApiError::NotFound(format!("node/{id}"))),
            },
            Command::NodeAddr { id, addr } => match self.nodes.get_mut(id) {
                Some(n) => {
                    n.addr = addr.clone();
                    Applied::Done
                }
                None => refuse(ApiError::NotFound(format!("node/{id}"))),
            },
            Command::NodeLabel { id, key, value } => match self.nodes.get_mut(id) {
                Some(n) => {
                    match value {
                        Some(v) => n.labels.insert(key.clone(), v.clone()),
                        None => n.labels.remove(key),
                    };
                    Applied::Done
                }
                None => refuse(ApiError::NotFound(format!("node/{id}"))),
            },
            Command::NodeRemove { id } => {
                if self.nodes.remove(id).is_none() {
                    return refuse(ApiError::NotFound(format!("node/{id}")));
                }
                self.revoked.revoke_subject(Subject::Node(*id));
                self.drop_domains_of(*id);
                Applied::Done
            }
            Command::UserAdd(user) => {
                let subject = Subject::User(user.name.clone());
                if self.users.contains_key(&user.name) {
                    return refuse(ApiError::AlreadyExists(format!("user {}", user.name)));
                }
                if self.revoked.subject_revoked(&subject) {
                    return refuse(ApiError::AlreadyExists(format!(
                        "user {} was revoked; names are not reused",
                        user.name
                    )));
                }
                self.users.insert(user.name.clone(), user.clone());
                Applied::Done
            }
            Command::GrantAdd { signed, now } => {
                let id = grant_id(&signed.grant);
                if self.grants.contains_key(&id) {
                    return refuse(ApiError::AlreadyExists(format!("grant {id}")));
                }
                if let Err(e) = verify_grant(signed, self, *now) {
                    return refuse(ApiError::GrantRejected(e.to_string()));
                }
                self.grants.insert(
                    id,
                    GrantRecord {
                        signed: signed.clone(),
                        revoked: false,
                    },
                );
                Applied::Granted(id)
            }
            Command::GrantRevoke { id } => match self.grants.get_mut(id) {
                Some(g) => {
                    g.revoked = true;
                    Applied::Done
                }
                None => refuse(ApiError::NotFound(format!("grant {id}"))),
            },
            Command::RevokeSubject(subject) => {
                if Some(subject) == self.admin.as_ref() {
                    return refuse(ApiError::InvalidArgument(
                        "the cluster admin cannot be revoked".into(),
                    ));
                }
                let known = match subject {
                    Subject::Node(id) => self.nodes.contains_key(id),
                    Subject::User(name) => self.users.contains_key(name),
                };
                if !known {
                    return refuse(ApiError::NotFound(subject.to_string()));
                }
                if let Subject::Node(id) = subject {
                    self.nodes.remove(id);
                    self.drop_domains_of(*id);
                }
                self.revoked.revoke_subject(subject.clone());
                Applied::Done
            }
            Command::KvPut { key, value } => {
                self.kv.insert(key.clone(), value.clone());
                Applied::Done
            }
            Command::VendorAdd { name, spki_der } => {
                let mut vendors = self.vendors.clone();
                match vendors.add(name, spki_der.clone()) {
                    Ok(_) => {
                        self.vendors = vendors;
                        Applied::Done
                    }
                    Err(e) => refuse(ApiError::InvalidArgument(e.to_string())),
                }
            }
            Command::VendorRemove { name } => match self.vendors.remove(name) {
                Some(_) => Applied::Done,
                None => refuse(ApiError::NotFound(format!("vendor {name}"))),
            },
            Command::ImagePut {
                signed,
                wasm,
                pushed_by,
            } => {
                let verified = match verify_image(signed, wasm, &self.vendors) {
                    Ok(v) => v,
                    Err(e) => return refuse(ApiError::ImageRejected(e.to_string())),
                };
                let hash = verified.module_hash();
                let name = verified.manifest().name.clone();
                self.blobs.entry(hash).or_insert_with(|| wasm.clone());
                self.images.insert(
                    name,
                    ImageRecord {
                        signed: signed.clone(),
                        pushed_by: pushed_by.clone(),
                        size: wasm.len() as u64,
                    },
                );
                self.collect_blobs();
                Applied::Done
            }
            Command::DomainCreate(rec) => {
                if let Err(e) = self.admissible(rec) {
                    return refuse(e);
                }
                let epoch = self.next_epoch.max(1);
                self.next_epoch = epoch + 1;
                let mut rec = rec.clone();
                rec.epoch = epoch;
                self.domains.insert(rec.name.clone(), rec);
                Applied::Placed(epoch)
            }
            Command::DomainRemove { name } => {
                if self.domains.remove(name).is_none() {
                    return refuse(ApiError::NotFound(format!("domain {name}")));
                }
                self.collect_blobs();
                Applied::Done
            }
            Command::Batch(cmds) => Applied::Batch(
                cmds.iter()
                    .map(|c| match c {
                        Command::Batch(_) => {
                            refuse(ApiError::InvalidArgument("nested batch".into()))
                        }
                        c => self.apply(c),
                    })
                    .collect(),
            ),
        }
    }

    /// Whether `rec` may be placed: a new name, a known node and module, and
    /// room for its contract on its lane and node.
    fn admissible(&self, rec: &DomainRecord) -> Result<(), ApiError> {
        if self.domains.contains_key(&rec.name) {
            return Err(ApiError::AlreadyExists(format!("domain {}", rec.name)));
        }
        rec.contract
            .validate()
            .map_err(|e| ApiError::InvalidArgument(format!("contract: {e}")))?;
        let node = self
            .nodes
            .get(&rec.node)
            .ok_or_else(|| ApiError::NotFound(format!("node/{}", rec.node)))?;
        if !self.blobs.contains_key(&rec.module_hash) {
            return Err(ApiError::NotFound(format!(
                "module {}",
                hex::encode(rec.module_hash)
            )));
        }
        if rec.lane >= node.resources.cpus.max(1) {
            return Err(ApiError::InvalidArgument(format!(
                "node {} has no CPU lane {}",
                node.name, rec.lane
            )));
        }
        let (lane_ppm, memory) = self.domains.values().filter(|d| d.node == rec.node).fold(
            (0u64, 0u64),
            |(ppm, mem), d| {
                let on_lane = if d.lane == rec.lane {
                    metta_scheduler::demand_ppm(&d.contract)
                } else {
                    0
                };
                (ppm + on_lane, mem + d.contract.memory)
            },
        );
        let usable =
            node.resources
                .memory_bytes
                .saturating_sub(metta_scheduler::memory_reserve_for(
                    node.kind,
                    node.resources.memory_bytes,
                ));
        if lane_ppm + metta_scheduler::demand_ppm(&rec.contract)
            > metta_scheduler::LANE_CAPACITY_PPM
            || memory + rec.contract.memory > usable
        {
            return Err(ApiError::Unplaceable {
                reason: format!(
                    "node {} can no longer admit {} on lane {} (placed concurrently); retry",
                    node.name, rec.contract, rec.lane
                ),
                offer: None,
            });
        }
        Ok(())
    }

    /// Domains on a node that left go with it.
    fn drop_domains_of(&mut self, node: NodeId) {
        self.domains.retain(|_, d| d.node != node);
        self.collect_blobs();
    }

    /// Drops modules no image or domain refers to.
    fn collect_blobs(&mut self) {
        let live: BTreeSet<[u8; 32]> = self
            .images
            .values()
            .map(|i| i.signed.manifest.module_hash)
            .chain(self.domains.values().map(|d| d.module_hash))
            .collect();
        self.blobs.retain(|h, _| live.contains(h));
    }

    /// The domain that serves channel `name` for a message from domain
    /// `from`: among the others, the one whose capability covers the name
    /// with the longest prefix (ties: the first by name). Channels are
    /// addressed to domains; where the domain runs does not matter.
    pub fn route(&self, from: &str, name: &str) -> Option<&DomainRecord> {
        self.domains
            .values()
            .filter(|d| d.name != from)
            .filter_map(|d| {
                let best = d
                    .caps
                    .channels
                    .iter()
                    .filter(|p| metta_proto::grant::resource_covers(p, name))
                    .map(String::len)
                    .max()?;
                Some((best, d))
            })
            .fold(
                None,
                |best: Option<(usize, &DomainRecord)>, (len, d)| match best {
                    Some((l, _)) if l >= len => best,
                    _ => Some((len, d)),
                },
            )
            .map(|(_, d)| d)
    }

    /// The trusted vendors, as listed.
    pub fn vendor_infos(&self) -> Vec<VendorInfo> {
        self.vendors
            .iter()
            .map(|(name, key)| VendorInfo {
                name: name.to_string(),
                key_id: blake3::hash(key).to_hex().to_string(),
            })
            .collect()
    }

    /// An image, as listed.
    pub fn image_info(&self, rec: &ImageRecord) -> ImageInfo {
        let m = &rec.signed.manifest;
        ImageInfo {
            name: m.name.clone(),
            version: m.version.clone(),
            vendor: m.vendor.clone(),
            module_hash: hex::encode(m.module_hash),
            size: rec.size,
            capabilities: m.capabilities.clone(),
            pushed_by: rec.pushed_by.clone(),
        }
    }

    /// Finds a grant by a unique prefix of its hex id.
    pub fn find_grant(&self, prefix: &str) -> Result<GrantId, ApiError> {
        let prefix = prefix.to_ascii_lowercase();
        if prefix.len() < 4 {
            return Err(ApiError::InvalidArgument(
                "give at least 4 hex digits of the grant id".into(),
            ));
        }
        let matches: Vec<GrantId> = self
            .grants
            .keys()
            .filter(|id| hex::encode(id.0).starts_with(&prefix))
            .copied()
            .collect();
        match matches.as_slice() {
            [one] => Ok(*one),
            [] => Err(ApiError::NotFound(format!("grant {prefix}"))),
            _ => Err(ApiError::InvalidArgument(format!(
                "grant id prefix {prefix} is ambiguous"
            ))),
        }
    }

    /// Token list for display.
    pub fn token_infos(&self) -> Vec<TokenInfo> {
        self.tokens
            .values()
            .map(|t| TokenInfo {
                id: t.id.clone(),
                role: t.role,
                expires_at: t.expires_at,
                uses_left: t.uses_left,
                revoked: t.revoked,
                created_by: t.created_by.clone(),
            })
            .collect()
    }

    /// User list for display.
    pub fn user_infos(&self) -> Vec<UserInfo> {
        let revoked: BTreeSet<&String> = self
            .users
            .keys()
            .filter(|n| self.revoked.subject_revoked(&Subject::User((*n).clone())))
            .collect();
        self.users
            .keys()
            .map(|n| UserInfo {
                name: n.clone(),
                revoked: revoked.contains(n),
                admin: self.admin == Some(Subject::User(n.clone())),
            })
            .collect()
    }

    /// Grant list for display, optionally of one subject.
    pub fn grant_infos(&self, subject: Option<&Subject>) -> Vec<GrantInfo> {
        self.grants
            .iter()
            .filter(|(_, g)| subject.is_none_or(|s| &g.signed.grant.subject == s))
            .map(|(id, g)| GrantInfo {
                id: *id,
                grant: g.signed.clone(),
                // A grant is void once its subject or issuer is revoked.
                revoked: g.revoked
                    || self.revoked.subject_revoked(&g.signed.grant.subject)
                    || self.revoked.subject_revoked(&g.signed.grant.issuer),
            })
            .collect()
    }

    /// Whether `subject` may exercise `rights` on `resource` at `now`.
    pub fn authorize(
        &self,
        subject: &Subject,
        rights: metta_proto::Rights,
        resource: &str,
        now: UnixTime,
    ) -> Result<(), ApiError> {
        if self.revoked.subject_revoked(subject) {
            return Err(ApiError::PermissionDenied {
                subject: subject.clone(),
                rights,
                resource: resource.to_string(),
            });
        }
        metta_trust::grants::authorize(subject, rights, resource, self, now).map_err(Into::into)
    }

    /// The resource a key lives at.
    pub fn kv_resource(key: &str) -> String {
        format!("/kv/{}", key.trim_start_matches('/'))
    }
}

impl GrantView for Registry {
    fn grant(&self, id: &GrantId) -> Option<&SignedGrant> {
        self.grants.get(id).map(|g| &g.signed)
    }
    fn grant_revoked(&self, id: &GrantId) -> bool {
        self.grants.get(id).is_some_and(|g| g.revoked)
    }
    fn public_key(&self, s: &Subject) -> Option<&[u8]> {
        match s {
            Subject::User(n) => self.users.get(n).map(|u| u.spki_der.as_slice()),
            Subject::Node(id) => self.nodes.get(id).map(|n| n.spki_der.as_slice()),
        }
    }
    fn subject_revoked(&self, s: &Subject) -> bool {
        self.revoked.subject_revoked(s)
    }
    fn admin(&self) -> &Subject {
        static NOBODY: std::sync::OnceLock<Subject> = std::sync::OnceLock::new();
        self.admin
            .as_ref()
            .unwrap_or_else(|| NOBODY.get_or_init(|| Subject::User("-".into())))
    }
    fn grants_of<'a>(&'a self, s: &Subject) -> Box<dyn Iterator<Item = &'a SignedGrant> + 'a> {
        let s = s.clone();
        Box::new(
            self.grants
                .values()
                .filter(move |g| g.signed.grant.subject == s)
                .map(|g| &g.signed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metta_proto::{Grant, Rights};
    use metta_trust::{grants::sign_grant, token::secret_hash, NodeKey};
    use proptest::prelude::*;

    const T0: UnixTime = 1_800_000_000;

    fn admission(name: &str) -> Admission {
        Admission {
            name: name.into(),
            kind: NodeKind::Hosted,
            addr: "127.0.0.1:1".into(),
            resources: NodeResources::default(),
            spki_der: vec![1, 2, 3],
        }
    }

    fn bootstrapped(admin_key: &NodeKey) -> Registry {
        let mut r = Registry::default();
        let out = r.apply(&Command::Bootstrap {
            cluster: "c".into(),
            ca_cert_pem: "ca".into(),
            admin: UserRecord {
                name: "admin".into(),
                spki_der: admin_key.public_key_der(),
                cert_not_after: T0 + 1000,
            },
            node: admission("n1"),
            node_cert_not_after: T0 + 100,
            now: T0,
        });
        assert_eq!(out, Applied::Admitted(1));
        r
    }

    fn token(id: &str, secret: u8, uses: u32, expires_at: UnixTime) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            secret_hash: secret_hash(&[secret; 16]),
            role: Role::Worker,
            expires_at,
            uses_left: uses,
            revoked: false,
            created_by: Subject::User("admin".into()),
        }
    }

    fn admit(id: &str, secret: u8, name: &str, now: UnixTime) -> Command {
        Command::AdmitNode {
            token_id: id.into(),
            secret_hash: secret_hash(&[secret; 16]),
            node: admission(name),
            now,
        }
    }

    fn signed(vendor: &NodeKey, name: &str, wasm: &[u8], caps: &[&str]) -> SignedManifest {
        metta_trust::image::sign_manifest(
            metta_proto::Manifest {
                name: name.into(),
                version: "1.0.0".into(),
                vendor: "acme".into(),
                module_hash: metta_trust::image::module_hash(wasm),
                capabilities: caps.iter().map(|c| c.parse().unwrap()).collect(),
            },
            vendor,
        )
    }

    /// A registry with vendor acme trusted, node 1 with one CPU and 8 GiB,
    /// and image `img` (module `wasm`) stored.
    fn with_image(admin: &NodeKey, vendor: &NodeKey, wasm: &[u8]) -> Registry {
        let mut r = bootstrapped(admin);
        let n1 = r.nodes.get_mut(&1).unwrap();
        n1.resources = NodeResources {
            cpus: 1,
            memory_bytes: 8 << 30,
            arch: "x86_64".into(),
        };
        assert_eq!(
            r.apply(&Command::VendorAdd {
                name: "acme".into(),
                spki_der: vendor.public_key_der(),
            }),
            Applied::Done
        );
        assert_eq!(
            r.apply(&Command::ImagePut {
                signed: signed(vendor, "img", wasm, &["channel:/svc"]),
                wasm: wasm.to_vec(),
                pushed_by: Subject::User("admin".into()),
            }),
            Applied::Done
        );
        r
    }

    fn domain(name: &str, hash: [u8; 32], lane: u32, cpu: &str, channels: &[&str]) -> DomainRecord {
        DomainRecord {
            name: name.into(),
            image: "img".into(),
            version: "1".into(),
            module_hash: hash,
            node: 1,
            lane,
            contract: cpu.parse().unwrap(),
            caps: CapSet {
                log: true,
                clock: true,
                channels: channels.iter().map(|c| c.to_string()).collect(),
            },
            owner: Subject::User("admin".into()),
            epoch: 0,
            created_at: T0,
        }
    }

    #[test]
    fn images_are_verified_at_apply_time_and_refusals_change_nothing() {
        let (admin, acme, mallory) = (
            NodeKey::generate().unwrap(),
            NodeKey::generate().unwrap(),
            NodeKey::generate().unwrap(),
        );
        let wasm = b"module bytes".to_vec();
        let mut r = with_image(&admin, &acme, &wasm);
        let hash = metta_trust::image::module_hash(&wasm);
        assert_eq!(r.blobs.get(&hash), Some(&wasm));
        let before = r.clone();
        let put = |signed: SignedManifest, wasm: &[u8]| Command::ImagePut {
            signed,
            wasm: wasm.to_vec(),
            pushed_by: Subject::User("admin".into()),
        };
        // Another key claiming to be acme; a module that is not the signed one.
        for cmd in [
            put(signed(&mallory, "evil", &wasm, &[]), &wasm),
            put(signed(&acme, "evil", &wasm, &[]), b"other bytes"),
        ] {
            assert!(matches!(
                r.apply(&cmd),
                Applied::Refused(ApiError::ImageRejected(_))
            ));
            assert_eq!(r, before);
        }
        // Once acme is no longer trusted, its images are refused in log order.
        r.apply(&Command::VendorRemove {
            name: "acme".into(),
        });
        let cmd = put(signed(&acme, "img2", &wasm, &[]), &wasm);
        assert!(matches!(
            r.apply(&cmd),
            Applied::Refused(ApiError::ImageRejected(_))
        ));
        assert!(!r.images.contains_key("img2"));
    }

    #[test]
    fn placement_is_rechecked_at_apply_time() {
        let (admin, acme) = (NodeKey::generate().unwrap(), NodeKey::generate().unwrap());
        let wasm = b"module bytes".to_vec();
        let mut r = with_image(&admin, &acme, &wasm);
        let hash = metta_trust::image::module_hash(&wasm);
        assert_eq!(
            r.apply(&Command::DomainCreate(domain(
                "a",
                hash,
                0,
                "90ms/100ms",
                &[]
            ))),
            Applied::Placed(1)
        );
        assert_eq!(r.domains["a"].epoch, 1);
        let before = r.clone();
        // Two placements computed on the same stale view: the second finds
        // the lane full (90 % + 10 % > 95 %).
        for (name, lane, cpu) in [
            ("b", 0, "10ms/100ms"),
            ("c", 1, "1ms/100ms"),
            ("a", 0, "1ms/100ms"),
        ] {
            let out = r.apply(&Command::DomainCreate(domain(name, hash, lane, cpu, &[])));
            assert!(matches!(out, Applied::Refused(_)), "{name}: {out:?}");
            assert_eq!(r, before);
        }
        let mut unknown = domain("d", [7; 32], 0, "1ms/100ms", &[]);
        assert!(matches!(
            r.apply(&Command::DomainCreate(unknown.clone())),
            Applied::Refused(ApiError::NotFound(_))
        ));
        unknown.module_hash = hash;
        assert_eq!(r.apply(&Command::DomainCreate(unknown)), Applied::Placed(2));

        // A module stays while an image or a domain refers to it.
        let wasm2 = b"version two".to_vec();
        r.apply(&Command::ImagePut {
            signed: signed(&acme, "img", &wasm2, &[]),
            wasm: wasm2.clone(),
            pushed_by: Subject::User("admin".into()),
        });
        assert!(
            r.blobs.contains_key(&hash),
            "domains still run the old module"
        );
        r.apply(&Command::DomainRemove { name: "a".into() });
        r.apply(&Command::DomainRemove { name: "d".into() });
        assert!(!r.blobs.contains_key(&hash));
        assert!(r
            .blobs
            .contains_key(&metta_trust::image::module_hash(&wasm2)));
        // Removing a node takes its domains with it.
        r.apply(&Command::DomainCreate(domain(
            "e",
            metta_trust::image::module_hash(&wasm2),
            0,
            "1ms/100ms",
            &[],
        )));
        r.apply(&Command::NodeRemove { id: 1 });
        assert!(r.domains.is_empty());
    }

    #[test]
    fn channels_route_to_the_longest_covering_prefix_never_to_the_sender() {
        let (admin, acme) = (NodeKey::generate().unwrap(), NodeKey::generate().unwrap());
        let wasm = b"module bytes".to_vec();
        let mut r = with_image(&admin, &acme, &wasm);
        let hash = metta_trust::image::module_hash(&wasm);
        for (name, chans) in [
            ("broad", &["/svc"][..]),
            ("narrow", &["/svc/counter"][..]),
            ("other", &["/ctl", "/x"][..]),
        ] {
            let out = r.apply(&Command::DomainCreate(domain(
                name,
                hash,
                0,
                "1ms/100ms",
                chans,
            )));
            assert!(matches!(out, Applied::Placed(_)));
        }
        let to = |from: &str, ch: &str| r.route(from, ch).map(|d| d.name.as_str());
        assert_eq!(to("other", "/svc/counter"), Some("narrow"));
        assert_eq!(to("other", "/svc/counter/deep"), Some("narrow"));
        assert_eq!(to("other", "/svc/db"), Some("broad"));
        assert_eq!(to("narrow", "/svc/counter"), Some("broad"));
        assert_eq!(to("other", "/svcx"), None);
        assert_eq!(to("broad", "/x"), Some("other"));
        assert_eq!(to("other", "/x"), None);
    }

    #[test]
    fn single_use_token_admits_exactly_one_of_two_racing_entries() {
        let key = NodeKey::generate().unwrap();
        let mut r = bootstrapped(&key);
        r.apply(&Command::TokenCreate(token("t1", 7, 1, T0 + 60)));
        // Both joiners passed the leader's pre-check; log order decides.
        assert_eq!(r.apply(&admit("t1", 7, "a", T0 + 1)), Applied::Admitted(2));
        let before = r.clone();
        assert_eq!(
            r.apply(&admit("t1", 7, "b", T0 + 1)),
            Applied::Refused(ApiError::Token(TokenRejection::Used))
        );
        assert_eq!(r, before, "a refused admission changes nothing");
    }

    #[test]
    fn token_checks_use_the_time_in_the_entry() {
        let key = NodeKey::generate().unwrap();
        let mut r = bootstrapped(&key);
        r.apply(&Command::TokenCreate(token("t1", 7, 5, T0 + 60)));
        assert_eq!(
            r.apply(&admit("t1", 7, "late", T0 + 60)),
            Applied::Refused(ApiError::Token(TokenRejection::Expired))
        );
        assert_eq!(
            r.apply(&admit("t1", 8, "wrong-secret", T0)),
            Applied::Refused(ApiError::Token(TokenRejection::Unknown))
        );
        assert_eq!(
            r.apply(&admit("nope", 7, "unknown", T0)),
            Applied::Refused(ApiError::Token(TokenRejection::Unknown))
        );
        r.apply(&Command::TokenRevoke { id: "t1".into() });
        assert_eq!(
            r.apply(&admit("t1", 7, "after-revoke", T0)),
            Applied::Refused(ApiError::Token(TokenRejection::Revoked))
        );
        assert_eq!(r.nodes.len(), 1);
    }

    #[test]
    fn revoking_a_subject_removes_nodes_and_blocks_authorization() {
        let key = NodeKey::generate().unwrap();
        let mut r = bootstrapped(&key);
        r.apply(&Command::UserAdd(UserRecord {
            name: "bob".into(),
            spki_der: vec![9],
            cert_not_after: T0 + 1000,
        }));
        let g = sign_grant(
            Grant {
                issuer: Subject::User("admin".into()),
                subject: Subject::User("bob".into()),
                rights: Rights::ALL,
                resource: "/".into(),
                expires_at: None,
                delegable: false,
                parent: None,
                issued_at: T0,
            },
            &key,
        );
        assert!(matches!(
            r.apply(&Command::GrantAdd { signed: g, now: T0 }),
            Applied::Granted(_)
        ));
        let bob = Subject::User("bob".into());
        assert!(r.authorize(&bob, Rights::ALL, "/kv/x", T0).is_ok());
        r.apply(&Command::RevokeSubject(bob.clone()));
        assert!(r.authorize(&bob, Rights::ALL, "/kv/x", T0).is_err());
        // the admin cannot be revoked
        assert!(matches!(
            r.apply(&Command::RevokeSubject(Subject::User("admin".into()))),
            Applied::Refused(_)
        ));
    }

    #[test]
    fn a_batch_applies_each_command_on_its_own_and_in_order() {
        let key = NodeKey::generate().unwrap();
        let mut r = bootstrapped(&key);
        r.apply(&Command::TokenCreate(token("t1", 7, 1, T0 + 60)));
        let out = r.apply(&Command::Batch(vec![
            admit("t1", 7, "a", T0),
            admit("t1", 7, "b", T0),
            Command::KvPut {
                key: "k".into(),
                value: b"v".to_vec(),
            },
            Command::Batch(vec![]),
        ]));
        assert_eq!(
            out,
            Applied::Batch(vec![
                Applied::Admitted(2),
                Applied::Refused(ApiError::Token(TokenRejection::Used)),
                Applied::Done,
                Applied::Refused(ApiError::InvalidArgument("nested batch".into())),
            ])
        );
        assert_eq!(r.kv.get("k").map(Vec::as_slice), Some(&b"v"[..]));
        assert_eq!(r.nodes.len(), 2);
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let ids = prop_oneof![Just("t1".to_string()), Just("t2".to_string())];
        let names = prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("n1".to_string())
        ];
        prop_oneof![
            (ids.clone(), 0u8..3, 0u32..3, 0u64..100)
                .prop_map(|(id, s, u, e)| Command::TokenCreate(token(&id, s, u, T0 + e))),
            ids.clone().prop_map(|id| Command::TokenRevoke { id }),
            (ids, 0u8..3, names.clone(), 0u64..100).prop_map(|(id, s, n, t)| admit(
                &id,
                s,
                &n,
                T0 + t
            )),
            (1u64..5).prop_map(|id| Command::NodeRemove { id }),
            (1u64..5, 0u64..100).prop_map(|(id, t)| Command::NodeCert {
                id,
                not_after: T0 + t
            }),
            names.prop_map(|n| Command::RevokeSubject(Subject::User(n))),
            (1u64..5).prop_map(|id| Command::RevokeSubject(Subject::Node(id))),
        ]
    }

    proptest! {
        /// Refused commands never change the registry; admitted node ids are
        /// never reused; a token never admits more nodes than its uses.
        #[test]
        fn refusals_change_nothing(cmds in proptest::collection::vec(arb_command(), 0..40)) {
            let key = NodeKey::generate().unwrap();
            let mut r = bootstrapped(&key);
            let mut seen = BTreeSet::new();
            let mut issued: BTreeMap<String, u32> = BTreeMap::new();
            let mut admitted: BTreeMap<String, u32> = BTreeMap::new();
            for cmd in &cmds {
                let before = r.clone();
                let out = r.apply(cmd);
                match (&out, cmd) {
                    (Applied::Refused(_), _) => prop_assert_eq!(&r, &before),
                    (Applied::Admitted(id), Command::AdmitNode { token_id, .. }) => {
                        prop_assert!(seen.insert(*id), "id {} reused", id);
                        *admitted.entry(token_id.clone()).or_default() += 1;
                    }
                    (_, Command::TokenCreate(t)) => {
                        *issued.entry(t.id.clone()).or_default() += t.uses_left;
                    }
                    _ => {}
                }
            }
            for (t, n) in admitted {
                prop_assert!(n <= issued.get(&t).copied().unwrap_or(0));
            }
        }
    }
}
