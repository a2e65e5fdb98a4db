//! The SPIFFE Workload API (SPIFFE_Workload_API.md, SPIFFE_Workload_Endpoint.md) on a Unix
//! socket.
//!
//! - Every call must carry the `workload.spiffe.io: true` header (InvalidArgument
//!   otherwise), checked before anything else.
//! - The caller is identified by the kernel (SO_PEERCRED, PID pinned at accept) and
//!   attested ([`crate::attest`]); what it gets is what the cache holds for entries whose
//!   selectors it has. No identity: PermissionDenied.
//! - Streams send the full state at once, then again whenever it changes (rotation, new
//!   bundle, new or removed entry), and end on drain.
//! - Bundle maps are keyed by trust domain ID (`spiffe://td`); X.509 bundles are
//!   concatenated DER; JWT bundles are JWK Sets holding only JWT authorities.
//! - FetchWITSVID/FetchWITBundles answer Unimplemented.
//! - What one workload may cost is bounded ([`crate::limits`]): connections per workload
//!   and in total (over a cap a connection is closed at accept), JWT-SVID mints per
//!   workload (ResourceExhausted), and the HTTP/2 bytes a connection may make the agent
//!   hold ([`crate::h2_authority`]: frames no larger than the server allows, header blocks
//!   no larger than h2 accepts).
//!
//! This module never logs key material; keys leave the agent only to the workload that is
//! entitled to them, over its own connection.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use sigil_identity::BundleSet;
use sigil_identity::entry::Selector;
use sigil_identity::proto::workload as pb;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::attest::peer::{PeerError, PeerProcess};
use crate::attest::{AttestError, WorkloadAttestor};
use crate::cache::{Cache, WorkloadView};
use crate::limits::{Caps, MintBudget, Slot, WorkloadKey};
use crate::node_client::NodeClient;
use crate::serving::{JwtRefusal, ResponseStream, Served, x509_response, x509_update};
use crate::transport::{ApiMetrics, MAX_REQUEST, MAX_RESPONSE, PeerInfo, UNARY_TIMEOUT, incoming};

/// The header every Workload API call must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    inner: Arc<Inner>,
    /// What the Secret Discovery Service on the same socket calls its resources.
    pub(crate) sds: Arc<crate::sds::SdsConfig>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) served: Served,
    attestor: Arc<WorkloadAttestor>,
    pub(crate) metrics: ApiMetrics,
    streams: Arc<Caps>,
}

/// What an attested caller is.
pub(crate) struct Caller {
    pub(crate) selectors: BTreeSet<Selector>,
    pub(crate) peer: Arc<PeerProcess>,
    /// Whom its JWT-SVID mints are charged to.
    pub(crate) workload: WorkloadKey,
}

impl WorkloadApi {
    /// Builds the service over the agent's cache; JWT-SVIDs are minted through `node`,
    /// each charged to the calling workload in `mint_budget`.
    pub fn new(
        cache: Arc<Cache>,
        attestor: Arc<WorkloadAttestor>,
        node: Arc<NodeClient>,
        metrics: ApiMetrics,
        mint_budget: Arc<MintBudget>,
        streams: Arc<Caps>,
        shutdown: CancellationToken,
    ) -> Self {
        let served = Served {
            cache,
            node,
            shutdown,
            open_streams: metrics.open_streams.clone(),
            mint_budget,
        };
        Self {
            inner: Arc::new(Inner {
                served,
                attestor,
                metrics,
                streams,
            }),
            sds: Arc::default(),
        }
    }

