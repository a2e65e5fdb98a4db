//! The SPIFFE Broker API (SPIFFE_Broker_API.md, Incubating) on a private Unix socket: a
//! trusted broker (sigil-csi) fetches SVIDs and bundles on behalf of a workload it names.
//!
//! Who may call: only the configured broker, by the kernel's word — the peer's UID must be
//! the configured one and, when configured, its executable the configured path. Anyone
//! else gets PermissionDenied before a reference is even read. The socket's directory is
//! also private (0700).
//!
//! Which workload: a `KubernetesObjectReference` to a pod (`pods`, core group) with its
//! UID, proven by the pod-bound service-account token the kubelet gave the broker (gRPC
//! metadata `authorization: Bearer <token>`): the agent TokenReviews it with the
//! configured audience and requires the review to confirm that audience (an
//! audience-unaware authenticator answers with the API server's own audiences, or none,
//! for a token never meant for sigil-csi); then that it is bound to exactly that pod,
//! that the pod is on this node, and that the reference's namespace and name match. The pod's
//! selectors are its `k8s:` pod selectors (no container ones). A `WorkloadPIDReference`
//! names a local process, attested from the kernel as on the Workload API.
//!
//! What it gets: the same SVIDs and bundles as on the Workload API ([`crate::serving`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};
use prost::Message;
use sigil_identity::entry::Selector;
use sigil_identity::proto::broker as pb;
use sigil_identity::proto::workload as wl;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::attest::WorkloadAttestor;
use crate::attest::k8s::{PodSource, find_pod, pod_selectors};
use crate::attest::peer::PeerProcess;
use crate::limits::{Caps, WorkloadKey};
use crate::serving::{JwtRefusal, ResponseStream, Served, x509_response, x509_update};
use crate::transport::{ApiMetrics, MAX_RESPONSE, PeerInfo, UNARY_TIMEOUT, incoming};

/// Type URLs of the references the agent understands.
pub const K8S_REFERENCE: &str = "type.googleapis.com/spiffe.broker.KubernetesObjectReference";
/// See [`K8S_REFERENCE`].
pub const PID_REFERENCE: &str = "type.googleapis.com/spiffe.broker.WorkloadPIDReference";
/// Largest request accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Who the broker is.
#[derive(Debug, Clone)]
pub struct BrokerPolicy {
    /// The broker's UID.
    pub uid: u32,
    /// The broker's executable, when it must also match.
    pub exe: Option<PathBuf>,
    /// Audience of the pod tokens the broker presents.
    pub token_audience: String,
    /// This node's name: pods elsewhere are refused.
    pub node_name: String,
    /// How long to wait for a new pod to show up in the pod source.
    pub pod_timeout: Duration,
}

/// The Broker API service.
#[derive(Debug, Clone)]
pub struct BrokerApi {
    inner: Arc<Inner>,
}

struct Inner {
    served: Served,
    policy: BrokerPolicy,
    client: Client,
    pods: Arc<dyn PodSource>,
    attestor: Arc<WorkloadAttestor>,
    metrics: ApiMetrics,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerApi")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl BrokerApi {
    /// Builds the service.
    pub fn new(
        served: Served,
        policy: BrokerPolicy,
        client: Client,
        pods: Arc<dyn PodSource>,
        attestor: Arc<WorkloadAttestor>,
        metrics: ApiMetrics,
    ) -> Self {
        let mut served = served;
        served.open_streams = metrics.open_streams.clone();
        Self {
            inner: Arc::new(Inner {
                served,
                policy,
                client,
                pods,
                attestor,
                metrics,
            }),
        }
    }

    /// The tonic service with message bounds.
    pub fn into_server(self) -> pb::api_server::ApiServer<Self> {
        pb::api_server::ApiServer::new(self)
            .max_decoding_message_size(MAX_REQUEST)
            .max_encoding_message_size(MAX_RESPONSE)
    }

    fn deny(&self, rpc: &str, reason: &str, status: Status) -> Status {
        let status = self.inner.metrics.refuse(rpc, reason, status, None);
        match spec_reason(reason) {
            Some(r) => with_error_info(status, r),
            None => status,
        }
    }

    /// The broker check, then the referenced workload's selectors.
    async fn workload<T>(
        &self,
        rpc: &str,
        req: &Request<T>,
        reference: Option<&pb::WorkloadReference>,
    ) -> Result<BTreeSet<Selector>, Status> {
        self.referenced(rpc, req, reference).await.map(|(s, _)| s)
    }

