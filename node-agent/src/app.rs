//! The sigil-agent process: flags, and the subsystems it runs as one set.
//!
//! - [`sync::keep_agent_svid`]: node attestation and agent SVID renewal;
//! - [`sync::sync_entries`]: the entry stream into the cache;
//! - [`rotator::run`]: X509-SVIDs for every entry, pre-signed and rotated;
//! - the pod watch for this node (workload attestation);
//! - [`workload_api::serve`]: the Workload API socket;
//! - the health server (`/live`, `/ready` once attested and the Workload API socket is up,
//!   `/metrics`).
//!
//! They run as one set of named parts ([`crate::supervise`]): a part that fails or stops
//! stops the agent, which exits non-zero naming it. The first SIGTERM removes the sockets
//! at once (only while they are still this process's), then drains (streams end, `/ready`
//! 503) for at most [`supervise::DRAIN_GRACE`] and exits 0; a second exits at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use prometheus_client::registry::Registry;
use sigil_identity::{TrustBundle, TrustDomain};
use sigil_telemetry::process::{go_duration, kube_client};
use sigil_telemetry::{LogFormat, Readiness};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::attest::WorkloadAttestor;
use crate::attest::k8s::{ApiPodSource, PodSource};
use crate::attest::kubelet::{KubeletConfig, KubeletPodSource};
use crate::broker_api::{self, BrokerApi, BrokerPolicy};
use crate::cache::Cache;
use crate::limits::{self, Caps, MintBudget};
use crate::node_client::{NodeClient, NodeClientConfig};
use crate::rotator::{self, RotatorMetrics};
use crate::serving::Served;
use crate::supervise::{self, Parts};
use crate::sync::{self, TokenFile};
use crate::transport::{self, Api, ApiMetrics};
use crate::workload_api::{self, WorkloadApi};

/// sigil-agent: attests this node to sigil-operator, keeps the identities of the pods on
/// it, and serves the SPIFFE Workload API.
#[derive(Debug, Clone, Parser)]
#[command(name = "sigil-agent", version)]
pub struct Args {
    /// The Kubernetes Node this agent runs on (the downward API's `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Node API endpoints (`host:port`, comma-separated); the agent moves to the next one
    /// after a failure.
    #[arg(
        long,
        env = "SIGIL_OPERATOR_ADDRESS",
        value_delimiter = ',',
        default_value = "sigil-operator.sigil-system.svc:8443"
    )]
    pub operator_address: Vec<String>,

    /// The agent trust domain (the operator's `--agent-trust-domain`).
    #[arg(long, env = "SIGIL_TRUST_DOMAIN")]
    pub trust_domain: TrustDomain,

    /// The cluster name (the operator's `--cluster-name`).
    #[arg(long, env = "SIGIL_CLUSTER_NAME", default_value = "cluster")]
    pub cluster_name: String,

    /// Projected service-account token with the operator's PSAT audience; read at every
    /// attestation, so the kubelet's rotations are picked up.
    #[arg(
        long,
        env = "SIGIL_TOKEN_FILE",
        default_value = "/var/run/secrets/tokens/sigil-agent"
    )]
    pub token_file: PathBuf,

    /// Attest with this node's TPM (TCTI, e.g. `device:/dev/tpmrm0`) instead of the
    /// projected token alone; the token is still sent, so the operator checks the agent
    /// pod runs on the Node the TPM is enrolled for (docs/tpm.md).
    #[arg(long, env = "SIGIL_TPM_TCTI")]
    pub tpm_tcti: Option<String>,

    /// Read the EK certificate from this file (DER or PEM) instead of the TPM's NV index
    /// 0x01c00002.
    #[arg(long, env = "SIGIL_TPM_EK_CERTIFICATE_FILE", requires = "tpm_tcti")]
    pub tpm_ek_certificate_file: Option<PathBuf>,

    /// The TPM helper the agent runs to use the TPM (it links libtss2; the agent does
    /// not). Default: `sigil-agent-tpm` beside the agent's own executable.
    #[arg(long, env = "SIGIL_TPM_HELPER", requires = "tpm_tcti")]
    pub tpm_helper: Option<PathBuf>,

    /// The trust bundle to verify the operator with at first (the TrustDomain's bundle
    /// ConfigMap, `bundle.spiffe` or `bundle.pem`).
    #[arg(
        long,
        env = "SIGIL_BUNDLE_FILE",
        default_value = "/run/sigil/bundle/bundle.spiffe"
    )]
    pub bundle_file: PathBuf,

    /// The Workload API socket (workloads get `SPIFFE_ENDPOINT_SOCKET=unix://<this>`).
    /// Default: `SPIFFE_ENDPOINT_SOCKET` when it is a `unix://` address, else
    /// `/run/sigil/agent/api.sock`.
    #[arg(long, env = "SIGIL_SOCKET_PATH")]
    pub socket_path: Option<PathBuf>,

    /// Where the host's /proc is (the agent needs hostPID to see workload processes).
    #[arg(long, env = "SIGIL_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,

    /// Where the host's /etc is, for user and group names.
    #[arg(long, env = "SIGIL_ETC_ROOT", default_value = "/etc")]
    pub etc_root: PathBuf,

    /// How long attestation waits for a new pod's container to appear in the pod watch.
    #[arg(long, env = "SIGIL_POD_TIMEOUT", default_value = "30s", value_parser = go_duration)]
    pub pod_timeout: Duration,

    /// Address of the health server (`/live`, `/ready`, `/metrics`).
    #[arg(long, env = "SIGIL_HEALTH_ADDR", default_value = "0.0.0.0:9091")]
    pub health_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "SIGIL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// A kubeconfig for the pod watch (default: in-cluster configuration).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Where workload attestation reads pods from.
    #[arg(long, env = "SIGIL_POD_SOURCE", value_enum, default_value_t = PodSourceArg::Api)]
    pub pod_source: PodSourceArg,

    /// Kubelet flags (with `--pod-source kubelet`).
    #[command(flatten)]
    pub kubelet: KubeletArgs,

    /// Broker API flags (for sigil-csi).
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// What one workload may cost the agent.
    #[command(flatten)]
    pub limits: LimitsArgs,

    /// Envoy SDS resource names.
    #[command(flatten)]
    pub sds: SdsArgs,
}

