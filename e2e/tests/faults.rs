//! The reliability fault suite, short versions (#27): each test injects one fault into
//! a running system (real kube-apiserver + etcd processes, an operator replica and a
//! sigil-agent in this process, sigil-csi with files-mode volumes, workloads as real
//! processes in pod cgroups) while [`Invariants`] checks every workload and volume once a
//! second, and asserts zero violations, a bound on failed fetches and a recovery bound.
//! Each prints its figures in one `faults:` line (docs/reliability.md).
//!
//! TTLs are scaled down (ClusterSPIFFEID `ttl` of seconds) so that several rotations fall
//! inside a fault of tens of seconds.
//!
//! The tests stop and start the control plane this binary shares, so they run one at a
//! time ([`serial`]).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kube::api::Api;
use serde_json::json;
use sigil_identity::clock::ManualClock;
use sigil_identity::proto::csi as pb;
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_testkit::agent::{AgentWorld, Workload};
use sigil_testkit::csi::{Csi, csi_args, publish_request};
use sigil_testkit::invariants::{Expect, Invariants, Report, wait_current};
use sigil_testkit::node_api::{WorldOptions, create};
use sigil_testkit::operator_process::{lease_holder, operator_process};
use sigil_testkit::trust_domain::{SETTLE, eventually};
use tokio::io::{AsyncBufReadExt, BufReader};

const CLIENT: &str = env!("CARGO_BIN_EXE_rust-spiffe-client");

fn operator_bin() -> std::path::PathBuf {
    sigil_testkit::operator_process::operator_beside(CLIENT)
}

/// The longest failure window the pod-burst scenarios accept (see
/// `leader_killed_in_the_middle_of_a_pod_burst`).
const BURST_FAILURE_BOUND: Duration = Duration::from_secs(2);

/// One fault test at a time: they stop the control plane every test here shares.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    // What the components log while the faults run is printed with a failing test's
    // output: by default the agent's attestation and renewal steps and every component's
    // warnings, with their times, so a slow recovery can be placed (RUST_LOG overrides).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "error,sigil_agent=info,sigil_operator=warn,sigil_csi=warn",
        )
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A running system with selected workloads and files-mode volumes under the checker.
struct Scene {
    aw: AgentWorld,
    inv: Invariants,
    workloads: Vec<Workload>,
    /// The checker's target names (workloads, then volumes).
    targets: Vec<String>,
    csi: Option<Csi>,
    volumes: Vec<(String, PathBuf)>,
    ttl: Duration,
}

impl Scene {
    /// `workloads` pods (label app=fault, each its own SPIFFE ID by pod name) followed by
    /// the checker, `volumes` of them also with a files-mode volume; the X509-SVID TTL is
    /// `ttl`.
    async fn start(prefix: &str, ttl: Duration, workloads: usize, volumes: usize) -> Scene {
        Self::start_in(AgentWorld::start(prefix).await, ttl, workloads, volumes).await
    }

