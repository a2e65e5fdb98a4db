//! The index's world: the facts of every pod, namespace, node, EndpointSlice, Service
//! (its name only), TrustDomain and ClusterSPIFFEID, the entries each pod currently has, and per-ClusterSPIFFEID
//! statistics, all updated incrementally.
//!
//! Every change computes the set of pods it can affect and re-renders only those:
//! - a pod event: that pod;
//! - a ClusterSPIFFEID or TrustDomain change: the pods the ClusterSPIFFEID selected before
//!   plus those it selects now (found through the namespace → pods index);
//! - a namespace label change: its pods, when a selection or a template depends on it;
//! - a Node change: its pods, when a template reads node facts;
//! - an EndpointSlice change: the pods whose set of Services changed;
//! - a Service created or deleted: the pods its EndpointSlices list (autoPopulateDNSNames
//!   names only Services that exist).
//!
//! Re-rendering a pod evaluates every ClusterSPIFFEID against it (there are few), so
//! fallback and masking are always decided with the whole picture of that pod. The
//! result is a [`Batch`] of per-node upserts and removals, which the caller publishes.
//!
//! Nothing is published before [`State::mark_synced`]: until every informer has listed, a
//! partial world would publish removals that are not real. Pods are rendered as they
//! arrive all the same, and the batches are held ([`State::hold`]) and netted: a restart
//! renders the Pods of one LIST page while the apiserver serves the next, and
//! `mark_synced` publishes the held entries as one batch.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use sigil_identity::TrustDomain as TrustDomainName;
use sigil_identity::entry::RegistrationEntry;

use crate::IndexConfig;
use crate::node_log::Fast;
use crate::objects::{CompiledCsid, CsidMeta, NodeFacts, PodFacts, SliceFacts, TrustDomainInfo};
use crate::render::{self, EntryKey, PodWorld};
use crate::status_view::{self, StatusView};
use sigil_api::crd::cluster_spiffe_id::{ClusterSpiffeIdSpec, ClusterSpiffeIdStatus};

pub(crate) type PodId = u32;
type CsidId = u32;
type PodKey = (String, String);
type Labels = BTreeMap<String, String>;
/// Services listing one Pod: (name, number of EndpointSlices listing the Pod), by name.
type PodServices = Vec<(Box<str>, u32)>;
/// What a ClusterSPIFFEID did for a pod, and the pod's entries ([`State::evaluate`]).
type Evaluated = (Vec<(CsidId, Outcome)>, Vec<RegistrationEntry>);

/// Re-renders of at least this many pods (a ClusterSPIFFEID or TrustDomain change, a
/// namespace relabelled) evaluate on two threads; below it a thread costs more than it saves.
const PARALLEL_RENDER: usize = 4096;
/// Pods evaluated at once before they are settled: bounds what is held in between.
const RENDER_CHUNK: usize = 8192;

/// Adds pod `id` to `key`'s set in `map`, copying `key` only for a set not there yet.
fn add_pod(map: &mut HashMap<String, HashSet<PodId, Fast>>, key: &str, id: PodId) {
    match map.get_mut(key) {
        Some(set) => set.insert(id),
        None => map.entry(key.to_owned()).or_default().insert(id),
    };
}

/// Notes that ClusterSPIFFEID `name`'s status may have changed because a pod's outcome
/// did. Before sync there is nothing to note: the status writer waits for sync, and sync
/// marks every ClusterSPIFFEID ([`State::mark_synced`]). Runs for every pod an event
/// settles, so the name is copied only when it is not noted yet.
fn mark_dirty(dirty: &mut BTreeSet<String>, synced: bool, name: &str) {
    if synced && !dirty.contains(name) {
        dirty.insert(name.to_owned());
    }
}

/// Per-node changes produced by one event.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) nodes: HashMap<String, NodeChanges>,
}

/// Upserts and removals for one node.
#[derive(Debug, Default)]
pub(crate) struct NodeChanges {
    pub(crate) upserts: Vec<Arc<RegistrationEntry>>,
    pub(crate) removed: Vec<String>,
}

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn upsert(&mut self, node: &str, e: Arc<RegistrationEntry>) {
        match self.nodes.get_mut(node) {
            Some(changes) => changes.upserts.push(e),
            None => self
                .nodes
                .entry(node.to_owned())
                .or_default()
                .upserts
                .push(e),
        }
    }

    fn remove(&mut self, node: &str, id: String) {
        self.nodes
            .entry(node.to_owned())
            .or_default()
            .removed
            .push(id);
    }
}

/// What a ClusterSPIFFEID did for one pod it selects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// A fallback ClusterSPIFFEID, set aside for a non-fallback one.
    Standby,
    /// The pod has no node yet; its entry renders when it is scheduled.
    Unscheduled,
    /// Its entry is issued.
    Applied,
    /// An older ClusterSPIFFEID gives the pod the same SPIFFE ID.
    Masked,
    /// Its entry is issued without its hint: an older ClusterSPIFFEID (named) gives the
    /// pod an identity with the same hint, and hints are unique in a Workload API response
    /// (SPIFFE_Workload_API.md 5.2.1, 6.2.1).
    HintTaken(String),
    /// The entry did not render.
    Failed(String),
}

#[derive(Debug)]
struct PodRecord {
    facts: PodFacts,
    outcomes: Vec<(CsidId, Outcome)>,
    /// IDs and content hashes of the entries published for this pod, on `published_on`.
    published: Vec<(EntryKey, u64)>,
    published_on: PublishedOn,
}

