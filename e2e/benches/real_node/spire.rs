//! SPIRE beside Sigil on the same real node (issue 28): spire-server with
//! spire-controller-manager and spire-agent as their Kubernetes users run them
//! (e2e/benches/real_node/spire.yaml: k8s_psat, the k8s workload attestor, a ClusterSPIFFEID),
//! from images of SPIRE's releases (test-tools `spire-node`, images.conf's bench images).
//!
//! Both systems serve the same pods, measured in one run:
//! - one at a time, alternating (a Sigil pod, then a SPIRE pod): pod created → container
//!   running → first X509-SVID in the container (the same go-spiffe client, retrying every
//!   20 ms, on each system's Workload API socket);
//! - a burst: all pods of one system created at once (20 creates in flight), Sigil's then
//!   SPIRE's: each pod's created → running → first SVID, and the first create → the last
//!   SVID;
//! - the working set of every pod of each system, as the kubelet reports it;
//! - the agent pod deleted: how long until its replacement is Ready, and until a pod
//!   created at the deletion has its first SVID.

use super::{at, create, finished, memory, wait_default_sa, workloads_ready};

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, ListParams, LogParams};
use serde_json::{Value, json};
use sigil_e2e::node::RealNode;
use sigil_testkit::report::{Report, percentile};

/// SPIRE's namespace (spire.yaml).
pub(crate) const SPIRE_NS: &str = "spire-system";
/// Where spire-agent binds its Workload API socket on the node (spire.yaml's hostPath).
const SPIRE_SOCKET_DIR: &str = "/run/spire/agent-sockets";

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum System {
    Sigil,
    Spire,
}

const BOTH: [System; 2] = [System::Sigil, System::Spire];

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Sigil => "Sigil",
            System::Spire => "SPIRE",
        }
    }

    /// The namespace of this system's bench pods.
    fn bench_ns(self) -> &'static str {
        match self {
            System::Sigil => "bench-vs-sigil",
            System::Spire => "bench-vs-spire",
        }
    }

    /// The namespace and label selector of the system's agent pod.
    fn agent(self) -> (&'static str, &'static str) {
        match self {
            System::Sigil => (
                super::NS,
                "app.kubernetes.io/instance=sigil,app.kubernetes.io/component=agent",
            ),
            System::Spire => (SPIRE_NS, "app=spire-agent"),
        }
    }

    /// A pod that runs the go-spiffe client once on this system's Workload API: Sigil's
    /// socket through its CSI driver (socket mode), SPIRE's through a hostPath volume.
    fn pod(self, name: &str) -> Pod {
        let (addr, volume) = match self {
            System::Sigil => (
                "unix:///spiffe/api.sock",
                json!({"name": "id", "csi": {"driver": "csi.sigil.dev", "readOnly": true}}),
            ),
            System::Spire => (
                "unix:///spiffe/spire-agent.sock",
                json!({"name": "id", "hostPath": {"path": SPIRE_SOCKET_DIR, "type": "Directory"}}),
            ),
        };
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.bench_ns()},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "app",
                    "image": "docker.io/sigil-local/go-spiffe-client:dev",
                    "command": ["/go-spiffe-client", "-addr", addr, "-timeout", "180s", "first-svid"],
                    "volumeMounts": [{"name": "id", "mountPath": "/spiffe", "readOnly": true}],
                }],
                "volumes": [volume],
            },
        }))
        .expect("pod")
    }
}

