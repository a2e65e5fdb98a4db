//! The Node API against the real apiserver, driven by the agent's own client
//! (`sigil_agent::node_client`): PSAT attestation with real pod-bound tokens, the entry
//! stream, CSR signing, JWT-SVIDs, renewal and re-attestation, and every denial with its
//! precise status.
#![allow(clippy::unwrap_used)]

use sigil_testkit::node_api as node_api_common;
use sigil_testkit::trust_domain as trust_domain_common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use node_api_common::*;
use serde_json::json;
use sigil_identity::keys::{KeyType, PrivateKey};
use sigil_identity::proto::node as pb;
use sigil_identity::tls::BundleSource;
use sigil_identity::{BundleSet, SpiffeId, x509};
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_operator::index::entry_id;
use tonic::Code;
use trust_domain_common::*;

/// Reads the stream until `f` accepts the accumulated entries (by entry ID); returns the
/// revision of the last message read (0 if none was needed).
async fn stream_until(
    stream: &mut tonic::Streaming<pb::SyncEntriesResponse>,
    entries: &mut std::collections::BTreeMap<String, pb::Entry>,
    what: &str,
    f: impl Fn(&std::collections::BTreeMap<String, pb::Entry>) -> bool,
) -> u64 {
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut revision = 0;
    while !f(entries) {
        let msg = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {what}; have {:?}",
                    entries.keys().collect::<Vec<_>>()
                )
            })
            .expect("stream ended")
            .expect("stream error");
        if msg.full {
            entries.clear();
        }
        for id in msg.removed {
            entries.remove(&id);
        }
        for e in msg.upserts {
            entries.insert(e.id.clone(), e);
        }
        revision = msg.revision;
    }
    revision
}

fn csr(id: &str) -> (PrivateKey, Vec<u8>) {
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let der = x509::build_csr(&key, &SpiffeId::parse(id).unwrap()).unwrap();
    (key, der)
}

