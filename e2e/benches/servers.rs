//! The servers side by side, each in its own process, pinned to one core: the release
//! `sigil-operator` binary (CA, identity index, Node API) against the real apiserver, and
//! `spire-server` (sqlite, disk key manager, join-token attestation; the version
//! `make test-tools` builds).
//!
//! Pinning: this process (the load generators, and the apiserver and etcd it starts) runs
//! on the last CPU, each server on CPU 0, with `taskset`. A server's figures are therefore
//! per core. With one CPU nothing is pinned, and the report says so.
//!
//! Rows (metric | Sigil | SPIRE | ratio):
//! - idle RSS and CPU over 10 s of each server, with no agents and no entries;
//! - the same with `SIGIL_BENCH_SERVERS_ENTRIES` (10k) identities declared, spread
//!   round-robin over `SIGIL_BENCH_SERVERS_NODES` (1000) Nodes as a cluster spreads its
//!   Pods. Sigil: Pods on those Nodes, selected by a ClusterSPIFFEID (the operator caches
//!   the Pods and renders one entry each). SPIRE: entries parented to one ID per Node (as
//!   spire-controller-manager parents them to each node's agent), created with
//!   `spire-server entry create -data`, 1000 per call; each call gets 5 minutes and SPIRE's whole side `SIGIL_BENCH_SERVERS_SPIRE_BUDGET_SECS`
//!   (1800), and where it stops short the report says how far it got. With
//!   `SIGIL_BENCH_SERVERS_SPIRE_EVENTS_CACHE=1` SPIRE runs with its
//!   `experimental { events_based_cache = true }` (not its default; the report says so);
//!   Sigil's side is bounded by the apiserver writing the Pods (on the load CPU), so the
//!   row also says how long after the last write the operator held the last entry;
//! - X509-SVIDs signed per second through the node-facing API, as an attested agent calls
//!   it, 100 CSRs per call from 2 concurrent callers. Sigil: PSAT attestation, then
//!   `SignX509Svids`. SPIRE: join-token attestation, then `BatchNewX509SVID` over mTLS
//!   (`spire-mint -api node`). Both servers' per-agent limits are lifted for this row
//!   (SPIRE: `ratelimit { signing = false }`, default 500 CSRs/s per agent IP; Sigil:
//!   `--node-rate`/`--node-burst`, default 20 requests/s of up to 100 CSRs per node), since
//!   they cap one agent and this row measures the server. The server's CPU is read over
//!   the load window only;
//! - while Sigil's signing load and restart are measured, SPIRE's server is stopped
//!   (SIGSTOP, then SIGCONT): it shares the core, and its periodic entry-cache reload
//!   would be charged to Sigil;
//! - each server killed and started again with the identities it holds, until it serves
//!   them (Sigil: /ready, then every entry rendered from the re-listed Pods; SPIRE: its
//!   health check, which passes once its entry cache is built from sqlite), and its RSS
//!   then; beside it, the time to list and decode every Pod as the operator's informer
//!   does (protobuf), which is the floor of Sigil's restart, and as kube-runtime's
//!   watcher does (JSON, 500 a page), and the operator's CPU from its start to serving
//!   every identity. With `SIGIL_BENCH_SERVERS_OPERATOR_B` set to another sigil-operator
//!   build, that build is restarted before each of `SIGIL_OPERATOR_BIN`'s, and its times
//!   and CPU are printed beside them: two builds compared in one run, on the same load;
//! - unless `SIGIL_BENCH_SERVERS_FAILOVER=0`: a second replica started beside the leader
//!   until it holds every identity; then `SIGIL_BENCH_SERVERS_STANDBY_PODS` (10k) more
//!   Pods created, and each replica's CPU per Pod event (a standby renders every Pod as
//!   the leader does, and writes nothing); then the leader SIGKILLed under an attested
//!   agent, until the standby serves it.
//!
//! Run: `hack/bench.sh servers` (part of `make bench`).

use sigil_testkit::node_api as node_api_common;
use sigil_testkit::report;
mod sign_load;
use sigil_testkit::spire as spire_common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, ServiceAccount};
use kube::Client;
use kube::api::Api;
use node_api_common::{create, pod_json};
use report::{Report, env};
use serde_json::{Value, json};
use sigil_e2e::http::{get_ok, metric};
use sigil_e2e::process::{Supervised, cpu_time, on_cpu, rss_kib};
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_operator::crd::trust_domain::TrustDomain;
use spire_common::{Spire, SpireProfile, free_port};
use tokio::io::AsyncBufReadExt;

/// The median of `xs` (not empty).
fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    report::percentile(&xs, 0.5)
}

