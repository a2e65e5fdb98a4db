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
use sigil_identity::TrustDomain;
use sigil_identity::clock::SystemClock;
use sigil_telemetry::process::{go_duration, kube_client};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admission::{self, AdmissionArgs, AdmissionMetrics};
use crate::authority::Authorities;
use crate::federation::endpoint::{EndpointConfig, EndpointTls};
use crate::federation::{self, FederatedBundles};
use crate::index::{self, EntryIndex, IndexConfig, IndexMetrics, RunOptions, StatusOptions};
use crate::leader::{LeaderConfig, LeaderElection};
use crate::node_api::limits::{Budget, NodeApiLimits};
use crate::node_api::metrics::NodeApiMetrics;
use crate::node_api::psat::PsatConfig;
use crate::node_api::tpm::{ManufacturerCas, TpmConfig};
use crate::node_api::{self, NodeApi, NodeApiConfig};
use crate::pod_certificates::{self, PodCertificateMetrics, decide::KeyType};
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
    #[arg(long, env = "SIGIL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

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

    /// Federation flags.
    #[command(flatten)]
    pub federation: FederationArgs,

    /// Pod certificate flags.
    #[command(flatten)]
    pub pod_certificates: PodCertificateArgs,

    /// Admission webhook flags.
    #[command(flatten)]
    pub admission: AdmissionArgs,

    /// Key manager flags (where CA and JWT keys live).
    #[command(flatten)]
    pub keys: crate::keys::KeyManagerArgs,
}

/// Flags of the pod certificate signer (`sigil.dev/<TrustDomain>`, docs/pod-certificates.md).
#[derive(Debug, Clone, clap::Args)]
pub struct PodCertificateArgs {
    /// Sign Kubernetes PodCertificateRequests for signers `sigil.dev/<TrustDomain name>`
    /// and publish ClusterTrustBundles. Needs the RBAC the chart grants.
    #[arg(long, env = "SIGIL_POD_CERTIFICATES", default_value_t = true, action = clap::ArgAction::Set)]
    pub pod_certificates: bool,

    /// Key types the signer certifies (comma-separated kubelet names: ECDSAP256,
    /// ECDSAP384, ED25519, RSA3072, RSA4096). Others are denied with UnsupportedKeyType.
    #[arg(long, env = "SIGIL_POD_CERTIFICATE_KEY_TYPES", value_delimiter = ',', default_value = "ECDSAP256,ECDSAP384,ED25519", value_parser = pod_certificate_key_type)]
    pub pod_certificate_key_types: Vec<KeyType>,

    /// How long a request waits for the operator to see its pod, the pod's node and a
    /// ClusterSPIFFEID selecting it before it is denied (Go duration).
    #[arg(long, env = "SIGIL_POD_CERTIFICATE_GRACE", default_value = "10s", value_parser = go_duration)]
    pub pod_certificate_grace: Duration,
}

fn pod_certificate_key_type(s: &str) -> Result<KeyType, String> {
    match KeyType::from_name(s) {
        Some(KeyType::EcdsaP521) => Err("ECDSAP521 cannot be allowed: rustls and ring have no P-521 verifier, so no Sigil component or common SPIFFE library could use the certificate".into()),
        Some(k) => Ok(k),
        None => Err(format!(
            "unknown key type {s:?}; use ECDSAP256, ECDSAP384, ED25519, RSA3072 or RSA4096"
        )),
    }
}

/// Flags of federation: fetching foreign bundles, serving ours, OIDC discovery.
#[derive(Debug, Clone, clap::Args)]
pub struct FederationArgs {
    /// Only manage FederatedBundles matching this label selector.
    #[arg(long, env = "SIGIL_FEDERATED_BUNDLE_SELECTOR")]
    pub federated_bundle_selector: Option<String>,

    /// Shortest time between two fetches of one bundle endpoint, whatever its
    /// `spiffe_refresh_hint` says (Go duration).
    #[arg(long, env = "SIGIL_FEDERATION_MIN_REFRESH", default_value = "30s", value_parser = go_duration)]
    pub federation_min_refresh: Duration,

    /// Deadline of one bundle endpoint fetch: connect, TLS, redirects and body (Go
    /// duration).
    #[arg(long, env = "SIGIL_FEDERATION_FETCH_TIMEOUT", default_value = "10s", value_parser = go_duration)]
    pub federation_fetch_timeout: Duration,

