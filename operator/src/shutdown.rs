//! Bounded graceful shutdown for kube-runtime controllers.
//!
//! `Controller::graceful_shutdown_on` waits for in-flight reconciles, but its runner is
//! held until the controller's store has listed once. When a watch can never list (the
//! operator lacks a grant, the CRD is missing) the controller would never return, and the
//! process would hang on SIGTERM until the kubelet kills it. This gives in-flight work a
//! grace period after `cancel` and then drops the controller.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How long in-flight reconciles may run on after `cancel`.
pub const GRACE: Duration = Duration::from_secs(5);

/// Runs `controller` until it returns, or until `grace` after `cancel` fires.
pub async fn run_with_grace(
    what: &str,
    controller: impl Future<Output = ()>,
    cancel: &CancellationToken,
    grace: Duration,
) {
    tokio::select! {
        () = controller => {}
        () = async {
            cancel.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            warn!(controller = what, ?grace, "controller did not stop within its grace period; dropping it (a watch may never have listed: check the operator's RBAC)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_controller_that_never_returns_is_dropped_after_the_grace_period() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let grace = Duration::from_millis(200);
        let started = std::time::Instant::now();
        run_with_grace("stuck", std::future::pending(), &cancel, grace).await;
        assert!(started.elapsed() >= grace);
    }

    #[tokio::test]
    async fn a_controller_that_returns_is_not_held_for_the_grace_period() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let started = std::time::Instant::now();
        run_with_grace("quick", async {}, &cancel, Duration::from_secs(60)).await;
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
