//! `sigil-agent-tpm`, the agent's TPM helper: it opens the TPM, writes the TPM's identity,
//! answers the agent's credential activations, and flushes its keys when the agent closes
//! its stdin. The lines are `sigil_identity::tpm_helper`'s. The agent runs it; nobody else
//! needs to.

use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sigil_identity::tpm_helper::{Reply, Request, read_line, write_line};

use crate::{TpmError, TpmOptions, activate_credential, setup};

/// The helper's command line (the agent passes its own `--tpm-*` flags on).
#[derive(Debug, Parser)]
#[command(
    name = "sigil-agent-tpm",
    about = "sigil-agent's TPM helper. sigil-agent --tpm-tcti runs it and talks to it over \
             stdin and stdout; it is not meant to be run by hand."
)]
pub struct Args {
    /// TCTI configuration, e.g. `device:/dev/tpmrm0`.
    #[arg(long)]
    pub tcti: String,
    /// Read the EK certificate (DER or PEM) from this file instead of the TPM's NV index.
    #[arg(long)]
    pub ek_certificate_file: Option<PathBuf>,
}

/// Why the helper stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The TPM could not be opened, or its keys made (also sent to the agent).
    #[error("{0}")]
    Open(#[from] TpmError),
    /// Talking to the agent failed: a broken pipe, or a line that is not a request.
    #[error("talking to sigil-agent: {0}")]
    Io(#[from] io::Error),
}

/// The helper's `main`.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let options = TpmOptions {
        tcti: args.tcti,
        ek_certificate_file: args.ek_certificate_file,
    };
    match serve(&options, io::stdin().lock(), io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sigil-agent-tpm: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Opens the TPM, writes its identity, then answers each request on `input` until it ends;
/// the keys are flushed from the TPM however it ends.
pub fn serve(
    options: &TpmOptions,
    mut input: impl BufRead,
    mut output: impl Write,
) -> Result<(), ServeError> {
    let (mut ctx, keys, identity) = match setup(options) {
        Ok(opened) => opened,
        Err(e) => {
            // The agent reads why from here; if it is gone, the exit status says enough.
            let _ = write_line(&mut output, &Reply::Error(e.to_string()));
            return Err(e.into());
        }
    };
    let answered = (|| {
        write_line(&mut output, &Reply::Identity(identity))?;
        while let Some(request) = read_line::<Request>(&mut input)? {
            let reply = match request {
                Request::Activate {
                    credential_blob,
                    encrypted_secret,
                } => match activate_credential(
                    &mut ctx,
                    keys.ak,
                    keys.ek,
                    credential_blob,
                    encrypted_secret,
                ) {
                    Ok(secret) => Reply::Secret(secret),
                    Err(e) => Reply::Error(e.to_string()),
                },
            };
            write_line(&mut output, &reply)?;
        }
        Ok::<(), io::Error>(())
    })();
    let _ = ctx.flush_context(keys.ak.into());
    let _ = ctx.flush_context(keys.ek.into());
    Ok(answered?)
}
