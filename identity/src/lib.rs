//! Sigil's identity core: everything about SPIFFE identities that does not need
//! Kubernetes.
//!
//! - [`id`]: SPIFFE IDs and trust domains, validated strictly (SPIFFE-ID.md).
//! - [`keys`]: private keys, redacted in `Debug`, wiped when serialised copies drop.
//! - [`key_manager`]: where authority keys live (software, or an HSM behind a trait).
//! - [`ca`]: the X.509 signing authority (self-signed root, or under an upstream CA).
//! - [`x509`]: X509-SVID and CSR parsing and validation (X509-SVID.md).
//! - [`jwt`]: JWT-SVID minting and validation (JWT-SVID.md).
//! - [`bundle`]: SPIFFE bundles in JWK Set form (SPIFFE_Trust_Domain_and_Bundle.md).
//! - [`entry`]: registration entries and selector matching.
//! - [`tls`]: rustls verifiers that authenticate peers by SPIFFE ID.
//! - [`clock`]: injectable time.
//! - [`tpm_helper`]: the lines the agent and its TPM helper process exchange.
//!
//! This crate must not depend on Kubernetes crates: the operator, agent and CSI driver
//! build on it, and so can anything else that speaks SPIFFE.

pub mod bundle;
pub mod ca;
pub mod clock;
pub mod entry;
pub mod id;
pub mod jwt;
pub mod key_manager;
pub mod keys;
pub mod proto;
pub mod tls;
pub mod tpm_helper;
pub mod x509;

pub use bundle::{BundleSet, TrustBundle};
pub use id::{SpiffeId, TrustDomain};
