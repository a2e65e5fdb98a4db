//! The `sigil-agent` binary with `--tpm-tcti`, as the chart runs it: it opens a software
//! TPM (swtpm, provisioned with an EK certificate from a test manufacturer CA), attests
//! its node against the operator's Node API on the real apiserver, and signs its node's
//! SVIDs. When the TPM is not enrolled, or the TCTI answers nothing, the binary says so.
//! The TPM is used through the helper process `sigil-agent-tpm`: the agent itself maps no
//! TPM library, and a helper that dies is started again.
#![allow(clippy::unwrap_used)]

use sigil_testkit::node_api as node_api_common;
use sigil_testkit::tpm as tpm_common;
use sigil_testkit::trust_domain as trust_domain_common;

use std::process::Stdio;
use std::time::Duration;

use node_api_common::{CLUSTER, World};
use serde_json::{Value, json};
use sigil_agent::tpm::{TpmDevice, TpmError, TpmOptions};
use sigil_e2e::swtpm::Swtpm;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tpm_common::{ManufacturerCa, flush_transient_objects, manufacture, swtpm, tpm_world};
use trust_domain_common::{SETTLE, eventually};

/// Held while this process talks to a TPM or forks: libtss2's sockets are not
/// close-on-exec, so an agent started during another test's TPM call would inherit that
/// connection and its swtpm would stop serving anyone else.
static TPM_AND_FORK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running `sigil-agent` process for node A and its JSON log lines.
struct AgentBinary {
    child: tokio::process::Child,
    logs: mpsc::UnboundedReceiver<Value>,
    health: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl AgentBinary {
    async fn start(w: &World, tcti: &str) -> AgentBinary {
        let cp = sigil_e2e::shared().await;
        let dir = tempfile::tempdir().unwrap();
        let (token, bundle) = w.agent_pod_files(dir.path()).await;
        let path = |name: &str| dir.path().join(name).display().to_string();
        let health = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let _guard = TPM_AND_FORK.lock().await;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sigil-agent"))
            .env("KUBECONFIG", cp.kubeconfig_path())
            .env("RUST_LOG", "info")
            .args(["--node-name", &w.node_a])
            .args(["--operator-address", &w.node_api_addr])
            .args(["--trust-domain", &w.td.to_string()])
            .args(["--cluster-name", CLUSTER])
            .args(["--token-file", &token.display().to_string()])
            .args(["--bundle-file", &bundle.display().to_string()])
            .args(["--socket-path", &path("api.sock")])
            .args(["--broker-socket-path", &path("broker.sock")])
            .args(["--health-addr", &health.to_string()])
            .args(["--log-format", "json", "--tpm-tcti", tcti])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (tx, logs) = mpsc::unbounded_channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("[sigil-agent] {line}");
                    let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            });
        }
        AgentBinary {
            child,
            logs,
            health,
            _dir: dir,
        }
    }

    /// The first log line (JSON, or a plain line as a string) `matches` accepts.
    async fn log(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let found = tokio::time::timeout(SETTLE, async {
            while let Some(v) = self.logs.recv().await {
                if matches(&v) {
                    return Some(v);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(v)) => v,
            Ok(None) => panic!("sigil-agent's output ended before {what}"),
            Err(_) => panic!("no {what} in sigil-agent's log within {SETTLE:?}"),
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        sigil_e2e::http::get(self.health, path).await
    }
}

/// A World whose operator trusts a test manufacturer CA, and a software TPM it certified
/// (not enrolled on any Node yet): the TPM and its EK hash.
async fn world_and_tpm(prefix: &str) -> (World, Swtpm, String) {
    let ca = ManufacturerCa::new("Acme");
    let swtpm = swtpm();
    let w = tpm_world(prefix, &ca, Duration::from_secs(10)).await;
    let (ek_hash, _) = {
        let _guard = TPM_AND_FORK.lock().await;
        manufacture(&ca, &swtpm).await
    };
    (w, swtpm, ek_hash)
}

fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn the_binary_attests_with_its_tpm_and_signs_its_nodes_svids() {
    let (w, swtpm, ek_hash) = world_and_tpm("tpm-bin").await;
    w.enroll_tpm(&w.node_a, &ek_hash).await;
    w.cluster_spiffe_id(&format!("{}-web", w.tag), "web").await;
    w.pod("web", &w.node_a, "web", json!({"app": "web"})).await;

    let mut agent = AgentBinary::start(&w, &swtpm.tcti()).await;
    agent
        .log("the TPM being opened", |v| {
            message(v) == "node attestation with the TPM"
        })
        .await;
    let attested = agent
        .log("a successful attestation", |v| {
            message(v) == "node attested"
        })
        .await;
    assert_eq!(
        attested["spiffe_id"],
        format!("spiffe://{}/sigil/agent/tpm/{ek_hash}", w.td),
        "the agent's ID names its TPM"
    );
    eventually("sigil-agent /ready", SETTLE, || async {
        agent
            .get("/ready")
            .await
            .filter(|(status, _)| *status == 200)
    })
    .await;
    // Its node's entries arrive over the TPM-attested session and are signed.
    eventually("the web pod's SVID signed", SETTLE, || async {
        let (_, metrics) = agent.get("/metrics").await?;
        let signed: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("sigil_agent_svids_signed_total "))?
            .trim()
            .parse()
            .ok()?;
        (signed >= 1.0).then_some(())
    })
    .await;
    assert!(agent.child.try_wait().unwrap().is_none(), "still running");

    // The TPM is the helper's: the agent maps neither libtss2 nor libcrypto, and the
    // helper ran for the attestation only.
    let pid = agent.child.id().unwrap();
    let agent_maps = mapped_files(pid);
    assert!(
        !agent_maps
            .iter()
            .any(|f| f.contains("libtss2") || f.contains("libcrypto")),
        "the agent maps no TPM library: {agent_maps:?}"
    );
    eventually(
        "the TPM helper to exit once the node is attested",
        SETTLE,
        || async {
            children_named(pid, "sigil-agent-tpm")
                .is_empty()
                .then_some(())
        },
    )
    .await;
}

/// The agent's TPM handle, on its own: the helper (which maps libtss2) answers, reports the
/// TPM's refusals, and when it dies, or is released, the next call starts a new one, with a
/// new AK. Dropped, the handle's helper exits.
#[tokio::test]
async fn a_dead_tpm_helper_is_started_again() {
    // The other tests start the shared control plane (etcd, kube-apiserver). Started during
    // this test's TPM connections, they would inherit them (libtss2's sockets are not
    // close-on-exec) and swtpm would serve nobody after: start it first.
    sigil_e2e::shared().await;
    let ca = ManufacturerCa::new("Acme");
    let swtpm = swtpm();
    let _ = {
        let _guard = TPM_AND_FORK.lock().await;
        manufacture(&ca, &swtpm).await
    };
    let _guard = TPM_AND_FORK.lock().await;
    let options = TpmOptions {
        tcti: swtpm.tcti(),
        ek_certificate_file: None,
        helper: env!("CARGO_BIN_EXE_sigil-agent-tpm").into(),
    };
    let device = TpmDevice::open(options.clone()).await.unwrap();
    let first = device.identity().await.unwrap();
    assert!(!first.ek_certificate.is_empty() && !first.ak_public.is_empty());

    // A challenge that is not one: the TPM's refusal, as the helper reports it; the helper
    // stays.
    let refused = device
        .activate_credential(vec![0, 4, 1, 2, 3, 4], vec![0, 2, 9, 9])
        .await
        .unwrap_err();
    assert!(matches!(refused, TpmError::Tpm(_)), "{refused}");
    let me = std::process::id();
    let helpers = children_named(me, "sigil-agent-tpm");
    assert_eq!(helpers.len(), 1, "{helpers:?}");
    assert!(
        mapped_files(helpers[0])
            .iter()
            .any(|f| f.contains("libtss2-esys"))
    );
    assert_eq!(device.identity().await.unwrap(), first, "the same helper");

    // The helper killed: the next call says so, naming the helper; the one after starts a
    // new helper, whose AK is new.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helpers[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let gone = device
        .activate_credential(vec![0, 4, 1, 2, 3, 4], vec![0, 2, 9, 9])
        .await
        .unwrap_err();
    let text = gone.to_string();
    assert!(
        matches!(gone, TpmError::Helper { .. }) && text.contains("sigil-agent-tpm"),
        "{text}"
    );
    // swtpm has no resource manager: what the killed helper loaded stays in the TPM, as
    // after a crash on a TPM without one (tpmrm0 flushes it).
    flush_transient_objects(&swtpm.tcti());
    let second = device.identity().await.unwrap();
    assert_eq!(second.ek_public, first.ek_public, "the same TPM");
    assert_ne!(second.ak_public, first.ak_public, "a new AK");
    let helpers_now = children_named(me, "sigil-agent-tpm");
    assert_eq!(helpers_now.len(), 1, "{helpers_now:?}");
    assert_ne!(helpers_now[0], helpers[0]);

    // Released (as after each attestation), it exits on its own, its keys flushed: the
    // next helper needs no cleanup to load its own.
    device.release().await;
    exited(helpers_now[0]).await;
    let third = device.identity().await.unwrap();
    assert_ne!(third.ak_public, second.ak_public, "a new AK again");

    // A helper that is not there: the error names it.
    let missing = TpmDevice::open(TpmOptions {
        helper: "/nonexistent/sigil-agent-tpm".into(),
        ..options
    })
    .await
    .unwrap_err();
    assert!(
        missing
            .to_string()
            .starts_with("start the TPM helper /nonexistent/sigil-agent-tpm: "),
        "{missing}"
    );
    let last = children_named(me, "sigil-agent-tpm");
    assert_eq!(last.len(), 1, "{last:?}");
    drop(device);
    exited(last[0]).await;
}

/// Waits for process `pid` to exit (gone, or a zombie not reaped yet).
async fn exited(pid: i32) {
    eventually(&format!("process {pid} to exit"), SETTLE, || async {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|close| stat[close + 1..].split_whitespace().next());
        matches!(state, None | Some("Z")).then_some(())
    })
    .await;
}

