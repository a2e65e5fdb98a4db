//! An agent world: the operator side ([`World`]: real apiserver, CA, index, Node API) plus
//! a sigil-agent for node A running in this process, with its projected token and
//! bootstrap bundle in files as a DaemonSet pod would have them, and workloads as real
//! processes in pod-shaped cgroups.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::Value;
use sigil_agent::app::{Agent, Args};
use sigil_e2e::pod::PodContainer;
use sigil_telemetry::LogFormat;
use tokio_util::sync::CancellationToken;

use crate::node_api::{CLUSTER, SecondReplica, World, WorldOptions};
use crate::trust_domain::{SETTLE, eventually};

pub struct AgentWorld {
    pub w: World,
    pub agent: Agent,
    pub socket: PathBuf,
    /// `unix:///...`, what clients get as SPIFFE_ENDPOINT_SOCKET.
    pub addr: String,
    /// The agent's Broker API socket (for sigil-csi).
    pub broker_socket: PathBuf,
    pub dir: tempfile::TempDir,
    pub cancel: CancellationToken,
    /// What the agent was started with (a restart starts it again with the same).
    pub args: Args,
    /// The agent's DaemonSet pod (its projected token is bound to it).
    pub agent_pod: Pod,
}

impl Drop for AgentWorld {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A workload: its Pod object and the container cgroup its processes run in.
pub struct Workload {
    pub pod: Pod,
    pub container: PodContainer,
}

impl Workload {
    /// Runs `program args` inside the container and waits for it (without blocking the
    /// runtime the agent runs on).
    pub async fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = self.container.command(program);
        cmd.args(args);
        tokio::process::Command::from(cmd).output().await.unwrap()
    }
}

/// The path of a pinned test tool.
pub fn tool(name: &str) -> String {
    sigil_e2e::tools::tool(name).unwrap().display().to_string()
}

/// Parses a client's JSON output, failing with its stderr when it did not succeed.
pub fn json_out(what: &str, out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}): {stderr}\n{stdout}",
        out.status
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {stdout}"))
}

impl AgentWorld {
    pub async fn start(prefix: &str) -> AgentWorld {
        Self::start_with(prefix, WorldOptions::default()).await
    }

    pub async fn start_with(prefix: &str, options: WorldOptions) -> AgentWorld {
        Self::start_full(prefix, options, 0).await
    }

    /// As [`AgentWorld::start_with`], with the Broker API open only to `broker_uid`.
    pub async fn start_full(prefix: &str, options: WorldOptions, broker_uid: u32) -> AgentWorld {
        let w = World::start_with(prefix, options).await;
        let addresses = vec![w.node_api_addr.clone()];
        Self::start_in(w, broker_uid, addresses).await
    }

    /// Two operator replicas (the world's leads, the second stands by) and an agent
    /// configured with both Node API addresses, as the chart configures it.
    pub async fn start_with_two_replicas(prefix: &str) -> (AgentWorld, SecondReplica) {
        let w = World::start(prefix).await;
        let second = w.second_replica().await;
        let addresses = vec![w.node_api_addr.clone(), second.node_api_addr.clone()];
        (Self::start_in(w, 0, addresses).await, second)
    }

    /// An agent for `w`'s node A that talks to the Node APIs at `operator_address` (other
    /// operator replicas than `w`'s own, e.g. real sigil-operator processes).
    pub async fn start_with_operators(w: World, operator_address: Vec<String>) -> AgentWorld {
        Self::start_in(w, 0, operator_address).await
    }

