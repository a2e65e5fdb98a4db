//! Trust bundle distribution: a ConfigMap named `spec.bundle.configMapName` in every
//! namespace `spec.bundle.namespaceSelector` picks, and in no other.
//!
//! Each ConfigMap holds `bundle.pem` (the X.509 authorities) and `bundle.spiffe` (the
//! SPIFFE bundle document, a JWK Set with `spiffe_sequence`), and is labelled and owned
//! by its TrustDomain. Only labelled ConfigMaps are ever changed or deleted: one of the
//! same name that Sigil did not write is left alone and reported.
//!
//! Only the leader calls this.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use sigil_identity::TrustBundle;
use tracing::{debug, info};

use super::error::Error;
use super::policy::Policy;
use super::store::{label_value, owner_reference};
use crate::crd::trust_domain::{COMPONENT_LABEL, OWNER_LABEL, TrustDomain as TrustDomainObject};

/// The X.509 authorities, PEM.
pub const BUNDLE_PEM_KEY: &str = "bundle.pem";
/// The SPIFFE bundle document (JWK Set).
pub const BUNDLE_SPIFFE_KEY: &str = "bundle.spiffe";
/// Annotation carrying the bundle's sequence number.
pub const SEQUENCE_ANNOTATION: &str = "sigil.dev/bundle-sequence";

/// What a publication did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Published {
    /// Namespaces that hold the current bundle.
    pub namespaces: usize,
    /// Namespaces where a foreign ConfigMap of that name blocks publication.
    pub conflicts: Vec<String>,
    /// ConfigMaps created, updated or deleted.
    pub writes: usize,
}

/// The label selector of the ConfigMaps written for `object`.
pub fn owned_selector(object: &str) -> String {
    format!(
        "{OWNER_LABEL}={},{COMPONENT_LABEL}=bundle",
        label_value(object)
    )
}

/// Makes the ConfigMaps of `owner` match `bundle` and `policy`.
pub async fn publish(
    client: &Client,
    owner: &TrustDomainObject,
    policy: &Policy,
    bundle: &TrustBundle,
) -> Result<Published, Error> {
    let object = owner.name_any();
    let selector = policy
        .namespace_selector
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let targets: BTreeSet<String> = namespaces
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|ns| ns.metadata.deletion_timestamp.is_none())
        .map(|ns| ns.name_any())
        .collect();

    let all: Api<ConfigMap> = Api::all(client.clone());
    let existing = all
        .list(&ListParams::default().labels(&owned_selector(&object)))
        .await?
        .items;

    let data = BTreeMap::from([
        (BUNDLE_PEM_KEY.to_owned(), bundle.x509_pem()),
        (BUNDLE_SPIFFE_KEY.to_owned(), bundle.to_jwks_json()),
    ]);
    let sequence = bundle.sequence.unwrap_or(0).to_string();
    let mut out = Published::default();
    let mut current: BTreeSet<String> = BTreeSet::new();

    for cm in &existing {
        let ns = cm.namespace().unwrap_or_default();
        let wanted = targets.contains(&ns) && cm.name_any() == policy.config_map_name;
        if !wanted {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: cm.uid(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(&cm.name_any(), &dp).await {
                Ok(_) => {
                    info!(trust_domain_object = %object, namespace = %ns, configmap = %cm.name_any(), "removed trust bundle from a namespace no longer selected");
                    out.writes += 1;
                }
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        current.insert(ns.clone());
        let up_to_date = cm.data.as_ref() == Some(&data)
            && cm.annotations().get(SEQUENCE_ANNOTATION) == Some(&sequence)
            && cm
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == owner.metadata.uid.as_ref());
        if up_to_date {
            continue;
        }
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let mut desired = desired(owner, &object, &ns, policy, &data, &sequence);
        desired.metadata.resource_version = cm.resource_version();
        match api
            .replace(&policy.config_map_name, &PostParams::default(), &desired)
            .await
        {
            Ok(_) => {
                debug!(trust_domain_object = %object, namespace = %ns, sequence = %sequence, "updated trust bundle");
                out.writes += 1;
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                return Err(Error::Conflict(format!(
                    "ConfigMap {ns}/{}",
                    policy.config_map_name
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }

    let missing: Vec<&String> = targets.iter().filter(|ns| !current.contains(*ns)).collect();
    for ns in missing {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        match api
            .create(
                &PostParams::default(),
                &desired(owner, &object, ns, policy, &data, &sequence),
            )
            .await
        {
            Ok(_) => {
                debug!(trust_domain_object = %object, namespace = %ns, "published trust bundle");
                current.insert(ns.clone());
                out.writes += 1;
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // The list can lag behind this operator's own create of a moment ago (a
                // reconcile right after the one that published): only a ConfigMap that is
                // not ours is a conflict.
                let ours = match api.get_opt(&policy.config_map_name).await {
                    Ok(Some(cm)) => written_for(&cm, owner, &object).then_some(cm),
                    _ => None,
                };
                match ours {
                    Some(cm) => {
                        current.insert(ns.clone());
                        let up_to_date = cm.data.as_ref() == Some(&data)
                            && cm.annotations().get(SEQUENCE_ANNOTATION) == Some(&sequence);
                        if !up_to_date {
                            let mut d = desired(owner, &object, ns, policy, &data, &sequence);
                            d.metadata.resource_version = cm.resource_version();
                            match api
                                .replace(&policy.config_map_name, &PostParams::default(), &d)
                                .await
                            {
                                Ok(_) => out.writes += 1,
                                Err(kube::Error::Api(s)) if s.code == 409 => {
                                    return Err(Error::Conflict(format!(
                                        "ConfigMap {ns}/{}",
                                        policy.config_map_name
                                    )));
                                }
                                Err(e) => return Err(e.into()),
                            }
                        }
                    }
                    None => out.conflicts.push(ns.clone()),
                }
            }
            // The namespace is being deleted.
            Err(kube::Error::Api(s)) if s.code == 403 || s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.namespaces = current.len();
    Ok(out)
}

/// Whether `cm` is the bundle ConfigMap Sigil wrote for `owner`.
fn written_for(cm: &ConfigMap, owner: &TrustDomainObject, object: &str) -> bool {
    cm.labels().get(OWNER_LABEL) == Some(&label_value(object))
        && cm.labels().get(COMPONENT_LABEL).map(String::as_str) == Some("bundle")
        && cm
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == owner.metadata.uid.as_ref())
}

fn desired(
    owner: &TrustDomainObject,
    object: &str,
    namespace: &str,
    policy: &Policy,
    data: &BTreeMap<String, String>,
    sequence: &str,
) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(policy.config_map_name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (OWNER_LABEL.to_owned(), label_value(object)),
                (COMPONENT_LABEL.to_owned(), "bundle".to_owned()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "sigil-operator".to_owned(),
                ),
            ])),
            annotations: Some(BTreeMap::from([
                (SEQUENCE_ANNOTATION.to_owned(), sequence.to_owned()),
                (
                    "sigil.dev/trust-domain-name".to_owned(),
                    policy.trust_domain.name().to_owned(),
                ),
            ])),
            owner_references: owner_reference(owner).map(|o| vec![o]),
            ..Default::default()
        },
        data: Some(data.clone()),
        ..Default::default()
    }
}
