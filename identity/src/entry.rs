//! Registration entries and selectors: which workloads get which SPIFFE ID.
//!
//! The operator renders entries from ClusterSPIFFEIDs and pods; the agent matches them
//! against the selectors it attested for a calling process. An entry matches a workload
//! when every one of the entry's selectors is in the workload's selector set (the SPIRE
//! rule), so adding selectors to an entry only ever narrows who gets it.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use crate::id::{SpiffeId, TrustDomain};
use crate::keys::KeyType;

/// A `type:value` fact about a workload or node, e.g. `k8s:pod-uid:1234` has type `k8s`
/// and value `pod-uid:1234`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    /// Selector type (the attestor), e.g. `k8s` or `unix`.
    pub kind: String,
    /// The value, e.g. `ns:default`.
    pub value: String,
}

impl Selector {
    /// A selector of `kind` with `value`.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// Parses `type:value` (the value may itself contain `:`).
    pub fn parse(s: &str) -> Option<Self> {
        let (kind, value) = s.split_once(':')?;
        (!kind.is_empty() && !value.is_empty()).then(|| Self::new(kind, value))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// A registration entry: the SPIFFE ID a workload matching `selectors` receives, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationEntry {
    /// Stable ID (same pod and ClusterSPIFFEID => same ID).
    pub id: String,
    /// The identity granted.
    pub spiffe_id: SpiffeId,
    /// All must be present in the workload's selectors.
    pub selectors: Vec<Selector>,
    /// DNS SANs for the X509-SVID.
    pub dns_names: Vec<String>,
    /// X509-SVID lifetime.
    pub x509_ttl: Duration,
    /// JWT-SVID lifetime.
    pub jwt_ttl: Duration,
    /// Foreign trust domains whose bundles the workload receives.
    pub federates_with: Vec<TrustDomain>,
    /// Workload API hint, to tell several identities apart.
    pub hint: String,
    /// Surfaced for future admin API use.
    pub admin: bool,
    /// Surfaced for future downstream CA use.
    pub downstream: bool,
    /// Revision of this entry on its node's stream (0 when not yet published).
    pub revision: u64,
    /// Key algorithm of the X509-SVID keys the agent generates for it.
    pub key_type: KeyType,
}

impl RegistrationEntry {
    /// An entry granting `spiffe_id` to workloads with all of `selectors`, with no DNS
    /// names or federation, an X509-SVID TTL of 1 h and a JWT-SVID TTL of 5 min (SPIRE's
    /// defaults), ECDSA P-256 keys, revision 0.
    pub fn new(id: impl Into<String>, spiffe_id: SpiffeId, selectors: Vec<Selector>) -> Self {
        Self {
            id: id.into(),
            spiffe_id,
            selectors,
            dns_names: Vec::new(),
            x509_ttl: Duration::from_secs(3600),
            jwt_ttl: Duration::from_secs(300),
            federates_with: Vec::new(),
            hint: String::new(),
            admin: false,
            downstream: false,
            revision: 0,
            key_type: KeyType::EcP256,
        }
    }

    /// Whether a workload with `workload_selectors` gets this entry.
    pub fn matches(&self, workload_selectors: &BTreeSet<Selector>) -> bool {
        !self.selectors.is_empty()
            && self
                .selectors
                .iter()
                .all(|s| workload_selectors.contains(s))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(sel: &[&str]) -> RegistrationEntry {
        RegistrationEntry::new(
            "e",
            SpiffeId::parse("spiffe://td/x").unwrap(),
            sel.iter().map(|s| Selector::parse(s).unwrap()).collect(),
        )
    }

    #[test]
    fn all_selectors_must_be_present() {
        let have: BTreeSet<_> = ["k8s:ns:a", "k8s:sa:b", "k8s:pod-uid:1"]
            .iter()
            .map(|s| Selector::parse(s).unwrap())
            .collect();
        assert!(entry(&["k8s:pod-uid:1"]).matches(&have));
        assert!(entry(&["k8s:pod-uid:1", "k8s:ns:a"]).matches(&have));
        assert!(!entry(&["k8s:pod-uid:1", "k8s:ns:z"]).matches(&have));
        assert!(
            !entry(&[]).matches(&have),
            "an entry without selectors matches nobody"
        );
    }

    #[test]
    fn selector_parse_keeps_colons_in_value() {
        let s = Selector::parse("k8s:pod-label:app:web").unwrap();
        assert_eq!(s.kind, "k8s");
        assert_eq!(s.value, "pod-label:app:web");
        assert_eq!(s.to_string(), "k8s:pod-label:app:web");
        assert!(Selector::parse("nocolon").is_none());
        assert!(Selector::parse(":x").is_none());
    }
}
