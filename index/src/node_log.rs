//! One node's published entries and the revisioned log of how they changed, so a stream
//! that last saw revision R gets exactly the upserts and removals after R.
//!
//! Every change to a node is stamped with a revision from the index's single counter.
//! Revisions carry the index's random epoch in their high bits ([`Revisions`]), so a
//! revision issued by another operator replica or an earlier process is recognised as
//! foreign and answered with a full snapshot rather than a wrong diff.
//!
//! Removals are remembered as tombstones, at most [`NodeLog::tombstone_limit`] of them;
//! when older ones are dropped the log's floor rises and a client older than the floor
//! gets a full snapshot.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sigil_identity::SpiffeId;
use sigil_identity::entry::RegistrationEntry;

use crate::render::EntryKey;

/// Bits of a revision that count changes; the bits above hold the epoch.
const COUNTER_BITS: u32 = 40;
/// Fewest tombstones a node keeps, however few entries it has.
const MIN_TOMBSTONES: usize = 1024;

/// The revision counter of one index: `epoch << 40 | n`.
#[derive(Debug)]
pub(crate) struct Revisions {
    epoch: u64,
    last: u64,
}

impl Revisions {
    /// A counter with a random non-zero epoch below 2^23 (revisions stay below 2^63, so
    /// they survive a round trip through a signed 64-bit integer).
    pub(crate) fn new() -> Self {
        let epoch = rand::random_range(1u64..(1 << 23));
        Self::with_epoch(epoch)
    }

    pub(crate) fn with_epoch(epoch: u64) -> Self {
        Self {
            epoch,
            last: epoch << COUNTER_BITS,
        }
    }

    /// The first revision of this epoch: what an empty, never-changed node reports.
    pub(crate) fn current(&self) -> u64 {
        self.last
    }

    /// A new revision, greater than every one before.
    pub(crate) fn next(&mut self) -> u64 {
        self.last += 1;
        debug_assert!(
            self.last >> COUNTER_BITS == self.epoch,
            "revision counter overflowed its epoch"
        );
        self.last
    }
}

/// What changed on one node since a revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeDelta {
    /// `upserts` is the node's complete set of entries: replace, do not merge (the
    /// revision asked for was 0, from another replica or process, or older than what
    /// the log remembers).
    pub full: bool,
    /// Entries added or changed (all entries when `full`).
    pub upserts: Vec<Arc<RegistrationEntry>>,
    /// IDs of entries removed (empty when `full`).
    pub removed: Vec<String>,
    /// The node's revision this delta brings the caller to; pass it back next time.
    pub revision: u64,
}

impl NodeDelta {
    /// Whether there is nothing to send (not full, no upserts, no removals).
    pub fn is_empty(&self) -> bool {
        !self.full && self.upserts.is_empty() && self.removed.is_empty()
    }
}

/// The hasher of a node log's maps. Their keys are entry IDs, which the index derives
/// with SHA-256 from a ClusterSPIFFEID's name and a Pod's UID (`render::entry_id`), so
/// nobody outside picks them, and hashes of SPIFFE IDs under this per-log random seed,
/// where a collision only lengthens one bucket whose lookups compare the full ID.
/// SipHash's cost buys nothing here; hashing was a sixth of a ClusterSPIFFEID fan-out's
/// time at 1M Pods (bench/README.md, docs/security.md). The index's state uses it for the
/// same keys (the entries held before sync) and for sets of the pod numbers it assigns.
pub(crate) type Fast = foldhash::fast::RandomState;

/// One node's entries, indexed by ID, SPIFFE ID and revision, with tombstones.
#[derive(Debug)]
pub(crate) struct NodeLog {
    revision: u64,
    floor: u64,
    entries: HashMap<EntryKey, Arc<RegistrationEntry>, Fast>,
    /// Live entries by the revision they were last written at.
    by_revision: BTreeMap<u64, HashMap<EntryKey, Arc<RegistrationEntry>, Fast>>,
    /// Entries by a hash of their SPIFFE ID (lookups compare the ID itself).
    by_spiffe_id: HashMap<u64, Vec<Arc<RegistrationEntry>>, Fast>,
    tombstones: BTreeMap<u64, Vec<String>>,
    tombstone_count: usize,
    tombstone_of: HashMap<String, u64, Fast>,
}

