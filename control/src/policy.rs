//! What each API call requires: the right and the resource path it is checked
//! against. Pure; the node enforces it before executing anything.

use metta_proto::{ApiRequest, Right, Rights, Subject};

use crate::registry::Registry;

/// What a call needs before it may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// Any authenticated subject.
    Authenticated,
    /// Only nodes (the caller must be a `node/<id>` identity).
    NodeOnly,
    /// A right on a resource.
    Right(Rights, String),
}

/// The requirement of `call` made by `caller`.
pub fn requirement(caller: &Subject, call: &ApiRequest) -> Requirement {
    let r = |right: Right, res: String| Requirement::Right(Rights::of(right), res);
    match call {
        ApiRequest::Status => Requirement::Authenticated,
        ApiRequest::Nodes => r(Right::Read, "/nodes".into()),
        ApiRequest::NodeRemove { id } => r(Right::Write, format!("/nodes/{id}")),
        ApiRequest::NodeLabel { node, .. } => r(Right::Write, format!("/nodes/{node}")),
        ApiRequest::TokenCreate { .. } => r(Right::Write, "/tokens".into()),
        ApiRequest::TokenList => r(Right::Read, "/tokens".into()),
        ApiRequest::TokenRevoke { id } => r(Right::Write, format!("/tokens/{id}")),
        ApiRequest::UserAdd { name, .. } => r(Right::Write, format!("/users/{name}")),
        ApiRequest::UserList => r(Right::Read, "/users".into()),
        // The grant's own chain is its authority; the node checks that the caller
        // is the issuer.
        ApiRequest::Grant(_) => Requirement::Authenticated,
        // Everyone may list the grants they hold (to delegate from them).
        ApiRequest::Grants { subject: Some(s) } if s == caller => Requirement::Authenticated,
        ApiRequest::Grants { .. } => r(Right::Read, "/grants".into()),
        ApiRequest::RevokeGrant { .. } => Requirement::Authenticated,
        ApiRequest::RevokeSubject(s) => match s {
            Subject::Node(id) => r(Right::Write, format!("/nodes/{id}")),
            Subject::User(n) => r(Right::Write, format!("/users/{n}")),
        },
        ApiRequest::KvPut { key, .. } => r(Right::Write, Registry::kv_resource(key)),
        ApiRequest::KvGet { key } => r(Right::Read, Registry::kv_resource(key)),
        ApiRequest::Heartbeat(_) | ApiRequest::Renew { .. } => Requirement::NodeOnly,
        ApiRequest::VendorAdd { name, .. } | ApiRequest::VendorRemove { name } => {
            r(Right::Write, format!("/vendors/{name}"))
        }
        ApiRequest::Vendors => r(Right::Read, "/vendors".into()),
        ApiRequest::ImagePush { manifest, .. } => {
            r(Right::Write, format!("/images/{}", manifest.manifest.name))
        }
        ApiRequest::Images => r(Right::Read, "/images".into()),
        // What the domain may then do comes from the caller's other `run`
        // grants (`/log`, `/clock`, `/channels/...`), intersected with the
        // manifest.
        ApiRequest::Run(spec) => r(Right::Run, format!("/images/{}", spec.image)),
        // Everyone sees and operates their own domains; the node checks
        // ownership, or a right on `/domains/<name>` (see [`domain_right`]).
        ApiRequest::Ps
        | ApiRequest::Logs { .. }
        | ApiRequest::Stop { .. }
        | ApiRequest::Call { .. } => Requirement::Authenticated,
    }
}

/// The right a caller who did not launch domain `name` needs on
/// `/domains/<name>` for `call` (`None`: the call is not about one domain).
pub fn domain_right(call: &ApiRequest) -> Option<(Right, &str)> {
    match call {
        ApiRequest::Ps => None,
        ApiRequest::Logs { name, .. } => Some((Right::Read, name)),
        ApiRequest::Stop { name } | ApiRequest::Call { name, .. } => Some((Right::Write, name)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_need_write_and_reads_need_read() {
        let bob = Subject::User("bob".into());
        assert_eq!(
            requirement(
                &bob,
                &ApiRequest::TokenCreate {
                    role: metta_proto::Role::Worker,
                    ttl_secs: 60,
                    uses: 1
                }
            ),
            Requirement::Right(Rights::of(Right::Write), "/tokens".into())
        );
        assert_eq!(
            requirement(&bob, &ApiRequest::KvGet { key: "a/b".into() }),
            Requirement::Right(Rights::of(Right::Read), "/kv/a/b".into())
        );
        assert_eq!(
            requirement(
                &bob,
                &ApiRequest::Renew {
                    csr_pem: String::new()
                }
            ),
            Requirement::NodeOnly
        );
        assert_eq!(
            requirement(
                &bob,
                &ApiRequest::Grants {
                    subject: Some(bob.clone())
                }
            ),
            Requirement::Authenticated
        );
        assert_eq!(
            requirement(&bob, &ApiRequest::Grants { subject: None }),
            Requirement::Right(Rights::of(Right::Read), "/grants".into())
        );
    }
}
