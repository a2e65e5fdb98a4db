//! Sigil on a real node, the way users run it: `hack/cluster.sh`'s single-node Kubernetes
//! (kubelet 1.37, containerd, runc, CNI, kube-proxy, CoreDNS), the images built from this
//! `cargo test`'s binaries, the chart installed with `helm`, pods created with `kubectl`.
//!
//! The steps share one node and one Helm release, so they run in order in this one binary
//! (`harness = false`): install, workloads under the API-server pod source, PSAT and the
//! CSI tokens, `helm upgrade` to the kubelet pod source, the workloads again, nginx mTLS,
//! restarts under held streams and files, #27's faults (`real_node/faults.rs`), `helm
//! uninstall`, and the node's teardown.
//! A step that fails is reported and the next runs; nothing runs once the install failed.
//! Arguments: substrings of step names select steps (the install and the teardown always
//! run); `--list` lists them; other libtest flags are accepted and ignored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use base64::Engine as _;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::Value;
use sigil_e2e::node::{NODE_NAME, RealNode};

#[path = "real_node/faults.rs"]
mod faults;
use faults::faults_on_the_real_node_keep_every_pod_served;

const RELEASE: &str = "sigil";
const RELEASE_NS: &str = "sigil";
const TD: &str = "example.org";
const IMAGE_PREFIX: &str = "docker.io/sigil-local";
const TAG: &str = "dev";
/// The rotating identity's template and TTL (a rotation every ~10 s at half-life).
const ROTATING_TTL: &str = "20s";
/// How long pods and rollouts may take on a busy 2-core machine.
const READY: Duration = Duration::from_secs(180);

fn image(name: &str) -> String {
    format!("{IMAGE_PREFIX}/{name}:{TAG}")
}

fn default_id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

fn rotating_id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/rotating/ns/{ns}/sa/{sa}")
}

struct Ctx {
    node: &'static RealNode,
    client: kube::Client,
    /// What later steps need from earlier ones.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The socket-mode pod of the first workload step: served again after the upgrade.
    socket_pod: Option<(String, String)>,
}

type StepFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;
type Step = fn(Arc<Ctx>) -> StepFuture;

macro_rules! steps {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), (|c| Box::pin($name(c))) as Step)),*]
    };
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let all: Vec<(&str, Step)> = steps![
        helm_install_with_the_chart_defaults_brings_sigil_up,
        a_socket_pod_gets_x509_and_jwt_svids_through_go_spiffe,
        the_readmes_example_workload_gets_its_svid,
        psat_uses_the_token_the_kubelet_projected_into_the_agent_pod,
        a_files_pod_sees_a_rotation_with_the_csidriver_tokens,
        helm_upgrade_to_the_kubelet_pod_source_rolls_cleanly,
        the_kubelet_pod_source_attests_real_containers,
        a_pod_no_clusterspiffeid_selects_gets_permission_denied,
        nginx_serves_mtls_with_its_files_and_refuses_unselected_pods,
        a_pod_certificate_volume_holds_an_svid_go_spiffe_verifies_and_it_rotates,
        restarts_keep_streams_served_and_files_whole,
        faults_on_the_real_node_keep_every_pod_served,
        helm_uninstall_leaves_no_mounts_sockets_or_hostpath_state,
    ];
    if args.iter().any(|a| a == "--list") {
        for (name, _) in &all {
            println!("{name}: test");
        }
        return std::process::ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<(&str, Step)> = all
        .iter()
        .enumerate()
        .filter(|(i, (name, _))| {
            *i == 0
                || name.starts_with("helm_uninstall")
                || filters.is_empty()
                || filters.iter().any(|f| name.contains(f.as_str()))
        })
        .map(|(_, s)| *s)
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run(selected))
}

async fn run(steps: Vec<(&'static str, Step)>) -> std::process::ExitCode {
    let started = Instant::now();
    println!(
        "\nrunning {} tests (one real node, in order)",
        // The steps, and the node's start and its going down around them.
        steps.len() + 2
    );
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_sigil-demo"))
        .parent()
        .expect("the binaries' directory")
        .to_owned();
    // The node's start is a test of its own: cluster up, images, import.
    let t = Instant::now();
    let node = tokio::spawn(async move { sigil_e2e::node::shared(&bin_dir).await })
        .await
        .map_err(panic_text);
    let node = match node {
        Ok(n) => {
            println!(
                "test the_node_comes_up_with_the_images ... ok ({:.1}s)",
                t.elapsed().as_secs_f64()
            );
            for (what, took) in n.timings() {
                println!("    {what}: {:.1}s", took.as_secs_f64());
            }
            n
        }
        Err(e) => {
            println!("test the_node_comes_up_with_the_images ... FAILED\n{e}");
            println!("\ntest result: FAILED. 0 passed; 1 failed");
            return std::process::ExitCode::FAILURE;
        }
    };
    let client = node.client().await.expect("a client of the real node");
    let ctx = Arc::new(Ctx {
        node,
        client,
        state: Mutex::default(),
    });
    let (mut passed, mut failed) = (1, Vec::new());
    let mut installed = true;
    for (i, (name, step)) in steps.into_iter().enumerate() {
        let teardown = name.starts_with("helm_uninstall");
        if !installed && !teardown {
            println!("test {name} ... skipped (the install failed)");
            continue;
        }
        let t = Instant::now();
        let outcome = match tokio::spawn(step(ctx.clone())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(e) => Err(panic_text(e)),
        };
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1}s)", t.elapsed().as_secs_f64());
            }
            Err(e) => {
                println!(
                    "test {name} ... FAILED ({:.1}s)\n{e}\n",
                    t.elapsed().as_secs_f64()
                );
                failed.push(name);
                if i == 0 {
                    installed = false;
                    diagnose(&ctx).await;
                }
            }
        }
    }
    // Down at the end, with a check that nothing is left (the guard would do it too,
    // without the check, should this process die first).
    let t = Instant::now();
    match ctx.node.down().await {
        Ok(()) => {
            passed += 1;
            println!(
                "test the_node_goes_down_leaving_nothing ... ok ({:.1}s)",
                t.elapsed().as_secs_f64()
            );
        }
        Err(e) => {
            println!("test the_node_goes_down_leaving_nothing ... FAILED\n{e}");
            failed.push("the_node_goes_down_leaving_nothing");
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; finished in {:.1}s",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        println!(
            "failures: {failed:?}\nlogs of this run: {}",
            ctx.node.dir().display()
        );
        std::process::ExitCode::FAILURE
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panicked".into()),
        Err(e) => e.to_string(),
    }
}