    async fn start_in(w: World, broker_uid: u32, operator_address: Vec<String>) -> AgentWorld {
        let cp = sigil_e2e::shared().await;
        let dir = tempfile::tempdir().unwrap();
        // Workloads run as other users too: they must reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (token_file, bundle_file, agent_pod) = w.agent_pod_files_of(dir.path()).await;
        let socket = dir.path().join("agent").join("api.sock");
        let broker_socket = dir.path().join("broker").join("broker.sock");
        let cancel = CancellationToken::new();
        let args = Args {
            node_name: w.node_a.clone(),
            operator_address,
            trust_domain: w.td.clone(),
            cluster_name: CLUSTER.into(),
            token_file,
            tpm_tcti: None,
            tpm_ek_certificate_file: None,
            tpm_helper: None,
            bundle_file,
            socket_path: Some(socket.clone()),
            proc_root: "/proc".into(),
            etc_root: "/etc".into(),
            pod_timeout: Duration::from_secs(10),
            health_addr: "127.0.0.1:0".parse().unwrap(),
            log_format: LogFormat::Json,
            kubeconfig: Some(cp.kubeconfig_path().to_owned()),
            pod_source: sigil_agent::app::PodSourceArg::Api,
            kubelet: sigil_agent::app::KubeletArgs {
                kubelet_address: String::new(),
                kubelet_server_name: None,
                kubelet_ca_file: PathBuf::new(),
                kubelet_token_file: PathBuf::new(),
            },
            broker: sigil_agent::app::BrokerArgs {
                broker_socket_path: broker_socket.clone(),
                broker_uid,
                broker_exe: None,
                csi_token_audience: "sigil-csi".into(),
            },
            limits: Default::default(),
            sds: Default::default(),
        };
        let agent = Agent::start(args.clone(), cancel.clone()).await.unwrap();
        std::fs::set_permissions(
            socket.parent().unwrap(),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        eventually("the agent to be ready", SETTLE, || async {
            agent.readiness.is_ready().then_some(())
        })
        .await;
        let addr = format!("unix://{}", socket.display());
        AgentWorld {
            w,
            agent,
            socket,
            addr,
            broker_socket,
            dir,
            cancel,
            args,
            agent_pod,
        }
    }

    /// Writes a fresh projected token (10 minutes) into the agent's token file every
    /// `every`, as the kubelet refreshes it, until the guard is dropped: what a run longer
    /// than a token's lifetime needs (the agent reads the file at each attestation and
    /// renewal).
    pub fn refresh_agent_token(&self, every: Duration) -> tokio_util::sync::DropGuard {
        let (client, pod, audience, file) = (
            self.w.client.clone(),
            self.agent_pod.clone(),
            self.w.audience.clone(),
            self.args.token_file.clone(),
        );
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                if let Ok(token) = sigil_e2e::pod::bound_token(&client, &pod, &audience, 600).await
                {
                    // Atomically, as the kubelet's projected volumes are updated.
                    let tmp = file.with_extension("new");
                    if std::fs::write(&tmp, token).is_ok() {
                        let _ = std::fs::rename(&tmp, &file);
                    }
                }
            }
        });
        stop.drop_guard()
    }

    /// Restarts the agent as a DaemonSet rollout does: SIGTERM (drain, sockets removed at
    /// once), then a new process with the same flags, token and bundle. Returns once the
    /// new one is Ready.
    pub async fn restart_agent(&mut self) {
        self.cancel.cancel();
        tokio::time::timeout(sigil_agent::supervise::DRAIN_GRACE * 2, self.agent.wait())
            .await
            .expect("the agent stopped")
            .expect("a drain is not a failure");
        self.cancel = CancellationToken::new();
        self.agent = Agent::start(self.args.clone(), self.cancel.clone())
            .await
            .unwrap();
        std::fs::set_permissions(
            self.socket.parent().unwrap(),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let agent = &self.agent;
        eventually("the restarted agent to be ready", SETTLE, || async {
            agent.readiness.is_ready().then_some(())
        })
        .await;
    }

    /// A pod on node A with a running container whose processes the test starts.
    pub async fn workload(&self, name: &str, sa: &str, labels: Value) -> Workload {
        let pod = self.w.pod(name, &self.w.node_a, sa, labels).await;
        let container = PodContainer::create(&pod.uid().unwrap()).unwrap();
        let pod = container
            .mark_running(
                &self.w.client,
                &self.w.ns,
                name,
                "main",
                "registry.invalid/none",
            )
            .await
            .unwrap();
        Workload { pod, container }
    }

    /// The agent's `/metrics`.
    pub async fn metrics(&self) -> String {
        sigil_e2e::http::get_ok(self.agent.health_addr, "/metrics")
            .await
            .expect("the agent's /metrics answered 200")
    }

    /// The SPIFFE ID the default ClusterSPIFFEID template gives service account `sa`.
    pub fn id_for_sa(&self, sa: &str) -> String {
        format!("spiffe://{}/ns/{}/sa/{sa}", self.w.td, self.w.ns)
    }

    /// Waits until the agent holds an SVID for `spiffe_id` (signed ahead of any request).
    pub async fn wait_svid(&self, spiffe_id: &str) {
        eventually(
            &format!("an SVID for {spiffe_id} in the agent's cache"),
            SETTLE,
            || async {
                self.agent
                    .cache
                    .entries()
                    .iter()
                    .filter(|e| e.spiffe_id.to_string() == spiffe_id)
                    .any(|e| self.agent.cache.svid(&e.id).is_some())
                    .then_some(())
            },
        )
        .await;
    }
}
