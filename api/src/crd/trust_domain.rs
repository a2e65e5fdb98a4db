//! The `TrustDomain` custom resource: one SPIFFE trust domain this cluster issues
//! identities in, its signing CA (self-signed or under an upstream CA), its JWT signing
//! keys, and where its trust bundle is published.
//!
//! Whatever the apiserver can check is checked at admission (CEL rules with messages that
//! name the field and the fix); the reconciler in [`crate::trust_domain`] checks the rest
//! and reports it in `status.conditions`.

// `KubeSchema` copies each struct, `pub` included, into a function body to build its
// schema; those copies trip `unreachable_pub`.
#![allow(unreachable_pub)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Label put on every object Sigil writes for a TrustDomain (CA Secret, bundle
/// ConfigMaps); its value is the TrustDomain's `metadata.name`.
pub const OWNER_LABEL: &str = "sigil.dev/trust-domain";
/// Label telling what a Sigil-written object is for (`ca` or `bundle`).
pub const COMPONENT_LABEL: &str = "sigil.dev/component";

/// A SPIFFE trust domain that this cluster issues identities in.
///
/// Sigil keeps a signing CA for it (rotated without outage), JWT signing keys, and
/// publishes its trust bundle into the namespaces picked by `spec.bundle.namespaceSelector`.
// Several printer columns share a `type_`, which clippy mistakes for a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sigil.dev",
    version = "v1alpha1",
    kind = "TrustDomain",
    plural = "trustdomains",
    shortname = "td",
    category = "sigil",
    status = "TrustDomainStatus",
    derive = "PartialEq",
    doc = "A SPIFFE trust domain this cluster issues identities in: its signing CA (self-signed or under an upstream CA), its JWT signing keys and the publication of its trust bundle.",
    printcolumn(
        name = "Trust Domain",
        type_ = "string",
        json_path = ".spec.trustDomain"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "CA Expires",
        type_ = "date",
        json_path = ".status.activeCA.notAfter"
    ),
    printcolumn(
        name = "Sequence",
        type_ = "integer",
        json_path = ".status.bundleSequence"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TrustDomainSpec {
    /// The SPIFFE trust domain name, e.g. `prod.example.org`: every SPIFFE ID issued here is
    /// `spiffe://<trustDomain>/...`. Lowercase letters, digits, '.', '-' and '_' only: no
    /// scheme, uppercase, port or path. Immutable, because every issued SVID names it.
    #[x_kube(
        validation = Rule::new("self.matches('^[a-z0-9._-]+$')").message(Message::Expression(r#""spec.trustDomain '" + self + "' is not a trust domain name: use only lowercase letters, digits, '.', '-' and '_', with no scheme, port or path (for example prod.example.org)""#.into())),
        validation = Rule::new("self == oldSelf").message("spec.trustDomain is immutable because issued SVIDs name it; create a new TrustDomain to use another name")
    )]
    #[schemars(length(min = 1, max = 255))]
    pub trust_domain: String,

    /// Default lifetime of X509-SVIDs, as a Go duration ("1h", "90m"). Agents renew them at
    /// half-life. An SVID never outlives the CA that signs it. Default "1h".
    #[serde(rename = "x509SVIDTTL", default = "default_x509_svid_ttl")]
    pub x509_svid_ttl: GoDuration,

    /// Default lifetime of JWT-SVIDs, as a Go duration. Default "5m".
    #[serde(rename = "jwtSVIDTTL", default = "default_jwt_svid_ttl")]
    pub jwt_svid_ttl: GoDuration,

    /// The X.509 signing CA: lifetime, key type, subject and rotation timing.
    #[serde(default)]
    pub ca: CaSpec,

    /// The JWT-SVID signing keys. They rotate on the same schedule as the CA.
    #[serde(default)]
    pub jwt: JwtSpec,

    /// Sign under an existing PKI instead of a self-signed root: Sigil's CA becomes an
    /// intermediate under the upstream CA (one handed over in a Secret, or one that signs
    /// Sigil's CSR through cert-manager), and the trust bundle publishes that PKI's root.
    /// Without it Sigil's CA is a self-signed root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_authority: Option<UpstreamAuthoritySpec>,

    /// Where the trust bundle is published.
    #[serde(default)]
    pub bundle: BundleSpec,
}

/// A duration written the Go way ("1h", "90m", "1h30m", "300ms"). Kept as the user wrote
/// it; [`GoDuration::to_std`] parses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GoDuration(pub String);

/// Go duration syntax, as a CEL/RE2 regular expression (positive durations only).
pub const GO_DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

impl GoDuration {
    /// A duration from its Go spelling.
    pub fn new(s: &str) -> Self {
        Self(s.to_owned())
    }

    /// Parses the Go duration; the error says what is wrong with it.
    pub fn to_std(&self) -> Result<std::time::Duration, String> {
        sigil_telemetry::process::go_duration(&self.0)
    }
}

impl std::fmt::Display for GoDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for GoDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GoDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let rule = format!(
            "self.matches('{}') && duration(self) > duration('0s')",
            GO_DURATION_PATTERN.replace('\\', "\\\\")
        );
        schemars::json_schema!({
            "type": "string",
            "maxLength": 64,
            "x-kubernetes-validations": [{
                "rule": rule,
                "message": "must be a positive Go duration such as \"1h\", \"90m\" or \"1h30m\" (units: ns, us, ms, s, m, h)",
            }],
        })
    }
}

