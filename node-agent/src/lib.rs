//! sigil-agent: attests its node to the operator, keeps the entries and SVIDs for its
//! node, attests local workloads, and serves the SPIFFE Workload API.
//!
//! Module map:
//! - [`app`]: the process: flags and the subsystems it runs as one set.
//! - [`attest`]: workload attestation (peer credentials, cgroups, pods, unix facts).
//! - [`cache`]: entries, SVIDs, JWT-SVIDs and bundles held by the agent.
//! - [`node_client`]: the agent's client of the operator's Node API.
//! - [`sync`]: node attestation, agent SVID renewal, and the entry stream.
//! - [`tpm`]: the node's TPM (EK, AK, credential activation) for TPM node attestation.
//! - [`rotator`]: pre-signing and rotating the X509-SVIDs of this node's entries.
//! - [`serving`]: what the Workload and Broker APIs serve from the cache.
//! - [`workload_api`]: the SPIFFE Workload API on a Unix socket.
//! - [`sds`]: Envoy's Secret Discovery Service (SDS v3) on the same socket.
//! - [`broker_api`]: the SPIFFE Broker API for sigil-csi, on a private socket.
//! - [`h2_authority`]: lets gRPC C-core clients (py-spiffe) past h2's `:authority` check.
//! - [`limits`]: what one workload may cost the agent (connections, JWT-SVID mints).

pub mod app;
pub mod attest;
pub mod broker_api;
pub mod cache;
pub mod h2_authority;
pub mod limits;
pub mod node_client;
pub mod rotator;
pub mod sds;
pub mod serving;
pub mod supervise;
pub mod sync;
pub mod tpm;
pub mod transport;
pub mod workload_api;
