//! The soak (#27): everything that changes in a living cluster, at once, for a while,
//! under the invariant checker, with the memory and open files of every component
//! sampled.
//!
//! - pods created and deleted continuously (each gets its SVID in a process inside it);
//! - the TrustDomain's CA rotating for real (`spec.ca.ttl` scaled down: prepared at
//!   half-life, activated, retired);
//! - the ClusterSPIFFEID edited (TTL and DNS names) on a period;
//! - a federated bundle changing (the partner's CA rotates; the FederatedBundle
//!   controller fetches it from its bundle endpoint and workloads receive it);
//! - three long-lived workloads and a files-mode volume checked every second.
//!
//! `make test` runs a short version (60 s, 2 pods/s, CA TTL 1m, an edit every 10 s, a
//! federated change every 15 s). `make soak` runs it for an hour at 5 pods/s with a CA
//! rotation every 10 minutes, an edit every minute and a federated change every 5
//! minutes (`SIGIL_SOAK_*` below). The operator replica, the agent and sigil-csi run in
//! this test process, so their memory and fds are measured together (the test process's);
//! kube-apiserver and etcd are their own processes.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use sigil_identity::proto::csi as pb;
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_testkit::agent::AgentWorld;
use sigil_testkit::csi::{Csi, csi_args, publish_request};
use sigil_testkit::federation::{Behaviour, FakeEndpoint, Foreign};
use sigil_testkit::invariants::{Expect, Invariants};
use sigil_testkit::node_api::{WorldOptions, create};
use sigil_testkit::trust_domain::{INSTANCE_LABEL, SETTLE, eventually};