fn default_x509_svid_ttl() -> GoDuration {
    GoDuration::new("1h")
}
fn default_jwt_svid_ttl() -> GoDuration {
    GoDuration::new("5m")
}
fn default_ca_ttl() -> GoDuration {
    GoDuration::new("24h")
}
fn default_refresh_hint() -> GoDuration {
    GoDuration::new("5m")
}
fn default_config_map_name() -> String {
    "sigil-trust-bundle".into()
}
fn default_certificate_key() -> String {
    "tls.crt".into()
}
fn default_private_key_key() -> String {
    "tls.key".into()
}
fn default_chain_key() -> String {
    "ca.crt".into()
}

/// The signing CA of the trust domain and its rotation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.activationDelay) || duration(self.activationDelay) + duration(self.activationDelay) < duration(self.ttl)").message("spec.ca.activationDelay must be shorter than half of spec.ca.ttl: the next CA is prepared at half-life and must start signing before the current one expires; lower activationDelay or raise ttl")
)]
pub struct CaSpec {
    /// Lifetime of each CA certificate, as a Go duration. The next CA is prepared (and
    /// published in the trust bundle) when half of it has passed. Minimum "1m", default "24h".
    #[serde(default = "default_ca_ttl")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m')").message("spec.ca.ttl must be at least 1m"))]
    pub ttl: GoDuration,

    /// Key algorithm of the CA key: ECDSA-P256 (default), ECDSA-P384, Ed25519, RSA-2048,
    /// RSA-3072 or RSA-4096 (RSA CAs sign with PKCS#1 v1.5 SHA-256, and sign SVIDs one to
    /// two orders of magnitude slower than ECDSA-P256). A change takes effect with the next
    /// CA.
    #[serde(default)]
    pub key_type: CaKeyType,

    /// Subject of the CA certificates.
    #[serde(default)]
    pub subject: CaSubjectSpec,

    /// How long a prepared CA is published in trust bundles before it starts signing (the
    /// time bundles have to reach every relying party), as a Go duration. Must be shorter
    /// than ttl/2. Default: ttl/3, so the new CA takes over when ttl/6 of the old CA's life
    /// remains, as SPIRE does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_delay: Option<GoDuration>,
}

impl Default for CaSpec {
    fn default() -> Self {
        Self {
            ttl: default_ca_ttl(),
            key_type: CaKeyType::default(),
            subject: CaSubjectSpec::default(),
            activation_delay: None,
        }
    }
}

