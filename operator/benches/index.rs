//! Identity index at 100k pods: load, per-event cost, ClusterSPIFFEID changes, memory,
//! and how fast a new pod's entry reaches a subscribed node view.
//!
//! Run: `cargo bench -p sigil-operator --bench index` (prints a table; no harness).
//! Sizes can be changed with SIGIL_BENCH_PODS / SIGIL_BENCH_NODES.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, PodSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use sigil_identity::TrustDomain;
use sigil_operator::crd::cluster_spiffe_id::{ClusterSPIFFEID, ClusterSpiffeIdSpec};
use sigil_operator::index::{EntryIndex, IndexConfig, TrustDomainInfo, entry_id};

const NAMESPACES: usize = 200;
const APPS: usize = 50;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "p50 {:>9.1?}  p99 {:>9.1?}  max {:>9.1?}  (n={})",
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v.last().copied().unwrap_or_default(),
        v.len()
    )
}

fn row(name: &str, value: String) {
    println!("{name:<58} {value}");
}

fn main() {
    let pods_n = env("SIGIL_BENCH_PODS", 100_000);
    let nodes_n = env("SIGIL_BENCH_NODES", 1_000);
    println!(
        "identity index benchmark: {pods_n} pods, {nodes_n} nodes, {NAMESPACES} namespaces, 4 ClusterSPIFFEIDs, {} EndpointSlices",
        NAMESPACES * APPS
    );
    println!("{}", "-".repeat(100));

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

    // ---- initial load: informers list, then the index renders once ----
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
    row(
        "initial list applied (facts only)",
        format!("{listed:>9.1?}"),
    );
    row(
        "sync: render + publish every entry",
        format!("{rendered:>9.1?}  ({entries} entries)"),
    );
    row("initial load total", format!("{:>9.1?}", listed + rendered));
    if let (Some(a), Some(m), Some(b)) = (rss0, rss_listed, rss1) {
        let mib = |x: u64| x as f64 / (1 << 20) as f64;
        row(
            "memory: RSS growth, facts of every object",
            format!(
                "{:>7.1} MiB  ({:.0} bytes/pod)",
                mib(m.saturating_sub(a)),
                m.saturating_sub(a) as f64 / pods_n as f64
            ),
        );
        row(
            "memory: RSS growth, rendered + published entries",
            format!(
                "{:>7.1} MiB  ({:.0} bytes/entry)",
                mib(b.saturating_sub(m)),
                b.saturating_sub(m) as f64 / entries.max(1) as f64
            ),
        );
    }
    for c in ["default", "gold", "services", "fallback"] {
        let s = ix.status(c).expect("status").stats;
        row(
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
        row(
            "100k pod creations into a synced index (event by event)",
            format!("{d:>9.1?}  ({:.1?}/pod)", d / pods_n as u32),
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
    row("pod event: create (render + publish)", summary(create));
    row(
        "pod event: relabel into a second ClusterSPIFFEID",
        summary(relabel),
    );
    row(
        "pod event: status-only update (nothing to publish)",
        summary(noop),
    );
    row("pod event: delete", summary(delete));

    // ---- ClusterSPIFFEID changes ----
    let gold_pods = ix.status("gold").expect("gold").stats.pods_selected;
    let mut gold = csids[1].clone();
    gold.spec
        .dns_name_templates
        .push(sigil_operator::crd::cluster_spiffe_id::TemplateString(
            "{{pod.name}}.gold".into(),
        ));
    gold.metadata.generation = Some(2);
    let t = Instant::now();
    ix.apply_cluster_spiffe_id(&gold);
    row(
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
    row(
        &format!("ClusterSPIFFEID selector change, {gold_pods} → {after} pods"),
        format!("{:>9.1?}", t.elapsed()),
    );

    let services = ix.status("services").expect("services").stats.pods_selected;
    let mut svc = csids[2].clone();
    svc.spec.hint = "changed".into();
    svc.metadata.generation = Some(2);
    let t = Instant::now();
    ix.apply_cluster_spiffe_id(&svc);
    row(
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
    row(
        "new ClusterSPIFFEID selecting 0 pods",
        format!("{:>9.1?}", t.elapsed()),
    );

    // ---- new pod → entry visible to a subscribed node view, over a 1000-pod burst ----
    let latencies = burst(&ix, nodes_n, pods_n);
    row(
        "new pod → entry seen by subscribed node view (1000 burst)",
        summary(latencies),
    );
    drop(ix);

    // ---- the same through a real apiserver, when one is given ----
    match std::env::var("SIGIL_BENCH_KUBECONFIG") {
        Ok(path) => {
            let (from_request, from_ack) = through_apiserver(&path, 1000);
            row(
                "API pod create sent → entry in node view (1000 burst)",
                summary(from_request),
            );
            row(
                "API pod create acknowledged → entry in node view",
                summary(from_ack),
            );
        }
        Err(_) => println!(
            "(set SIGIL_BENCH_KUBECONFIG to also time pod creation through a real apiserver)"
        ),
    }
}

/// A typed object from JSON.
fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("object")
}

/// Creates `n` pods through a real apiserver (16 requests in flight, as a busy
/// ReplicaSet controller would) while `index::run` watches, and measures until each
/// pod's entry is in its node's view: from sending the create, and from its response.
fn through_apiserver(kubeconfig: &str, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    use futures::StreamExt;
    use kube::api::{Api, PostParams};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
        let options = Default::default();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &options)
            .await
            .expect("config");
        let client = kube::Client::try_from(cfg).expect("client");
        let tag = format!("bench-{}", std::process::id());
        let nodes: Vec<String> = (0..10).map(|i| format!("{tag}-n{i}")).collect();
        let world = World::create(&client, &tag, &nodes).await;

        let ix = EntryIndex::new(IndexConfig::new("bench"));
        let cancel = tokio_util::sync::CancellationToken::new();
        let (_leader, leader_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(sigil_operator::index::run(
            client.clone(),
            ix.clone(),
            leader_rx,
            Default::default(),
            cancel.clone(),
        ));
        ix.synced().await;

        // One subscriber per node notes when each pod's entry (named by its SPIFFE ID
        // path) first shows up.
        let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let mut watchers = Vec::new();
        for node in &nodes {
            let mut view = ix.node(node);
            let seen = seen.clone();
            watchers.push(tokio::spawn(async move {
                let mut revision = view.changes_since(0).revision;
                loop {
                    view.changed().await;
                    let delta = view.changes_since(revision);
                    let now = Instant::now();
                    revision = delta.revision;
                    let mut seen = seen.lock().expect("lock");
                    for e in &delta.upserts {
                        if let Some(name) = e.spiffe_id.path().strip_prefix("/pod/") {
                            seen.entry(name.to_owned()).or_insert(now);
                        }
                    }
                }
            }));
        }

        let pods_api = Api::<Pod>::namespaced(client.clone(), &tag);
        let times: Vec<(String, Instant, Instant)> = futures::stream::iter(0..n)
            .map(|i| {
                let pods_api = pods_api.clone();
                let node = nodes[i % nodes.len()].clone();
                async move {
                    let name = format!("p{i}");
                    let pod: Pod = obj(serde_json::json!({
                        "metadata": {"name": name},
                        "spec": {
                            "nodeName": node,
                            "serviceAccountName": "web",
                            "automountServiceAccountToken": false,
                            "containers": [{"name": "main", "image": "registry.invalid/none"}],
                        },
                    }));
                    let sent = Instant::now();
                    let created = pods_api.create(&PostParams::default(), &pod).await;
                    created.expect("create pod");
                    (name, sent, Instant::now())
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.lock().expect("lock").len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let seen = seen.lock().expect("lock").clone();
        let mut from_request = Vec::new();
        let mut from_ack = Vec::new();
        for (name, sent, acked) in times {
            if let Some(t) = seen.get(&name) {
                from_request.push(t.saturating_duration_since(sent));
                from_ack.push(t.saturating_duration_since(acked));
            }
        }
        for w in watchers {
            w.abort();
        }
        cancel.cancel();
        let _ = task.await;
        world.delete().await;
        (from_request, from_ack)
    })
}

/// The objects the apiserver run needs: CRDs, a labelled namespace with a service
/// account, Nodes, a TrustDomain object and a ClusterSPIFFEID whose SPIFFE ID names the
/// pod.
struct World {
    client: kube::Client,
    tag: String,
    nodes: Vec<String>,
}

impl World {
    async fn create(client: &kube::Client, tag: &str, nodes: &[String]) -> Self {
        use k8s_openapi::api::core::v1::ServiceAccount;
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        use kube::api::{Api, Patch, PatchParams, PostParams};

        let crds = Api::<CustomResourceDefinition>::all(client.clone());
        for file in [
            "trustdomains.sigil.dev.yaml",
            "clusterspiffeids.sigil.dev.yaml",
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../crds")
                .join(file);
            let yaml = std::fs::read_to_string(path).expect("crd file");
            let crd: CustomResourceDefinition = serde_yaml::from_str(&yaml).expect("crd yaml");
            let name = crd.metadata.name.clone().expect("name");
            let params = PatchParams::apply("sigil-bench").force();
            crds.patch(&name, &params, &Patch::Apply(&crd))
                .await
                .expect("install crd");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let post = PostParams::default();
        let ns: Namespace =
            obj(serde_json::json!({"metadata": {"name": tag, "labels": {"bench": tag}}}));
        Api::<Namespace>::all(client.clone())
            .create(&post, &ns)
            .await
            .expect("namespace");
        for n in nodes {
            let node: Node = obj(serde_json::json!({"metadata": {"name": n}}));
            Api::<Node>::all(client.clone())
                .create(&post, &node)
                .await
                .expect("node");
        }
        let sa: ServiceAccount = obj(serde_json::json!({"metadata": {"name": "web"}}));
        Api::<ServiceAccount>::namespaced(client.clone(), tag)
            .create(&post, &sa)
            .await
            .expect("service account");
        let td: kube::api::DynamicObject = obj(serde_json::json!({
            "apiVersion": "sigil.dev/v1alpha1",
            "kind": "TrustDomain",
            "metadata": {"name": tag},
            "spec": {"trustDomain": "bench.example.org"},
        }));
        trust_domains(client)
            .create(&post, &td)
            .await
            .expect("trust domain");
        let csid: ClusterSPIFFEID = obj(serde_json::json!({
            "apiVersion": "sigil.dev/v1alpha1",
            "kind": "ClusterSPIFFEID",
            "metadata": {"name": tag},
            "spec": {
                "trustDomain": tag,
                "namespaceSelector": {"matchLabels": {"bench": tag}},
                "spiffeIDTemplate": "spiffe://{{trustDomain}}/pod/{{pod.name}}",
            },
        }));
        Api::<ClusterSPIFFEID>::all(client.clone())
            .create(&post, &csid)
            .await
            .expect("ClusterSPIFFEID");
        Self {
            client: client.clone(),
            tag: tag.to_owned(),
            nodes: nodes.to_vec(),
        }
    }

    async fn delete(self) {
        use kube::api::{Api, DeleteParams};
        let dp = DeleteParams::default();
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.tag, &dp)
            .await;
        for n in &self.nodes {
            let _ = Api::<Node>::all(self.client.clone()).delete(n, &dp).await;
        }
        let _ = Api::<ClusterSPIFFEID>::all(self.client.clone())
            .delete(&self.tag, &dp)
            .await;
        let _ = trust_domains(&self.client).delete(&self.tag, &dp).await;
    }
}

fn trust_domains(client: &kube::Client) -> kube::Api<kube::api::DynamicObject> {
    let resource =
        kube::api::ApiResource::erase::<sigil_operator::crd::trust_domain::TrustDomain>(&());
    kube::Api::all_with(client.clone(), &resource)
}

/// Subscribes a task to every node, applies 1000 new pods as fast as an informer would,
/// and measures from each `apply_pod` call to the moment the node's subscriber reads
/// the entry.
fn burst(ix: &EntryIndex, nodes_n: usize, base: usize) -> Vec<Duration> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
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
