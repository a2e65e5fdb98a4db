//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Every replica runs a [`LeaderElection`]; at most one holds the Lease and may write
//! (CA Secrets, status, bundle ConfigMaps, Events). Any component gates its writes on the
//! `watch::Receiver<bool>` from [`LeaderElection::new`] and, when it turns `true`, catches
//! up on everything (it was not writing before).
//!
//! The rules, as client-go's leaderelection:
//! - a Lease is free when it has no holder, or when its record (holder, renewTime) has not
//!   changed for `leaseDurationSeconds` as measured by *this* replica's monotonic clock
//!   since it first saw that record, so clock skew between nodes does not matter;
//! - the holder renews every `renew_interval` (default a third of the duration);
//! - the holder steps down (reports `false`) as soon as a renewal is refused, or when it
//!   has not renewed for two thirds of the duration, before anyone else may take over;
//! - every write is an optimistic-concurrency update (resourceVersion), so two replicas
//!   never both believe they won;
//! - on cancellation the holder releases the Lease, so a successor takes over at once.
//!
//! It never writes anything but its Lease.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::telemetry::{LeaderMetrics, LeaseLabels};

/// How to elect.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Namespace of the Lease (the operator's namespace).
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's identity (its pod name; must be unique among replicas).
    pub identity: String,
    /// How long a holder's claim lasts without renewal. Whole seconds on the wire (at least 1).
    pub lease_duration: Duration,
    /// How often the holder renews.
    pub renew_interval: Duration,
    /// How often a non-holder checks the Lease.
    pub retry_interval: Duration,
}

impl LeaderConfig {
    /// Defaults: 15 s lease, renewed every 5 s, checked every 2 s.
    pub fn new(namespace: &str, lease_name: &str, identity: &str) -> Self {
        Self::with_duration(namespace, lease_name, identity, Duration::from_secs(15))
    }

    /// A lease of `lease_duration`, renewed at a third of it, checked at a fifth of it.
    pub fn with_duration(
        namespace: &str,
        lease_name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Self {
        Self {
            namespace: namespace.to_owned(),
            lease_name: lease_name.to_owned(),
            identity: identity.to_owned(),
            lease_duration,
            renew_interval: lease_duration / 3,
            retry_interval: lease_duration / 5,
        }
    }

    fn duration_secs(&self) -> i32 {
        (self.lease_duration.as_secs_f64().ceil() as i32).max(1)
    }
}

/// One replica's participation in the election.
#[derive(Debug)]
pub struct LeaderElection {
    api: Api<Lease>,
    config: LeaderConfig,
    tx: watch::Sender<bool>,
    metrics: Option<LeaderMetrics>,
    /// The last record seen held by someone else, and when this replica first saw it.
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
    /// When this replica last renewed successfully.
    last_renew: Option<Instant>,
}

enum Attempt {
    Leading,
    Following,
}

impl LeaderElection {
    /// A participant and the receiver that says whether it leads (initially `false`).
    pub fn new(client: Client, config: LeaderConfig) -> (Self, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        let api = Api::namespaced(client, &config.namespace);
        (
            Self {
                api,
                config,
                tx,
                metrics: None,
                observed: None,
                last_renew: None,
            },
            rx,
        )
    }

