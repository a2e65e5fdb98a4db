//! The CSI services of sigil-csi: Identity and Node (a node-only plugin: no Controller
//! service, which GetPluginCapabilities says).
//!
//! NodePublishVolume validates every field first (InvalidArgument naming the field), then:
//! - `mode: workload-api` (default): bind-mounts the agent's socket directory read-only
//!   on the target; `readOnly: true` is required. When the kubelet passes the pod's token,
//!   the publish then waits, at most `--socket-publish-wait`, until the agent holds the
//!   pod's X509-SVID, so an application that fetches once at start finds it
//!   ([`CsiService::wait_for_identity`]). A pod with no identity, or an agent that cannot
//!   tell, does not hold the publish back: the socket is mounted either way.
//! - `mode: files`: a tmpfs with the pod's identity files ([`crate::files`]), always
//!   read-only to the pod (whatever `readOnly` says: the pod never writes into it).
//!   `fileMode` is capped (owner-readable, never executable or world-writable), the
//!   files' group is the pod's fsGroup (`volume_mount_group`) when the kubelet gives it,
//!   and audiences that would share a JWT file name are refused.
//!
//! Publish and unpublish are idempotent: a repeat publish of a mounted target mounts
//! nothing new (a files volume just takes the kubelet's fresh token); unpublishing a
//! target that is not there succeeds. A repeat publish that asks for something else than
//! what is published there (the other mode, another pod, other files options) is
//! ALREADY_EXISTS, as the CSI spec requires. Concurrent calls for one volume are
//! serialised. The pod's token comes from the request's `secrets` when the kubelet puts it
//! there (the CSIDriver's `serviceAccountTokenInSecrets: true`, Kubernetes 1.35+), else
//! from its volume context (older kubelets). Requests are never logged whole: either field
//! may carry the token.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sigil_identity::proto::csi as pb;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::broker::PodRef;
use crate::files::{FilesOptions, FilesVolumes, VolumeRecord};
use crate::mounter::Mounter;

/// How long a socket-mode publish retries "no identity issued" before mounting anyway.
pub const NO_IDENTITY_GRACE: Duration = Duration::from_secs(1);

/// The driver name pods use (`driver: csi.sigil.dev`).
pub const DRIVER_NAME: &str = "csi.sigil.dev";

const CTX_POD_NAME: &str = "csi.storage.k8s.io/pod.name";
const CTX_POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
const CTX_POD_UID: &str = "csi.storage.k8s.io/pod.uid";
const CTX_TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";
const CTX_EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";

/// The user attributes a volume may set.
const ATTRIBUTES: &[&str] = &[
    "mode",
    "spiffeID",
    "jwtAudiences",
    "fsGroup",
    "fileMode",
    "formats",
];

/// Labels of an operation counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// `publish` or `unpublish`.
    pub op: String,
    /// `workload-api`, `files` or `unknown`.
    pub mode: String,
    /// gRPC code name (`Ok` on success).
    pub code: String,
}

/// Labels of the pod-token counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// Where the kubelet passed the token: `secrets` or `volume_context`.
    pub source: String,
}

/// Labels of the socket-mode wait counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SocketWaitLabels {
    /// `ready` (the pod's SVID was signed before the publish returned), `no_identity` (no
    /// ClusterSPIFFEID selects the pod), `timeout` (`--socket-publish-wait` ran out) or
    /// `error` (the agent refused or could not be reached).
    pub outcome: String,
}

/// sigil-csi metrics.
#[derive(Debug, Clone)]
pub struct CsiMetrics {
    /// Operations by outcome.
    pub ops: Family<OpLabels, Counter>,
    /// Files-mode publishes by where the kubelet passed the pod's token.
    pub pod_tokens: Family<TokenLabels, Counter>,
    /// NodePublishVolume duration, seconds.
    pub publish_seconds: Histogram,
    /// Socket-mode publishes that waited for the pod's identity, by outcome.
    pub socket_waits: Family<SocketWaitLabels, Counter>,
}

impl Default for CsiMetrics {
    fn default() -> Self {
        Self {
            ops: Family::default(),
            pod_tokens: Family::default(),
            publish_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            socket_waits: Family::default(),
        }
    }
}