    /// The resource names the Secret Discovery Service answers to ([`crate::sds`]).
    pub fn with_sds_config(mut self, names: crate::sds::SdsConfig) -> Self {
        self.sds = Arc::new(names);
        self
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// The tonic service with message bounds.
    pub fn into_server(self) -> pb::spiffe_workload_api_server::SpiffeWorkloadApiServer<Self> {
        pb::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(self)
            .max_decoding_message_size(MAX_REQUEST)
            .max_encoding_message_size(MAX_RESPONSE)
    }

    pub(crate) fn deny(
        &self,
        rpc: &str,
        reason: &str,
        status: Status,
        peer: Option<&PeerProcess>,
    ) -> Status {
        self.inner.metrics.refuse(rpc, reason, status, peer)
    }

    fn check_header<T>(&self, rpc: &str, req: &Request<T>) -> Result<(), Status> {
        require_security_header(&self.inner.metrics, rpc, req)
    }

    /// Header check, then attestation of the connected peer.
    async fn attest<T>(&self, rpc: &str, req: &Request<T>) -> Result<Caller, Status> {
        self.check_header(rpc, req)?;
        self.attest_peer(rpc, req).await
    }

    /// Attestation of the connected peer (without the security header check: Envoy's
    /// SDS calls do not carry it). The caller counts the call.
    pub(crate) async fn attest_peer<T>(
        &self,
        rpc: &str,
        req: &Request<T>,
    ) -> Result<Caller, Status> {
        let info = req.extensions().get::<PeerInfo>().cloned();
        let peer = match info.map(|i| i.0) {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                return Err(self.deny(
                    rpc,
                    "peer_unknown",
                    Status::permission_denied(format!("cannot identify the caller: {e}")),
                    None,
                ));
            }
            None => {
                return Err(self.deny(
                    rpc,
                    "peer_unknown",
                    Status::permission_denied(
                        "cannot identify the caller (not a Unix socket peer)",
                    ),
                    None,
                ));
            }
        };
        match self.inner.attestor.attest(&peer).await {
            Ok(a) => Ok(Caller {
                workload: a.pod.as_ref().map_or(WorkloadKey::Uid(peer.uid), |m| {
                    WorkloadKey::Pod(m.pod.uid.clone())
                }),
                selectors: a.selectors,
                peer,
            }),
            Err(e) => {
                let reason = e.metric_label();
                let status = match &e {
                    AttestError::Peer(PeerError::Recycled(_))
                    | AttestError::Peer(PeerError::Exited(_)) => {
                        Status::permission_denied(e.to_string())
                    }
                    _ => Status::permission_denied(format!("workload attestation failed: {e}")),
                };
                Err(self.deny(rpc, reason, status, Some(&peer)))
            }
        }
    }

    /// A place for one more stream of `caller`, or ResourceExhausted.
    pub(crate) fn stream_slot(&self, rpc: &str, caller: &Caller) -> Result<Slot, Status> {
        self.inner
            .streams
            .admit(caller.workload.clone())
            .map_err(|r| {
                self.deny(
                    rpc,
                    r.reason,
                    Status::resource_exhausted(format!(
                        "{}; close streams you no longer read",
                        r.detail
                    )),
                    Some(&caller.peer),
                )
            })
    }

    /// A bundle stream (FetchX509Bundles, FetchJWTBundles) for an attested caller that
    /// has an identity, held under the stream caps.
    async fn bundle_stream<Q, T: Send + 'static>(
        &self,
        rpc: &str,
        req: &Request<Q>,
        stream: impl FnOnce(&Served, &WorkloadView, BTreeSet<Selector>) -> ResponseStream<T>,
    ) -> Result<Response<ResponseStream<T>>, Status> {
        let caller = self.attest(rpc, req).await?;
        let view = self.inner.served.cache.view_for(&caller.selectors);
        if !view.has_identity() {
            return Err(self.no_identity(rpc, &caller));
        }
        let slot = self.stream_slot(rpc, &caller)?;
        Ok(Response::new(holding(
            slot,
            stream(&self.inner.served, &view, caller.selectors),
        )))
    }

    /// The refusal of a caller served no X509-SVID: its SVIDs expired unrenewed
    /// (Unavailable), or it has no identity (PermissionDenied).
    pub(crate) fn no_valid_svid(&self, rpc: &str, caller: &Caller, view: &WorkloadView) -> Status {
        let (reason, status) = crate::serving::no_valid_svid(view);
        self.deny(rpc, reason, status, Some(&caller.peer))
    }

    pub(crate) fn no_identity(&self, rpc: &str, caller: &Caller) -> Status {
        self.deny(
            rpc,
            "no_identity",
            Status::permission_denied("no identity issued"),
            Some(&caller.peer),
        )
    }
}

