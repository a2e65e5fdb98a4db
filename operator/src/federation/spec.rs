//! A FederatedBundle's spec, checked, and the bundle held for it.
//!
//! Admission already rejects most bad input (CEL rules on the CRD); this catches the rest
//! with messages that name the object, the field and the fix. The same functions decide,
//! on every replica, which bundle is held for a FederatedBundle, so the loader (every
//! replica) and the controller (the leader) always agree.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use sha2::Digest;
use sigil_identity::{SpiffeId, TrustBundle, TrustDomain};

use super::fetch;
use crate::crd::federated_bundle::{FederatedBundle, ProfileType, SecretRef};

/// Data key of the held bundle's trust domain in its ConfigMap.
pub const CM_TRUST_DOMAIN: &str = "trust-domain";
/// Data key of the held bundle (SPIFFE bundle format) in its ConfigMap.
pub const CM_BUNDLE: &str = "bundle.spiffe";
/// Annotation: SHA-256 of `spec.trustDomainBundle` when the ConfigMap was written. A
/// changed bootstrap bundle replaces what was fetched until the next successful fetch.
pub const BOOTSTRAP_HASH_ANNOTATION: &str = "sigil.dev/bootstrap-sha256";
/// Annotation: when the held bundle was fetched (RFC 3339).
pub const FETCHED_AT_ANNOTATION: &str = "sigil.dev/fetched-at";
/// Value of the component label of the ConfigMaps.
pub const COMPONENT: &str = "federated-bundle";

/// How the endpoint is authenticated.
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileSpec {
    /// Web PKI, with system roots or the CA certificates of a Secret.
    Web {
        /// The CA bundle Secret, if any.
        ca: Option<SecretRef>,
    },
    /// An X509-SVID for exactly this ID.
    Spiffe {
        /// The endpoint's SPIFFE ID.
        id: SpiffeId,
    },
}

/// What a FederatedBundle asks for, validated.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `metadata.name`.
    pub object: String,
    /// The foreign trust domain.
    pub trust_domain: TrustDomain,
    /// `spec.bundleEndpointURL`.
    pub url: String,
    /// The endpoint profile.
    pub profile: ProfileSpec,
    /// The bootstrap bundle, if given.
    pub bootstrap: Option<TrustBundle>,
    /// SHA-256 (hex) of `spec.trustDomainBundle`, empty without one.
    pub bootstrap_hash: String,
    /// `spec.refreshInterval`.
    pub refresh_interval: Duration,
}

/// Why a spec cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// `spec.trustDomain` is not a trust domain name.
    #[error(
        "FederatedBundle {object}: spec.trustDomain {value:?} is not a trust domain name ({reason}); use a name like partner.example.com"
    )]
    InvalidTrustDomain {
        /// Object name.
        object: String,
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
    /// `spec.bundleEndpointURL` is unusable.
    #[error(
        "FederatedBundle {object}: spec.bundleEndpointURL {value:?} {reason}; use an https:// URL such as https://spire.partner.example.com:8443"
    )]
    InvalidUrl {
        /// Object name.
        object: String,
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
    /// `endpointSPIFFEID` missing or malformed.
    #[error(
        "FederatedBundle {object}: spec.bundleEndpointProfile.endpointSPIFFEID {reason}; set it to the SPIFFE ID the endpoint's X509-SVID carries, e.g. spiffe://partner.example.com/spire/server"
    )]
    InvalidEndpointId {
        /// Object name.
        object: String,
        /// Why.
        reason: String,
    },
    /// The bootstrap bundle cannot be read.
    #[error(
        "FederatedBundle {object}: spec.trustDomainBundle {reason}; paste the SPIFFE bundle (JSON) or the PEM CA certificates of {trust_domain}"
    )]
    InvalidBootstrapBundle {
        /// Object name.
        object: String,
        /// The trust domain.
        trust_domain: String,
        /// Why.
        reason: String,
    },
    /// `spec.refreshInterval` is not a duration.
    #[error("FederatedBundle {object}: spec.refreshInterval {reason}")]
    InvalidRefreshInterval {
        /// Object name.
        object: String,
        /// Why.
        reason: String,
    },
    /// Another FederatedBundle already names the trust domain.
    #[error(
        "FederatedBundle {object}: trust domain {trust_domain} is already federated by FederatedBundle {owner}; bundles are never merged, so delete one of them"
    )]
    DuplicateTrustDomain {
        /// Object name.
        object: String,
        /// The trust domain.
        trust_domain: String,
        /// The older FederatedBundle.
        owner: String,
    },
    /// The trust domain is one this installation issues for.
    #[error(
        "FederatedBundle {object}: trust domain {trust_domain} is a local TrustDomain of this installation; federate only with foreign trust domains"
    )]
    LocalTrustDomain {
        /// Object name.
        object: String,
        /// The trust domain.
        trust_domain: String,
    },
}

