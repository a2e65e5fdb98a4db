//! SPIFFE bundles: the JWK Set format of SPIFFE_Trust_Domain_and_Bundle.md.
//!
//! A [`TrustBundle`] holds the X.509 and JWT authorities of ONE trust domain. The trust
//! domain name is never taken from the document itself (the spec requires it to be known
//! out of band), so decoding always takes the expected trust domain as an argument.
//!
//! Decoding rules:
//! - `keys` must be present;
//! - an element with a missing or unknown `use` or `kty` is ignored (the spec's MUST);
//! - an `x509-svid` element without certificates in `x5c` is ignored, and of several only
//!   the first is read (X509-SVID.md 6.2's MUSTs); that certificate must be a CA;
//! - a `jwt-svid` element on a curve Sigil cannot verify with is ignored (a key the
//!   consumer cannot use); otherwise it must have a `kid`, unique within the bundle, and
//!   usable key parameters;
//! - a malformed element of a known use and key type rejects the whole bundle, with the
//!   element's index (as go-spiffe does: a partner publishing garbage is told so, rather
//!   than having part of its keys silently dropped).
//!
//! Encoding never publishes an element it cannot describe: an X.509 authority whose key
//! has no JWK form is left out (and [`TrustBundle::unpublishable`] names it, so whoever
//! made it refuses it first, as the upstream CA loader does).

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::id::{IdError, TrustDomain};

/// `use` value of X.509 authorities.
pub const USE_X509: &str = "x509-svid";
/// `use` value of JWT authorities.
pub const USE_JWT: &str = "jwt-svid";
/// Largest bundle document accepted.
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;

/// Why a bundle document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not JSON or not a JWK Set.
    #[error("bundle is not a valid JWK Set: {0}")]
    Json(String),
    /// Larger than [`MAX_BUNDLE_BYTES`].
    #[error("bundle is {0} bytes; at most {MAX_BUNDLE_BYTES} are accepted")]
    TooLarge(usize),
    /// A key of known use is malformed.
    #[error("bundle key #{index} ({use_}): {reason}")]
    BadKey {
        /// Index in `keys`.
        index: usize,
        /// Its `use`.
        use_: String,
        /// What is wrong.
        reason: String,
    },
    /// Two JWT authorities share a key ID.
    #[error("bundle has two jwt-svid keys with kid {0:?}; key IDs must be unique")]
    DuplicateKeyId(String),
    /// A trust domain appears twice in a bundle map.
    #[error("trust domain {0:?} appears more than once in the bundle set")]
    DuplicateTrustDomain(String),
    /// A bundle-map key is not a trust domain.
    #[error("bundle set key {key:?} is not a trust domain: {source}")]
    BadTrustDomain {
        /// The key.
        key: String,
        /// Why.
        source: IdError,
    },
    /// PEM could not be read.
    #[error("bundle PEM: {0}")]
    Pem(String),
}

/// A JSON Web Key as used in SPIFFE bundles. Unknown members are kept on decode only if
/// listed here; we publish exactly these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Jwk {
    /// Key type: `EC`, `RSA` or `OKP`.
    pub kty: String,
    /// `x509-svid` or `jwt-svid`.
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    /// Key ID (required for jwt-svid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// The one algorithm the key is for (RFC 7517 4.4), e.g. `RS256` or `PS256`: Sigil
    /// sets it on its JWT keys, because an RSA key alone does not say which padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Curve for EC / OKP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// EC x coordinate or OKP public key (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// EC y coordinate (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// RSA modulus (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA exponent (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    /// Certificate chain, standard base64 DER (x509-svid: exactly one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x5c: Option<Vec<String>>,
}