impl NodeLog {
    /// An empty log at `revision` (the index's current revision).
    pub(crate) fn new(revision: u64) -> Self {
        Self {
            revision,
            floor: revision,
            entries: HashMap::default(),
            by_revision: BTreeMap::new(),
            by_spiffe_id: HashMap::default(),
            tombstones: BTreeMap::new(),
            tombstone_count: 0,
            tombstone_of: HashMap::default(),
        }
    }

    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn tombstone_limit(&self) -> usize {
        self.entries.len().max(MIN_TOMBSTONES)
    }

    /// Applies one batch at `revision` (greater than the log's): removals, then upserts.
    /// Entries are stamped with the revision. Returns whether anything changed.
    pub(crate) fn apply(
        &mut self,
        revision: u64,
        removed: &[String],
        upserts: impl IntoIterator<Item = Arc<RegistrationEntry>>,
    ) -> bool {
        debug_assert!(revision > self.revision);
        let mut changed = false;
        for id in removed {
            if let Some(old) = self.unlink(&EntryKey::of(id)) {
                drop(old);
                self.tombstones
                    .entry(revision)
                    .or_default()
                    .push(id.clone());
                self.tombstone_count += 1;
                self.tombstone_of.insert(id.clone(), revision);
                changed = true;
            }
        }
        for entry in upserts {
            // Batches hand over entries no one else holds, so this clones nothing.
            let mut stamped = Arc::unwrap_or_clone(entry);
            stamped.revision = revision;
            let stamped = Arc::new(stamped);
            let key = EntryKey::of(&stamped.id);
            match self.entries.insert(key.clone(), stamped.clone()) {
                // A change of a live entry (what a ClusterSPIFFEID edit makes of every
                // entry it renders): moved to the new revision, and replaced in place
                // under its SPIFFE ID when that stayed the same.
                Some(old) => {
                    self.drop_revision(&key, &old);
                    let h = self.id_hash(&stamped.spiffe_id);
                    if old.spiffe_id == stamped.spiffe_id
                        && let Some(x) = self
                            .by_spiffe_id
                            .get_mut(&h)
                            .and_then(|same| same.iter_mut().find(|x| Arc::ptr_eq(x, &old)))
                    {
                        *x = stamped.clone();
                    } else {
                        self.drop_spiffe_id(&old);
                        self.by_spiffe_id
                            .entry(h)
                            .or_default()
                            .push(stamped.clone());
                    }
                }
                None => {
                    if !self.tombstone_of.is_empty()
                        && let Some(rev) = self.tombstone_of.remove(&stamped.id)
                    {
                        self.drop_tombstone(rev, &stamped.id);
                    }
                    let h = self.id_hash(&stamped.spiffe_id);
                    self.by_spiffe_id
                        .entry(h)
                        .or_default()
                        .push(stamped.clone());
                }
            }
            self.by_revision
                .entry(revision)
                .or_default()
                .insert(key, stamped);
            changed = true;
        }
        if changed {
            self.revision = revision;
            self.compact();
        }
        changed
    }

    /// Removes a live entry from every index; returns it.
    fn unlink(&mut self, key: &EntryKey) -> Option<Arc<RegistrationEntry>> {
        let old = self.entries.remove(key)?;
        self.drop_revision(key, &old);
        self.drop_spiffe_id(&old);
        Some(old)
    }

    /// Takes `old` (under `key`) out of the entries of its revision.
    fn drop_revision(&mut self, key: &EntryKey, old: &RegistrationEntry) {
        if let Some(same) = self.by_revision.get_mut(&old.revision) {
            same.remove(key);
            if same.is_empty() {
                self.by_revision.remove(&old.revision);
            }
        }
    }

