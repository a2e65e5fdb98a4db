//! The `ClusterSPIFFEID` custom resource: which pods get which SPIFFE ID, rendered from
//! templates over pod, namespace and node facts (the template language is
//! [`crate::template`]). It covers spire-controller-manager's ClusterSPIFFEID, with typed
//! templates in place of Go templates.
//!
//! Templates are checked at admission by a CEL rule generated from the same field table
//! the operator parses them with, so an unknown field is refused by `kubectl apply`, not
//! discovered later. The identity index ([`crate::index`]) turns these objects into
//! registration entries and reports what it did in `status.stats`.

// `KubeSchema` copies each struct, `pub` included, into a function body to build its
// schema; those copies trip `unreachable_pub`.
#![allow(unreachable_pub)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::crd::trust_domain::GoDuration;
use crate::template;

/// The SPIFFE ID template used when `spec.spiffeIDTemplate` is not given.
pub const DEFAULT_SPIFFE_ID_TEMPLATE: &str =
    "spiffe://{{trustDomain}}/ns/{{pod.namespace}}/sa/{{pod.serviceAccountName}}";

/// Longest template accepted.
pub const MAX_TEMPLATE_LEN: usize = 1024;
/// Most DNS name templates, workload selector templates or federated trust domains.
pub const MAX_LIST_ITEMS: usize = 32;

/// CEL: the template's path does not start with the reserved `/sigil` (the identity index
/// also refuses an ID that renders under it, as the CA refuses to sign one).
pub const RESERVED_PATH_RULE: &str = r"!self.matches('^spiffe://[^/]*/sigil([/{]|$)')";

