//! ClusterSPIFFEID status: what the index computed ([`build`]) and the single writer that
//! puts it on the objects ([`write_statuses`]).
//!
//! The writer's queue is the index's set of dirty ClusterSPIFFEID names: bounded by the
//! number of objects, and coalescing, so a burst of 10 000 pod events costs one patch per
//! affected ClusterSPIFFEID per interval. It writes only while this replica leads, never
//! a status equal to the one on the object, always by server-side apply under one field
//! manager, and every patch has a timeout and is counted by result.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::EntryIndex;
use super::metrics::PatchLabels;
use super::status_view::StatusView;
use crate::crd::cluster_spiffe_id::{ClusterSPIFFEID, ClusterSpiffeIdStatus};

/// How status is written.
#[derive(Debug, Clone)]
pub struct StatusOptions {
    /// Field manager of the server-side apply patches.
    pub field_manager: String,
    /// Deadline of one patch.
    pub patch_timeout: Duration,
    /// Pause between two passes over the dirty set (changes in between coalesce).
    pub interval: Duration,
}

impl Default for StatusOptions {
    fn default() -> Self {
        Self {
            field_manager: "sigil-operator".into(),
            patch_timeout: Duration::from_secs(10),
            interval: Duration::from_millis(500),
        }
    }
}

pub(crate) fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// The status to write: the index's view, with the Ready condition's transition time
/// kept from the observed status when its value did not change.
pub(crate) fn build(view: StatusView, now: Time) -> ClusterSpiffeIdStatus {
    let status = if view.ready.ready { "True" } else { "False" };
    let previous = view
        .observed
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now,
    };
    ClusterSpiffeIdStatus {
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: view.ready.reason.into(),
            message: view.ready.message,
            last_transition_time,
            observed_generation: view.generation,
        }],
        observed_generation: view.generation,
        stats: view.stats,
    }
}

/// Writes ClusterSPIFFEID status while `leader` is true, until `cancel`.
pub(crate) async fn write_statuses(
    client: Client,
    index: EntryIndex,
    mut leader: watch::Receiver<bool>,
    options: StatusOptions,
    cancel: CancellationToken,
) {
    let api: Api<DynamicObject> =
        Api::all_with(client, &ApiResource::erase::<ClusterSPIFFEID>(&()));
    let mut dirty = index.inner.status_dirty.subscribe();
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = index.synced() => {}
    }
    loop {
        // Wait to lead.
        if !*leader.borrow_and_update() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = leader.changed() => if r.is_err() { return },
            }
            continue;
        }
        // A new term: whatever a previous leader wrote is unknown, so look at everything.
        let mut written: HashMap<String, ClusterSpiffeIdStatus> = HashMap::new();
        index.mark_all_dirty();
        while *leader.borrow_and_update() {
            dirty.borrow_and_update();
            let mut retry = Vec::new();
            for name in index.take_dirty() {
                if cancel.is_cancelled() {
                    return;
                }
                let Some(view) = index.status_view(&name) else {
                    continue;
                };
                let observed = view.observed.clone();
                let desired = build(view, now());
                if observed.as_ref() == Some(&desired) || written.get(&name) == Some(&desired) {
                    count(&index, "unchanged");
                    continue;
                }
                match patch(&api, &options, &name, &desired).await {
                    Ok(()) => {
                        count(&index, "ok");
                        written.insert(name, desired);
                    }
                    Err(result) => {
                        count(&index, result);
                        retry.push(name);
                    }
                }
            }
            // Failed patches go back into the queue, after a longer pause.
            let pause = if retry.is_empty() {
                options.interval
            } else {
                options.interval * 10
            };
            if !retry.is_empty() {
                index.mark_dirty(retry);
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = dirty.changed() => if r.is_err() { return },
                r = leader.changed() => if r.is_err() { return },
            }
            // Let a burst settle into one pass.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

fn count(index: &EntryIndex, result: &str) {
    index
        .inner
        .metrics
        .status_patches
        .get_or_create(&PatchLabels {
            result: result.to_owned(),
        })
        .inc();
}

async fn patch(
    api: &Api<DynamicObject>,
    options: &StatusOptions,
    name: &str,
    status: &ClusterSpiffeIdStatus,
) -> Result<(), &'static str> {
    let body = serde_json::json!({
        "apiVersion": "sigil.dev/v1alpha1",
        "kind": "ClusterSPIFFEID",
        "metadata": {"name": name},
        "status": status,
    });
    let params = PatchParams::apply(&options.field_manager).force();
    match tokio::time::timeout(
        options.patch_timeout,
        api.patch_status(name, &params, &Patch::Apply(&body)),
    )
    .await
    {
        Ok(Ok(_)) => {
            debug!(cluster_spiffe_id = name, "status written");
            Ok(())
        }
        Ok(Err(kube::Error::Api(e))) if e.code == 404 => {
            debug!(
                cluster_spiffe_id = name,
                "deleted before its status was written"
            );
            Ok(())
        }
        Ok(Err(e)) => {
            warn!(cluster_spiffe_id = name, error = %e, "writing ClusterSPIFFEID status failed; will retry");
            Err("error")
        }
        Err(_) => {
            warn!(cluster_spiffe_id = name, timeout = ?options.patch_timeout, "writing ClusterSPIFFEID status timed out; will retry");
            Err("timeout")
        }
    }
}