    /// Takes `old` out of the entries under its SPIFFE ID.
    fn drop_spiffe_id(&mut self, old: &Arc<RegistrationEntry>) {
        let h = self.id_hash(&old.spiffe_id);
        if let Some(same) = self.by_spiffe_id.get_mut(&h) {
            same.retain(|x| !Arc::ptr_eq(x, old));
            if same.is_empty() {
                self.by_spiffe_id.remove(&h);
            }
        }
    }

    /// The key of `id` in `by_spiffe_id`: this log's seeded hash of the ID's text.
    fn id_hash(&self, id: &SpiffeId) -> u64 {
        use std::hash::BuildHasher;
        self.by_spiffe_id.hasher().hash_one(id.as_str())
    }

    fn drop_tombstone(&mut self, rev: u64, id: &str) {
        if let Some(ids) = self.tombstones.get_mut(&rev) {
            let before = ids.len();
            ids.retain(|x| x != id);
            self.tombstone_count -= before - ids.len();
            if ids.is_empty() {
                self.tombstones.remove(&rev);
            }
        }
    }

    /// Forgets the oldest tombstones beyond the limit, raising the floor.
    fn compact(&mut self) {
        while self.tombstone_count > self.tombstone_limit() {
            let Some((rev, ids)) = self.tombstones.pop_first() else {
                break;
            };
            self.tombstone_count -= ids.len();
            for id in &ids {
                self.tombstone_of.remove(id);
            }
            self.floor = rev;
        }
    }

    /// Everything after `since`, or a full snapshot when `since` is 0, foreign, in the
    /// future, or older than the floor.
    pub(crate) fn changes_since(&self, since: u64) -> NodeDelta {
        if since == 0 || since < self.floor || since > self.revision {
            return self.snapshot();
        }
        if since == self.revision {
            return NodeDelta {
                revision: self.revision,
                ..NodeDelta::default()
            };
        }
        let upserts = self
            .by_revision
            .range(since + 1..)
            .flat_map(|(_, same)| same.values().cloned())
            .collect();
        let removed = self
            .tombstones
            .range(since + 1..)
            .flat_map(|(_, ids)| ids.iter().cloned())
            .collect();
        NodeDelta {
            full: false,
            upserts,
            removed,
            revision: self.revision,
        }
    }

    /// Every entry, as a full delta.
    pub(crate) fn snapshot(&self) -> NodeDelta {
        let mut upserts: Vec<_> = self.entries.values().cloned().collect();
        upserts.sort_by(|a, b| a.id.cmp(&b.id));
        NodeDelta {
            full: true,
            upserts,
            removed: Vec::new(),
            revision: self.revision,
        }
    }

    pub(crate) fn entry(&self, id: &str) -> Option<Arc<RegistrationEntry>> {
        self.entries.get(&EntryKey::of(id)).cloned()
    }

