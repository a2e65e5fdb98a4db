//! A Node API world for tests and benches: a real apiserver (the e2e harness), an
//! operator replica in this process (CA, identity index, Node API on a loopback port), a
//! namespace the test owns, two Nodes, and the agent's service account and pods.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use sigil_agent::node_client::{NodeClient, NodeClientConfig};
use sigil_identity::clock::SystemClock;
use sigil_identity::{TrustBundle, TrustDomain};
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_operator::index::{self, EntryIndex, IndexConfig, RunOptions, StatusOptions};
use sigil_operator::node_api::limits::NodeApiLimits;
use sigil_operator::node_api::metrics::NodeApiMetrics;
use sigil_operator::node_api::psat::PsatConfig;
use sigil_operator::node_api::{self, NodeApi, NodeApiConfig};
use tokio_util::sync::CancellationToken;

use crate::trust_domain::*;

/// A Node API server task and its stop switch.
type RunningNodeApi = (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), Box<dyn std::error::Error + Send + Sync>>>,
);

/// The cluster name the operator runs with.
pub const CLUSTER: &str = "e2e";

/// A second operator replica of a [`World`] ([`World::second_replica`]); dropping it
/// stops its index and Node API.
pub struct SecondReplica {
    pub replica: Replica,
    pub index: EntryIndex,
    pub node_api_addr: String,
    _stop: tokio_util::sync::DropGuard,
}

pub struct World {
    pub client: Client,
    /// What the operator components use (the admin unless a test says otherwise).
    pub operator_client: Client,
    pub ns: String,
    pub tag: String,
    pub td: TrustDomain,
    pub td_object: String,
    pub audience: String,
    pub node_a: String,
    pub node_b: String,
    pub node_a_uid: String,
    pub node_api_addr: String,
    pub index: EntryIndex,
    pub metrics: NodeApiMetrics,
    pub replica: Replica,
    node_api: std::sync::Mutex<Option<RunningNodeApi>>,
    node_api_config: NodeApiConfig,
    nodes: kube::runtime::reflector::Store<Node>,
    cancel: CancellationToken,
}

impl Drop for World {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub async fn create<K>(api: &Api<K>, v: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.create(&PostParams::default(), &serde_json::from_value(v).unwrap())
        .await
        .unwrap()
}

pub fn pod_json(name: &str, node: &str, sa: &str, labels: Value) -> Value {
    json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": sa, "automountServiceAccountToken": false,
                 "containers": [{"name": "main", "image": "registry.invalid/none"}]},
    })
}

/// How a [`World`] differs from the defaults.
pub struct WorldOptions {
    /// Lifetime of agent SVIDs.
    pub agent_svid_ttl: Duration,
    /// The clock of the TrustDomain controller (CA rotation).
    pub clock: sigil_identity::clock::SharedClock,
    /// Use this (existing) namespace instead of creating one.
    pub namespace: Option<String>,
    /// The client every operator component uses (default: the admin), e.g. one for the
    /// chart's ServiceAccount to prove its RBAC is enough.
    pub operator_client: Option<Client>,
    /// TPM attestation settings (None: AttestNodeTpm is Unimplemented).
    pub tpm: Option<sigil_operator::node_api::tpm::TpmConfig>,
    /// The Node API's limits (None: none a test reaches; the attack tests set the
    /// operator's defaults).
    pub limits: Option<NodeApiLimits>,
    /// More of the TrustDomain's spec (an object merged over trustDomain and bundle), e.g.
    /// `{"ca": {"keyType": "RSA-3072"}}`; `Null` for none.
    pub trust_domain_spec: Value,
    /// The TrustDomain's `spec.ca.ttl` (None: the default, 24h), e.g. `1m` for CA
    /// rotations within a test.
    pub ca_ttl: Option<String>,
    /// Where the operator keeps CA and JWT keys (default: software, in the CA Secret),
    /// e.g. a PKCS#11 token.
    pub keys: sigil_operator::keys::Keys,
}