/// Counts the call, then requires `workload.spiffe.io: true` (exactly; the value is case
/// sensitive): InvalidArgument otherwise, logged and counted.
fn require_security_header<T>(
    metrics: &ApiMetrics,
    rpc: &str,
    req: &Request<T>,
) -> Result<(), Status> {
    metrics.call(rpc);
    let value = req.metadata().get(SECURITY_HEADER).map(|v| v.to_str());
    let (reason, message) = match value {
        Some(Ok("true")) => return Ok(()),
        None => (
            "missing_security_header",
            format!("security header missing from request: send `{SECURITY_HEADER}: true`"),
        ),
        Some(Ok(other)) => (
            "bad_security_header",
            format!("security header {SECURITY_HEADER} is {other:?}; it must be exactly \"true\""),
        ),
        Some(Err(_)) => (
            "bad_security_header",
            format!("security header {SECURITY_HEADER} is not text; it must be exactly \"true\""),
        ),
    };
    Err(metrics.refuse(rpc, reason, Status::invalid_argument(message), None))
}

/// `stream`, holding `slot` (its place under the stream caps) for as long as it lives.
pub(crate) fn holding<T: Send + 'static>(
    slot: Slot,
    stream: ResponseStream<T>,
) -> ResponseStream<T> {
    use futures::StreamExt;
    Box::pin(stream.map(move |item| {
        let _held = &slot;
        item
    }))
}

