//! Sigil's Kubernetes API, without the operator that serves it: the custom resources of
//! group `sigil.dev` ([`crd`], the single source of the YAML in `crds/`) and the template
//! engine their `spiffeIDTemplate`, `dnsNameTemplates` and `workloadSelectorTemplates`
//! are written in ([`template`]). The operator, the identity index, the `sigil` CLI and the
//! benchmarks depend on it; it links no server, no TPM code and no gRPC.

pub mod crd;
pub mod node;
pub mod pod_certificates;
pub mod template;
