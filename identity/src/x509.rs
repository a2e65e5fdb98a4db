//! X509-SVID parsing and validation per X509-SVID.md, CSR parsing, and PEM/DER helpers.
//!
//! Validation here is what a relying party does: the leaf must be a proper SVID (exactly
//! one SPIFFE ID URI SAN, not a CA, digitalSignature, no keyCertSign/cRLSign), and the
//! chain must be a valid RFC 5280 path (rustls-webpki) through CA certificates with
//! keyCertSign to an X.509 authority in the bundle of the leaf's trust domain.
//! Issuance lives in [`crate::ca`].

use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::bundle::TrustBundle;
use crate::id::{IdError, SpiffeId};

/// Longest chain (leaf included) we will walk; real SVID chains are 1-4 long.
pub const MAX_CHAIN_LEN: usize = 10;

/// Why an X509-SVID (or its chain) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The chain is empty.
    #[error("X509-SVID chain is empty")]
    EmptyChain,
    /// More certificates than [`MAX_CHAIN_LEN`].
    #[error("X509-SVID chain has {0} certificates; at most {MAX_CHAIN_LEN} are accepted")]
    ChainTooLong(usize),
    /// A certificate is not parseable DER.
    #[error("certificate {index} in the chain is not valid DER X.509: {reason}")]
    Malformed {
        /// Position in the chain (0 = leaf).
        index: usize,
        /// Parser message.
        reason: String,
    },
    /// The leaf has no URI SAN.
    #[error("X509-SVID has no URI SAN; an SVID carries its SPIFFE ID as exactly one URI SAN")]
    NoUriSan,
    /// The leaf has several URI SANs.
    #[error("X509-SVID has {0} URI SANs; exactly one is allowed")]
    MultipleUriSans(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("X509-SVID URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(#[from] IdError),
    /// The leaf's SPIFFE ID has no path (a trust domain's root ID).
    #[error("X509-SVID leaf carries {0}, a trust domain's ID; a leaf SVID's ID must have a path")]
    RootIdInLeaf(String),
    /// The leaf is a CA certificate.
    #[error("X509-SVID leaf has basicConstraints cA=true; a leaf SVID must not be a CA")]
    LeafIsCa,
    /// The leaf may sign certificates or CRLs.
    #[error("X509-SVID leaf has keyCertSign or cRLSign key usage, which leaf SVIDs must not have")]
    LeafCanSign,
    /// The leaf lacks digitalSignature.
    #[error("X509-SVID leaf lacks the digitalSignature key usage")]
    MissingDigitalSignature,
    /// Outside its validity period.
    #[error("certificate {index} in the chain expired at {not_after}")]
    Expired {
        /// Position in the chain.
        index: usize,
        /// RFC 3339 expiry.
        not_after: String,
    },
    /// Before its validity period.
    #[error("certificate {index} in the chain is not valid before {not_before}")]
    NotYetValid {
        /// Position in the chain.
        index: usize,
        /// RFC 3339 start.
        not_before: String,
    },
    /// The bundle is for another trust domain.
    #[error("X509-SVID is for trust domain {found:?} but the bundle is for {expected:?}")]
    WrongTrustDomain {
        /// The bundle's trust domain.
        expected: String,
        /// The SVID's trust domain.
        found: String,
    },
    /// An intermediate used to build the path is not a signing certificate.
    #[error(
        "certificate {index} in the chain is used as an issuer but is not a CA with keyCertSign"
    )]
    IssuerNotCa {
        /// Position in the chain.
        index: usize,
    },
    /// A CA on the path allows fewer CAs below it than the path has (pathLenConstraint).
    #[error("the X509-SVID chain breaks a CA's pathLenConstraint")]
    PathLenConstraint,
    /// A CA's name constraints exclude the SVID (URI constraints are not supported, so any
    /// URI name constraint on the path refuses the SVID, as RFC 5280 allows).
    #[error("the X509-SVID is outside a CA's name constraints")]
    NameConstraint,
    /// A certificate on the path has a critical extension the validator does not know.
    #[error("a certificate in the X509-SVID chain has an unsupported critical extension")]
    UnknownCriticalExtension,
    /// Path validation failed for another reason.
    #[error("X509-SVID chain is invalid: {0}")]
    InvalidPath(String),
    /// No path from the leaf to an authority in the bundle.
    #[error(
        "X509-SVID chain does not lead to any X.509 authority in the bundle for {trust_domain:?}"
    )]
    Untrusted {
        /// The trust domain whose bundle was used.
        trust_domain: String,
    },
}

