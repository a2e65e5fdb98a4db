//! TPM2_MakeCredential in software (TPM 2.0 Part 1, §24 "Credential Protection"; Part 3
//! §12.6), for an RSA endorsement key. The operator has no TPM: it seals a secret so that
//! only the TPM holding both the EK (to recover the seed) and an object with the given Name
//! (the AK) can release it with TPM2_ActivateCredential.
//!
//! - seed: random, as long as the EK's name-algorithm digest, encrypted to the EK with
//!   RSA-OAEP (SHA-256, label "IDENTITY\0") → the encrypted secret;
//! - symKey = KDFa(SHA-256, seed, "STORAGE", Name(AK), ∅, 128);
//!   encIdentity = AES-128-CFB(symKey, IV = 0, TPM2B_DIGEST(secret));
//! - HMACkey = KDFa(SHA-256, seed, "INTEGRITY", ∅, ∅, 256);
//!   outerHMAC = HMAC-SHA-256(HMACkey, encIdentity || Name(AK));
//! - credential blob (the TPM2B_ID_OBJECT's buffer) = TPM2B_DIGEST(outerHMAC) || encIdentity.

use aes::Aes128;
use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use rsa::{BigUint, Oaep, RsaPublicKey};
use sha2::Sha256;
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;
type Aes128CfbEnc = cfb_mode::Encryptor<Aes128>;

/// What MakeCredential produces, as TPM2_ActivateCredential takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// The TPM2B_ID_OBJECT buffer (without its own size field).
    pub credential_blob: Vec<u8>,
    /// The TPM2B_ENCRYPTED_SECRET buffer (the RSA-OAEP ciphertext, without its size).
    pub encrypted_secret: Vec<u8>,
}

/// Why MakeCredential could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// The EK's RSA key is not usable (bad modulus or exponent).
    #[error("EK public key: {0}")]
    BadKey(String),
    /// The secret is longer than a SHA-256 digest (TPM2B_DIGEST).
    #[error("secret of {0} bytes is longer than 32")]
    SecretTooLong(usize),
    /// RSA encryption failed.
    #[error("RSA-OAEP: {0}")]
    Encrypt(String),
}

