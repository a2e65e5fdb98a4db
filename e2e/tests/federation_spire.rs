//! Federation with a real peer: SPIRE (spire-server and spire-agent, built from the pinned
//! release by `make test-tools`) runs on loopback as a second trust domain, and the two
//! federate both ways.
//!
//! - Sigil's operator fetches SPIRE's bundle endpoint (https_spiffe, then https_web with
//!   a private CA after SPIRE restarts with a serving certificate).
//! - SPIRE fetches Sigil's bundle endpoint (https_spiffe, authenticated with Sigil's
//!   bundle, bootstrapped with `spire-server bundle set`).
//! - A workload identified by SPIRE (a process attested by spire-agent's unix attestor)
//!   and one identified by Sigil (a process in a pod-shaped cgroup, attested by
//!   sigil-agent) complete mutual TLS both ways with go-spiffe's spiffetls, each
//!   verifying the other with the federated bundle its own Workload API served.
//! - A workload moved from SPIRE to Sigil (its socket switched), and rolled back, keeps
//!   talking to a workload still on SPIRE, which accepts members of both trust domains.
//! - An X.509 authority prepared on the SPIRE side reaches the Sigil workload within one
//!   refresh interval.
#![allow(clippy::unwrap_used)]

use sigil_testkit::node_api as node_api_common;
use sigil_testkit::trust_domain as trust_domain_common;

use sigil_testkit::agent as agent_common;
use sigil_testkit::spire as spire_common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use agent_common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use node_api_common::create;
use serde_json::{Value, json};
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_operator::crd::federated_bundle::FederatedBundle;
use spire_common::{SPIRE_REFRESH_HINT, Spire, SpireProfile};
use tokio::io::{AsyncBufReadExt, BufReader};
use trust_domain_common::{INSTANCE_LABEL, SETTLE, eventually};

/// A running go-spiffe `serve`.
struct GoServer {
    child: tokio::process::Child,
    stdout: tokio::task::JoinHandle<Vec<String>>,
}

/// Starts a go-spiffe `serve` from `cmd` and waits for its listening address.
async fn start_server(mut cmd: tokio::process::Command) -> (GoServer, String) {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(SETTLE, lines.next_line())
        .await
        .expect("go-spiffe serve did not start listening")
        .unwrap();
    let Some(first) = first else {
        let out = child.wait_with_output().await.unwrap();
        panic!(
            "go-spiffe serve exited: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let v: Value = serde_json::from_str(&first).unwrap();
    let addr = v["listening"].as_str().unwrap().to_owned();
    let stdout = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            all.push(l);
        }
        all
    });
    (GoServer { child, stdout }, addr)
}

/// Waits for a go-spiffe `serve` to finish and returns its result JSON.
async fn server_result(mut server: GoServer) -> Value {
    let status = tokio::time::timeout(SETTLE, server.child.wait())
        .await
        .expect("go-spiffe serve did not finish")
        .unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = server.child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    let lines = server.stdout.await.unwrap();
    assert!(status.success(), "go-spiffe serve failed: {stderr}");
    serde_json::from_str(lines.last().unwrap()).unwrap()
}