impl SpecError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::InvalidTrustDomain { .. } => "InvalidTrustDomain",
            SpecError::InvalidUrl { .. } => "InvalidBundleEndpointURL",
            SpecError::InvalidEndpointId { .. } => "InvalidEndpointSPIFFEID",
            SpecError::InvalidBootstrapBundle { .. } => "InvalidBootstrapBundle",
            SpecError::InvalidRefreshInterval { .. } => "InvalidRefreshInterval",
            SpecError::DuplicateTrustDomain { .. } => "DuplicateTrustDomain",
            SpecError::LocalTrustDomain { .. } => "LocalTrustDomain",
        }
    }
}

impl Spec {
    /// Checks the spec of `fb`.
    pub fn from_object(fb: &FederatedBundle) -> Result<Self, SpecError> {
        let object = fb.name_any();
        let spec = &fb.spec;
        let trust_domain =
            TrustDomain::new(&spec.trust_domain).map_err(|e| SpecError::InvalidTrustDomain {
                object: object.clone(),
                value: spec.trust_domain.clone(),
                reason: e.to_string(),
            })?;
        let bad_url = |reason: &str| SpecError::InvalidUrl {
            object: object.clone(),
            value: spec.bundle_endpoint_url.clone(),
            reason: reason.to_owned(),
        };
        let uri: http::Uri = spec
            .bundle_endpoint_url
            .parse()
            .map_err(|_| bad_url("is not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad_url("is not https"));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad_url("has no host"));
        }
        if fetch::has_userinfo(&uri) {
            return Err(bad_url(
                "includes userinfo (user@ or user:password@ before the host), which bundle endpoint URLs must not (SPIFFE_Federation.md 5.2.1.1/5.2.2.1)",
            ));
        }
        let profile = match spec.bundle_endpoint_profile.type_ {
            ProfileType::HttpsWeb => ProfileSpec::Web {
                ca: spec.bundle_endpoint_profile.ca_bundle_secret_ref.clone(),
            },
            ProfileType::HttpsSpiffe => {
                let raw = spec
                    .bundle_endpoint_profile
                    .endpoint_spiffe_id
                    .as_deref()
                    .ok_or_else(|| SpecError::InvalidEndpointId {
                        object: object.clone(),
                        reason: "is required with type https_spiffe".into(),
                    })?;
                let id = SpiffeId::parse(raw).map_err(|e| SpecError::InvalidEndpointId {
                    object: object.clone(),
                    reason: format!("{raw:?} is not a SPIFFE ID ({e})"),
                })?;
                ProfileSpec::Spiffe { id }
            }
        };
        let (bootstrap, bootstrap_hash) = match spec.trust_domain_bundle.as_deref() {
            None | Some("") => (None, String::new()),
            Some(text) => {
                let bad = |reason: String| SpecError::InvalidBootstrapBundle {
                    object: object.clone(),
                    trust_domain: trust_domain.to_string(),
                    reason,
                };
                let bundle = TrustBundle::from_jwks_or_pem(trust_domain.clone(), text.as_bytes())
                    .map_err(|e| bad(format!("is not a valid bundle: {e}")))?;
                fetch::check_bundle(&bundle).map_err(|e| bad(e.to_string()))?;
                (Some(bundle), bootstrap_hash(text))
            }
        };
        let refresh_interval =
            spec.refresh_interval
                .to_std()
                .map_err(|reason| SpecError::InvalidRefreshInterval {
                    object: object.clone(),
                    reason,
                })?;
        Ok(Self {
            object,
            trust_domain,
            url: spec.bundle_endpoint_url.clone(),
            profile,
            bootstrap,
            bootstrap_hash,
            refresh_interval,
        })
    }
}

/// SHA-256 (hex) of a bootstrap bundle's text.
pub fn bootstrap_hash(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// When `fetched` is older than the bundle held from an earlier fetch (a lower
/// `spiffe_sequence`): the held and the fetched sequence. SPIFFE_Federation.md 4.2: the
/// sequence orders bundles, so an older one never replaces a newer one (a stale replica or
/// cache behind the endpoint). A bootstrap bundle is the operator's local copy and any
/// fetch replaces it; without sequences the latest fetch wins.
pub fn older_than_held(
    held: Option<&(TrustBundle, Source)>,
    fetched: &TrustBundle,
) -> Option<(u64, u64)> {
    match (held, fetched.sequence) {
        (Some((h, Source::Fetched)), Some(new)) => {
            h.sequence.filter(|&old| new < old).map(|old| (old, new))
        }
        _ => None,
    }
}

/// Name of the ConfigMap holding the bundle of FederatedBundle `object`.
pub fn config_map_name(object: &str) -> String {
    crate::crd::prefixed_name("sigil-federated-", object)
}

/// Where the held bundle came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `spec.trustDomainBundle`.
    Bootstrap,
    /// The bundle endpoint.
    Fetched,
}

/// The bundle held for `spec` (FederatedBundle with UID `uid`): the fetched one in its
/// ConfigMap, unless the bootstrap bundle changed since it was written, else the
/// bootstrap bundle.
pub fn held(
    spec: &Spec,
    uid: Option<&str>,
    cm: Option<&ConfigMap>,
) -> Option<(TrustBundle, Source)> {
    if let Some(fetched) = cm.and_then(|cm| fetched_bundle(spec, uid, cm)) {
        return Some((fetched, Source::Fetched));
    }
    spec.bootstrap.clone().map(|b| (b, Source::Bootstrap))
}

fn fetched_bundle(spec: &Spec, uid: Option<&str>, cm: &ConfigMap) -> Option<TrustBundle> {
    let owned = cm
        .owner_references()
        .iter()
        .any(|o| o.kind == "FederatedBundle" && Some(o.uid.as_str()) == uid);
    let data = cm.data.as_ref()?;
    let same_bootstrap = cm
        .annotations()
        .get(BOOTSTRAP_HASH_ANNOTATION)
        .map(String::as_str)
        .unwrap_or_default()
        == spec.bootstrap_hash;
    if !owned || !same_bootstrap || data.get(CM_TRUST_DOMAIN)? != spec.trust_domain.name() {
        return None;
    }
    TrustBundle::from_jwks_json(spec.trust_domain.clone(), data.get(CM_BUNDLE)?.as_bytes()).ok()
}

/// The older FederatedBundle that already names `fb`'s trust domain, if any (oldest
/// wins, then name order, so every replica picks the same one).
pub fn duplicate_owner(fb: &FederatedBundle, all: &[Arc<FederatedBundle>]) -> Option<String> {
    let key = |o: &FederatedBundle| (o.metadata.creation_timestamp.clone(), o.name_any());
    let mine = key(fb);
    all.iter()
        .filter(|o| o.spec.trust_domain == fb.spec.trust_domain && o.name_any() != fb.name_any())
        .filter(|o| key(o) < mine)
        .min_by_key(|o| key(o))
        .map(|o| o.name_any())
}

/// Refresh interval for a held bundle: its `spiffe_refresh_hint`, else the spec's, never
/// below `floor` and never above a day.
pub fn refresh_after(bundle: Option<&TrustBundle>, spec: &Spec, floor: Duration) -> Duration {
    bundle
        .and_then(|b| b.refresh_hint)
        .filter(|d| !d.is_zero())
        .unwrap_or(spec.refresh_interval)
        .clamp(floor, Duration::from_secs(86_400).max(floor))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fb(v: serde_json::Value) -> FederatedBundle {
        let mut fb: FederatedBundle = serde_json::from_value(serde_json::json!({
            "apiVersion": "sigil.dev/v1alpha1",
            "kind": "FederatedBundle",
            "metadata": {"name": "partner", "uid": "u1"},
            "spec": v,
        }))
        .unwrap();
        fb.metadata.uid = Some("u1".into());
        fb
    }

    #[test]
    fn https_spiffe_needs_a_valid_id() {
        let e = Spec::from_object(&fb(serde_json::json!({
            "trustDomain": "partner.test",
            "bundleEndpointURL": "https://127.0.0.1:8443",
            "bundleEndpointProfile": {"type": "https_spiffe", "endpointSPIFFEID": "partner.test/server"},
        })))
        .unwrap_err();
        assert_eq!(e.reason(), "InvalidEndpointSPIFFEID");
        assert!(
            e.to_string()
                .contains("spec.bundleEndpointProfile.endpointSPIFFEID"),
            "{e}"
        );
    }

    #[test]
    fn garbage_bootstrap_bundle_names_the_field() {
        let e = Spec::from_object(&fb(serde_json::json!({
            "trustDomain": "partner.test",
            "bundleEndpointURL": "https://partner.test",
            "bundleEndpointProfile": {"type": "https_web"},
            "trustDomainBundle": "{\"keys\": [{\"use\": \"x509-svid\", \"kty\": \"EC\", \"x5c\": [\"bm90IGEgY2VydA==\"]}]}",
        })))
        .unwrap_err();
        assert_eq!(e.reason(), "InvalidBootstrapBundle");
        assert!(e.to_string().contains("spec.trustDomainBundle"), "{e}");
    }

    /// SPIFFE_Federation.md 5.2.1.1/5.2.2.1: endpoint URLs MUST NOT include userinfo.
    ///
    /// Before the fix: the URL was accepted, and fetches went to the host with the
    /// credentials silently dropped.
    #[test]
    fn userinfo_in_the_endpoint_url_is_refused() {
        for url in [
            "https://user@partner.test/bundle",
            "https://user:secret@partner.test:8443/bundle",
        ] {
            let e = Spec::from_object(&fb(serde_json::json!({
                "trustDomain": "partner.test",
                "bundleEndpointURL": url,
                "bundleEndpointProfile": {"type": "https_web"},
            })))
            .map(|_| ())
            .unwrap_err();
            assert_eq!(e.reason(), "InvalidBundleEndpointURL", "{url}");
            assert!(e.to_string().contains("userinfo"), "{e}");
        }
    }

    /// SPIFFE_Federation.md 4.2 (SHOULD): the sequence decides which of two bundles is
    /// newer; an older fetched bundle never replaces a newer held one.
    ///
    /// Before the fix: there was no such check; the controller replaced the held bundle
    /// with whatever the endpoint served.
    #[test]
    fn an_older_sequence_never_replaces_a_newer_fetched_bundle() {
        let td = TrustDomain::new("partner.test").unwrap();
        let with_seq = |s: Option<u64>| {
            let mut b = TrustBundle::new(td.clone());
            b.sequence = s;
            b
        };
        let held = (with_seq(Some(7)), Source::Fetched);
        assert_eq!(
            older_than_held(Some(&held), &with_seq(Some(6))),
            Some((7, 6))
        );
        assert_eq!(older_than_held(Some(&held), &with_seq(Some(7))), None);
        assert_eq!(older_than_held(Some(&held), &with_seq(Some(8))), None);
        assert_eq!(older_than_held(Some(&held), &with_seq(None)), None);
        let bootstrap = (with_seq(Some(7)), Source::Bootstrap);
        assert_eq!(older_than_held(Some(&bootstrap), &with_seq(Some(1))), None);
        assert_eq!(older_than_held(None, &with_seq(Some(1))), None);
    }

    #[test]
    fn plain_http_is_refused() {
        let e = Spec::from_object(&fb(serde_json::json!({
            "trustDomain": "partner.test",
            "bundleEndpointURL": "http://partner.test",
            "bundleEndpointProfile": {"type": "https_web"},
        })))
        .unwrap_err();
        assert_eq!(e.reason(), "InvalidBundleEndpointURL");
    }

    #[test]
    fn refresh_uses_the_hint_within_bounds() {
        let spec = Spec::from_object(&fb(serde_json::json!({
            "trustDomain": "partner.test",
            "bundleEndpointURL": "https://partner.test",
            "bundleEndpointProfile": {"type": "https_web"},
            "refreshInterval": "2m",
        })))
        .unwrap();
        let floor = Duration::from_secs(5);
        assert_eq!(refresh_after(None, &spec, floor), Duration::from_secs(120));
        let mut b = TrustBundle::new(spec.trust_domain.clone());
        b.refresh_hint = Some(Duration::from_secs(1));
        assert_eq!(refresh_after(Some(&b), &spec, floor), floor);
        b.refresh_hint = Some(Duration::from_secs(30));
        assert_eq!(
            refresh_after(Some(&b), &spec, floor),
            Duration::from_secs(30)
        );
        b.refresh_hint = Some(Duration::from_secs(10 * 86_400));
        assert_eq!(
            refresh_after(Some(&b), &spec, floor),
            Duration::from_secs(86_400)
        );
    }

    #[test]
    fn a_changed_bootstrap_bundle_wins_over_the_fetched_one() {
        let spec = Spec::from_object(&fb(serde_json::json!({
            "trustDomain": "partner.test",
            "bundleEndpointURL": "https://partner.test",
            "bundleEndpointProfile": {"type": "https_web"},
        })))
        .unwrap();
        let mut fetched = TrustBundle::new(spec.trust_domain.clone());
        fetched.sequence = Some(7);
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "sigil-federated-partner",
                "ownerReferences": [{"apiVersion": "sigil.dev/v1alpha1", "kind": "FederatedBundle", "name": "partner", "uid": "u1"}],
                "annotations": {BOOTSTRAP_HASH_ANNOTATION: ""},
            },
            "data": {CM_TRUST_DOMAIN: "partner.test", CM_BUNDLE: fetched.to_jwks_json()},
        }))
        .unwrap();
        let (b, source) = held(&spec, Some("u1"), Some(&cm)).unwrap();
        assert_eq!((b.sequence, source), (Some(7), Source::Fetched));
        // Not owned by this object: ignored.
        assert!(held(&spec, Some("other"), Some(&cm)).is_none());
        // Another bootstrap hash: the ConfigMap predates the current bootstrap bundle.
        let mut stale = cm.clone();
        stale
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(BOOTSTRAP_HASH_ANNOTATION.into(), "abc".into());
        assert!(held(&spec, Some("u1"), Some(&stale)).is_none());
    }
}
