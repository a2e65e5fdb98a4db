//! The real `sigil-agent` binary in its own process for benches (so its RSS and CPU are
//! its own), attested against a [`World`]'s operator side, plus /proc readings.
#![allow(dead_code, unreachable_pub)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::node_api_common::{CLUSTER, World};

pub struct AgentProcess {
    pub child: tokio::process::Child,
    pub pid: u32,
    /// `unix://` address of its Workload API.
    pub addr: String,
    pub socket: PathBuf,
    /// Its health server (`/live`, `/ready`, `/metrics`).
    pub health: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

/// Starts `agent_bin` for node A of `w` and waits for its Workload API socket.
pub async fn start(w: &World, agent_bin: &str) -> AgentProcess {
    let cp = sigil_e2e::shared().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let agent_pod = w
        .pod(
            &sigil_e2e::unique("sigil-agent"),
            &w.node_a,
            "sigil-agent",
            json!({}),
        )
        .await;
    std::fs::write(
        dir.path().join("token"),
        w.token(&agent_pod, &w.audience).await,
    )
    .expect("token");
    std::fs::write(
        dir.path().join("bundle.spiffe"),
        w.bootstrap_bundle().await.to_jwks_json(),
    )
    .expect("bundle");
    let socket = dir.path().join("api.sock");
    let health = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr");
    let path = |name: &str| dir.path().join(name).display().to_string();
    // Under `setpriv --pdeathsig KILL` (it execs the agent, so the pid is the agent's):
    // killed with this process even when it ends without running destructors, as when
    // the e2e watchdog stops a hung bench.
    let child = tokio::process::Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--", agent_bin])
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("RUST_LOG", "warn")
        .args([
            "--node-name",
            &w.node_a,
            "--operator-address",
            &w.node_api_addr,
        ])
        .args([
            "--trust-domain",
            &w.td.to_string(),
            "--cluster-name",
            CLUSTER,
        ])
        .args([
            "--token-file",
            &path("token"),
            "--bundle-file",
            &path("bundle.spiffe"),
        ])
        .args(["--socket-path", &socket.display().to_string()])
        // Its own Broker API socket too: the default is the chart's in-pod path, which
        // on this host would replace (and, killed, leave behind) a real node's.
        .args(["--broker-socket-path", &path("broker.sock")])
        .args(["--health-addr", &health.to_string()])
        // The benches hold 10k streams from one workload, each on its own connection:
        // far past the per-workload cap a real node wants.
        .args(["--max-connections", "1000000"])
        .args(["--max-connections-per-workload", "1000000"])
        .args(["--max-streams", "1000000"])
        .args(["--max-streams-per-workload", "1000000"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start sigil-agent");
    let pid = child.id().expect("pid");
    let started = Instant::now();
    while !socket.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the agent did not open its socket"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Other users' processes (the SPIRE side of a comparison runs as many uids) must
    // reach the socket too.
    let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777));
    AgentProcess {
        child,
        pid,
        addr: format!("unix://{}", socket.display()),
        socket,
        health,
        _dir: dir,
    }
}
