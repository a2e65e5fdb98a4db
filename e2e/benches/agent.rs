//! sigil-agent end to end: pod object created → the SVID served to a client process in
//! that pod, the agent's memory idle and with 10k open Workload API streams, and the time
//! for an entry change to reach every one of those streams as a new SVID; then the same
//! for 10k Envoy SDS streams (`envoy-sds-client streams`: each subscribed to `default` and
//! `ROOTCA` as an Istio sidecar is, on its own connection, ACKing every response).
//!
//! The operator side runs in this process (real apiserver + etcd from the e2e harness,
//! CA, index, Node API over TLS); the agent is the real `sigil-agent` binary in its own
//! process (SIGIL_AGENT_BIN, which `make bench` builds in release mode), so its RSS is its
//! own. The client is the Rust `spiffe` crate (rust-spiffe-client) started inside the
//! pod's cgroup: its process start is part of each sample, as it is for a real workload.
//!
//! Before the streams, the node is topped up to SIGIL_BENCH_ENTRIES identities (Pods, no
//! containers) and the agent's RSS is read once it has signed an SVID for each: its memory
//! per identity.
//!
//! Then Pods are declared at a steady pace without waiting for one another
//! (SIGIL_BENCH_PACED, default 1000, one every SIGIL_BENCH_PACED_MS, default 100), as
//! versus_spire's paced row does with SPIRE beside it, each split into its phases: Pod
//! create acknowledged, Running acknowledged, SVID in a new client in the pod. Then all at
//! once (SIGIL_BENCH_BURST, default 1000), with Sigil's own share of the burst: the last
//! Running acknowledged → the last SVID in a pod.
//!
//! Run: `make bench` (or `hack/bench.sh agent`). SIGIL_BENCH_PODS (default 200),
//! SIGIL_BENCH_STREAMS (default 10000; the process needs that many file descriptors) and
//! SIGIL_BENCH_ENTRIES (default 10000) set the sizes.

mod agent_process;
mod held_streams;
use sigil_testkit::node_api as node_api_common;
use sigil_testkit::report;

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::ResourceExt;
use node_api_common::World;
use report::{Report, env};
use serde_json::json;
use sigil_e2e::pod::PodContainer;
use sigil_e2e::process::{rss_kib, rss_split_kib};

async fn fetch(container: &PodContainer, client: &str, addr: &str) -> bool {
    let mut cmd = container.command(client);
    cmd.args(["--addr", addr, "x509"]);
    tokio::process::Command::from(cmd)
        .output()
        .await
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// One paced registration, from the moment its Pod was to be declared.
struct Paced {
    /// How late the declaration started (the bench's own scheduling).
    late: Duration,
    /// Pod create acknowledged.
    written: Duration,
    /// The pod's cgroup made and its status Running acknowledged (the kubelet's part).
    running: Duration,
    /// The client's answer: attempts it made, and whether it got an SVID.
    got: Option<u32>,
    /// The client process ended.
    total: Duration,
}

/// One registration timed from `t0`: Pod `name` (label `app`) created on node A, its
/// cgroup made and its status Running (the kubelet's part), then a client in it waiting for
/// its SVID; `late` is how late its declaration started.
async fn register(
    w: &World,
    name: &str,
    app: &str,
    t0: Instant,
    late: Duration,
    client: &str,
    addr: &str,
) -> (Paced, PodContainer) {
    let pod = w.pod(name, &w.node_a, "web", json!({"app": app})).await;
    let written = t0.elapsed();
    let container = PodContainer::create(&pod.uid().expect("uid")).expect("cgroup");
    container
        .mark_running(&w.client, &w.ns, name, "main", "registry.invalid/none")
        .await
        .expect("status");
    let running = t0.elapsed();
    let got = wait_x509(&container, client, addr).await;
    (
        Paced {
            late,
            written,
            running,
            got,
            total: t0.elapsed(),
        },
        container,
    )
}

/// `rust-spiffe-client wait-x509` in the pod (one fixed 20 ms retry): the attempts it made,
/// or `None` without an SVID within a minute.
async fn wait_x509(container: &PodContainer, client: &str, addr: &str) -> Option<u32> {
    let mut cmd = container.command(client);
    cmd.args(["--addr", addr, "wait-x509", "--timeout-ms", "60000"]);
    let out = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output()
        .await
        .ok()?;
    let line: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii()).ok()?;
    out.status
        .success()
        .then(|| line["attempts"].as_u64().unwrap_or(0) as u32)
}

