//! Sigil and SPIRE side by side, on this machine, in one run.
//!
//! - Sigil: the operator side in this process (real apiserver + etcd, CA, index, Node API
//!   over TLS) and the release `sigil-agent` binary in its own process; workloads are
//!   processes in pod-shaped cgroups.
//! - SPIRE (the release `make test-tools` builds, see `hack/versions.sh`): spire-server
//!   with sqlite and the disk key manager, spire-agent with join-token node attestation and
//!   the unix workload attestor, both at SPIRE's default sync settings; workloads are
//!   processes with their own uid (the unix attestor's selector), entries created through
//!   the server's admin API (`spire-server entry create`).
//! - The client on both sides is the same: our `rust-spiffe-client` (the Rust `spiffe`
//!   crate), retrying FetchX509SVID every 20 ms until an SVID arrives.
//!
//! Rows (metric | Sigil | SPIRE | which is ahead, by how many times):
//! 1. registration → SVID: from the moment the identity is declared (Sigil: the Pod create
//!    call returned, the ClusterSPIFFEID already selecting it; SPIRE: the entry create
//!    call returned) until the client in that workload holds its SVID: one at a time
//!    (alternating Sigil and SPIRE, each waiting for the previous SVID), as a burst, and
//!    one after another at a steady pace (one declared every 100 ms, without waiting; each
//!    system's paced run alone on the machine, Sigil's first). Sigil's figure includes what a kubelet would do (cgroup, pod status
//!    Running) because attestation needs it.
//! 3. Workload API: SIGIL_BENCH_VS_STREAMS (1000) streams held by one workload, each on
//!    its own connection: the agent's RSS per stream and the time for one change of that
//!    workload's entry to reach every stream as a new SVID. Then FetchX509SVID latency with
//!    1, 100 and 1000 concurrent connections (with the 10k entries on the node), and
//!    whether each agent still serves a new client afterwards.
//! 4. Footprint: agent RSS idle, with the workloads registered and with 10k entries on its
//!    node, agent idle CPU; the SPIRE server's RSS (Sigil's operator runs inside this bench process, so its RSS is
//!    not separable here; the `servers` bench runs it as its own process).
//!
//! 2. Issuance throughput: X509-SVIDs signed per second and per CPU-second. Sigil: the
//!    Node API's SignX509Svids (batches of up to 100 CSRs, what agents send) over TLS,
//!    CPU of this whole process (operator and the calling client together, so Sigil's
//!    per-CPU figure is pessimistic); SPIRE: the server API's MintX509SVID over the admin
//!    socket (`spire-mint`, the path `spire-server x509 mint` uses), CPU of spire-server
//!    alone. Then each signer alone on one thread (Sigil's CA) and the raw ECDSA P-256
//!    signature rate of ring, the crypto library Sigil signs with, as the physical limit.
//!
//! Elsewhere: the servers as their own processes pinned to one core, SPIRE's node-facing
//! BatchNewX509SVID, and 10k identities are in the `servers` bench; 10k open streams (Sigil
//! alone) in the `agent` bench.
//!
//! Run: `make bench` or `hack/bench.sh versus_spire`. Sizes: SIGIL_BENCH_VS_ONE (default
//! 30 workloads one at a time per system; SPIRE takes ~5 s each), SIGIL_BENCH_VS_BURST
//! (default 1000), SIGIL_BENCH_VS_STAGGER and SIGIL_BENCH_VS_STAGGER_MS (1000, one every
//! 100 ms), SIGIL_BENCH_VS_ENTRIES (10000 entries on the node in all),
//! SIGIL_BENCH_VS_STREAMS (1000 streams held per side), SIGIL_BENCH_VS_REQUESTS (default
//! 2000 fetches per concurrency level).

mod agent_process;
mod held_streams;
use sigil_testkit::node_api as node_api_common;
use sigil_testkit::report;
mod sign_load;
use sigil_testkit::spire as spire_common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::ResourceExt;
use node_api_common::World;
use report::{Report, env, percentile};
use serde_json::{Value, json};
use sigil_e2e::pod::PodContainer;
use sigil_e2e::process::{cpu_time, rss_kib};
use spire_common::{Spire, SpireProfile};

/// First uid of the SPIRE workloads (one uid per workload).
const FIRST_UID: u32 = 40_000;