    /// Reports leadership in `metrics`.
    pub fn with_metrics(mut self, metrics: LeaderMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Another receiver of the leadership flag.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// Runs until `cancel` fires, then releases the Lease if held.
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            let wait = match self.attempt().await {
                Ok(Attempt::Leading) => {
                    self.last_renew = Some(Instant::now());
                    self.set_leader(true);
                    self.config.renew_interval
                }
                Ok(Attempt::Following) => {
                    self.set_leader(false);
                    self.config.retry_interval
                }
                Err(e) => {
                    warn!(lease = %self.config.lease_name, error = %e, "lease update failed");
                    let deadline = self.config.lease_duration * 2 / 3;
                    if self.last_renew.is_none_or(|t| t.elapsed() >= deadline) {
                        self.set_leader(false);
                    }
                    self.config.retry_interval
                }
            };
            // While leading, wake up early enough to step down before the renew deadline.
            let wait = match (self.is_leader(), self.last_renew) {
                (true, Some(t)) => wait.min(
                    (t + self.config.lease_duration * 2 / 3)
                        .saturating_duration_since(Instant::now()),
                ),
                _ => wait,
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
            if self.is_leader()
                && self
                    .last_renew
                    .is_some_and(|t| t.elapsed() >= self.config.lease_duration * 2 / 3)
            {
                warn!(lease = %self.config.lease_name, "could not renew the lease in time; stepping down");
                self.set_leader(false);
            }
        }
        if self.is_leader() {
            self.set_leader(false);
            if let Err(e) = self.release().await {
                warn!(lease = %self.config.lease_name, error = %e, "could not release the lease; a successor waits for it to expire");
            }
        }
    }

    fn is_leader(&self) -> bool {
        *self.tx.borrow()
    }

    fn set_leader(&mut self, leader: bool) {
        let changed = self
            .tx
            .send_if_modified(|l| std::mem::replace(l, leader) != leader);
        if !changed {
            return;
        }
        if leader {
            info!(lease = %self.config.lease_name, identity = %self.config.identity, "became leader");
        } else {
            info!(lease = %self.config.lease_name, identity = %self.config.identity, "stopped leading");
            self.last_renew = None;
        }
        if let Some(m) = &self.metrics {
            let labels = LeaseLabels {
                lease: format!("{}/{}", self.config.namespace, self.config.lease_name),
            };
            m.is_leader.get_or_create(&labels).set(i64::from(leader));
            if leader {
                m.acquisitions.get_or_create(&labels).inc();
            }
        }
    }

    async fn attempt(&mut self) -> Result<Attempt, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(self.config.duration_secs()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(e) if is_conflict(&e) => Ok(Attempt::Following),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() == Some(self.config.identity.as_str()) {
            if !self.is_leader() && self.last_renew.is_none() {
                // Ours from a previous life of this identity: take it back as a new term.
                spec.acquire_time = Some(now.clone());
            }
            spec.renew_time = Some(now);
            spec.lease_duration_seconds = Some(self.config.duration_secs());
            return self.update(&lease).await;
        }
        // Someone else's (or nobody's). Measure its age on our own clock.
        let record = (holder.clone(), spec.renew_time.clone());
        let first_seen = match &self.observed {
            Some((h, r, at)) if (h, r) == (&record.0, &record.1) => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record.0.clone(), record.1.clone(), at));
                at
            }
        };
        let duration = Duration::from_secs(
            spec.lease_duration_seconds
                .unwrap_or(self.config.duration_secs())
                .max(1) as u64,
        );
        if holder.is_some() && first_seen.elapsed() < duration {
            return Ok(Attempt::Following);
        }
        debug!(lease = %self.config.lease_name, previous = ?holder, "lease is free; acquiring");
        spec.holder_identity = Some(self.config.identity.clone());
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.config.duration_secs());
        spec.lease_transitions =
            Some(spec.lease_transitions.unwrap_or(0) + i32::from(holder.is_some()));
        self.update(&lease).await
    }

    async fn update(&self, lease: &Lease) -> Result<Attempt, kube::Error> {
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(e) if is_conflict(&e) => Ok(Attempt::Following),
            Err(e) => Err(e),
        }
    }

    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                info!(lease = %self.config.lease_name, "released the lease");
                Ok(())
            }
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_client_go_ratios() {
        let c = LeaderConfig::with_duration("ns", "lease", "me", Duration::from_secs(3));
        assert_eq!(c.renew_interval, Duration::from_secs(1));
        assert_eq!(c.duration_secs(), 3);
        let c = LeaderConfig::with_duration("ns", "lease", "me", Duration::from_millis(1500));
        assert_eq!(c.duration_secs(), 2);
    }
}
