//! Federation with a real peer: SPIRE (spire-server and spire-agent, built from the pinned
//! release by `make test-tools`) runs on loopback as a second trust domain, and the two
//! federate both ways.
//!
//! - Sigil's operator fetches SPIRE's bundle endpoint (https_spiffe, then https_web with
//!   a private CA after SPIRE restarts with a serving certificate).
//! - SPIRE fetches Sigil's bundle endpoint (https_spiffe, authenticated with Sigil's
//!   bundle, bootstrapped with `spire-server bundle set`).
//! - A workload identified by SPIRE (a process attested by spire-agent's unix attestor)
//!   and one identified by Sigil (a process in a pod-shaped cgroup, attested by
//!   sigil-agent) complete mutual TLS both ways with go-spiffe's spiffetls, each
//!   verifying the other with the federated bundle its own Workload API served.
//! - An X.509 authority prepared on the SPIRE side reaches the Sigil workload within one
//!   refresh interval.
#![allow(clippy::unwrap_used)]

#[path = "../../operator/tests/node_api_common/mod.rs"]
mod node_api_common;
#[path = "../../operator/tests/trust_domain_common/mod.rs"]
mod trust_domain_common;

mod agent_common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use node_api_common::create;
use serde_json::{Value, json};
use sigil_e2e::process::Supervised;
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_operator::crd::federated_bundle::FederatedBundle;
use tokio::io::{AsyncBufReadExt, BufReader};
use trust_domain_common::{INSTANCE_LABEL, SETTLE, eventually};

/// What SPIRE's bundle endpoint advertises as `spiffe_refresh_hint`, and so how often
/// Sigil refetches it.
const SPIRE_REFRESH_HINT: Duration = Duration::from_secs(3);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A SPIRE server and agent for `trust_domain`, federating with Sigil's `sigil_td`.
struct Spire {
    td: String,
    dir: PathBuf,
    server_port: u16,
    bundle_port: u16,
    server: Option<Supervised>,
    agent: Option<Supervised>,
    /// `unix://` address of spire-agent's Workload API.
    agent_addr: String,
    sigil_td: String,
    sigil_url: String,
}

/// How SPIRE's bundle endpoint authenticates itself.
enum SpireProfile {
    Spiffe,
    /// A serving certificate and key in these files.
    Web {
        cert: PathBuf,
        key: PathBuf,
    },
}

impl Spire {
    fn new(dir: &Path, td: &str, sigil_td: &str, sigil_url: &str) -> Self {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        Self {
            td: td.to_owned(),
            dir: dir.to_owned(),
            server_port: free_port(),
            bundle_port: free_port(),
            server: None,
            agent: None,
            agent_addr: format!("unix://{}", dir.join("agent.sock").display()),
            sigil_td: sigil_td.to_owned(),
            sigil_url: sigil_url.to_owned(),
        }
    }

    fn socket(&self) -> String {
        self.dir.join("server.sock").display().to_string()
    }

