//! Shared pieces of the TrustDomain tests: an operator replica running in the test
//! process against the harness's real apiserver, polling helpers with deadlines, and
//! object builders. Each test gets its own namespace, Lease and TrustDomain label, so tests
//! share one control plane without seeing each other's objects.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use sigil_identity::clock::SharedClock;
use sigil_identity::{TrustBundle, TrustDomain as TdName};
use sigil_operator::authority::Authorities;
use sigil_operator::crd::trust_domain::TrustDomain;
use sigil_operator::leader::{LeaderConfig, LeaderElection};
use sigil_operator::telemetry::{Metrics, Readiness};
use sigil_operator::trust_domain::{self, Options, Resync, Shared};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Label that ties a TrustDomain to the operator instance of one test.
pub const INSTANCE_LABEL: &str = "sigil.dev/test-instance";

/// The harness's admin client (one control plane per test binary; CRDs from `crds/`).
pub async fn client() -> Client {
    sigil_e2e::shared().await.admin().await.unwrap()
}

/// A client authenticated as ServiceAccount `ns/name` (created if missing).
pub async fn service_account_client(ns: &str, name: &str) -> Client {
    sigil_e2e::shared()
        .await
        .service_account_client(ns, name)
        .await
        .unwrap()
}

/// A fresh namespace for one test.
pub async fn namespace(prefix: &str) -> String {
    sigil_e2e::shared().await.namespace(prefix).await.unwrap()
}

pub use sigil_e2e::{eventually, unique};

/// One operator replica (leader election + TrustDomain subsystem) in this process.
pub struct Replica {
    pub identity: String,
    pub authorities: Arc<Authorities>,
    /// Foreign bundles held (the FederatedBundle subsystem runs in every replica).
    pub federated: Arc<sigil_operator::federation::FederatedBundles>,
    pub leader: watch::Receiver<bool>,
    pub resync: Resync,
    pub readiness: Readiness,
    pub metrics: Metrics,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// How to start a replica.
pub struct ReplicaConfig {
    pub namespace: String,
    pub instance: String,
    pub identity: String,
    pub lease: String,
    pub lease_duration: Duration,
    pub clock: SharedClock,
    /// Where CA and JWT keys live (default: software, in the CA Secret).
    pub keys: sigil_operator::keys::Keys,
}

impl ReplicaConfig {
    pub fn new(namespace: &str, instance: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            instance: instance.to_owned(),
            identity: unique("replica"),
            lease: format!("sigil-{instance}"),
            lease_duration: Duration::from_secs(2),
            clock: Arc::new(sigil_identity::clock::SystemClock),
            keys: Default::default(),
        }
    }
}

impl Replica {
    pub fn start(client: Client, c: ReplicaConfig) -> Self {
        let cancel = CancellationToken::new();
        let metrics = Metrics::default();
        let readiness = Readiness::new();
        let mut lease =
            LeaderConfig::with_duration(&c.namespace, &c.lease, &c.identity, c.lease_duration);
        lease.retry_interval = Duration::from_millis(100);
        let (election, leader) = LeaderElection::new(client.clone(), lease);
        let election = election.with_metrics(metrics.leader.clone());
        let authorities = Authorities::new();
        let resync = Resync::default();
        let mut options = Options::new(&c.namespace);
        options.selector = Some(format!("{INSTANCE_LABEL}={}", c.instance));
        options.instance = Some(c.identity.clone());
        options.retry_interval = Duration::from_secs(1);
        options.keys = c.keys.clone();
        let federated = sigil_operator::federation::FederatedBundles::new();
        let mut fed_options = sigil_operator::federation::Options::new(&c.namespace);
        fed_options.selector = options.selector.clone();
        fed_options.instance = Some(c.identity.clone());
        fed_options.retry_interval = Duration::from_secs(1);
        fed_options.min_refresh = Duration::from_secs(1);
        fed_options.fetch_timeout = Duration::from_secs(3);
        let fed_shared = sigil_operator::federation::Shared {
            federated: federated.clone(),
            authorities: authorities.clone(),
            clock: c.clock.clone(),
            leader: leader.clone(),
            metrics: metrics.federation.clone(),
            errors: metrics.trust_domain.reconcile_errors.clone(),
            ready: Some(readiness.component("federated-bundles")),
        };
        let shared = Shared {
            authorities: authorities.clone(),
            clock: c.clock,
            leader: leader.clone(),
            metrics: metrics.trust_domain.clone(),
            ready: Some(readiness.component("trust-domains")),
            resync: resync.clone(),
        };
        let tasks = vec![
            tokio::spawn(election.run(cancel.clone())),
            tokio::spawn(sigil_operator::federation::run(
                client.clone(),
                fed_options,
                fed_shared,
                cancel.clone(),
            )),
            tokio::spawn({
                let cancel = cancel.clone();
                async move {
                    trust_domain::run(client, options, shared, cancel)
                        .await
                        .unwrap();
                }
            }),
        ];
        Self {
            identity: c.identity,
            authorities,
            federated,
            leader,
            resync,
            readiness,
            metrics,
            cancel,
            tasks,
        }
    }

    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Graceful stop: the Lease is released.
    pub async fn stop(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Kills the replica's tasks without any cleanup, as a crashed pod.
    pub fn kill(self) {
        self.abort();
    }

    /// As [`Replica::kill`], for a replica something else owns: its tasks stop where they
    /// are, the Lease is not released.
    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    pub async fn wait_leader(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !*self.leader.borrow() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{} did not become leader within {timeout:?}",
                self.identity
            );
            let _ = tokio::time::timeout(left, self.leader.changed()).await;
        }
    }
}