/// The names of the SDS resources that are not SPIFFE IDs ([`crate::sds`]).
#[derive(Debug, Clone, clap::Args)]
pub struct SdsArgs {
    /// SDS name of the caller's default X509-SVID (Istio asks for `default`).
    #[arg(long, env = "SIGIL_SDS_DEFAULT_SVID_NAME", default_value = "default")]
    pub sds_default_svid_name: String,
    /// SDS name of the default SVID's trust domain bundle (Istio asks for `ROOTCA`).
    #[arg(long, env = "SIGIL_SDS_DEFAULT_BUNDLE_NAME", default_value = "ROOTCA")]
    pub sds_default_bundle_name: String,
    /// SDS name of every bundle of the caller as one SPIFFE certificate validator
    /// configuration (SPIRE's `default_all_bundles_name`).
    #[arg(long, env = "SIGIL_SDS_ALL_BUNDLES_NAME", default_value = "ALL")]
    pub sds_all_bundles_name: String,
    /// A second name for the Workload API socket, in its directory: a relative symlink to
    /// it. With `socket` (the default), a CSI socket-mode volume mounted at
    /// `/run/secrets/workload-spiffe-uds` holds the `socket` that Istio's agent and its
    /// Envoy look for. Empty: no link.
    #[arg(long, env = "SIGIL_SOCKET_ALIAS", default_value = "socket")]
    pub socket_alias: String,
}

impl Default for SdsArgs {
    fn default() -> Self {
        let n = crate::sds::SdsConfig::default();
        Self {
            sds_default_svid_name: n.default_svid,
            sds_default_bundle_name: n.default_bundle,
            sds_all_bundles_name: n.all_bundles,
            socket_alias: "socket".into(),
        }
    }
}

