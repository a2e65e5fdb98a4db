//! A real node: the single-node Kubernetes of `hack/cluster.sh` (kubelet, containerd, runc,
//! CNI, kube-proxy, CoreDNS in the network namespace `sigil-cluster`), with Sigil's images
//! built from this `cargo test`'s binaries and imported into its containerd.
//!
//! ```ignore
//! let node = sigil_e2e::node::shared(bin_dir).await;  // one per test binary
//! node.kubectl(&["get", "pods", "-A"]).await?;
//! node.helm(&["install", "sigil", ...]).await?;
//! ```
//!
//! There is one such node per machine (the kubelet's directory and the kubepods cgroups
//! are global), so every test that needs it lives in one test binary (`real_node`), and
//! test processes of other clones wait for each other:
//! - [`RealNode::start`] first starts a guard, `hack/cluster.sh guard TAG`, in its own
//!   session, with its stdin a pipe this process never writes. The guard waits for the
//!   machine's cluster lock and holds it while this process lives; when the pipe closes
//!   (the process ended however it ended: passed, panicked, killed by the watchdog or by
//!   `kill -9`) it takes down the cluster this process started.
//! - `hack/cluster.sh up` then runs with `SIGIL_CLUSTER_OWNER=TAG`: a cluster another
//!   test process left (its guard died too) is removed first: the stale-state check. A
//!   cluster started by hand with `make cluster` is refused, with the fix in the message
//!   (`make cluster-down`, or `SIGIL_CLUSTER_REUSE=1` to run on it and keep it).
//! - [`RealNode::down`] takes the node down at the end of a run and reports anything
//!   left behind (`hack/cluster.sh leftovers`).
//!
//! Images: `hack/images.sh build --bin-dir <target>/debug` builds the images of
//! `images/images.conf` from the debug binaries `cargo test` built (the release images'
//! entrypoints, paths, users and libraries; debug info stripped), while the cluster comes
//! up; they are imported with `ctr` once containerd runs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::process::Command;

use crate::{Error, tools};

/// The node's name (`hack/cluster.sh`).
pub const NODE_NAME: &str = "sigil-node";
/// Where `hack/cluster.sh` writes the admin kubeconfig.
pub const KUBECONFIG: &str = "/var/lib/sigil-cluster/kubeconfig";
/// containerd's socket on the node.
const CONTAINERD_SOCK: &str = "/run/sigil-cluster/containerd/containerd.sock";
/// The Sigil binaries the images hold (images.conf's `bin` lines), with the workspace
/// directories of the crates each is built from.
const SOURCES: [(&str, &[&str]); 4] = [
    (
        "sigil-operator",
        &["identity", "telemetry", "api", "index", "operator"],
    ),
    ("sigil-agent", &["identity", "telemetry", "node-agent"]),
    ("sigil-csi", &["identity", "telemetry", "csi-driver"]),
    ("sigil", &["identity", "telemetry", "api", "index", "cli"]),
];

/// The running node, shared by the tests of one binary.
#[derive(Debug)]
pub struct RealNode {
    repo: PathBuf,
    bin_dir: PathBuf,
    dir: tempfile::TempDir,
    owner: String,
    /// The guard, whose stdin closes when this process ends. Never waited for.
    guard: Mutex<Option<std::process::Child>>,
    /// How long each start step took, for the report.
    timings: Vec<(String, Duration)>,
}

/// The node shared by every test of this binary, started on first use with the Sigil
/// binaries of `bin_dir` (the `target/debug` of this `cargo test`).
///
/// # Panics
/// When the node cannot start; every caller gets the same message.
pub async fn shared(bin_dir: &Path) -> &'static RealNode {
    static SHARED: tokio::sync::OnceCell<Result<RealNode, String>> =
        tokio::sync::OnceCell::const_new();
    let started = SHARED
        .get_or_init(|| async { RealNode::start(bin_dir).await.map_err(|e| e.to_string()) })
        .await;
    match started {
        Ok(node) => node,
        Err(e) => panic!("the real node did not start: {e}"),
    }
}

