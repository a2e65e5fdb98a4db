//! `make demo`: a local control plane, Sigil on loopback, and a pod-shaped workload getting
//! its SVID, then a rotation. Ctrl-C tears everything down (children die with the demo).
//!
//! hack/demo.sh builds the binaries and runs this with SIGIL_BIN_DIR pointing at them.
//! SIGIL_DEMO_HOLD=0 exits after the rotation instead of waiting for Ctrl-C.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sigil_e2e::ControlPlane;
use sigil_e2e::pod::PodContainer;
use sigil_e2e::process::Supervised;

const TD: &str = "demo.example.org";
const NS: &str = "sigil-system";
const NODE: &str = "demo-node";

fn step(msg: &str) {
    print!("[demo] {msg} ");
    let _ = std::io::stdout().flush();
}

fn done(started: Instant) {
    println!("✓ ({:.1?})", started.elapsed());
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("SIGIL_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/debug"));
    let p = dir.join(name);
    anyhow::ensure!(
        p.is_file(),
        "{} not found: run `make demo` (it builds the binaries first)",
        p.display()
    );
    Ok(p)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_for<T, F, Fut>(
    what: &str,
    within: Duration,
    process: &mut [&mut Supervised],
    mut f: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        for p in process.iter_mut() {
            if let Some(status) = p.exited() {
                anyhow::bail!("{what}: a process exited ({status})\n{}", p.log_tail(40));
            }
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = process.iter().map(|p| p.log_tail(20)).collect();
            anyhow::bail!("timed out waiting for {what}\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn http_ok(port: u16, path: &str) -> bool {
    sigil_e2e::http::get_ok(("127.0.0.1", port), path)
        .await
        .is_some()
}

async fn apply(client: &Client, v: serde_json::Value) -> anyhow::Result<()> {
    let obj: DynamicObject = serde_json::from_value(v)?;
    let gvk = obj
        .types
        .clone()
        .ok_or_else(|| anyhow::anyhow!("object without apiVersion/kind"))?;
    let (group, version) = gvk
        .api_version
        .split_once('/')
        .unwrap_or(("", gvk.api_version.as_str()));
    let plural = format!("{}s", gvk.kind.to_lowercase());
    let resource = kube::api::ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: gvk.api_version.clone(),
        kind: gvk.kind.clone(),
        plural,
    };
    let api: Api<DynamicObject> = match obj.namespace() {
        Some(ns) => Api::namespaced_with(client.clone(), &ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        &obj.name_any(),
        &PatchParams::apply("sigil-demo").force(),
        &Patch::Apply(&obj),
    )
    .await?;
    Ok(())
}

async fn create_pod(
    client: &Client,
    ns: &str,
    name: &str,
    sa: &str,
    labels: serde_json::Value,
) -> anyhow::Result<Pod> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": NODE, "serviceAccountName": sa, "automountServiceAccountToken": false,
                 "containers": [{"name": "main", "image": "registry.example/demo:1"}]},
    }))?;
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await?)
}

