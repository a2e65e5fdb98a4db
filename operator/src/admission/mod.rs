//! The Pod admission webhook: warnings only (docs/admission.md).
//!
//! Creating a Pod that mounts a Sigil volume but that no ClusterSPIFFEID selects returns a
//! warning to `kubectl`, naming the nearest ClusterSPIFFEID and why it does not match
//! ([`review`]). A ValidatingAdmissionPolicy cannot say this: it sees one parameter object
//! at a time, and "none of them selects the pod" needs all of them and the namespace's
//! labels, which the operator's identity index already holds.
//!
//! - **Never blocks.** Every answer is `allowed: true`; the chart registers the webhook
//!   with `failurePolicy: Ignore`, a 2 s timeout, and a `matchConditions` expression so the
//!   API server calls it only for Pods with a `csi.sigil.dev` volume. A slow or absent
//!   operator costs a missing warning, never a pod.
//! - **Its certificate** ([`tls`]): a CA and serving certificate the first replica makes
//!   and keeps in a Secret every replica reads; each replica keeps the
//!   ValidatingWebhookConfiguration's `caBundle` equal to that CA (no cert-manager needed).
//! - **Bounds:** TLS handshake deadline and connection caps ([`crate::tls_listener`]), a
//!   header-read timeout, bodies over [`MAX_BODY`] refused with 413, a lifetime per
//!   connection; answers counted by outcome in `sigil_admission_reviews_total`.

pub mod review;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::index::EntryIndex;

/// The path the webhook configuration calls.
pub const PATH: &str = "/validate/pods";
/// Largest AdmissionReview read (a Pod is at most about 1.5 MiB in etcd).
pub const MAX_BODY: usize = 3 * 1024 * 1024;
/// Longest a client may take to send its headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a failed certificate load is tried again.
const LOAD_RETRY: Duration = Duration::from_secs(30);
/// Longest a connection stays open (the API server reconnects).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// Flags of the admission webhook.
#[derive(Debug, Clone, clap::Args)]
pub struct AdmissionArgs {
    /// Serve the Pod admission webhook (warnings only, docs/admission.md) on this address,
    /// e.g. 0.0.0.0:9443. Unset: no webhook.
    #[arg(long, env = "SIGIL_ADMISSION_ADDR")]
    pub admission_addr: Option<SocketAddr>,

    /// Secret, in the operator's namespace, holding the webhook's CA and serving
    /// certificate; the first replica creates it.
    #[arg(
        long,
        env = "SIGIL_ADMISSION_SECRET",
        default_value = "sigil-admission-tls"
    )]
    pub admission_secret: String,

    /// Names in the serving certificate (comma-separated): the Service's DNS names the
    /// webhook configuration calls, or IP addresses.
    #[arg(long, env = "SIGIL_ADMISSION_DNS_NAMES", value_delimiter = ',')]
    pub admission_dns_names: Vec<String>,

    /// ValidatingWebhookConfiguration whose webhooks' `caBundle` every replica keeps equal
    /// to the Secret's CA.
    #[arg(
        long,
        env = "SIGIL_ADMISSION_WEBHOOK_CONFIGURATION",
        default_value = "sigil-admission"
    )]
    pub admission_webhook_configuration: String,
}

/// Labels of `sigil_admission_reviews_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    /// `warned`, `selected`, `not_concerned`, `unknown`, `unreadable`, or `refused` (an
    /// HTTP request that was no review: wrong path or method, body too large).
    pub outcome: String,
}

/// The webhook's metrics.
#[derive(Debug, Clone, Default)]
pub struct AdmissionMetrics {
    /// Reviews answered, by outcome.
    pub reviews: Family<ReviewLabels, Counter>,
}

impl AdmissionMetrics {
    /// Registers under `sigil_admission_`.
    pub fn register(&self, registry: &mut Registry) {
        registry
            .sub_registry_with_prefix("sigil_admission")
            .register(
                "reviews",
                "Pod admission reviews answered, by outcome (warned: admitted with a warning)",
                self.reviews.clone(),
            );
    }

    fn count(&self, outcome: &str) {
        self.reviews
            .get_or_create(&ReviewLabels {
                outcome: outcome.into(),
            })
            .inc();
    }
}

/// Everything the webhook needs.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// The operator's identity index (which ClusterSPIFFEIDs select what).
    pub index: EntryIndex,
    /// Its metrics.
    pub metrics: AdmissionMetrics,
}

/// Runs the webhook until `cancel`: loads (or makes) its certificate, keeps the
/// webhook configuration's `caBundle` current, and serves on `listener`.
pub async fn run(
    client: kube::Client,
    namespace: String,
    args: AdmissionArgs,
    listener: TcpListener,
    webhook: Webhook,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.admission_dns_names.is_empty(),
        "--admission-addr is set but --admission-dns-names is empty: give the names the webhook configuration calls (the Service's DNS name, e.g. sigil-operator.sigil.svc)"
    );
    let cert = sigil_identity::tls::SwappableCert::new();
    let keeper = tls::Keeper {
        client,
        namespace,
        secret: args.admission_secret,
        names: args.admission_dns_names,
        webhook_configuration: args.admission_webhook_configuration,
    };
    // A webhook that only warns must never take the operator down: until its certificate
    // and caBundle are in place it logs why and tries again.
    while let Err(e) = keeper.load(&cert).await {
        error!(error = %format!("{e:#}"), retry_in = ?LOAD_RETRY, "admission webhook not serving");
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(LOAD_RETRY) => {}
        }
    }
    let keeping = tokio::spawn(keeper.keep(cert.clone(), cancel.clone()));
    let mut config = rustls::ServerConfig::builder_with_provider(sigil_identity::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    info!(addr = ?listener.local_addr().ok(), path = PATH, "admission webhook listening");
    let webhook = Arc::new(webhook);
    let mut incoming =
        crate::tls_listener::incoming("admission", listener, Arc::new(config), cancel.clone());
    while let Some(conn) = tokio::select! {
        () = cancel.cancelled() => None,
        c = incoming.next() => c,
    } {
        match conn {
            Ok(stream) => {
                let webhook = webhook.clone();
                tokio::spawn(async move {
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    builder
                        .http1()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT);
                    builder
                        .http2()
                        .timer(TokioTimer::new())
                        .max_concurrent_streams(64);
                    let svc = service_fn(move |req| {
                        let webhook = webhook.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&webhook, req).await) }
                    });
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
                });
            }
            Err(e) => warn!(error = %e, "admission webhook connection failed"),
        }
    }
    keeping.abort();
    Ok(())
}

async fn handle(webhook: &Webhook, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let refuse = |code: StatusCode, why: String| {
        webhook.metrics.count("refused");
        info!(status = code.as_u16(), reason = %why, "admission webhook refused a request");
        Response::builder()
            .status(code)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(why + "\n")))
            .unwrap_or_default()
    };
    if req.uri().path() != PATH {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("not found: the webhook serves POST {PATH}"),
        );
    }
    if req.method() != Method::POST {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{PATH} takes POST with an AdmissionReview"),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the AdmissionReview could not be read within {MAX_BODY} bytes: {e}"),
            );
        }
    };
    let (answer, outcome) = review::review(&webhook.index, &body);
    webhook.metrics.count(outcome.label());
    let json = serde_json::to_vec(&answer).unwrap_or_default();
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(json)))
        .unwrap_or_default()
}