    /// The broker check, then the referenced workload's selectors and, for a PID
    /// reference, the process pinned (its streams end when it exits).
    async fn referenced<T>(
        &self,
        rpc: &str,
        req: &Request<T>,
        reference: Option<&pb::WorkloadReference>,
    ) -> Result<(BTreeSet<Selector>, Option<Arc<PeerProcess>>), Status> {
        self.inner.metrics.call(rpc);
        let peer = match req.extensions().get::<PeerInfo>().map(|i| i.0.clone()) {
            Some(Ok(p)) => p,
            _ => {
                return Err(self.deny(
                    rpc,
                    "peer_unknown",
                    Status::permission_denied("cannot identify the caller"),
                ));
            }
        };
        self.check_broker(rpc, &peer)?;
        let any = reference
            .and_then(|r| r.reference.as_ref())
            .ok_or_else(|| {
                self.deny(
                    rpc,
                    "no_reference",
                    Status::invalid_argument("reference is required"),
                )
            })?;
        match any.type_url.as_str() {
            K8S_REFERENCE => {
                let r =
                    pb::KubernetesObjectReference::decode(any.value.as_slice()).map_err(|e| {
                        self.deny(
                            rpc,
                            "bad_reference",
                            Status::invalid_argument(format!("reference: {e}")),
                        )
                    })?;
                Ok((self.pod_workload(rpc, req, &r).await?, None))
            }
            PID_REFERENCE => {
                let r = pb::WorkloadPidReference::decode(any.value.as_slice()).map_err(|e| {
                    self.deny(
                        rpc,
                        "bad_reference",
                        Status::invalid_argument(format!("reference: {e}")),
                    )
                })?;
                if r.pid <= 0 {
                    // SPIFFE_Broker_API.md 3.1.3/4.8: a PID MUST be a positive integer;
                    // a malformed reference is InvalidArgument.
                    return Err(self.deny(
                        rpc,
                        "bad_reference",
                        Status::invalid_argument(format!(
                            "pid {} is not a positive integer",
                            r.pid
                        )),
                    ));
                }
                let (uid, gid) =
                    proc_ids(self.inner.attestor.proc_root(), r.pid).ok_or_else(|| {
                        self.deny(
                            rpc,
                            "pid_not_found",
                            Status::not_found(format!("no process {}", r.pid)),
                        )
                    })?;
                let target = PeerProcess::pin(r.pid, uid, gid, self.inner.attestor.proc_root())
                    .map_err(|e| {
                        self.deny(rpc, "pid_not_found", Status::not_found(e.to_string()))
                    })?;
                let attested = self.inner.attestor.attest(&target).await.map_err(|e| {
                    self.deny(
                        rpc,
                        e.metric_label(),
                        Status::permission_denied(format!("attesting pid {}: {e}", r.pid)),
                    )
                })?;
                Ok((attested.selectors, Some(Arc::new(target))))
            }
            other => Err(self.deny(
                rpc,
                "unsupported_reference",
                Status::invalid_argument(format!(
                    "unsupported reference type {other:?}; use {K8S_REFERENCE} or {PID_REFERENCE}"
                )),
            )),
        }
    }

    fn check_broker(&self, rpc: &str, peer: &PeerProcess) -> Result<(), Status> {
        let policy = &self.inner.policy;
        if peer.uid != policy.uid {
            return Err(self.deny(
                rpc,
                "not_the_broker",
                Status::permission_denied(format!(
                    "uid {} is not the configured broker (uid {})",
                    peer.uid, policy.uid
                )),
            ));
        }
        if let Some(exe) = &policy.exe {
            let actual = std::fs::read_link(peer.proc_dir().join("exe")).ok();
            if actual.as_deref() != Some(exe.as_path()) {
                return Err(self.deny(
                    rpc,
                    "not_the_broker",
                    Status::permission_denied(format!(
                        "{actual:?} is not the configured broker {}",
                        exe.display()
                    )),
                ));
            }
        }
        peer.check_same_process().map_err(|e| {
            self.deny(
                rpc,
                "pid_recycled",
                Status::permission_denied(e.to_string()),
            )
        })
    }