    fn bundle_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.bundle_port)
    }

    async fn start_server(&mut self, profile: &SpireProfile) {
        let profile = match profile {
            SpireProfile::Spiffe => "profile \"https_spiffe\" {}".to_owned(),
            SpireProfile::Web { cert, key } => format!(
                "profile \"https_web\" {{\n serving_cert_file {{\n cert_file_path = \"{}\"\n key_file_path = \"{}\"\n file_sync_interval = \"1h\"\n }}\n }}",
                cert.display(),
                key.display()
            ),
        };
        let d = self.dir.display();
        let config = format!(
            r#"server {{
  bind_address = "127.0.0.1"
  bind_port = "{server_port}"
  socket_path = "{d}/server.sock"
  trust_domain = "{td}"
  data_dir = "{d}/data"
  log_level = "DEBUG"
  ca_ttl = "2h"
  default_x509_svid_ttl = "30m"
  federation {{
    bundle_endpoint {{
      address = "127.0.0.1"
      port = {bundle_port}
      refresh_hint = "{hint}s"
      {profile}
    }}
    federates_with "{sigil_td}" {{
      bundle_endpoint_url = "{sigil_url}"
      bundle_endpoint_profile "https_spiffe" {{
        endpoint_spiffe_id = "spiffe://{sigil_td}/sigil/bundle-endpoint"
      }}
    }}
  }}
}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{d}/data/datastore.sqlite3"
    }}
  }}
  KeyManager "disk" {{
    plugin_data {{ keys_path = "{d}/data/keys.json" }}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
}}
"#,
            server_port = self.server_port,
            td = self.td,
            bundle_port = self.bundle_port,
            hint = SPIRE_REFRESH_HINT.as_secs(),
            sigil_td = self.sigil_td,
            sigil_url = self.sigil_url,
        );
        let path = self.dir.join("server.conf");
        std::fs::write(&path, config).unwrap();
        let server = Supervised::start(
            "spire-server",
            Path::new(&tool("spire-server")),
            &["run".into(), "-config".into(), path.display().to_string()],
            &self.dir.join("server.log"),
        )
        .unwrap();
        let socket = self.socket();
        let deadline = Instant::now() + SETTLE;
        let mut server = server;
        loop {
            if spire_server(&["healthcheck", "-socketPath", &socket])
                .await
                .status
                .success()
            {
                break;
            }
            if let Some(s) = server.exited() {
                panic!("spire-server exited ({s}): {}", server.log_tail(30));
            }
            assert!(
                Instant::now() < deadline,
                "spire-server not healthy within {SETTLE:?}: {}",
                server.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.server = Some(server);
    }

    /// `spire-server <args> -socketPath <ours>`, which must succeed; returns stdout.
    async fn cli(&self, args: &[&str]) -> String {
        let socket = self.socket();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-socketPath", &socket]);
        let out = spire_server(&all).await;
        assert!(
            out.status.success(),
            "spire-server {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    async fn start_agent(&mut self) {
        std::fs::write(
            self.dir.join("bootstrap.pem"),
            self.cli(&["bundle", "show"]).await,
        )
        .unwrap();
        let token_out = self
            .cli(&[
                "token",
                "generate",
                "-spiffeID",
                &format!("spiffe://{}/agent", self.td),
            ])
            .await;
        let token = token_out
            .trim()
            .strip_prefix("Token: ")
            .unwrap_or_else(|| panic!("token generate printed {token_out:?}"))
            .to_owned();
        let d = self.dir.display();
        let config = format!(
            r#"agent {{
  data_dir = "{d}/agent"
  log_level = "DEBUG"
  server_address = "127.0.0.1"
  server_port = "{server_port}"
  socket_path = "{d}/agent.sock"
  trust_bundle_path = "{d}/bootstrap.pem"
  trust_domain = "{td}"
}}
plugins {{
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
  WorkloadAttestor "unix" {{
    plugin_data {{}}
  }}
}}
"#,
            server_port = self.server_port,
            td = self.td,
        );
        let path = self.dir.join("agent.conf");
        std::fs::write(&path, config).unwrap();
        let agent = Supervised::start(
            "spire-agent",
            Path::new(&tool("spire-agent")),
            &[
                "run".into(),
                "-config".into(),
                path.display().to_string(),
                "-joinToken".into(),
                token,
            ],
            &self.dir.join("agent.log"),
        )
        .unwrap();
        self.agent = Some(agent);
    }

    fn logs(&self) -> String {
        [&self.server, &self.agent]
            .iter()
            .filter_map(|p| p.as_ref().map(|p| p.log_tail(40)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn spire_server(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(tool("spire-server"))
        .args(args)
        .output()
        .await
        .unwrap()
}

/// A running go-spiffe `serve`.
struct GoServer {
    child: tokio::process::Child,
    stdout: tokio::task::JoinHandle<Vec<String>>,
}

/// Starts a go-spiffe `serve` from `cmd` and waits for its listening address.
async fn start_server(mut cmd: tokio::process::Command) -> (GoServer, String) {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(SETTLE, lines.next_line())
        .await
        .expect("go-spiffe serve did not start listening")
        .unwrap();
    let Some(first) = first else {
        let out = child.wait_with_output().await.unwrap();
        panic!(
            "go-spiffe serve exited: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let v: Value = serde_json::from_str(&first).unwrap();
    let addr = v["listening"].as_str().unwrap().to_owned();
    let stdout = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            all.push(l);
        }
        all
    });
    (GoServer { child, stdout }, addr)
}

/// Waits for a go-spiffe `serve` to finish and returns its result JSON.
async fn server_result(mut server: GoServer) -> Value {
    let status = tokio::time::timeout(SETTLE, server.child.wait())
        .await
        .expect("go-spiffe serve did not finish")
        .unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = server.child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    let lines = server.stdout.await.unwrap();
    assert!(status.success(), "go-spiffe serve failed: {stderr}");
    serde_json::from_str(lines.last().unwrap()).unwrap()
}

/// How many X.509 authorities a go-spiffe `bundles` call sees for `td`.
fn x509_count(bundles: &Value, td: &str) -> u64 {
    bundles["x509"][td].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn spire_and_sigil_federate_both_ways_and_their_workloads_complete_mutual_tls() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let aw = AgentWorld::start("spirefed").await;
    let w = &aw.w;
    let sigil_td = w.td.to_string();
    let spire_td = format!("spire-{}.test", w.tag);
    let go = tool("go-spiffe-client");

    // Sigil's bundle endpoint (what the operator serves with --bundle-endpoint-addr).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sigil_url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    tokio::spawn(sigil_operator::federation::endpoint::serve(
        listener,
        sigil_operator::federation::endpoint::EndpointConfig {
            trust_domain: w.td.clone(),
            tls: sigil_operator::federation::endpoint::EndpointTls::Spiffe {
                svid_ttl: Duration::from_secs(600),
            },
        },
        w.replica.authorities.clone(),
        Arc::new(sigil_identity::clock::SystemClock),
        w.replica.metrics.federation.clone(),
        None,
        cancel.clone(),
    ));

    // SPIRE up, with Sigil's bundle bootstrapped by an operator running `bundle set`. The
    // bootstrap holds only Sigil's X.509 authorities: the JWT authorities SPIRE ends up
    // with can only have come from fetching Sigil's endpoint.
    let mut spire = Spire::new(
        &aw.dir.path().join("spire"),
        &spire_td,
        &sigil_td,
        &sigil_url,
    );
    spire.start_server(&SpireProfile::Spiffe).await;
    let sigil_bundle = w.bootstrap_bundle().await;
    assert!(!sigil_bundle.jwt_authorities.is_empty());
    let mut x509_only: Value = serde_json::from_str(&sigil_bundle.to_jwks_json()).unwrap();
    x509_only["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| k["use"] == "x509-svid");
    let bootstrap_path = aw.dir.path().join("sigil-bootstrap.json");
    std::fs::write(&bootstrap_path, x509_only.to_string()).unwrap();
    spire
        .cli(&[
            "bundle",
            "set",
            "-format",
            "spiffe",
            "-id",
            &format!("spiffe://{sigil_td}"),
            "-path",
            &bootstrap_path.display().to_string(),
        ])
        .await;
    spire
        .cli(&[
            "federation",
            "refresh",
            "-id",
            &format!("spiffe://{sigil_td}"),
        ])
        .await;
    let spire_view: Value =
        eventually("SPIRE to fetch Sigil's bundle endpoint", SETTLE, || async {
            let out = spire
                .cli(&[
                    "bundle",
                    "list",
                    "-format",
                    "spiffe",
                    "-id",
                    &format!("spiffe://{sigil_td}"),
                ])
                .await;
            let doc: Value = serde_json::from_str(&out).ok()?;
            let jwt = doc["keys"]
                .as_array()?
                .iter()
                .filter(|k| k["use"] == "jwt-svid")
                .count();
            (jwt == sigil_bundle.jwt_authorities.len()).then_some(doc)
        })
        .await;
    assert_eq!(
        spire_view["keys"].as_array().unwrap().len(),
        sigil_bundle.x509_authorities.len() + sigil_bundle.jwt_authorities.len(),
        "SPIRE holds exactly Sigil's current bundle: {spire_view}"
    );

    // Sigil fetches SPIRE's bundle endpoint, https_spiffe, bootstrapped with `bundle show`.
    let spire_bundle = spire.cli(&["bundle", "show", "-format", "spiffe"]).await;
    let fb_name = format!("{}-spire", w.tag);
    create(
        &Api::<FederatedBundle>::all(w.client.clone()),
        json!({
            "apiVersion": "sigil.dev/v1alpha1", "kind": "FederatedBundle",
            "metadata": {"name": fb_name, "labels": {INSTANCE_LABEL: w.tag}},
            "spec": {
                "trustDomain": spire_td,
                "bundleEndpointURL": spire.bundle_url(),
                "bundleEndpointProfile": {"type": "https_spiffe", "endpointSPIFFEID": format!("spiffe://{spire_td}/spire/server")},
                "trustDomainBundle": spire_bundle,
            },
        }),
    )
    .await;
    let fbs = Api::<FederatedBundle>::all(w.client.clone());
    let fetched = |fb: &FederatedBundle| {
        fb.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == "Fetched")
        })
    };
    eventually(
        "Sigil to fetch SPIRE's bundle (https_spiffe)",
        SETTLE,
        || async { fbs.get(&fb_name).await.ok().filter(fetched) },
    )
    .await;

    // Workloads: SPIRE's (a process of uid 0 on the SPIRE agent) and Sigil's (a pod).
    let spire_id = format!("spiffe://{spire_td}/workload");
    spire
        .cli(&[
            "entry",
            "create",
            "-parentID",
            &format!("spiffe://{spire_td}/agent"),
            "-spiffeID",
            &spire_id,
            "-selector",
            "unix:uid:0",
            "-federatesWith",
            &format!("spiffe://{sigil_td}"),
        ])
        .await;
    spire.start_agent().await;
    create(
        &Api::<ClusterSPIFFEID>::all(w.client.clone()),
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{}-fed", w.tag)}, "spec": {
            "trustDomain": w.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": w.tag}},
            "podSelector": {"matchLabels": {"app": "fed"}},
            "federatesWith": [spire_td],
        }}),
    )
    .await;
    let pod = aw.workload("fed-1", "fed", json!({"app": "fed"})).await;
    let sigil_id = aw.id_for_sa("fed");
    aw.wait_svid(&sigil_id).await;

    // Each side's Workload API serves the other trust domain's bundle.
    let spire_addr = spire.agent_addr.clone();
    let spire_sees = eventually(
        "the SPIRE workload to get Sigil's bundle",
        Duration::from_secs(90),
        || async {
            let out = tokio::process::Command::new(&go)
                .args(["-addr", &spire_addr, "bundles"])
                .output()
                .await
                .unwrap();
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            (x509_count(&v, &sigil_td) > 0).then_some(v)
        },
    )
    .await;
    assert!(x509_count(&spire_sees, &spire_td) > 0, "{spire_sees}");
    let sigil_sees = json_out(
        "go-spiffe bundles in the Sigil pod",
        &pod.run(&go, &["-addr", &aw.addr, "bundles"]).await,
    );
    assert_eq!(x509_count(&sigil_sees, &spire_td), 1, "{sigil_sees}");
    assert!(x509_count(&sigil_sees, &sigil_td) > 0, "{sigil_sees}");

    // mTLS 1: the SPIRE workload serves members of Sigil's trust domain; the Sigil workload
    // dials, accepting only the SPIRE workload's ID.
    let mut serve = tokio::process::Command::new(&go);
    serve.args([
        "-timeout",
        "60s",
        "-addr",
        &spire_addr,
        "serve",
        "-allow-td",
        &sigil_td,
    ]);
    let (server, addr) = start_server(serve).await;
    let client = json_out(
        "Sigil workload dials the SPIRE workload",
        &pod.run(
            &go,
            &[
                "-addr",
                &aw.addr,
                "dial",
                "-connect",
                &addr,
                "-server-id",
                &spire_id,
            ],
        )
        .await,
    );
    let server = server_result(server).await;
    assert_eq!(client["own_id"], sigil_id.as_str());
    assert_eq!(client["peer_id"], spire_id.as_str());
    assert_eq!(client["got"], format!("hello from {spire_id}"));
    assert_eq!(server["peer_id"], sigil_id.as_str());
    assert_eq!(server["got"], format!("hello from {sigil_id}"));

    // mTLS 2: the other way round, the Sigil workload serving members of SPIRE's domain.
    let mut serve = tokio::process::Command::from(pod.container.command(&go));
    serve.args([
        "-timeout",
        "60s",
        "-addr",
        &aw.addr,
        "serve",
        "-allow-td",
        &spire_td,
    ]);
    let (server, addr) = start_server(serve).await;
    let client = json_out(
        "SPIRE workload dials the Sigil workload",
        &tokio::process::Command::new(&go)
            .args([
                "-addr",
                &spire_addr,
                "dial",
                "-connect",
                &addr,
                "-server-id",
                &sigil_id,
            ])
            .output()
            .await
            .unwrap(),
    );
    let server = server_result(server).await;
    assert_eq!(client["peer_id"], sigil_id.as_str());
    assert_eq!(server["peer_id"], spire_id.as_str());

    // Remote rotation: SPIRE prepares its next X.509 authority (published in its bundle
    // at once); the Sigil workload sees it within one refresh interval.
    let prepared = Instant::now();
    spire.cli(&["localauthority", "x509", "prepare"]).await;
    eventually(
        "the prepared SPIRE authority in the Sigil pod",
        SETTLE,
        || async {
            let out = pod.run(&go, &["-addr", &aw.addr, "bundles"]).await;
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            (x509_count(&v, &spire_td) == 2).then_some(())
        },
    )
    .await;
    let took = prepared.elapsed();
    eprintln!(
        "federation_spire: SPIRE x509 prepare -> Sigil workload sees 2 authorities in {took:?} (refresh hint {SPIRE_REFRESH_HINT:?})"
    );
    // One refresh interval, plus a fetch and the push to the agent.
    assert!(
        took < SPIRE_REFRESH_HINT + Duration::from_secs(3),
        "took {took:?}, more than one refresh interval ({SPIRE_REFRESH_HINT:?}) and slack"
    );

    // https_web: SPIRE restarts with a serving certificate from a private CA; the
    // FederatedBundle switches profile, trusting that CA from a Secret.
    let ca = sigil_e2e::pki::Ca::new("spire web ca").unwrap();
    let serving = ca
        .serving_for("spire bundle endpoint", &["127.0.0.1"])
        .unwrap();
    let (cert, key) = (spire.dir.join("web.crt"), spire.dir.join("web.key"));
    std::fs::write(&cert, &serving.cert_pem).unwrap();
    std::fs::write(&key, &serving.key_pem).unwrap();
    spire.server.take().unwrap().stop();
    spire.start_server(&SpireProfile::Web { cert, key }).await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "spire-web-ca"},
        "stringData": {"ca.crt": ca.cert_pem},
    }))
    .unwrap();
    Api::<Secret>::namespaced(w.client.clone(), &w.ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let before = fbs.get(&fb_name).await.unwrap().status.unwrap().last_fetch;
    fbs.patch(
        &fb_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"bundleEndpointProfile": {
            "type": "https_web", "endpointSPIFFEID": null,
            "caBundleSecretRef": {"name": "spire-web-ca", "namespace": w.ns},
        }}})),
    )
    .await
    .unwrap();
    let fb = eventually(
        "Sigil to fetch SPIRE's bundle (https_web)",
        SETTLE,
        || async {
            fbs.get(&fb_name).await.ok().filter(|fb| {
                fetched(fb)
                    && fb.status.as_ref().unwrap().observed_generation == fb.metadata.generation
                    && fb.status.as_ref().unwrap().last_fetch != before
            })
        },
    )
    .await;
    assert_eq!(
        fb.status.unwrap().keys,
        Some(3),
        "2 X.509 + 1 JWT authority"
    );
    if std::env::var_os("SIGIL_SPIRE_LOGS").is_some() {
        eprintln!("{}", spire.logs());
    }
}