/// What one workload may cost the agent ([`crate::limits`]).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitsArgs {
    /// Most Workload API connections open at once.
    #[arg(long, env = "SIGIL_MAX_CONNECTIONS", default_value_t = limits::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Most Workload API connections open at once from one workload (a pod, or a UID
    /// outside pods).
    #[arg(long, env = "SIGIL_MAX_CONNECTIONS_PER_WORKLOAD", default_value_t = limits::DEFAULT_MAX_CONNECTIONS_PER_WORKLOAD)]
    pub max_connections_per_workload: usize,
    /// Most Workload API streams (FetchX509SVID, FetchX509Bundles, FetchJWTBundles, SDS StreamSecrets) open at
    /// once.
    #[arg(long, env = "SIGIL_MAX_STREAMS", default_value_t = limits::DEFAULT_MAX_STREAMS)]
    pub max_streams: usize,
    /// Most Workload API streams open at once for one workload.
    #[arg(long, env = "SIGIL_MAX_STREAMS_PER_WORKLOAD", default_value_t = limits::DEFAULT_MAX_STREAMS_PER_WORKLOAD)]
    pub max_streams_per_workload: usize,
    /// Sustained JWT-SVIDs minted per second for one workload (cached ones are free).
    #[arg(long, env = "SIGIL_JWT_MINT_RATE_PER_WORKLOAD", default_value_t = limits::DEFAULT_MINT_RATE)]
    pub jwt_mint_rate_per_workload: f64,
    /// Burst of JWT-SVIDs minted for one workload.
    #[arg(long, env = "SIGIL_JWT_MINT_BURST_PER_WORKLOAD", default_value_t = limits::DEFAULT_MINT_BURST)]
    pub jwt_mint_burst_per_workload: f64,
}

impl Default for LimitsArgs {
    fn default() -> Self {
        Self {
            max_connections: limits::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_workload: limits::DEFAULT_MAX_CONNECTIONS_PER_WORKLOAD,
            max_streams: limits::DEFAULT_MAX_STREAMS,
            max_streams_per_workload: limits::DEFAULT_MAX_STREAMS_PER_WORKLOAD,
            jwt_mint_rate_per_workload: limits::DEFAULT_MINT_RATE,
            jwt_mint_burst_per_workload: limits::DEFAULT_MINT_BURST,
        }
    }
}

/// The Broker API sigil-csi uses.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// The Broker API socket (in a directory only root can enter). Empty: not served.
    #[arg(
        long,
        env = "SIGIL_BROKER_SOCKET_PATH",
        default_value = "/run/sigil/broker/broker.sock"
    )]
    pub broker_socket_path: PathBuf,
    /// The UID the broker (sigil-csi) runs as.
    #[arg(long, env = "SIGIL_BROKER_UID", default_value_t = 0)]
    pub broker_uid: u32,
    /// The broker's executable; when set, callers must run exactly this file.
    #[arg(long, env = "SIGIL_BROKER_EXE")]
    pub broker_exe: Option<PathBuf>,
    /// Audience of the pod tokens the kubelet gives sigil-csi (the CSIDriver's
    /// `tokenRequests`).
    #[arg(long, env = "SIGIL_CSI_TOKEN_AUDIENCE", default_value = "sigil-csi")]
    pub csi_token_audience: String,
}

/// `--pod-source` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PodSourceArg {
    /// A watch on the API server, filtered to this node (needs `list`/`watch` on pods).
    Api,
    /// The kubelet's `/pods` (needs `get` on `nodes/proxy`).
    Kubelet,
}

/// Where the kubelet is, with `--pod-source kubelet`.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeletArgs {
    /// `host:port` of the kubelet's secure port.
    #[arg(long, env = "SIGIL_KUBELET_ADDRESS", default_value = "127.0.0.1:10250")]
    pub kubelet_address: String,
    /// The name in the kubelet's serving certificate (default: the node name).
    #[arg(long, env = "SIGIL_KUBELET_SERVER_NAME")]
    pub kubelet_server_name: Option<String>,
    /// CA bundle that signed the kubelet's serving certificate.
    #[arg(
        long,
        env = "SIGIL_KUBELET_CA_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub kubelet_ca_file: PathBuf,
    /// Bearer token for the kubelet.
    #[arg(
        long,
        env = "SIGIL_KUBELET_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub kubelet_token_file: PathBuf,
}

/// Parses the flags and runs the agent until a signal ([`sigil_telemetry::process::run`]).
pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    sigil_telemetry::process::run(args.log_format, |readiness, cancel| async move {
        let mut agent = Agent::start_with(args, readiness, cancel.clone()).await?;
        agent.wait().await?;
        info!("sigil-agent stopped");
        Ok(())
    })
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// Readiness (`/ready`).
    pub readiness: Readiness,
    /// The cache the Workload API serves from.
    pub cache: Arc<Cache>,
    /// The Node API client.
    pub node: Arc<NodeClient>,
    /// The health server's address.
    pub health_addr: SocketAddr,
    parts: Parts,
    cancel: CancellationToken,
}

