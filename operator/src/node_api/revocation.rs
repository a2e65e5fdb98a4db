//! Revocation: what an agent SVID stays bound to after attestation, checked on every Node
//! API call, and every [`REAUTHORIZE_INTERVAL`] on each open `SyncEntries` stream.
//!
//! - A PSAT agent's SVID names its Node by UID (`/sigil/agent/k8s_psat/<cluster>/<uid>`):
//!   that Node must still exist, with that UID. Deleting the Node revokes the agent.
//! - A TPM agent's SVID names its TPM (`/sigil/agent/tpm/<ek hash>`): exactly one Node
//!   must still carry the enrolment annotation [`EK_ANNOTATION`] with that hash. Removing
//!   the annotation (un-enrolment) or deleting the Node revokes the agent.
//! - No Node may carry [`BAN_LABEL`] or [`BAN_ANNOTATION`] (`sigil agent ban <node>` sets
//!   both): the operator-side deny list for a stolen agent key. A banned Node's agent is
//!   refused everything — streams end, renewals, attestation, CSR signing and JWT minting
//!   are refused — until both are removed (`sigil agent unban <node>`). The label is the
//!   one a compromised node can't lift: the NodeRestriction admission plugin forbids
//!   kubelets to change `node-restriction.kubernetes.io/` labels, while a kubelet may
//!   rewrite its own Node's annotations (the annotation carries the reason).
//! - Where TPM attestation is required (`--require-tpm`), a PSAT agent is refused.
//!
//! Renewal proves again what attestation proved ([`super::service`]): a PSAT agent sends a
//! fresh pod token with `RenewAgent`; a TPM agent attests again (a fresh credential
//! activation), since `RenewAgent` is refused to TPM identities.
//!
//! Everything here reads the operator's Node reflector: no API call, so re-checking
//! thousands of streams every second costs a hash lookup each.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{ObjectRef, Store};

use super::tpm::EK_ANNOTATION;

pub use sigil_api::node::{BAN_ANNOTATION, BAN_LABEL};

/// How often an open `SyncEntries` stream checks that its agent is still authorised.
pub const REAUTHORIZE_INTERVAL: Duration = Duration::from_secs(1);

/// What an agent SVID is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// PSAT: the Node with this UID.
    Psat {
        /// `metadata.uid` of the Node.
        node_uid: String,
    },
    /// TPM: the Node enrolled for the TPM whose EK hashes to this.
    Tpm {
        /// Hex SHA-256 of the EK SubjectPublicKeyInfo.
        ek_hash: String,
    },
}

/// Why an agent is not (or no longer) authorised. Each is a PermissionDenied with a reason
/// label for `sigil_node_api_denials_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Revoked {
    /// No Node has the UID the SVID names.
    #[error("no Node with UID {node_uid} exists (node deleted?); the agent must attest again")]
    NodeGone {
        /// The UID in the SVID.
        node_uid: String,
    },
    /// No Node carries the TPM's enrolment annotation.
    #[error(
        "no Node is enrolled for the TPM with EK hash {ek_hash}: annotate its Node with {EK_ANNOTATION}={ek_hash}"
    )]
    NotEnrolled {
        /// The EK hash in the SVID.
        ek_hash: String,
    },
    /// Two Nodes claim the TPM.
    #[error(
        "Nodes {a} and {b} both claim the TPM with EK hash {ek_hash} ({EK_ANNOTATION}); remove the annotation from the wrong one"
    )]
    ClaimedTwice {
        /// The EK hash.
        ek_hash: String,
        /// One Node.
        a: String,
        /// The other.
        b: String,
    },
    /// The Node is banned.
    #[error(
        "the agent of Node {node} is banned ({value}); once the node is recovered, lift the ban with `sigil agent unban {node}`"
    )]
    Banned {
        /// The Node.
        node: String,
        /// What bans it: the reason in the annotation, or the label.
        value: String,
    },
    /// PSAT alone where TPM attestation is required.
    #[error(
        "this cluster requires TPM node attestation (operator flag --require-tpm): the agent of Node {node} attested with a service-account token only; run it with --tpm-tcti and enrol the Node's TPM (docs/tpm.md)"
    )]
    TpmRequired {
        /// The Node.
        node: String,
    },
    /// AttestNode (a service-account token alone) where TPM attestation is required.
    #[error(
        "this cluster requires TPM node attestation (operator flag --require-tpm): AttestNode with a service-account token alone is refused; run the agent with --tpm-tcti and enrol its Node's TPM (docs/tpm.md)"
    )]
    TokenAttestationRefused,
}

