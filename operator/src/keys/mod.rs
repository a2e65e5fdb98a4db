//! Where the operator keeps CA and JWT signing keys (docs/hsm.md).
//!
//! - `secret` (the default): keys are made in software and persisted, PKCS#8, in the
//!   TrustDomain's CA Secret ([`crate::trust_domain::store`]).
//! - `pkcs11`: keys are generated in a PKCS#11 token (an HSM; SoftHSM2 in the tests),
//!   marked sensitive and not extractable, and used there; the CA Secret holds only a
//!   [`KeyReference`]. Both replicas open the same token, so either can sign after a
//!   failover.
//!
//! Both sit behind [`KeyManager`] (sigil-identity), where a cloud KMS would go too.

pub mod pkcs11;

use std::fmt;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;

use clap::ValueEnum;
use sigil_identity::key_manager::{KeyManager, SoftwareKeys};

/// The operator's key manager: a cheap handle, shared by every TrustDomain.
#[derive(Clone)]
pub struct Keys(Arc<dyn KeyManager>);

impl Keys {
    /// Wraps a key manager.
    pub fn new(manager: Arc<dyn KeyManager>) -> Self {
        Self(manager)
    }
}

impl Default for Keys {
    /// Software keys, kept in the CA Secret.
    fn default() -> Self {
        Self(Arc::new(SoftwareKeys))
    }
}

impl Deref for Keys {
    type Target = dyn KeyManager;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keys({})", self.0.name())
    }
}

/// `--key-manager`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum KeyManagerKind {
    /// Keys in software, persisted in the CA Secret.
    #[default]
    Secret,
    /// Keys generated and kept in a PKCS#11 token (an HSM).
    Pkcs11,
}

/// Key manager flags.
#[derive(Debug, Clone, clap::Args)]
pub struct KeyManagerArgs {
    /// Where CA and JWT signing keys live: `secret` (software, in the TrustDomain's CA
    /// Secret) or `pkcs11` (generated in an HSM and never exported; docs/hsm.md).
    #[arg(long, env = "SIGIL_KEY_MANAGER", value_enum, default_value_t = KeyManagerKind::Secret)]
    pub key_manager: KeyManagerKind,

    /// The PKCS#11 module (shared library) of the HSM, e.g.
    /// /usr/lib/softhsm/libsofthsm2.so.
    #[arg(
        long,
        env = "SIGIL_PKCS11_MODULE",
        required_if_eq("key_manager", "pkcs11")
    )]
    pub pkcs11_module: Option<PathBuf>,

    /// Label of the token (in the HSM) the keys live in.
    #[arg(
        long,
        env = "SIGIL_PKCS11_TOKEN_LABEL",
        required_if_eq("key_manager", "pkcs11")
    )]
    pub pkcs11_token_label: Option<String>,

    /// File holding the token's user PIN (mount it from a Secret). Trailing newlines are
    /// ignored; the PIN is never logged.
    #[arg(
        long,
        env = "SIGIL_PKCS11_PIN_FILE",
        required_if_eq("key_manager", "pkcs11")
    )]
    pub pkcs11_pin_file: Option<PathBuf>,
}

impl KeyManagerArgs {
    /// Opens the configured key manager. Errors name the flag to fix.
    pub fn open(&self) -> anyhow::Result<Keys> {
        match self.key_manager {
            KeyManagerKind::Secret => Ok(Keys::default()),
            KeyManagerKind::Pkcs11 => {
                let (Some(module), Some(label), Some(pin_file)) = (
                    &self.pkcs11_module,
                    &self.pkcs11_token_label,
                    &self.pkcs11_pin_file,
                ) else {
                    anyhow::bail!(
                        "--key-manager pkcs11 needs --pkcs11-module, --pkcs11-token-label and --pkcs11-pin-file"
                    );
                };
                let pin = std::fs::read_to_string(pin_file).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read the PKCS#11 PIN from {} (--pkcs11-pin-file): {e}",
                        pin_file.display()
                    )
                })?;
                let pin = pin.trim_end_matches(['\n', '\r']).to_owned();
                let manager = pkcs11::Pkcs11Keys::open(module, label, pin)?;
                Ok(Keys::new(Arc::new(manager)))
            }
        }
    }
}