/// Which node a pod's entries are published on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PublishedOn {
    /// None: no entry of the pod is out.
    Nowhere,
    /// The node its facts name (`facts.node`): nearly always, so a re-render neither
    /// copies nor compares the node's name (a cold read per Pod at 1M Pods).
    FactsNode,
    /// A node its facts no longer name (they changed after the entries went out).
    Other(String),
}

impl PublishedOn {
    /// The node's name, for a pod whose facts are `facts`. Takes the facts rather than the
    /// record so that callers may still change the record's other fields meanwhile.
    fn node<'a>(&'a self, facts: &'a PodFacts) -> Option<&'a str> {
        match self {
            Self::Nowhere => None,
            Self::FactsNode => facts.node.as_deref(),
            Self::Other(node) => Some(node),
        }
    }
}

/// How a ClusterSPIFFEID's trust domain resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TdResolution {
    Found(TrustDomainInfo),
    NotFound(String),
    NoneExist,
    Ambiguous(usize),
}

#[derive(Debug)]
pub(super) struct CsidRecord {
    pub(super) meta: CsidMeta,
    pub(super) spec: Result<ClusterSpiffeIdSpec, String>,
    pub(super) compiled: Result<CompiledCsid, String>,
    pub(super) resolved: TdResolution,
    pub(super) observed_status: Option<ClusterSpiffeIdStatus>,
    pub(super) selected: HashSet<PodId, Fast>,
    pub(super) failures: BTreeMap<PodKey, String>,
    /// Pods whose entry lost its hint to an older ClusterSPIFFEID, with that one's name.
    pub(super) hint_conflicts: BTreeMap<PodKey, String>,
    pub(super) masked: u64,
    pub(super) namespaces_selected: u64,
    pub(super) namespaces_ignored: u64,
}

impl CsidRecord {
    /// Compiled and with a trust domain: it renders entries.
    fn active(&self) -> Option<(&CompiledCsid, &TrustDomainInfo)> {
        match (&self.compiled, &self.resolved) {
            (Ok(c), TdResolution::Found(td)) => Some((c, td)),
            _ => None,
        }
    }
}

/// Which kind of object a key belongs to (for relists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Pod,
    Namespace,
    Node,
    EndpointSlice,
    Service,
    ClusterSpiffeId,
    TrustDomain,
}

/// What [`State::pod_lookup`] finds.
#[derive(Debug, Clone)]
pub(crate) struct PodLookup {
    pub(crate) facts: PodFacts,
    pub(crate) node_uid: Option<String>,
    pub(crate) published_on: Option<String>,
    pub(crate) entry_ids: Vec<String>,
}

#[derive(Debug)]
pub(crate) struct State {
    config: Arc<IndexConfig>,
    synced: bool,
    pods: Vec<Option<PodRecord>>,
    free_pods: Vec<PodId>,
    /// By namespace, then name. Nested so that an event looks its Pod up by the names it
    /// carries, without copying them into a key, and so that a namespace's Pods are its
    /// map's values.
    pods_by_name: HashMap<String, HashMap<String, PodId>>,
    pod_count: usize,
    node_pods: HashMap<String, HashSet<PodId, Fast>>,
    namespaces: HashMap<String, Labels>,
    nodes: HashMap<String, NodeFacts>,
    slices: HashMap<PodKey, SliceFacts>,
    /// By namespace, then Pod name: the Services whose EndpointSlices list the Pod (name,
    /// number of slices listing it). Nested so that rendering looks a Pod up by its
    /// borrowed names instead of cloning them into a key.
    pod_services: HashMap<String, HashMap<String, PodServices>>,
    /// The Services that exist, by namespace.
    services: HashMap<String, HashSet<String>>,
    trust_domains: BTreeMap<String, TrustDomainInfo>,
    csids: Vec<Option<CsidRecord>>,
    free_csids: Vec<CsidId>,
    csid_by_name: HashMap<String, CsidId>,
    /// Live ClusterSPIFFEIDs, oldest first (the masking order).
    order: Vec<CsidId>,
    /// ClusterSPIFFEIDs whose status may have changed since the status writer last looked.
    pub(crate) dirty: BTreeSet<String>,
    /// Before sync: the entries rendered so far, by node, then entry ID (see
    /// [`State::hold`]). Nested, so that holding an entry neither copies its node's name
    /// nor hashes it again with the ID; the inner maps' keys are entry IDs, which nobody
    /// outside chooses (node_log.rs, [`Fast`]).
    held: HashMap<String, HashMap<EntryKey, Arc<RegistrationEntry>, Fast>>,
}

impl State {
    pub(crate) fn new(config: Arc<IndexConfig>) -> Self {
        Self {
            config,
            synced: false,
            pods: Vec::new(),
            free_pods: Vec::new(),
            pods_by_name: HashMap::new(),
            pod_count: 0,
            node_pods: HashMap::new(),
            namespaces: HashMap::new(),
            nodes: HashMap::new(),
            slices: HashMap::new(),
            pod_services: HashMap::new(),
            services: HashMap::new(),
            trust_domains: BTreeMap::new(),
            csids: Vec::new(),
            free_csids: Vec::new(),
            csid_by_name: HashMap::new(),
            order: Vec::new(),
            dirty: BTreeSet::new(),
            held: HashMap::new(),
        }
    }

    pub(crate) fn is_synced(&self) -> bool {
        self.synced
    }

