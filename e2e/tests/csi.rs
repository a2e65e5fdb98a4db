//! sigil-csi against the real apiserver, a running agent and real mounts: files mode
//! writes a valid, rotating identity that a reader never sees half-swapped; socket mode
//! gives a pod a working Workload API; tokens for another pod or node are refused; a
//! restart mid-rotation loses nothing; 100 publishes leave one mount.
#![allow(clippy::unwrap_used)]

use sigil_testkit::node_api as node_api_common;
use sigil_testkit::trust_domain as trust_domain_common;

use sigil_testkit::agent as agent_common;
use sigil_testkit::csi as csi_common;

use std::io::Read;
use std::time::{Duration, SystemTime};

use agent_common::*;
use csi_common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use serde_json::json;
use sigil_csi::mounter::{LinuxMounter, Mounter};
use sigil_identity::proto::csi as pb;
use sigil_identity::{BundleSet, TrustBundle, x509};
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use tonic::Code;
use trust_domain_common::{SETTLE, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_mode_writes_rotates_and_survives_a_restart() {
    let aw = AgentWorld::start("csifiles").await;
    let tag = aw.w.tag.clone();
    node_api_common::create(
        &Api::<ClusterSPIFFEID>::all(aw.w.client.clone()),
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{tag}-web")}, "spec": {
            "trustDomain": aw.w.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
            "podSelector": {"matchLabels": {"app": "web"}},
            "ttl": "12s",
        }}),
    )
    .await;
    let web = aw.workload("web-1", "web", json!({"app": "web"})).await;
    let id = aw.id_for_sa("web");
    aw.wait_svid(&id).await;
    let token = aw.w.token(&web.pod, "sigil-csi").await;
    let csi = Csi::start(csi_args(&aw)).await;
    let mut client = csi.client().await;
    let target = aw
        .dir
        .path()
        .join("pods")
        .join("web-1")
        .join("volumes")
        .join("identity");

    // The token in `secrets`, as the kubelet passes it for the chart's CSIDriver
    // (serviceAccountTokenInSecrets: true).
    client
        .node_publish_volume(tokens_in_secrets(publish_request(
            "vol-web",
            &target,
            &web.pod,
            Some(&token),
            true,
            &[
                ("mode", "files"),
                ("jwtAudiences", "db,https://vault.example"),
            ],
        )))
        .await
        .unwrap();
    assert_eq!(
        LinuxMounter.mount_count(&target).unwrap(),
        1,
        "a read-only bind of the staged tmpfs on the target"
    );
    // CSI NodePublishVolume: readonly is honoured (files mode is read-only whatever the
    // flag says: the pod never writes into it).
    assert!(
        std::fs::write(target.join("x"), b"").is_err(),
        "the files mount is read-only"
    );
    // CSI NodePublishVolume: a republish that asks for something else than what is
    // published at the target is ALREADY_EXISTS; the same request again is fine, and so
    // is the readonly flag unset (the mount stays read-only).
    for (readonly, attrs, what) in [
        (
            true,
            &[("mode", "files"), ("jwtAudiences", "db")][..],
            "other volumeAttributes",
        ),
        (true, &[][..], "in mode files"),
    ] {
        let e = client
            .node_publish_volume(publish_request(
                "vol-web",
                &target,
                &web.pod,
                Some(&token),
                readonly,
                attrs,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
        assert!(e.message().contains(what), "{e:?}");
    }
    for readonly in [true, false] {
        client
            .node_publish_volume(publish_request(
                "vol-web",
                &target,
                &web.pod,
                Some(&token),
                readonly,
                &[
                    ("mode", "files"),
                    ("jwtAudiences", "db,https://vault.example"),
                ],
            ))
            .await
            .unwrap();
    }
    assert!(std::fs::write(target.join("x"), b"").is_err());
    assert_eq!(LinuxMounter.mount_count(&target).unwrap(), 1);
    let (cert, key) = read_pair(&target);
    let (spiffe_id, first_leaf) = check_files(&target, &cert, &key);
    assert_eq!(spiffe_id, id);
    // bundle.spiffe carries the JWT keys: the JWT-SVID files validate against it.
    let jwks = std::fs::read(target.join("bundle.spiffe")).unwrap();
    let mut set = BundleSet::new();
    set.insert(TrustBundle::from_jwks_json(aw.w.td.clone(), &jwks).unwrap())
        .unwrap();
    for (file, audience) in [
        ("jwt/db.token", "db"),
        ("jwt/https___vault.example.token", "https://vault.example"),
    ] {
        let jwt = std::fs::read_to_string(target.join(file)).unwrap();
        let v = sigil_identity::jwt::validate_jwt_svid(&jwt, &set, audience, SystemTime::now())
            .unwrap();
        assert_eq!(v.spiffe_id.to_string(), id);
    }

    // An open file handle keeps a consistent pair across a swap: open both files of the
    // current generation, wait for a rotation, then read them.
    let (opened_gen, mut held_cert, mut held_key) = loop {
        let g = generation(&target);
        let (Ok(c), Ok(k)) = (
            std::fs::File::open(target.join(&g).join("svid.pem")),
            std::fs::File::open(target.join(&g).join("svid_key.pem")),
        ) else {
            continue; // swapped between reading ..data and opening: try again
        };
        break (g, c, k);
    };
    let (_, opened_leaf) = {
        let (c, k) = (
            std::fs::read(target.join(&opened_gen).join("svid.pem")),
            std::fs::read(target.join(&opened_gen).join("svid_key.pem")),
        );
        match (c, k) {
            (Ok(c), Ok(k)) => check_files(&target, &c, &k),
            _ => (String::new(), Vec::new()),
        }
    };
    let (cert2, key2) = eventually("the files to rotate to a new SVID", SETTLE, || async {
        let (c, k) = read_pair(&target);
        let (_, leaf) = check_files(&target, &c, &k);
        (leaf != first_leaf && leaf != opened_leaf).then_some((c, k))
    })
    .await;
    assert_ne!(generation(&target), opened_gen);
    let (mut c, mut k) = (Vec::new(), Vec::new());
    held_cert.read_to_end(&mut c).unwrap();
    held_key.read_to_end(&mut k).unwrap();
    // The held pair is one generation: the key matches the certificate.
    check_files(&target, &c, &k);
    let (_, second_leaf) = check_files(&target, &cert2, &key2);

    let _ = (&cert, &key);
    let old = x509::inspect_leaf(&first_leaf).unwrap();
    let half = old.not_before + old.not_after.duration_since(old.not_before).unwrap() / 2;
    assert!(
        SystemTime::now() <= half + Duration::from_secs(1),
        "the files rotated after the old SVID's half-life"
    );

    // Restart mid-rotation: stop sigil-csi, let the agent rotate, start it again.
    let args = csi.stop().await;
    assert_eq!(
        LinuxMounter.mount_count(&target).unwrap(),
        1,
        "the tmpfs outlives sigil-csi"
    );
    let (cert_during, _) = read_pair(&target);
    assert_eq!(cert_during, cert2, "the files stay while sigil-csi is down");
    let entry = aw
        .agent
        .cache
        .entries()
        .into_iter()
        .find(|e| e.spiffe_id.to_string() == id)
        .unwrap();
    let leaf_now = |aw: &AgentWorld| aw.agent.cache.svid(&entry.id).unwrap().chain[0].clone();
    eventually(
        "the agent to rotate while sigil-csi is down",
        SETTLE,
        || async { (leaf_now(&aw) != second_leaf).then_some(()) },
    )
    .await;
    let csi = Csi::start(args).await;
    eventually(
        "the restarted sigil-csi to catch the volume up",
        SETTLE,
        || async {
            let (c, k) = read_pair(&target);
            let (_, leaf) = check_files(&target, &c, &k);
            (leaf == leaf_now(&aw)).then_some(())
        },
    )
    .await;

    // Unpublish: unmounted, target gone, twice is fine.
    let mut client = csi.client().await;
    for _ in 0..2 {
        client
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: "vol-web".into(),
                target_path: target.display().to_string(),
            })
            .await
            .unwrap();
    }
    assert_eq!(LinuxMounter.mount_count(&target).unwrap(), 0);
    assert!(!target.exists());
    csi.stop().await;
}