/// PIDs of `parent`'s live children whose command is `comm` (an exited one its parent has
/// not reaped yet, a zombie, is not counted).
fn children_named(parent: u32, comm: &str) -> Vec<i32> {
    let mut found = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let mut rest = stat[close + 1..].split_whitespace();
        let (state, ppid) = (rest.next(), rest.next());
        if &stat[open + 1..close] == comm && ppid == Some(&parent.to_string()) && state != Some("Z")
        {
            found.push(pid);
        }
    }
    found
}

/// The files `pid` maps.
fn mapped_files(pid: impl std::fmt::Display) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5).map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn the_binary_says_what_is_wrong_with_its_tpm() {
    let (w, swtpm, ek_hash) = world_and_tpm("tpm-bin-bad").await;

    // A TPM no Node is enrolled for: refused, retried, and never ready.
    let mut agent = AgentBinary::start(&w, &swtpm.tcti()).await;
    let failed = agent
        .log("the refusal", |v| message(v) == "node attestation failed")
        .await;
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "no Node is enrolled for the TPM with EK hash {ek_hash}"
        )) && error.contains("sigil.dev/tpm-ek-sha256"),
        "{error}"
    );
    let (status, _) = agent.get("/ready").await.unwrap();
    assert_eq!(status, 503, "not ready without an attested node");
    drop(agent);

    // A TCTI nothing answers on: the binary exits at start, naming the flag.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let mut agent = AgentBinary::start(&w, &format!("swtpm:host=127.0.0.1,port={port}")).await;
    let status = tokio::time::timeout(SETTLE, agent.child.wait())
        .await
        .expect("sigil-agent exits when it cannot open the TPM")
        .unwrap();
    assert!(!status.success());
    agent
        .log("the reason it stopped", |v| {
            v.to_string()
                .contains("open the TPM (--tpm-tcti swtpm:host=127.0.0.1")
        })
        .await;
}