/// Imports SPIRE's images, applies the controller manager's CRDs, SPIRE and a
/// ClusterSPIFFEID for SPIRE's bench namespace, and waits until SPIRE serves.
pub(crate) async fn install(node: &RealNode, client: &kube::Client, report: &mut Report) {
    let t = Instant::now();
    node.script(
        "images-spire",
        &[
            "hack/images.sh",
            "import",
            "spire-server",
            "spire-agent",
            "spire-controller-manager",
        ],
        Duration::from_secs(1200),
    )
    .await
    .expect(
        "SPIRE's images (hack/images.sh import spire-server spire-agent spire-controller-manager)",
    );
    report.row(
        "SPIRE's images built and imported",
        format!("{:.1?}", t.elapsed()),
    );

    let t = Instant::now();
    let crds = sigil_e2e::tools::bin_dir().join("spire-crds");
    let crds = crds.display().to_string();
    node.kubectl(&["apply", "--server-side", "-f", &crds])
        .await
        .expect("spire-controller-manager's CRDs");
    node.kubectl(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/clusterspiffeids.spire.spiffe.io",
    ])
    .await
    .expect("ClusterSPIFFEID CRD established");
    let yaml = include_str!("spire.yaml")
        .replace("@IMAGE_PREFIX@", "docker.io/sigil-local")
        .replace("@IMAGE_TAG@", "dev");
    node.apply(&yaml).await.expect("apply SPIRE");
    workloads_ready(client, SPIRE_NS, ("spire-server", 1), "spire-agent").await;
    report.row(
        "SPIRE applied → server, controller manager and agent Ready",
        format!("{:.1?}", t.elapsed()),
    );

    // The identity of SPIRE's bench pods, as spire-controller-manager's users write it.
    node.apply(&format!(
        r#"apiVersion: spire.spiffe.io/v1alpha1
kind: ClusterSPIFFEID
metadata: {{name: bench}}
spec:
  spiffeIDTemplate: "spiffe://{{{{ .TrustDomain }}}}/ns/{{{{ .PodMeta.Namespace }}}}/sa/{{{{ .PodSpec.ServiceAccountName }}}}"
  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}
"#,
        ns = System::Spire.bench_ns()
    ))
    .await
    .expect("SPIRE's ClusterSPIFFEID");
    for s in BOTH {
        let ns = s.bench_ns();
        node.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
        ))
        .await
        .expect("namespace");
        wait_default_sa(node, ns).await;
    }
}

/// One pod's times: created → container running, running → first SVID, created → SVID.
#[derive(Default)]
struct Times {
    to_running: Vec<Duration>,
    to_svid: Vec<Duration>,
    total: Vec<Duration>,
    /// Bursts only, in ms, signed: container running → its container ID first seen in
    /// the API server (the kubelet's status write, which Sigil's agent waits for with
    /// `podSource: api`), and that moment → the first SVID.
    to_status: Vec<f64>,
    status_to_svid: Vec<f64>,
}

impl Times {
    fn push(&mut self, created: SystemTime, out: &Value) {
        let started = at(out["started_unix_nano"].as_i64().expect("started"));
        let svid = at(out["svid_unix_nano"].as_i64().expect("svid"));
        self.to_running
            .push(started.duration_since(created).unwrap_or_default());
        self.to_svid
            .push(svid.duration_since(started).unwrap_or_default());
        self.total
            .push(svid.duration_since(created).unwrap_or_default());
    }
}

