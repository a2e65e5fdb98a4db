//! JWT-SVID minting and validation per JWT-SVID.md.
//!
//! Validation order matters: the header's `alg` is checked against the spec's allow-list
//! before anything else is looked at, `kid` must be present and name a key in the bundle
//! of the subject's trust domain (when that key's JWK names its `alg`, as Sigil's own keys
//! do, the token's must be the same), the signature is verified, and only then are the
//! claims (`sub`, `aud`, `exp`) trusted and checked against the caller's audience and `now`.

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, SystemTime};

use crate::clock::{from_unix_seconds, unix_seconds};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::bundle::{BundleSet, Jwk, JwtAuthority};
use crate::id::{IdError, SpiffeId};
use crate::key_manager::{AuthorityKey, ExternalKey, SignScheme};
use crate::keys::{KeyError, KeyType, PrivateKey};

/// Algorithms JWT-SVID.md allows, all of which validate (ES512 through the `p521` crate,
/// the rest through jsonwebtoken).
pub const ALLOWED_ALGS: &[&str] = &[
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
];
/// EC curves of the allowed algorithms; a bundle's `jwt-svid` key on another curve is one
/// Sigil cannot use, and is ignored.
pub const SUPPORTED_CURVES: &[&str] = &["P-256", "P-384", "P-521"];
/// Leeway for `nbf` (clocks of issuer and validator differ a little).
pub const NBF_LEEWAY: Duration = Duration::from_secs(60);
/// Largest token accepted.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a JWT-SVID was rejected or could not be minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not three base64url JSON parts.
    #[error("token is not a well-formed JWS compact serialization: {0}")]
    Malformed(String),
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("token is {0} bytes; at most {MAX_TOKEN_LEN} are accepted")]
    TooLong(usize),
    /// `alg` not in [`ALLOWED_ALGS`].
    #[error(
        "alg {0:?} is not allowed for JWT-SVIDs (allowed: RS256/384/512, ES256/384/512, PS256/384/512)"
    )]
    DisallowedAlg(String),
    /// `typ` present but not JWT/JOSE.
    #[error("typ {0:?} is not allowed; it must be absent, \"JWT\" or \"JOSE\"")]
    BadTyp(String),
    /// No `kid` header.
    #[error("token has no kid header; JWT-SVIDs must name their signing key")]
    MissingKid,
    /// A required claim is absent.
    #[error("token has no {0:?} claim, which JWT-SVIDs require")]
    MissingClaim(&'static str),
    /// `sub` is not a SPIFFE ID.
    #[error("sub is not a valid SPIFFE ID: {0}")]
    InvalidSubject(IdError),
    /// No bundle for the subject's trust domain.
    #[error("no bundle for trust domain {0:?}")]
    NoBundle(String),
    /// The bundle has no key with this ID.
    #[error("no JWT authority with kid {kid:?} in the bundle for {trust_domain:?}")]
    UnknownKid {
        /// The key ID.
        kid: String,
        /// The trust domain searched.
        trust_domain: String,
    },
    /// Signature does not verify.
    #[error("signature does not verify with key {0:?}")]
    BadSignature(String),
    /// `exp` in the past.
    #[error("token expired at {0}")]
    Expired(String),
    /// `nbf` in the future (beyond [`NBF_LEEWAY`]).
    #[error("token is not valid before {0}")]
    NotYetValid(String),
    /// A `crit` header names extensions the validator must understand (RFC 7515 4.1.11).
    #[error(
        "crit header {0:?} names extensions this validator does not understand; JWT-SVIDs must not carry crit"
    )]
    CriticalHeader(String),
    /// The audience does not contain the expected value.
    #[error("audience {got:?} does not contain {expected:?}")]
    AudienceMismatch {
        /// What the validator expected.
        expected: String,
        /// What the token has.
        got: Vec<String>,
    },
    /// Minting without an audience.
    #[error("at least one audience is required")]
    NoAudience,
    /// The key cannot be used.
    #[error("unusable key: {0}")]
    Key(String),
    /// The bundle publishes the key for one algorithm and the token uses another (RFC 7517
    /// 4.4: a key's `alg` names the one algorithm it is for).
    #[error("key {kid:?} is published for {key_alg}; the token's alg is {token_alg}")]
    KeyAlgMismatch {
        /// The key ID.
        kid: String,
        /// The `alg` of the key in the bundle.
        key_alg: String,
        /// The `alg` of the token.
        token_alg: String,
    },
}

