//! What the signer does with one PodCertificateRequest, decided from what the request
//! says, what the identity index holds of the pod, and the signer's policy. No I/O: the
//! controller (`mod.rs`) gathers the inputs and carries the decision out.
//!
//! Every refusal is a `Denied` condition whose reason is one of the constants below and
//! whose message names the object, the field and the fix. A request is never refused for
//! something that may be informer lag (the pod, its node binding or its ClusterSPIFFEID
//! not seen yet) until it is older than the grace period: until then it waits.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::PodCertificateRequestSpec;
use sigil_api::pod_certificates::{HINT_ANNOTATION, signer_name};
use sigil_identity::TrustDomain;
use sigil_identity::entry::RegistrationEntry;
use sigil_index::PodIdentities;
use x509_parser::prelude::{FromDer, X509CertificationRequest};
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The shortest certificate the API server accepts for a pod (and the kubelet asks for).
pub const MIN_LIFETIME: Duration = Duration::from_secs(3600);
/// `spec.maxExpirationSeconds` when the request has none (the API server's default).
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(86_400);

/// `Denied` reasons (the `UnsupportedKeyType` name is the one the API documents).
pub mod reason {
    /// The signer name is Sigil's but no TrustDomain of that name is loaded.
    pub const UNKNOWN_SIGNER: &str = "UnknownSigner";
    /// `spec.unverifiedUserAnnotations` holds a key the signer does not know.
    pub const UNSUPPORTED_ANNOTATION: &str = "UnsupportedUserAnnotation";
    /// The key type is not allowed by the signer.
    pub const UNSUPPORTED_KEY_TYPE: &str = "UnsupportedKeyType";
    /// The stub CSR does not parse or its signature is wrong.
    pub const INVALID_REQUEST: &str = "InvalidRequest";
    /// The public key was already certified for another request.
    pub const KEY_REUSED: &str = "KeyReused";
    /// The pod named does not exist (any more).
    pub const POD_NOT_FOUND: &str = "PodNotFound";
    /// The pod exists but its UID, node or service account differ from the request's.
    pub const POD_MISMATCH: &str = "PodMismatch";
    /// The node's UID differs from the request's.
    pub const NODE_MISMATCH: &str = "NodeMismatch";
    /// The pod has finished (Succeeded or Failed).
    pub const POD_NOT_RUNNING: &str = "PodNotRunning";
    /// No ClusterSPIFFEID of the signer's TrustDomain selects the pod.
    pub const NO_IDENTITY: &str = "NoIdentity";
    /// The `sigil.dev/hint` annotation names no identity of the pod.
    pub const UNKNOWN_HINT: &str = "UnknownHint";
}

/// The message of a `KeyReused` denial.
pub const KEY_REUSED_MESSAGE: &str = "spec.stubPKCS10Request: this public key was already \
     certified for another PodCertificateRequest; a replayed request is refused, and the \
     kubelet makes a new key for every request";