/// How many X.509 authorities a go-spiffe `bundles` call sees for `td`.
fn x509_count(bundles: &Value, td: &str) -> u64 {
    bundles["x509"][td].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn spire_and_sigil_federate_both_ways_and_their_workloads_complete_mutual_tls() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let aw = AgentWorld::start("spirefed").await;
    let w = &aw.w;
    let sigil_td = w.td.to_string();
    let spire_td = format!("spire-{}.test", w.tag);
    let go = tool("go-spiffe-client");

    // Sigil's bundle endpoint (what the operator serves with --bundle-endpoint-addr).
    let (sigil_url, _stop) = w.serve_bundle_endpoint().await;

    // SPIRE up, with Sigil's bundle bootstrapped by an operator running `bundle set`. The
    // bootstrap holds only Sigil's X.509 authorities: the JWT authorities SPIRE ends up
    // with can only have come from fetching Sigil's endpoint.
    let mut spire = Spire::new(&aw.dir.path().join("spire"), &spire_td);
    spire.federation = Some((sigil_td.clone(), sigil_url.clone()));
    spire.start_server(&SpireProfile::Spiffe).await;
    let sigil_bundle = w.bootstrap_bundle().await;
    assert!(!sigil_bundle.jwt_authorities.is_empty());
    let mut x509_only: Value = serde_json::from_str(&sigil_bundle.to_jwks_json()).unwrap();
    x509_only["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| k["use"] == "x509-svid");
    let bootstrap_path = aw.dir.path().join("sigil-bootstrap.json");
    std::fs::write(&bootstrap_path, x509_only.to_string()).unwrap();
    spire
        .cli(&[
            "bundle",
            "set",
            "-format",
            "spiffe",
            "-id",
            &format!("spiffe://{sigil_td}"),
            "-path",
            &bootstrap_path.display().to_string(),
        ])
        .await;
    spire
        .cli(&[
            "federation",
            "refresh",
            "-id",
            &format!("spiffe://{sigil_td}"),
        ])
        .await;
    let spire_view: Value =
        eventually("SPIRE to fetch Sigil's bundle endpoint", SETTLE, || async {
            let out = spire
                .cli(&[
                    "bundle",
                    "list",
                    "-format",
                    "spiffe",
                    "-id",
                    &format!("spiffe://{sigil_td}"),
                ])
                .await;
            let doc: Value = serde_json::from_str(&out).ok()?;
            let jwt = doc["keys"]
                .as_array()?
                .iter()
                .filter(|k| k["use"] == "jwt-svid")
                .count();
            (jwt == sigil_bundle.jwt_authorities.len()).then_some(doc)
        })
        .await;
    assert_eq!(
        spire_view["keys"].as_array().unwrap().len(),
        sigil_bundle.x509_authorities.len() + sigil_bundle.jwt_authorities.len(),
        "SPIRE holds exactly Sigil's current bundle: {spire_view}"
    );

    // Sigil fetches SPIRE's bundle endpoint, https_spiffe, bootstrapped with `bundle show`.
    let spire_bundle = spire.cli(&["bundle", "show", "-format", "spiffe"]).await;
    let fb_name = format!("{}-spire", w.tag);
    create(
        &Api::<FederatedBundle>::all(w.client.clone()),
        json!({
            "apiVersion": "sigil.dev/v1alpha1", "kind": "FederatedBundle",
            "metadata": {"name": fb_name, "labels": {INSTANCE_LABEL: w.tag}},
            "spec": {
                "trustDomain": spire_td,
                "bundleEndpointURL": spire.bundle_url(),
                "bundleEndpointProfile": {"type": "https_spiffe", "endpointSPIFFEID": format!("spiffe://{spire_td}/spire/server")},
                "trustDomainBundle": spire_bundle,
            },
        }),
    )
    .await;
    let fbs = Api::<FederatedBundle>::all(w.client.clone());
    let fetched = |fb: &FederatedBundle| {
        fb.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == "Fetched")
        })
    };
    eventually(
        "Sigil to fetch SPIRE's bundle (https_spiffe)",
        SETTLE,
        || async { fbs.get(&fb_name).await.ok().filter(fetched) },
    )
    .await;

    // Workloads: SPIRE's (a process of uid 0 on the SPIRE agent) and Sigil's (a pod).
    let spire_id = format!("spiffe://{spire_td}/workload");
    spire
        .cli(&[
            "entry",
            "create",
            "-parentID",
            &format!("spiffe://{spire_td}/agent"),
            "-spiffeID",
            &spire_id,
            "-selector",
            "unix:uid:0",
            "-federatesWith",
            &format!("spiffe://{sigil_td}"),
        ])
        .await;
    spire.start_agent().await;
    create(
        &Api::<ClusterSPIFFEID>::all(w.client.clone()),
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{}-fed", w.tag)}, "spec": {
            "trustDomain": w.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": w.tag}},
            "podSelector": {"matchLabels": {"app": "fed"}},
            "federatesWith": [spire_td],
        }}),
    )
    .await;
    let pod = aw.workload("fed-1", "fed", json!({"app": "fed"})).await;
    let sigil_id = aw.id_for_sa("fed");
    aw.wait_svid(&sigil_id).await;

    // Each side's Workload API serves the other trust domain's bundle.
    let spire_addr = spire.agent_addr.clone();
    let spire_sees = eventually(
        "the SPIRE workload to get Sigil's bundle",
        Duration::from_secs(90),
        || async {
            let out = tokio::process::Command::new(&go)
                .args(["-addr", &spire_addr, "bundles"])
                .output()
                .await
                .unwrap();
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            (x509_count(&v, &sigil_td) > 0).then_some(v)
        },
    )
    .await;
    assert!(x509_count(&spire_sees, &spire_td) > 0, "{spire_sees}");
    let sigil_sees = json_out(
        "go-spiffe bundles in the Sigil pod",
        &pod.run(&go, &["-addr", &aw.addr, "bundles"]).await,
    );
    assert_eq!(x509_count(&sigil_sees, &spire_td), 1, "{sigil_sees}");
    assert!(x509_count(&sigil_sees, &sigil_td) > 0, "{sigil_sees}");

    // mTLS 1: the SPIRE workload serves members of Sigil's trust domain; the Sigil workload
    // dials, accepting only the SPIRE workload's ID.
    let mut serve = tokio::process::Command::new(&go);
    serve.args([
        "-timeout",
        "60s",
        "-addr",
        &spire_addr,
        "serve",
        "-allow-td",
        &sigil_td,
    ]);
    let (server, addr) = start_server(serve).await;
    let client = json_out(
        "Sigil workload dials the SPIRE workload",
        &pod.run(
            &go,
            &[
                "-addr",
                &aw.addr,
                "dial",
                "-connect",
                &addr,
                "-server-id",
                &spire_id,
            ],
        )
        .await,
    );
    let server = server_result(server).await;
    assert_eq!(client["own_id"], sigil_id.as_str());
    assert_eq!(client["peer_id"], spire_id.as_str());
    assert_eq!(client["got"], format!("hello from {spire_id}"));
    assert_eq!(server["peer_id"], sigil_id.as_str());
    assert_eq!(server["got"], format!("hello from {sigil_id}"));

    // mTLS 2: the other way round, the Sigil workload serving members of SPIRE's domain.
    let mut serve = tokio::process::Command::from(pod.container.command(&go));
    serve.args([
        "-timeout",
        "60s",
        "-addr",
        &aw.addr,
        "serve",
        "-allow-td",
        &spire_td,
    ]);
    let (server, addr) = start_server(serve).await;
    let client = json_out(
        "SPIRE workload dials the Sigil workload",
        &tokio::process::Command::new(&go)
            .args([
                "-addr",
                &spire_addr,
                "dial",
                "-connect",
                &addr,
                "-server-id",
                &sigil_id,
            ])
            .output()
            .await
            .unwrap(),
    );
    let server = server_result(server).await;
    assert_eq!(client["peer_id"], sigil_id.as_str());
    assert_eq!(server["peer_id"], spire_id.as_str());

    // Moving a workload from SPIRE to Sigil, and back (docs/migrate-from-spire.md): a
    // workload still on SPIRE serves members of both trust domains. The workload being
    // moved dials it with the SVID SPIRE's Workload API gives it (before the move), then
    // with Sigil's (after: its volume now mounts Sigil's socket), then with SPIRE's again
    // (the rollback). Nothing on the SPIRE side changes between the three.
    let mut serve = tokio::process::Command::new(&go);
    serve.args([
        "-timeout",
        "60s",
        "-addr",
        &spire_addr,
        "serve",
        "-allow-td",
        &format!("{spire_td},{sigil_td}"),
        "-accept",
        "3",
    ]);
    let (server, addr) = start_server(serve).await;
    let mut moving = Vec::new();
    for (step, socket) in [
        ("before the move", &spire_addr),
        ("after the move", &aw.addr),
        ("after the rollback", &spire_addr),
    ] {
        let client = json_out(
            &format!("the moving workload dials the SPIRE workload {step}"),
            &pod.run(
                &go,
                &[
                    "-addr",
                    socket,
                    "dial",
                    "-connect",
                    &addr,
                    "-server-id",
                    &spire_id,
                ],
            )
            .await,
        );
        assert_eq!(client["peer_id"], spire_id.as_str(), "{step}");
        moving.push(client["own_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        moving,
        [spire_id.as_str(), sigil_id.as_str(), spire_id.as_str()]
    );
    let server = server_result(server).await;
    let peers: Vec<&str> = server["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["peer_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        peers,
        [spire_id.as_str(), sigil_id.as_str(), spire_id.as_str()],
        "the SPIRE workload accepted the moving workload under each identity"
    );

    // Remote rotation: SPIRE prepares its next X.509 authority (published in its bundle
    // at once); the Sigil workload sees it within one refresh interval.
    let prepared = Instant::now();
    spire.cli(&["localauthority", "x509", "prepare"]).await;
    eventually(
        "the prepared SPIRE authority in the Sigil pod",
        SETTLE,
        || async {
            let out = pod.run(&go, &["-addr", &aw.addr, "bundles"]).await;
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            (x509_count(&v, &spire_td) == 2).then_some(())
        },
    )
    .await;
    let took = prepared.elapsed();
    eprintln!(
        "federation_spire: SPIRE x509 prepare -> Sigil workload sees 2 authorities in {took:?} (refresh hint {SPIRE_REFRESH_HINT:?})"
    );
    // One refresh interval, plus a fetch and the push to the agent.
    assert!(
        took < SPIRE_REFRESH_HINT + Duration::from_secs(3),
        "took {took:?}, more than one refresh interval ({SPIRE_REFRESH_HINT:?}) and slack"
    );

    // https_web: SPIRE restarts with a serving certificate from a private CA; the
    // FederatedBundle switches profile, trusting that CA from a Secret.
    let ca = sigil_e2e::pki::Ca::new("spire web ca").unwrap();
    let serving = ca
        .serving_for("spire bundle endpoint", &["127.0.0.1"])
        .unwrap();
    let (cert, key) = (spire.dir.join("web.crt"), spire.dir.join("web.key"));
    std::fs::write(&cert, &serving.cert_pem).unwrap();
    std::fs::write(&key, &serving.key_pem).unwrap();
    spire.server.take().unwrap().stop();
    spire.start_server(&SpireProfile::Web { cert, key }).await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "spire-web-ca"},
        "stringData": {"ca.crt": ca.cert_pem},
    }))
    .unwrap();
    Api::<Secret>::namespaced(w.client.clone(), &w.ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let before = fbs.get(&fb_name).await.unwrap().status.unwrap().last_fetch;
    fbs.patch(
        &fb_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"bundleEndpointProfile": {
            "type": "https_web", "endpointSPIFFEID": null,
            "caBundleSecretRef": {"name": "spire-web-ca", "namespace": w.ns},
        }}})),
    )
    .await
    .unwrap();
    let fb = eventually(
        "Sigil to fetch SPIRE's bundle (https_web)",
        SETTLE,
        || async {
            fbs.get(&fb_name).await.ok().filter(|fb| {
                fetched(fb)
                    && fb.status.as_ref().unwrap().observed_generation == fb.metadata.generation
                    && fb.status.as_ref().unwrap().last_fetch != before
            })
        },
    )
    .await;
    assert_eq!(
        fb.status.unwrap().keys,
        Some(3),
        "2 X.509 + 1 JWT authority"
    );
    if std::env::var_os("SIGIL_SPIRE_LOGS").is_some() {
        eprintln!("{}", spire.logs());
    }
}
