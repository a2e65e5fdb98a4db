//! Identity index at 100k pods: load, per-event cost, ClusterSPIFFEID changes, memory,
//! and how fast a new pod's entry reaches a subscribed node view.
//!
//! Run: `cargo bench -p sigil-operator --bench index` (or `make bench`): a table, and
//! bench/out/index.json. The same through a real apiserver and the Node API is the
//! `node_stream` bench.
//! Sizes can be changed with SIGIL_BENCH_PODS / SIGIL_BENCH_NODES.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, PodSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use sigil_api::crd::cluster_spiffe_id::{ClusterSPIFFEID, ClusterSpiffeIdSpec};
use sigil_identity::TrustDomain;
use sigil_index::{EntryIndex, IndexConfig, TrustDomainInfo, entry_id};

use report::{Report, env};
use sigil_testkit::report;

// The operator's allocator (operator/src/main.rs), so the memory and times are its.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NAMESPACES: usize = 200;
const APPS: usize = 50;

fn labels(kv: &[(&str, String)]) -> Option<BTreeMap<String, String>> {
    Some(kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
}

fn pod(i: usize, nodes: usize, uid_suffix: &str) -> Pod {
    let ns = format!("ns-{}", i % NAMESPACES);
    let app = format!("app-{}", (i / NAMESPACES) % APPS);
    let tier = if i.is_multiple_of(10) {
        "gold"
    } else {
        "bronze"
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("pod-{i}")),
            namespace: Some(ns),
            uid: Some(format!("00000000-0000-0000-0000-{i:012}{uid_suffix}")),
            labels: labels(&[
                ("app", app),
                ("tier", tier.to_owned()),
                ("pod-template-hash", "5d8f7c9b6".into()),
            ]),
            annotations: labels(&[("kubectl.kubernetes.io/default-container", "main".into())]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(format!("node-{}", i % nodes)),
            service_account_name: Some(format!("sa-{}", (i / NAMESPACES) % APPS)),
            ..Default::default()
        }),
        status: None,
    }
}

