//! A TrustDomain's spec, checked and converted into the values the CA, the rotation and
//! the publisher use. Admission already rejects most bad input; this catches the rest
//! (and anything written before the CRD had a rule) with the same kind of message.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::core::Selector;
use sigil_identity::TrustDomain;
use sigil_identity::ca::{CaError, CaSubject};
use sigil_identity::jwt::SigningAlg;
use sigil_identity::keys::KeyType;

use super::error::Error;
use crate::crd::trust_domain::{
    CaKeyType, CertManagerUpstream, GoDuration, JwtAlgorithm, JwtKeyType, JwtSpec,
    TrustDomain as TrustDomainObject, TrustDomainSpec, UpstreamSecretRef,
};
use crate::keys::Keys;

/// What a TrustDomain asks for, validated.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The TrustDomain's `metadata.name` (for messages).
    pub object: String,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Default X509-SVID lifetime.
    pub x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime.
    pub jwt_svid_ttl: Duration,
    /// CA (and JWT key) lifetime.
    pub ca_ttl: Duration,
    /// CA key algorithm.
    pub ca_key_type: KeyType,
    /// CA subject.
    pub ca_subject: CaSubject,
    /// Propagation delay before a prepared generation activates; `None` = ttl/3.
    pub activation_delay: Option<Duration>,
    /// JWT key algorithm.
    pub jwt_key_type: KeyType,
    /// JWS algorithm of JWT-SVIDs (fits `jwt_key_type`).
    pub jwt_alg: SigningAlg,
    /// `iss` of JWT-SVIDs.
    pub jwt_issuer: Option<String>,
    /// Upstream CA Secret, if any.
    pub upstream: Option<UpstreamSecretRef>,
    /// cert-manager issuer that signs the CA, if any (never together with `upstream`).
    pub cert_manager: Option<CertManagerUpstream>,
    /// Name of the bundle ConfigMaps.
    pub config_map_name: String,
    /// Which namespaces get them (`None`: all).
    pub namespace_selector: Option<Selector>,
    /// `spiffe_refresh_hint`.
    pub refresh_hint: Duration,
    /// Where new CA and JWT keys are made, and stored ones found (the operator's
    /// `--key-manager`; software unless [`Policy::with_keys`] says otherwise).
    pub keys: Keys,
}

impl Policy {
    /// Checks `spec` of TrustDomain `object`.
    pub fn from_spec(object: &str, spec: &TrustDomainSpec) -> Result<Self, Error> {
        let trust_domain =
            TrustDomain::new(&spec.trust_domain).map_err(|source| Error::InvalidTrustDomain {
                object: object.to_owned(),
                value: spec.trust_domain.clone(),
                source,
            })?;
        let duration = |field: &str, d: &GoDuration| {
            d.to_std().map_err(|reason| Error::InvalidSpec {
                object: object.to_owned(),
                field: field.to_owned(),
                reason,
            })
        };
        let ca_ttl = duration("spec.ca.ttl", &spec.ca.ttl)?;
        if ca_ttl < Duration::from_secs(60) {
            return Err(Error::InvalidSpec {
                object: object.to_owned(),
                field: "spec.ca.ttl".into(),
                reason: format!("{} is shorter than the minimum of 1m", spec.ca.ttl),
            });
        }
        let activation_delay = spec
            .ca
            .activation_delay
            .as_ref()
            .map(|d| duration("spec.ca.activationDelay", d))
            .transpose()?;
        if let Some(d) = activation_delay
            && d * 2 >= ca_ttl
        {
            return Err(Error::InvalidSpec {
                object: object.to_owned(),
                field: "spec.ca.activationDelay".into(),
                reason: format!(
                    "{} is not shorter than half of spec.ca.ttl ({}): the next CA is prepared at half-life and must start signing before the current one expires; lower activationDelay or raise ttl",
                    spec.ca
                        .activation_delay
                        .as_ref()
                        .map(|d| d.0.as_str())
                        .unwrap_or_default(),
                    spec.ca.ttl
                ),
            });
        }
        let namespace_selector = spec
            .bundle
            .namespace_selector
            .clone()
            .map(Selector::try_from)
            .transpose()
            .map_err(|e| Error::InvalidSpec {
                object: object.to_owned(),
                field: "spec.bundle.namespaceSelector".into(),
                reason: format!("{e}; use the operators In, NotIn, Exists or DoesNotExist"),
            })?;
        let (jwt_key_type, jwt_alg) = jwt_keys(&spec.jwt).map_err(|reason| Error::InvalidSpec {
            object: object.to_owned(),
            field: "spec.jwt.algorithm".into(),
            reason,
        })?;
        Ok(Self {
            object: object.to_owned(),
            trust_domain,
            x509_svid_ttl: duration("spec.x509SVIDTTL", &spec.x509_svid_ttl)?,
            jwt_svid_ttl: duration("spec.jwtSVIDTTL", &spec.jwt_svid_ttl)?,
            ca_ttl,
            ca_key_type: match spec.ca.key_type {
                CaKeyType::EcdsaP256 => KeyType::EcP256,
                CaKeyType::EcdsaP384 => KeyType::EcP384,
                CaKeyType::Ed25519 => KeyType::Ed25519,
                CaKeyType::Rsa2048 => KeyType::Rsa2048,
                CaKeyType::Rsa3072 => KeyType::Rsa3072,
                CaKeyType::Rsa4096 => KeyType::Rsa4096,
            },
            ca_subject: CaSubject {
                organization: spec.ca.subject.organization.clone(),
                country: spec.ca.subject.country.clone(),
                common_name: spec.ca.subject.common_name.clone(),
            },
            activation_delay,
            jwt_key_type,
            jwt_alg,
            jwt_issuer: spec.jwt.issuer.clone(),
            upstream: spec
                .upstream_authority
                .as_ref()
                .and_then(|u| u.secret_ref.clone()),
            cert_manager: spec
                .upstream_authority
                .as_ref()
                .and_then(|u| u.cert_manager.clone()),
            config_map_name: spec.bundle.config_map_name.clone(),
            namespace_selector,
            refresh_hint: duration("spec.bundle.refreshHint", &spec.bundle.refresh_hint)?,
            keys: Keys::default(),
        })
    }