/// What a failed install looked like: pods, events, the agent's and operator's logs.
async fn diagnose(ctx: &Ctx) {
    for args in [
        vec!["get", "pods", "-A", "-o", "wide"],
        vec![
            "get",
            "events",
            "-n",
            RELEASE_NS,
            "--sort-by=.lastTimestamp",
        ],
        vec![
            "logs",
            "-n",
            RELEASE_NS,
            "-l",
            "app.kubernetes.io/component=agent",
            "--all-containers",
            "--tail=30",
        ],
        vec![
            "logs",
            "-n",
            RELEASE_NS,
            "-l",
            "app.kubernetes.io/component=operator",
            "--tail=30",
        ],
    ] {
        let out = ctx.node.kubectl_output(&args).await;
        if let Ok(o) = out {
            println!(
                "--- kubectl {} ---\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

// ---------------------------------------------------------------------------- helpers

/// Polls `f` every 500 ms until it returns `Ok(Some)`; the error names `what` and the
/// last reason it was not ready.
async fn until<T, F, Fut>(what: &str, within: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    let mut last;
    loop {
        match f().await {
            Ok(Some(t)) => return Ok(t),
            Ok(None) => last = "not yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not after {within:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An API call, made again (up to 5 times, 300 ms apart) when the connection failed
/// rather than the API server answering: a kept-alive connection the server closed just as
/// a request went out (hyper's IncompleteMessage) is no failure of what a step checks.
async fn api<T, F, Fut>(mut f: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut tries = 0;
    loop {
        match f().await {
            Err(e) if !matches!(e, kube::Error::Api(_)) && tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            r => return r,
        }
    }
}

fn pods(ctx: &Ctx, ns: &str) -> Api<Pod> {
    Api::namespaced(ctx.client.clone(), ns)
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_phase(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

/// Why a pod is not ready yet: each container's waiting/terminated reason.
fn pod_why(p: &Pod) -> String {
    let mut why = vec![format!("phase {}", pod_phase(p))];
    for c in p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default()
    {
        let state = c.state.unwrap_or_default();
        if let Some(w) = state.waiting {
            why.push(format!(
                "{}: {} {}",
                c.name,
                w.reason.unwrap_or_default(),
                w.message.unwrap_or_default()
            ));
        } else if let Some(t) = state.terminated {
            why.push(format!(
                "{}: exited {} {}",
                c.name,
                t.exit_code,
                t.reason.unwrap_or_default()
            ));
        } else if !c.ready {
            why.push(format!("{}: running, not ready", c.name));
        }
    }
    why.join("; ")
}

async fn wait_ready(ctx: &Ctx, ns: &str, name: &str) -> Result<Pod> {
    let api = pods(ctx, ns);
    let r = until(&format!("pod {ns}/{name} Ready"), READY, || async {
        let p = api.get(name).await?;
        if pod_ready(&p) {
            Ok(Some(p))
        } else {
            Err(anyhow!("{}", pod_why(&p)))
        }
    })
    .await;
    if r.is_err() {
        let events = pod_events(ctx, ns, name).await;
        return r.with_context(|| format!("events of {ns}/{name}:\n{events}"));
    }
    r
}

/// The pod's events, oldest first, with when each was first and last seen (or why they
/// could not be listed): what a failure or a slow start prints.
async fn pod_events(ctx: &Ctx, ns: &str, name: &str) -> String {
    ctx.node
        .kubectl(&[
            "get",
            "events",
            "-n",
            ns,
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "-o",
            "custom-columns=FIRST:.firstTimestamp,LAST:.lastTimestamp,COUNT:.count,REASON:.reason,MESSAGE:.message",
        ])
        .await
        .unwrap_or_else(|e| e.to_string())
}

/// Waits for the pod to end (`restartPolicy: Never`) and returns its log.
async fn wait_done(ctx: &Ctx, ns: &str, name: &str) -> Result<String> {
    let api = pods(ctx, ns);
    until(&format!("pod {ns}/{name} to finish"), READY, || async {
        let p = api.get(name).await?;
        match pod_phase(&p).as_str() {
            "Succeeded" | "Failed" => Ok(Some(())),
            _ => Err(anyhow!("{}", pod_why(&p))),
        }
    })
    .await?;
    logs(ctx, ns, name, None).await
}

async fn logs(ctx: &Ctx, ns: &str, pod: &str, container: Option<&str>) -> Result<String> {
    let mut args = vec!["logs", "-n", ns, pod];
    if let Some(c) = container {
        args.extend(["-c", c]);
    }
    Ok(ctx.node.kubectl(&args).await?)
}

/// `kubectl exec` in the pod's (first) container: exit status, stdout, stderr.
async fn exec(ctx: &Ctx, ns: &str, pod: &str, cmd: &[&str]) -> Result<(bool, String, String)> {
    let mut args = vec!["exec", "-n", ns, pod, "--"];
    args.extend_from_slice(cmd);
    let out = ctx.node.kubectl_output(&args).await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `exec` that must succeed, stdout as JSON; retried for a while (an exec right after a
/// restart of the kubelet or containerd may find the streaming server not back yet).
async fn exec_json(ctx: &Ctx, ns: &str, pod: &str, cmd: &[&str]) -> Result<Value> {
    until(
        &format!("{} in {ns}/{pod}", cmd.join(" ")),
        Duration::from_secs(90),
        || async {
            let (ok, out, err) = exec(ctx, ns, pod, cmd).await?;
            if !ok {
                bail!("failed: {}", err.trim());
            }
            Ok(Some(
                serde_json::from_str::<Value>(out.trim())
                    .with_context(|| format!("not JSON: {out}"))?,
            ))
        },
    )
    .await
}

/// Every JSON line of a log.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

fn rfc3339(v: &Value) -> Option<SystemTime> {
    let t: k8s_openapi::jiff::Timestamp = v["t"].as_str()?.parse().ok()?;
    Some(SystemTime::from(t))
}

async fn namespace(ctx: &Ctx, name: &str, labels: &str) -> Result<()> {
    ctx.node
        .apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n"
        ))
        .await?;
    // The controller-manager makes the `default` ServiceAccount.
    until(
        &format!("ServiceAccount {name}/default"),
        Duration::from_secs(60),
        || async {
            Ok(ctx
                .node
                .kubectl(&["get", "serviceaccount", "-n", name, "default"])
                .await
                .ok()
                .map(|_| ()))
        },
    )
    .await
}

/// A pod running the go-spiffe client image with the Workload API socket mounted.
fn socket_pod(ns: &str, name: &str, sa: &str, labels: &str, command: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}
spec:
  serviceAccountName: {sa}
  terminationGracePeriodSeconds: 1
  restartPolicy: Never
  containers:
  - name: app
    image: {image}
    command: {command}
    env: [{{name: SPIFFE_ENDPOINT_SOCKET, value: "unix:///spiffe/api.sock"}}]
    volumeMounts: [{{name: spiffe, mountPath: /spiffe, readOnly: true}}]
  volumes:
  - {{name: spiffe, csi: {{driver: csi.sigil.dev, readOnly: true}}}}
"#,
        image = image("go-spiffe-client"),
    )
}

/// A pod with a files-mode volume at /svid for `spiffe_id`.
fn files_pod(
    ns: &str,
    name: &str,
    sa: &str,
    labels: &str,
    spiffe_id: &str,
    command: &str,
) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}
spec:
  serviceAccountName: {sa}
  terminationGracePeriodSeconds: 1
  restartPolicy: Never
  containers:
  - name: app
    image: {image}
    command: {command}
    volumeMounts: [{{name: svid, mountPath: /svid, readOnly: true}}]
  volumes:
  - name: svid
    csi:
      driver: csi.sigil.dev
      readOnly: true
      volumeAttributes: {{mode: files, spiffeID: "{spiffe_id}"}}
"#,
        image = image("go-spiffe-client"),
    )
}

async fn service_account(ctx: &Ctx, ns: &str, name: &str) -> Result<()> {
    ctx.node
        .apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        ))
        .await?;
    Ok(())
}

/// A ClusterSPIFFEID `name` of the default TrustDomain giving the pods `selector` picks
/// `spiffe://<td>/<prefix>/ns/<namespace>/sa/<service account>`, with `ttl`.
async fn short_lived_clusterspiffeid(
    ctx: &Ctx,
    name: &str,
    prefix: &str,
    selector: &str,
    ttl: &str,
) -> Result<()> {
    ctx.node
        .apply(&format!(
            r#"apiVersion: sigil.dev/v1alpha1
kind: ClusterSPIFFEID
metadata: {{name: {name}}}
spec:
  trustDomain: default
  spiffeIDTemplate: "spiffe://{{{{trustDomain}}}}/{prefix}/ns/{{{{pod.namespace}}}}/sa/{{{{pod.serviceAccountName}}}}"
  podSelector: {selector}
  ttl: {ttl}
"#
        ))
        .await?;
    Ok(())
}

/// The ClusterSPIFFEID of the rotating identity (pods labelled `sigil.dev/rotate: fast`).
async fn rotating_clusterspiffeid(ctx: &Ctx) -> Result<()> {
    short_lived_clusterspiffeid(
        ctx,
        "real-node-rotating",
        "rotating",
        "{matchLabels: {sigil.dev/rotate: fast}}",
        ROTATING_TTL,
    )
    .await
}

/// The agent's DaemonSet pod (agent, sigil-csi and the registrar).
async fn agent_pod(ctx: &Ctx) -> Result<Pod> {
    let api_ = pods(ctx, RELEASE_NS);
    let lp = ListParams::default().labels("app.kubernetes.io/component=agent");
    let list = api(|| api_.list(&lp)).await?;
    list.items
        .into_iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
        .ok_or_else(|| anyhow!("no agent pod in {RELEASE_NS}"))
}

fn name_of(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

fn uid_of(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

/// Every Sigil pod Ready: the operator's two replicas and the agent pod's three
/// containers, with the DaemonSet and Deployment rolled out.
async fn sigil_ready(ctx: &Ctx) -> Result<()> {
    let deploys: Api<Deployment> = Api::namespaced(ctx.client.clone(), RELEASE_NS);
    let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), RELEASE_NS);
    until("the operator's 2 replicas Ready", READY, || async {
        let d = deploys.get("sigil-operator").await?;
        let s = d.status.unwrap_or_default();
        let gen_ok = s.observed_generation == d.metadata.generation;
        Ok((gen_ok
            && s.ready_replicas == Some(2)
            && s.updated_replicas == Some(2)
            && s.replicas == Some(2))
        .then_some(()))
    })
    .await?;
    until(
        "the agent DaemonSet rolled out and Ready",
        READY,
        || async {
            let d = dss.get("sigil-agent").await?;
            let s = d.status.unwrap_or_default();
            let done = s.observed_generation == d.metadata.generation
                && s.desired_number_scheduled == 1
                && s.updated_number_scheduled == Some(1)
                && s.number_ready == 1
                && s.number_available == Some(1);
            if !done {
                let why = match agent_pod(ctx).await {
                    Ok(p) => pod_why(&p),
                    Err(e) => e.to_string(),
                };
                bail!("{s:?}: {why}");
            }
            Ok(Some(()))
        },
    )
    .await?;
    let agent = agent_pod(ctx).await?;
    let ready: Vec<String> = agent
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.ready)
        .map(|c| c.name)
        .collect();
    ensure!(
        ready.len() == 3,
        "agent pod containers ready: {ready:?} (want agent, csi, node-driver-registrar)"
    );
    Ok(())
}

/// The kubelet lists csi.sigil.dev in the node's CSINode.
async fn csi_registered(ctx: &Ctx) -> Result<()> {
    let csinodes: Api<CSINode> = Api::all(ctx.client.clone());
    until("csi.sigil.dev in CSINode sigil-node", READY, || async {
        let n = csinodes.get(NODE_NAME).await?;
        Ok(n.spec
            .drivers
            .iter()
            .any(|d| d.name == "csi.sigil.dev" && d.node_id == NODE_NAME)
            .then_some(()))
    })
    .await
}

async fn x509_of(ctx: &Ctx, ns: &str, pod: &str) -> Result<Value> {
    exec_json(ctx, ns, pod, &["/go-spiffe-client", "x509"]).await
}

fn svid_id(v: &Value) -> String {
    v["svids"][0]["spiffe_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The mount points of the host's mountinfo under `prefix`, with how often each appears.
fn host_mounts(prefix: &str) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(mp) = line.split(' ').nth(4) {
            let mp = mp.replace("\\040", " ");
            if mp.starts_with(prefix) {
                *out.entry(mp).or_insert(0) += 1;
            }
        }
    }
    out
}

/// The pod's csi.sigil.dev volume mounts on the host, each of which must be there once.
fn pod_csi_mounts(uid: &str) -> BTreeMap<String, usize> {
    host_mounts(&format!(
        "/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/"
    ))
}

fn no_duplicate_mounts() -> Result<()> {
    for prefix in [
        "/var/lib/kubelet/pods/",
        "/var/lib/sigil-csi/",
        "/run/sigil/",
    ] {
        let dup: Vec<_> = host_mounts(prefix)
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .collect();
        ensure!(dup.is_empty(), "duplicated mounts under {prefix}: {dup:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------- steps

/// `helm install` with the chart's defaults (images pointed at the local ones): the
/// operator's two replicas, the agent DaemonSet (agent, sigil-csi, registrar) Ready, the
/// kubelet registers csi.sigil.dev, and the chart's CSIDriver asks for tokens in secrets.
async fn helm_install_with_the_chart_defaults_brings_sigil_up(ctx: Arc<Ctx>) -> Result<()> {
    let t = Instant::now();
    let chart = ctx.node.repo().join("charts/sigil");
    let mut args = vec![
        "install".to_owned(),
        RELEASE.into(),
        chart.display().to_string(),
        "-n".into(),
        RELEASE_NS.into(),
        "--create-namespace".into(),
    ];
    args.extend(ctx.node.helm_image_args().await?);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ctx.node.helm(&args).await?;
    sigil_ready(&ctx).await?;
    println!(
        "    helm install → every Sigil pod Ready: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    csi_registered(&ctx).await?;
    println!(
        "    helm install → csi.sigil.dev registered: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let drivers = Api::<CSIDriver>::all(ctx.client.clone());
    let driver = api(|| drivers.get("csi.sigil.dev")).await?;
    ensure!(
        driver.spec.service_account_token_in_secrets == Some(true),
        "the CSIDriver does not ask for tokens in secrets: {:?}",
        driver.spec
    );
    // The default TrustDomain is Ready and publishes its bundle.
    until("TrustDomain default Ready", READY, || async {
        let out = ctx
            .node
            .kubectl(&[
                "get",
                "trustdomain",
                "default",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .await?;
        Ok((out.trim() == "True").then_some(()))
    })
    .await?;
    // The operator's Lease names one of its pods.
    let leases = Api::<Lease>::namespaced(ctx.client.clone(), RELEASE_NS);
    let lease = api(|| leases.get("sigil-operator")).await?;
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    ensure!(
        holder.starts_with("sigil-operator-"),
        "lease holder {holder:?}"
    );
    Ok(())
}

/// A pod with the CSI socket volume, created with kubectl, runs the go-spiffe client in
/// its container: an X509-SVID and a JWT-SVID under the default ClusterSPIFFEID, from an
/// agent attesting a real containerd container (its cgroup is the kubelet's).
async fn a_socket_pod_gets_x509_and_jwt_svids_through_go_spiffe(ctx: Arc<Ctx>) -> Result<()> {
    let ns = "rn-socket";
    namespace(&ctx, ns, "").await?;
    let t = Instant::now();
    ctx.node
        .apply(&socket_pod(
            ns,
            "client",
            "default",
            "app: client",
            r#"["/bin/sleep", "infinity"]"#,
        ))
        .await?;
    let pod = wait_ready(&ctx, ns, "client").await?;
    let x509 = x509_of(&ctx, ns, "client").await?;
    println!(
        "    kubectl apply → X509-SVID in the container: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    ensure!(svid_id(&x509) == default_id(ns, "default"), "{x509}");
    ensure!(x509["svids"][0]["chain_len"].as_u64() >= Some(1), "{x509}");
    ensure!(x509["bundles"][TD].as_u64() >= Some(1), "{x509}");

    // A JWT-SVID, validated through the Workload API in the pod (the token stays there).
    let script = "j=$(/go-spiffe-client jwt -audience real-node) && \
        /go-spiffe-client validate -audience real-node -token \"$(echo \"$j\" | sed -n 's/.*\"token\":\"\\([^\"]*\\)\".*/\\1/p')\"";
    let validated = exec_json(&ctx, ns, "client", &["/bin/sh", "-c", script]).await?;
    ensure!(
        validated["spiffe_id"] == default_id(ns, "default")
            && validated["audience"] == serde_json::json!(["real-node"]),
        "{validated}"
    );

    // The container's cgroup is the kubelet's cgroupfs path for this pod: what the agent
    // read to attest it.
    let (_, cgroup, _) = exec(&ctx, ns, "client", &["cat", "/proc/self/cgroup"]).await?;
    let uid = uid_of(&pod);
    let cid = pod
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.into_iter().next())
        .and_then(|c| c.container_id)
        .unwrap_or_default();
    let cid = cid.strip_prefix("containerd://").unwrap_or(&cid);
    let want = format!("/kubepods/besteffort/pod{uid}/{cid}");
    ensure!(
        !cid.is_empty() && cgroup.lines().any(|l| l.ends_with(&want)),
        "the container's cgroup is not {want}:\n{cgroup}"
    );
    ensure!(
        pod_csi_mounts(&uid).values().all(|n| *n == 1) && pod_csi_mounts(&uid).len() == 1,
        "socket volume mounts: {:?}",
        pod_csi_mounts(&uid)
    );
    ctx.state.lock().unwrap().socket_pod = Some((ns.into(), "client".into()));
    Ok(())
}

/// The README's example (examples/workload.yaml, shown verbatim in the README), applied
/// with kubectl: `kubectl exec web -- sigil x509 fetch` prints its SPIFFE ID.
async fn the_readmes_example_workload_gets_its_svid(ctx: Arc<Ctx>) -> Result<()> {
    let example = std::fs::read_to_string(ctx.node.repo().join("examples/workload.yaml"))?;
    let readme = std::fs::read_to_string(ctx.node.repo().join("README.md"))?;
    ensure!(
        readme.contains(&example),
        "README.md does not show examples/workload.yaml as it is"
    );
    ctx.node
        .kubectl(&["apply", "-f", "examples/workload.yaml"])
        .await?;
    wait_ready(&ctx, "default", "web").await?;
    let (ok, out, err) = exec(&ctx, "default", "web", &["sigil", "x509", "fetch"]).await?;
    ensure!(ok, "sigil x509 fetch in the example pod failed: {err}");
    ensure!(
        out.contains(&format!(
            "SPIFFE ID:   {}  (default)",
            default_id("default", "web")
        )),
        "sigil x509 fetch printed:\n{out}"
    );
    Ok(())
}

/// The agent attested with the token the kubelet projected into its pod: the token file
/// on the host is bound to the agent pod and its node, passes a TokenReview for the PSAT
/// audience, and the operator logged the attestation of this node.
async fn psat_uses_the_token_the_kubelet_projected_into_the_agent_pod(ctx: Arc<Ctx>) -> Result<()> {
    let agent = agent_pod(&ctx).await?;
    let uid = uid_of(&agent);
    let path = format!(
        "/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~projected/agent-token/sigil-agent"
    );
    let token = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| anyhow!("{path} is not a JWT"))?;
    let claims: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?)?;
    ensure!(
        claims["aud"] == serde_json::json!(["sigil-agent"]),
        "aud {}",
        claims["aud"]
    );
    let k8s = &claims["kubernetes.io"];
    ensure!(
        k8s["pod"]["uid"] == uid.as_str()
            && k8s["pod"]["name"] == name_of(&agent).as_str()
            && k8s["namespace"] == RELEASE_NS
            && k8s["serviceaccount"]["name"] == "sigil-agent"
            && k8s["node"]["name"] == NODE_NAME,
        "the projected token is not bound to the agent pod and its node: {k8s}"
    );
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: token.trim().to_owned(),
            audiences: Some(vec!["sigil-agent".into()]),
        },
        ..Default::default()
    };
    let reviews = Api::<TokenReview>::all(ctx.client.clone());
    let pp = PostParams::default();
    let review = api(|| reviews.create(&pp, &request)).await?;
    let status = review.status.unwrap_or_default();
    ensure!(
        status.authenticated == Some(true),
        "TokenReview: {:?}",
        status.error
    );
    // The operator attested this node with it; the agent holds its node SVID.
    let nodes = Api::<Node>::all(ctx.client.clone());
    let node_uid = api(|| nodes.get(NODE_NAME))
        .await?
        .metadata
        .uid
        .unwrap_or_default();
    let agent_id = format!("spiffe://{TD}/sigil/agent/k8s_psat/cluster/{node_uid}");
    let ops = ctx
        .node
        .kubectl(&[
            "logs",
            "-n",
            RELEASE_NS,
            "-l",
            "app.kubernetes.io/component=operator",
            "--tail=-1",
        ])
        .await?;
    ensure!(
        ops.lines()
            .any(|l| l.contains("agent attested (psat)") && l.contains(&agent_id)),
        "no operator log of the PSAT attestation of {agent_id}"
    );
    let agent_log = logs(&ctx, RELEASE_NS, &name_of(&agent), Some("agent")).await?;
    ensure!(
        agent_log
            .lines()
            .any(|l| l.contains("node attested") && l.contains(&agent_id)),
        "the agent did not log its attestation as {agent_id}"
    );
    Ok(())
}

/// A files-mode pod (its ClusterSPIFFEID has a 20 s TTL) sees its files rotate, every
/// generation whole (key matching certificate, chaining to the bundle), and sigil-csi got
/// the pod's token from the CSIDriver's tokenRequests, in the request's secrets.
async fn a_files_pod_sees_a_rotation_with_the_csidriver_tokens(ctx: Arc<Ctx>) -> Result<()> {
    let ns = "rn-files";
    namespace(&ctx, ns, "").await?;
    rotating_clusterspiffeid(&ctx).await?;
    service_account(&ctx, ns, "reader").await?;
    let id = rotating_id(ns, "reader");
    ctx.node
        .apply(&files_pod(
            ns,
            "reader",
            "reader",
            "sigil.dev/rotate: fast",
            &id,
            r#"["/go-spiffe-client", "files-check", "-dir", "/svid"]"#,
        ))
        .await?;
    let pod = wait_ready(&ctx, ns, "reader").await?;
    let serials = until(
        "two certificates in the files volume",
        Duration::from_secs(90),
        || async {
            let log = logs(&ctx, ns, "reader", None).await?;
            let lines = json_lines(&log);
            if let Some(e) = lines.iter().find(|l| l.get("error").is_some()) {
                bail!("the reader saw a broken volume: {e}");
            }
            let serials: Vec<Value> = lines
                .into_iter()
                .filter(|l| l.get("serial").is_some())
                .collect();
            Ok((serials.len() >= 2).then_some(serials))
        },
    )
    .await?;
    ensure!(
        serials.iter().all(|s| s["spiffe_id"] == id.as_str()),
        "{serials:?}"
    );
    let uid = uid_of(&pod);
    ensure!(
        pod_csi_mounts(&uid).len() == 1 && pod_csi_mounts(&uid).values().all(|n| *n == 1),
        "files volume mounts: {:?}",
        pod_csi_mounts(&uid)
    );
    // sigil-csi's count of where the kubelet passed the pod's token.
    let agent = agent_pod(&ctx).await?;
    let metrics = ctx
        .node
        .kubectl(&[
            "get",
            "--raw",
            &format!(
                "/api/v1/namespaces/{RELEASE_NS}/pods/{}:9092/proxy/metrics",
                name_of(&agent)
            ),
        ])
        .await?;
    let count = |source: &str| -> u64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "sigil_csi_pod_tokens_total{{source=\"{source}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    ensure!(
        count("secrets") >= 1 && count("volume_context") == 0,
        "sigil-csi's pod tokens by source: secrets {}, volume_context {}",
        count("secrets"),
        count("volume_context")
    );
    Ok(())
}

/// `helm upgrade` with changed values (the kubelet as pod source; the default
/// ClusterSPIFFEID skips pods labelled `sigil.dev/identity: none`): the DaemonSet rolls to
/// a new agent pod, everything is Ready again with no container restarted, the release is
/// at revision 2, and the socket pod of the first step is served by the new agent.
async fn helm_upgrade_to_the_kubelet_pod_source_rolls_cleanly(ctx: Arc<Ctx>) -> Result<()> {
    let before = agent_pod(&ctx).await?;
    let t = Instant::now();
    let chart = ctx.node.repo().join("charts/sigil");
    let mut args = vec![
        "upgrade".to_owned(),
        RELEASE.into(),
        chart.display().to_string(),
        "-n".into(),
        RELEASE_NS.into(),
        "--set".into(),
        "agent.podSource=kubelet".into(),
        "--set-json".into(),
        r#"clusterSPIFFEID.podSelector={"matchExpressions":[{"key":"sigil.dev/identity","operator":"NotIn","values":["none"]}]}"#.into(),
    ];
    args.extend(ctx.node.helm_image_args().await?);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ctx.node.helm(&args).await?;
    until("a new agent pod", READY, || async {
        let now = agent_pod(&ctx).await?;
        Ok((uid_of(&now) != uid_of(&before)).then_some(()))
    })
    .await?;
    sigil_ready(&ctx).await?;
    csi_registered(&ctx).await?;
    println!(
        "    helm upgrade → new agent pod Ready: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let agent = agent_pod(&ctx).await?;
    let args = agent.spec.as_ref().unwrap().containers[0]
        .args
        .clone()
        .unwrap_or_default();
    ensure!(
        args.iter().any(|a| a == "--pod-source=kubelet"),
        "agent args {args:?}"
    );
    // The old pod is gone; nothing restarted on the way.
    until("the old agent pod gone", READY, || async {
        Ok(pods(&ctx, RELEASE_NS)
            .get_opt(&name_of(&before))
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    let release_pods = pods(&ctx, RELEASE_NS);
    let lp = ListParams::default();
    for p in api(|| release_pods.list(&lp)).await?.items {
        for c in p
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default()
        {
            ensure!(
                c.restart_count == 0,
                "{}/{} restarted {} times",
                p.metadata.name.unwrap_or_default(),
                c.name,
                c.restart_count
            );
        }
    }
    let status: Value = serde_json::from_str(
        &ctx.node
            .helm(&["status", RELEASE, "-n", RELEASE_NS, "-o", "json"])
            .await?,
    )?;
    ensure!(
        status["version"] == 2 && status["info"]["status"] == "deployed",
        "helm status: version {} {}",
        status["version"],
        status["info"]["status"]
    );
    // The first step's pod, served by the new agent through the kubelet's /pods.
    let socket = ctx.state.lock().unwrap().socket_pod.clone();
    if let Some((ns, pod)) = socket {
        let x509 = x509_of(&ctx, &ns, &pod).await?;
        ensure!(svid_id(&x509) == default_id(&ns, "default"), "{x509}");
    }
    Ok(())
}

/// With the kubelet's `/pods` (over its serving certificate) as pod source, a new pod's
/// container is attested and served, and a pod whose container runs to completion got
/// its SVID at start (first-svid).
async fn the_kubelet_pod_source_attests_real_containers(ctx: Arc<Ctx>) -> Result<()> {
    let ns = "rn-kubelet";
    namespace(&ctx, ns, "").await?;
    service_account(&ctx, ns, "web").await?;
    ctx.node
        .apply(&socket_pod(
            ns,
            "web",
            "web",
            "app: web",
            r#"["/bin/sleep", "infinity"]"#,
        ))
        .await?;
    ctx.node
        .apply(&socket_pod(
            ns,
            "once",
            "web",
            "app: once",
            r#"["/go-spiffe-client", "-timeout", "120s", "first-svid"]"#,
        ))
        .await?;
    wait_ready(&ctx, ns, "web").await?;
    let x509 = x509_of(&ctx, ns, "web").await?;
    ensure!(svid_id(&x509) == default_id(ns, "web"), "{x509}");
    let log = wait_done(&ctx, ns, "once").await?;
    let first = json_lines(&log)
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("first-svid printed nothing: {log}"))?;
    ensure!(
        first["spiffe_id"] == default_id(ns, "web").as_str(),
        "{first}"
    );
    let ms = (first["svid_unix_nano"].as_i64().unwrap_or(0)
        - first["started_unix_nano"].as_i64().unwrap_or(0))
        / 1_000_000;
    println!("    container start → first X509-SVID (kubelet pod source): {ms} ms");
    Ok(())
}

/// A pod that no ClusterSPIFFEID selects (the upgraded default skips
/// `sigil.dev/identity: none`) gets PermissionDenied from the Workload API, and `sigil
/// explain` says why.
async fn a_pod_no_clusterspiffeid_selects_gets_permission_denied(ctx: Arc<Ctx>) -> Result<()> {
    let ns = "rn-denied";
    namespace(&ctx, ns, "").await?;
    // kubectl prints the admission webhook's warning (through the operator's Service).
    let manifest = std::env::temp_dir().join(format!("rn-denied-{}.yaml", std::process::id()));
    std::fs::write(
        &manifest,
        socket_pod(
            ns,
            "nobody",
            "default",
            "sigil.dev/identity: none",
            r#"["/bin/sleep", "infinity"]"#,
        ),
    )?;
    let created = ctx
        .node
        .kubectl_output(&["apply", "-f", &manifest.display().to_string()])
        .await?;
    let _ = std::fs::remove_file(&manifest);
    let warning = String::from_utf8_lossy(&created.stderr);
    ensure!(created.status.success(), "kubectl apply: {warning}");
    ensure!(
        warning.contains("Warning:")
            && warning.contains("no ClusterSPIFFEID selects it")
            && warning.contains("sigil.dev/identity=none"),
        "kubectl printed no admission warning naming the selector: {warning:?}"
    );
    wait_ready(&ctx, ns, "nobody").await?;
    let (ok, out, err) = exec(&ctx, ns, "nobody", &["/go-spiffe-client", "x509"]).await?;
    ensure!(!ok, "an unselected pod got an SVID: {out}");
    ensure!(
        err.contains("PermissionDenied"),
        "not PermissionDenied: {err}"
    );
    let explain = tokio::process::Command::new(ctx.node.bin_dir().join("sigil"))
        .args(["explain", "pod", &format!("{ns}/nobody")])
        .env("KUBECONFIG", sigil_e2e::node::KUBECONFIG)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&explain.stdout);
    ensure!(
        text.contains("default") && text.contains("sigil.dev/identity"),
        "sigil explain does not say which selector skips the pod:\n{text}{}",
        String::from_utf8_lossy(&explain.stderr)
    );
    Ok(())
}

/// nginx (Debian's) serves mTLS with its files-mode SVID: a client pod with its own SVID
/// connects, checks nginx's SPIFFE ID and is verified; a pod that no ClusterSPIFFEID
/// selects has no SVID, and is refused with no certificate and with a self-made
/// certificate claiming the client's SPIFFE ID.
async fn nginx_serves_mtls_with_its_files_and_refuses_unselected_pods(ctx: Arc<Ctx>) -> Result<()> {
    let ns = "rn-nginx";
    namespace(&ctx, ns, "").await?;
    for sa in ["nginx", "client"] {
        service_account(&ctx, ns, sa).await?;
    }
    let nginx_id = default_id(ns, "nginx");
    ctx.node
        .apply(&format!(
            r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: nginx, namespace: {ns}}}
data:
  nginx.conf: |
    daemon off;
    user nobody nobody;
    error_log /dev/stderr info;
    pid /tmp/nginx.pid;
    events {{}}
    http {{
      access_log /dev/stdout;
      client_body_temp_path /tmp/body;
      proxy_temp_path /tmp/proxy;
      fastcgi_temp_path /tmp/fastcgi;
      uwsgi_temp_path /tmp/uwsgi;
      scgi_temp_path /tmp/scgi;
      server {{
        listen 8443 ssl;
        ssl_certificate /svid/svid.pem;
        ssl_certificate_key /svid/svid_key.pem;
        ssl_client_certificate /svid/bundle.pem;
        ssl_verify_client on;
        ssl_verify_depth 3;
        default_type text/plain;
        location / {{ return 200 "verified $ssl_client_verify\n"; }}
      }}
    }}
---
apiVersion: v1
kind: Pod
metadata: {{name: nginx, namespace: {ns}, labels: {{app: nginx}}}}
spec:
  serviceAccountName: nginx
  terminationGracePeriodSeconds: 1
  containers:
  - name: nginx
    image: {nginx}
    args: ["-c", "/etc/nginx-conf/nginx.conf"]
    ports: [{{containerPort: 8443}}]
    readinessProbe: {{tcpSocket: {{port: 8443}}, periodSeconds: 1}}
    volumeMounts:
    - {{name: svid, mountPath: /svid, readOnly: true}}
    - {{name: conf, mountPath: /etc/nginx-conf, readOnly: true}}
  volumes:
  - name: svid
    csi: {{driver: csi.sigil.dev, readOnly: true, volumeAttributes: {{mode: files}}}}
  - {{name: conf, configMap: {{name: nginx}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: nginx, namespace: {ns}}}
spec:
  selector: {{app: nginx}}
  ports: [{{port: 8443, targetPort: 8443}}]
"#,
            nginx = image("nginx"),
        ))
        .await?;
    ctx.node
        .apply(&socket_pod(
            ns,
            "client",
            "client",
            "app: client",
            r#"["/bin/sleep", "infinity"]"#,
        ))
        .await?;
    ctx.node
        .apply(&socket_pod(
            ns,
            "intruder",
            "client",
            "app: intruder, sigil.dev/identity: none",
            r#"["/bin/sleep", "infinity"]"#,
        ))
        .await?;
    for p in ["nginx", "client", "intruder"] {
        wait_ready(&ctx, ns, p).await?;
    }
    let url = format!("https://nginx.{ns}.svc.cluster.local:8443/");
    let get = |who: &'static str, mode: String| {
        let ctx = ctx.clone();
        let url = url.clone();
        let nginx_id = nginx_id.clone();
        async move {
            exec_json(
                &ctx,
                ns,
                who,
                &[
                    "/go-spiffe-client",
                    "https-get",
                    "-url",
                    &url,
                    "-server-id",
                    &nginx_id,
                    "-client",
                    &mode,
                ],
            )
            .await
        }
    };
    let ok = get("client", "svid".into()).await?;
    ensure!(
        ok["status"] == 200
            && ok["body"] == "verified SUCCESS\n"
            && ok["peer_id"] == nginx_id.as_str()
            && ok["own_id"] == default_id(ns, "client").as_str(),
        "the client with its SVID: {ok}"
    );
    // The intruder has no identity at all...
    let (got, out, err) = exec(&ctx, ns, "intruder", &["/go-spiffe-client", "x509"]).await?;
    ensure!(
        !got && err.contains("PermissionDenied"),
        "the unselected pod: {out}{err}"
    );
    // ...so nginx refuses it, with no certificate and with one it made itself.
    let none = get("intruder", "none".into()).await?;
    ensure!(
        none["status"] == 400
            && none["body"]
                .as_str()
                .unwrap_or_default()
                .contains("No required SSL certificate was sent"),
        "no certificate: {none}"
    );
    let forged = get(
        "intruder",
        format!("self-signed:{}", default_id(ns, "client")),
    )
    .await?;
    ensure!(
        forged["status"] == 400
            && forged["body"]
                .as_str()
                .unwrap_or_default()
                .contains("The SSL certificate error"),
        "a self-made certificate claiming the client's ID: {forged}"
    );
    Ok(())
}

/// A pod with a `podCertificate` projected volume of signer `sigil.dev/default` and a
/// `clusterTrustBundle` projection of the same signer, created with kubectl: the kubelet
/// makes the key and the PodCertificateRequest, the operator (as the chart installs it,
/// with the chart's RBAC) signs it, and the kubelet starts the container with the
/// credential bundle. go-spiffe reads the file as an X509-SVID of the pod's ID and
/// verifies it against the projected bundle. A restarted kubelet asks again with a new
/// key (it keeps no state across restarts), and the new certificate reaches the running
/// pod: a rotation, driven by the kubelet as at `beginRefreshAt`, without waiting the
/// hour that is the shortest pod certificate.
async fn a_pod_certificate_volume_holds_an_svid_go_spiffe_verifies_and_it_rotates(
    ctx: Arc<Ctx>,
) -> Result<()> {
    let ns = "rn-podcert";
    namespace(&ctx, ns, "").await?;
    let t = Instant::now();
    ctx.node
        .apply(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: app, namespace: {ns}}}
spec:
  terminationGracePeriodSeconds: 1
  restartPolicy: Never
  containers:
  - name: app
    image: {image}
    command: ["/bin/sleep", "infinity"]
    volumeMounts: [{{name: spiffe, mountPath: /var/run/spiffe, readOnly: true}}]
  volumes:
  - name: spiffe
    projected:
      sources:
      - podCertificate: {{signerName: sigil.dev/default, keyType: ECDSAP256, credentialBundlePath: credential-bundle.private-key.pem}}
      - clusterTrustBundle: {{signerName: sigil.dev/default, labelSelector: {{matchLabels: {{sigil.dev/bundle: own}}}}, path: example.org.spiffe-trust-bundle.pem}}
"#,
            image = image("go-spiffe-client"),
        ))
        .await?;
    wait_ready(&ctx, ns, "app").await?;
    println!(
        "    kubectl apply → pod Ready with its pod certificate: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let check = [
        "/go-spiffe-client",
        "pod-cert",
        "-svid-file",
        "/var/run/spiffe/credential-bundle.private-key.pem",
        "-bundle-file",
        "/var/run/spiffe/example.org.spiffe-trust-bundle.pem",
        "-trust-domain",
        TD,
    ];
    let first = exec_json(&ctx, ns, "app", &check).await?;
    ensure!(first["spiffe_id"] == default_id(ns, "default"), "{first}");
    // The request: issued by Sigil, with the kubelet's timing fields.
    let pcrs = Api::<k8s_openapi::api::certificates::v1::PodCertificateRequest>::namespaced(
        ctx.client.clone(),
        ns,
    );
    let lp = ListParams::default();
    let issued = api(|| pcrs.list(&lp)).await?.items;
    ensure!(
        issued.iter().any(|p| p
            .status
            .as_ref()
            .and_then(|s| s.begin_refresh_at.as_ref())
            .is_some()),
        "no issued PodCertificateRequest in {ns}: {issued:?}"
    );

    let t = Instant::now();
    ctx.node.restart("kubelet").await?;
    let second = until(
        "a new certificate in the running pod",
        Duration::from_secs(240),
        || async {
            let (ok, out, _) = exec(&ctx, ns, "app", &check).await?;
            let v: Value = match serde_json::from_str(out.trim()) {
                Ok(v) if ok => v,
                _ => return Ok(None),
            };
            Ok((v["serial"] != first["serial"]).then_some(v))
        },
    )
    .await?;
    println!(
        "    kubelet restart → the pod holds a new certificate: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    ensure!(second["spiffe_id"] == default_id(ns, "default"), "{second}");
    let in_ns = pods(&ctx, ns);
    let pod = api(|| in_ns.get("app")).await?;
    ensure!(
        pod_ready(&pod),
        "the pod is not Ready after the rotation: {}",
        pod_why(&pod)
    );
    Ok(())
}

/// While a socket-mode pod holds a Workload API stream and a files-mode pod reads its
/// rotating files in a loop: delete the agent's DaemonSet pod (the agent and sigil-csi),
/// the operator's leader and then its other pod, restart the kubelet, restart
/// containerd. After each, the workloads get SVIDs again, the files keep rotating, a new
/// files-mode pod starts with its files, and no mount is duplicated; throughout, the
/// files are never missing or mismatched; at the end no mount is duplicated in the
/// reader's container either.
async fn restarts_keep_streams_served_and_files_whole(ctx: Arc<Ctx>) -> Result<()> {
    let ns = "rn-restart";
    namespace(&ctx, ns, "").await?;
    rotating_clusterspiffeid(&ctx).await?;
    service_account(&ctx, ns, "reader").await?;
    let id = rotating_id(ns, "reader");
    ctx.node
        .apply(&socket_pod(
            ns,
            "streamer",
            "default",
            "app: streamer",
            r#"["/go-spiffe-client", "watch"]"#,
        ))
        .await?;
    ctx.node
        .apply(&files_pod(
            ns,
            "reader",
            "reader",
            "sigil.dev/rotate: fast",
            &id,
            r#"["/go-spiffe-client", "files-check", "-dir", "/svid"]"#,
        ))
        .await?;
    wait_ready(&ctx, ns, "streamer").await?;
    wait_ready(&ctx, ns, "reader").await?;

    // Counts of what the two workloads printed since `since`.
    let seen = |since: SystemTime| {
        let ctx = ctx.clone();
        async move {
            let stream = json_lines(&logs(&ctx, ns, "streamer", None).await?);
            let files = json_lines(&logs(&ctx, ns, "reader", None).await?);
            if let Some(e) = files.iter().find(|l| l.get("error").is_some()) {
                bail!("the files reader saw a broken volume: {e}");
            }
            let after = |v: &Value| rfc3339(v).is_some_and(|t| t >= since);
            let updates = stream
                .iter()
                .filter(|l| l.get("update").is_some() && after(l))
                .count();
            let serials = files
                .iter()
                .filter(|l| l.get("serial").is_some() && after(l))
                .count();
            Ok::<_, anyhow::Error>((updates, serials))
        }
    };
    until(
        "the stream's first update and the files' first certificate",
        READY,
        || async {
            let (u, s) = seen(SystemTime::UNIX_EPOCH).await?;
            Ok((u >= 1 && s >= 1).then_some(()))
        },
    )
    .await?;

    // After a disruption: a fresh fetch works, the files rotate again (which needs the
    // agent, the operator and sigil-csi), and, when the stream had to reconnect, it got
    // an SVID again.
    let after = std::sync::atomic::AtomicUsize::new(0);
    let recovered = |what: &'static str, since: SystemTime, stream_breaks: bool| {
        let ctx = ctx.clone();
        let id = id.clone();
        let k = after.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            // A new pod with a files-mode volume starts (the kubelet calls sigil-csi)
            // and finds its files.
            let name = format!("after-{k}");
            ctx.node
                .apply(&files_pod(
                    ns,
                    &name,
                    "reader",
                    "sigil.dev/rotate: fast",
                    &id,
                    r#"["/go-spiffe-client", "-timeout", "120s", "files-first", "-dir", "/svid"]"#,
                ))
                .await?;
            let log = wait_done(&ctx, ns, &name).await?;
            let first = json_lines(&log).into_iter().next().unwrap_or_default();
            ensure!(
                first["spiffe_id"] == id.as_str(),
                "{what}: a new files-mode pod printed {log}"
            );
            no_duplicate_mounts().with_context(|| what)?;
            let x509 = x509_of(&ctx, ns, "streamer").await?;
            ensure!(
                svid_id(&x509) == default_id(ns, "default"),
                "{what}: {x509}"
            );
            until(
                &format!("{what}: the files rotate and the stream is served"),
                READY,
                || async {
                    let (u, s) = seen(since).await?;
                    Ok((s >= 1 && (!stream_breaks || u >= 1)).then_some(()))
                },
            )
            .await?;
            println!(
                "    {what}: served again {:.1}s after it",
                since.elapsed().unwrap_or_default().as_secs_f64()
            );
            Ok::<_, anyhow::Error>(())
        }
    };

    // 1. The DaemonSet pod: the agent and sigil-csi together.
    let agent = agent_pod(&ctx).await?;
    let since = SystemTime::now();
    let (release_pods, dp) = (pods(&ctx, RELEASE_NS), DeleteParams::default());
    let agent_name = name_of(&agent);
    api(|| release_pods.delete(&agent_name, &dp)).await?;
    until("a new agent pod", READY, || async {
        Ok((uid_of(&agent_pod(&ctx).await?) != uid_of(&agent)).then_some(()))
    })
    .await?;
    sigil_ready(&ctx).await?;
    recovered("agent + sigil-csi pod deleted", since, true).await?;

    // 2. The operator's leader, then the other replica.
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), RELEASE_NS);
    let leader = api(|| leases.get("sigil-operator"))
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .ok_or_else(|| anyhow!("no operator leader"))?;
    let operators = ListParams::default().labels("app.kubernetes.io/component=operator");
    let replicas: Vec<String> = api(|| release_pods.list(&operators))
        .await?
        .items
        .iter()
        .map(name_of)
        .collect();
    ensure!(
        replicas.contains(&leader),
        "leader {leader} is not one of {replicas:?}"
    );
    let since = SystemTime::now();
    api(|| release_pods.delete(&leader, &dp)).await?;
    until("a new operator leader", READY, || async {
        let h = leases
            .get("sigil-operator")
            .await?
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default();
        Ok((!h.is_empty() && h != leader).then_some(()))
    })
    .await?;
    sigil_ready(&ctx).await?;
    recovered("operator leader deleted", since, false).await?;
    let since = SystemTime::now();
    for other in replicas.iter().filter(|r| **r != leader) {
        api(|| release_pods.delete(other, &dp)).await?;
    }
    sigil_ready(&ctx).await?;
    recovered("the other operator replica deleted", since, false).await?;

    // 3. The kubelet, then containerd (supervised: they start again, as under systemd).
    for component in ["kubelet", "containerd"] {
        let since = SystemTime::now();
        ctx.node.restart(component).await?;
        until(
            &format!("node Ready after the {component} restart"),
            READY,
            || async {
                let n = Api::<Node>::all(ctx.client.clone()).get(NODE_NAME).await?;
                let ready = n
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                Ok(ready.then_some(()))
            },
        )
        .await?;
        sigil_ready(&ctx).await?;
        csi_registered(&ctx).await?;
        recovered(
            if component == "kubelet" {
                "kubelet restarted"
            } else {
                "containerd restarted"
            },
            since,
            false,
        )
        .await?;
    }

    // No error in the files at any point, and no mount twice.
    let files = json_lines(&logs(&ctx, ns, "reader", None).await?);
    let checks = files
        .iter()
        .filter_map(|l| l["checks"].as_u64())
        .max()
        .unwrap_or(0);
    let serials = files.iter().filter(|l| l.get("serial").is_some()).count();
    ensure!(
        files.iter().all(|l| l.get("error").is_none()),
        "the files reader saw errors"
    );
    println!("    files reader: {checks} reads, {serials} certificates, no error");
    no_duplicate_mounts()?;
    for p in ["streamer", "reader"] {
        let pod = pods(&ctx, ns).get(p).await?;
        let m = pod_csi_mounts(&uid_of(&pod));
        ensure!(
            m.len() == 1 && m.values().all(|n| *n == 1),
            "{p}'s volume mounts on the host: {m:?}"
        );
    }
    let (_, mountinfo, _) = exec(&ctx, ns, "reader", &["cat", "/proc/self/mountinfo"]).await?;
    let svid_mounts = mountinfo
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some("/svid"))
        .count();
    ensure!(
        svid_mounts == 1,
        "/svid mounted {svid_mounts} times in the reader:\n{mountinfo}"
    );
    Ok(())
}