    async fn pod_workload<T>(
        &self,
        rpc: &str,
        req: &Request<T>,
        r: &pb::KubernetesObjectReference,
    ) -> Result<BTreeSet<Selector>, Status> {
        // SPIFFE_Broker_API.md 3.1.3: the core group is the literal "core" (drafts before
        // it left it empty, which is still understood).
        let kind = r.r#type.as_ref();
        let is_pod =
            kind.is_some_and(|t| t.plural == "pods" && matches!(t.group.as_str(), "core" | ""));
        if !is_pod || r.uid.is_empty() {
            return Err(self.deny(
                rpc,
                "bad_reference",
                Status::invalid_argument(
                    "reference must be a pod (type {plural: \"pods\", group: \"core\"}) with its uid",
                ),
            ));
        }
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| self.deny(rpc, "no_token", Status::unauthenticated("a pod-bound service-account token is required (authorization: Bearer <token>)")))?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.inner.policy.token_audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.inner.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                self.deny(
                    rpc,
                    "token_review_failed",
                    Status::unavailable(format!("TokenReview: {e}")),
                )
            })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(self.deny(
                rpc,
                "token_rejected",
                Status::unauthenticated(format!(
                    "pod token rejected: {}",
                    status.error.unwrap_or_default()
                )),
            ));
        }
        // As psat.rs does: a review that does not name our audience authenticated the token
        // for something else (an audience-unaware authenticator says so with the API
        // server's audiences, or none), e.g. the pod's own API token.
        let audience = &self.inner.policy.token_audience;
        if !status
            .audiences
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|a| a == audience)
        {
            return Err(self.deny(
                rpc,
                "token_wrong_audience",
                Status::unauthenticated(format!(
                    "the pod token is not for audience {audience:?} (TokenReview confirmed {:?}); the CSIDriver's tokenRequests must ask for {audience:?}",
                    status.audiences.unwrap_or_default()
                )),
            ));
        }
        let extra = status.user.and_then(|u| u.extra).unwrap_or_default();
        let one = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        if one("authentication.kubernetes.io/pod-uid").as_deref() != Some(r.uid.as_str()) {
            return Err(self.deny(
                rpc,
                "token_for_another_pod",
                Status::permission_denied(format!("the token is not bound to pod {}", r.uid)),
            ));
        }
        if let Some(node) = one("authentication.kubernetes.io/node-name")
            && node != self.inner.policy.node_name
        {
            return Err(self.deny(
                rpc,
                "pod_on_another_node",
                Status::permission_denied(format!(
                    "pod {} runs on node {node}, not {}",
                    r.uid, self.inner.policy.node_name
                )),
            ));
        }
        let pod = find_pod(
            self.inner.pods.as_ref(),
            &r.uid,
            self.inner.policy.pod_timeout,
        )
        .await
        .ok_or_else(|| {
            self.deny(
                rpc,
                "pod_not_on_this_node",
                Status::permission_denied(format!(
                    "pod {} is not on node {}",
                    r.uid, self.inner.policy.node_name
                )),
            )
        })?;
        if let Some(key) = &r.key
            && (key.namespace != pod.namespace || key.name != pod.name)
        {
            return Err(self.deny(
                rpc,
                "reference_mismatch",
                Status::permission_denied(format!(
                    "pod {} is {}/{}, not {}/{}",
                    r.uid, pod.namespace, pod.name, key.namespace, key.name
                )),
            ));
        }
        Ok(pod_selectors(&pod).into_iter().collect())
    }
}

/// The `google.rpc.ErrorInfo` reason (SPIFFE_Broker_API.md 4.8) of a denial, by its
/// metric reason.
fn spec_reason(reason: &str) -> Option<&'static str> {
    match reason {
        "no_reference" | "bad_reference" | "unsupported_reference" => {
            Some("WORKLOAD_REFERENCE_INVALID")
        }
        "pid_not_found" => Some("WORKLOAD_NOT_FOUND"),
        "no_identity" | "spiffe_id_not_entitled" => Some("WORKLOAD_NOT_ENTITLED"),
        _ => None,
    }
}

/// `google.rpc.ErrorInfo` (google/rpc/error_details.proto), as the Broker API's error
/// details carry it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ErrorInfo {
    /// One of the spec's reasons, e.g. `WORKLOAD_NOT_FOUND`.
    #[prost(string, tag = "1")]
    pub reason: String,
    /// `spiffe.io`.
    #[prost(string, tag = "2")]
    pub domain: String,
    /// Context (none is sent).
    #[prost(map = "string, string", tag = "3")]
    pub metadata: std::collections::HashMap<String, String>,
}

/// `google.rpc.Status` (google/rpc/status.proto): what the gRPC status details hold.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    /// The gRPC code.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// The message.
    #[prost(string, tag = "2")]
    pub message: String,
    /// Details, each packed in an Any.
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

/// Type URL of [`ErrorInfo`] in an Any.
pub const ERROR_INFO_TYPE: &str = "type.googleapis.com/google.rpc.ErrorInfo";

/// `status` with a `google.rpc.ErrorInfo` detail of `reason` in domain `spiffe.io`
/// (SPIFFE_Broker_API.md 4.8, SHOULD).
pub fn with_error_info(status: Status, reason: &str) -> Status {
    let info = ErrorInfo {
        reason: reason.to_owned(),
        domain: "spiffe.io".into(),
        metadata: Default::default(),
    };
    let details = RpcStatus {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: vec![prost_types::Any {
            type_url: ERROR_INFO_TYPE.into(),
            value: info.encode_to_vec(),
        }],
    };
    Status::with_details(
        status.code(),
        status.message(),
        bytes::Bytes::from(details.encode_to_vec()),
    )
}

/// How often a stream for a PID reference checks that its process still lives.
pub const PID_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// `stream`, whose PermissionDenied end (the workload's entries went) carries the
/// `WORKLOAD_NOT_ENTITLED` ErrorInfo (SPIFFE_Broker_API.md 4.8).
fn with_entitlement_info<T: Send + 'static>(stream: ResponseStream<T>) -> ResponseStream<T> {
    use futures::StreamExt;
    Box::pin(stream.map(|item| {
        item.map_err(|status| {
            if status.code() == tonic::Code::PermissionDenied && status.details().is_empty() {
                with_error_info(status, "WORKLOAD_NOT_ENTITLED")
            } else {
                status
            }
        })
    }))
}

