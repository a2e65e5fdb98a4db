//! Pod created → its entry on the agent's SyncEntries stream, end to end: a real
//! kube-apiserver + etcd (the e2e harness), the identity index fed by real watches, the
//! Node API over TLS, and the agent's own client reading the stream.
//!
//! Run: `cargo bench -p sigil-operator --bench node_stream` (or `make bench`).
//! SIGIL_BENCH_BURST (default 1000) and SIGIL_BENCH_SEQUENTIAL (default 200) set the
//! sizes.

use sigil_testkit::node_api as node_api_common;
use sigil_testkit::report;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use node_api_common::{World, create, pod_json};
use report::{Report, env};
use serde_json::json;
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;

type Seen = Arc<Mutex<HashMap<String, Instant>>>;

/// Creates `names` (16 requests in flight, like a busy ReplicaSet controller) and
/// returns (name, sent, acknowledged) per pod.
async fn create_burst(
    pods: &Api<Pod>,
    node: &str,
    names: Vec<String>,
) -> Vec<(String, Instant, Instant)> {
    futures::stream::iter(names)
        .map(|name| {
            let pods = pods.clone();
            let body: Pod =
                serde_json::from_value(pod_json(&name, node, "web", json!({"app": "burst"})))
                    .expect("pod");
            async move {
                let sent = Instant::now();
                pods.create(&PostParams::default(), &body)
                    .await
                    .expect("create pod");
                (name, sent, Instant::now())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

async fn wait_seen(seen: &Seen, names: impl Iterator<Item = String>, within: Duration) -> usize {
    let names: Vec<String> = names.collect();
    let deadline = Instant::now() + within;
    loop {
        let n = {
            let s = seen.lock().expect("lock");
            names.iter().filter(|n| s.contains_key(*n)).count()
        };
        if n == names.len() || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn main() {
    let burst_n = env("SIGIL_BENCH_BURST", 1000);
    let seq_n = env("SIGIL_BENCH_SEQUENTIAL", 200);
    let rt = report::runtime();
    rt.block_on(async move {
        let mut report = Report::new(
            "node_stream",
            &format!("pod → entry on the agent's SyncEntries stream: real apiserver + etcd, index, Node API over TLS ({burst_n}-pod burst, {seq_n} one at a time)"),
        );
        let w = World::start("bench").await;
        let agent = w.attested_agent(&w.node_a).await;
        let csid = format!("{}-bench", w.tag);
        create(
            &Api::<ClusterSPIFFEID>::all(w.client.clone()),
            json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": csid}, "spec": {
                "trustDomain": w.td_object,
                "namespaceSelector": {"matchLabels": {"sigil-test": w.tag}},
                "podSelector": {"matchLabels": {"app": "burst"}},
                "spiffeIDTemplate": "spiffe://{{trustDomain}}/pod/{{pod.name}}",
            }}),
        )
        .await;

        // The agent reads its stream and notes when each pod's entry first arrives.
        let seen: Seen = Arc::default();
        let mut stream = agent.sync_entries(0).await.expect("sync");
        let reader = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let now = Instant::now();
                    let mut seen = seen.lock().expect("lock");
                    for e in msg.upserts {
                        if let Some(name) = e.spiffe_id.rsplit_once("/pod/").map(|(_, n)| n.to_owned()) {
                            seen.entry(name).or_insert(now);
                        }
                    }
                }
            }
        });

        let pods = Api::<Pod>::namespaced(w.client.clone(), &w.ns);
        // Warm up connections and caches.
        let warm = create_burst(&pods, &w.node_a, (0..20).map(|i| format!("warm-{i}")).collect()).await;
        wait_seen(&seen, warm.into_iter().map(|(n, ..)| n), Duration::from_secs(60)).await;

        let started = Instant::now();
        let times = create_burst(&pods, &w.node_a, (0..burst_n).map(|i| format!("b-{i}")).collect()).await;
        let created_in = started.elapsed();
        let got = wait_seen(&seen, times.iter().map(|(n, ..)| n.clone()), Duration::from_secs(120)).await;
        let all_in = started.elapsed();
        let seen_now = seen.lock().expect("lock").clone();
        let (mut from_sent, mut from_ack) = (Vec::new(), Vec::new());
        for (name, sent, acked) in &times {
            if let Some(t) = seen_now.get(name) {
                from_sent.push(t.saturating_duration_since(*sent));
                from_ack.push(t.saturating_duration_since(*acked));
            }
        }
        report.latencies("burst: pod create sent → entry on the agent's stream", from_sent);
        report.latencies("burst: pod create acknowledged → entry on the stream", from_ack);
        report.row(
            "burst: all pods created / all entries streamed",
            format!("{created_in:.2?} / {all_in:.2?}  ({got} of {burst_n} entries; {:.0} pods/s through the apiserver)", burst_n as f64 / created_in.as_secs_f64()),
        );

        let mut sequential = Vec::new();
        for i in 0..seq_n {
            let name = format!("s-{i}");
            let body: Pod = serde_json::from_value(pod_json(&name, &w.node_a, "web", json!({"app": "burst"}))).expect("pod");
            pods.create(&PostParams::default(), &body).await.expect("create pod");
            let acked = Instant::now();
            wait_seen(&seen, std::iter::once(name.clone()), Duration::from_secs(30)).await;
            if let Some(t) = seen.lock().expect("lock").get(&name) {
                sequential.push(t.saturating_duration_since(acked));
            }
        }
        report.latencies("one at a time: pod create acknowledged → entry on the stream", sequential);
        reader.abort();
        report.finish();
    });
}
