//! Kubernetes pod certificates (KEP-4317) signed as X509-SVIDs.
//!
//! A pod asks for a certificate with a `podCertificate` projected volume whose
//! `signerName` is `sigil.dev/<TrustDomain name>`. Its kubelet makes the key and a
//! PodCertificateRequest; this signer answers it with an X509-SVID of the SPIFFE ID the
//! identity index gives that pod (the same entry the Workload API would serve), or with a
//! `Denied` condition whose message says what to fix ([`decide`]). The kubelet writes the
//! chain into the pod and asks again at `beginRefreshAt`.
//!
//! Every replica watches the requests; only the leader writes. A status update carries the
//! resourceVersion it read, and the API server makes a terminal status immutable, so no
//! request is ever answered twice.
//!
//! [`bundles`] publishes each TrustDomain's bundle, and the bundles of the trust domains
//! its ClusterSPIFFEIDs federate with, as ClusterTrustBundles of the signer, for pods to
//! project with a `clusterTrustBundle` volume source.

pub mod bundles;
pub mod decide;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::api::certificates::v1::PodCertificateRequest;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt as _};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sigil_api::pod_certificates::trust_domain_object;
use sigil_identity::ca::SvidTemplate;
use sigil_identity::clock::SharedClock;
use sigil_index::EntryIndex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::authority::{Authorities, DomainAuthority};
use crate::conditions::{k8s_time as time, system_time};
use crate::federation::FederatedBundles;
use decide::{Decision, Policy, Request};

/// `Issued`, `Denied` and `Failed`: the condition types the API allows.
const ISSUED: &str = "Issued";
const DENIED: &str = "Denied";
const FAILED: &str = "Failed";

/// Labels of a request's outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `issued`, `denied` or `failed`.
    pub result: String,
    /// The condition's reason.
    pub reason: String,
}

/// The signer's metric handles.
#[derive(Debug, Clone)]
pub struct PodCertificateMetrics {
    /// Requests answered, by result and reason.
    pub requests: Family<OutcomeLabels, Counter>,
    /// From a request's creation to this replica's answer, seconds (the API's timestamps
    /// have whole seconds).
    pub answer_seconds: Histogram,
    /// ClusterTrustBundle writes (create, update, delete).
    pub bundle_writes: Counter,
}

impl Default for PodCertificateMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            answer_seconds: Histogram::new(exponential_buckets(0.5, 2.0, 10)),
            bundle_writes: Counter::default(),
        }
    }
}

impl PodCertificateMetrics {
    /// Registers the metrics under `sigil_pod_certificate_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "sigil_pod_certificate_requests",
            "PodCertificateRequests answered by Sigil's signer, by result and reason",
            self.requests.clone(),
        );
        registry.register(
            "sigil_pod_certificate_answer_seconds",
            "Time from a PodCertificateRequest's creation to its answer",
            self.answer_seconds.clone(),
        );
        registry.register(
            "sigil_pod_certificate_trust_bundle_writes",
            "ClusterTrustBundle creations, updates and deletions",
            self.bundle_writes.clone(),
        );
    }
}

/// What the signer shares with the rest of the operator.
#[derive(Clone, Debug)]
pub struct Shared {
    /// The CAs it signs with.
    pub authorities: Arc<Authorities>,
    /// Federated bundles (for the ClusterTrustBundles).
    pub federated: Arc<FederatedBundles>,
    /// Which pod has which identities.
    pub index: EntryIndex,
    /// Whether this replica leads (only the leader writes).
    pub leader: watch::Receiver<bool>,
    /// Time.
    pub clock: SharedClock,
    /// Metrics.
    pub metrics: PodCertificateMetrics,
}

struct Context {
    client: Client,
    shared: Shared,
    policy: Policy,
    store: Store<PodCertificateRequest>,
    /// Keys this replica certified (SHA-256 of the SubjectPublicKeyInfo), claimed before
    /// signing: two requests with one key never both pass, even when they are answered at
    /// once or before the watch shows the first one issued.
    certified: std::sync::Mutex<CertifiedKeys>,
}

/// The last [`CertifiedKeys::CAPACITY`] keys claimed, each with the UID of the request
/// that claimed it, oldest forgotten first.
#[derive(Default)]
struct CertifiedKeys {
    set: std::collections::HashMap<[u8; 32], String>,
    order: std::collections::VecDeque<[u8; 32]>,
}

impl CertifiedKeys {
    /// 32 bytes each: about 3 MiB at most.
    const CAPACITY: usize = 100_000;

    fn hash(spki: &[u8]) -> [u8; 32] {
        use sha2::Digest as _;
        sha2::Sha256::digest(spki).into()
    }