impl CsiMetrics {
    /// Registers under `sigil_csi_*`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sigil_csi");
        r.register(
            "operations",
            "NodePublishVolume/NodeUnpublishVolume by mode and outcome",
            self.ops.clone(),
        );
        r.register(
            "pod_tokens",
            "Files-mode publishes by where the kubelet passed the pod's token (secrets with serviceAccountTokenInSecrets, else volume_context)",
            self.pod_tokens.clone(),
        );
        r.register(
            "publish_seconds",
            "NodePublishVolume duration",
            self.publish_seconds.clone(),
        );
        r.register(
            "socket_publish_waits",
            "Socket-mode publishes that waited for the pod's X509-SVID, by outcome (ready, no_identity, timeout, error)",
            self.socket_waits.clone(),
        );
    }
}

/// The node service's configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The Kubernetes Node name (NodeGetInfo).
    pub node_id: String,
    /// The agent's Workload API socket directory (bind-mounted in workload-api mode).
    pub agent_socket_dir: PathBuf,
    /// Audience of the tokens the kubelet passes (the CSIDriver's `tokenRequests`).
    pub token_audience: String,
    /// How long a socket-mode publish waits for the pod's X509-SVID (zero: not at all).
    pub socket_publish_wait: Duration,
}

/// The Identity and Node services.
#[derive(Debug, Clone)]
pub struct CsiService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: NodeConfig,
    mounter: Arc<dyn Mounter>,
    files: Arc<FilesVolumes>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    metrics: CsiMetrics,
}