/// Why a certificate signing request was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Not a DER PKCS#10 request.
    #[error("CSR is not a valid DER PKCS#10 request: {0}")]
    Malformed(String),
    /// Signature does not verify with the enclosed key.
    #[error("CSR signature does not verify with its own public key (proof of possession failed)")]
    BadSignature,
    /// No URI SAN in the request.
    #[error("CSR has no URI SAN; put the requested SPIFFE ID in a URI SAN")]
    NoUriSan,
    /// Several URI SANs.
    #[error("CSR has {0} URI SANs; request exactly one SPIFFE ID")]
    MultipleUriSans(usize),
    /// URI SAN is not a SPIFFE ID.
    #[error("CSR URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(#[from] IdError),
    /// Request is bigger than allowed.
    #[error("CSR is {0} bytes; at most {1} are accepted")]
    TooLarge(usize, usize),
}

/// The parts of a CSR a signer may use: the requested ID (to authorise) and the public key
/// (to certify). Everything else in a CSR is ignored by design.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCsr {
    /// The SPIFFE ID requested in the URI SAN.
    pub spiffe_id: SpiffeId,
    /// SubjectPublicKeyInfo DER of the key to certify.
    pub public_key_der: Vec<u8>,
}

/// Largest CSR accepted (an RSA-4096 CSR with a long ID is under 2 KiB).
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// Parses a DER CSR, verifies its self-signature, and extracts the one requested SPIFFE ID.
pub fn parse_csr(der: &[u8]) -> Result<ParsedCsr, CsrError> {
    let csr = verified_csr(der)?;
    let mut uris = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                uris.extend(san.general_names.iter().filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                }));
            }
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(CsrError::NoUriSan),
        [one] => *one,
        many => return Err(CsrError::MultipleUriSans(many.len())),
    };
    Ok(ParsedCsr {
        spiffe_id: SpiffeId::parse(uri)?,
        public_key_der: csr.certification_request_info.subject_pki.raw.to_vec(),
    })
}

/// Parses a DER CSR and verifies its self-signature (proof of possession), returning the
/// SubjectPublicKeyInfo DER and ignoring whatever ID it requests. For requests whose
/// identity comes from elsewhere, such as an agent's CSR whose ID follows from node
/// attestation.
pub fn parse_csr_public_key(der: &[u8]) -> Result<Vec<u8>, CsrError> {
    Ok(verified_csr(der)?
        .certification_request_info
        .subject_pki
        .raw
        .to_vec())
}

fn verified_csr(der: &[u8]) -> Result<X509CertificationRequest<'_>, CsrError> {
    if der.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge(der.len(), MAX_CSR_LEN));
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    Ok(csr)
}

/// Builds a DER PKCS#10 CSR for `key` requesting `id`: one URI SAN, empty subject. What
/// an agent sends for every workload key it makes.
pub fn build_csr(key: &crate::keys::PrivateKey, id: &SpiffeId) -> Result<Vec<u8>, CsrError> {
    let uri = id
        .as_str()
        .try_into()
        .map_err(|e: rcgen::Error| CsrError::Malformed(format!("{id} cannot be a URI SAN: {e}")))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params
        .serialize_request(key.key_pair())
        .map_err(|e| CsrError::Malformed(format!("building a CSR: {e}")))?;
    Ok(csr.der().to_vec())
}

/// What validation proved about an SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    /// The SVID's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The leaf's expiry.
    pub not_after: SystemTime,
}

/// Facts about a leaf certificate, without checking it chains anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    /// The SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number, hex.
    pub serial: String,
    /// Whether it carries Sigil's component policy ([`COMPONENT_POLICY_UUID`]), which
    /// only the SVIDs of agents, the operator and the bundle endpoint get.
    pub component: bool,
}

/// UUID of the certificate policy that marks the SVID of a Sigil component (agent,
/// operator, bundle endpoint). Its OID is `2.25.<this UUID as an integer>` (ITU-T X.667:
/// an OID made from a UUID needs no registration). The workload signing path never sets
/// it, so no workload SVID can pass for a component, whatever its SPIFFE ID says.
pub const COMPONENT_POLICY_UUID: u128 = 0x9064_0846_1d7c_47d4_9166_0489_9f79_61ed;