/// The algorithms Sigil signs JWT-SVIDs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SigningAlg {
    /// ECDSA P-256 with SHA-256 (the default).
    Es256,
    /// ECDSA P-384 with SHA-384.
    Es384,
    /// RSASSA-PKCS1-v1_5 with SHA-256: what Azure Entra workload identity federation and
    /// most OIDC relying parties require.
    Rs256,
    /// RSASSA-PSS with SHA-256 (MGF1 SHA-256, 32-byte salt).
    Ps256,
}

impl SigningAlg {
    /// The JOSE name (`alg`).
    pub fn name(self) -> &'static str {
        match self {
            SigningAlg::Es256 => "ES256",
            SigningAlg::Es384 => "ES384",
            SigningAlg::Rs256 => "RS256",
            SigningAlg::Ps256 => "PS256",
        }
    }

    /// The algorithm a key of `key_type` signs with when none is chosen: ES256 for P-256,
    /// ES384 for P-384, RS256 for RSA.
    pub fn default_for(key_type: KeyType) -> Option<Self> {
        match key_type {
            KeyType::EcP256 => Some(SigningAlg::Es256),
            KeyType::EcP384 => Some(SigningAlg::Es384),
            t if t.is_rsa() => Some(SigningAlg::Rs256),
            _ => None,
        }
    }

    /// Whether a key of `key_type` can sign with this algorithm.
    pub fn fits(self, key_type: KeyType) -> bool {
        match self {
            SigningAlg::Es256 => key_type == KeyType::EcP256,
            SigningAlg::Es384 => key_type == KeyType::EcP384,
            SigningAlg::Rs256 | SigningAlg::Ps256 => key_type.is_rsa(),
        }
    }

    fn jose(self) -> Algorithm {
        match self {
            SigningAlg::Es256 => Algorithm::ES256,
            SigningAlg::Es384 => Algorithm::ES384,
            SigningAlg::Rs256 => Algorithm::RS256,
            SigningAlg::Ps256 => Algorithm::PS256,
        }
    }
}

impl fmt::Display for SigningAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SigningAlg {
    type Err = JwtError;

    fn from_str(s: &str) -> Result<Self, JwtError> {
        [
            SigningAlg::Es256,
            SigningAlg::Es384,
            SigningAlg::Rs256,
            SigningAlg::Ps256,
        ]
        .into_iter()
        .find(|a| a.name() == s)
        .ok_or_else(|| {
            JwtError::Key(format!(
                "Sigil does not sign JWT-SVIDs with {s:?}; use ES256, ES384, RS256 or PS256"
            ))
        })
    }
}

/// How a [`JwtKey`] makes its signatures: ring, for both kinds (jsonwebtoken's own ECDSA
/// signer, pure Rust, minted about 17 times slower).
enum Signer {
    /// ECDSA with the fixed-size `r || s` signature JWS wants (ES256, ES384).
    Ec(Box<ring::signature::EcdsaKeyPair>),
    /// RSA (constant time), with the padding of the algorithm.
    Rsa(Box<ring::signature::RsaKeyPair>),
    /// A key manager's key (an HSM): it signs; the key never comes here.
    External(std::sync::Arc<dyn ExternalKey>),
}

