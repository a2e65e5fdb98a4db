//! sigil-operator: runs the signing CA of each TrustDomain, keeps the identity index of
//! pods × ClusterSPIFFEIDs, and serves the Node API to agents.
//!
//! Module map (one concept per module):
//! - [`app`]: the process: flags and the subsystems it runs as one set.
//! - [`crd`], [`template`]: the CRD types and their template language (crate
//!   `sigil-api`, re-exported).
//! - [`authority`]: the signing state shared by every task of a replica.
//! - [`conditions`]: status conditions and times, the same for every controller.
//! - [`trust_domain`]: the CA of each TrustDomain, its rotation and bundle publication.
//! - [`federation`]: FederatedBundles (fetching foreign bundles), the SPIFFE bundle
//!   endpoint and OIDC discovery.
//! - [`keys`]: where CA and JWT keys live: the CA Secret, or a PKCS#11 HSM.
//! - [`leader`]: leader election on a Lease; gates every write.
//! - [`reflector_pair`]: two reflectors read as one (the CA and federation loaders).
//! - [`telemetry`]: JSON logs, Prometheus metrics, `/live` `/ready` `/metrics`.
//! - [`index`]: the identity index (crate `sigil-index`, re-exported) and the informers
//!   and status writer that connect it to the API server.
//! - [`node_api`]: the gRPC API agents use: node attestation, entry streams, signing.
//! - [`serving`]: the operator's own serving SVIDs (Node API, bundle endpoint).
//! - [`tls_listener`]: TLS accept loops with handshake deadlines and bounds.

pub mod admission;
pub mod app;
pub mod authority;
pub use sigil_api::{crd, template};
pub mod conditions;
pub mod federation;
pub mod index;
pub mod keys;
pub mod leader;
pub mod node_api;
pub mod pod_certificates;
pub mod reflector_pair;
pub mod serving;
pub mod shutdown;
pub mod telemetry;
pub mod tls_listener;
pub mod trust_domain;

/// How every watch of the operator retries after a failure: at most 4 s apart, so the
/// operator catches up within seconds of an API server outage's end (a replica holds a
/// handful of watches, so the short cap costs the API server little).
pub fn watch_backoff() -> sigil_telemetry::process::WatchBackoff {
    sigil_telemetry::process::WatchBackoff::new(std::time::Duration::from_secs(4))
}
