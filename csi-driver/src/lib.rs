//! sigil-csi: a CSI node plugin (Identity + Node services) that puts SPIFFE identities
//! into pods, either as the Workload API socket or as rotating files.
//!
//! Module map:
//! - [`writer`]: atomic `..data` generations of identity files.

pub mod writer;
