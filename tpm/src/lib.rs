//! The node's TPM, for TPM node attestation (docs/tpm.md): the endorsement key (EK) and
//! its certificate, an attestation key (AK) made under the EK, and TPM2_ActivateCredential
//! to answer the operator's challenge.
//!
//! Only the agent's TPM helper (`sigil-agent-tpm`, [`helper`]) and the tests link this
//! crate, and with it libtss2 and libcrypto: `sigil-agent` runs the helper as a child
//! process on nodes that attest with a TPM, so the agent on every other node never maps
//! those libraries (`sigil_identity::tpm_helper` has the protocol).
//!
//! [`helper::serve`] is the helper's whole life. [`TpmDevice`] is the same TPM code for an
//! async caller in process (the tests): a tss-esapi `Context` can't move between threads,
//! so it owns one on a dedicated thread and hands work to it over a channel.
//! No key material leaves the TPM: the EK and AK are made inside it and only their public
//! areas are sent.

pub mod helper;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::mpsc;

use tss_esapi::Context;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ak, ek};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{
    AsymmetricAlgorithm, HashingAlgorithm, SignatureSchemeAlgorithm,
};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{EncryptedSecret, IdObject, Public, SymmetricDefinition};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;

/// Where the TPM is and where its EK certificate comes from.
#[derive(Debug, Clone)]
pub struct TpmOptions {
    /// TCTI configuration, e.g. `device:/dev/tpmrm0` or `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
    /// Read the EK certificate (DER or PEM) from this file instead of the TPM's NV index
    /// 0x01c00002 (some TPMs ship their certificate outside the TPM).
    pub ek_certificate_file: Option<PathBuf>,
}

/// Why the TPM could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    /// A TPM command failed.
    #[error("TPM {op}: {error}")]
    Tpm {
        /// What we asked of the TPM.
        op: &'static str,
        /// What it said.
        error: tss_esapi::Error,
    },
    /// The EK certificate file can't be read.
    #[error("EK certificate file {path}: {reason}")]
    EkCertificateFile {
        /// The configured file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The TPM thread is gone.
    #[error("the TPM worker thread stopped")]
    Gone,
    /// The TPM thread could not start.
    #[error("starting the TPM worker thread: {0}")]
    Thread(String),
}

fn tpm(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |error| TpmError::Tpm { op, error }
}

pub use sigil_identity::tpm_helper::TpmIdentity;

/// The EK and AK, loaded in the TPM.
#[derive(Debug, Clone, Copy)]
pub struct Keys {
    /// The endorsement key (RSA-2048, TCG default template).
    pub ek: KeyHandle,
    /// The attestation key (RSA-2048 RSASSA-SHA256, restricted signing, under the EK).
    pub ak: KeyHandle,
}

type Job = Box<dyn FnOnce(&mut Context, &Keys) + Send>;

/// The node's TPM, owned by a worker thread. Dropping it flushes the keys and closes the
/// TPM connection.
#[derive(Debug)]
pub struct TpmDevice {
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<std::thread::JoinHandle<()>>,
    identity: TpmIdentity,
}

impl Drop for TpmDevice {
    fn drop(&mut self) {
        // Closing the channel ends the worker, which flushes the keys; wait for it so the
        // TPM connection is closed cleanly before whoever owns the TPM goes on.
        self.jobs = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// A TPM2B: a 16-bit big-endian size, then the bytes.
pub fn tpm2b(body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 2);
    v.extend_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Marshals a public area as TPM2B_PUBLIC.
pub fn public_tpm2b(public: &Public) -> Result<Vec<u8>, TpmError> {
    Ok(tpm2b(
        &public.marshall().map_err(tpm("marshal public area"))?,
    ))
}

impl TpmDevice {
    /// Connects to the TPM, creates the EK (from the TCG default template, so it is the key
    /// the EK certificate certifies) and a fresh AK under it, and reads the EK certificate.
    pub async fn open(options: TpmOptions) -> Result<Self, TpmError> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let worker = std::thread::Builder::new()
            .name("sigil-tpm".into())
            .spawn(move || {
                let (mut ctx, keys, identity) = match setup(&options) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(identity));
                while let Ok(job) = rx.recv() {
                    job(&mut ctx, &keys);
                }
                let _ = ctx.flush_context(keys.ak.into());
                let _ = ctx.flush_context(keys.ek.into());
            })
            .map_err(|e| TpmError::Thread(e.to_string()))?;
        let identity = ready_rx.await.map_err(|_| TpmError::Gone)??;
        Ok(Self {
            jobs: Some(jobs),
            worker: Some(worker),
            identity,
        })
    }

    /// EK certificate and the EK and AK public areas.
    pub fn identity(&self) -> &TpmIdentity {
        &self.identity
    }

