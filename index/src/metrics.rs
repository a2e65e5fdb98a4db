//! Metrics of the identity index and its informers.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels naming a kind of object.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `Pod`, `Namespace`, `Node`, `EndpointSlice`, `ClusterSPIFFEID` or `TrustDomain`.
    pub kind: String,
}

/// Labels of an informer event.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// The kind of object.
    pub kind: String,
    /// `apply`, `delete` or `relist`.
    pub action: String,
}

/// Labels of a status patch.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PatchLabels {
    /// `ok`, `error`, `timeout` or `unchanged` (not sent).
    pub result: String,
}

/// The index's metrics. Cheap to clone (handles share their values).
#[derive(Debug, Clone)]
pub struct IndexMetrics {
    /// Informer events applied.
    pub events: Family<EventLabels, Counter>,
    /// Malformed objects skipped.
    pub skipped: Family<KindLabels, Counter>,
    /// Watch errors (each is retried with backoff).
    pub watch_errors: Family<KindLabels, Counter>,
    /// ClusterSPIFFEID status patches, by result.
    pub status_patches: Family<PatchLabels, Counter>,
    /// Entries published, over all nodes.
    pub entries: Gauge,
    /// Pods known to the index.
    pub pods: Gauge,
    /// Time to apply one event (render and publish), seconds.
    pub apply_seconds: Histogram,
}

impl Default for IndexMetrics {
    fn default() -> Self {
        Self {
            events: Family::default(),
            skipped: Family::default(),
            watch_errors: Family::default(),
            status_patches: Family::default(),
            entries: Gauge::default(),
            pods: Gauge::default(),
            apply_seconds: Histogram::new(exponential_buckets(1e-6, 4.0, 12)),
        }
    }
}

impl IndexMetrics {
    /// Registers everything under `sigil_index_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sigil_index");
        r.register(
            "events",
            "Informer events applied to the identity index",
            self.events.clone(),
        );
        r.register(
            "skipped_objects",
            "Malformed objects skipped with a warning",
            self.skipped.clone(),
        );
        r.register(
            "watch_errors",
            "Watch errors (retried with backoff)",
            self.watch_errors.clone(),
        );
        r.register(
            "status_patches",
            "ClusterSPIFFEID status patches, by result",
            self.status_patches.clone(),
        );
        r.register(
            "entries",
            "Registration entries published over all nodes",
            self.entries.clone(),
        );
        r.register(
            "pods",
            "Pods known to the identity index",
            self.pods.clone(),
        );
        r.register(
            "apply_seconds",
            "Time to apply one informer event to the index",
            self.apply_seconds.clone(),
        );
    }
}