/// The key types the kubelet can generate (`podCertificate.keyType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyType {
    /// RSA, 3072-bit modulus.
    Rsa3072,
    /// RSA, 4096-bit modulus.
    Rsa4096,
    /// ECDSA on P-256.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// ECDSA on P-521.
    EcdsaP521,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    /// Every key type, in the order of the API's documentation.
    pub const ALL: [KeyType; 6] = [
        KeyType::Rsa3072,
        KeyType::Rsa4096,
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::EcdsaP521,
        KeyType::Ed25519,
    ];

    /// What Sigil allows unless told otherwise: the keys every SPIFFE library and rustls
    /// handle. RSA can be allowed with `--pod-certificate-key-types`; P-521 has no
    /// verifier in rustls or ring.
    pub const DEFAULT_ALLOWED: [KeyType; 3] =
        [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Ed25519];

    /// The name in `podCertificate.keyType`.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Rsa3072 => "RSA3072",
            KeyType::Rsa4096 => "RSA4096",
            KeyType::EcdsaP256 => "ECDSAP256",
            KeyType::EcdsaP384 => "ECDSAP384",
            KeyType::EcdsaP521 => "ECDSAP521",
            KeyType::Ed25519 => "ED25519",
        }
    }

    /// Reads a `podCertificate.keyType` name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The key type of a SubjectPublicKeyInfo, or what it is instead.
    pub fn of_spki(spki_der: &[u8]) -> Result<Self, String> {
        let (_, spki) = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| format!("the public key does not parse: {e}"))?;
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => match rsa.key_size() {
                3072 => Ok(KeyType::Rsa3072),
                4096 => Ok(KeyType::Rsa4096),
                bits => Err(format!("an RSA key of {bits} bits")),
            },
            Ok(PublicKey::EC(_)) => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|o| o.to_id_string())
                    .unwrap_or_default();
                match curve.as_str() {
                    "1.2.840.10045.3.1.7" => Ok(KeyType::EcdsaP256),
                    "1.3.132.0.34" => Ok(KeyType::EcdsaP384),
                    "1.3.132.0.35" => Ok(KeyType::EcdsaP521),
                    other => Err(format!("an EC key on curve {other}")),
                }
            }
            _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => Ok(KeyType::Ed25519),
            _ => Err(format!(
                "a key of algorithm {}",
                spki.algorithm.algorithm.to_id_string()
            )),
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The signer's rules.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Key types it certifies.
    pub key_types: BTreeSet<KeyType>,
    /// How long a request waits for the index to see its pod, the pod's node binding
    /// and a ClusterSPIFFEID for it, before it is denied.
    pub grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            key_types: KeyType::DEFAULT_ALLOWED.into_iter().collect(),
            grace: Duration::from_secs(10),
        }
    }
}

/// One request, as the signer reads it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The request's namespace (the pod's).
    pub namespace: &'a str,
    /// The request's name.
    pub name: &'a str,
    /// TrustDomain object named by the signer name.
    pub trust_domain_object: &'a str,
    /// What it asks for.
    pub spec: &'a PodCertificateRequestSpec,
    /// Time since it was created.
    pub age: Duration,
}

/// What to do with a request.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Sign `spki` for `entry`, valid for `lifetime`.
    Issue {
        /// The identity the certificate carries.
        entry: Arc<RegistrationEntry>,
        /// The kubelet's public key (SubjectPublicKeyInfo DER).
        spki: Vec<u8>,
        /// Lifetime to sign for (at least [`MIN_LIFETIME`]).
        lifetime: Duration,
    },
    /// Refuse for good: the `Denied` condition.
    Deny {
        /// Condition reason ([`reason`]).
        reason: &'static str,
        /// What a user reads: the object, the field, the fix.
        message: String,
    },
    /// Look again shortly.
    Wait {
        /// Why (logged at debug).
        why: String,
    },
}

fn deny(reason: &'static str, message: String) -> Decision {
    Decision::Deny { reason, message }
}

