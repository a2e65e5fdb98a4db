//! TLS with SPIFFE authentication (rustls): peers are X509-SVIDs, verified against the
//! bundle of their trust domain and authorised by SPIFFE ID, not by DNS name.
//!
//! Used for the Node API (operator server, agent client), the https_spiffe bundle endpoint
//! profile, and the federation fetcher. Bundles and our own certificate can change at any
//! time (CA rotation, SVID renewal): the verifiers ask a [`BundleSource`] on every
//! handshake, and [`SwappableCert`] hands out whatever certificate is current.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::id::{SpiffeId, TrustDomain};
use crate::keys::PrivateKey;
use crate::{BundleSet, TrustBundle};

/// Where verifiers find the X.509 authorities of a trust domain.
pub trait BundleSource: Send + Sync + fmt::Debug {
    /// The bundle for `td`, if known.
    fn bundle_for(&self, td: &TrustDomain) -> Option<TrustBundle>;
}

impl BundleSource for BundleSet {
    fn bundle_for(&self, td: &TrustDomain) -> Option<TrustBundle> {
        self.get(td).cloned()
    }
}

/// A [`BundleSource`] whose bundles can be replaced at run time.
#[derive(Debug, Default)]
pub struct SharedBundles(RwLock<BundleSet>);

impl SharedBundles {
    /// A source holding `set`.
    pub fn new(set: BundleSet) -> Arc<Self> {
        Arc::new(Self(RwLock::new(set)))
    }

    /// Replaces (or adds) the bundle of its trust domain.
    pub fn upsert(&self, b: TrustBundle) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).upsert(b);
    }

    /// A copy of all bundles.
    pub fn snapshot(&self) -> BundleSet {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl BundleSource for SharedBundles {
    fn bundle_for(&self, td: &TrustDomain) -> Option<TrustBundle> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(td)
            .cloned()
    }
}

/// Which peer SPIFFE IDs are acceptable.
#[derive(Clone)]
pub enum Authorizer {
    /// Any ID that validates against its trust domain's bundle.
    Any,
    /// Any ID in this trust domain.
    MemberOf(TrustDomain),
    /// Exactly this ID.
    Exact(SpiffeId),
    /// A Sigil component (agent, operator, bundle endpoint): an ID of `trust_domain`
    /// whose path is `path`, or starts with it when `path` ends in `/`, on an SVID that
    /// carries the component policy ([`crate::x509::COMPONENT_POLICY_UUID`]). No workload
    /// SVID carries it, whatever its ID.
    Component {
        /// The component's trust domain.
        trust_domain: TrustDomain,
        /// The exact path, or a prefix ending in `/`.
        path: String,
    },
    /// A custom rule.
    Custom(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>),
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authorizer::Any => f.write_str("Any"),
            Authorizer::MemberOf(td) => write!(f, "MemberOf({td})"),
            Authorizer::Exact(id) => write!(f, "Exact({id})"),
            Authorizer::Component { trust_domain, path } => {
                write!(f, "Component(spiffe://{trust_domain}{path})")
            }
            Authorizer::Custom(_) => f.write_str("Custom"),
        }
    }
}

impl Authorizer {
    fn allows(&self, leaf: &crate::x509::LeafInfo) -> bool {
        let id = &leaf.spiffe_id;
        match self {
            Authorizer::Any => true,
            Authorizer::MemberOf(td) => id.is_member_of(td),
            Authorizer::Exact(want) => want == id,
            Authorizer::Component { trust_domain, path } => {
                let path_ok = if path.ends_with('/') {
                    id.path().starts_with(path.as_str())
                } else {
                    id.path() == path
                };
                leaf.component && id.is_member_of(trust_domain) && path_ok
            }
            Authorizer::Custom(f) => f(id),
        }
    }
}

