//! The agent's Unix-socket transport, shared by the Workload API and the Broker API:
//! accepting connections with the caller's process pinned from its peer credentials
//! ([`incoming`], [`PeerStream`], [`PeerInfo`]), the sockets' permissions ([`bind_public`],
//! [`bind_private`]), the bounds every call on them has, and their metrics with one way to
//! refuse a call ([`ApiMetrics::refuse`]: counted, logged, and a precise status).

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::server::Connected;
use tracing::{info, warn};

use crate::attest::peer::{PeerError, PeerProcess};
use crate::h2_authority::AuthorityFix;
use crate::limits::{Caps, Slot, WorkloadKey};

/// Largest request accepted (requests are tiny; a JWT to validate is the largest).
pub const MAX_REQUEST: usize = 64 * 1024;
/// Largest response sent (many SVIDs with chains and bundles).
pub const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// Deadline of unary calls (JWT minting goes to the operator).
pub const UNARY_TIMEOUT: Duration = Duration::from_secs(30);

/// Which API a socket serves: the metric prefix and the name in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Api {
    /// The SPIFFE Workload API (`sigil_workload_api_*`).
    #[default]
    Workload,
    /// The SPIFFE Broker API, for sigil-csi (`sigil_broker_api_*`).
    Broker,
}

impl Api {
    /// The name in logs and metric help.
    pub fn name(self) -> &'static str {
        match self {
            Api::Workload => "Workload API",
            Api::Broker => "Broker API",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Api::Workload => "sigil_workload_api",
            Api::Broker => "sigil_broker_api",
        }
    }
}

/// Labels of a call or a denial (`reason` is empty on calls).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// The RPC (`connection` for a connection refused at accept).
    pub rpc: String,
    /// Short reason.
    pub reason: String,
}

/// The metrics of one API's socket.
#[derive(Debug, Clone, Default)]
pub struct ApiMetrics {
    api: Api,
    /// Calls by RPC.
    pub calls: Family<DenialLabels, Counter>,
    /// Denials by RPC and reason.
    pub denials: Family<DenialLabels, Counter>,
    /// Open streams.
    pub open_streams: Gauge,
    /// Open connections.
    pub open_connections: Gauge,
    /// SDS responses a proxy rejected (NACKs).
    pub sds_nacks: Counter,
}

impl ApiMetrics {
    /// Metrics of `api`'s socket.
    pub fn new(api: Api) -> Self {
        Self {
            api,
            ..Self::default()
        }
    }

    /// Registers under `sigil_workload_api_*` or `sigil_broker_api_*`.
    pub fn register(&self, registry: &mut Registry) {
        let name = self.api.name();
        let r = registry.sub_registry_with_prefix(self.api.prefix());
        r.register("calls", format!("{name} calls by RPC"), self.calls.clone());
        r.register(
            "denials",
            format!("{name} calls denied, by RPC and reason"),
            self.denials.clone(),
        );
        r.register(
            "open_streams",
            format!("Open {name} streams"),
            self.open_streams.clone(),
        );
        r.register(
            "open_connections",
            format!("Open {name} connections"),
            self.open_connections.clone(),
        );
        if self.api == Api::Workload {
            r.register(
                "sds_nacks",
                "SDS responses a proxy rejected (NACK)",
                self.sds_nacks.clone(),
            );
        }
    }

    /// Counts a proxy's NACK of an SDS response.
    pub fn sds_nack(&self) {
        self.sds_nacks.inc();
    }

    /// Counts a call.
    pub fn call(&self, rpc: &str) {
        self.calls
            .get_or_create(&DenialLabels {
                rpc: rpc.into(),
                reason: String::new(),
            })
            .inc();
    }