/// Default time to wait for the operator to act.
pub const SETTLE: Duration = Duration::from_secs(30);

/// A TrustDomain handled by `instance`'s operator.
pub fn trust_domain(name: &str, instance: &str, spec: serde_json::Value) -> TrustDomain {
    let mut td: TrustDomain = serde_json::from_value(serde_json::json!({
        "apiVersion": "sigil.dev/v1alpha1",
        "kind": "TrustDomain",
        "metadata": {"name": name, "labels": {INSTANCE_LABEL: instance}},
        "spec": spec,
    }))
    .unwrap();
    td.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(INSTANCE_LABEL.into(), instance.into());
    td
}

pub async fn create_trust_domain(client: &Client, td: &TrustDomain) -> TrustDomain {
    Api::<TrustDomain>::all(client.clone())
        .create(&PostParams::default(), td)
        .await
        .unwrap()
}

/// The condition `type_` of a TrustDomain: (status, reason, message).
pub fn condition(td: &TrustDomain, type_: &str) -> Option<(String, String, String)> {
    td.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until condition `type_` has `status` and `reason`.
pub async fn wait_condition(
    client: &Client,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> TrustDomain {
    let api = Api::<TrustDomain>::all(client.clone());
    let mut last = None;
    let found = tokio::time::timeout(SETTLE, async {
        loop {
            if let Ok(td) = api.get(name).await {
                let c = condition(&td, type_);
                if c.as_ref()
                    .is_some_and(|(s, r, _)| s == status && r == reason)
                {
                    return td;
                }
                last = c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    match found {
        Ok(td) => td,
        Err(_) => panic!(
            "TrustDomain {name}: condition {type_} never became {status}/{reason}; last seen: {last:?}"
        ),
    }
}

/// Events about TrustDomain `name` (cluster-scoped objects' Events live in `default`).
pub async fn events_for(client: &Client, name: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

/// Waits for a Warning Event with `reason` about `name`; returns its note.
pub async fn wait_warning_event(client: &Client, name: &str, reason: &str) -> String {
    eventually(
        &format!("Warning Event {reason} for {name}"),
        SETTLE,
        || async {
            events_for(client, name)
                .await
                .into_iter()
                .find(|e| {
                    e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some(reason)
                })
                .map(|e| e.note.unwrap_or_default())
        },
    )
    .await
}

/// The bundle ConfigMap in `ns`, if present.
pub async fn bundle_config_map(client: &Client, ns: &str, name: &str) -> Option<ConfigMap> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

/// Decodes a bundle ConfigMap: (PEM bundle, SPIFFE bundle).
pub fn decode_bundle(cm: &ConfigMap, td: &str) -> (TrustBundle, TrustBundle) {
    let data = cm.data.as_ref().unwrap();
    let td = TdName::new(td).unwrap();
    let pem = TrustBundle::from_x509_pem(td.clone(), &data["bundle.pem"]).unwrap();
    let spiffe = TrustBundle::from_jwks_json(td, data["bundle.spiffe"].as_bytes()).unwrap();
    (pem, spiffe)
}

/// The CA Secret of TrustDomain `name`.
pub async fn ca_secret(client: &Client, ns: &str, name: &str) -> Option<Secret> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(&trust_domain::store::ca_secret_name(name))
        .await
        .unwrap()
}

/// Labels a namespace (merge patch).
pub async fn label_namespace(client: &Client, ns: &str, key: &str, value: Option<&str>) {
    use k8s_openapi::api::core::v1::Namespace;
    let patch = serde_json::json!({"metadata": {"labels": {key: value}}});
    Api::<Namespace>::all(client.clone())
        .patch(
            ns,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
}

/// Name of any object.
pub fn name_of<K: ResourceExt>(k: &K) -> String {
    k.name_any()
}