/// A JWT signing key with its key ID and the one algorithm it signs with.
pub struct JwtKey {
    kid: String,
    key: AuthorityKey,
    alg: SigningAlg,
    signer: Signer,
    not_after: SystemTime,
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl JwtKey {
    /// Generates a key with a random key ID, signing with the default algorithm of its
    /// type ([`SigningAlg::default_for`]): ES256, ES384 or RS256.
    pub fn generate(key_type: KeyType, not_after: SystemTime) -> Result<Self, JwtError> {
        Self::generate_for(key_type, None, not_after)
    }

    /// Generates a key of `key_type` with a random key ID that signs with `alg` (`None`:
    /// the type's default). RSA keys are slow to make: see [`PrivateKey::generate`].
    pub fn generate_for(
        key_type: KeyType,
        alg: Option<SigningAlg>,
        not_after: SystemTime,
    ) -> Result<Self, JwtError> {
        // Refuse a bad pair before spending seconds on an RSA key.
        check_pair(key_type, alg)?;
        let key =
            PrivateKey::generate(key_type).map_err(|e: KeyError| JwtError::Key(e.to_string()))?;
        let kid = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>());
        Self::from_key_for(kid, key, alg, not_after)
    }

    /// Wraps an existing key (a persisted one) that signs with its type's default algorithm.
    pub fn from_key(kid: String, key: PrivateKey, not_after: SystemTime) -> Result<Self, JwtError> {
        Self::from_key_for(kid, key, None, not_after)
    }

    /// Wraps a key a key manager made or found, with a new random key ID.
    pub fn with_new_kid(
        key: AuthorityKey,
        alg: Option<SigningAlg>,
        not_after: SystemTime,
    ) -> Result<Self, JwtError> {
        let kid = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>());
        Self::from_key_for(kid, key, alg, not_after)
    }

    /// Wraps an existing key that signs with `alg` (`None`: its type's default).
    pub fn from_key_for(
        kid: String,
        key: impl Into<AuthorityKey>,
        alg: Option<SigningAlg>,
        not_after: SystemTime,
    ) -> Result<Self, JwtError> {
        let key = key.into();
        let alg = check_pair(key.key_type(), alg)?;
        let signer = match &key {
            AuthorityKey::External(k) => Signer::External(k.key().clone()),
            AuthorityKey::Software(software) => Self::software_signer(software, alg)?,
        };
        Ok(Self {
            kid,
            key,
            alg,
            signer,
            not_after,
        })
    }

    fn software_signer(key: &PrivateKey, alg: SigningAlg) -> Result<Signer, JwtError> {
        Ok(if key.key_type().is_rsa() {
            Signer::Rsa(Box::new(
                ring::signature::RsaKeyPair::from_pkcs8(&key.to_pkcs8_der())
                    .map_err(|e| JwtError::Key(format!("RSA key: {e}")))?,
            ))
        } else {
            let fixed = match alg {
                SigningAlg::Es384 => &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                _ => &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            };
            Signer::Ec(Box::new(
                ring::signature::EcdsaKeyPair::from_pkcs8(
                    fixed,
                    &key.to_pkcs8_der(),
                    &ring::rand::SystemRandom::new(),
                )
                .map_err(|e| JwtError::Key(format!("ECDSA key: {e}")))?,
            ))
        })
    }

    /// The algorithm this key signs with.
    pub fn alg(&self) -> SigningAlg {
        self.alg
    }

    /// Key ID.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The signing key (a software one is persisted into the CA Secret; an external one
    /// by its reference).
    pub fn key(&self) -> &AuthorityKey {
        &self.key
    }

    /// When this key stops being published.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The public authority to publish in bundles.
    pub fn authority(&self) -> JwtAuthority {
        let mut jwk = Jwk::from_spki(&self.key.public_key_der()).unwrap_or_default();
        jwk.kid = Some(self.kid.clone());
        jwk.use_ = Some(crate::bundle::USE_JWT.into());
        // An RSA key's JWK alone does not say RS256 or PS256; relying parties that pick
        // keys by alg (OIDC, Azure) and Sigil's own validation read it here.
        jwk.alg = Some(self.alg.name().into());
        JwtAuthority {
            kid: self.kid.clone(),
            jwk,
        }
    }

    /// Mints a JWT-SVID for `id` valid for `ttl` from `now`.
    pub fn mint(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
        issuer: Option<&str>,
    ) -> Result<String, JwtError> {
        if audience.is_empty() || audience.iter().any(|a| a.is_empty()) {
            return Err(JwtError::NoAudience);
        }
        let mut header = Header::new(self.alg.jose());
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let iat = unix_seconds(now);
        let mut claims = Map::new();
        claims.insert("sub".into(), Value::String(id.to_string()));
        claims.insert(
            "aud".into(),
            if audience.len() == 1 {
                Value::String(audience[0].clone())
            } else {
                audience.iter().cloned().map(Value::String).collect()
            },
        );
        claims.insert("exp".into(), Value::from(iat + ttl.as_secs() as i64));
        claims.insert("iat".into(), Value::from(iat));
        if let Some(iss) = issuer {
            claims.insert("iss".into(), Value::String(iss.into()));
        }
        let input = format!("{}.{}", b64_json(&header)?, b64_json(&claims)?);
        match &self.signer {
            Signer::Ec(pair) => {
                let sig = pair
                    .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
                    .map_err(|_| JwtError::Key("ECDSA signing failed".into()))?;
                Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
            }
            Signer::Rsa(pair) => {
                let padding: &dyn ring::signature::RsaEncoding = match self.alg {
                    SigningAlg::Ps256 => &ring::signature::RSA_PSS_SHA256,
                    _ => &ring::signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0u8; pair.public().modulus_len()];
                pair.sign(
                    padding,
                    &ring::rand::SystemRandom::new(),
                    input.as_bytes(),
                    &mut sig,
                )
                .map_err(|_| JwtError::Key("RSA signing failed".into()))?;
                Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
            }
            Signer::External(key) => {
                let scheme = match self.alg {
                    SigningAlg::Es384 => SignScheme::EcdsaP384Sha384,
                    SigningAlg::Rs256 => SignScheme::RsaPkcs1Sha256,
                    SigningAlg::Ps256 => SignScheme::RsaPssSha256,
                    SigningAlg::Es256 => SignScheme::EcdsaP256Sha256,
                };
                let sig = key
                    .sign(scheme, input.as_bytes())
                    .map_err(|e| JwtError::Key(format!("key {}: {e}", key.reference())))?;
                Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
            }
        }
    }
}

