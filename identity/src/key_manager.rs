//! Where a trust domain's signing keys live: in software (the CA Secret holds them), or in
//! a key manager that never hands them out (a PKCS#11 HSM; a cloud KMS would plug in the
//! same way).
//!
//! An [`AuthorityKey`] is what a [`crate::ca::CertificateAuthority`] and a
//! [`crate::jwt::JwtKey`] sign with. It is either a [`PrivateKey`] in this process, or an
//! [`ExternalKey`]: a handle that asks its keeper to sign and knows only the public key
//! and a [`KeyReference`] (stored in the CA Secret in the key's place).
//!
//! A [`KeyManager`] makes, finds and destroys authority keys. [`SoftwareKeys`] is the
//! default; the operator's PKCS#11 manager is the other.

use std::fmt;
use std::sync::Arc;

use rcgen::{PublicKeyData, SignatureAlgorithm, SigningKey};
use serde::{Deserialize, Serialize};

use crate::keys::{KeyError, KeyType, PrivateKey};

/// How a signature is made. The message is given whole: the keeper hashes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignScheme {
    /// ECDSA P-256 over SHA-256; the signature is the fixed-size `r || s` (64 bytes).
    EcdsaP256Sha256,
    /// ECDSA P-384 over SHA-384; the signature is the fixed-size `r || s` (96 bytes).
    EcdsaP384Sha384,
    /// RSA PKCS#1 v1.5 with SHA-256.
    RsaPkcs1Sha256,
    /// RSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt.
    RsaPssSha256,
}

/// Where an external key lives: written to the CA Secret in place of the key. Not secret.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyReference {
    /// The key manager that holds it ([`KeyManager::name`]), e.g. `pkcs11`.
    pub manager: String,
    /// The key's ID in that manager (for PKCS#11, the hex `CKA_ID` shared by the key pair).
    pub id: String,
}

impl fmt::Display for KeyReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.manager, self.id)
    }
}

/// A private key held outside this process. It signs on request; its secret never comes
/// out.
pub trait ExternalKey: Send + Sync {
    /// The key's algorithm.
    fn key_type(&self) -> KeyType;
    /// Its SubjectPublicKeyInfo, DER.
    fn public_key_der(&self) -> &[u8];
    /// Signs `message` (whole; the keeper hashes it). ECDSA signatures are `r || s`.
    fn sign(&self, scheme: SignScheme, message: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// Where it lives.
    fn reference(&self) -> &KeyReference;
}

/// The key a CA or a JWT key signs with.
#[derive(Clone)]
pub enum AuthorityKey {
    /// In this process; persisted (PKCS#8) in the CA Secret.
    Software(Arc<PrivateKey>),
    /// In a key manager; only its reference is persisted.
    External(ExternalAuthorityKey),
}

/// An [`ExternalKey`] with the parts rcgen asks for, worked out once.
#[derive(Clone)]
pub struct ExternalAuthorityKey {
    key: Arc<dyn ExternalKey>,
    /// The public key as rcgen wants it: the SPKI's bit string (for EC, the point).
    raw_public: Vec<u8>,
    algorithm: &'static SignatureAlgorithm,
    /// Why the last certificate signature failed (rcgen's error has no room for it).
    last_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl fmt::Debug for ExternalAuthorityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalAuthorityKey")
            .field("reference", self.key.reference())
            .field("key_type", &self.key.key_type())
            .finish_non_exhaustive()
    }
}

impl ExternalAuthorityKey {
    /// Wraps `key`; refuses algorithms an external key cannot sign certificates with.
    pub fn new(key: Arc<dyn ExternalKey>) -> Result<Self, KeyError> {
        use x509_parser::prelude::FromDer;
        let key_type = key.key_type();
        if key_type == KeyType::Ed25519 {
            return Err(KeyError::Generate(
                key_type,
                "an external (HSM) key must be ECDSA-P256, ECDSA-P384 or RSA".into(),
            ));
        }
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(key.public_key_der())
            .map_err(|e| KeyError::Parse(format!("external key's public key: {e}")))?;
        let raw_public = spki.subject_public_key.data.to_vec();
        Ok(Self {
            raw_public,
            algorithm: key_type.signature_algorithm(),
            key,
            last_error: Arc::default(),
        })
    }

    /// The key itself.
    pub fn key(&self) -> &Arc<dyn ExternalKey> {
        &self.key
    }

    /// Why the last certificate signature failed, if one did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|l| l.clone())
    }
}

impl From<PrivateKey> for AuthorityKey {
    fn from(key: PrivateKey) -> Self {
        AuthorityKey::Software(Arc::new(key))
    }
}

impl AuthorityKey {
    /// The key's algorithm.
    pub fn key_type(&self) -> KeyType {
        match self {
            AuthorityKey::Software(k) => k.key_type(),
            AuthorityKey::External(k) => k.key.key_type(),
        }
    }

