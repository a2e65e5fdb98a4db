//! `SvidRotator`: keeps an X509-SVID ready for every entry of this node, before any
//! workload asks (pre-signing), and replaces each at half-life with jitter.
//!
//! Keys are generated here, one per SVID, and never leave the node; the operator only sees
//! CSRs, sent in batches. A batch that fails is retried with backoff while the cache keeps
//! serving what it holds; an entry the operator refuses is retried later on its own, so one
//! bad entry never stalls the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use sigil_identity::entry::RegistrationEntry;
use sigil_identity::keys::PrivateKey;
use sigil_identity::proto::node as pb;
use sigil_identity::x509;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cache::{Cache, HeldSvid, rotation_time};
use crate::node_client::NodeClient;
use crate::sync::Backoff;

/// Most CSRs in one signing call (the operator accepts 1000).
pub const BATCH: usize = 500;
/// Most CSRs in one signing call for RSA entries: each key takes a few hundred
/// milliseconds to make, so their SVIDs arrive a few at a time instead of after the whole
/// backlog's keys.
pub const RSA_BATCH: usize = 8;

/// Longest wait before an entry refused for the node's signing budget is tried again. The
/// budget refills every second, so such a refusal clears within seconds; other refusals
/// back off up to a minute.
pub const BUDGET_RETRY_MAX: Duration = Duration::from_secs(4);

/// Longest wait before a failed signing call (the operator unreachable, a connection that
/// stalled) is tried again: once the network is back, every SVID due waits on that retry.
/// A thousand agents retrying an operator that is down make a few hundred calls a second,
/// each refused or timed out without work on the operator's side.
pub const SIGN_RETRY_MAX: Duration = Duration::from_secs(2);

/// Orders due entries most urgent first, so that when the operator's signing budget for
/// this node is short, what it signs first is what matters most: entries with no SVID at
/// all (a new pod waits on them; nothing can be served), then the held SVIDs that expire
/// soonest.
pub fn by_urgency(due: &mut [Arc<RegistrationEntry>], cache: &Cache) {
    due.sort_by_cached_key(|e| cache.svid(&e.id).map(|h| h.not_after));
}

/// Rotator metrics.
#[derive(Debug, Clone, Default)]
pub struct RotatorMetrics {
    /// SVIDs received and installed.
    pub signed: Counter,
    /// CSRs the operator refused, or batches that failed.
    pub failures: Counter,
}

impl RotatorMetrics {
    /// Registers under `sigil_agent_svids_*`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sigil_agent_svids");
        r.register(
            "signed",
            "X509-SVIDs signed for this node's entries",
            self.signed.clone(),
        );
        r.register(
            "failures",
            "Signing failures (refused CSRs or failed batches)",
            self.failures.clone(),
        );
    }
}

/// Runs until `cancel`.
pub async fn run(
    cache: Arc<Cache>,
    node: Arc<NodeClient>,
    metrics: RotatorMetrics,
    cancel: CancellationToken,
) {
    let mut retry_after: HashMap<String, (SystemTime, Duration)> = HashMap::new();
    let mut batch_backoff = Backoff::new(Duration::from_millis(200), SIGN_RETRY_MAX);
    let mut changes = cache.subscribe();
    loop {
        changes.borrow_and_update();
        let now = SystemTime::now();
        retry_after.retain(|id, _| cache.entry(id).is_some());
        let mut due: Vec<_> = cache
            .needing_svids(now)
            .into_iter()
            .filter(|e| retry_after.get(&e.id).is_none_or(|(t, _)| *t <= now))
            .collect();
        by_urgency(&mut due, &cache);
        let mut failed_batch: Option<Duration> = None;
        // ECDSA entries first: their keys take microseconds, and must not wait behind RSA
        // keys that take hundreds of milliseconds each.
        let (rsa, ec): (Vec<_>, Vec<_>) = due.into_iter().partition(|e| e.key_type.is_rsa());
        for chunk in ec.chunks(BATCH).chain(rsa.chunks(RSA_BATCH)) {
            let mut keys = Vec::with_capacity(chunk.len());
            let mut requests = Vec::with_capacity(chunk.len());
            for (e, key, csr) in make_keys(chunk.to_vec()).await {
                requests.push(pb::SvidRequest {
                    entry_id: e.id.clone(),
                    csr,
                });
                keys.push((e, key));
            }
            match node.sign(requests).await {
                Ok(results) => {
                    let mut signed = Vec::with_capacity(results.len());
                    for ((entry, key), r) in keys.into_iter().zip(results) {
                        if r.error_code != 0 || r.svid_chain.is_empty() {
                            metrics.failures.inc();
                            let most = if r.error_code == tonic::Code::ResourceExhausted as i32 {
                                BUDGET_RETRY_MAX
                            } else {
                                Duration::from_secs(60)
                            };
                            let backoff = retry_after
                                .get(&entry.id)
                                .map_or(Duration::from_secs(1), |(_, b)| (*b * 2).min(most));
                            warn!(entry = %entry.id, spiffe_id = %entry.spiffe_id, code = r.error_code, reason = %r.error_message, retry_in = ?backoff, "operator refused to sign");
                            retry_after
                                .insert(entry.id.clone(), (SystemTime::now() + backoff, backoff));
                            continue;
                        }
                        let Ok(leaf) = x509::inspect_leaf(&r.svid_chain[0]) else {
                            metrics.failures.inc();
                            continue;
                        };
                        retry_after.remove(&entry.id);
                        let held = HeldSvid {
                            entry: entry.clone(),
                            chain: r.svid_chain,
                            key,
                            not_before: leaf.not_before,
                            not_after: leaf.not_after,
                            rotate_at: rotate_at(
                                leaf.not_before,
                                leaf.not_after,
                                SystemTime::now(),
                            ),
                        };
                        signed.push(held);
                    }
                    let installed = cache.put_svids(signed);
                    metrics.signed.inc_by(installed as u64);
                    debug!(installed, "X509-SVIDs installed");
                    batch_backoff.reset();
                }
                Err(e) => {
                    metrics.failures.inc();
                    let wait = batch_backoff.step();
                    warn!(error = %e, retry_in = ?wait, csrs = chunk.len(), "signing batch failed; still serving the SVIDs held");
                    failed_batch = Some(wait);
                    break;
                }
            }
        }
        // Sleep until the next rotation, the next retry, or a change of entries.
        let now = SystemTime::now();
        let next = cache
            .next_rotation()
            .into_iter()
            .chain(retry_after.values().map(|(t, _)| *t))
            .min()
            .map(|t| t.duration_since(now).unwrap_or_default())
            .unwrap_or(Duration::from_secs(3600));
        let wait = failed_batch.unwrap_or(next);
        tokio::select! {
            () = cancel.cancelled() => { info!("SVID rotator stopped"); return }
            () = tokio::time::sleep(wait) => {}
            r = changes.changed(), if failed_batch.is_none() => if r.is_err() { return },
        }
    }
}

