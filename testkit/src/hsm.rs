//! A SoftHSM2 token (Debian's `softhsm2`, installed by `make test-tools`) in a temporary
//! directory: the PKCS#11 HSM of the key manager tests and benchmarks.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// Where Debian puts SoftHSM2's PKCS#11 module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A test token's PINs: fixed, and never printed by the code under test.
const PIN: &str = "73519864";
const SO_PIN: &str = "20480631";

/// One initialised token, and the files to reach it.
pub struct SoftHsm {
    /// Removed on drop when this value made the token.
    _dir: Option<tempfile::TempDir>,
    root: PathBuf,
    conf: PathBuf,
    label: String,
    pin: String,
}

impl SoftHsm {
    /// Initialises a token labelled `label` in a new
    /// directory. Panics, naming the fix, when SoftHSM2 is not installed.
    pub fn init(label: &str) -> Self {
        assert!(
            Path::new(SOFTHSM_MODULE).exists(),
            "{SOFTHSM_MODULE} is missing: `make test-tools` installs Debian's softhsm2"
        );
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let (pin, so_pin) = (PIN.to_owned(), SO_PIN);
        let out = std::process::Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                &pin,
                "--so-pin",
                so_pin,
            ])
            .output()
            .expect("softhsm2-util runs (`make test-tools` installs Debian's softhsm2)");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            root: dir.path().to_owned(),
            _dir: Some(dir),
            conf,
            label: label.to_owned(),
            pin,
        }
    }

    /// The token [`SoftHsm::init`] made with `label` in another process, whose config
    /// is `$SOFTHSM2_CONF` (a test re-executes itself with it: SoftHSM reads the variable
    /// when its module initialises, and a test cannot set it for itself safely).
    pub fn from_env(label: &str) -> Option<Self> {
        let conf = PathBuf::from(std::env::var_os("SOFTHSM2_CONF")?);
        Some(Self {
            root: conf.parent()?.to_owned(),
            _dir: None,
            conf,
            label: label.to_owned(),
            pin: PIN.to_owned(),
        })
    }

    /// The `SOFTHSM2_CONF` every process using this token needs.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The PKCS#11 module.
    pub fn module(&self) -> &Path {
        Path::new(SOFTHSM_MODULE)
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The user PIN.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// A file holding `pin` (for `--pkcs11-pin-file`), in the token's directory.
    pub fn pin_file(&self, name: &str, pin: &str) -> PathBuf {
        let p = self.root.join(name);
        std::fs::write(&p, format!("{pin}\n")).unwrap();
        p
    }

    /// The operator flags that use this token.
    pub fn operator_flags(&self) -> Vec<String> {
        vec![
            "--key-manager=pkcs11".into(),
            format!("--pkcs11-module={}", self.module().display()),
            format!("--pkcs11-token-label={}", self.label),
            format!(
                "--pkcs11-pin-file={}",
                self.pin_file("pin", &self.pin).display()
            ),
        ]
    }
}

/// Runs the test `test` (its full name, for `--exact`) as `scenario` on a token labelled
/// `label`. SoftHSM reads `SOFTHSM2_CONF` when its module initialises, in the test's own
/// process too, and a test cannot set it for itself safely: so the first run makes the
/// token and runs the test again in a child process that has the variable (asserting it
/// passes), and that child runs `scenario` on a runtime of two worker threads.
pub fn run_with_token<Fut>(label: &str, test: &str, scenario: impl FnOnce(SoftHsm) -> Fut)
where
    Fut: std::future::Future<Output = ()>,
{
    if let Some(hsm) = SoftHsm::from_env(label) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(scenario(hsm));
        return;
    }
    let hsm = SoftHsm::init(label);
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", hsm.conf())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{test} (in a child process with SOFTHSM2_CONF) failed: {status}"
    );
}
