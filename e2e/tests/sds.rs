//! Envoy's Secret Discovery Service (SDS v3) on sigil-agent's Workload API socket.
//!
//! No Envoy binary is available from any registry in this environment, so Envoy cannot
//! run here. Its stand-in is `envoy-sds-client` (e2e/clients/envoy-sds): a Go program on
//! Envoy's own generated API types (go-control-plane/envoy, pinned in hack/versions.sh)
//! that speaks SDS as Envoy's subscriptions do (subscribe, ACK, NACK, change the
//! subscription on the same stream, reconnect) and checks every Secret as Envoy would
//! before using it (Envoy's validation rules, key matching the chain, the chain verifying
//! against the validation context). It runs as a real process in a pod-shaped cgroup, so
//! the agent attests it from the kernel exactly as it attests Workload API clients.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sha2::Digest;
use sigil_testkit::agent::*;
use sigil_testkit::trust_domain::SETTLE;
use tokio::io::{AsyncBufReadExt, BufReader};

fn names(v: &Value) -> Vec<String> {
    v["names"]
        .as_array()
        .map(|a| a.iter().map(|n| n.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn resource<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["resources"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no resource {name} in {v}"))
}

fn denials(metrics: &str, rpc: &str, reason: &str) -> f64 {
    sigil_e2e::http::metric(
        metrics,
        &format!("sigil_workload_api_denials_total{{rpc=\"{rpc}\",reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

/// An Envoy-like client subscribes to `default` and `ROOTCA` (what Istio asks for), ACKs,
/// widens its subscription on the same stream, NACKs, sends a stale request, and
/// reconnects; every Secret it gets parses and verifies as Envoy would check it.
///
/// Attacker view: the subscription change also names another workload's SPIFFE ID and a
/// name nobody has; neither is served (absent, not an error that would confirm the ID
/// exists). Another pod's FetchSecrets for the first pod's ID gets nothing either, a
/// process with no identity is refused, and oversized subscriptions are refused and
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_client_subscribes_acks_nacks_changes_and_reconnects() {
    let aw = AgentWorld::start("sds").await;
    let tag = aw.w.tag.clone();
    aw.w.cluster_spiffe_id(&format!("{tag}-web"), "web").await;
    aw.w.cluster_spiffe_id(&format!("{tag}-db"), "db").await;
    let web = aw.workload("web-1", "web", json!({"app": "web"})).await;
    let db = aw.workload("db-1", "db", json!({"app": "db"})).await;
    let (web_id, db_id) = (aw.id_for_sa("web"), aw.id_for_sa("db"));
    aw.wait_svid(&web_id).await;
    aw.wait_svid(&db_id).await;
    let td = aw.w.td.to_string();
    let td_id = format!("spiffe://{td}");
    let entry = aw
        .agent
        .cache
        .entries()
        .into_iter()
        .find(|e| e.spiffe_id.to_string() == web_id)
        .unwrap();
    let leaf_sha = hex::encode(sha2::Sha256::digest(
        &aw.agent.cache.svid(&entry.id).unwrap().chain[0],
    ));
    let sds = tool("envoy-sds-client");
    let socket = aw.socket.display().to_string();
    let extra = format!("{web_id},{td_id},ALL,{db_id},no-such-secret");

    let r = json_out(
        "envoy-sds-client scenario",
        &web.run(
            &sds,
            &[
                "-socket",
                &socket,
                "scenario",
                "-names",
                "default,ROOTCA",
                "-extra",
                &extra,
                "-own-td",
                &td,
            ],
        )
        .await,
    );
    let first = &r["first"];
    assert_eq!(names(first), ["ROOTCA", "default"], "{first}");
    let default = resource(first, "default");
    assert_eq!(default["kind"], "tls_certificate");
    assert_eq!(default["spiffe_id"], web_id.as_str());
    assert_eq!(
        default["leaf_sha256"],
        leaf_sha.as_str(),
        "the SVID the agent holds"
    );
    assert_eq!(resource(first, "ROOTCA")["kind"], "validation_context");
    assert_eq!(r["quiet_after_ack"], true);
    let changed = &r["changed"];
    let mut want = vec![
        "ALL".to_owned(),
        "ROOTCA".into(),
        "default".into(),
        td_id.clone(),
        web_id.clone(),
    ];
    want.sort();
    assert_eq!(
        names(changed),
        want,
        "another workload's ID and an unknown name are absent: {changed}"
    );
    assert_ne!(changed["version"], first["version"]);
    assert_eq!(resource(changed, "ALL")["trust_domains"], json!([td]));
    assert_eq!(resource(changed, &web_id)["leaf_sha256"], leaf_sha.as_str());
    assert_eq!(
        r["quiet_after_nack"], true,
        "a NACKed version is not resent"
    );
    assert_eq!(r["stale_ignored"], true);
    let again = &r["reconnected"];
    assert_eq!(names(again), names(first));
    assert_eq!(
        again["version"], first["version"],
        "versions are content digests: a reconnect with nothing changed sees the version it had"
    );

    // Another pod asks for web's SVID by its SPIFFE ID: nothing. Its own default is its own.
    let stolen = json_out(
        "db's FetchSecrets for web's ID",
        &db.run(
            &sds,
            &[
                "-socket", &socket, "fetch", "-names", &web_id, "-own-td", &td,
            ],
        )
        .await,
    );
    assert!(names(&stolen).is_empty(), "{stolen}");
    let own = json_out(
        "db's FetchSecrets default",
        &db.run(
            &sds,
            &[
                "-socket", &socket, "fetch", "-names", "default", "-own-td", &td,
            ],
        )
        .await,
    );
    assert_eq!(resource(&own, "default")["spiffe_id"], db_id.as_str());

    // A process in no pod (this test, root on the node) has no identity: PermissionDenied.
    let out = tokio::process::Command::new(&sds)
        .args(["-socket", &socket, "fetch", "-names", "default"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PermissionDenied"), "{err}");

    // Oversized subscriptions: refused, counted.
    let many: Vec<String> = (0..65).map(|i| format!("n{i}")).collect();
    let out = web
        .run(
            &sds,
            &["-socket", &socket, "fetch", "-names", &many.join(",")],
        )
        .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"));
    let long = "x".repeat(3000);
    let out = web
        .run(&sds, &["-socket", &socket, "scenario", "-names", &long])
        .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at most 2048"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A long-lived proxy: 30 ACKs of 4 KiB (Envoy sends its Node on every request unless
    // told otherwise), then a subscription change, answered on the same stream: the bytes
    // of requests already read do not add up against the connection's bound.
    let long = json_out(
        "a long-lived SDS stream",
        &web.run(
            &sds,
            &["-socket", &socket, "long", "-count", "30", "-pad", "4000"],
        )
        .await,
    );
    assert!(long["request_bytes"].as_u64().unwrap() > 100_000, "{long}");

    // A client that floods its stream with requests: its stream ends, ResourceExhausted.
    let out = web
        .run(
            &sds,
            &["-socket", &socket, "flood", "-count", "200", "-wait", "10s"],
        )
        .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("ResourceExhausted"),
        "{err}"
    );

    let m = aw.metrics().await;
    assert!(
        denials(&m, "StreamSecrets", "too_many_requests") >= 1.0,
        "{m}"
    );
    assert!(
        denials(&m, "FetchSecrets", "too_many_resource_names") >= 1.0,
        "{m}"
    );
    assert!(
        denials(&m, "StreamSecrets", "resource_name_too_long") >= 1.0,
        "{m}"
    );
    assert!(denials(&m, "FetchSecrets", "no_identity") >= 1.0, "{m}");
    assert!(
        sigil_e2e::http::metric(&m, "sigil_workload_api_sds_nacks_total").unwrap() >= 1.0,
        "the NACK is counted"
    );
}

fn ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis()
}

/// Rotation under SDS: an open stream gets each new X509-SVID (and ACKs it) before the
/// previous one reaches half its lifetime, and every pushed Secret checks out as Envoy
/// would check it (the client exits on the first one that does not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sds_stream_gets_each_rotated_svid_before_half_life() {
    let aw = AgentWorld::start("sdsrot").await;
    let tag = aw.w.tag.clone();
    sigil_testkit::node_api::create(
        &kube::api::Api::<sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID>::all(
            aw.w.client.clone(),
        ),
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
    let td = aw.w.td.to_string();
    let mut cmd = pod.container.command(tool("envoy-sds-client"));
    cmd.args([
        "-socket",
        &aw.socket.display().to_string(),
        "watch",
        "-names",
        "default,ROOTCA",
        "-own-td",
        &td,
    ])
    .stdout(std::process::Stdio::piped());
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(SETTLE + Duration::from_secs(10), lines.next_line())
            .await
            .expect("no SDS push in time")
            .unwrap()
            .expect("the SDS client exited (a Secret failed its checks: see its stderr)");
        serde_json::from_str(&line).unwrap()
    };
    let leaf = |v: &Value| {
        resource(v, "default")["leaf_der_hex"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let mut current = next().await;
    let mut rotations = 0;
    while rotations < 2 {
        let update = next().await;
        assert_ne!(update["version"], current["version"]);
        if leaf(&update) != leaf(&current) {
            let old =
                sigil_identity::x509::inspect_leaf(&hex::decode(leaf(&current)).unwrap()).unwrap();
            let half = old.not_before + old.not_after.duration_since(old.not_before).unwrap() / 2;
            let arrived = update["at_ms"].as_u64().unwrap() as u128;
            assert!(
                arrived < ms(half),
                "the new SVID reached the SDS stream {} ms after the old one's half-life",
                arrived - ms(half)
            );
            println!(
                "SDS rotation {rotations}: new SVID {} ms before the old one's half-life",
                ms(half) - arrived
            );
            rotations += 1;
        }
        current = update;
    }
    child.kill().await.unwrap();
}

/// A workload whose entry federates with another trust domain gets that domain's bundle
/// by `spiffe://<td>` and inside `ALL` (Envoy's SPIFFE validator with both trust
/// domains); a workload without federation gets neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_bundles_reach_only_workloads_that_federate() {
    let aw = AgentWorld::start("sdsfed").await;
    let tag = aw.w.tag.clone();
    let partner = sigil_testkit::federation::Foreign::new("partner.test");
    aw.w.replica
        .federated
        .replace(std::collections::BTreeMap::from([(
            partner.td.clone(),
            partner.bundle(),
        )]));
    sigil_testkit::node_api::create(
        &kube::api::Api::<sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID>::all(
            aw.w.client.clone(),
        ),
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{tag}-fed")}, "spec": {
            "trustDomain": aw.w.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
            "podSelector": {"matchLabels": {"app": "fed"}},
            "federatesWith": ["partner.test"],
        }}),
    )
    .await;
    aw.w.cluster_spiffe_id(&format!("{tag}-web"), "web").await;
    let fed = aw.workload("fed-1", "web", json!({"app": "fed"})).await;
    aw.wait_svid(&aw.id_for_sa("web")).await;
    let td = aw.w.td.to_string();
    let sds = tool("envoy-sds-client");
    let socket = aw.socket.display().to_string();
    let wanted = "default,ALL,spiffe://partner.test";
    let got =
        sigil_testkit::trust_domain::eventually("the partner's bundle on SDS", SETTLE, || async {
            let out = fed
                .run(
                    &sds,
                    &[
                        "-socket", &socket, "fetch", "-names", wanted, "-own-td", &td,
                    ],
                )
                .await;
            if !out.status.success() {
                return None;
            }
            let v = json_out("fed's FetchSecrets", &out);
            (v["names"].as_array().map(Vec::len) == Some(3)).then_some(v)
        })
        .await;
    assert_eq!(
        resource(&got, "ALL")["trust_domains"],
        json!(["partner.test", td]),
        "{got}"
    );
    assert_eq!(resource(&got, "spiffe://partner.test")["cas"], 1);

    // Another pod, same service account, no federation: neither.
    let web = aw.workload("web-1", "web", json!({"app": "web"})).await;
    let v = json_out(
        "web's FetchSecrets",
        &web.run(
            &sds,
            &[
                "-socket", &socket, "fetch", "-names", wanted, "-own-td", &td,
            ],
        )
        .await,
    );
    assert_eq!(names(&v), ["ALL", "default"], "{v}");
    assert_eq!(resource(&v, "ALL")["trust_domains"], json!([td]));
}