/// A validated publish request.
#[derive(Debug)]
enum Publish {
    WorkloadApi {
        target: PathBuf,
        /// The pod and its token, when the kubelet passed them: the publish waits for the
        /// pod's identity.
        pod: Option<(PodRef, String)>,
    },
    Files(Box<VolumeRecord>),
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

impl CsiService {
    /// Builds the services.
    pub fn new(
        config: NodeConfig,
        mounter: Arc<dyn Mounter>,
        files: Arc<FilesVolumes>,
        metrics: CsiMetrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                mounter,
                files,
                locks: Mutex::default(),
                metrics,
            }),
        }
    }

    fn lock_for(&self, volume_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks.len() > 10_000 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(volume_id.to_owned()).or_default().clone()
    }

    /// Validates a NodePublishVolume request; every error names the field and the fix.
    fn validate(&self, r: &pb::NodePublishVolumeRequest) -> Result<Publish, Status> {
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id is required"));
        }
        if r.target_path.is_empty() {
            return Err(invalid("target_path is required"));
        }
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| invalid("volume_capability is required"))?;
        let mount = match &cap.access_type {
            Some(pb::volume_capability::AccessType::Mount(m)) => m,
            Some(pb::volume_capability::AccessType::Block(_)) => {
                return Err(invalid(
                    "volume_capability.block is not supported: csi.sigil.dev volumes are filesystems (use a mount volume)",
                ));
            }
            None => return Err(invalid("volume_capability.access_type is required (mount)")),
        };
        let ctx = &r.volume_context;
        if ctx.get(CTX_EPHEMERAL).map(String::as_str) != Some("true") {
            return Err(invalid(format!(
                "volume_context[{CTX_EPHEMERAL}] must be \"true\": csi.sigil.dev only serves inline ephemeral volumes (a `csi:` volume in the pod spec), not PersistentVolumes"
            )));
        }
        let unknown: Vec<&String> = ctx
            .keys()
            .filter(|k| !k.starts_with("csi.storage.k8s.io/") && !ATTRIBUTES.contains(&k.as_str()))
            .collect();
        if !unknown.is_empty() {
            return Err(invalid(format!(
                "unknown volumeAttributes {unknown:?}; supported: {ATTRIBUTES:?}"
            )));
        }
        let target = PathBuf::from(&r.target_path);
        match ctx
            .get("mode")
            .map(String::as_str)
            .unwrap_or("workload-api")
        {
            "workload-api" => {
                if !r.readonly {
                    return Err(invalid(
                        "readOnly must be true in workload-api mode (set `readOnly: true` on the csi volume)",
                    ));
                }
                for attr in ["spiffeID", "jwtAudiences", "fileMode", "formats"] {
                    if ctx.contains_key(attr) {
                        return Err(invalid(format!(
                            "volumeAttributes.{attr} only applies to mode: files"
                        )));
                    }
                }
                let get = |k: &str| ctx.get(k).filter(|v| !v.is_empty()).cloned();
                let pod = match (get(CTX_POD_NAMESPACE), get(CTX_POD_NAME), get(CTX_POD_UID)) {
                    (Some(namespace), Some(name), Some(uid)) => {
                        pod_token(&r.secrets, ctx, &self.inner.config.token_audience)
                            .ok()
                            .map(|(token, _)| {
                                (
                                    PodRef {
                                        namespace,
                                        name,
                                        uid,
                                    },
                                    token,
                                )
                            })
                    }
                    _ => None,
                };
                Ok(Publish::WorkloadApi { target, pod })
            }
            "files" => {
                let get = |k: &str| ctx.get(k).filter(|v| !v.is_empty()).cloned();
                let pod = PodRef {
                    namespace: get(CTX_POD_NAMESPACE).ok_or_else(|| invalid(format!("volume_context[{CTX_POD_NAMESPACE}] is required: set podInfoOnMount: true on the CSIDriver")))?,
                    name: get(CTX_POD_NAME).ok_or_else(|| invalid(format!("volume_context[{CTX_POD_NAME}] is required: set podInfoOnMount: true on the CSIDriver")))?,
                    uid: get(CTX_POD_UID).ok_or_else(|| invalid(format!("volume_context[{CTX_POD_UID}] is required: set podInfoOnMount: true on the CSIDriver")))?,
                };
                let (token, source) =
                    pod_token(&r.secrets, ctx, &self.inner.config.token_audience)?;
                self.count_token(source);
                let fs_group = fs_group(get("fsGroup"), &mount.volume_mount_group)?;
                let file_mode = get("fileMode").map(|m| file_mode(&m)).transpose()?;
                let jwt_audiences = jwt_audiences(get("jwtAudiences").as_deref())?;
                let formats = formats(get("formats").as_deref())?;
                if let Some(id) = get("spiffeID") {
                    sigil_identity::SpiffeId::parse(&id)
                        .map_err(|e| invalid(format!("volumeAttributes.spiffeID: {e}")))?;
                }
                Ok(Publish::Files(Box::new(VolumeRecord {
                    volume_id: r.volume_id.clone(),
                    target_path: target,
                    pod,
                    options: FilesOptions {
                        spiffe_id: get("spiffeID"),
                        jwt_audiences,
                        fs_group,
                        file_mode,
                        formats,
                    },
                    token,
                })))
            }
            other => Err(invalid(format!(
                "volumeAttributes.mode {other:?} is not one of \"workload-api\", \"files\""
            ))),
        }
    }

    /// Waits, at most `--socket-publish-wait`, until the agent holds `pod`'s X509-SVID
    /// (the Broker API answers a subscription once the pod's SVIDs are signed). "No
    /// identity issued" is retried for [`NO_IDENTITY_GRACE`]: the pod's entry may reach
    /// the agent just after the kubelet calls us, both learning of the pod's binding at
    /// about the same time. Returns the outcome label.
    pub async fn wait_for_identity(&self, pod: &PodRef, token: &str) -> &'static str {
        let wait = self.inner.config.socket_publish_wait;
        let broker = self.inner.files.broker();
        let started = tokio::time::Instant::now();
        let attempts = async {
            loop {
                let first = match broker.subscribe_x509(pod, token).await {
                    Ok(mut stream) => stream.message().await,
                    Err(s) => Err(s),
                };
                match first {
                    Ok(Some(_)) => return "ready",
                    Err(s)
                        if s.code() == tonic::Code::PermissionDenied
                            && s.message() == "no identity issued" =>
                    {
                        if started.elapsed() >= NO_IDENTITY_GRACE {
                            return "no_identity";
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok(None) => return "error",
                    Err(s) => {
                        warn!(pod = %format!("{}/{}", pod.namespace, pod.name), code = ?s.code(), message = s.message(), "the agent did not confirm the pod's identity; the socket is mounted anyway");
                        return "error";
                    }
                }
            }
        };
        tokio::time::timeout(wait, attempts)
            .await
            .unwrap_or("timeout")
    }

    fn count_token(&self, source: TokenSource) {
        self.inner
            .metrics
            .pod_tokens
            .get_or_create(&TokenLabels {
                source: source.label().into(),
            })
            .inc();
    }

    fn count(&self, op: &str, mode: &str, code: tonic::Code) {
        self.inner
            .metrics
            .ops
            .get_or_create(&OpLabels {
                op: op.into(),
                mode: mode.into(),
                code: format!("{code:?}"),
            })
            .inc();
    }

    async fn publish(&self, r: pb::NodePublishVolumeRequest) -> Result<&'static str, Status> {
        let publish = self.validate(&r)?;
        let lock = self.lock_for(&r.volume_id);
        let _held = lock.lock().await;
        match publish {
            Publish::WorkloadApi { target, pod } => {
                if self
                    .inner
                    .mounter
                    .mount_count(&target)
                    .map_err(|e| Status::internal(format!("reading mounts: {e}")))?
                    > 0
                {
                    if self.inner.files.running_at(&r.volume_id, &target).is_some() {
                        return Err(already_exists(&r.volume_id, &target, "in mode files"));
                    }
                    return Ok("workload-api");
                }
                std::fs::create_dir_all(&target).map_err(|e| {
                    Status::internal(format!("creating target_path {}: {e}", target.display()))
                })?;
                self.inner
                    .mounter
                    .bind_read_only(&self.inner.config.agent_socket_dir, &target)
                    .map_err(|e| {
                        Status::internal(format!(
                            "bind-mounting {} on {}: {e}",
                            self.inner.config.agent_socket_dir.display(),
                            target.display()
                        ))
                    })?;
                info!(volume = %r.volume_id, target = %target.display(), "Workload API socket mounted");
                if let Some((pod, token)) = pod
                    && !self.inner.config.socket_publish_wait.is_zero()
                {
                    let started = Instant::now();
                    let outcome = self.wait_for_identity(&pod, &token).await;
                    info!(volume = %r.volume_id, pod = %format!("{}/{}", pod.namespace, pod.name), outcome, waited_ms = started.elapsed().as_millis() as u64, "waited for the pod's identity");
                    self.inner
                        .metrics
                        .socket_waits
                        .get_or_create(&SocketWaitLabels {
                            outcome: outcome.into(),
                        })
                        .inc();
                }
                Ok("workload-api")
            }
            Publish::Files(record) => {
                let record = *record;
                let pod = format!("{}/{}", record.pod.namespace, record.pod.name);
                let mounted = self
                    .inner
                    .mounter
                    .mount_count(&record.target_path)
                    .unwrap_or(0)
                    > 0;
                if mounted
                    && let Some(old) = self
                        .inner
                        .files
                        .running_at(&record.volume_id, &record.target_path)
                {
                    if old.pod != record.pod {
                        return Err(already_exists(
                            &record.volume_id,
                            &record.target_path,
                            &format!("for pod {}/{}", old.pod.namespace, old.pod.name),
                        ));
                    }
                    if old.options != record.options {
                        return Err(already_exists(
                            &record.volume_id,
                            &record.target_path,
                            &format!("with other volumeAttributes ({:?})", old.options),
                        ));
                    }
                    // A republish: nothing to mount, just the kubelet's fresh token.
                    self.inner.files.refresh(record)?;
                    return Ok("files");
                }
                if mounted && holds_socket(&record.target_path) {
                    return Err(already_exists(
                        &record.volume_id,
                        &record.target_path,
                        "in mode workload-api",
                    ));
                }
                self.inner.files.publish(record.clone()).await.inspect_err(|s| {
                    warn!(volume = %record.volume_id, %pod, code = ?s.code(), message = s.message(), "files-mode publish failed");
                })?;
                info!(volume = %record.volume_id, %pod, target = %record.target_path.display(), "identity files published");
                Ok("files")
            }
        }
    }
}

