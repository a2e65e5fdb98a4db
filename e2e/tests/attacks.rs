//! The attack suite: each test plays an attacker against the real binaries' code (a real
//! apiserver, operator, agent and sigil-csi, real mounts and sockets) and asserts the
//! attack fails. docs/security.md lists every row of the threat model with its test here.
//!
//! Every test was run against the code before its fix and failed there; the note on each
//! says how.
#![allow(clippy::unwrap_used)]

use sigil_testkit::node_api as node_api_common;
use sigil_testkit::trust_domain as trust_domain_common;

use sigil_testkit::agent as agent_common;
use sigil_testkit::csi as csi_common;

use std::path::Path;

use agent_common::*;
use csi_common::*;
use kube::api::Api;
use serde_json::json;
use sigil_csi::mounter::{LinuxMounter, Mounter};
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use trust_domain_common::{SETTLE, eventually};

fn erofs<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) {
    match r {
        Err(e) if e.raw_os_error() == Some(libc_erofs()) => {}
        other => panic!("{what}: expected EROFS (a read-only volume), got {other:?}"),
    }
}

fn libc_erofs() -> i32 {
    30 // EROFS on Linux
}

/// The options of the mount on `target`, from mountinfo.
fn mount_options(target: &Path) -> String {
    let target = std::fs::canonicalize(target).unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(target.to_str().unwrap()))
        .and_then(|l| l.split(' ').nth(5).map(str::to_owned))
        .unwrap_or_default()
}

