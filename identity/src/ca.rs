//! The X.509 signing authority of a trust domain.
//!
//! A [`CertificateAuthority`] is either a self-signed root or an intermediate under an
//! [`UpstreamAuthority`] (an enterprise PKI's intermediate given to Sigil with its key and
//! chain). It signs X509-SVIDs from CSRs, taking only the public key from the CSR: the
//! SPIFFE ID, DNS names and lifetime always come from the caller's [`SvidTemplate`], and
//! the lifetime is clipped to the CA's own remaining life.
//!
//! It owns key material; it must never log it (its `Debug` shows only public facts).

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::clock::{from_unix_seconds, unix_seconds};
use crate::id::{SpiffeId, TrustDomain};
use crate::key_manager::AuthorityKey;
use crate::keys::{KeyError, KeyType, PrivateKey};
use crate::x509::{CsrError, ParsedCsr, is_signing_cert, rfc3339};

/// Certificates are back-dated by this much to tolerate clock skew between nodes.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// The back-dating of an SVID that lives `ttl`: [`BACKDATE`], but at most a tenth of the
/// lifetime, so a short-lived SVID's half-life is never already behind it when issued
/// (which would make its holder rotate it at once, over and over).
pub fn svid_backdate(ttl: Duration) -> Duration {
    BACKDATE.min(ttl / 10)
}

/// Errors while creating, loading or using a CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// Key generation or parsing.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// rcgen refused to build a certificate.
    #[error("cannot build certificate: {0}")]
    Build(String),
    /// A persisted CA certificate cannot be used.
    #[error("CA certificate is invalid: {0}")]
    InvalidCertificate(String),
    /// The private key is not the certificate's key.
    #[error("CA private key does not match the CA certificate's public key")]
    KeyMismatch,
    /// The CA has expired.
    #[error("CA expired at {0}")]
    Expired(String),
    /// A DNS name in the template is not a valid DNS SAN.
    #[error("DNS name {0:?} is not a valid DNS name")]
    BadDnsName(String),
    /// A CSR could not be used.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// A workload SVID was asked for an ID reserved for Sigil's components.
    #[error(
        "{0} is reserved for Sigil's own components (paths under /sigil); a workload SVID is never signed for it"
    )]
    ReservedPath(String),
    /// A leaf was asked for a trust domain's root ID (no path).
    #[error("{0} has no path; an X509-SVID's ID must have one (X509-SVID §2)")]
    RootId(String),
    /// A component SVID was asked for an ID outside the reserved path.
    #[error("{0} is not a component identity (paths under /sigil)")]
    NotAComponent(String),
    /// Upstream authority problem.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// Why an upstream authority (Secret with an intermediate CA, key and chain) is unusable.
/// Each variant maps to one condition reason on the TrustDomain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// PEM could not be read.
    #[error("upstream {field} is not valid PEM certificates: {reason}")]
    BadPem {
        /// Which input.
        field: &'static str,
        /// Parser message.
        reason: String,
    },
    /// Key could not be read.
    #[error("upstream private key cannot be read: {0}")]
    BadKey(String),
    /// Not a CA certificate.
    #[error(
        "upstream certificate (serial {serial}) is not a CA: it needs basicConstraints cA=true and keyCertSign"
    )]
    NotACa {
        /// Serial of the offending certificate.
        serial: String,
    },
    /// Key does not match.
    #[error("upstream private key does not match the upstream certificate's public key")]
    KeyMismatch,
    /// Certificate expired.
    #[error("upstream certificate expired at {not_after}")]
    Expired {
        /// RFC 3339.
        not_after: String,
    },
    /// Certificate expires before a CA signed now would.
    #[error(
        "upstream certificate expires at {not_after}, before a CA with TTL {ca_ttl_secs}s issued now would ({needed_until}); renew the upstream certificate or lower spec.caTTL"
    )]
    ExpiresTooSoon {
        /// RFC 3339 expiry of the upstream cert.
        not_after: String,
        /// RFC 3339 time the CA would need.
        needed_until: String,
        /// The CA TTL.
        ca_ttl_secs: u64,
    },
    /// No self-signed root in the given chain.
    #[error(
        "no root certificate (self-signed) found in the upstream chain; include the root in ca.crt"
    )]
    NoRoot,
    /// Chain does not connect.
    #[error("upstream chain is broken: {0}")]
    ChainBroken(String),
    /// A certificate of the chain has a key Sigil can neither verify nor publish in a
    /// SPIFFE bundle (its JWK would have no usable `kty`).
    #[error(
        "upstream {field} certificate {subject:?} has a {algorithm} key, which Sigil cannot verify or publish in a SPIFFE bundle; use an upstream CA whose chain uses ECDSA P-256/P-384, RSA or Ed25519 keys"
    )]
    UnsupportedKey {
        /// `certificate` or `chain`.
        field: &'static str,
        /// The certificate's subject.
        subject: String,
        /// The key algorithm found.
        algorithm: String,
    },
}

