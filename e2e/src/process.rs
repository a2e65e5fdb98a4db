//! Child processes that cannot outlive the test process.
//!
//! Each child is started under `setpriv --pdeathsig KILL`, so the kernel kills it when
//! its parent goes away, even when a test binary exits without running destructors (a
//! shared control plane lives in a `static`) or is killed. The parent the kernel watches
//! is the *thread* that forked, so every child is forked by one thread that lives as
//! long as the process. A [`Supervised`] child is also killed when dropped, which covers
//! a test that panics while owning its own control plane.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};

use crate::Error;

type Request = (Command, mpsc::Sender<std::io::Result<Child>>);

fn forker() -> &'static Mutex<mpsc::Sender<Request>> {
    static FORKER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    FORKER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("sigil-e2e-forker".into())
            .spawn(move || {
                // The sender sits in a static, so this loop ends only with the process.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the e2e forker thread");
        Mutex::new(tx)
    })
}

/// A child process with its output in a log file, killed on drop.
#[derive(Debug)]
pub struct Supervised {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Supervised {
    /// Starts `program args...`, output appended to `log`.
    pub fn start(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Self, Error> {
        // Appended, so a process started again (a restart test) keeps the earlier log.
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        let err = out.try_clone().map_err(|e| Error::io("dup log file", e))?;
        let mut cmd = Command::new("setpriv");
        cmd.arg("--pdeathsig")
            .arg("KILL")
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let (tx, rx) = mpsc::channel();
        forker()
            .lock()
            .map_err(|_| Error::Start {
                what: name.to_owned(),
                reason: "forker lock poisoned".into(),
            })?
            .send((cmd, tx))
            .map_err(|_| Error::Start {
                what: name.to_owned(),
                reason: "forker thread gone".into(),
            })?;
        let child = rx
            .recv()
            .map_err(|_| Error::Start {
                what: name.to_owned(),
                reason: "forker thread gone".into(),
            })?
            .map_err(|e| Error::io(format!("start {} ({})", name, program.display()), e))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of its log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "--- last lines of {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            all[from..].join("\n")
        )
    }

    /// Kills the process and reaps it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `program args` on `cpu` only, as a (program, args) pair for [`Supervised::start`]:
/// `taskset -c <cpu> program args`. taskset execs the program, so the PID is the
/// program's, and every thread it starts runs on that CPU from its first instruction.
pub fn on_cpu(cpu: usize, program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
    let mut all = vec![
        "-c".to_owned(),
        cpu.to_string(),
        program.display().to_string(),
    ];
    all.extend_from_slice(args);
    (PathBuf::from("taskset"), all)
}

/// Whether a process with this PID is alive (not a zombie).
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3, after the parenthesised command name, is the state; Z is a zombie.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Resident set size of `pid` in KiB (0 when gone).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// `pid`'s resident memory in KiB split as the kernel counts it: anonymous (heap, stacks),
/// file-backed (the binary's and libraries' pages) and shared memory.
pub fn rss_split_kib(pid: u32) -> (u64, u64, u64) {
    (
        status_kib(pid, "RssAnon:"),
        status_kib(pid, "RssFile:"),
        status_kib(pid, "RssShmem:"),
    )
}

/// `pid`'s file-backed resident memory by file, largest first (KiB, from
/// `/proc/<pid>/smaps`): which binary or library the pages are of.
pub fn file_rss_by_file_kib(pid: u32) -> Vec<(String, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by_file = std::collections::BTreeMap::<String, u64>::new();
    let mut current: Option<String> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: `start-end perms offset dev inode [path]`.
            current = line
                .split_whitespace()
                .nth(5)
                .filter(|p| p.starts_with('/'))
                .map(|p| {
                    std::path::Path::new(p)
                        .file_name()
                        .map_or_else(|| p.to_owned(), |n| n.to_string_lossy().into_owned())
                });
        } else if first == "Rss:"
            && let Some(file) = &current
        {
            *by_file.entry(file.clone()).or_default() +=
                words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    let mut v: Vec<(String, u64)> = by_file.into_iter().filter(|(_, kib)| *kib > 0).collect();
    v.sort_by_key(|(_, kib)| std::cmp::Reverse(*kib));
    v
}

/// A `kB` line of `/proc/<pid>/status` (0 when gone).
fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) `pid` has used so far.
pub fn cpu_time(pid: u32) -> std::time::Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // USER_HZ is 100 on Linux.
    std::time::Duration::from_millis(ticks * 10)
}
/// Prefix of every working directory the harness makes in `$TMPDIR` (the control
/// plane's, the real node's): `sigil-e2e-<pid>-`, so leftovers of killed runs can be found.
const WORK_DIR_PREFIX: &str = "sigil-e2e-";

/// This process's working-directory prefix, `sigil-e2e-<pid>-`.
pub fn work_dir_prefix() -> String {
    format!("{WORK_DIR_PREFIX}{}-", std::process::id())
}

/// Removes the working directories of test processes that have ended (killed runs never
/// drop theirs: a shared control plane or node lives in a `static`).
pub fn remove_stale_work_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(WORK_DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !is_alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