/// Gives SPIFFE IDs to the pods it selects.
///
/// For every pod in a namespace matching `namespaceSelector` whose labels match
/// `podSelector`, Sigil renders a registration entry: the SPIFFE ID from
/// `spiffeIDTemplate`, bound to the pod's UID, delivered to the agent on the pod's node.
// Several printer columns share a `type_`, which clippy mistakes for a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sigil.dev",
    version = "v1alpha1",
    kind = "ClusterSPIFFEID",
    plural = "clusterspiffeids",
    singular = "clusterspiffeid",
    shortname = "csid",
    category = "sigil",
    status = "ClusterSpiffeIdStatus",
    derive = "PartialEq",
    doc = "Gives SPIFFE IDs to the pods it selects: for each pod matching namespaceSelector and podSelector it renders a registration entry (SPIFFE ID, DNS names, TTLs, federation) bound to the pod's UID and delivered to the agent on the pod's node.",
    printcolumn(
        name = "Trust Domain",
        type_ = "string",
        json_path = ".spec.trustDomain",
        priority = 1
    ),
    printcolumn(
        name = "Template",
        type_ = "string",
        json_path = ".spec.spiffeIDTemplate",
        priority = 1
    ),
    printcolumn(
        name = "Pods",
        type_ = "integer",
        json_path = ".status.stats.podsSelected"
    ),
    printcolumn(
        name = "Failures",
        type_ = "integer",
        json_path = ".status.stats.podEntryRenderFailures"
    ),
    printcolumn(
        name = "Masked",
        type_ = "integer",
        json_path = ".status.stats.entriesMasked"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpiffeIdSpec {
    /// Name of the TrustDomain object whose CA issues these identities (its
    /// `metadata.name`, not the trust domain name). May be left out when exactly one
    /// TrustDomain exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(r"self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("spec.trustDomain must be the metadata.name of a TrustDomain object: lowercase letters, digits, '-' and '.'"))]
    #[schemars(length(min = 1, max = 253))]
    pub trust_domain: Option<String>,

    /// Template of the SPIFFE ID, e.g. the default
    /// `spiffe://{{trustDomain}}/ns/{{pod.namespace}}/sa/{{pod.serviceAccountName}}`. Fields:
    /// trustDomain, pod.name, pod.namespace, pod.uid, pod.serviceAccountName, pod.nodeName,
    /// pod.hostname, pod.labels['key'], pod.annotations['key'], namespace.name,
    /// namespace.labels['key'], node.name, node.uid, node.labels['key'], clusterName,
    /// clusterDomain. The rendered ID must be in the trust domain; a pod for which it
    /// does not render (a missing label, an invalid character) is counted in
    /// `status.stats.podEntryRenderFailures`.
    #[serde(rename = "spiffeIDTemplate", default = "default_spiffe_id_template")]
    #[x_kube(validation = Rule::new("self.startsWith('spiffe://')").message("spec.spiffeIDTemplate must start with spiffe://, e.g. spiffe://{{trustDomain}}/ns/{{pod.namespace}}/sa/{{pod.serviceAccountName}}"))]
    #[x_kube(validation = Rule::new(RESERVED_PATH_RULE).message("spec.spiffeIDTemplate may not use a path under /sigil: it is reserved for Sigil's agents, operator and bundle endpoint; choose another path, e.g. spiffe://{{trustDomain}}/ns/{{pod.namespace}}/sa/{{pod.serviceAccountName}}"))]
    pub spiffe_id_template: TemplateString,

    /// Namespaces whose pods are considered. Absent or `{}`: every namespace (except those
    /// the operator is configured to ignore, counted in `status.stats.namespacesIgnored`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Pods that get an identity, by their labels. Absent or `{}`: every pod of the
    /// selected namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,

    /// Templates of DNS names put in the X509-SVID (same fields as spiffeIDTemplate), e.g.
    /// `{{pod.labels['app']}}.{{pod.namespace}}.svc`. A name that does not render or is
    /// not a valid DNS name is a render failure for that pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub dns_name_templates: Vec<TemplateString>,

    /// Also put in the X509-SVID the DNS names of every Service whose EndpointSlices list
    /// the pod: `<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc` and `<svc>.<ns>.svc.<clusterDomain>`.
    #[serde(rename = "autoPopulateDNSNames", default)]
    pub auto_populate_dns_names: bool,

    /// Lifetime of the X509-SVIDs, as a Go duration ("1h"). Default: the TrustDomain's
    /// `x509SVIDTTL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<GoDuration>,

    /// Lifetime of the JWT-SVIDs, as a Go duration ("5m"). Default: the TrustDomain's
    /// `jwtSVIDTTL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_ttl: Option<GoDuration>,

    /// Trust domain names (e.g. `partner.example.com`) whose bundles the workloads also
    /// receive, so they can authenticate peers there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(t, t.matches('^[a-z0-9._-]+$'))").message("spec.federatesWith holds trust domain names such as partner.example.com: lowercase letters, digits, '.', '-' and '_', with no scheme, port or path"))]
    #[schemars(length(max = 32), inner(length(min = 1, max = 255)))]
    pub federates_with: Vec<String>,

    /// Workload API hint, to tell the identities of a workload apart when it has several.
    /// Unique among a pod's identities: when two ClusterSPIFFEIDs give one pod the same
    /// hint, the older keeps it and the younger's entry is issued without it (its Ready
    /// condition says `HintConflict`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 256))]
    pub hint: String,

    /// Marks the entries admin (for a future admin API); accepted and delivered to agents.
    #[serde(default)]
    pub admin: bool,

    /// Marks the entries downstream (for a future downstream CA); accepted and delivered
    /// to agents.
    #[serde(default)]
    pub downstream: bool,

    /// Key algorithm of the workloads' X509-SVID keys, which the agent generates on the
    /// node: ECDSA-P256 (default) or RSA-2048 (for JVM and other stacks that need RSA). An
    /// RSA-2048 key costs the agent hundreds of milliseconds of CPU to make, at every
    /// rotation (a P-256 key: microseconds).
    /// A change gives the selected workloads new SVIDs with new keys of the new type at
    /// once (each keeps its current SVID until the new one is signed).
    #[serde(default)]
    pub workload_key_type: WorkloadKeyType,

    /// Applies to a pod only when no non-fallback ClusterSPIFFEID selects it: a catch-all
    /// identity that steps aside for specific ones.
    #[serde(default)]
    pub fallback: bool,

    /// Extra selectors the workload must also present, as `type:value` templates (same
    /// fields), e.g. `k8s:container-name:{{pod.labels['app']}}`. The entry always carries
    /// `k8s:pod-uid:<uid>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(t, t.matches('^[^:]+:.+$'))").message("spec.workloadSelectorTemplates items are type:value, e.g. k8s:container-name:web"))]
    #[schemars(length(max = 32))]
    pub workload_selector_templates: Vec<TemplateString>,
}

/// Key algorithm of workload X509-SVID keys: ECDSA-P256 or RSA-2048.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WorkloadKeyType {
    #[default]
    #[serde(rename = "ECDSA-P256")]
    #[allow(missing_docs)]
    EcdsaP256,
    #[serde(rename = "RSA-2048")]
    #[allow(missing_docs)]
    Rsa2048,
}

fn default_spiffe_id_template() -> TemplateString {
    TemplateString(DEFAULT_SPIFFE_ID_TEMPLATE.to_owned())
}

/// A template string (see [`crate::template`]): text with `{{ field }}` placeholders. Its
/// schema carries the admission rule generated from [`template::FIELDS`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TemplateString(pub String);

impl JsonSchema for TemplateString {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TemplateString".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_TEMPLATE_LEN,
            "x-kubernetes-validations": [{
                "rule": template::admission_rule(),
                "message": template::admission_message(),
            }],
        })
    }
}