#[tokio::test]
async fn an_agent_attests_streams_its_entries_and_gets_svids_signed() {
    let w = World::start("napi").await;
    let (agent, agent_token) = w.attested_agent_with_token(&w.node_a).await;
    let svid = agent.svid().unwrap();
    assert_eq!(
        svid.spiffe_id.to_string(),
        format!(
            "spiffe://{}/sigil/agent/k8s_psat/{CLUSTER}/{}",
            w.td, w.node_a_uid
        )
    );
    for s in [
        format!("k8s_psat:agent_node_name:{}", w.node_a),
        format!("k8s_psat:cluster:{CLUSTER}"),
        "k8s_psat:agent_sa:sigil-agent".into(),
        "k8s_psat:agent_node_label:zone:z1".into(),
    ] {
        assert!(
            svid.selectors.contains(&s),
            "missing selector {s}: {:?}",
            svid.selectors
        );
    }
    let bundle = agent.bundles().bundle_for(&w.td).unwrap();
    x509::validate_x509_svid(&svid.chain, &bundle, SystemTime::now()).unwrap();

    // Workloads: one on each node, a ClusterSPIFFEID selecting both.
    let web_a = w
        .pod("web-a", &w.node_a, "web", json!({"app": "web"}))
        .await;
    let web_b = w
        .pod("web-b", &w.node_b, "web", json!({"app": "web"}))
        .await;
    let csid = format!("{}-web", w.tag);
    w.cluster_spiffe_id(&csid, "web").await;
    let id_a = entry_id(&csid, &web_a.uid().unwrap());
    let id_b = entry_id(&csid, &web_b.uid().unwrap());
    let workload_id = format!("spiffe://{}/ns/{}/sa/web", w.td, w.ns);

    let mut stream = agent.sync_entries(0).await.unwrap();
    let mut entries = Default::default();
    stream_until(&mut stream, &mut entries, "web-a's entry", |e| {
        e.contains_key(&id_a)
    })
    .await;
    assert!(
        !entries.contains_key(&id_b),
        "node A must not see node B's entry"
    );
    let entry = &entries[&id_a];
    assert_eq!(entry.spiffe_id, workload_id);
    assert_eq!(entry.x509_svid_ttl_seconds, 20 * 60);
    assert!(
        entry
            .selectors
            .iter()
            .any(|s| s.r#type == "k8s" && s.value == format!("pod-uid:{}", web_a.uid().unwrap()))
    );

    // Sign a batch: the entry's TTL and DNS names, whatever the CSR says.
    let (_key, der) = csr(&workload_id);
    let results = agent
        .sign(vec![pb::SvidRequest {
            entry_id: id_a.clone(),
            csr: der,
        }])
        .await
        .unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].error_code, 0, "{}", results[0].error_message);
    let verified =
        x509::validate_x509_svid(&results[0].svid_chain, &bundle, SystemTime::now()).unwrap();
    assert_eq!(verified.spiffe_id.to_string(), workload_id);
    let leaf = x509::inspect_leaf(&results[0].svid_chain[0]).unwrap();
    let life = leaf.not_after.duration_since(leaf.not_before).unwrap();
    assert!(
        life <= Duration::from_secs(20 * 60 + 60) && life >= Duration::from_secs(19 * 60),
        "TTL {life:?}"
    );
    assert_eq!(leaf.dns_names, vec!["web-a.z1".to_owned()]);

    // JWT-SVID: validates against the JWKS bundle.
    let (token, _) = agent.mint_jwt(&id_a, &["db".into()]).await.unwrap();
    let mut set = BundleSet::new();
    set.insert(bundle.clone()).unwrap();
    let jwt =
        sigil_identity::jwt::validate_jwt_svid(&token, &set, "db", SystemTime::now()).unwrap();
    assert_eq!(jwt.spiffe_id.to_string(), workload_id);

    // Renewal over mTLS, proving the agent pod again with its token.
    let renewed = agent.renew(&agent_token).await.unwrap();
    assert_eq!(renewed.spiffe_id, svid.spiffe_id);
    assert_ne!(renewed.chain[0], svid.chain[0]);
    x509::validate_x509_svid(&renewed.chain, &bundle, SystemTime::now()).unwrap();

    // Moving the selector moves the entry: web-a loses it, a new app=api pod gets one.
    let api_pod = w
        .pod("api-a", &w.node_a, "web", json!({"app": "api"}))
        .await;
    let id_api = entry_id(&csid, &api_pod.uid().unwrap());
    Api::<ClusterSPIFFEID>::all(w.client.clone())
        .patch(
            &csid,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"podSelector": {"matchLabels": {"app": "api"}}}})),
        )
        .await
        .unwrap();
    stream_until(
        &mut stream,
        &mut entries,
        "the entry to move to api-a",
        |e| e.contains_key(&id_api) && !e.contains_key(&id_a),
    )
    .await;

    // Deleting the pod removes its entry from the stream.
    Api::<Pod>::namespaced(w.client.clone(), &w.ns)
        .delete(
            "api-a",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let revision = stream_until(&mut stream, &mut entries, "api-a's entry to go", |e| {
        !e.contains_key(&id_api)
    })
    .await;
    // And it can no longer be signed for.
    let (_k, der) = csr(&workload_id);
    let results = agent
        .sign(vec![pb::SvidRequest {
            entry_id: id_api,
            csr: der,
        }])
        .await
        .unwrap();
    assert_eq!(
        Code::from_i32(results[0].error_code),
        Code::PermissionDenied
    );

    // A second connection resuming from the revision it has gets an empty delta, not a
    // snapshot; one starting from 0 gets the full set. Bundles ride both.
    assert!(revision > 0);
    let mut resumed = agent.sync_entries(revision).await.unwrap();
    let first = resumed.next().await.unwrap().unwrap();
    assert!(
        !first.full && first.upserts.is_empty() && first.removed.is_empty(),
        "resume sent {first:?}"
    );
    assert_eq!(first.revision, revision);
    assert!(
        first
            .bundles
            .iter()
            .any(|b| b.trust_domain == w.td.to_string()),
        "bundles ride the stream"
    );
    let mut fresh = agent.sync_entries(0).await.unwrap();
    let snapshot = fresh.next().await.unwrap().unwrap();
    assert!(snapshot.full);
    assert_eq!(
        snapshot
            .upserts
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>(),
        entries.keys().cloned().collect::<Vec<_>>()
    );
}

fn code(e: &sigil_agent::node_client::NodeClientError) -> Code {
    e.status()
        .map(|s| s.code())
        .unwrap_or_else(|| panic!("not a gRPC status: {e}"))
}

