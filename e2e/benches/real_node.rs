//! Sigil on the real node (hack/cluster.sh): the chart installed with helm, images built
//! from this bench build's binaries (the release profile), pods created through the API
//! server one at a time, as a user creates them.
//!
//! - socket mode: pod created (the create call) → its container running (the first
//!   instruction of the go-spiffe client in it) → the first X509-SVID in the container
//!   (go-spiffe's FetchX509Context, retried every 20 ms until it answers);
//! - files mode: the same for a pod whose files-mode volume gates its container's start
//!   (the kubelet starts the container once sigil-csi published the volume): created →
//!   running → the files read and checked (key matches certificate, chains to the bundle);
//! - pod certificates: the same for a pod with a `podCertificate` projected volume of
//!   signer `sigil.dev/default` (the kubelet starts the container once the certificate is
//!   issued): created → running → the credential bundle read and verified by go-spiffe
//!   against the projected ClusterTrustBundle; and, from a watch on the namespace's
//!   PodCertificateRequests in this process, pod created → request issued, and request
//!   seen → issued (Sigil's share: the API server's timestamps have whole seconds, so both
//!   ends are this process's clock);
//! - memory of each Sigil pod and container as the kubelet reports it (`/metrics/resource`
//!   through the API server's node proxy: working set), idle after the install and after
//!   the pods.
//!
//! - then SPIRE on the same node beside Sigil, the same pods measured on both (spire.rs).
//!
//! Run: `make bench` (or `hack/bench.sh real_node`). SIGIL_BENCH_NODE_PODS (default 50)
//! pods per mode; SIGIL_BENCH_NODE_VS_PODS (default 50) pods per system one at a time and
//! SIGIL_BENCH_NODE_BURST (default 200) per system at once beside SPIRE, which
//! SIGIL_BENCH_NODE_SPIRE=0 leaves out. SIGIL_BENCH_NODE_HELM_SET takes chart values
//! (`key=value`, space-separated) that the install sets over the defaults. Needs root, and
//! no other cluster on the machine (docs/real-node.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "real_node/spire.rs"]
mod spire;

use sigil_testkit::report;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::certificates::v1::PodCertificateRequest;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams, PostParams};
use report::Report;
use serde_json::{Value, json};
use sigil_e2e::node::RealNode;

const NS: &str = "sigil";