    /// Its SubjectPublicKeyInfo, DER.
    pub fn public_key_der(&self) -> Vec<u8> {
        match self {
            AuthorityKey::Software(k) => k.public_key_der(),
            AuthorityKey::External(k) => k.key.public_key_der().to_vec(),
        }
    }

    /// The software key, when it is one (to persist it).
    pub fn software(&self) -> Option<&PrivateKey> {
        match self {
            AuthorityKey::Software(k) => Some(k),
            AuthorityKey::External(_) => None,
        }
    }

    /// Where an external key lives (`None` for a software key).
    pub fn reference(&self) -> Option<&KeyReference> {
        match self {
            AuthorityKey::Software(_) => None,
            AuthorityKey::External(k) => Some(k.key.reference()),
        }
    }

    /// A short public fingerprint (hex SHA-256 of the SPKI, first 8 bytes) for logs.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(self.public_key_der())[..8])
    }
}

impl fmt::Debug for AuthorityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthorityKey::Software(k) => k.fmt(f),
            AuthorityKey::External(k) => write!(
                f,
                "ExternalKey({}, {}, spki-sha256:{})",
                k.key.key_type(),
                k.key.reference(),
                self.fingerprint()
            ),
        }
    }
}

impl PublicKeyData for AuthorityKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            AuthorityKey::Software(k) => k.key_pair().der_bytes(),
            AuthorityKey::External(k) => &k.raw_public,
        }
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self {
            AuthorityKey::Software(k) => k.key_pair().algorithm(),
            AuthorityKey::External(k) => k.algorithm,
        }
    }
}

impl SigningKey for AuthorityKey {
    /// Certificate signatures: ECDSA ones are DER `ECDSA-Sig-Value`s, as X.509 wants.
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            AuthorityKey::Software(k) => k.key_pair().sign(msg),
            AuthorityKey::External(k) => {
                let scheme = x509_scheme(k.key.key_type());
                let sig = k.key.sign(scheme, msg).map_err(|e| {
                    // rcgen's error for a remote key carries no text: keep the cause for
                    // the caller ([`ExternalAuthorityKey::last_error`]).
                    if let Ok(mut last) = k.last_error.lock() {
                        *last = Some(e.to_string());
                    }
                    rcgen::Error::RemoteKeyError
                })?;
                match scheme {
                    SignScheme::EcdsaP256Sha256 | SignScheme::EcdsaP384Sha384 => {
                        ecdsa_fixed_to_der(&sig).ok_or(rcgen::Error::RemoteKeyError)
                    }
                    _ => Ok(sig),
                }
            }
        }
    }
}

/// The scheme a CA key of `key_type` signs certificates with (rcgen's algorithm for it).
fn x509_scheme(key_type: KeyType) -> SignScheme {
    match key_type {
        KeyType::EcP384 => SignScheme::EcdsaP384Sha384,
        t if t.is_rsa() => SignScheme::RsaPkcs1Sha256,
        _ => SignScheme::EcdsaP256Sha256,
    }
}

/// `r || s` (equal halves) as a DER `SEQUENCE { INTEGER r, INTEGER s }`.
pub fn ecdsa_fixed_to_der(sig: &[u8]) -> Option<Vec<u8>> {
    if sig.is_empty() || !sig.len().is_multiple_of(2) || sig.len() > 132 {
        return None;
    }
    let (r, s) = sig.split_at(sig.len() / 2);
    let int = |v: &[u8]| {
        let v = &v[v.iter().position(|b| *b != 0).unwrap_or(v.len() - 1)..];
        let mut out = vec![0x02];
        let pad = v[0] & 0x80 != 0;
        push_len(&mut out, v.len() + usize::from(pad));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    };
    let body = [int(r), int(s)].concat();
    let mut out = vec![0x30];
    push_len(&mut out, body.len());
    out.extend(body);
    Some(out)
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        out.extend([0x81, len as u8]);
    }
}

/// The SubjectPublicKeyInfo of an EC public key given as its uncompressed point.
pub fn ec_spki(key_type: KeyType, point: &[u8]) -> Result<Vec<u8>, KeyError> {
    // DER prefixes: SEQUENCE { SEQUENCE { id-ecPublicKey, curve }, BIT STRING (0 unused) }.
    let prefix: &[u8] = match (key_type, point.len()) {
        (KeyType::EcP256, 65) => &[
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ],
        (KeyType::EcP384, 97) => &[
            0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x05, 0x2b, 0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
        ],
        _ => {
            return Err(KeyError::Parse(format!(
                "a {key_type} public point of {} bytes",
                point.len()
            )));
        }
    };
    if point.first() != Some(&0x04) {
        return Err(KeyError::Parse("EC point is not uncompressed".into()));
    }
    Ok([prefix, point].concat())
}