#[tokio::test]
async fn every_denial_has_a_precise_status() {
    let w = World::start("deny").await;
    let cp = sigil_e2e::shared().await;
    let agent_a = w.attested_agent(&w.node_a).await;
    let web_b = w
        .pod("web-b", &w.node_b, "web", json!({"app": "web"}))
        .await;
    let web_a = w
        .pod("web-a", &w.node_a, "web", json!({"app": "web"}))
        .await;
    let csid = format!("{}-web", w.tag);
    w.cluster_spiffe_id(&csid, "web").await;
    let id_a = entry_id(&csid, &web_a.uid().unwrap());
    let id_b = entry_id(&csid, &web_b.uid().unwrap());
    let workload_id = format!("spiffe://{}/ns/{}/sa/web", w.td, w.ns);
    let mut stream = agent_a.sync_entries(0).await.unwrap();
    stream_until(&mut stream, &mut Default::default(), "web-a's entry", |e| {
        e.contains_key(&id_a)
    })
    .await;

    // Node A's agent asks for node B's workload.
    let (_k, der) = csr(&workload_id);
    let r = agent_a
        .sign(vec![pb::SvidRequest {
            entry_id: id_b.clone(),
            csr: der,
        }])
        .await
        .unwrap();
    assert_eq!(Code::from_i32(r[0].error_code), Code::PermissionDenied);
    assert!(
        r[0].error_message.contains("not authorised for node"),
        "{}",
        r[0].error_message
    );
    let e = agent_a.mint_jwt(&id_b, &["x".into()]).await.unwrap_err();
    assert_eq!(code(&e), Code::PermissionDenied);

    // A CSR for an ID the entry does not grant.
    let (_k, der) = csr(&format!("spiffe://{}/ns/{}/sa/admin", w.td, w.ns));
    let r = agent_a
        .sign(vec![pb::SvidRequest {
            entry_id: id_a.clone(),
            csr: der,
        }])
        .await
        .unwrap();
    assert_eq!(Code::from_i32(r[0].error_code), Code::PermissionDenied);
    assert!(
        r[0].error_message.contains("grants"),
        "{}",
        r[0].error_message
    );

    // A CSR with two URI SANs, and garbage.
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![
        rcgen::SanType::URI(workload_id.as_str().try_into().unwrap()),
        rcgen::SanType::URI(
            format!("spiffe://{}/other", w.td)
                .as_str()
                .try_into()
                .unwrap(),
        ),
    ];
    let two = p.serialize_request(key.key_pair()).unwrap().der().to_vec();
    let r = agent_a
        .sign(vec![pb::SvidRequest {
            entry_id: id_a.clone(),
            csr: two,
        }])
        .await
        .unwrap();
    assert_eq!(Code::from_i32(r[0].error_code), Code::InvalidArgument);
    assert!(
        r[0].error_message.contains("2 URI SANs"),
        "{}",
        r[0].error_message
    );
    let r = agent_a
        .sign(vec![pb::SvidRequest {
            entry_id: id_a.clone(),
            csr: b"not a CSR".to_vec(),
        }])
        .await
        .unwrap();
    assert_eq!(Code::from_i32(r[0].error_code), Code::InvalidArgument);
    // One entry twice in one call: the whole call is refused.
    let twice = vec![
        pb::SvidRequest {
            entry_id: id_a.clone(),
            csr: vec![]
        };
        2
    ];
    let status = agent_a.sign(twice).await.unwrap_err();
    assert_eq!(code(&status), Code::InvalidArgument);
    assert!(format!("{status}").contains("duplicate entry"), "{status}");

    // Too many CSRs in one call, and a message over the size bound.
    let many = vec![
        pb::SvidRequest {
            entry_id: id_a.clone(),
            csr: vec![]
        };
        1001
    ];
    assert_eq!(
        code(&agent_a.sign(many).await.unwrap_err()),
        Code::InvalidArgument
    );
    let huge = vec![pb::SvidRequest {
        entry_id: id_a.clone(),
        csr: vec![0u8; 5 * 1024 * 1024],
    }];
    let e = agent_a.sign(huge).await.unwrap_err();
    assert!(
        matches!(code(&e), Code::ResourceExhausted | Code::OutOfRange),
        "oversized request: {e}"
    );

    // Attestation denials.
    let agent_pod = w.pod("agent-x", &w.node_a, "sigil-agent", json!({})).await;
    let fresh = w.agent_client().await;
    let wrong_audience = w.token(&agent_pod, "someone-else").await;
    let e = fresh.attest_psat(&wrong_audience).await.unwrap_err();
    assert_eq!(code(&e), Code::Unauthenticated, "{e}");

    let intruder = w.pod("intruder", &w.node_a, "intruder", json!({})).await;
    let e = fresh
        .attest_psat(&w.token(&intruder, &w.audience).await)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::PermissionDenied, "{e}");
    assert!(e.to_string().contains("not allowed to attest"), "{e}");

    // An expired token, signed by the apiserver's own key (TokenRequest will not mint one).
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sa = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(w.client.clone(), &w.ns)
        .get("sigil-agent")
        .await
        .unwrap();
    let expired = cp
        .sign_service_account_token(&json!({
            "iss": cp.service_account_issuer(), "aud": [w.audience], "sub": format!("system:serviceaccount:{}:sigil-agent", w.ns),
            "iat": now - 1200, "nbf": now - 1200, "exp": now - 600,
            "kubernetes.io": {"namespace": w.ns, "pod": {"name": "agent-x", "uid": agent_pod.uid().unwrap()},
                               "serviceaccount": {"name": "sigil-agent", "uid": sa.uid().unwrap()}},
        }))
        .unwrap();
    let e = fresh.attest_psat(&expired).await.unwrap_err();
    assert_eq!(code(&e), Code::Unauthenticated, "{e}");
    assert!(e.to_string().contains("expired"), "{e}");

    // The wrong cluster name.
    let other = sigil_agent::node_client::NodeClient::new(
        sigil_agent::node_client::NodeClientConfig {
            addresses: vec![w.node_api_addr.clone()],
            trust_domain: w.td.clone(),
            cluster: "other".into(),
        },
        w.bootstrap_bundle().await,
    )
    .unwrap();
    let e = other
        .attest_psat(&w.token(&agent_pod, &w.audience).await)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::InvalidArgument, "{e}");

    // A token whose pod is gone (after the apiserver's 10 s token cache, TokenReview
    // itself refuses it).
    let doomed = w
        .pod("agent-doomed", &w.node_a, "sigil-agent", json!({}))
        .await;
    let token = w.token(&doomed, &w.audience).await;
    Api::<Pod>::namespaced(w.client.clone(), &w.ns)
        .delete(
            "agent-doomed",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let e = eventually(
        "the token of a deleted pod to be refused",
        SETTLE,
        || async { fresh.attest_psat(&token).await.err() },
    )
    .await;
    assert!(
        matches!(code(&e), Code::Unauthenticated | Code::PermissionDenied),
        "{e}"
    );

    // No client certificate: only AttestNode is open.
    let unattested = w.agent_client().await;
    assert!(matches!(
        unattested.sync_entries(0).await.unwrap_err(),
        sigil_agent::node_client::NodeClientError::NotAttested
    ));

    // Every denial was counted with its reason.
    let metrics = w.metrics_text();
    for reason in [
        "entry_not_authorized",
        "spiffe_id_not_authorized",
        "csr_multiple_uri_sans",
        "bad_csr",
        "too_many_csrs",
        "token_rejected",
        "sa_not_allowed",
        "wrong_cluster",
    ] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "no denial counted for {reason}:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn an_agent_whose_svid_expired_attests_again_with_a_fresh_token() {
    let w = World::start_with(
        "reatt",
        WorldOptions {
            agent_svid_ttl: Duration::from_secs(3),
            ..Default::default()
        },
    )
    .await;
    let agent_pod = w.pod("agent", &w.node_a, "sigil-agent", json!({})).await;
    let agent = w.agent_client().await;
    let first = agent
        .attest_psat(&w.token(&agent_pod, &w.audience).await)
        .await
        .unwrap();
    assert!(agent.sync_entries(0).await.is_ok());
    let left = first
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_secs(1)).await;

    // The SVID has expired: mTLS calls are refused...
    let e = agent
        .renew(&w.token(&agent_pod, &w.audience).await)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Code::Unauthenticated, "{e}");
    // ...but AttestNode needs no client certificate, so a fresh token brings it back.
    let second = agent
        .attest_psat(&w.token(&agent_pod, &w.audience).await)
        .await
        .unwrap();
    assert_eq!(first.spiffe_id, second.spiffe_id);
    assert!(second.not_after > first.not_after);
    assert!(agent.sync_entries(0).await.is_ok());
    assert!(w.metrics_text().contains("reason=\"agent_svid_expired\""));
}