fn json_to_prost(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_to_prost).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o.into_iter().map(|(k, v)| (k, json_to_prost(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[tonic::async_trait]
impl pb::spiffe_workload_api_server::SpiffeWorkloadApi for WorkloadApi {
    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<ResponseStream<pb::X509svidResponse>>, Status> {
        const RPC: &str = "FetchX509SVID";
        let caller = self.attest(RPC, &req).await?;
        let slot = self.stream_slot(RPC, &caller)?;
        let view = self.inner.served.ready_view(&caller.selectors).await;
        if view.svids.is_empty() {
            return Err(self.no_valid_svid(RPC, &caller, &view));
        }
        debug!(
            pid = caller.peer.pid,
            svids = view.svids.len(),
            "serving X509-SVIDs"
        );
        let selectors = caller.selectors;
        Ok(Response::new(holding(
            slot,
            self.inner.served.watch(x509_response(&view), move |cache| {
                x509_update(&cache.view_for(&selectors)).map(|v| v.map(x509_response))
            }),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<ResponseStream<pb::X509BundlesResponse>>, Status> {
        self.bundle_stream("FetchX509Bundles", &req, Served::x509_bundles_stream)
            .await
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        const RPC: &str = "FetchJWTSVID";
        let caller = self.attest(RPC, &req).await?;
        let r = req.into_inner();
        let svids = match self
            .inner
            .served
            .jwt_svids(
                &caller.workload,
                &caller.selectors,
                &r.audience,
                &r.spiffe_id,
            )
            .await
        {
            Ok(s) => s,
            Err(JwtRefusal::NoAudience) => {
                return Err(self.deny(
                    RPC,
                    "no_audience",
                    Status::invalid_argument("audience must be specified"),
                    Some(&caller.peer),
                ));
            }
            Err(JwtRefusal::NoIdentity) => return Err(self.no_identity(RPC, &caller)),
            Err(JwtRefusal::BadId(e)) => {
                return Err(self.deny(
                    RPC,
                    "bad_spiffe_id",
                    Status::invalid_argument(format!("spiffe_id: {e}")),
                    Some(&caller.peer),
                ));
            }
            Err(JwtRefusal::NotEntitled(id)) => {
                return Err(self.deny(
                    RPC,
                    "spiffe_id_not_entitled",
                    Status::permission_denied(format!("the caller is not entitled to {id}")),
                    Some(&caller.peer),
                ));
            }
            Err(JwtRefusal::OverBudget(why)) => {
                return Err(self.deny(
                    RPC,
                    "workload_rate_limited",
                    Status::resource_exhausted(why),
                    Some(&caller.peer),
                ));
            }
            Err(JwtRefusal::Mint(status)) => return Err(status),
        };
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<ResponseStream<pb::JwtBundlesResponse>>, Status> {
        self.bundle_stream("FetchJWTBundles", &req, Served::jwt_bundles_stream)
            .await
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        const RPC: &str = "ValidateJWTSVID";
        let caller = self.attest(RPC, &req).await?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(self.deny(
                RPC,
                "no_audience",
                Status::invalid_argument("audience must be specified"),
                Some(&caller.peer),
            ));
        }
        if r.svid.is_empty() {
            return Err(self.deny(
                RPC,
                "no_svid",
                Status::invalid_argument("svid must be specified"),
                Some(&caller.peer),
            ));
        }
        // Validated against every trust domain the agent knows (own and federated), as a
        // relying party would.
        let bundles: BundleSet = self.inner.served.cache.bundles();
        let v = sigil_identity::jwt::validate_jwt_svid(
            &r.svid,
            &bundles,
            &r.audience,
            SystemTime::now(),
        )
        .map_err(|e| {
            self.deny(
                RPC,
                "invalid_jwt",
                Status::invalid_argument(format!("invalid JWT-SVID: {e}")),
                Some(&caller.peer),
            )
        })?;
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(prost_types::Struct {
                fields: v
                    .claims
                    .into_iter()
                    .map(|(k, v)| (k, json_to_prost(v)))
                    .collect(),
            }),
        }))
    }

    async fn fetch_witsvid(
        &self,
        req: Request<pb::WitsvidRequest>,
    ) -> Result<Response<ResponseStream<pb::WitsvidResponse>>, Status> {
        self.check_header("FetchWITSVID", &req)?;
        Err(Status::unimplemented(
            "WIT-SVIDs are not supported by this agent",
        ))
    }

    async fn fetch_wit_bundles(
        &self,
        req: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<ResponseStream<pb::WitBundlesResponse>>, Status> {
        self.check_header("FetchWITBundles", &req)?;
        Err(Status::unimplemented(
            "WIT-SVIDs are not supported by this agent",
        ))
    }
}

/// Most concurrent streams on one connection (SPIFFE clients use one to three; a client
/// that opens more waits for one to end).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// Serves the Workload API (and gRPC reflection) on `listener` until `cancel`, with
/// connections held to `caps`.
pub async fn serve(
    listener: UnixListener,
    api: WorkloadApi,
    proc_root: std::path::PathBuf,
    caps: Arc<Caps>,
    cancel: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    // Every SPIFFE service on the endpoint requires the security header
    // (SPIFFE_Workload_Endpoint.md 3), reflection included. Envoy's Secret Discovery
    // Service is the one exception: Envoy sends no such header (SPIRE exempts SDS too); its
    // callers are attested exactly as the Workload API's are.
    let metrics = api.inner.metrics.clone();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sigil_identity::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .ok()
        .map(|r| {
            tonic::service::interceptor::InterceptedService::new(r, move |req: Request<()>| {
                require_security_header(&metrics, "ServerReflectionInfo", &req)?;
                Ok(req)
            })
        });
    let incoming = incoming(listener, proc_root, caps, cancel.clone());
    let mut server = tonic::transport::Server::builder()
        .timeout(UNARY_TIMEOUT)
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // What the HPACK shim relies on: frames of at most 16 KiB, header lists h2 bounds.
        .max_frame_size(crate::h2_authority::MAX_FRAME as u32)
        .http2_max_header_list_size(crate::h2_authority::MAX_DECODED as u32)
        // What a client may send that the server has not read yet (the HPACK shim counts
        // the rest).
        .initial_connection_window_size(crate::h2_authority::CONNECTION_WINDOW)
        .initial_stream_window_size(crate::h2_authority::CONNECTION_WINDOW)
        .add_service(crate::sds::server(api.clone()))
        .add_service(api.into_server());
    if let Some(r) = reflection {
        server = server.add_service(r);
    }
    server
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use tokio::net::UnixStream;

    use super::*;
    use crate::transport::{DenialLabels, bind_public as bind};
    use sigil_identity::TrustDomain;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    /// SPIFFE_Workload_Endpoint.md 3: every request to the endpoint MUST carry
    /// `workload.spiffe.io: true` (case sensitive), else InvalidArgument. That holds for
    /// every service on the socket, gRPC reflection included, and for a wrong value.
    ///
    /// Before the fix: reflection answered a ListServices without the header (the test
    /// failed at "reflection without the header").
    #[tokio::test]
    async fn every_service_on_the_socket_requires_the_security_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = bind(&path).unwrap();
        let td: TrustDomain = "example.org".parse().unwrap();
        let node = NodeClient::unreachable(&td);
        let metrics = ApiMetrics::default();
        let cancel = CancellationToken::new();
        let api = WorkloadApi::new(
            Cache::new(),
            Arc::new(WorkloadAttestor::new(
                "/proc".into(),
                "/etc".into(),
                None,
                Duration::from_secs(1),
            )),
            Arc::new(node),
            metrics.clone(),
            Arc::new(MintBudget::new(10.0, 10.0)),
            Caps::streams(100, 100, metrics.clone()),
            cancel.clone(),
        );
        let caps = Caps::connections(100, 100, metrics.clone());
        let server = tokio::spawn(serve(listener, api, "/proc".into(), caps, cancel.clone()));
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap();

        let list = || tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let reflect = |value: Option<&'static str>| {
            let channel = channel.clone();
            async move {
                let mut req = Request::new(tokio_stream::iter(vec![list()]));
                if let Some(v) = value {
                    req.metadata_mut()
                        .insert(SECURITY_HEADER, v.parse().unwrap());
                }
                let mut answers = ServerReflectionClient::new(channel)
                    .server_reflection_info(req)
                    .await?
                    .into_inner();
                answers.message().await.map(|m| m.is_some())
            }
        };
        let fetch = |value: Option<&'static str>| {
            let channel = channel.clone();
            async move {
                let mut req = Request::new(pb::X509BundlesRequest {});
                if let Some(v) = value {
                    req.metadata_mut()
                        .insert(SECURITY_HEADER, v.parse().unwrap());
                }
                pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel)
                    .fetch_x509_bundles(req)
                    .await
                    .map(|_| ())
            }
        };

        for (value, reason) in [
            (None, "missing_security_header"),
            (Some("TRUE"), "bad_security_header"),
            (Some("yes"), "bad_security_header"),
        ] {
            let status = reflect(value).await.err().unwrap_or_else(|| {
                panic!("reflection without the header (value {value:?}) answered")
            });
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains(SECURITY_HEADER), "{status:?}");
            let status = fetch(value).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            for rpc in ["ServerReflectionInfo", "FetchX509Bundles"] {
                let counted = metrics
                    .denials
                    .get_or_create(&DenialLabels {
                        rpc: rpc.into(),
                        reason: reason.into(),
                    })
                    .get();
                assert!(counted >= 1, "{rpc} {reason} not counted");
            }
        }
        // With the header, reflection answers, and the Workload API attests the caller
        // (this test process has no identity: PermissionDenied, not InvalidArgument).
        assert!(reflect(Some("true")).await.unwrap());
        let status = fetch(Some("true")).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        cancel.cancel();
        let _ = server.await;
    }
}
