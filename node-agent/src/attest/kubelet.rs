//! The kubelet as a pod source: `GET https://<node>:10250/pods`, authenticated with the
//! agent's service-account token and TLS-verified against the kubelet's serving CA.
//!
//! The kubelet has no watch, so this source lists on demand: whenever attestation misses
//! a pod or container ([`PodSource::request_refresh`]), at most every
//! [`MIN_REFRESH_GAP`], plus a slow background refresh. A waiting attestation is woken by
//! the version channel as soon as a list brings the pod; it never fails after a fixed
//! number of polls, only at its deadline.
//!
//! Use it where the agent may not watch pods through the API server; the API-server watch
//! ([`super::k8s::ApiPodSource`]) is the default.

use std::path::PathBuf;

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::List;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::k8s::{PodInfo, PodSource, PodsByUid};

/// Shortest time between two lists.
pub const MIN_REFRESH_GAP: Duration = Duration::from_millis(200);
/// Largest `/pods` answer accepted (a node with 250 pods answers well under 8 MiB).
pub const MAX_BODY: usize = 32 * 1024 * 1024;
/// Deadline of one list.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the kubelet is and how to trust it.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// `host:port` of the kubelet's secure port (usually the node IP and 10250).
    pub address: String,
    /// The name the kubelet's serving certificate is for (the node name or IP).
    pub server_name: String,
    /// PEM bundle of the CA that signed the kubelet's serving certificate.
    pub ca_file: PathBuf,
    /// Bearer token file (the agent's service-account token; needs `nodes/proxy` get).
    pub token_file: PathBuf,
    /// Background refresh period.
    pub resync: Duration,
}

/// Why a list failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeletError {
    /// Reading the CA or token file, or connecting.
    #[error("{0}")]
    Io(String),
    /// TLS or HTTP failure.
    #[error("kubelet request failed: {0}")]
    Http(String),
    /// The kubelet answered with an error status.
    #[error("kubelet answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The start of its body.
        body: String,
    },
    /// The answer is not a PodList.
    #[error("kubelet /pods is not a PodList: {0}")]
    Decode(String),
}

#[derive(Debug)]
struct Shared {
    pods: PodsByUid,
    refresh: Notify,
}

/// Pods from the kubelet.
#[derive(Debug, Clone)]
pub struct KubeletPodSource {
    shared: Arc<Shared>,
}

impl KubeletPodSource {
    /// Starts listing; runs until `cancel`.
    pub fn start(config: KubeletConfig, cancel: CancellationToken) -> Self {
        let shared = Arc::new(Shared {
            pods: PodsByUid::default(),
            refresh: Notify::new(),
        });
        tokio::spawn(run(config, shared.clone(), cancel));
        Self { shared }
    }
}

async fn run(config: KubeletConfig, shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        match list(&config).await {
            Ok(pods) => {
                let n = shared
                    .pods
                    .replace_all(pods.into_iter().filter_map(PodInfo::from_pod));
                debug!(pods = n, "kubelet pods listed");
            }
            Err(e) => {
                warn!(kubelet = %config.address, error = %e, "listing pods from the kubelet failed")
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = shared.refresh.notified() => {}
            () = tokio::time::sleep(config.resync) => {}
        }
        tokio::time::sleep(MIN_REFRESH_GAP).await;
    }
}

/// One `GET /pods`.
pub async fn list(config: &KubeletConfig) -> Result<Vec<Pod>, KubeletError> {
    let ca = std::fs::read_to_string(&config.ca_file).map_err(|e| {
        KubeletError::Io(format!(
            "read the kubelet CA {}: {e}",
            config.ca_file.display()
        ))
    })?;
    let token = std::fs::read_to_string(&config.token_file).map_err(|e| {
        KubeletError::Io(format!(
            "read the token {}: {e}",
            config.token_file.display()
        ))
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for der in sigil_identity::x509::certs_from_pem(&ca)
        .map_err(|e| KubeletError::Io(format!("kubelet CA: {e}")))?
    {
        roots
            .add(der.into())
            .map_err(|e| KubeletError::Io(format!("kubelet CA: {e}")))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(sigil_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| KubeletError::Http(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name =
        rustls::pki_types::ServerName::try_from(config.server_name.clone()).map_err(|e| {
            KubeletError::Io(format!("kubelet server name {:?}: {e}", config.server_name))
        })?;
    let request = async {
        let tcp = tokio::net::TcpStream::connect(&config.address)
            .await
            .map_err(|e| {
                KubeletError::Io(format!("connect to the kubelet at {}: {e}", config.address))
            })?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| KubeletError::Http(format!("TLS with the kubelet: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| KubeletError::Http(e.to_string()))?;
        tokio::spawn(conn);
        let req = http::Request::get("/pods")
            .header(http::header::HOST, config.server_name.as_str())
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            )
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| KubeletError::Http(e.to_string()))?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| KubeletError::Http(e.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| KubeletError::Http(format!("reading /pods: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(KubeletError::Status {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            });
        }
        let list: List<Pod> =
            serde_json::from_slice(&body).map_err(|e| KubeletError::Decode(e.to_string()))?;
        Ok(list.items)
    };
    tokio::time::timeout(LIST_TIMEOUT, request)
        .await
        .map_err(|_| KubeletError::Http(format!("no answer within {LIST_TIMEOUT:?}")))?
}

impl PodSource for KubeletPodSource {
    fn pod_by_uid(&self, uid: &str) -> Option<Arc<PodInfo>> {
        self.shared.pods.get(uid)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.pods.subscribe()
    }

    fn is_synced(&self) -> bool {
        self.shared.pods.is_synced()
    }

    fn request_refresh(&self) {
        self.shared.refresh.notify_one();
    }
}
