//! The sigil-operator process: flags, and the subsystems it runs as one set.
//!
//! Every replica runs the CA loader (so it can sign), the identity index informers and the
//! health server; the replica holding the Lease also writes (CA Secrets, bundle
//! ConfigMaps, TrustDomain and ClusterSPIFFEID status). The first SIGTERM drains: `/ready`
//! turns 503, streams end, the Lease is released, and the process exits 0. A second signal
//! exits at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::WatchStreamExt as _;
use prometheus_client::registry::Registry;
use sigil_identity::clock::SystemClock;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::authority::Authorities;
use crate::crd::trust_domain::GoDuration;
use crate::index::{self, EntryIndex, IndexConfig, IndexMetrics, RunOptions, StatusOptions};
use crate::leader::{LeaderConfig, LeaderElection};
use crate::node_api::metrics::NodeApiMetrics;
use crate::node_api::psat::PsatConfig;
use crate::node_api::{self, NodeApi, NodeApiConfig};
use crate::telemetry::{self, LogFormat, Metrics, Readiness};
use crate::trust_domain;

/// sigil-operator: the signing CA of each TrustDomain, the identity index of
/// ClusterSPIFFEIDs, and the Node API agents talk to.
#[derive(Debug, Clone, Parser)]
#[command(name = "sigil-operator", version)]
pub struct Args {
    /// Namespace the operator runs in: CA Secrets and the Lease live here.
    #[arg(long, env = "SIGIL_NAMESPACE")]
    pub namespace: String,

    /// This replica's name (the pod name): the Lease holder identity and the Event source.
    #[arg(long, env = "POD_NAME", default_value_t = default_identity())]
    pub pod_name: String,

    /// Name of the Lease used for leader election.
    #[arg(long, env = "SIGIL_LEASE_NAME", default_value = "sigil-operator")]
    pub lease_name: String,

    /// How long a leader's Lease lasts without renewal (Go duration).
    #[arg(long, env = "SIGIL_LEASE_DURATION", default_value = "15s", value_parser = go_duration)]
    pub lease_duration: Duration,

    /// Address of the health server (`/live`, `/ready`, `/metrics`).
    #[arg(long, env = "SIGIL_HEALTH_ADDR", default_value = "0.0.0.0:9090")]
    pub health_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "SIGIL_LOG_FORMAT", value_enum, default_value_t = LogFormatArg::Json)]
    pub log_format: LogFormatArg,

    /// Only manage TrustDomains matching this label selector (lets several installations
    /// share an API server).
    #[arg(long, env = "SIGIL_TRUST_DOMAIN_SELECTOR")]
    pub trust_domain_selector: Option<String>,

    /// The cluster's name: the `clusterName` template field.
    #[arg(long, env = "SIGIL_CLUSTER_NAME", default_value = "cluster")]
    pub cluster_name: String,

    /// The cluster's DNS domain: the `clusterDomain` template field.
    #[arg(long, env = "SIGIL_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// A kubeconfig (default: in-cluster configuration).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,

    /// How soon a TrustDomain with a problem is looked at again (Go duration).
    #[arg(long, env = "SIGIL_RETRY_INTERVAL", default_value = "30s", value_parser = go_duration)]
    pub retry_interval: Duration,

    /// Node API flags.
    #[command(flatten)]
    pub node_api: NodeApiArgs,
}

/// Flags of the Node API (agents' attestation, entry streams and signing).
#[derive(Debug, Clone, clap::Args)]
pub struct NodeApiArgs {
    /// Trust domain (`spec.trustDomain` of a TrustDomain) agents get their SVIDs in. The
    /// Node API is served only when this is set.
    #[arg(long, env = "SIGIL_AGENT_TRUST_DOMAIN")]
    pub agent_trust_domain: Option<String>,

    /// Address of the Node API (gRPC over TLS).
    #[arg(long, env = "SIGIL_NODE_API_ADDR", default_value = "0.0.0.0:8443")]
    pub node_api_addr: SocketAddr,

    /// Audience agents' projected service-account tokens must carry.
    #[arg(long, env = "SIGIL_PSAT_AUDIENCE", default_value = "sigil-agent")]
    pub psat_audience: String,