/// Validates a presented chain as an X509-SVID and authorises its ID.
fn verify_svid(
    bundles: &dyn BundleSource,
    authorizer: &Authorizer,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<SpiffeId, Error> {
    let leaf = crate::x509::inspect_leaf(end_entity)
        .map_err(|e| Error::InvalidCertificate(other(e.to_string())))?;
    let td = leaf.spiffe_id.trust_domain().clone();
    let bundle = bundles
        .bundle_for(&td)
        .ok_or(Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
    let chain: Vec<&[u8]> = std::iter::once(end_entity.as_ref())
        .chain(intermediates.iter().map(|c| c.as_ref()))
        .collect();
    let when = UNIX_EPOCH + Duration::from_secs(now.as_secs());
    let verified = crate::x509::validate_x509_svid(&chain, &bundle, when).map_err(|e| match e {
        crate::x509::SvidError::Expired { .. } => {
            Error::InvalidCertificate(CertificateError::Expired)
        }
        crate::x509::SvidError::NotYetValid { .. } => {
            Error::InvalidCertificate(CertificateError::NotValidYet)
        }
        crate::x509::SvidError::Untrusted { .. } => {
            Error::InvalidCertificate(CertificateError::UnknownIssuer)
        }
        other_err => Error::InvalidCertificate(other(other_err.to_string())),
    })?;
    if !authorizer.allows(&leaf) {
        let why = if matches!(authorizer, Authorizer::Component { .. }) && !leaf.component {
            " (not a Sigil component's SVID)"
        } else {
            ""
        };
        return Err(Error::InvalidCertificate(other(format!(
            "SPIFFE ID {} is not authorised here{why}",
            verified.spiffe_id
        ))));
    }
    Ok(verified.spiffe_id)
}

fn other(msg: String) -> CertificateError {
    CertificateError::Other(rustls::OtherError(Arc::new(std::io::Error::other(msg))))
}

/// Verifies a server's X509-SVID (client side). The TLS server name is ignored: the peer is
/// authenticated by its SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundles: Arc<dyn BundleSource>,
    authorizer: Authorizer,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    /// A verifier using `bundles`, accepting peers allowed by `authorizer`.
    pub fn new(bundles: Arc<dyn BundleSource>, authorizer: Authorizer) -> Arc<Self> {
        Arc::new(Self {
            bundles,
            authorizer,
            provider: provider(),
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        verify_svid(
            self.bundles.as_ref(),
            &self.authorizer,
            end_entity,
            intermediates,
            now,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a client's X509-SVID (server side). With `optional`, clients without a
/// certificate are let through (the application then decides, per RPC).
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundles: Arc<dyn BundleSource>,
    authorizer: Authorizer,
    optional: bool,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    /// A verifier using `bundles`, accepting peers allowed by `authorizer`.
    pub fn new(
        bundles: Arc<dyn BundleSource>,
        authorizer: Authorizer,
        optional: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            bundles,
            authorizer,
            optional,
            provider: provider(),
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify_svid(
            self.bundles.as_ref(),
            &self.authorizer,
            end_entity,
            intermediates,
            now,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The process-wide rustls provider (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Our own certificate and key, replaceable while connections come and go (renewal).
#[derive(Debug, Default)]
pub struct SwappableCert(RwLock<Option<Arc<CertifiedKey>>>);

impl SwappableCert {
    /// Empty: handshakes that need a certificate fail until [`SwappableCert::set`].
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Installs a chain (leaf first, DER) and its key.
    pub fn set(&self, chain: &[Vec<u8>], key: &PrivateKey) -> Result<(), Error> {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_pkcs8_der().to_vec()));
        let signing = provider().key_provider.load_private_key(der)?;
        let certs = chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) =
            Some(Arc::new(CertifiedKey::new(certs, signing)));
        Ok(())
    }

    /// Installs a PEM certificate chain (leaf first) and a PEM private key in PKCS#8,
    /// PKCS#1 or SEC1 form, e.g. the `tls.crt` and `tls.key` of a `kubernetes.io/tls`
    /// Secret written by cert-manager. The key must match the leaf.
    pub fn set_pem(&self, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), Error> {
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| Error::General(format!("certificate PEM: {e}")))?;
        if certs.is_empty() {
            return Err(Error::General("no certificate in the PEM file".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| Error::General(format!("private key PEM: {e}")))?;
        let signing = provider().key_provider.load_private_key(key)?;
        let certified = CertifiedKey::new(certs, signing);
        certified.keys_match()?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(certified));
        Ok(())
    }

    /// The current certificate, if any.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl rustls::server::ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for SwappableCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.current().is_some()
    }
}

/// A server config presenting `cert` and verifying clients with `client_verifier`
/// (ALPN h2 for gRPC).
pub fn server_config(
    cert: Arc<SwappableCert>,
    client_verifier: Arc<dyn ClientCertVerifier>,
) -> Result<rustls::ServerConfig, Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A client config presenting `cert` (may be empty) and verifying the server by SPIFFE ID
/// (ALPN h2 for gRPC).
pub fn client_config(
    cert: Arc<SwappableCert>,
    server_verifier: Arc<SpiffeServerVerifier>,
) -> Result<rustls::ClientConfig, Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier)
        .with_client_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The SPIFFE ID of a verified peer certificate chain (after the handshake).
pub fn peer_id(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    crate::x509::inspect_leaf(certs.first()?.as_ref())
        .ok()
        .map(|l| l.spiffe_id)
}