    /// Address of our SPIFFE bundle endpoint (HTTPS). Not served unless set.
    #[arg(long, env = "SIGIL_BUNDLE_ENDPOINT_ADDR")]
    pub bundle_endpoint_addr: Option<SocketAddr>,

    /// Trust domain whose bundle the endpoint serves (default: --agent-trust-domain).
    #[arg(long, env = "SIGIL_BUNDLE_ENDPOINT_TRUST_DOMAIN")]
    pub bundle_endpoint_trust_domain: Option<TrustDomain>,

    /// How the bundle endpoint authenticates itself: `https_spiffe` (an X509-SVID
    /// spiffe://<td>/sigil/bundle-endpoint) or `https_web` (--bundle-endpoint-cert-file
    /// and --bundle-endpoint-key-file, e.g. a mounted cert-manager Secret).
    #[arg(long, env = "SIGIL_BUNDLE_ENDPOINT_PROFILE", value_enum, default_value_t = EndpointProfileArg::HttpsSpiffe)]
    pub bundle_endpoint_profile: EndpointProfileArg,

    /// PEM certificate chain of the https_web bundle endpoint (reloaded when it changes).
    #[arg(long, env = "SIGIL_BUNDLE_ENDPOINT_CERT_FILE")]
    pub bundle_endpoint_cert_file: Option<std::path::PathBuf>,

    /// PEM private key of the https_web bundle endpoint.
    #[arg(long, env = "SIGIL_BUNDLE_ENDPOINT_KEY_FILE")]
    pub bundle_endpoint_key_file: Option<std::path::PathBuf>,

    /// Lifetime of the https_spiffe bundle endpoint's own SVID (Go duration).
    #[arg(long, env = "SIGIL_BUNDLE_ENDPOINT_SVID_TTL", default_value = "1h", value_parser = go_duration)]
    pub bundle_endpoint_svid_ttl: Duration,

    /// Address of a plain-HTTP listener serving only OIDC discovery
    /// (`/.well-known/openid-configuration`, `/keys`), for an ingress that terminates TLS.
    #[arg(long, env = "SIGIL_OIDC_HTTP_ADDR")]
    pub oidc_http_addr: Option<SocketAddr>,
}

/// `--bundle-endpoint-profile` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EndpointProfileArg {
    /// The endpoint presents an X509-SVID Sigil issues itself.
    #[value(name = "https_spiffe")]
    HttpsSpiffe,
    /// The endpoint presents a Web PKI certificate from files.
    #[value(name = "https_web")]
    HttpsWeb,
}

/// Flags of the Node API (agents' attestation, entry streams and signing).
#[derive(Debug, Clone, clap::Args)]
pub struct NodeApiArgs {
    /// Trust domain (`spec.trustDomain` of a TrustDomain) agents get their SVIDs in. The
    /// Node API is served only when this is set.
    #[arg(long, env = "SIGIL_AGENT_TRUST_DOMAIN")]
    pub agent_trust_domain: Option<TrustDomain>,

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

    /// Sustained agent upkeep calls (attestation once attested, RenewAgent, SyncEntries)
    /// per second allowed from one node.
    #[arg(long, env = "SIGIL_NODE_RATE", default_value_t = NodeApiLimits::default().agent.rate)]
    pub node_rate: f64,

    /// Burst of agent upkeep calls allowed from one node.
    #[arg(long, env = "SIGIL_NODE_BURST", default_value_t = NodeApiLimits::default().agent.burst)]
    pub node_burst: f64,

    /// Sustained X509-SVIDs signed per second for one node (each CSR counts).
    #[arg(long, env = "SIGIL_NODE_SIGN_RATE", default_value_t = NodeApiLimits::default().sign.rate)]
    pub node_sign_rate: f64,

    /// Burst of X509-SVIDs signed for one node (a restarted agent re-signs its whole node).
    #[arg(long, env = "SIGIL_NODE_SIGN_BURST", default_value_t = NodeApiLimits::default().sign.burst)]
    pub node_sign_burst: f64,

    /// Sustained JWT-SVIDs minted per second for one node.
    #[arg(long, env = "SIGIL_NODE_MINT_RATE", default_value_t = NodeApiLimits::default().mint.rate)]
    pub node_mint_rate: f64,