/// Decides `req`. `trust_domain` is the trust domain of the TrustDomain object its signer
/// names (`None`: no such object is loaded); `pod` is what the index holds under the
/// request's pod name; `key_certified` says whether a key was already certified for
/// another request.
pub fn decide(
    req: &Request<'_>,
    trust_domain: Option<&TrustDomain>,
    pod: Option<&PodIdentities>,
    policy: &Policy,
    key_certified: impl Fn(&[u8]) -> bool,
) -> Decision {
    let spec = req.spec;
    let pod_ref = format!("{}/{}", req.namespace, spec.pod_name);
    let in_grace = req.age < policy.grace;
    let or_wait = |reason: &'static str, message: String| {
        if in_grace {
            Decision::Wait { why: message }
        } else {
            deny(reason, message)
        }
    };

    let Some(td) = trust_domain else {
        return or_wait(
            reason::UNKNOWN_SIGNER,
            format!(
                "spec.signerName {}: no TrustDomain named {:?} is loaded by Sigil's operator; \
                 check `kubectl get trustdomain {}` and use signerName sigil.dev/<TrustDomain name>",
                spec.signer_name, req.trust_domain_object, req.trust_domain_object
            ),
        );
    };

    let hint = match annotations(spec) {
        Ok(hint) => hint,
        Err(message) => return deny(reason::UNSUPPORTED_ANNOTATION, message),
    };

    let spki = match check_key(spec.stub_pkc_s10_request.0.as_slice(), policy) {
        Ok(spki) => spki,
        Err(d) => return d,
    };
    if key_certified(&spki) {
        return deny(reason::KEY_REUSED, KEY_REUSED_MESSAGE.into());
    }

    let Some(pod) = pod else {
        return or_wait(
            reason::POD_NOT_FOUND,
            format!(
                "spec.podName: pod {pod_ref} does not exist; the request may outlive a deleted pod"
            ),
        );
    };
    let facts = &pod.facts;
    if facts.uid != spec.pod_uid {
        return or_wait(
            reason::POD_MISMATCH,
            format!(
                "spec.podUID {} is not the UID of pod {pod_ref} ({}): the request is for an \
                 earlier pod of that name (replayed, or the pod was recreated)",
                spec.pod_uid, facts.uid
            ),
        );
    }
    if facts.node.as_deref() != Some(spec.node_name.as_str()) {
        return or_wait(
            reason::POD_MISMATCH,
            format!(
                "spec.nodeName {}: pod {pod_ref} runs on {}; only the pod's own node may ask \
                 for its certificate",
                spec.node_name,
                facts.node.as_deref().unwrap_or("no node yet")
            ),
        );
    }
    if let Some(uid) = &pod.node_uid
        && *uid != spec.node_uid
    {
        return deny(
            reason::NODE_MISMATCH,
            format!(
                "spec.nodeUID {} is not the UID of node {} ({uid}): the node was replaced",
                spec.node_uid, spec.node_name
            ),
        );
    }
    if facts.service_account != spec.service_account_name {
        return deny(
            reason::POD_MISMATCH,
            format!(
                "spec.serviceAccountName {}: pod {pod_ref} runs as service account {}",
                spec.service_account_name, facts.service_account
            ),
        );
    }
    if facts.terminal {
        return deny(
            reason::POD_NOT_RUNNING,
            format!("pod {pod_ref} has finished; finished pods get no certificates"),
        );
    }

    let candidates: Vec<&Arc<RegistrationEntry>> = pod
        .entries
        .iter()
        .filter(|e| e.spiffe_id.trust_domain() == td)
        .collect();
    if candidates.is_empty() {
        let elsewhere: BTreeSet<String> = pod
            .entries
            .iter()
            .map(|e| e.spiffe_id.trust_domain().to_string())
            .collect();
        let also = if elsewhere.is_empty() {
            String::new()
        } else {
            format!(
                " (it has identities in trust domain(s) {}, which other TrustDomains' signers issue)",
                elsewhere.into_iter().collect::<Vec<_>>().join(", ")
            )
        };
        return or_wait(
            reason::NO_IDENTITY,
            format!(
                "no ClusterSPIFFEID of TrustDomain {} (trust domain {td}) selects pod {pod_ref}{also}; \
                 `sigil explain pod {pod_ref}` says why, and a ClusterSPIFFEID whose selectors match \
                 the pod gives it one",
                req.trust_domain_object
            ),
        );
    }
    let entry = match hint {
        None => candidates[0],
        Some(h) => match candidates.iter().find(|e| e.hint == h) {
            Some(e) => e,
            None => {
                let hints: Vec<String> = candidates
                    .iter()
                    .map(|e| format!("{:?} ({})", e.hint, e.spiffe_id))
                    .collect();
                return deny(
                    reason::UNKNOWN_HINT,
                    format!(
                        "spec.unverifiedUserAnnotations[{HINT_ANNOTATION}] is {h:?}, but pod {pod_ref}'s \
                         identities of signer {} have hints {}; set the annotation to one of them, \
                         or remove it for the default",
                        signer_name(req.trust_domain_object),
                        hints.join(", ")
                    ),
                );
            }
        },
    };
    let max = spec
        .max_expiration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(DEFAULT_MAX_LIFETIME, Duration::from_secs);
    let lifetime = entry.x509_ttl.max(MIN_LIFETIME).min(max.max(MIN_LIFETIME));
    Decision::Issue {
        entry: Arc::clone(entry),
        spki,
        lifetime,
    }
}