/// Attacker: a pod author with a files-mode volume (root in the container). Before the fix,
/// the volume was the writable tmpfs itself, whatever `readOnly` said: replacing `..data`
/// with a symlink to `/some/host/dir` made sigil-csi `remove_dir_all` that directory as
/// root at the next rewrite (rotation, JWT refresh, bundle change). Fails on the old code:
/// the writes succeed and the host directory is gone after the rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_cannot_write_its_files_volume_nor_make_sigil_csi_delete_host_directories() {
    let aw = AgentWorld::start("atkfiles").await;
    let tag = aw.w.tag.clone();
    node_api_common::create(
        &Api::<ClusterSPIFFEID>::all(aw.w.client.clone()),
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{tag}-web")}, "spec": {
            "trustDomain": aw.w.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
            "podSelector": {"matchLabels": {"app": "web"}},
            "ttl": "8s",
        }}),
    )
    .await;
    let web = aw.workload("web-1", "web", json!({"app": "web"})).await;
    let id = aw.id_for_sa("web");
    aw.wait_svid(&id).await;
    let token = aw.w.token(&web.pod, "sigil-csi").await;
    let csi = Csi::start(csi_args(&aw)).await;
    let mut client = csi.client().await;

    // A host directory the attacker wants gone.
    let host = aw.dir.path().join("host").join("var-lib-important");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("precious"), b"keep me").unwrap();

    // readOnly: false is what the kubelet sends when the pod spec does not say readOnly.
    let target = aw.dir.path().join("pods").join("web-1").join("identity");
    client
        .node_publish_volume(publish_request(
            "vol-atk",
            &target,
            &web.pod,
            Some(&token),
            false,
            &[("mode", "files"), ("jwtAudiences", "db")],
        ))
        .await
        .unwrap();
    let (cert, key) = read_pair(&target);
    assert_eq!(check_files(&target, &cert, &key).0, id);
    let options = mount_options(&target);
    assert!(
        options.split(',').any(|o| o == "ro"),
        "the pod's view of a files volume is mounted read-only: {options}"
    );

    // The attack, step by step as a pod's root process would try it.
    let tmp = target.join("..data_tmp");
    erofs(
        "a symlink to a host directory",
        std::os::unix::fs::symlink(&host, &tmp),
    );
    erofs(
        "replacing ..data",
        std::fs::rename(&tmp, target.join("..data")),
    );
    erofs(
        "removing ..data",
        std::fs::remove_file(target.join("..data")),
    );
    erofs("a new file", std::fs::write(target.join("planted"), b"x"));
    erofs(
        "overwriting the key",
        std::fs::OpenOptions::new()
            .write(true)
            .open(target.join("svid_key.pem")),
    );
    let generation_dir = target.join(generation(&target));
    erofs(
        "a file in the current generation",
        std::fs::write(generation_dir.join("x"), b"x"),
    );

    // The next rewrite (a rotation) leaves the host directory alone and the files whole.
    eventually("a rotation of the files", SETTLE, || async {
        let (c, k) = read_pair(&target);
        check_files(&target, &c, &k);
        (c != cert).then_some(())
    })
    .await;
    assert_eq!(
        std::fs::read(host.join("precious")).unwrap(),
        b"keep me",
        "the host directory survived the rotation"
    );
    assert_eq!(LinuxMounter.mount_count(&target).unwrap(), 1);

    client
        .node_unpublish_volume(sigil_identity::proto::csi::NodeUnpublishVolumeRequest {
            volume_id: "vol-atk".into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    assert_eq!(LinuxMounter.mount_count(&target).unwrap(), 0);
    let staging = sigil_csi::files::staging_dir(&csi.args.data_dir, "vol-atk");
    assert_eq!(
        LinuxMounter.mount_count(&staging).unwrap(),
        0,
        "the staging tmpfs is unmounted"
    );
    assert!(!staging.exists(), "the staging directory is removed");
    csi.stop().await;
}

/// Attacker: a pod author choosing volume attributes. Each attribute that would break the
/// volume later, or loosen it, is refused at publish with InvalidArgument naming it. Fails
/// on the old code: fileMode 0777 and 0755 were accepted, two audiences mapping to one
/// file were accepted, and a fsGroup attribute overrode the pod's fsGroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_cannot_loosen_its_files_volume_through_attributes() {
    let aw = AgentWorld::start("atkattrs").await;
    aw.w.cluster_spiffe_id(&format!("{}-web", aw.w.tag), "web")
        .await;
    let web = aw.workload("web-1", "web", json!({"app": "web"})).await;
    aw.wait_svid(&aw.id_for_sa("web")).await;
    let token = aw.w.token(&web.pod, "sigil-csi").await;
    let csi = Csi::start(csi_args(&aw)).await;
    let mut client = csi.client().await;
    let target = aw.dir.path().join("pods").join("web-1").join("attrs");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("fileMode", "0777")], "fileMode"),
        (&[("fileMode", "0755")], "fileMode"),
        (&[("fileMode", "0646")], "fileMode"),
        (&[("jwtAudiences", "a/b,a:b")], "jwtAudiences"),
        (&[("jwtAudiences", "db,db")], "jwtAudiences"),
    ];
    for (attrs, field) in cases {
        let mut all = vec![("mode", "files")];
        all.extend_from_slice(attrs);
        let e = client
            .node_publish_volume(publish_request(
                "vol-attrs",
                &target,
                &web.pod,
                Some(&token),
                true,
                &all,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{attrs:?}: {e:?}");
        assert!(e.message().contains(field), "{attrs:?}: {e:?}");
    }
    // The pod's fsGroup (volume_mount_group) wins; an attribute may not contradict it.
    let mut req = publish_request(
        "vol-attrs",
        &target,
        &web.pod,
        Some(&token),
        true,
        &[("mode", "files"), ("fsGroup", "0")],
    );
    if let Some(sigil_identity::proto::csi::volume_capability::AccessType::Mount(m)) = req
        .volume_capability
        .as_mut()
        .and_then(|c| c.access_type.as_mut())
    {
        m.volume_mount_group = "2000".into();
    }
    let e = client.node_publish_volume(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("fsGroup"), "{e:?}");
    req.volume_context.remove("fsGroup");
    client.node_publish_volume(req).await.unwrap();
    let meta = std::fs::metadata(target.join("svid_key.pem")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 2000);
    assert_eq!(LinuxMounter.mount_count(&target).unwrap(), 1);
    client
        .node_unpublish_volume(sigil_identity::proto::csi::NodeUnpublishVolumeRequest {
            volume_id: "vol-attrs".into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    csi.stop().await;
}

/// A pod on node A with `annotations`, running, whose processes the test starts.
async fn annotated_workload(
    aw: &AgentWorld,
    name: &str,
    labels: serde_json::Value,
    annotations: serde_json::Value,
) -> Workload {
    let mut spec = node_api_common::pod_json(name, &aw.w.node_a, "web", labels);
    spec["metadata"]["annotations"] = annotations;
    let pod = node_api_common::create(
        &Api::<k8s_openapi::api::core::v1::Pod>::namespaced(aw.w.client.clone(), &aw.w.ns),
        spec,
    )
    .await;
    let container =
        sigil_e2e::pod::PodContainer::create(&kube::ResourceExt::uid(&pod).unwrap()).unwrap();
    let pod = container
        .mark_running(
            &aw.w.client,
            &aw.w.ns,
            name,
            "main",
            "registry.invalid/none",
        )
        .await
        .unwrap();
    Workload { pod, container }
}

/// Attacker: a pod author whose annotation feeds a ClusterSPIFFEID template. They write
/// the path of node A's agent (or of the operator, or of the bundle endpoint) into the
/// annotation, hoping for an SVID that the Node API takes for node A's agent, or that
/// agents and federation partners take for the operator or the bundle endpoint. Fails on
/// the old code: the CEL rule did not exist, and the pods' entries rendered, so the
/// render-failure count stayed at 0 and the pods got those SVIDs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_annotation_cannot_render_an_agent_operator_or_bundle_endpoint_identity() {
    let aw = AgentWorld::start("atkpath").await;
    let tag = aw.w.tag.clone();
    let api = Api::<ClusterSPIFFEID>::all(aw.w.client.clone());
    // A template that names a reserved path outright is refused at admission.
    let literal = api
        .create(
            &kube::api::PostParams::default(),
            &serde_json::from_value(json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{tag}-literal")}, "spec": {
                "trustDomain": aw.w.td_object,
                "spiffeIDTemplate": "spiffe://{{trustDomain}}/sigil/operator",
            }}))
            .unwrap(),
        )
        .await
        .unwrap_err();
    assert!(
        literal.to_string().contains("reserved for Sigil"),
        "{literal}"
    );

    node_api_common::create(
        &api,
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{tag}-annotated")}, "spec": {
            "trustDomain": aw.w.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
            "podSelector": {"matchLabels": {"app": "annotated"}},
            "spiffeIDTemplate": "spiffe://{{trustDomain}}/{{pod.annotations['example.com/path']}}",
        }}),
    )
    .await;
    let agent_path = format!(
        "sigil/agent/k8s_psat/{}/{}",
        node_api_common::CLUSTER,
        aw.w.node_a_uid
    );
    let mut evil = Vec::new();
    for (name, path) in [
        ("as-agent", agent_path.as_str()),
        ("as-operator", "sigil/operator"),
        ("as-endpoint", "sigil/bundle-endpoint"),
        ("as-root", "sigil"),
    ] {
        evil.push(
            annotated_workload(
                &aw,
                name,
                json!({"app": "annotated"}),
                json!({"example.com/path": path}),
            )
            .await,
        );
    }
    // A pod with an ordinary path proves the template works.
    let _ok = annotated_workload(
        &aw,
        "honest",
        json!({"app": "annotated"}),
        json!({"example.com/path": "apps/honest"}),
    )
    .await;
    aw.wait_svid(&format!("spiffe://{}/apps/honest", aw.w.td))
        .await;
    let failure = eventually(
        "four render failures on the ClusterSPIFFEID",
        SETTLE,
        || async {
            let c = api.get(&format!("{tag}-annotated")).await.ok()?;
            let stats = c.status?.stats;
            (stats.pod_entry_render_failures == 4).then_some(stats.first_render_failure?)
        },
    )
    .await;
    assert!(failure.contains("reserved for Sigil"), "{failure}");
    assert!(
        !aw.agent
            .cache
            .entries()
            .iter()
            .any(|e| e.spiffe_id.is_reserved()),
        "no entry with a reserved path reached the agent"
    );
    for w in &evil {
        let out = w
            .run(&tool("go-spiffe-client"), &["-addr", &aw.addr, "x509"])
            .await;
        assert!(
            !out.status.success(),
            "a pod with a reserved path got an SVID"
        );
    }
}