    /// Service accounts (`namespace:name`, comma-separated) agents may run as. Default:
    /// `<namespace>:sigil-agent`.
    #[arg(long, env = "SIGIL_AGENT_SERVICE_ACCOUNTS", value_delimiter = ',')]
    pub agent_service_accounts: Vec<String>,

    /// Node label keys copied into agent selectors (comma-separated).
    #[arg(long, env = "SIGIL_AGENT_NODE_LABEL_KEYS", value_delimiter = ',')]
    pub agent_node_label_keys: Vec<String>,

    /// Pod label keys of the agent pod copied into agent selectors (comma-separated).
    #[arg(long, env = "SIGIL_AGENT_POD_LABEL_KEYS", value_delimiter = ',')]
    pub agent_pod_label_keys: Vec<String>,

    /// Lifetime of agent SVIDs (Go duration); agents renew at half-life.
    #[arg(long, env = "SIGIL_AGENT_SVID_TTL", default_value = "1h", value_parser = go_duration)]
    pub agent_svid_ttl: Duration,

    /// Sustained Node API requests per second allowed from one node.
    #[arg(long, env = "SIGIL_NODE_RATE", default_value_t = 20.0)]
    pub node_rate: f64,

    /// Burst of Node API requests allowed from one node.
    #[arg(long, env = "SIGIL_NODE_BURST", default_value_t = 200.0)]
    pub node_burst: f64,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

fn default_identity() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| format!("sigil-operator-{}", std::process::id()))
}

fn go_duration(s: &str) -> Result<Duration, String> {
    GoDuration::new(s).to_std()
}

/// Parses the flags, sets up logging and runs the operator until a signal.
pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init_logging(match args.log_format {
        LogFormatArg::Json => LogFormat::Json,
        LogFormatArg::Text => LogFormat::Text,
    })
    .map_err(|e| anyhow::anyhow!("logging: {e}"))?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?
        .block_on(run(args))
}

/// Runs every subsystem until the first SIGTERM/SIGINT has drained them.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let Args {
        namespace,
        pod_name,
        lease_name,
        lease_duration,
        health_addr,
        log_format: _,
        trust_domain_selector,
        cluster_name,
        cluster_domain,
        retry_interval,
        kubeconfig,
        node_api,
    } = args;
    info!(%namespace, identity = %pod_name, version = env!("CARGO_PKG_VERSION"), "sigil-operator starting");
    let client = kube_client(kubeconfig.as_deref()).await?;

    let cancel = CancellationToken::new();
    let readiness = Readiness::new();
    let metrics = Metrics::default();
    let index_metrics = IndexMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    index_metrics.register(&mut registry);

    let (election, leader) = LeaderElection::new(
        client.clone(),
        LeaderConfig::with_duration(&namespace, &lease_name, &pod_name, lease_duration),
    );
    let election = election.with_metrics(metrics.leader.clone());

    let authorities = Authorities::new();
    let mut td_options = trust_domain::Options::new(&namespace);
    td_options.instance = Some(pod_name.clone());
    td_options.selector = trust_domain_selector;
    td_options.retry_interval = retry_interval;
    let td_shared = trust_domain::Shared {
        authorities: authorities.clone(),
        clock: Arc::new(SystemClock),
        leader: leader.clone(),
        metrics: metrics.trust_domain.clone(),
        ready: Some(readiness.component("trust-domains")),
        resync: trust_domain::Resync::default(),
    };

    let mut index_config = IndexConfig::new(&cluster_name);
    index_config.cluster_domain = cluster_domain;
    let entry_index = EntryIndex::with_metrics(index_config, index_metrics);
    let index_options = RunOptions {
        status: StatusOptions::default(),
        ready: Some(readiness.component("identity-index")),
    };

    let listener = tokio::net::TcpListener::bind(health_addr)
        .await
        .with_context(|| format!("bind the health server to {health_addr} (--health-addr)"))?;

    let node_api = node_api_task(
        node_api,
        NodeApiContext {
            namespace: &namespace,
            cluster_name: &cluster_name,
            client: &client,
            authorities: &authorities,
            index: &entry_index,
            readiness: &readiness,
            registry: &mut registry,
            cancel: &cancel,
        },
    )
    .await?;

    let health = telemetry::serve(
        listener,
        Arc::new(registry),
        readiness.clone(),
        cancel.clone(),
    );
    let signals = telemetry::shutdown_on_signals(cancel.clone(), readiness.clone());
    let (health, signals, (), td, (), node_api) = tokio::join!(
        health,
        signals,
        election.run(cancel.clone()),
        trust_domain::run(client.clone(), td_options, td_shared, cancel.clone()),
        index::run(client, entry_index, leader, index_options, cancel.clone()),
        node_api,
    );
    health.context("health server")?;
    signals.context("signal handler")?;
    td.context("TrustDomain controller")?;
    node_api.map_err(|e| anyhow::anyhow!("Node API: {e}"))?;
    info!("sigil-operator stopped");
    Ok(())
}

