//! The signing state of every trust domain, shared by all tasks of one operator replica.
//!
//! Every replica (leader or not) keeps an [`Authorities`] up to date from the CA Secrets,
//! so every replica can sign. Only the leader creates or rotates CAs; it does so by writing
//! the Secret, and the replicas pick the change up from their watch.
//!
//! Readers (the Node API, bundle endpoints, entry streams) take a cheap snapshot
//! (`Arc<DomainAuthority>`) and never block writers. Changes are announced on a
//! `tokio::sync::watch` so streams can push new bundles at once.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sigil_identity::TrustBundle;
use sigil_identity::TrustDomain;
use sigil_identity::ca::CertificateAuthority;
use sigil_identity::jwt::JwtKey;
use tokio::sync::watch;

/// What one replica needs to issue for one trust domain.
#[derive(Debug)]
pub struct DomainAuthority {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Name of the TrustDomain object that declares it.
    pub object_name: String,
    /// The CA that signs X509-SVIDs now.
    pub x509_ca: Arc<CertificateAuthority>,
    /// The key that signs JWT-SVIDs now.
    pub jwt_key: Arc<JwtKey>,
    /// The published bundle (active, prepared and not-yet-expired retired authorities),
    /// with its `spiffe_sequence`.
    pub bundle: TrustBundle,
    /// Default X509-SVID lifetime (`spec.x509SVIDTTL`).
    pub x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime (`spec.jwtSVIDTTL`).
    pub jwt_svid_ttl: Duration,
    /// `iss` claim for JWT-SVIDs, when OIDC discovery is configured.
    pub jwt_issuer: Option<String>,
}

/// All trust domains this replica can issue for.
#[derive(Debug)]
pub struct Authorities {
    domains: RwLock<BTreeMap<TrustDomain, Arc<DomainAuthority>>>,
    version: watch::Sender<u64>,
}

impl Default for Authorities {
    fn default() -> Self {
        Self {
            domains: RwLock::default(),
            version: watch::channel(0).0,
        }
    }
}

impl Authorities {
    /// An empty set.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The authority for `td`, if loaded.
    pub fn get(&self, td: &TrustDomain) -> Option<Arc<DomainAuthority>> {
        self.domains
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(td)
            .cloned()
    }

    /// Every loaded authority.
    pub fn all(&self) -> Vec<Arc<DomainAuthority>> {
        self.domains
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Installs (or replaces) the authority of its trust domain and announces the change.
    /// A replacement with the same CA serial, JWT key and bundle sequence is a no-op.
    pub fn set(&self, authority: DomainAuthority) {
        let mut map = self.domains.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = map.get(&authority.trust_domain)
            && old.x509_ca.serial() == authority.x509_ca.serial()
            && old.jwt_key.kid() == authority.jwt_key.kid()
            && old.bundle == authority.bundle
            && old.x509_svid_ttl == authority.x509_svid_ttl
            && old.jwt_svid_ttl == authority.jwt_svid_ttl
            && old.jwt_issuer == authority.jwt_issuer
        {
            return;
        }
        map.insert(authority.trust_domain.clone(), Arc::new(authority));
        drop(map);
        self.version.send_modify(|v| *v += 1);
    }

    /// Forgets a trust domain (its TrustDomain object was deleted).
    pub fn remove(&self, td: &TrustDomain) {
        let removed = self
            .domains
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(td)
            .is_some();
        if removed {
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// A receiver that changes whenever any authority or bundle changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

/// Verifiers (the Node API's client-certificate check) read bundles straight from the
/// loaded authorities, so a CA rotation is trusted the moment this replica loads it.
impl sigil_identity::tls::BundleSource for Authorities {
    fn bundle_for(&self, td: &TrustDomain) -> Option<TrustBundle> {
        self.get(td).map(|a| a.bundle.clone())
    }
}
