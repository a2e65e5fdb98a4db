//! The operator's side of the identity index ([`sigil_index`], re-exported here): the
//! informers that feed it ([`run`], `watch.rs`; the Pod informer lists in protobuf,
//! `pod_watch.rs`) and the single writer of ClusterSPIFFEID status (`status.rs`), which
//! writes only while this replica leads.

pub use sigil_index::*;

mod pod_list;
mod pod_watch;
mod status;
mod watch;

pub use self::pod_list::{ListEnd, MAX_MESSAGE, PodListReader, PodPage, decode_pod_list};
pub use self::pod_watch::{ListTotals, list_every_pod};
pub use self::status::StatusOptions;
pub use self::watch::{RunOptions, run};
