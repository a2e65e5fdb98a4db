//! End-to-end harness: a real kube-apiserver and etcd on loopback.
//!
//! ```ignore
//! let cp = sigil_e2e::shared().await;           // one control plane per test binary
//! let ns = cp.namespace("my-test").await?;      // each test works in its own namespace
//! let admin = cp.admin().await?;                // system:masters
//! let alice = cp.user_client("alice", None).await?;             // no rights until RBAC grants them
//! let sa = cp.service_account_client(&ns, "reader").await?;     // a TokenRequest token
//! ```
//!
//! What it gives a test:
//! - etcd and kube-apiserver built by `make test-tools` ([`tools`]), on free loopback
//!   ports, with a generated PKI: serving certificates, a client CA, and the
//!   service-account signing key. RBAC is on; TokenRequest and TokenReview work.
//! - every CRD in `crds/` applied and established, exactly as a user applies them.
//! - clients for the admin, for any user (client certificate) and for any
//!   ServiceAccount (bound token), so RBAC can be tested.
//!
//! Teardown: a [`ControlPlane`] stops its processes and removes its files when dropped,
//! also while a test panics. The processes of the [`shared`] one (a `static`, never
//! dropped) die with the test process through the parent-death signal ([`process`]), and
//! its directory is removed by the next run.
//!
//! TPMs: [`swtpm::Swtpm`] runs a software TPM 2.0 on loopback.
//!
//! Workloads: [`pod::PodContainer`] puts real processes into pod-shaped cgroups and
//! writes their container status the way a kubelet does.
//!
//! A real node (kubelet, containerd, images, `helm install`): [`node::shared`], used by
//! the one test binary `real_node`.
//!
//! The control plane provides, on purpose, no kube-controller-manager, scheduler or
//! kubelet. Nothing creates `default` ServiceAccounts, schedules pods or runs containers;
//! tests create what a controller would and write pod status the way a kubelet does. The
//! real node ([`node`]) has all of them.

mod control_plane;
pub mod http;
pub mod kstatus;
pub mod node;
pub mod pki;
pub mod pod;
pub mod process;
pub mod swtpm;
pub mod tools;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use control_plane::{ControlPlane, crds_dir};

/// What can go wrong while bringing up or using the harness.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A pinned tool is not built.
    #[error("{name} not found at {}: run `make test-tools`, which builds the pinned test tools into that directory", path.display())]
    ToolMissing {
        /// The tool's binary name.
        name: String,
        /// Where it was looked for.
        path: std::path::PathBuf,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A server did not come up.
    #[error("{what} did not start: {reason}")]
    Start {
        /// Which server.
        what: String,
        /// Why, with its log.
        reason: String,
    },
    /// A server exited while starting (often a port taken by another process).
    #[error("a control plane process exited while starting ({status})\n{log}")]
    Exited {
        /// Its exit status.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// Generating the PKI failed.
    #[error("generating the test PKI: {0}")]
    Pki(String),
    /// A kubeconfig could not be turned into a client.
    #[error("client configuration: {0}")]
    Config(String),
    /// A CRD from `crds/` could not be installed.
    #[error("installing CRDs: {0}")]
    Crd(String),
    /// An API call the harness makes failed.
    #[error("{0}: {1}")]
    Kube(String, #[source] kube::Error),
    /// The apiserver answered without what was asked for.
    #[error("{0}")]
    Answer(String),
}

impl Error {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// The control plane shared by every test in this test binary, started on first use.
///
/// # Panics
/// When the control plane cannot start; every test that asks gets the same message.
pub async fn shared() -> &'static ControlPlane {
    static SHARED: tokio::sync::OnceCell<Result<ControlPlane, String>> =
        tokio::sync::OnceCell::const_new();
    let started = SHARED
        .get_or_init(|| async {
            start_watchdog();
            ControlPlane::start().await.map_err(|e| e.to_string())
        })
        .await;
    match started {
        Ok(cp) => cp,
        Err(e) => panic!("the shared test control plane did not start: {e}"),
    }
}

/// Default limit for one test binary that uses the control plane.
const WATCHDOG_DEFAULT: Duration = Duration::from_secs(900);

/// Ends this test process when it runs longer than `SIGIL_TEST_BINARY_TIMEOUT` seconds
/// (default 900): a hung test then fails in minutes, naming itself, instead of holding CI
/// until its overall limit. Child processes die with us (they run under pdeathsig).
pub(crate) fn start_watchdog() {
    let limit = std::env::var("SIGIL_TEST_BINARY_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(WATCHDOG_DEFAULT, Duration::from_secs);
    let binary = std::env::args().next().unwrap_or_default();
    std::thread::Builder::new()
        .name("sigil-e2e-watchdog".into())
        .spawn(move || {
            std::thread::sleep(limit);
            eprintln!(
                "sigil-e2e watchdog: {binary} ran longer than {limit:?} (SIGIL_TEST_BINARY_TIMEOUT); a test is hung, ending the process"
            );
            std::process::exit(124);
        })
        .expect("spawn the test watchdog thread");
}

/// A name unique within this machine's current test processes: `prefix-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` every 50 ms until it returns `Some`, and returns that value.
///
/// # Panics
/// When `within` passes first, naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