impl Jwk {
    /// The public JWK of a SubjectPublicKeyInfo (EC P-256/P-384/P-521, Ed25519 or RSA).
    pub fn from_spki(spki_der: &[u8]) -> Option<Self> {
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der).ok()?;
        let mut jwk = Jwk::default();
        match spki.parsed().ok()? {
            PublicKey::EC(point) => {
                let data = point.data();
                let (crv, len) = match data.len() {
                    65 => ("P-256", 32),
                    97 => ("P-384", 48),
                    133 => ("P-521", 66),
                    _ => return None,
                };
                jwk.kty = "EC".into();
                jwk.crv = Some(crv.into());
                jwk.x = Some(URL_SAFE_NO_PAD.encode(&data[1..1 + len]));
                jwk.y = Some(URL_SAFE_NO_PAD.encode(&data[1 + len..]));
            }
            PublicKey::RSA(rsa) => {
                jwk.kty = "RSA".into();
                jwk.n = Some(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.modulus)));
                jwk.e = Some(URL_SAFE_NO_PAD.encode(strip_zeros(rsa.exponent)));
            }
            PublicKey::Unknown(raw) if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => {
                jwk.kty = "OKP".into();
                jwk.crv = Some("Ed25519".into());
                jwk.x = Some(URL_SAFE_NO_PAD.encode(raw));
            }
            _ => return None,
        }
        Some(jwk)
    }
}

/// The JWK of a DER certificate's public key, if it has one.
fn x509_jwk(der: &[u8]) -> Option<Jwk> {
    X509Certificate::from_der(der)
        .ok()
        .and_then(|(_, c)| Jwk::from_spki(c.public_key().raw))
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let i = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[i..]
}

/// A JWT signing authority: key ID and public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    /// Key ID.
    pub kid: String,
    /// Public key as a JWK (with `use` and `kid` set).
    pub jwk: Jwk,
}

/// The authorities of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    /// The trust domain (known out of band, never read from the document).
    pub trust_domain: TrustDomain,
    /// X.509 authorities, DER.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT authorities.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// `spiffe_sequence`.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`.
    pub refresh_hint: Option<Duration>,
}

