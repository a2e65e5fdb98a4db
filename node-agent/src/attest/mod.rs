//! Workload attestation: who is calling the Workload API, as facts (selectors) that come
//! from the kernel and the API server/kubelet, never from the caller.
//!
//! - [`peer`]: SO_PEERCRED, SO_PEERPIDFD and `/proc/<pid>` pinned at accept (a recycled
//!   PID is never read as the caller);
//! - [`cgroup`]: `/proc/<pid>/cgroup` → pod UID and container ID;
//! - [`k8s`]: the pod and container from an event-driven pod source → `k8s:` selectors;
//! - [`kubelet`]: the kubelet's `/pods` as that source, where the API-server watch is not used;
//! - [`unix`]: uid/gid/user/group/path/sha256 → `unix:` selectors.

pub mod cgroup;
pub mod k8s;
pub mod kubelet;
pub mod peer;
pub mod unix;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sigil_identity::entry::Selector;

use self::k8s::{K8sAttestError, PodMatch, PodSource};
use self::peer::{PeerError, PeerProcess};

/// Why a caller could not be attested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The peer process is gone or its PID was recycled.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// Cgroups unreadable or inconsistent.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    /// In a pod cgroup, but the pod/container could not be found in time.
    #[error(transparent)]
    Pod(#[from] K8sAttestError),
}

impl AttestError {
    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AttestError::Peer(PeerError::Recycled(_)) => "pid_recycled",
            AttestError::Peer(_) => "peer",
            AttestError::Cgroup(_) => "cgroup",
            AttestError::Pod(_) => "pod_not_found",
        }
    }
}

/// The result of attesting a caller.
#[derive(Debug, Clone, Default)]
pub struct Attested {
    /// Every selector (unix and k8s).
    pub selectors: BTreeSet<Selector>,
    /// The pod, when the caller runs in one.
    pub pod: Option<PodMatch>,
}

/// Combines the unix and k8s attestors.
#[derive(Debug)]
pub struct WorkloadAttestor {
    unix: unix::UnixAttestor,
    pods: Option<Arc<dyn PodSource>>,
    proc_root: PathBuf,
    pod_timeout: Duration,
}

impl WorkloadAttestor {
    /// `pods` is None when the agent runs without Kubernetes (unix selectors only).
    pub fn new(
        proc_root: PathBuf,
        etc: PathBuf,
        pods: Option<Arc<dyn PodSource>>,
        pod_timeout: Duration,
    ) -> Self {
        Self {
            unix: unix::UnixAttestor::new(etc),
            pods,
            proc_root,
            pod_timeout,
        }
    }

    /// The proc root used for peers.
    pub fn proc_root(&self) -> &std::path::Path {
        &self.proc_root
    }

    /// Attests `peer`. The PID is checked against its pinned start time before and after
    /// reading anything about it.
    pub async fn attest(&self, peer: &PeerProcess) -> Result<Attested, AttestError> {
        peer.check_same_process()?;
        let mut out = Attested::default();
        out.selectors.extend(self.unix.attest(peer).await);
        if let Some(pc) = cgroup::pod_container_of(&peer.proc_dir(), peer.pid)?
            && let Some(source) = &self.pods
        {
            let m = k8s::find_container(
                source.as_ref(),
                &pc.pod_uid,
                &pc.container_id,
                self.pod_timeout,
            )
            .await?;
            out.selectors.extend(k8s::selectors(&m));
            out.pod = Some(m);
        }
        peer.check_same_process()?;
        Ok(out)
    }
}
