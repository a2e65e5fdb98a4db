//! Real sigil-operator processes (the test build's binary) serving a [`World`]'s
//! TrustDomain, as the Deployment's replicas do: the fault tests kill them, the HSM test
//! gives them a PKCS#11 token.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use kube::api::Api;

use crate::node_api::{CLUSTER, World};
use crate::trust_domain::{INSTANCE_LABEL, SETTLE};

/// One sigil-operator process.
pub struct OperatorProcess {
    /// Its `--pod-name` (its Lease identity).
    pub name: String,
    /// The process, killed (SIGKILL) when dropped.
    pub process: sigil_e2e::process::Supervised,
    /// Where its Node API listens.
    pub node_api_addr: String,
    /// Where its `/live`, `/ready` and `/metrics` answer.
    pub health: SocketAddr,
}

/// The test build's sigil-operator: cargo puts it beside `exe`, another binary of the
/// same build (a test passes its `env!("CARGO_BIN_EXE_…")`).
pub fn operator_beside(exe: &str) -> std::path::PathBuf {
    Path::new(exe).parent().unwrap().join("sigil-operator")
}

/// A free loopback port.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts `bin` as replica `name` for `w`'s TrustDomain (selected by its instance label),
/// holding Lease `lease`, with `extra` flags, its log in `dir`; waits until it is Ready.
pub async fn operator_process(
    w: &World,
    bin: &Path,
    name: &str,
    lease: &str,
    dir: &Path,
    extra: &[String],
) -> OperatorProcess {
    assert!(
        bin.exists(),
        "{} is not built: `cargo test --workspace` (make test) builds it, or `cargo build -p sigil-operator`",
        bin.display()
    );
    let cp = sigil_e2e::shared().await;
    let (node_api, health) = (free_addr(), free_addr());
    let selector = format!("{INSTANCE_LABEL}={}", w.tag);
    let mut args: Vec<String> = vec![
        format!("--namespace={}", w.ns),
        format!("--pod-name={name}"),
        format!("--lease-name={lease}"),
        "--lease-duration=3s".into(),
        format!("--trust-domain-selector={selector}"),
        format!("--federated-bundle-selector={selector}"),
        format!("--cluster-name={CLUSTER}"),
        format!("--kubeconfig={}", cp.kubeconfig_path().display()),
        "--retry-interval=1s".into(),
        format!("--health-addr={health}"),
        format!("--node-api-addr={node_api}"),
        format!("--agent-trust-domain={}", w.td),
        format!("--psat-audience={}", w.audience),
        format!("--agent-service-accounts={}:sigil-agent", w.ns),
        "--agent-node-label-keys=zone".into(),
        "--log-format=json".into(),
    ];
    args.extend(extra.iter().cloned());
    let mut process =
        sigil_e2e::process::Supervised::start(name, bin, &args, &dir.join(format!("{name}.log")))
            .unwrap();
    let started = Instant::now();
    while sigil_e2e::http::get_ok(health, "/ready").await.is_none() {
        if let Some(status) = process.exited() {
            panic!("{name} exited ({status}): {}", process.log_tail(30));
        }
        assert!(
            started.elapsed() < SETTLE,
            "{name} not ready: {}",
            process.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    OperatorProcess {
        name: name.to_owned(),
        process,
        node_api_addr: node_api.to_string(),
        health,
    }
}

/// The holder of Lease `lease` in `ns`.
pub async fn lease_holder(client: &kube::Client, ns: &str, lease: &str) -> Option<String> {
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), ns)
        .get_opt(lease)
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
}
