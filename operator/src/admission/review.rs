//! The admission decision, pure: a Pod being created that mounts a Sigil volume but that
//! no ClusterSPIFFEID selects is admitted with a warning naming the nearest
//! ClusterSPIFFEID and why it does not match (what `sigil explain pod` would say once the
//! pod exists). Nothing is ever denied: the warning is advice, and a pod created a moment
//! before its ClusterSPIFFEID is a normal GitOps ordering.

use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};

use crate::index::{Admission, EntryIndex};

/// The CSI driver whose volumes carry a Sigil identity.
pub const DRIVER: &str = "csi.sigil.dev";

/// What the webhook answered, for its metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The pod mounts no Sigil volume (or is not a create): nothing to say.
    NotConcerned,
    /// A ClusterSPIFFEID selects it.
    Selected,
    /// Admitted with a warning.
    Warned,
    /// The operator could not tell (not synced, namespace not seen yet): no warning.
    Unknown,
    /// The request could not be read (allowed all the same: the webhook never blocks).
    Unreadable,
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::NotConcerned => "not_concerned",
            Outcome::Selected => "selected",
            Outcome::Warned => "warned",
            Outcome::Unknown => "unknown",
            Outcome::Unreadable => "unreadable",
        }
    }
}

/// The names of `pod`'s volumes served by [`DRIVER`] (inline CSI volumes).
pub fn sigil_volumes(pod: &Pod) -> Vec<&str> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter(|v| v.csi.as_ref().is_some_and(|c| c.driver == DRIVER))
        .map(|v| v.name.as_str())
        .collect()
}

/// Where a reviewed object keeps the pod it stands for: a Pod is its own; the workload
/// kinds hold a template (a CronJob one level further down).
fn pod_of(kind: &str, object: &serde_json::Value) -> Option<serde_json::Value> {
    let template = match kind {
        "Pod" => return Some(object.clone()),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => object.pointer("/spec/template")?,
        "CronJob" => object.pointer("/spec/jobTemplate/spec/template")?,
        _ => return None,
    };
    Some(serde_json::json!({
        "metadata": template.get("metadata").cloned().unwrap_or_default(),
        "spec": template.get("spec").cloned().unwrap_or_default(),
    }))
}

/// Answers one review: always allowed, with a warning when it applies. A body that is not
/// an AdmissionReview gets an "invalid" answer without a uid, which the API server treats
/// as a failed call (and the webhook's `failurePolicy: Ignore` admits the object); an
/// object this code cannot read is admitted without a word.
///
/// Pods are looked at when created; the workload kinds (Deployment, StatefulSet,
/// DaemonSet, ReplicaSet, Job, CronJob, ReplicationController) when created or updated,
/// through their pod template, so `kubectl apply` of a Deployment warns its author, not
/// only the controller that creates its pods.
pub fn review(index: &EntryIndex, body: &[u8]) -> (AdmissionReview<DynamicObject>, Outcome) {
    let req: AdmissionRequest<DynamicObject> = match serde_json::from_slice::<
        AdmissionReview<DynamicObject>,
    >(body)
    .map_err(|e| e.to_string())
    .and_then(|r| {
        r.try_into()
            .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| e.to_string())
    }) {
        Ok(r) => r,
        Err(e) => {
            let resp =
                AdmissionResponse::invalid(format!("not an AdmissionReview with a request: {e}"));
            return (resp.into_review(), Outcome::Unreadable);
        }
    };
    let mut resp = AdmissionResponse::from(&req);
    let kind = req.kind.kind.as_str();
    let looked_at = match req.operation {
        Operation::Create => true,
        Operation::Update => kind != "Pod",
        _ => false,
    };
    let outcome = match (&req.object, looked_at) {
        (Some(obj), true) => {
            let pod = serde_json::to_value(obj)
                .ok()
                .and_then(|o| pod_of(kind, &o))
                .map(serde_json::from_value::<Pod>);
            match pod {
                None => Outcome::NotConcerned,
                Some(Err(_)) => Outcome::Unreadable,
                Some(Ok(pod)) => {
                    let namespace = req
                        .namespace
                        .clone()
                        .or_else(|| obj.metadata.namespace.clone())
                        .unwrap_or_default();
                    let name = obj
                        .metadata
                        .name
                        .clone()
                        .or_else(|| obj.metadata.generate_name.as_ref().map(|g| format!("{g}*")))
                        .unwrap_or_else(|| "(unnamed)".into());
                    let subject = Subject {
                        kind,
                        namespace: &namespace,
                        name: &name,
                    };
                    let (w, outcome) = warning(index, &subject, &pod);
                    resp.warnings = w.map(|w| vec![w]);
                    outcome
                }
            }
        }
        _ => Outcome::NotConcerned,
    };
    (resp.into_review(), outcome)
}

