//! Code authority: signed domain images and the capabilities a domain runs with.
//!
//! A domain image is a wasm module plus a [`SignedManifest`]: its vendor's
//! statement of the module's blake3 hash, name, version and the
//! [`Capability`]s the code may use. [`sign_manifest`] signs with the vendor's
//! key: ECDSA P-256 over [`MANIFEST_SIGNING_CONTEXT`] followed by the postcard
//! encoding of the manifest (the prefix keeps a manifest signature from being
//! valid as any other kind of signed message).
//!
//! [`verify_image`] accepts an image only if, in order: the vendor is in the
//! trusted [`VendorSet`] ([`ImageError::UnknownVendor`]); the key embedded in
//! the image is the trusted one ([`ImageError::VendorKeyMismatch`]); the image
//! is signed ([`ImageError::Unsigned`]) by that key
//! ([`ImageError::BadSignature`]); the manifest is well-formed
//! ([`ImageError::InvalidManifest`]: name, version, capabilities valid and
//! not repeated); and the module is the one the manifest names
//! ([`ImageError::HashMismatch`]). Success yields a [`VerifiedImage`], a proof
//! token only this module can create.
//!
//! # Authority
//!
//! A domain runs with `policy(A_user, A_vendor)`: by default
//! [`effective_caps`], the intersection of what the launching user holds
//! ([`user_caps`]) and what the manifest declares. Nothing is ambient: a
//! capability neither side names is not there. Channel prefixes intersect on
//! `/` boundaries: a user's `/svc` and a vendor's `/svc/counter` give
//! `/svc/counter`; `/svc` and `/tmp` give nothing.
//!
//! A user's capabilities come from their grants ([`crate::grants`]). Only
//! grants that give the **`run`** right and verify at `now`
//! ([`crate::grants::verify_grant`]: signed, chained from the admin, live, not
//! revoked) count, and the grant's resource maps to capabilities so:
//!
//! | grant `run` on          | gives                        |
//! |-------------------------|------------------------------|
//! | `/`                     | everything (`log`, `clock`, `channel:/`) |
//! | `/log`                  | `log`                        |
//! | `/clock`                | `clock`                      |
//! | `/channels`             | `channel:/` (every channel)  |
//! | `/channels/<p>`         | `channel:/<p>`               |
//! | anything else           | nothing                      |
//!
//! (a grant gives a capability when its resource covers the capability's
//! resource, as everywhere in grants; `run` on `/log/x` gives nothing). The
//! cluster admin holds everything; a revoked subject holds nothing. See
//! [`resource_caps`].

use std::collections::BTreeMap;

use metta_proto::grant::resource_covers;
use metta_proto::ids::check_name;
use metta_proto::image::check_channel_prefix;
use metta_proto::{CapSet, Capability, Manifest, Right, SignedManifest, Subject};
use p256::ecdsa::VerifyingKey;
use p256::pkcs8::DecodePublicKey;
use serde::{Deserialize, Serialize};

use crate::grants::{verify_grant, GrantView};
use crate::keys::{verify_signature, NodeKey};
use crate::UnixTime;

/// Prefix of every manifest signature's message.
pub const MANIFEST_SIGNING_CONTEXT: &[u8] = b"metta manifest v1\0";

/// Grant resource whose `run` right gives `log`.
pub const LOG_RESOURCE: &str = "/log";
/// Grant resource whose `run` right gives `clock`.
pub const CLOCK_RESOURCE: &str = "/clock";
/// Grant resource under which `run` gives channel prefixes
/// (`/channels/svc` ⇒ `channel:/svc`).
pub const CHANNELS_RESOURCE: &str = "/channels";

fn signing_message(m: &Manifest) -> Vec<u8> {
    let mut msg = MANIFEST_SIGNING_CONTEXT.to_vec();
    // Encoding plain owned data into a Vec cannot fail.
    msg.extend_from_slice(&postcard::to_allocvec(m).expect("a Manifest always encodes"));
    msg
}

/// The blake3 hash of a wasm module, as [`Manifest::module_hash`] holds it.
pub fn module_hash(wasm: &[u8]) -> [u8; 32] {
    *blake3::hash(wasm).as_bytes()
}

/// Signs a manifest with the vendor's key, embedding the key's public half.
///
/// The manifest is not checked here; [`verify_image`] refuses an invalid one.
pub fn sign_manifest(manifest: Manifest, key: &NodeKey) -> SignedManifest {
    let signature = key.sign(&signing_message(&manifest));
    SignedManifest {
        manifest,
        vendor_spki: key.public_key_der(),
        signature,
    }
}

