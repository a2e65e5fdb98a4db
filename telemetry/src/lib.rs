//! Logs, metrics, health endpoints and the start-up shared by sigil-operator, sigil-agent
//! and sigil-csi.
//!
//! - [`process`]: how a binary starts and stops (logging, runtime, signals, Go-duration
//!   flags, the Kubernetes client).
//! - [`init_logging`]: JSON (or text) logs through `tracing`, filtered by `RUST_LOG`.
//! - [`Readiness`]: named components that must each report ready (their watches have
//!   synced, their first credential is in place) before `/ready` answers 200;
//!   [`Readiness::drain`] turns it 503 again on shutdown so load balancers stop sending
//!   traffic.
//! - [`serve`]: the health server: `/live`, `/ready`, `/metrics` (a `prometheus_client`
//!   registry every component registers into).
//! - [`shutdown_on_signals`]: the first SIGTERM/SIGINT starts a graceful drain, the second
//!   exits at once.
//!
//! This crate never sees key material.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub mod process;

/// Log output format (`--log-format`, `SIGIL_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (the default, for log pipelines).
    #[default]
    Json,
    /// Human-readable text (for local runs).
    Text,
}

/// Installs the global `tracing` subscriber: `format` output, filtered by `RUST_LOG`
/// (default `info`). Fails if a subscriber is already installed.
pub fn init_logging(format: LogFormat) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    }
}

#[derive(Debug, Default)]
struct ReadinessInner {
    components: Mutex<BTreeMap<String, bool>>,
    draining: AtomicBool,
}

/// The readiness of a replica: every registered component must be ready, and the replica
/// must not be draining. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<ReadinessInner>);

/// One component's readiness switch.
#[derive(Debug, Clone)]
pub struct ReadyHandle {
    readiness: Readiness,
    name: String,
}

impl ReadyHandle {
    /// Marks the component ready (its caches have synced).
    pub fn set_ready(&self) {
        self.readiness.set(&self.name, true);
    }

    /// Marks it not ready again (e.g. its watch was lost).
    pub fn set_not_ready(&self) {
        self.readiness.set(&self.name, false);
    }
}

impl Readiness {
    /// Nothing registered yet: ready unless draining.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a component that starts not ready.
    pub fn component(&self, name: &str) -> ReadyHandle {
        self.set(name, false);
        ReadyHandle {
            readiness: self.clone(),
            name: name.to_owned(),
        }
    }

    fn set(&self, name: &str, ready: bool) {
        self.0
            .components
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), ready);
    }

    /// Components not ready yet.
    pub fn pending(&self) -> Vec<String> {
        let map = self.0.components.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|(_, r)| !**r)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether `/ready` answers 200.
    pub fn is_ready(&self) -> bool {
        !self.0.draining.load(Ordering::Relaxed) && self.pending().is_empty()
    }

    /// Starts draining: `/ready` answers 503 from now on.
    pub fn drain(&self) {
        self.0.draining.store(true, Ordering::Relaxed);
    }
}

/// Serves `/live`, `/ready` and `/metrics` on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    readiness: Readiness,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    info!(addr = ?listener.local_addr().ok(), "health server listening");
    loop {
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "health server accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let readiness = readiness.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let registry = registry.clone();
                let readiness = readiness.clone();
                async move { Ok::<_, Infallible>(respond(&req, &registry, &readiness)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(%peer, error = %e, "health connection ended") },
                () = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

fn respond(
    req: &Request<Incoming>,
    registry: &Registry,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/live" | "/livez" => text(StatusCode::OK, "ok\n".into()),
        "/ready" | "/readyz" => {
            if readiness.is_ready() {
                text(StatusCode::OK, "ok\n".into())
            } else if readiness.0.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("waiting for: {}\n", readiness.pending().join(", ")),
                )
            }
        }
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode metrics: {e}\n"),
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /live, /ready or /metrics\n".into(),
        ),
    }
}

/// Waits for SIGTERM or SIGINT, then marks the replica draining, cancels `cancel` and
/// returns; from then on a second signal exits the process at once (status 130).
pub async fn shutdown_on_signals(
    cancel: CancellationToken,
    readiness: Readiness,
) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
        () = cancel.cancelled() => return Ok(()),
    }
    info!("shutdown signal received; draining (send it again to exit at once)");
    readiness.drain();
    cancel.cancel();
    // Detached, so the caller's join can finish once the drain is done.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        warn!("second shutdown signal; exiting without draining");
        std::process::exit(130);
    });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, out)
    }

    #[tokio::test]
    async fn ready_only_after_every_component_synced_and_not_while_draining() {
        let mut registry = Registry::default();
        let gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        registry.sub_registry_with_prefix("sigil").register(
            "bundle_sequence",
            "test gauge",
            gauge.clone(),
        );
        gauge.set(7);
        let readiness = Readiness::new();
        let caches = readiness.component("trust-domain-caches");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(registry),
            readiness.clone(),
            cancel.clone(),
        ));

        assert_eq!(get(addr, "/live").await.0, 200);
        let (status, body) = get(addr, "/ready").await;
        assert_eq!(status, 503);
        assert!(body.contains("trust-domain-caches"));
        caches.set_ready();
        assert_eq!(get(addr, "/ready").await.0, 200);
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("sigil_bundle_sequence 7"), "{body}");
        readiness.drain();
        assert_eq!(get(addr, "/ready").await.0, 503);
        assert_eq!(get(addr, "/nope").await.0, 404);
        cancel.cancel();
        server.await.unwrap().unwrap();
    }
}
