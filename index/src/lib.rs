//! The identity index: Pods × Namespaces × Nodes × EndpointSlices × Services ×
//! ClusterSPIFFEIDs × TrustDomains → registration entries, grouped by node, kept in memory
//! and updated incrementally from informer events.
//!
//! - [`EntryIndex`] is the shared handle (cheap to clone). Informers feed it through its
//!   `apply_*`/`delete_*` methods (the operator's informers do this from kube-runtime
//!   watchers, `operator/src/index/watch.rs`); the Node
//!   API reads it through [`EntryIndex::node`].
//! - [`NodeView`] is one node's view: [`NodeView::changes_since`] gives a full snapshot or
//!   exactly the upserts and removals after a revision; [`NodeView::changed`] wakes a
//!   stream when the node's entries change; [`NodeView::entry`] and
//!   [`NodeView::entries_with_spiffe_id`] authorise CSRs.
//! - Each entry has a stable ID (a hash of the ClusterSPIFFEID name and the pod UID), the
//!   selector `k8s:pod-uid:<uid>` plus the rendered workload selector templates, and lives
//!   on the node in the pod's `spec.nodeName` (an unscheduled pod has none yet).
//!
//! Work per event is proportional to what it can change (see `state.rs`); readers of a
//! node never wait on the writer's lock, only on their node's. Until every informer has
//! listed ([`EntryIndex::mark_synced`]) nothing is published, so a restarting replica
//! never tells agents to drop entries it simply has not read yet: the Node API should
//! wait for [`EntryIndex::synced`] before sending a first snapshot.
//!
//! This crate does no I/O: no Kubernetes client, no server. It computes the status each
//! ClusterSPIFFEID should have ([`EntryIndex::status_view`]); the operator's status writer
//! puts it on the objects while its replica leads.
//!
//! Where things are: [`render`](crate::entry_id)ing one pod's entry is `render.rs` (where a
//! pod's SPIFFE ID is computed); which ClusterSPIFFEIDs apply to a pod and what that
//! changes is `state.rs`; the status view is `status_view.rs`; per-node revisions and
//! deltas are `node_log.rs`; the facts read from Kubernetes objects are `objects.rs`; `sigil
//! explain` is `explain.rs`.

mod explain;
mod metrics;
mod node_log;
mod objects;
mod render;
mod state;
mod status_view;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::DynamicObject;
use sigil_identity::entry::RegistrationEntry;
use sigil_identity::{SpiffeId, TrustDomain};
use tokio::sync::watch as channel;

pub use self::explain::{Explanation, Verdict, explain_pod};
pub use self::metrics::{EventLabels, IndexMetrics, KindLabels, PatchLabels};
pub use self::node_log::NodeDelta;
use self::node_log::{NodeLog, Revisions};
use self::objects::CsidMeta;
pub use self::objects::{Labels, PodFacts};
pub use self::objects::{PodFields, TrustDomainInfo, WatchedPod, WatchedPodSpec, WatchedPodStatus};
pub use self::render::entry_id;
pub use self::state::Kind;
use self::state::{Batch, NodeChanges, State};
pub use self::status_view::{Readiness, StatusView, now};
use sigil_api::crd::cluster_spiffe_id::{ClusterSPIFFEID, ClusterSpiffeIdStatus};

/// Changes (upserts and removals, over every node) from which one publish applies the
/// node logs on two threads instead of one: a ClusterSPIFFEID edited across the cluster,
/// the first sync. An ordinary event changes a few entries and stays on its thread.
const PARALLEL_PUBLISH: usize = 20_000;

/// What the index needs to know about the cluster it runs in.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// The cluster name (template field `clusterName`).
    pub cluster_name: String,
    /// The cluster DNS domain (template field `clusterDomain`, and the last auto-populated
    /// DNS name). Default `cluster.local`.
    pub cluster_domain: String,
    /// Namespaces whose pods never get entries, whatever the selectors say (reported as
    /// `namespacesIgnored`). Default: `kube-system`, `kube-public`, `kube-node-lease`.
    pub ignore_namespaces: BTreeSet<String>,
}