/// p50 / p99 / max of signed milliseconds (an SVID may come before the API server shows
/// the container: SPIRE asks the kubelet).
fn signed(ms: &[f64]) -> String {
    if ms.is_empty() {
        return "no samples".into();
    }
    let mut v = ms.to_vec();
    v.sort_by(f64::total_cmp);
    format!(
        "p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms  (n={})",
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        percentile(&v, 1.0),
        v.len()
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Rows of Sigil's and SPIRE's latencies side by side: p50 and p99, and each system's
/// own p50 / p99 / max line.
fn compare(report: &mut Report, what: &str, [sigil, spire]: [Vec<Duration>; 2]) {
    let mut sorted = [sigil, spire];
    for v in &mut sorted {
        v.sort();
    }
    for (p, label) in [(0.5, "p50"), (0.99, "p99")] {
        report.lower_better(
            &format!("{what}, {label}"),
            ms(percentile(&sorted[0], p)),
            ms(percentile(&sorted[1], p)),
            "ms",
        );
    }
    let [sigil, spire] = sorted;
    report.latencies(&format!("{what} (Sigil)"), sigil);
    report.latencies(&format!("{what} (SPIRE)"), spire);
}

/// The three rows of `compare` for each leg of the pods' times.
fn compare_times(report: &mut Report, what: &str, [sigil, spire]: [&Times; 2]) {
    compare(
        report,
        &format!("{what}: pod created → container running"),
        [sigil.to_running.clone(), spire.to_running.clone()],
    );
    compare(
        report,
        &format!("{what}: container running → first SVID"),
        [sigil.to_svid.clone(), spire.to_svid.clone()],
    );
    compare(
        report,
        &format!("{what}: pod created → first SVID in the container"),
        [sigil.total.clone(), spire.total.clone()],
    );
}

/// Everything of the side-by-side: `n` pods one at a time, alternating; a burst of
/// `burst` pods per system; the memory of both systems' pods; the agent pod deleted.
pub(crate) async fn side_by_side(
    node: &RealNode,
    client: &kube::Client,
    report: &mut Report,
    n: usize,
    burst: usize,
) {
    // One at a time, alternating.
    let mut times = [Times::default(), Times::default()];
    for i in 0..n {
        for (k, s) in BOTH.into_iter().enumerate() {
            let pods: Api<Pod> = Api::namespaced(client.clone(), s.bench_ns());
            let name = format!("one-{i}");
            let created = SystemTime::now();
            create(&pods, &s.pod(&name)).await;
            times[k].push(created, &finished(&pods, &name).await);
        }
    }
    compare_times(
        report,
        &format!("{n} pods one at a time, alternating"),
        times.each_ref(),
    );

    // A burst per system.
    let mut walls = [0.0; 2];
    let mut times = [Times::default(), Times::default()];
    for (k, s) in BOTH.into_iter().enumerate() {
        let (t, wall) = burst_of(client, s, burst).await;
        times[k] = t;
        walls[k] = wall.as_secs_f64();
    }
    compare_times(report, &format!("burst of {burst}"), times.each_ref());
    for (t, s) in times.iter().zip(BOTH) {
        report.row(
            &format!(
                "burst of {burst}, {}: container running → its container ID in the API server (the kubelet's status write)",
                s.name()
            ),
            signed(&t.to_status),
        );
        report.row(
            &format!(
                "burst of {burst}, {}: container ID in the API server → first SVID",
                s.name()
            ),
            signed(&t.status_to_svid),
        );
    }
    report.lower_better(
        &format!("burst of {burst}: first create → last pod's first SVID"),
        walls[0],
        walls[1],
        "s",
    );

    tokio::time::sleep(Duration::from_secs(20)).await; // the kubelet's stats settle
    memory(
        node,
        report,
        super::NS,
        "Sigil, after the side-by-side pods",
    )
    .await;
    memory(node, report, SPIRE_NS, "SPIRE, after the side-by-side pods").await;

    // The agent pod deleted, one system at a time.
    let mut ready = [0.0; 2];
    let mut served = [0.0; 2];
    let mut failed_mounts = [0; 2];
    for (k, s) in BOTH.into_iter().enumerate() {
        let (r, v, f) = agent_deleted(client, s).await;
        ready[k] = r.as_secs_f64();
        served[k] = v.as_secs_f64();
        failed_mounts[k] = f;
    }
    report.lower_better(
        "agent pod deleted → its replacement Ready",
        ready[0],
        ready[1],
        "s",
    );
    report.lower_better(
        "agent pod deleted → first SVID of a pod created then",
        served[0],
        served[1],
        "s",
    );
    report.row(
        "(that pod's failed volume mounts, kubelet events)",
        format!(
            "Sigil {} (CSI driver in the agent's pod) | SPIRE {} (hostPath)",
            failed_mounts[0], failed_mounts[1]
        ),
    );
}

/// `size` pods of one system created at once (20 creates in flight): each pod's times, and
/// the first create → the last SVID.
async fn burst_of(client: &kube::Client, s: System, size: usize) -> (Times, Duration) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), s.bench_ns());
    let statuses = ContainerIdSeen::watch(&pods);
    let first = SystemTime::now();
    let created: Vec<(String, SystemTime)> = futures::stream::iter(0..size)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let name = format!("burst-{i}");
                let at = SystemTime::now();
                create(&pods, &s.pod(&name)).await;
                (name, at)
            }
        })
        .buffer_unordered(20)
        .collect()
        .await;
    // Every pod done: one list at a time, not one get per pod.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let list = pods
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone());
        if let Some(p) = list.iter().find(|p| phase(p).as_deref() == Some("Failed")) {
            let name = p.metadata.name.clone().unwrap_or_default();
            panic!(
                "{} burst pod {name} failed: {:?}",
                s.name(),
                pods.logs(&name, &LogParams::default()).await
            );
        }
        let done = list
            .iter()
            .filter(|p| {
                p.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("burst-"))
                    && phase(p).as_deref() == Some("Succeeded")
            })
            .count();
        if done == size {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} burst: {done} of {size} pods done after 600 s",
            s.name()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut times = Times::default();
    let mut last = first;
    let signed_ms = |from: SystemTime, to: SystemTime| match to.duration_since(from) {
        Ok(d) => ms(d),
        Err(e) => -ms(e.duration()),
    };
    for (name, at_create) in created {
        let out = finished(&pods, &name).await;
        let svid = at(out["svid_unix_nano"].as_i64().expect("svid"));
        let started = at(out["started_unix_nano"].as_i64().expect("started"));
        last = last.max(svid);
        times.push(at_create, &out);
        let seen = statuses.of(&name).unwrap_or_else(|| {
            panic!(
                "{} burst pod {name} succeeded, yet the watch never saw its container ID",
                s.name()
            )
        });
        times.to_status.push(signed_ms(started, seen));
        times.status_to_svid.push(signed_ms(seen, svid));
    }
    statuses.stop();
    (times, last.duration_since(first).unwrap_or_default())
}

