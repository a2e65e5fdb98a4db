//! The k8s workload attestor: from a process's cgroup to its pod, container and
//! SPIRE-compatible `k8s:` selectors.
//!
//! The pod comes from an event-driven [`PodSource`]: a watch on the API server filtered to
//! this node (what the tests use), or the kubelet. A lookup that misses does not fail after
//! a fixed number of polls (SPIRE's "no selectors found after max poll attempts"): it waits
//! for the source to change, until a deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use sigil_identity::entry::Selector;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::cgroup::strip_runtime_prefix;

/// A place to look pods up by UID, that says when it changed.
pub trait PodSource: Send + Sync + std::fmt::Debug {
    /// The pod with this UID, if known now.
    fn pod_by_uid(&self, uid: &str) -> Option<Arc<Pod>>;
    /// Changes whenever the set of pods (or their status) changes.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// Whether the initial list has arrived.
    fn is_synced(&self) -> bool;
    /// A lookup missed: a source that is not a watch should list again soon.
    fn request_refresh(&self) {}
}

/// Pods held by UID, with a counter bumped on every change and whether the first full
/// list has arrived: what every [`PodSource`] keeps. Attestation looks a pod up by the UID
/// in the process's cgroup, in constant time however many pods the node runs.
#[derive(Debug)]
pub(crate) struct PodsByUid {
    pods: RwLock<HashMap<String, Arc<Pod>>>,
    version: watch::Sender<u64>,
    synced: AtomicBool,
}

impl Default for PodsByUid {
    fn default() -> Self {
        Self {
            pods: RwLock::default(),
            version: watch::channel(0).0,
            synced: AtomicBool::new(false),
        }
    }
}

impl PodsByUid {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Pod>>> {
        self.pods.write().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Replaces every pod with a complete list (pods without a UID are skipped), and
    /// marks the set synced.
    pub(crate) fn replace_all(&self, pods: impl IntoIterator<Item = Pod>) -> usize {
        let map: HashMap<String, Arc<Pod>> = pods
            .into_iter()
            .filter_map(|p| Some((p.metadata.uid.clone()?, Arc::new(p))))
            .collect();
        let n = map.len();
        *self.write() = map;
        self.synced.store(true, Ordering::Release);
        self.bump();
        n
    }

    /// Adds or replaces one pod.
    pub(crate) fn upsert(&self, pod: Pod) {
        if let Some(uid) = pod.metadata.uid.clone() {
            self.write().insert(uid, Arc::new(pod));
        }
        self.bump();
    }

    /// Drops one pod.
    pub(crate) fn remove(&self, pod: &Pod) {
        if let Some(uid) = pod.metadata.uid.as_deref() {
            self.write().remove(uid);
        }
        self.bump();
    }

    pub(crate) fn get(&self, uid: &str) -> Option<Arc<Pod>> {
        self.pods
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .cloned()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub(crate) fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

/// Pods of one node from an API-server watch (`fieldSelector=spec.nodeName=<node>`),
/// held by UID. `managedFields` are dropped on arrival (nothing here reads them, and they
/// are often the largest part of a Pod).
#[derive(Debug, Clone)]
pub struct ApiPodSource {
    pods: Arc<PodsByUid>,
}

impl ApiPodSource {
    /// Starts watching the pods of `node_name`; the watch runs until `cancel`.
    pub fn start(client: Client, node_name: &str, cancel: CancellationToken) -> Self {
        let api: Api<Pod> = Api::all(client);
        let pods = Arc::new(PodsByUid::default());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
        let stream = watcher(api, cfg)
            .default_backoff()
            .modify(|p| p.managed_fields_mut().clear());
        let held = pods.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // A (re)list in progress: what it has delivered so far. The held set is replaced
            // only once the list is complete, so a relist never hides pods for a while.
            let mut relist: Option<Vec<Pod>> = None;
            loop {
                let ev = tokio::select! {
                    _ = cancel.cancelled() => break,
                    ev = stream.next() => ev,
                };
                match ev {
                    Some(Ok(watcher::Event::Init)) => relist = Some(Vec::new()),
                    Some(Ok(watcher::Event::InitApply(p))) => {
                        if let Some(list) = relist.as_mut() {
                            list.push(p);
                        }
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        held.replace_all(relist.take().unwrap_or_default());
                    }
                    Some(Ok(watcher::Event::Apply(p))) => held.upsert(p),
                    Some(Ok(watcher::Event::Delete(p))) => held.remove(&p),
                    Some(Err(e)) => tracing::warn!(error = %e, "pod watch error; retrying"),
                    None => break,
                }
            }
        });
        Self { pods }
    }
}

impl PodSource for ApiPodSource {
    fn pod_by_uid(&self, uid: &str) -> Option<Arc<Pod>> {
        self.pods.get(uid)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.pods.subscribe()
    }