/// What the identity index observed for a ClusterSPIFFEID, as spire-controller-manager's
/// stats.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpiffeIdStatus {
    /// `Ready`: the spec is valid, its TrustDomain is known and every selected pod's entry
    /// rendered. Reasons: `EntriesRendered`, `HintConflict` (ready, but an older
    /// ClusterSPIFFEID gives some pods an identity with the same hint, so this one's entries
    /// are issued without it), `RenderFailures`, `TrustDomainNotFound`,
    /// `TrustDomainAmbiguous`, `InvalidSpec`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Counts of what the ClusterSPIFFEID selected and produced.
    #[serde(default)]
    pub stats: ClusterSpiffeIdStats,
}

/// Counts of what a ClusterSPIFFEID selected and produced.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpiffeIdStats {
    /// Namespaces matching `namespaceSelector`.
    #[serde(default)]
    pub namespaces_selected: i64,
    /// Namespaces matching `namespaceSelector` that the operator is configured to ignore.
    #[serde(default)]
    pub namespaces_ignored: i64,
    /// Pods matching both selectors (a fallback ClusterSPIFFEID counts a pod even while a
    /// non-fallback one takes precedence on it).
    #[serde(default)]
    pub pods_selected: i64,
    /// Selected pods whose entry did not render (see `firstRenderFailure`).
    #[serde(default, rename = "podEntryRenderFailures")]
    pub pod_entry_render_failures: i64,
    /// The first failing pod (`namespace/name`, in name order) and why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_render_failure: Option<String>,
    /// Entries not issued because an older ClusterSPIFFEID gives the same pod the same
    /// SPIFFE ID (the oldest object wins; ties by name).
    #[serde(default)]
    pub entries_masked: i64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: ClusterSpiffeIdSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(spec.spiffe_id_template.0, DEFAULT_SPIFFE_ID_TEMPLATE);
        assert!(!spec.fallback && !spec.auto_populate_dns_names && spec.trust_domain.is_none());
        let full: ClusterSpiffeIdSpec = serde_json::from_value(serde_json::json!({
            "trustDomain": "prod", "spiffeIDTemplate": "spiffe://{{trustDomain}}/x", "autoPopulateDNSNames": true,
            "jwtTtl": "10m", "ttl": "2h", "federatesWith": ["a.org"], "workloadSelectorTemplates": ["k8s:ns:{{pod.namespace}}"],
        }))
        .unwrap();
        assert!(full.auto_populate_dns_names);
        assert_eq!(full.jwt_ttl.unwrap().to_std().unwrap().as_secs(), 600);
        assert_eq!(spec.workload_key_type, WorkloadKeyType::EcdsaP256);
        let rsa: ClusterSpiffeIdSpec =
            serde_json::from_value(serde_json::json!({"workloadKeyType": "RSA-2048"})).unwrap();
        assert_eq!(rsa.workload_key_type, WorkloadKeyType::Rsa2048);
        assert!(
            serde_json::from_value::<ClusterSpiffeIdSpec>(
                serde_json::json!({"workloadKeyType": "rsa-2048"})
            )
            .is_err()
        );
    }

    #[test]
    fn crd_carries_template_rules_columns_and_shortname() {
        let crd = serde_json::to_value(ClusterSPIFFEID::crd()).unwrap();
        let text = crd.to_string();
        for needle in [
            "\"shortNames\":[\"csid\"]",
            "\"scope\":\"Cluster\"",
            "podEntryRenderFailures",
            "entriesMasked",
            "pod.serviceAccountName",
            "autoPopulateDNSNames",
            "spiffeIDTemplate",
        ] {
            assert!(text.contains(needle), "CRD lacks {needle}");
        }
        assert_eq!(
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
                ["workloadKeyType"]["enum"],
            serde_json::json!(["ECDSA-P256", "RSA-2048"])
        );
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        let rules = spec["spiffeIDTemplate"]["x-kubernetes-validations"]
            .as_array()
            .unwrap();
        assert!(
            rules
                .iter()
                .any(|r| r["rule"] == template::admission_rule()),
            "{rules:?}"
        );
        assert_eq!(
            spec["dnsNameTemplates"]["items"]["x-kubernetes-validations"][0]["rule"],
            template::admission_rule()
        );
        assert_eq!(
            spec["workloadSelectorTemplates"]["items"]["x-kubernetes-validations"][0]["rule"],
            template::admission_rule()
        );
        assert_eq!(
            spec["spiffeIDTemplate"]["default"],
            DEFAULT_SPIFFE_ID_TEMPLATE
        );
        let columns: Vec<_> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect();
        for c in ["Pods", "Failures", "Masked", "Ready", "Age"] {
            assert!(columns.iter().any(|x| x == c), "no {c} column");
        }
    }
}
