//! The TrustDomain controller: on the leader, brings each TrustDomain's CA Secret, bundle
//! ConfigMaps and status to where the spec and the clock say they should be.
//!
//! One reconcile, in order:
//! 1. check the spec ([`Policy`]) and that no older TrustDomain owns the same name;
//! 2. load the CA Secret (a Secret that cannot be read is reported and left untouched);
//! 3. load the upstream CA, if configured (a broken one is reported; the active CA keeps
//!    signing);
//! 4. advance the rotation state machine to the injected clock's `now`;
//! 5. persist the state (create, or replace at the read resourceVersion, so a stale
//!    leader can never overwrite a newer state or mint a second root);
//! 6. publish the bundle ConfigMaps, write status, emit Events for transitions and for
//!    newly detected problems;
//! 7. requeue exactly when the next transition is due (sooner while a problem persists).
//!
//! Replicas that are not the leader return at once: their [`super::loader`] keeps them
//! able to sign.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use sigil_identity::clock::SharedClock;
use sigil_identity::x509::rfc3339;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::cert_manager::{self, CERTIFICATE_REQUEST};
use super::error::Error;
use super::policy::{Policy, duplicate_owner};
use super::publisher::{self, Published};
use super::rotation::{AuthorityState, CaSource, Generation, KeyKind, Transition};
use super::store::{self, ca_secret_name};
use super::upstream;
use crate::conditions::{condition, k8s_time, unix};
use crate::crd::trust_domain::{CaStatus, TrustDomain as TrustDomainObject, TrustDomainStatus};
use crate::telemetry::{ErrorLabels, RotationLabels, TrustDomainMetrics};
use sigil_identity::key_manager::KeyReference;

/// Longest requeue: even with nothing due, look again this often.
const MAX_REQUEUE: Duration = Duration::from_secs(3600);
/// How often an upstream CA is re-read (it may be renewed or revoked behind our back).
const UPSTREAM_RECHECK: Duration = Duration::from_secs(300);

/// Condition types.
pub const READY: &str = "Ready";
/// Condition types.
pub const ISSUING: &str = "Issuing";

pub(crate) struct Context {
    pub(crate) client: Client,
    pub(crate) namespace: String,
    pub(crate) field_manager: String,
    pub(crate) clock: SharedClock,
    pub(crate) leader: watch::Receiver<bool>,
    pub(crate) metrics: TrustDomainMetrics,
    pub(crate) recorder: Recorder,
    pub(crate) store: Store<TrustDomainObject>,
    pub(crate) retry: Duration,
    pub(crate) keys: crate::keys::Keys,
}

/// The controller's reconcile function.
pub(crate) async fn reconcile(
    obj: Arc<TrustDomainObject>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    if !*ctx.leader.borrow() {
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let result = reconcile_as_leader(&obj, &ctx).await;
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    result
}

/// The controller's error policy: count, log, retry (conflicts at once).
pub(crate) fn error_policy(obj: Arc<TrustDomainObject>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            controller: "trust_domain".into(),
            reason: err.metric_label().into(),
        })
        .inc();
    match err {
        Error::Conflict(_) => {
            debug!(trust_domain_object = %obj.name_any(), error = %err, "write conflict; retrying");
            Action::requeue(Duration::from_millis(200))
        }
        _ => {
            warn!(trust_domain_object = %obj.name_any(), error = %err, "reconcile failed; retrying");
            Action::requeue(ctx.retry.min(Duration::from_secs(10)))
        }
    }
}

/// What one reconcile found, for status.
struct Outcome<'a> {
    state: Option<&'a AuthorityState>,
    problems: Vec<Error>,
    published: Option<Published>,
    now: SystemTime,
    /// The `CertificateRequest` condition: `Some(None)` keeps the current one, `None`
    /// removes it (no cert-manager upstream).
    request: Option<Option<(bool, String, String)>>,
}