    /// Whether `spki` was claimed by a request other than `uid`.
    fn claimed_by_other(&self, spki: &[u8], uid: &str) -> bool {
        self.set.get(&Self::hash(spki)).is_some_and(|u| u != uid)
    }

    /// Claims `spki` for request `uid` just before it is signed; false when another
    /// request claimed it. The same request may claim again (a retried signature or a
    /// status write that lost a race).
    fn claim(&mut self, spki: &[u8], uid: &str) -> bool {
        let h = Self::hash(spki);
        match self.set.get(&h) {
            Some(u) => return u == uid,
            None => {
                self.set.insert(h, uid.to_owned());
            }
        }
        self.order.push_back(h);
        if self.order.len() > Self::CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("API request for {0}: {1}")]
    Write(String, #[source] kube::Error),
    #[error("sign PodCertificateRequest {0}: {1}")]
    Sign(String, String),
}

/// Runs the signer and the ClusterTrustBundle publisher until `cancel`.
pub async fn run(client: Client, policy: Policy, shared: Shared, cancel: CancellationToken) {
    match served(&client).await {
        Ok(true) => {}
        Ok(false) => {
            warn!(
                "pod certificates: the API server does not serve certificates.k8s.io/v1 \
                 PodCertificateRequests and ClusterTrustBundles (Kubernetes 1.37 or later); \
                 the signer is off. Set podCertificates.enabled=false (--pod-certificates=false) \
                 to silence this"
            );
            return;
        }
        // Discovery failing at start is not a reason to give up for good: the watches
        // retry, and report, on their own.
        Err(e) => warn!(error = %e, "pod certificates: API discovery failed; starting anyway"),
    }
    info!(
        key_types = %policy.key_types.iter().map(|k| k.name()).collect::<Vec<_>>().join(","),
        "pod certificate signer for sigil.dev/* starting"
    );
    let controller = Controller::new(
        Api::<PodCertificateRequest>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(kube::runtime::controller::Config::default().concurrency(4))
    .trigger_backoff(crate::watch_backoff());
    let cx = Arc::new(Context {
        client: client.clone(),
        shared: shared.clone(),
        policy,
        store: controller.store(),
        certified: std::sync::Mutex::default(),
    });
    let stop = cancel.clone();
    let signer = controller
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, cx)
        .for_each(|r| {
            if let Err(e) = r {
                debug!(error = %e, "pod certificate controller");
            }
            futures::future::ready(())
        });
    let publisher = bundles::run(client, shared, cancel);
    tokio::join!(signer, publisher);
}

/// Whether the API server serves the two resources the signer needs.
async fn served(client: &Client) -> Result<bool, kube::Error> {
    let resources = match client
        .list_api_group_resources("certificates.k8s.io/v1")
        .await
    {
        Ok(r) => r.resources,
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(false),
        Err(e) => return Err(e),
    };
    let has = |name: &str| resources.iter().any(|r| r.name == name);
    Ok(has("podcertificaterequests") && has("clustertrustbundles"))
}

fn error_policy(_: Arc<PodCertificateRequest>, e: &Error, _: Arc<Context>) -> Action {
    warn!(error = %e, "pod certificate request: retrying");
    Action::requeue(Duration::from_secs(2))
}

fn terminal(pcr: &PodCertificateRequest) -> bool {
    pcr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| matches!(c.type_.as_str(), ISSUED | DENIED | FAILED))
        })
}

