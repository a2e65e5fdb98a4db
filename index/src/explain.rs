//! Why a pod gets (or does not get) an identity from each ClusterSPIFFEID, computed by the
//! same index code the operator runs, for `sigil explain pod`.
//!
//! A throwaway [`EntryIndex`] is fed exactly the objects that matter (the pod, its
//! namespace and node, the ClusterSPIFFEIDs, TrustDomains, and the namespace's
//! EndpointSlices and Service names); what it renders is what the operator renders. For a ClusterSPIFFEID
//! that gives the pod no entry, the reason is the first thing that fails, in the order
//! the index applies them.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;

use crate::objects::{CompiledCsid, Labels, TrustDomainInfo};
use crate::{EntryIndex, IndexConfig, entry_id};
use sigil_api::crd::cluster_spiffe_id::ClusterSPIFFEID;

/// What one ClusterSPIFFEID does for the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The pod gets this identity.
    Selected {
        /// The SPIFFE ID.
        spiffe_id: String,
        /// DNS names in the X509-SVID.
        dns_names: Vec<String>,
        /// The entry's selectors (what the agent matches workloads against).
        selectors: Vec<String>,
        /// X509-SVID lifetime, seconds.
        x509_ttl_seconds: u64,
    },
    /// The ClusterSPIFFEID itself is invalid.
    InvalidSpec(String),
    /// Its TrustDomain cannot be resolved.
    TrustDomain(String),
    /// The namespace is one the operator never serves (kube-system and the like).
    NamespaceIgnored(String),
    /// `namespaceSelector` does not match the namespace.
    NamespaceNotSelected(String),
    /// `podSelector` does not match the pod.
    PodNotSelected(String),
    /// Selected, but rendering failed (a missing label, an invalid ID...).
    RenderFailed(String),
    /// Selected, but another ClusterSPIFFEID takes precedence (an older one with the
    /// same SPIFFE ID, or this one is a fallback).
    NotUsed(String),
    /// The pod has no node yet, so there is no entry to show.
    Unscheduled,
}

/// The verdict of one ClusterSPIFFEID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The ClusterSPIFFEID's name.
    pub cluster_spiffe_id: String,
    /// What it does for the pod.
    pub verdict: Verdict,
}

/// `k=v,k2=v2`, or "no labels", for messages.
pub(crate) fn labels_text(l: Option<&std::collections::BTreeMap<String, String>>) -> String {
    let pairs: Vec<String> = l
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if pairs.is_empty() {
        "no labels".into()
    } else {
        pairs.join(",")
    }
}

/// Explains, for every ClusterSPIFFEID, what it gives `pod`. `services` are the names of
/// the Services in the pod's namespace.
// One argument per kind of object the index reads: a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn explain_pod(
    config: IndexConfig,
    pod: &Pod,
    namespace: &Namespace,
    node: Option<&Node>,
    cluster_spiffe_ids: &[ClusterSPIFFEID],
    trust_domains: &[TrustDomainInfo],
    slices: &[EndpointSlice],
    services: &[String],
) -> Vec<Explanation> {
    let ignored = config.ignores(&namespace.name_any());
    let index = EntryIndex::new(config);
    for td in trust_domains {
        index.apply_trust_domain(td.clone());
    }
    index.apply_namespace(namespace);
    if let Some(n) = node {
        index.apply_node(n);
    }
    for c in cluster_spiffe_ids {
        index.apply_cluster_spiffe_id(c);
    }
    let ns_name = namespace.name_any();
    for s in services {
        index.apply_service(&ns_name, s);
    }
    for s in slices {
        index.apply_endpoint_slice(s);
    }
    index.apply_pod(pod);
    index.mark_synced();

    let uid = pod.uid().unwrap_or_default();
    let pod_key = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
    let view = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .map(|n| index.node(n));
    let ns_labels = Labels::new(namespace.metadata.labels.as_ref());
    let pod_labels = Labels::new(pod.metadata.labels.as_ref());
    cluster_spiffe_ids
        .iter()
        .map(|c| {
            let name = c.name_any();
            let verdict = (|| {
                let compiled = match CompiledCsid::compile(&c.spec) {
                    Ok(x) => x,
                    Err(e) => return Verdict::InvalidSpec(e),
                };
                if let Some(s) = index.status(&name)
                    && let Some(ready) = s.conditions.iter().find(|c| c.type_ == "Ready")
                    && ready.reason.starts_with("TrustDomain")
                {
                    return Verdict::TrustDomain(ready.message.clone());
                }
                if ignored {
                    return Verdict::NamespaceIgnored(format!("namespace {} is never served (the operator's ignored namespaces)", namespace.name_any()));
                }
                if !compiled.namespace_selector.matches(&ns_labels) {
                    return Verdict::NamespaceNotSelected(format!(
                        "spec.namespaceSelector does not match namespace {} ({})",
                        namespace.name_any(),
                        labels_text(namespace.metadata.labels.as_ref())
                    ));
                }
                if !compiled.pod_selector.matches(&pod_labels) {
                    return Verdict::PodNotSelected(format!("spec.podSelector does not match pod {pod_key} ({})", labels_text(pod.metadata.labels.as_ref())));
                }
                let Some(view) = &view else { return Verdict::Unscheduled };
                if let Some(e) = view.entry(&entry_id(&name, &uid)) {
                    return Verdict::Selected {
                        spiffe_id: e.spiffe_id.to_string(),
                        dns_names: e.dns_names.clone(),
                        selectors: e.selectors.iter().map(ToString::to_string).collect(),
                        x509_ttl_seconds: e.x509_ttl.as_secs(),
                    };
                }
                let failure = index.status(&name).and_then(|s| s.stats.first_render_failure).filter(|f| f.starts_with(&format!("{pod_key}:")));
                match failure {
                    Some(f) => Verdict::RenderFailed(f),
                    None if c.spec.fallback => Verdict::NotUsed("this is a fallback, and another ClusterSPIFFEID gives the pod an identity".into()),
                    None => Verdict::NotUsed("an older ClusterSPIFFEID gives the pod the same SPIFFE ID (the oldest wins; the others count as masked)".into()),
                }
            })();
            Explanation { cluster_spiffe_id: name, verdict }
        })
        .collect()
}
