//! The sigil-csi process: flags, the CSI socket, the health server, and resuming the
//! files-mode volumes recorded by a previous run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use prometheus_client::registry::Registry;
use sigil_identity::proto::csi as pb;
use sigil_telemetry::{LogFormat, Readiness};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::broker::BrokerClient;
use crate::files::FilesVolumes;
use crate::mounter::{LinuxMounter, Mounter};
use crate::service::{CsiMetrics, CsiService, NodeConfig};

/// sigil-csi: puts SPIFFE identities into pods as the Workload API socket or as rotating
/// files (CSI inline ephemeral volumes, driver csi.sigil.dev).
#[derive(Debug, Clone, Parser)]
#[command(name = "sigil-csi", version)]
pub struct Args {
    /// The CSI socket the kubelet calls (`unix:///path` or a path).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// This Kubernetes Node's name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The agent's Broker API socket.
    #[arg(
        long,
        env = "SIGIL_BROKER_SOCKET_PATH",
        default_value = "/run/sigil/broker/broker.sock"
    )]
    pub broker_socket_path: PathBuf,
    /// The agent's Workload API socket directory (what workload-api volumes mount).
    #[arg(
        long,
        env = "SIGIL_AGENT_SOCKET_DIR",
        default_value = "/run/sigil/agent"
    )]
    pub agent_socket_dir: PathBuf,
    /// Where published volumes are recorded (survives restarts; root only).
    #[arg(long, env = "SIGIL_CSI_DATA_DIR", default_value = "/var/lib/sigil-csi")]
    pub data_dir: PathBuf,
    /// Audience of the pod tokens the kubelet passes (the CSIDriver's tokenRequests).
    #[arg(long, env = "SIGIL_CSI_TOKEN_AUDIENCE", default_value = "sigil-csi")]
    pub token_audience: String,
    /// Address of the health server (`/live`, `/ready`, `/metrics`).
    #[arg(long, env = "SIGIL_HEALTH_ADDR", default_value = "0.0.0.0:9092")]
    pub health_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "SIGIL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// How long a socket-mode publish waits for the pod's X509-SVID before returning, so
    /// the container starts with its identity ready (a positive Go duration, as every duration flag). A
    /// pod with no identity is not held back.
    #[arg(long, env = "SIGIL_SOCKET_PUBLISH_WAIT", default_value = "10s", value_parser = sigil_telemetry::process::go_duration)]
    pub socket_publish_wait: Duration,
}

/// Parses the flags and serves until a signal ([`sigil_telemetry::process::run`]).
pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    sigil_telemetry::process::run(args.log_format, |readiness, cancel| {
        run(args, Arc::new(LinuxMounter), readiness, cancel)
    })
}

/// The socket path of `--endpoint`.
pub fn endpoint_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    anyhow::ensure!(
        path.starts_with('/'),
        "--endpoint {endpoint:?} must be unix:///absolute/path"
    );
    Ok(PathBuf::from(path))
}

/// Serves CSI until `cancel`; files-mode volumes stay mounted and recorded for the next
/// start.
pub async fn run(
    args: Args,
    mounter: Arc<dyn Mounter>,
    readiness: Readiness,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let Args {
        endpoint,
        node_name,
        broker_socket_path,
        agent_socket_dir,
        data_dir,
        token_audience,
        health_addr,
        log_format: _,
        socket_publish_wait,
    } = args;
    info!(node = %node_name, version = env!("CARGO_PKG_VERSION"), "sigil-csi starting");
    let socket = endpoint_path(&endpoint)?;
    let mut registry = Registry::default();
    let metrics = CsiMetrics::default();
    metrics.register(&mut registry);
    let broker = BrokerClient::new(&broker_socket_path).context("Broker API client")?;
    let files = FilesVolumes::new(&data_dir, broker, mounter.clone(), Duration::from_secs(60))
        .with_context(|| format!("data directory {} (--data-dir)", data_dir.display()))?;
    let resumed = files.resume();
    info!(resumed, "recorded files-mode volumes resumed");
    let service = CsiService::new(
        NodeConfig {
            node_id: node_name,
            agent_socket_dir,
            token_audience,
            socket_publish_wait,
        },
        mounter,
        files.clone(),
        metrics,
    );

    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("bind the CSI socket {} (--endpoint)", socket.display()))?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let health = tokio::net::TcpListener::bind(health_addr)
        .await
        .with_context(|| format!("bind the health server to {health_addr} (--health-addr)"))?;
    info!(socket = %socket.display(), "CSI listening");
    let serve = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(120))
        .add_service(
            pb::identity_server::IdentityServer::new(service.clone())
                .max_decoding_message_size(1024 * 1024),
        )
        .add_service(
            pb::node_server::NodeServer::new(service).max_decoding_message_size(1024 * 1024),
        )
        .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
    let health = sigil_telemetry::serve(health, Arc::new(registry), readiness, cancel.clone());
    let (served, health) = tokio::join!(serve, health);
    files.stop_all();
    let _ = std::fs::remove_file(&socket);
    served.context("CSI server")?;
    health.context("health server")?;
    info!("sigil-csi stopped");
    Ok(())
}