/// The base64url of `v`'s JSON (a JWS header or payload).
fn b64_json<T: serde::Serialize>(v: &T) -> Result<String, JwtError> {
    serde_json::to_vec(v)
        .map(|j| URL_SAFE_NO_PAD.encode(j))
        .map_err(|e| JwtError::Key(e.to_string()))
}

/// The algorithm a key of `key_type` signs with given the choice `alg`, or why it cannot.
fn check_pair(key_type: KeyType, alg: Option<SigningAlg>) -> Result<SigningAlg, JwtError> {
    match alg {
        Some(a) if a.fits(key_type) => Ok(a),
        Some(a) => Err(JwtError::Key(format!(
            "a {key_type} key cannot sign {a}: ES256 needs ECDSA-P256, ES384 ECDSA-P384, RS256 and PS256 an RSA key"
        ))),
        None => SigningAlg::default_for(key_type).ok_or_else(|| {
            JwtError::Key(format!(
                "{key_type} keys cannot sign JWT-SVIDs; use ECDSA-P256, ECDSA-P384, RSA-2048, RSA-3072 or RSA-4096"
            ))
        }),
    }
}

/// A decoded JSON object (JOSE header or claims).
pub type JsonObject = Map<String, Value>;

/// What validation proved about a JWT-SVID.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJwt {
    /// The subject.
    pub spiffe_id: SpiffeId,
    /// The audience values.
    pub audience: Vec<String>,
    /// Expiry.
    pub expiry: SystemTime,
    /// All claims.
    pub claims: Map<String, Value>,
}