async fn reconcile(pcr: Arc<PodCertificateRequest>, cx: Arc<Context>) -> Result<Action, Error> {
    let Some(td_object) = trust_domain_object(&pcr.spec.signer_name) else {
        return Ok(Action::await_change());
    };
    if terminal(&pcr) {
        return Ok(Action::await_change());
    }
    if !*cx.shared.leader.borrow() || !cx.shared.index.is_synced() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let namespace = pcr.namespace().unwrap_or_default();
    let name = pcr.name_any();
    let uid = pcr.uid().unwrap_or_default();
    let now = cx.shared.clock.now();
    let created = pcr
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(now, system_time);
    let age = now.duration_since(created).unwrap_or_default();
    let authority = cx
        .shared
        .authorities
        .all()
        .into_iter()
        .find(|a| a.object_name == td_object);
    let pod = cx
        .shared
        .index
        .pod_identities(&namespace, &pcr.spec.pod_name);
    let req = Request {
        namespace: &namespace,
        name: &name,
        trust_domain_object: td_object,
        spec: &pcr.spec,
        age,
    };
    let decision = decide::decide(
        &req,
        authority.as_ref().map(|a| &a.trust_domain),
        pod.as_ref(),
        &cx.policy,
        |spki| {
            key_certified(&cx.store, &pcr, spki)
                || cx
                    .certified
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .claimed_by_other(spki, &uid)
        },
    );
    let (status, result, reason) = match decision {
        Decision::Wait { why } => {
            debug!(request = %format!("{namespace}/{name}"), %why, "waiting");
            return Ok(Action::requeue(Duration::from_millis(500)));
        }
        Decision::Deny { reason, .. }
            if reason == decide::reason::UNKNOWN_SIGNER
                && trust_domain_exists(&cx.client, td_object).await? =>
        {
            // Another installation's TrustDomain (see --trust-domain-selector), or one whose
            // CA is not ready: not ours to deny. Its status says what is wrong.
            debug!(request = %format!("{namespace}/{name}"), trust_domain = td_object, "signer of a TrustDomain this replica does not load");
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        Decision::Deny { reason, message } => {
            info!(request = %format!("{namespace}/{name}"), pod = %pcr.spec.pod_name, reason, %message, "pod certificate denied");
            (
                condition_status(DENIED, reason, message, now),
                "denied",
                reason,
            )
        }
        Decision::Issue { spki, .. }
            if !cx
                .certified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .claim(&spki, &uid) =>
        {
            // Another request with this key is being answered, or was, by this replica.
            let reason = decide::reason::KEY_REUSED;
            info!(request = %format!("{namespace}/{name}"), reason, "pod certificate denied");
            (
                condition_status(DENIED, reason, decide::KEY_REUSED_MESSAGE.into(), now),
                "denied",
                reason,
            )
        }
        Decision::Issue {
            entry,
            spki,
            lifetime,
        } => {
            let authority = authority
                .ok_or_else(|| Error::Sign(format!("{namespace}/{name}"), "no authority".into()))?;
            match issue(&authority, &entry, &spki, lifetime, now) {
                Ok(status) => {
                    info!(request = %format!("{namespace}/{name}"), pod = %pcr.spec.pod_name, spiffe_id = %entry.spiffe_id, "pod certificate issued");
                    (status, "issued", "Issued")
                }
                Err(Refusal::Failed(reason, message)) => {
                    warn!(request = %format!("{namespace}/{name}"), reason, %message, "pod certificate failed");
                    (
                        condition_status(FAILED, reason, message, now),
                        "failed",
                        reason,
                    )
                }
                Err(Refusal::Retry(e)) => {
                    return Err(Error::Sign(format!("{namespace}/{name}"), e));
                }
            }
        }
    };
    let mut next = (*pcr).clone();
    next.status = Some(status);
    let api = Api::<PodCertificateRequest>::namespaced(cx.client.clone(), &namespace);
    match api
        .replace_status(&name, &PostParams::default(), &next)
        .await
    {
        Ok(_) => {}
        // Changed meanwhile (another replica answered, or the request was replaced): the
        // watch brings the new version.
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
            return Ok(Action::await_change());
        }
        Err(e) => return Err(Error::Write(format!("{namespace}/{name}"), e)),
    }
    cx.shared
        .metrics
        .requests
        .get_or_create(&OutcomeLabels {
            result: result.into(),
            reason: reason.into(),
        })
        .inc();
    cx.shared.metrics.answer_seconds.observe(age.as_secs_f64());
    Ok(Action::await_change())
}

async fn trust_domain_exists(client: &Client, name: &str) -> Result<bool, Error> {
    Api::<crate::crd::trust_domain::TrustDomain>::all(client.clone())
        .get_opt(name)
        .await
        .map(|o| o.is_some())
        .map_err(|e| Error::Write(format!("TrustDomain {name}"), e))
}

/// Whether `spki` was already certified for another issued request in the namespace.
/// Runs on every look at a pending request, so the issued requests' keys are only read,
/// not verified again (they were when they were answered).
fn key_certified(
    store: &Store<PodCertificateRequest>,
    pcr: &PodCertificateRequest,
    spki: &[u8],
) -> bool {
    let namespace = pcr.namespace();
    store.state().iter().any(|other| {
        other.namespace() == namespace
            && other.name_any() != pcr.name_any()
            && other
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == ISSUED))
            && decide::stub_public_key(&other.spec.stub_pkc_s10_request.0).is_ok_and(|k| k == spki)
    })
}