/// Refuses a certificate whose key cannot be verified by path validation (ring) or
/// published as a JWK: only P-256, P-384, RSA and Ed25519 keys pass.
fn check_key_supported(
    field: &'static str,
    cert: &X509Certificate<'_>,
) -> Result<(), UpstreamError> {
    let jwk = crate::bundle::Jwk::from_spki(cert.public_key().raw);
    let usable = jwk
        .as_ref()
        .is_some_and(|j| j.kty != "EC" || matches!(j.crv.as_deref(), Some("P-256" | "P-384")));
    if usable {
        return Ok(());
    }
    let algorithm = match jwk {
        Some(j) => format!("{} {}", j.kty, j.crv.unwrap_or_default()),
        None => {
            let oid = cert.public_key().algorithm.algorithm.to_id_string();
            match oid.as_str() {
                "1.3.101.113" => "Ed448".to_owned(),
                "1.3.101.110" | "1.3.101.111" => "X25519/X448 (not a signing key)".to_owned(),
                _ => format!("OID {oid}"),
            }
        }
    };
    Err(UpstreamError::UnsupportedKey {
        field,
        subject: cert.subject().to_string(),
        algorithm,
    })
}

/// Subject of a CA certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CaSubject {
    /// Organization (O) values.
    pub organization: Vec<String>,
    /// Country (C).
    pub country: Option<String>,
    /// Common name (CN).
    pub common_name: Option<String>,
}

/// How to create a CA.
#[derive(Debug, Clone)]
pub struct CaParams {
    /// Trust domain the CA issues for; it becomes the CA's URI SAN.
    pub trust_domain: TrustDomain,
    /// Key algorithm of the CA key.
    pub key_type: KeyType,
    /// Lifetime of the CA certificate.
    pub ttl: Duration,
    /// Subject DN.
    pub subject: CaSubject,
}

/// What an SVID will say; comes from the registration entry, never from the CSR.
#[derive(Debug, Clone)]
pub struct SvidTemplate<'a> {
    /// SPIFFE ID for the URI SAN.
    pub spiffe_id: &'a SpiffeId,
    /// Requested lifetime (clipped to the CA's remaining life).
    pub ttl: Duration,
    /// DNS SANs.
    pub dns_names: &'a [String],
}

/// An issued X509-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSvid {
    /// Leaf certificate DER.
    pub leaf: Vec<u8>,
    /// Certificates to send after the leaf (Sigil's CA and upstream intermediates; never
    /// the root).
    pub intermediates: Vec<Vec<u8>>,
    /// Leaf expiry.
    pub not_after: SystemTime,
}

impl IssuedSvid {
    /// Leaf followed by intermediates.
    pub fn chain(&self) -> Vec<Vec<u8>> {
        std::iter::once(self.leaf.clone())
            .chain(self.intermediates.iter().cloned())
            .collect()
    }
}

