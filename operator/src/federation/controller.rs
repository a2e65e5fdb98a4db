//! The FederatedBundle controller: on the leader, fetches each foreign trust domain's
//! bundle when it is due, keeps the last good one in a ConfigMap owned by the object, and
//! reports what happened in status.
//!
//! One reconcile:
//! 1. check the spec, that no older FederatedBundle names the same trust domain, and that
//!    the trust domain is not one of ours;
//! 2. if the fetch is not due (`status.nextFetch` in the future and the spec unchanged),
//!    requeue for then;
//! 3. fetch (see [`super::fetch`]); on success replace the ConfigMap when the bundle
//!    changed; on failure keep the held bundle untouched;
//! 4. write status and requeue at the bundle's `spiffe_refresh_hint` (or
//!    `spec.refreshInterval`), failure or not.
//!
//! `status.nextFetch` is the schedule, so a new leader picks it up where the old one left.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sigil_identity::clock::SharedClock;
use sigil_identity::x509::rfc3339;
use sigil_identity::{TrustBundle, TrustDomain};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::fetch::{self, FetchError, Profile};
use super::spec::{self, ProfileSpec, Source, Spec, SpecError};
use super::store::FederatedBundles;
use crate::authority::Authorities;
use crate::conditions::{self, condition, k8s_time, system_time, unix};
use crate::crd::federated_bundle::{FederatedBundle, FederatedBundleStatus};
use crate::crd::trust_domain::COMPONENT_LABEL;
use crate::telemetry::{ErrorLabels, FederationMetrics, FetchLabels, TrustDomainLabels};

/// Condition: the last fetch succeeded.
pub const READY: &str = "Ready";
/// Condition: a bundle (fetched or bootstrap) is held and handed to workloads.
pub const BUNDLE_AVAILABLE: &str = "BundleAvailable";
/// Ready reason: the operator lacks the grant to keep the bundle in its ConfigMap.
const CONFIG_MAP_FORBIDDEN: &str = "ConfigMapForbidden";

/// Controller errors (API failures; problems with the object go to its status).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("write conflict on {0}")]
    Conflict(String),
}

pub(crate) struct Context {
    pub(crate) client: Client,
    pub(crate) namespace: String,
    pub(crate) field_manager: String,
    pub(crate) clock: SharedClock,
    pub(crate) leader: watch::Receiver<bool>,
    pub(crate) metrics: FederationMetrics,
    pub(crate) errors: Family<ErrorLabels, Counter>,
    pub(crate) recorder: Recorder,
    pub(crate) store: Store<FederatedBundle>,
    pub(crate) authorities: Arc<Authorities>,
    pub(crate) federated: Arc<FederatedBundles>,
    pub(crate) min_refresh: Duration,
    pub(crate) fetch_timeout: Duration,
    pub(crate) retry: Duration,
}

/// Why there is no way to authenticate the endpoint (reported like a failed fetch).
struct ProfileProblem {
    reason: &'static str,
    message: String,
}

