//! The names of Sigil's Kubernetes pod-certificate signer (KEP-4317): the `signerName`s
//! it answers PodCertificateRequests for, the `userAnnotations` it reads, and the
//! ClusterTrustBundles it publishes. docs/pod-certificates.md explains them to users.
//!
//! - One signer per TrustDomain object: `sigil.dev/<metadata.name>`. A pod's
//!   `podCertificate` volume names it; the certificate carries the SPIFFE ID a
//!   ClusterSPIFFEID of that TrustDomain gives the pod.
//! - Its bundle is the ClusterTrustBundle `sigil.dev:<metadata.name>:bundle`, and each
//!   foreign trust domain its ClusterSPIFFEIDs federate with is
//!   `sigil.dev:<metadata.name>:federated.<trust domain>`, all with `spec.signerName` set
//!   to the signer, so a `clusterTrustBundle` projection can select them by signer and
//!   label.

/// The domain of every Sigil signer name. Nothing else signs under it.
pub const SIGNER_DOMAIN: &str = "sigil.dev";

/// The RBAC resource name that covers every Sigil signer (`signers` in
/// `certificates.k8s.io`).
pub const SIGNER_WILDCARD: &str = "sigil.dev/*";

/// The `userAnnotations` key a pod sets to pick one of its identities by its
/// ClusterSPIFFEID's `hint` (default: the one the Workload API serves first).
pub const HINT_ANNOTATION: &str = "sigil.dev/hint";

/// Label on Sigil's ClusterTrustBundles: `own` for the signer's trust domain, `federated`
/// for a foreign one.
pub const BUNDLE_KIND_LABEL: &str = "sigil.dev/bundle";

/// Label on a federated ClusterTrustBundle naming the foreign trust domain.
pub const FEDERATED_TRUST_DOMAIN_LABEL: &str = "sigil.dev/federated-trust-domain";

/// The signer of TrustDomain object `name`.
pub fn signer_name(trust_domain_object: &str) -> String {
    format!("{SIGNER_DOMAIN}/{trust_domain_object}")
}

/// The TrustDomain object a signer name stands for; `None` when the name is not Sigil's
/// (or has a path Sigil never gives out).
pub fn trust_domain_object(signer_name: &str) -> Option<&str> {
    signer_name
        .strip_prefix(SIGNER_DOMAIN)?
        .strip_prefix('/')
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
}

/// Name of the ClusterTrustBundle holding TrustDomain `name`'s own bundle.
pub fn own_bundle_name(trust_domain_object: &str) -> String {
    format!("{SIGNER_DOMAIN}:{trust_domain_object}:bundle")
}

/// Name of the ClusterTrustBundle holding foreign trust domain `federated`'s bundle
/// under TrustDomain `name`'s signer. A trust domain name that is not a DNS subdomain
/// (it may hold `_`) gets `_` turned into `-`; the label keeps the exact name.
pub fn federated_bundle_name(trust_domain_object: &str, federated: &str) -> String {
    format!(
        "{SIGNER_DOMAIN}:{trust_domain_object}:federated.{}",
        federated.replace('_', "-")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signer_names_round_trip_and_foreign_names_are_not_ours() {
        assert_eq!(trust_domain_object(&signer_name("prod")), Some("prod"));
        for foreign in [
            "kubernetes.io/kube-apiserver-client-pod",
            "sigil.dev",
            "sigil.dev/",
            "sigil.dev/a/b",
            "sigil.device/prod",
            "example.com/sigil.dev/prod",
        ] {
            assert_eq!(trust_domain_object(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn bundle_names_carry_the_signer_prefix_the_api_server_requires() {
        // ClusterTrustBundle validation: a bundle with spec.signerName S must be named
        // with the prefix S with '/' replaced by ':', then ':'.
        let prefix = signer_name("prod").replace('/', ":") + ":";
        assert!(own_bundle_name("prod").starts_with(&prefix));
        let fed = federated_bundle_name("prod", "partner_td.example");
        assert!(fed.starts_with(&prefix));
        assert_eq!(fed, "sigil.dev:prod:federated.partner-td.example");
    }
}