async fn run() -> anyhow::Result<()> {
    let hold = std::env::var("SIGIL_DEMO_HOLD")
        .map(|v| v != "0")
        .unwrap_or(true);
    let dir = tempfile::Builder::new().prefix("sigil-demo-").tempdir()?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;

    let t = Instant::now();
    step("starting etcd and kube-apiserver (built by make test-tools)…");
    let cp = ControlPlane::start().await?;
    done(t);
    println!(
        "       apiserver {} — kubeconfig {}",
        cp.server(),
        cp.kubeconfig_path().display()
    );
    let client = cp.admin().await?;

    let t = Instant::now();
    step("creating a Node, the sigil-system namespace and service accounts…");
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NODE}}))?,
        )
        .await?;
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": NS, "labels": {"sigil.dev/bundle": "true"}}}),
            )?,
        )
        .await?;
    Api::<Namespace>::all(client.clone())
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"sigil.dev/bundle": "true"}}})),
        )
        .await?;
    for (ns, sa) in [(NS, "sigil-agent"), ("default", "web")] {
        Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": sa}}))?,
            )
            .await?;
    }
    done(t);

    let t = Instant::now();
    step(&format!(
        "applying a TrustDomain ({TD}) and a ClusterSPIFFEID (ttl 20s, so a rotation shows soon)…"
    ));
    apply(&client, json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "TrustDomain", "metadata": {"name": "demo"}, "spec": {
        "trustDomain": TD,
        "bundle": {"namespaceSelector": {"matchLabels": {"sigil.dev/bundle": "true"}}},
    }}))
    .await?;
    apply(&client, json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": "demo-workloads"}, "spec": {
        "trustDomain": "demo",
        "podSelector": {"matchLabels": {"sigil.dev/identity": "true"}},
        "ttl": "20s",
        "dnsNameTemplates": ["{{pod.name}}.{{pod.namespace}}.svc"],
    }}))
    .await?;
    done(t);

    let t = Instant::now();
    step("starting sigil-operator (CA, identity index, Node API)…");
    let (op_health, node_api) = (free_port()?, free_port()?);
    let kubeconfig = cp.kubeconfig_path().display().to_string();
    let mut operator = Supervised::start(
        "sigil-operator",
        &bin("sigil-operator")?,
        &[
            "--namespace".into(),
            NS.into(),
            "--pod-name".into(),
            "sigil-operator-0".into(),
            "--health-addr".into(),
            format!("127.0.0.1:{op_health}"),
            "--agent-trust-domain".into(),
            TD.into(),
            "--node-api-addr".into(),
            format!("127.0.0.1:{node_api}"),
            "--cluster-name".into(),
            "demo".into(),
            "--log-format".into(),
            "text".into(),
            "--kubeconfig".into(),
            kubeconfig.clone(),
        ],
        &dir.path().join("operator.log"),
    )?;
    wait_for(
        "sigil-operator to be ready",
        Duration::from_secs(60),
        &mut [&mut operator],
        || async move { http_ok(op_health, "/ready").await.then_some(()) },
    )
    .await?;
    done(t);

    let t = Instant::now();
    step("starting sigil-agent for node demo-node (PSAT attestation with a real pod-bound token)…");
    let agent_pod = create_pod(
        &client,
        NS,
        "sigil-agent-demo",
        "sigil-agent",
        json!({"app": "sigil-agent"}),
    )
    .await?;
    std::fs::write(
        dir.path().join("agent-token"),
        sigil_e2e::pod::bound_token(&client, &agent_pod, "sigil-agent", 3600).await?,
    )?;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), NS);
    let bundle = wait_for(
        "the trust bundle ConfigMap",
        Duration::from_secs(60),
        &mut [&mut operator],
        || async {
            cms.get_opt("sigil-trust-bundle")
                .await
                .ok()
                .flatten()
                .and_then(|c| c.data)
                .and_then(|d| d.get("bundle.spiffe").cloned())
        },
    )
    .await?;
    std::fs::write(dir.path().join("bundle.spiffe"), bundle)?;
    let agent_health = free_port()?;
    let socket = dir.path().join("agent").join("api.sock");
    let mut agent = Supervised::start(
        "sigil-agent",
        &bin("sigil-agent")?,
        &[
            "--node-name".into(),
            NODE.into(),
            "--operator-address".into(),
            format!("127.0.0.1:{node_api}"),
            "--trust-domain".into(),
            TD.into(),
            "--cluster-name".into(),
            "demo".into(),
            "--token-file".into(),
            dir.path().join("agent-token").display().to_string(),
            "--bundle-file".into(),
            dir.path().join("bundle.spiffe").display().to_string(),
            "--socket-path".into(),
            socket.display().to_string(),
            "--broker-socket-path".into(),
            dir.path()
                .join("broker")
                .join("broker.sock")
                .display()
                .to_string(),
            "--health-addr".into(),
            format!("127.0.0.1:{agent_health}"),
            "--log-format".into(),
            "text".into(),
            "--kubeconfig".into(),
            kubeconfig.clone(),
        ],
        &dir.path().join("agent.log"),
    )?;
    wait_for(
        "sigil-agent to be ready",
        Duration::from_secs(60),
        &mut [&mut operator, &mut agent],
        || async move { http_ok(agent_health, "/ready").await.then_some(()) },
    )
    .await?;
    std::fs::set_permissions(
        socket.parent().unwrap_or(dir.path()),
        std::fs::Permissions::from_mode(0o755),
    )?;
    done(t);

    println!(
        "[demo] creating pod default/web (serviceAccount web, label sigil.dev/identity=true) and running"
    );
    println!("       `sigil x509 fetch` as a real process inside the pod's cgroup:");
    let created = Instant::now();
    let web = create_pod(
        &client,
        "default",
        "web",
        "web",
        json!({"sigil.dev/identity": "true", "app": "web"}),
    )
    .await?;
    let container = PodContainer::create(&web.uid().unwrap_or_default())?;
    container
        .mark_running(&client, "default", "web", "main", "registry.example/demo:1")
        .await?;
    let addr = format!("unix://{}", socket.display());
    let sigil = bin("sigil")?;
    let mut cmd = container.command(&sigil);
    cmd.args(["x509", "fetch", "--socket", &addr]);
    let out = tokio::process::Command::from(cmd).output().await?;
    let took = created.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "sigil x509 fetch failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_tail(30)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("       | {line}");
    }
    println!("[demo] pod object created → SVID in the pod's process: {took:.1?}");

    println!(
        "[demo] rotation: watching the pod's X509-SVID (renewed before half-life of its 20s TTL)…"
    );
    let mut cmd = container.command(&sigil);
    cmd.args(["x509", "watch", "--socket", &addr, "--count", "2"]);
    let watch_started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::from(cmd).output(),
    )
    .await??;
    for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| {
        l.starts_with("---")
            || l.starts_with("SPIFFE ID")
            || l.starts_with("Serial")
            || l.starts_with("Valid")
    }) {
        println!("       | {line}");
    }
    println!(
        "[demo] rotation delivered to the open stream after {:.1?}",
        watch_started.elapsed()
    );

    let explain = tokio::process::Command::new(&sigil)
        .args([
            "explain",
            "pod",
            "default/web",
            "--kubeconfig",
            &kubeconfig,
            "--cluster-name",
            "demo",
        ])
        .output()
        .await?;
    println!("[demo] `sigil explain pod default/web`:");
    for line in String::from_utf8_lossy(&explain.stdout).lines() {
        println!("       | {line}");
    }

    if hold {
        println!("[demo] Sigil is running. Try:");
        println!("         export KUBECONFIG={kubeconfig}");
        println!("         {} bundle show --socket {addr}", sigil.display());
        println!("       logs: {}", dir.path().display());
        println!("[demo] press Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    println!("\n[demo] stopping…");
    drop(container);
    drop(agent);
    drop(operator);
    drop(cp);
    println!("[demo] done");
    Ok(())
}

fn main() {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("[demo] cannot start: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run()) {
        eprintln!("\n[demo] failed: {e:#}");
        std::process::exit(1);
    }
}