impl RealNode {
    /// Takes the cluster lock (through the guard), brings the cluster up, builds the images
    /// from `bin_dir` meanwhile and imports them.
    pub async fn start(bin_dir: &Path) -> Result<Self, Error> {
        if !nix_root() {
            return Err(Error::Start {
                what: "the real node".into(),
                reason: "needs root (network namespaces, mounts, cgroups), like a kubelet".into(),
            });
        }
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .canonicalize()
            .map_err(|e| Error::io("find the workspace root", e))?;
        let bin_dir = bin_dir
            .canonicalize()
            .map_err(|e| Error::io(format!("the binaries' directory {}", bin_dir.display()), e))?;
        check_fresh(&repo, &bin_dir)?;
        crate::process::remove_stale_work_dirs();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}node-", crate::process::work_dir_prefix()))
            .tempdir()
            .map_err(|e| Error::io("create the real node's working directory", e))?;
        let owner = format!("real-node-test pid {}", std::process::id());
        let mut node = Self {
            repo,
            bin_dir,
            dir,
            owner,
            guard: Mutex::new(None),
            timings: Vec::new(),
        };
        let t = Instant::now();
        node.start_guard().await?;
        node.timings.push(("cluster lock".into(), t.elapsed()));
        // The watchdog (SIGIL_TEST_BINARY_TIMEOUT) counts from here: waiting for another
        // clone's real-node tests to release the node is not a hang.
        crate::start_watchdog();