/// Why an image is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The vendor is not trusted by this cluster.
    #[error("vendor {vendor:?} is not trusted: add its public key to the trusted vendors first")]
    UnknownVendor {
        /// The vendor the manifest names.
        vendor: String,
    },
    /// The image carries a key other than the one trusted for its vendor.
    #[error("the image was signed with a key that is not the trusted key of vendor {vendor:?}")]
    VendorKeyMismatch {
        /// The vendor the manifest names.
        vendor: String,
    },
    /// The image carries no signature.
    #[error("the image is unsigned: its manifest must be signed by the vendor's key")]
    Unsigned,
    /// The signature does not verify under the vendor's key.
    #[error(
        "the manifest signature does not verify: the manifest was altered or signed by another key"
    )]
    BadSignature,
    /// The module is not the one the manifest names.
    #[error(
        "the wasm module does not match the manifest: expected blake3 {expected}, got {actual}"
    )]
    HashMismatch {
        /// The hash in the manifest (hex).
        expected: String,
        /// The hash of the module given (hex).
        actual: String,
    },
    /// The manifest is signed but malformed.
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// A vendor cannot be trusted as given.
    #[error("cannot trust vendor {vendor:?}: {reason}")]
    InvalidVendor {
        /// The vendor's name.
        vendor: String,
        /// Why.
        reason: String,
    },
}

/// The trusted vendors: name → public key (SubjectPublicKeyInfo DER).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VendorSet {
    vendors: BTreeMap<String, Vec<u8>>,
}

impl VendorSet {
    /// No trusted vendors.
    pub fn new() -> VendorSet {
        VendorSet::default()
    }

    /// Trusts `spki_der` as the key of `vendor`, returning the key it replaces.
    /// The name must follow the naming rules and the key be ECDSA P-256.
    pub fn add(&mut self, vendor: &str, spki_der: Vec<u8>) -> Result<Option<Vec<u8>>, ImageError> {
        let invalid = |reason: String| ImageError::InvalidVendor {
            vendor: vendor.to_string(),
            reason,
        };
        check_name("vendor", vendor).map_err(|e| invalid(e.0))?;
        VerifyingKey::from_public_key_der(&spki_der)
            .map_err(|e| invalid(format!("not an ECDSA P-256 public key: {e}")))?;
        Ok(self.vendors.insert(vendor.to_string(), spki_der))
    }

    /// Stops trusting `vendor`, returning its key.
    pub fn remove(&mut self, vendor: &str) -> Option<Vec<u8>> {
        self.vendors.remove(vendor)
    }

    /// The trusted key of `vendor`.
    pub fn get(&self, vendor: &str) -> Option<&[u8]> {
        self.vendors.get(vendor).map(Vec::as_slice)
    }

    /// Every trusted vendor and its key, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.vendors.iter().map(|(n, k)| (n.as_str(), k.as_slice()))
    }

    /// How many vendors are trusted.
    pub fn len(&self) -> usize {
        self.vendors.len()
    }

    /// Whether no vendor is trusted.
    pub fn is_empty(&self) -> bool {
        self.vendors.is_empty()
    }
}

/// An image that passed [`verify_image`]. Only verification creates one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedImage {
    manifest: Manifest,
}

impl VerifiedImage {
    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The blake3 hash of the verified module.
    pub fn module_hash(&self) -> [u8; 32] {
        self.manifest.module_hash
    }

    /// What the vendor declared the code may use.
    pub fn capabilities(&self) -> &[Capability] {
        &self.manifest.capabilities
    }

    /// The capabilities a domain of this image runs with when launched by a
    /// user holding `user` ([`effective_caps`]).
    pub fn effective_caps(&self, user: &CapSet) -> CapSet {
        effective_caps(user, &self.manifest.capabilities)
    }

    /// The manifest, consuming the proof.
    pub fn into_manifest(self) -> Manifest {
        self.manifest
    }
}