    /// The same policy, making and finding keys with `keys`.
    pub fn with_keys(mut self, keys: Keys) -> Self {
        self.keys = keys;
        self
    }

    /// Wraps a CA creation error with this object's context; upstream problems keep their
    /// own variant so they get their own condition reason.
    pub fn ca_error(&self, e: CaError) -> Error {
        match (e, &self.upstream) {
            (CaError::Upstream(source), Some(r)) => Error::Upstream {
                object: self.object.clone(),
                namespace: r.namespace.clone().unwrap_or_default(),
                name: r.name.clone(),
                source,
            },
            (source, _) => Error::Ca {
                object: self.object.clone(),
                source,
            },
        }
    }
}

/// The JWT key type and algorithm `jwt` asks for: each defaults to what fits the other
/// (RS256 and PS256 get RSA-2048 keys, RSA keys sign RS256), and both default to ECDSA-P256
/// with ES256, today's behaviour. Admission refuses a pair that does not fit; this catches
/// an object written before that rule.
fn jwt_keys(jwt: &JwtSpec) -> Result<(KeyType, SigningAlg), String> {
    let alg = jwt.algorithm.map(|a| match a {
        JwtAlgorithm::ES256 => SigningAlg::Es256,
        JwtAlgorithm::ES384 => SigningAlg::Es384,
        JwtAlgorithm::RS256 => SigningAlg::Rs256,
        JwtAlgorithm::PS256 => SigningAlg::Ps256,
    });
    let key_type = match (jwt.key_type, alg) {
        (Some(JwtKeyType::EcdsaP256), _) | (None, None | Some(SigningAlg::Es256)) => {
            KeyType::EcP256
        }
        (Some(JwtKeyType::EcdsaP384), _) | (None, Some(SigningAlg::Es384)) => KeyType::EcP384,
        (Some(JwtKeyType::Rsa2048), _) | (None, Some(_)) => KeyType::Rsa2048,
        (Some(JwtKeyType::Rsa3072), _) => KeyType::Rsa3072,
        (Some(JwtKeyType::Rsa4096), _) => KeyType::Rsa4096,
    };
    let alg = match alg {
        Some(a) if a.fits(key_type) => a,
        Some(a) => {
            return Err(format!(
                "{a} does not fit spec.jwt.keyType {key_type}: ES256 needs ECDSA-P256, ES384 needs ECDSA-P384, RS256 and PS256 need RSA-2048, RSA-3072 or RSA-4096; change one of them, or remove keyType to get the algorithm's default key"
            ));
        }
        None => SigningAlg::default_for(key_type).unwrap_or(SigningAlg::Es256),
    };
    Ok((key_type, alg))
}

