//! Grants: signing, chain verification, authorization.
//!
//! A [`Grant`] lets its subject exercise rights on a resource subtree. The root
//! of every chain is a grant issued by the cluster admin (`parent: None`); anyone
//! holding a *delegable* grant may issue narrower grants from it, naming it as
//! `parent`. Each link may only narrow: rights ⊆ parent's, resource inside
//! parent's, expiry no later than parent's.
//!
//! A grant's id ([`grant_id`]) is the blake3 hash of its postcard encoding; its
//! signature ([`sign_grant`]) is the issuer's ECDSA P-256 signature over
//! [`GRANT_SIGNING_CONTEXT`] followed by the same encoding (the prefix keeps a
//! grant signature from being valid as any other kind of signed message).
//!
//! [`verify_grant`] checks one grant and, recursively, its ancestors against a
//! [`GrantView`] of the registry; [`authorize`] decides whether a subject may do
//! something.

use std::collections::{BTreeMap, BTreeSet};

use metta_proto::grant::resource_covers;
use metta_proto::{ApiError, Grant, GrantId, Rights, SignedGrant, Subject};

use crate::keys::{verify_signature, NodeKey};
use crate::UnixTime;

/// Prefix of every grant signature's message.
pub const GRANT_SIGNING_CONTEXT: &[u8] = b"metta grant v1\0";

/// How many ancestors a grant may have. Deeper chains (and cycles in an
/// inconsistent registry) are refused.
pub const MAX_CHAIN_DEPTH: usize = 16;

fn encode(g: &Grant) -> Vec<u8> {
    // Encoding plain owned data into a Vec cannot fail.
    postcard::to_allocvec(g).expect("a Grant always encodes")
}

/// The id of a grant: blake3 of its postcard encoding.
pub fn grant_id(g: &Grant) -> GrantId {
    GrantId(*blake3::hash(&encode(g)).as_bytes())
}

fn signing_message(g: &Grant) -> Vec<u8> {
    let mut msg = GRANT_SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(&encode(g));
    msg
}

/// Signs a grant with the issuer's key.
pub fn sign_grant(g: Grant, key: &NodeKey) -> SignedGrant {
    let signature = key.sign(&signing_message(&g));
    SignedGrant {
        grant: g,
        signature,
    }
}

/// What grant verification needs to know about the registry.
pub trait GrantView {
    /// A stored grant by id.
    fn grant(&self, id: &GrantId) -> Option<&SignedGrant>;
    /// Whether the grant was revoked.
    fn grant_revoked(&self, id: &GrantId) -> bool;
    /// A subject's public key (SubjectPublicKeyInfo DER), if known.
    fn public_key(&self, s: &Subject) -> Option<&[u8]>;
    /// Whether the subject was revoked.
    fn subject_revoked(&self, s: &Subject) -> bool;
    /// The cluster admin: the root of every grant chain.
    fn admin(&self) -> &Subject;
    /// The grants held by `s` (whose `grant.subject` is `s`).
    fn grants_of<'a>(&'a self, s: &Subject) -> Box<dyn Iterator<Item = &'a SignedGrant> + 'a>;
}

fn fmt_expiry(e: &Option<UnixTime>) -> String {
    match e {
        Some(t) => format!("at {t}"),
        None => "never".to_string(),
    }
}

