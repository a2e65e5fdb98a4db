//! Private keys: generation, PEM/PKCS#8 round trips, and the public parts we publish.
//!
//! Key material never appears in `Debug` output or logs; serialised forms are returned in
//! [`Zeroizing`] buffers so they are wiped when dropped.

use std::fmt;

use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Key algorithms Sigil can generate or load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256 (the default everywhere).
    #[default]
    #[serde(rename = "ECDSA-P256")]
    EcP256,
    /// ECDSA on P-384 with SHA-384.
    #[serde(rename = "ECDSA-P384")]
    EcP384,
    /// Ed25519. Allowed for X.509 CAs and SVIDs; not for JWT-SVIDs (the spec's algorithm
    /// list has no EdDSA).
    #[serde(rename = "Ed25519")]
    Ed25519,
    /// RSA-2048 with PKCS#1 v1.5 SHA-256.
    #[serde(rename = "RSA-2048")]
    Rsa2048,
    /// RSA-3072 with PKCS#1 v1.5 SHA-256.
    #[serde(rename = "RSA-3072")]
    Rsa3072,
    /// RSA-4096 with PKCS#1 v1.5 SHA-256.
    #[serde(rename = "RSA-4096")]
    Rsa4096,
    /// RSA of another size, with PKCS#1 v1.5 SHA-256: loaded (an upstream CA key), never
    /// generated.
    #[serde(rename = "RSA")]
    Rsa,
}

impl KeyType {
    /// The signature algorithm a key of this type signs with.
    pub fn signature_algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 | KeyType::Rsa => {
                &rcgen::PKCS_RSA_SHA256
            }
        }
    }

    /// Whether this is one of the RSA types.
    pub fn is_rsa(self) -> bool {
        self.rsa_bits().is_some() || self == KeyType::Rsa
    }

    /// The modulus size of the RSA types Sigil generates.
    pub fn rsa_bits(self) -> Option<usize> {
        match self {
            KeyType::Rsa2048 => Some(2048),
            KeyType::Rsa3072 => Some(3072),
            KeyType::Rsa4096 => Some(4096),
            _ => None,
        }
    }

    /// The RSA type of a key of `bits` (the generic [`KeyType::Rsa`] for sizes Sigil does
    /// not generate).
    fn rsa_of_size(bits: usize) -> Self {
        match bits {
            2048 => KeyType::Rsa2048,
            3072 => KeyType::Rsa3072,
            4096 => KeyType::Rsa4096,
            _ => KeyType::Rsa,
        }
    }

    fn from_algorithm(alg: &SignatureAlgorithm) -> Option<Self> {
        if [
            &rcgen::PKCS_RSA_SHA256,
            &rcgen::PKCS_RSA_SHA384,
            &rcgen::PKCS_RSA_SHA512,
        ]
        .contains(&alg)
        {
            return Some(KeyType::Rsa);
        }
        [KeyType::EcP256, KeyType::EcP384, KeyType::Ed25519]
            .into_iter()
            .find(|t| t.signature_algorithm() == alg)
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyType::EcP256 => "ECDSA-P256",
            KeyType::EcP384 => "ECDSA-P384",
            KeyType::Ed25519 => "Ed25519",
            KeyType::Rsa2048 => "RSA-2048",
            KeyType::Rsa3072 => "RSA-3072",
            KeyType::Rsa4096 => "RSA-4096",
            KeyType::Rsa => "RSA",
        })
    }
}

impl std::str::FromStr for KeyType {
    type Err = KeyError;

    /// The names [`fmt::Display`] writes, which are also the CRDs' spellings.
    fn from_str(s: &str) -> Result<Self, KeyError> {
        [
            KeyType::EcP256,
            KeyType::EcP384,
            KeyType::Ed25519,
            KeyType::Rsa2048,
            KeyType::Rsa3072,
            KeyType::Rsa4096,
            KeyType::Rsa,
        ]
        .into_iter()
        .find(|t| t.to_string() == s)
        .ok_or_else(|| KeyError::UnknownType(s.to_owned()))
    }
}

/// Errors from key handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key could not be generated.
    #[error("cannot generate a {0} key: {1}")]
    Generate(KeyType, String),
    /// A key type name that is none of [`KeyType`]'s.
    #[error(
        "unknown key type {0:?}: use ECDSA-P256, ECDSA-P384, Ed25519, RSA-2048, RSA-3072 or RSA-4096"
    )]
    UnknownType(String),
    /// The PEM/DER was not a private key we understand.
    #[error(
        "private key is not a PKCS#8, SEC1 or PKCS#1 key of a supported type (ECDSA P-256/P-384, Ed25519, RSA): {0}"
    )]
    Parse(String),
    /// A key manager (an HSM, a KMS) could not be reached, or refused an operation.
    #[error("{0}")]
    Unavailable(String),
}

/// A private key. `Debug` prints only its type and public key fingerprint.
pub struct PrivateKey {
    pair: KeyPair,
    key_type: KeyType,
}

impl PrivateKey {
    /// Generates a fresh key of `key_type`.
    ///
    /// RSA keys take long to generate (a random prime search): measured by `make bench`
    /// (`signing`) on a loaded 2-core machine, RSA-2048 a median of 0.4 s, RSA-3072 1.3 s,
    /// RSA-4096 1.9 s with a tail past 5 s, against 22 µs for P-256. Call this from
    /// `spawn_blocking` (or another thread that may block) for RSA types.
    pub fn generate(key_type: KeyType) -> Result<Self, KeyError> {
        if key_type == KeyType::Rsa {
            return Err(KeyError::Generate(
                key_type,
                "an RSA key needs a size: use RSA-2048, RSA-3072 or RSA-4096".into(),
            ));
        }
        if let Some(bits) = key_type.rsa_bits() {
            return Self::generate_rsa(key_type, bits);
        }
        let pair = KeyPair::generate_for(key_type.signature_algorithm())
            .map_err(|e| KeyError::Generate(key_type, e.to_string()))?;
        Ok(Self { pair, key_type })
    }