/// The older TrustDomain that owns `obj`'s trust domain name, when `obj` is a duplicate.
/// Ownership goes to the oldest object (by creation time, then name), so the one that has
/// been issuing keeps issuing and the newcomer gets the error.
pub fn duplicate_owner(obj: &TrustDomainObject, all: &[Arc<TrustDomainObject>]) -> Option<String> {
    let key = |o: &TrustDomainObject| (o.metadata.creation_timestamp.clone(), o.name_any());
    let mine = key(obj);
    all.iter()
        .filter(|o| o.spec.trust_domain == obj.spec.trust_domain && o.name_any() != obj.name_any())
        .filter(|o| key(o) < mine)
        .min_by_key(|o| key(o))
        .map(|o| o.name_any())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> TrustDomainSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn malformed_trust_domain_is_reported_with_its_reason() {
        for bad in [
            "Example.org",
            "example.org:8443",
            "example.org/path",
            "spiffe://example.org",
        ] {
            let e = Policy::from_spec("td1", &spec(serde_json::json!({"trustDomain": bad})))
                .unwrap_err();
            assert_eq!(e.condition_reason(), Some("InvalidTrustDomain"), "{bad}");
            assert!(e.to_string().contains("spec.trustDomain"));
        }
    }

    #[test]
    fn activation_delay_must_be_under_half_the_ttl() {
        let e = Policy::from_spec(
            "td1",
            &spec(serde_json::json!({"trustDomain": "example.org", "ca": {"ttl": "2h", "activationDelay": "1h"}})),
        )
        .unwrap_err();
        assert_eq!(e.condition_reason(), Some("InvalidSpec"));
        assert!(e.to_string().contains("spec.ca.activationDelay"));
    }

    #[test]
    fn bad_duration_names_the_field() {
        let e = Policy::from_spec(
            "td1",
            &spec(serde_json::json!({"trustDomain": "example.org", "x509SVIDTTL": "1d"})),
        )
        .unwrap_err();
        assert!(e.to_string().contains("spec.x509SVIDTTL"), "{e}");
    }

    #[test]
    fn the_older_of_two_duplicates_owns_the_name() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let make = |name: &str, secs: i64| {
            let mut o = TrustDomainObject::new(
                name,
                spec(serde_json::json!({"trustDomain": "example.org"})),
            );
            o.metadata.creation_timestamp = Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(secs).unwrap(),
            ));
            Arc::new(o)
        };
        let (old, new, other) = (make("b-old", 100), make("a-new", 200), {
            let mut o = (*make("c", 50)).clone();
            o.spec.trust_domain = "other.org".into();
            Arc::new(o)
        });
        let all = vec![old.clone(), new.clone(), other.clone()];
        assert_eq!(duplicate_owner(&new, &all), Some("b-old".into()));
        assert_eq!(duplicate_owner(&old, &all), None);
        assert_eq!(duplicate_owner(&other, &all), None);
    }

    #[test]
    fn jwt_algorithm_and_key_type_default_to_each_other() {
        let jwt = |v: serde_json::Value| {
            Policy::from_spec(
                "td1",
                &spec(serde_json::json!({"trustDomain": "example.org", "jwt": v})),
            )
            .map(|p| (p.jwt_key_type, p.jwt_alg))
        };
        assert_eq!(
            jwt(serde_json::json!({})).unwrap(),
            (KeyType::EcP256, SigningAlg::Es256)
        );
        assert_eq!(
            jwt(serde_json::json!({"algorithm": "RS256"})).unwrap(),
            (KeyType::Rsa2048, SigningAlg::Rs256)
        );
        assert_eq!(
            jwt(serde_json::json!({"algorithm": "ES384"})).unwrap(),
            (KeyType::EcP384, SigningAlg::Es384)
        );
        assert_eq!(
            jwt(serde_json::json!({"keyType": "RSA-3072"})).unwrap(),
            (KeyType::Rsa3072, SigningAlg::Rs256)
        );
        assert_eq!(
            jwt(serde_json::json!({"keyType": "RSA-4096", "algorithm": "PS256"})).unwrap(),
            (KeyType::Rsa4096, SigningAlg::Ps256)
        );
        let e =
            jwt(serde_json::json!({"keyType": "ECDSA-P256", "algorithm": "RS256"})).unwrap_err();
        assert_eq!(e.condition_reason(), Some("InvalidSpec"));
        let e = e.to_string();
        assert!(
            e.contains("spec.jwt.algorithm") && e.contains("RS256 and PS256 need RSA-2048"),
            "{e}"
        );
    }

    #[test]
    fn rsa_ca_key_types_map_to_their_sizes() {
        for (name, t) in [
            ("RSA-2048", KeyType::Rsa2048),
            ("RSA-3072", KeyType::Rsa3072),
            ("RSA-4096", KeyType::Rsa4096),
        ] {
            let p = Policy::from_spec(
                "td1",
                &spec(serde_json::json!({"trustDomain": "example.org", "ca": {"keyType": name}})),
            )
            .unwrap();
            assert_eq!(p.ca_key_type, t);
        }
        // A name outside the enum never reaches the reconciler: admission and the
        // object's decoding both refuse it.
        assert!(
            serde_json::from_value::<TrustDomainSpec>(
                serde_json::json!({"trustDomain": "example.org", "ca": {"keyType": "RSA-1024"}})
            )
            .is_err()
        );
    }

    #[test]
    fn selector_is_converted() {
        let p = Policy::from_spec(
            "td1",
            &spec(serde_json::json!({"trustDomain": "example.org", "bundle": {"namespaceSelector": {"matchLabels": {"a": "b"}}}})),
        )
        .unwrap();
        assert_eq!(p.namespace_selector.unwrap().to_string(), "a=b");
    }
}
