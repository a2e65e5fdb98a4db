//! The control plane's throwaway PKI: a serving CA and certificate for the apiserver, a
//! client CA whose certificates the apiserver trusts (`O` becomes the user's groups), and
//! the service-account token signing key; and the enterprise PKI an upstream authority
//! Secret holds ([`upstream_pki`]).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::Error;

fn pki_err(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error::Pki(format!("{what}: {e}"))
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertKey {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for CertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertKey")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// An enterprise root and an issuing certificate under it, as PEM: what a TrustDomain's
/// upstream authority Secret holds.
pub struct UpstreamPki {
    /// The enterprise root.
    pub root_pem: String,
    /// The issuing certificate (the upstream authority).
    pub intermediate_pem: String,
    /// Its PKCS#8 private key.
    pub intermediate_key_pem: String,
}

impl std::fmt::Debug for UpstreamPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPki")
            .field("intermediate_key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A root valid for ten years and an issuing certificate under it, valid from two days ago
/// until `valid_for` from now (negative: already expired). The issuing certificate is a CA
/// (keyCertSign) when `is_ca`, else a leaf that must be refused as an upstream authority.
pub fn upstream_pki(valid_for: time::Duration, is_ca: bool) -> Result<UpstreamPki, Error> {
    let now = time::OffsetDateTime::now_utc();
    let root_key = KeyPair::generate().map_err(pki_err("upstream root key"))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn("Example Enterprise Root", None);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = now - time::Duration::days(2);
    p.not_after = now + time::Duration::days(3650);
    let root = p.self_signed(&root_key).map_err(pki_err("upstream root"))?;
    let issuer = Issuer::new(p, root_key);
    let key = KeyPair::generate().map_err(pki_err("upstream issuing key"))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn("Example Enterprise Issuing CA", None);
    if is_ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    } else {
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    }
    p.not_before = now - time::Duration::days(2);
    p.not_after = now + valid_for;
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(pki_err("upstream issuing certificate"))?;
    Ok(UpstreamPki {
        root_pem: root.pem(),
        intermediate_pem: cert.pem(),
        intermediate_key_pem: key.serialize_pem(),
    })
}

/// A CA that issues certificates.
pub struct Ca {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA named `cn`.
    pub fn new(cn: &str) -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(pki_err("CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(cn, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params
            .self_signed(&key)
            .map_err(pki_err("CA certificate"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A TLS serving certificate for `127.0.0.1` and `localhost`.
    pub fn serving(&self, cn: &str) -> Result<CertKey, Error> {
        self.serving_for(cn, &["localhost", "127.0.0.1"])
    }

    /// A TLS serving certificate for `names` (DNS names or IP addresses).
    pub fn serving_for(&self, cn: &str, names: &[&str]) -> Result<CertKey, Error> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .map_err(pki_err("serving certificate SANs"))?;
        params.distinguished_name = dn(cn, None);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate for user `user`, optionally in `group` (the apiserver maps
    /// CN to the user name and O to a group; rcgen writes one O per name).
    pub fn client(&self, user: &str, group: Option<&str>) -> Result<CertKey, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(user, group);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Result<CertKey, Error> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(pki_err("leaf key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(pki_err("leaf certificate"))?;
        Ok(CertKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

/// A fresh service-account signing key: (private PKCS#8 PEM, public SPKI PEM).
pub fn service_account_key() -> Result<(String, String), Error> {
    let key = KeyPair::generate().map_err(pki_err("service-account key"))?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}