#[derive(Serialize, Deserialize)]
struct JwkSet {
    keys: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

impl TrustBundle {
    /// An empty bundle.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: vec![],
            jwt_authorities: vec![],
            sequence: None,
            refresh_hint: None,
        }
    }

    /// The X.509 authorities that [`TrustBundle::to_jwks_json`] cannot publish (their key
    /// has no JWK form, so the element would have no `kty`), by index and subject.
    pub fn unpublishable(&self) -> Vec<(usize, String)> {
        self.x509_authorities
            .iter()
            .enumerate()
            .filter(|(_, der)| x509_jwk(der).is_none())
            .map(|(i, der)| {
                let subject = X509Certificate::from_der(der)
                    .map(|(_, c)| c.subject().to_string())
                    .unwrap_or_else(|_| "an unparseable certificate".into());
                (i, subject)
            })
            .collect()
    }

    /// Encodes the SPIFFE bundle (JWK Set) document. An X.509 authority without a JWK
    /// form is left out rather than published with an empty `kty` (see
    /// [`TrustBundle::unpublishable`]).
    pub fn to_jwks_json(&self) -> String {
        let mut keys = Vec::new();
        for der in &self.x509_authorities {
            let Some(mut jwk) = x509_jwk(der) else {
                continue;
            };
            jwk.use_ = Some(USE_X509.into());
            jwk.x5c = Some(vec![STANDARD.encode(der)]);
            keys.push(serde_json::to_value(jwk).unwrap_or_default());
        }
        for a in &self.jwt_authorities {
            let mut jwk = a.jwk.clone();
            jwk.use_ = Some(USE_JWT.into());
            jwk.kid = Some(a.kid.clone());
            keys.push(serde_json::to_value(jwk).unwrap_or_default());
        }
        let set = JwkSet {
            keys,
            spiffe_sequence: self.sequence,
            spiffe_refresh_hint: self.refresh_hint.map(|d| d.as_secs()),
        };
        serde_json::to_string_pretty(&set).unwrap_or_default()
    }

    /// Decodes a SPIFFE bundle document for `trust_domain`.
    pub fn from_jwks_json(trust_domain: TrustDomain, doc: &[u8]) -> Result<Self, BundleError> {
        if doc.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(doc.len()));
        }
        let set: JwkSet =
            serde_json::from_slice(doc).map_err(|e| BundleError::Json(e.to_string()))?;
        let mut bundle = TrustBundle::new(trust_domain);
        bundle.sequence = set.spiffe_sequence;
        bundle.refresh_hint = set.spiffe_refresh_hint.map(Duration::from_secs);
        for (index, raw) in set.keys.into_iter().enumerate() {
            let use_ = raw
                .get("use")
                .and_then(|u| u.as_str())
                .unwrap_or_default()
                .to_owned();
            let kty = raw
                .get("kty")
                .and_then(|u| u.as_str())
                .unwrap_or_default()
                .to_owned();
            if !matches!(use_.as_str(), USE_X509 | USE_JWT)
                || !matches!(kty.as_str(), "EC" | "RSA" | "OKP")
            {
                continue; // unknown use or key type: ignored, as the spec requires
            }
            let bad = |reason: String| BundleError::BadKey {
                index,
                use_: use_.clone(),
                reason,
            };
            let jwk: Jwk = serde_json::from_value(raw).map_err(|e| bad(e.to_string()))?;
            if use_ == USE_X509 {
                // X509-SVID.md 6.2: no certificate, ignore the element; several, only the
                // first one counts.
                let Some(first) = jwk.x5c.as_deref().and_then(<[String]>::first) else {
                    continue;
                };
                let der = STANDARD
                    .decode(first)
                    .map_err(|e| bad(format!("x5c is not base64: {e}")))?;
                match X509Certificate::from_der(&der) {
                    Ok(([], c)) => {
                        if !crate::x509::is_signing_cert(&c) {
                            return Err(bad(
                                "x5c certificate is not a CA (cA=true, keyCertSign)".into()
                            ));
                        }
                    }
                    _ => return Err(bad("x5c is not a DER X.509 certificate".into())),
                }
                bundle.x509_authorities.push(der);
            } else {
                let kid = jwk
                    .kid
                    .clone()
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| bad("kid is required".into()))?;
                if kty == "EC"
                    && !jwk
                        .crv
                        .as_deref()
                        .is_some_and(|c| crate::jwt::SUPPORTED_CURVES.contains(&c))
                {
                    continue; // a curve no JWT-SVID algorithm uses: a key we cannot use
                }
                if bundle.jwt_authorities.iter().any(|a| a.kid == kid) {
                    return Err(BundleError::DuplicateKeyId(kid));
                }
                crate::jwt::check_jwk(&jwk).map_err(|e| bad(e.to_string()))?;
                bundle.jwt_authorities.push(JwtAuthority { kid, jwk });
            }
        }
        Ok(bundle)
    }

    /// A bundle with only X.509 authorities, from PEM.
    pub fn from_x509_pem(trust_domain: TrustDomain, pem_text: &str) -> Result<Self, BundleError> {
        let certs =
            crate::x509::certs_from_pem(pem_text).map_err(|e| BundleError::Pem(e.to_string()))?;
        let mut b = TrustBundle::new(trust_domain);
        b.x509_authorities = certs;
        Ok(b)
    }

    /// Decodes either a JWK Set or PEM certificates (for user-supplied bootstrap bundles).
    pub fn from_jwks_or_pem(trust_domain: TrustDomain, doc: &[u8]) -> Result<Self, BundleError> {
        let text = std::str::from_utf8(doc).map_err(|e| BundleError::Json(e.to_string()))?;
        if text.trim_start().starts_with("-----BEGIN") {
            Self::from_x509_pem(trust_domain, text)
        } else {
            Self::from_jwks_json(trust_domain, doc)
        }
    }

    /// X.509 authorities as PEM.
    pub fn x509_pem(&self) -> String {
        crate::x509::certs_to_pem(&self.x509_authorities)
    }

    /// X.509 authorities as concatenated DER (the Workload API encoding).
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The JWT authority with `kid`.
    pub fn jwt_authority(&self, kid: &str) -> Option<&JwtAuthority> {
        self.jwt_authorities.iter().find(|a| a.kid == kid)
    }

    /// Same authorities (ignores sequence and refresh hint).
    pub fn same_keys(&self, other: &TrustBundle) -> bool {
        self.trust_domain == other.trust_domain
            && self.x509_authorities == other.x509_authorities
            && self.jwt_authorities == other.jwt_authorities
    }
}

