//! The operator's own serving certificates: X509-SVIDs signed by this replica's loaded CA,
//! with keys that never leave the process.
//!
//! - The Node API presents `spiffe://<agent trust domain>/sigil/operator`; agents verify
//!   it against their bootstrap bundle (the bundle ConfigMap), then against the bundle the
//!   operator sends them.
//! - The `https_spiffe` bundle endpoint presents `spiffe://<td>/sigil/bundle-endpoint`;
//!   federated peers verify it against the bundle they hold for us.
//!
//! Re-issued at half-life, and as soon as a CA appears for the first time.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_identity::ca::SvidTemplate;
use sigil_identity::clock::SharedClock;
use sigil_identity::keys::{KeyType, PrivateKey};
use sigil_identity::tls::SwappableCert;
use sigil_identity::{SpiffeId, TrustDomain};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::authority::Authorities;
use crate::telemetry::ReadyHandle;

/// Path of the Node API's SPIFFE ID in the agent trust domain.
pub const OPERATOR_PATH: &str = "/sigil/operator";
/// Path of the `https_spiffe` bundle endpoint's SPIFFE ID.
pub const BUNDLE_ENDPOINT_PATH: &str = "/sigil/bundle-endpoint";

/// Keeps `cert` holding a valid SVID for `trust_domain` + `path` until `cancel`. `ready`
/// turns ready once the first one is in place (a listener without a certificate cannot
/// serve). `what` names the listener in logs.
#[allow(clippy::too_many_arguments)]
pub async fn keep_serving_svid(
    what: &'static str,
    authorities: Arc<Authorities>,
    trust_domain: TrustDomain,
    path: &'static str,
    ttl: Duration,
    cert: Arc<SwappableCert>,
    clock: SharedClock,
    ready: Option<ReadyHandle>,
    cancel: CancellationToken,
) {
    let id = match trust_domain.id(path) {
        Ok(id) => id,
        Err(e) => {
            warn!(listener = what, error = %e, "cannot form the serving SPIFFE ID; the listener has no certificate");
            return;
        }
    };
    let mut changes = authorities.subscribe();
    let mut renew_at: Option<SystemTime> = None;
    loop {
        let now = clock.now();
        if renew_at.is_none_or(|t| now >= t) {
            match issue(&authorities, &trust_domain, &id, ttl, now) {
                Some((chain, key, not_after)) => match cert.set(&chain, &key) {
                    Ok(()) => {
                        let half = not_after.duration_since(now).unwrap_or_default() / 2;
                        renew_at = Some(now + half);
                        info!(listener = what, spiffe_id = %id, "serving certificate issued");
                        if let Some(r) = &ready {
                            r.set_ready();
                        }
                    }
                    Err(e) => {
                        warn!(listener = what, error = %e, "serving certificate rejected by rustls")
                    }
                },
                None => renew_at = None,
            }
        }
        // Wake at renewal time, when a CA appears or changes, or on shutdown.
        let wait = renew_at
            .and_then(|t| t.duration_since(clock.now()).ok())
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            r = changes.changed() => {
                if r.is_err() { return }
                if cert.current().is_none() { renew_at = None }
            }
        }
    }
}

fn issue(
    authorities: &Authorities,
    td: &TrustDomain,
    id: &SpiffeId,
    ttl: Duration,
    now: SystemTime,
) -> Option<(Vec<Vec<u8>>, PrivateKey, SystemTime)> {
    let authority = authorities.get(td)?;
    let key = PrivateKey::generate(KeyType::EcP256)
        .inspect_err(|e| warn!(error = %e, "generating a serving key"))
        .ok()?;
    let issued = authority
        .x509_ca
        .sign_component(
            &key.public_key_der(),
            &SvidTemplate {
                spiffe_id: id,
                ttl,
                dns_names: &[],
            },
            now,
        )
        .inspect_err(|e| warn!(error = %e, "signing a serving certificate"))
        .ok()?;
    Some((issued.chain(), key, issued.not_after))
}