/// ALREADY_EXISTS for a publish that differs from what is published at `target`
/// (CSI spec, NodePublishVolume: an incompatible republish of a published volume).
fn already_exists(volume_id: &str, target: &Path, what: &str) -> Status {
    Status::already_exists(format!(
        "volume {volume_id} is already published at {} {what}; unpublish it first (a pod's csi volume cannot change while it runs)",
        target.display()
    ))
}

/// Whether `target` holds a Unix socket: the agent's socket directory bind-mounted there
/// by workload-api mode (a files volume holds only regular files and symlinks).
fn holds_socket(target: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::read_dir(target).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_type().is_ok_and(|t| t.is_socket()))
    })
}

/// The group of the files: the CO's `volume_mount_group` (the pod's fsGroup) when it
/// gives one; the `fsGroup` attribute may only repeat it.
pub fn fs_group(
    attribute: Option<String>,
    volume_mount_group: &str,
) -> Result<Option<u32>, Status> {
    let attribute = attribute
        .map(|g| {
            g.parse::<u32>()
                .map_err(|_| invalid(format!("volumeAttributes.fsGroup {g:?} is not a group ID")))
        })
        .transpose()?;
    if volume_mount_group.is_empty() {
        return Ok(attribute);
    }
    let from_co = volume_mount_group.parse::<u32>().map_err(|_| {
        invalid(format!(
            "volume_capability.mount.volume_mount_group {volume_mount_group:?} is not a group ID"
        ))
    })?;
    match attribute {
        Some(a) if a != from_co => Err(invalid(format!(
            "volumeAttributes.fsGroup {a} differs from the pod's fsGroup {from_co}; remove the attribute (the pod's securityContext.fsGroup applies)"
        ))),
        _ => Ok(Some(from_co)),
    }
}