    /// ring signs with RSA keys but cannot make them: the RustCrypto `rsa` crate finds the
    /// primes, and ring (through rcgen) does every signature after that, in constant time.
    fn generate_rsa(key_type: KeyType, bits: usize) -> Result<Self, KeyError> {
        use rsa::pkcs8::EncodePrivateKey;
        let generate = |e: &dyn fmt::Display| KeyError::Generate(key_type, e.to_string());
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, bits).map_err(|e| generate(&e))?;
        let der = key.to_pkcs8_der().map_err(|e| generate(&e))?;
        let pair = KeyPair::try_from(der.as_bytes()).map_err(|e| generate(&e))?;
        Ok(Self { pair, key_type })
    }

    /// Loads a PEM private key (PKCS#8, or SEC1 `EC PRIVATE KEY`, or PKCS#1 `RSA PRIVATE KEY`).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let pair = KeyPair::from_pem(pem).map_err(|e| KeyError::Parse(e.to_string()))?;
        Self::from_pair(pair)
    }

    /// Loads a PKCS#8 DER private key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let pair = KeyPair::try_from(der).map_err(|e| KeyError::Parse(e.to_string()))?;
        Self::from_pair(pair)
    }

    fn from_pair(pair: KeyPair) -> Result<Self, KeyError> {
        let mut key_type = KeyType::from_algorithm(pair.algorithm()).ok_or_else(|| {
            KeyError::Parse(format!("unsupported algorithm {:?}", pair.algorithm()))
        })?;
        if key_type == KeyType::Rsa {
            key_type = KeyType::rsa_of_size(rsa_modulus_bits(&pair.subject_public_key_info()));
        }
        Ok(Self { pair, key_type })
    }

    /// The key's algorithm.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// PKCS#8 DER, wiped on drop.
    pub fn to_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.pair.serialize_der())
    }

    /// PKCS#8 PEM, wiped on drop.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.pair.serialize_pem())
    }

    /// The SubjectPublicKeyInfo DER of the public key.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.pair.subject_public_key_info()
    }

    /// The raw public key (for EC: the uncompressed point `04 || x || y`).
    pub fn public_key_raw(&self) -> &[u8] {
        self.pair.public_key_raw()
    }

    /// The underlying rcgen key pair, for signing certificates.
    pub fn key_pair(&self) -> &KeyPair {
        &self.pair
    }

    /// Gives up the wrapper for the rcgen key pair (to build an issuer that owns it).
    pub fn into_key_pair(self) -> KeyPair {
        self.pair
    }

    /// A short public fingerprint (hex SHA-256 of the SPKI, first 8 bytes) for logs.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(self.public_key_der())[..8])
    }
}

/// The modulus size of an RSA SubjectPublicKeyInfo (0 when it is not one).
fn rsa_modulus_bits(spki_der: &[u8]) -> usize {
    use x509_parser::prelude::FromDer;
    use x509_parser::public_key::PublicKey;
    let Ok((_, spki)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der) else {
        return 0;
    };
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
        _ => 0,
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PrivateKey({}, spki-sha256:{}, <redacted>)",
            self.key_type,
            self.fingerprint()
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generate_and_round_trip() {
        for t in [KeyType::EcP256, KeyType::EcP384, KeyType::Ed25519] {
            let k = PrivateKey::generate(t).unwrap();
            let back = PrivateKey::from_pem(&k.to_pkcs8_pem()).unwrap();
            assert_eq!(back.key_type(), t);
            assert_eq!(back.public_key_der(), k.public_key_der());
            let back = PrivateKey::from_pkcs8_der(&k.to_pkcs8_der()).unwrap();
            assert_eq!(back.public_key_der(), k.public_key_der());
        }
    }

    #[test]
    fn rsa_keys_of_each_size_are_generated_and_load_back_as_that_size() {
        for t in [KeyType::Rsa2048, KeyType::Rsa3072] {
            let k = PrivateKey::generate(t).unwrap();
            assert_eq!(k.key_type(), t);
            assert_eq!(rsa_modulus_bits(&k.public_key_der()), t.rsa_bits().unwrap());
            let back = PrivateKey::from_pem(&k.to_pkcs8_pem()).unwrap();
            assert_eq!(back.key_type(), t);
            assert_eq!(back.public_key_der(), k.public_key_der());
            assert!(back.key_type().is_rsa());
        }
    }

    #[test]
    fn an_rsa_key_without_a_size_is_refused_with_a_reason() {
        let e = PrivateKey::generate(KeyType::Rsa).unwrap_err();
        assert!(e.to_string().contains("RSA-2048"), "{e}");
    }

    #[test]
    fn key_type_names_round_trip_and_unknown_ones_list_the_choices() {
        for t in [KeyType::EcP256, KeyType::Rsa2048, KeyType::Rsa4096] {
            assert_eq!(t.to_string().parse::<KeyType>().unwrap(), t);
            assert_eq!(
                serde_json::to_value(t).unwrap(),
                serde_json::Value::String(t.to_string())
            );
        }
        let e = "RSA-1024".parse::<KeyType>().unwrap_err().to_string();
        assert!(e.contains("RSA-1024") && e.contains("RSA-2048"), "{e}");
    }

    #[test]
    fn debug_redacts() {
        let k = PrivateKey::generate(KeyType::EcP256).unwrap();
        let d = format!("{k:?}");
        assert!(d.contains("redacted"));
        assert!(!d.contains("PRIVATE"));
    }
}