/// After the workloads are gone, `helm uninstall` removes every object of the release
/// and leaves no mount, no socket and no file in the chart's hostPath directories; the
/// kubelet unregisters the driver. The CRDs stay (Helm never deletes `crds/`).
async fn helm_uninstall_leaves_no_mounts_sockets_or_hostpath_state(ctx: Arc<Ctx>) -> Result<()> {
    let namespaces = ctx
        .node
        .kubectl(&["get", "ns", "-o", "jsonpath={.items[*].metadata.name}"])
        .await?;
    let ours: Vec<&str> = namespaces
        .split_whitespace()
        .filter(|n| n.starts_with("rn-"))
        .collect();
    if !ours.is_empty() {
        let mut args = vec!["delete", "ns", "--wait=true", "--timeout=180s"];
        args.extend(&ours);
        ctx.node.kubectl(&args).await?;
    }
    ctx.node
        .kubectl(&[
            "delete",
            "-f",
            "examples/workload.yaml",
            "--ignore-not-found",
            "--grace-period=1",
            "--wait=true",
        ])
        .await?;
    ctx.node
        .kubectl(&[
            "delete",
            "clusterspiffeid",
            "real-node-rotating",
            "real-node-faults",
            "--ignore-not-found",
        ])
        .await?;
    ctx.node
        .helm(&[
            "uninstall",
            RELEASE,
            "-n",
            RELEASE_NS,
            "--wait",
            "--timeout",
            "180s",
        ])
        .await?;
    until("every pod of the release gone", READY, || async {
        Ok(pods(&ctx, RELEASE_NS)
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    until("csi.sigil.dev unregistered from CSINode", READY, || async {
        let n = Api::<CSINode>::all(ctx.client.clone())
            .get(NODE_NAME)
            .await?;
        Ok((!n.spec.drivers.iter().any(|d| d.name == "csi.sigil.dev")).then_some(()))
    })
    .await?;
    let drivers = Api::<CSIDriver>::all(ctx.client.clone());
    ensure!(
        api(|| drivers.get_opt("csi.sigil.dev")).await?.is_none(),
        "the CSIDriver outlived the release"
    );
    for prefix in [
        "/var/lib/sigil-csi",
        "/run/sigil",
        "/var/lib/kubelet/plugins/csi.sigil.dev",
    ] {
        let m = host_mounts(prefix);
        ensure!(m.is_empty(), "mounts left under {prefix}: {m:?}");
    }
    let csi_mounts: Vec<String> = host_mounts("/var/lib/kubelet/pods/")
        .into_keys()
        .filter(|m| m.contains("kubernetes.io~csi"))
        .collect();
    ensure!(
        csi_mounts.is_empty(),
        "CSI volume mounts left: {csi_mounts:?}"
    );
    // Sockets and files: none (the directories themselves stay: the kubelet made them,
    // DirectoryOrCreate, and nothing removes them).
    let mut files = Vec::new();
    for dir in [
        "/run/sigil",
        "/var/lib/sigil-csi",
        "/var/lib/kubelet/plugins/csi.sigil.dev",
    ] {
        collect_files(Path::new(dir), &mut files);
    }
    if let Ok(entries) = std::fs::read_dir("/var/lib/kubelet/plugins_registry") {
        files.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains("sigil")),
        );
    }
    ensure!(files.is_empty(), "left behind: {files:?}");
    // The CRDs stay, and so do the objects Sigil made itself in the release namespace.
    let crds = ctx.node.kubectl(&["get", "crd", "-o", "name"]).await?;
    for crd in [
        "trustdomains.sigil.dev",
        "clusterspiffeids.sigil.dev",
        "federatedbundles.sigil.dev",
    ] {
        ensure!(crds.contains(crd), "CRD {crd} gone: Helm should keep crds/");
    }
    let left = ctx
        .node
        .kubectl(&["get", "secrets,configmaps", "-n", RELEASE_NS, "-o", "name"])
        .await?;
    println!(
        "    left in namespace {RELEASE_NS} after uninstall: {}",
        left.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => collect_files(&p, out),
            _ => out.push(p),
        }
    }
}
