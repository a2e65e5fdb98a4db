//! The agent's link to the operator: node attestation, agent SVID renewal, and the entry
//! stream that fills the [`Cache`].
//!
//! - Attests with the projected service-account token, read from its file at each attempt
//!   (the kubelet rotates it in place), and with the node's TPM when one is configured.
//! - Renews the agent SVID at half-life, proving again what attestation proved: over mTLS
//!   with a fresh token (RenewAgent), or, with a TPM, by attesting again (a fresh
//!   credential activation). When renewal fails (the SVID expired while the operator was
//!   away, or the operator refuses it), it attests again with a fresh token: that always
//!   works for a node still authorised, because attestation needs no client certificate.
//! - Keeps SyncEntries open, resuming from the last revision applied; reconnects with
//!   backoff, moving to the next operator address each time.
//! - The cache keeps serving whatever it holds while the operator is unreachable.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use sigil_identity::entry::{RegistrationEntry, Selector};
use sigil_identity::keys::KeyType;
use sigil_identity::proto::node as pb;
use sigil_identity::{SpiffeId, TrustBundle, TrustDomain};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cache::Cache;
use crate::node_client::{NodeClient, NodeClientError};
use crate::tpm::TpmDevice;

/// Where the projected service-account token is.
#[derive(Debug, Clone)]
pub struct TokenFile(pub PathBuf);

impl TokenFile {
    fn read(&self) -> Result<String, NodeClientError> {
        std::fs::read_to_string(&self.0)
            .map(|t| t.trim().to_owned())
            .map_err(|e| {
                NodeClientError::Local(format!(
                    "read the projected token {}: {e} (is the token volume mounted?)",
                    self.0.display()
                ))
            })
    }
}

/// The longest wait between two attempts to attest or to renew the agent SVID. Both need
/// the API server (the operator reviews the pod token), so after an API server outage
/// every agent is retrying; a 30 s cap left agents without a valid SVID, so unable to
/// sign anything, for up to 30 s after the API server was back (e2e/tests/faults.rs
/// `api_server_outage_past_the_agent_svid_lifetime`: 31.7 s until workloads were current
/// again). With the jitter, a thousand agents make a few hundred attempts a second at most.
const AGENT_SVID_RETRY_MAX: Duration = Duration::from_secs(5);

