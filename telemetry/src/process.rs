//! How each Sigil binary starts and stops, written once for sigil-operator, sigil-agent
//! and sigil-csi.
//!
//! - [`run`]: logging, the multi-threaded tokio runtime, SIGTERM/SIGINT, then the binary's
//!   own body with the [`Readiness`] and the [`CancellationToken`] a signal drains.
//! - [`go_duration`] (feature `kube`): the `value_parser` of every duration flag.
//! - [`kube_client`] (feature `kube`): `--kubeconfig`, else the in-cluster configuration.
//! - [`WatchBackoff`] (feature `kube`): how every Kubernetes watch retries.
//!
//! Why not kubert: it brings its own admin server, log flags and client builder, which would
//! replace [`crate::serve`]'s `/ready` (named components, drained on the first signal) and
//! the three binaries' flags for about a hundred lines of our own, and sigil-csi does not
//! talk to Kubernetes at all.

use std::future::Future;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::{LogFormat, Readiness, init_logging, shutdown_on_signals};

/// Runs a binary: installs logging in `log_format`, starts the runtime, and runs `body`
/// until it returns. The first SIGTERM or SIGINT drains `Readiness` and cancels the token;
/// a second exits at once. When `body` returns first (a start-up error, say), the signal
/// handlers are dropped and its result is the process's.
pub fn run<F, Fut>(log_format: LogFormat, body: F) -> anyhow::Result<()>
where
    F: FnOnce(Readiness, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    init_logging(log_format).map_err(|e| anyhow::anyhow!("logging: {e}"))?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?
        .block_on(async {
            let cancel = CancellationToken::new();
            let readiness = Readiness::new();
            let signals = shutdown_on_signals(cancel.clone(), readiness.clone());
            let body = async {
                let result = body(readiness.clone(), cancel.clone()).await;
                // Ends the signal wait if the body returned on its own.
                cancel.cancel();
                result
            };
            let (result, signals) = tokio::join!(body, signals);
            signals.context("install the SIGTERM/SIGINT handlers")?;
            result
        })
}

/// A duration flag written the Go way (`30s`, `1h30m`, `300ms`), as in the chart's values
/// and the CRDs. Zero and negative durations are refused: no Sigil flag means "never" or
/// "at once" by zero.
#[cfg(feature = "kube")]
pub fn go_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration; write it the Go way, e.g. \"30s\", \"1h\" or \"90m\"".into());
    }
    let parsed: kube::core::Duration = s.parse().map_err(|e| {
        format!("{s:?} is not a Go duration ({e}); write it like \"30s\", \"1h\" or \"90m\"")
    })?;
    if parsed.is_negative() {
        return Err(format!("{s:?} is negative; durations must be positive"));
    }
    let d: std::time::Duration = parsed.into();
    if d.is_zero() {
        return Err(format!("{s:?} is zero; durations must be positive"));
    }
    Ok(d)
}

/// The Kubernetes client: from `kubeconfig` when given, else the in-cluster configuration
/// (or `$KUBECONFIG`/`~/.kube/config`, as kube infers it).
#[cfg(feature = "kube")]
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes client configuration: run in a pod, or pass --kubeconfig")?,
    };
    kube::Client::try_from(config).context("build the Kubernetes client")
}

/// How a Kubernetes watch waits between failed attempts: exponential from 250 ms, with
/// jitter (each wait is 50-100% of the step), capped at `max`, and back to the start on
/// any event.
///
/// kube-runtime's default (client-go's: 800 ms doubling to 30 s) made recovery from an API
/// server outage slow: after a 20 s outage the watches were at 13-26 s steps, and the
/// first watch after the API server came back ended in `410 Expired` (its watch cache
/// starts anew), which cost one more, doubled step before the relist. A new pod then
/// waited 45-55 s for its identity (e2e/tests/faults.rs, docs/reliability.md). A few
/// seconds' cap keeps that within the cap of the outage's end; the jitter spreads the
/// agents of a large cluster over it.
#[cfg(feature = "kube")]
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    step: std::time::Duration,
    max: std::time::Duration,
}

#[cfg(feature = "kube")]
impl WatchBackoff {
    /// The first wait.
    pub const FIRST: std::time::Duration = std::time::Duration::from_millis(250);

    /// A backoff that never waits longer than `max`.
    pub fn new(max: std::time::Duration) -> Self {
        Self {
            step: Self::FIRST.min(max),
            max,
        }
    }
}

#[cfg(feature = "kube")]
impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        use std::hash::{BuildHasher, Hasher};
        let step = self.step;
        self.step = (step * 2).min(self.max);
        // Jitter without an RNG dependency: every RandomState is keyed anew.
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let fraction = 0.5 + (r % 1000) as f64 / 2000.0;
        Some(step.mul_f64(fraction))
    }
}

#[cfg(feature = "kube")]
impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.step = Self::FIRST.min(self.max);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_body_that_fails_at_start_ends_the_process_without_a_signal() {
        // The only test of this binary that installs logging.
        let result = run(LogFormat::Text, |_readiness, _cancel| async {
            anyhow::bail!("bind failed")
        });
        assert_eq!(format!("{:#}", result.unwrap_err()), "bind failed");
    }

    #[cfg(feature = "kube")]
    #[test]
    fn a_watch_backoff_doubles_with_jitter_up_to_its_cap_and_resets() {
        use kube::runtime::utils::Backoff as _;
        use std::time::Duration;
        let mut b = WatchBackoff::new(Duration::from_secs(4));
        let waits: Vec<Duration> = (&mut b).take(8).collect();
        let steps = [250u64, 500, 1000, 2000, 4000, 4000, 4000, 4000];
        for (w, s) in waits.iter().zip(steps) {
            let s = Duration::from_millis(s);
            assert!(*w >= s / 2 && *w <= s, "{waits:?}");
        }
        b.reset();
        assert!(b.next().unwrap() <= WatchBackoff::FIRST);
    }

    #[cfg(feature = "kube")]
    #[test]
    fn go_durations_are_positive_and_errors_say_how_to_write_them() {
        assert_eq!(go_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(go_duration("300ms").unwrap().as_millis(), 300);
        assert!(go_duration("0s").unwrap_err().contains("zero"));
        assert!(go_duration("-5s").unwrap_err().contains("negative"));
        assert!(go_duration("").unwrap_err().contains("empty"));
        let e = go_duration("30").unwrap_err();
        assert!(
            e.contains("not a Go duration") && e.contains("\"30s\""),
            "{e}"
        );
    }
}