/// The `fileMode` attribute: octal, readable by the owner, never writable by others, never
/// executable.
pub fn file_mode(m: &str) -> Result<u32, Status> {
    let mode = u32::from_str_radix(m.trim_start_matches("0o"), 8).map_err(|_| {
        invalid(format!(
            "volumeAttributes.fileMode {m:?} is not an octal mode such as \"0440\""
        ))
    })?;
    if mode > 0o777 || mode & 0o400 == 0 || mode & 0o111 != 0 || mode & 0o002 != 0 {
        return Err(invalid(format!(
            "volumeAttributes.fileMode {m:?} must be readable by the owner, not executable and not writable by others (for example \"0440\" or \"0644\")"
        )));
    }
    Ok(mode)
}

/// `volumeAttributes.formats`: comma-separated names of [`crate::files::Format`]s, each
/// at most once.
pub fn formats(raw: Option<&str>) -> Result<Vec<crate::files::Format>, Status> {
    let mut out = Vec::new();
    for name in raw.unwrap_or_default().split(',').map(str::trim) {
        if name.is_empty() {
            continue;
        }
        let Some((_, f)) = crate::files::Format::ALL.iter().find(|(n, _)| *n == name) else {
            let known: Vec<&str> = crate::files::Format::ALL.iter().map(|(n, _)| *n).collect();
            return Err(invalid(format!(
                "volumeAttributes.formats: {:?} is not one of {known:?}",
                name.chars().take(32).collect::<String>()
            )));
        };
        if out.contains(f) {
            return Err(invalid(format!(
                "volumeAttributes.formats lists {name:?} twice"
            )));
        }
        out.push(*f);
    }
    out.sort();
    Ok(out)
}

/// The `jwtAudiences` attribute: at most 16, each giving its own file name.
pub fn jwt_audiences(raw: Option<&str>) -> Result<Vec<String>, Status> {
    let audiences: Vec<String> = raw
        .map(|a| {
            a.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if audiences.len() > 16 {
        return Err(invalid(
            "volumeAttributes.jwtAudiences lists more than 16 audiences",
        ));
    }
    let mut files: BTreeMap<String, &str> = BTreeMap::new();
    for a in &audiences {
        let file = crate::files::audience_file(a);
        let name_len = file.rsplit('/').next().map_or(0, str::len);
        if name_len > crate::writer::MAX_NAME_BYTES {
            return Err(invalid(format!(
                "volumeAttributes.jwtAudiences: audience {:?}… is too long for a file name ({} bytes at most)",
                a.chars().take(32).collect::<String>(),
                crate::writer::MAX_NAME_BYTES - ".token".len()
            )));
        }
        if let Some(other) = files.insert(file.clone(), a) {
            if other == a {
                return Err(invalid(format!(
                    "volumeAttributes.jwtAudiences lists {a:?} twice"
                )));
            }
            return Err(invalid(format!(
                "volumeAttributes.jwtAudiences {other:?} and {a:?} would both be written to {file}; keep one of them"
            )));
        }
    }
    Ok(audiences)
}

/// Where the kubelet put the pod's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenSource {
    /// `secrets` (the CSIDriver sets `serviceAccountTokenInSecrets: true`; Kubernetes
    /// 1.35 and later).
    Secrets,
    /// `volume_context` (older kubelets, or a CSIDriver without that field).
    VolumeContext,
}

impl TokenSource {
    fn label(self) -> &'static str {
        match self {
            Self::Secrets => "secrets",
            Self::VolumeContext => "volume_context",
        }
    }
}

