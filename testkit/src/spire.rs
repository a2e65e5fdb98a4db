//! A SPIRE server and agent (the pinned release `make test-tools` builds) on loopback, for
//! the federation test and the side-by-side bench: sqlite datastore, disk key manager,
//! join-token node attestation and the unix workload attestor, driven through
//! `spire-server` CLI calls (which use its admin API).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sigil_e2e::process::{Supervised, on_cpu};

/// The path of a pinned test tool.
fn tool(name: &str) -> String {
    sigil_e2e::tools::tool(name).unwrap().display().to_string()
}

/// How long SPIRE gets to start.
const START: Duration = Duration::from_secs(60);

/// How long one `spire-server` CLI call may take in [`Spire::cli`].
const CLI_LIMIT: Duration = Duration::from_secs(600);

/// What SPIRE's bundle endpoint advertises as `spiffe_refresh_hint`, and so how often
/// Sigil refetches it.
pub const SPIRE_REFRESH_HINT: Duration = Duration::from_secs(3);

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A SPIRE server and agent for trust domain `td`.
pub struct Spire {
    pub td: String,
    pub dir: PathBuf,
    pub server_port: u16,
    pub bundle_port: u16,
    pub server: Option<Supervised>,
    pub agent: Option<Supervised>,
    /// `unix://` address of spire-agent's Workload API.
    pub agent_addr: String,
    /// (Sigil's trust domain, its bundle endpoint URL) to federate with, if any.
    pub federation: Option<(String, String)>,
    /// SPIRE's log level (DEBUG in tests, INFO — its default — in benches).
    pub log_level: &'static str,
    /// SPIRE's per-IP limit on CSRs signed through the node-facing API (500/s by default,
    /// callers wait). A signing-capacity bench turns it off to measure the server rather
    /// than the limit of one agent.
    pub signing_rate_limit: bool,
    /// SPIRE's `experimental { events_based_cache = true }`: the server updates its entry
    /// cache from change events instead of reloading it in full every 5 s (off by
    /// default; meant for large deployments).
    pub events_based_cache: bool,
    /// The CPU spire-server runs on, from its first instruction (a bench pins the server
    /// it measures); `None` leaves it to the scheduler.
    pub server_cpu: Option<usize>,
}

/// How SPIRE's bundle endpoint authenticates itself.
pub enum SpireProfile {
    Spiffe,
    /// A serving certificate and key in these files.
    Web {
        cert: PathBuf,
        key: PathBuf,
    },
}

impl Spire {
    pub fn new(dir: &Path, td: &str) -> Self {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        Self {
            td: td.to_owned(),
            dir: dir.to_owned(),
            server_port: free_port(),
            bundle_port: free_port(),
            server: None,
            agent: None,
            agent_addr: format!("unix://{}", dir.join("agent.sock").display()),
            federation: None,
            log_level: "DEBUG",
            signing_rate_limit: true,
            events_based_cache: false,
            server_cpu: None,
        }
    }

    pub fn socket(&self) -> String {
        self.dir.join("server.sock").display().to_string()
    }