    /// Counts a denial.
    pub fn deny(&self, rpc: &str, reason: &str) {
        self.denials
            .get_or_create(&DenialLabels {
                rpc: rpc.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Refuses a call: counts it under `reason`, logs it with the caller's process when it
    /// is known, and returns `status` (whose message says what to fix).
    pub fn refuse(
        &self,
        rpc: &str,
        reason: &str,
        status: Status,
        peer: Option<&PeerProcess>,
    ) -> Status {
        self.deny(rpc, reason);
        warn!(
            api = self.api.name(),
            rpc,
            reason,
            pid = peer.map(|p| p.pid),
            uid = peer.map(|p| p.uid),
            message = status.message(),
            "call denied"
        );
        status
    }
}

/// Who connected: the pinned peer process, or why it could not be identified.
#[derive(Debug, Clone)]
pub struct PeerInfo(pub Result<Arc<PeerProcess>, Arc<PeerError>>);

/// A Unix connection with its peer identified at accept time, read through
/// [`AuthorityFix`] so gRPC C-core clients (py-spiffe) are served.
#[derive(Debug)]
pub struct PeerStream {
    stream: AuthorityFix<UnixStream>,
    peer: PeerInfo,
    slot: Slot,
    refused: bool,
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &read
            && e.kind() == std::io::ErrorKind::InvalidData
            && !this.refused
        {
            // The HPACK shim refused the client's bytes (a frame or header block over
            // its bounds, or malformed framing): the connection ends here.
            this.refused = true;
            this.slot.refuse(
                "http2_refused",
                this.peer.0.as_ref().map_or(0, |p| p.pid),
                e.to_string(),
            );
        }
        read
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Binds a socket every local user may connect to (the Workload API's: workloads run as
/// any UID; who they are is decided by attestation, not by file permissions), replacing
/// a stale one.
pub fn bind_public(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => info!(path = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}

/// Makes `alias` (one file name) in `socket`'s directory a relative symlink to it, replacing
/// a link left by an earlier run. Anything else under that name is left alone: an error.
pub fn link_alias(socket: &Path, alias: &str) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let (Some(dir), Some(target)) = (socket.parent(), socket.file_name()) else {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "the socket path has no file name",
        ));
    };
    if alias.contains('/') || alias == "." || alias == ".." || std::ffi::OsStr::new(alias) == target
    {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "the alias must be one file name, other than the socket's",
        ));
    }
    let link = dir.join(alias);
    match std::fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(&link)?,
        Ok(_) => {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{} exists and is not a link", link.display()),
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::os::unix::fs::symlink(target, &link)
}

/// Removes the alias [`link_alias`] made, when it is still a link to `socket` (what
/// anyone else put under that name is left alone). Called when the socket goes away.
pub fn unlink_alias(socket: &Path, alias: &str) {
    let (Some(dir), Some(target)) = (socket.parent(), socket.file_name()) else {
        return;
    };
    let link = dir.join(alias);
    if std::fs::read_link(&link).is_ok_and(|t| t.as_os_str() == target) {
        let _ = std::fs::remove_file(&link);
    }
}

/// A socket path this process bound, remembered by its inode, so that shutdown removes
/// the path only while it is still this process's socket: a successor that already bound
/// the same path (a DaemonSet update with surge) keeps its own.
#[derive(Debug, Clone)]
pub struct BoundSocket {
    path: std::path::PathBuf,
    inode: (u64, u64),
}

impl BoundSocket {
    /// Remembers the socket now at `path` (call right after binding it).
    pub fn at(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path)?;
        Ok(BoundSocket {
            path: path.to_owned(),
            inode: (m.dev(), m.ino()),
        })
    }

    /// Removes the path if it is still the socket remembered; returns whether it did.
    pub fn remove(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.inode => std::fs::remove_file(&self.path).is_ok(),
            _ => false,
        }
    }

    /// Removes the path as soon as `cancel` fires, before any drain: from then on a
    /// client that connects gets ENOENT at once (and its retry finds the successor's
    /// socket), not a listener that no longer accepts.
    pub async fn remove_on(self, cancel: CancellationToken) {
        cancel.cancelled().await;
        if self.remove() {
            info!(path = %self.path.display(), "socket removed");
        }
    }
}