/// What one reconcile found, for status.
enum Outcome {
    /// The spec cannot be used.
    Spec(SpecError),
    /// A fetch happened (or could not be attempted).
    Fetch {
        held: Option<(TrustBundle, Source)>,
        result: Result<(), (&'static str, String)>,
        fetched_at: Option<SystemTime>,
        next: SystemTime,
    },
}

/// The controller's reconcile function.
pub(crate) async fn reconcile(
    obj: Arc<FederatedBundle>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    if !*ctx.leader.borrow() {
        return Ok(Action::await_change());
    }
    let now = ctx.clock.now();
    let spec = match Spec::from_object(&obj) {
        Ok(s) => s,
        Err(e) => {
            ctx.finish(&obj, Outcome::Spec(e), now).await?;
            return Ok(Action::await_change());
        }
    };
    if let Some(owner) = spec::duplicate_owner(&obj, &ctx.store.state()) {
        let problem = SpecError::DuplicateTrustDomain {
            object: spec.object.clone(),
            trust_domain: spec.trust_domain.to_string(),
            owner,
        };
        ctx.finish(&obj, Outcome::Spec(problem), now).await?;
        return Ok(Action::requeue(ctx.retry));
    }
    if ctx.authorities.get(&spec.trust_domain).is_some() {
        let problem = SpecError::LocalTrustDomain {
            object: spec.object.clone(),
            trust_domain: spec.trust_domain.to_string(),
        };
        ctx.finish(&obj, Outcome::Spec(problem), now).await?;
        return Ok(Action::requeue(ctx.retry));
    }

    let status = obj.status.clone().unwrap_or_default();
    let spec_changed = status.observed_generation != obj.metadata.generation;
    let failed_spec = conditions::find(&status.conditions, READY)
        .is_some_and(|(_, reason, _)| is_spec_reason(&reason));
    if !spec_changed
        && !failed_spec
        && let Some(next) = status.next_fetch.as_ref().map(system_time)
        && next > now
    {
        return Ok(requeue(next.duration_since(now).unwrap_or_default()));
    }

    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let cm_name = spec::config_map_name(&spec.object);
    let existing = match cms.get_opt(&cm_name).await {
        Ok(e) => e,
        Err(e) if is_forbidden(&e) => {
            return ctx
                .config_map_forbidden(
                    &obj,
                    &spec,
                    held_without_cm(&spec, &obj),
                    ("read", &cm_name),
                    &e,
                    now,
                )
                .await;
        }
        Err(e) => return Err(e.into()),
    };
    let held = spec::held(&spec, obj.metadata.uid.as_deref(), existing.as_ref());

    let result = match ctx.profile(&spec, held.as_ref().map(|h| &h.0)).await {
        Err(p) => Err((p.reason, p.message)),
        Ok(profile) => {
            let started = Instant::now();
            let fetched =
                fetch::fetch(&spec.url, &profile, &spec.trust_domain, ctx.fetch_timeout).await;
            ctx.metrics
                .fetch_seconds
                .observe(started.elapsed().as_secs_f64());
            fetched
                .map_err(|e: FetchError| (e.reason(), e.to_string()))
                .and_then(|b| match spec::older_than_held(held.as_ref(), &b) {
                    Some((held_seq, fetched_seq)) => Err((
                        "StaleBundle",
                        format!(
                            "{} served spiffe_sequence {fetched_seq}, older than the {held_seq} held; the newer bundle is kept until the endpoint serves it again",
                            spec.url
                        ),
                    )),
                    None => Ok(b),
                })
        }
    };
    ctx.metrics
        .fetches
        .get_or_create(&FetchLabels {
            trust_domain: spec.trust_domain.to_string(),
            result: match &result {
                Ok(_) => "ok".into(),
                Err((reason, _)) => (*reason).into(),
            },
        })
        .inc();

    let outcome = match result {
        Ok(bundle) => {
            let changed = held
                .as_ref()
                .is_none_or(|(h, source)| *source == Source::Bootstrap || *h != bundle);
            info!(
                federated_bundle = %spec.object,
                trust_domain = %spec.trust_domain,
                url = %spec.url,
                sequence = ?bundle.sequence,
                x509_authorities = bundle.x509_authorities.len(),
                jwt_authorities = bundle.jwt_authorities.len(),
                changed,
                "fetched bundle"
            );
            if changed {
                let verb = if existing.is_some() {
                    "update"
                } else {
                    "create"
                };
                match ctx
                    .write_config_map(&obj, &spec, &bundle, existing, now)
                    .await
                {
                    Err(Error::Kube(e)) if is_forbidden(&e) => {
                        return ctx
                            .config_map_forbidden(
                                &obj,
                                &spec,
                                held.clone(),
                                (verb, &cm_name),
                                &e,
                                now,
                            )
                            .await;
                    }
                    r => r?,
                }
                let before = held.as_ref().map(|h| &h.0);
                let note = describe_change(before, &bundle, &spec.url);
                ctx.event(&obj, EventType::Normal, "BundleUpdated", &note)
                    .await;
            }
            ctx.metrics
                .last_success
                .get_or_create(&TrustDomainLabels {
                    trust_domain: spec.trust_domain.to_string(),
                })
                .set(unix(now));
            let next = now + spec::refresh_after(Some(&bundle), &spec, ctx.min_refresh);
            Outcome::Fetch {
                held: Some((bundle, Source::Fetched)),
                result: Ok(()),
                fetched_at: Some(now),
                next,
            }
        }
        Err((reason, message)) => {
            warn!(
                federated_bundle = %spec.object,
                trust_domain = %spec.trust_domain,
                url = %spec.url,
                reason,
                error = %message,
                keeps_bundle = held.is_some(),
                "bundle fetch failed; keeping the bundle held"
            );
            let next =
                now + spec::refresh_after(held.as_ref().map(|h| &h.0), &spec, ctx.min_refresh);
            Outcome::Fetch {
                held,
                result: Err((reason, message)),
                fetched_at: None,
                next,
            }
        }
    };
    let next = match &outcome {
        Outcome::Fetch { next, .. } => *next,
        Outcome::Spec(_) => now + ctx.retry,
    };
    ctx.finish(&obj, outcome, now).await?;
    Ok(requeue(next.duration_since(now).unwrap_or_default()))
}

/// What is held when the ConfigMap cannot be read: the bootstrap bundle, if any.
fn held_without_cm(spec: &Spec, obj: &FederatedBundle) -> Option<(TrustBundle, Source)> {
    spec::held(spec, obj.metadata.uid.as_deref(), None)
}

fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

fn requeue(after: Duration) -> Action {
    // Status is written at second precision: never requeue sooner than it can show.
    Action::requeue(after.max(Duration::from_millis(500)))
}

fn is_spec_reason(reason: &str) -> bool {
    matches!(
        reason,
        "InvalidTrustDomain"
            | "InvalidBundleEndpointURL"
            | "InvalidEndpointSPIFFEID"
            | "InvalidBootstrapBundle"
            | "InvalidRefreshInterval"
            | "DuplicateTrustDomain"
            | "LocalTrustDomain"
    )
}

/// The controller's error policy: log, retry.
pub(crate) fn error_policy(obj: Arc<FederatedBundle>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.count_problem(match err {
        Error::Conflict(_) => "Conflict",
        Error::Kube(_) => "APIError",
    });
    match err {
        Error::Conflict(_) => Action::requeue(Duration::from_millis(200)),
        Error::Kube(_) => {
            warn!(federated_bundle = %obj.name_any(), error = %err, "reconcile failed; retrying");
            Action::requeue(ctx.retry.min(Duration::from_secs(10)))
        }
    }
}

fn describe_change(before: Option<&TrustBundle>, after: &TrustBundle, url: &str) -> String {
    let keys = |b: &TrustBundle| b.x509_authorities.len() + b.jwt_authorities.len();
    match before {
        None => format!(
            "fetched the first bundle of {} from {url}: sequence {}, {} keys",
            after.trust_domain,
            after.sequence.map_or("none".into(), |s| s.to_string()),
            keys(after)
        ),
        Some(b) => {
            let added_x509 = after
                .x509_authorities
                .iter()
                .filter(|k| !b.x509_authorities.contains(k))
                .count();
            let removed_x509 = b
                .x509_authorities
                .iter()
                .filter(|k| !after.x509_authorities.contains(k))
                .count();
            let added_jwt = after
                .jwt_authorities
                .iter()
                .filter(|k| !b.jwt_authorities.contains(k))
                .count();
            let removed_jwt = b
                .jwt_authorities
                .iter()
                .filter(|k| !after.jwt_authorities.contains(k))
                .count();
            format!(
                "bundle of {} changed (sequence {} -> {}): X.509 authorities +{added_x509} -{removed_x509}, JWT keys +{added_jwt} -{removed_jwt}",
                after.trust_domain,
                b.sequence.map_or("none".into(), |s| s.to_string()),
                after.sequence.map_or("none".into(), |s| s.to_string()),
            )
        }
    }
}

impl Context {
    /// How to authenticate the endpoint now.
    async fn profile(
        &self,
        spec: &Spec,
        held: Option<&TrustBundle>,
    ) -> Result<Profile, ProfileProblem> {
        match &spec.profile {
            ProfileSpec::Web { ca: None } => Ok(Profile::Web(fetch::system_roots())),
            ProfileSpec::Web { ca: Some(r) } => {
                let ns = r
                    .namespace
                    .clone()
                    .unwrap_or_else(|| self.namespace.clone());
                let field = "spec.bundleEndpointProfile.caBundleSecretRef";
                let secret = Api::<Secret>::namespaced(self.client.clone(), &ns)
                    .get_opt(&r.name)
                    .await
                    .map_err(|e| ProfileProblem {
                        reason: "CABundleSecretUnreadable",
                        message: format!("{field}: cannot read Secret {ns}/{}: {e}; grant the operator get on it, or put it in the operator's namespace", r.name),
                    })?
                    .ok_or_else(|| ProfileProblem {
                        reason: "CABundleSecretNotFound",
                        message: format!("{field}: Secret {ns}/{} does not exist; create it with the CA certificates under key {:?}", r.name, r.key),
                    })?;
                let pem = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .and_then(|v| String::from_utf8(v.0.clone()).ok())
                    .ok_or_else(|| ProfileProblem {
                        reason: "CABundleInvalid",
                        message: format!(
                            "{field}: Secret {ns}/{} has no key {:?} with PEM text",
                            r.name, r.key
                        ),
                    })?;
                let roots = fetch::roots_from_pem(&pem).map_err(|e| ProfileProblem {
                    reason: "CABundleInvalid",
                    message: format!("{field}: Secret {ns}/{} key {:?}: {e}", r.name, r.key),
                })?;
                if roots.is_empty() {
                    return Err(ProfileProblem {
                        reason: "CABundleInvalid",
                        message: format!(
                            "{field}: Secret {ns}/{} key {:?} holds no certificate",
                            r.name, r.key
                        ),
                    });
                }
                Ok(Profile::Web(roots))
            }
            ProfileSpec::Spiffe { id } => {
                let td = id.trust_domain();
                let trust = if td == &spec.trust_domain {
                    held.cloned()
                } else {
                    self.bundle_of(td)
                };
                let trust = trust.ok_or_else(|| ProfileProblem {
                    reason: "NoBundle",
                    message: if td == &spec.trust_domain {
                        format!("no bundle of {td} is held to authenticate the https_spiffe endpoint {id}: set spec.trustDomainBundle to {td}'s bundle (for SPIRE: spire-server bundle show -format spiffe)")
                    } else {
                        format!("the endpoint's SPIFFE ID {id} is in {td}, and no bundle of {td} is known: create a TrustDomain or a FederatedBundle for {td}")
                    },
                })?;
                Ok(Profile::Spiffe {
                    id: id.clone(),
                    trust,
                })
            }
        }
    }