/// Files for proxies (`formats: istio,grpc,credential-bundle`): Istio's names, gRPC's
/// SPIFFE trust bundle map and the single-file credential bundle hold the same identity
/// as svid.pem / svid_key.pem, rotate with them, and are read by their real readers:
/// gRPC-Go's file watcher certificate provider loads the chain, key and bundle map (the
/// leaf verifying against the map's bundle of its trust domain), and the credential
/// bundle is one PKCS#8 key then the chain. An unknown format, or formats in socket
/// mode, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_mode_writes_the_layouts_proxies_and_grpc_read() {
    let aw = AgentWorld::start("csiformats").await;
    let tag = aw.w.tag.clone();
    node_api_common::create(
        &Api::<ClusterSPIFFEID>::all(aw.w.client.clone()),
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{tag}-web")}, "spec": {
            "trustDomain": aw.w.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
            "podSelector": {"matchLabels": {"app": "web"}},
            "ttl": "12s",
        }}),
    )
    .await;
    let web = aw.workload("web-1", "web", json!({"app": "web"})).await;
    let id = aw.id_for_sa("web");
    aw.wait_svid(&id).await;
    let token = aw.w.token(&web.pod, "sigil-csi").await;
    let csi = Csi::start(csi_args(&aw)).await;
    let mut client = csi.client().await;
    let target = aw.dir.path().join("pods/web-1/volumes/proxy");
    for (attrs, what) in [
        (
            &[("mode", "files"), ("formats", "istio,envoy")][..],
            "formats",
        ),
        (&[("formats", "istio")][..], "only applies to mode: files"),
    ] {
        let e = client
            .node_publish_volume(publish_request(
                "vol-bad",
                &target,
                &web.pod,
                Some(&token),
                true,
                attrs,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(what), "{e:?}");
    }
    client
        .node_publish_volume(publish_request(
            "vol-proxy",
            &target,
            &web.pod,
            Some(&token),
            true,
            &[
                ("mode", "files"),
                ("formats", "istio,grpc,credential-bundle,spiffe-fs"),
            ],
        ))
        .await
        .unwrap();
    let read = |f: &str| std::fs::read(target.join(f)).unwrap();
    let sha = |b: &[u8]| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b));
    let mut leaves = Vec::new();
    for round in 0..2 {
        // One generation: read every file through one ..data link.
        let generation = target.join(generation(&target));
        let g = |f: &str| std::fs::read(generation.join(f)).unwrap();
        assert_eq!(g("cert-chain.pem"), g("svid.pem"));
        assert_eq!(g("key.pem"), g("svid_key.pem"));
        assert_eq!(g("root-cert.pem"), g("bundle.pem"));
        let mut bundle = g("svid_key.pem");
        bundle.extend(g("svid.pem"));
        assert_eq!(g("credential-bundle.pem"), bundle, "key, then chain");
        // The SPIFFE filesystem draft: the files of a Sigil pod certificate volume, read
        // by the same go-spiffe code the pod certificate test runs in its pod.
        assert_eq!(g("credential-bundle.private-key.pem"), bundle);
        let td_file = format!("{}.spiffe-trust-bundle.pem", aw.w.td);
        assert_eq!(g(&td_file), g("bundle.pem"));
        let pod_cert = json_out(
            "go-spiffe reading the spiffe-fs files as a pod certificate volume",
            &web.run(
                &tool("go-spiffe-client"),
                &[
                    "pod-cert",
                    "-svid-file",
                    &generation
                        .join("credential-bundle.private-key.pem")
                        .display()
                        .to_string(),
                    "-bundle-file",
                    &generation.join(&td_file).display().to_string(),
                    "-trust-domain",
                    &aw.w.td.to_string(),
                ],
            )
            .await,
        );
        assert_eq!(pod_cert["spiffe_id"], id.as_str(), "{pod_cert}");
        let (spiffe_id, leaf) = check_files(&generation, &g("cert-chain.pem"), &g("key.pem"));
        assert_eq!(spiffe_id, id);
        let map: serde_json::Value = serde_json::from_slice(&g("spiffe-bundle-map.json")).unwrap();
        let td = aw.w.td.to_string();
        assert_eq!(
            map["trust_domains"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            [&td],
            "keyed by trust domain name: {map}"
        );
        TrustBundle::from_jwks_json(
            aw.w.td.clone(),
            serde_json::to_string(&map["trust_domains"][&td])
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        // The real readers, as a workload process in the pod.
        let files = json_out(
            "gRPC's pemfile provider and the credential bundle",
            &web.run(
                &tool("envoy-sds-client"),
                &["files", "-dir", &target.display().to_string()],
            )
            .await,
        );
        assert_eq!(files["spiffe_id"], id.as_str(), "{files}");
        assert_eq!(files["bundle_map_tds"], json!([td]));
        assert_eq!(files["credential_leaf_sha256"], files["leaf_sha256"]);
        leaves.push(sha(&leaf));
        if round == 0 {
            // Rotation: all layouts move together.
            let first = read("credential-bundle.pem");
            eventually("a rotation of the files", SETTLE, || async {
                (read("credential-bundle.pem") != first).then_some(())
            })
            .await;
        }
    }
    assert_ne!(leaves[0], leaves[1], "rotated");
}

/// Two gRPC-Go workloads do mutual TLS with the files Sigil writes (`formats: grpc`):
/// each loads its SVID, key and SPIFFE trust bundle map with gRPC's pemfile provider and
/// verifies the other as grpc proposal A87 says (the bundle of the peer's trust domain,
/// from the map). A client whose certificate comes from a trust domain that is not in the
/// map is refused, and so is one claiming the web workload's own SPIFFE ID under a CA of
/// the same trust domain name that is not the trust domain's. A client of a trust domain
/// the server's entry federates with is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_workloads_do_mtls_with_the_files_and_strangers_are_refused() {
    use tokio::io::AsyncBufReadExt;
    let aw = AgentWorld::start("csigrpc").await;
    let tag = aw.w.tag.clone();
    // db's ServiceAccount, for its pod's token (the world creates `web`).
    kube::Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(
        aw.w.client.clone(),
        &aw.w.ns,
    )
    .create(
        &Default::default(),
        &serde_json::from_value(json!({"metadata": {"name": "db"}})).unwrap(),
    )
    .await
    .unwrap();
    // db federates with partner.test (its bundle put in the operator's store as the
    // FederatedBundle controller would); web does not.
    let partner = sigil_testkit::federation::Foreign::new("partner.test");
    aw.w.replica
        .federated
        .replace(std::collections::BTreeMap::from([(
            partner.td.clone(),
            partner.bundle(),
        )]));
    aw.w.cluster_spiffe_id(&format!("{tag}-web"), "web").await;
    node_api_common::create(
        &Api::<ClusterSPIFFEID>::all(aw.w.client.clone()),
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{tag}-db")}, "spec": {
            "trustDomain": aw.w.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
            "podSelector": {"matchLabels": {"app": "db"}},
            "federatesWith": ["partner.test"],
        }}),
    )
    .await;
    let web = aw.workload("web-1", "web", json!({"app": "web"})).await;
    let db = aw.workload("db-1", "db", json!({"app": "db"})).await;
    let (web_id, db_id) = (aw.id_for_sa("web"), aw.id_for_sa("db"));
    aw.wait_svid(&web_id).await;
    aw.wait_svid(&db_id).await;
    let csi = Csi::start(csi_args(&aw)).await;
    let mut client = csi.client().await;
    let mut targets = Vec::new();
    for (w, name) in [(&web, "web-1"), (&db, "db-1")] {
        let token = aw.w.token(&w.pod, "sigil-csi").await;
        let target = aw.dir.path().join(format!("pods/{name}/volumes/grpc"));
        client
            .node_publish_volume(publish_request(
                &format!("vol-{name}"),
                &target,
                &w.pod,
                Some(&token),
                true,
                &[("mode", "files"), ("formats", "grpc")],
            ))
            .await
            .unwrap();
        targets.push(target);
    }
    let tool_path = tool("envoy-sds-client");
    let mut cmd = db.container.command(&tool_path);
    cmd.args(["grpc-serve", "-dir", &targets[1].display().to_string()])
        .stdout(std::process::Stdio::piped());
    let mut server = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let mut line = async || -> serde_json::Value {
        let l = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the gRPC server said nothing")
            .unwrap()
            .expect("the gRPC server exited");
        serde_json::from_str(&l).unwrap()
    };
    let addr = line().await["listening"].as_str().unwrap().to_owned();

    let ok = json_out(
        "gRPC mTLS web → db",
        &web.run(
            &tool_path,
            &[
                "grpc-dial",
                "-dir",
                &targets[0].display().to_string(),
                "-connect",
                &addr,
                "-server-id",
                &db_id,
            ],
        )
        .await,
    );
    assert_eq!(ok["status"], "SERVING", "{ok}");
    assert_eq!(ok["server_id"], db_id.as_str());
    assert_eq!(
        line().await["peer"],
        web_id.as_str(),
        "the server saw web's SVID"
    );

    // Strangers: the web workload's bundle map, but a certificate from elsewhere.
    let td = aw.w.td.to_string();
    for (foreign_td, what) in [
        ("evil.test", "a trust domain that is not in the bundle map"),
        (
            td.as_str(),
            "a CA of the same trust domain name that is not the trust domain's",
        ),
    ] {
        let foreign = sigil_testkit::federation::Foreign::new(foreign_td);
        let path = web_id.split_once(&td).unwrap().1;
        let (chain, key) = foreign.svid(path);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("svid.pem"), x509::certs_to_pem(&chain)).unwrap();
        std::fs::write(
            dir.path().join("svid_key.pem"),
            key.to_pkcs8_pem().as_bytes(),
        )
        .unwrap();
        std::fs::copy(
            targets[0].join("spiffe-bundle-map.json"),
            dir.path().join("spiffe-bundle-map.json"),
        )
        .unwrap();
        let out = tokio::process::Command::new(&tool_path)
            .args([
                "grpc-dial",
                "-dir",
                &dir.path().display().to_string(),
                "-connect",
                &addr,
                "-server-id",
                &db_id,
            ])
            .output()
            .await
            .unwrap();
        assert!(
            !out.status.success(),
            "a client with {what} was served: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // A workload of the federated trust domain: served, once the bundle map holds it.
    let map = targets[1].join("spiffe-bundle-map.json");
    eventually("partner.test in db's bundle map", SETTLE, || async {
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&map).ok()?).ok()?;
        doc["trust_domains"].get("partner.test").map(|_| ())
    })
    .await;
    let partner_id = "spiffe://partner.test/ns/other/sa/client";
    let (chain, key) = partner.svid("/ns/other/sa/client");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("svid.pem"), x509::certs_to_pem(&chain)).unwrap();
    std::fs::write(
        dir.path().join("svid_key.pem"),
        key.to_pkcs8_pem().as_bytes(),
    )
    .unwrap();
    // Its own bundle map: its trust domain and ours (as its side of the federation).
    let ours: serde_json::Value =
        serde_json::from_slice(&std::fs::read(targets[0].join("spiffe-bundle-map.json")).unwrap())
            .unwrap();
    let theirs = json!({"trust_domains": {
        "partner.test": serde_json::from_str::<serde_json::Value>(&partner.bundle_json()).unwrap(),
        td.clone(): ours["trust_domains"][&td],
    }});
    std::fs::write(
        dir.path().join("spiffe-bundle-map.json"),
        theirs.to_string(),
    )
    .unwrap();
    let out = tokio::process::Command::new(&tool_path)
        .args([
            "grpc-dial",
            "-dir",
            &dir.path().display().to_string(),
            "-connect",
            &addr,
            "-server-id",
            &db_id,
        ])
        .output()
        .await
        .unwrap();
    let v = json_out("gRPC mTLS partner.test → db", &out);
    assert_eq!(v["status"], "SERVING", "{v}");
    assert_eq!(
        line().await["peer"],
        partner_id,
        "db accepted the federated client"
    );

    // The server accepted no other peer.
    let again = json_out(
        "gRPC mTLS web → db again",
        &web.run(
            &tool_path,
            &[
                "grpc-dial",
                "-dir",
                &targets[0].display().to_string(),
                "-connect",
                &addr,
                "-server-id",
                &db_id,
            ],
        )
        .await,
    );
    assert_eq!(again["status"], "SERVING");
    assert_eq!(
        line().await["peer"],
        web_id.as_str(),
        "the next peer the server accepted is web again, no stranger in between"
    );
    server.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_mode_idempotency_and_refusals() {
    let aw = AgentWorld::start("csisock").await;
    let tag = aw.w.tag.clone();
    aw.w.cluster_spiffe_id(&format!("{tag}-web"), "web").await;
    let web = aw.workload("web-1", "web", json!({"app": "web"})).await;
    let other = aw.workload("web-2", "web", json!({"app": "web"})).await;
    let id = aw.id_for_sa("web");
    aw.wait_svid(&id).await;
    let csi = Csi::start(csi_args(&aw)).await;
    let mut client = csi.client().await;

    // Socket mode: the pod's process reaches the Workload API through the mount.
    let target = aw
        .dir
        .path()
        .join("pods")
        .join("web-1")
        .join("volumes")
        .join("spiffe");
    client
        .node_publish_volume(publish_request(
            "vol-sock",
            &target,
            &web.pod,
            None,
            true,
            &[],
        ))
        .await
        .unwrap();
    let addr = format!("unix://{}", target.join("api.sock").display());
    let x = json_out(
        "go-spiffe through the CSI mount",
        &web.run(&tool("go-spiffe-client"), &["-addr", &addr, "x509"])
            .await,
    );
    assert_eq!(x["svids"][0]["spiffe_id"], id.as_str());
    // Istio's name: a volume mounted at /run/secrets/workload-spiffe-uds holds `socket`
    // (the agent's --socket-alias link), and Envoy's SDS is served through it.
    let sds = json_out(
        "SDS through the CSI mount's `socket`",
        &web.run(
            &tool("envoy-sds-client"),
            &[
                "-socket",
                &target.join("socket").display().to_string(),
                "fetch",
                "-names",
                "default,ROOTCA",
                "-own-td",
                &aw.w.td.to_string(),
            ],
        )
        .await,
    );
    assert_eq!(sds["names"], json!(["ROOTCA", "default"]), "{sds}");
    assert!(
        std::fs::write(target.join("x"), b"").is_err(),
        "the socket mount is read-only"
    );

    // 100 publishes of the same volume: one mount.
    for _ in 0..100 {
        client
            .node_publish_volume(publish_request(
                "vol-sock",
                &target,
                &web.pod,
                None,
                true,
                &[],
            ))
            .await
            .unwrap();
    }
    assert_eq!(LinuxMounter.mount_count(&target).unwrap(), 1);
    // CSI NodePublishVolume: the same volume and target in the other mode is
    // ALREADY_EXISTS, and nothing is mounted over the socket.
    let token = aw.w.token(&web.pod, "sigil-csi").await;
    let e = client
        .node_publish_volume(publish_request(
            "vol-sock",
            &target,
            &web.pod,
            Some(&token),
            true,
            &[("mode", "files")],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("workload-api"), "{e:?}");
    assert_eq!(LinuxMounter.mount_count(&target).unwrap(), 1);
    assert!(target.join("api.sock").exists());
    client
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: "vol-sock".into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    assert_eq!(LinuxMounter.mount_count(&target).unwrap(), 0);

    // Refusals, each precise.
    let t = aw.dir.path().join("pods").join("x").join("v");
    let code =
        |r: Result<tonic::Response<pb::NodePublishVolumeResponse>, tonic::Status>| r.unwrap_err();
    let e = code(
        client
            .node_publish_volume(publish_request("v1", &t, &web.pod, None, false, &[]))
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("readOnly"), "{e:?}");
    let e = code(
        client
            .node_publish_volume(publish_request(
                "v1",
                &t,
                &web.pod,
                None,
                true,
                &[("mode", "files")],
            ))
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("tokenRequests"), "{e:?}");
    let e = code(
        client
            .node_publish_volume(publish_request(
                "v1",
                &t,
                &web.pod,
                None,
                true,
                &[("mdoe", "files")],
            ))
            .await,
    );
    assert!(
        e.code() == Code::InvalidArgument && e.message().contains("mdoe"),
        "{e:?}"
    );
    // A token for another pod.
    let other_token = aw.w.token(&other.pod, "sigil-csi").await;
    let e = code(
        client
            .node_publish_volume(publish_request(
                "v1",
                &t,
                &web.pod,
                Some(&other_token),
                true,
                &[("mode", "files")],
            ))
            .await,
    );
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("not bound to pod"), "{e:?}");
    // A pod on another node, with its own valid token.
    let remote =
        aw.w.pod("remote", &aw.w.node_b, "web", json!({"app": "web"}))
            .await;
    let remote_token = aw.w.token(&remote, "sigil-csi").await;
    let e = code(
        client
            .node_publish_volume(publish_request(
                "v1",
                &t,
                &remote,
                Some(&remote_token),
                true,
                &[("mode", "files")],
            ))
            .await,
    );
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("node"), "{e:?}");
    // A token for another audience.
    let wrong = aw.w.token(&web.pod, "not-sigil").await;
    let e = code(
        client
            .node_publish_volume(publish_request(
                "v1",
                &t,
                &web.pod,
                Some(&wrong),
                true,
                &[("mode", "files")],
            ))
            .await,
    );
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(
        LinuxMounter.mount_count(&t).unwrap(),
        0,
        "a refused publish leaves no mount"
    );
    let _ = Api::<Pod>::namespaced(aw.w.client.clone(), &aw.w.ns);
    csi.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_api_answers_only_the_configured_broker() {
    // The agent's Broker API is configured for uid 4242; sigil-csi here runs as root.
    let aw =
        AgentWorld::start_full("csibroker", node_api_common::WorldOptions::default(), 4242).await;
    aw.w.cluster_spiffe_id(&format!("{}-web", aw.w.tag), "web")
        .await;
    let web = aw.workload("web-1", "web", json!({"app": "web"})).await;
    aw.wait_svid(&aw.id_for_sa("web")).await;
    let token = aw.w.token(&web.pod, "sigil-csi").await;
    let csi = Csi::start(csi_args(&aw)).await;
    let mut client = csi.client().await;
    let target = aw.dir.path().join("pods").join("web-1").join("identity");
    let e = client
        .node_publish_volume(publish_request(
            "vol",
            &target,
            &web.pod,
            Some(&token),
            true,
            &[("mode", "files")],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("not the configured broker"), "{e:?}");
    assert_eq!(LinuxMounter.mount_count(&target).unwrap(), 0);
    assert!(aw.metrics().await.contains("reason=\"not_the_broker\""));
    csi.stop().await;
}

/// Issue #29 item 3: a socket-mode publish with the pod's token returns only once the
/// agent holds the pod's X509-SVID, so an application that fetches once at start (the
/// container starts after the publish) gets its identity at the first try; a pod that no
/// ClusterSPIFFEID selects is not held back beyond a short grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_mode_publish_waits_for_the_pods_identity() {
    let aw = AgentWorld::start("csiwait").await;
    let tag = aw.w.tag.clone();
    let late = aw.workload("late-1", "web", json!({"app": "late"})).await;
    let none = aw.workload("none-1", "web", json!({"app": "none"})).await;
    let csi = Csi::start(csi_args(&aw)).await;
    let mut client = csi.client().await;
    let target = |pod: &str| {
        aw.dir
            .path()
            .join("pods")
            .join(pod)
            .join("volumes")
            .join("spiffe")
    };

    // No ClusterSPIFFEID selects the pod when the kubelet calls: the publish waits; the
    // identity appears 300 ms later (entry pushed to the agent, SVID signed) and the
    // publish returns with it in the agent's cache.
    let token = aw.w.token(&late.pod, "sigil-csi").await;
    let request = publish_request(
        "vol-late",
        &target("late-1"),
        &late.pod,
        Some(&token),
        true,
        &[],
    );
    let started = std::time::Instant::now();
    let publish = tokio::spawn({
        let mut client = client.clone();
        async move {
            client.node_publish_volume(request).await.unwrap();
            started.elapsed()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !publish.is_finished(),
        "the publish returned before the pod had an identity"
    );
    node_api_common::create(
        &Api::<ClusterSPIFFEID>::all(aw.w.client.clone()),
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{tag}-late")}, "spec": {
            "trustDomain": aw.w.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
            "podSelector": {"matchLabels": {"app": "late"}},
        }}),
    )
    .await;
    let waited = publish.await.unwrap();
    println!("socket-mode publish returned {waited:?} after the call (identity created at 300 ms)");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(
        waited < Duration::from_secs(10),
        "the wait ran out: {waited:?}"
    );
    // The application's one fetch at start succeeds.
    let addr = format!("unix://{}", target("late-1").join("api.sock").display());
    let x = json_out(
        "go-spiffe's first fetch through the fresh mount",
        &late
            .run(&tool("go-spiffe-client"), &["-addr", &addr, "x509"])
            .await,
    );
    assert_eq!(x["svids"][0]["spiffe_id"], aw.id_for_sa("web").as_str());

    // A pod with no identity: mounted after the grace, not after the full wait; its
    // fetch is refused as before.
    let token = aw.w.token(&none.pod, "sigil-csi").await;
    let started = std::time::Instant::now();
    client
        .node_publish_volume(publish_request(
            "vol-none",
            &target("none-1"),
            &none.pod,
            Some(&token),
            true,
            &[],
        ))
        .await
        .unwrap();
    let waited = started.elapsed();
    println!("socket-mode publish for a pod with no identity returned after {waited:?}");
    assert!(
        waited >= sigil_csi::service::NO_IDENTITY_GRACE && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(LinuxMounter.mount_count(&target("none-1")).unwrap(), 1);
    let addr = format!("unix://{}", target("none-1").join("api.sock").display());
    let out = none
        .run(&tool("go-spiffe-client"), &["-addr", &addr, "x509"])
        .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no identity issued"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
