//! Two reflectors read as one: the CA loader (TrustDomains and their CA Secrets) and the
//! federation loader (FederatedBundles and their ConfigMaps) each act on a pair of stores
//! that must both have listed before anything is computed from them.

use futures::{Stream, StreamExt as _, stream};
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::telemetry::ReadyHandle;

/// Drives the reflector streams `a` and `b` (their stores fill as they are polled) until
/// `cancel` or their end. Once each has listed (sent `InitDone`), `ready` is set and
/// `on_change` runs after every event, so it always sees two complete stores. A watch
/// error is logged, with `what`, and the reflector retries with its backoff.
pub(crate) async fn run<A, B>(
    what: &str,
    a: impl Stream<Item = Result<watcher::Event<A>, watcher::Error>>,
    b: impl Stream<Item = Result<watcher::Event<B>, watcher::Error>>,
    ready: Option<&ReadyHandle>,
    cancel: &CancellationToken,
    mut on_change: impl FnMut(),
) {
    let a = a.map(|e| e.map(|e| (true, matches!(e, watcher::Event::InitDone))));
    let b = b.map(|e| e.map(|e| (false, matches!(e, watcher::Event::InitDone))));
    let mut events = std::pin::pin!(stream::select(a, b));
    let (mut a_listed, mut b_listed) = (false, false);
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            None => return,
            Some(Err(e)) => {
                warn!(error = %e, "{what} watch failed; retrying");
                continue;
            }
            Some(Ok((from_a, true))) => {
                if from_a {
                    a_listed = true;
                } else {
                    b_listed = true;
                }
                if a_listed
                    && b_listed
                    && let Some(r) = ready
                {
                    r.set_ready();
                }
            }
            Some(Ok(_)) => {}
        }
        if a_listed && b_listed {
            on_change();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use watcher::Event;

    use super::*;

    #[tokio::test]
    async fn nothing_is_computed_until_both_have_listed_then_every_event_is() {
        let a = stream::iter(vec![
            Ok(Event::Init),
            Ok(Event::InitApply(ConfigMap::default())),
            Ok(Event::InitDone),
            Ok(Event::Apply(ConfigMap::default())),
        ]);
        // b lists after a has; a's later event comes after b's InitDone.
        let b = stream::iter(vec![Ok(Event::<Secret>::Init), Ok(Event::InitDone)]);
        let readiness = crate::telemetry::Readiness::new();
        let ready = readiness.component("pair");
        let mut calls = 0;
        run(
            "test",
            a,
            b,
            Some(&ready),
            &CancellationToken::new(),
            || calls += 1,
        )
        .await;
        assert!(readiness.is_ready());
        // select alternates a, b: a Init, b Init, a InitApply, b InitDone (b listed),
        // a InitDone (both: call), a Apply (call).
        assert_eq!(calls, 2);
    }

    #[tokio::test]
    async fn a_pair_where_one_never_lists_computes_nothing_and_is_not_ready() {
        let a = stream::iter(vec![
            Ok(Event::Init),
            Ok(Event::InitDone),
            Ok(Event::Apply(ConfigMap::default())),
        ]);
        let b = stream::iter(vec![Ok(Event::<Secret>::Init)]);
        let readiness = crate::telemetry::Readiness::new();
        let ready = readiness.component("pair");
        let mut calls = 0;
        run(
            "test",
            a,
            b,
            Some(&ready),
            &CancellationToken::new(),
            || calls += 1,
        )
        .await;
        assert!(!readiness.is_ready());
        assert_eq!(calls, 0);
    }
}
