//! `sigil agent ban|unban` against a real apiserver: the label and annotation the operator
//! honours (operator/src/node_api/revocation.rs), what it prints, and the exit codes.
//! (What the operator then does to the banned agent is played in
//! e2e/tests/attacks_revocation.rs.)
#![allow(clippy::unwrap_used)]

use std::process::Command;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use sigil_operator::node_api::revocation::{BAN_ANNOTATION, BAN_LABEL};

fn sigil(args: &[&str], kubeconfig: &std::path::Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn ban_and_unban_write_what_the_operator_reads() {
    let cp = sigil_e2e::shared().await;
    let admin = cp.admin().await.unwrap();
    let kubeconfig = cp.kubeconfig_path();
    let name = sigil_e2e::unique("ban-node");
    let nodes = Api::<Node>::all(admin);
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap(),
        )
        .await
        .unwrap();

    let (code, out) = sigil(
        &["agent", "ban", &name, "--reason", "key leaked in INC-1"],
        kubeconfig,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("sigil agent unban {name}")), "{out}");
    let node = nodes.get(&name).await.unwrap();
    assert_eq!(node.metadata.labels.unwrap()[BAN_LABEL], "true");
    let reason = &node.metadata.annotations.unwrap()[BAN_ANNOTATION];
    assert!(
        reason.starts_with("key leaked in INC-1 (banned"),
        "{reason}"
    );

    // Again: says it was banned already.
    let (code, out) = sigil(&["agent", "ban", &name, "-o", "json"], kubeconfig);
    assert_eq!(code, 0, "{out}");
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json["banned"], true);
    assert!(
        json["previous"]
            .as_str()
            .unwrap()
            .starts_with("key leaked in INC-1")
    );

    let (code, out) = sigil(&["agent", "unban", &name], kubeconfig);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ban lifted"), "{out}");
    let node = nodes.get(&name).await.unwrap();
    assert!(
        !node
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key(BAN_LABEL)
    );
    assert!(
        !node
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(BAN_ANNOTATION)
    );

    // A Node that does not exist: exit 1, naming it.
    let (code, out) = sigil(&["agent", "ban", "no-such-node-here"], kubeconfig);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("Node no-such-node-here does not exist"),
        "{out}"
    );
}
