//! The CA Secret: where a trust domain's keys live, so a restart or a new leader never
//! mints a new root.
//!
//! One Secret per TrustDomain, in the operator's namespace, named
//! [`ca_secret_name`], labelled [`OWNER_LABEL`]`=<TrustDomain name>` and
//! [`COMPONENT_LABEL`]`=ca` (every replica watches that label), owned by the TrustDomain.
//! Its single entry [`STATE_KEY`] is a JSON document: the bundle sequence, the active and
//! prepared CAs and JWT keys with their private keys, and the retired ones with only their
//! public parts (a retired key never signs again, so its private key is not kept).
//!
//! Nothing here logs, and nothing derives `Debug` over key material.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use serde::{Deserialize, Serialize};
use sigil_identity::TrustDomain;
use sigil_identity::bundle::{Jwk, JwtAuthority};
use sigil_identity::ca::CertificateAuthority;
use sigil_identity::jwt::JwtKey;
use sigil_identity::key_manager::{AuthorityKey, KeyManager, KeyReference};
use sigil_identity::keys::PrivateKey;
use sigil_identity::x509::{certs_from_pem, certs_to_pem};
use zeroize::Zeroizing;

use super::rotation::{
    AuthorityState, JwtGeneration, PendingRequest, Retired, Ring, Slot, X509Public,
};
use crate::crd::trust_domain::{COMPONENT_LABEL, OWNER_LABEL, TrustDomain as TrustDomainObject};

/// The Secret entry holding the state document.
pub const STATE_KEY: &str = "authorities.json";
/// Version of the state document.
const FORMAT: u32 = 1;

/// Name of the CA Secret of TrustDomain `object`.
pub fn ca_secret_name(object: &str) -> String {
    crate::crd::prefixed_name("sigil-ca-", object)
}

/// Why a CA Secret could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// A CA Secret whose keys the key manager cannot give (an HSM that is unreachable, or
/// does not hold them): the Secret itself may be fine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeysUnavailable(pub String);