    pub(crate) fn with_spiffe_id(&self, id: &SpiffeId) -> Vec<Arc<RegistrationEntry>> {
        self.by_spiffe_id
            .get(&self.id_hash(id))
            .map(|same| {
                same.iter()
                    .filter(|e| &e.spiffe_id == id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {

    use super::*;

    fn entry(id: &str, path: &str) -> Arc<RegistrationEntry> {
        Arc::new(RegistrationEntry::new(
            id,
            SpiffeId::parse(&format!("spiffe://td{path}")).unwrap(),
            vec![],
        ))
    }

    fn ids(d: &NodeDelta) -> Vec<&str> {
        d.upserts.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn diffs_after_a_revision() {
        let mut revs = Revisions::with_epoch(7);
        let mut log = NodeLog::new(revs.current());
        let r1 = revs.next();
        log.apply(r1, &[], [entry("a", "/a"), entry("b", "/b")]);
        let r2 = revs.next();
        log.apply(r2, &["a".into()], [entry("c", "/c")]);
        let r3 = revs.next();
        log.apply(r3, &[], [entry("b", "/b2")]);

        let full = log.changes_since(0);
        assert!(full.full);
        assert_eq!(ids(&full), ["b", "c"]);
        assert_eq!(full.revision, r3);
        assert_eq!(
            full.upserts[0].revision, r3,
            "entries are stamped with their revision"
        );

        let d = log.changes_since(r1);
        assert!(!d.full);
        assert_eq!(ids(&d), ["c", "b"]);
        assert_eq!(d.removed, ["a"]);
        let d = log.changes_since(r2);
        assert_eq!(ids(&d), ["b"]);
        assert!(d.removed.is_empty());
        assert!(log.changes_since(r3).is_empty());
        assert_eq!(
            log.with_spiffe_id(&SpiffeId::parse("spiffe://td/b2").unwrap())
                .len(),
            1
        );
        assert!(
            log.with_spiffe_id(&SpiffeId::parse("spiffe://td/b").unwrap())
                .is_empty()
        );
    }

    #[test]
    fn foreign_future_and_compacted_revisions_get_full() {
        let mut revs = Revisions::with_epoch(7);
        let mut log = NodeLog::new(revs.current());
        let r1 = revs.next();
        log.apply(r1, &[], [entry("a", "/a")]);
        let other = Revisions::with_epoch(8).current() + 1;
        assert!(log.changes_since(other).full, "another epoch's revision");
        assert!(
            log.changes_since(Revisions::with_epoch(6).current() + 5)
                .full
        );
        assert!(
            log.changes_since(r1 + 10).full,
            "a revision from the future"
        );

        // Churn removes more than the tombstone limit: old revisions fall below the floor.
        let start = log.revision();
        for i in 0..(MIN_TOMBSTONES + 10) {
            let r = revs.next();
            log.apply(r, &[], [entry(&format!("x{i}"), "/x")]);
            let r = revs.next();
            log.apply(r, &[format!("x{i}")], []);
        }
        assert!(log.changes_since(start).full, "older than the floor");
        let recent = log.revision() - 2;
        let d = log.changes_since(recent);
        assert!(!d.full);
        assert_eq!(d.removed.len(), 1);
    }

    #[test]
    fn a_change_under_the_same_spiffe_id_replaces_the_entry_everywhere() {
        let mut revs = Revisions::with_epoch(3);
        let mut log = NodeLog::new(revs.current());
        let r1 = revs.next();
        // Two entries with one SPIFFE ID (two ClusterSPIFFEIDs rendering the same ID).
        log.apply(r1, &[], [entry("a", "/same"), entry("b", "/same")]);
        let r2 = revs.next();
        let mut changed =
            RegistrationEntry::new("a", SpiffeId::parse("spiffe://td/same").unwrap(), vec![]);
        changed.hint = "edited".into();
        log.apply(r2, &[], [Arc::new(changed)]);

        let same = log.with_spiffe_id(&SpiffeId::parse("spiffe://td/same").unwrap());
        let mut got: Vec<(&str, &str, u64)> = same
            .iter()
            .map(|e| (e.id.as_str(), e.hint.as_str(), e.revision))
            .collect();
        got.sort_unstable();
        assert_eq!(got, [("a", "edited", r2), ("b", "", r1)]);
        assert_eq!(log.entry("a").unwrap().hint, "edited");
        assert_eq!(log.len(), 2);
        let d = log.changes_since(r1);
        assert_eq!(ids(&d), ["a"], "only the changed entry, once");
        assert_eq!(d.upserts[0].hint, "edited");
        assert_eq!(ids(&log.changes_since(0)), ["a", "b"]);
    }

    #[test]
    fn readding_an_entry_drops_its_tombstone() {
        let mut revs = Revisions::with_epoch(1);
        let mut log = NodeLog::new(revs.current());
        let r1 = revs.next();
        log.apply(r1, &[], [entry("a", "/a")]);
        let r2 = revs.next();
        log.apply(r2, &["a".into()], []);
        let r3 = revs.next();
        log.apply(r3, &[], [entry("a", "/a")]);
        let d = log.changes_since(r1);
        assert_eq!(ids(&d), ["a"]);
        assert!(d.removed.is_empty());
        assert_eq!(log.tombstone_count, 0);
    }
}
