//! sigil-testkit: the worlds and fixtures the test suites and benchmarks of every crate
//! share, imported like any library (`use sigil_testkit::node_api::*`), on top of the
//! control-plane harness (`sigil_e2e`).
//!
//! - [`trust_domain`]: a namespace, TrustDomains and an operator's CA loop in this process;
//! - [`node_api`]: an operator replica with the identity index and the Node API on
//!   loopback, two Nodes, the agent's service account and pods;
//! - [`federation`]: bundle endpoints and FederatedBundles;
//! - [`operator_process`]: real sigil-operator processes serving a world's TrustDomain;
//! - [`hsm`]: a SoftHSM2 token, the PKCS#11 HSM of the key manager tests;
//! - [`tpm`]: swtpm-backed TPMs enrolled on Nodes;
//! - [`agent`]: a sigil-agent in this process with its sockets in a temporary directory;
//! - [`csi`]: sigil-csi beside that agent, and the kubelet's requests;
//! - [`spire`]: the real SPIRE server and agent;
//! - [`invariants`]: the reliability invariants, checked every second while faults run;
//! - [`report`]: how benchmarks print and record their figures.
#![allow(missing_debug_implementations)]

pub mod agent;
pub mod csi;
pub mod federation;
pub mod hsm;
pub mod invariants;
pub mod node_api;
pub mod operator_process;
pub mod report;
pub mod spire;
pub mod tpm;
pub mod trust_domain;
