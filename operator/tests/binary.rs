//! The `sigil-operator` binary itself against the real apiserver: it becomes leader,
//! turns a TrustDomain Ready, answers `/live`, `/ready` (only after its caches synced) and
//! `/metrics`, logs JSON without key material, and on SIGTERM drains, releases its Lease
//! and exits 0.
#![allow(clippy::unwrap_used)]

use sigil_testkit::trust_domain as trust_domain_common;

use std::process::{Child, Command, Stdio};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use trust_domain_common::*;

/// `(status, body)` of a plain HTTP/1.1 GET.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    sigil_e2e::http::get(("127.0.0.1", port), path).await
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Operator {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Operator {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal_term(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

#[tokio::test]
async fn the_binary_serves_health_and_metrics_and_drains_on_sigterm() {
    let cp = sigil_e2e::shared().await;
    let client = client().await;
    let ns = namespace("opbin").await;
    let instance = unique("bin");
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("operator.log");
    let child = Command::new(env!("CARGO_BIN_EXE_sigil-operator"))
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("RUST_LOG", "info")
        .args([
            "--namespace",
            &ns,
            "--pod-name",
            "operator-0",
            "--lease-duration",
            "6s",
        ])
        .args(["--health-addr", &format!("127.0.0.1:{port}")])
        .args([
            "--trust-domain-selector",
            &format!("{INSTANCE_LABEL}={instance}"),
        ])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let op = Operator { child, log };

    eventually("/live to answer", SETTLE, || async {
        get(port, "/live").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let (_, body) = eventually("/ready to answer 200", SETTLE, || async {
        get(port, "/ready").await.filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(body.trim(), "ok");

    let name = unique("td");
    create_trust_domain(
        &client,
        &trust_domain(
            &name,
            &instance,
            serde_json::json!({"trustDomain": "binary.example.org"}),
        ),
    )
    .await;
    wait_condition(&client, &name, "Ready", "True", "BundlePublished").await;
    assert!(ca_secret(&client, &ns, &name).await.is_some());

    let metrics = eventually("CA expiry and leadership in /metrics", SETTLE, || async {
        let (status, body) = get(port, "/metrics").await?;
        (status == 200
            && body.contains(r#"sigil_ca_expiry_timestamp_seconds{trust_domain="binary.example.org",role="active"}"#)
            && body.contains(&format!(r#"sigil_leader{{lease="{ns}/sigil-operator"}} 1"#)))
        .then_some(body)
    })
    .await;
    assert!(
        metrics.contains(r#"sigil_bundle_sequence{trust_domain="binary.example.org"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("sigil_index_"),
        "the identity index registers its metrics: {metrics}"
    );

    let lease = Api::<Lease>::namespaced(client.clone(), &ns);
    let holder = lease
        .get("sigil-operator")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(holder.as_deref(), Some("operator-0"));

    // SIGTERM: drain, release the Lease, exit 0.
    op.signal_term();
    let mut op = op;
    let deadline = std::time::Instant::now() + SETTLE;
    let status = loop {
        if let Some(s) = op.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running {SETTLE:?} after SIGTERM; its log:\n{}",
            op.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}\n{}",
        op.logs()
    );
    let holder = lease
        .get("sigil-operator")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert!(
        holder.as_deref().is_none_or(str::is_empty),
        "the Lease was not released: {holder:?}"
    );

    // Logs: one JSON object per line, and no key material anywhere.
    let logs = op.logs();
    assert!(!logs.is_empty());
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("message").is_some(),
            "{line}"
        );
    }
    assert!(logs.contains("became leader"), "{logs}");
    assert!(logs.contains("released the lease"), "{logs}");
    assert!(!logs.contains("PRIVATE KEY"), "key material in the logs");
}