    /// Runs `f` on the TPM thread with the context and the loaded keys.
    pub async fn run<R, F>(&self, f: F) -> Result<R, TpmError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Context, &Keys) -> R + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .as_ref()
            .ok_or(TpmError::Gone)?
            .send(Box::new(move |ctx, keys| {
                let _ = tx.send(f(ctx, keys));
            }))
            .map_err(|_| TpmError::Gone)?;
        rx.await.map_err(|_| TpmError::Gone)
    }

    /// TPM2_ActivateCredential with the AK and the EK: recovers the secret the operator
    /// bound to the AK's Name, which only this TPM can do.
    pub async fn activate_credential(
        &self,
        credential_blob: Vec<u8>,
        encrypted_secret: Vec<u8>,
    ) -> Result<Vec<u8>, TpmError> {
        self.run(move |ctx, keys| {
            activate_credential(ctx, keys.ak, keys.ek, credential_blob, encrypted_secret)
        })
        .await?
    }
}

/// TPM2_ActivateCredential of `(credential_blob, encrypted_secret)` for the object `ak`
/// with the endorsement key `ek` (authorised by PolicySecret(endorsement hierarchy), as
/// the default EK template requires).
pub fn activate_credential(
    ctx: &mut Context,
    ak: KeyHandle,
    ek: KeyHandle,
    credential_blob: Vec<u8>,
    encrypted_secret: Vec<u8>,
) -> Result<Vec<u8>, TpmError> {
    let blob = IdObject::try_from(credential_blob).map_err(tpm("credential blob"))?;
    let secret = EncryptedSecret::try_from(encrypted_secret).map_err(tpm("encrypted secret"))?;
    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(tpm("start EK policy session"))?
        .ok_or(TpmError::Tpm {
            op: "start EK policy session",
            error: tss_esapi::Error::WrapperError(tss_esapi::WrapperErrorKind::WrongValueFromTpm),
        })?;
    let result = (|| {
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .build();
        ctx.tr_sess_set_attributes(session, attrs, mask)
            .map_err(tpm("EK policy session attributes"))?;
        let policy = PolicySession::try_from(session).map_err(tpm("EK policy session"))?;
        ctx.execute_with_nullauth_session(|ctx| {
            ctx.policy_secret(
                policy,
                AuthHandle::Endorsement,
                Default::default(),
                Default::default(),
                Default::default(),
                None,
            )
        })
        .map_err(tpm("PolicySecret(endorsement)"))?;
        ctx.execute_with_sessions((Some(AuthSession::Password), Some(session), None), |ctx| {
            ctx.activate_credential(ak, ek, blob, secret)
        })
        .map_err(tpm("ActivateCredential"))
    })();
    let _ = ctx.flush_context(SessionHandle::from(session).into());
    Ok(result?.value().to_vec())
}

pub(crate) fn setup(options: &TpmOptions) -> Result<(Context, Keys, TpmIdentity), TpmError> {
    let tcti = TctiNameConf::from_str(&options.tcti).map_err(tpm("TCTI configuration"))?;
    let mut ctx = Context::new(tcti).map_err(tpm("connect"))?;
    let ek =
        ek::create_ek_object(&mut ctx, AsymmetricAlgorithm::Rsa, None).map_err(tpm("create EK"))?;
    let ek_public = ctx.read_public(ek).map_err(tpm("read EK public"))?.0;
    let ek_certificate = match &options.ek_certificate_file {
        Some(path) => read_cert_file(path)?,
        None => ek::retrieve_ek_pubcert(
            &mut ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        )
        .map_err(tpm("read EK certificate from NV index 0x01c00002"))?,
    };
    let created = ak::create_ak(
        &mut ctx,
        ek,
        HashingAlgorithm::Sha256,
        SignatureSchemeAlgorithm::RsaSsa,
        None,
        None,
    )
    .map_err(tpm("create AK"))?;
    let ak_public = created.out_public.clone();
    let ak = ak::load_ak(&mut ctx, ek, None, created.out_private, created.out_public)
        .map_err(tpm("load AK"))?;
    let identity = TpmIdentity {
        ek_certificate,
        ek_public: public_tpm2b(&ek_public)?,
        ak_public: public_tpm2b(&ak_public)?,
    };
    Ok((ctx, Keys { ek, ak }, identity))
}

fn read_cert_file(path: &PathBuf) -> Result<Vec<u8>, TpmError> {
    let err = |reason: String| TpmError::EkCertificateFile {
        path: path.clone(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if bytes.starts_with(b"-----BEGIN") {
        let text = String::from_utf8(bytes).map_err(|e| err(e.to_string()))?;
        let mut certs =
            sigil_identity::x509::certs_from_pem(&text).map_err(|e| err(e.to_string()))?;
        return Ok(certs.swap_remove(0));
    }
    Ok(bytes)
}
