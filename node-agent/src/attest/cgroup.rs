//! Reading a process's pod UID and container ID from `/proc/<pid>/cgroup`.
//!
//! The kernel is the source of truth: a process cannot choose its cgroup path. We accept
//! the path shapes kubelets produce with either cgroup driver and the common runtimes:
//!
//! - cgroupfs driver:  `/kubepods/besteffort/pod<uid>/<container-id>`
//!   (also `/kubepods/pod<uid>/<id>` for Guaranteed pods, and with docker's `/docker/` or
//!   nested prefixes in front);
//! - systemd driver:   `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`
//!   (and `crio-<id>.scope`, `docker-<id>.scope`, `cri-o-<id>.scope`);
//! - cgroup v1 (`N:controller:/path`) and v2 (`0::/path`) line forms; the first line that
//!   yields a pod wins, and all lines that yield one must agree.

use std::path::Path;

/// What the cgroup path says about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// The pod's UID, with dashes (as in `metadata.uid`).
    pub pod_uid: String,
    /// The container ID (64 hex chars usually), without runtime prefix.
    pub container_id: String,
}

/// Errors reading cgroups.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// `/proc/<pid>/cgroup` could not be read (the process is gone, or no permission).
    #[error("cannot read cgroups of pid {pid}: {source}")]
    Read {
        /// The process.
        pid: i32,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Two cgroup lines point at different pods or containers.
    #[error("cgroup lines of pid {pid} disagree about the pod/container ({first:?} vs {second:?})")]
    Inconsistent {
        /// The process.
        pid: i32,
        /// One reading.
        first: PodContainer,
        /// The other.
        second: PodContainer,
    },
}

/// Reads and parses the cgroups of process `pid`, whose `/proc/<pid>` directory is
/// `proc_dir` ([`super::peer::PeerProcess::proc_dir`]).
pub fn pod_container_of(proc_dir: &Path, pid: i32) -> Result<Option<PodContainer>, CgroupError> {
    let text = std::fs::read_to_string(proc_dir.join("cgroup"))
        .map_err(|source| CgroupError::Read { pid, source })?;
    parse_cgroup_file(&text).map_err(|(first, second)| CgroupError::Inconsistent {
        pid,
        first,
        second,
    })
}

/// Parses the content of a `/proc/<pid>/cgroup` file. `Ok(None)` means the process is not
/// in a pod (a host process); `Err` carries two disagreeing readings.
pub fn parse_cgroup_file(text: &str) -> Result<Option<PodContainer>, (PodContainer, PodContainer)> {
    let mut found: Option<PodContainer> = None;
    for line in text.lines() {
        // hierarchy-ID:controller-list:path; the path may itself contain ':'.
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if let Some(pc) = parse_cgroup_path(path) {
            match &found {
                None => found = Some(pc),
                Some(f) if *f == pc => {}
                Some(f) => return Err((f.clone(), pc)),
            }
        }
    }
    Ok(found)
}

/// Extracts pod UID and container ID from one cgroup path, if it has the shape of a
/// container in a pod.
pub fn parse_cgroup_path(path: &str) -> Option<PodContainer> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Find the pod segment, then the container segment right after it.
    for (i, seg) in segments.iter().enumerate() {
        let Some(uid) = pod_uid_from_segment(seg) else {
            continue;
        };
        let container = segments
            .get(i + 1)
            .and_then(|s| container_id_from_segment(s))?;
        return Some(PodContainer {
            pod_uid: uid,
            container_id: container,
        });
    }
    None
}