    /// As [`Scene::start`], in `aw`.
    async fn start_in(aw: AgentWorld, ttl: Duration, workloads: usize, volumes: usize) -> Scene {
        let tag = aw.w.tag.clone();
        create(
            &Api::<ClusterSPIFFEID>::all(aw.w.client.clone()),
            json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{tag}-fault")}, "spec": {
                "trustDomain": aw.w.td_object,
                "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
                "podSelector": {"matchLabels": {"app": "fault"}},
                "spiffeIDTemplate": "spiffe://{{trustDomain}}/ns/{{pod.namespace}}/pod/{{pod.name}}",
                "ttl": format!("{}s", ttl.as_secs()),
            }}),
        )
        .await;
        let mut scene = Scene {
            inv: Invariants::new(CLIENT),
            workloads: Vec::new(),
            targets: Vec::new(),
            csi: None,
            volumes: Vec::new(),
            ttl,
            aw,
        };
        for i in 0..workloads {
            let name = format!("w{i}");
            let w = scene
                .aw
                .workload(&name, "web", json!({"app": "fault"}))
                .await;
            let id = scene.id(&name);
            scene.aw.wait_svid(&id).await;
            scene
                .inv
                .watch_workload(&name, &w, &scene.aw.addr, Expect::one(&id, ttl));
            scene.targets.push(name);
            scene.workloads.push(w);
        }
        if volumes > 0 {
            let csi = Csi::start(csi_args(&scene.aw)).await;
            let mut client = csi.client().await;
            for i in 0..volumes {
                let pod = format!("w{i}");
                let target = scene.aw.dir.path().join("pods").join(&pod).join("identity");
                let token = scene.aw.w.token(&scene.workloads[i].pod, "sigil-csi").await;
                client
                    .node_publish_volume(publish_request(
                        &format!("vol-{pod}"),
                        &target,
                        &scene.workloads[i].pod,
                        Some(&token),
                        true,
                        &[("mode", "files")],
                    ))
                    .await
                    .unwrap();
                let name = format!("{pod}-files");
                scene
                    .inv
                    .watch_files(&name, &target, Expect::one(&scene.id(&pod), ttl));
                scene.targets.push(name);
                scene.volumes.push((format!("vol-{pod}"), target));
            }
            scene.csi = Some(csi);
        }
        // Every target checked once with a good SVID before the fault.
        let inv = &scene.inv;
        let targets = &scene.targets;
        eventually("every target to be checked", SETTLE, || async {
            let r = inv.report();
            targets
                .iter()
                .all(|t| r.targets.get(t).is_some_and(|t| t.current().is_some()))
                .then_some(())
        })
        .await;
        scene
    }

    /// The SPIFFE ID of pod `name`.
    fn id(&self, name: &str) -> String {
        format!("spiffe://{}/ns/{}/pod/{name}", self.aw.w.td, self.aw.w.ns)
    }

    /// How long after `since` until every target holds an SVID issued after `since`.
    async fn time_until_current(&self, since: SystemTime, within: Duration) -> Duration {
        let backdate = sigil_identity::ca::svid_backdate(self.ttl);
        wait_current(&self.inv, &self.targets, since, backdate, within).await
    }

    /// The number of X.509 authorities every target's bundle holds, when they agree.
    fn authorities_everywhere(&self) -> Option<usize> {
        let r = self.inv.report();
        let counts: BTreeSet<usize> = self
            .targets
            .iter()
            .map(|t| r.targets[t].x509_authorities)
            .collect();
        (counts.len() == 1).then(|| counts.into_iter().next().unwrap_or(0))
    }

    /// Rotations (new leaves first seen) of every target in `[from, to)`: the fewest.
    fn fewest_rotations(&self, from: SystemTime, to: SystemTime) -> usize {
        let r = self.inv.report();
        self.targets
            .iter()
            .map(|t| r.targets[t].leaves_between(from, to))
            .min()
            .unwrap_or(0)
    }

    /// A new selected pod, and the time from now until a process in it holds its SVID
    /// (pod object → identity index → agent → Workload API), with its phases: the pod
    /// written, the entry at the agent, the SVID in the pod.
    async fn new_pod_ready_after(
        &mut self,
        name: &str,
        labels: serde_json::Value,
    ) -> (Duration, [Duration; 3]) {
        let t = Instant::now();
        let w = self.aw.workload(name, "web", labels).await;
        let written = t.elapsed();
        let id = self.id(name);
        let cache = &self.aw.agent.cache;
        eventually("the new pod's entry at the agent", SETTLE * 4, || async {
            cache
                .entries()
                .iter()
                .any(|e| e.spiffe_id.to_string() == id)
                .then_some(())
        })
        .await;
        let entry = t.elapsed();
        let out = w
            .run(
                CLIENT,
                &[
                    "--addr",
                    &self.aw.addr,
                    "wait-x509",
                    "--timeout-ms",
                    "60000",
                ],
            )
            .await;
        let took = t.elapsed();
        let v = sigil_testkit::agent::json_out("wait-x509 in a new pod", &out);
        assert_eq!(v["spiffe_id"], self.id(name).as_str());
        self.workloads.push(w);
        (took, [written, entry, took])
    }

    /// Stops the checker, unpublishes the volumes and returns the checker's report.
    /// Pod `i` of a burst: a workload the checker follows, with a process in it that
    /// waits for its SVID (`wait-x509`); its name and that process.
    async fn burst_pod(&mut self, i: usize) -> (String, tokio::process::Child) {
        let name = format!("b{i}");
        let w = self
            .aw
            .workload(&name, "web", json!({"app": "fault"}))
            .await;
        let mut cmd = w.container.command(CLIENT);
        cmd.args([
            "--addr",
            &self.aw.addr,
            "wait-x509",
            "--timeout-ms",
            "60000",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        let fetch = tokio::process::Command::from(cmd).spawn().unwrap();
        self.workloads.push(w);
        (name, fetch)
    }

    /// A pod burst's outcome: every pod's fetch (`fetches`, one `wait-x509` per pod)
    /// returned that pod's own SVID, then the (new) leader's ClusterSPIFFEID status counts
    /// every pod, the scene's three workloads and the burst's. Returns the fetch attempts
    /// in all, when the burst was done (from `started`), and when the status was (from
    /// `killed`).
    async fn burst_outcome(
        &self,
        fetches: Vec<(String, tokio::process::Child)>,
        burst: usize,
        started: Instant,
        killed: Instant,
    ) -> (u64, Duration, Duration) {
        let mut attempts = 0;
        for (name, fetch) in fetches {
            let out = fetch.wait_with_output().await.unwrap();
            let v = sigil_testkit::agent::json_out(&format!("the SVID of burst pod {name}"), &out);
            assert_eq!(v["spiffe_id"], self.id(&name).as_str());
            attempts += v["attempts"].as_u64().unwrap();
        }
        let burst_done = started.elapsed();
        let csid = format!("{}-fault", self.aw.w.tag);
        let api = Api::<ClusterSPIFFEID>::all(self.aw.w.client.clone());
        let selected = 3 + burst as i64;
        eventually(
            "the new leader's status counting every pod",
            SETTLE,
            || async {
                let c = api.get(&csid).await.ok()?;
                (c.status?.stats.pods_selected == selected).then_some(())
            },
        )
        .await;
        (attempts, burst_done, killed.elapsed())
    }

    async fn finish(mut self) -> Report {
        let Scene {
            inv, csi, volumes, ..
        } = &mut self;
        let report = std::mem::replace(inv, Invariants::new(CLIENT)).stop().await;
        if let Some(csi) = csi.take() {
            let mut client = csi.client().await;
            for (id, target) in volumes.iter() {
                client
                    .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                        volume_id: id.clone(),
                        target_path: target.display().to_string(),
                    })
                    .await
                    .unwrap();
            }
            csi.stop().await;
        }
        report
    }
}