    /// Burst of JWT-SVIDs minted for one node.
    #[arg(long, env = "SIGIL_NODE_MINT_BURST", default_value_t = NodeApiLimits::default().mint.burst)]
    pub node_mint_burst: f64,

    /// Sustained attestations per second from one source address, counted before the
    /// token goes to TokenReview (raise it when many nodes reach the operator through one
    /// NAT address).
    #[arg(long, env = "SIGIL_ATTEST_RATE_PER_ADDRESS", default_value_t = NodeApiLimits::default().attest_per_address.rate)]
    pub attest_rate_per_address: f64,

    /// Burst of attestations from one source address.
    #[arg(long, env = "SIGIL_ATTEST_BURST_PER_ADDRESS", default_value_t = NodeApiLimits::default().attest_per_address.burst)]
    pub attest_burst_per_address: f64,

    /// Sustained attestations per second from all addresses together (bounds the
    /// TokenReviews one replica sends).
    #[arg(long, env = "SIGIL_ATTEST_RATE", default_value_t = NodeApiLimits::default().attest_total.rate)]
    pub attest_rate: f64,

    /// Burst of attestations from all addresses together.
    #[arg(long, env = "SIGIL_ATTEST_BURST", default_value_t = NodeApiLimits::default().attest_total.burst)]
    pub attest_burst: f64,

    /// Most Node API connections open at once (TLS handshakes included).
    #[arg(long, env = "SIGIL_NODE_API_MAX_CONNECTIONS", default_value_t = NodeApiLimits::default().max_connections)]
    pub node_api_max_connections: usize,

    /// Most Node API connections open at once from one source address.
    #[arg(long, env = "SIGIL_NODE_API_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = NodeApiLimits::default().max_connections_per_address)]
    pub node_api_max_connections_per_address: usize,

    /// Most Node API connections without a client certificate open at once.
    #[arg(long, env = "SIGIL_NODE_API_MAX_UNAUTHENTICATED_CONNECTIONS", default_value_t = NodeApiLimits::default().max_unauthenticated_connections)]
    pub node_api_max_unauthenticated_connections: usize,

    /// Most request bytes in transit (received, not yet decoded) at once from one source
    /// address.
    #[arg(long, env = "SIGIL_NODE_API_MAX_REQUEST_BYTES_PER_ADDRESS", default_value_t = NodeApiLimits::default().max_request_bytes_per_address)]
    pub node_api_max_request_bytes_per_address: usize,

    /// Most request bytes in transit at once from all addresses together.
    #[arg(long, env = "SIGIL_NODE_API_MAX_REQUEST_BYTES", default_value_t = NodeApiLimits::default().max_request_bytes)]
    pub node_api_max_request_bytes: usize,

    /// Most requests without a client certificate in flight at once.
    #[arg(long, env = "SIGIL_NODE_API_MAX_UNAUTHENTICATED_REQUESTS", default_value_t = NodeApiLimits::default().max_unauthenticated_requests)]
    pub node_api_max_unauthenticated_requests: usize,

    /// PEM file of the TPM manufacturer CAs (roots and the intermediates that sign EK
    /// certificates) that EK certificates must chain to; mount it from a Secret or
    /// ConfigMap. TPM node attestation (AttestNodeTpm) is enabled only when this is set.
    /// See docs/tpm.md.
    #[arg(long, env = "SIGIL_TPM_EK_CA_BUNDLE")]
    pub tpm_ek_ca_bundle: Option<std::path::PathBuf>,

    /// How long an agent has to answer a TPM credential-activation challenge (Go duration).
    #[arg(long, env = "SIGIL_TPM_CHALLENGE_TIMEOUT", default_value = "10s", value_parser = go_duration)]
    pub tpm_challenge_timeout: Duration,

    /// Require TPM node attestation: refuse agents that attest with a service-account token
    /// alone (AttestNode), and the SVIDs of such agents. Needs --tpm-ek-ca-bundle.
    #[arg(long, env = "SIGIL_REQUIRE_TPM", requires = "tpm_ek_ca_bundle")]
    pub require_tpm: bool,
}

fn default_identity() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| format!("sigil-operator-{}", std::process::id()))
}

/// Parses the flags and runs the operator until a signal
/// ([`sigil_telemetry::process::run`]).
pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    sigil_telemetry::process::run(args.log_format, |readiness, cancel| {
        run(args, readiness, cancel)
    })
}