enum Refusal {
    /// A permanent failure (the `Failed` condition).
    Failed(&'static str, String),
    /// Try again.
    Retry(String),
}

/// Signs and fills the status: the chain, its validity, and `beginRefreshAt` at half-life
/// with jitter (kept at least 10 minutes from either end, as the API requires).
fn issue(
    authority: &DomainAuthority,
    entry: &sigil_identity::entry::RegistrationEntry,
    spki: &[u8],
    lifetime: Duration,
    now: SystemTime,
) -> Result<k8s_openapi::api::certificates::v1::PodCertificateRequestStatus, Refusal> {
    let svid = authority
        .x509_ca
        .sign_public_key(
            spki,
            &SvidTemplate {
                spiffe_id: &entry.spiffe_id,
                ttl: lifetime,
                dns_names: &entry.dns_names,
            },
            now,
        )
        .map_err(|e| Refusal::Retry(e.to_string()))?;
    let (_, not_before, not_after) = sigil_identity::x509::cert_summary(&svid.leaf)
        .ok_or_else(|| Refusal::Retry("the signed leaf does not parse".into()))?;
    let lived = not_after.duration_since(not_before).unwrap_or_default();
    if lived < decide::MIN_LIFETIME {
        return Err(Refusal::Failed(
            "CALifetimeTooShort",
            format!(
                "TrustDomain {}'s CA expires {}s after now, and pod certificates must live at \
                 least 1h; raise the TrustDomain's spec.ca.ttl to at least 6h (its CA signs \
                 until a sixth of its life is left)",
                authority.object_name,
                lived.as_secs()
            ),
        ));
    }
    let begin_refresh = refresh_at(not_before, not_after);
    let chain = sigil_identity::x509::certs_to_pem(&svid.chain());
    Ok(
        k8s_openapi::api::certificates::v1::PodCertificateRequestStatus {
            begin_refresh_at: Some(time(begin_refresh)),
            certificate_chain: Some(chain),
            conditions: Some(vec![Condition {
                type_: ISSUED.into(),
                status: "True".into(),
                reason: "Issued".into(),
                message: format!("X509-SVID {} issued by Sigil", entry.spiffe_id),
                last_transition_time: time(now),
                observed_generation: None,
            }]),
            not_after: Some(time(not_after)),
            not_before: Some(time(not_before)),
        },
    )
}

/// Half-life, moved by up to a twentieth of the lifetime either way so that pods started
/// together do not all come back together, and kept at least 10 minutes after
/// `not_before` and before `not_after`.
fn refresh_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let margin = Duration::from_secs(600);
    let spread = life / 10;
    let spread_ms = u64::try_from(spread.as_millis()).unwrap_or(u64::MAX).max(1);
    let jitter =
        Duration::from_millis(rand_core::RngCore::next_u64(&mut rand_core::OsRng) % spread_ms);
    let at = not_before + life / 2 - life / 20 + jitter;
    let earliest = not_before + margin;
    let latest = not_after.checked_sub(margin).unwrap_or(not_after);
    let at = at.max(earliest).min(latest);
    // Whole seconds: the API's timestamps carry no more.
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn condition_status(
    type_: &str,
    reason: &str,
    message: String,
    now: SystemTime,
) -> k8s_openapi::api::certificates::v1::PodCertificateRequestStatus {
    k8s_openapi::api::certificates::v1::PodCertificateRequestStatus {
        conditions: Some(vec![Condition {
            type_: type_.into(),
            status: "True".into(),
            reason: reason.into(),
            message,
            last_transition_time: time(now),
            observed_generation: None,
        }]),
        ..Default::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_claimed_once_and_the_oldest_claims_are_forgotten_first() {
        let mut keys = CertifiedKeys::default();
        assert!(!keys.claimed_by_other(b"k0", "b"));
        assert!(keys.claim(b"k0", "a"));
        assert!(keys.claimed_by_other(b"k0", "b"));
        assert!(!keys.claimed_by_other(b"k0", "a"));
        assert!(keys.claim(b"k0", "a"), "the same request may claim again");
        assert!(!keys.claim(b"k0", "b"));
        for i in 1..=CertifiedKeys::CAPACITY {
            assert!(keys.claim(format!("k{i}").as_bytes(), "a"));
        }
        assert_eq!(keys.set.len(), CertifiedKeys::CAPACITY);
        assert!(keys.claim(b"k0", "b"), "the oldest claim was forgotten");
        assert!(!keys.claim(b"k2", "b"));
    }

    #[test]
    fn refresh_comes_near_half_life_and_never_within_ten_minutes_of_either_end() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for hours in [1u64, 24] {
            let na = nb + Duration::from_secs(hours * 3600);
            for _ in 0..200 {
                let at = refresh_at(nb, na);
                let since = at.duration_since(nb).unwrap();
                let half = Duration::from_secs(hours * 1800);
                assert!(since >= Duration::from_secs(600));
                assert!(na.duration_since(at).unwrap() >= Duration::from_secs(600));
                assert!(since + Duration::from_secs(hours * 180) + Duration::from_secs(1) >= half);
                assert!(since <= half + Duration::from_secs(hours * 180));
            }
        }
    }
}