impl Default for WorldOptions {
    fn default() -> Self {
        Self {
            agent_svid_ttl: Duration::from_secs(3600),
            clock: Arc::new(SystemClock),
            namespace: None,
            operator_client: None,
            tpm: None,
            limits: None,
            trust_domain_spec: Value::Null,
            ca_ttl: None,
            keys: Default::default(),
        }
    }
}

impl World {
    /// Everything up and the TrustDomain Ready; the agent SA `sigil-agent` exists.
    pub async fn start(prefix: &str) -> World {
        Self::start_with(prefix, WorldOptions::default()).await
    }

    /// As [`World::start`], with options.
    pub async fn start_with(prefix: &str, options: WorldOptions) -> World {
        let WorldOptions {
            agent_svid_ttl,
            clock,
            namespace,
            operator_client,
            tpm,
            limits,
            trust_domain_spec,
            ca_ttl,
            keys,
        } = options;
        let client = client().await;
        let op = operator_client.unwrap_or_else(|| client.clone());
        let (tag, ns) = match namespace {
            Some(ns) => {
                Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
                    .patch(
                        &ns,
                        &kube::api::PatchParams::default(),
                        &kube::api::Patch::Merge(
                            json!({"metadata": {"labels": {"sigil-test": ns}}}),
                        ),
                    )
                    .await
                    .unwrap();
                (ns.clone(), ns)
            }
            None => {
                let tag = unique(prefix);
                create(
                    &Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone()),
                    json!({"metadata": {"name": tag, "labels": {"sigil-test": tag}}}),
                )
                .await;
                (tag.clone(), tag)
            }
        };
        let instance = tag.clone();
        let nodes = Api::<Node>::all(client.clone());
        let node_a = format!("{tag}-a");
        let node_b = format!("{tag}-b");
        let a = create(
            &nodes,
            json!({"metadata": {"name": node_a, "labels": {"zone": "z1"}}}),
        )
        .await;
        create(
            &nodes,
            json!({"metadata": {"name": node_b, "labels": {"zone": "z2"}}}),
        )
        .await;
        let sas = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
        for sa in ["sigil-agent", "intruder", "web"] {
            // The chart may have created sigil-agent already.
            let _ = sas
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": sa}})).unwrap(),
                )
                .await;
        }

        let mut replica_config = ReplicaConfig::new(&ns, &instance);
        replica_config.clock = clock;
        replica_config.keys = keys;
        let replica = Replica::start(op.clone(), replica_config);
        let td_name = format!("{tag}.example.org");
        let td_object = format!("{tag}-td");
        let mut td_spec = json!({"trustDomain": td_name, "bundle": {"namespaceSelector": {"matchLabels": {"sigil-test": tag}}}});
        if let (Some(spec), Some(more)) = (td_spec.as_object_mut(), trust_domain_spec.as_object()) {
            spec.extend(more.clone());
        }
        if let Some(ttl) = &ca_ttl {
            td_spec["ca"]["ttl"] = json!(ttl);
        }
        create_trust_domain(&client, &trust_domain(&td_object, &instance, td_spec)).await;
        wait_condition(&client, &td_object, "Ready", "True", "BundlePublished").await;
        let td: TrustDomain = td_name.parse().unwrap();

        let cancel = CancellationToken::new();
        let index = spawn_index(op.clone(), &replica, cancel.clone());

        let (store, writer) = kube::runtime::reflector::store::<Node>();
        let watch = kube::runtime::reflector(
            writer,
            kube::runtime::watcher(Api::<Node>::all(op.clone()), Default::default()),
        )
        .backoff(sigil_operator::watch_backoff())
        .applied_objects();
        tokio::spawn(async move {
            use futures::StreamExt;
            futures::pin_mut!(watch);
            while watch.next().await.is_some() {}
        });
        store.wait_until_ready().await.unwrap();

        let audience = format!("sigil-agent-{tag}");
        let config = NodeApiConfig {
            agent_trust_domain: td.clone(),
            agent_svid_ttl,
            psat: PsatConfig {
                cluster: CLUSTER.into(),
                audience: audience.clone(),
                allowed_service_accounts: vec![format!("{ns}:sigil-agent")],
                allowed_node_label_keys: vec!["zone".into()],
                allowed_pod_label_keys: vec![],
            },
            limits: limits.unwrap_or_else(NodeApiLimits::unlimited),
            tpm,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node_api_addr = listener.local_addr().unwrap().to_string();
        let world = World {
            client,
            operator_client: op,
            ns,
            tag,
            td,
            td_object,
            audience,
            node_a_uid: a.uid().unwrap(),
            node_a,
            node_b,
            node_api_addr,
            index,
            metrics: NodeApiMetrics::default(),
            replica,
            node_api: std::sync::Mutex::new(None),
            node_api_config: config,
            nodes: store,
            cancel,
        };
        world.serve_node_api(listener);
        eventually("the Node API serving certificate", SETTLE, || async {
            world
                .replica
                .readiness
                .pending()
                .iter()
                .all(|p| p != "node-api")
                .then_some(())
        })
        .await;
        world
    }

    fn serve_node_api(&self, listener: tokio::net::TcpListener) {
        let cancel = self.cancel.child_token();
        let api = NodeApi::new(
            self.node_api_config.clone(),
            self.operator_client.clone(),
            self.replica.authorities.clone(),
            self.index.clone(),
            self.nodes.clone(),
            Arc::new(SystemClock),
            self.metrics.clone(),
            self.replica.federated.clone(),
            cancel.clone(),
        );
        let ready = self.replica.readiness.component("node-api");
        let task = tokio::spawn(node_api::serve(
            listener,
            api,
            self.replica.authorities.clone(),
            self.td.clone(),
            Duration::from_secs(3600),
            Arc::new(SystemClock),
            Some(ready),
            cancel.clone(),
        ));
        *self.node_api.lock().unwrap() = Some((cancel, task));
    }

    /// Enrols a TPM for `node` (the EK-hash annotation) and waits until the operator's
    /// Node cache has it.
    pub async fn enroll_tpm(&self, node: &str, ek_hash: &str) {
        use sigil_operator::node_api::tpm::EK_ANNOTATION;
        Api::<Node>::all(self.client.clone())
            .patch(
                node,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(
                    json!({"metadata": {"annotations": {EK_ANNOTATION: ek_hash}}}),
                ),
            )
            .await
            .unwrap();
        eventually(
            "the Node cache to see the TPM enrolment",
            SETTLE,
            || async {
                self.nodes
                    .get(&kube::runtime::reflector::ObjectRef::new(node))
                    .filter(|n| {
                        n.metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get(EK_ANNOTATION))
                            .is_some_and(|v| v == ek_hash)
                    })
                    .map(|_| ())
            },
        )
        .await;
    }

    /// A second operator replica, as the Deployment's second pod: leader election on the
    /// same Lease (it stands by while this world's replica leads), its own CA loader,
    /// identity index and Node API on another loopback port. Returns once its Node API
    /// serves.
    pub async fn second_replica(&self) -> SecondReplica {
        let cancel = CancellationToken::new();
        let replica = Replica::start(
            self.operator_client.clone(),
            ReplicaConfig::new(&self.ns, &self.tag),
        );
        let index = spawn_index(self.operator_client.clone(), &replica, cancel.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node_api_addr = listener.local_addr().unwrap().to_string();
        let api = NodeApi::new(
            self.node_api_config.clone(),
            self.operator_client.clone(),
            replica.authorities.clone(),
            index.clone(),
            self.nodes.clone(),
            Arc::new(SystemClock),
            NodeApiMetrics::default(),
            replica.federated.clone(),
            cancel.clone(),
        );
        tokio::spawn(node_api::serve(
            listener,
            api,
            replica.authorities.clone(),
            self.td.clone(),
            Duration::from_secs(3600),
            Arc::new(SystemClock),
            Some(replica.readiness.component("node-api")),
            cancel.clone(),
        ));
        eventually(
            "the second replica's Node API serving certificate",
            SETTLE,
            || async {
                replica
                    .readiness
                    .pending()
                    .iter()
                    .all(|p| p != "node-api")
                    .then_some(())
            },
        )
        .await;
        SecondReplica {
            replica,
            index,
            node_api_addr,
            _stop: cancel.drop_guard(),
        }
    }

    /// Kills this world's replica as SIGKILL kills a pod: leader election, the CA and
    /// federation loops stop where they are (the Lease is not released, so a standby
    /// takes over only once it expires), and the index and the Node API stop (agents'
    /// streams end and their connections are refused).
    pub async fn kill_replica(&self) {
        self.replica.abort();
        self.cancel.cancel();
        self.stop_node_api().await;
    }

    /// Stops the Node API (an operator outage): streams end, connections are refused.
    pub async fn stop_node_api(&self) {
        let running = self.node_api.lock().unwrap().take();
        if let Some((cancel, task)) = running {
            cancel.cancel();
            let _ = task.await;
        }
    }

    /// Serves the Node API again on the same address (an operator restart).
    pub async fn restart_node_api(&self) {
        self.stop_node_api().await;
        let listener = eventually("the Node API port to be free", SETTLE, || async {
            tokio::net::TcpListener::bind(&self.node_api_addr)
                .await
                .ok()
        })
        .await;
        self.serve_node_api(listener);
        eventually("the Node API serving certificate", SETTLE, || async {
            self.replica
                .readiness
                .pending()
                .iter()
                .all(|p| p != "node-api")
                .then_some(())
        })
        .await;
    }

    /// The bundle an agent pod mounts: the TrustDomain's ConfigMap in our namespace.
    pub async fn bootstrap_bundle(&self) -> TrustBundle {
        let cm = eventually("the bundle ConfigMap", SETTLE, || {
            bundle_config_map(&self.client, &self.ns, "sigil-trust-bundle")
        })
        .await;
        let jwks = cm.data.unwrap()["bundle.spiffe"].clone();
        TrustBundle::from_jwks_json(self.td.clone(), jwks.as_bytes()).unwrap()
    }

    /// What a sigil-agent DaemonSet pod on node A has mounted, written into `dir`: its
    /// projected token (`token`, for a new agent pod) and the bootstrap trust bundle
    /// (`bundle.spiffe`). Returns their paths.
    pub async fn agent_pod_files(
        &self,
        dir: &std::path::Path,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let (token, bundle, _) = self.agent_pod_files_of(dir).await;
        (token, bundle)
    }

    /// As [`World::agent_pod_files`], with the agent pod (to refresh its token).
    pub async fn agent_pod_files_of(
        &self,
        dir: &std::path::Path,
    ) -> (std::path::PathBuf, std::path::PathBuf, Pod) {
        let pod = self
            .pod(
                &unique("sigil-agent"),
                &self.node_a,
                "sigil-agent",
                json!({"app": "sigil-agent"}),
            )
            .await;
        let token = dir.join("token");
        std::fs::write(&token, self.token(&pod, &self.audience).await).unwrap();
        let bundle = dir.join("bundle.spiffe");
        std::fs::write(&bundle, self.bootstrap_bundle().await.to_jwks_json()).unwrap();
        (token, bundle, pod)
    }

    /// A Node API client as the agent builds it.
    pub async fn agent_client(&self) -> NodeClient {
        NodeClient::new(
            NodeClientConfig {
                addresses: vec![self.node_api_addr.clone()],
                trust_domain: self.td.clone(),
                cluster: CLUSTER.into(),
            },
            self.bootstrap_bundle().await,
        )
        .unwrap()
    }

    /// Creates a pod on `node` running as `sa`.
    pub async fn pod(&self, name: &str, node: &str, sa: &str, labels: Value) -> Pod {
        create(
            &Api::<Pod>::namespaced(self.client.clone(), &self.ns),
            pod_json(name, node, sa, labels),
        )
        .await
    }

    /// A projected token bound to `pod`, for `audience`.
    pub async fn token(&self, pod: &Pod, audience: &str) -> String {
        sigil_e2e::pod::bound_token(&self.client, pod, audience, 600)
            .await
            .unwrap()
    }

    /// An agent pod on `node` and an attested client for it.
    pub async fn attested_agent(&self, node: &str) -> NodeClient {
        self.attested_agent_with_token(node).await.0
    }

    /// As [`World::attested_agent`], with the agent pod's token (to renew with).
    pub async fn attested_agent_with_token(&self, node: &str) -> (NodeClient, String) {
        let pod = self
            .pod(
                &unique("agent"),
                node,
                "sigil-agent",
                json!({"app": "sigil-agent"}),
            )
            .await;
        let token = self.token(&pod, &self.audience).await;
        let client = self.agent_client().await;
        client.attest_psat(&token).await.unwrap();
        (client, token)
    }

    /// A ClusterSPIFFEID selecting `app=<app>` pods in our namespace.
    pub async fn cluster_spiffe_id(&self, name: &str, app: &str) -> ClusterSPIFFEID {
        self.cluster_spiffe_id_with(name, app, json!({})).await
    }

    /// As [`World::cluster_spiffe_id`], with `more` merged over the spec.
    pub async fn cluster_spiffe_id_with(
        &self,
        name: &str,
        app: &str,
        more: Value,
    ) -> ClusterSPIFFEID {
        let mut spec = json!({
            "trustDomain": self.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": self.tag}},
            "podSelector": {"matchLabels": {"app": app}},
            "ttl": "20m",
            "dnsNameTemplates": ["{{pod.name}}.{{node.labels['zone']}}"],
        });
        if let (Some(spec), Some(more)) = (spec.as_object_mut(), more.as_object()) {
            spec.extend(more.clone());
        }
        create(
            &Api::<ClusterSPIFFEID>::all(self.client.clone()),
            json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": name}, "spec": spec}),
        )
        .await
    }

    /// Serves this world's bundle endpoint and OIDC discovery on loopback as
    /// `--bundle-endpoint-addr` does (https_spiffe, SVID
    /// `spiffe://<td>/sigil/bundle-endpoint`); returns its URL and a guard that stops it.
    pub async fn serve_bundle_endpoint(&self) -> (String, tokio_util::sync::DropGuard) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let cancel = CancellationToken::new();
        tokio::spawn(sigil_operator::federation::endpoint::serve(
            listener,
            sigil_operator::federation::endpoint::EndpointConfig {
                trust_domain: self.td.clone(),
                tls: sigil_operator::federation::endpoint::EndpointTls::Spiffe {
                    svid_ttl: Duration::from_secs(600),
                },
            },
            self.replica.authorities.clone(),
            Arc::new(SystemClock),
            self.replica.metrics.federation.clone(),
            None,
            cancel.clone(),
        ));
        (url, cancel.drop_guard())
    }

    /// The Node API metrics as Prometheus text.
    pub fn metrics_text(&self) -> String {
        let mut registry = Registry::default();
        self.metrics.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }
}

/// A replica's identity index, watching through `client` until `cancel`, writing status
/// while `replica` leads (every 100 ms, so tests see it soon).
fn spawn_index(client: Client, replica: &Replica, cancel: CancellationToken) -> EntryIndex {
    let index = EntryIndex::new(IndexConfig::new(CLUSTER));
    tokio::spawn(index::run(
        client,
        index.clone(),
        replica.leader.clone(),
        RunOptions {
            status: StatusOptions {
                interval: Duration::from_millis(100),
                ..Default::default()
            },
            ready: None,
        },
        cancel,
    ));
    index
}
