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
    /// certificates). Every PEM block must be a certificate that parses and is a CA
    /// (basicConstraints CA:TRUE; keyCertSign when it has a keyUsage): an EK or other leaf
    /// certificate in the bundle would otherwise be trusted to sign EK certificates.
    /// Validity is not checked here ([`Self::not_valid_at`] says which are not valid now;
    /// [`verify`] refuses an EK certificate whose only issuer in the bundle is not).
    pub fn from_pem(pem_text: &str) -> Result<Self, String> {
        let certs = sigil_identity::x509::certs_from_pem(pem_text).map_err(|e| e.to_string())?;
        for (i, der) in certs.iter().enumerate() {
            let (_, cert) = X509Certificate::from_der(der)
                .map_err(|e| format!("certificate {i} does not parse: {e}"))?;
            if let Err(why) = check_ca(&cert) {
                return Err(format!(
                    "certificate {i} ({}) {why}: only the manufacturers' CA certificates (roots and the intermediates that issue EK certificates) belong in the bundle; remove it",
                    cert.subject()
                ));
            }
        }
        if certs.is_empty() {
            return Err("no certificates in the bundle".into());
        }
        Ok(Self { certs })
    }

    /// The CA certificates that are not valid at `now`, described (subject and validity),
    /// for the operator to warn about at start.
    pub fn not_valid_at(&self, now: SystemTime) -> Vec<String> {
        let Ok(at) = asn1_time(now) else {
            return vec![];
        };
        self.certs
            .iter()
            .filter_map(|der| X509Certificate::from_der(der).ok())
            .filter(|(_, ca)| !ca.validity().is_valid_at(at))
            .map(|(_, ca)| {
                format!(
                    "CA certificate {} is not valid now (valid {} .. {}): EK certificates it issued are refused; replace it in the bundle",
                    ca.subject(),
                    ca.validity().not_before,
                    ca.validity().not_after
                )
            })
            .collect()
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
    let at = asn1_time(now)?;
    // The CAs of the bundle that signed it (each checked again to be a CA, whatever built
    // the bundle), and whether each is valid now.
    let issuers: Vec<(bool, String)> = cas
        .certs
        .iter()
        .filter_map(|der| X509Certificate::from_der(der).ok())
        .filter(|(_, ca)| {
            ca.subject().as_raw() == cert.issuer().as_raw()
                && check_ca(ca).is_ok()
                && cert.verify_signature(Some(ca.public_key())).is_ok()
        })
        .map(|(_, ca)| {
            let validity = ca.validity();
            (
                validity.is_valid_at(at),
                format!(
                    "{} (valid {} .. {})",
                    ca.subject(),
                    validity.not_before,
                    validity.not_after
                ),
            )
        })
        .collect();
    if issuers.is_empty() {
        return Err(TpmError::UntrustedEkCertificate {
            issuer: cert.issuer().to_string(),
        });
    }
    if !cert.validity().is_valid_at(at) {
        return Err(TpmError::EkCertificateNotValid(format!(
            "valid {} .. {}",
            cert.validity().not_before,
            cert.validity().not_after
        )));
    }
    if !issuers.iter().any(|(valid, _)| *valid) {
        let ca = issuers.first().map(|(_, d)| d.clone()).unwrap_or_default();
        return Err(TpmError::EkCaNotValid(ca));
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

fn asn1_time(now: SystemTime) -> Result<ASN1Time, TpmError> {
    ASN1Time::from_timestamp(sigil_identity::clock::unix_seconds(now))
        .map_err(|e| TpmError::BadEkCertificate(format!("time: {e}")))
}

/// A certificate may sign EK certificates: basicConstraints CA:TRUE and, when it has a
/// keyUsage, keyCertSign.
fn check_ca(cert: &X509Certificate<'_>) -> Result<(), &'static str> {
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Err("is not a CA certificate (basicConstraints CA:TRUE is missing)"),
        Err(_) => return Err("has a malformed basicConstraints extension"),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            Err("is not allowed to sign certificates (its keyUsage lacks keyCertSign)")
        }
        Ok(_) => Ok(()),
        Err(_) => Err("has a malformed keyUsage extension"),
    }
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[first..]
}