    fn bundle_of(&self, td: &TrustDomain) -> Option<TrustBundle> {
        self.authorities
            .get(td)
            .map(|a| a.bundle.clone())
            .or_else(|| self.federated.get(td))
    }

    async fn write_config_map(
        &self,
        obj: &FederatedBundle,
        spec: &Spec,
        bundle: &TrustBundle,
        existing: Option<ConfigMap>,
        now: SystemTime,
    ) -> Result<(), Error> {
        let name = spec::config_map_name(&spec.object);
        let mut cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some([(COMPONENT_LABEL.to_owned(), spec::COMPONENT.to_owned())].into()),
                annotations: Some(
                    [
                        (
                            spec::BOOTSTRAP_HASH_ANNOTATION.to_owned(),
                            spec.bootstrap_hash.clone(),
                        ),
                        (spec::FETCHED_AT_ANNOTATION.to_owned(), rfc3339(unix(now))),
                    ]
                    .into(),
                ),
                owner_references: obj.controller_owner_ref(&()).map(|o| vec![o]),
                ..Default::default()
            },
            data: Some(
                [
                    (
                        spec::CM_TRUST_DOMAIN.to_owned(),
                        spec.trust_domain.to_string(),
                    ),
                    (spec::CM_BUNDLE.to_owned(), bundle.to_jwks_json()),
                ]
                .into(),
            ),
            ..Default::default()
        };
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let written = match existing {
            None => api.create(&PostParams::default(), &cm).await,
            Some(old) => {
                cm.metadata.resource_version = old.resource_version();
                api.replace(&name, &PostParams::default(), &cm).await
            }
        };
        match written {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Conflict(format!(
                "ConfigMap {}/{name}",
                self.namespace
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes status (when it changed) and emits an Event when Ready changes.
    async fn finish(
        &self,
        obj: &FederatedBundle,
        outcome: Outcome,
        now: SystemTime,
    ) -> Result<(), Error> {
        if let Outcome::Spec(e) = &outcome {
            self.count_problem(e.reason());
        }
        let old = obj.status.clone().unwrap_or_default();
        let status = build_status(&old, obj.metadata.generation, &outcome, now);
        let before = conditions::find(&old.conditions, READY);
        let after = conditions::find(&status.conditions, READY);
        if before != after
            && let Some((st, reason, message)) = &after
        {
            if st == "False" {
                if let Outcome::Spec(e) = &outcome {
                    warn!(federated_bundle = %obj.name_any(), reason = %reason, "{e}");
                }
                self.event(obj, EventType::Warning, reason, message).await;
            } else if before.as_ref().is_some_and(|b| b.0 == "False") {
                self.event(obj, EventType::Normal, "Ready", message).await;
            }
        }
        if status != old {
            let api: Api<FederatedBundle> = Api::all(self.client.clone());
            let patch = serde_json::json!({
                "apiVersion": "sigil.dev/v1alpha1",
                "kind": "FederatedBundle",
                "status": status,
            });
            api.patch_status(
                &obj.name_any(),
                &PatchParams::apply(&self.field_manager).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        }
        Ok(())
    }

    /// The operator may not keep the bundle in its ConfigMap: say so on the object (the
    /// bundle held so far, if any, stays with agents) and retry.
    async fn config_map_forbidden(
        &self,
        obj: &FederatedBundle,
        spec: &Spec,
        held: Option<(TrustBundle, Source)>,
        (verb, name): (&str, &str),
        e: &kube::Error,
        now: SystemTime,
    ) -> Result<Action, Error> {
        let ns = &self.namespace;
        let message = format!(
            "the operator cannot {verb} ConfigMap {ns}/{name}, where it keeps the fetched bundle ({e}); grant its ServiceAccount get, create and update on configmaps in namespace {ns} (the chart's Role does)"
        );
        self.count_problem(CONFIG_MAP_FORBIDDEN);
        warn!(federated_bundle = %spec.object, "{message}");
        let outcome = Outcome::Fetch {
            held,
            result: Err((CONFIG_MAP_FORBIDDEN, message)),
            fetched_at: None,
            next: now + self.retry,
        };
        self.finish(obj, outcome, now).await?;
        Ok(requeue(self.retry))
    }

    fn count_problem(&self, reason: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                controller: "federated_bundle".into(),
                reason: reason.into(),
            })
            .inc();
    }

    async fn event(&self, obj: &FederatedBundle, type_: EventType, reason: &str, note: &str) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: "Fetch".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(federated_bundle = %obj.name_any(), error = %e, "cannot publish Event");
        }
    }
}