/// The object a warning is about.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// Its kind (`Pod`, `Deployment`...).
    pub kind: &'a str,
    /// Its namespace.
    pub namespace: &'a str,
    /// Its name (`prefix-*` for a generated one).
    pub name: &'a str,
}

/// The warning for `pod` (the subject itself, or its pod template), if it deserves one.
pub fn warning(index: &EntryIndex, subject: &Subject<'_>, pod: &Pod) -> (Option<String>, Outcome) {
    let volumes = sigil_volumes(pod);
    let Some(first) = volumes.first() else {
        return (None, Outcome::NotConcerned);
    };
    let Subject {
        kind,
        namespace,
        name,
    } = *subject;
    let (what, explain) = if kind == "Pod" {
        (
            format!(
                "pod {namespace}/{name} mounts Sigil volume {first:?} ({DRIVER}) but will get no identity"
            ),
            format!(
                "once it exists, `sigil explain pod {namespace}/{name}` shows every ClusterSPIFFEID's verdict"
            ),
        )
    } else {
        (
            format!(
                "{} {namespace}/{name}: its pods mount Sigil volume {first:?} ({DRIVER}) but will get no identity",
                kind.to_lowercase()
            ),
            format!(
                "once a pod exists, `sigil explain pod {namespace}/<pod>` shows every ClusterSPIFFEID's verdict"
            ),
        )
    };
    let labels = if kind == "Pod" {
        "the pod's labels"
    } else {
        "the pod template's labels"
    };
    let text = match index.admission(namespace, pod.metadata.labels.as_ref()) {
        Admission::Selected(_) => return (None, Outcome::Selected),
        Admission::Unknown(_) => return (None, Outcome::Unknown),
        Admission::NamespaceIgnored => format!(
            "{what}: namespace {namespace} is never served (the operator's ignored namespaces); run it in another namespace"
        ),
        Admission::NotSelected { nearest: None } => {
            format!("{what}: no ClusterSPIFFEID exists; create one whose selectors match {labels}")
        }
        Admission::NotSelected {
            nearest: Some((csid, why)),
        } => format!(
            "{what}: no ClusterSPIFFEID selects it. Nearest: ClusterSPIFFEID {csid}, where {why}; fix {labels} or that selector ({explain})"
        ),
    };
    (Some(text), Outcome::Warned)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::index::IndexConfig;

    fn index_with_api_only() -> EntryIndex {
        let ix = EntryIndex::new(IndexConfig::new("c1"));
        ix.apply_trust_domain(crate::index::TrustDomainInfo {
            object_name: "main".into(),
            trust_domain: sigil_identity::TrustDomain::new("example.org").unwrap(),
            x509_ttl: std::time::Duration::from_secs(3600),
            jwt_ttl: std::time::Duration::from_secs(300),
        });
        ix.apply_namespace(
            &serde_json::from_value(
                json!({"metadata": {"name": "prod", "labels": {"env": "prod"}}}),
            )
            .unwrap(),
        );
        ix.apply_cluster_spiffe_id(
            &serde_json::from_value(json!({
                "apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID",
                "metadata": {"name": "api", "uid": "u1", "generation": 1, "creationTimestamp": "2025-01-01T00:00:00Z"},
                "spec": {"podSelector": {"matchLabels": {"app": "api"}}},
            }))
            .unwrap(),
        );
        ix.mark_synced();
        ix
    }

    fn review_of(pod: serde_json::Value, operation: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "3f1c", "operation": operation, "namespace": "prod",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "userInfo": {"username": "alice"},
                "object": pod, "dryRun": false,
            },
        }))
        .unwrap()
    }

    fn pod(labels: serde_json::Value, driver: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "prod", "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "x"}],
                     "volumes": [{"name": "spiffe", "csi": {"driver": driver, "readOnly": true}}]}})
    }

    fn answer(body: &[u8]) -> (serde_json::Value, Outcome) {
        let ix = index_with_api_only();
        let (r, o) = review(&ix, body);
        (serde_json::to_value(r).unwrap(), o)
    }

    #[test]
    fn an_unselected_pod_with_a_sigil_volume_is_allowed_with_a_warning_naming_the_nearest() {
        let (r, o) = answer(&review_of(pod(json!({"app": "web"}), DRIVER), "CREATE"));
        assert_eq!(o, Outcome::Warned);
        let resp = &r["response"];
        assert_eq!(resp["uid"], "3f1c", "the answer carries the request's uid");
        assert_eq!(resp["allowed"], true);
        let w = resp["warnings"][0].as_str().unwrap();
        for part in [
            "prod/web-1",
            "\"spiffe\"",
            "ClusterSPIFFEID api",
            "spec.podSelector",
            "app=web",
            "sigil explain pod prod/web-1",
        ] {
            assert!(w.contains(part), "{part:?} missing in {w}");
        }
    }

    #[test]
    fn selected_pods_other_volumes_and_updates_get_no_warning() {
        let (r, o) = answer(&review_of(pod(json!({"app": "api"}), DRIVER), "CREATE"));
        assert_eq!(o, Outcome::Selected);
        assert!(r["response"]["warnings"].is_null(), "{r}");
        assert_eq!(r["response"]["allowed"], true);
        let (r, o) = answer(&review_of(
            pod(json!({"app": "web"}), "csi.spiffe.io"),
            "CREATE",
        ));
        assert_eq!(o, Outcome::NotConcerned);
        assert!(r["response"]["warnings"].is_null(), "{r}");
        let (_, o) = answer(&review_of(pod(json!({"app": "web"}), DRIVER), "UPDATE"));
        assert_eq!(o, Outcome::NotConcerned);
    }

    fn workload(kind: &str, labels: serde_json::Value) -> serde_json::Value {
        let p = pod(labels, DRIVER);
        let template = json!({"metadata": p["metadata"], "spec": p["spec"]});
        let spec = if kind == "CronJob" {
            json!({"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}})
        } else {
            json!({"selector": {}, "template": template})
        };
        json!({"apiVersion": "apps/v1", "kind": kind,
               "metadata": {"name": "web", "namespace": "prod"}, "spec": spec})
    }

    fn review_of_kind(kind: &str, object: serde_json::Value, operation: &str) -> Vec<u8> {
        let mut r: serde_json::Value =
            serde_json::from_slice(&review_of(object, operation)).unwrap();
        r["request"]["kind"]["kind"] = kind.into();
        serde_json::to_vec(&r).unwrap()
    }

    #[test]
    fn workloads_warn_through_their_pod_template_on_create_and_update() {
        for kind in ["Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"] {
            for op in ["CREATE", "UPDATE"] {
                let (r, o) = answer(&review_of_kind(
                    kind,
                    workload(kind, json!({"app": "web"})),
                    op,
                ));
                assert_eq!(o, Outcome::Warned, "{kind} {op}");
                let w = r["response"]["warnings"][0].as_str().unwrap();
                let subject = format!("{} prod/web: its pods mount", kind.to_lowercase());
                assert!(
                    w.contains(&subject)
                        && w.contains("(app=web)")
                        && w.contains("fix the pod template's labels"),
                    "{w}"
                );
                let (_, o) = answer(&review_of_kind(
                    kind,
                    workload(kind, json!({"app": "api"})),
                    op,
                ));
                assert_eq!(o, Outcome::Selected, "{kind} {op}");
            }
        }
        let (_, o) = answer(&review_of_kind(
            "Service",
            json!({"metadata": {"name": "x"}}),
            "CREATE",
        ));
        assert_eq!(o, Outcome::NotConcerned);
    }

    #[test]
    fn garbage_is_answered_not_panicked_on() {
        for body in [&b"{"[..], b"{}", b"{\"request\": 3}", &[0xff; 64][..]] {
            let (r, o) = answer(body);
            assert_eq!(o, Outcome::Unreadable);
            assert!(r["response"]["status"]["message"].is_string(), "{r}");
        }
    }
}
