//! What the Workload API refuses, seen from real clients: a process in no pod, a request
//! without the security header, a JWT-SVID for someone else's ID, and JWT-SVIDs with a
//! bad alg, expired, or for another audience. Unix selectors tell two users in one pod
//! apart. (A recycled PID is covered in node-agent/tests/attestation.rs, and PID reuse
//! at accept with a real kernel in e2e/tests/attacks_revocation.rs.)
#![allow(clippy::unwrap_used)]

use sigil_testkit::node_api as node_api_common;

use sigil_testkit::agent as agent_common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use agent_common::*;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hyper_util::rt::TokioIo;
use kube::api::Api;
use serde_json::json;
use sigil_identity::SpiffeId;
use sigil_identity::proto::workload as pb;
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use tonic::Code;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_precise() {
    let aw = AgentWorld::start("wsec").await;
    let tag = aw.w.tag.clone();
    aw.w.cluster_spiffe_id(&format!("{tag}-web"), "web").await;
    aw.w.cluster_spiffe_id(&format!("{tag}-api"), "api").await;
    let web = aw.workload("web-1", "web", json!({"app": "web"})).await;
    let _api = aw
        .workload("api-1", "intruder", json!({"app": "api"}))
        .await;
    let web_id = aw.id_for_sa("web");
    let api_id = aw.id_for_sa("intruder");
    aw.wait_svid(&web_id).await;
    aw.wait_svid(&api_id).await;
    let go = tool("go-spiffe-client");
    let addr = aw.addr.as_str();

    // A process outside any pod: no identity.
    let out = tokio::process::Command::new(&go)
        .args(["-addr", addr, "-timeout", "5s", "x509"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("PermissionDenied") && stderr(&out).contains("no identity issued"),
        "{}",
        stderr(&out)
    );
    // A pod that no ClusterSPIFFEID selects: no identity either.
    let stray = aw
        .workload("stray", "web", json!({"app": "nothing-selects-me"}))
        .await;
    let out = stray
        .run(&go, &["-addr", addr, "-timeout", "5s", "x509"])
        .await;
    assert!(
        stderr(&out).contains("PermissionDenied"),
        "{}",
        stderr(&out)
    );

    // No security header: InvalidArgument, before anything else.
    let path = aw.socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .unwrap();
    let raw_channel = channel.clone();
    let mut raw = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let status = raw
        .fetch_jwtsvid(pb::JwtsvidRequest {
            audience: vec!["x".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("security header"), "{status:?}");
    let status = raw
        .fetch_x509_bundles(pb::X509BundlesRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // A wrong value is no header: only exactly `true` passes.
    let mut wrong = tonic::Request::new(pb::X509BundlesRequest {});
    wrong
        .metadata_mut()
        .insert("workload.spiffe.io", "TRUE".parse().unwrap());
    let status = raw.fetch_x509_bundles(wrong).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // gRPC server reflection lists the Workload API, and requires the header too.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(raw_channel);
    let request = || tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let status = reflection
        .server_reflection_info(tokio_stream::iter(vec![request()]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut with_header = tonic::Request::new(tokio_stream::iter(vec![request()]));
    with_header
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut answers = reflection
        .server_reflection_info(with_header)
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("{answer:?}")
    };
    assert!(
        list.service.iter().any(|s| s.name == "SpiffeWorkloadAPI"),
        "{list:?}"
    );

    // A JWT-SVID for another workload's ID.
    let out = web
        .run(
            &go,
            &[
                "-addr",
                addr,
                "jwt",
                "-audience",
                "db",
                "-spiffe-id",
                &api_id,
            ],
        )
        .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("PermissionDenied"),
        "{}",
        stderr(&out)
    );
    // Its own ID works, and no audience is refused.
    let own = json_out(
        "jwt for its own ID",
        &web.run(
            &go,
            &[
                "-addr",
                addr,
                "jwt",
                "-audience",
                "db",
                "-spiffe-id",
                &web_id,
            ],
        )
        .await,
    );
    let token = own["token"].as_str().unwrap().to_owned();

    // ValidateJWTSVID: wrong audience, expired, bad alg.
    let validate = |token: String, audience: &'static str| {
        let (web, go) = (&web, &go);
        async move {
            web.run(
                go,
                &[
                    "-addr",
                    addr,
                    "validate",
                    "-audience",
                    audience,
                    "-token",
                    &token,
                ],
            )
            .await
        }
    };
    let out = validate(token.clone(), "db").await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = validate(token.clone(), "not-db").await;
    assert!(
        stderr(&out).contains("InvalidArgument") && stderr(&out).contains("audience"),
        "{}",
        stderr(&out)
    );

    let authority = aw.w.replica.authorities.get(&aw.w.td).unwrap();
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let expired = authority
        .jwt_key
        .mint(
            &SpiffeId::parse(&web_id).unwrap(),
            &["db".into()],
            Duration::from_secs(300),
            hour_ago,
            None,
        )
        .unwrap();
    let out = validate(expired, "db").await;
    assert!(
        stderr(&out).contains("InvalidArgument") && stderr(&out).contains("expired"),
        "{}",
        stderr(&out)
    );

    let mut parts: Vec<&str> = token.split('.').collect();
    let header: serde_json::Value = serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
    let forged_header = B64.encode(
        serde_json::to_vec(&json!({"alg": "HS256", "kid": header["kid"], "typ": "JWT"})).unwrap(),
    );
    parts[0] = &forged_header;
    let out = validate(parts.join("."), "db").await;
    assert!(
        stderr(&out).contains("InvalidArgument") && stderr(&out).contains("HS256"),
        "{}",
        stderr(&out)
    );

    // Every refusal was logged and counted with its reason.
    let metrics = aw.metrics().await;
    for reason in [
        "no_identity",
        "missing_security_header",
        "spiffe_id_not_entitled",
        "invalid_jwt",
    ] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "no denial counted for {reason}:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_selectors_give_two_users_in_one_pod_different_ids() {
    let aw = AgentWorld::start("wuid").await;
    let tag = aw.w.tag.clone();
    let csids = Api::<ClusterSPIFFEID>::all(aw.w.client.clone());
    for uid in [1001, 1002] {
        node_api_common::create(
            &csids,
            json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{tag}-uid{uid}")}, "spec": {
                "trustDomain": aw.w.td_object,
                "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
                "podSelector": {"matchLabels": {"app": "multi"}},
                "spiffeIDTemplate": format!("spiffe://{{{{trustDomain}}}}/ns/{{{{pod.namespace}}}}/uid/{uid}"),
                "workloadSelectorTemplates": [format!("unix:uid:{uid}")],
            }}),
        )
        .await;
    }
    let multi = aw.workload("multi", "web", json!({"app": "multi"})).await;
    for uid in [1001, 1002] {
        aw.wait_svid(&format!("spiffe://{}/ns/{}/uid/{uid}", aw.w.td, aw.w.ns))
            .await;
    }
    // The client must be executable by those users (the tool cache is under /root).
    let bin_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let go = bin_dir.path().join("go-spiffe-client");
    std::fs::copy(tool("go-spiffe-client"), &go).unwrap();
    std::fs::set_permissions(&go, std::fs::Permissions::from_mode(0o755)).unwrap();
    let go = go.display().to_string();
    for uid in ["1001", "1002"] {
        let out = multi
            .run(
                "setpriv",
                &[
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    &go,
                    "-addr",
                    &aw.addr,
                    "x509",
                ],
            )
            .await;
        let x = json_out(&format!("go-spiffe as uid {uid}"), &out);
        let ids: Vec<&str> = x["svids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["spiffe_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            vec![format!("spiffe://{}/ns/{}/uid/{uid}", aw.w.td, aw.w.ns)],
            "uid {uid}"
        );
    }
    // Root in the same pod matches neither entry.
    let out = multi
        .run(&go, &["-addr", &aw.addr, "-timeout", "5s", "x509"])
        .await;
    assert!(
        stderr(&out).contains("PermissionDenied"),
        "{}",
        stderr(&out)
    );
}