async fn reconcile_as_leader(obj: &Arc<TrustDomainObject>, ctx: &Context) -> Result<Action, Error> {
    let object = obj.name_any();
    let now = ctx.clock.now();

    let mut policy = match Policy::from_spec(&object, &obj.spec) {
        Ok(p) => p.with_keys(ctx.keys.clone()),
        Err(problem) => {
            ctx.finish_with(obj, problem, now).await?;
            // Only a spec change can fix it, and that triggers a reconcile.
            return Ok(Action::await_change());
        }
    };
    if let Some(u) = policy.upstream.as_mut() {
        u.namespace.get_or_insert_with(|| ctx.namespace.clone());
    }
    if let Some(owner) = duplicate_owner(obj, &ctx.store.state()) {
        let problem = Error::DuplicateTrustDomain {
            object: object.clone(),
            trust_domain: policy.trust_domain.to_string(),
            owner,
        };
        ctx.finish_with(obj, problem, now).await?;
        // The owner may be deleted; look again.
        return Ok(Action::requeue(ctx.retry));
    }

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let secret_name = ca_secret_name(&object);
    let existing = secrets.get_opt(&secret_name).await?;
    let loaded = match existing.clone() {
        None => Ok(AuthorityState::new(policy.trust_domain.clone())),
        // An HSM's keys are looked up in the token: a blocking call.
        Some(s) => {
            let (td, keys) = (policy.trust_domain.clone(), policy.keys.clone());
            tokio::task::spawn_blocking(move || store::from_secret(&s, &td, &*keys))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        }
    };
    let mut state = match loaded {
        Ok(state) => state,
        Err(e) => {
            let problem = match e {
                store::LoadFailure::Invalid(e) => Error::CaSecretInvalid {
                    object: object.clone(),
                    namespace: ctx.namespace.clone(),
                    name: secret_name,
                    reason: e.0,
                },
                store::LoadFailure::KeysUnavailable(e) => Error::KeysUnavailable {
                    object: object.clone(),
                    key_manager: ctx.keys.name().to_owned(),
                    reason: e.0,
                },
            };
            ctx.finish_with(obj, problem, now).await?;
            return Ok(Action::requeue(ctx.retry));
        }
    };
    if existing.is_some()
        && state.x509.active.is_none()
        && obj.status.as_ref().is_some_and(|s| s.active_ca.is_some())
    {
        warn!(trust_domain_object = %object, "CA Secret holds no active CA although one was reported before");
    }

    let upstream = match &policy.upstream {
        None => None,
        Some(r) => {
            let ns = r.namespace.clone().unwrap_or_else(|| ctx.namespace.clone());
            match Api::<Secret>::namespaced(ctx.client.clone(), &ns)
                .get_opt(&r.name)
                .await
            {
                Ok(secret) => Some(upstream::load(
                    &object,
                    r,
                    &ns,
                    secret.as_ref(),
                    now,
                    policy.ca_ttl,
                )),
                Err(kube::Error::Api(s)) if s.code == 403 => {
                    Some(Err(Error::UpstreamSecretForbidden {
                        object: object.clone(),
                        namespace: ns,
                        name: r.name.clone(),
                    }))
                }
                Err(e) => return Err(e.into()),
            }
        }
    };

    // The keys the stored state holds: those that leave it are destroyed once the new
    // state is written, those that join it when it cannot be.
    let held_before = store::key_references(&state);

    // With a cert-manager upstream, the CA comes from a CertificateRequest: send or read
    // it first; a signed one is installed by the rotation below.
    let mut request = match &policy.cert_manager {
        Some(_) => Some(
            cert_manager::drive(
                &ctx.client,
                &ctx.namespace,
                obj,
                &policy,
                &mut state,
                now,
                ctx.retry,
            )
            .await?,
        ),
        None => None,
    };
    // No longer signed through cert-manager: a key kept for a request is of no use.
    let dropped_request = policy.cert_manager.is_none() && state.pending_request.take().is_some();
    let requested_ca = request.as_mut().map(|r| r.ca.take());

    // Minting a CA or JWT key can take seconds (an RSA-4096 prime search): off the async
    // runtime, which serves the Node API and the other reconciles meanwhile.
    let for_keys = policy.clone();
    let (state, advance, upstream) = tokio::task::spawn_blocking(move || {
        let source = match (requested_ca, upstream.as_ref()) {
            (Some(ca), _) => CaSource::Requested(ca),
            (None, None) => CaSource::SelfSigned,
            (None, Some(u)) => CaSource::Upstream(u.as_ref()),
        };
        let advance = state.advance_with(now, &for_keys, source);
        (state, advance, upstream)
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let created_secret = existing.is_none();
    let adopt = existing.as_ref().is_some_and(|s| {
        !s.owner_references()
            .iter()
            .any(|o| Some(&o.uid) == obj.metadata.uid.as_ref())
    });
    // A new trust domain without an X.509 CA (its upstream is broken) persists nothing:
    // there is nothing to keep yet.
    let worth_persisting =
        existing.is_some() || state.x509.active.is_some() || state.pending_request.is_some();
    let held_after = store::key_references(&state);
    if !worth_persisting {
        // Nothing is written, so keys minted now (a JWT key beside a broken upstream)
        // would be orphans in a key manager.
        destroy_keys(&policy, held_after.difference(&held_before).cloned()).await;
    }
    let request_changed = dropped_request || request.as_ref().is_some_and(|r| r.changed);
    if (advance.changed() || adopt || request_changed) && worth_persisting {
        let mut desired =
            store::new_secret(obj, &ctx.namespace, &state).map_err(|e| Error::Serialize {
                what: "CA state",
                reason: e.to_string(),
            })?;
        let written = match &existing {
            None => secrets.create(&PostParams::default(), &desired).await,
            Some(s) => {
                desired.metadata.resource_version = s.resource_version();
                secrets
                    .replace(&secret_name, &PostParams::default(), &desired)
                    .await
            }
        };
        match written {
            Ok(_) => {
                // Retired keys are gone from the Secret: a key manager drops them too.
                destroy_keys(&policy, held_before.difference(&held_after).cloned()).await;
            }
            Err(e) => {
                // Keys minted for a state that was not written would be orphans.
                destroy_keys(&policy, held_after.difference(&held_before).cloned()).await;
                return Err(match e {
                    kube::Error::Api(s) if s.code == 409 => {
                        Error::Conflict(format!("Secret {}/{secret_name}", ctx.namespace))
                    }
                    e => e.into(),
                });
            }
        }
        if adopt {
            info!(trust_domain_object = %object, secret = %secret_name, "adopted existing CA Secret");
        }
        if created_secret {
            info!(trust_domain_object = %object, secret = %secret_name, "created CA Secret");
        }
        for t in &advance.transitions {
            ctx.announce(obj, &policy, &state, t).await;
        }
        if let Some(note) = request.as_ref().and_then(|r| r.sent.as_deref()) {
            ctx.event(
                obj,
                EventType::Normal,
                "CertificateRequestSent",
                note,
                "Rotate",
            )
            .await;
        }
    }

    let mut problems = Vec::new();
    let upstream_ok = match upstream {
        Some(Ok(u)) => Some(u),
        Some(Err(e)) => {
            problems.push(e);
            None
        }
        None => None,
    };
    let mut request_condition = None;
    let mut request_recheck = None;
    if let Some(r) = request {
        problems.extend(r.problem);
        request_condition = r.condition;
        request_recheck = r.recheck;
    }
    problems.extend(advance.x509_error);
    problems.extend(advance.jwt_error);

    let bundle = state.bundle(Some(policy.refresh_hint));
    let published = if bundle.x509_authorities.is_empty() {
        None
    } else {
        let p = publisher::publish(&ctx.client, obj, &policy, &bundle).await?;
        if !p.conflicts.is_empty() {
            problems.push(Error::BundleConfigMapConflict {
                object: object.clone(),
                name: policy.config_map_name.clone(),
                namespaces: p.conflicts.join(", "),
            });
        }
        Some(p)
    };

    let due = if policy.cert_manager.is_some() {
        state.next_due_requested(&policy)
    } else {
        state.next_due(&policy, upstream_ok.as_ref())
    };
    let has_problems = !problems.is_empty();
    ctx.finish(
        obj,
        Outcome {
            state: Some(&state),
            problems,
            published,
            now,
            request: policy.cert_manager.as_ref().map(|_| request_condition),
        },
    )
    .await?;

    let mut after = due
        .map(|d| d.duration_since(now).unwrap_or_default())
        .unwrap_or(MAX_REQUEUE);
    if has_problems {
        after = after.min(ctx.retry);
    }
    if policy.upstream.is_some() || policy.cert_manager.is_some() {
        after = after.min(UPSTREAM_RECHECK);
    }
    if let Some(r) = request_recheck {
        after = after.min(r);
    }
    Ok(Action::requeue(
        after.clamp(Duration::from_secs(1), MAX_REQUEUE),
    ))
}

/// Destroys keys no stored state names any more (a key manager's; software keys have no
/// references). A failure is logged: the key is then only an unused object in the HSM.
async fn destroy_keys(policy: &Policy, refs: impl Iterator<Item = KeyReference>) {
    let refs: Vec<_> = refs.collect();
    if refs.is_empty() {
        return;
    }
    let keys = policy.keys.clone();
    let object = policy.object.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for r in refs {
            match keys.destroy(&r) {
                Ok(()) => info!(trust_domain_object = %object, key = %r, "destroyed a key no CA or JWT generation uses"),
                Err(e) => warn!(trust_domain_object = %object, key = %r, error = %e, "cannot destroy an unused key"),
            }
        }
    })
    .await;
}

