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