/// Binds a socket only root reaches (the Broker API's: its directory 0700, the socket
/// 0600), replacing a stale one.
pub fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    // A stale socket from a previous run (absent is fine too).
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepted connections with their peers pinned, until `cancel`; a connection over one of
/// `caps` is closed at once (counted and logged there).
pub fn incoming(
    listener: UnixListener,
    proc_root: std::path::PathBuf,
    caps: Arc<Caps>,
    cancel: CancellationToken,
) -> impl Stream<Item = std::io::Result<PeerStream>> {
    futures::stream::unfold(
        (listener, proc_root, caps, cancel),
        |(listener, proc_root, caps, cancel)| async move {
            loop {
                let accepted = tokio::select! {
                    () = cancel.cancelled() => return None,
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((stream, _)) => {
                        // Pin the PID now: the process that connected, not whoever holds the
                        // PID later.
                        let peer = PeerProcess::of_stream(&stream, &proc_root)
                            .map(Arc::new)
                            .map_err(Arc::new);
                        let (key, pid) = match &peer {
                            Ok(p) => (WorkloadKey::of(p), p.pid),
                            Err(_) => {
                                let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
                                (WorkloadKey::Uid(uid), 0)
                            }
                        };
                        let slot = match caps.admit(key.clone()) {
                            Ok(slot) => slot,
                            Err(r) => {
                                caps.refuse(r.reason, &key, pid, r.detail);
                                continue; // dropped: closed at once
                            }
                        };
                        let s = PeerStream {
                            stream: AuthorityFix::new(stream),
                            peer: PeerInfo(peer),
                            slot,
                            refused: false,
                        };
                        return Some((Ok(s), (listener, proc_root, caps, cancel)));
                    }
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `socket` next to `api.sock` (Istio's name): a relative link, so it resolves inside
    /// a pod's bind mount of the directory; a link left by an earlier run is replaced;
    /// anything else under that name, and names that are not one file name, are refused.
    #[tokio::test]
    async fn the_socket_alias_is_a_relative_link_next_to_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let _listener = bind_public(&sock).unwrap();
        link_alias(&sock, "socket").unwrap();
        link_alias(&sock, "socket").unwrap();
        let link = dir.path().join("socket");
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("api.sock"));
        UnixStream::connect(&link).await.unwrap();
        for bad in ["../socket", "a/b", "..", "api.sock"] {
            assert!(link_alias(&sock, bad).is_err(), "{bad}");
        }
        std::fs::write(dir.path().join("plain"), b"").unwrap();
        let e = link_alias(&sock, "plain").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);

        // When the socket goes, its alias goes; what is not our link stays.
        unlink_alias(&sock, "plain");
        assert!(dir.path().join("plain").exists());
        std::os::unix::fs::symlink("elsewhere", dir.path().join("other")).unwrap();
        unlink_alias(&sock, "other");
        assert!(std::fs::symlink_metadata(dir.path().join("other")).is_ok());
        unlink_alias(&sock, "socket");
        assert!(
            std::fs::symlink_metadata(&link).is_err(),
            "the alias is removed"
        );
    }

    #[tokio::test]
    async fn shutdown_removes_the_socket_at_once_but_never_a_successors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let _old = bind_public(&sock).unwrap();
        let ours = BoundSocket::at(&sock).unwrap();
        // A successor bound the same path (its bind replaced ours): ours is gone, and
        // removing "ours" must leave the successor's socket in place.
        let _new = bind_public(&sock).unwrap();
        assert!(!ours.remove());
        UnixStream::connect(&sock).await.unwrap();

        let theirs = BoundSocket::at(&sock).unwrap();
        let cancel = CancellationToken::new();
        let removal = tokio::spawn(theirs.remove_on(cancel.clone()));
        tokio::task::yield_now().await;
        assert!(sock.exists(), "removed only when shutdown begins");
        cancel.cancel();
        removal.await.unwrap();
        assert!(!sock.exists());
        assert_eq!(
            UnixStream::connect(&sock).await.unwrap_err().kind(),
            std::io::ErrorKind::NotFound,
            "a client sees ENOENT, not a listener that no longer accepts"
        );
    }
}
