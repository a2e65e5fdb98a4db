//! ClusterSPIFFEID status: the single writer that puts what the index computed
//! ([`sigil_index::StatusView::to_status`]) on the objects ([`write_statuses`]).
//!
//! The writer's queue is the index's set of dirty ClusterSPIFFEID names: bounded by the
//! number of objects, and coalescing, so a burst of 10 000 pod events costs one patch per
//! affected ClusterSPIFFEID per interval. It writes only while this replica leads, never
//! a status equal to the one on the object, always by server-side apply under one field
//! manager, and every patch has a timeout and is counted by result.

use std::collections::HashMap;
use std::time::Duration;

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::crd::cluster_spiffe_id::{ClusterSPIFFEID, ClusterSpiffeIdStatus};
use sigil_index::EntryIndex;

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
    let mut dirty = index.status_changes();
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
                let desired = view.to_status(sigil_index::now());
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
    index.count_status_patch(result);
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
