//! Parsec, the seed talk's system, against Sigil as it is: the real Parsec service
//! (crates.io `parsec-service`, built by `make test-tools`) with its JWT-SVID
//! authenticator pointed at sigil-agent's Workload API and its TPM provider on a swtpm,
//! and two workloads (real processes in pod-shaped cgroups, distinct SPIFFE IDs) using
//! the real `parsec-tool`, which fetches a JWT-SVID (audience `parsec`) from the agent for
//! every request. Each workload's keys live in the TPM under its own SPIFFE ID: each sees
//! only its own, cannot use or delete the other's, and a caller without a valid JWT-SVID
//! for `parsec` is refused. See docs/parsec.md.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::json;
use sigil_e2e::process::Supervised;
use sigil_e2e::swtpm::Swtpm;
use sigil_testkit::agent::*;
use x509_parser::prelude::FromDer;

/// How long the Parsec service has to start (its TPM provider provisions a primary key).
const PARSEC_START: Duration = Duration::from_secs(60);

/// Parsec wire protocol 1.0 (the request/response header every client sends).
mod wire {
    pub(super) const MAGIC: u32 = 0x5EC0_A710;
    pub(super) const HEADER_SIZE: u16 = 30;
    pub(super) const OPCODE_PING: u32 = 0x0001;
    pub(super) const OPCODE_LIST_KEYS: u32 = 0x001A;
    pub(super) const OPCODE_PSA_SIGN_HASH: u32 = 0x0004;
    pub(super) const PROVIDER_CORE: u8 = 0;
    pub(super) const PROVIDER_TPM: u8 = 3;
    pub(super) const AUTH_NONE: u8 = 0;
    pub(super) const AUTH_JWT_SVID: u8 = 4;
    pub(super) const STATUS_SUCCESS: u16 = 0;
    pub(super) const STATUS_AUTHENTICATION_ERROR: u16 = 11;
    pub(super) const STATUS_PSA_ERROR_DOES_NOT_EXIST: u16 = 1140;

    /// A PsaSignHash operation (protobuf, encoded by hand): ECDSA with SHA-256 over
    /// `hash` with the key `key_name`.
    pub(super) fn sign_hash_body(key_name: &str, hash: &[u8; 32]) -> Vec<u8> {
        let mut b = vec![0x0A, u8::try_from(key_name.len()).unwrap()]; // 1: key_name
        b.extend(key_name.as_bytes());
        // 2: alg = AsymmetricSignature { 4: Ecdsa { 1: SignHash { 2: Specific(Sha256 = 7) } } }
        b.extend([0x12, 0x06, 0x22, 0x04, 0x0A, 0x02, 0x10, 0x07]);
        b.extend([0x1A, 0x20]); // 3: hash
        b.extend(hash);
        b
    }
}