/// Verifies an image (see the module docs for the checks and their order).
pub fn verify_image(
    sm: &SignedManifest,
    wasm: &[u8],
    vendors: &VendorSet,
) -> Result<VerifiedImage, ImageError> {
    let m = &sm.manifest;
    let vendor = || m.vendor.clone();
    let trusted = vendors
        .get(&m.vendor)
        .ok_or_else(|| ImageError::UnknownVendor { vendor: vendor() })?;
    if sm.vendor_spki != trusted {
        return Err(ImageError::VendorKeyMismatch { vendor: vendor() });
    }
    if sm.signature.is_empty() {
        return Err(ImageError::Unsigned);
    }
    verify_signature(trusted, &signing_message(m), &sm.signature)
        .map_err(|_| ImageError::BadSignature)?;
    m.validate().map_err(|e| ImageError::InvalidManifest(e.0))?;
    let actual = module_hash(wasm);
    if actual != m.module_hash {
        return Err(ImageError::HashMismatch {
            expected: hex::encode(m.module_hash),
            actual: hex::encode(actual),
        });
    }
    Ok(VerifiedImage {
        manifest: m.clone(),
    })
}

/// The default `policy(A_user, A_vendor)`: the capabilities in both.
///
/// `log` and `clock` only if both sides have them; a channel prefix where one
/// side's prefix covers the other's, narrowed to the longer one (`/svc` ∩
/// `/svc/counter` = `/svc/counter`; disjoint prefixes give nothing). Invalid
/// channel prefixes on either side are ignored.
pub fn effective_caps(user: &CapSet, vendor: &[Capability]) -> CapSet {
    let mut out = CapSet::none();
    for cap in vendor {
        match cap {
            Capability::Log => out.log |= user.log,
            Capability::Clock => out.clock |= user.clock,
            Capability::Channel(v) => {
                if check_channel_prefix(v).is_err() {
                    continue;
                }
                for u in user.channels.iter() {
                    let narrower = if resource_covers(u, v) {
                        v
                    } else if resource_covers(v, u) {
                        u
                    } else {
                        continue;
                    };
                    // Invalid user prefixes are refused by insert.
                    let _ = out.insert(Capability::Channel(narrower.clone()));
                }
            }
        }
    }
    out
}

/// The capabilities `run` on a grant resource gives (see the module docs).
pub fn resource_caps(resource: &str) -> CapSet {
    let mut out = CapSet::none();
    if !resource.starts_with('/') {
        return out;
    }
    if resource_covers(resource, LOG_RESOURCE) {
        out.log = true;
    }
    if resource_covers(resource, CLOCK_RESOURCE) {
        out.clock = true;
    }
    if resource_covers(resource, CHANNELS_RESOURCE) {
        out.channels = vec!["/".to_string()];
    } else if let Some(rest) = resource.strip_prefix(CHANNELS_RESOURCE) {
        // resource is under /channels/ (not /channelsx): keep the '/'.
        let p = rest.trim_end_matches('/');
        if rest.starts_with('/') && !p.is_empty() {
            let _ = out.insert(Capability::Channel(p.to_string()));
        }
    }
    out
}