/// Pods in a burst: `SIGIL_FAULT_BURST`, default 40 (1000 is the size, not part of
/// make test).
fn burst_size() -> usize {
    std::env::var("SIGIL_FAULT_BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// The API server killed for four SVID half-lives: every workload keeps fetching a valid
/// SVID of its own and keeps rotating it (the operator signs with the CA it holds, the
/// agent serves from its caches), files-mode volumes rotate too; a CA prepare step that
/// falls due during the outage waits for it (nothing is minted that cannot be persisted)
/// and is done, and in every bundle, soon after. Once the API server is back, a new pod
/// gets its identity within the recovery bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_for_four_half_lives() {
    let _serial = serial().await;
    let cp = sigil_e2e::shared().await;
    // SIGIL_FAULT_OUTAGE_SECS lengthens the outage (1800 for the 30 minutes, in
    // real time); the SVID TTL stays half of it, so the same four half-lives fall inside.
    let outage = Duration::from_secs(
        std::env::var("SIGIL_FAULT_OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    let ttl = outage / 2;
    // The TrustDomain controller's clock, to make a CA prepare step due in the outage.
    let clock = ManualClock::new(SystemTime::now());
    let aw = AgentWorld::start_with(
        "f-apidown",
        WorldOptions {
            clock: Arc::new(clock.clone()),
            ..Default::default()
        },
    )
    .await;
    let mut s = Scene::start_in(aw, ttl, 3, 1).await;
    assert_eq!(s.authorities_everywhere(), Some(1));
    // The kubelet's part for an outage longer than the harness's 10-minute projected
    // tokens: the agent's token file is refreshed once the API server can mint one again.
    let _tokens = (outage > Duration::from_secs(300))
        .then(|| s.aw.refresh_agent_token(Duration::from_secs(30)));

    let down = SystemTime::now();
    cp.stop_apiserver();
    // Past the CA's half-life: the next CA is due. It can only be prepared once it can be
    // persisted (Kubernetes is the datastore), so it waits for the API server; meanwhile
    // the operator signs with the CA it holds.
    clock.advance(Duration::from_secs(13 * 3600));
    s.aw.w.replica.resync.trigger();
    tokio::time::sleep(outage).await;
    let prepared_during = s.authorities_everywhere();
    let rotations = s.fewest_rotations(down, SystemTime::now());
    let ready_during = s.aw.agent.readiness.is_ready();
    let t = Instant::now();
    cp.start_apiserver().await.unwrap();
    let apiserver_back = t.elapsed();
    let (new_pod, phases) = s.new_pod_ready_after("late", json!({"app": "fault"})).await;
    let recovery = apiserver_back + new_pod;
    let scene = &s;
    eventually(
        "the CA prepared after the outage in every target's bundle",
        SETTLE,
        || async { (scene.authorities_everywhere() == Some(2)).then_some(()) },
    )
    .await;
    let prepared_ca_after = t.elapsed();
    let r = s.finish().await;
    println!(
        "faults: api_server_down outage={} checks={} violations={} failed_fetches={} longest_failure={} rotations_during_outage(min per target)={rotations} agent_ready_during={ready_during} apiserver_ready_after={} new_pod_svid_after={} (pod written {}, entry at agent {}) recovery={} ca_prepare_due_in_outage: authorities_during={prepared_during:?} prepared_ca_in_every_bundle_after_return={}",
        secs(outage),
        r.checks(),
        r.violation_count(),
        r.failed(),
        secs(r.longest_failure()),
        secs(apiserver_back),
        secs(new_pod),
        secs(phases[0]),
        secs(phases[1]),
        secs(recovery),
        secs(prepared_ca_after),
    );
    r.assert_holds(Duration::ZERO);
    assert!(
        rotations >= 3,
        "every workload and volume rotates while the API server is down: {rotations} rotations in {outage:?}\n{r}"
    );
    assert!(
        ready_during,
        "the agent stays Ready through an API server outage"
    );
    assert_eq!(
        prepared_during,
        Some(1),
        "nothing is prepared that cannot be persisted"
    );
    assert!(
        prepared_ca_after < Duration::from_secs(20),
        "the CA step due during the outage is done and in every bundle within 20 s of the API server's restart: {prepared_ca_after:?}"
    );
    assert!(
        new_pod < Duration::from_secs(15),
        "a new pod's identity within 15 s of the API server's return: {new_pod:?}"
    );
}

/// An API server outage longer than the agent's own SVID lives. Renewing an agent SVID
/// proves the agent pod again (TokenReview), so it needs the API server; once the agent
/// SVID has expired the operator signs nothing for that agent, and the workloads' SVIDs
/// run out one TTL later. Scaled: agent SVID 20 s, workload SVIDs 10 s, outage 40 s. The
/// test holds what must hold (nothing wrong while the agent SVID is valid; an expired
/// SVID never served to a workload, which is told Unavailable and why instead; and
/// everything current again soon after the API server returns) and prints how long
/// workloads kept a valid identity (docs/reliability.md: the outage a cluster survives is
/// the agent SVID's remaining lifetime plus the workload SVIDs').
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_outage_past_the_agent_svid_lifetime() {
    let _serial = serial().await;
    let cp = sigil_e2e::shared().await;
    let ttl = Duration::from_secs(10);
    let agent_ttl = Duration::from_secs(20);
    let outage = Duration::from_secs(40);
    let aw = AgentWorld::start_with(
        "f-longout",
        WorldOptions {
            agent_svid_ttl: agent_ttl,
            ..Default::default()
        },
    )
    .await;
    let s = Scene::start_in(aw, ttl, 2, 1).await;
    let agent_svid_expires = s.aw.agent.node.svid().unwrap().not_after;

    let down = SystemTime::now();
    cp.stop_apiserver();
    tokio::time::sleep(outage).await;
    let during = s.inv.report();
    let t = Instant::now();
    cp.start_apiserver().await.unwrap();
    let back = SystemTime::now();
    s.time_until_current(back, SETTLE * 2).await;
    let current_after = t.elapsed();
    let r = s.finish().await;
    let since_down =
        |at: Option<SystemTime>| at.map(|a| secs(a.duration_since(down).unwrap_or_default()));
    let agent_valid_for = agent_svid_expires.duration_since(down).unwrap_or_default();
    println!(
        "faults: api_server_outage_past_agent_svid outage={} agent_svid_valid_for={} after the outage began; first_violation_after={:?} first_failed_fetch_after={:?} violations_during={:?} failed_during={} current_after_return={} checks={}",
        secs(outage),
        secs(agent_valid_for),
        since_down(during.first_violation_at),
        since_down(during.first_failure_at),
        during.violations,
        during.failed(),
        secs(current_after),
        r.checks(),
    );
    for at in [during.first_violation_at, during.first_failure_at]
        .into_iter()
        .flatten()
    {
        assert!(
            at >= agent_svid_expires,
            "something went wrong while the agent SVID was still valid: {r}"
        );
    }
    // Workloads are never handed an expired SVID: once theirs expired unrenewed, a fetch
    // fails (Unavailable, saying so) until the agent can have them signed again. A
    // files-mode volume keeps the files it holds (no file may go missing), so it is the
    // one place an expired certificate stays, counted above.
    for (name, t) in r.targets.iter().filter(|(n, _)| !n.ends_with("-files")) {
        assert_eq!(t.violations, 0, "{name} was served a wrong SVID: {r}");
        assert!(
            t.failed > 0,
            "{name}'s SVID expired in the outage, so some of its fetches fail: {r}"
        );
        assert!(
            t.last_error
                .as_deref()
                .is_some_and(|e| e.contains("expired")),
            "{name}'s fetches failed for another reason than its expired SVIDs: {:?}",
            t.last_error
        );
    }
    assert!(
        current_after < Duration::from_secs(15),
        "every workload and volume current within 15 s of the API server's restart: {current_after:?}"
    );
}

/// etcd killed and started again, then the API server killed and started again, with
/// every watch of the operator and the agent open: the invariants hold throughout, and a
/// ClusterSPIFFEID created afterwards reaches a running pod within the bound (the watches
/// resumed, not just reconnected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_and_api_server_restarts_with_watches_open() {
    let _serial = serial().await;
    let cp = sigil_e2e::shared().await;
    let ttl = Duration::from_secs(10);
    let mut s = Scene::start("f-restarts", ttl, 3, 1).await;

    let t = Instant::now();
    cp.restart_etcd().await.unwrap();
    let etcd_back = t.elapsed();
    tokio::time::sleep(ttl / 2).await;
    let t = Instant::now();
    cp.stop_apiserver();
    cp.start_apiserver().await.unwrap();
    let apiserver_back = t.elapsed();
    tokio::time::sleep(ttl / 2).await;

    // A pod no ClusterSPIFFEID selects yet, then one that selects it.
    let late = s.aw.workload("late", "web", json!({"app": "late"})).await;
    let tag = s.aw.w.tag.clone();
    let t = Instant::now();
    create(
        &Api::<ClusterSPIFFEID>::all(s.aw.w.client.clone()),
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{tag}-late")}, "spec": {
            "trustDomain": s.aw.w.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
            "podSelector": {"matchLabels": {"app": "late"}},
            "spiffeIDTemplate": "spiffe://{{trustDomain}}/late/{{pod.name}}",
            "ttl": "10s",
        }}),
    )
    .await;
    let out = late
        .run(
            CLIENT,
            &["--addr", &s.aw.addr, "wait-x509", "--timeout-ms", "60000"],
        )
        .await;
    let new_id = t.elapsed();
    let v = sigil_testkit::agent::json_out("wait-x509 after the restarts", &out);
    assert_eq!(
        v["spiffe_id"],
        format!("spiffe://{}/late/late", s.aw.w.td).as_str()
    );
    s.workloads.push(late);
    let r = s.finish().await;
    println!(
        "faults: etcd_and_api_server_restarts checks={} violations={} failed_fetches={} longest_failure={} etcd_restart_ready_after={} apiserver_restart_ready_after={} new_clusterspiffeid_to_workload={}",
        r.checks(),
        r.violation_count(),
        r.failed(),
        secs(r.longest_failure()),
        secs(etcd_back),
        secs(apiserver_back),
        secs(new_id),
    );
    r.assert_holds(Duration::ZERO);
    assert!(
        new_id < Duration::from_secs(10),
        "a ClusterSPIFFEID created after the restarts reaches its pod within 10 s: {new_id:?}"
    );
}

