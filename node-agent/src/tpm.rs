//! The node's TPM as the agent uses it, for TPM node attestation (docs/tpm.md): through
//! its helper process, `sigil-agent-tpm` (`sigil_tpm::helper`). The helper links libtss2
//! and the libcrypto it needs; the agent links neither, so on the nodes that do not attest
//! with a TPM (most) those libraries are never mapped, and the TPM's parsers run in a
//! process of their own.
//!
//! The helper owns the TPM connection, the EK and a fresh AK. The agent reads their public
//! areas from it and asks it for TPM2_ActivateCredential, a JSON line each way
//! (`sigil_identity::tpm_helper`). It runs only while the node attests: at the agent's
//! start (which checks the TPM), then once per attestation, each time with a new AK, which
//! that attestation sends; between attestations no TPM code is in memory at all. A helper
//! that exits, answers out of turn or is silent for [`HELPER_DEADLINE`] is stopped. Closing
//! its stdin ends it; it flushes its keys first. That also happens when the agent dies.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sigil_identity::tpm_helper::{MAX_LINE, Reply, Request, decode_line, encode_line};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

pub use sigil_identity::tpm_helper::TpmIdentity;

/// The helper's file name, beside the agent's own executable in the image.
pub const HELPER_NAME: &str = "sigil-agent-tpm";

/// How long the helper may take over one answer. Creating the EK on a slow TPM takes
/// seconds; a helper stuck for this long is stopped.
pub const HELPER_DEADLINE: Duration = Duration::from_secs(60);

/// Where the TPM is, where its EK certificate comes from, and the helper that opens it.
#[derive(Debug, Clone)]
pub struct TpmOptions {
    /// TCTI configuration, e.g. `device:/dev/tpmrm0` or `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
    /// Read the EK certificate (DER or PEM) from this file instead of the TPM's NV index
    /// 0x01c00002 (some TPMs ship their certificate outside the TPM).
    pub ek_certificate_file: Option<PathBuf>,
    /// The `sigil-agent-tpm` executable ([`helper_beside`]).
    pub helper: PathBuf,
}

/// `sigil-agent-tpm` in the directory of `agent` (the agent's own executable).
pub fn helper_beside(agent: &Path) -> PathBuf {
    agent.with_file_name(HELPER_NAME)
}

/// Why the TPM could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    /// The helper could not be started.
    #[error("start the TPM helper {path}: {error}")]
    Start {
        /// The helper's executable.
        path: PathBuf,
        /// Why it did not start.
        error: std::io::Error,
    },
    /// The helper failed as a process: it exited, broke the protocol or did not answer.
    #[error("the TPM helper {path}: {reason}")]
    Helper {
        /// The helper's executable.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The TPM refused or failed, as the helper reported it (for example
    /// `TPM ActivateCredential: ...`).
    #[error("{0}")]
    Tpm(String),
}

/// The node's TPM, behind its helper process.
#[derive(Debug)]
pub struct TpmDevice {
    options: TpmOptions,
    helper: tokio::sync::Mutex<Option<Helper>>,
}

impl TpmDevice {
    /// Starts the helper and waits for the TPM's identity, so that a TPM the agent can't
    /// use stops it at start-up with the helper's reason. That helper serves the first
    /// attestation.
    pub async fn open(options: TpmOptions) -> Result<Self, TpmError> {
        let helper = Helper::start(&options).await?;
        Ok(Self {
            options,
            helper: tokio::sync::Mutex::new(Some(helper)),
        })
    }

    /// The EK certificate and the EK and AK public areas of the running helper (started
    /// again if it stopped).
    pub async fn identity(&self) -> Result<TpmIdentity, TpmError> {
        let mut slot = self.helper.lock().await;
        Ok(self.running(&mut slot).await?.identity.clone())
    }