/// Key algorithm of a CA: ECDSA-P256, ECDSA-P384, Ed25519, RSA-2048, RSA-3072 or RSA-4096.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CaKeyType {
    #[default]
    #[serde(rename = "ECDSA-P256")]
    #[allow(missing_docs)]
    EcdsaP256,
    #[serde(rename = "ECDSA-P384")]
    #[allow(missing_docs)]
    EcdsaP384,
    #[serde(rename = "Ed25519")]
    #[allow(missing_docs)]
    Ed25519,
    #[serde(rename = "RSA-2048")]
    #[allow(missing_docs)]
    Rsa2048,
    #[serde(rename = "RSA-3072")]
    #[allow(missing_docs)]
    Rsa3072,
    #[serde(rename = "RSA-4096")]
    #[allow(missing_docs)]
    Rsa4096,
}

/// Key algorithm of JWT-SVID signing keys: ECDSA-P256, ECDSA-P384, RSA-2048, RSA-3072 or
/// RSA-4096. The JWT-SVID specification allows no EdDSA.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum JwtKeyType {
    #[default]
    #[serde(rename = "ECDSA-P256")]
    #[allow(missing_docs)]
    EcdsaP256,
    #[serde(rename = "ECDSA-P384")]
    #[allow(missing_docs)]
    EcdsaP384,
    #[serde(rename = "RSA-2048")]
    #[allow(missing_docs)]
    Rsa2048,
    #[serde(rename = "RSA-3072")]
    #[allow(missing_docs)]
    Rsa3072,
    #[serde(rename = "RSA-4096")]
    #[allow(missing_docs)]
    Rsa4096,
}

/// The JWS algorithm of JWT-SVIDs: ES256, ES384, RS256 (RSASSA-PKCS1-v1_5) or PS256
/// (RSASSA-PSS).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwtAlgorithm {
    #[allow(missing_docs)]
    ES256,
    #[allow(missing_docs)]
    ES384,
    #[allow(missing_docs)]
    RS256,
    #[allow(missing_docs)]
    PS256,
}

/// CEL on `spec.jwt`: the algorithm fits the key type.
pub const JWT_ALGORITHM_FITS_KEY_RULE: &str = "!has(self.algorithm) || !has(self.keyType) || (self.algorithm == 'ES256' && self.keyType == 'ECDSA-P256') || (self.algorithm == 'ES384' && self.keyType == 'ECDSA-P384') || (self.algorithm in ['RS256', 'PS256'] && self.keyType.startsWith('RSA-'))";

/// Subject distinguished name of the CA certificates. Sigil also adds a serialNumber
/// attribute so successive CAs never share a subject.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CaSubjectSpec {
    /// Organization (O) values. Default ["Sigil"].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 64)))]
    pub organization: Vec<String>,

    /// Country (C): a two-letter ISO 3166 code such as "DE".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Z]{2}$')").message("spec.ca.subject.country must be a two-letter uppercase ISO 3166 code such as \"DE\""))]
    #[schemars(length(max = 2))]
    pub country: Option<String>,

    /// Common name (CN). Default: "Sigil CA " followed by the trust domain name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub common_name: Option<String>,
}

/// JWT-SVID signing keys.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(JWT_ALGORITHM_FITS_KEY_RULE).message("spec.jwt.algorithm does not fit spec.jwt.keyType: ES256 needs ECDSA-P256, ES384 needs ECDSA-P384, RS256 and PS256 need RSA-2048, RSA-3072 or RSA-4096; change one of them, or remove keyType to get the algorithm's default key")
)]
pub struct JwtSpec {
    /// Key algorithm: ECDSA-P256, ECDSA-P384, RSA-2048, RSA-3072 or RSA-4096. Default: the
    /// algorithm's key (RSA-2048 for RS256 and PS256, ECDSA-P384 for ES384), else
    /// ECDSA-P256. A change takes effect with the next key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_type: Option<JwtKeyType>,

    /// JWS algorithm of JWT-SVIDs: ES256, ES384, RS256 or PS256. Default: the key type's
    /// (ES256 for ECDSA-P256, ES384 for ECDSA-P384, RS256 for RSA keys). Relying parties
    /// that accept only RS256, such as Azure Entra workload identity federation, need
    /// RS256. The OIDC discovery document and the JWKS announce it. A change takes effect
    /// with the next key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<JwtAlgorithm>,

