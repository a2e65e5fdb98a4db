//! A software TPM 2.0 (Debian's `swtpm`, linked into the tool directory by
//! `make test-tools`) on loopback, for TPM attestation tests. Each [`Swtpm`] has its own
//! state directory, so it is a distinct TPM with its own endorsement seed; the process is
//! killed when dropped (also while a test panics) and with the test process.
//!
//! Start every swtpm a test binary needs before anything connects to one: libtss2's
//! sockets are not close-on-exec, so a process forked while a connection is open inherits
//! it, and swtpm, never seeing that connection close, stops serving the next client.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::Error;
use crate::process::Supervised;

/// How long swtpm has to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running swtpm.
#[derive(Debug)]
pub struct Swtpm {
    // Field order: the process dies before its state directory is removed.
    process: Supervised,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Swtpm {
    /// Starts a fresh TPM (manufactured on first start, `TPM2_Startup(CLEAR)` done).
    pub fn start() -> Result<Self, Error> {
        let program = crate::tools::tool("swtpm")?;
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("sigil-swtpm-")
                .tempdir()
                .map_err(|e| Error::io("create the swtpm state directory", e))?;
            // The swtpm TCTI talks to the control channel on port + 1.
            let port = free_port_pair()?;
            let d = dir.path().display().to_string();
            let args = [
                "socket".to_owned(),
                "--tpm2".into(),
                "--tpmstate".into(),
                format!("dir={d}"),
                "--server".into(),
                format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                "--ctrl".into(),
                format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                "--flags".into(),
                "not-need-init,startup-clear".into(),
            ];
            let mut process =
                Supervised::start("swtpm", &program, &args, &dir.path().join("swtpm.log"))?;
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Some(status) = process.exited() {
                    // Most often a port taken meanwhile: try other ports.
                    last = format!("exited ({status})\n{}", process.log_tail(20));
                    break;
                }
                if listening(port) && listening(port + 1) {
                    return Ok(Self {
                        process,
                        port,
                        _dir: dir,
                    });
                }
                if Instant::now() > deadline {
                    return Err(Error::Start {
                        what: "swtpm".into(),
                        reason: format!(
                            "not listening on 127.0.0.1:{port} after {START_TIMEOUT:?}\n{}",
                            process.log_tail(20)
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Err(Error::Start {
            what: "swtpm".into(),
            reason: last,
        })
    }

    /// The TCTI configuration for tss-esapi / tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The swtpm process ID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// Whether something listens on 127.0.0.1:`port`, read from /proc/net/tcp. Not probed
/// with a connection: swtpm serves one client per channel, and a probe it has not yet
/// noticed closing can hold up the real client.
fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|table| {
        table.lines().skip(1).any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            // local_address, rem_address, st (0A = LISTEN)
            fields.next() == Some(want.as_str()) && fields.nth(1) == Some("0A")
        })
    })
}

/// A free loopback port whose successor is free too.
fn free_port_pair() -> Result<u16, Error> {
    for _ in 0..50 {
        let first =
            TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind a free port", e))?;
        let port = first
            .local_addr()
            .map_err(|e| Error::io("read a bound port", e))?
            .port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    Err(Error::Start {
        what: "swtpm".into(),
        reason: "found no two consecutive free loopback ports".into(),
    })
}
