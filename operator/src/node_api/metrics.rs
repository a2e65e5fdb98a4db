//! Node API metrics: requests, denials with their reason, and signing counts/latency.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a denial.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// The RPC.
    pub rpc: String,
    /// Short reason.
    pub reason: String,
}

/// Labels of a request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The RPC.
    pub rpc: String,
}

/// The Node API's metric handles.
#[derive(Debug, Clone)]
pub struct NodeApiMetrics {
    /// Requests by RPC.
    pub requests: Family<RpcLabels, Counter>,
    /// Denials by RPC and reason.
    pub denials: Family<DenialLabels, Counter>,
    /// X509-SVIDs signed.
    pub svids_signed: Counter,
    /// JWT-SVIDs minted.
    pub jwts_minted: Counter,
    /// Time to sign one X509-SVID, seconds.
    pub sign_seconds: Histogram,
    /// Open SyncEntries streams.
    pub open_streams: prometheus_client::metrics::gauge::Gauge,
    /// The listener's connections (open, refused by reason).
    pub connections: crate::tls_listener::ListenerMetrics,
}

impl Default for NodeApiMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            denials: Family::default(),
            svids_signed: Counter::default(),
            jwts_minted: Counter::default(),
            sign_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            open_streams: Default::default(),
            connections: Default::default(),
        }
    }
}

impl NodeApiMetrics {
    /// Registers the metrics under `sigil_node_api_*`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sigil_node_api");
        r.register(
            "requests",
            "Node API requests by RPC",
            self.requests.clone(),
        );
        r.register(
            "denials",
            "Node API requests denied, by RPC and reason",
            self.denials.clone(),
        );
        r.register(
            "x509_svids_signed",
            "X509-SVIDs signed for agents",
            self.svids_signed.clone(),
        );
        r.register(
            "jwt_svids_minted",
            "JWT-SVIDs minted for agents",
            self.jwts_minted.clone(),
        );
        r.register(
            "x509_sign_seconds",
            "Time to sign one X509-SVID",
            self.sign_seconds.clone(),
        );
        r.register(
            "open_sync_streams",
            "Open SyncEntries streams",
            self.open_streams.clone(),
        );
        self.connections.register(r);
    }

    /// Counts a denial.
    pub fn deny(&self, rpc: &str, reason: &str) {
        self.denials
            .get_or_create(&DenialLabels {
                rpc: rpc.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts a request.
    pub fn request(&self, rpc: &str) {
        self.requests
            .get_or_create(&RpcLabels { rpc: rpc.into() })
            .inc();
    }
}