/// The agent cut off from the operator (the Node API stopped) for longer than an SVID
/// half-life, starting right after a rotation: workloads keep their valid SVID (no failed
/// fetch, nothing expired), and once the Node API is back every workload and volume holds
/// a freshly issued SVID within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_operator_partition_longer_than_a_half_life() {
    let _serial = serial().await;
    let ttl = Duration::from_secs(14);
    let partition = ttl / 2 + Duration::from_secs(1);
    let s = Scene::start("f-partition", ttl, 3, 1).await;

    // Start right after every target rotated, so what they hold outlives the partition:
    // the point is what workloads see past half-life, not an SVID that must expire.
    let backdate = sigil_identity::ca::svid_backdate(ttl);
    eventually(
        "every target to hold an SVID issued in the last 2 s",
        ttl * 2,
        || async {
            let now = SystemTime::now();
            let r = s.inv.report();
            s.targets
                .iter()
                .all(|t| {
                    r.targets[t]
                        .current()
                        .is_some_and(|l| l.not_before + backdate + Duration::from_secs(2) >= now)
                })
                .then_some(())
        },
    )
    .await;
    s.aw.w.stop_node_api().await;
    let cut = SystemTime::now();
    tokio::time::sleep(partition).await;
    let rotations = s.fewest_rotations(cut, SystemTime::now());
    let held_past_half_life = s
        .inv
        .report()
        .targets
        .values()
        .filter_map(|t| t.current())
        .all(|l| {
            let half = l.not_before + (l.not_after.duration_since(l.not_before).unwrap() / 2);
            half < SystemTime::now()
        });
    let healed = SystemTime::now();
    s.aw.w.restart_node_api().await;
    let current_after = s.time_until_current(healed, SETTLE).await;
    let r = s.finish().await;
    println!(
        "faults: agent_operator_partition partition={} checks={} violations={} failed_fetches={} longest_failure={} rotations_during={rotations} all_past_half_life_at_heal={held_past_half_life} all_current_after_heal={}",
        secs(partition),
        r.checks(),
        r.violation_count(),
        r.failed(),
        secs(r.longest_failure()),
        secs(current_after),
    );
    r.assert_holds(Duration::ZERO);
    assert_eq!(rotations, 0, "nothing can be signed during the partition");
    assert!(
        held_past_half_life,
        "the partition outlasted the half-life of what the workloads held"
    );
    assert!(
        current_after < Duration::from_secs(5),
        "every target current within 5 s of the partition healing: {current_after:?}"
    );
}