fn main() {
    let n = report::env("SIGIL_BENCH_NODE_PODS", 50);
    let rt = report::runtime();
    rt.block_on(async move {
        let mut report = Report::new(
            "real_node",
            &format!("Sigil on the real node: kubelet 1.37 + containerd 2.4, helm install with the chart's defaults, {n} pods per mode created one at a time"),
        );
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_sigil-demo")).parent().expect("bin dir").to_owned();
        let t = Instant::now();
        let node = sigil_e2e::node::shared(&bin_dir).await;
        report.row("node up, images built and imported", format!("{:.1?}", t.elapsed()));
        let client = node.client().await.expect("client");

        let t = Instant::now();
        let mut args: Vec<String> = ["install", "sigil", "charts/sigil", "-n", NS, "--create-namespace"].map(String::from).to_vec();
        args.extend(node.helm_image_args().await.expect("helm args"));
        // Chart values to compare against the defaults, e.g. `agent.podSource=kubelet`.
        for set in std::env::var("SIGIL_BENCH_NODE_HELM_SET").unwrap_or_default().split_whitespace() {
            args.extend(["--set".to_owned(), set.to_owned()]);
            report.row("chart value set for this run", set.to_owned());
        }
        node.helm(&args.iter().map(String::as_str).collect::<Vec<_>>()).await.expect("helm install");
        workloads_ready(&client, NS, ("sigil-operator", 2), "sigil-agent").await;
        report.row("helm install → every Sigil pod Ready", format!("{:.1?}", t.elapsed()));
        tokio::time::sleep(Duration::from_secs(20)).await; // the kubelet's stats settle
        memory(node, &mut report, NS, "idle after the install").await;

        for mode in ["socket", "files", "podcert"] {
            let ns = format!("bench-{mode}");
            node.apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n")).await.expect("namespace");
            wait_default_sa(node, &ns).await;
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let requests = PcrTimes::watch(&client, &ns);
            let (mut to_running, mut to_svid, mut total) = (Vec::new(), Vec::new(), Vec::new());
            let (mut to_issued, mut sigil_share) = (Vec::new(), Vec::new());
            for i in 0..n {
                let name = format!("p-{i}");
                let pod = pod_spec(&ns, &name, mode);
                let created = SystemTime::now();
                create(&pods, &serde_json::from_value(pod).expect("pod")).await;
                let out = finished(&pods, &name).await;
                let started = at(out["started_unix_nano"].as_i64().expect("started"));
                let svid = at(out["svid_unix_nano"].as_i64().expect("svid"));
                if mode == "podcert" {
                    let (seen, issued) = requests.of(&name).await;
                    to_issued.push(issued.duration_since(created).unwrap_or_default());
                    sigil_share.push(issued.duration_since(seen).unwrap_or_default());
                }
                to_running.push(started.duration_since(created).unwrap_or_default());
                to_svid.push(svid.duration_since(started).unwrap_or_default());
                total.push(svid.duration_since(created).unwrap_or_default());
            }
            let what = match mode {
                "socket" => "socket mode (Workload API)",
                "files" => "files mode (the volume gates the start)",
                _ => "pod certificate (the kubelet gates the start)",
            };
            if mode == "podcert" {
                report.latencies(&format!("{what}: pod created → PodCertificateRequest issued"), to_issued);
                report.latencies(&format!("{what}: PodCertificateRequest seen → issued (Sigil's share)"), sigil_share);
            }
            report.latencies(&format!("{what}: pod created → container running"), to_running);
            report.latencies(&format!("{what}: container running → first SVID"), to_svid);
            report.latencies(&format!("{what}: pod created → first SVID in the container"), total);
        }
        memory(node, &mut report, NS, &format!("after {n} socket-mode, {n} files-mode and {n} pod-certificate pods")).await;
        if report::env("SIGIL_BENCH_NODE_SPIRE", 1) == 1 {
            spire::install(node, &client, &mut report).await;
            tokio::time::sleep(Duration::from_secs(20)).await; // the kubelet's stats settle
            memory(node, &mut report, spire::SPIRE_NS, "SPIRE idle after its install").await;
            let one = report::env("SIGIL_BENCH_NODE_VS_PODS", 50);
            let burst = report::env("SIGIL_BENCH_NODE_BURST", 200);
            spire::side_by_side(node, &client, &mut report, one, burst).await;
        }
        report.finish();
        let t = Instant::now();
        node.down().await.expect("cluster down");
        spire::remove_host_paths();
        println!("(node down in {:.1?})", t.elapsed());
    });
}

fn at(unix_nano: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(unix_nano).unwrap_or(0))
}

/// A pod that runs the go-spiffe client once: first-svid on the Workload API socket, or
/// files-first on a files-mode volume.
fn pod_spec(ns: &str, name: &str, mode: &str) -> Value {
    let image = "docker.io/sigil-local/go-spiffe-client:dev";
    let (command, mount, volume) = if mode == "socket" {
        (
            json!([
                "/go-spiffe-client",
                "-addr",
                "unix:///spiffe/api.sock",
                "-timeout",
                "120s",
                "first-svid"
            ]),
            json!({"name": "id", "mountPath": "/spiffe", "readOnly": true}),
            json!({"name": "id", "csi": {"driver": "csi.sigil.dev", "readOnly": true}}),
        )
    } else if mode == "podcert" {
        (
            json!([
                "/go-spiffe-client",
                "pod-cert",
                "-svid-file",
                "/var/run/spiffe/credential-bundle.private-key.pem",
                "-bundle-file",
                "/var/run/spiffe/example.org.spiffe-trust-bundle.pem",
                "-trust-domain",
                "example.org"
            ]),
            json!({"name": "id", "mountPath": "/var/run/spiffe", "readOnly": true}),
            json!({"name": "id", "projected": {"sources": [
                {"podCertificate": {"signerName": "sigil.dev/default", "keyType": "ECDSAP256",
                                    "credentialBundlePath": "credential-bundle.private-key.pem"}},
                {"clusterTrustBundle": {"signerName": "sigil.dev/default",
                                        "labelSelector": {"matchLabels": {"sigil.dev/bundle": "own"}},
                                        "path": "example.org.spiffe-trust-bundle.pem"}},
            ]}}),
        )
    } else {
        (
            json!([
                "/go-spiffe-client",
                "-timeout",
                "120s",
                "files-first",
                "-dir",
                "/svid"
            ]),
            json!({"name": "id", "mountPath": "/svid", "readOnly": true}),
            json!({"name": "id", "csi": {"driver": "csi.sigil.dev", "readOnly": true, "volumeAttributes": {"mode": "files"}}}),
        )
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": image, "command": command, "volumeMounts": [mount]}],
            "volumes": [volume],
        },
    })
}