/// The paced rows: the whole registration and each phase, and what the slowest 1% spent
/// where.
fn paced_report(report: &mut Report, runs: &[Paced], every: Duration) {
    let n = runs.len();
    let ok: Vec<&Paced> = runs.iter().filter(|r| r.got.is_some()).collect();
    let at = |f: &dyn Fn(&Paced) -> Duration| ok.iter().map(|r| f(r)).collect::<Vec<_>>();
    report.latencies(
        &format!("registration → SVID, {n} Pods declared one every {every:?}"),
        at(&|r| r.total),
    );
    report.latencies("  Pod create acknowledged (apiserver)", at(&|r| r.written));
    report.latencies(
        "  create → Running acknowledged (the kubelet's part, here)",
        at(&|r| r.running - r.written),
    );
    report.latencies(
        "  Running → SVID in a new client in the pod (agent)",
        at(&|r| r.total - r.running),
    );
    report.latencies(
        "  declaration started late by (bench scheduling)",
        at(&|r| r.late),
    );
    let retried = ok.iter().filter(|r| r.got.unwrap_or(0) > 1).count();
    report.row(
        "  clients that needed more than one attempt (20 ms apart)",
        format!("{retried} of {}", ok.len()),
    );
    report.row("  failed registrations", format!("{}", n - ok.len()));
    // Where the slowest 1% spent their time.
    let mut slow: Vec<&&Paced> = ok.iter().collect();
    slow.sort_by_key(|r| std::cmp::Reverse(r.total));
    let k = (n / 100).max(1).min(slow.len());
    let sum = |f: &dyn Fn(&Paced) -> Duration| {
        slow[..k]
            .iter()
            .map(|r| f(r))
            .sum::<Duration>()
            .as_secs_f64()
            * 1e3
            / k.max(1) as f64
    };
    report.row(
        &format!("  slowest {k}: mean ms in create / Running / agent, attempts"),
        format!(
            "{:.0} / {:.0} / {:.0}, {:?}",
            sum(&|r| r.written),
            sum(&|r| r.running - r.written),
            sum(&|r| r.total - r.running),
            slow[..k]
                .iter()
                .map(|r| r.got.unwrap_or(0))
                .collect::<Vec<_>>()
        ),
    );
}

/// The burst rows, every time from the burst's start: SVIDs in the pods, the apiserver's
/// part (the last create and the last Running acknowledged), and Sigil's own share, from
/// the last Running acknowledged to the last SVID received (a client process ends a few
/// milliseconds after it has its SVID).
fn burst_report(report: &mut Report, runs: &[Paced]) {
    let n = runs.len();
    let ok: Vec<&Paced> = runs.iter().filter(|r| r.got.is_some()).collect();
    let last = |f: &dyn Fn(&Paced) -> Duration| runs.iter().map(f).max().unwrap_or_default();
    report.latencies(
        &format!("burst of {n} Pods: declared → SVID in a new client in the pod"),
        ok.iter().map(|r| r.total).collect(),
    );
    report.latencies(
        "  each pod's Running acknowledged → its SVID",
        ok.iter().map(|r| r.total - r.running).collect(),
    );
    // The last SVID served: of the registrations that got one (a failed one's client ran
    // out its minute).
    let served = ok.iter().map(|r| r.total).max().unwrap_or_default();
    let (written, running) = (last(&|r| r.written), last(&|r| r.running));
    report.row(
        "  last Pod create acknowledged / last Running acknowledged",
        format!("{written:>8.2?} / {running:.2?} (the apiserver's part)"),
    );
    report.row("  last SVID in a pod", format!("{served:>8.2?}"));
    report.row(
        "  Sigil's share: last Running acknowledged → last SVID",
        format!("{:>8.2?}", served.saturating_sub(running)),
    );
    report.row("  failed registrations", format!("{}", n - ok.len()));
}