/// The agent and sigil-csi restarted together (as their DaemonSet pod is: SIGTERM, drain,
/// new processes) under 200 open Workload API streams and files-mode volumes: every stream
/// has an SVID again within the bound, the checker's fetches fail only while no agent
/// listens, the files never go missing, and the restarted sigil-csi writes the new
/// agent's SVIDs into the volumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_csi_restart_under_200_streams_and_files_volumes() {
    let _serial = serial().await;
    // SIGIL_FAULT_STREAMS=1000 SIGIL_FAULT_VOLUMES=100 for the size.
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (streams, volumes) = (
        env("SIGIL_FAULT_STREAMS", 200),
        env("SIGIL_FAULT_VOLUMES", 2),
    );
    let holder_pods = streams.div_ceil(100);
    let ttl = Duration::from_secs(20);
    let mut s = Scene::start("f-agentrestart", ttl, holder_pods.max(volumes), volumes).await;
    // Up to 100 streams in each pod (the per-workload connection limit is 128).
    let mut holders = Vec::new();
    for (i, w) in s.workloads.iter().take(holder_pods).enumerate() {
        let count = (streams - i * 100).min(100).to_string();
        let mut cmd = w.container.command(CLIENT);
        cmd.args([
            "--addr",
            &s.aw.addr,
            "streams",
            "--count",
            &count,
            "--reconnect",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(SETTLE, lines.next_line())
            .await
            .expect("the streams open")
            .unwrap()
            .expect("the streams client exited");
        assert!(ready.contains(&format!("\"ready\":{count}")), "{ready}");
        holders.push((child, lines, count));
    }
    let open =
        sigil_e2e::http::metric(&s.aw.metrics().await, "sigil_workload_api_open_streams").unwrap();
    assert!(open >= streams as f64, "{open} streams open");

    let restarted = SystemTime::now();
    let t = Instant::now();
    let csi_args = s.csi.take().unwrap().stop().await;
    s.aw.restart_agent().await;
    let agent_ready = t.elapsed();
    s.csi = Some(Csi::start(csi_args).await);
    let csi_ready = t.elapsed();
    let mut resumed = Duration::ZERO;
    for (_, lines, count) in &mut holders {
        let line = tokio::time::timeout(SETTLE, lines.next_line())
            .await
            .expect("every stream resumed")
            .unwrap()
            .expect("the streams client exited");
        assert!(line.contains(&format!("\"resumed\":{count}")), "{line}");
        resumed = resumed.max(t.elapsed());
    }
    // The new agent signs anew (its cache was in memory), and the restarted sigil-csi
    // picks its volumes up again and writes those SVIDs.
    let volume_targets: Vec<String> = s
        .targets
        .iter()
        .filter(|t| t.ends_with("-files"))
        .cloned()
        .collect();
    let backdate = sigil_identity::ca::svid_backdate(ttl);
    wait_current(&s.inv, &volume_targets, restarted, backdate, SETTLE).await;
    let volumes_current = t.elapsed();
    // A little longer under the checker, past a rotation of what the new agent issued.
    tokio::time::sleep(ttl / 2).await;
    drop(holders);
    let r = s.finish().await;
    println!(
        "faults: agent_and_csi_restart streams={streams} volumes={volumes} checks={} violations={} failed_fetches={} longest_failure={} new_agent_ready_after={} csi_serving_after={} all_streams_resumed_after={} volumes_written_by_new_csi_after={}",
        r.checks(),
        r.violation_count(),
        r.failed(),
        secs(r.longest_failure()),
        secs(agent_ready),
        secs(csi_ready),
        secs(resumed),
        secs(volumes_current),
    );
    r.assert_holds(Duration::from_secs(3));
    assert!(
        resumed < Duration::from_secs(10),
        "every stream has an SVID again within 10 s of the restart: {resumed:?}"
    );
    assert!(
        volumes_current < Duration::from_secs(10),
        "the volumes hold the new agent's SVIDs within 10 s of the restart: {volumes_current:?}"
    );
}

/// The leading operator replica killed (its tasks stopped where they are, the Lease not
/// released: an in-process stand-in for SIGKILL) in the middle of a burst of 40 pods, with
/// a second replica standing by and the agent configured with both Node API addresses:
/// the standby takes the Lease once it expires, the agent moves to its Node API, every
/// pod of the burst gets its identity, the new leader writes the ClusterSPIFFEID's status,
/// and the running workloads never miss a fetch or hold an expired SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_in_the_middle_of_a_pod_burst() {
    let _serial = serial().await;
    let burst = burst_size();
    let ttl = Duration::from_secs(10);
    let (aw, mut standby) = AgentWorld::start_with_two_replicas("f-failover").await;
    assert!(aw.w.replica.is_leader() && !standby.replica.is_leader());
    let mut s = Scene::start_in(aw, ttl, 3, 1).await;

    let burst_started = Instant::now();
    let mut fetches = Vec::new();
    for i in 0..burst / 2 {
        fetches.push(s.burst_pod(i).await);
    }
    s.aw.w.kill_replica().await;
    let (killed, killed_at) = (Instant::now(), SystemTime::now());
    // The takeover is timed while the burst goes on.
    let ((), leader_after) = tokio::join!(
        async {
            for i in burst / 2..burst {
                fetches.push(s.burst_pod(i).await);
            }
        },
        async {
            standby.replica.wait_leader(SETTLE).await;
            killed.elapsed()
        }
    );
    let (attempts, burst_done, status_after) =
        s.burst_outcome(fetches, burst, burst_started, killed).await;
    // The running workloads rotate through the standby too.
    s.time_until_current(killed_at, SETTLE).await;
    let rotated_after = killed.elapsed();
    let agent_on = s.aw.agent.node.address();
    let r = s.finish().await;
    println!(
        "faults: leader_killed_mid_burst burst={burst} checks={} violations={} failed_fetches={} longest_failure={} lease_taken_over_after={} burst_completed_in={} wait_x509_attempts={attempts} status_written_after_kill={} running_workloads_rotated_via_standby_after_kill={} agent_on={agent_on}",
        r.checks(),
        r.violation_count(),
        r.failed(),
        secs(r.longest_failure()),
        secs(leader_after),
        secs(burst_done),
        secs(status_after),
        secs(rotated_after),
    );
    // Stated bound: one check in a row may fail. A burst whose new pods each poll every
    // 20 ms has, at times, kept the agent from answering the running workloads within
    // their fetch's 2 s (three timeouts at one moment, once in several runs; cause not
    // found: docs/reliability.md).
    r.assert_holds(BURST_FAILURE_BOUND);
    assert_eq!(
        agent_on, standby.node_api_addr,
        "the agent moved to the standby"
    );
    assert!(
        leader_after < Duration::from_secs(5),
        "the standby leads within 5 s (Lease 2 s): {leader_after:?}"
    );
    assert!(
        burst_done < Duration::from_secs(30),
        "every pod of the burst has its SVID within 30 s: {burst_done:?}"
    );
}