/// The status for an outcome, keeping what is still true from `old`.
fn build_status(
    old: &FederatedBundleStatus,
    generation: Option<i64>,
    outcome: &Outcome,
    now: SystemTime,
) -> FederatedBundleStatus {
    let mut status = old.clone();
    status.observed_generation = generation;
    let t = k8s_time(now);
    let (ready, available) = match outcome {
        Outcome::Spec(e) => {
            status.next_fetch = None;
            status.last_error = Some(e.to_string());
            let available = match old.sequence.is_some() || old.keys.is_some() {
                true => (
                    true,
                    "Kept".to_owned(),
                    "the bundle held before the spec problem is still handed out".to_owned(),
                ),
                false => (false, e.reason().to_owned(), e.to_string()),
            };
            ((false, e.reason().to_owned(), e.to_string()), available)
        }
        Outcome::Fetch {
            held,
            result,
            fetched_at,
            next,
        } => {
            status.next_fetch = Some(k8s_time(*next));
            if let Some(at) = fetched_at {
                status.last_fetch = Some(k8s_time(*at));
            }
            match held {
                Some((b, _)) => {
                    status.sequence = b.sequence.map(|s| s as i64);
                    status.keys = Some((b.x509_authorities.len() + b.jwt_authorities.len()) as i32);
                }
                None => {
                    status.sequence = None;
                    status.keys = None;
                }
            }
            let next_text = rfc3339(unix(*next));
            let ready = match result {
                Ok(()) => {
                    status.last_error = None;
                    (
                        true,
                        "Fetched".to_owned(),
                        format!("fetched the bundle; next fetch at {next_text}"),
                    )
                }
                Err((reason, message)) => {
                    status.last_error = Some(message.clone());
                    (
                        false,
                        (*reason).to_owned(),
                        format!("{message}; retrying at {next_text}"),
                    )
                }
            };
            let available = match held {
                Some((b, source)) => {
                    let keys = b.x509_authorities.len() + b.jwt_authorities.len();
                    match source {
                        Source::Fetched => (true, "Fetched".to_owned(), format!("workloads that federate with {} get the fetched bundle ({keys} keys)", b.trust_domain)),
                        Source::Bootstrap => (true, "Bootstrap".to_owned(), format!("workloads that federate with {} get the bootstrap bundle from spec.trustDomainBundle ({keys} keys) until a fetch succeeds", b.trust_domain)),
                    }
                }
                None => (false, "NoBundle".to_owned(), "no bundle is held yet: workloads get none for this trust domain until a fetch succeeds".to_owned()),
            };
            (ready, available)
        }
    };
    let ready = condition(&old.conditions, READY, ready, generation, &t);
    let stalled = sigil_api::crd::stalled(&ready);
    status.conditions = vec![
        ready,
        condition(&old.conditions, BUNDLE_AVAILABLE, available, generation, &t),
        stalled,
    ];
    status
}