/// The token for `audience` from the kubelet's `serviceAccount.tokens` JSON: from the
/// request's `secrets` when the kubelet put it there (a CSIDriver with
/// `serviceAccountTokenInSecrets: true`), else from `volume_context`.
fn pod_token(
    secrets: &BTreeMap<String, String>,
    ctx: &BTreeMap<String, String>,
    audience: &str,
) -> Result<(String, TokenSource), Status> {
    let (raw, source) = match (secrets.get(CTX_TOKENS), ctx.get(CTX_TOKENS)) {
        (Some(raw), _) => (raw, TokenSource::Secrets),
        (None, Some(raw)) => (raw, TokenSource::VolumeContext),
        (None, None) => {
            return Err(invalid(format!(
                "{CTX_TOKENS} is in neither secrets nor volume_context: the CSIDriver must request a token for audience {audience:?} (spec.tokenRequests; with serviceAccountTokenInSecrets: true the kubelet passes it in secrets)"
            )));
        }
    };
    let field = source.label();
    let tokens: BTreeMap<String, serde_json::Value> = serde_json::from_str(raw).map_err(|_| {
        invalid(format!(
            "{field}[{CTX_TOKENS}] is not the kubelet's token map"
        ))
    })?;
    tokens
        .get(audience)
        .and_then(|t| t.get("token"))
        .and_then(serde_json::Value::as_str)
        .map(|t| (t.to_owned(), source))
        .ok_or_else(|| invalid(format!("{field}[{CTX_TOKENS}] has no token for audience {audience:?}; add it to the CSIDriver's spec.tokenRequests")))
}