/// Attacker: someone holding an SVID whose ID is node A's agent path but which the
/// workload signing path issued (forged here with the CA's own key, without the component
/// policy, as the old code would have signed it for a pod). They call the Node API with it.
/// Fails on the old code: the Node API authorised the call by the path alone and served
/// node A's entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_svid_with_an_agent_path_cannot_call_the_node_api() {
    use sigil_identity::keys::PrivateKey;
    use sigil_identity::proto::node as pb;
    use sigil_identity::tls::{Authorizer, SharedBundles, SpiffeServerVerifier, SwappableCert};

    let w = node_api_common::World::start("atknodeapi").await;
    let authority = w.replica.authorities.get(&w.td).unwrap();
    let ca = &authority.x509_ca;
    let agent_id = format!(
        "spiffe://{}/sigil/agent/k8s_psat/{}/{}",
        w.td,
        node_api_common::CLUSTER,
        w.node_a_uid
    );
    let ca_key = rcgen::KeyPair::from_pem(&ca.key_pkcs8_pem().unwrap()).unwrap();
    let ca_der = rustls::pki_types::CertificateDer::from(ca.certificate().to_vec());
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der, ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(agent_id.as_str().try_into().unwrap())];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = p.signed_by(&key, &issuer).unwrap();
    let mut chain = vec![leaf.der().to_vec()];
    chain.extend(ca.leaf_intermediates().iter().cloned());
    let cert = SwappableCert::new();
    cert.set(&chain, &PrivateKey::from_pem(&key.serialize_pem()).unwrap())
        .unwrap();

    let mut set = sigil_identity::BundleSet::new();
    set.upsert(authority.bundle.clone());
    let verifier = SpiffeServerVerifier::new(SharedBundles::new(set), Authorizer::Any);
    let tls = sigil_identity::tls::client_config(cert, verifier).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let address = w.node_api_addr.clone();
    let channel = tonic::transport::Endpoint::from_static("http://node-api")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let (connector, address) = (connector.clone(), address.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&address).await?;
                let name = rustls::pki_types::ServerName::try_from("sigil-operator").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await;
    let denied = |s: &tonic::Status| {
        matches!(
            s.code(),
            // A refused TLS 1.3 client certificate shows as the server closing the
            // connection after the client's handshake: Cancelled or Unavailable.
            tonic::Code::Unavailable
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Unauthenticated
                | tonic::Code::PermissionDenied
        )
    };
    // Refused at the TLS handshake (the connect or the first call fails), or, were the
    // handshake to pass, by the per-call check: never a message.
    match channel {
        Err(e) => eprintln!("refused at connect: {e}"),
        Ok(channel) => {
            let mut client = pb::node_client::NodeClient::new(channel);
            match client.sync_entries(pb::SyncEntriesRequest::default()).await {
                Err(s) => assert!(denied(&s), "{s:?}"),
                Ok(mut stream) => match stream.get_mut().message().await {
                    Err(s) => assert!(denied(&s), "{s:?}"),
                    Ok(m) => panic!(
                        "the Node API served a workload SVID with node A's agent path: {m:?}"
                    ),
                },
            }
        }
    }
    // The refusal is counted where it happened: at the handshake (the TLS verifier checks
    // the component policy) or, past it, by the per-call check. The server counts it in
    // its connection task, which may run just after the client saw the connection close.
    let counted = |text: &str, prefix: &str, reason: &str| {
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(&format!("reason=\"{reason}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let (at_handshake, per_call) = loop {
        let text = w.metrics_text();
        let at_handshake = counted(
            &text,
            "sigil_node_api_tls_handshakes_failed_total",
            "bad_client_certificate",
        );
        let per_call = counted(
            &text,
            "sigil_node_api_denials_total",
            "not_a_component_svid",
        );
        if at_handshake + per_call >= 1 || std::time::Instant::now() > deadline {
            break (at_handshake, per_call);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    eprintln!("refusal counted: at the handshake {at_handshake}, per call {per_call}");
    assert!(
        at_handshake + per_call >= 1,
        "the refusal was not counted (handshake {at_handshake}, per call {per_call})"
    );
}