/// The header and claims of a token, decoded without verification (for display and for
/// choosing the bundle); never trust these before [`validate_jwt_svid`] succeeds.
pub fn peek(token: &str) -> Result<(JsonObject, JsonObject), JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLong(token.len()));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let decode = |s: &str, what: &str| -> Result<Map<String, Value>, JwtError> {
        let raw = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|e| JwtError::Malformed(format!("{what} is not base64url: {e}")))?;
        match serde_json::from_slice(&raw) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(JwtError::Malformed(format!("{what} is not a JSON object"))),
        }
    };
    Ok((decode(h, "header")?, decode(c, "claims")?))
}

/// Validates a JWT-SVID against `bundles`, for `audience`, at `now`.
pub fn validate_jwt_svid(
    token: &str,
    bundles: &BundleSet,
    audience: &str,
    now: SystemTime,
) -> Result<ValidatedJwt, JwtError> {
    let (header, claims) = peek(token)?;
    // 1. alg allow-list first.
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !ALLOWED_ALGS.contains(&alg_name) {
        return Err(JwtError::DisallowedAlg(alg_name.to_owned()));
    }
    if let Some(crit) = header.get("crit") {
        // RFC 7515 4.1.11: a validator MUST reject a token whose crit names an extension it
        // does not understand. Sigil understands none (JWT-SVID.md 2 allows no other header).
        return Err(JwtError::CriticalHeader(crit.to_string()));
    }
    if let Some(typ) = header.get("typ") {
        let t = typ.as_str().unwrap_or_default();
        if t != "JWT" && t != "JOSE" {
            return Err(JwtError::BadTyp(t.to_owned()));
        }
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
        .ok_or(JwtError::MissingKid)?;
    // 2. The subject picks the bundle; it is re-read from verified claims below.
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtError::MissingClaim("sub"))?;
    let id = SpiffeId::parse(sub).map_err(JwtError::InvalidSubject)?;
    let bundle = bundles
        .get(id.trust_domain())
        .ok_or_else(|| JwtError::NoBundle(id.trust_domain().name().to_owned()))?;
    let authority = bundle
        .jwt_authority(kid)
        .ok_or_else(|| JwtError::UnknownKid {
            kid: kid.to_owned(),
            trust_domain: id.trust_domain().name().to_owned(),
        })?;
    if let Some(key_alg) = authority.jwk.alg.as_deref()
        && key_alg != alg_name
    {
        return Err(JwtError::KeyAlgMismatch {
            kid: kid.to_owned(),
            key_alg: key_alg.to_owned(),
            token_alg: alg_name.to_owned(),
        });
    }
    // 3. Signature.
    let claims = if alg_name == "ES512" {
        verify_es512(token, &authority.jwk, kid)?;
        claims
    } else {
        let alg: Algorithm = alg_name
            .parse()
            .map_err(|_| JwtError::DisallowedAlg(alg_name.to_owned()))?;
        let key = decoding_key(&authority.jwk)?;
        let mut v = Validation::new(alg);
        v.validate_exp = false; // checked below against the injectable clock
        v.validate_nbf = false;
        v.validate_aud = false;
        v.required_spec_claims = HashSet::new();
        jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    JwtError::BadSignature(kid.to_owned())
                }
                _ => JwtError::Malformed(e.to_string()),
            })?
            .claims
    };
    // 4. Claims.
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or(JwtError::MissingClaim("exp"))?;
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf
            .as_i64()
            .ok_or_else(|| JwtError::Malformed("nbf is not a NumericDate".into()))?;
        if nbf > unix_seconds(now) + NBF_LEEWAY.as_secs() as i64 {
            return Err(JwtError::NotYetValid(crate::x509::rfc3339(nbf)));
        }
    }
    let aud: Vec<String> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => return Err(JwtError::MissingClaim("aud")),
    };
    if aud.is_empty() {
        return Err(JwtError::MissingClaim("aud"));
    }
    if exp <= unix_seconds(now) {
        return Err(JwtError::Expired(crate::x509::rfc3339(exp)));
    }
    if !aud.iter().any(|a| a == audience) {
        return Err(JwtError::AudienceMismatch {
            expected: audience.to_owned(),
            got: aud,
        });
    }
    Ok(ValidatedJwt {
        spiffe_id: id,
        audience: aud,
        expiry: from_unix_seconds(exp),
        claims,
    })
}