    /// Before sync, keeps what a change rendered instead of publishing it, netted as the
    /// node logs would apply it (removals, then upserts): what is held is exactly what
    /// publishing every batch would have left.
    pub(crate) fn hold(&mut self, batch: Batch) {
        for (node, changes) in batch.nodes {
            let held = self.held.entry(node).or_default();
            for id in changes.removed {
                held.remove(&EntryKey::of(&id));
            }
            for e in changes.upserts {
                held.insert(EntryKey::of(&e.id), e);
            }
        }
    }

    pub(crate) fn pod_count(&self) -> usize {
        self.pod_count
    }

    fn pod_id(&self, namespace: &str, name: &str) -> Option<PodId> {
        self.pods_by_name.get(namespace)?.get(name).copied()
    }

    /// Pod `namespace/name` as the index holds it: its facts, the UID of its node (when the
    /// Node is known), and the node and IDs of the entries published for it.
    pub(crate) fn pod_lookup(&self, namespace: &str, name: &str) -> Option<PodLookup> {
        let id = self.pod_id(namespace, name)?;
        let rec = self.pod(id)?;
        Some(PodLookup {
            facts: rec.facts.clone(),
            node_uid: rec
                .facts
                .node
                .as_deref()
                .and_then(|n| self.nodes.get(n))
                .map(|n| n.uid.clone()),
            published_on: rec.published_on.node(&rec.facts).map(str::to_owned),
            entry_ids: rec.published.iter().map(|(id, _)| id.to_id()).collect(),
        })
    }

    /// For each TrustDomain object (by name), the foreign trust domains its active
    /// ClusterSPIFFEIDs federate with.
    pub(crate) fn federations(&self) -> BTreeMap<String, BTreeSet<TrustDomainName>> {
        let mut out: BTreeMap<String, BTreeSet<TrustDomainName>> = BTreeMap::new();
        for (_, rec) in self.live_csids() {
            if let Some((compiled, td)) = rec.active()
                && !compiled.federates_with.is_empty()
            {
                out.entry(td.object_name.clone())
                    .or_default()
                    .extend(compiled.federates_with.iter().cloned());
            }
        }
        out
    }

    fn csid(&self, c: CsidId) -> Option<&CsidRecord> {
        self.csids.get(c as usize).and_then(Option::as_ref)
    }

    fn pod(&self, p: PodId) -> Option<&PodRecord> {
        self.pods.get(p as usize).and_then(Option::as_ref)
    }

    fn live_csids(&self) -> impl Iterator<Item = (CsidId, &CsidRecord)> {
        self.order
            .iter()
            .filter_map(|&c| self.csid(c).map(|r| (c, r)))
    }

    /// Once every informer has listed: every entry held so far goes into `batch`, and from
    /// now on changes publish.
    pub(crate) fn mark_synced(&mut self, batch: &mut Batch) {
        if self.synced {
            return;
        }
        self.synced = true;
        for (node, held) in std::mem::take(&mut self.held) {
            if !held.is_empty() {
                let changes = batch.nodes.entry(node).or_default();
                changes.upserts.extend(held.into_values());
            }
        }
        self.dirty.extend(self.csid_by_name.keys().cloned());
    }

    /// Keys (`namespace/name` or `name`) of every object of `kind` the index holds.
    pub(crate) fn keys(&self, kind: Kind) -> Vec<String> {
        match kind {
            Kind::Pod => self
                .pods_by_name
                .iter()
                .flat_map(|(ns, names)| names.keys().map(move |n| format!("{ns}/{n}")))
                .collect(),
            Kind::Namespace => self.namespaces.keys().cloned().collect(),
            Kind::Node => self.nodes.keys().cloned().collect(),
            Kind::EndpointSlice => self
                .slices
                .keys()
                .map(|(ns, n)| format!("{ns}/{n}"))
                .collect(),
            Kind::Service => self
                .services
                .iter()
                .flat_map(|(ns, names)| names.iter().map(move |n| format!("{ns}/{n}")))
                .collect(),
            Kind::ClusterSpiffeId => self.csid_by_name.keys().cloned().collect(),
            Kind::TrustDomain => self.trust_domains.keys().cloned().collect(),
        }
    }

    // ---- pods ----

    pub(crate) fn apply_pod(&mut self, facts: PodFacts, batch: &mut Batch) {
        let id = match self.pod_id(&facts.namespace, &facts.name) {
            Some(id) => {
                let Some(rec) = self.pods[id as usize].as_mut() else {
                    return;
                };
                if rec.facts == facts {
                    return;
                }
                if rec.facts.node != facts.node {
                    // Entries published on the old node stay named by it until settled.
                    if rec.published_on == PublishedOn::FactsNode {
                        rec.published_on = rec
                            .facts
                            .node
                            .clone()
                            .map_or(PublishedOn::Nowhere, PublishedOn::Other);
                    }
                    if let Some(old) = &rec.facts.node
                        && let Some(set) = self.node_pods.get_mut(old)
                    {
                        set.remove(&id);
                    }
                    if let Some(new) = &facts.node {
                        add_pod(&mut self.node_pods, new, id);
                    }
                }
                rec.facts = facts;
                id
            }
            None => {
                let rec = PodRecord {
                    facts,
                    outcomes: Vec::new(),
                    published: Vec::new(),
                    published_on: PublishedOn::Nowhere,
                };
                let id = match self.free_pods.pop() {
                    Some(id) => {
                        self.pods[id as usize] = Some(rec);
                        id
                    }
                    None => {
                        self.pods.push(Some(rec));
                        (self.pods.len() - 1) as PodId
                    }
                };
                let facts = self.pods[id as usize].as_ref().map(|r| &r.facts);
                if let Some(facts) = facts {
                    let name = facts.name.clone();
                    match self.pods_by_name.get_mut(&facts.namespace) {
                        Some(names) => names.insert(name, id),
                        None => self
                            .pods_by_name
                            .entry(facts.namespace.clone())
                            .or_default()
                            .insert(name, id),
                    };
                    self.pod_count += 1;
                    if let Some(node) = &facts.node {
                        add_pod(&mut self.node_pods, node, id);
                    }
                }
                id
            }
        };
        self.rerender_one(id, batch);
    }

