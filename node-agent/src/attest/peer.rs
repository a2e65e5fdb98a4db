//! Who is on the other end of a Unix socket, pinned so a recycled PID cannot borrow an
//! identity.
//!
//! A PID is only a number: the process that connected may exit, and the number go to
//! another process, before the agent reads `/proc/<pid>`. So at accept:
//!
//! 1. SO_PEERCRED gives the pid, uid and gid the kernel recorded at `connect()`, and
//!    SO_PEERPIDFD a pidfd of the process that connected (Linux 6.5+): a handle on that
//!    process, which no other process can ever stand for.
//! 2. `/proc/<pid>` is opened as a directory. Every later read about the process (its
//!    stat, cgroups, status, executable) goes through that directory fd
//!    ([`PeerProcess::proc_dir`]): procfs binds it to the process it named when it was
//!    opened, and reads through it fail once that process is gone, never reaching a
//!    newcomer with the same PID.
//! 3. Then the pidfd is polled: if the process that connected has already exited, the
//!    directory opened in 2. may belong to a newcomer, and the caller is refused. If it is
//!    still alive, its PID can't have been reused between 1. and 3., so the directory is
//!    the connecting process's. The window is closed: there is no moment where a
//!    recycled PID is read as the caller.
//!
//! The start time (field 22 of `stat`) is also pinned, and
//! [`PeerProcess::check_same_process`] checks it (and the pidfd) again before and after
//! attestation. On kernels without SO_PEERPIDFD the pidfd check is skipped, and the window
//! between `connect()` and opening `/proc/<pid>` at accept remains (the start time then
//! pins whatever process held the PID at accept).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// A connected peer process, pinned by its `/proc` directory, its start time and, when the
/// kernel gives one, its pidfd.
#[derive(Debug, Clone)]
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
    /// `/proc/<pid>` of this very process, opened once.
    dir: Arc<std::fs::File>,
    /// The kernel's handle on the process that connected (SO_PEERPIDFD).
    pidfd: Option<Arc<OwnedFd>>,
}

impl PeerProcess {
    /// Identifies the peer of a connected Unix stream (see the module documentation for
    /// why the order of these steps closes the PID-reuse window).
    pub fn of_stream(stream: &UnixStream, proc_root: &Path) -> Result<Self, PeerError> {
        let cred = stream.peer_cred().map_err(PeerError::Credentials)?;
        let pid = cred.pid().filter(|p| *p > 0).ok_or(PeerError::NoPid)?;
        let pidfd = match nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd)
        {
            Ok(fd) => Some(fd),
            // A kernel older than 6.5: start-time pinning alone.
            Err(nix::errno::Errno::ENOPROTOOPT | nix::errno::Errno::EINVAL) => None,
            Err(e) => return Err(PeerError::Credentials(e.into())),
        };
        let mut peer = Self::pin(pid, cred.uid(), cred.gid(), proc_root)?;
        peer.pidfd = pidfd.map(Arc::new);
        // After /proc/<pid> was opened: the process that connected must still be there.
        peer.check_alive()?;
        Ok(peer)
    }

    /// Pins a known PID (for tests and for the Broker API's PID references): opens
    /// `/proc/<pid>` and reads the start time through it.
    pub fn pin(pid: i32, uid: u32, gid: u32, proc_root: &Path) -> Result<Self, PeerError> {
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(proc_root.join(pid.to_string()))
            .map_err(|_| PeerError::Exited(pid))?;
        let mut peer = Self {
            pid,
            uid,
            gid,
            start_time: 0,
            proc_root: proc_root.to_path_buf(),
            dir: Arc::new(dir),
            pidfd: None,
        };
        peer.start_time = start_time_in(&peer.proc_dir()).ok_or(PeerError::Exited(pid))?;
        Ok(peer)
    }

    /// Fails when the process that connected has exited (its pidfd is readable), when the
    /// kernel gave a pidfd.
    fn check_alive(&self) -> Result<(), PeerError> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let Some(pidfd) = &self.pidfd else {
            return Ok(());
        };
        let mut fds = [PollFd::new(pidfd.as_ref(), PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match poll(&mut fds, Some(&zero)) {
            Ok(0) => Ok(()),
            // Readable: the process has exited. An error: we can't tell, so refuse.
            _ => Err(PeerError::Exited(self.pid)),
        }
    }

    /// Fails when the PID no longer belongs to the process that connected.
    pub fn check_same_process(&self) -> Result<(), PeerError> {
        self.check_alive()?;
        match start_time_in(&self.proc_dir()) {
            None => Err(PeerError::Exited(self.pid)),
            Some(t) if t != self.start_time => Err(PeerError::Recycled(self.pid)),
            Some(_) => Ok(()),
        }
    }

    /// The process's `/proc/<pid>` directory, as the path of the directory fd opened when
    /// it was pinned (`/proc/self/fd/<n>`): paths under it reach this process's files, or
    /// nothing once it is gone, never those of a later process with the same PID.
    pub fn proc_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()))
    }

    /// The proc root this peer was pinned under.
    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }
}

/// Start time of `pid` (clock ticks since boot), or None when it does not exist.
pub fn start_time(proc_root: &Path, pid: i32) -> Option<u64> {
    start_time_in(&proc_root.join(pid.to_string()))
}

/// Start time of the process whose `/proc/<pid>` is `dir`.
fn start_time_in(dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
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
