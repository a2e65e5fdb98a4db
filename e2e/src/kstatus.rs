//! kstatus (sigs.k8s.io/cli-utils/pkg/kstatus), the health check Flux's kustomize-controller
//! runs on what it applies, written from its documented rules for resources with no
//! type-specific reader (every custom resource):
//!
//! 1. `metadata.deletionTimestamp` set: **Terminating**;
//! 2. `status.observedGeneration` present and not `metadata.generation`: **InProgress**
//!    (`LatestGenerationNotObserved`);
//! 3. a condition `Reconciling` with status `True`: **InProgress**; `Stalled` `True`:
//!    **Failed** (the "abnormal-true" conditions);
//! 4. otherwise **Current** ("the absence of any known conditions means the resource is
//!    current"): kstatus itself does not read `Ready`.
//!
//! The GitOps tests compute it on the live objects the operator reconciles, so a status
//! that would leave Flux waiting (or report success too early) shows there.

use serde_json::Value;

/// What kstatus concludes about one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Reconciled: the controller has seen the latest spec and reports nothing abnormal.
    Current,
    /// The controller has not caught up with the spec, or says it is reconciling.
    InProgress,
    /// The controller says it is stuck (`Stalled`).
    Failed,
    /// Being deleted.
    Terminating,
}

/// kstatus's verdict on `obj` (a whole object as JSON) and its message.
pub fn compute(obj: &Value) -> (Status, String) {
    if obj["metadata"]["deletionTimestamp"]
        .as_str()
        .is_some_and(|t| !t.is_empty())
    {
        return (
            Status::Terminating,
            "Resource scheduled for deletion".into(),
        );
    }
    if let (Some(generation), Some(observed)) = (
        obj["metadata"]["generation"].as_i64(),
        obj["status"]["observedGeneration"].as_i64(),
    ) && generation != observed
    {
        return (
            Status::InProgress,
            format!(
                "{} generation is {generation}, but latest observed generation is {observed}",
                obj["kind"].as_str().unwrap_or_default()
            ),
        );
    }
    for c in obj["status"]["conditions"].as_array().into_iter().flatten() {
        let message = c["message"].as_str().unwrap_or_default().to_owned();
        match (c["type"].as_str(), c["status"].as_str()) {
            (Some("Reconciling"), Some("True")) => return (Status::InProgress, message),
            (Some("Stalled"), Some("True")) => return (Status::Failed, message),
            _ => {}
        }
    }
    (Status::Current, "Resource is current".into())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_documented_rules_in_their_order() {
        let obj =
            |meta: Value, status: Value| json!({"kind": "X", "metadata": meta, "status": status});
        let c = |t: &str, s: &str| json!({"type": t, "status": s, "message": t});
        assert_eq!(
            compute(&obj(
                json!({"generation": 2, "deletionTimestamp": "2026-01-01T00:00:00Z"}),
                json!({"observedGeneration": 1})
            ))
            .0,
            Status::Terminating
        );
        let (s, m) = compute(&obj(
            json!({"generation": 2}),
            json!({"observedGeneration": 1, "conditions": [c("Ready", "True")]}),
        ));
        assert_eq!(s, Status::InProgress);
        assert!(
            m.contains("generation is 2, but latest observed generation is 1"),
            "{m}"
        );
        assert_eq!(
            compute(&obj(json!({"generation": 2}), json!({"observedGeneration": 2, "conditions": [c("Reconciling", "True"), c("Stalled", "True")]}))).0,
            Status::InProgress
        );
        assert_eq!(
            compute(&obj(
                json!({"generation": 2}),
                json!({"observedGeneration": 2, "conditions": [c("Stalled", "True")]})
            ))
            .0,
            Status::Failed
        );
        assert_eq!(
            compute(&obj(json!({"generation": 2}), json!({"observedGeneration": 2, "conditions": [c("Ready", "True"), c("Reconciling", "False")]}))).0,
            Status::Current
        );
        // No observedGeneration, no conditions: Current (kstatus cannot tell).
        assert_eq!(
            compute(&obj(json!({"generation": 5}), json!(null))).0,
            Status::Current
        );
        // Ready False alone is not read by kstatus.
        assert_eq!(
            compute(&obj(
                json!({"generation": 1}),
                json!({"observedGeneration": 1, "conditions": [c("Ready", "False")]})
            ))
            .0,
            Status::Current
        );
    }
}