    pub(crate) fn delete_pod(&mut self, namespace: &str, name: &str, batch: &mut Batch) {
        let Some(names) = self.pods_by_name.get_mut(namespace) else {
            return;
        };
        let Some(id) = names.remove(name) else {
            return;
        };
        if names.is_empty() {
            self.pods_by_name.remove(namespace);
        }
        self.pod_count -= 1;
        let Some(mut rec) = self.pods[id as usize].take() else {
            return;
        };
        self.settle(id, &mut rec, Vec::new(), Vec::new(), batch);
        if let Some(node) = &rec.facts.node
            && let Some(set) = self.node_pods.get_mut(node)
        {
            set.remove(&id);
            if set.is_empty() {
                self.node_pods.remove(node);
            }
        }
        self.free_pods.push(id);
    }

    // ---- namespaces, nodes, slices ----

    pub(crate) fn set_namespace(&mut self, name: &str, labels: Option<Labels>, batch: &mut Batch) {
        let old = match labels.clone() {
            Some(l) => self.namespaces.insert(name.to_owned(), l),
            None => self.namespaces.remove(name),
        };
        if old == labels {
            return;
        }
        let ignored = self.config.ignores(name);
        let mut affected = old.is_none() || labels.is_none();
        let mut dirty = Vec::new();
        for &c in &self.order {
            let Some(rec) = self.csids[c as usize].as_mut() else {
                continue;
            };
            let Ok(compiled) = &rec.compiled else {
                continue;
            };
            let was = old
                .as_ref()
                .is_some_and(|l| compiled.namespace_selector.matches(l));
            let now = labels
                .as_ref()
                .is_some_and(|l| compiled.namespace_selector.matches(l));
            if was != now {
                let counter = if ignored {
                    &mut rec.namespaces_ignored
                } else {
                    &mut rec.namespaces_selected
                };
                if now {
                    *counter += 1;
                } else {
                    *counter = counter.saturating_sub(1);
                }
                dirty.push(rec.meta.name.clone());
                affected |= !ignored;
            }
            affected |= compiled.uses_namespace_labels;
        }
        self.dirty.extend(dirty);
        if affected {
            let pods: Vec<PodId> = self
                .pods_by_name
                .get(name)
                .map(|names| names.values().copied().collect())
                .unwrap_or_default();
            self.rerender(pods, batch);
        }
    }

    pub(crate) fn set_node(&mut self, name: &str, facts: Option<NodeFacts>, batch: &mut Batch) {
        let old = match facts.clone() {
            Some(f) => self.nodes.insert(name.to_owned(), f),
            None => self.nodes.remove(name),
        };
        if old == facts {
            return;
        }
        if self
            .live_csids()
            .any(|(_, r)| r.active().is_some_and(|(c, _)| c.uses_node))
        {
            let pods: Vec<PodId> = self
                .node_pods
                .get(name)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            self.rerender(pods, batch);
        }
    }

    pub(crate) fn set_slice(
        &mut self,
        namespace: &str,
        name: &str,
        facts: Option<SliceFacts>,
        batch: &mut Batch,
    ) {
        let key = (namespace.to_owned(), name.to_owned());
        let old = match facts.clone() {
            Some(f) => self.slices.insert(key, f),
            None => self.slices.remove(&key),
        };
        if old == facts {
            return;
        }
        let mut changed_pods: Vec<String> = Vec::new();
        if let Some(SliceFacts {
            service: Some(svc),
            pods,
            ..
        }) = &old
            && let Some(in_namespace) = self.pod_services.get_mut(namespace)
        {
            for pod in pods {
                let Some(services) = in_namespace.get_mut(pod.as_str()) else {
                    continue;
                };
                if let Some(i) = services
                    .iter()
                    .position(|(s, _)| s.as_ref() == svc.as_str())
                {
                    services[i].1 -= 1;
                    if services[i].1 == 0 {
                        services.remove(i);
                        changed_pods.push(pod.clone());
                    }
                }
                if services.is_empty() {
                    in_namespace.remove(pod.as_str());
                }
            }
            if in_namespace.is_empty() {
                self.pod_services.remove(namespace);
            }
        }
        if let Some(SliceFacts {
            service: Some(svc),
            pods,
            ..
        }) = &facts
            && !pods.is_empty()
        {
            let in_namespace = self.pod_services.entry(namespace.to_owned()).or_default();
            for pod in pods {
                let services = in_namespace.entry(pod.clone()).or_default();
                match services.binary_search_by(|(s, _)| s.as_ref().cmp(svc.as_str())) {
                    Ok(i) => services[i].1 += 1,
                    Err(i) => {
                        services.insert(i, (svc.as_str().into(), 1));
                        changed_pods.push(pod.clone());
                    }
                }
            }
        }
        if changed_pods.is_empty()
            || !self.live_csids().any(|(_, r)| {
                r.active()
                    .is_some_and(|(c, _)| c.spec.auto_populate_dns_names)
            })
        {
            return;
        }
        let pods: Vec<PodId> = changed_pods
            .into_iter()
            .filter_map(|p| self.pod_id(namespace, &p))
            .collect();
        self.rerender(pods, batch);
    }