/// The SubjectPublicKeyInfo of an RSA public key given as its modulus and exponent
/// (big-endian).
pub fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Result<Vec<u8>, KeyError> {
    use rsa::pkcs8::EncodePublicKey;
    let key = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(modulus),
        rsa::BigUint::from_bytes_be(exponent),
    )
    .map_err(|e| KeyError::Parse(format!("RSA public key: {e}")))?;
    let der = key
        .to_public_key_der()
        .map_err(|e| KeyError::Parse(format!("RSA public key: {e}")))?;
    Ok(der.as_bytes().to_vec())
}

/// Makes, finds and destroys authority keys. Calls may block (an HSM round trip, RSA
/// generation): call them where blocking is allowed.
pub trait KeyManager: Send + Sync + fmt::Debug {
    /// The name written into [`KeyReference::manager`] (`secret` keeps keys in the CA
    /// Secret and makes no references).
    fn name(&self) -> &str;
    /// Makes a new key of `key_type`. `label` says what it is for (kept with the key where
    /// the keeper allows, e.g. `CKA_LABEL`); it is not secret and not unique.
    fn generate(&self, key_type: KeyType, label: &str) -> Result<AuthorityKey, KeyError>;
    /// Finds the key `reference` names.
    fn load(&self, reference: &KeyReference) -> Result<AuthorityKey, KeyError>;
    /// Destroys a key that will never sign again. Destroying a key that is already gone
    /// succeeds.
    fn destroy(&self, reference: &KeyReference) -> Result<(), KeyError>;
}

/// Keys in software: generated here, persisted (PKCS#8) in the CA Secret. The default.
#[derive(Debug, Default, Clone, Copy)]
pub struct SoftwareKeys;

/// [`SoftwareKeys::name`]: the operator's `--key-manager secret`, since the keys go to
/// the CA Secret.
pub const SECRET: &str = "secret";

impl KeyManager for SoftwareKeys {
    fn name(&self) -> &str {
        SECRET
    }

    fn generate(&self, key_type: KeyType, _label: &str) -> Result<AuthorityKey, KeyError> {
        PrivateKey::generate(key_type).map(AuthorityKey::from)
    }

    fn load(&self, reference: &KeyReference) -> Result<AuthorityKey, KeyError> {
        Err(KeyError::Unavailable(format!(
            "key {reference} is held by key manager {:?}, but this operator keeps keys in software: start it with that key manager (--key-manager {})",
            reference.manager, reference.manager
        )))
    }

    fn destroy(&self, _reference: &KeyReference) -> Result<(), KeyError> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fixed_ecdsa_signatures_become_der_with_sign_padding_and_no_leading_zeros() {
        let mut sig = vec![0u8; 64];
        sig[0] = 0x80; // r's high bit set: needs a 0x00 pad
        sig[31] = 1;
        sig[32] = 0; // s has leading zeros: stripped
        sig[33] = 0;
        sig[34] = 0x7f;
        sig[63] = 2;
        let der = ecdsa_fixed_to_der(&sig).unwrap();
        let parsed = der_integers(&der);
        assert_eq!(parsed[0].len(), 33);
        assert_eq!(parsed[0][0], 0);
        assert_eq!(parsed[1].len(), 30);
        assert_eq!(parsed[1][0], 0x7f);
        assert!(ecdsa_fixed_to_der(&[1, 2, 3]).is_none());
    }

    fn der_integers(der: &[u8]) -> Vec<Vec<u8>> {
        assert_eq!(der[0], 0x30);
        assert_eq!(der[1] as usize, der.len() - 2);
        let mut out = vec![];
        let mut i = 2;
        while i < der.len() {
            assert_eq!(der[i], 0x02);
            let n = der[i + 1] as usize;
            out.push(der[i + 2..i + 2 + n].to_vec());
            i += 2 + n;
        }
        out
    }

    #[test]
    fn spkis_built_from_public_parts_equal_the_software_keys_own() {
        for t in [KeyType::EcP256, KeyType::EcP384] {
            let k = PrivateKey::generate(t).unwrap();
            assert_eq!(
                ec_spki(t, k.public_key_raw()).unwrap(),
                k.public_key_der(),
                "{t}"
            );
        }
        let k = PrivateKey::generate(KeyType::Rsa2048).unwrap();
        let pk = rsa::RsaPublicKey::try_from(
            rsa::pkcs8::SubjectPublicKeyInfoRef::try_from(k.public_key_der().as_slice()).unwrap(),
        )
        .unwrap();
        use rsa::traits::PublicKeyParts;
        assert_eq!(
            rsa_spki(&pk.n().to_bytes_be(), &pk.e().to_bytes_be()).unwrap(),
            k.public_key_der()
        );
        assert!(ec_spki(KeyType::EcP256, &[4; 10]).is_err());
    }

    #[test]
    fn software_keys_refuse_a_reference_and_name_the_flag() {
        let r = KeyReference {
            manager: "pkcs11".into(),
            id: "ab".into(),
        };
        let e = SoftwareKeys.load(&r).unwrap_err().to_string();
        assert!(
            e.contains("pkcs11:ab") && e.contains("--key-manager pkcs11"),
            "{e}"
        );
    }
}