/// Exponential backoff between `min` and `max`, with ±20% jitter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max,
        }
    }
    pub(crate) fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        // ±20% jitter so a fleet of agents does not reconnect in lockstep.
        d.mul_f64(0.8 + rand::random::<f64>() * 0.4)
    }
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Attests until it succeeds (or `cancel`).
async fn attest_until_ok(
    node: &NodeClient,
    token: &TokenFile,
    tpm: Option<&TpmDevice>,
    cancel: &CancellationToken,
) -> bool {
    let mut backoff = Backoff::new(Duration::from_millis(250), AGENT_SVID_RETRY_MAX);
    loop {
        let result = match (token.read(), tpm) {
            (Ok(t), None) => node.attest_psat(&t).await,
            (Ok(t), Some(tpm)) => node.attest_tpm(tpm, Some(&t)).await,
            (Err(e), _) => Err(e),
        };
        match result {
            Ok(svid) => {
                info!(spiffe_id = %svid.spiffe_id, expires = ?svid.not_after, "node attested");
                return true;
            }
            Err(e) => {
                let wait = backoff.step();
                warn!(error = %e, retry_in = ?wait, "node attestation failed");
                node.fail_over();
                tokio::select! {
                    () = cancel.cancelled() => return false,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Keeps the agent SVID valid until `cancel`: attests, renews at half-life, re-attests when
/// renewal fails. `attested` turns true after the first success.
pub async fn keep_agent_svid(
    node: Arc<NodeClient>,
    token: TokenFile,
    tpm: Option<Arc<TpmDevice>>,
    attested: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    if !attest_until_ok(&node, &token, tpm.as_deref(), &cancel).await {
        return;
    }
    attested.send_replace(true);
    let mut backoff = Backoff::new(Duration::from_secs(1), AGENT_SVID_RETRY_MAX);
    loop {
        let Some(svid) = node.svid() else { return };
        let now = SystemTime::now();
        let issued = svid
            .chain
            .first()
            .and_then(|c| sigil_identity::x509::inspect_leaf(c).ok())
            .map_or(now, |l| l.not_before);
        let half = issued + svid.not_after.duration_since(issued).unwrap_or_default() / 2;
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(half.duration_since(now).unwrap_or_default()) => {}
        }
        loop {
            let renewed = match (tpm.as_deref(), token.read()) {
                // The TPM proves itself again, with the pod token alongside.
                (Some(device), Ok(t)) => node.attest_tpm(device, Some(&t)).await,
                (None, Ok(t)) => node.renew(&t).await,
                (_, Err(e)) => Err(e),
            };
            match renewed {
                Ok(s) => {
                    info!(expires = ?s.not_after, "agent SVID renewed");
                    backoff.reset();
                    break;
                }
                Err(e) => {
                    let expired = node.svid().is_none_or(|s| s.not_after <= SystemTime::now());
                    warn!(error = %e, expired, "agent SVID renewal failed");
                    node.fail_over();
                    if expired
                        || matches!(
                            e.status().map(|s| s.code()),
                            Some(tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
                        )
                    {
                        if !attest_until_ok(&node, &token, tpm.as_deref(), &cancel).await {
                            return;
                        }
                        break;
                    }
                    // Never past the expiry: from then on only attesting again helps.
                    let until_expiry = node.svid().map_or(Duration::ZERO, |s| {
                        s.not_after
                            .duration_since(SystemTime::now())
                            .unwrap_or_default()
                    });
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(backoff.step().min(until_expiry)) => {}
                    }
                }
            }
        }
    }
}

/// Applies one stream message to the cache (and the bundles to the client's trust).
pub fn apply(cache: &Cache, node: &NodeClient, msg: pb::SyncEntriesResponse) {
    let bundles: Vec<TrustBundle> = msg
        .bundles
        .iter()
        .filter_map(|b| {
            let td: TrustDomain = b.trust_domain.parse().ok()?;
            let parsed = TrustBundle::from_jwks_json(td, &b.jwks);
            if let Err(e) = &parsed {
                warn!(trust_domain = %b.trust_domain, error = %e, "ignoring a bundle the operator sent");
            }
            let _ = node.apply_bundle("SyncEntries", b);
            parsed.ok()
        })
        .collect();
    let mut removed: Vec<TrustDomain> = msg
        .removed_bundles
        .iter()
        .filter_map(|td| td.parse().ok())
        .collect();
    if msg.bundles_complete {
        // Everything not sent is gone (a bundle that was sent but failed to parse is kept
        // as it was).
        removed.extend(
            cache
                .bundles()
                .iter()
                .map(|b| b.trust_domain.clone())
                .filter(|td| !msg.bundles.iter().any(|b| b.trust_domain == td.name())),
        );
    }
    for td in &removed {
        info!(trust_domain = %td, "the operator no longer sends this bundle; dropping it");
    }
    cache.set_bundles(bundles, &removed);
    let entries: Vec<RegistrationEntry> =
        msg.upserts.into_iter().filter_map(entry_from_pb).collect();
    if msg.full {
        cache.replace_entries(entries, msg.revision);
    } else {
        cache.apply_changes(entries, &msg.removed, msg.revision);
    }
}

fn entry_from_pb(e: pb::Entry) -> Option<RegistrationEntry> {
    let spiffe_id = SpiffeId::parse(&e.spiffe_id)
        .inspect_err(
            |err| warn!(entry = %e.id, error = %err, "ignoring an entry with an invalid SPIFFE ID"),
        )
        .ok()?;
    // Empty from an operator older than workload key types. A type this agent does not
    // know (a newer operator's) leaves the entry out rather than issuing a key the
    // ClusterSPIFFEID did not ask for.
    let key_type = match e.key_type.as_str() {
        "" => KeyType::EcP256,
        name => name
            .parse::<KeyType>()
            .ok()
            .filter(|t| *t != KeyType::Rsa)
            .or_else(|| {
                warn!(entry = %e.id, key_type = name, "ignoring an entry whose workload key type this agent cannot generate");
                None
            })?,
    };
    Some(RegistrationEntry {
        id: e.id,
        spiffe_id,
        selectors: e
            .selectors
            .into_iter()
            .map(|s| Selector::new(s.r#type, s.value))
            .collect(),
        dns_names: e.dns_names,
        x509_ttl: Duration::from_secs(u64::try_from(e.x509_svid_ttl_seconds).unwrap_or(0)),
        jwt_ttl: Duration::from_secs(u64::try_from(e.jwt_svid_ttl_seconds).unwrap_or(0)),
        federates_with: e
            .federates_with
            .iter()
            .filter_map(|t| t.parse().ok())
            .collect(),
        hint: e.hint,
        admin: e.admin,
        downstream: e.downstream,
        revision: e.revision,
        key_type,
    })
}

/// Keeps SyncEntries open and the cache current until `cancel`. Waits for the first
/// attestation.
pub async fn sync_entries(
    node: Arc<NodeClient>,
    cache: Arc<Cache>,
    mut attested: watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    tokio::select! {
        () = cancel.cancelled() => return,
        r = attested.wait_for(|a| *a) => if r.is_err() { return },
    }
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(15));
    loop {
        match node.sync_entries(cache.revision()).await {
            Ok(mut stream) => {
                info!(from_revision = cache.revision(), "entry stream open");
                loop {
                    let msg = tokio::select! {
                        () = cancel.cancelled() => return,
                        m = stream.next() => m,
                    };
                    match msg {
                        Some(Ok(m)) => {
                            backoff.reset();
                            apply(&cache, &node, m);
                        }
                        Some(Err(s)) => {
                            warn!(status = %s, "entry stream ended by the operator; reconnecting");
                            break;
                        }
                        None => {
                            warn!("entry stream closed; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot open the entry stream; still serving the cache"),
        }
        node.fail_over();
        let wait = backoff.step();
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn wire(key_type: &str) -> pb::Entry {
        pb::Entry {
            id: "e1".into(),
            spiffe_id: "spiffe://example.org/ns/a/sa/b".into(),
            key_type: key_type.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_workload_key_type_comes_from_the_wire_and_defaults_to_p256() {
        assert_eq!(entry_from_pb(wire("")).unwrap().key_type, KeyType::EcP256);
        assert_eq!(
            entry_from_pb(wire("ECDSA-P256")).unwrap().key_type,
            KeyType::EcP256
        );
        assert_eq!(
            entry_from_pb(wire("RSA-2048")).unwrap().key_type,
            KeyType::Rsa2048
        );
        // A type this agent cannot generate: no entry, rather than a key of another type.
        assert!(entry_from_pb(wire("RSA-1024")).is_none());
        assert!(entry_from_pb(wire("RSA")).is_none());
    }
}