        let t = Instant::now();
        let images = node.dir.path().join("images");
        let bin_arg = node.bin_dir.display().to_string();
        let out_arg = images.display().to_string();
        let build_argv = [
            "hack/images.sh",
            "build",
            "--bin-dir",
            bin_arg.as_str(),
            "--out",
            out_arg.as_str(),
        ];
        let (up, built) = tokio::join!(
            node.script(
                "cluster-up",
                &["hack/cluster.sh", "up"],
                Duration::from_secs(1800)
            ),
            node.script("images-build", &build_argv, Duration::from_secs(600)),
        );
        up?;
        built?;
        node.timings
            .push(("cluster up + images built".into(), t.elapsed()));
        let t = Instant::now();
        node.import_images(&images).await?;
        // The tars are in containerd now; hundreds of MB need not wait for the next run.
        let _ = std::fs::remove_dir_all(&images);
        node.timings.push(("images imported".into(), t.elapsed()));
        Ok(node)
    }

    /// Starts `hack/cluster.sh guard` and waits until it holds the cluster lock.
    async fn start_guard(&self) -> Result<(), Error> {
        let log = self.dir.path().join("guard.log");
        let err = std::fs::File::create(&log)
            .map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        // setsid: its own session, so a signal to the test's process group spares it. Not
        // under a parent-death signal: it must outlive this process to clean up after it.
        let mut child = std::process::Command::new("setsid")
            .arg("bash")
            .arg(self.repo.join("hack/cluster.sh"))
            .arg("guard")
            .arg(&self.owner)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| Error::io("start hack/cluster.sh guard", e))?;
        let Some(stdout) = child.stdout.take() else {
            return Err(Error::Start {
                what: "hack/cluster.sh guard".into(),
                reason: "no stdout pipe".into(),
            });
        };
        // The stdin pipe stays open in `self.guard` for the life of the process.
        if let Ok(mut g) = self.guard.lock() {
            *g = Some(child);
        }
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                .map(|_| line)
        })
        .await
        .map_err(|e| Error::Start {
            what: "hack/cluster.sh guard".into(),
            reason: e.to_string(),
        })?
        .map_err(|e| Error::io("read from hack/cluster.sh guard", e))?;
        if line.trim() != "locked" {
            return Err(Error::Start {
                what: "hack/cluster.sh guard".into(),
                reason: format!(
                    "it did not take the cluster lock (another clone's real-node tests may hold it longer than SIGIL_CLUSTER_LOCK_WAIT)\n{}",
                    tail(&log, 20)
                ),
            });
        }
        Ok(())
    }

    /// Runs `bash SCRIPT ARGS...` from the workspace root with the cluster lock held for
    /// it; output goes to `<dir>/<name>.log`, whose end the error carries.
    pub async fn script(&self, name: &str, argv: &[&str], within: Duration) -> Result<(), Error> {
        let log = self.dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log)
            .map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io("duplicate a log file", e))?;
        let mut cmd = Command::new("bash");
        cmd.args(argv)
            .current_dir(&self.repo)
            .env("SIGIL_CLUSTER_LOCKED", "1")
            .env("SIGIL_CLUSTER_OWNER", &self.owner)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        let status = tokio::time::timeout(within, cmd.status())
            .await
            .map_err(|_| Error::Start {
                what: argv.join(" "),
                reason: format!("not done after {within:?}\n{}", tail(&log, 30)),
            })?
            .map_err(|e| Error::io(format!("run {}", argv.join(" ")), e))?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::Start {
                what: argv.join(" "),
                reason: format!("{status}\n{}", tail(&log, 30)),
            })
        }
    }

    async fn import_images(&self, dir: &Path) -> Result<(), Error> {
        let ctr = tools::tool("ctr")?;
        let mut tars: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("list {}", dir.display()), e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "tar"))
            .collect();
        tars.sort();
        for tar in tars {
            let out = Command::new(&ctr)
                .args([
                    "--address",
                    CONTAINERD_SOCK,
                    "-n",
                    "k8s.io",
                    "images",
                    "import",
                ])
                .arg(&tar)
                .output()
                .await
                .map_err(|e| Error::io("run ctr images import", e))?;
            if !out.status.success() {
                return Err(Error::Start {
                    what: format!("ctr images import {}", tar.display()),
                    reason: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
        }
        Ok(())
    }

    /// The workspace root.
    pub fn repo(&self) -> &Path {
        &self.repo
    }

    /// The directory of the Sigil binaries the images hold.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// This run's working directory (logs of the scripts it ran).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// How long each start step took.
    pub fn timings(&self) -> &[(String, Duration)] {
        &self.timings
    }

    /// A client for the cluster admin (`system:masters`), through `netns-forward` on the
    /// host's 127.0.0.1. A `kube::Client` belongs to the runtime it was made in.
    pub async fn client(&self) -> Result<Client, Error> {
        let yaml = std::fs::read_to_string(KUBECONFIG)
            .map_err(|e| Error::io(format!("read {KUBECONFIG}"), e))?;
        let kc = Kubeconfig::from_yaml(&yaml).map_err(|e| Error::Config(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Config(e.to_string()))?;
        Client::try_from(config).map_err(|e| Error::Kube("build a client".into(), e))
    }

    /// `kubectl ARGS...` as the admin; stdout on success, an error with stderr otherwise.
    pub async fn kubectl(&self, args: &[&str]) -> Result<String, Error> {
        self.tool("kubectl", args, None).await
    }

    /// `kubectl ARGS...` with `input` on stdin (`apply -f -`).
    pub async fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String, Error> {
        self.tool("kubectl", args, Some(input)).await
    }

    /// `kubectl apply -f -` of `yaml`.
    pub async fn apply(&self, yaml: &str) -> Result<String, Error> {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml).await
    }

    /// `helm ARGS...` against the node.
    pub async fn helm(&self, args: &[&str]) -> Result<String, Error> {
        self.tool("helm", args, None).await
    }

    /// `kubectl ARGS...`, its exit status, stdout and stderr, whatever the status.
    pub async fn kubectl_output(&self, args: &[&str]) -> Result<std::process::Output, Error> {
        let mut cmd = Command::new(tools::tool("kubectl")?);
        cmd.args(args)
            .env("KUBECONFIG", KUBECONFIG)
            .current_dir(&self.repo)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        tokio::time::timeout(Duration::from_secs(300), cmd.output())
            .await
            .map_err(|_| Error::Answer(format!("kubectl {} ran over 300 s", args.join(" "))))?
            .map_err(|e| Error::io("run kubectl", e))
    }

    async fn tool(&self, name: &str, args: &[&str], input: Option<&str>) -> Result<String, Error> {
        let mut cmd = Command::new(tools::tool(name)?);
        cmd.args(args)
            .env("KUBECONFIG", KUBECONFIG)
            .current_dir(&self.repo)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("run {name}"), e))?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            use tokio::io::AsyncWriteExt as _;
            stdin
                .write_all(text.as_bytes())
                .await
                .map_err(|e| Error::io(format!("write {name}'s stdin"), e))?;
        }
        let out = tokio::time::timeout(Duration::from_secs(600), child.wait_with_output())
            .await
            .map_err(|_| Error::Answer(format!("{name} {} ran over 600 s", args.join(" "))))?
            .map_err(|e| Error::io(format!("run {name}"), e))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::Answer(format!(
                "{name} {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }

    /// The `helm install/upgrade` flags that select this run's images.
    pub async fn helm_image_args(&self) -> Result<Vec<String>, Error> {
        let out = Command::new("bash")
            .arg("hack/images.sh")
            .arg("helm-args")
            .current_dir(&self.repo)
            .output()
            .await
            .map_err(|e| Error::io("run hack/images.sh helm-args", e))?;
        if !out.status.success() {
            return Err(Error::Answer(format!(
                "hack/images.sh helm-args: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect())
    }

    /// `hack/cluster.sh restart COMPONENT` (the kubelet and containerd are supervised:
    /// they get SIGTERM and start again, as under systemd).
    pub async fn restart(&self, component: &str) -> Result<(), Error> {
        self.script(
            &format!("restart-{component}"),
            &["hack/cluster.sh", "restart", component],
            Duration::from_secs(120),
        )
        .await
    }

    /// `hack/cluster.sh stop COMPONENT`: an unsupervised one (kube-apiserver, etcd) stays
    /// down until [`RealNode::start_component`].
    pub async fn stop_component(&self, component: &str) -> Result<(), Error> {
        self.script(
            &format!("stop-{component}"),
            &["hack/cluster.sh", "stop", component],
            Duration::from_secs(60),
        )
        .await
    }

    /// `hack/cluster.sh start COMPONENT`, which returns once it serves again.
    pub async fn start_component(&self, component: &str) -> Result<(), Error> {
        self.script(
            &format!("start-{component}"),
            &["hack/cluster.sh", "start", component],
            Duration::from_secs(180),
        )
        .await
    }

    /// `hack/cluster.sh partition on|off NAMESPACE/SERVICE`: pods' TCP to the Service's
    /// cluster IP is dropped inside the node's namespace (`on`) or flows again (`off`).
    pub async fn partition(&self, on: bool, service: &str) -> Result<(), Error> {
        let what = if on { "on" } else { "off" };
        self.script(
            &format!("partition-{what}"),
            &["hack/cluster.sh", "partition", what, service],
            Duration::from_secs(60),
        )
        .await
    }

    /// `hack/cluster.sh kill ID`: SIGKILL to a container (its id without `containerd://`).
    pub async fn kill_container(&self, id: &str) -> Result<(), Error> {
        self.script(
            "kill-container",
            &["hack/cluster.sh", "kill", id],
            Duration::from_secs(60),
        )
        .await
    }

    /// Takes the node down (`hack/cluster.sh down`) and checks that nothing of it is
    /// left: mounts, processes, the network namespace, cgroups, directories, the chart's
    /// hostPath state.
    pub async fn down(&self) -> Result<(), Error> {
        self.script(
            "cluster-down",
            &["hack/cluster.sh", "down"],
            Duration::from_secs(300),
        )
        .await?;
        self.script(
            "cluster-leftovers",
            &["hack/cluster.sh", "leftovers"],
            Duration::from_secs(60),
        )
        .await
    }
}

fn nix_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    format!(
        "--- last lines of {} ---\n{}",
        path.display(),
        all[from..].join("\n")
    )
}

/// Fails when a Sigil binary is older than a source file it is built from: `cargo test
/// --test real_node` alone builds only the e2e crate's binaries, so the images would hold
/// stale ones. `cargo test --workspace` (make test) builds them all.
fn check_fresh(repo: &Path, bin_dir: &Path) -> Result<(), Error> {
    for (bin, dirs) in SOURCES {
        let mut newest: Option<(SystemTime, PathBuf)> = None;
        let mut consider = |p: &Path| {
            if let Ok(m) = std::fs::metadata(p).and_then(|m| m.modified())
                && newest.as_ref().is_none_or(|(t, _)| m > *t)
            {
                newest = Some((m, p.to_owned()));
            }
        };
        consider(&repo.join("Cargo.lock"));
        for d in dirs {
            consider(&repo.join(d).join("Cargo.toml"));
            walk(&repo.join(d).join("src"), &mut consider);
        }
        let path = bin_dir.join(bin);
        let built = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(|e| {
                Error::io(
                    format!(
                        "{} (build every binary first: cargo build --workspace --locked --bins, or cargo test --workspace)",
                        path.display()
                    ),
                    e,
                )
            })?;
        if let Some((t, src)) = &newest
            && *t > built
        {
            return Err(Error::Start {
                what: "the real node's images".into(),
                reason: format!(
                    "{} is older than {}: rebuild the binaries first (cargo build --workspace --locked --bins; `cargo test --workspace` does it, `--test real_node` alone does not)",
                    path.display(),
                    src.display()
                ),
            });
        }
    }
    Ok(())
}

fn walk(dir: &Path, f: &mut impl FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}