/// The DER content octets (no tag, no length) of the component policy's OID.
pub fn component_policy_oid() -> Vec<u8> {
    // First two arcs 2.25 make one octet (2 * 40 + 25); then the UUID in base 128,
    // most significant group first, every octet but the last with its high bit set.
    let mut groups = Vec::new();
    let mut v = COMPONENT_POLICY_UUID;
    loop {
        groups.push((v & 0x7f) as u8);
        v >>= 7;
        if v == 0 {
            break;
        }
    }
    let mut out = vec![2 * 40 + 25];
    for (i, g) in groups.iter().rev().enumerate() {
        out.push(if i + 1 < groups.len() { g | 0x80 } else { *g });
    }
    out
}

/// Whether `cert` lists the component policy in its certificatePolicies extension.
fn has_component_policy(cert: &X509Certificate<'_>) -> bool {
    let oid = component_policy_oid();
    cert.extensions()
        .iter()
        .any(|ext| match ext.parsed_extension() {
            ParsedExtension::CertificatePolicies(policies) => policies
                .iter()
                .any(|p| p.policy_id.as_bytes() == oid.as_slice()),
            _ => false,
        })
}

/// Reads the SPIFFE ID and lifetime of a leaf SVID, checking the leaf rules of the spec
/// (one URI SAN, not a CA, digitalSignature, no keyCertSign/cRLSign) but not its chain.
pub fn inspect_leaf(der: &[u8]) -> Result<LeafInfo, SvidError> {
    let cert = parse(der, 0)?;
    check_leaf(&cert)
}

fn check_leaf(cert: &X509Certificate<'_>) -> Result<LeafInfo, SvidError> {
    let mut uris = Vec::new();
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uris.push(*u),
                GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => *one,
        many => return Err(SvidError::MultipleUriSans(many.len())),
    };
    let spiffe_id = SpiffeId::parse(uri)?;
    if matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
        return Err(SvidError::LeafIsCa);
    }
    if spiffe_id.path().is_empty() {
        return Err(SvidError::RootIdInLeaf(spiffe_id.to_string()));
    }
    match cert.key_usage() {
        Ok(Some(ku)) => {
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                return Err(SvidError::LeafCanSign);
            }
            if !ku.value.digital_signature() {
                return Err(SvidError::MissingDigitalSignature);
            }
        }
        _ => return Err(SvidError::MissingDigitalSignature),
    }
    Ok(LeafInfo {
        spiffe_id,
        dns_names,
        not_before: crate::clock::from_unix_seconds(cert.validity().not_before.timestamp()),
        not_after: crate::clock::from_unix_seconds(cert.validity().not_after.timestamp()),
        serial: cert.raw_serial_as_string().replace(':', ""),
        component: has_component_policy(cert),
    })
}

