//! sigil-operator: runs the signing CA of each TrustDomain, keeps the identity index of
//! pods × ClusterSPIFFEIDs, and serves the Node API to agents.
//!
//! Module map (one concept per module):
//! - [`crd`]: the CRD types, the single source of `crds/*.yaml`.
//! - [`authority`]: the signing state shared by every task of a replica.

pub mod authority;
pub mod crd;
