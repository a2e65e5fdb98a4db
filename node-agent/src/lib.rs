//! sigil-agent: attests its node to the operator, keeps the entries and SVIDs for its
//! node, attests local workloads, and serves the SPIFFE Workload API.
//!
//! Module map:
//! - [`attest`]: workload attestation (peer credentials, cgroups, pods, unix facts).
//! - [`cache`]: entries, SVIDs, JWT-SVIDs and bundles held by the agent.
//! - [`node_client`]: the agent's client of the operator's Node API.

pub mod attest;
pub mod cache;
pub mod node_client;