/// Why a grant is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantError {
    /// The grant gives no rights.
    #[error("the grant gives no rights")]
    NoRights,
    /// The rights set has bits that name no right.
    #[error("the grant names unknown rights (bits {0:#x}); rights are read, write, run")]
    UnknownRights(u32),
    /// The resource is not an absolute path.
    #[error("resource {0:?} must be a path starting with '/'")]
    BadResource(String),
    /// The issuer has no known key.
    #[error("issuer {0} is unknown: no public key is registered for it")]
    UnknownIssuer(Subject),
    /// The signature does not verify under the issuer's key.
    #[error(
        "the signature does not verify under {issuer}'s key: the grant is forged or was altered"
    )]
    BadSignature {
        /// The claimed issuer.
        issuer: Subject,
    },
    /// The grant is past its expiry.
    #[error("the grant expired at {expires_at} (unix time)")]
    Expired {
        /// Expiry (unix seconds).
        expires_at: UnixTime,
    },
    /// The grant was revoked.
    #[error("grant {0} has been revoked")]
    Revoked(GrantId),
    /// The issuer was revoked.
    #[error("the issuer {0} has been revoked")]
    IssuerRevoked(Subject),
    /// The subject was revoked.
    #[error("the holder {0} has been revoked")]
    SubjectRevoked(Subject),
    /// A root grant (no parent) not issued by the admin.
    #[error("only the cluster admin ({admin}) may issue a grant without a parent, not {issuer}")]
    NotAdmin {
        /// The issuer.
        issuer: Subject,
        /// The admin.
        admin: Subject,
    },
    /// The parent grant is not in the registry.
    #[error("parent grant {0} does not exist")]
    MissingParent(GrantId),
    /// The parent is held by someone other than the issuer.
    #[error("parent grant {parent} belongs to {holder}, not to the issuer {issuer}")]
    ParentNotHeld {
        /// The parent's id.
        parent: GrantId,
        /// Who holds the parent.
        holder: Subject,
        /// Who issued the child.
        issuer: Subject,
    },
    /// The parent may not be delegated.
    #[error("parent grant {0} does not allow delegation")]
    NotDelegable(GrantId),
    /// The child asks for rights the parent does not give.
    #[error("delegation widens rights: parent grants {parent}, child asks {child}")]
    WidensRights {
        /// Parent's rights.
        parent: Rights,
        /// Child's rights.
        child: Rights,
    },
    /// The child's resource is outside the parent's.
    #[error("delegation widens resource: parent covers {parent}, child asks {child}")]
    WidensResource {
        /// Parent's resource.
        parent: String,
        /// Child's resource.
        child: String,
    },
    /// The child outlives the parent.
    #[error("delegation outlives its parent: parent expires {}, child {}", fmt_expiry(.parent), fmt_expiry(.child))]
    ExtendsExpiry {
        /// Parent's expiry.
        parent: Option<UnixTime>,
        /// Child's expiry.
        child: Option<UnixTime>,
    },
    /// The chain is too deep (or loops).
    #[error("the delegation chain is deeper than {MAX_CHAIN_DEPTH} links (or loops)")]
    TooDeep,
    /// An ancestor is invalid.
    #[error("parent grant {id} is invalid: {source}")]
    Parent {
        /// The invalid ancestor's id (the direct parent).
        id: GrantId,
        /// Why.
        source: Box<GrantError>,
    },
}

/// Verifies a signed grant and its whole chain of ancestors at time `now`.
///
/// Checks, in order: rights non-empty and valid; resource starts with `/`;
/// signature under the issuer's registered key; not expired (`now >=
/// expires_at` is expired); grant, issuer and subject not revoked; then either
/// the issuer is the admin (`parent: None`) or the parent exists, is held by the
/// issuer, is delegable, covers the rights, resource and expiry, and itself
/// verifies (at most [`MAX_CHAIN_DEPTH`] ancestors).
pub fn verify_grant(
    sg: &SignedGrant,
    view: &impl GrantView,
    now: UnixTime,
) -> Result<(), GrantError> {
    verify_at(sg, view, now, 0)
}