fn ca_status<K: Generation>(k: &K) -> CaStatus {
    CaStatus {
        serial: k.id().to_owned(),
        not_before: k8s_time(k.not_before()),
        not_after: k8s_time(k.not_after()),
    }
}

/// Builds the status for an outcome, keeping what is still true from `old`.
fn build_status(
    old: &TrustDomainStatus,
    generation: Option<i64>,
    secret: &str,
    o: &Outcome<'_>,
) -> TrustDomainStatus {
    let mut status = old.clone();
    status.observed_generation = generation;
    if let Some(state) = o.state {
        status.active_ca = state.x509.active.as_ref().map(|s| ca_status(&*s.key));
        status.prepared_ca = state.x509.prepared.as_ref().map(|s| ca_status(&*s.key));
        status.active_jwt_key_id = state
            .jwt
            .active
            .as_ref()
            .map(|s| s.key.key.kid().to_owned());
        status.prepared_jwt_key_id = state
            .jwt
            .prepared
            .as_ref()
            .map(|s| s.key.key.kid().to_owned());
        let has_any = state.x509.active.is_some() || !state.x509.retired.is_empty();
        status.bundle_sequence = has_any.then_some(state.sequence as i64);
        status.ca_secret = has_any.then(|| secret.to_owned());
    }
    if let Some(p) = &o.published {
        status.bundle_namespaces = Some(p.namespaces as i32);
    }
    let signing = o.state.and_then(|s| s.signing_ca(o.now));
    let first_reason = o.problems.first().and_then(Error::condition_reason);
    let problem_text = o
        .problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let ready = match (first_reason, signing) {
        (Some(reason), _) => (false, reason.to_owned(), problem_text.clone()),
        (None, Some(ca)) => (
            true,
            "BundlePublished".to_owned(),
            format!(
                "CA {} signs until {}; bundle sequence {} is published in {} namespace(s)",
                ca.serial(),
                rfc3339(unix(ca.not_after())),
                status.bundle_sequence.unwrap_or_default(),
                status.bundle_namespaces.unwrap_or_default()
            ),
        ),
        (None, None) => (
            false,
            "NoActiveCA".to_owned(),
            "no CA is active yet".to_owned(),
        ),
    };
    let issuing = match (signing, o.state) {
        (Some(ca), Some(state)) => {
            let kid = state
                .signing_jwt_key(o.now)
                .map(|k| k.key.kid().to_owned())
                .unwrap_or_default();
            let mut msg = format!(
                "CA {} signs X509-SVIDs until {}; JWT key {kid} signs JWT-SVIDs",
                ca.serial(),
                rfc3339(unix(ca.not_after()))
            );
            if first_reason.is_some() {
                msg.push_str("; it keeps signing while the problem in condition Ready is fixed");
            }
            (true, "ActiveCA".to_owned(), msg)
        }
        _ => (
            false,
            first_reason.unwrap_or("NoActiveCA").to_owned(),
            if problem_text.is_empty() {
                "no CA is active".to_owned()
            } else {
                problem_text
            },
        ),
    };
    let now = k8s_time(o.now);
    let ready = condition(&old.conditions, READY, ready, generation, &now);
    let stalled = sigil_api::crd::stalled(&ready);
    status.conditions = vec![
        ready,
        condition(&old.conditions, ISSUING, issuing, generation, &now),
        stalled,
    ];
    let kept_request = || {
        crate::conditions::find(&old.conditions, CERTIFICATE_REQUEST)
            .map(|(st, reason, message)| (st == "True", reason, message))
    };
    if let Some(request) = o.request.clone().and_then(|r| r.or_else(kept_request)) {
        status.conditions.push(condition(
            &old.conditions,
            CERTIFICATE_REQUEST,
            request,
            generation,
            &now,
        ));
    }
    status
}

