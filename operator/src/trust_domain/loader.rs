//! Keeps this replica's [`Authorities`] equal to what the CA Secrets hold. Runs on every
//! replica, leader or not, so every replica can sign; it never writes to the API.
//!
//! It watches the TrustDomains and the CA Secrets (by label, in the operator's namespace)
//! and, whenever either changes, (re)loads the authority of each TrustDomain that owns its
//! trust domain name. A TrustDomain that is deleted, or loses its CA Secret, is forgotten.
//! It also keeps the per-replica gauges (CA expiry, bundle sequence) current.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use sigil_identity::TrustDomain;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::policy::{Policy, duplicate_owner};
use super::rotation::AuthorityState;
use super::store::{self, ca_secret_name};
use crate::authority::{Authorities, DomainAuthority};
use crate::crd::trust_domain::{COMPONENT_LABEL, TrustDomain as TrustDomainObject};
use crate::telemetry::{CaLabels, ReadyHandle, TrustDomainLabels, TrustDomainMetrics};

/// Builds what a replica needs to sign for one trust domain, if the state has an active
/// CA and JWT key.
pub(crate) fn domain_authority(policy: &Policy, state: &AuthorityState) -> Option<DomainAuthority> {
    let ca = state.x509.active.as_ref()?.key.clone();
    let jwt = state.jwt.active.as_ref()?.key.key.clone();
    Some(DomainAuthority {
        trust_domain: policy.trust_domain.clone(),
        object_name: policy.object.clone(),
        x509_ca: ca,
        jwt_key: jwt,
        bundle: state.bundle(Some(policy.refresh_hint)),
        x509_svid_ttl: policy.x509_svid_ttl,
        jwt_svid_ttl: policy.jwt_svid_ttl,
        jwt_issuer: policy.jwt_issuer.clone(),
    })
}

/// What was loaded for one TrustDomain object, and from which versions.
struct Loaded {
    trust_domain: TrustDomain,
    secret_version: Option<String>,
    generation: Option<i64>,
}

pub(crate) struct Loader {
    namespace: String,
    authorities: Arc<Authorities>,
    metrics: TrustDomainMetrics,
    keys: crate::keys::Keys,
    loaded: BTreeMap<String, Loaded>,
}

impl Loader {
    pub(crate) fn new(
        namespace: &str,
        authorities: Arc<Authorities>,
        metrics: TrustDomainMetrics,
        keys: crate::keys::Keys,
    ) -> Self {
        Self {
            namespace: namespace.to_owned(),
            authorities,
            metrics,
            keys,
            loaded: BTreeMap::new(),
        }
    }

    /// Watches until `cancel` fires; `ready` is set once both watches have listed.
    pub(crate) async fn run(
        mut self,
        client: Client,
        selector: Option<String>,
        ready: Option<ReadyHandle>,
        cancel: CancellationToken,
    ) {
        let mut td_config = watcher::Config::default();
        if let Some(s) = &selector {
            td_config = td_config.labels(s);
        }
        let (tds, td_writer) = reflector::store::<TrustDomainObject>();
        let td_events =
            reflector::reflector(td_writer, watcher(Api::all(client.clone()), td_config))
                .backoff(crate::watch_backoff());
        let (secrets, secret_writer) = reflector::store::<Secret>();
        let secret_config = watcher::Config::default().labels(&format!("{COMPONENT_LABEL}=ca"));
        let secret_events = reflector::reflector(
            secret_writer,
            watcher(Api::namespaced(client, &self.namespace), secret_config),
        )
        .backoff(crate::watch_backoff());
        crate::reflector_pair::run(
            "trust domain",
            td_events,
            secret_events,
            ready.as_ref(),
            &cancel,
            || self.sync(&tds, &secrets),
        )
        .await;
    }

