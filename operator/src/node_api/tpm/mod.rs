//! TPM node attestation, the operator's side: EK/AK credential activation (docs/tpm.md).
//!
//! 1. [`verify_identity`]: the EK certificate chains to a configured manufacturer CA and
//!    is valid now; the EK public area is the certificate's key, an RSA-2048-class storage
//!    key with the TCG default symmetric scheme; the AK is a restricted signing key that
//!    can't leave the TPM (fixedTPM, fixedParent, not decrypt).
//! 2. [`Challenge::new`]: a fresh random secret bound to the AK's Name with MakeCredential
//!    against the EK ([`credential`]), with a deadline.
//! 3. [`Challenge::check`]: the answer is that secret (constant-time), in time.
//!
//! Which Kubernetes Node the TPM is is decided by the Node API service (a Node annotation,
//! [`EK_ANNOTATION`]); this module knows nothing of Kubernetes.
//!
//! It must not log secrets: neither the challenge secret nor the seed ever leave this
//! module except inside the encrypted challenge.

pub mod credential;
pub mod ek;
pub mod public;

use std::time::{Duration, SystemTime};

use sigil_identity::entry::Selector;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

pub use ek::ManufacturerCas;
use public::{PublicKey, TpmPublic, attr};

/// The Node annotation that enrols a TPM: its value is the hex SHA-256 of the EK's
/// SubjectPublicKeyInfo DER, the same hash that ends the agent's SPIFFE ID.
pub const EK_ANNOTATION: &str = "sigil.dev/tpm-ek-sha256";
/// Agent SPIFFE ID path prefix for TPM-attested agents.
pub const AGENT_PATH_PREFIX: &str = "/sigil/agent/tpm/";
/// Selector type of TPM facts.
pub const SELECTOR_TYPE: &str = "tpm";

/// TPM attestation settings.
#[derive(Debug, Clone)]
pub struct TpmConfig {
    /// The manufacturer CAs EK certificates must chain to.
    pub manufacturer_cas: ManufacturerCas,
    /// How long the agent has to answer a challenge.
    pub challenge_timeout: Duration,
    /// Refuse agents that attest with a service-account token alone (`--require-tpm`):
    /// AttestNode is refused, and PSAT agent SVIDs are refused on every call.
    pub required: bool,
}

/// Why TPM attestation failed. Each maps to a precise gRPC status and a metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    /// The message sequence is wrong (identity first, then the activated secret).
    #[error("{0}")]
    Protocol(String),
    /// The EK certificate is not a certificate we can read.
    #[error("EK certificate: {0}")]
    BadEkCertificate(String),
    /// The EK certificate is not signed by a configured manufacturer CA.
    #[error(
        "EK certificate issued by {issuer:?} does not chain to a configured manufacturer CA (add that CA to the operator's --tpm-ek-ca-bundle)"
    )]
    UntrustedEkCertificate {
        /// The certificate's issuer DN.
        issuer: String,
    },
    /// Not yet valid or expired.
    #[error("EK certificate is not valid now: {0}")]
    EkCertificateNotValid(String),
    /// The bundle CA that issued the EK certificate is not yet valid or expired.
    #[error(
        "the manufacturer CA that issued the EK certificate, {0}, is not valid now; update the operator's --tpm-ek-ca-bundle"
    )]
    EkCaNotValid(String),
    /// A public area that does not parse.
    #[error("{field}: {reason}")]
    BadPublic {
        /// Which request field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An EK we do not support (not RSA, not AES-128-CFB, not a SHA-256 name...).
    #[error("unsupported endorsement key: {0}")]
    UnsupportedEk(String),
    /// `ek_public` is not the key in the EK certificate.
    #[error("identity.ek_public is not the key certified by identity.ek_certificate")]
    EkMismatch,
    /// The AK lacks a required property.
    #[error("identity.ak_public is not an attestation key: {0}")]
    NotAnAttestationKey(String),
    /// The answer is not the secret of this challenge.
    #[error(
        "credential activation answer does not match the challenge (the TPM does not hold both the EK and the AK)"
    )]
    WrongAnswer,
    /// The answer came after the deadline.
    #[error("challenge deadline passed before the answer arrived (answer within {0:?})")]
    DeadlineExceeded(Duration),
    /// MakeCredential failed on our side.
    #[error("making the challenge: {0}")]
    Internal(String),
}