#[tonic::async_trait]
impl pb::identity_server::Identity for CsiService {
    async fn get_plugin_info(
        &self,
        _: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        // Node service only: no CONTROLLER_SERVICE, no topology constraints.
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities: vec![],
        }))
    }

    async fn probe(
        &self,
        _: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        Ok(Response::new(pb::ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for CsiService {
    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let volume_id = r.volume_id.clone();
        let result = self.publish(r).await;
        match &result {
            Ok(mode) => {
                self.inner
                    .metrics
                    .publish_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.count("publish", mode, tonic::Code::Ok);
            }
            Err(s) => {
                self.count("publish", "unknown", s.code());
                warn!(volume = %volume_id, code = ?s.code(), message = s.message(), "NodePublishVolume refused");
            }
        }
        result.map(|_| Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id is required"));
        }
        if r.target_path.is_empty() {
            return Err(invalid("target_path is required"));
        }
        let lock = self.lock_for(&r.volume_id);
        let _held = lock.lock().await;
        let result = self
            .inner
            .files
            .unpublish(&r.volume_id, Path::new(&r.target_path));
        self.count(
            "unpublish",
            "any",
            result.as_ref().err().map_or(tonic::Code::Ok, |s| s.code()),
        );
        result?;
        info!(volume = %r.volume_id, target = %r.target_path, "volume unpublished");
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::{Rpc, Type, rpc::Type as RpcType};
        // VOLUME_MOUNT_GROUP: the kubelet hands us the pod's fsGroup for file ownership.
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: vec![pb::NodeServiceCapability {
                r#type: Some(Type::Rpc(Rpc {
                    r#type: RpcType::VolumeMountGroup as i32,
                })),
            }],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.inner.config.node_id.clone(),
            ..Default::default()
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tokens(audience: &str, token: &str) -> BTreeMap<String, String> {
        let map = serde_json::json!({audience: {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}});
        BTreeMap::from([(CTX_TOKENS.to_owned(), map.to_string())])
    }

    #[test]
    fn the_pod_token_comes_from_secrets_first_then_the_volume_context() {
        let none = BTreeMap::new();
        let (t, source) = pod_token(&tokens("sigil-csi", "s"), &none, "sigil-csi").unwrap();
        assert_eq!((t.as_str(), source), ("s", TokenSource::Secrets));
        let (t, source) = pod_token(&none, &tokens("sigil-csi", "v"), "sigil-csi").unwrap();
        assert_eq!((t.as_str(), source), ("v", TokenSource::VolumeContext));
        // Both (a kubelet never sends both): secrets win.
        let (t, _) = pod_token(
            &tokens("sigil-csi", "s"),
            &tokens("sigil-csi", "v"),
            "sigil-csi",
        )
        .unwrap();
        assert_eq!(t, "s");

        let e = pod_token(&none, &none, "sigil-csi").unwrap_err();
        assert!(
            e.message().contains("neither secrets nor volume_context")
                && e.message().contains("tokenRequests"),
            "{e:?}"
        );
        let e = pod_token(&tokens("other", "s"), &none, "sigil-csi").unwrap_err();
        assert!(
            e.message().starts_with("secrets[") && e.message().contains("\"sigil-csi\""),
            "{e:?}"
        );
        let bad = BTreeMap::from([(CTX_TOKENS.to_owned(), "not json".to_owned())]);
        let e = pod_token(&bad, &none, "sigil-csi").unwrap_err();
        assert!(e.message().contains("not the kubelet's token map"), "{e:?}");
        // Nothing of a token is ever in an error.
        assert!(!e.message().contains("not json"));
    }

    #[test]
    fn formats_are_known_names_each_once() {
        use crate::files::Format;
        assert_eq!(formats(None).unwrap(), vec![]);
        assert_eq!(
            formats(Some("credential-bundle, istio,grpc")).unwrap(),
            vec![Format::Istio, Format::Grpc, Format::CredentialBundle]
        );
        assert_eq!(formats(Some("spiffe-fs")).unwrap(), vec![Format::SpiffeFs]);
        let e = formats(Some("istio,../../etc")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("formats"), "{e:?}");
        assert!(formats(Some("istio,istio")).is_err());
    }

    #[test]
    fn file_modes_are_capped() {
        for ok in ["0440", "0644", "0o600", "400"] {
            assert!(file_mode(ok).is_ok(), "{ok}");
        }
        for bad in ["0666", "0755", "0500", "0046", "0040", "1777", "x"] {
            let e = file_mode(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(e.message().contains("fileMode"), "{bad}: {e:?}");
        }
    }

    #[test]
    fn the_pods_fs_group_wins() {
        assert_eq!(fs_group(None, "").ok(), Some(None));
        assert_eq!(fs_group(Some("7".into()), "").ok(), Some(Some(7)));
        assert_eq!(fs_group(None, "2000").ok(), Some(Some(2000)));
        assert_eq!(fs_group(Some("2000".into()), "2000").ok(), Some(Some(2000)));
        let e = fs_group(Some("0".into()), "2000").unwrap_err();
        assert!(
            e.message().contains("differs from the pod's fsGroup"),
            "{e:?}"
        );
        assert!(fs_group(None, "wheel").is_err());
    }

    #[test]
    fn audiences_sharing_a_file_name_are_refused() {
        assert_eq!(
            jwt_audiences(Some("db, https://vault.example")).ok(),
            Some(vec!["db".to_owned(), "https://vault.example".to_owned()])
        );
        let e = jwt_audiences(Some("a/b,a:b")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("jwt/a_b.token"), "{e:?}");
        assert!(
            jwt_audiences(Some("db,db"))
                .unwrap_err()
                .message()
                .contains("twice")
        );
        assert!(jwt_audiences(Some(&"a".repeat(300))).is_err());
        let many = (0..17).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        assert!(jwt_audiences(Some(&many)).is_err());
    }
}