/// Verifies an ES512 (ECDSA P-521, SHA-512) signature over the token's signing input.
fn verify_es512(token: &str, jwk: &Jwk, kid: &str) -> Result<(), JwtError> {
    use p521::ecdsa::signature::Verifier;
    let key = p521_key(jwk)?;
    let (input, sig) = token
        .rsplit_once('.')
        .ok_or_else(|| JwtError::Malformed("expected three dot-separated parts".into()))?;
    let raw = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|e| JwtError::Malformed(format!("signature is not base64url: {e}")))?;
    let sig = p521::ecdsa::Signature::from_slice(&raw)
        .map_err(|_| JwtError::BadSignature(kid.to_owned()))?;
    key.verify(input.as_bytes(), &sig)
        .map_err(|_| JwtError::BadSignature(kid.to_owned()))
}

/// The P-521 verifying key of an EC JWK.
fn p521_key(jwk: &Jwk) -> Result<p521::ecdsa::VerifyingKey, JwtError> {
    if jwk.kty != "EC" || jwk.crv.as_deref() != Some("P-521") {
        return Err(JwtError::Key(format!(
            "ES512 needs an EC P-521 key; the bundle's key is {} {:?}",
            jwk.kty, jwk.crv
        )));
    }
    let coord = |name: &str, v: Option<&str>| -> Result<Vec<u8>, JwtError> {
        let b = URL_SAFE_NO_PAD
            .decode(v.ok_or_else(|| JwtError::Key(format!("EC JWK lacks {name}")))?)
            .map_err(|e| JwtError::Key(format!("EC JWK {name} is not base64url: {e}")))?;
        if b.len() != 66 {
            return Err(JwtError::Key(format!(
                "P-521 JWK {name} is {} bytes; it must be 66",
                b.len()
            )));
        }
        Ok(b)
    };
    let mut sec1 = vec![4u8];
    sec1.extend(coord("x", jwk.x.as_deref())?);
    sec1.extend(coord("y", jwk.y.as_deref())?);
    p521::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
        .map_err(|_| JwtError::Key("the P-521 JWK is not a point on the curve".into()))
}

/// Checks a bundle JWK can verify JWT-SVIDs (its key parameters are usable).
pub fn check_jwk(jwk: &Jwk) -> Result<(), JwtError> {
    if jwk.kty == "EC" && jwk.crv.as_deref() == Some("P-521") {
        p521_key(jwk).map(|_| ())
    } else {
        decoding_key(jwk).map(|_| ())
    }
}

/// A verification key from a bundle JWK (P-256, P-384 or RSA; P-521 keys are read by
/// ES512 validation itself).
pub fn decoding_key(jwk: &Jwk) -> Result<DecodingKey, JwtError> {
    let missing = |p: &str| JwtError::Key(format!("{} JWK lacks {p}", jwk.kty));
    match jwk.kty.as_str() {
        "EC" => {
            match jwk.crv.as_deref() {
                Some("P-256") | Some("P-384") => {}
                other => {
                    return Err(JwtError::Key(format!(
                        "EC curve {other:?} is not supported here (P-256, P-384; P-521 is ES512's)"
                    )));
                }
            }
            let x = jwk.x.as_deref().ok_or_else(|| missing("x"))?;
            let y = jwk.y.as_deref().ok_or_else(|| missing("y"))?;
            DecodingKey::from_ec_components(x, y).map_err(|e| JwtError::Key(e.to_string()))
        }
        "RSA" => {
            let n = jwk.n.as_deref().ok_or_else(|| missing("n"))?;
            let e = jwk.e.as_deref().ok_or_else(|| missing("e"))?;
            DecodingKey::from_rsa_components(n, e).map_err(|e| JwtError::Key(e.to_string()))
        }
        other => Err(JwtError::Key(format!(
            "key type {other:?} cannot verify JWT-SVIDs"
        ))),
    }
}
