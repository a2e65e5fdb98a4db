//! What the agent knows: the entries authorised for its node, an X509-SVID (with its
//! node-local key) for each, cached JWT-SVIDs, and the bundles of every trust domain.
//!
//! It keeps serving from here while the operator is unreachable. Every change bumps a
//! version on a `watch` channel so open Workload API streams push new state at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use sigil_identity::entry::{RegistrationEntry, Selector};
use sigil_identity::keys::PrivateKey;
use sigil_identity::{BundleSet, TrustBundle, TrustDomain};
use tokio::sync::watch;

/// An X509-SVID held for one entry, with the key generated on this node.
#[derive(Debug)]
pub struct HeldSvid {
    /// The entry it was issued for (its revision tells whether it is stale).
    pub entry: Arc<RegistrationEntry>,
    /// Leaf first, then intermediates (DER).
    pub chain: Vec<Vec<u8>>,
    /// The workload's private key.
    pub key: PrivateKey,
    /// Validity.
    pub not_before: SystemTime,
    /// Expiry.
    pub not_after: SystemTime,
    /// When the agent will replace it (half-life with jitter).
    pub rotate_at: SystemTime,
}

/// A cached JWT-SVID.
#[derive(Debug, Clone)]
pub struct HeldJwt {
    /// The token.
    pub token: String,
    /// Expiry.
    pub expires_at: SystemTime,
    /// Issue time.
    pub issued_at: SystemTime,
}

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<String, Arc<RegistrationEntry>>,
    /// Entry IDs by one selector of each entry ([`index_key`]): a workload is matched
    /// against only the entries filed under its own selectors, not every entry of the node.
    by_key: HashMap<Selector, BTreeSet<String>>,
    svids: HashMap<String, Arc<HeldSvid>>,
    jwts: HashMap<(String, Vec<String>), HeldJwt>,
    bundles: BundleSet,
    revision: u64,
    /// The trust domain the agent itself resides in: every bundle response of a workload
    /// with an identity carries its bundle (SPIFFE_Workload_API.md 5.2.2, 6.2.2).
    own_trust_domain: Option<TrustDomain>,
}

/// The agent's cache, shared by every task.
#[derive(Debug)]
pub struct Cache {
    state: RwLock<State>,
    version: watch::Sender<u64>,
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            state: RwLock::default(),
            version: watch::channel(0).0,
        }
    }
}

/// The identities a workload with some selectors gets, ready to serve.
#[derive(Debug, Clone, Default)]
pub struct WorkloadView {
    /// Matching entries that have an SVID valid now, in a stable order.
    pub svids: Vec<Arc<HeldSvid>>,
    /// Matching entries without an SVID yet (being signed).
    pub pending: Vec<Arc<RegistrationEntry>>,
    /// Matching entries whose SVID has expired and was not renewed (the agent could not
    /// have it signed again: the operator unreachable, or the agent's own SVID expired).
    /// Never served: a workload is told why instead (see [`WorkloadView::svids`]).
    pub expired: Vec<Arc<HeldSvid>>,
    /// Bundles of the SVIDs' trust domains and of the agent's own trust domain.
    pub own_bundles: Vec<TrustBundle>,
    /// Bundles of the trust domains the entries federate with.
    pub federated: Vec<TrustBundle>,
}

impl WorkloadView {
    /// Whether the workload has any entry: an SVID served, being signed, or expired.
    pub fn has_identity(&self) -> bool {
        !(self.svids.is_empty() && self.pending.is_empty() && self.expired.is_empty())
    }
}

/// The selector an entry is filed under. A workload gets an entry only if it has every
/// one of the entry's selectors, so any one of them finds every candidate; the most
/// specific keeps the candidates few: `k8s:pod-uid:…` (every entry the operator renders
/// has one), otherwise the first.
fn index_key(e: &RegistrationEntry) -> Option<&Selector> {
    e.selectors
        .iter()
        .find(|s| s.kind == "k8s" && s.value.starts_with("pod-uid:"))
        .or_else(|| e.selectors.first())
}