/// Validates an X509-SVID chain (leaf first, then any intermediates) against the X.509
/// authorities of `bundle` at time `now`.
///
/// Path building and the RFC 5280 checks (signatures, validity, basicConstraints and
/// pathLenConstraint, name constraints, unknown critical extensions) are rustls-webpki's.
/// The SPIFFE rules are checked on top: the leaf rules ([`inspect_leaf`]), the leaf's trust
/// domain is the bundle's, every intermediate on the path is a CA with keyCertSign
/// (X509-SVID §4.3), and an authority of the bundle must be valid at `now`.
pub fn validate_x509_svid<C: AsRef<[u8]>>(
    chain: &[C],
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<VerifiedSvid, SvidError> {
    if chain.is_empty() {
        return Err(SvidError::EmptyChain);
    }
    if chain.len() > MAX_CHAIN_LEN {
        return Err(SvidError::ChainTooLong(chain.len()));
    }
    let certs = chain
        .iter()
        .enumerate()
        .map(|(i, c)| parse(c.as_ref(), i))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = check_leaf(&certs[0])?;
    if leaf.spiffe_id.trust_domain() != &bundle.trust_domain {
        return Err(SvidError::WrongTrustDomain {
            expected: bundle.trust_domain.name().to_owned(),
            found: leaf.spiffe_id.trust_domain().name().to_owned(),
        });
    }
    check_time(&certs[0], 0, now)?;
    let untrusted = || SvidError::Untrusted {
        trust_domain: bundle.trust_domain.name().to_owned(),
    };

    // Authorities that are CAs valid now; webpki does not look at a trust anchor's dates.
    let anchor_ders: Vec<CertificateDer<'_>> = bundle
        .x509_authorities
        .iter()
        .filter(|a| {
            X509Certificate::from_der(a)
                .is_ok_and(|(_, c)| is_signing_cert(&c) && c.validity().is_valid_at(to_asn1(now)))
        })
        .map(|a| CertificateDer::from(a.as_slice()))
        .collect();
    // Each anchor with its own pathLenConstraint, which webpki does not apply to anchors.
    let (anchors, anchor_path_lens): (Vec<rustls::pki_types::TrustAnchor<'_>>, Vec<Option<u32>>) =
        anchor_ders
            .iter()
            .filter_map(|a| {
                let anchor = webpki::anchor_from_trusted_cert(a).ok()?;
                let path_len = X509Certificate::from_der(a).ok().and_then(|(_, c)| {
                    c.basic_constraints()
                        .ok()
                        .flatten()
                        .and_then(|bc| bc.value.path_len_constraint)
                });
                Some((anchor, path_len))
            })
            .unzip();
    if anchors.is_empty() {
        return Err(untrusted());
    }
    let leaf_der = CertificateDer::from(chain[0].as_ref());
    let end_entity = webpki::EndEntityCert::try_from(&leaf_der).map_err(|e| match e {
        webpki::Error::UnsupportedCriticalExtension => SvidError::UnknownCriticalExtension,
        other => SvidError::Malformed {
            index: 0,
            reason: format!("{other:?}"),
        },
    })?;
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_ref()))
        .collect();
    // What webpki does not check: a signing certificate has keyCertSign (SPIFFE), and the
    // anchor's own pathLenConstraint (RFC 5280 leaves anchor constraints to the relying
    // party; a root that says 0 must not have an intermediate under it).
    let not_ca = std::cell::Cell::new(None::<usize>);
    let anchor_path_len = std::cell::Cell::new(false);
    let keycertsign = |path: &webpki::VerifiedPath<'_>| {
        let below = path.intermediate_certificates().count();
        let limit = anchors
            .iter()
            .position(|a| a.subject_public_key_info == path.anchor().subject_public_key_info)
            .and_then(|i| anchor_path_lens[i]);
        if limit.is_some_and(|l| below > l as usize) {
            anchor_path_len.set(true);
            return Err(webpki::Error::PathLenConstraintViolated);
        }
        for cert in path.intermediate_certificates() {
            let der = cert.der();
            let signs = X509Certificate::from_der(der.as_ref()).is_ok_and(
                |(_, c)| matches!(c.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign()),
            );
            if !signs {
                let index = chain
                    .iter()
                    .position(|c| c.as_ref() == der.as_ref())
                    .unwrap_or_default();
                not_ca.set(Some(index));
                return Err(webpki::Error::UnknownIssuer);
            }
        }
        Ok(())
    };
    let algorithms = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let result = end_entity.verify_for_usage(
        algorithms,
        &anchors,
        &intermediates,
        rustls::pki_types::UnixTime::since_unix_epoch(since_epoch),
        SvidUsage,
        None,
        Some(&keycertsign),
    );
    match result {
        Ok(_) => Ok(VerifiedSvid {
            spiffe_id: leaf.spiffe_id,
            not_after: leaf.not_after,
        }),
        Err(e) => Err(match (e, not_ca.get()) {
            (_, Some(index)) => SvidError::IssuerNotCa { index },
            _ if anchor_path_len.get() => SvidError::PathLenConstraint,
            (webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. }, _) => {
                // Name the certificate, as for the leaf.
                (1..certs.len())
                    .find_map(|i| check_time(&certs[i], i, now).err())
                    .unwrap_or_else(untrusted)
            }
            (webpki::Error::PathLenConstraintViolated, _) => SvidError::PathLenConstraint,
            (webpki::Error::NameConstraintViolation, _) => SvidError::NameConstraint,
            (webpki::Error::UnsupportedCriticalExtension, _) => SvidError::UnknownCriticalExtension,
            (webpki::Error::CaUsedAsEndEntity, _) => SvidError::LeafIsCa,
            (webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey, _) => {
                untrusted()
            }
            (other, _) => SvidError::InvalidPath(format!("{other:?}")),
        }),
    }
}

/// The extended key usages an X509-SVID may carry: none, or serverAuth or clientAuth among
/// them (X509-SVID §4.4 says they SHOULD both be set when the extension is present).
struct SvidUsage;

impl webpki::ExtendedKeyUsageValidator for SvidUsage {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        const SERVER_AUTH: &[u8] = &[0x2b, 6, 1, 5, 5, 7, 3, 1];
        const CLIENT_AUTH: &[u8] = &[0x2b, 6, 1, 5, 5, 7, 3, 2];
        const ANY: &[u8] = &[0x55, 0x1d, 0x25, 0x00];
        let mut empty = true;
        for id in iter {
            empty = false;
            let id = id?;
            if [SERVER_AUTH, CLIENT_AUTH, ANY]
                .iter()
                .any(|oid| id == webpki::KeyPurposeId::new(oid))
            {
                return Ok(());
            }
        }
        if empty {
            Ok(())
        } else {
            // The context variant's fields are not constructible outside webpki.
            #[allow(deprecated)]
            Err(webpki::Error::RequiredEkuNotFound)
        }
    }
}

