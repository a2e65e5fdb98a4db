//! `sigil agent ban|unban <node>`: the operator-side deny list for an agent whose key was
//! stolen. A ban is the Node label `node-restriction.kubernetes.io/sigil-agent-banned`
//! (which a kubelet can't remove) and the annotation `sigil.dev/agent-banned` (the
//! reason), which every operator replica reads from its Node cache: within about a second
//! the agent's entry stream ends, and its renewals, attestations, CSR signing and
//! JWT-SVID minting are refused (PermissionDenied, reason `agent_banned`), until `unban`.

use std::path::Path;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use sigil_api::node::{BAN_ANNOTATION, BAN_LABEL};

use crate::Output;

/// What a ban or unban did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanOutcome {
    /// The Node.
    pub node: String,
    /// The ban before (the reason; None: not banned).
    pub before: Option<String>,
    /// The ban after (the reason; None: not banned).
    pub after: Option<String>,
}

/// The ban on `node` as `ban` writes it (the reason), or that of the label alone.
fn annotation(node: &Node) -> Option<String> {
    let reason = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BAN_ANNOTATION))
        .cloned();
    let label = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(BAN_LABEL))
        .map(|v| format!("label {BAN_LABEL}={v}"));
    reason.or(label)
}

/// The annotation value `ban` writes: the reason, who and when.
pub fn ban_value(reason: &str, now: time::OffsetDateTime) -> String {
    let when = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string());
    let who = std::env::var("USER").unwrap_or_default();
    let who = if who.is_empty() {
        String::new()
    } else {
        format!(" by {who}")
    };
    format!("{reason} (banned{who} at {when} with sigil agent ban)")
}

async fn set(
    client: kube::Client,
    node: &str,
    value: Option<String>,
) -> anyhow::Result<BanOutcome> {
    let nodes = Api::<Node>::all(client);
    let current = nodes
        .get_opt(node)
        .await
        .with_context(|| format!("read Node {node}"))?
        .with_context(|| format!("Node {node} does not exist (kubectl get nodes lists them)"))?;
    let before = annotation(&current);
    // A merge patch sets or removes this label and annotation and nothing else; the UID
    // precondition makes sure it lands on the Node that was read.
    let label = value.as_ref().map(|_| "true");
    let patch = json!({"metadata": {
        "uid": current.metadata.uid,
        "labels": {BAN_LABEL: label},
        "annotations": {BAN_ANNOTATION: value},
    }});
    let after = nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| {
            format!(
                "label and annotate Node {node} ({BAN_LABEL}, {BAN_ANNOTATION}; this needs `patch` on nodes)"
            )
        })?;
    Ok(BanOutcome {
        node: node.to_owned(),
        before,
        after: annotation(&after),
    })
}

/// Bans the agent of `node`.
pub async fn ban(client: kube::Client, node: &str, reason: &str) -> anyhow::Result<BanOutcome> {
    set(
        client,
        node,
        Some(ban_value(reason, time::OffsetDateTime::now_utc())),
    )
    .await
}

/// Lifts the ban on the agent of `node`.
pub async fn unban(client: kube::Client, node: &str) -> anyhow::Result<BanOutcome> {
    set(client, node, None).await
}

/// `sigil agent ban` / `unban` as commands: prints what happened.
pub(crate) async fn run(
    banning: bool,
    node: &str,
    reason: &str,
    kubeconfig: Option<&Path>,
    output: Output,
) -> anyhow::Result<i32> {
    let client = crate::explain::client(kubeconfig).await?;
    let outcome = if banning {
        ban(client, node, reason).await?
    } else {
        unban(client, node).await?
    };
    match output {
        Output::Json => println!(
            "{}",
            json!({"node": outcome.node, "banned": outcome.after.is_some(),
                   "label": BAN_LABEL, "annotation": BAN_ANNOTATION,
                   "reason": outcome.after, "previous": outcome.before})
        ),
        Output::Text => match (&outcome.before, &outcome.after) {
            (_, Some(v)) => {
                if let Some(old) = &outcome.before {
                    println!("Node {node} was already banned ({old}); the reason is updated.");
                }
                println!("Node {node}: agent banned ({BAN_LABEL}, {BAN_ANNOTATION}={v}).");
                println!(
                    "Within about a second every operator replica ends its entry stream and refuses its renewal, attestation, CSR signing and JWT-SVID minting."
                );
                println!(
                    "SVIDs already issued stay valid until they expire (the agent's and the workloads' TTLs); see docs/operations.md."
                );
                println!("Lift it with: sigil agent unban {node}");
            }
            (Some(_), None) => println!(
                "Node {node}: ban lifted; its agent can attest again (and gets new SVIDs)."
            ),
            (None, None) => println!("Node {node} was not banned; nothing changed."),
        },
    }
    Ok(0)
}