/// A fresh key of each entry's key type and its CSR. An RSA-2048 key takes a few hundred
/// milliseconds to generate (a P-256 key microseconds), so a batch of them is made on the
/// blocking pool, never on the async runtime that serves workloads.
async fn make_keys(
    entries: Vec<Arc<RegistrationEntry>>,
) -> Vec<(Arc<RegistrationEntry>, PrivateKey, Vec<u8>)> {
    let made = tokio::task::spawn_blocking(move || {
        entries
            .into_iter()
            .filter_map(|e| {
                let key = PrivateKey::generate(e.key_type)
                    .inspect_err(|err| warn!(entry = %e.id, error = %err, "cannot generate the workload key"))
                    .ok()?;
                let csr = x509::build_csr(&key, &e.spiffe_id)
                    .inspect_err(|err| warn!(entry = %e.id, error = %err, "cannot build the CSR"))
                    .ok()?;
                Some((e, key, csr))
            })
            .collect()
    })
    .await;
    made.unwrap_or_else(|e| {
        warn!(error = %e, "workload key generation failed");
        Vec::new()
    })
}

/// When to replace an SVID received at `now`: at its half-life with jitter
/// ([`rotation_time`]), but never before a quarter of the life it has left, so an SVID that
/// arrives with a heavily back-dated validity is not re-signed in a loop.
pub fn rotate_at(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> SystemTime {
    let floor = now + not_after.duration_since(now).unwrap_or_default() / 4;
    rotation_time(not_before, not_after).max(floor)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sigil_identity::SpiffeId;
    use sigil_identity::entry::Selector;
    use sigil_identity::keys::KeyType;

    /// Under a short signing budget the first CSRs sent are those of entries with no SVID
    /// (a new pod waits on them), then the held SVIDs that expire soonest.
    #[test]
    fn entries_without_an_svid_go_first_then_the_soonest_to_expire() {
        let cache = Cache::new();
        let entry = |id: &str| {
            RegistrationEntry::new(
                id,
                SpiffeId::parse(&format!("spiffe://td/{id}")).unwrap(),
                vec![Selector::parse(&format!("k8s:pod-uid:{id}")).unwrap()],
            )
        };
        cache.replace_entries(["late", "new", "soon", "fresh"].map(entry).to_vec(), 1);
        let now = SystemTime::now();
        for (id, left) in [("late", 600), ("soon", 60), ("fresh", 3600)] {
            assert!(cache.put_svid(HeldSvid {
                entry: cache.entry(id).unwrap(),
                chain: vec![],
                key: PrivateKey::generate(KeyType::EcP256).unwrap(),
                not_before: now,
                not_after: now + Duration::from_secs(left),
                rotate_at: now,
            }));
        }
        let mut due: Vec<_> = ["fresh", "late", "soon", "new"]
            .map(|id| cache.entry(id).unwrap())
            .to_vec();
        by_urgency(&mut due, &cache);
        let order: Vec<&str> = due.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(order, ["new", "soon", "late", "fresh"]);
    }

    #[test]
    fn a_back_dated_svid_is_not_rotated_on_arrival() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        // Valid from 10 s ago for 12 s: the half-life (1 s ago) is already past.
        let t = rotate_at(
            now - Duration::from_secs(10),
            now + Duration::from_secs(12),
            now,
        );
        assert_eq!(t, now + Duration::from_secs(3));
        // A normal SVID rotates at half-life minus jitter.
        let t = rotate_at(now, now + Duration::from_secs(3600), now);
        assert!(t >= now + Duration::from_secs(1440) && t <= now + Duration::from_secs(1800));
    }
}
