//! sigil-csi: a CSI node plugin (Identity + Node services) that puts SPIFFE identities
//! into pods, either as the Workload API socket or as rotating files.
//!
//! Module map:
//! - [`app`]: the process: flags, the CSI socket, resuming recorded volumes.
//! - [`service`]: the CSI services; request validation; publish/unpublish.
//! - [`files`]: files-mode volumes: tmpfs, identity files, rotation, records on disk.
//! - [`broker`]: the client of the agent's SPIFFE Broker API.
//! - [`mounter`]: bind and tmpfs mounts behind a trait.
//! - [`writer`]: atomic `..data` generations of identity files.

pub mod app;
pub mod broker;
pub mod files;
pub mod mounter;
pub mod service;
pub mod writer;
