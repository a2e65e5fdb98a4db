//! The agent's parts run as one set ([`Parts`]): each is named, and none may end on its
//! own. A part that stops before shutdown (an error, a panic, or a return) stops the whole
//! agent with that part named, so the process exits non-zero and the kubelet restarts it,
//! instead of running on half-dead behind a `/ready` that still says 200.
//!
//! On shutdown every part gets [`DRAIN_GRACE`] to drain; a part still running then is
//! named in the log and dropped, so a stuck stream never holds the process until the
//! kubelet's SIGKILL (the pod's grace period is 30 s by default).

use std::future::Future;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

/// How long the parts may drain after shutdown begins.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The agent's running parts, by name.
#[derive(Debug, Default)]
pub struct Parts {
    running: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

impl Parts {
    /// Runs `part` as the part named `name` (the name appears in logs and errors).
    pub fn spawn(
        &mut self,
        name: &'static str,
        part: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.running.push((name, tokio::spawn(part)));
    }

    /// Runs a part that has nothing to report but must not end before `cancel`.
    pub fn spawn_until_cancelled(
        &mut self,
        name: &'static str,
        part: impl Future<Output = ()> + Send + 'static,
    ) {
        self.spawn(name, async move {
            part.await;
            Ok(())
        });
    }

    /// Waits until every part has stopped. A part that stops before `cancel` fires is a
    /// failure: it is logged with its name, `cancel` fires so the others drain, and the
    /// first failure is returned. After `cancel`, parts get `grace` to finish; those
    /// still running are named and dropped.
    pub async fn wait(self, cancel: &CancellationToken, grace: Duration) -> anyhow::Result<()> {
        let mut names = Vec::with_capacity(self.running.len());
        let mut pending: FuturesUnordered<_> = self
            .running
            .into_iter()
            .enumerate()
            .map(|(i, (name, handle))| {
                names.push((name, handle.abort_handle()));
                async move { (i, name, handle.await) }
            })
            .collect();
        let mut done = vec![false; names.len()];
        let mut failure: Option<anyhow::Error> = None;
        {
            let drained = async {
                while let Some((i, name, outcome)) = pending.next().await {
                    done[i] = true;
                    if cancel.is_cancelled() {
                        if let Ok(Err(e)) = &outcome {
                            warn!(part = name, error = %format!("{e:#}"), "part ended with an error while draining");
                        }
                        continue;
                    }
                    let why = match outcome {
                        Ok(Ok(())) => anyhow::anyhow!("the {name} stopped before shutdown"),
                        Ok(Err(e)) => e.context(format!("the {name} failed")),
                        Err(e) if e.is_panic() => anyhow::anyhow!("the {name} panicked"),
                        Err(e) => anyhow::anyhow!("the {name} was cancelled: {e}"),
                    };
                    error!(part = name, error = %format!("{why:#}"), "a part of the agent stopped; the agent stops so that it is restarted");
                    failure.get_or_insert(why);
                    cancel.cancel();
                }
            };
            tokio::pin!(drained);
            tokio::select! {
                () = &mut drained => {}
                () = async {
                    cancel.cancelled().await;
                    tokio::time::sleep(grace).await;
                } => {}
            }
        }
        let stuck: Vec<&str> = names
            .iter()
            .zip(&done)
            .filter(|(_, done)| !**done)
            .map(|((name, abort), _)| {
                abort.abort();
                *name
            })
            .collect();
        if !stuck.is_empty() {
            warn!(parts = ?stuck, ?grace, "parts did not drain within the grace period; dropping them");
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_part_that_fails_stops_the_others_and_is_named() {
        let cancel = CancellationToken::new();
        let mut parts = Parts::default();
        let c = cancel.clone();
        parts.spawn_until_cancelled("sync loop", async move { c.cancelled().await });
        parts.spawn("Broker API server", async {
            anyhow::bail!("accept: too many open files")
        });
        let e = parts
            .wait(&cancel, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(cancel.is_cancelled(), "the failure cancels the others");
        let text = format!("{e:#}");
        assert!(
            text.contains("Broker API server failed") && text.contains("too many open files"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_part_that_returns_before_shutdown_is_a_failure() {
        let cancel = CancellationToken::new();
        let mut parts = Parts::default();
        parts.spawn_until_cancelled("rotator", async {});
        let e = parts.wait(&cancel, Duration::from_secs(60)).await;
        let text = format!("{:#}", e.unwrap_err());
        assert!(text.contains("rotator stopped before shutdown"), "{text}");
    }

    #[tokio::test]
    async fn a_panicking_part_is_a_failure() {
        let cancel = CancellationToken::new();
        let mut parts = Parts::default();
        parts.spawn_until_cancelled("health server", async { panic!("boom") });
        let text = format!(
            "{:#}",
            parts
                .wait(&cancel, Duration::from_secs(60))
                .await
                .unwrap_err()
        );
        assert!(text.contains("health server panicked"), "{text}");
    }

    #[tokio::test]
    async fn after_shutdown_a_stuck_part_is_dropped_after_the_grace_and_is_not_a_failure() {
        let cancel = CancellationToken::new();
        let mut parts = Parts::default();
        let c = cancel.clone();
        parts.spawn_until_cancelled("Workload API server", async move { c.cancelled().await });
        parts.spawn_until_cancelled("stuck drain", std::future::pending());
        cancel.cancel();
        let grace = Duration::from_millis(200);
        let started = std::time::Instant::now();
        parts.wait(&cancel, grace).await.unwrap();
        assert!(started.elapsed() >= grace);
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[tokio::test]
    async fn parts_that_drain_quickly_are_not_held_for_the_grace() {
        let cancel = CancellationToken::new();
        let mut parts = Parts::default();
        for name in ["a", "b"] {
            let c = cancel.clone();
            parts.spawn_until_cancelled(name, async move { c.cancelled().await });
        }
        cancel.cancel();
        let started = std::time::Instant::now();
        parts.wait(&cancel, Duration::from_secs(60)).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
