//! Pod-shaped cgroups: real processes placed where a kubelet would put a container's, so
//! workload attestation reads the kernel, not a fixture.
//!
//! [`PodContainer::create`] makes the systemd-driver path a kubelet with containerd
//! creates (`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
//! cri-containerd-<id>.scope`) in the cgroup v2 hierarchy (or, on a v1-only machine, in
//! the `pids` v1 hierarchy); [`PodContainer::command`] runs a program inside it;
//! [`PodContainer::mark_running`] writes the container's status into the Pod through the
//! status subresource, as the kubelet does. Dropping it kills what is left inside and
//! removes the cgroups.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::Error;

/// One container of one pod, as a cgroup.
#[derive(Debug)]
pub struct PodContainer {
    /// The pod's UID.
    pub pod_uid: String,
    /// The container ID (64 hex characters).
    pub container_id: String,
    dir: PathBuf,
    created: Vec<PathBuf>,
}

/// The cgroup v2 mount, or failing that a v1 hierarchy to use.
fn cgroup_root() -> Result<PathBuf, Error> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read mountinfo", e))?;
    let mut v1_pids = None;
    for line in mounts.lines() {
        // ... mount-point ... - fstype source options
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (mount_point, fstype) = (
            fields.get(4).copied().unwrap_or(""),
            fields.get(dash + 1).copied().unwrap_or(""),
        );
        if fstype == "cgroup2" {
            return Ok(PathBuf::from(mount_point));
        }
        if fstype == "cgroup"
            && fields
                .get(dash + 3)
                .is_some_and(|o| o.split(',').any(|x| x == "pids"))
        {
            v1_pids = Some(PathBuf::from(mount_point));
        }
    }
    v1_pids.ok_or_else(|| Error::Start {
        what: "pod cgroup".into(),
        reason: "no cgroup2 or pids cgroup mount found".into(),
    })
}

impl PodContainer {
    /// Creates the cgroup of a new container of pod `pod_uid` (needs root).
    pub fn create(pod_uid: &str) -> Result<Self, Error> {
        let root = cgroup_root()?;
        let container_id: String = (0..4).map(|_| format!("{:016x}", rand_u64())).collect();
        let uid_ = pod_uid.replace('-', "_");
        let levels = [
            "kubepods.slice".to_owned(),
            "kubepods-besteffort.slice".to_owned(),
            format!("kubepods-besteffort-pod{uid_}.slice"),
            format!("cri-containerd-{container_id}.scope"),
        ];
        let mut dir = root;
        let mut created = Vec::new();
        for l in levels {
            dir = dir.join(l);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .map_err(|e| Error::io(format!("create cgroup {}", dir.display()), e))?;
                created.push(dir.clone());
            }
        }
        Ok(Self {
            pod_uid: pod_uid.to_owned(),
            container_id,
            dir,
            created,
        })
    }

    /// The cgroup directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `containerd://<id>`, as in `status.containerStatuses[].containerID`.
    pub fn container_id_uri(&self) -> String {
        format!("containerd://{}", self.container_id)
    }

    /// A command that joins this cgroup, then execs `program` (add args as usual).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.dir)
            .arg(program.as_ref());
        cmd
    }

    /// Writes a running status for container `name` (image `image`) into the pod, through
    /// the status subresource, as the kubelet does.
    pub async fn mark_running(
        &self,
        client: &Client,
        namespace: &str,
        pod: &str,
        name: &str,
        image: &str,
    ) -> Result<Pod, Error> {
        let status = serde_json::json!({"status": {
            "phase": "Running",
            "containerStatuses": [{
                "name": name, "image": image, "imageID": format!("{image}@sha256:{}", "0".repeat(64)),
                "containerID": self.container_id_uri(), "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
            }],
        }});
        Api::<Pod>::namespaced(client.clone(), namespace)
            .patch_status(pod, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(|e| Error::Kube(format!("write the status of pod {namespace}/{pod}"), e))
    }
}

impl Drop for PodContainer {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = Command::new("kill").arg("-KILL").arg(pid).status();
            }
        }
        for d in self.created.iter().rev() {
            // A cgroup can be removed once its last process is reaped; retry briefly.
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// A projected token for `pod`'s service account, bound to the pod, for `audience`, valid
/// `expiration_seconds`: what the kubelet mounts into the pod.
pub async fn bound_token(
    client: &Client,
    pod: &Pod,
    audience: &str,
    expiration_seconds: i64,
) -> Result<String, Error> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .ok_or_else(|| Error::Answer(format!("pod {namespace}/{name} names no service account")))?;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.into()]),
            expiration_seconds: Some(expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .create_token_request(&sa, &PostParams::default(), &request)
        .await
        .map_err(|e| Error::Kube(format!("a token for pod {namespace}/{name}"), e))?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| {
            Error::Answer(format!(
                "the TokenRequest for pod {namespace}/{name} returned no token"
            ))
        })
}
