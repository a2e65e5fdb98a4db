//! Who is on the other end of a Unix socket, pinned so a recycled PID cannot borrow an
//! identity.
//!
//! At accept time we read SO_PEERCRED (pid, uid, gid) and the process's start time from
//! `/proc/<pid>/stat`. Before trusting anything derived from the PID (its cgroups, its
//! binary) and again after attestation, [`PeerProcess::check_same_process`] re-reads the
//! start time: if the process has exited, or the PID now belongs to a process that started
//! at another time, the caller is refused.

use std::path::{Path, PathBuf};

use tokio::net::UnixStream;

/// Errors identifying a peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// SO_PEERCRED failed.
    #[error("cannot read peer credentials: {0}")]
    Credentials(std::io::Error),
    /// The kernel gave no PID (peer in another PID namespace we cannot see).
    #[error("peer PID is not visible from the agent's PID namespace; run the agent with hostPID")]
    NoPid,
    /// The process is gone.
    #[error("process {0} exited before it could be attested")]
    Exited(i32),
    /// The PID was reused by another process.
    #[error("PID {0} now belongs to a different process (recycled PID); refusing")]
    Recycled(i32),
}

/// A connected peer process, pinned by its start time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerProcess {
    /// Process ID in the agent's PID namespace.
    pub pid: i32,
    /// Effective UID at connect time.
    pub uid: u32,
    /// Effective GID at connect time.
    pub gid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/<pid>/stat).
    pub start_time: u64,
    proc_root: PathBuf,
}

impl PeerProcess {
    /// Identifies the peer of a connected Unix stream.
    pub fn of_stream(stream: &UnixStream, proc_root: &Path) -> Result<Self, PeerError> {
        let cred = stream.peer_cred().map_err(PeerError::Credentials)?;
        let pid = cred.pid().filter(|p| *p > 0).ok_or(PeerError::NoPid)?;
        Self::pin(pid, cred.uid(), cred.gid(), proc_root)
    }

    /// Pins a known PID (for tests and for the Broker API's PID references).
    pub fn pin(pid: i32, uid: u32, gid: u32, proc_root: &Path) -> Result<Self, PeerError> {
        let start_time = start_time(proc_root, pid).ok_or(PeerError::Exited(pid))?;
        Ok(Self {
            pid,
            uid,
            gid,
            start_time,
            proc_root: proc_root.to_path_buf(),
        })
    }

    /// Fails when the PID no longer belongs to the process that connected.
    pub fn check_same_process(&self) -> Result<(), PeerError> {
        match start_time(&self.proc_root, self.pid) {
            None => Err(PeerError::Exited(self.pid)),
            Some(t) if t != self.start_time => Err(PeerError::Recycled(self.pid)),
            Some(_) => Ok(()),
        }
    }

    /// `/proc/<pid>`.
    pub fn proc_dir(&self) -> PathBuf {
        self.proc_root.join(self.pid.to_string())
    }

    /// The proc root this peer was pinned under.
    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }
}

/// Start time of `pid` (clock ticks since boot), or None when it does not exist.
pub fn start_time(proc_root: &Path, pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces and ')';
    // fields after the LAST ')' are space-separated, starting with field 3 (state).
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_stable() {
        let proc = Path::new("/proc");
        let me = std::process::id() as i32;
        let a = start_time(proc, me).unwrap();
        assert_eq!(start_time(proc, me), Some(a));
        let p = PeerProcess::pin(me, 0, 0, proc).unwrap();
        p.check_same_process().unwrap();
    }

    #[test]
    fn exited_process_is_detected() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let pinned = PeerProcess::pin(pid, 0, 0, Path::new("/proc"));
        child.wait().unwrap();
        if let Ok(p) = pinned {
            assert!(matches!(p.check_same_process(), Err(PeerError::Exited(_))));
        }
    }

    #[test]
    fn parses_comm_with_parentheses() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("42")).unwrap();
        let fields: Vec<String> = (3..=30).map(|i| i.to_string()).collect();
        std::fs::write(
            dir.path().join("42/stat"),
            format!("42 (we ird) (x) {}", fields.join(" ")),
        )
        .unwrap();
        assert_eq!(start_time(dir.path(), 42), Some(22));
    }
}
