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