/// The running Parsec service.
struct Parsec {
    // Field order: the process dies before its directory is removed.
    process: Supervised,
    config: PathBuf,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Parsec {
    /// Starts `parsec` with the JWT-SVID authenticator on `workload_endpoint` and the TPM
    /// provider on `tcti`; returns once it answers a ping.
    fn start(workload_endpoint: &str, tcti: &str) -> Parsec {
        let dir = tempfile::Builder::new()
            .prefix("sigil-parsec-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("parsec.sock");
        let config = dir.path().join("config.toml");
        // allow_root: the test runs as root (a deployment runs Parsec as its own user).
        std::fs::write(
            &config,
            format!(
                r#"[core_settings]
allow_root = true
log_level = "info"
log_error_details = true

[listener]
listener_type = "DomainSocket"
timeout = 2000
socket_path = "{socket}"

[authenticator]
auth_type = "JwtSvid"
workload_endpoint = "{workload_endpoint}"

[[key_manager]]
name = "sqlite-manager"
manager_type = "SQLite"
sqlite_db_path = "{kim}"

[[provider]]
name = "tpm-provider"
provider_type = "Tpm"
key_info_manager = "sqlite-manager"
tcti = "{tcti}"
owner_hierarchy_auth = ""
"#,
                socket = socket.display(),
                kim = dir.path().join("kim.sqlite3").display(),
            ),
        )
        .unwrap();
        let process = Self::spawn(&config, &socket, &dir.path().join("parsec.log"));
        Parsec {
            process,
            config,
            socket,
            dir,
        }
    }

    /// Stops the service (SIGKILL) and starts it again with the same configuration, key
    /// store and TPM; returns once it answers a ping.
    fn restart(&mut self) {
        self.process.stop();
        self.process = Self::spawn(
            &self.config,
            &self.socket,
            &self.dir.path().join("parsec.log"),
        );
    }

    fn spawn(config: &Path, socket: &Path, log: &Path) -> Supervised {
        let program = sigil_e2e::tools::tool("parsec").unwrap();
        let mut process = Supervised::start(
            "parsec",
            &program,
            &["--config".into(), config.display().to_string()],
            log,
        )
        .unwrap();
        let deadline = Instant::now() + PARSEC_START;
        loop {
            if let Some(status) = process.exited() {
                panic!("parsec exited ({status}):\n{}", process.log_tail(40));
            }
            // A stale socket of an earlier run refuses connections until Parsec replaces it.
            if request_blocking(
                socket,
                wire::PROVIDER_CORE,
                wire::OPCODE_PING,
                b"",
                wire::AUTH_NONE,
                b"",
            )
            .0 == wire::STATUS_SUCCESS
            {
                return process;
            }
            assert!(
                Instant::now() < deadline,
                "parsec did not answer a ping within {PARSEC_START:?}:\n{}",
                process.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `PARSEC_SERVICE_ENDPOINT` for clients.
    fn endpoint(&self) -> String {
        format!("unix:{}", self.socket.display())
    }
}

/// One request on Parsec's wire protocol, written by hand (no Parsec client library), so
/// the test can present an authentication buffer no real client would: returns the
/// response status and body. Protobuf, no session. Blocking, off the runtime's workers
/// (the agent that Parsec asks runs on them).
fn request(
    socket: &Path,
    provider: u8,
    opcode: u32,
    body: &[u8],
    auth_type: u8,
    auth: &[u8],
) -> (u16, Vec<u8>) {
    tokio::task::block_in_place(|| {
        request_blocking(socket, provider, opcode, body, auth_type, auth)
    })
}

fn request_blocking(
    socket: &Path,
    provider: u8,
    opcode: u32,
    body: &[u8],
    auth_type: u8,
    auth: &[u8],
) -> (u16, Vec<u8>) {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return (u16::MAX, Vec::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut h = Vec::with_capacity(36);
    h.extend(wire::MAGIC.to_le_bytes());
    h.extend(wire::HEADER_SIZE.to_le_bytes());
    h.extend([1, 0]); // version 1.0
    h.extend(0u16.to_le_bytes()); // flags
    h.push(provider);
    h.extend(0u64.to_le_bytes()); // session
    h.extend([0, 0]); // content and accept type: protobuf
    h.push(auth_type);
    h.extend(u32::try_from(body.len()).unwrap().to_le_bytes());
    h.extend(u16::try_from(auth.len()).unwrap().to_le_bytes());
    h.extend(opcode.to_le_bytes());
    h.extend(0u16.to_le_bytes()); // status
    h.extend([0, 0]); // reserved
    s.write_all(&h).unwrap();
    s.write_all(body).unwrap();
    s.write_all(auth).unwrap();
    let mut r = [0u8; 36];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), wire::MAGIC);
    let body_len = u32::from_le_bytes(r[22..26].try_into().unwrap());
    let status = u16::from_le_bytes(r[32..34].try_into().unwrap());
    let mut body = vec![0u8; body_len as usize];
    s.read_exact(&mut body).unwrap();
    (status, body)
}

/// Runs `parsec-tool args` in `w`'s container, configured as a workload would be: the
/// agent's socket in SPIFFE_ENDPOINT_SOCKET, Parsec's in PARSEC_SERVICE_ENDPOINT.
async fn parsec_tool(aw: &AgentWorld, parsec: &Parsec, w: &Workload, args: &[&str]) -> Output {
    let mut cmd = w.container.command(tool("parsec-tool"));
    cmd.args(args)
        .env("SPIFFE_ENDPOINT_SOCKET", &aw.addr)
        .env("PARSEC_SERVICE_ENDPOINT", parsec.endpoint())
        .env("RUST_LOG", "info");
    tokio::process::Command::from(cmd).output().await.unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts `parsec-tool` succeeded; returns its stdout.
fn ok(what: &str, out: &Output) -> String {
    assert!(out.status.success(), "{what}: {}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts `parsec-tool` failed with exit 1 and `expect` in its log.
fn refused(what: &str, out: &Output, expect: &str) {
    assert_eq!(out.status.code(), Some(1), "{what}: {}", text(out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(expect),
        "{what}: expected {expect:?} in: {}",
        text(out)
    );
}

/// The key names in `parsec-tool list-keys` output (`* name (provider, ...)`).
fn key_names(list: &str) -> Vec<String> {
    let mut names: Vec<String> = list
        .lines()
        .filter_map(|l| l.strip_prefix("* "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// Verifies a `parsec-tool sign` output (base64 DER ECDSA) over `msg` with the key of a
/// `parsec-tool export-public-key` output (PEM SubjectPublicKeyInfo, P-256).
fn verify_p256(public_pem: &str, msg: &[u8], signature_b64: &str) {
    let der = STANDARD
        .decode(
            public_pem
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .unwrap();
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&der).unwrap();
    let sig = STANDARD.decode(signature_b64.trim()).unwrap();
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        spki.subject_public_key.data.as_ref(),
    )
    .verify(msg, &sig)
    .expect("the signature verifies with the exported public key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parsec_gives_each_workload_its_own_tpm_keys_by_jwt_svid() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let started = Instant::now();
    // Before anything connects to a TPM (see sigil_e2e::swtpm).
    let tpm = Swtpm::start().unwrap();
    let aw = AgentWorld::start("parsec").await;
    let tag = aw.w.tag.clone();
    for app in ["alpha", "beta"] {
        aw.w.cluster_spiffe_id(&format!("{tag}-{app}"), app).await;
    }
    let alpha = aw
        .workload("alpha-1", "alpha", json!({"app": "alpha"}))
        .await;
    let beta = aw.workload("beta-1", "beta", json!({"app": "beta"})).await;
    // A pod no ClusterSPIFFEID selects: it has no identity.
    let stranger = aw
        .workload("stranger-1", "stranger", json!({"app": "stranger"}))
        .await;
    let (alpha_id, beta_id) = (aw.id_for_sa("alpha"), aw.id_for_sa("beta"));
    aw.wait_svid(&alpha_id).await;
    aw.wait_svid(&beta_id).await;

    // The Parsec service runs on the node, outside any pod, as a node service does. It
    // needs no entry of its own: the agent answers ValidateJWTSVID for any caller it can
    // attest on its socket.
    let mut parsec = tokio::task::block_in_place(|| Parsec::start(&aw.addr, &tpm.tcti()));
    eprintln!("parsec ready after {:?}", started.elapsed());

    // Parsec tells clients which authenticator it uses; parsec-tool picks JWT-SVID.
    let auths = ok(
        "list-authenticators",
        &parsec_tool(&aw, &parsec, &alpha, &["list-authenticators"]).await,
    );
    let providers = ok(
        "list-providers",
        &parsec_tool(&aw, &parsec, &alpha, &["list-providers"]).await,
    );
    assert!(
        auths.contains("JWT SPIFFE Verifiable Identity Document"),
        "{auths}"
    );
    assert!(providers.contains("TPM provider"), "{providers}");

    // Each workload creates a key in the TPM, and a key under a name both use.
    for (w, name) in [
        (&alpha, "alpha-key"),
        (&beta, "beta-key"),
        (&alpha, "shared-name"),
        (&beta, "shared-name"),
    ] {
        ok(
            &format!("create-ecc-key {name}"),
            &parsec_tool(&aw, &parsec, w, &["create-ecc-key", "-k", name]).await,
        );
    }

    // Each sees only its own keys.
    let list = ok(
        "alpha list-keys",
        &parsec_tool(&aw, &parsec, &alpha, &["list-keys"]).await,
    );
    assert_eq!(key_names(&list), ["alpha-key", "shared-name"], "{list}");
    let list = ok(
        "beta list-keys",
        &parsec_tool(&aw, &parsec, &beta, &["list-keys"]).await,
    );
    assert_eq!(key_names(&list), ["beta-key", "shared-name"], "{list}");

    // Each signs with its own key; the signature verifies with the exported public key,
    // and the two "shared-name" keys are different keys.
    let msg = "attested by the TPM on behalf of a SPIFFE ID";
    let mut shared_keys = Vec::new();
    let mut alpha_key_public = String::new();
    for (w, name) in [
        (&alpha, "alpha-key"),
        (&beta, "beta-key"),
        (&alpha, "shared-name"),
        (&beta, "shared-name"),
    ] {
        let sig = ok(
            &format!("sign {name}"),
            &parsec_tool(&aw, &parsec, w, &["sign", "-k", name, msg]).await,
        );
        let public = ok(
            &format!("export-public-key {name}"),
            &parsec_tool(&aw, &parsec, w, &["export-public-key", "-k", name]).await,
        );
        verify_p256(&public, msg.as_bytes(), &sig);
        if name == "shared-name" {
            shared_keys.push(public);
        } else if name == "alpha-key" {
            alpha_key_public = public;
        }
    }
    assert_ne!(shared_keys[0], shared_keys[1], "one name, two owners' keys");

    // One cannot use, read or delete the other's key: to Parsec it does not exist.
    // parsec-tool's sign looks the key's policy up in the caller's own key list first, so
    // it stops at the client (NotFound); export and delete are refused by the service.
    // (The service refusing a signature is checked below, with a request sent by hand.)
    for (args, expect) in [
        (["sign", "-k", "beta-key", msg].as_slice(), "NotFound"),
        (
            &["export-public-key", "-k", "beta-key"],
            "PsaErrorDoesNotExist",
        ),
        (&["delete-key", "-k", "beta-key"], "PsaErrorDoesNotExist"),
    ] {
        refused(
            &format!("alpha {args:?}"),
            &parsec_tool(&aw, &parsec, &alpha, args).await,
            expect,
        );
    }
    let list = ok(
        "beta list-keys after alpha's attempts",
        &parsec_tool(&aw, &parsec, &beta, &["list-keys"]).await,
    );
    assert_eq!(key_names(&list), ["beta-key", "shared-name"], "{list}");
    ok(
        "beta signs with its key after alpha's attempts",
        &parsec_tool(&aw, &parsec, &beta, &["sign", "-k", "beta-key", msg]).await,
    );

    // A workload deletes its own key; the other's key of the same name stays.
    ok(
        "alpha delete-key shared-name",
        &parsec_tool(&aw, &parsec, &alpha, &["delete-key", "-k", "shared-name"]).await,
    );
    let list = ok(
        "alpha list-keys after delete",
        &parsec_tool(&aw, &parsec, &alpha, &["list-keys"]).await,
    );
    assert_eq!(key_names(&list), ["alpha-key"], "{list}");
    let list = ok(
        "beta list-keys after alpha's delete",
        &parsec_tool(&aw, &parsec, &beta, &["list-keys"]).await,
    );
    assert_eq!(key_names(&list), ["beta-key", "shared-name"], "{list}");

    // The keys outlive the service: Parsec restarted on the same key store and TPM still
    // lists alpha's key, which still signs, and is the same key (the public key exported
    // before the restart verifies the new signature).
    tokio::task::block_in_place(|| parsec.restart());
    let list = ok(
        "alpha list-keys after a Parsec restart",
        &parsec_tool(&aw, &parsec, &alpha, &["list-keys"]).await,
    );
    assert_eq!(key_names(&list), ["alpha-key"], "{list}");
    let sig = ok(
        "alpha signs after a Parsec restart",
        &parsec_tool(&aw, &parsec, &alpha, &["sign", "-k", "alpha-key", msg]).await,
    );
    verify_p256(&alpha_key_public, msg.as_bytes(), &sig);

    // A pod with no identity gets no JWT-SVID, so it cannot even ask.
    let out = parsec_tool(&aw, &parsec, &stranger, &["list-keys"]).await;
    refused(
        "stranger list-keys",
        &out,
        "Error while fetching the JWT-SVID",
    );
    eprintln!("stranger: {}", String::from_utf8_lossy(&out.stderr).trim());

    // The service itself: requests written by hand, with JWT-SVIDs go-spiffe fetched in
    // the pods. With a workload's real token for "parsec" they succeed, so the refusals
    // below are the service's, not the client's.
    let go = tool("go-spiffe-client");
    let jwt = |w: &'static str, audience: &'static str| {
        let (w, go, addr) = (
            if w == "alpha" { &alpha } else { &beta },
            &go,
            aw.addr.as_str(),
        );
        async move {
            let out = w
                .run(go, &["-addr", addr, "jwt", "-audience", audience])
                .await;
            json_out("go-spiffe jwt", &out)["token"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let alpha_token = jwt("alpha", "parsec").await;
    let beta_token = jwt("beta", "parsec").await;
    let alpha_for_db = jwt("alpha", "db").await;
    let list_keys = |auth_type: u8, auth: &str| {
        request(
            &parsec.socket,
            wire::PROVIDER_CORE,
            wire::OPCODE_LIST_KEYS,
            b"",
            auth_type,
            auth.as_bytes(),
        )
    };
    let sign = |key: &str, auth: &str| {
        let hash: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, msg.as_bytes())
            .as_ref()
            .try_into()
            .unwrap();
        request(
            &parsec.socket,
            wire::PROVIDER_TPM,
            wire::OPCODE_PSA_SIGN_HASH,
            &wire::sign_hash_body(key, &hash),
            wire::AUTH_JWT_SVID,
            auth.as_bytes(),
        )
    };
    let (status, body) = list_keys(wire::AUTH_JWT_SVID, &alpha_token);
    assert_eq!(
        status,
        wire::STATUS_SUCCESS,
        "alpha lists with its own token"
    );
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("alpha-key") && !body.contains("beta-key"),
        "{body:?}"
    );
    assert_eq!(
        sign("beta-key", &beta_token).0,
        wire::STATUS_SUCCESS,
        "beta signs with beta-key"
    );
    assert_eq!(
        sign("beta-key", &alpha_token).0,
        wire::STATUS_PSA_ERROR_DOES_NOT_EXIST,
        "alpha, asking the service directly, cannot sign with beta-key"
    );
    // alpha's token with beta's ID put in: the signature no longer matches.
    let mut parts: Vec<String> = alpha_token.split('.').map(str::to_owned).collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    claims["sub"] = json!(beta_id);
    parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let forged = parts.join(".");
    assert_eq!(
        sign("beta-key", &forged).0,
        wire::STATUS_AUTHENTICATION_ERROR,
        "a forged subject cannot sign with beta-key"
    );
    for (what, auth_type, auth) in [
        ("no authentication", wire::AUTH_NONE, ""),
        ("an empty token", wire::AUTH_JWT_SVID, ""),
        ("not a JWT", wire::AUTH_JWT_SVID, "not-a-jwt"),
        (
            "a JWT-SVID for another audience",
            wire::AUTH_JWT_SVID,
            &alpha_for_db,
        ),
        ("a forged subject", wire::AUTH_JWT_SVID, &forged),
    ] {
        let (status, _) = list_keys(auth_type, auth);
        if auth_type == wire::AUTH_JWT_SVID {
            assert_eq!(
                status,
                wire::STATUS_AUTHENTICATION_ERROR,
                "{what}: status {status}"
            );
        } else {
            assert_ne!(status, wire::STATUS_SUCCESS, "{what}: status {status}");
        }
        eprintln!("list-keys with {what}: refused with status {status}");
    }

    // Parsec asked the agent: the agent refused the bad tokens in ValidateJWTSVID calls
    // on its socket, and counted them.
    let metrics = aw.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("rpc=\"ValidateJWTSVID\"") && l.contains("reason=\"invalid_jwt\"")),
        "{metrics}"
    );
    eprintln!(
        "parsec's log (the end):\n{}\ntest body took {:?}",
        parsec.process.log_tail(30),
        started.elapsed()
    );
}