    /// A Service was created (`exists`) or deleted: the pods its EndpointSlices list gain
    /// or lose its DNS names.
    pub(crate) fn set_service(
        &mut self,
        namespace: &str,
        name: &str,
        exists: bool,
        batch: &mut Batch,
    ) {
        let changed = if exists {
            self.services
                .entry(namespace.to_owned())
                .or_default()
                .insert(name.to_owned())
        } else {
            match self.services.get_mut(namespace) {
                Some(names) => {
                    let removed = names.remove(name);
                    if names.is_empty() {
                        self.services.remove(namespace);
                    }
                    removed
                }
                None => false,
            }
        };
        if !changed
            || !self.live_csids().any(|(_, r)| {
                r.active()
                    .is_some_and(|(c, _)| c.spec.auto_populate_dns_names)
            })
        {
            return;
        }
        let listed = self.pod_services.get(namespace);
        let pods: Vec<PodId> = self
            .pods_by_name
            .get(namespace)
            .into_iter()
            .flat_map(HashMap::values)
            .copied()
            .filter(|&p| {
                self.pod(p).is_some_and(|r| {
                    listed
                        .and_then(|pods| pods.get(&r.facts.name))
                        .is_some_and(|svcs| svcs.iter().any(|(s, _)| s.as_ref() == name))
                })
            })
            .collect();
        self.rerender(pods, batch);
    }

    // ---- trust domains ----

    pub(crate) fn set_trust_domain(
        &mut self,
        name: &str,
        info: Option<TrustDomainInfo>,
        batch: &mut Batch,
    ) {
        let old = match info.clone() {
            Some(i) => self.trust_domains.insert(name.to_owned(), i),
            None => self.trust_domains.remove(name),
        };
        if old == info {
            return;
        }
        let ids: Vec<CsidId> = self.order.clone();
        let mut affected: HashSet<PodId, Fast> = HashSet::default();
        for c in ids {
            let Some(rec) = self.csids[c as usize].as_mut() else {
                continue;
            };
            let reference = rec.spec.as_ref().ok().and_then(|s| s.trust_domain.clone());
            let resolved = resolve(&self.trust_domains, reference.as_deref());
            if rec.resolved == resolved {
                continue;
            }
            rec.resolved = resolved;
            self.dirty.insert(rec.meta.name.clone());
            affected.extend(rec.selected.iter().copied());
            affected.extend(self.candidates(c));
        }
        self.rerender(affected, batch);
    }

    // ---- ClusterSPIFFEIDs ----

    /// Installs or updates a ClusterSPIFFEID (`spec` is `Err` when it could not be read).
    pub(crate) fn apply_csid(
        &mut self,
        meta: CsidMeta,
        spec: Result<ClusterSpiffeIdSpec, String>,
        observed: Option<ClusterSpiffeIdStatus>,
        batch: &mut Batch,
    ) {
        let existing = self.csid_by_name.get(&meta.name).copied();
        if let Some(c) = existing {
            let rec = self.csids[c as usize]
                .as_mut()
                .unwrap_or_else(|| unreachable!());
            rec.observed_status = observed.clone();
            let same_object = rec.meta.uid == meta.uid && rec.meta.created == meta.created;
            if rec.spec == spec && same_object {
                if rec.meta.generation != meta.generation {
                    rec.meta.generation = meta.generation;
                    self.dirty.insert(meta.name);
                }
                return;
            }
            // A spec that stopped parsing (e.g. written by a newer version) does not take
            // identities away: the last good one stays in force.
            if spec.is_err() && rec.spec.is_ok() && same_object {
                return;
            }
        }
        let compiled = spec.clone().and_then(|s| CompiledCsid::compile(&s));
        let resolved = resolve(
            &self.trust_domains,
            spec.as_ref().ok().and_then(|s| s.trust_domain.as_deref()),
        );
        let name = meta.name.clone();
        let (c, previously) = match existing {
            Some(c) => {
                let rec = self.csids[c as usize]
                    .as_mut()
                    .unwrap_or_else(|| unreachable!());
                rec.meta = meta;
                rec.spec = spec;
                rec.compiled = compiled;
                rec.resolved = resolved;
                (c, rec.selected.iter().copied().collect::<Vec<_>>())
            }
            None => {
                let rec = CsidRecord {
                    meta,
                    spec,
                    compiled,
                    resolved,
                    observed_status: observed,
                    selected: HashSet::default(),
                    failures: BTreeMap::new(),
                    hint_conflicts: BTreeMap::new(),
                    masked: 0,
                    namespaces_selected: 0,
                    namespaces_ignored: 0,
                };
                let c = match self.free_csids.pop() {
                    Some(c) => {
                        self.csids[c as usize] = Some(rec);
                        c
                    }
                    None => {
                        self.csids.push(Some(rec));
                        (self.csids.len() - 1) as CsidId
                    }
                };
                self.csid_by_name.insert(name.clone(), c);
                (c, Vec::new())
            }
        };
        if let Some(CsidRecord {
            compiled: Err(e), ..
        }) = self.csid(c)
        {
            tracing::warn!(cluster_spiffe_id = %name, error = %e, "ClusterSPIFFEID is invalid; it gives no identities until fixed");
        }
        self.reorder();
        self.recount_namespaces(c);
        self.dirty.insert(name);
        let mut affected = previously;
        affected.extend(self.candidates(c));
        self.rerender(affected, batch);
    }

