//! The harness against the real apiserver: pod-bound tokens (TokenRequest) validate
//! through TokenReview with the pod's name and UID, die with the pod, RBAC holds for users
//! and ServiceAccounts, the CRDs from `crds/` are served, and a control plane goes away
//! with the test that owned it, even when that test panics.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use serde_json::json;
use sigil_e2e::{ControlPlane, eventually, process::is_alive, shared};

const AUDIENCE: &str = "sigil-e2e-test";

fn object<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

async fn review(
    client: &Client,
    token: &str,
) -> k8s_openapi::api::authentication::v1::TokenReviewStatus {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.into(),
            audiences: Some(vec![AUDIENCE.into()]),
        },
        ..Default::default()
    };
    Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap()
}

#[tokio::test]
async fn pod_bound_token_is_reviewed_with_the_pod_and_dies_with_it() {
    let cp = shared().await;
    let admin = cp.admin().await.unwrap();
    let ns = cp.namespace("token").await.unwrap();
    let sa_api = Api::<ServiceAccount>::namespaced(admin.clone(), &ns);
    sa_api
        .create(
            &PostParams::default(),
            &object(json!({"metadata": {"name": "workload"}})),
        )
        .await
        .unwrap();
    let pod: Pod = object(json!({
        "metadata": {"name": "app"},
        "spec": {"nodeName": "node-a", "serviceAccountName": "workload",
                 "containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }));
    let pods = Api::<Pod>::namespaced(admin.clone(), &ns);
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let uid = pod.metadata.uid.clone().unwrap();

    let token = sigil_e2e::pod::bound_token(&admin, &pod, AUDIENCE, 600)
        .await
        .unwrap();
    let status = review(&admin, &token).await;
    assert_eq!(
        status.authenticated,
        Some(true),
        "review of a fresh pod-bound token: {status:?}"
    );
    assert_eq!(status.audiences, Some(vec![AUDIENCE.to_owned()]));
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{ns}:workload").as_str())
    );
    let extra = user.extra.unwrap();
    assert_eq!(
        extra["authentication.kubernetes.io/pod-name"],
        vec!["app".to_owned()]
    );
    assert_eq!(
        extra["authentication.kubernetes.io/pod-uid"],
        vec![uid.clone()]
    );

    // A token for another audience is refused for ours.
    let other = review(
        &admin,
        &sigil_e2e::pod::bound_token(&admin, &pod, "someone-else", 600)
            .await
            .unwrap(),
    )
    .await;
    assert_ne!(
        other.authenticated,
        Some(true),
        "a token for another audience must not pass: {other:?}"
    );

    // The pod goes; the token must stop working (TokenReview re-checks the bound object).
    // The apiserver caches successful token authentications for 10 s, so allow for it.
    pods.delete(
        "app",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let after = eventually(
        "the token to be refused once its pod is gone",
        Duration::from_secs(30),
        || async {
            let status = review(&admin, &token).await;
            (status.authenticated != Some(true)).then_some(status)
        },
    )
    .await;
    let error = after.error.unwrap_or_default();
    assert!(
        error.contains("invalidated"),
        "unexpected TokenReview error: {error}"
    );
}

fn is_forbidden<T: std::fmt::Debug>(r: &Result<T, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(s)) if s.code == 403)
}

async fn grant_secret_reading(admin: &Client, ns: &str, subject: Subject) {
    let role: Role = object(json!({
        "metadata": {"name": "read-secrets"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]
    }));
    let _ = Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await;
    let binding = RoleBinding {
        metadata: ObjectMeta {
            generate_name: Some("read-secrets-".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: "read-secrets".into(),
        },
        subjects: Some(vec![subject]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

/// RBAC may take a moment to see a new binding; wait until the list succeeds.
async fn eventually_allowed(client: &Client, ns: &str) {
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    eventually(
        "RBAC grant to take effect",
        Duration::from_secs(20),
        || async { secrets.list(&ListParams::default()).await.ok() },
    )
    .await;
}

#[tokio::test]
async fn rbac_applies_to_users_and_service_accounts() {
    let cp = shared().await;
    let admin = cp.admin().await.unwrap();
    let ns = cp.namespace("rbac").await.unwrap();

    let alice = cp.user_client("alice", Some("developers")).await.unwrap();
    assert!(is_forbidden(
        &Api::<Secret>::namespaced(alice.clone(), &ns)
            .list(&ListParams::default())
            .await
    ));
    grant_secret_reading(
        &admin,
        &ns,
        Subject {
            kind: "Group".into(),
            name: "developers".into(),
            ..Default::default()
        },
    )
    .await;
    eventually_allowed(&alice, &ns).await;
    // The grant is namespaced: another namespace stays closed.
    let elsewhere = cp.namespace("rbac-other").await.unwrap();
    assert!(is_forbidden(
        &Api::<Secret>::namespaced(alice, &elsewhere)
            .list(&ListParams::default())
            .await
    ));

    let robot = cp.service_account_client(&ns, "robot").await.unwrap();
    assert!(is_forbidden(
        &Api::<Secret>::namespaced(robot.clone(), &elsewhere)
            .list(&ListParams::default())
            .await
    ));
    let sa_subject = Subject {
        kind: "ServiceAccount".into(),
        name: "robot".into(),
        namespace: Some(ns.clone()),
        ..Default::default()
    };
    grant_secret_reading(&admin, &elsewhere, sa_subject).await;
    eventually_allowed(&robot, &elsewhere).await;
    // Writing was never granted.
    let secret: Secret = object(json!({"metadata": {"name": "s"}}));
    assert!(is_forbidden(
        &Api::<Secret>::namespaced(robot, &elsewhere)
            .create(&PostParams::default(), &secret)
            .await
    ));
}

#[tokio::test]
async fn every_crd_in_crds_is_established() {
    let cp = shared().await;
    let crds = Api::<CustomResourceDefinition>::all(cp.admin().await.unwrap());
    let files: Vec<_> = std::fs::read_dir(sigil_e2e::crds_dir())
        .unwrap()
        .flatten()
        .collect();
    assert!(!files.is_empty(), "crds/ is empty");
    for f in files {
        let name = f
            .file_name()
            .to_str()
            .unwrap()
            .trim_end_matches(".yaml")
            .to_owned();
        let crd = crds.get(&name).await.unwrap();
        let conditions = crd.status.unwrap().conditions.unwrap();
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True"),
            "{name}: {conditions:?}"
        );
    }
}

/// A control plane owned by a test that panics is gone once the panic has unwound.
#[test]
fn a_panicking_test_takes_its_control_plane_down() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let cp = ControlPlane::start().await.unwrap();
            let admin = cp.admin().await.unwrap();
            Api::<ServiceAccount>::namespaced(admin, "default")
                .list(&ListParams::default())
                .await
                .unwrap();
            tx.send((cp.pids(), cp.dir().to_owned())).unwrap();
            panic!("deliberate panic with a live control plane");
        })
    })
    .join();
    assert!(outcome.is_err(), "the thread should have panicked");
    let (pids, dir) = rx.recv().unwrap();
    for pid in pids {
        assert!(!is_alive(pid), "process {pid} outlived the panicking test");
    }
    assert!(
        !dir.exists(),
        "{} outlived the panicking test",
        dir.display()
    );
}
