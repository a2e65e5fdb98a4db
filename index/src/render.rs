//! Where a pod's SPIFFE ID is computed: one ClusterSPIFFEID's templates rendered against
//! one pod's facts into the registration entry the pod gets.
//!
//! Pure: [`crate::state`] decides which ClusterSPIFFEIDs apply to a pod (selection,
//! fallback, masking, hints) and gathers the facts rendering reads ([`PodWorld`]); this
//! module turns them into an entry, or into the reason there is none, which the
//! ClusterSPIFFEID's status reports.

use sha2::{Digest, Sha256};
use sigil_identity::SpiffeId;
use sigil_identity::entry::{RegistrationEntry, Selector};
use sigil_identity::keys::KeyType;

use crate::objects::{CompiledCsid, NodeFacts, PodFacts, TrustDomainInfo, is_dns_name};
use sigil_api::crd::cluster_spiffe_id::WorkloadKeyType;
use sigil_api::template::{KeyValues, RenderInput};

/// What rendering reads about one pod besides its ClusterSPIFFEID.
#[derive(Debug)]
pub(crate) struct PodWorld<'a> {
    pub(crate) pod: &'a PodFacts,
    pub(crate) namespace_labels: &'a std::collections::BTreeMap<String, String>,
    /// The pod's Node, once scheduled and known.
    pub(crate) node: Option<&'a NodeFacts>,
    /// Services that exist in the pod's namespace and whose EndpointSlices list the pod
    /// (read only with `autoPopulateDNSNames`).
    pub(crate) services: Vec<&'a str>,
    pub(crate) cluster_name: &'a str,
    pub(crate) cluster_domain: &'a str,
}

/// The entry ClusterSPIFFEID `csid_name` (compiled as `c`, in trust domain `td`) gives
/// the pod, or why it gives none (a message naming the template field).
pub(crate) fn entry(
    csid_name: &str,
    c: &CompiledCsid,
    td: &TrustDomainInfo,
    w: &PodWorld<'_>,
) -> Result<RegistrationEntry, String> {
    let pod = w.pod;
    let input = RenderInput {
        trust_domain: td.trust_domain.name(),
        cluster_name: w.cluster_name,
        cluster_domain: w.cluster_domain,
        pod_name: &pod.name,
        pod_namespace: &pod.namespace,
        pod_uid: &pod.uid,
        pod_service_account: &pod.service_account,
        pod_hostname: pod.hostname.as_deref(),
        pod_labels: &pod.labels,
        pod_annotations: &pod.annotations,
        namespace_labels: Some(w.namespace_labels),
        node_name: pod.node.as_deref(),
        node_uid: w.node.map(|n| n.uid.as_str()),
        node_labels: w.node.map(|n| &n.labels as &dyn KeyValues),
    };
    let id = c
        .spiffe_id
        .render(&input)
        .map_err(|e| format!("spiffeIDTemplate: {e}"))?;
    let spiffe_id =
        SpiffeId::parse(&id).map_err(|e| format!("spiffeIDTemplate renders {id:?}: {e}"))?;
    if !spiffe_id.is_member_of(&td.trust_domain) {
        return Err(format!(
            "spiffeIDTemplate renders {id}, which is outside trust domain {}",
            td.trust_domain
        ));
    }
    if spiffe_id.path().is_empty() {
        return Err(format!(
            "spiffeIDTemplate renders {id}, a trust domain's own ID; a workload's SPIFFE ID must have a path (X509-SVID), e.g. spiffe://{{{{trustDomain}}}}/ns/{{{{pod.namespace}}}}/sa/{{{{pod.serviceAccountName}}}}"
        ));
    }
    if spiffe_id.is_reserved() {
        return Err(format!(
            "spiffeIDTemplate renders {id}, whose path is reserved for Sigil's agents, operator and bundle endpoint (/sigil and below); change the template or the pod field it uses"
        ));
    }
    let mut selectors = vec![Selector::new("k8s", format!("pod-uid:{}", pod.uid))];
    for (i, t) in c.workload_selectors.iter().enumerate() {
        let s = t
            .render(&input)
            .map_err(|e| format!("workloadSelectorTemplates[{i}]: {e}"))?;
        let sel = Selector::parse(&s).ok_or_else(|| {
            format!("workloadSelectorTemplates[{i}] renders {s:?}, not type:value")
        })?;
        if !selectors.contains(&sel) {
            selectors.push(sel);
        }
    }
    let mut dns_names: Vec<String> = Vec::new();
    for (i, t) in c.dns_names.iter().enumerate() {
        let name = t
            .render(&input)
            .map_err(|e| format!("dnsNameTemplates[{i}]: {e}"))?;
        if !is_dns_name(&name) {
            return Err(format!(
                "dnsNameTemplates[{i}] renders {name:?}, which is not a DNS name"
            ));
        }
        if !dns_names.contains(&name) {
            dns_names.push(name);
        }
    }
    if c.spec.auto_populate_dns_names {
        let (ns, domain) = (&pod.namespace, w.cluster_domain);
        for svc in &w.services {
            for name in [
                svc.to_string(),
                format!("{svc}.{ns}"),
                format!("{svc}.{ns}.svc"),
                format!("{svc}.{ns}.svc.{domain}"),
            ] {
                if !dns_names.contains(&name) {
                    dns_names.push(name);
                }
            }
        }
    }
    Ok(RegistrationEntry {
        id: entry_id(csid_name, &pod.uid),
        spiffe_id,
        selectors,
        dns_names,
        x509_ttl: c.ttl.unwrap_or(td.x509_ttl),
        jwt_ttl: c.jwt_ttl.unwrap_or(td.jwt_ttl),
        federates_with: c.federates_with.clone(),
        hint: c.spec.hint.clone(),
        admin: c.spec.admin,
        downstream: c.spec.downstream,
        revision: 0,
        key_type: match c.spec.workload_key_type {
            WorkloadKeyType::EcdsaP256 => KeyType::EcP256,
            WorkloadKeyType::Rsa2048 => KeyType::Rsa2048,
        },
    })
}

