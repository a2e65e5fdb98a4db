//! sigil-agent over time: a streaming client gets each new SVID before the current one
//! passes half-life, a CA rotation's new bundle reaches open streams, and the agent keeps
//! serving through a Node API outage and picks up new work once it is back.
#![allow(clippy::unwrap_used)]

use sigil_testkit::node_api as node_api_common;
use sigil_testkit::trust_domain as trust_domain_common;

use sigil_testkit::agent as agent_common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_common::*;
use kube::api::Api;
use node_api_common::WorldOptions;
use serde_json::json;
use sigil_identity::clock::ManualClock;
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use tokio::io::{AsyncBufReadExt, BufReader};
use trust_domain_common::SETTLE;

/// The next line the watching client printed.
async fn next(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> serde_json::Value {
    let line = tokio::time::timeout(SETTLE, lines.next_line())
        .await
        .expect("no update in time")
        .unwrap()
        .expect("client exited");
    serde_json::from_str(&line).unwrap()
}

/// The Rust spiffe crate's X509Source in `workload`'s pod (`rust-spiffe-client watch`),
/// printing one line per update: the process (killed when dropped) and its lines.
fn watch(
    workload: &Workload,
    addr: &str,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let mut cmd = workload
        .container
        .command(env!("CARGO_BIN_EXE_rust-spiffe-client"));
    cmd.args(["--addr", addr, "watch", "--updates", "1000"])
        .stdout(std::process::Stdio::piped());
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

fn ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_get_rotated_svids_before_half_life_and_new_bundles() {
    let clock = ManualClock::new(SystemTime::now());
    let aw = AgentWorld::start_with(
        "rot",
        WorldOptions {
            clock: Arc::new(clock.clone()),
            ..Default::default()
        },
    )
    .await;
    let tag = aw.w.tag.clone();
    node_api_common::create(
        &Api::<ClusterSPIFFEID>::all(aw.w.client.clone()),
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{tag}-rot")}, "spec": {
            "trustDomain": aw.w.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
            "podSelector": {"matchLabels": {"app": "rot"}},
            "ttl": "12s",
        }}),
    )
    .await;
    let pod = aw.workload("rot-1", "web", json!({"app": "rot"})).await;
    aw.wait_svid(&aw.id_for_sa("web")).await;

    let (mut child, mut lines) = watch(&pod, &aw.addr);
    let open_streams = || async {
        sigil_e2e::http::metric(&aw.metrics().await, "sigil_workload_api_open_streams")
            .expect("sigil_workload_api_open_streams")
    };

    // Two rotations: each new SVID arrives before the previous one's half-life.
    let mut current = next(&mut lines).await;
    let mut rotations = 0;
    while rotations < 2 {
        let update = next(&mut lines).await;
        if update["leaf_sha256"] != current["leaf_sha256"] {
            let old = sigil_identity::x509::inspect_leaf(
                &hex::decode(current["leaf_der_hex"].as_str().unwrap()).unwrap(),
            )
            .unwrap();
            let half = old.not_before + old.not_after.duration_since(old.not_before).unwrap() / 2;
            let arrived = update["at_ms"].as_u64().unwrap() as u128;
            assert!(
                arrived < ms(half),
                "new SVID arrived {} ms after the old one's half-life",
                arrived - ms(half)
            );
            println!(
                "rotation {rotations}: new SVID {} ms before the old one's half-life",
                ms(half) - arrived
            );
            rotations += 1;
        }
        current = update;
    }

    // CA rotation: move the TrustDomain controller's clock past the CA's half-life; the
    // prepared CA is published, and the open stream sees a bundle with both CAs.
    let before = current["bundle_authorities"].as_u64().unwrap();
    assert_eq!(before, 1);
    clock.advance(Duration::from_secs(13 * 3600));
    aw.w.replica.resync.trigger();
    loop {
        let update = next(&mut lines).await;
        if update["bundle_authorities"].as_u64().unwrap() == 2 {
            break;
        }
    }
    // The stream is counted while it is open, and no longer once its client is gone:
    // the agent drops a stream with its connection.
    assert!(open_streams().await >= 1.0);
    child.kill().await.unwrap();
    sigil_e2e::eventually(
        "the killed client's stream to be dropped",
        SETTLE,
        || async { (open_streams().await == 0.0).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_through_a_node_api_outage_and_resumes() {
    let aw = AgentWorld::start("outage").await;
    let tag = aw.w.tag.clone();
    aw.w.cluster_spiffe_id(&format!("{tag}-web"), "web").await;
    let web = aw.workload("web-1", "web", json!({"app": "web"})).await;
    let id = aw.id_for_sa("web");
    aw.wait_svid(&id).await;
    let go = tool("go-spiffe-client");
    let before = json_out(
        "x509 before",
        &web.run(&go, &["-addr", &aw.addr, "x509"]).await,
    );
    let jwt_before = json_out(
        "jwt before",
        &web.run(&go, &["-addr", &aw.addr, "jwt", "-audience", "db"])
            .await,
    );

    aw.w.stop_node_api().await;
    // While the operator is away, the SVID and the (cached) JWT-SVID are still served.
    for _ in 0..3 {
        let during = json_out(
            "x509 during the outage",
            &web.run(&go, &["-addr", &aw.addr, "x509"]).await,
        );
        assert_eq!(
            during["svids"][0]["leaf_sha256"],
            before["svids"][0]["leaf_sha256"]
        );
        let jwt = json_out(
            "jwt during the outage",
            &web.run(&go, &["-addr", &aw.addr, "jwt", "-audience", "db"])
                .await,
        );
        assert_eq!(jwt["token"], jwt_before["token"]);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        aw.agent.readiness.is_ready(),
        "an operator outage must not make the agent unready"
    );

    // Back: the agent reconnects on its own, and a new pod gets its identity.
    aw.w.restart_node_api().await;
    aw.w.cluster_spiffe_id(&format!("{tag}-api"), "api").await;
    let api = aw
        .workload("api-1", "intruder", json!({"app": "api"}))
        .await;
    let api_id = aw.id_for_sa("intruder");
    aw.wait_svid(&api_id).await;
    let x = json_out(
        "x509 after the outage",
        &api.run(&go, &["-addr", &aw.addr, "x509"]).await,
    );
    assert_eq!(x["svids"][0]["spiffe_id"], api_id.as_str());
}

/// SIGTERM (the cancel the signal handler fires): both sockets are gone at once, before
/// the drain, so a client's retry finds the next agent's socket instead of a listener that
/// no longer accepts; the open stream is ended by the agent rather than waited out, so the
/// agent stops well inside its drain grace. (A drain that outlives the pod's grace period
/// ends in SIGKILL: removing the sockets only after the drain could leave them on the
/// node.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_removes_the_sockets_at_once_and_ends_open_streams() {
    let mut aw = AgentWorld::start("drain").await;
    let tag = aw.w.tag.clone();
    aw.w.cluster_spiffe_id(&format!("{tag}-web"), "web").await;
    let web = aw.workload("web-1", "web", json!({"app": "web"})).await;
    aw.wait_svid(&aw.id_for_sa("web")).await;
    let (_child, mut lines) = watch(&web, &aw.addr);
    next(&mut lines).await;
    // The crate's X509Source fetches once, then opens the stream it watches.
    sigil_e2e::eventually("the client's stream to be open", SETTLE, || async {
        let m = aw.metrics().await;
        (sigil_e2e::http::metric(&m, "sigil_workload_api_open_streams") == Some(1.0)).then_some(())
    })
    .await;
    assert!(aw.socket.exists() && aw.broker_socket.exists());

    let started = std::time::Instant::now();
    aw.cancel.cancel();
    sigil_e2e::eventually(
        "both sockets to be removed",
        Duration::from_secs(1),
        || async { (!aw.socket.exists() && !aw.broker_socket.exists()).then_some(()) },
    )
    .await;
    let removed = started.elapsed();
    let grace = sigil_agent::supervise::DRAIN_GRACE;
    tokio::time::timeout(grace * 2, aw.agent.wait())
        .await
        .expect("the agent stopped")
        .expect("a drain is not a failure");
    let stopped = started.elapsed();
    println!("sockets removed after {removed:?}; agent stopped after {stopped:?}");
    assert!(
        stopped < grace,
        "the open stream was ended by the agent, not waited out for the whole grace ({stopped:?})"
    );
}
