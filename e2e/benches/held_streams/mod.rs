//! A client process holding many FetchX509SVID streams against an agent (Sigil's or
//! SPIRE's): the agent's RSS with them open, and the time for one entry change to reach
//! every stream.
#![allow(dead_code, unreachable_pub)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use sigil_e2e::process::rss_kib;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// What holding `n` streams cost an agent, and how fast it fanned a change out to them.
pub struct Held {
    /// How many streams.
    pub n: usize,
    /// Time to open them all, each with its first SVID.
    pub open: Duration,
    /// Agent RSS before opening them (KiB).
    pub rss_before: u64,
    /// Agent RSS with them open (KiB).
    pub rss_open: u64,
    /// One entry change → a new SVID on every stream.
    pub fan_out: Result<Duration, String>,
    /// Agent RSS after the fan-out (KiB).
    pub rss_after: u64,
}

impl Held {
    /// Agent RSS growth per open stream.
    pub fn kib_per_stream(&self) -> f64 {
        (self.rss_open as f64 - self.rss_before as f64) / self.n as f64
    }
}

/// Opens `n` FetchX509SVID streams on one workload (`cmd`: `rust-spiffe-client` in that
/// workload, each stream on its own connection) against the agent `pid` serving `addr`,
/// reads its RSS, makes `change` (one entry change for that workload) and times until
/// every stream has the new SVID; then closes them.
pub async fn hold(
    mut cmd: std::process::Command,
    addr: &str,
    n: usize,
    pid: u32,
    change: impl std::future::Future<Output = ()>,
) -> Result<Held, String> {
    cmd.args(["--addr", addr, "streams", "--count", &n.to_string()]);
    hold_with(cmd, n, pid, change).await
}

/// As [`hold`], with `cmd` already given its arguments: any client that prints a line
/// once its `n` streams have their first message and another once each has received a
/// second one, and exits when its stdin gets a line (`envoy-sds-client streams` for SDS).
pub async fn hold_with(
    mut cmd: std::process::Command,
    n: usize,
    pid: u32,
    change: impl std::future::Future<Output = ()>,
) -> Result<Held, String> {
    let rss_before = rss_kib(pid);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let t = Instant::now();
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("streams client: {e}"))?;
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    match tokio::time::timeout(Duration::from_secs(300), out.next_line()).await {
        Ok(Ok(Some(_))) => {}
        other => return Err(format!("{n} streams did not open within 300 s: {other:?}")),
    }
    let open = t.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_open = rss_kib(pid);
    let t = Instant::now();
    change.await;
    let fan_out = match tokio::time::timeout(Duration::from_secs(120), out.next_line()).await {
        Ok(Ok(Some(_))) => Ok(t.elapsed()),
        other => Err(format!("not on every stream within 120 s: {other:?}")),
    };
    let rss_after = rss_kib(pid);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"\n").await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    Ok(Held {
        n,
        open,
        rss_before,
        rss_open,
        fan_out,
        rss_after,
    })
}

/// The RSS growth of the agent `pid` while `cmd` (`rust-spiffe-client connections`)
/// holds `n` connections without a call on them (KiB per connection).
pub async fn connections_kib(
    mut cmd: std::process::Command,
    n: usize,
    pid: u32,
) -> Result<f64, String> {
    let before = rss_kib(pid);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("connections client: {e}"))?;
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    match tokio::time::timeout(Duration::from_secs(300), out.next_line()).await {
        Ok(Ok(Some(_))) => {}
        other => {
            return Err(format!(
                "{n} connections did not open within 300 s: {other:?}"
            ));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = rss_kib(pid);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"\n").await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    Ok((held as f64 - before as f64) / n as f64)
}