impl Agent {
    /// Starts every subsystem with a readiness of its own; they run until `cancel`.
    pub async fn start(args: Args, cancel: CancellationToken) -> anyhow::Result<Agent> {
        Self::start_with(args, Readiness::new(), cancel).await
    }

    /// Starts every subsystem, reporting into `readiness`; they run until `cancel`.
    pub async fn start_with(
        args: Args,
        readiness: Readiness,
        cancel: CancellationToken,
    ) -> anyhow::Result<Agent> {
        let Args {
            node_name,
            operator_address,
            trust_domain,
            cluster_name,
            token_file,
            tpm_tcti,
            tpm_ek_certificate_file,
            tpm_helper,
            bundle_file,
            socket_path,
            proc_root,
            etc_root,
            pod_timeout,
            health_addr,
            log_format: _,
            kubeconfig,
            pod_source,
            kubelet,
            broker,
            limits,
            sds,
        } = args;
        let SdsArgs {
            sds_default_svid_name,
            sds_default_bundle_name,
            sds_all_bundles_name,
            socket_alias,
        } = sds;
        for (flag, v) in [
            ("--sds-default-svid-name", &sds_default_svid_name),
            ("--sds-default-bundle-name", &sds_default_bundle_name),
            ("--sds-all-bundles-name", &sds_all_bundles_name),
        ] {
            anyhow::ensure!(
                !v.is_empty() && !v.starts_with("spiffe://"),
                "{flag} {v:?}: give a name that is not empty and not a SPIFFE ID"
            );
        }
        let socket_path = resolve_socket_path(socket_path)?;
        info!(node = %node_name, operators = ?operator_address, version = env!("CARGO_PKG_VERSION"), "sigil-agent starting");
        let td = trust_domain;
        let bootstrap_doc = std::fs::read(&bundle_file)
            .with_context(|| format!("read the bootstrap trust bundle {} (--bundle-file; mount the TrustDomain's bundle ConfigMap)", bundle_file.display()))?;
        let bootstrap = TrustBundle::from_jwks_or_pem(td.clone(), &bootstrap_doc).map_err(|e| {
            anyhow::anyhow!("bootstrap trust bundle {}: {e}", bundle_file.display())
        })?;
        let node = Arc::new(
            NodeClient::new(
                NodeClientConfig {
                    addresses: operator_address,
                    trust_domain: td.clone(),
                    cluster: cluster_name,
                },
                bootstrap,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let client = kube_client(kubeconfig.as_deref()).await?;

        let mut registry = Registry::default();
        let api_metrics = ApiMetrics::new(Api::Workload);
        api_metrics.register(&mut registry);
        let rotator_metrics = RotatorMetrics::default();
        rotator_metrics.register(&mut registry);

        let cache = Cache::new();
        cache.set_own_trust_domain(td.clone());
        let pods: Arc<dyn PodSource> = match pod_source {
            PodSourceArg::Api => Arc::new(ApiPodSource::start(
                client.clone(),
                &node_name,
                cancel.clone(),
            )),
            PodSourceArg::Kubelet => Arc::new(KubeletPodSource::start(
                KubeletConfig {
                    address: kubelet.kubelet_address,
                    server_name: kubelet
                        .kubelet_server_name
                        .unwrap_or_else(|| node_name.clone()),
                    ca_file: kubelet.kubelet_ca_file,
                    token_file: kubelet.kubelet_token_file,
                    resync: Duration::from_secs(10),
                },
                cancel.clone(),
            )),
        };
        let attestor = Arc::new(WorkloadAttestor::new(
            proc_root.clone(),
            etc_root,
            Some(pods.clone()),
            pod_timeout,
        ));
        let listener = transport::bind_public(&socket_path).with_context(|| {
            format!(
                "bind the Workload API socket {} (--socket-path)",
                socket_path.display()
            )
        })?;
        if !socket_alias.is_empty() {
            transport::link_alias(&socket_path, &socket_alias).with_context(|| {
                format!(
                    "link {socket_alias:?} to the Workload API socket {} (--socket-alias)",
                    socket_path.display()
                )
            })?;
        }
        let mint_budget = Arc::new(MintBudget::new(
            limits.jwt_mint_rate_per_workload,
            limits.jwt_mint_burst_per_workload,
        ));
        let caps = Caps::connections(
            limits.max_connections,
            limits.max_connections_per_workload,
            api_metrics.clone(),
        );
        let stream_caps = Caps::streams(
            limits.max_streams,
            limits.max_streams_per_workload,
            api_metrics.clone(),
        );
        let api = WorkloadApi::new(
            cache.clone(),
            attestor.clone(),
            node.clone(),
            api_metrics,
            mint_budget.clone(),
            stream_caps,
            cancel.clone(),
        )
        .with_sds_config(crate::sds::SdsConfig {
            default_svid: sds_default_svid_name,
            default_bundle: sds_default_bundle_name,
            all_bundles: sds_all_bundles_name,
            ..Default::default()
        });
        let broker_metrics = ApiMetrics::new(Api::Broker);
        broker_metrics.register(&mut registry);
        let broker_listener = if broker.broker_socket_path.as_os_str().is_empty() {
            None
        } else {
            Some(
                transport::bind_private(&broker.broker_socket_path).with_context(|| {
                    format!(
                        "bind the Broker API socket {} (--broker-socket-path)",
                        broker.broker_socket_path.display()
                    )
                })?,
            )
        };
        let broker_api = BrokerApi::new(
            Served {
                cache: cache.clone(),
                node: node.clone(),
                shutdown: cancel.clone(),
                open_streams: Default::default(),
                mint_budget,
            },
            BrokerPolicy {
                uid: broker.broker_uid,
                exe: broker.broker_exe,
                token_audience: broker.csi_token_audience,
                node_name: node_name.clone(),
                pod_timeout,
            },
            client.clone(),
            pods.clone(),
            attestor.clone(),
            broker_metrics,
        );
        let health = tokio::net::TcpListener::bind(health_addr)
            .await
            .with_context(|| format!("bind the health server to {health_addr} (--health-addr)"))?;
        let health_addr = health.local_addr().context("health server address")?;

        let tpm = match tpm_tcti {
            None => None,
            Some(tcti) => {
                let helper = match tpm_helper {
                    Some(path) => path,
                    None => crate::tpm::helper_beside(
                        &std::env::current_exe()
                            .context("find the agent's executable, beside which the TPM helper is (--tpm-helper)")?,
                    ),
                };
                let device = crate::tpm::TpmDevice::open(crate::tpm::TpmOptions {
                    tcti: tcti.clone(),
                    ek_certificate_file: tpm_ek_certificate_file,
                    helper: helper.clone(),
                })
                .await
                .with_context(|| format!("open the TPM (--tpm-tcti {tcti})"))?;
                info!(tcti = %tcti, helper = %helper.display(), "node attestation with the TPM");
                Some(Arc::new(device))
            }
        };
        let (attested_tx, attested_rx) = watch::channel(false);
        let attested_ready = readiness.component("node-attestation");
        // Once the Workload API socket is bound, shutdown removes it (and its alias) at
        // once, before the drain, and only while it is still ours.
        let api_socket = transport::BoundSocket::at(&socket_path)
            .with_context(|| format!("stat the Workload API socket {}", socket_path.display()))?;
        let broker_socket = match &broker_listener {
            Some(_) => Some(
                transport::BoundSocket::at(&broker.broker_socket_path).with_context(|| {
                    format!(
                        "stat the Broker API socket {}",
                        broker.broker_socket_path.display()
                    )
                })?,
            ),
            None => None,
        };
        let mut parts = Parts::default();
        parts.spawn_until_cancelled(
            "node attestation",
            sync::keep_agent_svid(
                node.clone(),
                TokenFile(token_file),
                tpm,
                attested_tx,
                cancel.clone(),
            ),
        );
        // Ends once attested: not a part.
        tokio::spawn({
            let mut rx = attested_rx.clone();
            async move {
                if rx.wait_for(|a| *a).await.is_ok() {
                    attested_ready.set_ready();
                }
            }
        });
        parts.spawn_until_cancelled(
            "entry sync",
            sync::sync_entries(node.clone(), cache.clone(), attested_rx, cancel.clone()),
        );
        parts.spawn_until_cancelled(
            "rotator",
            rotator::run(cache.clone(), node.clone(), rotator_metrics, cancel.clone()),
        );
        parts.spawn("Workload API server", {
            let (cancel, proc_root) = (cancel.clone(), proc_root.clone());
            async move {
                info!(socket = %socket_path.display(), "Workload API listening");
                let removal = async {
                    cancel.cancelled().await;
                    if api_socket.remove() {
                        info!(socket = %socket_path.display(), "Workload API socket removed; draining");
                        if !socket_alias.is_empty() {
                            transport::unlink_alias(&socket_path, &socket_alias);
                        }
                    }
                };
                let (served, ()) = tokio::join!(
                    workload_api::serve(listener, api, proc_root, caps, cancel.clone()),
                    removal
                );
                served.context("serve")
            }
        });
        if let (Some(listener), Some(bound)) = (broker_listener, broker_socket) {
            let (cancel, proc_root, path) = (
                cancel.clone(),
                proc_root.clone(),
                broker.broker_socket_path.clone(),
            );
            parts.spawn("Broker API server", async move {
                info!(socket = %path.display(), "Broker API listening");
                let (served, ()) = tokio::join!(
                    broker_api::serve(listener, broker_api, proc_root, cancel.clone()),
                    bound.remove_on(cancel.clone())
                );
                served.context("serve")
            });
        }
        parts.spawn("health server", {
            let (readiness, cancel) = (readiness.clone(), cancel.clone());
            async move {
                sigil_telemetry::serve(health, Arc::new(registry), readiness, cancel)
                    .await
                    .context("serve")
            }
        });
        Ok(Agent {
            readiness,
            cache,
            node,
            health_addr,
            parts,
            cancel,
        })
    }

    /// Waits until every part has stopped: after `cancel` (each gets
    /// [`supervise::DRAIN_GRACE`] to drain), or when one of them fails, which stops the
    /// rest and is returned naming the part ([`Parts::wait`]).
    /// Waiting again returns at once.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        std::mem::take(&mut self.parts)
            .wait(&self.cancel, supervise::DRAIN_GRACE)
            .await
    }
}

/// The default socket path when neither `--socket-path` nor `SIGIL_SOCKET_PATH` is set.
pub const DEFAULT_SOCKET_PATH: &str = "/run/sigil/agent/api.sock";

/// `--socket-path`, else `SPIFFE_ENDPOINT_SOCKET` (which must then be `unix://<path>`),
/// else [`DEFAULT_SOCKET_PATH`].
pub fn resolve_socket_path(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p);
    }
    match std::env::var("SPIFFE_ENDPOINT_SOCKET") {
        Ok(addr) => match addr.strip_prefix("unix://") {
            Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
            _ => anyhow::bail!(
                "SPIFFE_ENDPOINT_SOCKET={addr:?} is not a unix:///absolute/path address; the agent serves on a Unix socket (or set --socket-path)"
            ),
        },
        Err(_) => Ok(PathBuf::from(DEFAULT_SOCKET_PATH)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser as _;

    use super::Args;

    fn parse(extra: &[&str]) -> Result<Args, String> {
        let mut argv = vec!["sigil-agent", "--node-name", "n1"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).map_err(|e| e.to_string())
    }

    #[test]
    fn the_trust_domain_flag_is_parsed_and_a_bad_one_names_the_flag() {
        let args = parse(&["--trust-domain", "spiffe://example.org"]).unwrap();
        assert_eq!(args.trust_domain.name(), "example.org");
        let e = parse(&["--trust-domain", "Example.org"]).unwrap_err();
        assert!(e.contains("--trust-domain"), "{e}");
        let e = parse(&["--trust-domain", "spiffe://example.org/x"]).unwrap_err();
        assert!(e.contains("--trust-domain"), "{e}");
    }

    #[test]
    fn a_zero_or_unitless_duration_flag_is_refused_with_the_fix() {
        let td = ["--trust-domain", "example.org"];
        let ok = parse(&[&td[..], &["--pod-timeout", "1m30s"]].concat()).unwrap();
        assert_eq!(ok.pod_timeout.as_secs(), 90);
        let e = parse(&[&td[..], &["--pod-timeout", "0s"]].concat()).unwrap_err();
        assert!(e.contains("--pod-timeout") && e.contains("zero"), "{e}");
        let e = parse(&[&td[..], &["--pod-timeout", "30"]].concat()).unwrap_err();
        assert!(e.contains("\"30s\""), "{e}");
    }
}