/// SignX509Svids through the Node API for `window`: (SVIDs per second, SVIDs per CPU-second
/// of this process).
async fn sigil_sign_rate(w: &World, window: Duration) -> (f64, f64) {
    let agent = w.attested_agent(&w.node_a).await;
    let entries = sign_load::node_entries(&agent).await;
    let requests = sign_load::svid_requests(&entries[..entries.len().min(100)]);
    assert!(!requests.is_empty(), "no entries on node A to sign for");
    let cpu0 = cpu_time(std::process::id());
    let (signed, wall) = sign_load::sign_for(&agent, &requests, 2, window).await;
    let cpu = (cpu_time(std::process::id()) - cpu0)
        .as_secs_f64()
        .max(1e-3);
    (signed as f64 / wall, signed as f64 / cpu)
}

/// (Sigil's CA signing SVIDs, the same signer with an RSA-3072 CA, ring's raw ECDSA P-256
/// signatures, ring's P-256 verifications), each on one thread, per second, 2 s each.
fn signer_and_raw_rates(w: &World) -> (f64, f64, f64, f64) {
    let window = Duration::from_secs(2);
    let authority = w.replica.authorities.get(&w.td).expect("authority");
    let key = sigil_identity::keys::PrivateKey::generate(sigil_identity::keys::KeyType::EcP256)
        .expect("key");
    let spki = key.public_key_der();
    let id = w.td.id("/bench").expect("id");
    let template = sigil_identity::ca::SvidTemplate {
        spiffe_id: &id,
        ttl: Duration::from_secs(3600),
        dns_names: &[],
    };
    let signer = report::rate(window, || {
        authority
            .x509_ca
            .sign_public_key(&spki, &template, std::time::SystemTime::now())
            .expect("sign");
    });
    // The same SVIDs from an RSA-3072 CA (`spec.ca.keyType: RSA-3072`).
    let rsa_ca = sigil_identity::ca::CertificateAuthority::new_self_signed(
        &sigil_identity::ca::CaParams {
            trust_domain: w.td.clone(),
            key_type: sigil_identity::keys::KeyType::Rsa3072,
            ttl: Duration::from_secs(86400),
            subject: Default::default(),
        },
        std::time::SystemTime::now(),
    )
    .expect("RSA-3072 CA");
    let rsa_signer = report::rate(window, || {
        rsa_ca
            .sign_public_key(&spki, &template, std::time::SystemTime::now())
            .expect("sign");
    });
    let limit = sign_load::SignVerifyLimit::measure(window);
    (signer, rsa_signer, limit.sign, limit.verify)
}

fn p(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    percentile(v, q).as_secs_f64() * 1e3
}

/// Runs `client wait-x509` (in a pod's cgroup, or as `uid`) and says whether it got an
/// SVID within `limit`.
async fn wait_svid_within(mut cmd: std::process::Command, addr: &str, limit: Duration) -> bool {
    cmd.args([
        "--addr",
        addr,
        "wait-x509",
        "--timeout-ms",
        &limit.as_millis().to_string(),
    ]);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    // The client bounds itself; this bounds a client that does not.
    tokio::time::timeout(limit + Duration::from_secs(5), cmd.output())
        .await
        .is_ok_and(|o| o.is_ok_and(|o| o.status.success()))
}

/// [`wait_svid_within`] a minute.
async fn wait_svid(cmd: std::process::Command, addr: &str) -> bool {
    wait_svid_within(cmd, addr, Duration::from_secs(60)).await
}

fn as_uid(client: &Path, uid: u32) -> std::process::Command {
    let mut cmd = std::process::Command::new(client);
    cmd.uid(uid).gid(uid);
    cmd
}

/// How long one `load` run may take.
const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// `client load` against `addr`: (p50 ms, p99 ms), or why there is no figure.
async fn load(
    mut cmd: std::process::Command,
    addr: &str,
    c: usize,
    n: usize,
) -> Result<(f64, f64), String> {
    cmd.args([
        "--addr",
        addr,
        "load",
        "--concurrency",
        &c.to_string(),
        "--requests",
        &n.to_string(),
    ]);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(LOAD_LIMIT, cmd.output())
        .await
        .map_err(|_| format!("did not complete within {LOAD_LIMIT:?}"))?
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let f = |k: &str| {
        v[k].as_f64()
            .map(|x| x / 1e3)
            .ok_or(format!("no {k} in {v}"))
    };
    Ok((f("p50_us")?, f("p99_us")?))
}