/// Runs every subsystem until `cancel` (the first SIGTERM/SIGINT) has drained them.
pub async fn run(
    args: Args,
    readiness: Readiness,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
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
        federation: federation_args,
        pod_certificates: pod_cert_args,
        admission: admission_args,
        keys,
    } = args;
    info!(%namespace, identity = %pod_name, version = env!("CARGO_PKG_VERSION"), "sigil-operator starting");
    // Opening an HSM loads its module and logs in: a blocking call, and a clear error at
    // start when it is unreachable.
    let keys = tokio::task::spawn_blocking(move || keys.open()).await??;
    info!(key_manager = ?keys, "key manager ready");
    let client = kube_client(kubeconfig.as_deref()).await?;

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
    td_options.keys = keys;
    let td_shared = trust_domain::Shared {
        authorities: authorities.clone(),
        clock: Arc::new(SystemClock),
        leader: leader.clone(),
        metrics: metrics.trust_domain.clone(),
        ready: Some(readiness.component("trust-domains")),
        resync: trust_domain::Resync::default(),
    };

    let federated = FederatedBundles::new();
    let mut fed_options = federation::Options::new(&namespace);
    fed_options.instance = Some(pod_name.clone());
    fed_options.selector = federation_args.federated_bundle_selector.clone();
    fed_options.min_refresh = federation_args.federation_min_refresh;
    fed_options.fetch_timeout = federation_args.federation_fetch_timeout;
    fed_options.retry_interval = retry_interval;
    let fed_shared = federation::Shared {
        federated: federated.clone(),
        authorities: authorities.clone(),
        clock: Arc::new(SystemClock),
        leader: leader.clone(),
        metrics: metrics.federation.clone(),
        errors: metrics.trust_domain.reconcile_errors.clone(),
        ready: Some(readiness.component("federated-bundles")),
    };

    let mut index_config = IndexConfig::new(&cluster_name);
    index_config.cluster_domain = cluster_domain;
    let entry_index = EntryIndex::with_metrics(index_config, index_metrics);
    let index_options = RunOptions {
        status: StatusOptions::default(),
        ready: Some(readiness.component("identity-index")),
    };

    let pod_certs = if pod_cert_args.pod_certificates {
        let metrics = PodCertificateMetrics::default();
        metrics.register(&mut registry);
        let policy = pod_certificates::decide::Policy {
            key_types: pod_cert_args
                .pod_certificate_key_types
                .into_iter()
                .collect(),
            grace: pod_cert_args.pod_certificate_grace,
        };
        let shared = pod_certificates::Shared {
            authorities: authorities.clone(),
            federated: federated.clone(),
            index: entry_index.clone(),
            leader: leader.clone(),
            clock: Arc::new(SystemClock),
            metrics,
        };
        futures::future::Either::Left(pod_certificates::run(
            client.clone(),
            policy,
            shared,
            cancel.clone(),
        ))
    } else {
        info!("--pod-certificates=false: PodCertificateRequests are not signed");
        futures::future::Either::Right(async {})
    };

    let listener = tokio::net::TcpListener::bind(health_addr)
        .await
        .with_context(|| format!("bind the health server to {health_addr} (--health-addr)"))?;

    let endpoints = endpoint_tasks(
        &federation_args,
        node_api.agent_trust_domain.as_ref(),
        &authorities,
        &metrics,
        &readiness,
        &cancel,
    )
    .await?;
    let node_api = node_api_task(
        node_api,
        NodeApiContext {
            namespace: &namespace,
            cluster_name: &cluster_name,
            client: &client,
            authorities: &authorities,
            index: &entry_index,
            federated: &federated,
            readiness: &readiness,
            registry: &mut registry,
            cancel: &cancel,
        },
    )
    .await?;

    let admission = match admission_args.admission_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("bind the admission webhook to {addr} (--admission-addr)")
            })?;
            let metrics = AdmissionMetrics::default();
            metrics.register(&mut registry);
            futures::future::Either::Left(admission::run(
                client.clone(),
                namespace.clone(),
                admission_args,
                listener,
                admission::Webhook {
                    index: entry_index.clone(),
                    metrics,
                },
                cancel.clone(),
            ))
        }
        None => futures::future::Either::Right(async { Ok(()) }),
    };

    let health = telemetry::serve(
        listener,
        Arc::new(registry),
        readiness.clone(),
        cancel.clone(),
    );
    let (health, (), td, (), (), node_api, endpoints, (), admission) = tokio::join!(
        health,
        election.run(cancel.clone()),
        trust_domain::run(client.clone(), td_options, td_shared, cancel.clone()),
        federation::run(client.clone(), fed_options, fed_shared, cancel.clone()),
        // On a worker, beside the connections its informers read: the body runs in
        // `block_on` on its own thread, and a Pod list read there crossed threads for
        // every piece of the response the worker took off the socket (about 45k thread
        // switches each way in a restart at 100k Pods, bench/README.md).
        async {
            let informers = index::run(client, entry_index, leader, index_options, cancel.clone());
            // A panic goes on up as it did; a cancelled task (runtime shutdown) just ends.
            if let Err(e) = tokio::spawn(informers).await
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        },
        node_api,
        endpoints,
        pod_certs,
        admission,
    );
    health.context("health server")?;
    admission.context("admission webhook")?;
    td.context("TrustDomain controller")?;
    node_api.map_err(|e| anyhow::anyhow!("Node API: {e}"))?;
    endpoints.map_err(|e| anyhow::anyhow!("bundle endpoint: {e}"))?;
    info!("sigil-operator stopped");
    Ok(())
}