/// As [`leader_killed_in_the_middle_of_a_pod_burst`], with real processes: two
/// sigil-operator processes (the test build's binary) serve the TrustDomain, and the one
/// holding the Lease is SIGKILLed at the burst's middle. The agent (in this process) has
/// both Node API addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_process_sigkilled_in_the_middle_of_a_pod_burst() {
    let _serial = serial().await;
    let burst = burst_size();
    let ttl = Duration::from_secs(10);
    let w = sigil_testkit::node_api::World::start("f-sigkill").await;
    // The world's in-process replica made the CA; the processes take over from here.
    w.kill_replica().await;
    let dir = tempfile::tempdir().unwrap();
    let lease = format!("sigil-proc-{}", w.tag);
    // Every pod here is on one node, and the TTL is scaled down 360 times from the default
    // hour, so at 1000 pods the node re-signs some 200 SVIDs a second: four times the
    // per-node signing budget a real node needs (50 CSRs/s, bursts of 1000), which refuses
    // the excess (seen at 1000: a pod past the 800th got no SVID within a minute). The budget is
    // scaled with the test above the default size; at the default 40 pods it is the
    // product's.
    let budget: Vec<String> = if burst > 40 {
        vec![
            "--node-sign-rate=2000".into(),
            "--node-sign-burst=10000".into(),
        ]
    } else {
        vec![]
    };
    let mut operators = [
        operator_process(
            &w,
            &operator_bin(),
            "sigil-operator-0",
            &lease,
            dir.path(),
            &budget,
        )
        .await,
        operator_process(
            &w,
            &operator_bin(),
            "sigil-operator-1",
            &lease,
            dir.path(),
            &budget,
        )
        .await,
    ];
    let client = w.client.clone();
    let ns = w.ns.clone();
    let leader = eventually("a leader among the processes", SETTLE, || async {
        lease_holder(&client, &ns, &lease).await
    })
    .await;
    let addresses = operators.iter().map(|o| o.node_api_addr.clone()).collect();
    let aw = AgentWorld::start_with_operators(w, addresses).await;
    let mut s = Scene::start_in(aw, ttl, 3, 1).await;

    let burst_started = Instant::now();
    let mut fetches = Vec::new();
    for i in 0..burst / 2 {
        fetches.push(s.burst_pod(i).await);
    }
    let op = operators.iter_mut().find(|o| o.name == leader).unwrap();
    let agent_was_on_leader = s.aw.agent.node.address() == op.node_api_addr;
    op.process.stop(); // SIGKILL, reaped
    let (killed, killed_at) = (Instant::now(), SystemTime::now());
    let survivor = operators.iter().find(|o| o.name != leader).unwrap();
    // The takeover is timed while the burst goes on (after it, it would be the burst's
    // remaining time at 1000 pods).
    let ((), leader_after) = tokio::join!(
        async {
            for i in burst / 2..burst {
                fetches.push(s.burst_pod(i).await);
            }
        },
        async {
            eventually("the survivor to hold the Lease", SETTLE, || async {
                (lease_holder(&client, &ns, &lease).await.as_deref()
                    == Some(survivor.name.as_str()))
                .then_some(())
            })
            .await;
            killed.elapsed()
        }
    );
    let (attempts, burst_done, status_after) =
        s.burst_outcome(fetches, burst, burst_started, killed).await;
    s.time_until_current(killed_at, SETTLE).await;
    let rotated_after = killed.elapsed();
    let agent_on = s.aw.agent.node.address();
    assert!(
        sigil_e2e::http::get_ok(survivor.health, "/ready")
            .await
            .is_some(),
        "the survivor stays Ready"
    );
    let survivor_addr = survivor.node_api_addr.clone();
    let r = s.finish().await;
    println!(
        "faults: leader_process_sigkilled_mid_burst burst={burst} checks={} violations={} failed_fetches={} longest_failure={} lease_taken_over_after={} (Lease 3 s) burst_completed_in={} wait_x509_attempts={attempts} status_written_after_kill={} running_workloads_rotated_via_survivor_after_kill={} agent_was_on_the_killed_leader={agent_was_on_leader}",
        r.checks(),
        r.violation_count(),
        r.failed(),
        secs(r.longest_failure()),
        secs(leader_after),
        secs(burst_done),
        secs(status_after),
        secs(rotated_after),
    );
    r.assert_holds(BURST_FAILURE_BOUND);
    assert_eq!(agent_on, survivor_addr, "the agent moved to the survivor");
    assert!(
        leader_after < Duration::from_secs(8),
        "the survivor leads within 8 s (Lease 3 s): {leader_after:?}"
    );
    assert!(
        burst_done < Duration::from_secs(30),
        "every pod of the burst has its SVID within 30 s: {burst_done:?}"
    );
}