/// A validated upstream signing authority.
pub struct UpstreamAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert: Vec<u8>,
    /// Certificates between `cert` and a root (exclusive of both).
    intermediates: Vec<Vec<u8>>,
    roots: Vec<Vec<u8>>,
    not_after: SystemTime,
    cert_is_root: bool,
}

impl fmt::Debug for UpstreamAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamAuthority")
            .field("roots", &self.roots.len())
            .field("intermediates", &self.intermediates.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl UpstreamAuthority {
    /// Loads an upstream CA: `cert_pem` is its certificate (optionally followed by its
    /// chain), `key_pem` its key, `chain_pem` further chain certificates up to and including
    /// the root (for example a cert-manager Secret's `tls.crt`, `tls.key` and `ca.crt`).
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        chain_pem: Option<&str>,
    ) -> Result<Self, UpstreamError> {
        let mut certs =
            crate::x509::certs_from_pem(cert_pem).map_err(|e| UpstreamError::BadPem {
                field: "certificate",
                reason: e.to_string(),
            })?;
        if let Some(chain) = chain_pem.filter(|c| !c.trim().is_empty()) {
            certs.extend(crate::x509::certs_from_pem(chain).map_err(|e| {
                UpstreamError::BadPem {
                    field: "chain",
                    reason: e.to_string(),
                }
            })?);
        }
        let key =
            PrivateKey::from_pem(key_pem).map_err(|e| UpstreamError::BadKey(e.to_string()))?;
        let cert_der = certs.remove(0);
        let parsed = X509Certificate::from_der(&cert_der)
            .map_err(|e| UpstreamError::BadPem {
                field: "certificate",
                reason: e.to_string(),
            })?
            .1;
        check_key_supported("certificate", &parsed)?;
        if !is_signing_cert(&parsed) {
            return Err(UpstreamError::NotACa {
                serial: parsed.raw_serial_as_string().replace(':', ""),
            });
        }
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(UpstreamError::KeyMismatch);
        }
        let cert_is_root = is_self_signed(&parsed);
        let mut roots = Vec::new();
        let mut intermediates = Vec::new();
        for c in certs {
            let p = X509Certificate::from_der(&c)
                .map_err(|e| UpstreamError::BadPem {
                    field: "chain",
                    reason: e.to_string(),
                })?
                .1;
            check_key_supported("chain", &p)?;
            if is_self_signed(&p) {
                roots.push(c)
            } else {
                intermediates.push(c)
            }
        }
        if cert_is_root {
            roots.insert(0, cert_der.clone());
        }
        if roots.is_empty() {
            return Err(UpstreamError::NoRoot);
        }
        check_chain_connects(&cert_der, &intermediates, &roots)?;
        let not_after = from_unix_seconds(parsed.validity().not_after.timestamp());
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key.into_key_pair())
            .map_err(|e| UpstreamError::BadPem {
                field: "certificate",
                reason: e.to_string(),
            })?;
        Ok(Self {
            issuer,
            cert: cert_der,
            intermediates,
            roots,
            not_after,
            cert_is_root,
        })
    }

    /// Checks the upstream certificate is still good for a CA of `ca_ttl` issued at `now`.
    pub fn check_lifetime(&self, now: SystemTime, ca_ttl: Duration) -> Result<(), UpstreamError> {
        let not_after = rfc3339(unix_seconds(self.not_after));
        if self.not_after <= now {
            return Err(UpstreamError::Expired { not_after });
        }
        if self.not_after < now + ca_ttl {
            return Err(UpstreamError::ExpiresTooSoon {
                not_after,
                needed_until: rfc3339(unix_seconds(now + ca_ttl)),
                ca_ttl_secs: ca_ttl.as_secs(),
            });
        }
        Ok(())
    }

    /// The root certificates (DER) to publish in the trust bundle.
    pub fn roots(&self) -> &[Vec<u8>] {
        &self.roots
    }

    /// Expiry of the upstream certificate.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Certificates that must follow a Sigil CA certificate in an SVID chain.
    fn chain_above(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if !self.cert_is_root {
            out.push(self.cert.clone());
        }
        out.extend(self.intermediates.iter().cloned());
        out
    }
}

fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject().as_raw() == cert.issuer().as_raw() && cert.verify_signature(None).is_ok()
}

fn check_chain_connects(
    cert: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
) -> Result<(), UpstreamError> {
    fn parse(d: &[u8]) -> Result<X509Certificate<'_>, UpstreamError> {
        X509Certificate::from_der(d)
            .map(|(_, c)| c)
            .map_err(|e| UpstreamError::ChainBroken(e.to_string()))
    }
    let mut current = parse(cert)?;
    let inters = intermediates
        .iter()
        .map(|d| parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    let roots = roots
        .iter()
        .map(|d| parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    for _ in 0..=inters.len() {
        if roots.iter().any(|r| {
            r.subject().as_raw() == current.issuer().as_raw()
                && current.verify_signature(Some(r.public_key())).is_ok()
        }) {
            return Ok(());
        }
        match inters.iter().find(|i| {
            i.subject().as_raw() == current.issuer().as_raw()
                && current.verify_signature(Some(i.public_key())).is_ok()
        }) {
            Some(next) => current = next.clone(),
            None => break,
        }
    }
    Err(UpstreamError::ChainBroken(format!(
        "certificate with subject {} is not signed by any certificate in the chain or a root",
        current.subject()
    )))
}

/// The signing authority of one trust domain.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, AuthorityKey>,
    key_type: KeyType,
    cert: Vec<u8>,
    /// Certificates sent after a leaf: empty for a self-signed root.
    leaf_intermediates: Vec<Vec<u8>>,
    /// What the bundle must contain for SVIDs of this CA to validate.
    trust_anchors: Vec<Vec<u8>>,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("serial", &self.serial)
            .field("key_type", &self.key_type)
            .field("not_after", &rfc3339(unix_seconds(self.not_after)))
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a new self-signed root CA with a new software key.
    pub fn new_self_signed(params: &CaParams, now: SystemTime) -> Result<Self, CaError> {
        let key = PrivateKey::generate(params.key_type)?;
        Self::new_self_signed_with(params, key.into(), now)
    }

    /// Creates a new self-signed root CA signing with `key` (of `params.key_type`).
    pub fn new_self_signed_with(
        params: &CaParams,
        key: AuthorityKey,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let cert_params = ca_cert_params(params, now, now + params.ttl)?;
        let cert = cert_params
            .self_signed(&key)
            .map_err(|e| build_error(e, &key))?;
        let der = cert.der().to_vec();
        Self::assemble(
            params.trust_domain.clone(),
            key,
            der.clone(),
            vec![],
            vec![der],
        )
    }

    /// Creates a new CA signed by `upstream`. Its lifetime is `params.ttl`; the upstream
    /// certificate must outlive it.
    pub fn new_under_upstream(
        params: &CaParams,
        upstream: &UpstreamAuthority,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let key = PrivateKey::generate(params.key_type)?;
        Self::new_under_upstream_with(params, upstream, key.into(), now)
    }

    /// Creates a new CA signed by `upstream` for `key` (of `params.key_type`).
    pub fn new_under_upstream_with(
        params: &CaParams,
        upstream: &UpstreamAuthority,
        key: AuthorityKey,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        upstream.check_lifetime(now, params.ttl)?;
        let cert_params = ca_cert_params(params, now, now + params.ttl)?;
        let cert = cert_params
            .signed_by(&key, &upstream.issuer)
            .map_err(|e| CaError::Build(e.to_string()))?;
        let der = cert.der().to_vec();
        Self::assemble(
            params.trust_domain.clone(),
            key,
            der,
            upstream.chain_above(),
            upstream.roots.clone(),
        )
    }

    /// The PEM CSR for an intermediate CA of `params` with `key`, for an upstream that
    /// signs CSRs (a cert-manager issuer): the same subject and trust domain URI SAN a CA
    /// minted here gets, and basicConstraints cA=true with keyCertSign, cRLSign and
    /// digitalSignature requested. The upstream decides the validity and may override
    /// the rest; [`CertificateAuthority::from_signed_chain`] checks what it returned.
    pub fn csr_pem(
        params: &CaParams,
        key: &AuthorityKey,
        now: SystemTime,
    ) -> Result<String, CaError> {
        let mut cert_params = ca_cert_params(params, now, now + params.ttl)?;
        // The upstream picks the serial and writes its own authority key identifier.
        cert_params.serial_number = None;
        cert_params.use_authority_key_identifier_extension = false;
        let csr = cert_params
            .serialize_request(key)
            .map_err(|e| CaError::Build(e.to_string()))?;
        csr.pem().map_err(|e| CaError::Build(e.to_string()))
    }

    /// A CA from the certificate an upstream signed for `key`'s CSR: `chain` starts with
    /// that certificate and may continue with intermediates (a copy of a trust anchor in
    /// it is dropped); `trust_anchors` are the upstream's root(s). Checks that the
    /// certificate is a CA for `key`, names the trust domain and chains to an anchor.
    pub fn from_signed_chain(
        trust_domain: TrustDomain,
        key: impl Into<AuthorityKey>,
        chain: Vec<Vec<u8>>,
        trust_anchors: Vec<Vec<u8>>,
    ) -> Result<Self, CaError> {
        let mut chain = chain.into_iter();
        let cert = chain.next().ok_or_else(|| {
            CaError::InvalidCertificate("the upstream returned no certificate".into())
        })?;
        let above: Vec<Vec<u8>> = chain.filter(|c| !trust_anchors.contains(c)).collect();
        if trust_anchors.is_empty() {
            return Err(UpstreamError::NoRoot.into());
        }
        check_chain_connects(&cert, &above, &trust_anchors)?;
        let parsed = X509Certificate::from_der(&cert)
            .map_err(|e| CaError::InvalidCertificate(e.to_string()))?
            .1;
        let td_uri = trust_domain.id_string();
        let names_td = parsed
            .subject_alternative_name()
            .ok()
            .flatten()
            .is_some_and(|san| {
                san.value.general_names.iter().any(
                    |n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == td_uri),
                )
            });
        if !names_td {
            return Err(CaError::InvalidCertificate(format!(
                "the signed certificate has no URI SAN {td_uri}"
            )));
        }
        Self::assemble(trust_domain, key.into(), cert, above, trust_anchors)
    }

    /// Re-loads a persisted CA: its certificate, the chain above it (empty for a root),
    /// the trust anchors to publish, and its key. Checks the key matches.
    pub fn load(
        trust_domain: TrustDomain,
        cert: Vec<u8>,
        chain_above: Vec<Vec<u8>>,
        trust_anchors: Vec<Vec<u8>>,
        key: impl Into<AuthorityKey>,
    ) -> Result<Self, CaError> {
        Self::assemble(trust_domain, key.into(), cert, chain_above, trust_anchors)
    }

    fn assemble(
        trust_domain: TrustDomain,
        key: AuthorityKey,
        cert: Vec<u8>,
        chain_above: Vec<Vec<u8>>,
        trust_anchors: Vec<Vec<u8>>,
    ) -> Result<Self, CaError> {
        let parsed = X509Certificate::from_der(&cert)
            .map_err(|e| CaError::InvalidCertificate(e.to_string()))?
            .1;
        if !is_signing_cert(&parsed) {
            return Err(CaError::InvalidCertificate(
                "not a CA certificate with keyCertSign".into(),
            ));
        }
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(CaError::KeyMismatch);
        }
        let self_signed = is_self_signed(&parsed);
        let serial = parsed.raw_serial_as_string().replace(':', "");
        let not_before = from_unix_seconds(parsed.validity().not_before.timestamp());
        let not_after = from_unix_seconds(parsed.validity().not_after.timestamp());
        let key_type = key.key_type();
        let issuer = Issuer::from_ca_cert_der(&cert.clone().into(), key)
            .map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
        let mut leaf_intermediates = Vec::new();
        if !self_signed {
            leaf_intermediates.push(cert.clone());
            leaf_intermediates.extend(chain_above);
        }
        Ok(Self {
            trust_domain,
            issuer,
            key_type,
            cert,
            leaf_intermediates,
            trust_anchors,
            serial,
            not_before,
            not_after,
        })
    }

    /// Signs an X509-SVID for the public key in `csr_der`. Only the key is taken from the
    /// CSR; the caller must already have authorised `template.spiffe_id`.
    pub fn sign_csr(
        &self,
        csr: &ParsedCsr,
        template: &SvidTemplate<'_>,
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        self.sign_public_key(&csr.public_key_der, template, now)
    }

    /// Signs a workload X509-SVID for a SubjectPublicKeyInfo. IDs reserved for Sigil's
    /// components ([`SpiffeId::is_reserved`]) are refused.
    pub fn sign_public_key(
        &self,
        spki_der: &[u8],
        template: &SvidTemplate<'_>,
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        if template.spiffe_id.is_reserved() {
            return Err(CaError::ReservedPath(template.spiffe_id.to_string()));
        }
        if template.spiffe_id.path().is_empty() {
            return Err(CaError::RootId(template.spiffe_id.to_string()));
        }
        self.sign(spki_der, template, now, false)
    }

    /// Signs the X509-SVID of a Sigil component (an agent, the operator, the bundle
    /// endpoint): an ID under the reserved path, marked with the component policy
    /// ([`crate::x509::COMPONENT_POLICY_UUID`]) that no workload SVID carries.
    pub fn sign_component(
        &self,
        spki_der: &[u8],
        template: &SvidTemplate<'_>,
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        if !template.spiffe_id.is_reserved() {
            return Err(CaError::NotAComponent(template.spiffe_id.to_string()));
        }
        self.sign(spki_der, template, now, true)
    }

    fn sign(
        &self,
        spki_der: &[u8],
        template: &SvidTemplate<'_>,
        now: SystemTime,
        component: bool,
    ) -> Result<IssuedSvid, CaError> {
        if now >= self.not_after {
            return Err(CaError::Expired(rfc3339(unix_seconds(self.not_after))));
        }
        let public_key = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        let not_after = (now + template.ttl).min(self.not_after);
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new(); // empty subject => SAN is critical
        p.not_before = to_offset(
            now.checked_sub(svid_backdate(template.ttl))
                .unwrap_or(now)
                .max(self.not_before),
        );
        p.not_after = to_offset(not_after);
        p.serial_number = Some(random_serial());
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if is_rsa_spki(spki_der) {
            p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        if component {
            p.custom_extensions.push(component_policy_extension());
        }
        let uri = template
            .spiffe_id
            .as_str()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Build(e.to_string()))?;
        p.subject_alt_names.push(SanType::URI(uri));
        for dns in template.dns_names {
            let name = dns
                .as_str()
                .try_into()
                .map_err(|_| CaError::BadDnsName(dns.clone()))?;
            if !crate::id::is_dns_name(dns) {
                return Err(CaError::BadDnsName(dns.clone()));
            }
            p.subject_alt_names.push(SanType::DnsName(name));
        }
        let cert = p
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| build_error(e, self.issuer.key()))?;
        Ok(IssuedSvid {
            leaf: cert.der().to_vec(),
            intermediates: self.leaf_intermediates.clone(),
            not_after,
        })
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// This CA's certificate (DER).
    pub fn certificate(&self) -> &[u8] {
        &self.cert
    }

    /// Certificates that follow a leaf in SVID chains.
    pub fn leaf_intermediates(&self) -> &[Vec<u8>] {
        &self.leaf_intermediates
    }

    /// The X.509 authorities a bundle needs so this CA's SVIDs validate: the CA itself when
    /// self-signed, the upstream root(s) otherwise.
    pub fn trust_anchors(&self) -> &[Vec<u8>] {
        &self.trust_anchors
    }

    /// Hex serial number.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Key algorithm.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// PKCS#8 PEM of the CA key, for persisting into the CA Secret (the one place a CA key
    /// may go). Wiped on drop. `None` when the key lives in a key manager (an HSM): then
    /// only [`AuthorityKey::reference`] is persisted.
    pub fn key_pkcs8_pem(&self) -> Option<zeroize::Zeroizing<String>> {
        self.issuer.key().software().map(PrivateKey::to_pkcs8_pem)
    }

    /// The key this CA signs with.
    pub fn key(&self) -> &AuthorityKey {
        self.issuer.key()
    }
}