struct NodeApiContext<'a> {
    namespace: &'a str,
    cluster_name: &'a str,
    client: &'a kube::Client,
    authorities: &'a Arc<Authorities>,
    index: &'a EntryIndex,
    federated: &'a Arc<FederatedBundles>,
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
        node_sign_rate,
        node_sign_burst,
        node_mint_rate,
        node_mint_burst,
        attest_rate_per_address,
        attest_burst_per_address,
        attest_rate,
        attest_burst,
        node_api_max_connections,
        node_api_max_connections_per_address,
        node_api_max_unauthenticated_connections,
        node_api_max_unauthenticated_requests,
        node_api_max_request_bytes_per_address,
        node_api_max_request_bytes,
        tpm_ek_ca_bundle,
        tpm_challenge_timeout,
        require_tpm,
    } = args;
    let tpm = match tpm_ek_ca_bundle {
        None => None,
        Some(path) => {
            let pem = std::fs::read_to_string(&path)
                .with_context(|| format!("read --tpm-ek-ca-bundle {}", path.display()))?;
            let manufacturer_cas = ManufacturerCas::from_pem(&pem)
                .map_err(|e| anyhow::anyhow!("--tpm-ek-ca-bundle {}: {e}", path.display()))?;
            // A CA that is not valid now signs nothing we accept; it is not a reason to
            // stop the whole operator (the bundle is fleet data that ages), so it is said
            // here and refused, precisely, when an EK certificate needs it.
            for problem in manufacturer_cas.not_valid_at(std::time::SystemTime::now()) {
                tracing::warn!(bundle = %path.display(), "--tpm-ek-ca-bundle: {problem}");
            }
            info!(
                cas = manufacturer_cas.len(),
                required = require_tpm,
                "TPM node attestation enabled"
            );
            Some(TpmConfig {
                manufacturer_cas,
                challenge_timeout: tpm_challenge_timeout,
                required: require_tpm,
            })
        }
    };
    let Some(td) = agent_trust_domain else {
        info!("no --agent-trust-domain: the Node API is not served");
        return Ok(Box::pin(async { Ok(()) }));
    };
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
            limits: NodeApiLimits {
                agent: Budget::new(node_rate, node_burst),
                sign: Budget::new(node_sign_rate, node_sign_burst),
                mint: Budget::new(node_mint_rate, node_mint_burst),
                attest_per_address: Budget::new(attest_rate_per_address, attest_burst_per_address),
                attest_total: Budget::new(attest_rate, attest_burst),
                max_connections: node_api_max_connections,
                max_connections_per_address: node_api_max_connections_per_address,
                max_unauthenticated_connections: node_api_max_unauthenticated_connections,
                max_unauthenticated_requests: node_api_max_unauthenticated_requests,
                max_request_bytes_per_address: node_api_max_request_bytes_per_address,
                max_request_bytes: node_api_max_request_bytes,
                ..NodeApiLimits::default()
            },
            tpm,
        },
        cx.client.clone(),
        cx.authorities.clone(),
        cx.index.clone(),
        nodes,
        clock.clone(),
        metrics,
        cx.federated.clone(),
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
            let stream = node_watch.backoff(crate::watch_backoff()).applied_objects();
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

