//! sigil-operator's own metrics (CA expiry, rotations, bundle sequence, reconcile errors,
//! leadership); logging, readiness, the health server and signal handling come from
//! [`sigil_telemetry`] and are re-exported here.

pub use sigil_telemetry::{
    LogFormat, Readiness, ReadyHandle, init_logging, serve, shutdown_on_signals,
};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrustDomainLabels {
    /// The trust domain name.
    pub trust_domain: String,
}

/// Labels of a CA expiry gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaLabels {
    /// The trust domain name.
    pub trust_domain: String,
    /// `active` or `prepared`.
    pub role: String,
}

/// Labels of a rotation counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RotationLabels {
    /// The trust domain name.
    pub trust_domain: String,
    /// `x509` or `jwt`.
    pub kind: String,
    /// `minted`, `prepared`, `activated`, `dropped` or `discarded`.
    pub transition: String,
}

/// Labels of a reconcile error counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Which controller.
    pub controller: String,
    /// The error's `metric_label()`.
    pub reason: String,
}

/// Labels of the leadership gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    /// `namespace/name` of the Lease.
    pub lease: String,
}

/// Metrics of the TrustDomain controller. Cheap to clone (handles share their values).
#[derive(Debug, Clone)]
pub struct TrustDomainMetrics {
    /// Expiry (Unix seconds) of the active and prepared CA of each trust domain, as every
    /// replica has loaded it.
    pub ca_expiry: Family<CaLabels, Gauge>,
    /// Key transitions performed by the leader.
    pub rotations: Family<RotationLabels, Counter>,
    /// `spiffe_sequence` of each trust domain's bundle, as loaded by this replica.
    pub bundle_sequence: Family<TrustDomainLabels, Gauge>,
    /// Reconcile errors and reported problems, by reason.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// Reconcile duration, seconds.
    pub reconcile_seconds: Histogram,
}

impl Default for TrustDomainMetrics {
    fn default() -> Self {
        Self {
            ca_expiry: Family::default(),
            rotations: Family::default(),
            bundle_sequence: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
        }
    }
}

/// Labels of a federation fetch counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    /// The foreign trust domain.
    pub trust_domain: String,
    /// `ok`, or the failure reason (`TLSFailed`, `Timeout`, ...).
    pub result: String,
}

/// Labels of a bundle endpoint request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// `bundle`, `openid-configuration`, `keys` or `other`.
    pub path: String,
    /// HTTP status code.
    pub code: u16,
}

/// Metrics of federation: fetching foreign bundles and serving ours.
#[derive(Debug, Clone)]
pub struct FederationMetrics {
    /// Bundle endpoint fetches by the leader, by trust domain and result.
    pub fetches: Family<FetchLabels, Counter>,
    /// Fetch duration, seconds.
    pub fetch_seconds: Histogram,
    /// `spiffe_sequence` of the bundle this replica holds for each foreign trust domain
    /// (-1 when the bundle has none).
    pub bundle_sequence: Family<TrustDomainLabels, Gauge>,
    /// Time of the last successful fetch (Unix seconds), per foreign trust domain.
    pub last_success: Family<TrustDomainLabels, Gauge>,
    /// Requests to our bundle endpoint and OIDC discovery, by path and status code.
    pub endpoint_requests: Family<EndpointLabels, Counter>,
}

impl Default for FederationMetrics {
    fn default() -> Self {
        Self {
            fetches: Family::default(),
            fetch_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            bundle_sequence: Family::default(),
            last_success: Family::default(),
            endpoint_requests: Family::default(),
        }
    }
}

/// Leadership metrics.
#[derive(Debug, Clone, Default)]
pub struct LeaderMetrics {
    /// 1 while this replica holds the Lease.
    pub is_leader: Family<LeaseLabels, Gauge>,
    /// Times this replica acquired the Lease.
    pub acquisitions: Family<LeaseLabels, Counter>,
}

/// Every metric family of the operator's own subsystems.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// TrustDomain controller.
    pub trust_domain: TrustDomainMetrics,
    /// Leader election.
    pub leader: LeaderMetrics,
    /// Federation.
    pub federation: FederationMetrics,
}

impl Metrics {
    /// Registers everything under the `sigil_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sigil");
        let td = &self.trust_domain;
        r.register(
            "ca_expiry_timestamp_seconds",
            "Expiry of the active and prepared CA certificate (Unix time)",
            td.ca_expiry.clone(),
        );
        r.register(
            "ca_rotations",
            "CA and JWT key transitions (minted, prepared, activated, dropped, discarded)",
            td.rotations.clone(),
        );
        r.register(
            "bundle_sequence",
            "spiffe_sequence of the published trust bundle",
            td.bundle_sequence.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconcile errors and reported problems, by controller and reason",
            td.reconcile_errors.clone(),
        );
        r.register(
            "trust_domain_reconcile_seconds",
            "Duration of one TrustDomain reconcile",
            td.reconcile_seconds.clone(),
        );
        let fed = &self.federation;
        r.register(
            "federation_fetches",
            "Fetches of foreign bundles from their bundle endpoints, by trust domain and result",
            fed.fetches.clone(),
        );
        r.register(
            "federation_fetch_seconds",
            "Duration of one bundle endpoint fetch",
            fed.fetch_seconds.clone(),
        );
        r.register(
            "federated_bundle_sequence",
            "spiffe_sequence of the bundle held for a foreign trust domain (-1: none in the bundle)",
            fed.bundle_sequence.clone(),
        );
        r.register(
            "federation_last_success_timestamp_seconds",
            "Time of the last successful fetch of a foreign bundle (Unix time)",
            fed.last_success.clone(),
        );
        r.register(
            "bundle_endpoint_requests",
            "Requests to the bundle endpoint and OIDC discovery, by path and status code",
            fed.endpoint_requests.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the Lease",
            self.leader.is_leader.clone(),
        );
        r.register(
            "leader_acquisitions",
            "Times this replica acquired the Lease",
            self.leader.acquisitions.clone(),
        );
    }
}
