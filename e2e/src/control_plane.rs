//! One real control plane: etcd and kube-apiserver on free loopback ports, with RBAC,
//! client-certificate authentication, TokenRequest/TokenReview, and Sigil's CRDs from
//! `crds/` installed.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::pki::{self, Ca};
use crate::process::{self, Supervised};
use crate::{Error, tools};

/// How long the apiserver may take to become ready. A cold start on a busy 2-core machine
/// takes 10–30 s; this only bounds a failure.
const READY_WITHIN: Duration = Duration::from_secs(180);
/// How long a CRD may take to be established.
const CRD_WITHIN: Duration = Duration::from_secs(60);
/// The field manager the harness applies CRDs with.
const FIELD_MANAGER: &str = "sigil-e2e";

/// A running etcd + kube-apiserver. Dropping it stops both and removes its files.
///
/// Either process can be stopped and started again on the same ports and data (the fault
/// tests: an API server outage, an etcd restart), also on the [`crate::shared`] one.
#[derive(Debug)]
pub struct ControlPlane {
    // Field order is drop order: the apiserver stops before etcd, the files go last.
    apiserver: Restartable,
    etcd: Restartable,
    server: String,
    service_account_issuer: String,
    ca_pem: String,
    client_ca: Ca,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and installs every CRD in `crds/`. Retries once on
    /// a port race with another process.
    pub async fn start() -> Result<Self, Error> {
        process::remove_stale_work_dirs();
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once().await {
                Ok(cp) => return Ok(cp),
                Err(e @ Error::Exited { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Start {
            what: "control plane".into(),
            reason: "no attempt".into(),
        }))
    }

    async fn start_once() -> Result<Self, Error> {
        let etcd_bin = tools::tool("etcd")?;
        let apiserver_bin = tools::tool("kube-apiserver")?;
        let dir = tempfile::Builder::new()
            .prefix(&process::work_dir_prefix())
            .tempdir()
            .map_err(|e| Error::io("create the control plane's directory", e))?;
        let root = dir.path();

        let [etcd_client, etcd_peer, secure] = free_ports::<3>()?;
        let etcd = Restartable::start(
            "etcd",
            &etcd_bin,
            vec![
                "--name=default".into(),
                format!("--data-dir={}", root.join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            root.join("etcd.log"),
        )?;

        let serving_ca = Ca::new("sigil-e2e serving CA")?;
        let serving = serving_ca.serving("kube-apiserver")?;
        let client_ca = Ca::new("sigil-e2e client CA")?;
        let admin = client_ca.client("sigil-e2e-admin", Some("system:masters"))?;
        let (sa_private, sa_public) = pki::service_account_key()?;
        let write = |name: &str, text: &str| -> Result<PathBuf, Error> {
            let path = root.join(name);
            std::fs::write(&path, text)
                .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
            Ok(path)
        };
        let tls_cert = write("apiserver.crt", &serving.cert_pem)?;
        let tls_key = write("apiserver.key", &serving.key_pem)?;
        let client_ca_file = write("client-ca.crt", &client_ca.cert_pem)?;
        let sa_key = write("sa.key", &sa_private)?;
        let sa_pub = write("sa.pub", &sa_public)?;
        let server = format!("https://127.0.0.1:{secure}");
        let issuer = server.clone();

        let apiserver = Restartable::start(
            "kube-apiserver",
            &apiserver_bin,
            vec![
                format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={secure}"),
                format!("--cert-dir={}", root.join("certs").display()),
                format!("--tls-cert-file={}", tls_cert.display()),
                format!("--tls-private-key-file={}", tls_key.display()),
                format!("--client-ca-file={}", client_ca_file.display()),
                // As clusters run it: nodes are authorised by the Node authorizer and held
                // to their own pods by NodeRestriction (the pod certificate tests create
                // PodCertificateRequests as a kubelet does).
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--anonymous-auth=true".into(),
                format!("--service-account-issuer={issuer}"),
                format!("--service-account-signing-key-file={}", sa_key.display()),
                format!("--service-account-key-file={}", sa_pub.display()),
                // Nothing here creates each namespace's `default` ServiceAccount (that is
                // the controller-manager's job), so tests name theirs explicitly.
                "--disable-admission-plugins=ServiceAccount".into(),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--allow-privileged=true".into(),
                "--endpoint-reconciler-type=none".into(),
                "--profiling=false".into(),
                "--v=0".into(),
            ],
            root.join("kube-apiserver.log"),
        )?;

        let kubeconfig = root.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(
                &server,
                &serving_ca.cert_pem,
                Credential::Cert(&admin.cert_pem, &admin.key_pem),
            ),
        )
        .map_err(|e| Error::io("write the admin kubeconfig", e))?;

        let cp = Self {
            apiserver,
            etcd,
            server,
            service_account_issuer: issuer,
            ca_pem: serving_ca.cert_pem,
            client_ca,
            kubeconfig,
            dir,
        };
        cp.wait_ready().await?;
        cp.install_crds().await?;
        Ok(cp)
    }

    async fn wait_ready(&self) -> Result<(), Error> {
        let deadline = Instant::now() + READY_WITHIN;
        let admin = self.admin().await?;
        loop {
            for p in [&self.etcd, &self.apiserver] {
                if let Some(status) = p.exited() {
                    return Err(Error::Exited {
                        status: status.to_string(),
                        log: p.log_tail(30),
                    });
                }
            }
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|e| Error::Start {
                    what: "kube-apiserver".into(),
                    reason: e.to_string(),
                })?;
            match admin.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(Error::Start {
                        what: "kube-apiserver".into(),
                        reason: format!(
                            "not ready after {READY_WITHIN:?}\n{}\n{}",
                            self.apiserver.log_tail(30),
                            self.etcd.log_tail(10)
                        ),
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Applies every CRD YAML in `crds/` (what users apply) and waits until each is
    /// established.
    async fn install_crds(&self) -> Result<(), Error> {
        let dir = crds_dir();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(format!("read {}", dir.display()), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        let api = Api::<CustomResourceDefinition>::all(self.admin().await?);
        let mut names = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| Error::io(format!("read {}", file.display()), e))?;
            let crd: CustomResourceDefinition = serde_yaml::from_str(&text).map_err(|e| {
                Error::Crd(format!("{} does not parse as a CRD: {e}", file.display()))
            })?;
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&crd),
            )
            .await
            .map_err(|e| Error::Crd(format!("apply {}: {e}", file.display())))?;
            names.push(name);
        }
        let deadline = Instant::now() + CRD_WITHIN;
        for name in names {
            loop {
                let established = api
                    .get(&name)
                    .await
                    .ok()
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                if established {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Error::Crd(format!(
                        "CRD {name} not established after {CRD_WITHIN:?}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The apiserver's URL, `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The issuer of service-account tokens (`iss` of every projected token).
    pub fn service_account_issuer(&self) -> &str {
        &self.service_account_issuer
    }

    /// The CA that signed the apiserver's serving certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kubeconfig file for the admin (`system:masters`), for tools and binaries under
    /// test.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory holding the logs (`etcd.log`, `kube-apiserver.log`) and certificates.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The PIDs of etcd and kube-apiserver (0 for one that is stopped).
    pub fn pids(&self) -> [u32; 2] {
        [self.etcd.pid(), self.apiserver.pid()]
    }

    /// Kills kube-apiserver (SIGKILL, as a crashed or partitioned control plane node):
    /// every open watch and request of every client breaks, new connections are refused.
    pub fn stop_apiserver(&self) {
        self.apiserver.stop();
    }

    /// Starts kube-apiserver again on the same port with the same flags, and waits until
    /// it answers `/readyz`.
    pub async fn start_apiserver(&self) -> Result<(), Error> {
        self.apiserver.restart()?;
        self.wait_ready().await
    }

    /// Kills etcd (SIGKILL) and starts it again on the same ports and data directory; the
    /// apiserver's watches and requests fail meanwhile. Returns once the apiserver answers
    /// `/readyz` again.
    pub async fn restart_etcd(&self) -> Result<(), Error> {
        self.etcd.stop();
        self.etcd.restart()?;
        self.wait_ready().await
    }

    /// Signs `claims` as a service-account token with the apiserver's own signing key:
    /// how a test makes tokens the TokenRequest API refuses to mint (already expired, odd
    /// claims) yet the apiserver's authenticator checks for real.
    pub fn sign_service_account_token(&self, claims: &serde_json::Value) -> Result<String, Error> {
        let pem = std::fs::read(self.dir.path().join("sa.key"))
            .map_err(|e| Error::io("read sa.key", e))?;
        let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem)
            .map_err(|e| Error::Pki(format!("service-account key: {e}")))?;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            claims,
            &key,
        )
        .map_err(|e| Error::Pki(format!("signing a service-account token: {e}")))
    }

    /// A client for the cluster admin (group `system:masters`, so RBAC allows everything).
    ///
    /// A `kube::Client` belongs to the tokio runtime it was made in; make one per test.
    pub async fn admin(&self) -> Result<Client, Error> {
        client_from_kubeconfig(
            &std::fs::read_to_string(&self.kubeconfig)
                .map_err(|e| Error::io("read kubeconfig", e))?,
        )
        .await
    }

    /// A client authenticated by a client certificate as `user`, optionally in `group`.
    /// It has no permissions until RBAC grants them.
    pub async fn user_client(&self, user: &str, group: Option<&str>) -> Result<Client, Error> {
        let cert = self.client_ca.client(user, group)?;
        client_from_kubeconfig(&kubeconfig_yaml(
            &self.server,
            &self.ca_pem,
            Credential::Cert(&cert.cert_pem, &cert.key_pem),
        ))
        .await
    }

    /// A client authenticated as ServiceAccount `namespace/name` with a token from the
    /// TokenRequest API (valid one hour). The ServiceAccount is created when missing.
    pub async fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Client, Error> {
        let sas = Api::<ServiceAccount>::namespaced(self.admin().await?, namespace);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        match sas.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                return Err(Error::Kube(
                    format!("create ServiceAccount {namespace}/{name}"),
                    e,
                ));
            }
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let token = sas
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .map_err(|e| Error::Kube(format!("TokenRequest for {namespace}/{name}"), e))?
            .status
            .and_then(|s| s.token)
            .unwrap_or_default();
        client_from_kubeconfig(&kubeconfig_yaml(
            &self.server,
            &self.ca_pem,
            Credential::Token(&token),
        ))
        .await
    }

    /// Creates a namespace with a unique name starting with `prefix` and returns the name.
    pub async fn namespace(&self, prefix: &str) -> Result<String, Error> {
        let name = crate::unique(prefix);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.admin().await?)
            .create(&PostParams::default(), &ns)
            .await
            .map_err(|e| Error::Kube(format!("create namespace {name}"), e))?;
        Ok(name)
    }
}

/// A [`Supervised`] process that can be stopped and started again with the same command.
#[derive(Debug)]
struct Restartable {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    running: std::sync::Mutex<Option<Supervised>>,
}

impl Restartable {
    fn start(
        name: &'static str,
        program: &Path,
        args: Vec<String>,
        log: PathBuf,
    ) -> Result<Self, Error> {
        let p = Self {
            name,
            program: program.to_owned(),
            args,
            log,
            running: std::sync::Mutex::new(None),
        };
        p.restart()?;
        Ok(p)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Supervised>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the process unless it runs.
    fn restart(&self) -> Result<(), Error> {
        let mut running = self.lock();
        if running.as_mut().is_none_or(|p| p.exited().is_some()) {
            *running = Some(Supervised::start(
                self.name,
                &self.program,
                &self.args,
                &self.log,
            )?);
        }
        Ok(())
    }

    fn stop(&self) {
        if let Some(mut p) = self.lock().take() {
            p.stop();
        }
    }

    fn pid(&self) -> u32 {
        self.lock().as_ref().map_or(0, Supervised::pid)
    }

    fn exited(&self) -> Option<std::process::ExitStatus> {
        self.lock().as_mut().and_then(Supervised::exited)
    }

    fn log_tail(&self, lines: usize) -> String {
        match self.lock().as_ref() {
            Some(p) => p.log_tail(lines),
            None => format!("{} is stopped", self.name),
        }
    }
}

enum Credential<'a> {
    Cert(&'a str, &'a str),
    Token(&'a str),
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, credential: Credential<'_>) -> String {
    let user = match credential {
        Credential::Cert(cert, key) => serde_json::json!({
            "client-certificate-data": B64.encode(cert),
            "client-key-data": B64.encode(key),
        }),
        Credential::Token(token) => serde_json::json!({ "token": token }),
    };
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sigil-e2e", "cluster": {"server": server, "certificate-authority-data": B64.encode(ca_pem)}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "sigil-e2e", "context": {"cluster": "sigil-e2e", "user": "user"}}],
        "current-context": "sigil-e2e",
    });
    // JSON is YAML; kubectl and kube read it alike.
    config.to_string()
}

async fn client_from_kubeconfig(yaml: &str) -> Result<Client, Error> {
    let kc = Kubeconfig::from_yaml(yaml).map_err(|e| Error::Config(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    Client::try_from(config).map_err(|e| Error::Kube("build a client".into(), e))
}

/// `crds/` at the workspace root.
pub fn crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

/// `N` distinct free loopback ports. Another process may take one before it is used;
/// [`ControlPlane::start`] retries when a server then fails to start.
fn free_ports<const N: usize>() -> Result<[u16; N], Error> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::io("bind a free port", e))?;
    let mut ports = [0; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l
            .local_addr()
            .map_err(|e| Error::io("read a bound port", e))?
            .port();
    }
    Ok(ports)
}