    pub fn bundle_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.bundle_port)
    }

    pub async fn start_server(&mut self, profile: &SpireProfile) {
        let profile = match profile {
            SpireProfile::Spiffe => "profile \"https_spiffe\" {}".to_owned(),
            SpireProfile::Web { cert, key } => format!(
                "profile \"https_web\" {{\n serving_cert_file {{\n cert_file_path = \"{}\"\n key_file_path = \"{}\"\n file_sync_interval = \"1h\"\n }}\n }}",
                cert.display(),
                key.display()
            ),
        };
        let federation = match &self.federation {
            None => String::new(),
            Some((sigil_td, sigil_url)) => format!(
                r#"  federation {{
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
  }}"#,
                bundle_port = self.bundle_port,
                hint = SPIRE_REFRESH_HINT.as_secs(),
            ),
        };
        let ratelimit = if self.signing_rate_limit {
            ""
        } else {
            "  ratelimit {\n    signing = false\n  }"
        };
        let experimental = if self.events_based_cache {
            "  experimental {\n    events_based_cache = true\n  }"
        } else {
            ""
        };
        let d = self.dir.display();
        let config = format!(
            r#"server {{
{ratelimit}
{experimental}
  bind_address = "127.0.0.1"
  bind_port = "{server_port}"
  socket_path = "{d}/server.sock"
  trust_domain = "{td}"
  data_dir = "{d}/data"
  log_level = "{log_level}"
{federation}
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
            log_level = self.log_level,
        );
        let path = self.dir.join("server.conf");
        std::fs::write(&path, config).unwrap();
        let program = PathBuf::from(tool("spire-server"));
        let args = ["run".into(), "-config".into(), path.display().to_string()];
        let (program, args) = match self.server_cpu {
            Some(cpu) => on_cpu(cpu, &program, &args),
            None => (program, args.to_vec()),
        };
        let server = Supervised::start(
            "spire-server",
            &program,
            &args,
            &self.dir.join("server.log"),
        )
        .unwrap();
        let socket = self.socket();
        let deadline = Instant::now() + START;
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
                "spire-server not healthy within {START:?}: {}",
                server.log_tail(30)
            );
            // As often as the servers bench polls Sigil's operator (20 ms), so that the two
            // restarts it compares are read to the same precision.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.server = Some(server);
    }

    /// `spire-server <args> -socketPath <ours>`, which must succeed; returns stdout.
    pub async fn cli(&self, args: &[&str]) -> String {
        self.cli_within(args, CLI_LIMIT)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `spire-server <args> -socketPath <ours>` given at most `limit`: stdout, or why not
    /// (it failed, or was still running at `limit` and was killed).
    pub async fn cli_within(&self, args: &[&str], limit: Duration) -> Result<String, String> {
        let out = tokio::time::timeout(
            limit,
            tokio::process::Command::new(tool("spire-server"))
                .args(args)
                .args(["-socketPath", &self.socket()])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| format!("spire-server {args:?} did not return within {limit:?}"))?
        .map_err(|e| format!("spire-server {args:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "spire-server {args:?}: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An entry for [`Spire::create_entries`]: `spiffe://<td><path>` under `parent`, for
    /// the processes of `uid` (the unix attestor's `unix:uid` selector).
    pub fn uid_entry(&self, path: &str, parent: &str, uid: u32) -> serde_json::Value {
        serde_json::json!({
            "spiffe_id": format!("spiffe://{}{path}", self.td),
            "parent_id": parent,
            "selectors": [{"type": "unix", "value": format!("uid:{uid}")}],
        })
    }

    /// `spire-server entry create -data` with `entries` (written to `<dir>/<name>.json`) in
    /// one call, given at most `limit`.
    pub async fn create_entries_within(
        &self,
        name: &str,
        entries: &[serde_json::Value],
        limit: Duration,
    ) -> Result<(), String> {
        let data = self.dir.join(format!("{name}.json"));
        std::fs::write(&data, serde_json::json!({ "entries": entries }).to_string())
            .map_err(|e| format!("write {}: {e}", data.display()))?;
        self.cli_within(
            &["entry", "create", "-data", &data.display().to_string()],
            limit,
        )
        .await
        .map(drop)
    }

    /// [`Spire::create_entries_within`], which must succeed.
    pub async fn create_entries(&self, name: &str, entries: &[serde_json::Value]) {
        self.create_entries_within(name, entries, CLI_LIMIT)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub async fn start_agent(&mut self) {
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
  log_level = "{log_level}"
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
            log_level = self.log_level,
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

    /// Waits until spire-agent has attested and answers its health check.
    pub async fn wait_agent(&mut self) {
        let socket = self.dir.join("agent.sock").display().to_string();
        let deadline = Instant::now() + START;
        loop {
            let ok = tokio::process::Command::new(tool("spire-agent"))
                .args(["healthcheck", "-socketPath", &socket])
                .output()
                .await
                .unwrap()
                .status
                .success();
            if ok {
                return;
            }
            let agent = self.agent.as_mut().unwrap();
            if let Some(s) = agent.exited() {
                panic!("spire-agent exited ({s}): {}", agent.log_tail(30));
            }
            assert!(
                Instant::now() < deadline,
                "spire-agent not healthy within {START:?}: {}",
                agent.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn logs(&self) -> String {
        [&self.server, &self.agent]
            .iter()
            .filter_map(|p| p.as_ref().map(|p| p.log_tail(40)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

pub async fn spire_server(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(tool("spire-server"))
        .args(args)
        .output()
        .await
        .unwrap()
}

/// `spire-server --version`.
pub async fn spire_version() -> String {
    let out = tokio::process::Command::new(tool("spire-server"))
        .arg("--version")
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.trim().to_owned()
}