struct NodeApiContext<'a> {
    namespace: &'a str,
    cluster_name: &'a str,
    client: &'a kube::Client,
    authorities: &'a Arc<Authorities>,
    index: &'a EntryIndex,
    readiness: &'a Readiness,
    registry: &'a mut Registry,
    cancel: &'a CancellationToken,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The Node API, with the Node reflector it needs, as one future to join with the rest
/// (a no-op without `--agent-trust-domain`).
async fn node_api_task(
    args: NodeApiArgs,
    cx: NodeApiContext<'_>,
) -> anyhow::Result<futures::future::BoxFuture<'static, Result<(), BoxError>>> {
    let NodeApiArgs {
        agent_trust_domain,
        node_api_addr,
        psat_audience,
        agent_service_accounts,
        agent_node_label_keys,
        agent_pod_label_keys,
        agent_svid_ttl,
        node_rate,
        node_burst,
    } = args;
    let Some(td) = agent_trust_domain else {
        info!("no --agent-trust-domain: the Node API is not served");
        return Ok(Box::pin(async { Ok(()) }));
    };
    let td: sigil_identity::TrustDomain = td
        .parse()
        .map_err(|e| anyhow::anyhow!("--agent-trust-domain {td:?}: {e}"))?;
    let allowed = if agent_service_accounts.is_empty() {
        vec![format!("{}:sigil-agent", cx.namespace)]
    } else {
        agent_service_accounts
    };
    let metrics = NodeApiMetrics::default();
    metrics.register(cx.registry);
    let (nodes, writer) = kube::runtime::reflector::store::<Node>();
    let node_watch = kube::runtime::reflector(
        writer,
        kube::runtime::watcher(
            kube::Api::<Node>::all(cx.client.clone()),
            Default::default(),
        ),
    );
    let clock: sigil_identity::clock::SharedClock = Arc::new(SystemClock);
    let api = NodeApi::new(
        NodeApiConfig {
            agent_trust_domain: td.clone(),
            agent_svid_ttl,
            psat: PsatConfig {
                cluster: cx.cluster_name.to_owned(),
                audience: psat_audience,
                allowed_service_accounts: allowed,
                allowed_node_label_keys: agent_node_label_keys,
                allowed_pod_label_keys: agent_pod_label_keys,
            },
            rate_per_node: node_rate,
            burst_per_node: node_burst,
        },
        cx.client.clone(),
        cx.authorities.clone(),
        cx.index.clone(),
        nodes,
        clock.clone(),
        metrics,
        cx.cancel.clone(),
    );
    let listener = tokio::net::TcpListener::bind(node_api_addr)
        .await
        .with_context(|| format!("bind the Node API to {node_api_addr} (--node-api-addr)"))?;
    let authorities = cx.authorities.clone();
    let ready = cx.readiness.component("node-api");
    let cancel = cx.cancel.clone();
    Ok(Box::pin(async move {
        let watch_cancel = cancel.clone();
        let watch = async move {
            use futures::StreamExt;
            let stream = node_watch.default_backoff().applied_objects();
            futures::pin_mut!(stream);
            loop {
                tokio::select! {
                    () = watch_cancel.cancelled() => return,
                    item = stream.next() => match item {
                        Some(Err(e)) => tracing::warn!(error = %e, "Node watch for the Node API"),
                        Some(Ok(_)) => {}
                        None => return,
                    },
                }
            }
        };
        let serve = node_api::serve(
            listener,
            api,
            authorities,
            td,
            agent_svid_ttl,
            clock,
            Some(ready),
            cancel,
        );
        let ((), served) = tokio::join!(watch, serve);
        served
    }))
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes client configuration: run in a pod, or pass --kubeconfig")?,
    };
    kube::Client::try_from(config).context("build the Kubernetes client")
}