/// The stable ID of the entry a ClusterSPIFFEID gives a pod.
pub fn entry_id(csid: &str, pod_uid: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"sigil-entry/v1\0");
    h.update(csid.as_bytes());
    h.update(b"\0");
    h.update(pod_uid.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// An entry ID as the index's maps hold it: the 128 bits of an ID [`entry_id`] wrote
/// (32 lowercase hex digits) inline, or any other ID's text.
///
/// Inline keys are compared and hashed without following a pointer to the ID's text. At
/// 1M Pods that text is rarely in cache, and fetching it was a fifth of a ClusterSPIFFEID
/// fan-out's time (bench/README.md). Entries rendered here always have inline keys; the
/// text form keeps the node log total for IDs written elsewhere (tests).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum EntryKey {
    Digest(u64, u64),
    Text(Box<str>),
}

impl EntryKey {
    pub(crate) fn of(id: &str) -> Self {
        // One pass that checks and decodes (this runs for every entry a change renders).
        let mut halves = [0u64; 2];
        if id.len() != 32 {
            return Self::Text(id.into());
        }
        for (half, digits) in halves.iter_mut().zip(id.as_bytes().chunks_exact(16)) {
            for &c in digits {
                let nibble = match c {
                    b'0'..=b'9' => c - b'0',
                    b'a'..=b'f' => c - b'a' + 10,
                    _ => return Self::Text(id.into()),
                };
                *half = *half << 4 | u64::from(nibble);
            }
        }
        Self::Digest(halves[0], halves[1])
    }

    /// The ID this key was made [`of`](Self::of), as text again.
    pub(crate) fn to_id(&self) -> String {
        match self {
            Self::Digest(hi, lo) => format!("{hi:016x}{lo:016x}"),
            Self::Text(s) => s.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_keys_give_back_the_id_they_were_made_of() {
        let rendered = entry_id("default", "0c4e1a52-8f5e-4c1b-9f7a-2d3b8e6f1a90");
        let key = EntryKey::of(&rendered);
        assert!(matches!(key, EntryKey::Digest(..)), "{key:?}");
        assert_eq!(key.to_id(), rendered);
        // Anything but exactly 32 lowercase hex digits keeps its text: the text is what
        // agents see, so two spellings of one number must stay two IDs.
        let upper = rendered.to_uppercase();
        for other in [
            "a",
            "",
            &upper,
            &format!("+{}", &rendered[1..]),
            &format!("{rendered}0"),
        ] {
            let key = EntryKey::of(other);
            assert!(matches!(key, EntryKey::Text(_)), "{other:?} → {key:?}");
            assert_eq!(key.to_id(), other);
            assert_ne!(key, EntryKey::of(&rendered));
        }
    }
}