impl IndexConfig {
    /// Defaults for a cluster named `cluster_name`.
    pub fn new(cluster_name: &str) -> Self {
        Self {
            cluster_name: cluster_name.to_owned(),
            cluster_domain: "cluster.local".to_owned(),
            ignore_namespaces: ["kube-system", "kube-public", "kube-node-lease"]
                .into_iter()
                .map(str::to_owned)
                .collect(),
        }
    }

    fn ignores(&self, namespace: &str) -> bool {
        self.ignore_namespaces.contains(namespace)
    }
}

/// What [`EntryIndex::admission`] finds for a pod about to be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// These ClusterSPIFFEIDs select it (fallbacks included).
    Selected(Vec<String>),
    /// None does; the nearest (the one that failed last in the order the index checks:
    /// spec, trust domain, `namespaceSelector`, `podSelector`) and why, when any exists.
    NotSelected {
        /// The nearest ClusterSPIFFEID's name, and the reason it does not select the pod.
        nearest: Option<(String, String)>,
    },
    /// The namespace is one the operator never serves.
    NamespaceIgnored,
    /// The index cannot tell yet (not synced, or the namespace is not seen yet).
    Unknown(String),
}

/// One node's published entries and the channel that announces their changes.
#[derive(Debug)]
struct NodeShard {
    log: RwLock<NodeLog>,
    tx: channel::Sender<u64>,
}