impl Revoked {
    /// Metric label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NodeGone { .. } => "unknown_node",
            Self::NotEnrolled { .. } | Self::ClaimedTwice { .. } => "tpm_not_enrolled",
            Self::Banned { .. } => "agent_banned",
            Self::TpmRequired { .. } | Self::TokenAttestationRefused => "tpm_required",
        }
    }

    /// The gRPC status.
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::permission_denied(self.to_string())
    }
}

fn name(n: &Node) -> String {
    n.metadata.name.clone().unwrap_or_default()
}

fn annotation<'a>(n: &'a Node, key: &str) -> Option<&'a str> {
    n.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn enrolled_for(n: &Node, ek_hash: &str) -> bool {
    annotation(n, EK_ANNOTATION).is_some_and(|v| v.trim().eq_ignore_ascii_case(ek_hash))
}

/// Fails when `node` is banned (its [`BAN_LABEL`] or its [`BAN_ANNOTATION`]).
pub fn check_ban(node: &Node) -> Result<(), Revoked> {
    let label = node
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(BAN_LABEL));
    let value = match annotation(node, BAN_ANNOTATION) {
        Some(reason) => format!("{BAN_ANNOTATION}: {reason:?}"),
        None if label => format!("label {BAN_LABEL}"),
        None => return Ok(()),
    };
    Err(Revoked::Banned {
        node: name(node),
        value,
    })
}

/// The one Node enrolled for the TPM whose EK hashes to `ek_hash` (not checking bans).
pub fn tpm_node(nodes: &Store<Node>, ek_hash: &str) -> Result<Arc<Node>, Revoked> {
    let all = nodes.state();
    let mut enrolled = all.iter().filter(|n| enrolled_for(n, ek_hash));
    match (enrolled.next(), enrolled.next()) {
        (Some(n), None) => Ok(n.clone()),
        (None, _) => Err(Revoked::NotEnrolled {
            ek_hash: ek_hash.to_owned(),
        }),
        (Some(a), Some(b)) => Err(Revoked::ClaimedTwice {
            ek_hash: ek_hash.to_owned(),
            a: name(a),
            b: name(b),
        }),
    }
}

/// Maps an agent's binding to its Node and checks the agent is authorised: the Node
/// exists (and, for TPM, is the only one enrolled), is not banned, and PSAT is allowed.
/// Scans the Node cache once (every unary RPC runs it).
pub fn authorize(
    nodes: &Store<Node>,
    binding: &Binding,
    require_tpm: bool,
) -> Result<Arc<Node>, Revoked> {
    let node = match binding {
        Binding::Psat { node_uid } => {
            let node = nodes
                .find(|n| n.metadata.uid.as_deref() == Some(node_uid.as_str()))
                .ok_or_else(|| Revoked::NodeGone {
                    node_uid: node_uid.clone(),
                })?;
            if require_tpm {
                return Err(Revoked::TpmRequired { node: name(&node) });
            }
            node
        }
        Binding::Tpm { ek_hash } => tpm_node(nodes, ek_hash)?,
    };
    check_ban(&node)?;
    Ok(node)
}

/// The periodic check of an open stream, bound to Node `node_name` when it opened: the
/// same Node (by name, one hash lookup) still exists with the same UID or enrolment, and is
/// not banned. (A second Node claiming the same TPM is caught by the next unary call.)
pub fn reauthorize(
    nodes: &Store<Node>,
    node_name: &str,
    binding: &Binding,
    require_tpm: bool,
) -> Result<(), Revoked> {
    let node = nodes.get(&ObjectRef::new(node_name));
    match binding {
        Binding::Psat { node_uid } => {
            let node = node
                .filter(|n| n.metadata.uid.as_deref() == Some(node_uid.as_str()))
                .ok_or_else(|| Revoked::NodeGone {
                    node_uid: node_uid.clone(),
                })?;
            if require_tpm {
                return Err(Revoked::TpmRequired { node: name(&node) });
            }
            check_ban(&node)
        }
        Binding::Tpm { ek_hash } => {
            let node =
                node.filter(|n| enrolled_for(n, ek_hash))
                    .ok_or_else(|| Revoked::NotEnrolled {
                        ek_hash: ek_hash.clone(),
                    })?;
            check_ban(&node)
        }
    }
}