const CLIENT: &str = env!("CARGO_BIN_EXE_rust-spiffe-client");

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One reading of a process.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: f64,
    rss_kib: f64,
    fds: f64,
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Least-squares slope of `f` over `samples` per hour, from the second quarter on (the
/// first is warm-up: caches, connection pools, the first CA rotation).
fn slope_per_hour(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    let s = &samples[samples.len() / 4..];
    if s.len() < 2 {
        return 0.0;
    }
    let n = s.len() as f64;
    let mx = s.iter().map(|x| x.at).sum::<f64>() / n;
    let my = s.iter().map(&f).sum::<f64>() / n;
    let cov: f64 = s.iter().map(|x| (x.at - mx) * (f(x) - my)).sum();
    let var: f64 = s.iter().map(|x| (x.at - mx).powi(2)).sum();
    if var == 0.0 { 0.0 } else { cov / var * 3600.0 }
}

/// The sum of every sample of metric `name` (all label sets).
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_pods_churn_ca_rotates_ids_edited_federation_changes() {
    let secs: u64 = env("SIGIL_SOAK_SECS", 60);
    let rate: f64 = env("SIGIL_SOAK_PODS_PER_SEC", 2.0);
    let ca_ttl: String = env("SIGIL_SOAK_CA_TTL", "1m".to_owned());
    let edit_every = Duration::from_secs(env("SIGIL_SOAK_EDIT_SECS", 10));
    let federation_every = Duration::from_secs(env("SIGIL_SOAK_FEDERATION_SECS", 15));
    // A churned pod lives this long before it is deleted.
    let pod_life = Duration::from_secs(3);
    let ttls = ["10s", "12s"];
    let max_ttl = Duration::from_secs(12);

    let cp = sigil_e2e::shared().await;
    let aw = AgentWorld::start_with(
        "soak",
        WorldOptions {
            ca_ttl: Some(ca_ttl.clone()),
            ..Default::default()
        },
    )
    .await;
    let tag = aw.w.tag.clone();
    // Projected tokens live 10 minutes here: the kubelet's part, refreshing them (the
    // agent's file, and the volume's through a republish), is the test's.
    let refresh_every = Duration::from_secs(240);
    let _token_refresher = aw.refresh_agent_token(refresh_every);

    // The partner trust domain, served by a bundle endpoint, federated with.
    let mut partner = Foreign::new(&format!("partner-{tag}.test"));
    partner.refresh_hint = Duration::from_secs(1);
    let endpoint = FakeEndpoint::start("127.0.0.1", Behaviour::Serve(partner.bundle_json())).await;
    let (chain, key) = partner.svid("/spire/server");
    endpoint.cert.set(&chain, &key).unwrap();
    let fb =
        Api::<sigil_operator::crd::federated_bundle::FederatedBundle>::all(aw.w.client.clone());
    create(
        &fb,
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "FederatedBundle",
            "metadata": {"name": format!("{tag}-partner"), "labels": {INSTANCE_LABEL: tag}},
            "spec": {
                "trustDomain": partner.td.name(),
                "bundleEndpointURL": endpoint.url,
                "bundleEndpointProfile": {"type": "https_spiffe", "endpointSPIFFEID": partner.td.id("/spire/server").unwrap().to_string()},
                "trustDomainBundle": partner.bundle().x509_pem(),
            }}),
    )
    .await;

    let csids = Api::<ClusterSPIFFEID>::all(aw.w.client.clone());
    let csid = format!("{tag}-soak");
    create(
        &csids,
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": csid}, "spec": {
            "trustDomain": aw.w.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
            "podSelector": {"matchLabels": {"app": "soak"}},
            "spiffeIDTemplate": "spiffe://{{trustDomain}}/ns/{{pod.namespace}}/pod/{{pod.name}}",
            "ttl": ttls[0],
            "federatesWith": [partner.td.name()],
        }}),
    )
    .await;
    let id = |pod: &str| format!("spiffe://{}/ns/{}/pod/{pod}", aw.w.td, aw.w.ns);

    // The long-lived workloads and a files-mode volume, under the checker.
    let mut inv = Invariants::new(CLIENT);
    let mut steady = Vec::new();
    for i in 0..3 {
        let name = format!("steady{i}");
        let w = aw.workload(&name, "web", json!({"app": "soak"})).await;
        aw.wait_svid(&id(&name)).await;
        inv.watch_workload(&name, &w, &aw.addr, Expect::one(&id(&name), max_ttl));
        steady.push(w);
    }
    let csi = Csi::start(csi_args(&aw)).await;
    let target = aw.dir.path().join("pods/steady0/identity");
    // NodePublishVolume as the kubelet sends it, first and at every republish
    // (`requiresRepublish`), with a fresh token.
    let publish = async || {
        let token = aw.w.token(&steady[0].pod, "sigil-csi").await;
        csi.client()
            .await
            .node_publish_volume(publish_request(
                "vol-steady0",
                &target,
                &steady[0].pod,
                Some(&token),
                true,
                &[("mode", "files")],
            ))
            .await
            .unwrap();
    };
    publish().await;
    inv.watch_files(
        "steady0-files",
        &target,
        Expect::one(&id("steady0"), max_ttl),
    );
    let partner_name = partner.td.name().to_owned();
    eventually("the partner's bundle at the workloads", SETTLE, || async {
        (inv.target("steady0").federated.get(&partner_name) == Some(&1)).then_some(())
    })
    .await;

    let pids = cp.pids();
    let me = std::process::id();
    let mut samples: [Vec<Sample>; 3] = Default::default();
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    // (when its fetch started, when the pod was created, name, its container, the fetch)
    let mut churn: VecDeque<(
        Instant,
        SystemTime,
        String,
        sigil_testkit::agent::Workload,
        _,
    )> = VecDeque::new();
    let (mut created, mut deleted, mut churn_ok, mut churn_failed) = (0u64, 0u64, 0u64, 0u64);
    let mut latencies = Vec::new();
    let (mut edits, mut federated_changes) = (0u64, 0u64);
    let mut authorities_seen = std::collections::BTreeSet::new();
    let mut next_pod = started;
    let mut next_edit = started + edit_every;
    let mut next_federation = started + federation_every;
    let mut next_sample = started;
    let mut next_republish = started + refresh_every;
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(aw.w.client.clone(), &aw.w.ns);
    let gone_now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };

    while Instant::now() < until {
        let now = Instant::now();
        if now >= next_sample {
            next_sample += Duration::from_secs(5);
            let at = started.elapsed().as_secs_f64();
            for (s, pid) in samples.iter_mut().zip([me, pids[1], pids[0]]) {
                s.push(Sample {
                    at,
                    rss_kib: sigil_e2e::process::rss_kib(pid) as f64,
                    fds: fds(pid) as f64,
                });
            }
            authorities_seen.insert(inv.target("steady0").x509_authorities);
            // A progress line every five minutes of a long run.
            if samples[0].len().is_multiple_of(60) {
                let r = inv.report();
                let s = samples[0].last().copied().unwrap();
                // What the components hold, to tell a leak in them from the test's own
                // growth: pods and entries in the index, entries in the agent's cache.
                let index = aw.w.index.metrics();
                println!(
                    "soak: at {:.0}s pods_created={created} churn_ok={churn_ok} churn_failed={churn_failed} checks={} violations={} failed_fetches={} authorities_seen={authorities_seen:?} test_process_rss={:.0}MiB fds={} index_pods={} index_entries={} agent_cache_entries={}",
                    s.at,
                    r.checks(),
                    r.violation_count(),
                    r.failed(),
                    s.rss_kib / 1024.0,
                    s.fds,
                    index.pods.get(),
                    index.entries.get(),
                    aw.agent.cache.entries().len(),
                );
            }
        }
        if now >= next_pod {
            next_pod += Duration::from_secs_f64(1.0 / rate);
            let name = format!("c{created}");
            let t0 = SystemTime::now();
            let w = aw.workload(&name, "web", json!({"app": "soak"})).await;
            let mut cmd = w.container.command(CLIENT);
            cmd.args(["--addr", &aw.addr, "wait-x509", "--timeout-ms", "20000"]);
            let fetch = tokio::process::Command::from(cmd).output();
            churn.push_back((Instant::now(), t0, name, w, Box::pin(fetch)));
            created += 1;
        }
        while churn.front().is_some_and(|(t, ..)| t.elapsed() >= pod_life) {
            let (_, t0, name, w, fetch) = churn.pop_front().unwrap();
            let out = fetch.await.unwrap();
            let ok = out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .is_ok_and(|v| v["spiffe_id"] == id(&name).as_str());
            if ok {
                churn_ok += 1;
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                // Pod object created → SVID in the process in the pod.
                let at_ms = v["at_ms"].as_u64().unwrap_or(0) as u128;
                latencies.push(at_ms.saturating_sub(sigil_testkit::invariants::ms(t0)));
            } else {
                churn_failed += 1;
                eprintln!(
                    "soak: churned pod {name} got no SVID: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            // Gone at once, as the kubelet's final delete (grace 0) removes it once its
            // containers stopped; with the default grace the Pod would stay Terminating
            // forever here (no kubelet), and the index and agent would keep it.
            pods.delete(&name, &gone_now).await.unwrap();
            drop(w);
            deleted += 1;
        }
        if now >= next_edit {
            next_edit += edit_every;
            edits += 1;
            let ttl = ttls[(edits % 2) as usize];
            csids
                .patch(
                    &csid,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"ttl": ttl, "dnsNameTemplates": [format!("edit{edits}.{{{{pod.name}}}}.example")]}})),
                )
                .await
                .unwrap();
        }
        if now >= next_republish {
            next_republish += refresh_every;
            publish().await;
        }
        if now >= next_federation {
            next_federation += federation_every;
            partner.rotate();
            endpoint.set(Behaviour::Serve(partner.bundle_json()));
            federated_changes += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ran = started.elapsed();
    // The last federated change reaches the workloads.
    let expected = partner.cas.len();
    let t = Instant::now();
    eventually(
        "the partner's last bundle at the workloads",
        SETTLE,
        || async {
            (inv.target("steady0").federated.get(&partner_name) == Some(&expected)).then_some(())
        },
    )
    .await;
    let federated_delivered_in = t.elapsed();
    for (_, _, name, w, fetch) in churn.drain(..) {
        let _ = fetch.await;
        let _ = pods.delete(&name, &gone_now).await;
        drop(w);
    }
    let held = format!(
        "index_pods={} index_entries={} agent_cache_entries={}",
        aw.w.index.metrics().pods.get(),
        aw.w.index.metrics().entries.get(),
        aw.agent.cache.entries().len()
    );
    let agent_metrics = aw.metrics().await;
    let svids_signed = metric_sum(&agent_metrics, "sigil_agent_svids_signed_total");
    let index_events = {
        let mut registry = prometheus_client::registry::Registry::default();
        aw.w.index.metrics().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        metric_sum(&text, "sigil_index_events_total") + metric_sum(&text, "events_total")
    };
    let report = inv.stop().await;
    let mut client = csi.client().await;
    client
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: "vol-steady0".into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    csi.stop().await;

    latencies.sort_unstable();
    let p = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let names = [
        "test process (operator+agent+csi)",
        "kube-apiserver",
        "etcd",
    ];
    let mut resources = String::new();
    for (n, s) in names.iter().zip(&samples) {
        let last = s.last().copied().unwrap_or(Sample {
            at: 0.0,
            rss_kib: 0.0,
            fds: 0.0,
        });
        resources.push_str(&format!(
            " | {n}: rss {:.0} MiB ({:+.0} MiB/h), fds {} ({:+.0}/h)",
            last.rss_kib / 1024.0,
            slope_per_hour(s, |x| x.rss_kib) / 1024.0,
            last.fds,
            slope_per_hour(s, |x| x.fds),
        ));
    }
    println!(
        "soak: ran={:.0}s pods_created={created} pods_deleted={deleted} churn_svids_ok={churn_ok} churn_failed={churn_failed} churn_p50={}ms churn_p99={}ms ca_authorities_seen={authorities_seen:?} csid_edits={edits} federated_changes={federated_changes} last_federated_change_delivered_in={:.1}s svids_signed={svids_signed} index_events={index_events} checks={} violations={} failed_fetches={} longest_failure={:.1}s {held}{resources}",
        ran.as_secs_f64(),
        p(0.5),
        p(0.99),
        federated_delivered_in.as_secs_f64(),
        report.checks(),
        report.violation_count(),
        report.failed(),
        report.longest_failure().as_secs_f64(),
    );
    // Stated bound: one check in a row may fail (a fetch not answered within its 2 s):
    // the 30-minute run (niced, on a 2-core machine busy with other builds) had three
    // such, one per workload at the same moment, cause not found (docs/reliability.md).
    report.assert_holds(Duration::from_secs(2));
    assert_eq!(churn_failed, 0, "every churned pod got its own SVID");
    assert!(
        created as f64 >= rate * secs as f64 * 0.8,
        "the churn kept its rate: {created} pods"
    );
    assert!(
        authorities_seen.contains(&2),
        "a CA rotation (two authorities published) happened during the soak: {authorities_seen:?}"
    );
    assert!(federated_changes > 0 && edits > 0);
}