impl TpmError {
    /// The gRPC status for this failure.
    pub fn to_status(&self) -> tonic::Status {
        let m = self.to_string();
        match self {
            Self::Protocol(_)
            | Self::BadEkCertificate(_)
            | Self::BadPublic { .. }
            | Self::UnsupportedEk(_) => tonic::Status::invalid_argument(m),
            Self::UntrustedEkCertificate { .. }
            | Self::EkCertificateNotValid(_)
            | Self::EkCaNotValid(_)
            | Self::EkMismatch
            | Self::NotAnAttestationKey(_)
            | Self::WrongAnswer => tonic::Status::permission_denied(m),
            Self::DeadlineExceeded(_) => tonic::Status::deadline_exceeded(m),
            Self::Internal(_) => tonic::Status::internal(m),
        }
    }

    /// Metric label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Protocol(_) => "tpm_protocol",
            Self::BadEkCertificate(_) => "tpm_bad_ek_certificate",
            Self::UntrustedEkCertificate { .. } => "tpm_ek_untrusted",
            Self::EkCertificateNotValid(_) => "tpm_ek_not_valid",
            Self::EkCaNotValid(_) => "tpm_ek_ca_not_valid",
            Self::BadPublic { .. } => "tpm_bad_public",
            Self::UnsupportedEk(_) => "tpm_unsupported_ek",
            Self::EkMismatch => "tpm_ek_mismatch",
            Self::NotAnAttestationKey(_) => "tpm_ak_attributes",
            Self::WrongAnswer => "tpm_wrong_answer",
            Self::DeadlineExceeded(_) => "tpm_challenge_expired",
            Self::Internal(_) => "tpm_internal",
        }
    }
}

/// A TPM identity that passed every static check.
#[derive(Debug, Clone)]
pub struct VerifiedTpm {
    /// Hex SHA-256 of the EK SubjectPublicKeyInfo DER.
    pub ek_hash: String,
    /// Path of the agent SPIFFE ID: `/sigil/agent/tpm/<ek_hash>`.
    pub agent_path: String,
    /// `tpm:` selectors from the EK certificate.
    pub selectors: Vec<Selector>,
    ek_modulus: Vec<u8>,
    ek_exponent: u32,
    ak_name: Vec<u8>,
}