    /// TPM2_ActivateCredential with the AK and the EK: recovers the secret the operator
    /// bound to the AK's Name, which only this TPM can do.
    pub async fn activate_credential(
        &self,
        credential_blob: Vec<u8>,
        encrypted_secret: Vec<u8>,
    ) -> Result<Vec<u8>, TpmError> {
        let mut slot = self.helper.lock().await;
        let helper = self.running(&mut slot).await?;
        let request = Request::Activate {
            credential_blob,
            encrypted_secret,
        };
        let reason = match helper.ask(&request).await {
            Ok(Reply::Secret(secret)) => return Ok(secret),
            Ok(Reply::Error(error)) => return Err(TpmError::Tpm(error)),
            Ok(Reply::Identity(_)) => "answered an activation with an identity".to_owned(),
            Err(reason) => reason,
        };
        // Out of step, gone or stuck: stop it; the next call starts a new one.
        if let Some(mut stopped) = slot.take() {
            stopped.kill();
        }
        Err(self.helper_error(reason))
    }

    /// Ends the running helper, if any (it flushes its keys and exits); the next call
    /// starts a new one.
    pub async fn release(&self) {
        drop(self.helper.lock().await.take());
    }

    async fn running<'a>(&self, slot: &'a mut Option<Helper>) -> Result<&'a mut Helper, TpmError> {
        if slot.is_none() {
            *slot = Some(Helper::start(&self.options).await?);
        }
        slot.as_mut()
            .ok_or_else(|| self.helper_error("not running".into()))
    }

    fn helper_error(&self, reason: String) -> TpmError {
        TpmError::Helper {
            path: self.options.helper.clone(),
            reason,
        }
    }
}

/// A running helper. Dropping it closes its stdin, which ends it (it is not killed: it
/// flushes its keys from the TPM on the way out).
#[derive(Debug)]
struct Helper {
    // Field order is drop order: stdin closes first.
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    child: Child,
    identity: TpmIdentity,
}

impl Helper {
    async fn start(options: &TpmOptions) -> Result<Helper, TpmError> {
        let path = options.helper.clone();
        let mut command = tokio::process::Command::new(&path);
        command.arg("--tcti").arg(&options.tcti);
        if let Some(file) = &options.ek_certificate_file {
            command.arg("--ek-certificate-file").arg(file);
        }
        // It needs nothing from the agent's environment; its stderr is the agent's, so what
        // it says lands in the agent container's log.
        command
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().map_err(|error| TpmError::Start {
            path: path.clone(),
            error,
        })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.start_kill();
            return Err(TpmError::Helper {
                path,
                reason: "no stdin or stdout pipe".into(),
            });
        };
        let mut stdout = BufReader::new(stdout);
        let first = tokio::time::timeout(HELPER_DEADLINE, read_reply(&mut stdout, &mut child));
        let reason = match first.await {
            Ok(Ok(Reply::Identity(identity))) => {
                return Ok(Helper {
                    stdin,
                    stdout,
                    child,
                    identity,
                });
            }
            // The TPM could not be opened: the helper says why and exits.
            Ok(Ok(Reply::Error(error))) => return Err(TpmError::Tpm(error)),
            Ok(Ok(Reply::Secret(_))) => "its first line was not the TPM's identity".to_owned(),
            Ok(Err(reason)) => reason,
            Err(_) => format!("no identity within {HELPER_DEADLINE:?}"),
        };
        let _ = child.start_kill();
        Err(TpmError::Helper { path, reason })
    }

    /// Sends `request` and reads the reply, within [`HELPER_DEADLINE`].
    async fn ask(&mut self, request: &Request) -> Result<Reply, String> {
        let line = encode_line(request);
        let exchange = async {
            self.stdin
                .write_all(&line)
                .await
                .map_err(|e| format!("writing to it: {e}"))?;
            self.stdin
                .flush()
                .await
                .map_err(|e| format!("writing to it: {e}"))?;
            read_reply(&mut self.stdout, &mut self.child).await
        };
        tokio::time::timeout(HELPER_DEADLINE, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {HELPER_DEADLINE:?}")))
    }

    fn kill(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The helper's next line, decoded; if it closed its stdout instead, its exit status when
/// it has one.
async fn read_reply(
    stdout: &mut BufReader<ChildStdout>,
    child: &mut Child,
) -> Result<Reply, String> {
    let mut line = Vec::new();
    let read = stdout
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("reading from it: {e}"))?;
    if read == 0 {
        let status = match child.try_wait() {
            Ok(Some(status)) => format!(" ({status})"),
            _ => String::new(),
        };
        return Err(format!("it closed its stdout{status}"));
    }
    decode_line(&line).map_err(|e| format!("it wrote {e}"))
}