/// The hint asked for, or why the annotations are refused.
fn annotations(spec: &PodCertificateRequestSpec) -> Result<Option<&str>, String> {
    let Some(map) = &spec.unverified_user_annotations else {
        return Ok(None);
    };
    let unknown: Vec<&str> = map
        .keys()
        .map(String::as_str)
        .filter(|k| *k != HINT_ANNOTATION)
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "spec.unverifiedUserAnnotations: Sigil's signer reads only {HINT_ANNOTATION}, and \
             refuses what it does not know: remove {} from the pod's podCertificate userAnnotations",
            unknown.join(", ")
        ));
    }
    Ok(map.get(HINT_ANNOTATION).map(String::as_str))
}

/// The SubjectPublicKeyInfo (DER) a stub CSR carries, read without checking its
/// signature: for comparing keys of requests that were verified when they were answered.
pub fn stub_public_key(
    csr_der: &[u8],
) -> Result<&[u8], x509_parser::nom::Err<x509_parser::error::X509Error>> {
    let (_, csr) = X509CertificationRequest::from_der(csr_der)?;
    Ok(csr.certification_request_info.subject_pki.raw)
}

/// The key to certify, after its type is checked against the policy and the stub CSR's
/// self-signature is verified.
fn check_key(csr_der: &[u8], policy: &Policy) -> Result<Vec<u8>, Decision> {
    let invalid = |why: String| {
        deny(
            reason::INVALID_REQUEST,
            format!("spec.stubPKCS10Request: {why}"),
        )
    };
    let spki_der =
        stub_public_key(csr_der).map_err(|e| invalid(format!("not a PKCS#10 request: {e}")))?;
    let allowed = || {
        policy
            .key_types
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match KeyType::of_spki(spki_der) {
        Ok(k) if policy.key_types.contains(&k) => {}
        found => {
            let found = match found {
                Ok(k) => k.name().to_owned(),
                Err(what) => what,
            };
            return Err(deny(
                reason::UNSUPPORTED_KEY_TYPE,
                format!(
                    "keyType {found} is not allowed by Sigil's signer; set the pod's \
                     podCertificate keyType to ECDSAP256 (allowed: {})",
                    allowed()
                ),
            ));
        }
    }
    sigil_identity::x509::parse_csr_public_key(csr_der)
        .map_err(|e| invalid(format!("proof of possession failed: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use sigil_identity::SpiffeId;
    use sigil_index::PodFacts;

    fn csr(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::default();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    fn spec(csr: Vec<u8>) -> PodCertificateRequestSpec {
        PodCertificateRequestSpec {
            signer_name: "sigil.dev/prod".into(),
            pod_name: "web".into(),
            pod_uid: "uid-1".into(),
            node_name: "node-a".into(),
            node_uid: "node-uid-a".into(),
            service_account_name: "web".into(),
            service_account_uid: "sa-uid".into(),
            stub_pkc_s10_request: ByteString(csr),
            max_expiration_seconds: None,
            unverified_user_annotations: None,
        }
    }

    fn entry(id: &str, spiffe_id: &str, hint: &str, ttl: u64) -> Arc<RegistrationEntry> {
        let mut e = RegistrationEntry::new(id, SpiffeId::parse(spiffe_id).unwrap(), Vec::new());
        e.hint = hint.into();
        e.x509_ttl = Duration::from_secs(ttl);
        Arc::new(e)
    }

    fn pod(entries: Vec<Arc<RegistrationEntry>>) -> PodIdentities {
        let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "apps", "uid": "uid-1"},
            "spec": {"serviceAccountName": "web", "nodeName": "node-a", "containers": []},
        }))
        .unwrap();
        PodIdentities {
            facts: PodFacts::new(&p).unwrap(),
            node_uid: Some("node-uid-a".into()),
            entries,
        }
    }

    fn run(spec: &PodCertificateRequestSpec, pod: Option<&PodIdentities>, age: u64) -> Decision {
        let td = TrustDomain::new("prod.example").unwrap();
        let req = Request {
            namespace: "apps",
            name: "req-1",
            trust_domain_object: "prod",
            spec,
            age: Duration::from_secs(age),
        };
        decide(&req, Some(&td), pod, &Policy::default(), |_| false)
    }

    fn denied(d: Decision) -> (&'static str, String) {
        match d {
            Decision::Deny { reason, message } => (reason, message),
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    #[test]
    fn the_default_identity_is_the_first_the_workload_api_would_serve() {
        let s = spec(csr(&rcgen::PKCS_ECDSA_P256_SHA256));
        let p = pod(vec![
            entry("a", "spiffe://prod.example/a", "", 600),
            entry("b", "spiffe://prod.example/b", "b", 7200),
        ]);
        match run(&s, Some(&p), 60) {
            Decision::Issue {
                entry, lifetime, ..
            } => {
                assert_eq!(entry.spiffe_id.as_str(), "spiffe://prod.example/a");
                // 10 minutes is below the 1 hour pod certificates must live.
                assert_eq!(lifetime, MIN_LIFETIME);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_hint_picks_an_identity_and_an_unknown_hint_is_denied_with_the_choices() {
        let mut s = spec(csr(&rcgen::PKCS_ECDSA_P256_SHA256));
        s.max_expiration_seconds = Some(5400);
        let p = pod(vec![
            entry("a", "spiffe://prod.example/a", "", 600),
            entry("b", "spiffe://prod.example/b", "db", 86_400),
        ]);
        s.unverified_user_annotations = Some([(HINT_ANNOTATION.into(), "db".into())].into());
        match run(&s, Some(&p), 60) {
            Decision::Issue {
                entry, lifetime, ..
            } => {
                assert_eq!(entry.spiffe_id.as_str(), "spiffe://prod.example/b");
                assert_eq!(
                    lifetime,
                    Duration::from_secs(5400),
                    "maxExpirationSeconds caps"
                );
            }
            other => panic!("{other:?}"),
        }
        s.unverified_user_annotations = Some([(HINT_ANNOTATION.into(), "cache".into())].into());
        let (reason, message) = denied(run(&s, Some(&p), 60));
        assert_eq!(reason, reason::UNKNOWN_HINT);
        assert!(
            message.contains("\"db\" (spiffe://prod.example/b)"),
            "{message}"
        );
    }

    #[test]
    fn unknown_annotations_are_refused() {
        let mut s = spec(csr(&rcgen::PKCS_ECDSA_P256_SHA256));
        s.unverified_user_annotations = Some([("example.com/x".into(), "1".into())].into());
        let p = pod(vec![entry("a", "spiffe://prod.example/a", "", 3600)]);
        let (reason, message) = denied(run(&s, Some(&p), 60));
        assert_eq!(reason, reason::UNSUPPORTED_ANNOTATION);
        assert!(message.contains("example.com/x"), "{message}");
    }

    #[test]
    fn key_types_outside_the_policy_are_denied_with_the_api_reason() {
        let p = pod(vec![entry("a", "spiffe://prod.example/a", "", 3600)]);
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            assert!(matches!(
                run(&spec(csr(alg)), Some(&p), 60),
                Decision::Issue { .. }
            ));
        }
        let td = TrustDomain::new("prod.example").unwrap();
        let s = spec(csr(&rcgen::PKCS_ED25519));
        let req = Request {
            namespace: "apps",
            name: "req-1",
            trust_domain_object: "prod",
            spec: &s,
            age: Duration::from_secs(60),
        };
        let policy = Policy {
            key_types: [KeyType::EcdsaP256].into(),
            ..Policy::default()
        };
        let (reason, message) = denied(decide(&req, Some(&td), Some(&p), &policy, |_| false));
        assert_eq!(reason, reason::UNSUPPORTED_KEY_TYPE);
        assert!(
            message.contains("ED25519") && message.contains("ECDSAP256"),
            "{message}"
        );
    }

    #[test]
    fn a_forged_proof_of_possession_is_refused() {
        let mut der = csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let last = der.len() - 3;
        der[last] ^= 0x55;
        let p = pod(vec![entry("a", "spiffe://prod.example/a", "", 3600)]);
        let (reason, _) = denied(run(&spec(der), Some(&p), 60));
        assert_eq!(reason, reason::INVALID_REQUEST);
    }

    #[test]
    fn pod_node_and_account_must_match_and_lag_is_waited_out() {
        let p = pod(vec![entry("a", "spiffe://prod.example/a", "", 3600)]);
        let base = spec(csr(&rcgen::PKCS_ECDSA_P256_SHA256));
        let cases: Vec<(PodCertificateRequestSpec, &str, bool)> = vec![
            (
                PodCertificateRequestSpec {
                    pod_uid: "uid-0".into(),
                    ..base.clone()
                },
                reason::POD_MISMATCH,
                true,
            ),
            (
                PodCertificateRequestSpec {
                    node_name: "node-b".into(),
                    ..base.clone()
                },
                reason::POD_MISMATCH,
                true,
            ),
            (
                PodCertificateRequestSpec {
                    node_uid: "other".into(),
                    ..base.clone()
                },
                reason::NODE_MISMATCH,
                false,
            ),
            (
                PodCertificateRequestSpec {
                    service_account_name: "admin".into(),
                    ..base.clone()
                },
                reason::POD_MISMATCH,
                false,
            ),
        ];
        for (s, want, waits) in cases {
            let (reason, _) = denied(run(&s, Some(&p), 60));
            assert_eq!(reason, want, "{s:?}");
            assert_eq!(
                matches!(run(&s, Some(&p), 1), Decision::Wait { .. }),
                waits,
                "{s:?}"
            );
        }
        assert!(matches!(run(&base, None, 1), Decision::Wait { .. }));
        assert_eq!(denied(run(&base, None, 60)).0, reason::POD_NOT_FOUND);
    }

    #[test]
    fn a_pod_without_an_identity_of_this_trust_domain_is_denied_with_what_it_has() {
        let s = spec(csr(&rcgen::PKCS_ECDSA_P256_SHA256));
        let p = pod(vec![entry("a", "spiffe://other.example/a", "", 3600)]);
        assert!(matches!(run(&s, Some(&p), 1), Decision::Wait { .. }));
        let (reason, message) = denied(run(&s, Some(&p), 60));
        assert_eq!(reason, reason::NO_IDENTITY);
        assert!(
            message.contains("other.example") && message.contains("sigil explain pod apps/web"),
            "{message}"
        );
    }

    #[test]
    fn a_key_certified_before_is_refused() {
        let s = spec(csr(&rcgen::PKCS_ECDSA_P256_SHA256));
        let p = pod(vec![entry("a", "spiffe://prod.example/a", "", 3600)]);
        let td = TrustDomain::new("prod.example").unwrap();
        let req = Request {
            namespace: "apps",
            name: "req-2",
            trust_domain_object: "prod",
            spec: &s,
            age: Duration::from_secs(60),
        };
        let (reason, _) = denied(decide(
            &req,
            Some(&td),
            Some(&p),
            &Policy::default(),
            |_| true,
        ));
        assert_eq!(reason, reason::KEY_REUSED);
    }

    #[test]
    fn an_unknown_signer_waits_then_is_denied() {
        let s = spec(csr(&rcgen::PKCS_ECDSA_P256_SHA256));
        let req = |age| Request {
            namespace: "apps",
            name: "req-1",
            trust_domain_object: "nope",
            spec: &s,
            age: Duration::from_secs(age),
        };
        assert!(matches!(
            decide(&req(1), None, None, &Policy::default(), |_| false),
            Decision::Wait { .. }
        ));
        let (reason, message) = denied(decide(&req(60), None, None, &Policy::default(), |_| false));
        assert_eq!(reason, reason::UNKNOWN_SIGNER);
        assert!(
            message.contains("kubectl get trustdomain nope"),
            "{message}"
        );
    }

    #[test]
    fn key_types_are_read_from_the_key() {
        for (alg, want) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, KeyType::EcdsaP256),
            (&rcgen::PKCS_ECDSA_P384_SHA384, KeyType::EcdsaP384),
            (&rcgen::PKCS_ED25519, KeyType::Ed25519),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            assert_eq!(
                KeyType::of_spki(rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()),
                Ok(want)
            );
        }
        for k in KeyType::ALL {
            assert_eq!(KeyType::from_name(k.name()), Some(k));
        }
    }
}
