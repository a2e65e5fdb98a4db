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
use kube::{Api, Client};
use sigil_identity::entry::Selector;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::cgroup::strip_runtime_prefix;

/// What attestation reads from a Pod, kept instead of the whole object.
///
/// A Pod as the API server or the kubelet sends it is several KiB once decoded (spec,
/// status, conditions, volumes); the selectors and the container lookup need a few
/// hundred bytes of it. An agent holds one of these for every pod of its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name` (or `generateName`).
    pub name: String,
    /// `spec.serviceAccountName`.
    pub service_account: Option<String>,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// `metadata.labels`, in key order.
    pub labels: Vec<(String, String)>,
    /// `metadata.ownerReferences`: (kind, name, uid).
    pub owners: Vec<(String, String, String)>,
    /// Images of `spec.containers` that name one.
    pub images: Vec<String>,
    /// Images of `spec.initContainers` that name one.
    pub init_images: Vec<String>,
    /// Container statuses (regular, init, ephemeral) that carry a container ID.
    pub containers: Vec<ContainerInfo>,
}

/// One container's status, as far as attestation reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// The container ID without its runtime prefix (`containerd://`).
    pub id: String,
    /// `name`.
    pub name: String,
    /// `image`.
    pub image: String,
    /// `imageID` (may be empty).
    pub image_id: String,
}

impl PodInfo {
    /// The attestation facts of `pod`, taking its strings rather than copying them; None
    /// for a pod without a UID (nothing can be matched to it).
    pub fn from_pod(pod: Pod) -> Option<Self> {
        let Pod {
            metadata,
            spec,
            status,
        } = pod;
        let uid = metadata.uid?;
        let name = metadata.name.or(metadata.generate_name).unwrap_or_default();
        let (service_account, node_name, images, init_images) = match spec {
            Some(s) => {
                // Collected in place, the strings would keep the Containers' allocation
                // (KiBs each): shrink to what they use.
                let images = |cs: Vec<k8s_openapi::api::core::v1::Container>| -> Vec<String> {
                    let mut v: Vec<String> = cs.into_iter().filter_map(|c| c.image).collect();
                    v.shrink_to_fit();
                    v
                };
                (
                    s.service_account_name,
                    s.node_name,
                    images(s.containers),
                    images(s.init_containers.unwrap_or_default()),
                )
            }
            None => (None, None, Vec::new(), Vec::new()),
        };
        let containers = status
            .map(|st| {
                let all = st
                    .container_statuses
                    .into_iter()
                    .flatten()
                    .chain(st.init_container_statuses.into_iter().flatten())
                    .chain(st.ephemeral_container_statuses.into_iter().flatten());
                let mut v: Vec<ContainerInfo> =
                    all.filter_map(ContainerInfo::from_status).collect();
                v.shrink_to_fit();
                v
            })
            .unwrap_or_default();
        Some(Self {
            uid,
            namespace: metadata.namespace.unwrap_or_default(),
            name,
            service_account,
            node_name,
            labels: metadata.labels.into_iter().flatten().collect(),
            owners: metadata
                .owner_references
                .into_iter()
                .flatten()
                .map(|o| (o.kind, o.name, o.uid))
                .collect(),
            images,
            init_images,
            containers,
        })
    }

    /// The status of the container with this ID (without runtime prefix).
    pub fn container(&self, id: &str) -> Option<&ContainerInfo> {
        self.containers.iter().find(|c| c.id == id)
    }
}

impl ContainerInfo {
    fn from_status(c: ContainerStatus) -> Option<Self> {
        let id = strip_runtime_prefix(c.container_id.as_deref()?).to_owned();
        Some(Self {
            id,
            name: c.name,
            image: c.image,
            image_id: c.image_id,
        })
    }
}

/// A place to look pods up by UID, that says when it changed.
pub trait PodSource: Send + Sync + std::fmt::Debug {
    /// The pod with this UID, if known now.
    fn pod_by_uid(&self, uid: &str) -> Option<Arc<PodInfo>>;
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
    pods: RwLock<HashMap<String, Arc<PodInfo>>>,
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
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<PodInfo>>> {
        self.pods.write().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Replaces every pod with a complete list, and marks the set synced.
    pub(crate) fn replace_all(&self, pods: impl IntoIterator<Item = PodInfo>) -> usize {
        let map: HashMap<String, Arc<PodInfo>> = pods
            .into_iter()
            .map(|p| (p.uid.clone(), Arc::new(p)))
            .collect();
        let n = map.len();
        *self.write() = map;
        self.synced.store(true, Ordering::Release);
        self.bump();
        n
    }

    /// Adds or replaces one pod.
    pub(crate) fn upsert(&self, pod: PodInfo) {
        self.write().insert(pod.uid.clone(), Arc::new(pod));
        self.bump();
    }

    /// Drops one pod.
    pub(crate) fn remove(&self, uid: &str) {
        self.write().remove(uid);
        self.bump();
    }

    pub(crate) fn get(&self, uid: &str) -> Option<Arc<PodInfo>> {
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
/// held by UID as [`PodInfo`]: each Pod is cut down to what attestation reads as it
/// arrives.
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
        // At most 5 s between attempts, so pods created just after an API server outage
        // are attested within seconds of its end; with the jitter, the agents of a
        // thousand nodes retry a few hundred times a second at most meanwhile.
        let stream = watcher(api, cfg).backoff(sigil_telemetry::process::WatchBackoff::new(
            std::time::Duration::from_secs(5),
        ));
        let held = pods.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // A (re)list in progress: what it has delivered so far. The held set is replaced
            // only once the list is complete, so a relist never hides pods for a while.
            let mut relist: Option<Vec<PodInfo>> = None;
            loop {
                let ev = tokio::select! {
                    _ = cancel.cancelled() => break,
                    ev = stream.next() => ev,
                };
                match ev {
                    Some(Ok(watcher::Event::Init)) => relist = Some(Vec::new()),
                    Some(Ok(watcher::Event::InitApply(p))) => {
                        if let Some(list) = relist.as_mut() {
                            list.extend(PodInfo::from_pod(p));
                        }
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        held.replace_all(relist.take().unwrap_or_default());
                    }
                    Some(Ok(watcher::Event::Apply(p))) => {
                        if let Some(p) = PodInfo::from_pod(p) {
                            held.upsert(p);
                        }
                    }
                    Some(Ok(watcher::Event::Delete(p))) => {
                        if let Some(uid) = p.metadata.uid.as_deref() {
                            held.remove(uid);
                        }
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "pod watch error; retrying"),
                    None => break,
                }
            }
        });
        Self { pods }
    }
}