fn pod_uid_from_segment(seg: &str) -> Option<String> {
    // systemd: kubepods-besteffort-pod<uid_underscored>.slice or kubepods-pod<uid>.slice
    let core = seg.strip_suffix(".slice").unwrap_or(seg);
    let idx = core.rfind("pod")?;
    if idx > 0 && !core[..idx].ends_with('-') && !core[..idx].ends_with('_') {
        return None;
    }
    if idx == 0 && core != seg {
        return None; // "pod....slice" without kubepods prefix is not a kubelet shape
    }
    let raw = &core[idx + 3..];
    let uid = raw.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

fn is_uid(s: &str) -> bool {
    // RFC 4122 textual form: 8-4-4-4-12 hex.
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && [8, 4, 4, 4, 12]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn container_id_from_segment(seg: &str) -> Option<String> {
    let core = seg.strip_suffix(".scope").unwrap_or(seg);
    let id = [
        "cri-containerd-",
        "crio-conmon-",
        "crio-",
        "cri-o-",
        "docker-",
        "containerd-",
    ]
    .iter()
    .find_map(|p| core.strip_prefix(p))
    .unwrap_or(core);
    (id.len() >= 12 && id.len() <= 128 && id.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| id.to_ascii_lowercase())
}

/// Strips the runtime scheme from a `status.containerStatuses[].containerID`
/// (`containerd://<id>`, `cri-o://<id>`, `docker://<id>`).
pub fn strip_runtime_prefix(container_id: &str) -> &str {
    container_id
        .split_once("://")
        .map(|(_, id)| id)
        .unwrap_or(container_id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const UID: &str = "7d2c0c4e-2a2b-4d8e-9c1f-0123456789ab";
    const CID: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

    fn expect(path: &str) {
        let pc = parse_cgroup_path(path).unwrap_or_else(|| panic!("no pod in {path}"));
        assert_eq!(pc.pod_uid, UID, "{path}");
        assert_eq!(pc.container_id, CID, "{path}");
    }

    #[test]
    fn cgroupfs_driver_shapes() {
        expect(&format!("/kubepods/besteffort/pod{UID}/{CID}"));
        expect(&format!("/kubepods/burstable/pod{UID}/{CID}"));
        expect(&format!("/kubepods/pod{UID}/{CID}"));
        expect(&format!(
            "/docker/abcdef/kubepods/besteffort/pod{UID}/{CID}"
        ));
    }

    #[test]
    fn systemd_driver_shapes() {
        let u = UID.replace('-', "_");
        for runtime in ["cri-containerd", "crio", "docker", "cri-o"] {
            expect(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/{runtime}-{CID}.scope"
            ));
        }
        expect(&format!(
            "/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{CID}.scope"
        ));
    }

    #[test]
    fn v1_and_v2_lines() {
        let v1 = format!(
            "12:pids:/kubepods/besteffort/pod{UID}/{CID}\n11:memory:/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/\n"
        );
        assert_eq!(parse_cgroup_file(&v1).unwrap().unwrap().pod_uid, UID);
        let v2 = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{CID}.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(parse_cgroup_file(&v2).unwrap().unwrap().container_id, CID);
    }

    #[test]
    fn host_processes_are_not_pods() {
        assert_eq!(parse_cgroup_file("0::/\n").unwrap(), None);
        assert_eq!(
            parse_cgroup_file("0::/system.slice/sshd.service\n4:memory:/user.slice\n").unwrap(),
            None
        );
        // A pod cgroup itself (the pause level) with no container below it.
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}")),
            None
        );
        // Not a UID.
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/besteffort/podnot-a-uid/{CID}")),
            None
        );
        // Not hex.
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}/zzzz-not-hex")),
            None
        );
    }

    #[test]
    fn disagreeing_lines_are_an_error() {
        let other = "11111111-2222-3333-4444-555555555555";
        let text = format!("12:pids:/kubepods/pod{UID}/{CID}\n0::/kubepods/pod{other}/{CID}\n");
        assert!(parse_cgroup_file(&text).is_err());
    }

    #[test]
    fn runtime_prefix() {
        assert_eq!(strip_runtime_prefix("containerd://abc"), "abc");
        assert_eq!(strip_runtime_prefix("abc"), "abc");
    }
}