fn verify_at(
    sg: &SignedGrant,
    view: &impl GrantView,
    now: UnixTime,
    depth: usize,
) -> Result<(), GrantError> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(GrantError::TooDeep);
    }
    let g = &sg.grant;
    if g.rights == Rights::NONE {
        return Err(GrantError::NoRights);
    }
    if !g.rights.is_valid() {
        return Err(GrantError::UnknownRights(g.rights.0 & !Rights::ALL.0));
    }
    if !g.resource.starts_with('/') {
        return Err(GrantError::BadResource(g.resource.clone()));
    }
    let key = view
        .public_key(&g.issuer)
        .ok_or_else(|| GrantError::UnknownIssuer(g.issuer.clone()))?;
    verify_signature(key, &signing_message(g), &sg.signature).map_err(|_| {
        GrantError::BadSignature {
            issuer: g.issuer.clone(),
        }
    })?;
    if let Some(expires_at) = g.expires_at {
        if now >= expires_at {
            return Err(GrantError::Expired { expires_at });
        }
    }
    let id = grant_id(g);
    if view.grant_revoked(&id) {
        return Err(GrantError::Revoked(id));
    }
    if view.subject_revoked(&g.issuer) {
        return Err(GrantError::IssuerRevoked(g.issuer.clone()));
    }
    if view.subject_revoked(&g.subject) {
        return Err(GrantError::SubjectRevoked(g.subject.clone()));
    }
    let Some(pid) = g.parent else {
        if g.issuer != *view.admin() {
            return Err(GrantError::NotAdmin {
                issuer: g.issuer.clone(),
                admin: view.admin().clone(),
            });
        }
        return Ok(());
    };
    let parent = view
        .grant(&pid)
        .filter(|p| grant_id(&p.grant) == pid)
        .ok_or(GrantError::MissingParent(pid))?;
    let p = &parent.grant;
    if p.subject != g.issuer {
        return Err(GrantError::ParentNotHeld {
            parent: pid,
            holder: p.subject.clone(),
            issuer: g.issuer.clone(),
        });
    }
    if !p.delegable {
        return Err(GrantError::NotDelegable(pid));
    }
    if !p.rights.covers(g.rights) {
        return Err(GrantError::WidensRights {
            parent: p.rights,
            child: g.rights,
        });
    }
    if !resource_covers(&p.resource, &g.resource) {
        return Err(GrantError::WidensResource {
            parent: p.resource.clone(),
            child: g.resource.clone(),
        });
    }
    let expiry_ok = match (p.expires_at, g.expires_at) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(pe), Some(ce)) => ce <= pe,
    };
    if !expiry_ok {
        return Err(GrantError::ExtendsExpiry {
            parent: p.expires_at,
            child: g.expires_at,
        });
    }
    verify_at(parent, view, now, depth + 1).map_err(|e| match e {
        GrantError::TooDeep => GrantError::TooDeep,
        e => GrantError::Parent {
            id: pid,
            source: Box::new(e),
        },
    })
}

/// A refused authorization.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permission denied: {subject} lacks {rights} on {resource}")]
pub struct Denied {
    /// Who asked.
    pub subject: Subject,
    /// The rights that were needed.
    pub rights: Rights,
    /// On what.
    pub resource: String,
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> ApiError {
        ApiError::PermissionDenied {
            subject: d.subject,
            rights: d.rights,
            resource: d.resource,
        }
    }
}

/// Whether `subject` may exercise `needed` on `resource` at `now`.
///
/// The admin may do everything (unless revoked). Anyone else needs, for each
/// right in `needed`, a grant they hold that verifies ([`verify_grant`]), gives
/// that right, and covers `resource` (the rights may come from different
/// grants: holding `read` on `/` and `write` on `/kv` allows `read,write` on
/// `/kv/x`). `needed` must name at least one right.
pub fn authorize(
    subject: &Subject,
    needed: Rights,
    resource: &str,
    view: &impl GrantView,
    now: UnixTime,
) -> Result<(), Denied> {
    let denied = || Denied {
        subject: subject.clone(),
        rights: needed,
        resource: resource.to_string(),
    };
    if needed == Rights::NONE || !needed.is_valid() || view.subject_revoked(subject) {
        return Err(denied());
    }
    if subject == view.admin() {
        return Ok(());
    }
    let mut missing = needed;
    for sg in view.grants_of(subject) {
        let g = &sg.grant;
        let useful = g.rights.intersect(missing);
        if g.subject != *subject
            || useful == Rights::NONE
            || !resource_covers(&g.resource, resource)
            || verify_grant(sg, view, now).is_err()
        {
            continue;
        }
        missing = Rights(missing.0 & !useful.0);
        if missing == Rights::NONE {
            return Ok(());
        }
    }
    Err(denied())
}

/// A simple in-memory [`GrantView`], for tests and small tools. `grants_of`
/// scans every grant.
#[derive(Debug, Clone)]
pub struct MemoryGrantView {
    /// The admin.
    pub admin: Subject,
    /// Grants by id.
    pub grants: BTreeMap<GrantId, SignedGrant>,
    /// Revoked grant ids.
    pub revoked_grants: BTreeSet<GrantId>,
    /// Public keys (SubjectPublicKeyInfo DER).
    pub keys: BTreeMap<Subject, Vec<u8>>,
    /// Revoked subjects.
    pub revoked_subjects: BTreeSet<Subject>,
}