/// The bundle endpoint and the plain-HTTP OIDC listener, as one future (a no-op when
/// neither is configured). Listeners are bound here so a bad address fails at start.
async fn endpoint_tasks(
    args: &FederationArgs,
    agent_trust_domain: Option<&TrustDomain>,
    authorities: &Arc<Authorities>,
    metrics: &Metrics,
    readiness: &Readiness,
    cancel: &CancellationToken,
) -> anyhow::Result<futures::future::BoxFuture<'static, Result<(), BoxError>>> {
    if args.bundle_endpoint_addr.is_none() && args.oidc_http_addr.is_none() {
        return Ok(Box::pin(async { Ok(()) }));
    }
    let td = args
        .bundle_endpoint_trust_domain
        .as_ref()
        .or(agent_trust_domain)
        .context("--bundle-endpoint-addr and --oidc-http-addr need --bundle-endpoint-trust-domain (or --agent-trust-domain): the trust domain whose bundle and keys they serve")?;
    let mut tasks: Vec<futures::future::BoxFuture<'static, Result<(), BoxError>>> = Vec::new();
    if let Some(addr) = args.bundle_endpoint_addr {
        let tls = match args.bundle_endpoint_profile {
            EndpointProfileArg::HttpsSpiffe => EndpointTls::Spiffe {
                svid_ttl: args.bundle_endpoint_svid_ttl,
            },
            EndpointProfileArg::HttpsWeb => EndpointTls::Web {
                cert_file: args.bundle_endpoint_cert_file.clone().context(
                    "--bundle-endpoint-profile https_web needs --bundle-endpoint-cert-file (PEM chain, e.g. tls.crt of a mounted Secret)",
                )?,
                key_file: args.bundle_endpoint_key_file.clone().context(
                    "--bundle-endpoint-profile https_web needs --bundle-endpoint-key-file (PEM key, e.g. tls.key of a mounted Secret)",
                )?,
            },
        };
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("bind the bundle endpoint to {addr} (--bundle-endpoint-addr)")
        })?;
        tasks.push(Box::pin(federation::endpoint::serve(
            listener,
            EndpointConfig {
                trust_domain: td.clone(),
                tls,
            },
            authorities.clone(),
            Arc::new(SystemClock),
            metrics.federation.clone(),
            Some(readiness.component("bundle-endpoint")),
            cancel.clone(),
        )));
    }
    if let Some(addr) = args.oidc_http_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind OIDC discovery to {addr} (--oidc-http-addr)"))?;
        tasks.push(Box::pin(federation::endpoint::serve_oidc_http(
            listener,
            td.clone(),
            authorities.clone(),
            metrics.federation.clone(),
            cancel.clone(),
        )));
    }
    Ok(Box::pin(async move {
        for r in futures::future::join_all(tasks).await {
            r?;
        }
        Ok(())
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser as _;

    use super::{Args, KeyType};

    fn parse(extra: &[&str]) -> Result<Args, String> {
        let mut argv = vec!["sigil-operator", "--namespace", "sigil"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).map_err(|e| e.to_string())
    }

    #[test]
    fn pod_certificate_flags_default_to_the_safe_key_types_and_refuse_p521() {
        let args = parse(&[]).unwrap();
        assert!(args.pod_certificates.pod_certificates);
        assert_eq!(
            args.pod_certificates.pod_certificate_key_types,
            KeyType::DEFAULT_ALLOWED.to_vec()
        );
        let args = parse(&[
            "--pod-certificates=false",
            "--pod-certificate-key-types=ECDSAP256,RSA3072",
        ])
        .unwrap();
        assert!(!args.pod_certificates.pod_certificates);
        assert_eq!(
            args.pod_certificates.pod_certificate_key_types,
            vec![KeyType::EcdsaP256, KeyType::Rsa3072]
        );
        let e = parse(&["--pod-certificate-key-types=ECDSAP521"]).unwrap_err();
        assert!(e.contains("ECDSAP521 cannot be allowed"), "{e}");
        let e = parse(&["--pod-certificate-key-types=RSA2048"]).unwrap_err();
        assert!(e.contains("unknown key type"), "{e}");
    }
}