/// Why [`from_secret`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadFailure {
    /// The Secret's content is wrong.
    #[error(transparent)]
    Invalid(#[from] LoadError),
    /// Its keys cannot be had from the key manager.
    #[error(transparent)]
    KeysUnavailable(#[from] KeysUnavailable),
}

fn err(what: impl Into<String>) -> LoadError {
    LoadError(what.into())
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Stored {
    format: u32,
    trust_domain: String,
    sequence: u64,
    /// `spiffe_refresh_hint` (seconds) the sequence was published with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_hint_seconds: Option<u64>,
    x509: StoredRing<StoredCa, StoredRetiredCa>,
    jwt: StoredRing<StoredJwt, StoredRetiredJwt>,
    /// The key of a CA an upstream is asked to sign (cert-manager), and its request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending_request: Option<StoredPendingRequest>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredPendingRequest {
    /// CertificateRequest name.
    name: String,
    /// PKCS#8 PEM of the CSR's software key; empty when a key manager holds it.
    #[serde(default, with = "zeroizing", skip_serializing_if = "is_empty")]
    private_key: Zeroizing<String>,
    /// Where the CSR's key lives when a key manager (an HSM) holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_ref: Option<KeyReference>,
    /// Unix seconds.
    requested_at: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredRing<S, R> {
    #[serde(skip_serializing_if = "Option::is_none")]
    active: Option<S>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prepared: Option<S>,
    #[serde(default = "Vec::new")]
    retired: Vec<R>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredCa {
    /// PEM.
    certificate: String,
    /// PEM of the certificates above it (upstream intermediates); empty for a root.
    #[serde(default)]
    chain: String,
    /// PEM of the bundle anchors.
    trust_anchors: String,
    /// PKCS#8 PEM of a software key; empty when the key lives in a key manager.
    #[serde(default, with = "zeroizing", skip_serializing_if = "is_empty")]
    private_key: Zeroizing<String>,
    /// Where the key lives when a key manager (an HSM) holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_ref: Option<KeyReference>,
    /// Unix seconds.
    published_at: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredRetiredCa {
    certificate: String,
    trust_anchors: String,
    /// A key manager's key, kept (never used) until the generation expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_ref: Option<KeyReference>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredJwt {
    kid: String,
    /// JWS algorithm (`RS256`, `PS256`, ...); absent in documents written before RSA keys,
    /// whose EC keys sign with their curve's one algorithm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alg: Option<String>,
    /// PKCS#8 PEM of a software key; empty when the key lives in a key manager.
    #[serde(default, with = "zeroizing", skip_serializing_if = "is_empty")]
    private_key: Zeroizing<String>,
    /// Where the key lives when a key manager (an HSM) holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_ref: Option<KeyReference>,
    not_before: u64,
    not_after: u64,
    published_at: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredRetiredJwt {
    kid: String,
    jwk: Jwk,
    not_before: u64,
    not_after: u64,
    /// A key manager's key, kept (never used) until the generation expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_ref: Option<KeyReference>,
}

/// Private keys stay in wiped-on-drop buffers through (de)serialisation.
mod zeroizing {
    use serde::{Deserialize, Deserializer, Serializer};
    use zeroize::Zeroizing;

    pub(super) fn serialize<S: Serializer>(v: &Zeroizing<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Zeroizing<String>, D::Error> {
        String::deserialize(d).map(Zeroizing::new)
    }
}

fn is_empty(s: &Zeroizing<String>) -> bool {
    s.is_empty()
}

/// What the Secret keeps of a key: its PKCS#8 PEM (software) or its reference (HSM).
fn persisted(key: &AuthorityKey) -> (Zeroizing<String>, Option<KeyReference>) {
    match key {
        AuthorityKey::Software(k) => (k.to_pkcs8_pem(), None),
        AuthorityKey::External(_) => (Zeroizing::new(String::new()), key.reference().cloned()),
    }
}

/// The key a stored slot names: from its PEM, or from the key manager.
fn restore(
    private_key: &str,
    key_ref: Option<&KeyReference>,
    keys: &dyn KeyManager,
    role: &str,
) -> Result<AuthorityKey, LoadFailure> {
    let bad = |what: String| LoadFailure::Invalid(err(format!("{role}: {what}")));
    match (key_ref, private_key.is_empty()) {
        (Some(r), true) => keys
            .load(r)
            .map_err(|e| KeysUnavailable(format!("{role}: {e}")).into()),
        (None, false) => PrivateKey::from_pem(private_key)
            .map(AuthorityKey::from)
            .map_err(|e| bad(e.to_string())),
        (Some(_), false) => Err(bad("holds both a private key and a key reference".into())),
        (None, true) => Err(bad("holds neither a private key nor a key reference".into())),
    }
}

/// Every key reference `state` holds: its active and prepared keys, the keys of its
/// retired generations until they expire, and the key of a pending CertificateRequest.
/// Keys a key manager holds that are no longer in this set may be destroyed.
pub fn key_references(state: &AuthorityState) -> std::collections::BTreeSet<KeyReference> {
    let x509 = [&state.x509.active, &state.x509.prepared]
        .into_iter()
        .flatten()
        .filter_map(|s| s.key.key().reference().cloned());
    let jwt = [&state.jwt.active, &state.jwt.prepared]
        .into_iter()
        .flatten()
        .filter_map(|s| s.key.key.key().reference().cloned());
    let retired = (state.x509.retired.iter().map(|r| &r.key_ref))
        .chain(state.jwt.retired.iter().map(|r| &r.key_ref))
        .flatten()
        .cloned();
    let pending = state
        .pending_request
        .iter()
        .filter_map(|p| p.key.reference().cloned());
    x509.chain(jwt).chain(retired).chain(pending).collect()
}

fn secs(t: SystemTime) -> u64 {
    sigil_identity::clock::unix_seconds(t) as u64
}

fn time(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

/// Serialises the state into the Secret's data (key material included: this is the one
/// place it may go).
pub fn to_secret_data(
    state: &AuthorityState,
) -> Result<BTreeMap<String, ByteString>, serde_json::Error> {
    let ca = |s: &Slot<CertificateAuthority>| StoredCa {
        certificate: certs_to_pem(&[s.key.certificate()]),
        chain: certs_to_pem(
            &s.key
                .leaf_intermediates()
                .iter()
                .skip(1)
                .collect::<Vec<_>>(),
        ),
        trust_anchors: certs_to_pem(s.key.trust_anchors()),
        private_key: persisted(s.key.key()).0,
        key_ref: persisted(s.key.key()).1,
        published_at: secs(s.published_at),
    };
    let jwt = |s: &Slot<JwtGeneration>| StoredJwt {
        kid: s.key.key.kid().to_owned(),
        alg: Some(s.key.key.alg().name().to_owned()),
        private_key: persisted(s.key.key.key()).0,
        key_ref: persisted(s.key.key.key()).1,
        not_before: secs(s.key.not_before),
        not_after: secs(s.key.key.not_after()),
        published_at: secs(s.published_at),
    };
    let stored = Stored {
        format: FORMAT,
        trust_domain: state.trust_domain.name().to_owned(),
        sequence: state.sequence,
        refresh_hint_seconds: state.refresh_hint.map(|d| d.as_secs()),
        x509: StoredRing {
            active: state.x509.active.as_ref().map(ca),
            prepared: state.x509.prepared.as_ref().map(ca),
            retired: state
                .x509
                .retired
                .iter()
                .map(|r| StoredRetiredCa {
                    certificate: certs_to_pem(&[&r.public.certificate]),
                    trust_anchors: certs_to_pem(&r.public.trust_anchors),
                    key_ref: r.key_ref.clone(),
                })
                .collect(),
        },
        jwt: StoredRing {
            active: state.jwt.active.as_ref().map(jwt),
            prepared: state.jwt.prepared.as_ref().map(jwt),
            retired: state
                .jwt
                .retired
                .iter()
                .map(|r| StoredRetiredJwt {
                    kid: r.id.clone(),
                    jwk: r.public.jwk.clone(),
                    not_before: secs(r.not_before),
                    not_after: secs(r.not_after),
                    key_ref: r.key_ref.clone(),
                })
                .collect(),
        },
        pending_request: state
            .pending_request
            .as_ref()
            .map(|p| StoredPendingRequest {
                name: p.name.clone(),
                private_key: persisted(&p.key).0,
                key_ref: persisted(&p.key).1,
                requested_at: secs(p.requested_at),
            }),
    };
    let json = Zeroizing::new(serde_json::to_vec(&stored)?);
    Ok(BTreeMap::from([(
        STATE_KEY.to_owned(),
        ByteString(json.to_vec()),
    )]))
}

/// Loads the state from a CA Secret's data, checking it belongs to `trust_domain` and that
/// every key matches its certificate.
pub fn from_secret(
    secret: &Secret,
    trust_domain: &TrustDomain,
    keys: &dyn KeyManager,
) -> Result<AuthorityState, LoadFailure> {
    let raw = secret
        .data
        .as_ref()
        .and_then(|d| d.get(STATE_KEY))
        .ok_or_else(|| err(format!("entry {STATE_KEY:?} is missing")))?;
    let stored: Stored = serde_json::from_slice(&raw.0).map_err(|e| {
        err(format!(
            "entry {STATE_KEY:?} is not a Sigil state document: {e}"
        ))
    })?;
    if stored.format != FORMAT {
        return Err(err(format!(
            "state format {} is not supported by this version (expected {FORMAT})",
            stored.format
        ))
        .into());
    }
    if stored.trust_domain != trust_domain.name() {
        return Err(err(format!(
            "it holds keys of trust domain {:?}, not {:?}",
            stored.trust_domain,
            trust_domain.name()
        ))
        .into());
    }
    let ca = |s: &StoredCa, role: &str| -> Result<Slot<CertificateAuthority>, LoadFailure> {
        let bad = |what: String| err(format!("{role} CA: {what}"));
        let cert = certs_from_pem(&s.certificate)
            .map_err(|e| bad(e.to_string()))?
            .remove(0);
        let chain = if s.chain.trim().is_empty() {
            vec![]
        } else {
            certs_from_pem(&s.chain).map_err(|e| bad(e.to_string()))?
        };
        let anchors = certs_from_pem(&s.trust_anchors).map_err(|e| bad(e.to_string()))?;
        let key = restore(
            &s.private_key,
            s.key_ref.as_ref(),
            keys,
            &format!("{role} CA"),
        )?;
        let ca = CertificateAuthority::load(trust_domain.clone(), cert, chain, anchors, key)
            .map_err(|e| bad(e.to_string()))?;
        Ok(Slot {
            key: Arc::new(ca),
            published_at: time(s.published_at),
        })
    };
    let jwt = |s: &StoredJwt, role: &str| -> Result<Slot<JwtGeneration>, LoadFailure> {
        let bad = |what: String| err(format!("{role} JWT key {}: {what}", s.kid));
        let key = restore(
            &s.private_key,
            s.key_ref.as_ref(),
            keys,
            &format!("{role} JWT key {}", s.kid),
        )?;
        let alg = s
            .alg
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: sigil_identity::jwt::JwtError| bad(e.to_string()))?;
        let key = JwtKey::from_key_for(s.kid.clone(), key, alg, time(s.not_after))
            .map_err(|e| bad(e.to_string()))?;
        Ok(Slot {
            key: Arc::new(JwtGeneration {
                key: Arc::new(key),
                not_before: time(s.not_before),
            }),
            published_at: time(s.published_at),
        })
    };
    let mut x509 = Ring {
        active: stored
            .x509
            .active
            .as_ref()
            .map(|s| ca(s, "active"))
            .transpose()?,
        prepared: stored
            .x509
            .prepared
            .as_ref()
            .map(|s| ca(s, "prepared"))
            .transpose()?,
        retired: Vec::new(),
    };
    for r in &stored.x509.retired {
        let cert = certs_from_pem(&r.certificate)
            .map_err(|e| err(format!("retired CA: {e}")))?
            .remove(0);
        let (serial, not_before, not_after) = sigil_identity::x509::cert_summary(&cert)
            .ok_or_else(|| err("retired CA certificate cannot be parsed"))?;
        let trust_anchors = certs_from_pem(&r.trust_anchors)
            .map_err(|e| err(format!("retired CA {serial}: {e}")))?;
        x509.retired.push(Retired {
            id: serial,
            public: X509Public {
                certificate: cert,
                trust_anchors,
            },
            not_before,
            not_after,
            key_ref: r.key_ref.clone(),
        });
    }
    let mut jwt_ring = Ring {
        active: stored
            .jwt
            .active
            .as_ref()
            .map(|s| jwt(s, "active"))
            .transpose()?,
        prepared: stored
            .jwt
            .prepared
            .as_ref()
            .map(|s| jwt(s, "prepared"))
            .transpose()?,
        retired: Vec::new(),
    };
    for r in &stored.jwt.retired {
        jwt_ring.retired.push(Retired {
            id: r.kid.clone(),
            public: JwtAuthority {
                kid: r.kid.clone(),
                jwk: r.jwk.clone(),
            },
            not_before: time(r.not_before),
            not_after: time(r.not_after),
            key_ref: r.key_ref.clone(),
        });
    }
    Ok(AuthorityState {
        trust_domain: trust_domain.clone(),
        sequence: stored.sequence,
        refresh_hint: stored.refresh_hint_seconds.map(Duration::from_secs),
        x509,
        jwt: jwt_ring,
        pending_request: stored
            .pending_request
            .map(|p| -> Result<PendingRequest, LoadFailure> {
                Ok(PendingRequest {
                    key: restore(&p.private_key, p.key_ref.as_ref(), keys, "pending request")?,
                    name: p.name,
                    requested_at: time(p.requested_at),
                })
            })
            .transpose()?,
    })
}

/// A new CA Secret for `owner` holding `state`.
pub fn new_secret(
    owner: &TrustDomainObject,
    namespace: &str,
    state: &AuthorityState,
) -> Result<Secret, serde_json::Error> {
    let name = owner.metadata.name.clone().unwrap_or_default();
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(ca_secret_name(&name)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (OWNER_LABEL.to_owned(), label_value(&name)),
                (COMPONENT_LABEL.to_owned(), "ca".to_owned()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "sigil-operator".to_owned(),
                ),
            ])),
            owner_references: owner_reference(owner).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("sigil.dev/ca".to_owned()),
        data: Some(to_secret_data(state)?),
        ..Default::default()
    })
}

/// The ownerReference that makes the TrustDomain own (and garbage-collect) an object.
pub fn owner_reference(owner: &TrustDomainObject) -> Option<OwnerReference> {
    let mut r = owner.controller_owner_ref(&())?;
    r.block_owner_deletion = Some(false);
    Some(r)
}

/// A label value for an object name (names can be longer than label values may be).
pub fn label_value(name: &str) -> String {
    if name.len() <= 63 {
        name.to_owned()
    } else {
        use sha2::Digest;
        let hash = hex::encode(&sha2::Sha256::digest(name.as_bytes())[..6]);
        format!("{}-{hash}", name[..50].trim_end_matches(['-', '.', '_']))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::crd::trust_domain::TrustDomainSpec;
    use crate::trust_domain::policy::Policy;
    use sigil_identity::key_manager::SoftwareKeys;

    #[test]
    fn a_pending_request_and_its_key_survive_a_round_trip() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut state = AuthorityState::new(td.clone());
        let key = PrivateKey::generate(sigil_identity::keys::KeyType::EcP256).unwrap();
        state.pending_request = Some(PendingRequest {
            name: "sigil-ca-td-0123456789".into(),
            key: PrivateKey::from_pem(&key.to_pkcs8_pem()).unwrap().into(),
            requested_at: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        });
        let secret = Secret {
            data: Some(to_secret_data(&state).unwrap()),
            ..Default::default()
        };
        let back = from_secret(&secret, &td, &sigil_identity::key_manager::SoftwareKeys).unwrap();
        let pending = back.pending_request.unwrap();
        assert_eq!(pending.name, "sigil-ca-td-0123456789");
        assert_eq!(pending.key.fingerprint(), key.fingerprint());
        assert_eq!(
            pending.requested_at,
            UNIX_EPOCH + Duration::from_secs(1_800_000_000)
        );
        assert!(
            !format!("{pending:?}").contains("PRIVATE"),
            "Debug never shows the key"
        );
        // Without one, the document is what it always was.
        let plain = AuthorityState::new(td);
        let data = to_secret_data(&plain).unwrap();
        let text = String::from_utf8(data[STATE_KEY].0.clone()).unwrap();
        assert!(!text.contains("pendingRequest"), "{text}");
    }

    #[test]
    fn round_trip_keeps_every_generation_and_the_sequence() {
        let spec: TrustDomainSpec =
            serde_json::from_value(serde_json::json!({"trustDomain": "example.org"})).unwrap();
        let policy = Policy::from_spec("td", &spec).unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut state = AuthorityState::new(policy.trust_domain.clone());
        state.advance(t0, &policy, None);
        let prepare = state.x509.prepare_at().unwrap();
        state.advance(prepare, &policy, None);
        let activate = state.x509.activate_at(Default::default()).unwrap();
        state.advance(activate, &policy, None);
        assert_eq!(state.x509.retired.len(), 1);
        assert_eq!(state.jwt.retired.len(), 1);

        let secret = Secret {
            data: Some(to_secret_data(&state).unwrap()),
            ..Default::default()
        };
        let back = from_secret(&secret, &policy.trust_domain, &*policy.keys).unwrap();
        assert_eq!(back.sequence, state.sequence);
        assert_eq!(back.bundle(None), state.bundle(None));
        assert_eq!(
            back.x509.active.unwrap().key.serial(),
            state.x509.active.unwrap().key.serial()
        );
        assert_eq!(
            back.jwt.active.unwrap().key.key.kid(),
            state.jwt.active.unwrap().key.key.kid()
        );
        assert_eq!(
            back.x509.retired[0].not_after,
            state.x509.retired[0].not_after
        );
    }

    #[test]
    fn rsa_keys_and_the_jwt_algorithm_survive_the_secret() {
        let spec: TrustDomainSpec = serde_json::from_value(serde_json::json!({
            "trustDomain": "example.org",
            "ca": {"keyType": "RSA-2048"},
            "jwt": {"algorithm": "PS256"},
        }))
        .unwrap();
        let policy = Policy::from_spec("td", &spec).unwrap();
        let mut state = AuthorityState::new(policy.trust_domain.clone());
        state.advance(
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            &policy,
            None,
        );
        let secret = Secret {
            data: Some(to_secret_data(&state).unwrap()),
            ..Default::default()
        };
        let back = from_secret(&secret, &policy.trust_domain, &*policy.keys).unwrap();
        assert_eq!(
            back.x509.active.as_ref().unwrap().key.key_type(),
            sigil_identity::keys::KeyType::Rsa2048
        );
        let jwt = &back.jwt.active.as_ref().unwrap().key.key;
        assert_eq!(jwt.alg(), sigil_identity::jwt::SigningAlg::Ps256);
        assert_eq!(jwt.authority().jwk.alg.as_deref(), Some("PS256"));
        assert_eq!(back.bundle(None), state.bundle(None));
    }

    #[test]
    fn a_key_reference_the_key_manager_cannot_resolve_is_keys_unavailable_not_invalid() {
        let spec: TrustDomainSpec =
            serde_json::from_value(serde_json::json!({"trustDomain": "example.org"})).unwrap();
        let policy = Policy::from_spec("td", &spec).unwrap();
        let mut state = AuthorityState::new(policy.trust_domain.clone());
        state.advance(
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            &policy,
            None,
        );
        let data = to_secret_data(&state).unwrap();
        // The document as the pkcs11 key manager writes it: a reference, no key.
        let mut doc: serde_json::Value = serde_json::from_slice(&data[STATE_KEY].0).unwrap();
        let active = &mut doc["x509"]["active"];
        active.as_object_mut().unwrap().remove("privateKey");
        active["keyRef"] = serde_json::json!({"manager": "pkcs11", "id": "00ff"});
        let secret = Secret {
            data: Some(BTreeMap::from([(
                STATE_KEY.to_owned(),
                ByteString(serde_json::to_vec(&doc).unwrap()),
            )])),
            ..Default::default()
        };
        match from_secret(&secret, &policy.trust_domain, &SoftwareKeys).unwrap_err() {
            LoadFailure::KeysUnavailable(e) => assert!(
                e.0.contains("active CA") && e.0.contains("--key-manager pkcs11"),
                "{e}"
            ),
            other => panic!("{other}"),
        }
        // Both a key and a reference: the document is wrong.
        doc["x509"]["active"]["privateKey"] = serde_json::json!("x");
        let secret = Secret {
            data: Some(BTreeMap::from([(
                STATE_KEY.to_owned(),
                ByteString(serde_json::to_vec(&doc).unwrap()),
            )])),
            ..Default::default()
        };
        assert!(matches!(
            from_secret(&secret, &policy.trust_domain, &SoftwareKeys),
            Err(LoadFailure::Invalid(_))
        ));
    }

    #[test]
    fn foreign_or_corrupt_state_is_refused_with_a_reason() {
        let td = TrustDomain::new("example.org").unwrap();
        let other = TrustDomain::new("other.org").unwrap();
        let state = AuthorityState::new(other);
        let secret = Secret {
            data: Some(to_secret_data(&state).unwrap()),
            ..Default::default()
        };
        assert!(
            from_secret(&secret, &td, &SoftwareKeys)
                .unwrap_err()
                .to_string()
                .contains("other.org")
        );
        let corrupt = Secret {
            data: Some(BTreeMap::from([(
                STATE_KEY.to_owned(),
                ByteString(b"{".to_vec()),
            )])),
            ..Default::default()
        };
        assert!(
            from_secret(&corrupt, &td, &SoftwareKeys)
                .unwrap_err()
                .to_string()
                .contains("not a Sigil state document")
        );
        assert!(
            from_secret(&Secret::default(), &td, &SoftwareKeys)
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
    }

    #[test]
    fn long_names_are_shortened_stably() {
        let long = "a".repeat(300);
        assert!(ca_secret_name(&long).len() <= 253);
        assert_eq!(ca_secret_name(&long), ca_secret_name(&long));
        assert!(label_value(&long).len() <= 63);
        assert_eq!(ca_secret_name("prod"), "sigil-ca-prod");
    }
}