impl State {
    fn file(&mut self, e: &RegistrationEntry) {
        if let Some(k) = index_key(e) {
            self.by_key
                .entry(k.clone())
                .or_default()
                .insert(e.id.clone());
        }
    }

    fn unfile(&mut self, e: &RegistrationEntry) {
        if let Some(k) = index_key(e)
            && let Some(ids) = self.by_key.get_mut(k)
        {
            ids.remove(&e.id);
            if ids.is_empty() {
                self.by_key.remove(k);
            }
        }
    }
}

impl Cache {
    /// An empty cache.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets the trust domain the agent resides in (see [`WorkloadView::own_bundles`]).
    pub fn set_own_trust_domain(&self, td: TrustDomain) {
        self.write().own_trust_domain = Some(td);
        self.bump();
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Fires on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The last entry revision applied from the operator (for resuming the stream).
    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    /// Replaces all entries (a full snapshot). SVIDs of entries that disappeared, or whose
    /// SPIFFE ID changed, are dropped; see [`Cache::apply_changes`] for other changes.
    pub fn replace_entries(&self, entries: Vec<RegistrationEntry>, revision: u64) {
        let mut s = self.write();
        let new = entries
            .into_iter()
            .map(|e| (e.id.clone(), Arc::new(e)))
            .collect();
        let old = std::mem::replace(&mut s.entries, new);
        s.by_key.clear();
        let all: Vec<_> = s.entries.values().cloned().collect();
        for e in &all {
            s.file(e);
        }
        let State {
            entries,
            svids,
            jwts,
            ..
        } = &mut *s;
        svids.retain(|id, h| {
            entries
                .get(id)
                .is_some_and(|e| e.spiffe_id == h.entry.spiffe_id)
        });
        jwts.retain(|(id, _), _| {
            entries
                .get(id)
                .zip(old.get(id))
                .is_some_and(|(e, o)| !issued_differently(o, e))
        });
        s.revision = revision;
        drop(s);
        self.bump();
    }

    /// Applies a change set.
    pub fn apply_changes(
        &self,
        upserts: Vec<RegistrationEntry>,
        removed: &[String],
        revision: u64,
    ) {
        let mut s = self.write();
        for e in upserts {
            if let Some(old) = s.entries.get(&e.id).cloned() {
                s.unfile(&old);
                // A new SPIFFE ID: the held SVID names an identity this entry no longer
                // grants, so it stops being served at once.
                if old.spiffe_id != e.spiffe_id {
                    s.svids.remove(&e.id);
                }
                // New DNS names or TTL: the held SVID stays valid and keeps being served
                // until its replacement is signed (`needing_svids` sees it is stale), so
                // streaming clients never see their identity vanish in between.
                if issued_differently(&old, &e) {
                    s.jwts.retain(|(id, _), _| id != &e.id);
                }
            }
            s.file(&e);
            s.entries.insert(e.id.clone(), Arc::new(e));
        }
        for id in removed {
            if let Some(old) = s.entries.remove(id) {
                s.unfile(&old);
            }
            s.svids.remove(id);
            s.jwts.retain(|(eid, _), _| eid != id);
        }
        s.revision = revision;
        drop(s);
        self.bump();
    }

    /// Replaces or adds `bundles` and drops those of `removed`.
    pub fn set_bundles(&self, bundles: Vec<TrustBundle>, removed: &[TrustDomain]) {
        let mut s = self.write();
        let mut changed = false;
        for td in removed {
            changed |= s.bundles.remove(td);
        }
        for b in bundles {
            if s.bundles.get(&b.trust_domain) != Some(&b) {
                s.bundles.upsert(b);
                changed = true;
            }
        }
        drop(s);
        if changed {
            self.bump();
        }
    }

    /// Every bundle.
    pub fn bundles(&self) -> BundleSet {
        self.read().bundles.clone()
    }

    /// The bundle of `td`.
    pub fn bundle(&self, td: &TrustDomain) -> Option<TrustBundle> {
        self.read().bundles.get(td).cloned()
    }

    /// Every entry.
    pub fn entries(&self) -> Vec<Arc<RegistrationEntry>> {
        self.read().entries.values().cloned().collect()
    }

    /// One entry.
    pub fn entry(&self, id: &str) -> Option<Arc<RegistrationEntry>> {
        self.read().entries.get(id).cloned()
    }

    /// Stores a freshly signed SVID, unless its entry changed or vanished meanwhile.
    pub fn put_svid(&self, svid: HeldSvid) -> bool {
        self.put_svids(vec![svid]) == 1
    }

    /// Stores freshly signed SVIDs, skipping those whose entry changed or vanished
    /// meanwhile, with one notification for all of them (open streams recompute what they
    /// serve once per batch, not once per SVID). Returns how many were stored.
    pub fn put_svids(&self, batch: Vec<HeldSvid>) -> usize {
        let mut s = self.write();
        let mut stored = 0;
        for svid in batch {
            let current = s.entries.get(&svid.entry.id);
            let still_valid = current.is_some_and(|e| {
                e.spiffe_id == svid.entry.spiffe_id && e.dns_names == svid.entry.dns_names
            });
            if still_valid {
                s.svids.insert(svid.entry.id.clone(), Arc::new(svid));
                stored += 1;
            }
        }
        drop(s);
        if stored > 0 {
            self.bump();
        }
        stored
    }

    /// Entries that need an SVID now: none yet, due for rotation at `now`, or issued for
    /// DNS names or a TTL the entry no longer has.
    pub fn needing_svids(&self, now: SystemTime) -> Vec<Arc<RegistrationEntry>> {
        let s = self.read();
        s.entries
            .values()
            .filter(|e| {
                s.svids.get(&e.id).is_none_or(|h| {
                    h.rotate_at <= now || h.not_after <= now || issued_differently(&h.entry, e)
                })
            })
            .cloned()
            .collect()
    }

    /// The earliest time any held SVID must be rotated.
    pub fn next_rotation(&self) -> Option<SystemTime> {
        self.read().svids.values().map(|h| h.rotate_at).min()
    }

    /// The SVID of one entry.
    pub fn svid(&self, entry_id: &str) -> Option<Arc<HeldSvid>> {
        self.read().svids.get(entry_id).cloned()
    }

    /// What a workload with `selectors` gets.
    pub fn view_for(&self, selectors: &BTreeSet<Selector>) -> WorkloadView {
        let s = self.read();
        let mut v = WorkloadView::default();
        let mut own = BTreeSet::new();
        let mut fed = BTreeSet::new();
        let candidates: BTreeSet<&String> = selectors
            .iter()
            .filter_map(|sel| s.by_key.get(sel))
            .flatten()
            .collect();
        let matching = candidates
            .into_iter()
            .filter_map(|id| s.entries.get(id))
            .filter(|e| e.matches(selectors));
        let now = SystemTime::now();
        for e in matching {
            match s.svids.get(&e.id) {
                Some(h) if h.not_after > now => v.svids.push(h.clone()),
                Some(h) => v.expired.push(h.clone()),
                None => v.pending.push(e.clone()),
            }
            own.insert(e.spiffe_id.trust_domain().clone());
            fed.extend(e.federates_with.iter().cloned());
        }
        if !own.is_empty()
            && let Some(td) = &s.own_trust_domain
        {
            own.insert(td.clone());
        }
        // Stable order: by SPIFFE ID then entry ID, so the "default" SVID (the first) does
        // not jump around between updates.
        v.svids.sort_by(|a, b| {
            (&a.entry.spiffe_id, &a.entry.id).cmp(&(&b.entry.spiffe_id, &b.entry.id))
        });
        v.own_bundles = own
            .iter()
            .filter_map(|td| s.bundles.get(td).cloned())
            .collect();
        v.federated = fed
            .iter()
            .filter(|td| !own.contains(*td))
            .filter_map(|td| s.bundles.get(td).cloned())
            .collect();
        v
    }

    /// A cached JWT-SVID for (entry, audience) still good at `now` (not past half-life).
    pub fn jwt(&self, entry_id: &str, audience: &[String], now: SystemTime) -> Option<HeldJwt> {
        let s = self.read();
        let j = s.jwts.get(&(entry_id.to_owned(), audience.to_vec()))?;
        let half = j.issued_at + j.expires_at.duration_since(j.issued_at).unwrap_or_default() / 2;
        (now < half).then(|| j.clone())
    }

    /// Caches a JWT-SVID.
    pub fn put_jwt(&self, entry_id: &str, audience: &[String], jwt: HeldJwt) {
        let mut s = self.write();
        if s.jwts.len() > 10_000 {
            let now = SystemTime::now();
            s.jwts.retain(|_, j| j.expires_at > now);
        }
        s.jwts.insert((entry_id.to_owned(), audience.to_vec()), jwt);
    }
}

/// Whether SVIDs for `new` must differ from those issued for `old` (SPIFFE ID, DNS names,
/// TTL or key type changed).
fn issued_differently(old: &RegistrationEntry, new: &RegistrationEntry) -> bool {
    old.spiffe_id != new.spiffe_id
        || old.dns_names != new.dns_names
        || old.x509_ttl != new.x509_ttl
        || old.key_type != new.key_type
}

/// When to replace an SVID valid from `not_before` to `not_after`: at half-life, brought
/// forward by 1% to 10% of the lifetime (jitter, so a node's SVIDs do not all renew at
/// once; never zero, so signing and delivery finish before the current SVID passes
/// half-life).
pub fn rotation_time(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let early = life.mul_f64(0.01 + 0.09 * rand::random::<f64>());
    not_before + (life / 2).saturating_sub(early)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use sigil_identity::SpiffeId;

    fn entry(id: &str, spiffe: &str, sels: &[&str]) -> RegistrationEntry {
        RegistrationEntry {
            federates_with: vec![TrustDomain::new("other.org").unwrap()],
            revision: 1,
            ..RegistrationEntry::new(
                id,
                SpiffeId::parse(spiffe).unwrap(),
                sels.iter().map(|s| Selector::parse(s).unwrap()).collect(),
            )
        }
    }

    /// An SVID for `e` valid for an hour from `now`, due for rotation at half-life.
    fn held(e: Arc<RegistrationEntry>, now: SystemTime) -> HeldSvid {
        HeldSvid {
            entry: e,
            chain: vec![],
            key: PrivateKey::generate(sigil_identity::keys::KeyType::EcP256).unwrap(),
            not_before: now,
            not_after: now + Duration::from_secs(3600),
            rotate_at: now + Duration::from_secs(1800),
        }
    }

    #[test]
    fn rotation_is_around_half_life() {
        let nb = SystemTime::UNIX_EPOCH;
        let na = nb + Duration::from_secs(3600);
        for _ in 0..100 {
            let t = rotation_time(nb, na).duration_since(nb).unwrap().as_secs();
            assert!((1440..=1764).contains(&t), "{t}");
        }
    }

    fn ids(v: &WorkloadView) -> Vec<String> {
        let mut out: Vec<String> = v.pending.iter().map(|e| e.id.clone()).collect();
        out.extend(v.svids.iter().map(|h| h.entry.id.clone()));
        out.extend(v.expired.iter().map(|h| h.entry.id.clone()));
        out.sort();
        out
    }

    fn sels(list: &[&str]) -> BTreeSet<Selector> {
        list.iter().map(|s| Selector::parse(s).unwrap()).collect()
    }

    /// The selector index gives exactly what matching every entry would, through full
    /// snapshots, upserts that change an entry's selectors, and removals.
    #[test]
    fn views_match_a_full_scan_through_every_kind_of_change() {
        let c = Cache::new();
        let full_scan = |c: &Cache, w: &BTreeSet<Selector>| -> Vec<String> {
            let mut out: Vec<String> = c
                .entries()
                .iter()
                .filter(|e| e.matches(w))
                .map(|e| e.id.clone())
                .collect();
            out.sort();
            out
        };
        let workloads = [
            sels(&["k8s:pod-uid:1", "k8s:ns:default", "unix:uid:0"]),
            sels(&["k8s:pod-uid:2", "k8s:ns:default", "unix:uid:1000"]),
            sels(&["unix:uid:1000"]),
            sels(&[]),
        ];
        let check = |c: &Cache| {
            for w in &workloads {
                assert_eq!(ids(&c.view_for(w)), full_scan(c, w), "workload {w:?}");
            }
        };
        c.replace_entries(
            vec![
                entry(
                    "pod1",
                    "spiffe://td/a",
                    &["k8s:ns:default", "k8s:pod-uid:1"],
                ),
                entry("pod2", "spiffe://td/b", &["k8s:pod-uid:2"]),
                entry("ns", "spiffe://td/ns", &["k8s:ns:default"]),
                entry("uid", "spiffe://td/u", &["unix:uid:1000"]),
                entry("two", "spiffe://td/t", &["unix:uid:1000", "k8s:ns:default"]),
                entry("none", "spiffe://td/n", &[]),
            ],
            1,
        );
        check(&c);
        assert_eq!(
            ids(&c.view_for(&workloads[1])),
            ["ns", "pod2", "two", "uid"]
        );
        // pod1 moves to pod 2's selectors; "uid" is removed; "ns" narrows to a pod.
        c.apply_changes(
            vec![
                entry("pod1", "spiffe://td/a", &["k8s:pod-uid:2"]),
                entry("ns", "spiffe://td/ns", &["k8s:ns:default", "k8s:pod-uid:1"]),
            ],
            &["uid".to_string()],
            2,
        );
        check(&c);
        assert_eq!(ids(&c.view_for(&workloads[0])), ["ns"]);
        assert_eq!(ids(&c.view_for(&workloads[1])), ["pod1", "pod2", "two"]);
        // A new snapshot drops whatever the old one filed.
        c.replace_entries(vec![entry("x", "spiffe://td/x", &["unix:uid:1000"])], 3);
        check(&c);
        assert_eq!(ids(&c.view_for(&workloads[1])), ["x"]);
        assert!(ids(&c.view_for(&workloads[0])).is_empty());
    }

    #[test]
    fn a_batch_of_svids_is_one_notification_and_skips_stale_entries() {
        let c = Cache::new();
        c.replace_entries(
            vec![
                entry("a", "spiffe://td/a", &["k8s:pod-uid:1"]),
                entry("b", "spiffe://td/b", &["k8s:pod-uid:2"]),
            ],
            1,
        );
        let now = SystemTime::now();
        let (a, b) = (c.entry("a").unwrap(), c.entry("b").unwrap());
        // b's SPIFFE ID changes while its SVID is being signed.
        c.apply_changes(
            vec![entry("b", "spiffe://td/b2", &["k8s:pod-uid:2"])],
            &[],
            2,
        );
        let mut rx = c.subscribe();
        rx.borrow_and_update();
        assert_eq!(c.put_svids(vec![held(a, now), held(b, now)]), 1);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(c.svid("a").is_some() && c.svid("b").is_none());
        assert_eq!(c.put_svids(vec![]), 0);
        assert!(
            !rx.has_changed().unwrap(),
            "nothing stored, nothing to notify"
        );
    }

    #[test]
    fn entries_svids_and_views() {
        let c = Cache::new();
        let mut rx = c.subscribe();
        c.replace_entries(
            vec![
                entry("a", "spiffe://td/a", &["k8s:pod-uid:1"]),
                entry("b", "spiffe://td/b", &["k8s:pod-uid:2"]),
            ],
            5,
        );
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert_eq!(c.revision(), 5);
        let sel: BTreeSet<Selector> = [Selector::parse("k8s:pod-uid:1").unwrap()].into();
        let v = c.view_for(&sel);
        assert_eq!(v.pending.len(), 1);
        assert!(v.svids.is_empty());
        assert_eq!(c.needing_svids(SystemTime::now()).len(), 2);
        c.apply_changes(vec![], &["b".to_string()], 6);
        assert_eq!(c.entries().len(), 1);
        assert_eq!(c.revision(), 6);
    }

    /// An SVID past its expiry is never in a view's `svids` (nothing serves it): it is
    /// `expired`, and the workload still has an identity (its entry), so it is refused
    /// with Unavailable rather than PermissionDenied. A renewed one is served again.
    #[test]
    fn an_expired_svid_is_not_served() {
        let c = Cache::new();
        c.replace_entries(vec![entry("a", "spiffe://td/a", &["k8s:pod-uid:1"])], 1);
        let sel: BTreeSet<Selector> = [Selector::parse("k8s:pod-uid:1").unwrap()].into();
        let now = SystemTime::now();
        assert!(c.put_svid(held(c.entry("a").unwrap(), now - Duration::from_secs(3601))));
        let v = c.view_for(&sel);
        assert!(v.svids.is_empty(), "an expired SVID is not served");
        assert!(v.pending.is_empty());
        assert_eq!(v.expired.len(), 1);
        assert!(v.has_identity());
        assert!(
            crate::serving::x509_update(&v).unwrap().is_none(),
            "a stream sends nothing"
        );
        let refusal = crate::serving::expired_refusal(&v);
        assert_eq!(refusal.code(), tonic::Code::Unavailable);
        assert!(
            refusal.message().contains("expired"),
            "{}",
            refusal.message()
        );
        assert!(c.put_svid(held(c.entry("a").unwrap(), now)));
        let v = c.view_for(&sel);
        assert_eq!(
            (v.svids.len(), v.expired.len()),
            (1, 0),
            "the renewed one is served"
        );
    }

    #[test]
    fn changed_spiffe_id_drops_the_svid() {
        let c = Cache::new();
        c.replace_entries(vec![entry("a", "spiffe://td/a", &["k8s:pod-uid:1"])], 1);
        let now = SystemTime::now();
        assert!(c.put_svid(held(c.entry("a").unwrap(), now)));
        assert!(c.svid("a").is_some());
        assert!(c.needing_svids(now).is_empty());
        c.apply_changes(
            vec![entry("a", "spiffe://td/renamed", &["k8s:pod-uid:1"])],
            &[],
            2,
        );
        assert!(c.svid("a").is_none());
    }

    #[test]
    fn new_dns_names_keep_the_svid_served_until_it_is_replaced() {
        let c = Cache::new();
        c.replace_entries(vec![entry("a", "spiffe://td/a", &["k8s:pod-uid:1"])], 1);
        let now = SystemTime::now();
        assert!(c.put_svid(held(c.entry("a").unwrap(), now)));
        let sel: BTreeSet<Selector> = [Selector::parse("k8s:pod-uid:1").unwrap()].into();
        let mut renamed = entry("a", "spiffe://td/a", &["k8s:pod-uid:1"]);
        renamed.dns_names = vec!["web.example".into()];
        // Through a change set and through a full snapshot alike.
        for apply in [
            &|c: &Cache, e: RegistrationEntry| c.apply_changes(vec![e], &[], 2),
            &|c: &Cache, e: RegistrationEntry| c.replace_entries(vec![e], 3),
        ] as [&dyn Fn(&Cache, RegistrationEntry); 2]
        {
            apply(&c, renamed.clone());
            let view = c.view_for(&sel);
            assert_eq!(view.svids.len(), 1, "the old SVID is still served");
            assert!(view.pending.is_empty());
            assert_eq!(
                c.needing_svids(now)
                    .iter()
                    .map(|e| e.id.as_str())
                    .collect::<Vec<_>>(),
                ["a"],
                "and it is due for replacement at once"
            );
        }
        assert!(c.put_svid(held(c.entry("a").unwrap(), now)));
        assert!(c.needing_svids(now).is_empty());
        assert_eq!(c.svid("a").unwrap().entry.dns_names, ["web.example"]);
    }

    #[test]
    fn a_full_snapshot_with_a_new_spiffe_id_drops_the_svid() {
        let c = Cache::new();
        c.replace_entries(vec![entry("a", "spiffe://td/a", &["k8s:pod-uid:1"])], 1);
        let now = SystemTime::now();
        assert!(c.put_svid(held(c.entry("a").unwrap(), now)));
        c.replace_entries(
            vec![entry("a", "spiffe://td/renamed", &["k8s:pod-uid:1"])],
            2,
        );
        assert!(c.svid("a").is_none());
    }
}