impl Context {
    /// Writes status (when it changed), counts problems and emits a Warning Event for
    /// each newly detected one.
    /// [`Context::finish`] for a reconcile that stopped at `problem` with no state.
    async fn finish_with(
        &self,
        obj: &TrustDomainObject,
        problem: Error,
        now: SystemTime,
    ) -> Result<(), Error> {
        let outcome = Outcome {
            state: None,
            problems: vec![problem],
            published: None,
            now,
            request: None,
        };
        self.finish(obj, outcome).await
    }

    async fn finish(&self, obj: &TrustDomainObject, outcome: Outcome<'_>) -> Result<(), Error> {
        let object = obj.name_any();
        for p in &outcome.problems {
            self.metrics
                .reconcile_errors
                .get_or_create(&ErrorLabels {
                    controller: "trust_domain".into(),
                    reason: p.metric_label().into(),
                })
                .inc();
        }
        let old = obj.status.clone().unwrap_or_default();
        let secret = format!("{}/{}", self.namespace, ca_secret_name(&object));
        let status = build_status(&old, obj.metadata.generation, &secret, &outcome);
        let ready = |s: &TrustDomainStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == READY)
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        };
        let (before, after) = (ready(&old), ready(&status));
        if before != after
            && let Some((st, reason, message)) = &after
        {
            if st == "False" {
                warn!(trust_domain_object = %object, reason = %reason, "{message}");
                self.event(obj, EventType::Warning, reason, message, "Reconcile")
                    .await;
            } else if before.as_ref().is_some_and(|b| b.0 == "False") {
                self.event(obj, EventType::Normal, "Ready", message, "Reconcile")
                    .await;
            }
        }
        if status != old {
            let api: Api<TrustDomainObject> = Api::all(self.client.clone());
            let patch = serde_json::json!({
                "apiVersion": "sigil.dev/v1alpha1",
                "kind": "TrustDomain",
                "status": status,
            });
            api.patch_status(
                &object,
                &PatchParams::apply(&self.field_manager).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        }
        Ok(())
    }

    /// Logs, counts and publishes one transition.
    async fn announce(
        &self,
        obj: &TrustDomainObject,
        policy: &Policy,
        state: &AuthorityState,
        t: &Transition,
    ) {
        let (kind, transition, id) = match t {
            Transition::Minted { kind, id } => (*kind, "minted", id),
            Transition::Prepared { kind, id } => (*kind, "prepared", id),
            Transition::Activated { kind, id, .. } => (*kind, "activated", id),
            Transition::Dropped { kind, id } => (*kind, "dropped", id),
            Transition::Discarded { kind, id } => (*kind, "discarded", id),
        };
        self.metrics
            .rotations
            .get_or_create(&RotationLabels {
                trust_domain: policy.trust_domain.to_string(),
                kind: kind.label().into(),
                transition: transition.into(),
            })
            .inc();
        let what = match kind {
            KeyKind::X509 => "CA",
            KeyKind::Jwt => "JWTKey",
        };
        let (reason, note) = match t {
            Transition::Minted { .. } => (
                format!("{what}Created"),
                format!("created {what} {id}; it signs from now on"),
            ),
            Transition::Prepared { .. } => (
                format!("{what}Prepared"),
                format!(
                    "prepared {what} {id} and published it in the trust bundle (sequence {}); it signs after the activation delay",
                    state.sequence
                ),
            ),
            Transition::Activated { replaced, .. } => (
                format!("{what}Activated"),
                format!(
                    "{what} {id} signs from now on{}",
                    replaced
                        .as_ref()
                        .map(|r| format!(
                            "; {r} is retired and stays in the bundle until it expires"
                        ))
                        .unwrap_or_default()
                ),
            ),
            Transition::Dropped { .. } => (
                format!("{what}Expired"),
                format!("retired {what} {id} expired and left the trust bundle"),
            ),
            Transition::Discarded { .. } => (
                format!("{what}Discarded"),
                format!(
                    "prepared {what} {id} was discarded before it signed anything (configuration changed)"
                ),
            ),
        };
        info!(trust_domain = %policy.trust_domain, kind = kind.label(), transition, id = %id, "{note}");
        self.event(obj, EventType::Normal, &reason, &note, "Rotate")
            .await;
    }

    async fn event(
        &self,
        obj: &TrustDomainObject,
        type_: EventType,
        reason: &str,
        note: &str,
        action: &str,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(trust_domain_object = %obj.name_any(), error = %e, "cannot publish Event");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::crd::trust_domain::TrustDomainSpec;

    fn policy() -> Policy {
        let spec: TrustDomainSpec =
            serde_json::from_value(serde_json::json!({"trustDomain": "example.org"})).unwrap();
        Policy::from_spec("td", &spec).unwrap()
    }

    #[test]
    fn status_reports_problems_without_hiding_the_signing_ca() {
        let now = SystemTime::now();
        let mut state = AuthorityState::new(policy().trust_domain);
        state.advance(now, &policy(), None);
        let problem = Error::UpstreamSecretNotFound {
            object: "td".into(),
            namespace: "ns".into(),
            name: "up".into(),
        };
        let o = Outcome {
            state: Some(&state),
            problems: vec![problem],
            published: None,
            now,
            request: None,
        };
        let status = build_status(&TrustDomainStatus::default(), Some(3), "ns/sigil-ca-td", &o);
        let ready = status.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "UpstreamSecretNotFound")
        );
        let issuing = status
            .conditions
            .iter()
            .find(|c| c.type_ == ISSUING)
            .unwrap();
        assert_eq!(
            (issuing.status.as_str(), issuing.reason.as_str()),
            ("True", "ActiveCA")
        );
        assert_eq!(
            status.active_ca.unwrap().serial,
            state.x509.active.unwrap().key.serial()
        );
        assert_eq!(status.bundle_sequence, Some(1));
        assert_eq!(ready.observed_generation, Some(3));
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let now = SystemTime::now();
        let mut state = AuthorityState::new(policy().trust_domain);
        state.advance(now, &policy(), None);
        let first = build_status(
            &TrustDomainStatus::default(),
            Some(1),
            "s",
            &Outcome {
                state: Some(&state),
                problems: vec![],
                published: None,
                now,
                request: None,
            },
        );
        let later = now + Duration::from_secs(100);
        let second = build_status(
            &first,
            Some(1),
            "s",
            &Outcome {
                state: Some(&state),
                problems: vec![],
                published: None,
                now: later,
                request: None,
            },
        );
        assert_eq!(
            first.conditions[0].last_transition_time,
            second.conditions[0].last_transition_time
        );
        let problem = Error::UpstreamSecretNotFound {
            object: "td".into(),
            namespace: "ns".into(),
            name: "up".into(),
        };
        let third = build_status(
            &second,
            Some(1),
            "s",
            &Outcome {
                state: Some(&state),
                problems: vec![problem],
                published: None,
                now: later,
                request: None,
            },
        );
        assert_ne!(
            second.conditions[0].last_transition_time,
            third.conditions[0].last_transition_time
        );
    }
}