/// The checker itself: what each scenario's "zero violations" rests on. Served an ID it
/// is not entitled to, an SVID longer-lived than the TTL it expects, a volume without
/// files and an agent that is gone, it counts each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_counts_each_kind_of_violation() {
    let _serial = serial().await;
    let ttl = Duration::from_secs(10);
    let mut s = Scene::start("f-checker", ttl, 1, 0).await;
    let w = &s.workloads[0];
    s.inv.watch_workload(
        "foreign",
        w,
        &s.aw.addr,
        Expect::one(&s.id("someone-else"), ttl),
    );
    s.inv.watch_workload(
        "short-ttl",
        w,
        &s.aw.addr,
        Expect::one(&s.id("w0"), Duration::from_secs(2)),
    );
    let nowhere = s.aw.dir.path().join("no-volume");
    s.inv
        .watch_files("missing", &nowhere, Expect::one(&s.id("w0"), ttl));
    let inv = &s.inv;
    eventually("each kind counted", SETTLE, || async {
        let r = inv.report();
        ["foreign_identity", "beyond_ttl", "file_missing"]
            .iter()
            .all(|k| r.violations.get(k).is_some_and(|n| *n > 0))
            .then_some(())
    })
    .await;
    // The agent gone for good: fetches fail, and the failure window grows.
    s.aw.cancel.cancel();
    let inv = &s.inv;
    eventually("a failure window of 2 s", SETTLE, || async {
        (inv.target("w0").longest_failure >= Duration::from_secs(2)).then_some(())
    })
    .await;
    let r = s.finish().await;
    println!("faults: checker self-test {r}");
    assert!(r.failed() > 0);
    assert_eq!(
        r.violations.keys().copied().collect::<Vec<_>>(),
        ["beyond_ttl", "file_missing", "foreign_identity"],
        "{r}"
    );
}