/// A certificate that could not be built; for an external key, says why it did not sign.
fn build_error(e: rcgen::Error, key: &AuthorityKey) -> CaError {
    match (e, key) {
        (rcgen::Error::RemoteKeyError, AuthorityKey::External(k)) => CaError::Build(format!(
            "key {} could not sign: {}",
            k.key().reference(),
            k.last_error().unwrap_or_else(|| "no reason given".into())
        )),
        (e, _) => CaError::Build(e.to_string()),
    }
}

fn ca_cert_params(
    params: &CaParams,
    now: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if let Some(c) = &params.subject.country {
        dn.push(DnType::CountryName, c.as_str());
    }
    let orgs = if params.subject.organization.is_empty() {
        vec!["Sigil".to_owned()]
    } else {
        params.subject.organization.clone()
    };
    for o in orgs {
        dn.push(DnType::OrganizationName, o);
    }
    let cn = params
        .subject
        .common_name
        .clone()
        .unwrap_or_else(|| format!("Sigil CA {}", params.trust_domain));
    dn.push(DnType::CommonName, cn);
    // A serial in the subject keeps successive CAs' subjects distinct, so path building
    // never confuses the prepared CA with the active one.
    let serial = random_serial();
    dn.push(
        DnType::CustomDnType(vec![2, 5, 4, 5]),
        hex::encode(serial.to_bytes()),
    );
    p.distinguished_name = dn;
    p.serial_number = Some(serial);
    p.not_before = to_offset(now.checked_sub(BACKDATE).unwrap_or(now));
    p.not_after = to_offset(not_after);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.use_authority_key_identifier_extension = true;
    let td_uri = params
        .trust_domain
        .id_string()
        .try_into()
        .map_err(|e: rcgen::Error| CaError::Build(e.to_string()))?;
    p.subject_alt_names = vec![SanType::URI(td_uri)];
    Ok(p)
}

fn is_rsa_spki(spki_der: &[u8]) -> bool {
    x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
        .map(|(_, s)| s.algorithm.algorithm.to_id_string() == "1.2.840.113549.1.1.1")
        .unwrap_or(false)
}

/// A non-critical certificatePolicies extension (2.5.29.32) holding the component policy:
/// `SEQUENCE { SEQUENCE { OBJECT IDENTIFIER 2.25.<uuid> } }`.
fn component_policy_extension() -> rcgen::CustomExtension {
    let oid = crate::x509::component_policy_oid();
    let tlv = |tag: u8, body: &[u8]| {
        // Every length here is far below 128: short-form lengths.
        let mut v = vec![tag, body.len() as u8];
        v.extend_from_slice(body);
        v
    };
    let policy_information = tlv(0x30, &tlv(0x06, &oid));
    rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 32], tlv(0x30, &policy_information))
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and 16 bytes long (no leading zero to strip)
    SerialNumber::from_slice(&b)
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix_seconds(t))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}