    pub(crate) fn delete_csid(&mut self, name: &str, batch: &mut Batch) {
        let Some(c) = self.csid_by_name.remove(name) else {
            return;
        };
        self.order.retain(|&x| x != c);
        // Re-render while the record still exists, so its outcomes are taken back, then
        // free its slot.
        let selected: Vec<PodId> = self
            .csid(c)
            .map(|r| r.selected.iter().copied().collect())
            .unwrap_or_default();
        self.rerender(selected, batch);
        self.csids[c as usize] = None;
        self.free_csids.push(c);
        self.dirty.remove(name);
    }

    fn reorder(&mut self) {
        let mut order: Vec<CsidId> = self.csid_by_name.values().copied().collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (self.csid(a), self.csid(b));
            let key = |r: Option<&CsidRecord>| r.map(|r| (r.meta.created, r.meta.name.clone()));
            key(a).cmp(&key(b))
        });
        self.order = order;
    }

    fn recount_namespaces(&mut self, c: CsidId) {
        let Some(rec) = self.csid(c) else { return };
        let (mut selected, mut ignored) = (0, 0);
        if let Ok(compiled) = &rec.compiled {
            for (ns, labels) in &self.namespaces {
                if compiled.namespace_selector.matches(labels) {
                    if self.config.ignores(ns) {
                        ignored += 1;
                    } else {
                        selected += 1;
                    }
                }
            }
        }
        if let Some(rec) = self.csids[c as usize].as_mut() {
            rec.namespaces_selected = selected;
            rec.namespaces_ignored = ignored;
        }
    }

    /// The pods an active ClusterSPIFFEID's selectors match now, via the namespace index.
    fn candidates(&self, c: CsidId) -> Vec<PodId> {
        let Some((compiled, _)) = self.csid(c).and_then(CsidRecord::active) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (ns, labels) in &self.namespaces {
            if self.config.ignores(ns) || !compiled.namespace_selector.matches(labels) {
                continue;
            }
            let Some(pods) = self.pods_by_name.get(ns) else {
                continue;
            };
            for &p in pods.values() {
                if self
                    .pod(p)
                    .is_some_and(|r| compiled.pod_selector.matches(&r.facts.labels))
                {
                    out.push(p);
                }
            }
        }
        out
    }

    // ---- rendering ----

    fn rerender(&mut self, pods: impl IntoIterator<Item = PodId>, batch: &mut Batch) {
        // In ID order, which is about the order the pods' records and strings were
        // allocated in: a change that re-renders a million pods then reads memory in
        // order instead of at random (the callers collect from hash sets). At 1M Pods
        // rendering is bound by memory, not by the CPU (bench/README.md).
        let mut pods: Vec<PodId> = pods.into_iter().collect();
        pods.sort_unstable();
        pods.dedup();
        if pods.len() < PARALLEL_RENDER {
            for id in pods {
                self.rerender_one(id, batch);
            }
            return;
        }
        // Many pods: evaluate a chunk on two threads, then settle it in ID order on this
        // one. Evaluating reads only what settling never writes (the ClusterSPIFFEIDs'
        // specs, the namespaces, nodes and Services, the pod's own facts), so the outcome
        // is the same as one pod at a time.
        for chunk in pods.chunks(RENDER_CHUNK) {
            let evaluated = self.evaluate_on_two_threads(chunk);
            for (&id, evaluated) in chunk.iter().zip(evaluated) {
                let (Some((outcomes, entries)), Some(mut rec)) = (
                    evaluated,
                    self.pods.get_mut(id as usize).and_then(Option::take),
                ) else {
                    continue;
                };
                self.settle(id, &mut rec, outcomes, entries, batch);
                self.pods[id as usize] = Some(rec);
            }
        }
    }

    /// [`State::evaluate`] for each of `ids` (`None` for a pod that is gone), half on a
    /// second thread.
    fn evaluate_on_two_threads(&self, ids: &[PodId]) -> Vec<Option<Evaluated>> {
        let evaluate = |ids: &[PodId]| -> Vec<Option<Evaluated>> {
            ids.iter()
                .map(|&id| self.pod(id).map(|rec| self.evaluate(&rec.facts)))
                .collect()
        };
        let (first, second) = ids.split_at(ids.len() / 2);
        std::thread::scope(|s| {
            let other = s.spawn(|| evaluate(second));
            let mut out = evaluate(first);
            match other.join() {
                Ok(rest) => out.extend(rest),
                Err(panic) => std::panic::resume_unwind(panic),
            }
            out
        })
    }

    /// Re-renders one pod (an event of that pod: no list to sort).
    fn rerender_one(&mut self, id: PodId, batch: &mut Batch) {
        let Some(mut rec) = self.pods.get_mut(id as usize).and_then(Option::take) else {
            return;
        };
        let (outcomes, entries) = self.evaluate(&rec.facts);
        self.settle(id, &mut rec, outcomes, entries, batch);
        self.pods[id as usize] = Some(rec);
    }

    /// Records a pod's new outcomes in the statistics and its new entries in `batch`.
    fn settle(
        &mut self,
        id: PodId,
        rec: &mut PodRecord,
        outcomes: Vec<(CsidId, Outcome)>,
        entries: Vec<RegistrationEntry>,
        batch: &mut Batch,
    ) {
        // Statistics: take back what changed, then add the new.
        if rec.outcomes != outcomes {
            let key = || (rec.facts.namespace.clone(), rec.facts.name.clone());
            for (c, o) in &rec.outcomes {
                if outcomes.iter().any(|(c2, o2)| c2 == c && o2 == o) {
                    continue;
                }
                if let Some(r) = self.csids.get_mut(*c as usize).and_then(Option::as_mut) {
                    r.selected.remove(&id);
                    match o {
                        Outcome::Failed(_) => {
                            r.failures.remove(&key());
                        }
                        Outcome::HintTaken(_) => {
                            r.hint_conflicts.remove(&key());
                        }
                        Outcome::Masked => r.masked = r.masked.saturating_sub(1),
                        _ => {}
                    }
                    mark_dirty(&mut self.dirty, self.synced, &r.meta.name);
                }
            }
            for (c, o) in &outcomes {
                if rec.outcomes.iter().any(|(c2, o2)| c2 == c && o2 == o) {
                    continue;
                }
                if let Some(r) = self.csids.get_mut(*c as usize).and_then(Option::as_mut) {
                    r.selected.insert(id);
                    match o {
                        Outcome::Failed(reason) => {
                            r.failures.insert(key(), reason.clone());
                        }
                        Outcome::HintTaken(winner) => {
                            r.hint_conflicts.insert(key(), winner.clone());
                        }
                        Outcome::Masked => r.masked += 1,
                        _ => {}
                    }
                    mark_dirty(&mut self.dirty, self.synced, &r.meta.name);
                }
            }
            rec.outcomes = outcomes;
        }

        // Entries: diff by ID and content against what is published.
        let node = if entries.is_empty() {
            None
        } else {
            rec.facts.node.as_deref()
        };
        let new: Vec<(EntryKey, u64, RegistrationEntry)> = entries
            .into_iter()
            .map(|e| (EntryKey::of(&e.id), content_hash(&e), e))
            .collect();
        let old = rec.published_on.node(&rec.facts);
        // `node` is facts.node when set: no need to compare the names.
        let same_node =
            matches!((&rec.published_on, node), (PublishedOn::FactsNode, Some(_))) || old == node;
        if !same_node {
            if let Some(old) = old {
                for (id, _) in rec.published.drain(..) {
                    batch.remove(old, id.to_id());
                }
            }
        } else if let Some(n) = node {
            for (id, _) in &rec.published {
                if !new.iter().any(|(i, _, _)| i == id) {
                    batch.remove(n, id.to_id());
                }
            }
        }
        let mut published = Vec::with_capacity(new.len());
        for (id, hash, e) in new {
            if let Some(n) = node
                && !rec.published.iter().any(|(i, h)| *h == hash && *i == id)
            {
                batch.upsert(n, Arc::new(e));
            }
            published.push((id, hash));
        }
        rec.published = published;
        rec.published_on = if node.is_some() {
            PublishedOn::FactsNode
        } else {
            PublishedOn::Nowhere
        };
    }

    /// Which ClusterSPIFFEIDs select the pod, what each produced, and the entries.
    fn evaluate(&self, pod: &PodFacts) -> Evaluated {
        let none = (Vec::new(), Vec::new());
        if pod.terminal || self.config.ignores(&pod.namespace) {
            return none;
        }
        let Some(ns_labels) = self.namespaces.get(&pod.namespace) else {
            return none;
        };
        let matching: Vec<(CsidId, &CsidRecord, &CompiledCsid, &TrustDomainInfo)> = self
            .live_csids()
            .filter_map(|(c, r)| r.active().map(|(compiled, td)| (c, r, compiled, td)))
            .filter(|(_, _, compiled, _)| {
                compiled.namespace_selector.matches(ns_labels)
                    && compiled.pod_selector.matches(&pod.labels)
            })
            .collect();
        if matching.is_empty() {
            return none;
        }
        let any_primary = matching.iter().any(|(_, _, c, _)| !c.spec.fallback);
        let mut outcomes = Vec::with_capacity(matching.len());
        let mut entries: Vec<RegistrationEntry> = Vec::with_capacity(1);
        let mut hint_owners: Vec<(String, String)> = Vec::new();
        for (c, rec, compiled, td) in matching {
            let outcome = if compiled.spec.fallback && any_primary {
                Outcome::Standby
            } else if pod.node.is_none() {
                Outcome::Unscheduled
            } else {
                match self.render(&rec.meta.name, compiled, td, pod, ns_labels) {
                    Ok(e) if entries.iter().any(|x| x.spiffe_id == e.spiffe_id) => Outcome::Masked,
                    Ok(mut e) => {
                        // The oldest ClusterSPIFFEID keeps a hint (as for SPIFFE IDs); a
                        // younger one's entry is issued without it and reported.
                        let taken = (!e.hint.is_empty())
                            .then(|| hint_owners.iter().find(|(h, _)| *h == e.hint))
                            .flatten()
                            .map(|(_, owner)| owner.clone());
                        let outcome = match taken {
                            Some(owner) => {
                                e.hint.clear();
                                Outcome::HintTaken(owner)
                            }
                            None => {
                                if !e.hint.is_empty() {
                                    hint_owners.push((e.hint.clone(), rec.meta.name.clone()));
                                }
                                Outcome::Applied
                            }
                        };
                        entries.push(e);
                        outcome
                    }
                    Err(reason) => Outcome::Failed(reason),
                }
            };
            outcomes.push((c, outcome));
        }
        (outcomes, entries)
    }

    /// The facts rendering reads for `pod`, then [`render::entry`].
    fn render(
        &self,
        csid_name: &str,
        c: &CompiledCsid,
        td: &TrustDomainInfo,
        pod: &PodFacts,
        ns_labels: &Labels,
    ) -> Result<RegistrationEntry, String> {
        // Only Services that exist in the pod's namespace: the label naming them is
        // written by whoever writes the EndpointSlice.
        let services: Vec<&str> = if c.spec.auto_populate_dns_names {
            let existing = self.services.get(&pod.namespace);
            self.pod_services
                .get(&pod.namespace)
                .and_then(|pods| pods.get(&pod.name))
                .into_iter()
                .flatten()
                .filter(|(svc, _)| existing.is_some_and(|names| names.contains(&**svc)))
                .map(|(svc, _)| &**svc)
                .collect()
        } else {
            Vec::new()
        };
        render::entry(
            csid_name,
            c,
            td,
            &PodWorld {
                pod,
                namespace_labels: ns_labels,
                node: pod.node.as_deref().and_then(|n| self.nodes.get(n)),
                services,
                cluster_name: &self.config.cluster_name,
                cluster_domain: &self.config.cluster_domain,
            },
        )
    }

    // ---- status ----

    /// ClusterSPIFFEID `name`'s status as the index sees it ([`status_view::of`]).
    pub(crate) fn status_view(&self, name: &str) -> Option<StatusView> {
        let rec = self.csid(*self.csid_by_name.get(name)?)?;
        Some(status_view::of(rec, self.synced))
    }

    pub(crate) fn csid_names(&self) -> Vec<String> {
        self.csid_by_name.keys().cloned().collect()
    }

    /// Which ClusterSPIFFEIDs would select a pod with `labels` in `namespace`, before it
    /// exists ([`crate::Admission`]).
    pub(crate) fn admission(&self, namespace: &str, labels: &Labels) -> crate::Admission {
        use crate::Admission;
        if !self.synced {
            return Admission::Unknown("the operator is still listing objects".into());
        }
        if self.config.ignores(namespace) {
            return Admission::NamespaceIgnored;
        }
        let Some(ns_labels) = self.namespaces.get(namespace) else {
            return Admission::Unknown(format!("namespace {namespace} is not known yet"));
        };
        let mut selected = Vec::new();
        // (closeness, name, why not): the closest ClusterSPIFFEID failed last in the order
        // the index applies its checks.
        let mut nearest: Option<(u8, &str, String)> = None;
        for (_, rec) in self.live_csids() {
            let name = rec.meta.name.as_str();
            let miss = match (&rec.compiled, &rec.resolved) {
                (Err(e), _) => (0, format!("its spec is invalid: {e}")),
                (Ok(_), TdResolution::NotFound(td)) => (
                    1,
                    format!("its TrustDomain {td:?} (spec.trustDomain) does not exist"),
                ),
                (Ok(_), TdResolution::NoneExist) => (1, "no TrustDomain exists".into()),
                (Ok(_), TdResolution::Ambiguous(n)) => (
                    1,
                    format!("spec.trustDomain is not set and {n} TrustDomains exist"),
                ),
                (Ok(c), TdResolution::Found(_)) => {
                    if !c.namespace_selector.matches(ns_labels) {
                        (
                            2,
                            format!(
                                "spec.namespaceSelector does not match namespace {namespace} ({})",
                                crate::explain::labels_text(Some(ns_labels))
                            ),
                        )
                    } else if !c.pod_selector.matches(labels) {
                        (
                            3,
                            format!(
                                "spec.podSelector does not match the pod's labels ({})",
                                crate::explain::labels_text(Some(labels))
                            ),
                        )
                    } else {
                        selected.push(name.to_owned());
                        continue;
                    }
                }
            };
            if nearest.as_ref().is_none_or(|(rank, _, _)| miss.0 > *rank) {
                nearest = Some((miss.0, name, miss.1));
            }
        }
        if !selected.is_empty() {
            return Admission::Selected(selected);
        }
        Admission::NotSelected {
            nearest: nearest.map(|(_, name, why)| (name.to_owned(), why)),
        }
    }
}

/// Finds the TrustDomain a ClusterSPIFFEID names, or the only one when it names none.
fn resolve(
    trust_domains: &BTreeMap<String, TrustDomainInfo>,
    reference: Option<&str>,
) -> TdResolution {
    match reference {
        Some(name) => match trust_domains.get(name) {
            Some(td) => TdResolution::Found(td.clone()),
            None => TdResolution::NotFound(name.to_owned()),
        },
        None => {
            let mut all = trust_domains.values();
            match (all.next(), all.next()) {
                (None, _) => TdResolution::NoneExist,
                (Some(td), None) => TdResolution::Found(td.clone()),
                _ => TdResolution::Ambiguous(trust_domains.len()),
            }
        }
    }
}

fn content_hash(e: &RegistrationEntry) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    e.id.hash(&mut h);
    e.spiffe_id.as_str().hash(&mut h);
    e.selectors.hash(&mut h);
    e.dns_names.hash(&mut h);
    e.x509_ttl.hash(&mut h);
    e.jwt_ttl.hash(&mut h);
    e.federates_with.hash(&mut h);
    e.hint.hash(&mut h);
    e.admin.hash(&mut h);
    e.downstream.hash(&mut h);
    e.key_type.hash(&mut h);
    h.finish()
}