/// `stream` (see [`with_entitlement_info`]), ended with NotFound once `process` (a PID
/// reference's) exits or its PID is reused (SPIFFE_Broker_API.md 4.9: no responses beyond
/// the workload's lifetime).
fn until_exit<T: Send + 'static>(
    stream: ResponseStream<T>,
    process: Option<Arc<PeerProcess>>,
) -> ResponseStream<T> {
    use futures::StreamExt;
    let stream = with_entitlement_info(stream);
    let Some(process) = process else {
        return stream;
    };
    enum Item<T> {
        Data(Result<T, Status>),
        Exited(Status),
    }
    let exited = futures::stream::once(async move {
        loop {
            tokio::time::sleep(PID_CHECK_INTERVAL).await;
            if let Err(e) = process.check_same_process() {
                info!(
                    pid = process.pid,
                    "the referenced process exited; ending its stream"
                );
                return Item::Exited(with_error_info(
                    Status::not_found(format!("{e}; the reference no longer names a workload")),
                    "WORKLOAD_NOT_FOUND",
                ));
            }
        }
    });
    let merged = futures::stream::select(stream.map(Item::Data), exited);
    Box::pin(merged.scan(false, |done, item| {
        let out = match item {
            _ if *done => None,
            Item::Data(d) => Some(d),
            Item::Exited(status) => {
                *done = true;
                Some(Err(status))
            }
        };
        futures::future::ready(out)
    }))
}

/// Whose JWT-SVID minting budget a (validated) reference is charged to: the pod it names,
/// or the process it names (by its pod, else its UID).
fn budget_key(proc_root: &Path, reference: Option<&pb::WorkloadReference>) -> WorkloadKey {
    let any = reference.and_then(|r| r.reference.as_ref());
    match any.map(|a| (a.type_url.as_str(), a.value.as_slice())) {
        Some((K8S_REFERENCE, v)) => pb::KubernetesObjectReference::decode(v)
            .map(|r| WorkloadKey::Pod(r.uid))
            .unwrap_or(WorkloadKey::Uid(u32::MAX)),
        Some((PID_REFERENCE, v)) => pb::WorkloadPidReference::decode(v)
            .ok()
            .and_then(|r| {
                let (uid, gid) = proc_ids(proc_root, r.pid)?;
                PeerProcess::pin(r.pid, uid, gid, proc_root).ok()
            })
            .map(|p| WorkloadKey::of(&p))
            .unwrap_or(WorkloadKey::Uid(u32::MAX)),
        _ => WorkloadKey::Uid(u32::MAX),
    }
}

fn proc_ids(proc_root: &Path, pid: i32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    let field = |name: &str| -> Option<u32> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(2)?
            .parse()
            .ok()
    };
    Some((field("Uid:")?, field("Gid:")?))
}

fn x509_svids(r: wl::X509svidResponse) -> pb::SubscribeToX509svidResponse {
    pb::SubscribeToX509svidResponse {
        svids: r
            .svids
            .into_iter()
            .map(|s| pb::X509svid {
                spiffe_id: s.spiffe_id,
                x509_svid: s.x509_svid,
                x509_svid_key: s.x509_svid_key,
                bundle: s.bundle,
                hint: s.hint,
            })
            .collect(),
        crl: r.crl,
        federated_bundles: r.federated_bundles,
    }
}

#[tonic::async_trait]
impl pb::api_server::Api for BrokerApi {
    async fn subscribe_to_x509svid(
        &self,
        req: Request<pb::SubscribeToX509svidRequest>,
    ) -> Result<Response<ResponseStream<pb::SubscribeToX509svidResponse>>, Status> {
        const RPC: &str = "SubscribeToX509SVID";
        let (selectors, process) = self
            .referenced(RPC, &req, req.get_ref().reference.as_ref())
            .await?;
        let view = self.inner.served.ready_view(&selectors).await;
        if view.svids.is_empty() {
            let (reason, status) = crate::serving::no_valid_svid(&view);
            return Err(self.deny(RPC, reason, status));
        }
        info!(svids = view.svids.len(), "serving X509-SVIDs to the broker");
        Ok(Response::new(until_exit(
            self.inner
                .served
                .watch(x509_svids(x509_response(&view)), move |cache| {
                    x509_update(&cache.view_for(&selectors))
                        .map(|v| v.map(|v| x509_svids(x509_response(v))))
                }),
            process,
        )))
    }