/// The kinds of streams held, in the order of SIGIL_BENCH_STREAM_KINDS (a comma list of
/// `wl`: Workload API streams each on its own connection, `shared`: Workload API streams
/// `per_connection` to a connection, `sds`: Envoy SDS streams, `conns`: connections with
/// no call on them; default `wl,sds,shared`).
/// The allocator keeps what the first kind freed, so the later kinds' growth reads lower:
/// compare each kind measured first.
fn stream_kinds(per_connection: usize) -> Vec<String> {
    // SIGIL_BENCH_SDS_FIRST=1, the older switch, puts SDS first.
    let default = if env("SIGIL_BENCH_SDS_FIRST", 0) == 1 {
        "sds,wl,shared"
    } else {
        "wl,sds,shared"
    };
    let list = std::env::var("SIGIL_BENCH_STREAM_KINDS").unwrap_or_else(|_| default.into());
    list.split(',')
        .map(|k| match k.trim() {
            "wl" => "Workload API".to_owned(),
            "sds" => "SDS".to_owned(),
            "shared" => format!("Workload API, {per_connection} a connection,"),
            "conns" => "connections".to_owned(),
            other => {
                panic!("SIGIL_BENCH_STREAM_KINDS: unknown kind {other:?} (wl, sds, shared, conns)")
            }
        })
        .collect()
}