impl PodSource for ApiPodSource {
    fn pod_by_uid(&self, uid: &str) -> Option<Arc<PodInfo>> {
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
    pub pod: Arc<PodInfo>,
    /// The container's status entry.
    pub container: ContainerInfo,
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
            && let Some(c) = pod.container(container_id).cloned()
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
pub fn pod_selectors(pod: &PodInfo) -> Vec<Selector> {
    let mut v = Vec::new();
    let mut push = |s: String| v.push(Selector::new("k8s", s));
    push(format!("ns:{}", pod.namespace));
    if let Some(sa) = &pod.service_account {
        push(format!("sa:{sa}"));
    }
    push(format!("pod-uid:{}", pod.uid));
    push(format!("pod-name:{}", pod.name));
    if let Some(node) = &pod.node_name {
        push(format!("node-name:{node}"));
    }
    for (k, val) in &pod.labels {
        push(format!("pod-label:{k}:{val}"));
    }
    for (kind, name, uid) in &pod.owners {
        push(format!("pod-owner:{kind}:{name}"));
        push(format!("pod-owner-uid:{kind}:{uid}"));
    }
    for i in &pod.images {
        push(format!("pod-image:{i}"));
    }
    push(format!("pod-image-count:{}", pod.images.len()));
    for i in &pod.init_images {
        push(format!("pod-init-image:{i}"));
    }
    push(format!("pod-init-image-count:{}", pod.init_images.len()));
    v.sort();
    v.dedup();
    v
}

/// Waits (up to `timeout`) until `source` knows pod `pod_uid`.
pub async fn find_pod(
    source: &dyn PodSource,
    pod_uid: &str,
    timeout: Duration,
) -> Option<Arc<PodInfo>> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": "web-7f9c", "namespace": "shop", "uid": "u-1",
                "labels": {"app": "web", "tier": "front"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "rs-1"}],
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
                "annotations": {"big": "x".repeat(4096)}
            },
            "spec": {
                "serviceAccountName": "web-sa", "nodeName": "n1",
                "containers": [{"name": "main", "image": "reg/web:1"}, {"name": "side", "image": "reg/proxy:2"}],
                "initContainers": [{"name": "init", "image": "reg/init:1"}]
            },
            "status": {
                "containerStatuses": [
                    {"name": "main", "image": "reg/web:1", "imageID": "reg/web@sha256:aa", "containerID": "containerd://c1", "ready": true, "restartCount": 0},
                    {"name": "side", "image": "reg/proxy:2", "imageID": "", "ready": false, "restartCount": 0}
                ],
                "initContainerStatuses": [
                    {"name": "init", "image": "reg/init:1", "imageID": "", "containerID": "cri-o://i1", "ready": false, "restartCount": 0}
                ]
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_pod_is_cut_to_what_attestation_reads_and_gives_spire_compatible_selectors() {
        let info = PodInfo::from_pod(pod()).unwrap();
        let got: Vec<String> = pod_selectors(&info)
            .into_iter()
            .map(|s| format!("{}:{}", s.kind, s.value))
            .collect();
        let mut want = vec![
            "k8s:ns:shop",
            "k8s:sa:web-sa",
            "k8s:pod-uid:u-1",
            "k8s:pod-name:web-7f9c",
            "k8s:node-name:n1",
            "k8s:pod-label:app:web",
            "k8s:pod-label:tier:front",
            "k8s:pod-owner:ReplicaSet:web",
            "k8s:pod-owner-uid:ReplicaSet:rs-1",
            "k8s:pod-image:reg/web:1",
            "k8s:pod-image:reg/proxy:2",
            "k8s:pod-image-count:2",
            "k8s:pod-init-image:reg/init:1",
            "k8s:pod-init-image-count:1",
        ];
        want.sort_unstable();
        assert_eq!(got, want);

        // Containers are found by ID without the runtime prefix; one without an ID yet
        // (not started) cannot be matched.
        assert_eq!(info.container("c1").unwrap().image_id, "reg/web@sha256:aa");
        assert_eq!(info.container("i1").unwrap().name, "init");
        assert_eq!(info.containers.len(), 2);
        let m = PodMatch {
            pod: Arc::new(info.clone()),
            container: info.container("c1").unwrap().clone(),
        };
        let with_container: Vec<String> = selectors(&m).into_iter().map(|s| s.value).collect();
        for v in [
            "container-name:main",
            "container-image:reg/web:1",
            "container-image:reg/web@sha256:aa",
        ] {
            assert!(with_container.iter().any(|s| s == v), "{v} missing");
        }

        // A pod without a UID is not held.
        let mut p = pod();
        p.metadata.uid = None;
        assert!(PodInfo::from_pod(p).is_none());
    }
}