    async fn subscribe_to_x509_bundles(
        &self,
        req: Request<pb::SubscribeToX509BundlesRequest>,
    ) -> Result<Response<ResponseStream<pb::SubscribeToX509BundlesResponse>>, Status> {
        const RPC: &str = "SubscribeToX509Bundles";
        let (selectors, process) = self
            .referenced(RPC, &req, req.get_ref().reference.as_ref())
            .await?;
        let convert = |r: wl::X509BundlesResponse| pb::SubscribeToX509BundlesResponse {
            crl: r.crl,
            bundles: r.bundles,
        };
        let view = self.inner.served.cache.view_for(&selectors);
        if !view.has_identity() {
            return Err(self.deny(
                RPC,
                "no_identity",
                Status::permission_denied("no identity issued"),
            ));
        }
        use futures::StreamExt;
        let stream = self.inner.served.x509_bundles_stream(&view, selectors);
        Ok(Response::new(until_exit(
            Box::pin(stream.map(move |r| r.map(convert))),
            process,
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::FetchJwtsvidRequest>,
    ) -> Result<Response<pb::FetchJwtsvidResponse>, Status> {
        const RPC: &str = "FetchJWTSVID";
        let selectors = self
            .workload(RPC, &req, req.get_ref().reference.as_ref())
            .await?;
        let r = req.into_inner();
        let key = budget_key(self.inner.attestor.proc_root(), r.reference.as_ref());
        match self
            .inner
            .served
            .jwt_svids(&key, &selectors, &r.audience, &r.spiffe_id)
            .await
        {
            Ok(svids) => Ok(Response::new(pb::FetchJwtsvidResponse {
                svids: svids
                    .into_iter()
                    .map(|s| pb::Jwtsvid {
                        spiffe_id: s.spiffe_id,
                        svid: s.svid,
                        hint: s.hint,
                    })
                    .collect(),
            })),
            Err(JwtRefusal::NoAudience) => Err(self.deny(
                RPC,
                "no_audience",
                Status::invalid_argument("audience must be specified"),
            )),
            Err(JwtRefusal::NoIdentity) => Err(self.deny(
                RPC,
                "no_identity",
                Status::permission_denied("no identity issued"),
            )),
            Err(JwtRefusal::BadId(e)) => Err(self.deny(
                RPC,
                "bad_spiffe_id",
                Status::invalid_argument(format!("spiffe_id: {e}")),
            )),
            Err(JwtRefusal::NotEntitled(id)) => Err(self.deny(
                RPC,
                "spiffe_id_not_entitled",
                Status::permission_denied(format!("the workload is not entitled to {id}")),
            )),
            Err(JwtRefusal::OverBudget(why)) => Err(self.deny(
                RPC,
                "workload_rate_limited",
                Status::resource_exhausted(why),
            )),
            Err(JwtRefusal::Mint(s)) => Err(s),
        }
    }

    async fn subscribe_to_jwt_bundles(
        &self,
        req: Request<pb::SubscribeToJwtBundlesRequest>,
    ) -> Result<Response<ResponseStream<pb::SubscribeToJwtBundlesResponse>>, Status> {
        const RPC: &str = "SubscribeToJWTBundles";
        let (selectors, process) = self
            .referenced(RPC, &req, req.get_ref().reference.as_ref())
            .await?;
        let convert =
            |r: wl::JwtBundlesResponse| pb::SubscribeToJwtBundlesResponse { bundles: r.bundles };
        let view = self.inner.served.cache.view_for(&selectors);
        if !view.has_identity() {
            return Err(self.deny(
                RPC,
                "no_identity",
                Status::permission_denied("no identity issued"),
            ));
        }
        use futures::StreamExt;
        let stream = self.inner.served.jwt_bundles_stream(&view, selectors);
        Ok(Response::new(until_exit(
            Box::pin(stream.map(move |r| r.map(convert))),
            process,
        )))
    }
}

/// Serves the Broker API on `listener` until `cancel`.
pub async fn serve(
    listener: UnixListener,
    api: BrokerApi,
    proc_root: PathBuf,
    cancel: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    // One client (sigil-csi, checked on every call); the caps only bound what a
    // misbehaving one could hold.
    let caps = Caps::connections(
        crate::limits::DEFAULT_MAX_CONNECTIONS,
        crate::limits::DEFAULT_MAX_CONNECTIONS,
        api.inner.metrics.clone(),
    );
    let incoming = incoming(listener, proc_root, caps, cancel.clone());
    tonic::transport::Server::builder()
        .timeout(UNARY_TIMEOUT)
        .max_concurrent_streams(Some(1024))
        .add_service(api.into_server())
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use prometheus_client::metrics::gauge::Gauge;

    use super::*;
    use crate::attest::k8s::PodInfo;
    use crate::cache::Cache;
    use crate::node_client::NodeClient;
    use crate::transport::DenialLabels;
    use sigil_identity::{TrustBundle, TrustDomain};
    use tokio::sync::watch;

    const POD_UID: &str = "0f0f0f0f-1111-2222-3333-444444444444";
    const NODE: &str = "node-a";

    /// One pod on this node.
    #[derive(Debug)]
    struct OnePod(Arc<PodInfo>, watch::Sender<u64>);

    impl PodSource for OnePod {
        fn pod_by_uid(&self, uid: &str) -> Option<Arc<PodInfo>> {
            (uid == self.0.uid).then(|| self.0.clone())
        }
        fn subscribe(&self) -> watch::Receiver<u64> {
            self.1.subscribe()
        }
        fn is_synced(&self) -> bool {
            true
        }
    }

    /// A TokenReview answerer that authenticates every token as bound to our pod on our
    /// node, confirming `audiences`: what an audience-unaware authenticator behind the API
    /// server says about a token made for someone else.
    fn token_reviewer(audiences: serde_json::Value) -> Client {
        let svc = tower::service_fn(move |_req: http::Request<kube::client::Body>| {
            let body = serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "metadata": {}, "spec": {},
                "status": {
                    "authenticated": true,
                    "audiences": audiences,
                    "user": {
                        "username": "system:serviceaccount:prod:web",
                        "extra": {
                            "authentication.kubernetes.io/pod-uid": [POD_UID],
                            "authentication.kubernetes.io/pod-name": ["web-0"],
                            "authentication.kubernetes.io/node-name": [NODE],
                        },
                    },
                },
            });
            async move {
                Ok::<_, std::convert::Infallible>(http::Response::new(kube::client::Body::from(
                    serde_json::to_vec(&body).unwrap(),
                )))
            }
        });
        Client::new(svc, "default")
    }

    fn broker(client: Client) -> BrokerApi {
        let td: TrustDomain = "example.org".parse().unwrap();
        let node = NodeClient::unreachable(&td);
        let pod = PodInfo {
            uid: POD_UID.into(),
            namespace: "prod".into(),
            name: "web-0".into(),
            service_account: Some("web".into()),
            node_name: Some(NODE.into()),
            labels: vec![],
            owners: vec![],
            images: vec![],
            init_images: vec![],
            containers: vec![],
        };
        BrokerApi::new(
            Served {
                cache: Cache::new(),
                node: Arc::new(node),
                shutdown: CancellationToken::new(),
                open_streams: Gauge::default(),
                mint_budget: Arc::new(crate::limits::MintBudget::new(1000.0, 1000.0)),
            },
            BrokerPolicy {
                uid: 0,
                exe: None,
                token_audience: "sigil-csi".into(),
                node_name: NODE.into(),
                pod_timeout: Duration::from_millis(100),
            },
            client,
            Arc::new(OnePod(Arc::new(pod), watch::channel(0).0)),
            Arc::new(WorkloadAttestor::new(
                "/proc".into(),
                "/etc".into(),
                None,
                Duration::from_secs(1),
            )),
            ApiMetrics::default(),
        )
    }

    fn request() -> (Request<()>, pb::KubernetesObjectReference) {
        let mut req = Request::new(());
        req.metadata_mut().insert(
            "authorization",
            "Bearer the-pods-own-api-token".parse().unwrap(),
        );
        let reference = pb::KubernetesObjectReference {
            r#type: Some(pb::KubernetesObjectType {
                group: String::new(),
                plural: "pods".into(),
            }),
            key: None,
            uid: POD_UID.into(),
        };
        (req, reference)
    }

    /// A request from this test process (the configured broker: uid 0) naming `pid`.
    fn pid_request<T>(msg: T) -> Request<T> {
        let me = PeerProcess::pin(std::process::id() as i32, 0, 0, Path::new("/proc")).unwrap();
        let mut req = Request::new(msg);
        req.extensions_mut().insert(PeerInfo(Ok(Arc::new(me))));
        req
    }

    fn pid_reference(pid: i32) -> Option<pb::WorkloadReference> {
        Some(pb::WorkloadReference {
            reference: Some(prost_types::Any {
                type_url: PID_REFERENCE.into(),
                value: pb::WorkloadPidReference { pid }.encode_to_vec(),
            }),
        })
    }

    /// SPIFFE_Broker_API.md 3.1.3/4.8: a PID MUST be positive; a negative or zero one is a
    /// malformed reference, InvalidArgument (WORKLOAD_REFERENCE_INVALID).
    ///
    /// Before the fix: -1 was looked up as a process and answered NotFound.
    #[tokio::test]
    async fn a_non_positive_pid_is_invalid_argument() {
        let api = broker(token_reviewer(serde_json::json!(["sigil-csi"])));
        for pid in [-1, 0, i32::MIN] {
            let reference = pid_reference(pid);
            let req = pid_request(());
            let status = api
                .workload("FetchJWTSVID", &req, reference.as_ref())
                .await
                .unwrap_err();
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "pid {pid}: {status:?}"
            );
            assert!(status.message().contains("positive"), "{status:?}");
        }
    }

    /// SPIFFE_Broker_API.md 3.1.1/4.8: no reference or one of an unknown type is
    /// InvalidArgument; a PID naming no process is NotFound; a pod reference whose key
    /// names another pod than its uid is an error (PermissionDenied).
    #[tokio::test]
    async fn references_are_checked_with_the_codes_of_the_spec() {
        let api = broker(token_reviewer(serde_json::json!(["sigil-csi"])));
        let req = pid_request(());
        let status = api.workload("FetchJWTSVID", &req, None).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        let unknown = Some(pb::WorkloadReference {
            reference: Some(prost_types::Any {
                type_url: "type.googleapis.com/example.Custom".into(),
                value: vec![],
            }),
        });
        let status = api
            .workload("FetchJWTSVID", &req, unknown.as_ref())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        let status = api
            .workload("FetchJWTSVID", &req, pid_reference(i32::MAX).as_ref())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        let (req, mut reference) = request();
        reference.key = Some(pb::KubernetesObjectKey {
            namespace: "prod".into(),
            name: "someone-else".into(),
        });
        let status = api
            .pod_workload("FetchJWTSVID", &req, &reference)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("web-0"), "{status:?}");
    }

    /// The ErrorInfo reason a status carries in its details.
    fn error_info(status: &Status) -> Option<ErrorInfo> {
        let details = RpcStatus::decode(status.details()).ok()?;
        let any = details
            .details
            .into_iter()
            .find(|a| a.type_url == ERROR_INFO_TYPE)?;
        ErrorInfo::decode(any.value.as_slice()).ok()
    }

    /// SPIFFE_Broker_API.md 4.8 (SHOULD): errors carry `google.rpc.ErrorInfo` with the
    /// spec's reason in domain `spiffe.io`.
    #[tokio::test]
    async fn errors_carry_the_error_info_of_the_spec() {
        let api = broker(token_reviewer(serde_json::json!(["sigil-csi"])));
        let req = pid_request(());
        for (reference, reason) in [
            (None, "WORKLOAD_REFERENCE_INVALID"),
            (pid_reference(-1), "WORKLOAD_REFERENCE_INVALID"),
            (pid_reference(i32::MAX), "WORKLOAD_NOT_FOUND"),
        ] {
            let status = api
                .workload("FetchJWTSVID", &req, reference.as_ref())
                .await
                .unwrap_err();
            let info = error_info(&status).unwrap_or_else(|| panic!("no ErrorInfo: {status:?}"));
            assert_eq!(
                (info.reason.as_str(), info.domain.as_str()),
                (reason, "spiffe.io")
            );
        }
        // An existing process (this one) with no identity: PermissionDenied,
        // WORKLOAD_NOT_ENTITLED.
        use pb::api_server::Api as _;
        let status = api
            .fetch_jwtsvid(pid_request(pb::FetchJwtsvidRequest {
                reference: pid_reference(std::process::id() as i32),
                audience: vec!["db".into()],
                spiffe_id: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert_eq!(
            error_info(&status).map(|i| i.reason),
            Some("WORKLOAD_NOT_ENTITLED".to_owned()),
            "{status:?}"
        );
    }

    /// SPIFFE_Broker_API.md 4.8/5.2.2: a bundle stream that ends because the workload's
    /// entries went (PermissionDenied) carries the `WORKLOAD_NOT_ENTITLED` ErrorInfo.
    #[tokio::test]
    async fn a_stream_ended_by_lost_entitlement_carries_workload_not_entitled() {
        use futures::StreamExt;
        use pb::api_server::Api as _;
        use sigil_identity::SpiffeId;
        use sigil_identity::entry::RegistrationEntry;
        let api = broker(token_reviewer(serde_json::json!(["sigil-csi"])));
        let cache = api.inner.served.cache.clone();
        let own: TrustDomain = "example.org".parse().unwrap();
        cache.set_own_trust_domain(own.clone());
        let uid = nix::unistd::getuid().as_raw();
        cache.replace_entries(
            vec![RegistrationEntry::new(
                "e1",
                SpiffeId::parse("spiffe://example.org/broker-test").unwrap(),
                vec![Selector::new("unix", format!("uid:{uid}"))],
            )],
            1,
        );
        let mut bundle = TrustBundle::new(own);
        bundle.x509_authorities = vec![vec![1, 2, 3]];
        cache.set_bundles(vec![bundle], &[]);
        let mut stream = api
            .subscribe_to_x509_bundles(pid_request(pb::SubscribeToX509BundlesRequest {
                reference: pid_reference(std::process::id() as i32),
            }))
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert!(
            first.bundles.contains_key("spiffe://example.org"),
            "{first:?}"
        );
        cache.replace_entries(vec![], 2);
        let status = match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(Err(status))) => status,
            other => panic!("the stream went on after the entries went: {other:?}"),
        };
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert_eq!(
            error_info(&status).map(|i| i.reason),
            Some("WORKLOAD_NOT_ENTITLED".to_owned()),
            "{status:?}"
        );
    }

    /// SPIFFE_Broker_API.md 3.1.3: the core group is spelled "core" in the reference.
    ///
    /// Before the fix: `group: "core"` was refused as not a pod (sigil-csi sent "").
    #[tokio::test]
    async fn the_core_group_is_spelled_core() {
        let api = broker(token_reviewer(serde_json::json!(["sigil-csi"])));
        let (req, mut reference) = request();
        reference.r#type = Some(pb::KubernetesObjectType {
            group: "core".into(),
            plural: "pods".into(),
        });
        let selectors = api
            .pod_workload("FetchJWTSVID", &req, &reference)
            .await
            .unwrap();
        assert!(selectors.iter().any(|s| s.to_string() == "k8s:ns:prod"));
        reference.r#type = Some(pb::KubernetesObjectType {
            group: "apps".into(),
            plural: "pods".into(),
        });
        let status = api
            .pod_workload("FetchJWTSVID", &req, &reference)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    /// SPIFFE_Broker_API.md 4.9: once a PID reference's process exits, the server MUST
    /// stop sending responses for it: its streams end (NotFound).
    ///
    /// Before the fix: the streams stayed open after the process was gone (the test
    /// timed out at "the stream ended after the process exited").
    #[tokio::test]
    async fn a_pid_references_streams_end_when_the_process_exits() {
        use futures::StreamExt;
        use pb::api_server::Api as _;
        use sigil_identity::SpiffeId;
        use sigil_identity::entry::RegistrationEntry;
        let api = broker(token_reviewer(serde_json::json!(["sigil-csi"])));
        let td: TrustDomain = "example.org".parse().unwrap();
        let cache = api.inner.served.cache.clone();
        cache.replace_entries(
            vec![RegistrationEntry::new(
                "e1",
                SpiffeId::parse("spiffe://example.org/root-procs").unwrap(),
                vec![Selector::new("unix", "uid:0")],
            )],
            1,
        );
        let mut b = TrustBundle::new(td);
        b.x509_authorities = vec![vec![1, 2, 3]];
        cache.set_bundles(vec![b], &[]);
        let mut child = tokio::process::Command::new("sleep")
            .arg("60")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap() as i32;
        let x509 = api
            .subscribe_to_x509_bundles(pid_request(pb::SubscribeToX509BundlesRequest {
                reference: pid_reference(pid),
            }))
            .await
            .unwrap();
        let jwt = api
            .subscribe_to_jwt_bundles(pid_request(pb::SubscribeToJwtBundlesRequest {
                reference: pid_reference(pid),
            }))
            .await
            .unwrap();
        let mut x509 = x509.into_inner();
        let mut jwt = jwt.into_inner();
        assert!(x509.next().await.unwrap().is_ok());
        assert!(jwt.next().await.unwrap().is_ok());
        child.kill().await.unwrap();
        for (name, next) in [
            (
                "SubscribeToX509Bundles",
                tokio::time::timeout(Duration::from_secs(5), x509.next())
                    .await
                    .map(|o| o.map(|r| r.map(|_| ()))),
            ),
            (
                "SubscribeToJWTBundles",
                tokio::time::timeout(Duration::from_secs(5), jwt.next())
                    .await
                    .map(|o| o.map(|r| r.map(|_| ()))),
            ),
        ] {
            match next {
                Ok(Some(Err(status))) => {
                    assert_eq!(status.code(), tonic::Code::NotFound, "{name}: {status:?}");
                    assert_eq!(
                        error_info(&status).map(|i| i.reason),
                        Some("WORKLOAD_NOT_FOUND".to_owned())
                    );
                }
                other => panic!("{name}: the stream ended after the process exited? {other:?}"),
            }
        }
    }

    /// Attack: the broker presents a pod token that was not made for sigil-csi — the
    /// pod's own API-server token, or one for another service — and the TokenReview
    /// answer authenticates it without confirming our audience (an audience-unaware
    /// authenticator answers with the API server's audiences, or none). psat.rs checks the
    /// returned audiences; the Broker API did not.
    ///
    /// Before the fix: the pod was resolved and its selectors returned for a token whose
    /// review confirmed only `https://kubernetes.default.svc` (the test failed at "a token
    /// for another audience was accepted").
    #[tokio::test]
    async fn a_token_the_review_does_not_confirm_for_our_audience_is_refused() {
        for audiences in [
            serde_json::json!(["https://kubernetes.default.svc"]),
            serde_json::json!([]),
            serde_json::Value::Null,
        ] {
            let api = broker(token_reviewer(audiences.clone()));
            let (req, reference) = request();
            let result = api.pod_workload("FetchJWTSVID", &req, &reference).await;
            let Err(status) = result else {
                panic!("a token for another audience was accepted (review audiences {audiences})");
            };
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
            assert!(
                status.message().contains("not for audience \"sigil-csi\""),
                "{status:?}"
            );
            let denied = api
                .inner
                .metrics
                .denials
                .get_or_create(&DenialLabels {
                    rpc: "FetchJWTSVID".into(),
                    reason: "token_wrong_audience".into(),
                })
                .get();
            assert_eq!(denied, 1);
        }
        // The same answer confirming sigil-csi: the pod is resolved.
        let api = broker(token_reviewer(serde_json::json!(["sigil-csi"])));
        let (req, reference) = request();
        let selectors = api
            .pod_workload("FetchJWTSVID", &req, &reference)
            .await
            .unwrap();
        assert!(selectors.iter().any(|s| s.to_string() == "k8s:ns:prod"));
    }
}