    /// Makes the authorities match the stores.
    pub(crate) fn sync(&mut self, tds: &Store<TrustDomainObject>, secrets: &Store<Secret>) {
        let all = tds.state();
        let mut seen = Vec::new();
        for td in &all {
            let object = td.name_any();
            let Ok(policy) = Policy::from_spec(&object, &td.spec) else {
                // The leader reports the bad spec; whatever was loaded keeps signing.
                if self.loaded.contains_key(&object) {
                    seen.push(object);
                }
                continue;
            };
            if duplicate_owner(td, &all).is_some() {
                continue;
            }
            let secret =
                secrets.get(&ObjectRef::new(&ca_secret_name(&object)).within(&self.namespace));
            let Some(secret) = secret else { continue };
            seen.push(object.clone());
            let secret_version = secret.resource_version();
            let generation = td.metadata.generation;
            if let Some(l) = self.loaded.get(&object)
                && l.secret_version == secret_version
                && l.generation == generation
            {
                continue;
            }
            match store::from_secret(&secret, &policy.trust_domain, &*self.keys) {
                Ok(state) => {
                    let Some(authority) = domain_authority(&policy, &state) else {
                        debug!(trust_domain = %policy.trust_domain, "CA Secret has no active CA yet");
                        seen.pop();
                        continue;
                    };
                    info!(
                        trust_domain = %policy.trust_domain,
                        ca_serial = %authority.x509_ca.serial(),
                        jwt_kid = %authority.jwt_key.kid(),
                        bundle_sequence = state.sequence,
                        "loaded signing authority"
                    );
                    self.authorities.set(authority);
                    self.record_metrics(&policy.trust_domain, &state);
                    self.loaded.insert(
                        object,
                        Loaded {
                            trust_domain: policy.trust_domain,
                            secret_version,
                            generation,
                        },
                    );
                }
                Err(e) => {
                    // The leader reports this on the TrustDomain; keep what was loaded.
                    warn!(trust_domain = %policy.trust_domain, error = %e, "cannot load CA Secret; keeping the previously loaded authority");
                }
            }
        }
        let gone: Vec<String> = self
            .loaded
            .keys()
            .filter(|k| !seen.contains(k))
            .cloned()
            .collect();
        for object in gone {
            if let Some(l) = self.loaded.remove(&object) {
                if self
                    .loaded
                    .values()
                    .any(|other| other.trust_domain == l.trust_domain)
                {
                    continue; // another TrustDomain object took the name over
                }
                info!(trust_domain = %l.trust_domain, trust_domain_object = %object, "forgetting signing authority");
                self.authorities.remove(&l.trust_domain);
                let td = l.trust_domain.name().to_owned();
                for role in ["active", "prepared"] {
                    self.metrics.ca_expiry.remove(&CaLabels {
                        trust_domain: td.clone(),
                        role: role.into(),
                    });
                }
                self.metrics
                    .bundle_sequence
                    .remove(&TrustDomainLabels { trust_domain: td });
            }
        }
    }

    fn record_metrics(&self, td: &TrustDomain, state: &AuthorityState) {
        let unix = sigil_identity::clock::unix_seconds;
        let label = |role: &str| CaLabels {
            trust_domain: td.name().to_owned(),
            role: role.into(),
        };
        match &state.x509.active {
            Some(a) => {
                self.metrics
                    .ca_expiry
                    .get_or_create(&label("active"))
                    .set(unix(a.key.not_after()));
            }
            None => {
                self.metrics.ca_expiry.remove(&label("active"));
            }
        }
        match &state.x509.prepared {
            Some(p) => {
                self.metrics
                    .ca_expiry
                    .get_or_create(&label("prepared"))
                    .set(unix(p.key.not_after()));
            }
            None => {
                self.metrics.ca_expiry.remove(&label("prepared"));
            }
        }
        self.metrics
            .bundle_sequence
            .get_or_create(&TrustDomainLabels {
                trust_domain: td.name().to_owned(),
            })
            .set(state.sequence as i64);
    }
}