/// `xs` as seconds, in the order taken: "1.52, 1.60".
fn seconds(xs: &[f64]) -> String {
    xs.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The operator's namespace (its Lease, CA Secret, agent ServiceAccount).
const NS: &str = "sigil-bench";
/// Where the workload Pods live.
const WORKLOADS: &str = "bench-workloads";
const TD: &str = "sigil.bench";
const CLUSTER: &str = "bench";
/// The Node whose agent the signing load attests as, and how many entries it has.
const LOAD_NODE: &str = "load-node";
const LOAD_PODS: usize = 100;
/// The Nodes holding the bulk of the Pods (no agent runs for them): `bulk-node-<k>`, and
/// on SPIRE's side the parent IDs `spiffe://<td>/bulk-node-<k>`.
fn bulk_node(k: usize) -> String {
    format!("bulk-node-{k}")
}

/// Pins every thread of `pid` to `cpu`; threads it starts later inherit that.
fn pin(pid: u32, cpu: usize) {
    let ok = std::process::Command::new("taskset")
        .args(["-a", "-c", "-p", &cpu.to_string(), &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("taskset");
    assert!(ok.success(), "taskset -p {cpu} {pid} failed");
}

/// (RSS MiB, CPU ms over `window`) of each pid, read over the same window.
async fn footprint(pids: [u32; 2], window: Duration) -> [(f64, f64); 2] {
    let before = pids.map(cpu_time);
    tokio::time::sleep(window).await;
    let mut out = [(0.0, 0.0); 2];
    for (i, pid) in pids.into_iter().enumerate() {
        out[i] = (
            rss_kib(pid) as f64 / 1024.0,
            (cpu_time(pid) - before[i]).as_secs_f64() * 1e3,
        );
    }
    out
}

/// SPIRE's server stopped (SIGSTOP) while Sigil's operator is measured on the core they
/// share, and continued (SIGCONT) when this is dropped. With many entries SPIRE's server
/// reloads its entry cache every 5 s (at 100k, a quarter of the core, and 38% of it during
/// one Sigil restart under `perf record -C 0`), which would otherwise be charged to Sigil's
/// signing and restart rows. Sigil's operator is idle while SPIRE is measured, so this
/// evens the two.
struct Paused(u32);

impl Paused {
    fn new(pid: u32) -> Self {
        signal(pid, "STOP");
        Self(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

fn signal(pid: u32, name: &str) {
    let sent = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(sent, "could not send SIG{name} to spire-server (pid {pid})");
}

/// CPU time is read from /proc in 10 ms ticks.
const TICK_MS: f64 = 10.0;

/// A CPU-time row: who is ahead only when both sides used more than one tick.
fn cpu_row(report: &mut Report, what: &str, sigil_ms: f64, spire_ms: f64) {
    let advantage = match (sigil_ms > TICK_MS, spire_ms > TICK_MS) {
        (true, true) => Ok(spire_ms / sigil_ms),
        (false, true) => Err("Sigil within one 10 ms tick"),
        (true, false) => Err("SPIRE within one 10 ms tick"),
        (false, false) => Err("both within one 10 ms tick"),
    };
    report.versus(
        what,
        [sigil_ms, spire_ms],
        [
            format!("{sigil_ms:>9.1} ms "),
            format!("{spire_ms:>9.1} ms "),
        ],
        "ms",
        advantage,
    );
}

/// The cluster objects: namespaces, agent ServiceAccount, Nodes, TrustDomain,
/// ClusterSPIFFEID.
async fn cluster_objects(client: &Client) {
    let namespaces = Api::<Namespace>::all(client.clone());
    for ns in [NS, WORKLOADS] {
        create(
            &namespaces,
            json!({"metadata": {"name": ns, "labels": {"sigil-bench": "true"}}}),
        )
        .await;
    }
    for sa in [(NS, "sigil-agent"), (WORKLOADS, "web")] {
        create(
            &Api::<ServiceAccount>::namespaced(client.clone(), sa.0),
            json!({"metadata": {"name": sa.1}}),
        )
        .await;
    }
    create(
        &Api::<Node>::all(client.clone()),
        json!({"metadata": {"name": LOAD_NODE}}),
    )
    .await;
    create(&Api::<TrustDomain>::all(client.clone()), json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "TrustDomain", "metadata": {"name": "bench"}, "spec": {
        "trustDomain": TD,
        "bundle": {"namespaceSelector": {"matchLabels": {"sigil-bench": "true"}}},
    }}))
    .await;
    create(&Api::<ClusterSPIFFEID>::all(client.clone()), json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": "bench"}, "spec": {
        "trustDomain": "bench",
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": WORKLOADS}},
        "podSelector": {"matchLabels": {"app": "bench"}},
        "ttl": "1h",
    }}))
    .await;
}

/// The release operator, on `cpu` if given, serving the Node API on loopback; returns it
/// with its health and Node API ports once it is ready.
async fn start_operator(
    bin: &str,
    kubeconfig: &Path,
    dir: &Path,
    cpu: Option<usize>,
) -> (Supervised, u16, u16) {
    start_replica(bin, kubeconfig, dir, cpu, "sigil-operator-0").await
}

/// As [`start_operator`], as the replica `pod_name` (its identity in the Lease).
async fn start_replica(
    bin: &str,
    kubeconfig: &Path,
    dir: &Path,
    cpu: Option<usize>,
    pod_name: &str,
) -> (Supervised, u16, u16) {
    let (health, node_api) = (free_port(), free_port());
    let args: Vec<String> = [
        "--namespace",
        NS,
        "--pod-name",
        pod_name,
        "--agent-trust-domain",
        TD,
        "--cluster-name",
        CLUSTER,
        "--node-rate",
        "1000000",
        "--node-burst",
        "1000000",
        // Every CSR counts against a node's signing budget (50 a second by default): the
        // bench measures the server, so one node may sign as fast as it can.
        "--node-sign-rate",
        "1000000",
        "--node-sign-burst",
        "1000000",
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--health-addr".into(),
        format!("127.0.0.1:{health}"),
        "--node-api-addr".into(),
        format!("127.0.0.1:{node_api}"),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
    ])
    .collect();
    let (program, args) = match cpu {
        Some(cpu) => on_cpu(cpu, Path::new(bin), &args),
        None => (bin.into(), args),
    };
    let mut op = Supervised::start(
        "sigil-operator",
        &program,
        &args,
        &dir.join(format!("{pod_name}.log")),
    )
    .expect("start sigil-operator");
    let started = Instant::now();
    while get_ok(("127.0.0.1", health), "/ready").await.is_none() {
        if let Some(s) = op.exited() {
            panic!("sigil-operator exited ({s}): {}", op.log_tail(30));
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "sigil-operator not ready: {}",
            op.log_tail(30)
        );
        // As often as SPIRE's health check is polled (testkit's `start_server`): the restart
        // row compares the two, each read to within 20 ms.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (op, health, node_api)
}

/// The agent of LOAD_NODE (its pod created on first use), attested by PSAT at the first
/// of the Node APIs on `node_apis`, failing over to the next as the real agent does.
async fn load_agent(client: &Client, node_apis: &[u16]) -> sigil_agent::node_client::NodeClient {
    use sigil_agent::node_client::{NodeClient, NodeClientConfig};
    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    let pod = match pods
        .get_opt("sigil-agent-load")
        .await
        .expect("get the agent pod")
    {
        Some(pod) => pod,
        None => {
            create(
                &pods,
                pod_json(
                    "sigil-agent-load",
                    LOAD_NODE,
                    "sigil-agent",
                    json!({"app": "sigil-agent"}),
                ),
            )
            .await
        }
    };
    let token = sigil_e2e::pod::bound_token(client, &pod, "sigil-agent", 600)
        .await
        .expect("agent token");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get("sigil-trust-bundle")
        .await
        .expect("bundle ConfigMap");
    let jwks = cm
        .data
        .and_then(|d| d.get("bundle.spiffe").cloned())
        .expect("bundle.spiffe");
    let td: sigil_identity::TrustDomain = TD.parse().expect("td");
    let bundle =
        sigil_identity::TrustBundle::from_jwks_json(td.clone(), jwks.as_bytes()).expect("bundle");
    let agent = NodeClient::new(
        NodeClientConfig {
            addresses: node_apis.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
            trust_domain: td,
            cluster: CLUSTER.into(),
        },
        bundle,
    )
    .expect("node client");
    agent.attest_psat(&token).await.expect("PSAT attestation");
    agent
}

/// Failover to a warm standby: an agent attested at the leader (`leader`, serving on
/// `node_apis[0]`) holds its entry stream; the leader is SIGKILLed and the agent moves to
/// the standby on `node_apis[1]` as the real agent's sync loop does (the stream ends, next
/// endpoint, open the stream again). Returns, from the kill: the stream seen broken, the
/// node's entries received from the standby, the first batch of `LOAD_PODS` CSRs signed
/// by it.
async fn sigil_failover(
    client: &Client,
    node_apis: [u16; 2],
    leader: Supervised,
) -> Result<[Duration; 3], String> {
    let agent = load_agent(client, &node_apis).await;
    let mut stream = agent.sync_entries(0).await.map_err(|e| e.to_string())?;
    let first = stream
        .next()
        .await
        .ok_or("no first message")?
        .map_err(|e| e.to_string())?;
    let requests = sign_load::svid_requests(&first.upserts);
    if requests.len() != LOAD_PODS {
        return Err(format!(
            "{} entries on the leader's stream, not {LOAD_PODS}",
            requests.len()
        ));
    }
    let killed = Instant::now();
    drop(leader); // SIGKILL, reaped
    while let Some(Ok(_)) = stream.next().await {}
    let broken = killed.elapsed();
    agent.fail_over();
    let limit = Duration::from_secs(60);
    let entries = loop {
        if killed.elapsed() > limit {
            return Err(format!("no entries from the standby within {limit:?}"));
        }
        if let Ok(mut s) = agent.sync_entries(0).await
            && let Some(Ok(m)) = s.next().await
            && m.upserts.len() == LOAD_PODS
        {
            break killed.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let results = agent
        .sign(requests)
        .await
        .map_err(|e| format!("signing at the standby: {e}"))?;
    if results.iter().any(|r| r.error_code != 0) {
        return Err(format!("the standby refused a CSR: {results:?}"));
    }
    Ok([broken, entries, killed.elapsed()])
}

/// Sigil: attests as the agent of LOAD_NODE and signs its entries' CSRs (100 per call)
/// from 2 callers for `window`: (SVIDs/s, SVIDs per CPU-second of the operator).
async fn sigil_sign(
    client: &Client,
    node_api: u16,
    operator_pid: u32,
    window: Duration,
) -> (f64, f64) {
    let agent = load_agent(client, &[node_api]).await;
    let requests = sign_load::svid_requests(&sign_load::node_entries(&agent).await);
    assert_eq!(
        requests.len(),
        LOAD_PODS,
        "entries of {LOAD_NODE} on the agent's stream"
    );
    // Once before measuring, so a refusal is an error and not a low rate.
    let results = agent.sign(requests.clone()).await.expect("sign");
    assert!(
        results.iter().all(|r| r.error_code == 0),
        "a CSR was refused: {results:?}"
    );
    let cpu0 = cpu_time(operator_pid);
    let (signed, wall) = sign_load::sign_for(&agent, &requests, 2, window).await;
    let cpu = (cpu_time(operator_pid) - cpu0).as_secs_f64().max(1e-3);
    (signed as f64 / wall, signed as f64 / cpu)
}

/// SPIRE: `spire-mint -api node` (join-token attestation, BatchNewX509SVID over mTLS, 100
/// CSRs per call, 2 callers) for `window`: (SVIDs/s, SVIDs per CPU-second of the server,
/// read from the moment the load starts).
async fn spire_sign(spire: &Spire, server_pid: u32, window: Duration) -> (f64, f64) {
    let mut child = tokio::process::Command::new(
        sigil_e2e::tools::tool("spire-mint").expect("spire-mint (hack/bench.sh builds it)"),
    )
    .args([
        "-api",
        "node",
        "-socket",
        &spire.socket(),
        "-server",
        &format!("127.0.0.1:{}", spire.server_port),
    ])
    .args([
        "-td",
        &spire.td,
        "-entries",
        &LOAD_PODS.to_string(),
        "-batch",
        &LOAD_PODS.to_string(),
    ])
    .args([
        "-duration",
        &format!("{}s", window.as_secs()),
        "-concurrency",
        "2",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .kill_on_drop(true)
    .spawn()
    .expect("spire-mint");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut cpu0 = None;
    let mut result = None;
    while let Some(line) = lines.next_line().await.expect("read spire-mint") {
        let v: Value = serde_json::from_str(&line).expect("spire-mint JSON");
        if v["ready"] == json!(true) {
            cpu0 = Some(cpu_time(server_pid));
        } else {
            result = Some(v);
        }
    }
    let cpu = cpu_time(server_pid);
    let out = child.wait_with_output().await.expect("spire-mint");
    let (Some(cpu0), Some(v)) = (cpu0, result) else {
        panic!(
            "spire-mint -api node failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let signed = v["minted"].as_f64().unwrap_or(0.0);
    assert!(
        v["failed"].as_f64() == Some(0.0),
        "SPIRE refused CSRs under load: {v}"
    );
    (
        v["per_s"].as_f64().unwrap_or(0.0),
        signed / (cpu - cpu0).as_secs_f64().max(1e-3),
    )
}

fn main() {
    let bulk = env("SIGIL_BENCH_SERVERS_ENTRIES", 10_000);
    let nodes = env("SIGIL_BENCH_SERVERS_NODES", 1000).max(1);
    let window = Duration::from_secs(env("SIGIL_BENCH_SERVERS_SIGN_SECS", 10) as u64);
    let spire_budget =
        Duration::from_secs(env("SIGIL_BENCH_SERVERS_SPIRE_BUDGET_SECS", 1800) as u64);
    let call_limit = Duration::from_secs(300);
    let events_cache = env("SIGIL_BENCH_SERVERS_SPIRE_EVENTS_CACHE", 0) != 0;
    let restarts = env("SIGIL_BENCH_SERVERS_RESTARTS", 1).max(1);
    let operator_bin = std::env::var("SIGIL_OPERATOR_BIN")
        .expect("set SIGIL_OPERATOR_BIN to a built sigil-operator (make bench does)");
    // A second operator build whose restarts alternate with SIGIL_OPERATOR_BIN's, so that
    // two builds are compared in one run, on the same machine load.
    let operator_b = std::env::var("SIGIL_BENCH_SERVERS_OPERATOR_B").ok();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Before any thread exists, so every thread and child of this process inherits it.
    let pinned = cpus >= 2;
    if pinned {
        pin(std::process::id(), cpus - 1);
    }
    let rt = report::runtime();
    rt.block_on(async move {
        let mut report = Report::new(
            "servers",
            &format!("Sigil operator vs SPIRE server, each its own process{}: footprint idle and with {bulk} identities on {nodes} Nodes, node-facing signing", if pinned { " pinned to CPU 0" } else { " (1 CPU: not pinned)" }),
        );
        let cp = sigil_e2e::shared().await;
        let client = cp.admin().await.expect("admin client");
        cluster_objects(&client).await;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");

        // Each server runs on CPU 0 from its first instruction.
        let server_cpu = pinned.then_some(0);
        let (operator, health, node_api) = start_operator(&operator_bin, cp.kubeconfig_path(), dir.path(), server_cpu).await;
        let op_pid = operator.pid();
        let mut spire = Spire::new(&dir.path().join("spire"), "spire.bench");
        spire.log_level = "INFO";
        spire.signing_rate_limit = false;
        spire.events_based_cache = events_cache;
        spire.server_cpu = server_cpu;
        spire.start_server(&SpireProfile::Spiffe).await;
        let spire_pid = spire.server.as_ref().expect("server").pid();
        // The operator's trust bundle is published before agents can attest.
        sigil_e2e::eventually("the trust bundle ConfigMap", Duration::from_secs(60), || async {
            Api::<ConfigMap>::namespaced(client.clone(), NS).get_opt("sigil-trust-bundle").await.ok().flatten()
        })
        .await;

        // Idle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let [s, p] = footprint([op_pid, spire_pid], Duration::from_secs(10)).await;
        report.lower_better("server RSS, idle (no agents, no entries)", s.0, p.0, "MiB");
        cpu_row(&mut report, "server CPU over 10 s idle", s.1, p.1);

        // Identities declared, spread over `nodes` Nodes (SPIRE: parent IDs), as a
        // cluster spreads its Pods. The Nodes exist before the clock starts.
        futures::stream::iter((0..nodes).map(|k| {
            let api = Api::<Node>::all(client.clone());
            async move { create(&api, json!({"metadata": {"name": bulk_node(k)}})).await }
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
        let pods = Api::<Pod>::namespaced(client.clone(), WORKLOADS);
        let started = Instant::now();
        futures::stream::iter((0..bulk + LOAD_PODS).map(|i| {
            let node = if i < LOAD_PODS { LOAD_NODE.to_owned() } else { bulk_node((i - LOAD_PODS) % nodes) };
            let pods = pods.clone();
            async move { create(&pods, pod_json(&format!("w-{i}"), &node, "web", json!({"app": "bench"}))).await }
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
        let created = started.elapsed();
        sigil_e2e::eventually("the operator to render every entry", Duration::from_secs(300), || async {
            let text = get_ok(("127.0.0.1", health), "/metrics").await?;
            (metric(&text, "sigil_index_entries")? >= (bulk + LOAD_PODS) as f64).then_some(())
        })
        .await;
        let sigil_took = started.elapsed();
        // The apiserver writing the Pods (on the load CPU, with etcd) bounds Sigil's side;
        // how far the operator trails the last write says whether it kept up.
        let lag = sigil_took - created;
        // Printed now: at large sizes SPIRE's side can take far longer, or not finish.
        report.row(
            &format!("  Sigil alone: {bulk} identities held"),
            format!(
                "after {:.1} s, {:.0} ms after the last Pod was created; operator RSS {:.1} MiB",
                sigil_took.as_secs_f64(),
                lag.as_secs_f64() * 1e3,
                rss_kib(op_pid) as f64 / 1024.0
            ),
        );
        let entries: Vec<Value> = (0..bulk)
            .map(|i| spire.uid_entry(&format!("/bulk/{i}"), &format!("spiffe://{}/{}", spire.td, bulk_node(i % nodes)), 60_000 + i as u32))
            .collect();
        // At large sizes SPIRE's entry creation slows as its table grows (each call
        // checks for similar entries; the entry cache reloads in full every 5 s), so its
        // side is bounded: each call, and the whole side, get a deadline.
        let started = Instant::now();
        let mut spire_held = 0;
        let mut spire_stopped = None;
        for (n, chunk) in entries.chunks(1000).enumerate() {
            let left = spire_budget.saturating_sub(started.elapsed());
            if left.is_zero() {
                spire_stopped = Some(format!("stopped at its {spire_budget:?} budget"));
                break;
            }
            let limit = left.min(call_limit);
            match spire.create_entries_within(&format!("bulk-{n}"), chunk, limit).await {
                Ok(()) => {
                    spire_held += chunk.len();
                    if spire_held % 10_000 == 0 {
                        eprintln!("servers: SPIRE holds {spire_held} entries after {:.0?}", started.elapsed());
                    }
                }
                Err(e) if limit < call_limit => {
                    spire_stopped = Some(format!("stopped at its {spire_budget:?} budget (the call then running: {e})"));
                    break;
                }
                Err(e) => {
                    spire_stopped = Some(e);
                    break;
                }
            }
        }
        let spire_took = started.elapsed();
        // No ratio: Sigil's figure is the apiserver's Pod writes, SPIRE's its own API.
        let sigil_side = format!(
            "Sigil {:.1} s ({} Pods written by the apiserver in {:.1} s, 16 at a time; the operator held the last entry {:.0} ms after the last write)",
            sigil_took.as_secs_f64(),
            bulk + LOAD_PODS,
            created.as_secs_f64(),
            lag.as_secs_f64() * 1e3
        );
        let what = format!("{bulk} identities declared → held by the server");
        match &spire_stopped {
            None => report.row(&what, format!(
                "{sigil_side} | SPIRE {:.1} s (spire-server entry create -data, 1000 per call)",
                spire_took.as_secs_f64())),
            Some(why) => report.row(&what, format!(
                "{sigil_side} | SPIRE did not finish: {spire_held} entries created in {:.1} s, then {why}",
                spire_took.as_secs_f64())),
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let [s, p] = footprint([op_pid, spire_pid], Duration::from_secs(10)).await;
        if spire_held == bulk {
            report.lower_better(&format!("server RSS with {bulk} identities"), s.0, p.0, "MiB");
            cpu_row(&mut report, &format!("server CPU over 10 s idle with {bulk} identities"), s.1, p.1);
        } else {
            // No ratio: the two servers hold different numbers of identities.
            report.row("server RSS with the identities held", format!("Sigil {:.1} MiB ({bulk}) | SPIRE {:.1} MiB ({spire_held})", s.0, p.0));
            report.row("server CPU over 10 s idle with the identities held", format!("Sigil {:.1} ms ({bulk}) | SPIRE {:.1} ms ({spire_held})", s.1, p.1));
        }

        // Node-facing signing, per core.
        let (sigil_rate, sigil_cpu) = {
            let _spire = Paused::new(spire_pid);
            sigil_sign(&client, node_api, op_pid, window).await
        };
        let (spire_rate, spire_cpu) = spire_sign(&spire, spire_pid, window).await;
        let cores = if pinned { "server on one core" } else { "not pinned" };
        report.higher_better(&format!("X509-SVIDs signed/s, node-facing API ({cores})"), sigil_rate, spire_rate, "/s");
        report.higher_better("X509-SVIDs per CPU-second of the server", sigil_cpu, spire_cpu, "/s");
        // Near 100%: the server, not the load generator, is the bound.
        report.row("server CPU busy during the signing load", format!("Sigil {:.0}% | SPIRE {:.0}%", 100.0 * sigil_rate / sigil_cpu, 100.0 * spire_rate / spire_cpu));
        // The physical limit on one core, measured here with both servers idle (SPIRE
        // paused): #28's row is the operator's own CPU against it.
        let limit = {
            let _spire = Paused::new(spire_pid);
            sign_load::SignVerifyLimit::measure(Duration::from_secs(2))
        };
        report.row(
            "raw ECDSA P-256 (ring, one thread): signatures/s, verifications/s",
            format!("{:.0} / {:.0}", limit.sign, limit.verify),
        );
        report.row(
            "Sigil node-facing API per CPU-second of the operator / (sign + CSR verify) limit",
            format!("{:.0}% of {:.0}/s", 100.0 * sigil_cpu / limit.bound(), limit.bound()),
        );
        report.row("server RSS after signing", format!("Sigil {:.1} MiB | SPIRE {:.1} MiB", rss_kib(op_pid) as f64 / 1024.0, rss_kib(spire_pid) as f64 / 1024.0));

        // Restart: each server killed (SIGKILL) and started again on its CPU, until it
        // serves every identity it held. Sigil lists the Pods from the apiserver and renders
        // them; SPIRE opens its sqlite datastore and builds its entry cache before it
        // listens, so its health check passing is the same point.
        // With `SIGIL_BENCH_SERVERS_RESTARTS` above 1, the two take turns that many times and
        // the row is each one's median.
        let (mut operator, mut health, mut node_api) = (operator, health, node_api);
        let (mut sigil_restarts, mut spire_restarts) = (Vec::new(), Vec::new());
        let (mut sigil_cpu, mut b_restarts, mut b_cpu) = (Vec::new(), Vec::new(), Vec::new());
        let (mut sigil_rss, mut spire_rss) = (0.0, 0.0);
        for _ in 0..restarts {
            let spire_paused = Paused::new(spire.server.as_ref().expect("server").pid());
            // Operator B first, so that A (the operator the later rows use) is left running.
            let turns = [(operator_b.as_ref(), &mut b_restarts, &mut b_cpu), (Some(&operator_bin), &mut sigil_restarts, &mut sigil_cpu)];
            for (bin, times, cpus) in turns {
                let Some(bin) = bin else { continue };
                drop(operator);
                let started = Instant::now();
                (operator, health, node_api) = start_operator(bin, cp.kubeconfig_path(), dir.path(), server_cpu).await;
                sigil_e2e::eventually("the restarted operator to render every entry", Duration::from_secs(300), || async {
                    let text = get_ok(("127.0.0.1", health), "/metrics").await?;
                    (metric(&text, "sigil_index_entries")? >= (bulk + LOAD_PODS) as f64).then_some(())
                })
                .await;
                times.push(started.elapsed().as_secs_f64());
                cpus.push(cpu_time(operator.pid()).as_secs_f64());
            }
            sigil_rss = rss_kib(operator.pid()) as f64 / 1024.0;
            drop(spire_paused);
            drop(spire.server.take());
            let started = Instant::now();
            spire.start_server(&SpireProfile::Spiffe).await;
            spire_restarts.push(started.elapsed().as_secs_f64());
            spire_rss = rss_kib(spire.server.as_ref().expect("server").pid()) as f64 / 1024.0;
        }
        let (sigil_restart, spire_restart) = (median(&sigil_restarts), median(&spire_restarts));
        if restarts > 1 {
            report.row(
                "  each restart, in turn",
                format!("Sigil {} s | SPIRE {} s", seconds(&sigil_restarts), seconds(&spire_restarts)),
            );
        }
        report.row(
            "  operator CPU from its start to serving every identity",
            format!("{} s (median {:.2} s)", seconds(&sigil_cpu), median(&sigil_cpu)),
        );
        if let Some(b) = &operator_b {
            report.row(
                &format!("  operator B ({b}), restarted before each of A's"),
                format!(
                    "{} s (median {:.2} s, A's {sigil_restart:.2} s); CPU {} s (median {:.2} s, A's {:.2} s)",
                    seconds(&b_restarts),
                    median(&b_restarts),
                    seconds(&b_cpu),
                    median(&b_cpu),
                    median(&sigil_cpu)
                ),
            );
        }
        if spire_held == bulk {
            report.lower_better(&format!("server killed and restarted with {bulk} identities → serving them{}", if restarts > 1 { " (median)" } else { "" }), sigil_restart, spire_restart, "s");
            report.lower_better("server RSS just after the restart", sigil_rss, spire_rss, "MiB");
        } else {
            report.row("server killed and restarted → serving its identities", format!("Sigil {sigil_restart:.1} s ({bulk}) | SPIRE {spire_restart:.1} s ({spire_held})"));
            report.row("server RSS just after the restart", format!("Sigil {sigil_rss:.1} MiB ({bulk}) | SPIRE {spire_rss:.1} MiB ({spire_held})"));
        }
        // Failover (Sigil; SPIRE's server has no standby that serves): a second replica
        // holds every identity warm; the leader is SIGKILLed under an agent attested at it.
        if env("SIGIL_BENCH_SERVERS_FAILOVER", 1) == 1 {
            let _spire = Paused::new(spire.server.as_ref().expect("server").pid());
            let started = Instant::now();
            let (standby, standby_health, standby_api) =
                start_replica(&operator_bin, cp.kubeconfig_path(), dir.path(), server_cpu, "sigil-operator-1").await;
            sigil_e2e::eventually("the standby to render every entry", Duration::from_secs(300), || async {
                let text = get_ok(("127.0.0.1", standby_health), "/metrics").await?;
                (metric(&text, "sigil_index_entries")? >= (bulk + LOAD_PODS) as f64).then_some(())
            })
            .await;
            report.row(
                &format!("a standby replica started beside the leader → holding the {bulk} identities"),
                format!("{:.2} s, RSS {:.1} MiB (both replicas on the server's core)", started.elapsed().as_secs_f64(), rss_kib(standby.pid()) as f64 / 1024.0),
            );
            // Pod events with both replicas running: what each spends on one. The
            // standby renders every Pod as the leader does but writes nothing.
            let (leader_cpu, standby_cpu) = (cpu_time(operator.pid()), cpu_time(standby.pid()));
            // Enough events that the CPU clock's 10 ms tick is a small part of each figure.
            let extra = env("SIGIL_BENCH_SERVERS_STANDBY_PODS", 10_000);
            futures::stream::iter((0..extra).map(|i| {
                let pods = pods.clone();
                let node = bulk_node(i % nodes);
                async move { create(&pods, pod_json(&format!("s-{i}"), &node, "web", json!({"app": "bench"}))).await }
            }))
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
            for health in [health, standby_health] {
                sigil_e2e::eventually("both replicas to render the new Pods", Duration::from_secs(300), || async {
                    let text = get_ok(("127.0.0.1", health), "/metrics").await?;
                    (metric(&text, "sigil_index_entries")? >= (bulk + LOAD_PODS + extra) as f64).then_some(())
                })
                .await;
            }
            // The leader's status writes trail the entries.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let per_event = |before: Duration, pid: u32| (cpu_time(pid).saturating_sub(before)).as_secs_f64() * 1e6 / extra as f64;
            report.row(
                &format!("{extra} Pods created with a warm standby: each replica's CPU per Pod event"),
                format!(
                    "leader {:.0} µs | standby {:.0} µs (the CPU clock ticks every {TICK_MS} ms: ±{:.0} µs)",
                    per_event(leader_cpu, operator.pid()),
                    per_event(standby_cpu, standby.pid()),
                    TICK_MS * 1e3 / extra as f64
                ),
            );
            match sigil_failover(&client, [node_api, standby_api], operator).await {
                Ok([broken, entries, signed]) => report.row(
                    &format!("leader SIGKILLed, warm standby with {bulk} identities → serving the agent"),
                    format!(
                        "entries from the standby {:.0} ms, {LOAD_PODS} SVIDs signed by it {:.0} ms after the kill (the agent saw its stream end at {:.1} ms)",
                        entries.as_secs_f64() * 1e3,
                        signed.as_secs_f64() * 1e3,
                        broken.as_secs_f64() * 1e3
                    ),
                ),
                Err(e) => report.row("leader SIGKILLed → standby serving", e),
            }
            drop(standby);
        } else {
            drop(operator);
        }
        // What bounds Sigil's restart: the apiserver serving every Pod, listed and decoded
        // as the operator's informer does (protobuf, its page sizes) and, for comparison,
        // as kube-runtime's watcher does (JSON, 500 a page), without an index behind either.
        for (protobuf, how) in [(true, "protobuf, as the operator lists"), (false, "JSON in 500-Pod pages, as kube-runtime lists")] {
            // The floor as often as the restart (JSON, far slower, once).
            let mut took = Vec::new();
            let mut totals = None;
            for _ in 0..if protobuf { restarts } else { 1 } {
                let started = Instant::now();
                totals = Some(sigil_operator::index::list_every_pod(&client, protobuf).await.expect("list every Pod"));
                took.push(started.elapsed().as_secs_f64());
            }
            let t = totals.expect("listed at least once");
            report.row(
                &format!("  apiserver LIST of every Pod, {}", if protobuf { "protobuf (Sigil's restart floor)" } else { "JSON" }),
                format!("{} s for {} Pods in {} pages, {:.1} MiB ({how})", seconds(&took), t.pods, t.pages, t.bytes as f64 / (1024.0 * 1024.0)),
            );
        }
        report.row("SPIRE version", spire_common::spire_version().await);
        report.row(
            "SPIRE entry cache",
            if events_cache {
                "events_based_cache = true (experimental, not the default)".into()
            } else {
                "full reload every 5 s (the default)".into()
            },
        );
        drop(spire);
        report.finish();
    });
}