    fn is_synced(&self) -> bool {
        self.pods.is_synced()
    }
}

/// Why a process could not be tied to a running container of a known pod.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum K8sAttestError {
    /// The deadline passed before the pod (or its container status) was seen.
    #[error(
        "pod {pod_uid} / container {container_id} not found on this node within {waited:?} ({what})"
    )]
    NotFound {
        /// Pod UID from the cgroup.
        pod_uid: String,
        /// Container ID from the cgroup.
        container_id: String,
        /// How long we waited.
        waited: Duration,
        /// What was missing.
        what: &'static str,
    },
}

/// The pod and the container a process runs in.
#[derive(Debug, Clone)]
pub struct PodMatch {
    /// The pod.
    pub pod: Arc<Pod>,
    /// The container's status entry.
    pub container: ContainerStatus,
}

/// Waits (up to `timeout`) until `source` knows pod `pod_uid` with a container whose ID is
/// `container_id`.
pub async fn find_container(
    source: &dyn PodSource,
    pod_uid: &str,
    container_id: &str,
    timeout: Duration,
) -> Result<PodMatch, K8sAttestError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut changes = source.subscribe();
    loop {
        changes.borrow_and_update();
        let pod = source.pod_by_uid(pod_uid);
        if let Some(pod) = &pod
            && let Some(c) = container_status(pod, container_id)
        {
            return Ok(PodMatch {
                pod: pod.clone(),
                container: c,
            });
        }
        source.request_refresh();
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(K8sAttestError::NotFound {
                    pod_uid: pod_uid.to_owned(),
                    container_id: container_id.to_owned(),
                    waited: timeout,
                    what: if pod.is_some() { "pod found, container status missing" } else { "pod not found" },
                });
            }
        }
    }
    Err(K8sAttestError::NotFound {
        pod_uid: pod_uid.into(),
        container_id: container_id.into(),
        waited: timeout,
        what: "pod source stopped",
    })
}

fn container_status(pod: &Pod, container_id: &str) -> Option<ContainerStatus> {
    let status = pod.status.as_ref()?;
    let all = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .chain(status.ephemeral_container_statuses.iter().flatten());
    all.into_iter()
        .find(|c| c.container_id.as_deref().map(strip_runtime_prefix) == Some(container_id))
        .cloned()
}

/// SPIRE-compatible `k8s:` selectors for a process in `m.container` of `m.pod`.
pub fn selectors(m: &PodMatch) -> Vec<Selector> {
    let mut v = pod_selectors(&m.pod);
    v.push(Selector::new(
        "k8s",
        format!("container-name:{}", m.container.name),
    ));
    v.push(Selector::new(
        "k8s",
        format!("container-image:{}", m.container.image),
    ));
    if !m.container.image_id.is_empty() {
        v.push(Selector::new(
            "k8s",
            format!("container-image:{}", m.container.image_id),
        ));
    }
    v.sort();
    v.dedup();
    v
}

/// The `k8s:` selectors of a pod as a whole (no container ones): what a workload named by
/// pod, rather than by process, has (the Broker API's pod references).
pub fn pod_selectors(pod: &Pod) -> Vec<Selector> {
    let mut v = Vec::new();
    let mut push = |s: String| v.push(Selector::new("k8s", s));
    push(format!("ns:{}", pod.namespace().unwrap_or_default()));
    if let Some(sa) = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
    {
        push(format!("sa:{sa}"));
    }
    push(format!("pod-uid:{}", pod.uid().unwrap_or_default()));
    push(format!("pod-name:{}", pod.name_any()));
    if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        push(format!("node-name:{node}"));
    }
    for (k, val) in pod.labels() {
        push(format!("pod-label:{k}:{val}"));
    }
    for o in pod.owner_references() {
        push(format!("pod-owner:{}:{}", o.kind, o.name));
        push(format!("pod-owner-uid:{}:{}", o.kind, o.uid));
    }
    if let Some(spec) = pod.spec.as_ref() {
        let images: Vec<&str> = spec
            .containers
            .iter()
            .filter_map(|c| c.image.as_deref())
            .collect();
        for i in &images {
            push(format!("pod-image:{i}"));
        }
        push(format!("pod-image-count:{}", images.len()));
        let init: Vec<&str> = spec
            .init_containers
            .iter()
            .flatten()
            .filter_map(|c| c.image.as_deref())
            .collect();
        for i in &init {
            push(format!("pod-init-image:{i}"));
        }
        push(format!("pod-init-image-count:{}", init.len()));
    }
    v.sort();
    v.dedup();
    v
}

/// Waits (up to `timeout`) until `source` knows pod `pod_uid`.
pub async fn find_pod(
    source: &dyn PodSource,
    pod_uid: &str,
    timeout: Duration,
) -> Option<Arc<Pod>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut changes = source.subscribe();
    loop {
        changes.borrow_and_update();
        if let Some(p) = source.pod_by_uid(pod_uid) {
            return Some(p);
        }
        source.request_refresh();
        tokio::select! {
            r = changes.changed() => if r.is_err() { return None },
            _ = tokio::time::sleep_until(deadline) => return None,
        }
    }
}