/// Checks the EK certificate, the EK public area and the AK public area.
pub fn verify_identity(
    cfg: &TpmConfig,
    ek_certificate: &[u8],
    ek_public: &[u8],
    ak_public: &[u8],
    now: SystemTime,
) -> Result<VerifiedTpm, TpmError> {
    let cert = ek::verify(ek_certificate, &cfg.manufacturer_cas, now)?;
    let bad = |field| {
        move |e: public::PublicError| TpmError::BadPublic {
            field,
            reason: e.to_string(),
        }
    };
    let ek = TpmPublic::from_tpm2b(ek_public).map_err(bad("identity.ek_public"))?;
    let ak = TpmPublic::from_tpm2b(ak_public).map_err(bad("identity.ak_public"))?;

    // The EK: the certificate's key, and a key MakeCredential can target.
    let PublicKey::Rsa {
        exponent, modulus, ..
    } = &ek.key
    else {
        return Err(TpmError::UnsupportedEk(
            "only RSA endorsement keys are supported".into(),
        ));
    };
    let exponent = if *exponent == 0 { 65537 } else { *exponent };
    let modulus: &[u8] = modulus;
    let modulus = modulus.strip_prefix(&[0u8][..]).unwrap_or(modulus);
    if modulus != cert.rsa_modulus.as_slice() || exponent != cert.rsa_exponent {
        return Err(TpmError::EkMismatch);
    }
    if ek.name_alg != public::ALG_SHA256 {
        return Err(TpmError::UnsupportedEk(format!(
            "name algorithm 0x{:04x}; only SHA-256 is supported",
            ek.name_alg
        )));
    }
    if ek.symmetric != Some((public::ALG_AES, 128, public::ALG_CFB)) {
        return Err(TpmError::UnsupportedEk(
            "EK symmetric scheme is not AES-128-CFB (the TCG default EK template)".into(),
        ));
    }
    if !ek.has(attr::RESTRICTED | attr::DECRYPT | attr::FIXED_TPM) {
        return Err(TpmError::UnsupportedEk(
            "EK is not a restricted, fixedTPM decryption key".into(),
        ));
    }

    // The AK: only a key that can't leave this TPM and signs only TPM-made data proves
    // anything when it activates the credential.
    let ak_name = ak.name().ok_or_else(|| {
        TpmError::NotAnAttestationKey(format!(
            "name algorithm 0x{:04x}; only SHA-256 is supported",
            ak.name_alg
        ))
    })?;
    for (bit, what) in [
        (attr::RESTRICTED, "restricted"),
        (attr::SIGN, "sign"),
        (attr::FIXED_TPM, "fixedTPM"),
        (attr::FIXED_PARENT, "fixedParent"),
    ] {
        if !ak.has(bit) {
            return Err(TpmError::NotAnAttestationKey(format!("it is not {what}")));
        }
    }
    if ak.has(attr::DECRYPT) {
        return Err(TpmError::NotAnAttestationKey(
            "it is a decryption key".into(),
        ));
    }

    let sel = |k: &str, v: &str| Selector::new(SELECTOR_TYPE, format!("{k}:{v}"));
    let mut selectors = vec![
        sel("ek_sha256", &cert.spki_sha256),
        sel("ek_issuer", &cert.issuer),
    ];
    if !cert.subject.is_empty() {
        selectors.push(sel("ek_subject", &cert.subject));
    }
    for (k, v) in [
        ("manufacturer", &cert.manufacturer),
        ("model", &cert.model),
        ("version", &cert.version),
    ] {
        if let Some(v) = v {
            selectors.push(sel(k, v));
        }
    }
    Ok(VerifiedTpm {
        agent_path: format!("{AGENT_PATH_PREFIX}{}", cert.spki_sha256),
        ek_hash: cert.spki_sha256,
        selectors,
        ek_modulus: cert.rsa_modulus,
        ek_exponent: cert.rsa_exponent,
        ak_name,
    })
}

/// One outstanding challenge: the secret only the attested TPM can recover.
#[derive(Debug)]
pub struct Challenge {
    secret: Zeroizing<[u8; 32]>,
    /// What the agent gets.
    pub credential: credential::Credential,
    /// After this, the answer is refused.
    pub deadline: SystemTime,
    timeout: Duration,
}

impl Challenge {
    /// A fresh challenge for `tpm`, due `timeout` after `now`.
    pub fn new(tpm: &VerifiedTpm, now: SystemTime, timeout: Duration) -> Result<Self, TpmError> {
        use rand_core::{OsRng, RngCore};
        let mut secret = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(secret.as_mut());
        let credential = credential::make_credential(
            &tpm.ek_modulus,
            tpm.ek_exponent,
            &tpm.ak_name,
            secret.as_ref(),
            &mut OsRng,
        )
        .map_err(|e| TpmError::Internal(e.to_string()))?;
        Ok(Self {
            secret,
            credential,
            deadline: now + timeout,
            timeout,
        })
    }