fn main() {
    let one_n = env("SIGIL_BENCH_VS_ONE", 30);
    let burst_n = env("SIGIL_BENCH_VS_BURST", 1000);
    let stagger_n = env("SIGIL_BENCH_VS_STAGGER", 1000);
    let every = Duration::from_millis(env("SIGIL_BENCH_VS_STAGGER_MS", 100) as u64);
    let entries_n = env("SIGIL_BENCH_VS_ENTRIES", 10_000);
    let requests = env("SIGIL_BENCH_VS_REQUESTS", 2000);
    let streams_n = env("SIGIL_BENCH_VS_STREAMS", 1000);
    let agent_bin = std::env::var("SIGIL_AGENT_BIN")
        .expect("set SIGIL_AGENT_BIN to a built sigil-agent (make bench does)");
    let rt = report::runtime();
    rt.block_on(async move {
        let mut report = Report::new(
            "versus_spire",
            &format!("Sigil vs SPIRE on one machine: registration → SVID ({one_n} one at a time, alternating; burst of {burst_n}; {stagger_n} one every {every:?}), Workload API latency, footprint with {entries_n} entries"),
        );
        // Workloads of other uids must be able to run the client: copy it somewhere
        // world-readable.
        let bin_dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let client = bin_dir.path().join("rust-spiffe-client");
        std::fs::copy(env!("CARGO_BIN_EXE_rust-spiffe-client"), &client).expect("copy client");
        std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o755)).expect("chmod");

        // Sigil.
        let w = World::start("vs").await;
        let agent = agent_process::start(&w, &agent_bin).await;
        // SPIRE.
        let spire_dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(spire_dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut spire = Spire::new(&spire_dir.path().join("spire"), "spire.bench");
        spire.log_level = "INFO";
        std::fs::set_permissions(&spire.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        spire.start_server(&SpireProfile::Spiffe).await;
        spire.start_agent().await;
        spire.wait_agent().await;
        let spire_agent_pid = spire.agent.as_ref().expect("agent").pid();
        let spire_server_pid = spire.server.as_ref().expect("server").pid();
        let spire_addr = spire.agent_addr.clone();
        let parent = format!("spiffe://{}/agent", spire.td);

        // Footprint, idle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (c0, s0) = (cpu_time(agent.pid), cpu_time(spire_agent_pid));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (c1, s1) = (cpu_time(agent.pid), cpu_time(spire_agent_pid));
        report.lower_better("agent RSS, idle (attested, no workloads)", rss_kib(agent.pid) as f64 / 1024.0, rss_kib(spire_agent_pid) as f64 / 1024.0, "MiB");
        report.lower_better("agent CPU over 10 s idle", (c1 - c0).as_secs_f64() * 1e3, (s1 - s0).as_secs_f64() * 1e3, "ms ");
        report.row("SPIRE server RSS, idle", format!("{:.1} MiB (Sigil's operator runs in this process here; see the servers bench)", rss_kib(spire_server_pid) as f64 / 1024.0));

        // 1. Registration → SVID, one at a time, alternating.
        w.cluster_spiffe_id(&format!("{}-vs", w.tag), "vs").await;
        let mut keep = Vec::new();
        let (mut sigil_one, mut spire_one) = (Vec::new(), Vec::new());
        let mut failed = (0, 0);
        for i in 0..one_n {
            let name = format!("one-{i}");
            let pod = w.pod(&name, &w.node_a, "web", json!({"app": "vs"})).await;
            let t0 = Instant::now();
            let container = PodContainer::create(&pod.uid().expect("uid")).expect("cgroup");
            container.mark_running(&w.client, &w.ns, &name, "main", "registry.invalid/none").await.expect("status");
            if wait_svid(container.command(&client), &agent.addr).await {
                sigil_one.push(t0.elapsed());
            } else {
                failed.0 += 1;
            }
            keep.push(container);

            let uid = FIRST_UID + i as u32;
            spire
                .cli(&["entry", "create", "-parentID", &parent, "-spiffeID", &format!("spiffe://{}/one/{i}", spire.td), "-selector", &format!("unix:uid:{uid}")])
                .await;
            let t0 = Instant::now();
            if wait_svid(as_uid(&client, uid), &spire_addr).await {
                spire_one.push(t0.elapsed());
            } else {
                failed.1 += 1;
            }
        }
        report.lower_better("registration → SVID, one at a time, p50", p(&mut sigil_one, 0.5), p(&mut spire_one, 0.5), "ms ");
        report.lower_better("registration → SVID, one at a time, p99", p(&mut sigil_one, 0.99), p(&mut spire_one, 0.99), "ms ");

        // 1b. Burst: all identities declared at once (SPIRE: one entry-create call for all;
        // Sigil: every Pod created concurrently), every workload's client started as soon
        // as it can run (Sigil: once its Pod is created, its cgroup made and its status
        // Running, as a kubelet would), each sample from the start of the burst.
        let t0 = Instant::now();
        // (SVID received, Running) after t0, and the pod's container.
        let samples: Vec<(Option<Duration>, Duration, PodContainer)> = futures::future::join_all((0..burst_n).map(|i| {
            let (w, addr, client) = (&w, agent.addr.clone(), &client);
            async move {
                let name = format!("burst-{i}");
                let pod = w.pod(&name, &w.node_a, "web", json!({"app": "vs"})).await;
                let container = PodContainer::create(&pod.uid().expect("uid")).expect("cgroup");
                container.mark_running(&w.client, &w.ns, &name, "main", "registry.invalid/none").await.expect("status");
                let running = t0.elapsed();
                let got = wait_svid(container.command(client), &addr).await.then(|| t0.elapsed());
                (got, running, container)
            }
        }))
        .await;
        let sigil_burst: Vec<Option<Duration>> = samples.iter().map(|s| s.0).collect();
        let mut running: Vec<Duration> = samples.iter().map(|s| s.1).collect();
        let containers = samples.into_iter().map(|s| s.2);
        keep.extend(containers);
        let entries: Vec<Value> = (0..burst_n)
            .map(|i| spire.uid_entry(&format!("/burst/{i}"), &parent, FIRST_UID + (one_n + i) as u32))
            .collect();
        let t0 = Instant::now();
        spire.create_entries("burst", &entries).await;
        let spire_burst: Vec<Option<Duration>> = futures::future::join_all((0..burst_n).map(|i| {
            let cmd = as_uid(&client, FIRST_UID + (one_n + i) as u32);
            let addr = spire_addr.clone();
            async move { wait_svid(cmd, &addr).await.then(|| t0.elapsed()) }
        }))
        .await;
        let ok = |v: Vec<Option<Duration>>| -> (Vec<Duration>, usize) {
            let failed = v.iter().filter(|x| x.is_none()).count();
            (v.into_iter().flatten().collect(), failed)
        };
        let (mut sb, sf) = ok(sigil_burst);
        let (mut pb, pf) = ok(spire_burst);
        report.lower_better(&format!("registration → SVID, burst of {burst_n}, p50"), p(&mut sb, 0.5), p(&mut pb, 0.5), "ms ");
        report.lower_better(&format!("registration → SVID, burst of {burst_n}, p99 (≈ all done)"), p(&mut sb, 0.99), p(&mut pb, 0.99), "ms ");
        report.row(
            "  of which Sigil's Pods created and Running (apiserver), p50 / p99",
            format!("{:.0} / {:.0} ms (the kubelet's part, done here through the apiserver)", p(&mut running, 0.5), p(&mut running, 0.99)),
        );
        report.row("  failed registrations (Sigil, SPIRE)", format!("{}, {}", failed.0 + sf, failed.1 + pf));

        // 1c. One after another at a steady pace: one identity declared every `every`,
        // each on its own API call, without waiting for earlier ones. Unlike the strict
        // one-at-a-time loop above, this does not phase-lock SPIRE's entry creation to its
        // agent's 5 s sync: the declarations land anywhere in the sync period, as they do
        // in a cluster. Each system runs alone, Sigil first. Run side by side (as before
        // 2026-12-06), SPIRE's side (a `spire-server entry create` process every 100 ms,
        // and some fifty clients each asking its agent every 20 ms while they wait out
        // its sync) shared the 2 cores with Sigil's: Sigil's p99 was 5.1 s, against 37 ms
        // alone (the `agent` bench's paced rows, which split it by phase).
        let first_stagger_uid = FIRST_UID + (one_n + burst_n) as u32;
        let start = tokio::time::Instant::now();
        let sigil_side = futures::future::join_all((0..stagger_n).map(|i| {
            let (w, addr, client) = (&w, agent.addr.clone(), &client);
            async move {
                tokio::time::sleep_until(start + every * i as u32).await;
                let name = format!("paced-{i}");
                let pod = w.pod(&name, &w.node_a, "web", json!({"app": "vs"})).await;
                let t0 = Instant::now();
                let container = PodContainer::create(&pod.uid().expect("uid")).expect("cgroup");
                container.mark_running(&w.client, &w.ns, &name, "main", "registry.invalid/none").await.expect("status");
                let got = wait_svid(container.command(client), &addr).await.then(|| t0.elapsed());
                (got, container)
            }
        }));
        let sigil_paced = sigil_side.await;
        let start = tokio::time::Instant::now();
        let spire_side = futures::future::join_all((0..stagger_n).map(|i| {
            let (spire, parent, client, addr) = (&spire, &parent, &client, spire_addr.clone());
            async move {
                tokio::time::sleep_until(start + every * i as u32).await;
                let uid = first_stagger_uid + i as u32;
                spire
                    .cli(&["entry", "create", "-parentID", parent, "-spiffeID", &format!("spiffe://{}/paced/{i}", spire.td), "-selector", &format!("unix:uid:{uid}")])
                    .await;
                let t0 = Instant::now();
                wait_svid(as_uid(client, uid), &addr).await.then(|| t0.elapsed())
            }
        }));
        let spire_paced = spire_side.await;
        let (sigil_paced, containers): (Vec<_>, Vec<_>) = sigil_paced.into_iter().unzip();
        keep.extend(containers);
        let (mut sp, spf) = ok(sigil_paced);
        let (mut pp, ppf) = ok(spire_paced);
        report.lower_better(&format!("registration → SVID, {stagger_n} declared one every {every:?}, p50"), p(&mut sp, 0.5), p(&mut pp, 0.5), "ms ");
        report.lower_better(&format!("registration → SVID, {stagger_n} declared one every {every:?}, p99"), p(&mut sp, 0.99), p(&mut pp, 0.99), "ms ");
        report.row("  failed registrations (Sigil, SPIRE)", format!("{spf}, {ppf}"));
        let registered = one_n + burst_n + stagger_n;

        // 4. Footprint with the workloads registered.
        report.lower_better(&format!("agent RSS with {registered} workloads registered"), rss_kib(agent.pid) as f64 / 1024.0, rss_kib(spire_agent_pid) as f64 / 1024.0, "MiB");
        report.row(&format!("SPIRE server RSS with {registered} entries"), format!("{:.1} MiB", rss_kib(spire_server_pid) as f64 / 1024.0));

        // 4b. Footprint with `entries_n` entries on the node: more identities on each side
        // (Sigil: Pods on the agent's Node, no containers; SPIRE: entries parented to its
        // agent, 1000 per call), then each agent's RSS once it holds them. Sigil's agent
        // signs ahead for every entry; SPIRE's keeps every entry and an LRU of X509-SVIDs
        // (`x509_svid_cache_max_size`, 1000 by default).
        if entries_n > registered {
            let more = entries_n - registered;
            futures::stream::iter((0..more).map(|i| {
                let w = &w;
                async move { w.pod(&format!("held-{i}"), &w.node_a, "web", json!({"app": "vs"})).await }
            }))
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
            let first_uid = FIRST_UID + registered as u32;
            let entries: Vec<Value> = (0..more)
                .map(|i| spire.uid_entry(&format!("/held/{i}"), &parent, first_uid + i as u32))
                .collect();
            for (n, chunk) in entries.chunks(1000).enumerate() {
                spire.create_entries(&format!("held-{n}"), chunk).await;
            }
            // Sigil: every entry's SVID signed. SPIRE: the last entry's SVID served, so its
            // agent has synced them all.
            sigil_e2e::eventually(&format!("sigil-agent to hold {entries_n} SVIDs"), Duration::from_secs(300), || async {
                let text = sigil_e2e::http::get_ok(agent.health, "/metrics").await?;
                (sigil_e2e::http::metric(&text, "sigil_agent_svids_signed_total")? >= entries_n as f64).then_some(())
            })
            .await;
            let last = first_uid + more as u32 - 1;
            let spire_synced = wait_svid(as_uid(&client, last), &spire_addr).await;
            // One more SPIRE sync period for its caches to settle.
            tokio::time::sleep(Duration::from_secs(6)).await;
            report.lower_better(&format!("agent RSS with {entries_n} entries on its node"), rss_kib(agent.pid) as f64 / 1024.0, rss_kib(spire_agent_pid) as f64 / 1024.0, "MiB");
            report.row("  what each agent holds", format!("Sigil: {entries_n} X509-SVIDs and keys (signed ahead) | SPIRE: {entries_n} entries, X509-SVIDs for up to 1000 (LRU default){}", if spire_synced { "" } else { "; its last entry was NOT served within 60 s" }));
            report.row(&format!("SPIRE server RSS with {entries_n} entries"), format!("{:.1} MiB", rss_kib(spire_server_pid) as f64 / 1024.0));
        }

        // 3a. Open streams: `streams_n` FetchX509SVID streams held by one workload per side
        // (each on its own connection), then one change to that workload's entry (one more
        // DNS name), which every stream must receive as a new SVID. Sigil: a Pod of its
        // own ClusterSPIFFEID, which is patched; SPIRE: an entry of its own uid, updated
        // through the admin API (`entry update`). Sigil first, then SPIRE.
        if streams_n > 0 {
            let csid = format!("{}-vs-streams", w.tag);
            w.cluster_spiffe_id(&csid, "vs-streams").await;
            let pod = w.pod("streams-0", &w.node_a, "web", json!({"app": "vs-streams"})).await;
            let holder = PodContainer::create(&pod.uid().expect("uid")).expect("cgroup");
            holder.mark_running(&w.client, &w.ns, "streams-0", "main", "registry.invalid/none").await.expect("status");
            assert!(wait_svid(holder.command(&client), &agent.addr).await, "Sigil's streams workload got no SVID");
            let sigil = held_streams::hold(holder.command(&client), &agent.addr, streams_n, agent.pid, async {
                let patch = json!({"spec": {"dnsNameTemplates": ["{{pod.name}}.{{node.labels['zone']}}", "{{pod.name}}.changed"]}});
                kube::Api::<sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID>::all(w.client.clone())
                    .patch(&csid, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
                    .await
                    .expect("patch the streams ClusterSPIFFEID");
            })
            .await;
            keep.push(holder);

            let uid = FIRST_UID + registered.max(entries_n) as u32 + 1;
            let id = format!("spiffe://{}/streams", spire.td);
            let selector = format!("unix:uid:{uid}");
            let created: Value = serde_json::from_str(
                &spire.cli(&["entry", "create", "-parentID", &parent, "-spiffeID", &id, "-selector", &selector, "-dns", "streams.example", "-output", "json"]).await,
            )
            .expect("entry create -output json");
            let entry_id = created["results"][0]["entry"]["id"].as_str().expect("the created entry's id").to_owned();
            assert!(wait_svid(as_uid(&client, uid), &spire_addr).await, "SPIRE's streams workload got no SVID");
            let spire_held = held_streams::hold(as_uid(&client, uid), &spire_addr, streams_n, spire_agent_pid, async {
                spire
                    .cli(&["entry", "update", "-entryID", &entry_id, "-parentID", &parent, "-spiffeID", &id, "-selector", &selector, "-dns", "streams.example", "-dns", "changed.example"])
                    .await;
            })
            .await;
            match (sigil, spire_held) {
                (Ok(a), Ok(b)) => {
                    report.lower_better(&format!("{streams_n} streams opened (one connection each), each with its first SVID"), a.open.as_secs_f64() * 1e3, b.open.as_secs_f64() * 1e3, "ms ");
                    report.lower_better(&format!("agent RSS per open stream ({streams_n} held)"), a.kib_per_stream(), b.kib_per_stream(), "KiB");
                    match (a.fan_out, b.fan_out) {
                        (Ok(x), Ok(y)) => report.lower_better(&format!("one entry change → new SVID on all {streams_n} streams"), x.as_secs_f64() * 1e3, y.as_secs_f64() * 1e3, "ms "),
                        (x, y) => report.row(&format!("one entry change → new SVID on all {streams_n} streams"), format!("Sigil {x:?} | SPIRE {y:?}")),
                    }
                }
                (a, b) => report.row(
                    &format!("{streams_n} open streams"),
                    format!("Sigil {} | SPIRE {}", a.err().unwrap_or_else(|| "ok".into()), b.err().unwrap_or_else(|| "ok".into())),
                ),
            }
        }

        // 3. Workload API latency, one workload per side, alternating per level.
        for c in [1usize, 100, 1000] {
            let n = requests.max(c);
            let sigil = load(keep[0].command(&client), &agent.addr, c, n).await;
            let spire_r = load(as_uid(&client, FIRST_UID), &spire_addr, c, n).await;
            match (sigil, spire_r) {
                (Ok(a), Ok(b)) => {
                    report.lower_better(&format!("FetchX509SVID, {c} concurrent connections, p50"), a.0, b.0, "ms ");
                    report.lower_better(&format!("FetchX509SVID, {c} concurrent connections, p99"), a.1, b.1, "ms ");
                }
                (a, b) => {
                    let show = |r: Result<(f64, f64), String>| {
                        r.map_or_else(|e| e, |(p50, p99)| format!("p50 {p50:.2} ms, p99 {p99:.2} ms"))
                    };
                    report.row(
                        &format!("FetchX509SVID, {c} concurrent connections"),
                        format!("Sigil {} | SPIRE {}", show(a), show(b)),
                    );
                }
            }
        }
        // Does each Workload API still answer after the largest load (its clients were
        // stopped, finished or not)?
        let sigil_up = wait_svid_within(keep[0].command(&client), &agent.addr, Duration::from_secs(30)).await;
        let spire_up = wait_svid_within(as_uid(&client, FIRST_UID), &spire_addr, Duration::from_secs(30)).await;
        let yes_no = |up: bool| if up { "yes" } else { "NO: no SVID within 30 s" };
        report.row("Workload API answers a new client after the 1000-connection load", format!("Sigil {} | SPIRE {}", yes_no(sigil_up), yes_no(spire_up)));

        // 2. Issuance throughput.
        let window = Duration::from_secs(env("SIGIL_BENCH_VS_SIGN_SECS", 10) as u64);
        let (sigil_rate, sigil_cpu_rate) = sigil_sign_rate(&w, window).await;
        let spire_cpu0 = cpu_time(spire_server_pid);
        let mint = tokio::process::Command::new(sigil_e2e::tools::tool("spire-mint").expect("spire-mint (hack/bench.sh builds it)"))
            .args(["-api", "admin", "-socket", &spire.socket(), "-td", &spire.td, "-duration", &format!("{}s", window.as_secs()), "-concurrency", "4"])
            .output()
            .await
            .expect("spire-mint");
        let spire_cpu = cpu_time(spire_server_pid) - spire_cpu0;
        let minted: Value = String::from_utf8_lossy(&mint.stdout)
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("spire-mint: {}", String::from_utf8_lossy(&mint.stderr)));
        let spire_rate = minted["per_s"].as_f64().unwrap_or(0.0);
        let spire_cpu_rate = minted["minted"].as_f64().unwrap_or(0.0) / spire_cpu.as_secs_f64().max(1e-3);
        report.higher_better("X509-SVIDs signed per second through the server API (2 cores)", sigil_rate, spire_rate, "/s ");
        report.higher_better("X509-SVIDs per CPU-second of the server", sigil_cpu_rate, spire_cpu_rate, "/s ");
        let (signer, rsa_signer, raw, verify) = signer_and_raw_rates(&w);
        report.row("Sigil CA signer alone, one thread", format!("{signer:>10.0} SVIDs/s"));
        report.row("Sigil CA signer alone, RSA-3072 CA, one thread", format!("{rsa_signer:>10.0} SVIDs/s"));
        report.row("raw ECDSA P-256 signatures (ring), one thread", format!("{raw:>10.0} sig/s"));
        report.row("raw ECDSA P-256 verifications (ring), one thread", format!("{verify:>10.0} verify/s"));
        // Each API SVID costs at least one CSR verification and one signature.
        let bound = 1.0 / (1.0 / raw + 1.0 / verify);
        report.row("Sigil signer / raw sign limit", format!("{:.0}%", 100.0 * signer / raw));
        report.row("Sigil API per CPU-second / (sign + CSR verify) limit", format!("{:.0}% of {bound:.0}/s", 100.0 * sigil_cpu_rate / bound));

        report.row("SPIRE version", spire_common::spire_version().await);
        drop(keep);
        drop(spire);
        report.finish();
    });
}
