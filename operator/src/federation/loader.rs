//! Keeps this replica's [`FederatedBundles`] equal to what the FederatedBundles and their
//! ConfigMaps say. Runs on every replica, leader or not, so every replica hands the same
//! foreign bundles to agents; it never writes to the API.
//!
//! For each FederatedBundle with a usable spec that is not a duplicate (oldest wins), the
//! held bundle is the fetched one from its ConfigMap, or the bootstrap bundle before the
//! first fetch ([`spec::held`]). A deleted FederatedBundle's bundle is dropped at once,
//! without waiting for the garbage collector to delete its ConfigMap.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::spec::{self, Spec};
use super::store::FederatedBundles;
use crate::crd::federated_bundle::FederatedBundle;
use crate::crd::trust_domain::COMPONENT_LABEL;
use crate::telemetry::{FederationMetrics, ReadyHandle, TrustDomainLabels};

/// Watches until `cancel`; `ready` is set once both watches have listed.
pub(crate) async fn run(
    client: Client,
    namespace: String,
    fb_config: watcher::Config,
    federated: Arc<FederatedBundles>,
    metrics: FederationMetrics,
    ready: Option<ReadyHandle>,
    cancel: CancellationToken,
) {
    let (fbs, fb_writer) = reflector::store::<FederatedBundle>();
    let fb_events = reflector::reflector(fb_writer, watcher(Api::all(client.clone()), fb_config))
        .backoff(crate::watch_backoff());
    let (cms, cm_writer) = reflector::store::<ConfigMap>();
    let cm_config =
        watcher::Config::default().labels(&format!("{COMPONENT_LABEL}={}", spec::COMPONENT));
    let cm_events = reflector::reflector(
        cm_writer,
        watcher(Api::namespaced(client, &namespace), cm_config),
    )
    .backoff(crate::watch_backoff());
    let mut exported: BTreeSet<String> = BTreeSet::new();
    crate::reflector_pair::run(
        "FederatedBundle",
        fb_events,
        cm_events,
        ready.as_ref(),
        &cancel,
        || {
            let held = compute(&fbs, &cms, &namespace);
            let names: BTreeSet<String> = held.keys().map(|td| td.name().to_owned()).collect();
            for gone in exported.difference(&names) {
                metrics.bundle_sequence.remove(&TrustDomainLabels {
                    trust_domain: gone.clone(),
                });
            }
            for b in held.values() {
                metrics
                    .bundle_sequence
                    .get_or_create(&TrustDomainLabels {
                        trust_domain: b.trust_domain.name().to_owned(),
                    })
                    .set(b.sequence.map_or(-1, |s| s as i64));
            }
            let before: BTreeSet<String> = federated
                .all()
                .iter()
                .map(|b| b.trust_domain.name().to_owned())
                .collect();
            if before != names {
                info!(trust_domains = ?names, "federated trust domains");
            }
            exported = names;
            federated.replace(held);
        },
    )
    .await;
}

/// The bundle held for every usable FederatedBundle.
pub(crate) fn compute(
    fbs: &Store<FederatedBundle>,
    cms: &Store<ConfigMap>,
    namespace: &str,
) -> BTreeMap<sigil_identity::TrustDomain, sigil_identity::TrustBundle> {
    let all = fbs.state();
    let mut held = BTreeMap::new();
    for fb in &all {
        // The leader reports bad specs and duplicates on the object.
        let Ok(spec) = Spec::from_object(fb) else {
            continue;
        };
        if spec::duplicate_owner(fb, &all).is_some() {
            continue;
        }
        let cm = cms.get(&ObjectRef::new(&spec::config_map_name(&fb.name_any())).within(namespace));
        if let Some((bundle, _)) = spec::held(&spec, fb.metadata.uid.as_deref(), cm.as_deref()) {
            held.insert(spec.trust_domain, bundle);
        }
    }
    held
}