/// KDFa (Part 1, §11.4.10.2) with HMAC-SHA-256 in counter mode: `bits` of key material
/// from `key`, `label` (a NUL terminator is added), and the two contexts.
pub fn kdfa_sha256(
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        // HMAC accepts keys of any length.
        let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
            break;
        };
        mac.update(&counter.to_be_bytes());
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// Binds `secret` to the object named `name` (the AK's Name, nameAlg || digest) for the
/// RSA EK with `modulus` and `exponent` (0 = 65537), using an AES-128-CFB, SHA-256 EK (the
/// TCG default template).
pub fn make_credential(
    modulus: &[u8],
    exponent: u32,
    name: &[u8],
    secret: &[u8],
    rng: &mut impl rsa::rand_core::CryptoRngCore,
) -> Result<Credential, CredentialError> {
    if secret.len() > 32 {
        return Err(CredentialError::SecretTooLong(secret.len()));
    }
    let e = if exponent == 0 { 65537 } else { exponent };
    let ek = RsaPublicKey::new(BigUint::from_bytes_be(modulus), BigUint::from(e))
        .map_err(|e| CredentialError::BadKey(e.to_string()))?;

    let mut seed = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(seed.as_mut());
    let encrypted_secret = ek
        .encrypt(
            rng,
            Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
            seed.as_ref(),
        )
        .map_err(|e| CredentialError::Encrypt(e.to_string()))?;

    let sym_key = Zeroizing::new(kdfa_sha256(seed.as_ref(), "STORAGE", name, &[], 128));
    let hmac_key = Zeroizing::new(kdfa_sha256(seed.as_ref(), "INTEGRITY", &[], &[], 256));

    // encIdentity: the secret as a TPM2B_DIGEST, encrypted in place.
    let mut enc_identity = Vec::with_capacity(2 + secret.len());
    enc_identity.extend_from_slice(&(secret.len() as u16).to_be_bytes());
    enc_identity.extend_from_slice(secret);
    Aes128CfbEnc::new_from_slices(&sym_key, &[0u8; 16])
        .map_err(|e| CredentialError::Encrypt(e.to_string()))?
        .encrypt(&mut enc_identity);

    let mut mac = HmacSha256::new_from_slice(&hmac_key)
        .map_err(|e| CredentialError::Encrypt(e.to_string()))?;
    mac.update(&enc_identity);
    mac.update(name);
    let integrity = mac.finalize().into_bytes();

    let mut credential_blob = Vec::with_capacity(2 + integrity.len() + enc_identity.len());
    credential_blob.extend_from_slice(&(integrity.len() as u16).to_be_bytes());
    credential_blob.extend_from_slice(&integrity);
    credential_blob.extend_from_slice(&enc_identity);
    Ok(Credential {
        credential_blob,
        encrypted_secret,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rsa::RsaPrivateKey;
    use rsa::rand_core::OsRng;
    use rsa::traits::PublicKeyParts;

    /// Undoes [`make_credential`] the way TPM2_ActivateCredential does, with the EK's
    /// private key, so the blob layout is checked end to end without a TPM. (The swtpm
    /// test in tests/tpm.rs checks it against a real TPM.)
    fn activate(ek: &RsaPrivateKey, name: &[u8], c: &Credential) -> Result<Vec<u8>, &'static str> {
        let seed = ek
            .decrypt(
                Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
                &c.encrypted_secret,
            )
            .map_err(|_| "seed")?;
        let hmac_key = kdfa_sha256(&seed, "INTEGRITY", &[], &[], 256);
        let size = u16::from_be_bytes([c.credential_blob[0], c.credential_blob[1]]) as usize;
        let (integrity, enc) = c.credential_blob[2..].split_at(size);
        let mut mac = HmacSha256::new_from_slice(&hmac_key).unwrap();
        mac.update(enc);
        mac.update(name);
        mac.verify_slice(integrity).map_err(|_| "integrity")?;
        let sym = kdfa_sha256(&seed, "STORAGE", name, &[], 128);
        let mut plain = enc.to_vec();
        cfb_mode::Decryptor::<Aes128>::new_from_slices(&sym, &[0; 16])
            .unwrap()
            .decrypt(&mut plain);
        let n = u16::from_be_bytes([plain[0], plain[1]]) as usize;
        Ok(plain[2..2 + n].to_vec())
    }

    #[test]
    fn kdfa_matches_its_definition_over_two_blocks() {
        let key = b"seed";
        let out = kdfa_sha256(key, "STORAGE", b"u", b"v", 384);
        assert_eq!(out.len(), 48);
        let block = |i: u32| {
            let mut m = HmacSha256::new_from_slice(key).unwrap();
            m.update(&i.to_be_bytes());
            m.update(b"STORAGE\0uv");
            m.update(&384u32.to_be_bytes());
            m.finalize().into_bytes().to_vec()
        };
        assert_eq!(&out[..32], &block(1)[..]);
        assert_eq!(&out[32..], &block(2)[..16]);
    }

    #[test]
    fn only_the_right_ek_and_name_recover_the_secret() {
        let ek = RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
        let other = RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
        let name = [&[0x00, 0x0b][..], &[5; 32]].concat();
        let secret = [42u8; 32];
        let modulus = ek.n().to_bytes_be();
        let c = make_credential(&modulus, 0, &name, &secret, &mut OsRng).unwrap();
        assert_eq!(c.encrypted_secret.len(), 256);
        assert_eq!(c.credential_blob.len(), 2 + 32 + 2 + 32);
        assert_eq!(activate(&ek, &name, &c).unwrap(), secret);
        assert_eq!(activate(&other, &name, &c), Err("seed"));
        let mut wrong_name = name.clone();
        wrong_name[5] ^= 1;
        assert_eq!(activate(&ek, &wrong_name, &c), Err("integrity"));
        assert!(matches!(
            make_credential(&modulus, 0, &name, &[0; 33], &mut OsRng),
            Err(CredentialError::SecretTooLong(33))
        ));
    }
}
