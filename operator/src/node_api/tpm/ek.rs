//! The endorsement key certificate: does it chain to a configured manufacturer CA, is it
//! valid now, and what does it say about the TPM (selectors).

use std::time::SystemTime;

use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::Oid;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey as X509PublicKey;
use x509_parser::time::ASN1Time;

use super::TpmError;

/// Largest EK certificate accepted.
pub const MAX_EK_CERT_LEN: usize = 8 * 1024;

/// TCG attribute OIDs in the EK certificate's SAN directoryName (EK Credential Profile
/// §3.2.9): manufacturer, model, firmware version.
const TCG_AT_TPM_MANUFACTURER: &str = "2.23.133.2.1";
const TCG_AT_TPM_MODEL: &str = "2.23.133.2.2";
const TCG_AT_TPM_VERSION: &str = "2.23.133.2.3";

/// The manufacturer CAs EK certificates must chain to.
#[derive(Debug, Clone, Default)]
pub struct ManufacturerCas {
    certs: Vec<Vec<u8>>,
}

impl ManufacturerCas {
    /// From a PEM bundle (manufacturer roots and the intermediates that sign EK
    /// certificates). Every PEM block must be a certificate that parses.
    pub fn from_pem(pem_text: &str) -> Result<Self, String> {
        let certs = sigil_identity::x509::certs_from_pem(pem_text).map_err(|e| e.to_string())?;
        for (i, der) in certs.iter().enumerate() {
            X509Certificate::from_der(der)
                .map_err(|e| format!("certificate {i} does not parse: {e}"))?;
        }
        if certs.is_empty() {
            return Err("no certificates in the bundle".into());
        }
        Ok(Self { certs })
    }

    /// How many CA certificates are configured.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

/// What a trusted EK certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkCertificate {
    /// RSA modulus (big-endian, no leading zero) and exponent of the EK.
    pub rsa_modulus: Vec<u8>,
    /// RSA public exponent.
    pub rsa_exponent: u32,
    /// Hex SHA-256 of the SubjectPublicKeyInfo DER: the TPM's stable identifier.
    pub spki_sha256: String,
    /// Subject DN (often empty for EK certificates).
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// TPM manufacturer, model and version from the SAN, when present.
    pub manufacturer: Option<String>,
    /// TPM model.
    pub model: Option<String>,
    /// TPM firmware version.
    pub version: Option<String>,
}

/// Parses `der`, checks it is valid at `now` and signed by one of `cas`, and returns the
/// EK's RSA key and descriptive fields.
pub fn verify(
    der: &[u8],
    cas: &ManufacturerCas,
    now: SystemTime,
) -> Result<EkCertificate, TpmError> {
    if der.is_empty() || der.len() > MAX_EK_CERT_LEN {
        return Err(TpmError::BadEkCertificate(format!(
            "ek_certificate must be 1..={MAX_EK_CERT_LEN} bytes of DER"
        )));
    }
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| TpmError::BadEkCertificate(format!("does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(TpmError::BadEkCertificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    let signed_by_ca = cas.certs.iter().any(|ca_der| {
        X509Certificate::from_der(ca_der).is_ok_and(|(_, ca)| {
            ca.subject().as_raw() == cert.issuer().as_raw()
                && cert.verify_signature(Some(ca.public_key())).is_ok()
        })
    });
    if !signed_by_ca {
        return Err(TpmError::UntrustedEkCertificate {
            issuer: cert.issuer().to_string(),
        });
    }
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let at = ASN1Time::from_timestamp(secs)
        .map_err(|e| TpmError::BadEkCertificate(format!("time: {e}")))?;
    if !cert.validity().is_valid_at(at) {
        return Err(TpmError::EkCertificateNotValid(format!(
            "valid {} .. {}",
            cert.validity().not_before,
            cert.validity().not_after
        )));
    }
    describe(&cert)
}

/// What an EK certificate says: its RSA key, the SHA-256 of its SubjectPublicKeyInfo and
/// the TCG SAN attributes. Checks nothing about trust; [`verify`] calls it only on a
/// certificate that chains to a configured CA and is valid now.
pub fn describe(cert: &X509Certificate<'_>) -> Result<EkCertificate, TpmError> {
    let (rsa_modulus, rsa_exponent) = match cert.public_key().parsed() {
        Ok(X509PublicKey::RSA(k)) => {
            let modulus = strip_zeros(k.modulus).to_vec();
            let e = strip_zeros(k.exponent);
            if e.len() > 4 {
                return Err(TpmError::UnsupportedEk(
                    "RSA exponent longer than 32 bits".into(),
                ));
            }
            let exponent = e.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
            (modulus, exponent)
        }
        Ok(_) => {
            return Err(TpmError::UnsupportedEk(
                "only RSA endorsement keys are supported (the certificate holds another key type)"
                    .into(),
            ));
        }
        Err(e) => return Err(TpmError::BadEkCertificate(format!("public key: {e}"))),
    };
    let spki_sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        cert.public_key().raw,
    ));

    let (mut manufacturer, mut model, mut version) = (None, None, None);
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            let GeneralName::DirectoryName(dn) = name else {
                continue;
            };
            for attr in dn.iter_attributes() {
                let value = attr.as_str().ok().map(str::to_owned);
                let oid: &Oid = attr.attr_type();
                match oid.to_id_string().as_str() {
                    TCG_AT_TPM_MANUFACTURER => manufacturer = value,
                    TCG_AT_TPM_MODEL => model = value,
                    TCG_AT_TPM_VERSION => version = value,
                    _ => {}
                }
            }
        }
    }
    Ok(EkCertificate {
        rsa_modulus,
        rsa_exponent,
        spki_sha256,
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        manufacturer,
        model,
        version,
    })
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[first..]
}