/// Bundles of several trust domains, at most one per trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BundleSet(BTreeMap<TrustDomain, TrustBundle>);

impl BundleSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a bundle; a second bundle for the same trust domain is an error (bundles are
    /// never merged across or within trust domains by accident).
    pub fn insert(&mut self, bundle: TrustBundle) -> Result<(), BundleError> {
        if self.0.contains_key(&bundle.trust_domain) {
            return Err(BundleError::DuplicateTrustDomain(
                bundle.trust_domain.name().to_owned(),
            ));
        }
        self.0.insert(bundle.trust_domain.clone(), bundle);
        Ok(())
    }

    /// Replaces (or adds) the bundle of its trust domain.
    pub fn upsert(&mut self, bundle: TrustBundle) {
        self.0.insert(bundle.trust_domain.clone(), bundle);
    }

    /// Drops the bundle of `td`; returns whether there was one.
    pub fn remove(&mut self, td: &TrustDomain) -> bool {
        self.0.remove(td).is_some()
    }

    /// Keeps only the bundles for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&TrustBundle) -> bool) {
        self.0.retain(|_, b| keep(b));
    }

    /// The bundle for `td`.
    pub fn get(&self, td: &TrustDomain) -> Option<&TrustBundle> {
        self.0.get(td)
    }

    /// All bundles, ordered by trust domain.
    pub fn iter(&self) -> impl Iterator<Item = &TrustBundle> {
        self.0.values()
    }

    /// Number of trust domains.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Decodes a JSON object mapping trust domain (name or `spiffe://name`) to a SPIFFE
    /// bundle document, rejecting a trust domain that appears twice (including as two
    /// spellings of the same name).
    pub fn from_json_map(doc: &[u8]) -> Result<Self, BundleError> {
        if doc.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(doc.len()));
        }
        let pairs: DuplicateAwareMap =
            serde_json::from_slice(doc).map_err(|e| BundleError::Json(e.to_string()))?;
        let mut set = BundleSet::new();
        for (key, value) in pairs.0 {
            let td = TrustDomain::parse(&key).map_err(|source| BundleError::BadTrustDomain {
                key: key.clone(),
                source,
            })?;
            let raw = serde_json::to_vec(&value).map_err(|e| BundleError::Json(e.to_string()))?;
            set.insert(TrustBundle::from_jwks_json(td, &raw)?)?;
        }
        Ok(set)
    }

    /// Builds a set from (trust domain ID, concatenated DER) pairs as the Workload API
    /// carries them, rejecting duplicates.
    pub fn from_der_map<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, BundleError> {
        let mut set = BundleSet::new();
        for (key, der) in entries {
            let td = TrustDomain::parse(key).map_err(|source| BundleError::BadTrustDomain {
                key: key.to_owned(),
                source,
            })?;
            let mut b = TrustBundle::new(td);
            b.x509_authorities =
                crate::x509::split_der_certs(der).map_err(|e| BundleError::Pem(e.to_string()))?;
            set.insert(b)?;
        }
        Ok(set)
    }
}

/// A JSON object read as ordered pairs so duplicate keys are seen rather than silently
/// collapsed (serde_json keeps only the last).
struct DuplicateAwareMap(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for DuplicateAwareMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = DuplicateAwareMap;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object of trust domain to bundle")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, serde_json::Value>()? {
                    out.push((k, v));
                }
                Ok(DuplicateAwareMap(out))
            }
        }
        d.deserialize_map(V)
    }
}