    /// Value of the `iss` claim of JWT-SVIDs, an https URL (the OIDC issuer that serves
    /// this trust domain's discovery document). Without it JWT-SVIDs carry no `iss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() == 'https'").message("spec.jwt.issuer must be an https:// URL, for example https://oidc.example.org"))]
    #[schemars(length(max = 2048))]
    pub issuer: Option<String>,
}

/// An upstream CA that Sigil's CA is issued under: exactly one of `secretRef` (Sigil holds
/// the upstream CA's key) or `certManager` (the upstream signs Sigil's CSR; its key never
/// reaches Sigil).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.secretRef) != has(self.certManager)").message("spec.upstreamAuthority needs exactly one of secretRef (a Secret holding the upstream CA and its key) or certManager (a cert-manager Issuer or ClusterIssuer that signs Sigil's CSR)")
)]
pub struct UpstreamAuthoritySpec {
    /// The Secret holding the upstream CA certificate, its private key and its chain up to
    /// and including the root, e.g. a cert-manager Certificate's Secret with `isCA: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<UpstreamSecretRef>,

    /// A cert-manager issuer that signs Sigil's CA: the operator generates the CA key
    /// itself, sends a CertificateRequest (in the operator's namespace) with its CSR, and
    /// installs the signed chain. The issuer's key never reaches Sigil.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_manager: Option<CertManagerUpstream>,
}

/// Signing Sigil's CA through a cert-manager CertificateRequest.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertManagerUpstream {
    /// The issuer that signs the CertificateRequest. An Issuer must be in the operator's
    /// namespace (where the request is created); a ClusterIssuer can be used from anywhere.
    pub issuer_ref: CertManagerIssuerRef,
}

/// Reference to a cert-manager Issuer or ClusterIssuer (or an external issuer's kind).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertManagerIssuerRef {
    /// Name of the issuer.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// `Issuer` (in the operator's namespace) or `ClusterIssuer`. Default `Issuer`.
    #[serde(default)]
    pub kind: CertManagerIssuerKind,

    /// API group of the issuer. Default `cert-manager.io`.
    #[serde(default = "default_cert_manager_group")]
    #[schemars(length(min = 1, max = 253))]
    pub group: String,
}

/// Kind of a cert-manager issuer.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CertManagerIssuerKind {
    /// A namespaced Issuer in the operator's namespace.
    #[default]
    Issuer,
    /// A cluster-scoped ClusterIssuer.
    ClusterIssuer,
}

impl CertManagerIssuerKind {
    /// The kind as cert-manager writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issuer => "Issuer",
            Self::ClusterIssuer => "ClusterIssuer",
        }
    }
}

fn default_cert_manager_group() -> String {
    "cert-manager.io".to_owned()
}

/// Reference to the Secret of an upstream CA and the keys of its entries.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// Namespace of the Secret. Default: the namespace sigil-operator runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,

    /// Key of the PEM CA certificate (optionally followed by its chain). Default "tls.crt".
    #[serde(default = "default_certificate_key")]
    #[schemars(length(min = 1, max = 253))]
    pub certificate_key: String,

    /// Key of the PEM private key of that certificate. Default "tls.key".
    #[serde(default = "default_private_key_key")]
    #[schemars(length(min = 1, max = 253))]
    pub private_key_key: String,

    /// Key of the PEM chain above the certificate, up to and including the root. Optional
    /// in the Secret when the certificate is itself the root. Default "ca.crt".
    #[serde(default = "default_chain_key")]
    #[schemars(length(min = 1, max = 253))]
    pub chain_key: String,
}

/// Publication of the trust bundle into namespaces.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BundleSpec {
    /// Name of the ConfigMap written into each selected namespace, with `bundle.pem` (the
    /// X.509 authorities) and `bundle.spiffe` (the SPIFFE bundle, a JWK Set). Default
    /// "sigil-trust-bundle".
    #[serde(default = "default_config_map_name")]
    #[x_kube(validation = Rule::new(r"self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("spec.bundle.configMapName must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.'"))]
    #[schemars(length(min = 1, max = 253))]
    pub config_map_name: String,

    /// The namespaces that receive the ConfigMap. Absent: every namespace; `{}` also selects
    /// every namespace. A namespace that stops matching loses the ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// `spiffe_refresh_hint` of the published bundle: how often relying parties should
    /// re-read it, as a Go duration. Default "5m".
    #[serde(default = "default_refresh_hint")]
    pub refresh_hint: GoDuration,
}