/// Fails when the Node named `node_name` is banned (for attestation, which learns the Node
/// from the token or the TPM). A Node missing from the cache is not banned: attestation
/// has just read it from the API server.
pub fn check_ban_by_name(nodes: &Store<Node>, node_name: &str) -> Result<(), Revoked> {
    match nodes.get(&ObjectRef::new(node_name)) {
        Some(n) => check_ban(&n),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kube::runtime::watcher::Event;

    fn node(name: &str, uid: &str, annotations: serde_json::Value) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "uid": uid, "annotations": annotations}
        }))
        .unwrap()
    }

    #[test]
    fn the_label_alone_bans_too() {
        let mut n = node("d", "uid-d", serde_json::json!({}));
        assert!(check_ban(&n).is_ok());
        n.metadata.labels = Some([(BAN_LABEL.to_owned(), "true".to_owned())].into());
        let e = check_ban(&n).unwrap_err();
        assert!(e.to_string().contains(BAN_LABEL), "{e}");
    }

    fn store(nodes: Vec<Node>) -> Store<Node> {
        let (store, mut writer) = kube::runtime::reflector::store::<Node>();
        writer.apply_watcher_event(&Event::Init);
        for n in nodes {
            writer.apply_watcher_event(&Event::InitApply(n));
        }
        writer.apply_watcher_event(&Event::InitDone);
        store
    }

    #[test]
    fn bindings_follow_the_node_cache() {
        let s = store(vec![
            node("a", "uid-a", serde_json::json!({})),
            node("b", "uid-b", serde_json::json!({EK_ANNOTATION: "AB12"})),
            node(
                "c",
                "uid-c",
                serde_json::json!({BAN_ANNOTATION: "stolen key, ops@example.org"}),
            ),
        ]);
        let psat = |uid: &str| Binding::Psat {
            node_uid: uid.into(),
        };
        assert_eq!(
            authorize(&s, &psat("uid-a"), false).unwrap().metadata.name,
            Some("a".into())
        );
        assert!(reauthorize(&s, "a", &psat("uid-a"), false).is_ok());
        // The Node was replaced by one of the same name: another UID.
        assert_eq!(
            reauthorize(&s, "a", &psat("uid-old"), false).unwrap_err(),
            Revoked::NodeGone {
                node_uid: "uid-old".into()
            }
        );
        let e = authorize(&s, &psat("uid-a"), true).unwrap_err();
        assert_eq!(e.metric_label(), "tpm_required");
        assert!(e.to_string().contains("--require-tpm"), "{e}");

        let tpm = Binding::Tpm {
            ek_hash: "ab12".into(),
        };
        assert_eq!(
            authorize(&s, &tpm, true).unwrap().metadata.name,
            Some("b".into())
        );
        assert!(reauthorize(&s, "b", &tpm, true).is_ok());
        assert_eq!(
            reauthorize(&s, "a", &tpm, false)
                .unwrap_err()
                .metric_label(),
            "tpm_not_enrolled"
        );

        let banned = authorize(&s, &psat("uid-c"), false).unwrap_err();
        assert_eq!(banned.metric_label(), "agent_banned");
        assert!(
            banned.to_string().contains("sigil agent unban c"),
            "{banned}"
        );
        assert_eq!(
            reauthorize(&s, "c", &psat("uid-c"), false).unwrap_err(),
            banned
        );
        assert!(check_ban_by_name(&s, "c").is_err());
        assert!(check_ban_by_name(&s, "nowhere").is_ok());
        assert_eq!(banned.to_status().code(), tonic::Code::PermissionDenied);
    }
}
