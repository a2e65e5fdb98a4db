//! Node API protobuf messages from the index's and the identity crate's types.

use sigil_identity::entry::{RegistrationEntry, Selector};
use sigil_identity::proto::node as pb;

use crate::index::NodeDelta;

/// Seconds since the Unix epoch, as the protos carry times (0 before the epoch).
pub(super) use sigil_identity::clock::unix_seconds as unix;

/// An entry as SyncEntries sends it.
pub(super) fn entry_to_pb(e: &RegistrationEntry) -> pb::Entry {
    pb::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        selectors: e.selectors.iter().map(sel_to_pb).collect(),
        dns_names: e.dns_names.clone(),
        x509_svid_ttl_seconds: e.x509_ttl.as_secs() as i64,
        jwt_svid_ttl_seconds: e.jwt_ttl.as_secs() as i64,
        federates_with: e
            .federates_with
            .iter()
            .map(|t| t.name().to_owned())
            .collect(),
        hint: e.hint.clone(),
        admin: e.admin,
        downstream: e.downstream,
        revision: e.revision,
        key_type: e.key_type.to_string(),
    }
}

/// A selector on the wire.
pub(super) fn sel_to_pb(s: &Selector) -> pb::Selector {
    pb::Selector {
        r#type: s.kind.clone(),
        value: s.value.clone(),
    }
}

/// A stream message; `bundles`, when given, is the complete set.
pub(super) fn delta_to_pb(
    d: NodeDelta,
    bundles: Option<Vec<pb::Bundle>>,
) -> pb::SyncEntriesResponse {
    let bundles_complete = bundles.is_some();
    let bundles = bundles.unwrap_or_default();
    pb::SyncEntriesResponse {
        full: d.full,
        upserts: d.upserts.iter().map(|e| entry_to_pb(e)).collect(),
        removed: d.removed,
        bundles,
        removed_bundles: vec![],
        bundles_complete,
        revision: d.revision,
    }
}
