//! The `FederatedBundle` custom resource: another trust domain whose bundle Sigil fetches
//! from its SPIFFE bundle endpoint (SPIFFE_Federation.md) and hands to workloads whose
//! ClusterSPIFFEID names it in `federatesWith`.

// `KubeSchema` copies each struct, `pub` included, into a function body to build its
// schema; those copies trip `unreachable_pub`.
#![allow(unreachable_pub)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::trust_domain::GoDuration;

/// A foreign trust domain Sigil federates with: where its bundle endpoint is, how to
/// authenticate it, and the bundle to trust before the first fetch.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sigil.dev",
    version = "v1alpha1",
    kind = "FederatedBundle",
    plural = "federatedbundles",
    shortname = "fb",
    category = "sigil",
    status = "FederatedBundleStatus",
    derive = "PartialEq",
    doc = "A foreign SPIFFE trust domain whose bundle Sigil fetches from its bundle endpoint and hands to workloads that federate with it.",
    printcolumn(
        name = "Trust Domain",
        type_ = "string",
        json_path = ".spec.trustDomain"
    ),
    printcolumn(
        name = "Profile",
        type_ = "string",
        json_path = ".spec.bundleEndpointProfile.type"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Sequence", type_ = "integer", json_path = ".status.sequence"),
    printcolumn(name = "Keys", type_ = "integer", json_path = ".status.keys"),
    printcolumn(name = "Last Fetch", type_ = "date", json_path = ".status.lastFetch"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct FederatedBundleSpec {
    /// The foreign trust domain, e.g. `partner.example.com`. Never inferred from the URL.
    #[x_kube(
        validation = Rule::new("self.matches('^[a-z0-9._-]+$')").message(Message::Expression(r#""spec.trustDomain '" + self + "' is not a trust domain name: use only lowercase letters, digits, '.', '-' and '_' (for example partner.example.com)""#.into())),
        validation = Rule::new("self == oldSelf").message("spec.trustDomain is immutable; create another FederatedBundle for another trust domain")
    )]
    #[schemars(length(min = 1, max = 255))]
    pub trust_domain: String,

    /// The bundle endpoint, an `https://` URL.
    #[x_kube(validation = Rule::new("self.startsWith('https://')").message("spec.bundleEndpointURL must be an https:// URL"))]
    #[schemars(length(min = 9, max = 2048))]
    #[serde(rename = "bundleEndpointURL")]
    pub bundle_endpoint_url: String,

    /// How the endpoint is authenticated.
    pub bundle_endpoint_profile: EndpointProfile,

    /// The bundle to trust before the first successful fetch (and to authenticate an
    /// `https_spiffe` endpoint the first time): a SPIFFE bundle (JWK Set) or PEM
    /// certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1048576))]
    pub trust_domain_bundle: Option<String>,

    /// How often to fetch when the bundle carries no `spiffe_refresh_hint` (Go duration).
    /// Default "5m".
    #[serde(default = "default_refresh")]
    pub refresh_interval: GoDuration,
}

fn default_refresh() -> GoDuration {
    GoDuration::new("5m")
}

/// `https_web` or `https_spiffe` (SPIFFE_Federation.md section 5).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.type != 'https_spiffe' || has(self.endpointSPIFFEID)").message("spec.bundleEndpointProfile.endpointSPIFFEID is required with type https_spiffe"),
    validation = Rule::new("self.type != 'https_web' || !has(self.endpointSPIFFEID)").message("spec.bundleEndpointProfile.endpointSPIFFEID only applies to type https_spiffe")
)]
pub struct EndpointProfile {
    /// `https_web`: the endpoint has a Web PKI certificate for its host name.
    /// `https_spiffe`: the endpoint presents an X509-SVID for `endpointSPIFFEID`.
    #[serde(rename = "type")]
    pub type_: ProfileType,

    /// With `https_spiffe`: the exact SPIFFE ID the endpoint's X509-SVID must carry.
    #[serde(
        rename = "endpointSPIFFEID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint_spiffe_id: Option<String>,

    /// With `https_web`: a Secret (`ca.crt`) with the CA certificates to trust instead of
    /// the system roots, for endpoints under a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle_secret_ref: Option<SecretRef>,
}

/// The endpoint profile type.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileType {
    /// Web PKI.
    #[serde(rename = "https_web")]
    HttpsWeb,
    /// SPIFFE authentication.
    #[serde(rename = "https_spiffe")]
    HttpsSpiffe,
}

/// A Secret in the operator's namespace, unless `namespace` says otherwise.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Secret name.
    pub name: String,
    /// Secret namespace (default: the operator's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The key holding PEM CA certificates. Default "ca.crt".
    #[serde(default = "default_ca_key")]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

/// What Sigil fetched and when.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FederatedBundleStatus {
    /// `Ready`: the last fetch succeeded (reason `Fetched`), or why it did not
    /// (`TLSFailed`, `Timeout`, `TooLarge`, `InvalidBundle`, `TrustDomainMismatch`,
    /// `ConnectFailed`, `HTTPError`, `RedirectRefused`, `NoBundle`, a CA bundle Secret
    /// problem, or a spec problem such as `DuplicateTrustDomain`). `BundleAvailable`: a
    /// bundle is held and handed to workloads (`Fetched`, `Bootstrap`), or not
    /// (`NoBundle`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `spiffe_sequence` of the bundle held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<i64>,
    /// Number of keys (X.509 and JWT authorities) in the bundle held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<i32>,
    /// When the last successful fetch happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fetch: Option<Time>,
    /// When the next fetch is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_fetch: Option<Time>,
    /// Why the last fetch failed (empty after a success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}