/// When this process saw each pod's PodCertificateRequest first, and saw it issued.
#[derive(Clone, Default)]
struct PcrTimes(Arc<Mutex<HashMap<String, SeenIssued>>>);

/// When a request was first seen, and when it was seen issued.
type SeenIssued = (SystemTime, Option<SystemTime>);

impl PcrTimes {
    fn watch(client: &kube::Client, ns: &str) -> Self {
        use futures::StreamExt as _;
        use kube::runtime::{WatchStreamExt as _, watcher};
        let times = Self::default();
        let api: Api<PodCertificateRequest> = Api::namespaced(client.clone(), ns);
        let t = times.clone();
        tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            futures::pin_mut!(stream);
            while let Some(Ok(pcr)) = stream.next().await {
                let now = SystemTime::now();
                let issued = pcr
                    .status
                    .as_ref()
                    .and_then(|s| s.certificate_chain.as_ref())
                    .is_some();
                let mut map = t.0.lock().unwrap();
                let e = map.entry(pcr.spec.pod_name.clone()).or_insert((now, None));
                if issued && e.1.is_none() {
                    e.1 = Some(now);
                }
            }
        });
        times
    }

    async fn of(&self, pod: &str) -> (SystemTime, SystemTime) {
        for _ in 0..100 {
            if let Some((seen, Some(issued))) = self.0.lock().unwrap().get(pod).copied() {
                return (seen, issued);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no issued PodCertificateRequest seen for pod {pod}");
    }
}

/// Waits for the pod to succeed and returns the JSON its client printed.
async fn finished(pods: &Api<Pod>, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        // A transport error (a kept-alive connection closed under a request) is retried.
        let status = pods.get(name).await.ok().and_then(|p| p.status);
        match status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Succeeded") => break,
            Some("Failed") => panic!(
                "pod {name} failed: {:?}",
                pods.logs(name, &LogParams::default()).await
            ),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "pod {name} not done after 180 s: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut log = pods.logs(name, &LogParams::default()).await;
    for _ in 0..5 {
        if log.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        log = pods.logs(name, &LogParams::default()).await;
    }
    let log = log.expect("logs");
    serde_json::from_str(log.trim()).unwrap_or_else(|e| panic!("pod {name} printed {log:?}: {e}"))
}

async fn wait_default_sa(node: &RealNode, ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while node
        .kubectl(&["get", "serviceaccount", "-n", ns, "default"])
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "no default ServiceAccount in {ns}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates a pod, retrying what the transport lost.
async fn create(pods: &Api<Pod>, pod: &Pod) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut tries = 0;
    loop {
        match pods.create(&PostParams::default(), pod).await {
            Ok(_) => return,
            // The first try went through but its answer was lost.
            Err(kube::Error::Api(e)) if e.code == 409 && tries > 0 => return,
            Err(e) if tries < 5 && !matches!(e, kube::Error::Api(_)) => tries += 1,
            Err(e) => panic!("create pod {name}: {e}"),
        }
    }
}

/// Waits until the Deployment `deployment.0` of `ns` has `deployment.1` Ready replicas and
/// the DaemonSet `daemonset` its one pod Ready (one node).
async fn workloads_ready(
    client: &kube::Client,
    ns: &str,
    (deployment, replicas): (&str, i32),
    daemonset: &str,
) {
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let dss: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let d = deploys.get(deployment).await.ok().and_then(|d| d.status);
        let a = dss.get(daemonset).await.ok().and_then(|d| d.status);
        if d.and_then(|s| s.ready_replicas) == Some(replicas)
            && a.is_some_and(|s| s.number_ready == 1)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ns}/{deployment} and {ns}/{daemonset} not Ready after 300 s: kubectl -n {ns} get pods"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Working set of each pod and container of namespace `ns` (Sigil's or SPIRE's), from the
/// kubelet's resource metrics (`/metrics/resource`: the CRI's memory stats;
/// `/stats/summary` fails on this machine, where cAdvisor finds no filesystem info for the
/// root device).
async fn memory(node: &RealNode, report: &mut Report, ns: &str, when: &str) {
    let raw = node
        .kubectl(&[
            "get",
            "--raw",
            &format!(
                "/api/v1/nodes/{}/proxy/metrics/resource",
                sigil_e2e::node::NODE_NAME
            ),
        ])
        .await
        .expect("metrics/resource");
    // name{labels} value [timestamp]
    let samples = |metric: &str| -> Vec<(std::collections::BTreeMap<String, String>, f64)> {
        raw.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(metric)?.strip_prefix('{')?;
                let (labels, value) = rest.split_once("} ")?;
                let labels: std::collections::BTreeMap<String, String> = labels
                    .split("\",")
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once("=\"")?;
                        Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
                    })
                    .collect();
                Some((labels, value.split(' ').next()?.parse().ok()?))
            })
            .filter(|(labels, _)| labels.get("namespace").map(String::as_str) == Some(ns))
            .collect()
    };
    let mib = |b: f64| b / 1048576.0;
    let containers = samples("container_memory_working_set_bytes");
    let mut pods = samples("pod_memory_working_set_bytes");
    pods.sort_by(|a, b| a.0.get("pod").cmp(&b.0.get("pod")));
    for (labels, bytes) in pods {
        let pod = labels.get("pod").cloned().unwrap_or_default();
        let parts: Vec<String> = containers
            .iter()
            .filter(|(l, _)| l.get("pod") == Some(&pod))
            .map(|(l, b)| {
                format!(
                    "{} {:.1} MiB",
                    l.get("container").map(String::as_str).unwrap_or("?"),
                    mib(*b)
                )
            })
            .collect();
        report.row(
            &format!("memory ({when}): pod {pod}"),
            format!("{:.1} MiB working set ({})", mib(bytes), parts.join(", ")),
        );
    }
    // Beside it, the resident set of each Sigil process, read from /proc (hostPID view).
    for (labels, _) in samples("pod_memory_working_set_bytes") {
        let pod = labels.get("pod").cloned().unwrap_or_default();
        let uid = node
            .kubectl(&[
                "get",
                "pod",
                "-n",
                ns,
                &pod,
                "-o",
                "jsonpath={.metadata.uid}",
            ])
            .await
            .unwrap_or_default();
        let rss: Vec<String> = pod_processes(&uid)
            .into_iter()
            .map(|(comm, kib)| format!("{comm} {:.1} MiB", kib as f64 / 1024.0))
            .collect();
        report.row(
            &format!("RSS from /proc ({when}): pod {pod}"),
            rss.join(", "),
        );
    }
}

/// The processes of a pod (its cgroup path holds `pod<uid>`): name and VmRSS in KiB.
fn pod_processes(uid: &str) -> Vec<(String, u64)> {
    let needle = format!("pod{uid}/");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if uid.is_empty() || !cgroup.contains(&needle) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        out.push((comm, sigil_e2e::process::rss_kib(pid)));
    }
    out.sort();
    out
}