impl Default for BundleSpec {
    fn default() -> Self {
        Self {
            config_map_name: default_config_map_name(),
            namespace_selector: None,
            refresh_hint: default_refresh_hint(),
        }
    }
}

/// What Sigil observed and did for a TrustDomain.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TrustDomainStatus {
    /// `Ready`: the CA, keys and bundle match the spec and nothing needs attention.
    /// `Issuing`: a valid CA is signing (it stays True while a broken upstream keeps a new CA
    /// from being prepared, so nothing already issued stops working).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The CA that signs X509-SVIDs now.
    #[serde(rename = "activeCA", default, skip_serializing_if = "Option::is_none")]
    pub active_ca: Option<CaStatus>,

    /// The next CA: already in the trust bundle, not signing yet.
    #[serde(
        rename = "preparedCA",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub prepared_ca: Option<CaStatus>,

    /// Key ID (`kid`) of the key that signs JWT-SVIDs now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_jwt_key_id: Option<String>,

    /// Key ID of the next JWT key: already in the trust bundle, not signing yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared_jwt_key_id: Option<String>,

    /// `spiffe_sequence` of the published bundle; it increases on every change of the
    /// bundle's authorities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_sequence: Option<i64>,

    /// Number of namespaces holding the bundle ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_namespaces: Option<i32>,

    /// The Secret (namespace/name) that holds this trust domain's CA and JWT keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<String>,
}

/// One CA certificate.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    /// Serial number, hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: Time,
    /// End of validity.
    pub not_after: Time,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: TrustDomainSpec =
            serde_json::from_value(serde_json::json!({"trustDomain": "example.org"})).unwrap();
        assert_eq!(spec.x509_svid_ttl.to_std().unwrap().as_secs(), 3600);
        assert_eq!(spec.jwt_svid_ttl.to_std().unwrap().as_secs(), 300);
        assert_eq!(spec.ca.ttl.to_std().unwrap().as_secs(), 86400);
        assert_eq!(spec.ca.key_type, CaKeyType::EcdsaP256);
        assert_eq!(spec.jwt.key_type, None);
        assert_eq!(spec.jwt.algorithm, None);
        assert_eq!(spec.bundle.config_map_name, "sigil-trust-bundle");
        assert!(spec.upstream_authority.is_none());
    }

    #[test]
    fn go_durations_parse_and_reject_with_a_reason() {
        assert_eq!(GoDuration::new("1h30m").to_std().unwrap().as_secs(), 5400);
        assert_eq!(GoDuration::new("90m").to_std().unwrap().as_secs(), 5400);
        assert!(
            GoDuration::new("1d")
                .to_std()
                .unwrap_err()
                .contains("Go duration")
        );
        assert!(
            GoDuration::new("-1h")
                .to_std()
                .unwrap_err()
                .contains("negative")
        );
        assert!(GoDuration::new("0s").to_std().unwrap_err().contains("zero"));
        assert!(GoDuration::new("").to_std().is_err());
    }

    #[test]
    fn crd_carries_cel_rules_defaults_and_columns() {
        let crd = serde_json::to_string(&TrustDomain::crd()).unwrap();
        for needle in [
            "self == oldSelf",
            "spec.trustDomain is immutable",
            "x-kubernetes-list-map-keys",
            "\"default\":\"1h\"",
            "\"default\":\"sigil-trust-bundle\"",
            "CA Expires",
            "\"shortNames\":[\"td\"]",
            "\"scope\":\"Cluster\"",
            "\"RSA-4096\"",
            "\"PS256\"",
            "spec.jwt.algorithm does not fit spec.jwt.keyType",
        ] {
            assert!(crd.contains(needle), "CRD lacks {needle}");
        }
    }
}
