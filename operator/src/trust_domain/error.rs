//! The one error type of the TrustDomain subsystem.
//!
//! Two families share it: problems a user caused (they carry a condition reason, go into
//! `status.conditions` and a Warning Event, and name the object, the field and the fix),
//! and operational failures (API errors, write conflicts) that the controller retries
//! with backoff. Both are counted by [`Error::metric_label`].

use sigil_identity::ca::{CaError, UpstreamError};
use sigil_identity::id::IdError;
use sigil_identity::jwt::JwtError;

/// Everything that can go wrong while reconciling a TrustDomain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `spec.trustDomain` is not a trust domain name (admission normally rejects this).
    #[error(
        "TrustDomain {object}: spec.trustDomain {value:?} is not a valid trust domain name: {source}; set spec.trustDomain to a bare name such as prod.example.org"
    )]
    InvalidTrustDomain {
        /// The TrustDomain's name.
        object: String,
        /// The rejected value.
        value: String,
        /// Why.
        source: IdError,
    },
    /// A field of the spec is unusable.
    #[error("TrustDomain {object}: {field} is invalid: {reason}")]
    InvalidSpec {
        /// The TrustDomain's name.
        object: String,
        /// JSON path of the field.
        field: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// Another, older TrustDomain declares the same trust domain.
    #[error(
        "TrustDomain {object}: spec.trustDomain {trust_domain:?} is already declared by TrustDomain {owner}, which is older and keeps issuing; delete {object} or change its spec.trustDomain"
    )]
    DuplicateTrustDomain {
        /// The TrustDomain's name.
        object: String,
        /// The trust domain both declare.
        trust_domain: String,
        /// The older TrustDomain that owns it.
        owner: String,
    },
    /// The upstream Secret does not exist.
    #[error(
        "TrustDomain {object}: spec.upstreamAuthority.secretRef names Secret {namespace}/{name}, which does not exist; create it or correct the reference"
    )]
    UpstreamSecretNotFound {
        /// The TrustDomain's name.
        object: String,
        /// Secret namespace.
        namespace: String,
        /// Secret name.
        name: String,
    },
    /// The operator may not read the upstream Secret.
    #[error(
        "TrustDomain {object}: sigil-operator is not allowed to read Secret {namespace}/{name} named by spec.upstreamAuthority.secretRef; grant its ServiceAccount `get` on that Secret (a Role and RoleBinding in {namespace}) or move the Secret to the operator's namespace"
    )]
    UpstreamSecretForbidden {
        /// The TrustDomain's name.
        object: String,
        /// Secret namespace.
        namespace: String,
        /// Secret name.
        name: String,
    },
    /// The upstream Secret lacks a required entry.
    #[error(
        "TrustDomain {object}: Secret {namespace}/{name} has no entry {key:?} holding the {what} (spec.upstreamAuthority.secretRef.{field}); add it to the Secret or point {field} at the entry that holds it"
    )]
    UpstreamSecretMissingKey {
        /// The TrustDomain's name.
        object: String,
        /// Secret namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// The missing entry.
        key: String,
        /// The secretRef field naming it.
        field: &'static str,
        /// What it should hold.
        what: &'static str,
    },
    /// The upstream CA is unusable.
    #[error(
        "TrustDomain {object}: the upstream CA in Secret {namespace}/{name} cannot be used: {source}"
    )]
    Upstream {
        /// The TrustDomain's name.
        object: String,
        /// Secret namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// Why.
        source: UpstreamError,
    },
    /// `spec.upstreamAuthority.certManager` is set but the API server has no
    /// cert-manager.io/v1 CertificateRequest resource.
    #[error(
        "TrustDomain {object}: spec.upstreamAuthority.certManager needs cert-manager, but the API server does not serve certificaterequests.cert-manager.io/v1 (its CRDs are not installed); install cert-manager, or use spec.upstreamAuthority.secretRef instead"
    )]
    CertManagerNotInstalled {
        /// The TrustDomain's name.
        object: String,
    },
    /// The operator may not use CertificateRequests in its namespace.
    #[error(
        "TrustDomain {object}: sigil-operator is not allowed to {verb} certificaterequests.cert-manager.io in namespace {namespace}; grant its ServiceAccount create, get, list, watch and delete on them there (the Helm chart's Role does)"
    )]
    CertificateRequestForbidden {
        /// The TrustDomain's name.
        object: String,
        /// The operator's namespace.
        namespace: String,
        /// The refused verb.
        verb: &'static str,
    },
    /// The CertificateRequest for the next CA is not signed yet.
    #[error(
        "TrustDomain {object}: CertificateRequest {namespace}/{name} for the {what} CA is pending: {detail}{}",
        if *signing { "; the active CA keeps signing meanwhile" } else { "; no CA signs until it is issued" },
        what = if *signing { "next" } else { "first" }
    )]
    CertificateRequestPending {
        /// The TrustDomain's name.
        object: String,
        /// Its namespace (the operator's).
        namespace: String,
        /// The CertificateRequest.
        name: String,
        /// What it waits for and what to do.
        detail: String,
        /// Whether a CA signs meanwhile.
        signing: bool,
    },
    /// An approver denied the CertificateRequest.
    #[error(
        "TrustDomain {object}: CertificateRequest {namespace}/{name} for the CA was denied ({reason}: {message}); allow Sigil's request in your approval policy (isCA, usages cert sign/crl sign/digital signature, the trust domain's URI SAN), then delete the CertificateRequest and Sigil sends a new one"
    )]
    CertificateRequestDenied {
        /// The TrustDomain's name.
        object: String,
        /// Its namespace.
        namespace: String,
        /// The CertificateRequest.
        name: String,
        /// The Denied condition's reason.
        reason: String,
        /// Its message.
        message: String,
    },
    /// cert-manager failed the CertificateRequest.
    #[error(
        "TrustDomain {object}: CertificateRequest {namespace}/{name} for the CA failed at {issuer} ({reason}: {message}); fix the issuer (or spec.upstreamAuthority.certManager), then delete the CertificateRequest and Sigil sends a new one"
    )]
    CertificateRequestFailed {
        /// The TrustDomain's name.
        object: String,
        /// Its namespace.
        namespace: String,
        /// The CertificateRequest.
        name: String,
        /// The issuer, in words.
        issuer: String,
        /// Ready's reason.
        reason: String,
        /// cert-manager's message.
        message: String,
    },
    /// The signed CertificateRequest holds a certificate Sigil cannot use as its CA.
    #[error(
        "TrustDomain {object}: CertificateRequest {namespace}/{name} was signed, but the result cannot be Sigil's CA: {reason}; fix the issuer so it signs CA certificates as requested, then delete the CertificateRequest and Sigil sends a new one"
    )]
    CertificateRequestUnusable {
        /// The TrustDomain's name.
        object: String,
        /// Its namespace.
        namespace: String,
        /// The CertificateRequest.
        name: String,
        /// Why.
        reason: String,
    },
    /// The persisted CA Secret cannot be read; it is left untouched.
    #[error(
        "TrustDomain {object}: CA Secret {namespace}/{name} cannot be loaded ({reason}); Sigil leaves it untouched and mints nothing. Restore it from a backup, or delete it to have Sigil mint a new root that every relying party must then learn"
    )]
    CaSecretInvalid {
        /// The TrustDomain's name.
        object: String,
        /// Secret namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The CA Secret names keys the key manager cannot give now (an HSM unreachable, or
    /// not holding them). Nothing is minted: a new root would change the trust domain.
    #[error(
        "TrustDomain {object}: the {key_manager} key manager cannot give the keys its CA Secret names ({reason}); Sigil mints nothing and tries again. Check that the HSM is reachable and that --pkcs11-token-label names the token the keys were made in (docs/hsm.md)"
    )]
    KeysUnavailable {
        /// The TrustDomain's name.
        object: String,
        /// The operator's key manager.
        key_manager: String,
        /// Why.
        reason: String,
    },
    /// A ConfigMap of the bundle's name exists and is not Sigil's.
    #[error(
        "TrustDomain {object}: ConfigMap {name} already exists in namespace(s) {namespaces} and was not written by Sigil for this TrustDomain, so it was left alone; delete it there or set spec.bundle.configMapName to another name"
    )]
    BundleConfigMapConflict {
        /// The TrustDomain's name.
        object: String,
        /// The ConfigMap name.
        name: String,
        /// Namespaces with a foreign ConfigMap.
        namespaces: String,
    },
    /// The CA could not be created (a crypto or library failure, not bad input).
    #[error("TrustDomain {object}: cannot create a CA: {source}")]
    Ca {
        /// The TrustDomain's name.
        object: String,
        /// Why.
        source: CaError,
    },
    /// A JWT key could not be created.
    #[error("cannot create a JWT signing key: {0}")]
    JwtKey(JwtError),
    /// The Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Someone else wrote the object first (another replica during a leader handover);
    /// the reconcile is retried with fresh data.
    #[error("{0} was changed concurrently; retrying with the current version")]
    Conflict(String),
    /// Serialising state failed.
    #[error("cannot serialise {what}: {reason}")]
    Serialize {
        /// What.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// Short, stable label for the `reason` label of the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidTrustDomain { .. } => "invalid_trust_domain",
            Error::InvalidSpec { .. } => "invalid_spec",
            Error::DuplicateTrustDomain { .. } => "duplicate_trust_domain",
            Error::UpstreamSecretNotFound { .. } => "upstream_secret_not_found",
            Error::UpstreamSecretForbidden { .. } => "upstream_secret_forbidden",
            Error::UpstreamSecretMissingKey { .. } => "upstream_secret_missing_key",
            Error::Upstream { source, .. } => match source {
                UpstreamError::NotACa { .. } => "upstream_not_ca",
                UpstreamError::KeyMismatch => "upstream_key_mismatch",
                UpstreamError::Expired { .. } => "upstream_expired",
                UpstreamError::ExpiresTooSoon { .. } => "upstream_expires_too_soon",
                UpstreamError::NoRoot | UpstreamError::ChainBroken(_) => "upstream_chain_invalid",
                UpstreamError::UnsupportedKey { .. } => "upstream_unsupported_key",
                _ => "upstream_invalid",
            },
            Error::CertManagerNotInstalled { .. } => "cert_manager_not_installed",
            Error::CertificateRequestForbidden { .. } => "certificate_request_forbidden",
            Error::CertificateRequestPending { .. } => "certificate_request_pending",
            Error::CertificateRequestDenied { .. } => "certificate_request_denied",
            Error::CertificateRequestFailed { .. } => "certificate_request_failed",
            Error::CertificateRequestUnusable { .. } => "certificate_request_unusable",
            Error::CaSecretInvalid { .. } => "ca_secret_invalid",
            Error::KeysUnavailable { .. } => "keys_unavailable",
            Error::BundleConfigMapConflict { .. } => "bundle_configmap_conflict",
            Error::Ca { .. } => "ca",
            Error::JwtKey(_) => "jwt_key",
            Error::Kube(_) => "kube",
            Error::Conflict(_) => "conflict",
            Error::Serialize { .. } => "serialize",
        }
    }

    /// The condition reason for a problem the user can fix; `None` for operational
    /// failures, which are retried rather than reported as a state of the object.
    pub fn condition_reason(&self) -> Option<&'static str> {
        Some(match self {
            Error::InvalidTrustDomain { .. } => "InvalidTrustDomain",
            Error::InvalidSpec { .. } => "InvalidSpec",
            Error::DuplicateTrustDomain { .. } => "DuplicateTrustDomain",
            Error::UpstreamSecretNotFound { .. } => "UpstreamSecretNotFound",
            Error::UpstreamSecretForbidden { .. } => "UpstreamSecretForbidden",
            Error::UpstreamSecretMissingKey { .. } => "UpstreamSecretMissingKey",
            Error::Upstream { source, .. } => match source {
                UpstreamError::NotACa { .. } => "UpstreamNotCA",
                UpstreamError::KeyMismatch => "UpstreamKeyMismatch",
                UpstreamError::Expired { .. } => "UpstreamExpired",
                UpstreamError::ExpiresTooSoon { .. } => "UpstreamExpiresTooSoon",
                UpstreamError::NoRoot | UpstreamError::ChainBroken(_) => "UpstreamChainInvalid",
                UpstreamError::UnsupportedKey { .. } => "UpstreamUnsupportedKey",
                _ => "UpstreamInvalid",
            },
            Error::CertManagerNotInstalled { .. } => "CertManagerNotInstalled",
            Error::CertificateRequestForbidden { .. } => "CertificateRequestForbidden",
            Error::CertificateRequestPending { .. } => "CertificateRequestPending",
            Error::CertificateRequestDenied { .. } => "CertificateRequestDenied",
            Error::CertificateRequestFailed { .. } => "CertificateRequestFailed",
            Error::CertificateRequestUnusable { .. } => "CertificateRequestUnusable",
            Error::CaSecretInvalid { .. } => "CASecretInvalid",
            Error::KeysUnavailable { .. } => "KeysUnavailable",
            Error::BundleConfigMapConflict { .. } => "BundleConfigMapConflict",
            Error::Ca { .. } => "CACreationFailed",
            Error::JwtKey(_) => "JWTKeyCreationFailed",
            Error::Kube(_) | Error::Conflict(_) | Error::Serialize { .. } => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_errors_name_object_field_and_fix() {
        let e = Error::UpstreamSecretMissingKey {
            object: "prod".into(),
            namespace: "pki".into(),
            name: "upstream".into(),
            key: "tls.key".into(),
            field: "privateKeyKey",
            what: "private key",
        };
        let msg = e.to_string();
        assert!(
            msg.contains("TrustDomain prod")
                && msg.contains("secretRef.privateKeyKey")
                && msg.contains("add it")
        );
        assert_eq!(e.condition_reason(), Some("UpstreamSecretMissingKey"));
        assert_eq!(e.metric_label(), "upstream_secret_missing_key");
        let e = Error::Upstream {
            object: "prod".into(),
            namespace: "pki".into(),
            name: "upstream".into(),
            source: UpstreamError::NotACa {
                serial: "01".into(),
            },
        };
        assert_eq!(e.condition_reason(), Some("UpstreamNotCA"));
        assert!(
            Error::Conflict("Secret x".into())
                .condition_reason()
                .is_none()
        );
    }
}