fn csid(name: &str, created_s: i64, spec: serde_json::Value) -> ClusterSPIFFEID {
    let spec: ClusterSpiffeIdSpec = serde_json::from_value(spec).expect("spec");
    let mut c = ClusterSPIFFEID::new(name, spec);
    c.metadata.uid = Some(format!("uid-{name}"));
    c.metadata.generation = Some(1);
    c.metadata.creation_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + created_s).expect("time"),
    ));
    c
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn main() {
    let pods_n = env("SIGIL_BENCH_PODS", 100_000);
    let nodes_n = env("SIGIL_BENCH_NODES", 1_000);
    let mut report = Report::new(
        "index",
        &format!(
            "identity index benchmark: {pods_n} pods, {nodes_n} nodes, {NAMESPACES} namespaces, 4 ClusterSPIFFEIDs, {} EndpointSlices",
            NAMESPACES * APPS
        ),
    );

    // Objects are built up front so only the index is timed.
    let pods: Vec<Pod> = (0..pods_n).map(|i| pod(i, nodes_n, "")).collect();
    let namespaces: Vec<Namespace> = (0..NAMESPACES)
        .map(|i| Namespace {
            metadata: ObjectMeta {
                name: Some(format!("ns-{i}")),
                labels: labels(&[("team", format!("team-{}", i % 20))]),
                ..Default::default()
            },
            ..Default::default()
        })
        .collect();
    let nodes: Vec<Node> = (0..nodes_n)
        .map(|i| Node {
            metadata: ObjectMeta {
                name: Some(format!("node-{i}")),
                uid: Some(format!("node-uid-{i}")),
                labels: labels(&[("topology.kubernetes.io/zone", format!("zone-{}", i % 3))]),
                ..Default::default()
            },
            ..Default::default()
        })
        .collect();
    // One Service per (namespace, app), its slice listing that app's pods in the namespace.
    let mut members: HashMap<(usize, usize), Vec<String>> = HashMap::new();
    for i in 0..pods_n {
        members
            .entry((i % NAMESPACES, (i / NAMESPACES) % APPS))
            .or_default()
            .push(format!("pod-{i}"));
    }
    let slices: Vec<EndpointSlice> = members
        .into_iter()
        .map(|((ns, app), pods)| EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("app-{app}-x1")),
                namespace: Some(format!("ns-{ns}")),
                labels: labels(&[("kubernetes.io/service-name", format!("app-{app}"))]),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(
                pods.into_iter()
                    .map(|p| Endpoint {
                        addresses: vec!["10.0.0.1".into()],
                        target_ref: Some(ObjectReference {
                            kind: Some("Pod".into()),
                            name: Some(p),
                            namespace: Some(format!("ns-{ns}")),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        })
        .collect();
    let csids = [
        csid("default", 0, serde_json::json!({})),
        csid(
            "gold",
            1,
            serde_json::json!({
                "podSelector": {"matchLabels": {"tier": "gold"}},
                "spiffeIDTemplate": "spiffe://{{trustDomain}}/gold/{{pod.namespace}}/{{pod.labels['app']}}",
                "dnsNameTemplates": ["{{pod.labels['app']}}.{{pod.namespace}}.svc"],
                "workloadSelectorTemplates": ["k8s:ns:{{pod.namespace}}"],
            }),
        ),
        csid(
            "services",
            2,
            serde_json::json!({
                "namespaceSelector": {"matchLabels": {"team": "team-1"}},
                "spiffeIDTemplate": "spiffe://{{trustDomain}}/svc/{{pod.namespace}}/{{pod.name}}",
                "autoPopulateDNSNames": true,
            }),
        ),
        csid(
            "fallback",
            3,
            serde_json::json!({"fallback": true, "spiffeIDTemplate": "spiffe://{{trustDomain}}/fallback/{{pod.uid}}"}),
        ),
    ];
    let td = TrustDomainInfo {
        object_name: "main".into(),
        trust_domain: TrustDomain::new("example.org").expect("td"),
        x509_ttl: Duration::from_secs(3600),
        jwt_ttl: Duration::from_secs(300),
    };

    // ---- initial load: informers list (the index renders and holds), then it publishes ----
    let rss0 = rss_bytes();
    let ix = EntryIndex::new(IndexConfig::new("bench"));
    let t = Instant::now();
    ix.apply_trust_domain(td.clone());
    namespaces.iter().for_each(|n| ix.apply_namespace(n));
    nodes.iter().for_each(|n| ix.apply_node(n));
    csids.iter().for_each(|c| ix.apply_cluster_spiffe_id(c));
    pods.iter().for_each(|p| ix.apply_pod(p));
    slices.iter().for_each(|s| ix.apply_endpoint_slice(s));
    let listed = t.elapsed();
    let rss_listed = rss_bytes();
    let t2 = Instant::now();
    ix.mark_synced();
    let rendered = t2.elapsed();
    let rss1 = rss_bytes();
    let entries: usize = (0..nodes_n)
        .map(|i| ix.node(&format!("node-{i}")).len())
        .sum();
    report.row(
        "initial list applied (facts; entries rendered and held)",
        format!("{listed:>9.1?}"),
    );
    report.row(
        "sync: publish every held entry",
        format!("{rendered:>9.1?}  ({entries} entries)"),
    );
    report.row("initial load total", format!("{:>9.1?}", listed + rendered));
    if let (Some(a), Some(m), Some(b)) = (rss0, rss_listed, rss1) {
        let mib = |x: u64| x as f64 / (1 << 20) as f64;
        report.row(
            "memory: RSS growth, facts of every object + held entries",
            format!(
                "{:>7.1} MiB  ({:.0} bytes/pod)",
                mib(m.saturating_sub(a)),
                m.saturating_sub(a) as f64 / pods_n as f64
            ),
        );
        report.row(
            "memory: RSS growth at sync (entries published, held ones freed)",
            format!(
                "{:>7.1} MiB  ({:.0} bytes/entry)",
                mib(b.saturating_sub(m)),
                b.saturating_sub(m) as f64 / entries.max(1) as f64
            ),
        );
    }
    for c in ["default", "gold", "services", "fallback"] {
        let s = ix.status(c).expect("status").stats;
        report.row(
            &format!("  status {c}"),
            format!(
                "pods {} failures {} masked {} namespaces {}",
                s.pods_selected,
                s.pod_entry_render_failures,
                s.entries_masked,
                s.namespaces_selected
            ),
        );
    }

    // ---- a synced index absorbing 100k pod creations one event at a time ----
    {
        let ix2 = EntryIndex::new(IndexConfig::new("bench"));
        ix2.apply_trust_domain(td.clone());
        namespaces.iter().for_each(|n| ix2.apply_namespace(n));
        nodes.iter().for_each(|n| ix2.apply_node(n));
        csids.iter().for_each(|c| ix2.apply_cluster_spiffe_id(c));
        ix2.mark_synced();
        let t = Instant::now();
        pods.iter().for_each(|p| ix2.apply_pod(p));
        let d = t.elapsed();
        report.row(
            &format!("{pods_n} pod creations into a synced index (event by event)"),
            format!("{d:>9.1?}  ({:.1?}/pod)", d / pods_n as u32),
        );
    }

    // ---- the floor under those: one std map of the same keys ----
    // How much a single SipHash map keyed by (namespace, name) slows from 100k to 1M
    // keys on this machine. A Pod event does about a dozen such map operations, so the
    // growth of these rows, not of the index's code, is what "flat" can be held to.
    {
        let keys: Vec<(String, String)> = pods
            .iter()
            .map(|p| {
                (
                    p.metadata.namespace.clone().expect("ns"),
                    p.metadata.name.clone().expect("name"),
                )
            })
            .collect();
        let mut map: HashMap<(String, String), u32> = HashMap::new();
        let t = Instant::now();
        for (i, k) in keys.iter().enumerate() {
            map.insert(k.clone(), i as u32);
        }
        let d = t.elapsed();
        report.row(
            &format!("floor: {pods_n} keys inserted into one std HashMap, one by one"),
            format!("{d:>9.1?}  ({:.1?}/key)", d / pods_n as u32),
        );
        // Lookups in an order unrelated to insertion, as events arrive. The probe keys are
        // copied out first and read in order, as an event's key arrives in cache with it.
        let mut i: usize = 0;
        let probes: Vec<(String, String)> = (0..100_000)
            .map(|_| {
                i = (i + 7_919 * 7_907) % keys.len();
                keys[i].clone()
            })
            .collect();
        let t = Instant::now();
        let found = probes.iter().filter(|k| map.contains_key(*k)).count();
        let d = t.elapsed();
        assert_eq!(found, 100_000, "every key looked up is in the map");
        report.row(
            "floor: 100k lookups of existing keys in that map, scattered",
            format!("{d:>9.1?}  ({:.1?}/lookup)", d / 100_000),
        );
    }

    // ---- per-pod-event cost at 100k ----
    let mut create = Vec::new();
    let mut relabel = Vec::new();
    let mut noop = Vec::new();
    let mut delete = Vec::new();
    for i in 0..10_000 {
        let mut p = pod(pods_n + i, nodes_n, "");
        let t = Instant::now();
        ix.apply_pod(&p);
        create.push(t.elapsed());
        p.metadata
            .labels
            .as_mut()
            .expect("labels")
            .insert("tier".into(), "gold".into());
        let t = Instant::now();
        ix.apply_pod(&p);
        relabel.push(t.elapsed());
        p.status = Some(
            serde_json::from_value(serde_json::json!({"phase": "Running", "podIP": "10.2.3.4"}))
                .expect("status"),
        );
        let t = Instant::now();
        ix.apply_pod(&p);
        noop.push(t.elapsed());
        let t = Instant::now();
        ix.delete_pod(
            p.metadata.namespace.as_deref().expect("ns"),
            p.metadata.name.as_deref().expect("name"),
        );
        delete.push(t.elapsed());
    }
    report.latencies("pod event: create (render + publish)", create);
    report.latencies("pod event: relabel into a second ClusterSPIFFEID", relabel);
    report.latencies("pod event: status-only update (nothing to publish)", noop);
    report.latencies("pod event: delete", delete);

    // ---- ClusterSPIFFEID changes ----
    let gold_pods = ix.status("gold").expect("gold").stats.pods_selected;
    let mut gold = csids[1].clone();
    gold.spec
        .dns_name_templates
        .push(sigil_api::crd::cluster_spiffe_id::TemplateString(
            "{{pod.name}}.gold".into(),
        ));
    gold.metadata.generation = Some(2);
    let t = Instant::now();
    ix.apply_cluster_spiffe_id(&gold);
    report.row(
        &format!("ClusterSPIFFEID template change, re-renders {gold_pods} pods"),
        format!("{:>9.1?}", t.elapsed()),
    );

    let mut narrowed = gold.clone();
    narrowed.spec.namespace_selector = Some(
        serde_json::from_value(serde_json::json!({"matchLabels": {"team": "team-2"}}))
            .expect("sel"),
    );
    narrowed.metadata.generation = Some(3);
    let t = Instant::now();
    ix.apply_cluster_spiffe_id(&narrowed);
    let after = ix.status("gold").expect("gold").stats.pods_selected;
    report.row(
        &format!("ClusterSPIFFEID selector change, {gold_pods} → {after} pods"),
        format!("{:>9.1?}", t.elapsed()),
    );

    let services = ix.status("services").expect("services").stats.pods_selected;
    let mut svc = csids[2].clone();
    svc.spec.hint = "changed".into();
    svc.metadata.generation = Some(2);
    let t = Instant::now();
    ix.apply_cluster_spiffe_id(&svc);
    report.row(
        &format!("ClusterSPIFFEID change selecting {services} pods (one team)"),
        format!("{:>9.1?}", t.elapsed()),
    );

    let t = Instant::now();
    ix.apply_cluster_spiffe_id(&csid(
        "one-namespace",
        10,
        serde_json::json!({
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "nope"}},
        }),
    ));
    report.row(
        "new ClusterSPIFFEID selecting 0 pods",
        format!("{:>9.1?}", t.elapsed()),
    );

    // ---- new pod → entry visible to a subscribed node view, over a 1000-pod burst ----
    let latencies = burst(&ix, nodes_n, pods_n);
    report.latencies(
        "new pod → entry seen by subscribed node view (1000 burst)",
        latencies,
    );

    // ---- a ClusterSPIFFEID change reaching every subscribed node stream ----
    let mut default = csids[0].clone();
    default.spec.hint = "fanout".into();
    default.metadata.generation = Some(2);
    let (applied, last_seen, changed, nodes_touched) = fanout(&ix, nodes_n, &default, "fanout");
    report.row(
        &format!(
            "ClusterSPIFFEID change, {changed} entries on {nodes_touched} node streams: applied"
        ),
        format!("{applied:>9.1?}"),
    );
    report.row(
        &format!("  ... last of the {nodes_n} subscribed node streams has read every change"),
        format!("{last_seen:>9.1?}"),
    );
    if let Some(rss) = rss_bytes() {
        report.row(
            &format!("memory: process RSS at the end ({pods_n} pods indexed, node logs)"),
            format!("{:>7.1} MiB", rss as f64 / (1 << 20) as f64),
        );
    }
    drop(ix);
    report.finish();
}

/// Subscribes a task to every node, applies `changed` (a ClusterSPIFFEID whose hint is
/// set to `hint`), and measures until the subscribers have read every entry that now
/// carries that hint. Returns (apply time, time until the last stream read its last
/// changed entry, entries changed, nodes touched).
fn fanout(
    ix: &EntryIndex,
    nodes_n: usize,
    changed: &ClusterSPIFFEID,
    hint: &str,
) -> (Duration, Duration, usize, usize) {
    let rt = report::runtime();
    let seen: Arc<Mutex<(usize, Option<Instant>)>> = Arc::default();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for n in 0..nodes_n {
            let mut view = ix.node(&format!("node-{n}"));
            let seen = seen.clone();
            let hint = hint.to_owned();
            let mut revision = view.changes_since(0).revision;
            tasks.push(tokio::spawn(async move {
                loop {
                    view.changed().await;
                    let delta = view.changes_since(revision);
                    revision = delta.revision;
                    let hits = delta.upserts.iter().filter(|e| e.hint == hint).count();
                    if hits > 0 {
                        let mut seen = seen.lock().expect("lock");
                        seen.0 += hits;
                        seen.1 = Some(Instant::now());
                    }
                }
            }));
        }
        let start = Instant::now();
        let applied = {
            let ix = ix.clone();
            let changed = changed.clone();
            tokio::task::spawn_blocking(move || {
                ix.apply_cluster_spiffe_id(&changed);
                start.elapsed()
            })
            .await
            .expect("apply")
        };
        // apply_cluster_spiffe_id publishes before it returns: what the node views hold
        // now is what the subscribers must read.
        let mut expected = 0;
        let mut nodes_touched = 0;
        for n in 0..nodes_n {
            let all = ix.node(&format!("node-{n}")).changes_since(0);
            let hits = all.upserts.iter().filter(|e| e.hint == hint).count();
            expected += hits;
            nodes_touched += usize::from(hits > 0);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (count, last) = *seen.lock().expect("lock");
            if count >= expected {
                for t in tasks {
                    t.abort();
                }
                let last = last.map_or(Duration::ZERO, |l| l - start);
                return (applied, last, expected, nodes_touched);
            }
            assert!(
                Instant::now() < deadline,
                "only {count} of {expected} changed entries reached the node streams in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

/// Subscribes a task to every node, applies 1000 new pods as fast as an informer would,
/// and measures from each `apply_pod` call to the moment the node's subscriber reads
/// the entry.
fn burst(ix: &EntryIndex, nodes_n: usize, base: usize) -> Vec<Duration> {
    let rt = report::runtime();
    let started: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let pods: Vec<Pod> = (0..1000)
        .map(|i| pod(base + 50_000 + i, nodes_n, "b"))
        .collect();
    let total = pods.len();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for n in 0..nodes_n {
            let mut view = ix.node(&format!("node-{n}"));
            let (started, seen) = (started.clone(), seen.clone());
            let mut revision = view.changes_since(0).revision;
            tasks.push(tokio::spawn(async move {
                loop {
                    view.changed().await;
                    let delta = view.changes_since(revision);
                    let now = Instant::now();
                    revision = delta.revision;
                    let started = started.lock().expect("lock");
                    let mut seen = seen.lock().expect("lock");
                    for e in &delta.upserts {
                        if let Some(t) = started.get(&e.id) {
                            seen.push(now - *t);
                        }
                    }
                    if seen.len() >= total {
                        return;
                    }
                }
            }));
        }
        let feeder = {
            let ix = ix.clone();
            let started = started.clone();
            tokio::task::spawn_blocking(move || {
                for p in &pods {
                    let uid = p.metadata.uid.clone().expect("uid");
                    let id = entry_id("default", &uid);
                    started.lock().expect("lock").insert(id, Instant::now());
                    ix.apply_pod(p);
                }
            })
        };
        feeder.await.expect("feeder");
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.lock().expect("lock").len() < total && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for t in tasks {
            t.abort();
        }
    });
    seen.lock().expect("lock").clone()
}