impl NodeShard {
    fn new(revision: u64) -> Self {
        Self {
            log: RwLock::new(NodeLog::new(revision)),
            tx: channel::Sender::new(revision),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, NodeLog> {
        self.log.read().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug)]
struct Writer {
    state: State,
    revisions: Revisions,
}

#[derive(Debug)]
struct Inner {
    writer: Mutex<Writer>,
    shards: RwLock<HashMap<String, Arc<NodeShard>>>,
    /// The last revision published; shards created by readers start here.
    last_revision: AtomicU64,
    synced: channel::Sender<bool>,
    /// Bumped whenever some ClusterSPIFFEID's status may have changed.
    status_dirty: channel::Sender<u64>,
    /// [`EntryIndex::federations`], replaced only when a ClusterSPIFFEID or TrustDomain
    /// write changes it.
    federations: channel::Sender<Arc<Federations>>,
    metrics: IndexMetrics,
}

/// For each TrustDomain object (by `metadata.name`), the foreign trust domains that its
/// ClusterSPIFFEIDs list in `federatesWith`. A TrustDomain none of whose ClusterSPIFFEIDs
/// federates has no key.
pub type Federations = BTreeMap<String, BTreeSet<TrustDomain>>;

/// A pod and its identities, as [`EntryIndex::pod_identities`] finds them.
#[derive(Debug, Clone)]
pub struct PodIdentities {
    /// What the index read of the pod.
    pub facts: PodFacts,
    /// UID of the pod's Node, when the index has seen that Node.
    pub node_uid: Option<String>,
    /// The pod's published entries, default first.
    pub entries: Vec<Arc<RegistrationEntry>>,
}

/// The identity index. Clone it freely: clones share one index.
#[derive(Debug, Clone)]
pub struct EntryIndex {
    inner: Arc<Inner>,
}

/// One node's entries, as the Node API streams them.
#[derive(Debug, Clone)]
pub struct NodeView {
    name: Arc<str>,
    shard: Arc<NodeShard>,
    rx: channel::Receiver<u64>,
}

impl NodeView {
    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Everything that changed after `revision`: a full snapshot when `revision` is 0,
    /// was issued by another replica or process, or is older than the log remembers;
    /// otherwise exactly the upserts and removals since. Pass the returned revision next
    /// time.
    pub fn changes_since(&self, revision: u64) -> NodeDelta {
        self.shard.read().changes_since(revision)
    }

    /// Waits until the node's entries change after the last call (or after this view was
    /// made); then call [`NodeView::changes_since`]. Several changes may coalesce.
    pub async fn changed(&mut self) {
        // The view holds the shard, so the sender lives as long as the receiver.
        let _ = self.rx.changed().await;
    }

    /// The node's current revision.
    pub fn revision(&self) -> u64 {
        self.shard.read().revision()
    }

    /// The entry with this ID, if it is authorised on this node.
    pub fn entry(&self, id: &str) -> Option<Arc<RegistrationEntry>> {
        self.shard.read().entry(id)
    }

    /// Every entry on this node granting `spiffe_id` (several pods of one workload on a
    /// node share an ID). Empty: the ID is not authorised for this node.
    pub fn entries_with_spiffe_id(&self, spiffe_id: &SpiffeId) -> Vec<Arc<RegistrationEntry>> {
        self.shard.read().with_spiffe_id(spiffe_id)
    }

    /// Number of entries on the node.
    pub fn len(&self) -> usize {
        self.shard.read().len()
    }

    /// Whether the node has no entries.
    pub fn is_empty(&self) -> bool {
        self.shard.read().is_empty()
    }

    /// A receiver of the node's revision, for `select!` loops.
    pub fn subscribe(&self) -> channel::Receiver<u64> {
        self.shard.tx.subscribe()
    }
}

impl EntryIndex {
    /// An empty index, not yet synced.
    pub fn new(config: IndexConfig) -> Self {
        Self::with_metrics(config, IndexMetrics::default())
    }

    /// An empty index that reports into `metrics`.
    pub fn with_metrics(config: IndexConfig, metrics: IndexMetrics) -> Self {
        let revisions = Revisions::new();
        let current = revisions.current();
        Self {
            inner: Arc::new(Inner {
                writer: Mutex::new(Writer {
                    state: State::new(Arc::new(config)),
                    revisions,
                }),
                shards: RwLock::new(HashMap::new()),
                last_revision: AtomicU64::new(current),
                synced: channel::Sender::new(false),
                status_dirty: channel::Sender::new(0),
                federations: channel::Sender::new(Arc::default()),
                metrics,
            }),
        }
    }

    /// The view of node `name` (created empty if the node has no entries yet, so a stream
    /// can wait for its first one).
    pub fn node(&self, name: &str) -> NodeView {
        let shard = self
            .inner
            .shards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned();
        let shard = match shard {
            Some(s) => s,
            None => {
                let mut shards = self.inner.shards.write().unwrap_or_else(|p| p.into_inner());
                shards
                    .entry(name.to_owned())
                    .or_insert_with(|| {
                        Arc::new(NodeShard::new(
                            self.inner.last_revision.load(Ordering::Acquire),
                        ))
                    })
                    .clone()
            }
        };
        let rx = shard.tx.subscribe();
        NodeView {
            name: name.into(),
            shard,
            rx,
        }
    }

    /// Whether every informer has listed and the entries are published.
    pub fn is_synced(&self) -> bool {
        *self.inner.synced.borrow()
    }

    /// Waits until [`EntryIndex::is_synced`].
    pub async fn synced(&self) {
        let mut rx = self.inner.synced.subscribe();
        // The sender lives in `inner`, which `self` keeps alive.
        let _ = rx.wait_for(|s| *s).await;
    }

    /// The metrics this index reports into.
    pub fn metrics(&self) -> &IndexMetrics {
        &self.inner.metrics
    }

    /// The status the index would write for ClusterSPIFFEID `name` now (`None`: unknown).
    pub fn status(&self, name: &str) -> Option<ClusterSpiffeIdStatus> {
        let view = self.lock().state.status_view(name)?;
        Some(view.to_status(now()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.inner.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one change against the state and publishes what it produced, stamped with one
    /// new revision.
    fn write<R>(&self, f: impl FnOnce(&mut State, &mut Batch) -> R) -> R {
        let started = Instant::now();
        let mut w = self.lock();
        let mut batch = Batch::default();
        let r = f(&mut w.state, &mut batch);
        if !batch.is_empty() {
            if w.state.is_synced() {
                let rev = w.revisions.next();
                self.publish(rev, batch);
            } else {
                w.state.hold(batch);
            }
        }
        self.inner.metrics.pods.set(w.state.pod_count() as i64);
        // Before sync nobody acts on a status change: the status writer waits for sync,
        // and sync marks every ClusterSPIFFEID. Notifying then woke every status watcher
        // once per object a list applied (a thread switch and an index lock each: about
        // 80k wakes in a restart at 100k Pods).
        if w.state.is_synced() && !w.state.dirty.is_empty() {
            self.inner.status_dirty.send_modify(|v| *v += 1);
        }
        drop(w);
        self.inner
            .metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }

    /// A write of a ClusterSPIFFEID or TrustDomain, the only objects
    /// [`EntryIndex::federations`] depends on: it is recomputed under the same lock, so
    /// two such writes cannot publish their results out of order.
    fn write_federating(&self, f: impl FnOnce(&mut State, &mut Batch)) {
        self.write(|s, b| {
            f(s, b);
            let now = s.federations();
            self.inner.federations.send_if_modified(|current| {
                let changed = **current != now;
                if changed {
                    *current = Arc::new(now);
                }
                changed
            });
        });
    }

    fn publish(&self, rev: u64, batch: Batch) {
        let changes: usize = batch
            .nodes
            .values()
            .map(|c| c.upserts.len() + c.removed.len())
            .sum();
        let mut nodes: Vec<(String, NodeChanges)> = batch.nodes.into_iter().collect();
        // A change that rewrites a large part of the cluster (a ClusterSPIFFEID edited,
        // the first sync) applies the node logs on two threads: each node's log has its
        // own lock, and no stream is woken before every log holds the revision (as
        // before, one that reads on its own may see its node's log change first).
        let (delta, woken) = if changes >= PARALLEL_PUBLISH && nodes.len() > 1 {
            let second = nodes.split_off(nodes.len() / 2);
            std::thread::scope(|s| {
                let other = s.spawn(|| self.apply_logs(rev, second));
                let (d1, mut w1) = self.apply_logs(rev, nodes);
                let (d2, w2) = match other.join() {
                    Ok(r) => r,
                    Err(panic) => std::panic::resume_unwind(panic),
                };
                w1.extend(w2);
                (d1 + d2, w1)
            })
        } else {
            self.apply_logs(rev, nodes)
        };
        self.inner.last_revision.store(rev, Ordering::Release);
        self.inner.metrics.entries.inc_by(delta);
        for shard in woken {
            shard.tx.send_replace(rev);
        }
    }

    /// Applies each node's changes to its log at `rev`; returns the change in the number
    /// of entries and the shards to wake.
    fn apply_logs(
        &self,
        rev: u64,
        nodes: Vec<(String, NodeChanges)>,
    ) -> (i64, Vec<Arc<NodeShard>>) {
        let mut woken = Vec::with_capacity(nodes.len());
        let mut delta: i64 = 0;
        for (node, changes) in nodes {
            let shard = self
                .inner
                .shards
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&node)
                .cloned();
            let shard = shard.unwrap_or_else(|| {
                let mut shards = self.inner.shards.write().unwrap_or_else(|p| p.into_inner());
                shards
                    .entry(node)
                    .or_insert_with(|| Arc::new(NodeShard::new(rev - 1)))
                    .clone()
            });
            let mut log = shard.log.write().unwrap_or_else(|p| p.into_inner());
            let before = log.len() as i64;
            if log.apply(rev, &changes.removed, changes.upserts) {
                delta += log.len() as i64 - before;
                woken.push(shard.clone());
            }
        }
        (delta, woken)
    }

    // ---- feeding: informer events (and tests) ----

    /// A pod was added or changed. Only that pod is re-rendered, and only if a fact
    /// templates or selectors read changed.
    pub fn apply_pod(&self, pod: &impl PodFields) {
        self.apply_pod_facts(PodFacts::new(pod));
    }

    /// [`EntryIndex::apply_pod`] of a Pod the informer decoded and hands over: its fields
    /// are moved into the index instead of copied.
    pub fn apply_watched_pod(&self, pod: WatchedPod) {
        self.apply_pod_facts(PodFacts::from_watched(pod));
    }

    fn apply_pod_facts(&self, facts: Result<PodFacts, String>) {
        match facts {
            Ok(facts) => self.write(|s, b| s.apply_pod(facts, b)),
            Err(e) => self.skip("Pod", &e),
        }
    }

    /// A pod was deleted: its entries are removed.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.write(|s, b| s.delete_pod(namespace, name, b));
    }

    /// A namespace was added or changed.
    pub fn apply_namespace(&self, ns: &Namespace) {
        match objects::namespace_facts(ns) {
            Ok((name, labels)) => self.write(|s, b| s.set_namespace(&name, Some(labels), b)),
            Err(e) => self.skip("Namespace", &e),
        }
    }

    /// A namespace was deleted.
    pub fn delete_namespace(&self, name: &str) {
        self.write(|s, b| s.set_namespace(name, None, b));
    }

    /// A Node was added or changed.
    pub fn apply_node(&self, node: &Node) {
        match objects::node_facts(node) {
            Ok((name, facts)) => self.write(|s, b| s.set_node(&name, Some(facts), b)),
            Err(e) => self.skip("Node", &e),
        }
    }

    /// A Node was deleted. Its shard is dropped once it is empty and nobody watches it.
    pub fn delete_node(&self, name: &str) {
        self.write(|s, b| s.set_node(name, None, b));
        let mut shards = self.inner.shards.write().unwrap_or_else(|p| p.into_inner());
        if shards
            .get(name)
            .is_some_and(|s| Arc::strong_count(s) == 1 && s.read().is_empty())
        {
            shards.remove(name);
        }
    }

    /// An EndpointSlice was added or changed.
    pub fn apply_endpoint_slice(&self, slice: &EndpointSlice) {
        match objects::slice_facts(slice) {
            Ok(f) => {
                let (ns, name) = (f.namespace.clone(), f.name.clone());
                self.write(|s, b| s.set_slice(&ns, &name, Some(f), b));
            }
            Err(e) => self.skip("EndpointSlice", &e),
        }
    }

    /// An EndpointSlice was deleted.
    pub fn delete_endpoint_slice(&self, namespace: &str, name: &str) {
        self.write(|s, b| s.set_slice(namespace, name, None, b));
    }

    /// A Service exists (only its name matters: autoPopulateDNSNames names only Services
    /// that exist in the pod's namespace).
    pub fn apply_service(&self, namespace: &str, name: &str) {
        self.write(|s, b| s.set_service(namespace, name, true, b));
    }

    /// A Service was deleted.
    pub fn delete_service(&self, namespace: &str, name: &str) {
        self.write(|s, b| s.set_service(namespace, name, false, b));
    }

    /// A ClusterSPIFFEID was added or changed. A change of spec re-renders the pods it
    /// selected and those it selects now; a status-only change re-renders nothing.
    pub fn apply_cluster_spiffe_id(&self, obj: &ClusterSPIFFEID) {
        match CsidMeta::of(obj) {
            Ok(meta) => {
                self.write_federating(|s, b| {
                    s.apply_csid(meta, Ok(obj.spec.clone()), obj.status.clone(), b);
                });
            }
            Err(e) => self.skip("ClusterSPIFFEID", &e),
        }
    }

    /// A ClusterSPIFFEID of any shape (from a dynamic watch): one whose spec does not
    /// parse is reported in its status if new, and otherwise ignored (the last good
    /// spec stays in force).
    pub fn apply_cluster_spiffe_id_dynamic(&self, obj: &DynamicObject) {
        match objects::csid_from_dynamic(obj) {
            Ok((meta, status, spec)) => {
                if let Err(e) = &spec {
                    self.skip("ClusterSPIFFEID", &format!("{}: {e}", meta.name));
                }
                self.write_federating(|s, b| s.apply_csid(meta, spec, status, b));
            }
            Err(e) => self.skip("ClusterSPIFFEID", &e),
        }
    }

    /// A ClusterSPIFFEID was deleted: its entries are removed (fallbacks it overrode and
    /// entries it masked come back).
    pub fn delete_cluster_spiffe_id(&self, name: &str) {
        self.write_federating(|s, b| s.delete_csid(name, b));
    }

    /// A TrustDomain was added or changed.
    pub fn apply_trust_domain(&self, info: TrustDomainInfo) {
        let name = info.object_name.clone();
        self.write_federating(|s, b| s.set_trust_domain(&name, Some(info), b));
    }

    /// A TrustDomain object of any shape; one that does not parse is skipped (its last
    /// good version stays in force).
    pub fn apply_trust_domain_dynamic(&self, obj: &DynamicObject) {
        match TrustDomainInfo::from_dynamic(obj) {
            Ok(info) => self.apply_trust_domain(info),
            Err(e) => self.skip("TrustDomain", &e),
        }
    }

    /// A TrustDomain was deleted.
    pub fn delete_trust_domain(&self, name: &str) {
        self.write_federating(|s, b| s.set_trust_domain(name, None, b));
    }

    /// Every informer has listed: publish what was rendered. Before this the index renders
    /// as facts arrive but publishes nothing.
    pub fn mark_synced(&self) {
        self.write(|s, b| s.mark_synced(b));
        self.inner.synced.send_replace(true);
    }

    fn skip(&self, kind: &'static str, error: &str) {
        tracing::warn!(kind, error, "skipping a malformed object");
        self.inner
            .metrics
            .skipped
            .get_or_create(&metrics::KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// The keys the index holds of `kind` (a relisting informer deletes those it no longer
    /// sees).
    pub fn keys(&self, kind: Kind) -> Vec<String> {
        self.lock().state.keys(kind)
    }

    /// Counts one status patch by its result (`applied`, `unchanged`, `failed`, ...).
    pub fn count_status_patch(&self, result: &str) {
        self.inner
            .metrics
            .status_patches
            .get_or_create(&PatchLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Wakes when a ClusterSPIFFEID's status may have changed ([`EntryIndex::take_dirty`]
    /// names which).
    pub fn status_changes(&self) -> channel::Receiver<u64> {
        self.inner.status_dirty.subscribe()
    }

    /// Takes the names of ClusterSPIFFEIDs whose status may have changed (for the status
    /// writer).
    pub fn take_dirty(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().state.dirty)
            .into_iter()
            .collect()
    }

    /// Marks ClusterSPIFFEIDs whose status must be looked at again.
    pub fn mark_dirty(&self, names: impl IntoIterator<Item = String>) {
        self.lock().state.dirty.extend(names);
        self.inner.status_dirty.send_modify(|v| *v += 1);
    }

    /// Marks every ClusterSPIFFEID's status to be looked at again.
    pub fn mark_all_dirty(&self) {
        let names = self.lock().state.csid_names();
        self.mark_dirty(names);
    }

    /// Pod `namespace/name` and the entries published for it now, ordered as the Workload
    /// API orders a workload's SVIDs (by SPIFFE ID, then entry ID: the first is the
    /// default). `None`: the index holds no such pod.
    ///
    /// This is for a caller that is handed a pod's name by someone else (a
    /// PodCertificateRequest's signer): it compares the UID, node and service account it was
    /// given with [`PodIdentities::facts`] before trusting any of the entries.
    pub fn pod_identities(&self, namespace: &str, name: &str) -> Option<PodIdentities> {
        let found = self.lock().state.pod_lookup(namespace, name)?;
        let mut entries: Vec<Arc<RegistrationEntry>> = match &found.published_on {
            Some(node) => {
                let view = self.node(node);
                found
                    .entry_ids
                    .iter()
                    .filter_map(|id| view.entry(id))
                    .collect()
            }
            None => Vec::new(),
        };
        entries.sort_by(|a, b| (&a.spiffe_id, &a.id).cmp(&(&b.spiffe_id, &b.id)));
        Some(PodIdentities {
            facts: found.facts,
            node_uid: found.node_uid,
            entries,
        })
    }

    /// For each TrustDomain object (by `metadata.name`), the foreign trust domains that
    /// its ClusterSPIFFEIDs list in `federatesWith`.
    pub fn federations(&self) -> Arc<Federations> {
        self.inner.federations.borrow().clone()
    }

    /// Wakes when [`EntryIndex::federations`] has changed, and only then: Pods, Nodes and
    /// the rest never change it, so a watcher is not woken once per Pod event.
    pub fn federation_changes(&self) -> channel::Receiver<Arc<Federations>> {
        self.inner.federations.subscribe()
    }

    /// Which ClusterSPIFFEIDs would select a pod labelled `labels` in `namespace`, asked
    /// before the pod exists (the admission webhook's warning). Only the selectors count
    /// here: rendering needs the pod's node, which a pod being created does not have yet.
    pub fn admission(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Admission {
        let empty = BTreeMap::new();
        self.lock()
            .state
            .admission(namespace, labels.unwrap_or(&empty))
    }

    /// ClusterSPIFFEID `name`'s status as the index sees it.
    pub fn status_view(&self, name: &str) -> Option<StatusView> {
        self.lock().state.status_view(name)
    }
}