/// Whether a certificate may sign others: cA=true and keyCertSign.
pub(crate) fn is_signing_cert(cert: &X509Certificate<'_>) -> bool {
    let ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let sign = match cert.key_usage() {
        Ok(Some(ku)) => ku.value.key_cert_sign(),
        Ok(None) => true, // keyUsage absent: unrestricted (RFC 5280 4.2.1.3)
        Err(_) => false,
    };
    ca && sign
}

fn check_time(cert: &X509Certificate<'_>, index: usize, now: SystemTime) -> Result<(), SvidError> {
    let v = cert.validity();
    let t = to_asn1(now);
    if t < v.not_before {
        return Err(SvidError::NotYetValid {
            index,
            not_before: rfc3339(v.not_before.timestamp()),
        });
    }
    if t > v.not_after {
        return Err(SvidError::Expired {
            index,
            not_after: rfc3339(v.not_after.timestamp()),
        });
    }
    Ok(())
}

fn parse(der: &[u8], index: usize) -> Result<X509Certificate<'_>, SvidError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(SvidError::Malformed {
            index,
            reason: format!("{} trailing bytes", rest.len()),
        }),
        Err(e) => Err(SvidError::Malformed {
            index,
            reason: e.to_string(),
        }),
    }
}

pub(crate) fn to_asn1(t: SystemTime) -> x509_parser::time::ASN1Time {
    x509_parser::time::ASN1Time::from_timestamp(crate::clock::unix_seconds(t))
        .unwrap_or_else(|_| x509_parser::time::ASN1Time::now())
}

/// RFC 3339 rendering of a Unix timestamp, for messages.
pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// Errors reading PEM or concatenated DER.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    /// Not PEM.
    #[error("not valid PEM: {0}")]
    Pem(String),
    /// PEM with no CERTIFICATE blocks.
    #[error("no CERTIFICATE block found in PEM")]
    NoCertificates,
    /// A block or DER element is not an X.509 certificate.
    #[error("certificate {0} is not valid X.509 DER")]
    NotACertificate(usize),
}

/// Reads every `CERTIFICATE` block of a PEM document, in order, checking each parses.
pub fn certs_from_pem(pem_text: &str) -> Result<Vec<Vec<u8>>, PemError> {
    let blocks = pem::parse_many(pem_text).map_err(|e| PemError::Pem(e.to_string()))?;
    let certs: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.into_contents())
        .collect();
    if certs.is_empty() {
        return Err(PemError::NoCertificates);
    }
    for (i, c) in certs.iter().enumerate() {
        if !matches!(X509Certificate::from_der(c), Ok((rest, _)) if rest.is_empty()) {
            return Err(PemError::NotACertificate(i));
        }
    }
    Ok(certs)
}

/// PEM-encodes DER certificates.
pub fn certs_to_pem<C: AsRef<[u8]>>(certs: &[C]) -> String {
    certs
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.as_ref().to_vec())))
        .collect()
}

/// Splits concatenated DER certificates (the Workload API's bundle and chain encoding).
pub fn split_der_certs(bytes: &[u8]) -> Result<Vec<Vec<u8>>, PemError> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        match X509Certificate::from_der(rest) {
            Ok((r, _)) => {
                out.push(rest[..rest.len() - r.len()].to_vec());
                rest = r;
            }
            Err(_) => return Err(PemError::NotACertificate(out.len())),
        }
        if out.len() > 1024 {
            return Err(PemError::NotACertificate(out.len()));
        }
    }
    Ok(out)
}

/// Whether a DER certificate is self-signed (a root): its issuer is its subject and its
/// own key verifies its signature.
pub fn is_self_signed_der(der: &[u8]) -> bool {
    X509Certificate::from_der(der).is_ok_and(|(_, c)| {
        c.subject().as_raw() == c.issuer().as_raw() && c.verify_signature(None).is_ok()
    })
}

/// The hex serial number and validity of any certificate (for status and logs).
pub fn cert_summary(der: &[u8]) -> Option<(String, SystemTime, SystemTime)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some((
        cert.raw_serial_as_string().replace(':', ""),
        crate::clock::from_unix_seconds(cert.validity().not_before.timestamp()),
        crate::clock::from_unix_seconds(cert.validity().not_after.timestamp()),
    ))
}