/// What `subject` holds at `now`: the union of [`resource_caps`] over their
/// grants that give `run` and verify. The admin holds everything; a revoked
/// subject nothing.
pub fn user_caps(subject: &Subject, view: &impl GrantView, now: UnixTime) -> CapSet {
    if view.subject_revoked(subject) {
        return CapSet::none();
    }
    if subject == view.admin() {
        return CapSet::all();
    }
    let mut out = CapSet::none();
    for sg in view.grants_of(subject) {
        let g = &sg.grant;
        if g.subject != *subject
            || !g.rights.contains(Right::Run)
            || verify_grant(sg, view, now).is_err()
        {
            continue;
        }
        for cap in resource_caps(&g.resource).capabilities() {
            let _ = out.insert(cap);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::{sign_grant, MemoryGrantView};
    use metta_proto::{Grant, Rights};
    use std::sync::OnceLock;

    const NOW: UnixTime = 1_700_000_000;
    const WASM: &[u8] = b"\0asm\x01\0\0\0 pretend module";

    fn key(i: usize) -> &'static NodeKey {
        static KEYS: OnceLock<Vec<NodeKey>> = OnceLock::new();
        &KEYS.get_or_init(|| (0..3).map(|_| NodeKey::generate().unwrap()).collect())[i]
    }

    fn cap(s: &str) -> Capability {
        s.parse().unwrap()
    }

    fn caps(s: &str) -> CapSet {
        s.parse().unwrap()
    }

    fn manifest() -> Manifest {
        Manifest {
            name: "counter".into(),
            version: "1.0.0".into(),
            vendor: "acme".into(),
            module_hash: module_hash(WASM),
            capabilities: vec![cap("log"), cap("channel:/svc/counter")],
        }
    }

    fn vendors() -> VendorSet {
        let mut v = VendorSet::new();
        assert_eq!(v.add("acme", key(0).public_key_der()), Ok(None));
        v
    }

    #[test]
    fn roundtrip() {
        let sm = sign_manifest(manifest(), key(0));
        // Through the wire and back.
        let sm: SignedManifest =
            postcard::from_bytes(&postcard::to_allocvec(&sm).unwrap()).unwrap();
        let vi = verify_image(&sm, WASM, &vendors()).unwrap();
        assert_eq!(vi.manifest(), &manifest());
        assert_eq!(vi.module_hash(), module_hash(WASM));
        assert_eq!(vi.capabilities(), manifest().capabilities.as_slice());
        assert_eq!(
            vi.effective_caps(&CapSet::all()),
            caps("log,channel:/svc/counter")
        );
        assert_eq!(vi.into_manifest(), manifest());
    }

    #[test]
    fn unsigned_and_tampered_manifests() {
        let mut sm = sign_manifest(manifest(), key(0));
        sm.signature.clear();
        let e = verify_image(&sm, WASM, &vendors()).unwrap_err();
        assert_eq!(e, ImageError::Unsigned);
        assert!(e.to_string().contains("unsigned"), "{e}");

        let mut sm = sign_manifest(manifest(), key(0));
        sm.signature = b"junk".to_vec();
        assert_eq!(
            verify_image(&sm, WASM, &vendors()),
            Err(ImageError::BadSignature)
        );

        // Widening the capabilities after signing.
        let mut sm = sign_manifest(manifest(), key(0));
        sm.manifest.capabilities.push(cap("channel:/"));
        let e = verify_image(&sm, WASM, &vendors()).unwrap_err();
        assert_eq!(e, ImageError::BadSignature);
        assert!(e.to_string().contains("altered"), "{e}");

        let mut sm = sign_manifest(manifest(), key(0));
        sm.manifest.version = "1.0.1".into();
        assert_eq!(
            verify_image(&sm, WASM, &vendors()),
            Err(ImageError::BadSignature)
        );

        // Same key, but a signature made for another kind of message (no context).
        let mut sm = sign_manifest(manifest(), key(0));
        sm.signature = key(0).sign(&postcard::to_allocvec(&sm.manifest).unwrap());
        assert_eq!(
            verify_image(&sm, WASM, &vendors()),
            Err(ImageError::BadSignature)
        );
    }

    #[test]
    fn tampered_wasm() {
        let sm = sign_manifest(manifest(), key(0));
        let mut wasm = WASM.to_vec();
        wasm[9] ^= 1;
        let e = verify_image(&sm, &wasm, &vendors()).unwrap_err();
        assert_eq!(
            e,
            ImageError::HashMismatch {
                expected: hex::encode(module_hash(WASM)),
                actual: hex::encode(module_hash(&wasm)),
            }
        );
        assert!(
            e.to_string().contains(&hex::encode(module_hash(WASM))),
            "{e}"
        );
        assert_eq!(e.clone(), e);
    }

    #[test]
    fn unknown_vendor() {
        let sm = sign_manifest(manifest(), key(0));
        let e = verify_image(&sm, WASM, &VendorSet::new()).unwrap_err();
        assert_eq!(
            e,
            ImageError::UnknownVendor {
                vendor: "acme".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "vendor \"acme\" is not trusted: add its public key to the trusted vendors first"
        );
        // A removed vendor is unknown again.
        let mut v = vendors();
        assert_eq!(v.remove("acme"), Some(key(0).public_key_der()));
        assert!(v.is_empty());
        assert!(matches!(
            verify_image(&sm, WASM, &v),
            Err(ImageError::UnknownVendor { .. })
        ));
    }

    #[test]
    fn wrong_vendor_key() {
        // Signed by another key that claims to be acme.
        let sm = sign_manifest(manifest(), key(1));
        assert_eq!(
            verify_image(&sm, WASM, &vendors()),
            Err(ImageError::VendorKeyMismatch {
                vendor: "acme".into()
            })
        );
        // Signed by another key, but carrying acme's public key.
        let mut sm = sign_manifest(manifest(), key(1));
        sm.vendor_spki = key(0).public_key_der();
        assert_eq!(
            verify_image(&sm, WASM, &vendors()),
            Err(ImageError::BadSignature)
        );
        // A trusted vendor signing in another vendor's name.
        let mut v = vendors();
        v.add("evil", key(1).public_key_der()).unwrap();
        let sm = sign_manifest(manifest(), key(1));
        assert!(matches!(
            verify_image(&sm, WASM, &v),
            Err(ImageError::VendorKeyMismatch { .. })
        ));
    }

    #[test]
    fn invalid_manifests_are_refused_even_when_signed() {
        type Breaker = fn(&mut Manifest);
        let cases: Vec<(Breaker, &str)> = vec![
            (|m| m.name.clear(), "image name"),
            (|m| m.version = "one".into(), "version"),
            (|m| m.capabilities.push(Capability::Log), "declared twice"),
            (
                |m| m.capabilities.push(Capability::Channel("svc".into())),
                "must start with '/'",
            ),
            (
                |m| m.capabilities.push(Capability::Channel("/a//b".into())),
                "empty segment",
            ),
        ];
        for (break_it, why) in cases {
            let mut m = manifest();
            break_it(&mut m);
            let sm = sign_manifest(m, key(0));
            match verify_image(&sm, WASM, &vendors()) {
                Err(ImageError::InvalidManifest(msg)) => assert!(msg.contains(why), "{msg}"),
                other => panic!("{why}: {other:?}"),
            }
        }
        // Bad vendor names are never trusted in the first place.
        let mut v = VendorSet::new();
        assert!(matches!(
            v.add("Acme Inc", key(0).public_key_der()),
            Err(ImageError::InvalidVendor { .. })
        ));
        let e = v.add("acme", b"junk".to_vec()).unwrap_err();
        assert!(e.to_string().contains("P-256"), "{e}");
    }

    #[test]
    fn vendor_set_serde_and_replace() {
        let mut v = vendors();
        let old = v.add("acme", key(2).public_key_der()).unwrap();
        assert_eq!(old, Some(key(0).public_key_der()));
        v.add("other", key(1).public_key_der()).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v.get("acme"), Some(key(2).public_key_der().as_slice()));
        let names: Vec<&str> = v.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["acme", "other"]);
        let back: VendorSet = postcard::from_bytes(&postcard::to_allocvec(&v).unwrap()).unwrap();
        assert_eq!(back, v);
        // The old key is no longer trusted.
        let sm = sign_manifest(manifest(), key(0));
        assert!(matches!(
            verify_image(&sm, WASM, &v),
            Err(ImageError::VendorKeyMismatch { .. })
        ));
    }

    #[test]
    fn intersection_examples() {
        let v = |s: &str| caps(s).capabilities();
        for (user, vendor, want) in [
            (
                "channel:/svc",
                "channel:/svc/counter",
                "channel:/svc/counter",
            ),
            (
                "channel:/svc/counter",
                "channel:/svc",
                "channel:/svc/counter",
            ),
            ("channel:/svc", "channel:/tmp", "none"),
            ("channel:/svc", "channel:/svcx", "none"),
            (
                "channel:/",
                "channel:/a,channel:/b/c",
                "channel:/a,channel:/b/c",
            ),
            (
                "channel:/a/x,channel:/a/y",
                "channel:/a",
                "channel:/a/x,channel:/a/y",
            ),
            ("log", "log,clock", "log"),
            ("log,clock", "clock", "clock"),
            ("clock", "log", "none"),
            ("none", "log,clock,channel:/", "none"),
            ("log,clock,channel:/", "none", "none"),
        ] {
            assert_eq!(
                effective_caps(&caps(user), &v(vendor)),
                caps(want),
                "{user} ∩ {vendor}"
            );
        }
        // Invalid prefixes on either side count for nothing.
        let user = CapSet {
            log: false,
            clock: false,
            channels: vec!["svc".into()],
        };
        assert!(effective_caps(&user, &[Capability::Channel("svc".into())]).is_empty());
        assert!(effective_caps(&CapSet::all(), &[Capability::Channel("/x/".into())]).is_empty());
    }

    #[test]
    fn resource_mapping() {
        for (res, want) in [
            ("/", "log,clock,channel:/"),
            ("/log", "log"),
            ("/log/x", "none"),
            ("/clock", "clock"),
            ("/channels", "channel:/"),
            ("/channels/", "channel:/"),
            ("/channels/svc/counter", "channel:/svc/counter"),
            ("/channels/svc/", "channel:/svc"),
            ("/channelsx", "none"),
            ("/channels/a//b", "none"),
            ("/kv", "none"),
            ("channels/svc", "none"),
        ] {
            assert_eq!(resource_caps(res), caps(want), "{res}");
        }
    }

    fn user(n: &str) -> Subject {
        Subject::User(n.into())
    }

    #[test]
    fn user_caps_from_grants() {
        let mut v = MemoryGrantView::new(user("admin"));
        v.add_key(user("admin"), key(0).public_key_der());
        v.add_key(user("alice"), key(1).public_key_der());
        let g = |rights: &str, resource: &str, expires_at: Option<u64>| {
            sign_grant(
                Grant {
                    issuer: user("admin"),
                    subject: user("alice"),
                    rights: rights.parse::<Rights>().unwrap(),
                    resource: resource.into(),
                    expires_at,
                    delegable: false,
                    parent: None,
                    issued_at: NOW - 10,
                },
                key(0),
            )
        };
        v.add(g("run", "/channels/svc", None));
        v.add(g("read,run", "/log", Some(NOW + 100)));
        v.add(g("read,write", "/clock", None)); // no run: nothing
        v.add(g("run", "/channels/tmp", Some(NOW))); // expired
        let mut forged = g("run", "/", None);
        forged.signature = key(1).sign(b"x");
        v.add(forged);
        let revoked = v.add(g("run", "/channels/old", None));
        v.revoked_grants.insert(revoked);

        assert_eq!(user_caps(&user("alice"), &v, NOW), caps("log,channel:/svc"));
        assert_eq!(
            user_caps(&user("alice"), &v, NOW + 100),
            caps("channel:/svc")
        );
        assert_eq!(user_caps(&user("admin"), &v, NOW), CapSet::all());
        assert!(user_caps(&user("bob"), &v, NOW).is_empty());
        v.add(g("run", "/", None));
        assert_eq!(user_caps(&user("alice"), &v, NOW), CapSet::all());
        v.revoked_subjects.insert(user("alice"));
        assert!(user_caps(&user("alice"), &v, NOW).is_empty());

        // End to end: what alice's domain of this image may do.
        let mut v = MemoryGrantView::new(user("admin"));
        v.add_key(user("admin"), key(0).public_key_der());
        v.add(g("run", "/channels/svc", None));
        let vi = verify_image(&sign_manifest(manifest(), key(0)), WASM, &vendors()).unwrap();
        let eff = vi.effective_caps(&user_caps(&user("alice"), &v, NOW));
        assert_eq!(eff, caps("channel:/svc/counter"));
        assert!(eff.may_open("/svc/counter/x") && !eff.may_open("/svc/other") && !eff.log);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const PREFIXES: [&str; 8] = ["/", "/a", "/a/b", "/a/b/c", "/a/bc", "/b", "/b/a", "/ab"];
        const NAMES: [&str; 10] = [
            "/", "/a", "/a/b", "/a/b/c", "/a/b/c/d", "/a/bc", "/ab", "/b", "/b/a/x", "/c",
        ];

        fn capset() -> impl Strategy<Value = (bool, bool, Vec<usize>)> {
            (
                any::<bool>(),
                any::<bool>(),
                proptest::collection::vec(0..PREFIXES.len(), 0..4),
            )
        }

        fn build(log: bool, clock: bool, ps: &[usize]) -> CapSet {
            let mut s = CapSet {
                log,
                clock,
                channels: vec![],
            };
            for &i in ps {
                s.insert(Capability::Channel(PREFIXES[i].into())).unwrap();
            }
            s
        }

        proptest! {
            /// The effective set is never wider than either side, and it is
            /// exactly their intersection: a name is allowed iff both allow it.
            #[test]
            fn never_wider_than_either_side(u in capset(), v in capset()) {
                let user = build(u.0, u.1, &u.2);
                let vendor_set = build(v.0, v.1, &v.2);
                // The vendor's list as declared (possibly redundant, unsorted).
                let mut vendor: Vec<Capability> = Vec::new();
                if v.0 { vendor.push(Capability::Log); }
                if v.1 { vendor.push(Capability::Clock); }
                for &i in &v.2 {
                    let c = Capability::Channel(PREFIXES[i].into());
                    if !vendor.contains(&c) { vendor.push(c); }
                }
                let eff = effective_caps(&user, &vendor);
                prop_assert_eq!(eff.log, user.log && vendor_set.log);
                prop_assert_eq!(eff.clock, user.clock && vendor_set.clock);
                for n in NAMES {
                    let both = user.may_open(n) && vendor_set.may_open(n);
                    prop_assert_eq!(eff.may_open(n), both, "{} on {} ∩ {:?}", n, user, vendor);
                }
                for c in eff.capabilities() {
                    prop_assert!(user.allows(&c) && vendor_set.allows(&c), "{} too wide", c);
                }
            }
        }
    }
}
