//! ClusterTrustBundles of Sigil's signers: for every loaded TrustDomain, its own bundle
//! (`sigil.dev:<name>:bundle`), and the bundle of each foreign trust domain its
//! ClusterSPIFFEIDs federate with (`sigil.dev:<name>:federated.<td>`), each with
//! `spec.signerName: sigil.dev/<name>`.
//!
//! They follow CA rotation because they are the published bundle: a prepared CA is in it
//! before it signs, and a retired one stays until the last SVID it signed has expired.
//! Only the leader writes; only objects carrying Sigil's labels for a TrustDomain this
//! replica loads are changed or deleted, and each is owned by its TrustDomain, so
//! deleting the TrustDomain collects them.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::{ClusterTrustBundle, ClusterTrustBundleSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt as _};
use sigil_api::pod_certificates::{
    BUNDLE_KIND_LABEL, FEDERATED_TRUST_DOMAIN_LABEL, federated_bundle_name, own_bundle_name,
    signer_name,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Shared;
use crate::crd::trust_domain::{OWNER_LABEL, TrustDomain as TrustDomainObject};
use crate::trust_domain::store::{label_value, owner_reference};

/// How often the bundles are compared with what should be, besides every change.
const RESYNC: Duration = Duration::from_secs(30);

/// Publishes while this replica leads, until `cancel`.
pub async fn run(client: Client, mut shared: Shared, cancel: CancellationToken) {
    let mut authorities = shared.authorities.subscribe();
    let mut federated = shared.federated.subscribe();
    let mut federations = shared.index.federation_changes();
    let mut last_sync = None::<tokio::time::Instant>;
    loop {
        // Seen before the sync reads it, so a change made during the sync wakes the wait.
        federations.borrow_and_update();
        if *shared.leader.borrow() && shared.index.is_synced() {
            match sync(&client, &shared).await {
                Ok(()) => last_sync = Some(tokio::time::Instant::now()),
                Err(e) => {
                    last_sync = None;
                    warn!(error = %e, "ClusterTrustBundles: will try again");
                }
            }
        }
        // Wait for a change that can matter: leadership, a CA or bundle, a federated
        // bundle, or which trust domains ClusterSPIFFEIDs federate with (the index wakes
        // this only when that changes, not for each Pod). A failed sync, or one before the
        // index's first sync, is retried after a second.
        let retry = match last_sync {
            Some(at) => at + RESYNC,
            None => tokio::time::Instant::now() + Duration::from_secs(1),
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = shared.leader.changed() => {}
            _ = authorities.changed() => {}
            _ = federated.changed() => {}
            _ = federations.changed() => {}
            () = tokio::time::sleep_until(retry) => {}
        }
    }
}

/// The ClusterTrustBundles there should be, by name.
fn desired(shared: &Shared, owners: &[TrustDomainObject]) -> BTreeMap<String, ClusterTrustBundle> {
    let mut out = BTreeMap::new();
    let federations = shared.index.federations();
    for authority in shared.authorities.all() {
        let object = &authority.object_name;
        let Some(owner) = owners.iter().find(|o| o.name_any() == *object) else {
            continue;
        };
        let bundle = |name: String, kind: &str, pem: String, federated: Option<&str>| {
            let mut labels = BTreeMap::from([
                (OWNER_LABEL.to_owned(), label_value(object)),
                (BUNDLE_KIND_LABEL.to_owned(), kind.to_owned()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "sigil-operator".to_owned(),
                ),
            ]);
            if let Some(td) = federated {
                labels.insert(FEDERATED_TRUST_DOMAIN_LABEL.to_owned(), label_value(td));
            }
            ClusterTrustBundle {
                metadata: ObjectMeta {
                    name: Some(name),
                    labels: Some(labels),
                    owner_references: owner_reference(owner).map(|r| vec![r]),
                    ..Default::default()
                },
                spec: ClusterTrustBundleSpec {
                    signer_name: Some(signer_name(object)),
                    trust_bundle: pem,
                },
            }
        };
        if !authority.bundle.x509_authorities.is_empty() {
            let name = own_bundle_name(object);
            out.insert(
                name.clone(),
                bundle(name, "own", authority.bundle.x509_pem(), None),
            );
        }
        for td in federations.get(object).into_iter().flatten() {
            if *td == authority.trust_domain {
                continue;
            }
            // A bundle with no X.509 authority (JWT keys only) cannot be a
            // ClusterTrustBundle: the API requires at least one certificate.
            let Some(fb) = shared
                .federated
                .get(td)
                .filter(|b| !b.x509_authorities.is_empty())
            else {
                continue;
            };
            let name = federated_bundle_name(object, td.name());
            out.insert(
                name.clone(),
                bundle(name, "federated", fb.x509_pem(), Some(td.name())),
            );
        }
    }
    out
}

async fn sync(client: &Client, shared: &Shared) -> Result<(), kube::Error> {
    let owners = Api::<TrustDomainObject>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let want = desired(shared, &owners);
    let api = Api::<ClusterTrustBundle>::all(client.clone());
    let have = api
        .list(&ListParams::default().labels(&format!(
            "{BUNDLE_KIND_LABEL},app.kubernetes.io/managed-by=sigil-operator"
        )))
        .await?
        .items;
    // Only the bundles of TrustDomains this replica loads are its own to delete: another
    // installation (--trust-domain-selector) keeps its own, and a deleted TrustDomain's
    // bundles are collected through their owner reference.
    let ours: std::collections::BTreeSet<String> = shared
        .authorities
        .all()
        .iter()
        .map(|a| label_value(&a.object_name))
        .collect();
    for old in &have {
        let name = old.name_any();
        let owned = old
            .labels()
            .get(OWNER_LABEL)
            .is_some_and(|o| ours.contains(o));
        if owned && !want.contains_key(&name) {
            api.delete(&name, &DeleteParams::default()).await?;
            shared.metrics.bundle_writes.inc();
            info!(bundle = %name, "ClusterTrustBundle deleted");
        }
    }
    for (name, mut bundle) in want {
        match have.iter().find(|h| h.name_any() == name) {
            Some(old)
                if old.spec == bundle.spec && old.metadata.labels == bundle.metadata.labels => {}
            Some(old) => {
                bundle.metadata.resource_version = old.resource_version();
                api.replace(&name, &PostParams::default(), &bundle).await?;
                shared.metrics.bundle_writes.inc();
                info!(bundle = %name, "ClusterTrustBundle updated");
            }
            None => {
                api.create(&PostParams::default(), &bundle).await?;
                shared.metrics.bundle_writes.inc();
                info!(bundle = %name, "ClusterTrustBundle created");
            }
        }
    }
    Ok(())
}
