//! PSAT node attestation: an agent proves "I run in pod P on node N" with a projected
//! service-account token bound to its pod, as SPIRE's k8s_psat does.
//!
//! The token is reviewed by the API server (TokenReview, with our audience), which also
//! checks the bound pod still exists with the same UID. We then require the service account
//! to be allow-listed, read the pod named by the token and check its UID, and read the pod's
//! node for its UID (the stable part of the agent's SPIFFE ID).

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::PostParams;
use kube::{Api, Client};
use sigil_identity::entry::Selector;

/// Configuration of PSAT attestation.
#[derive(Debug, Clone)]
pub struct PsatConfig {
    /// Cluster name (part of the agent ID and a selector).
    pub cluster: String,
    /// Audience the projected token must carry.
    pub audience: String,
    /// Service accounts (`namespace:name`) agents may run as.
    pub allowed_service_accounts: Vec<String>,
    /// Node label keys copied into selectors.
    pub allowed_node_label_keys: Vec<String>,
    /// Pod label keys copied into selectors.
    pub allowed_pod_label_keys: Vec<String>,
}

/// What PSAT attestation proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    /// Kubernetes Node name.
    pub node_name: String,
    /// Kubernetes Node UID.
    pub node_uid: String,
    /// Path of the agent's SPIFFE ID: `/sigil/agent/k8s_psat/<cluster>/<node-uid>`.
    pub agent_path: String,
    /// Node selectors (`k8s_psat:...`).
    pub selectors: Vec<Selector>,
}

/// Why attestation failed. Each maps to a precise gRPC status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PsatError {
    /// Cluster name mismatch.
    #[error("cluster {got:?} is not this operator's cluster {want:?}")]
    WrongCluster {
        /// What the agent sent.
        got: String,
        /// Ours.
        want: String,
    },
    /// TokenReview said no (expired, wrong audience, deleted pod, bad signature...).
    #[error("token rejected by TokenReview: {0}")]
    NotAuthenticated(String),
    /// The token is not a pod-bound service-account token.
    #[error("token is not a pod-bound service account token: {0}")]
    NotPodBound(String),
    /// The service account is not allowed to run agents.
    #[error(
        "service account {0} is not allowed to attest nodes (add it to the operator's --agent-service-accounts)"
    )]
    ServiceAccountNotAllowed(String),
    /// The pod is gone or was replaced.
    #[error("pod {namespace}/{name} named by the token {reason}")]
    PodMismatch {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The pod is not scheduled or its node is missing.
    #[error("node of pod {0}: {1}")]
    Node(String, String),
    /// API server call failed.
    #[error("API server: {0}")]
    Api(#[from] kube::Error),
}

impl PsatError {
    /// The gRPC status for this failure.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            PsatError::WrongCluster { .. } | PsatError::NotPodBound(_) => {
                tonic::Status::invalid_argument(self.to_string())
            }
            PsatError::NotAuthenticated(_) => tonic::Status::unauthenticated(self.to_string()),
            PsatError::ServiceAccountNotAllowed(_)
            | PsatError::PodMismatch { .. }
            | PsatError::Node(..) => tonic::Status::permission_denied(self.to_string()),
            PsatError::Api(_) => tonic::Status::unavailable(self.to_string()),
        }
    }

    /// Metric label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            PsatError::WrongCluster { .. } => "wrong_cluster",
            PsatError::NotAuthenticated(_) => "token_rejected",
            PsatError::NotPodBound(_) => "not_pod_bound",
            PsatError::ServiceAccountNotAllowed(_) => "sa_not_allowed",
            PsatError::PodMismatch { .. } => "pod_mismatch",
            PsatError::Node(..) => "node",
            PsatError::Api(_) => "api",
        }
    }
}

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Attests a node from a PSAT token.
pub async fn attest(
    client: &Client,
    cfg: &PsatConfig,
    cluster: &str,
    token: &str,
) -> Result<AttestedNode, PsatError> {
    if cluster != cfg.cluster {
        return Err(PsatError::WrongCluster {
            got: cluster.into(),
            want: cfg.cluster.clone(),
        });
    }
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.into(),
            audiences: Some(vec![cfg.audience.clone()]),
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(PsatError::NotAuthenticated(
            status.error.unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    if !status
        .audiences
        .unwrap_or_default()
        .iter()
        .any(|a| a == &cfg.audience)
    {
        return Err(PsatError::NotAuthenticated(format!(
            "token is not for audience {:?}",
            cfg.audience
        )));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some(sa) = username.strip_prefix("system:serviceaccount:") else {
        return Err(PsatError::NotPodBound(format!(
            "user {username:?} is not a service account"
        )));
    };
    let (ns, sa_name) = sa
        .split_once(':')
        .ok_or_else(|| PsatError::NotPodBound(username.clone()))?;
    if !cfg.allowed_service_accounts.iter().any(|a| a == sa) {
        return Err(PsatError::ServiceAccountNotAllowed(sa.into()));
    }
    let extra: BTreeMap<String, Vec<String>> = user.extra.unwrap_or_default();
    let one = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    let (Some(pod_name), Some(pod_uid)) = (one(EXTRA_POD_NAME), one(EXTRA_POD_UID)) else {
        return Err(PsatError::NotPodBound(
            "token has no pod-name/pod-uid (use a projected token bound to the agent pod)".into(),
        ));
    };
    let mismatch = |reason: &str| PsatError::PodMismatch {
        namespace: ns.into(),
        name: pod_name.clone(),
        reason: reason.into(),
    };
    let pod = match Api::<Pod>::namespaced(client.clone(), ns)
        .get_opt(&pod_name)
        .await?
    {
        Some(p) => p,
        None => return Err(mismatch("no longer exists")),
    };
    if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
        return Err(mismatch("was replaced (UID differs from the token's)"));
    }
    let node_name = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| {
            PsatError::Node(pod_name.clone(), "pod is not scheduled to a node".into())
        })?;
    let node = Api::<Node>::all(client.clone())
        .get_opt(&node_name)
        .await?
        .ok_or_else(|| {
            PsatError::Node(pod_name.clone(), format!("node {node_name} does not exist"))
        })?;
    let node_uid = node.metadata.uid.clone().unwrap_or_default();

    let c = &cfg.cluster;
    let mut selectors = vec![
        sel(format!("cluster:{c}")),
        sel(format!("agent_ns:{ns}")),
        sel(format!("agent_sa:{sa_name}")),
        sel(format!("agent_pod_name:{pod_name}")),
        sel(format!("agent_pod_uid:{pod_uid}")),
        sel(format!("agent_node_name:{node_name}")),
        sel(format!("agent_node_uid:{node_uid}")),
    ];
    if let Some(ip) = pod.status.as_ref().and_then(|s| s.host_ip.clone()) {
        selectors.push(sel(format!("agent_node_ip:{ip}")));
    }
    for (k, v) in node.metadata.labels.iter().flatten() {
        if cfg.allowed_node_label_keys.contains(k) {
            selectors.push(sel(format!("agent_node_label:{k}:{v}")));
        }
    }
    for (k, v) in pod.metadata.labels.iter().flatten() {
        if cfg.allowed_pod_label_keys.contains(k) {
            selectors.push(sel(format!("agent_pod_label:{k}:{v}")));
        }
    }
    Ok(AttestedNode {
        agent_path: format!("/sigil/agent/k8s_psat/{c}/{node_uid}"),
        node_name,
        node_uid,
        selectors,
    })
}

fn sel(v: String) -> Selector {
    Selector::new("k8s_psat", v)
}
