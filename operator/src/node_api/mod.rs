//! The Node API: what agents ask of the operator (node attestation, agent SVID renewal,
//! the entry stream for their node, CSR signing, JWT-SVID minting), served by every replica
//! over TLS with SPIFFE authentication.
//!
//! Trust rules enforced here:
//! - AttestNode is the only RPC a caller without a client certificate may use;
//! - every other RPC requires the agent's X509-SVID, and the node it names is the only
//!   node whose entries the caller may see or sign for;
//! - a CSR is signed only if its SPIFFE ID is that of an entry authorised for the caller's
//!   node; the SVID's TTL and DNS names come from the entry, never from the CSR;
//! - the agent stays bound to what attestation proved (its Node's UID, or its TPM's
//!   enrolment on a Node) and to its Node not being banned: checked on every call and
//!   every second on open streams; renewal proves it again (module [`revocation`]);
//! - every denial is a precise gRPC status with a reason, logged and counted;
//! - what one caller may cost is bounded ([`limits`]): per-RPC budgets per node charged
//!   after validation, connection caps ([`crate::tls_listener`]), request bytes in transit
//!   per address and in total, and for callers without a client certificate a small
//!   message bound before decoding ([`request_bounds`]) and a rate limit before TokenReview.
//!
//! Where each part lives: the RPC handlers in [`service`]; the per-call authorization of
//! an agent in `authorize.rs`; PSAT attestation in [`psat`]; the TPM exchange in
//! `attest_tpm.rs` over the Kubernetes-free checks of [`tpm`]; protobuf conversions in
//! `convert.rs`.

mod attest_tpm;
mod authorize;
mod convert;
pub mod limits;
pub mod metrics;
pub mod psat;
pub mod request_bounds;
pub mod revocation;
pub mod service;
pub mod tpm;

pub use service::{NodeApi, NodeApiConfig};

use std::sync::Arc;
use std::time::Duration;

use sigil_identity::TrustDomain;
use sigil_identity::clock::SharedClock;
use sigil_identity::tls::{Authorizer, SpiffeClientVerifier, SwappableCert};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::authority::Authorities;
use crate::telemetry::ReadyHandle;

/// Longest a unary RPC may run.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Most concurrent RPCs (streams included) on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// HTTP/2 receive window of one stream: what a caller may send before the operator reads
/// it (requests are far smaller than responses; this only paces uploads).
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// HTTP/2 receive window of one connection.
pub const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// Serves `api` on `listener` over TLS until `cancel`: the operator's serving SVID
/// (kept fresh by [`crate::serving::keep_serving_svid`]), optional client certificates that must
/// be agent SVIDs of `agent_trust_domain`, bounded handshakes, RPC deadlines and
/// per-connection stream limits.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    api: NodeApi,
    authorities: Arc<Authorities>,
    agent_trust_domain: TrustDomain,
    serving_ttl: Duration,
    clock: SharedClock,
    ready: Option<ReadyHandle>,
    cancel: CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let cert = SwappableCert::new();
    // Agent SVIDs only: the agent path and the component policy no workload SVID has.
    let authorizer = Authorizer::Component {
        trust_domain: agent_trust_domain.clone(),
        path: "/sigil/agent/".into(),
    };
    // Optional at the TLS layer: AttestNode is how an agent without a (valid) SVID gets one.
    let verifier = SpiffeClientVerifier::new(authorities.clone(), authorizer, true);
    let config = Arc::new(sigil_identity::tls::server_config(cert.clone(), verifier)?);
    tracing::info!(addr = ?listener.local_addr().ok(), trust_domain = %agent_trust_domain, "Node API listening");
    let renew = tokio::spawn(crate::serving::keep_serving_svid(
        "node-api",
        authorities,
        agent_trust_domain,
        crate::serving::OPERATOR_PATH,
        serving_ttl,
        cert,
        clock,
        ready,
        cancel.clone(),
    ));
    let limits = api.limits().clone();
    let metrics = api.metrics().clone();
    let incoming = crate::tls_listener::incoming_capped(
        "node-api",
        listener,
        config,
        crate::tls_listener::ConnectionLimits {
            max_connections: limits.max_connections,
            max_per_address: limits.max_connections_per_address,
            max_unauthenticated: limits.max_unauthenticated_connections,
        },
        metrics.connections.clone(),
        cancel.clone(),
    );
    let result = tonic::transport::Server::builder()
        .timeout(RPC_TIMEOUT)
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .layer(request_bounds::RequestBoundsLayer::new(
            request_bounds::RequestBounds {
                max_bytes_per_address: limits.max_request_bytes_per_address,
                max_bytes: limits.max_request_bytes,
                max_unauthenticated_message: limits.max_unauthenticated_message,
                max_unauthenticated_requests: limits.max_unauthenticated_requests,
            },
            metrics,
        ))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(api.into_server())
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await;
    renew.abort();
    result.map_err(Into::into)
}