    /// Accepts `answer` if it is this challenge's secret and arrived by the deadline.
    pub fn check(&self, answer: &[u8], now: SystemTime) -> Result<(), TpmError> {
        if now > self.deadline {
            return Err(TpmError::DeadlineExceeded(self.timeout));
        }
        if answer.len() != self.secret.len() || !bool::from(answer.ct_eq(self.secret.as_ref())) {
            return Err(TpmError::WrongAnswer);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rsa::pkcs8::EncodePublicKey;
    use rsa::rand_core::OsRng;
    use rsa::traits::PublicKeyParts;
    use rsa::{RsaPrivateKey, RsaPublicKey};

    const EK_ATTRS: u32 = 0x0003_00b2;
    const AK_ATTRS: u32 = attr::FIXED_TPM
        | attr::FIXED_PARENT
        | attr::SENSITIVE_DATA_ORIGIN
        | attr::RESTRICTED
        | attr::SIGN
        | (1 << 6);

    /// A TPM2B_PUBLIC for an RSA key: an EK (AES-128-CFB, no scheme) or a signing key
    /// (no symmetric, RSASSA-SHA256).
    fn rsa_public(attributes: u32, storage: bool, modulus: &[u8]) -> Vec<u8> {
        let mut v = vec![];
        v.extend(public::ALG_RSA.to_be_bytes());
        v.extend(public::ALG_SHA256.to_be_bytes());
        v.extend(attributes.to_be_bytes());
        v.extend(0u16.to_be_bytes());
        if storage {
            v.extend(public::ALG_AES.to_be_bytes());
            v.extend(128u16.to_be_bytes());
            v.extend(public::ALG_CFB.to_be_bytes());
            v.extend(public::ALG_NULL.to_be_bytes());
        } else {
            v.extend(public::ALG_NULL.to_be_bytes());
            v.extend(0x0014u16.to_be_bytes()); // RSASSA
            v.extend(public::ALG_SHA256.to_be_bytes());
        }
        v.extend(2048u16.to_be_bytes());
        v.extend(0u32.to_be_bytes());
        v.extend((modulus.len() as u16).to_be_bytes());
        v.extend(modulus);
        let mut out = (v.len() as u16).to_be_bytes().to_vec();
        out.extend(v);
        out
    }

    struct Fixture {
        cfg: TpmConfig,
        ek: RsaPrivateKey,
        cert: Vec<u8>,
        ek_public: Vec<u8>,
        ak_public: Vec<u8>,
    }

    fn fixture() -> Fixture {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Unit EK CA");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let ek = RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
        let spki = RsaPublicKey::from(&ek).to_public_key_der().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .signed_by(
                &rcgen::SubjectPublicKeyInfo::from_der(spki.as_bytes()).unwrap(),
                &issuer,
            )
            .unwrap()
            .der()
            .to_vec();
        let modulus = ek.n().to_bytes_be();
        Fixture {
            cfg: TpmConfig {
                manufacturer_cas: ManufacturerCas::from_pem(&ca_pem).unwrap(),
                challenge_timeout: Duration::from_secs(5),
                required: false,
            },
            ek_public: rsa_public(EK_ATTRS, true, &modulus),
            ak_public: rsa_public(AK_ATTRS, false, &[9; 256]),
            ek,
            cert,
        }
    }

    /// The fuzz targets' seeds (fuzz/seeds) are inputs the parsers accept, so fuzzing
    /// starts from real structure; a parser change that refuses them shows here.
    #[test]
    fn the_fuzz_seeds_are_accepted_inputs() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        let read = |p: &str| std::fs::read(seeds.join(p)).unwrap();
        let ek = TpmPublic::from_tpm2b(&read("tpm_public/ek-rsa.tpm2b")).unwrap();
        assert!(ek.has(attr::RESTRICTED | attr::DECRYPT | attr::FIXED_TPM));
        assert!(matches!(ek.key, PublicKey::Rsa { bits: 2048, .. }));
        for ak in ["tpm_public/ak-rsa.tpm2b", "tpm_public/ak-ecc.tpm2b"] {
            let ak = TpmPublic::from_tpm2b(&read(ak)).unwrap();
            assert!(ak.has(AK_ATTRS), "{ak:?}");
        }
        let der = read("tpm_ek_certificate/ek-rsa.der");
        let (_, cert) = x509_parser::prelude::FromDer::from_der(&der).unwrap();
        let described = ek::describe(&cert).unwrap();
        assert_eq!(described.manufacturer.as_deref(), Some("id:53544D20"));
        assert_eq!(described.model.as_deref(), Some("ST33HTPHAHD4"));
        // The seed EK certificate certifies the seed EK public area's key.
        let PublicKey::Rsa { modulus, .. } = ek.key else {
            unreachable!()
        };
        assert_eq!(described.rsa_modulus, modulus);
    }

    #[test]
    fn checks_the_ek_and_the_ak_and_judges_answers() {
        let f = fixture();
        let now = SystemTime::now();
        let ok = verify_identity(&f.cfg, &f.cert, &f.ek_public, &f.ak_public, now).unwrap();
        assert_eq!(ok.agent_path, format!("{AGENT_PATH_PREFIX}{}", ok.ek_hash));
        assert!(
            ok.selectors
                .iter()
                .any(|s| s.value == format!("ek_sha256:{}", ok.ek_hash))
        );

        // ek_public must be the certified key.
        let other = rsa_public(EK_ATTRS, true, &[3; 256]);
        assert_eq!(
            verify_identity(&f.cfg, &f.cert, &other, &f.ak_public, now).unwrap_err(),
            TpmError::EkMismatch
        );
        // Each AK rule on its own.
        for (attrs, says) in [
            (AK_ATTRS & !attr::RESTRICTED, "not restricted"),
            (AK_ATTRS & !attr::SIGN, "not sign"),
            (AK_ATTRS & !attr::FIXED_TPM, "not fixedTPM"),
            (AK_ATTRS & !attr::FIXED_PARENT, "not fixedParent"),
            (AK_ATTRS | attr::DECRYPT, "decryption key"),
        ] {
            let ak = rsa_public(attrs, false, &[9; 256]);
            let err = verify_identity(&f.cfg, &f.cert, &f.ek_public, &ak, now).unwrap_err();
            assert!(
                matches!(err, TpmError::NotAnAttestationKey(ref m) if m.contains(says)),
                "{err}"
            );
            assert_eq!(err.to_status().code(), tonic::Code::PermissionDenied);
        }
        // An EK certificate from a CA not in the bundle; one not valid yet.
        let stranger = fixture();
        assert!(matches!(
            verify_identity(
                &f.cfg,
                &stranger.cert,
                &stranger.ek_public,
                &f.ak_public,
                now
            ),
            Err(TpmError::UntrustedEkCertificate { .. })
        ));
        // rcgen's default validity starts in 1975.
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400);
        assert!(matches!(
            verify_identity(&f.cfg, &f.cert, &f.ek_public, &f.ak_public, later),
            Err(TpmError::EkCertificateNotValid(_))
        ));

        // The bundle: CA certificates only; an issuer that is not valid now signs nothing.
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["tls.example".into()]).unwrap();
        leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
        let leaf_pem = leaf.self_signed(&leaf_key).unwrap().pem();
        let e = ManufacturerCas::from_pem(&leaf_pem).unwrap_err();
        assert!(e.contains("certificate 0") && e.contains("not a CA"), "{e}");
        let mut no_sign = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        no_sign.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        no_sign.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let no_sign_pem = no_sign.self_signed(&leaf_key).unwrap().pem();
        let e = ManufacturerCas::from_pem(&no_sign_pem).unwrap_err();
        assert!(e.contains("keyCertSign"), "{e}");
        assert!(f.cfg.manufacturer_cas.not_valid_at(now).is_empty());
        // rcgen's default validity ends in 4096.
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(2_200 * 365 * 86_400);
        assert_eq!(f.cfg.manufacturer_cas.not_valid_at(far).len(), 1);

        // The challenge: only its own secret, only in time. The EK's private key stands in
        // for the TPM here (credential.rs tests the blob layout).
        let c = Challenge::new(&ok, now, f.cfg.challenge_timeout).unwrap();
        let seed =
            f.ek.decrypt(
                rsa::Oaep::new_with_label::<sha2::Sha256, _>("IDENTITY\0"),
                &c.credential.encrypted_secret,
            )
            .unwrap();
        assert_eq!(seed.len(), 32);
        assert_eq!(c.check(&[0; 32], now), Err(TpmError::WrongAnswer));
        assert_eq!(c.check(&[], now), Err(TpmError::WrongAnswer));
        let secret = c.secret.to_vec();
        assert_eq!(c.check(&secret, now), Ok(()));
        assert_eq!(
            c.check(&secret, c.deadline + Duration::from_secs(1)),
            Err(TpmError::DeadlineExceeded(f.cfg.challenge_timeout))
        );
    }
}
