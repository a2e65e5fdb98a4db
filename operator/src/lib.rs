//! sigil-operator: runs the signing CA of each TrustDomain, keeps the identity index of
//! pods × ClusterSPIFFEIDs, and serves the Node API to agents.
//!
//! Module map (one concept per module):
//! - [`app`]: the process: flags and the subsystems it runs as one set.
//! - [`crd`]: the CRD types, the single source of `crds/*.yaml`.
//! - [`authority`]: the signing state shared by every task of a replica.
//! - [`trust_domain`]: the CA of each TrustDomain, its rotation and bundle publication.
//! - [`leader`]: leader election on a Lease; gates every write.
//! - [`telemetry`]: JSON logs, Prometheus metrics, `/live` `/ready` `/metrics`.
//! - [`template`]: the typed `{{ field }}` template language of ClusterSPIFFEIDs.
//! - [`index`]: the identity index: pods × ClusterSPIFFEIDs → entries per node.
//! - [`node_api`]: the gRPC API agents use: node attestation, entry streams, signing.

pub mod app;
pub mod authority;
pub mod crd;
pub mod index;
pub mod leader;
pub mod node_api;
pub mod telemetry;
pub mod template;
pub mod trust_domain;
