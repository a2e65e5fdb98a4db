//! A ClusterSPIFFEID's status as the index sees it: its counts and its Ready condition,
//! with the reason a user acts on. The status writer ([`crate::status`]) compares it with
//! what was last written and patches the difference.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::state::{CsidRecord, TdResolution};
use sigil_api::crd::cluster_spiffe_id::{ClusterSpiffeIdStats, ClusterSpiffeIdStatus};

/// The readiness condition of a ClusterSPIFFEID, without its transition time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
}

/// A ClusterSPIFFEID's status as the index sees it, and as it was last observed.
#[derive(Debug, Clone)]
pub struct StatusView {
    pub generation: Option<i64>,
    pub stats: ClusterSpiffeIdStats,
    pub ready: Readiness,
    pub observed: Option<ClusterSpiffeIdStatus>,
}

/// The status of `rec`; `synced` is whether every informer has listed.
pub(super) fn of(rec: &CsidRecord, synced: bool) -> StatusView {
    let stats = ClusterSpiffeIdStats {
        namespaces_selected: rec.namespaces_selected as i64,
        namespaces_ignored: rec.namespaces_ignored as i64,
        pods_selected: rec.selected.len() as i64,
        pod_entry_render_failures: rec.failures.len() as i64,
        first_render_failure: rec
            .failures
            .iter()
            .next()
            .map(|((ns, n), why)| format!("{ns}/{n}: {why}")),
        entries_masked: rec.masked as i64,
    };
    let ready = match (&rec.compiled, &rec.resolved) {
        _ if !synced => Readiness {
            ready: false,
            reason: "Syncing",
            message: "the operator is still listing objects".into(),
        },
        (Err(e), _) => Readiness {
            ready: false,
            reason: "InvalidSpec",
            message: e.clone(),
        },
        (_, TdResolution::NotFound(td)) => Readiness {
            ready: false,
            reason: "TrustDomainNotFound",
            message: format!(
                "TrustDomain {td:?} (spec.trustDomain) does not exist; create it or name an existing one"
            ),
        },
        (_, TdResolution::NoneExist) => Readiness {
            ready: false,
            reason: "TrustDomainNotFound",
            message: "no TrustDomain exists; create one (spec.trustDomain may then be left out)"
                .into(),
        },
        (_, TdResolution::Ambiguous(n)) => Readiness {
            ready: false,
            reason: "TrustDomainAmbiguous",
            message: format!(
                "spec.trustDomain is not set and {n} TrustDomains exist; set it to the name of one"
            ),
        },
        _ if !rec.failures.is_empty() => Readiness {
            ready: false,
            reason: "RenderFailures",
            message: format!(
                "{} of {} selected pods have no entry; first: {}",
                rec.failures.len(),
                rec.selected.len(),
                stats.first_render_failure.clone().unwrap_or_default()
            ),
        },
        _ if !rec.hint_conflicts.is_empty() => {
            let ((ns, n), owner) = rec
                .hint_conflicts
                .iter()
                .next()
                .map(|(k, v)| (k.clone(), v.clone()))
                .unwrap_or_default();
            Readiness {
                ready: true,
                reason: "HintConflict",
                message: format!(
                    "{} of {} selected pods get this identity without its hint {:?}: an older ClusterSPIFFEID gives them an identity with the same hint, and a hint must be unique among a workload's SVIDs (first: {ns}/{n}, hint kept by {owner}); change spec.hint",
                    rec.hint_conflicts.len(),
                    rec.selected.len(),
                    rec.spec
                        .as_ref()
                        .map(|s| s.hint.as_str())
                        .unwrap_or_default(),
                ),
            }
        }
        _ => Readiness {
            ready: true,
            reason: "EntriesRendered",
            message: format!(
                "{} pods selected, {} entries masked",
                rec.selected.len(),
                rec.masked
            ),
        },
    };
    StatusView {
        generation: rec.meta.generation,
        stats,
        ready,
        observed: rec.observed_status.clone(),
    }
}

/// Now, as status times are written.
pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

impl StatusView {
    /// The status to write: this view, with the Ready condition's transition time kept
    /// from the observed status when its value did not change (else `now`).
    pub fn to_status(self, now: Time) -> ClusterSpiffeIdStatus {
        let view = self;
        let status = if view.ready.ready { "True" } else { "False" };
        let previous = view
            .observed
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
        let last_transition_time = match previous {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => now,
        };
        let ready = Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: view.ready.reason.into(),
            message: view.ready.message,
            last_transition_time,
            observed_generation: view.generation,
        };
        let stalled = sigil_api::crd::stalled(&ready);
        ClusterSpiffeIdStatus {
            conditions: vec![ready, stalled],
            observed_generation: view.generation,
            stats: view.stats,
        }
    }
}