/// From a watch on a namespace's Pods in this process: when each pod's first container ID
/// appeared in its status, which is when the kubelet's status write reached the API server.
struct ContainerIdSeen {
    seen: Arc<Mutex<HashMap<String, SystemTime>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ContainerIdSeen {
    fn watch(pods: &Api<Pod>) -> Self {
        use kube::runtime::{WatchStreamExt as _, watcher};
        let seen: Arc<Mutex<HashMap<String, SystemTime>>> = Arc::default();
        let map = Arc::clone(&seen);
        let stream = watcher(pods.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects();
        let task = tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(Ok(pod)) = stream.next().await {
                let now = SystemTime::now();
                let has_id = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.container_id.is_some()));
                if let (true, Some(name)) = (has_id, pod.metadata.name) {
                    map.lock()
                        .expect("container ID times")
                        .entry(name)
                        .or_insert(now);
                }
            }
        });
        Self { seen, task }
    }

    fn of(&self, pod: &str) -> Option<SystemTime> {
        self.seen
            .lock()
            .expect("container ID times")
            .get(pod)
            .copied()
    }

    fn stop(self) {
        self.task.abort();
    }
}

/// The system's agent pod deleted (its default grace period), and at the same moment a
/// pod created: how long until the DaemonSet's replacement is Ready, until that pod has
/// its first SVID, and how many times the kubelet failed to mount its volume meanwhile.
async fn agent_deleted(client: &kube::Client, s: System) -> (Duration, Duration, i32) {
    let (ns, selector) = s.agent();
    let agents: Api<Pod> = Api::namespaced(client.clone(), ns);
    let old = agents
        .list(&ListParams::default().labels(selector))
        .await
        .expect("agent pods")
        .items
        .into_iter()
        .next()
        .and_then(|p| p.metadata.name)
        .unwrap_or_else(|| panic!("no {} agent pod ({selector})", s.name()));
    let pods: Api<Pod> = Api::namespaced(client.clone(), s.bench_ns());
    let t0 = SystemTime::now();
    let start = Instant::now();
    agents
        .delete(&old, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete {ns}/{old}: {e}"));
    create(&pods, &s.pod("after-agent-deleted")).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    let ready = loop {
        let list = agents
            .list(&ListParams::default().labels(selector))
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let replaced = list.iter().any(|p| {
            p.metadata.name.as_deref() != Some(old.as_str())
                && p.metadata.deletion_timestamp.is_none()
                && p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        });
        if replaced {
            break start.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{}: no Ready agent pod 300 s after deleting {old}",
            s.name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = finished(&pods, "after-agent-deleted").await;
    let svid = at(out["svid_unix_nano"].as_i64().expect("svid"));
    // Where a pod's wait goes when its volume's CSI driver is away: the kubelet's failed
    // mounts (retried with a doubling back-off from 0.5 s).
    let events: Api<Event> = Api::namespaced(client.clone(), s.bench_ns());
    let failed_mounts = events
        .list(&ListParams::default().fields("involvedObject.name=after-agent-deleted"))
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|e| e.reason.as_deref() == Some("FailedMount"))
                .map(|e| e.count.unwrap_or(1))
                .sum::<i32>()
        })
        .unwrap_or(-1);
    (
        ready,
        svid.duration_since(t0).unwrap_or_default(),
        failed_mounts,
    )
}

/// Removes what SPIRE's agent left on the node's filesystem (its socket directory, a
/// hostPath), once the node is down: nothing under it may be a mount.
pub(crate) fn remove_host_paths() {
    let dir = Path::new(SPIRE_SOCKET_DIR);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(m).starts_with(dir))
    {
        println!("(left {SPIRE_SOCKET_DIR}: a mount is under it)");
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
    // /run/spire only if this bench's directory was all it held.
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}
