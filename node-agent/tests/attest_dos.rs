//! Attacks on workload attestation's cost (issue 21, item 3): a workload whose executable
//! is hundreds of megabytes makes the unix attestor hash it, and `touch` makes it hash it
//! again. The hash must never stall the agent's async runtime (every other workload's
//! calls run on it), and its cache key must see any change of the file.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sigil_agent::attest::WorkloadAttestor;
use sigil_agent::attest::peer::PeerProcess;

/// `sleep` with `extra` bytes appended: still runs, but its file is big.
fn big_sleep(dir: &Path, extra: u64) -> PathBuf {
    let exe = dir.join("big-sleep");
    let sleep = ["/usr/bin/sleep", "/bin/sleep"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap();
    std::fs::copy(sleep, &exe).unwrap();
    let f = std::fs::OpenOptions::new().append(true).open(&exe).unwrap();
    let len = f.metadata().unwrap().len();
    // Real bytes, not a hole, so the hash reads them from the page cache like any file.
    let mut w = std::io::BufWriter::new(&f);
    let chunk = vec![0x5a_u8; 1 << 20];
    for _ in 0..extra / chunk.len() as u64 {
        w.write_all(&chunk).unwrap();
    }
    drop(w);
    assert!(f.metadata().unwrap().len() >= len + extra - (1 << 20));
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    exe
}

/// A workload running a 300 MiB executable is attested on a single-threaded runtime
/// while a ticker runs beside it.
///
/// Attack: the unix attestor hashed the executable synchronously inside the async
/// attestation, so every other task on that runtime thread (every other workload's call)
/// stopped for the whole hash; `touch` between calls made it hash again each time.
///
/// Before the fix: the ticker did not run at all while the 300 MiB file was hashed.
#[tokio::test(flavor = "current_thread")]
async fn hashing_a_big_executable_does_not_stall_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let exe = big_sleep(dir.path(), 300 << 20);
    let mut child = std::process::Command::new(&exe).arg("60").spawn().unwrap();
    let peer = PeerProcess::pin(child.id() as i32, 0, 0, Path::new("/proc")).unwrap();
    let attestor = Arc::new(WorkloadAttestor::new(
        "/proc".into(),
        "/etc".into(),
        None,
        Duration::from_secs(1),
    ));
    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_millis(5));
            loop {
                every.tick().await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    tokio::task::yield_now().await;
    for round in 0..2 {
        let before = ticks.load(Ordering::Relaxed);
        let started = Instant::now();
        let attested = attestor.attest(&peer).await.unwrap();
        let took = started.elapsed();
        let ticked = ticks.load(Ordering::Relaxed) - before;
        let hashed = attested
            .selectors
            .iter()
            .any(|s| s.value.starts_with("sha256:"));
        eprintln!("round {round}: attestation took {took:?}; the ticker ran {ticked} times");
        assert!(hashed, "the executable was hashed");
        if took > Duration::from_millis(100) {
            let expected = took.as_millis() as u64 / 5;
            assert!(
                ticked >= expected / 3,
                "the runtime stalled: {ticked} ticks in {took:?}"
            );
        }
        // `touch`: new mtime and ctime, so the next attestation hashes again (the file
        // could have changed), still off the runtime.
        let now = std::time::SystemTime::now();
        // (A running executable cannot be opened for writing; its times can be set.)
        std::fs::File::open(&exe)
            .unwrap()
            .set_modified(now)
            .unwrap();
    }
    ticker.abort();
    child.kill().unwrap();
    child.wait().unwrap();
}
