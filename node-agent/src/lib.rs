//! sigil-agent: node attestation, workload attestation and the SPIFFE Workload API