impl MemoryGrantView {
    /// An empty registry with `admin` as the root.
    pub fn new(admin: Subject) -> Self {
        MemoryGrantView {
            admin,
            grants: BTreeMap::new(),
            revoked_grants: BTreeSet::new(),
            keys: BTreeMap::new(),
            revoked_subjects: BTreeSet::new(),
        }
    }

    /// Registers a subject's public key.
    pub fn add_key(&mut self, s: Subject, spki_der: Vec<u8>) {
        self.keys.insert(s, spki_der);
    }

    /// Stores a grant (unverified), returning its id.
    pub fn add(&mut self, sg: SignedGrant) -> GrantId {
        let id = grant_id(&sg.grant);
        self.grants.insert(id, sg);
        id
    }
}

impl GrantView for MemoryGrantView {
    fn grant(&self, id: &GrantId) -> Option<&SignedGrant> {
        self.grants.get(id)
    }
    fn grant_revoked(&self, id: &GrantId) -> bool {
        self.revoked_grants.contains(id)
    }
    fn public_key(&self, s: &Subject) -> Option<&[u8]> {
        self.keys.get(s).map(Vec::as_slice)
    }
    fn subject_revoked(&self, s: &Subject) -> bool {
        self.revoked_subjects.contains(s)
    }
    fn admin(&self) -> &Subject {
        &self.admin
    }
    fn grants_of<'a>(&'a self, s: &Subject) -> Box<dyn Iterator<Item = &'a SignedGrant> + 'a> {
        let s = s.clone();
        Box::new(self.grants.values().filter(move |g| g.grant.subject == s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metta_proto::Right;
    use std::sync::OnceLock;

    const NOW: UnixTime = 1_700_000_000;

    fn user(n: &str) -> Subject {
        Subject::User(n.into())
    }

    /// Keys are slow-ish to make; share a few across tests.
    fn key(i: usize) -> &'static NodeKey {
        static KEYS: OnceLock<Vec<NodeKey>> = OnceLock::new();
        &KEYS.get_or_init(|| (0..8).map(|_| NodeKey::generate().unwrap()).collect())[i]
    }

    fn names() -> [Subject; 6] {
        [
            user("admin"),
            user("alice"),
            user("bob"),
            user("carol"),
            user("dave"),
            user("erin"),
        ]
    }

    fn view() -> MemoryGrantView {
        let mut v = MemoryGrantView::new(user("admin"));
        for (i, s) in names().into_iter().enumerate() {
            v.add_key(s, key(i).public_key_der());
        }
        v
    }

    fn key_of(s: &Subject) -> &'static NodeKey {
        key(names().iter().position(|n| n == s).unwrap())
    }

    fn grant(
        issuer: &Subject,
        subject: &Subject,
        rights: &str,
        resource: &str,
        expires_at: Option<u64>,
        delegable: bool,
        parent: Option<GrantId>,
    ) -> SignedGrant {
        sign_grant(
            Grant {
                issuer: issuer.clone(),
                subject: subject.clone(),
                rights: rights.parse().unwrap(),
                resource: resource.into(),
                expires_at,
                delegable,
                parent,
                issued_at: NOW - 10,
            },
            key_of(issuer),
        )
    }

    /// admin -> alice (read,write on /kv, delegable, until NOW+1000)
    fn root(v: &mut MemoryGrantView) -> GrantId {
        v.add(grant(
            &user("admin"),
            &user("alice"),
            "read,write",
            "/kv",
            Some(NOW + 1000),
            true,
            None,
        ))
    }

    fn rights(s: &str) -> Rights {
        s.parse().unwrap()
    }

    #[test]
    fn valid_chain_authorizes() {
        let mut v = view();
        let r = root(&mut v);
        let c = grant(
            &user("alice"),
            &user("bob"),
            "read",
            "/kv/app",
            Some(NOW + 500),
            false,
            Some(r),
        );
        verify_grant(&c, &v, NOW).unwrap();
        v.add(c);
        authorize(&user("bob"), rights("read"), "/kv/app/x", &v, NOW).unwrap();
        authorize(&user("bob"), rights("read"), "/kv/app", &v, NOW).unwrap();
        assert!(authorize(&user("bob"), rights("write"), "/kv/app", &v, NOW).is_err());
        assert!(authorize(&user("bob"), rights("read"), "/kv/other", &v, NOW).is_err());
        assert!(authorize(&user("bob"), rights("read"), "/kv/app", &v, NOW + 500).is_err());
        authorize(&user("alice"), rights("read,write"), "/kv", &v, NOW).unwrap();
        authorize(&user("admin"), Rights::ALL, "/", &v, NOW).unwrap();
        assert!(authorize(&user("carol"), rights("read"), "/kv", &v, NOW).is_err());
        let d = authorize(&user("carol"), rights("read"), "/kv", &v, NOW).unwrap_err();
        assert_eq!(
            ApiError::from(d.clone()),
            ApiError::PermissionDenied {
                subject: user("carol"),
                rights: rights("read"),
                resource: "/kv".into()
            }
        );
        assert_eq!(
            d.to_string(),
            "permission denied: user/carol lacks read on /kv"
        );
    }

    #[test]
    fn rights_may_combine_across_grants() {
        let mut v = view();
        v.add(grant(
            &user("admin"),
            &user("bob"),
            "read",
            "/",
            None,
            false,
            None,
        ));
        v.add(grant(
            &user("admin"),
            &user("bob"),
            "write",
            "/kv",
            None,
            false,
            None,
        ));
        authorize(&user("bob"), rights("read,write"), "/kv/x", &v, NOW).unwrap();
        assert!(authorize(&user("bob"), rights("read,write"), "/nodes", &v, NOW).is_err());
    }

    #[test]
    fn forged_signature() {
        let mut v = view();
        let r = root(&mut v);
        let mut c = grant(
            &user("alice"),
            &user("bob"),
            "read",
            "/kv",
            None,
            false,
            Some(r),
        );
        c.grant.rights = rights("read,write"); // altered after signing
        assert_eq!(
            verify_grant(&c, &v, NOW),
            Err(GrantError::BadSignature {
                issuer: user("alice")
            })
        );
        // signed by bob, claiming alice as issuer
        let mut c2 = grant(
            &user("bob"),
            &user("bob"),
            "read",
            "/kv",
            Some(NOW + 1),
            false,
            Some(r),
        );
        c2.grant.issuer = user("alice");
        assert!(matches!(
            verify_grant(&c2, &v, NOW),
            Err(GrantError::BadSignature { .. })
        ));
    }

    #[test]
    fn expired() {
        let mut v = view();
        let r = root(&mut v);
        let c = grant(
            &user("alice"),
            &user("bob"),
            "read",
            "/kv",
            Some(NOW),
            false,
            Some(r),
        );
        assert_eq!(
            verify_grant(&c, &v, NOW),
            Err(GrantError::Expired { expires_at: NOW })
        );
        // the parent expiring takes the child with it
        let c = grant(
            &user("alice"),
            &user("bob"),
            "read",
            "/kv",
            Some(NOW + 1000),
            false,
            Some(r),
        );
        assert!(matches!(
            verify_grant(&c, &v, NOW + 1000),
            Err(GrantError::Expired { .. })
        ));
        let c = grant(
            &user("alice"),
            &user("bob"),
            "read",
            "/kv",
            Some(NOW + 900),
            false,
            Some(r),
        );
        let e = verify_grant(&c, &v, NOW + 950).unwrap_err();
        assert!(matches!(e, GrantError::Expired { .. }), "{e}");
    }

    #[test]
    fn revoked_parent() {
        let mut v = view();
        let r = root(&mut v);
        let c = grant(
            &user("alice"),
            &user("bob"),
            "read",
            "/kv",
            Some(NOW + 9),
            false,
            Some(r),
        );
        verify_grant(&c, &v, NOW).unwrap();
        v.revoked_grants.insert(r);
        let e = verify_grant(&c, &v, NOW).unwrap_err();
        assert_eq!(
            e,
            GrantError::Parent {
                id: r,
                source: Box::new(GrantError::Revoked(r))
            }
        );
        assert!(e.to_string().contains("has been revoked"), "{e}");
        v.add(c.clone());
        assert!(authorize(&user("bob"), rights("read"), "/kv", &v, NOW).is_err());
    }

    #[test]
    fn revoked_subjects() {
        let mut v = view();
        let r = root(&mut v);
        let c = grant(
            &user("alice"),
            &user("bob"),
            "read",
            "/kv",
            Some(NOW + 9),
            false,
            Some(r),
        );
        let mut v2 = v.clone();
        v2.revoked_subjects.insert(user("alice"));
        assert_eq!(
            verify_grant(&c, &v2, NOW),
            Err(GrantError::IssuerRevoked(user("alice")))
        );
        v.revoked_subjects.insert(user("bob"));
        assert_eq!(
            verify_grant(&c, &v, NOW),
            Err(GrantError::SubjectRevoked(user("bob")))
        );
    }

    #[test]
    fn widening_rights() {
        let mut v = view();
        let r = root(&mut v);
        let c = grant(
            &user("alice"),
            &user("bob"),
            "read,run",
            "/kv",
            Some(NOW + 9),
            false,
            Some(r),
        );
        let e = verify_grant(&c, &v, NOW).unwrap_err();
        assert_eq!(
            e,
            GrantError::WidensRights {
                parent: rights("read,write"),
                child: rights("read,run")
            }
        );
        assert_eq!(
            e.to_string(),
            "delegation widens rights: parent grants read,write, child asks read,run"
        );
    }

    #[test]
    fn widening_resource() {
        let mut v = view();
        let r = root(&mut v);
        for bad in ["/", "/kvx", "/nodes"] {
            let c = grant(
                &user("alice"),
                &user("bob"),
                "read",
                bad,
                Some(NOW + 9),
                false,
                Some(r),
            );
            assert_eq!(
                verify_grant(&c, &v, NOW),
                Err(GrantError::WidensResource {
                    parent: "/kv".into(),
                    child: bad.into()
                })
            );
        }
        let c = grant(
            &user("alice"),
            &user("bob"),
            "read",
            "kv",
            Some(NOW + 9),
            false,
            Some(r),
        );
        assert_eq!(
            verify_grant(&c, &v, NOW),
            Err(GrantError::BadResource("kv".into()))
        );
    }

    #[test]
    fn extending_expiry() {
        let mut v = view();
        let r = root(&mut v);
        let c = grant(
            &user("alice"),
            &user("bob"),
            "read",
            "/kv",
            Some(NOW + 1001),
            false,
            Some(r),
        );
        assert_eq!(
            verify_grant(&c, &v, NOW),
            Err(GrantError::ExtendsExpiry {
                parent: Some(NOW + 1000),
                child: Some(NOW + 1001)
            })
        );
        let c = grant(
            &user("alice"),
            &user("bob"),
            "read",
            "/kv",
            None,
            false,
            Some(r),
        );
        let e = verify_grant(&c, &v, NOW).unwrap_err();
        assert_eq!(
            e,
            GrantError::ExtendsExpiry {
                parent: Some(NOW + 1000),
                child: None
            }
        );
        assert!(e.to_string().contains("child never"), "{e}");
    }

    #[test]
    fn non_delegable_parent() {
        let mut v = view();
        let r = v.add(grant(
            &user("admin"),
            &user("alice"),
            "read",
            "/",
            None,
            false,
            None,
        ));
        let c = grant(
            &user("alice"),
            &user("bob"),
            "read",
            "/kv",
            None,
            false,
            Some(r),
        );
        assert_eq!(verify_grant(&c, &v, NOW), Err(GrantError::NotDelegable(r)));
    }

    #[test]
    fn parent_held_by_someone_else() {
        let mut v = view();
        let r = root(&mut v); // held by alice
        let c = grant(
            &user("carol"),
            &user("bob"),
            "read",
            "/kv",
            Some(NOW + 1),
            false,
            Some(r),
        );
        assert!(matches!(
            verify_grant(&c, &v, NOW),
            Err(GrantError::ParentNotHeld { .. })
        ));
        let c = grant(
            &user("alice"),
            &user("bob"),
            "read",
            "/kv",
            None,
            false,
            Some(GrantId([9; 32])),
        );
        assert_eq!(
            verify_grant(&c, &v, NOW),
            Err(GrantError::MissingParent(GrantId([9; 32])))
        );
    }

    #[test]
    fn unknown_issuer() {
        let mut v = view();
        v.keys.remove(&user("alice"));
        let r = root(&mut v);
        let c = grant(
            &user("alice"),
            &user("bob"),
            "read",
            "/kv",
            Some(NOW + 1),
            false,
            Some(r),
        );
        assert_eq!(
            verify_grant(&c, &v, NOW),
            Err(GrantError::UnknownIssuer(user("alice")))
        );
    }

    #[test]
    fn non_admin_root() {
        let v = view();
        let c = grant(&user("alice"), &user("bob"), "read", "/", None, true, None);
        assert_eq!(
            verify_grant(&c, &v, NOW),
            Err(GrantError::NotAdmin {
                issuer: user("alice"),
                admin: user("admin")
            })
        );
    }

    #[test]
    fn bad_rights() {
        let v = view();
        let mut c = grant(&user("admin"), &user("bob"), "read", "/", None, true, None);
        c.grant.rights = Rights::NONE;
        let c = sign_grant(c.grant, key(0));
        assert_eq!(verify_grant(&c, &v, NOW), Err(GrantError::NoRights));
        let mut g = c.grant.clone();
        g.rights = Rights(8 | 1);
        let c = sign_grant(g, key(0));
        assert_eq!(verify_grant(&c, &v, NOW), Err(GrantError::UnknownRights(8)));
    }

    #[test]
    fn inconsistent_registry_cannot_loop() {
        // A view that claims every id maps to the same self-parented grant.
        struct Loop(MemoryGrantView, SignedGrant);
        impl GrantView for Loop {
            fn grant(&self, _: &GrantId) -> Option<&SignedGrant> {
                Some(&self.1)
            }
            fn grant_revoked(&self, _: &GrantId) -> bool {
                false
            }
            fn public_key(&self, s: &Subject) -> Option<&[u8]> {
                self.0.public_key(s)
            }
            fn subject_revoked(&self, _: &Subject) -> bool {
                false
            }
            fn admin(&self) -> &Subject {
                &self.0.admin
            }
            fn grants_of<'a>(
                &'a self,
                _: &Subject,
            ) -> Box<dyn Iterator<Item = &'a SignedGrant> + 'a> {
                Box::new(std::iter::once(&self.1))
            }
        }
        // alice -> alice with parent = some id; the view returns it for any id,
        // but its real id differs from the parent id, so it is "missing".
        let g = grant(
            &user("alice"),
            &user("alice"),
            "read",
            "/",
            None,
            true,
            Some(GrantId([1; 32])),
        );
        let l = Loop(view(), g.clone());
        assert!(matches!(
            verify_grant(&g, &l, NOW),
            Err(GrantError::MissingParent(_))
        ));
        // A genuinely deep chain is cut off at the limit.
        let mut v = view();
        let mut parent = v.add(grant(
            &user("admin"),
            &user("alice"),
            "read",
            "/",
            None,
            true,
            None,
        ));
        let mut last = None;
        for _ in 0..=MAX_CHAIN_DEPTH {
            let g = grant(
                &user("alice"),
                &user("alice"),
                "read",
                "/",
                None,
                true,
                Some(parent),
            );
            parent = v.add(g.clone());
            last = Some(g);
        }
        assert_eq!(
            verify_grant(&last.unwrap(), &v, NOW),
            Err(GrantError::TooDeep)
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const RESOURCES: [&str; 6] = ["/", "/kv", "/kv/a", "/kv/a/b", "/kv/b", "/nodes"];

        /// One link of a chain as generated: possibly *not* a valid narrowing.
        #[derive(Debug, Clone)]
        struct Link {
            rights: u32,
            resource: usize,
            /// Offset from NOW, or None.
            expires: Option<u64>,
            delegable: bool,
            /// Clamp to the parent (a well-formed narrowing) so that long valid
            /// chains are common; otherwise the link is taken as generated.
            honest: bool,
        }

        fn link() -> impl Strategy<Value = Link> {
            (
                1u32..8,
                0..RESOURCES.len(),
                proptest::option::of(1u64..2000),
                proptest::bool::weighted(0.9),
                proptest::bool::weighted(0.9),
            )
                .prop_map(|(rights, resource, expires, delegable, honest)| Link {
                    rights,
                    resource,
                    expires,
                    delegable,
                    honest,
                })
        }

        #[derive(Debug, Clone, Copy)]
        enum Break {
            Revoke,
            Expire,
            Forge,
            RevokeHolder,
        }

        /// Builds admin -> names[1] -> names[2] -> ... from `links`, with the
        /// link at `broken` damaged. Returns the view and the chain's grants.
        fn build(
            links: &[Link],
            broken: Option<(usize, Break)>,
        ) -> (MemoryGrantView, Vec<SignedGrant>) {
            let mut v = view();
            let n = names();
            let mut parent = None;
            let mut chain = Vec::new();
            for (i, l) in links.iter().enumerate() {
                let mut rights = Rights(l.rights);
                let mut resource = RESOURCES[l.resource].to_string();
                let mut expires = l.expires.map(|e| NOW + e);
                if let (true, Some(prev)) = (l.honest, chain.last().map(|p: &SignedGrant| &p.grant))
                {
                    rights = match rights.intersect(prev.rights) {
                        Rights::NONE => prev.rights,
                        r => r,
                    };
                    if !resource_covers(&prev.resource, &resource) {
                        resource = prev.resource.clone();
                    }
                    expires = match (prev.expires_at, expires) {
                        (Some(p), Some(c)) => Some(p.min(c)),
                        (Some(p), None) => Some(p),
                        (None, c) => c,
                    };
                }
                if let Some((b, Break::Expire)) = broken {
                    if b == i {
                        expires = Some(NOW);
                    }
                }
                let g = Grant {
                    issuer: n[i].clone(),
                    subject: n[i + 1].clone(),
                    rights,
                    resource,
                    expires_at: expires,
                    delegable: l.delegable,
                    parent,
                    issued_at: NOW,
                };
                let mut sg = sign_grant(g, key(i));
                if let Some((b, kind)) = broken {
                    if b == i {
                        match kind {
                            Break::Revoke => {
                                v.revoked_grants.insert(grant_id(&sg.grant));
                            }
                            Break::Forge => sg = sign_grant(sg.grant, key(7)),
                            Break::RevokeHolder => {
                                v.revoked_subjects.insert(n[i + 1].clone());
                            }
                            Break::Expire => {}
                        }
                    }
                }
                parent = Some(v.add(sg.clone()));
                chain.push(sg);
            }
            (v, chain)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

            /// Whatever the chain, a holder is never authorized for a right or a
            /// resource that some link above it does not grant, nor after some
            /// link expired or when a link is not delegable.
            #[test]
            fn never_exceeds_any_link(links in proptest::collection::vec(link(), 1..5)) {
                let (v, chain) = build(&links, None);
                let n = names();
                for holder in 1..=links.len() {
                    for right in Right::ALL {
                        for res in RESOURCES {
                            for now in [NOW, NOW + 1000] {
                                if authorize(&n[holder], Rights::of(right), res, &v, now).is_ok() {
                                    for (j, sg) in chain[..holder].iter().enumerate() {
                                        let g = &sg.grant;
                                        prop_assert!(g.rights.contains(right), "link {} lacks {}", j, right);
                                        prop_assert!(resource_covers(&g.resource, res), "link {} does not cover {}", j, res);
                                        prop_assert!(g.expires_at.is_none_or(|e| now < e), "link {} expired", j);
                                        prop_assert!(j + 1 == holder || g.delegable, "link {} not delegable", j);
                                    }
                                }
                            }
                        }
                    }
                }
            }

            /// Breaking a link denies everything at and below it.
            #[test]
            fn broken_link_denies_below(
                links in proptest::collection::vec(link(), 1..5),
                at in any::<prop::sample::Index>(),
                kind in prop_oneof![Just(Break::Revoke), Just(Break::Expire), Just(Break::Forge), Just(Break::RevokeHolder)],
            ) {
                let b = at.index(links.len());
                let (v, _) = build(&links, Some((b, kind)));
                let n = names();
                for holder in &n[b + 1..=links.len()] {
                    for res in RESOURCES {
                        for right in Right::ALL {
                            prop_assert!(
                                authorize(holder, Rights::of(right), res, &v, NOW).is_err(),
                                "{} still has {} on {} after {:?} of link {}", holder, right, res, kind, b
                            );
                        }
                    }
                }
            }
        }

        /// Sanity for the property tests: a well-formed chain does authorize.
        #[test]
        fn honest_chain_authorizes_its_tail() {
            let links: Vec<Link> = (0..4)
                .map(|_| Link {
                    rights: 1,
                    resource: 2,
                    expires: Some(100),
                    delegable: true,
                    honest: false,
                })
                .collect();
            let (v, _) = build(&links, None);
            authorize(&names()[4], rights("read"), "/kv/a/b", &v, NOW).unwrap();
        }
    }
}