fn main() {
    let pods_n = env("SIGIL_BENCH_PODS", 200);
    let streams_n = env("SIGIL_BENCH_STREAMS", 10_000);
    let entries_n = env("SIGIL_BENCH_ENTRIES", 10_000);
    let per_connection = env("SIGIL_BENCH_STREAMS_PER_CONNECTION", 8);
    let paced_n = env("SIGIL_BENCH_PACED", 1000);
    let burst_n = env("SIGIL_BENCH_BURST", 1000);
    let paced_every = Duration::from_millis(env("SIGIL_BENCH_PACED_MS", 100) as u64);
    let agent_bin = std::env::var("SIGIL_AGENT_BIN")
        .expect("set SIGIL_AGENT_BIN to a built sigil-agent (make bench does)");
    let client = env!("CARGO_BIN_EXE_rust-spiffe-client");
    let rt = report::runtime();
    rt.block_on(async move {
        let mut report = Report::new(
            "agent",
            &format!("sigil-agent (release binary): pod created → SVID in a client in the pod ({pods_n} pods one at a time); RSS idle and with {streams_n} streams"),
        );
        let w = World::start("abench").await;
        let mut agent = agent_process::start(&w, &agent_bin).await;
        let (pid, addr) = (agent.pid, agent.addr.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;
        report.row("agent RSS, idle (attested, no entries)", format!("{:>8.1} MiB", rss_kib(pid) as f64 / 1024.0));
        let (anon, file, shmem) = rss_split_kib(pid);
        report.row("  of which anonymous / file-backed / shared", format!("{:.1} / {:.1} / {:.1} MiB", anon as f64 / 1024.0, file as f64 / 1024.0, shmem as f64 / 1024.0));
        let files = sigil_e2e::process::file_rss_by_file_kib(pid);
        report.row(
            "  file-backed, by file (MiB)",
            files.iter().take(5).map(|(f, kib)| format!("{f} {:.1}", *kib as f64 / 1024.0)).collect::<Vec<_>>().join(", "),
        );

        w.cluster_spiffe_id(&format!("{}-bench", w.tag), "bench").await;
        let mut from_create = Vec::new();
        let mut warm = Vec::new();
        let mut failed = 0;
        let mut keep = Vec::new();
        for i in 0..pods_n {
            let t0 = Instant::now();
            let pod = w.pod(&format!("b-{i}"), &w.node_a, "web", json!({"app": "bench"})).await;
            let container = PodContainer::create(&pod.uid().expect("uid")).expect("cgroup");
            container.mark_running(&w.client, &w.ns, &format!("b-{i}"), "main", "registry.invalid/none").await.expect("status");
            if fetch(&container, client, &addr).await {
                from_create.push(t0.elapsed());
            } else {
                failed += 1;
            }
            let t1 = Instant::now();
            if fetch(&container, client, &addr).await {
                warm.push(t1.elapsed());
            }
            keep.push(container);
        }
        report.latencies("pod created → SVID received by a new client process in it", from_create);
        report.latencies("  of which: a client process fetching an already-held SVID", warm);
        report.row("  failed fetches", format!("{failed}"));
        report.row(&format!("agent RSS with {pods_n} entries and SVIDs"), format!("{:>8.1} MiB", rss_kib(pid) as f64 / 1024.0));

        // Paced registrations (versus_spire's paced row, Sigil alone): one Pod declared
        // every `paced_every`, each on its own, without waiting for earlier ones, split into
        // phases so that a tail can be placed.
        if paced_n > 0 {
            w.cluster_spiffe_id(&format!("{}-paced", w.tag), "paced").await;
            let start = tokio::time::Instant::now();
            let runs = futures::future::join_all((0..paced_n).map(|i| {
                let (w, addr) = (&w, addr.clone());
                async move {
                    tokio::time::sleep_until(start + paced_every * i as u32).await;
                    let late = start.elapsed().saturating_sub(paced_every * i as u32);
                    register(w, &format!("paced-{i}"), "paced", Instant::now(), late, client, &addr).await
                }
            }))
            .await;
            let (runs, containers): (Vec<Paced>, Vec<PodContainer>) = runs.into_iter().unzip();
            paced_report(&mut report, &runs, paced_every);
            keep.extend(containers);
        }

        // A burst: every Pod declared at once, each made Running as soon as its create
        // returns (the kubelet's part), its client started then. Sigil's own share is the
        // time from the last Running acknowledged to the last SVID in a pod.
        if burst_n > 0 {
            w.cluster_spiffe_id(&format!("{}-burst", w.tag), "burst").await;
            let t0 = Instant::now();
            let runs = futures::future::join_all((0..burst_n).map(|i| {
                let (w, addr) = (&w, addr.clone());
                async move {
                    register(w, &format!("burst-{i}"), "burst", t0, Duration::ZERO, client, &addr).await
                }
            }))
            .await;
            let (runs, containers): (Vec<Paced>, Vec<PodContainer>) = runs.into_iter().unzip();
            burst_report(&mut report, &runs);
            keep.extend(containers);
        }

        // Memory per identity: the node topped up to `entries_n` Pods, each with an entry
        // (from a second ClusterSPIFFEID, so the entry change below touches only the first
        // `pods_n`), and the agent holding an SVID and key for every one.
        if entries_n > pods_n {
            w.cluster_spiffe_id(&format!("{}-held", w.tag), "held").await;
            let before = rss_kib(pid) as f64 / 1024.0;
            let signed_before = async {
                let text = sigil_e2e::http::get_ok(agent.health, "/metrics").await?;
                sigil_e2e::http::metric(&text, "sigil_agent_svids_signed_total")
            }
            .await
            .expect("the agent's sigil_agent_svids_signed_total");
            let want = signed_before + (entries_n - pods_n) as f64;
            let cpu_before = sigil_e2e::process::cpu_time(pid);
            let t = Instant::now();
            futures::stream::iter((pods_n..entries_n).map(|i| {
                let w = &w;
                async move { w.pod(&format!("held-{i}"), &w.node_a, "web", json!({"app": "held"})).await }
            }))
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
            sigil_e2e::eventually(&format!("sigil-agent to hold {entries_n} SVIDs"), Duration::from_secs(300), || async {
                let text = sigil_e2e::http::get_ok(agent.health, "/metrics").await?;
                (sigil_e2e::http::metric(&text, "sigil_agent_svids_signed_total")? >= want).then_some(())
            })
            .await;
            report.row(&format!("{} more Pods created → all their SVIDs held", entries_n - pods_n), format!("{:>8.2?}", t.elapsed()));
            // The agent's own CPU for each identity: watch event, key, CSR, the Node API
            // call, the chain checked and held (what a build profile changes).
            let cpu = sigil_e2e::process::cpu_time(pid).saturating_sub(cpu_before);
            report.row("  agent CPU per added identity", format!("{:>8.1} µs", cpu.as_secs_f64() * 1e6 / (entries_n - pods_n) as f64));
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = rss_kib(pid) as f64 / 1024.0;
            report.row(&format!("agent RSS with {entries_n} entries, SVIDs and keys"), format!("{after:>8.1} MiB"));
            report.row("  growth per added identity", format!("{:>8.1} KiB", (after - before) * 1024.0 / (entries_n - pods_n) as f64));
        }

        // Open streams from one pod, then change the pod's entry (one more DNS name): the
        // operator re-renders it and pushes it to the node, the agent signs a new SVID and
        // every open stream must receive it. Each kind in turn (`stream_kinds`):
        // FetchX509SVID streams (rust-spiffe-client) each on its own connection, Envoy SDS
        // StreamSecrets streams (envoy-sds-client, `default` + `ROOTCA`, ACKing each
        // response), and FetchX509SVID streams sharing connections (what a connection
        // costs, against what a stream on it costs).
        let sds_client = sigil_e2e::tools::tool("envoy-sds-client").expect("envoy-sds-client (make test-tools)");
        let kinds = stream_kinds(per_connection);
        let mib = |kib: u64| format!("{:>8.1} MiB", kib as f64 / 1024.0);
        for (change, kind) in kinds.iter().enumerate() {
            let kind = kind.as_str();
            if kind == "connections" {
                let mut cmd = keep[0].command(client);
                cmd.args(["--addr", &addr, "connections", "--count", &streams_n.to_string()]);
                match held_streams::connections_kib(cmd, streams_n, pid).await {
                    Ok(kib) => report.row(&format!("  growth per open connection, no call on it ({streams_n})"), format!("{kib:>8.1} KiB")),
                    Err(e) => report.row(&format!("{streams_n} connections"), e),
                }
                continue;
            }
            let cmd = if kind == "SDS" {
                let mut cmd = keep[0].command(&sds_client);
                cmd.args(["-socket", &agent.socket.display().to_string(), "streams", "-count", &streams_n.to_string()]);
                cmd
            } else {
                let mut cmd = keep[0].command(client);
                cmd.args(["--addr", &addr, "streams", "--count", &streams_n.to_string()]);
                if kind != "Workload API" {
                    cmd.args(["--per-connection", &per_connection.to_string()]);
                }
                cmd
            };
            let held = held_streams::hold_with(cmd, streams_n, pid, async {
                let patch = json!({"spec": {"dnsNameTemplates": ["{{pod.name}}.{{node.labels['zone']}}", format!("{{{{pod.name}}}}.change{change}")]}});
                kube::Api::<sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID>::all(w.client.clone())
                    .patch(&format!("{}-bench", w.tag), &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
                    .await
                    .expect("patch the ClusterSPIFFEID");
            })
            .await;
            match held {
                Ok(h) => {
                    report.row(&format!("{streams_n} {kind} streams opened, each with its first SVID"), format!("{:>8.2?}", h.open));
                    report.row(&format!("agent RSS with {streams_n} open {kind} streams"), mib(h.rss_open));
                    report.row(&format!("  growth per open {kind} stream (its connection included)"), format!("{:>8.1} KiB", h.kib_per_stream()));
                    match h.fan_out {
                        Ok(t) => report.row(&format!("entry change → new SVID delivered to all {streams_n} {kind} streams"), format!("{t:>8.2?}")),
                        Err(e) => report.row(&format!("new SVID to all {streams_n} {kind} streams"), e),
                    }
                    report.row(&format!("agent RSS after the fan-out to {streams_n} {kind} streams"), mib(h.rss_after));
                }
                Err(e) => report.row(&format!("{streams_n} {kind} streams"), e),
            }
        }

        let _ = agent.child.kill().await;
        drop(keep);
        report.finish();
    });
}
