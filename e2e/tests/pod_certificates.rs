//! Kubernetes pod certificates signed by Sigil (issue 24), against the real apiserver with
//! the Node authorizer and NodeRestriction admission: PodCertificateRequests are created
//! as a kubelet creates them, with a client certificate of `system:node:<name>` in
//! `system:nodes`, for pods bound to that node that mount a `podCertificate` volume of
//! Sigil's signer. The signer, the identity index and the CA run in this process (the
//! operator's own code, `sigil_operator::pod_certificates`), fed by real watches.
//!
//! The real kubelet's side (the projected volume in a running pod, rotation) is
//! e2e/tests/real_node.rs.
#![allow(clippy::unwrap_used)]

use sigil_testkit::node_api as node_api_common;

use std::time::{Duration, SystemTime};

use k8s_openapi::api::certificates::v1::{ClusterTrustBundle, PodCertificateRequest};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt as _};
use node_api_common::{World, create};
use serde_json::{Value, json};
use sigil_e2e::eventually;
use sigil_identity::SpiffeId;
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_operator::pod_certificates::decide::{KeyType, Policy};
use sigil_operator::pod_certificates::{self, PodCertificateMetrics};
use tokio_util::sync::CancellationToken;

const WITHIN: Duration = Duration::from_secs(30);

struct Signer {
    world: World,
    signer: String,
    metrics: PodCertificateMetrics,
    cancel: CancellationToken,
}

impl Drop for Signer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A Node API world (TrustDomain, index, nodes `<tag>-a`/`-b`, service account `web`) and
/// the signer, allowing only ECDSA P-256 and P-384 keys, with a 2 s grace.
async fn start() -> Signer {
    let world = World::start("pcr").await;
    let metrics = PodCertificateMetrics::default();
    let cancel = CancellationToken::new();
    let shared = pod_certificates::Shared {
        authorities: world.replica.authorities.clone(),
        federated: world.replica.federated.clone(),
        index: world.index.clone(),
        leader: world.replica.leader.clone(),
        clock: std::sync::Arc::new(sigil_identity::clock::SystemClock),
        metrics: metrics.clone(),
    };
    let policy = Policy {
        key_types: [KeyType::EcdsaP256, KeyType::EcdsaP384].into(),
        grace: Duration::from_secs(2),
    };
    tokio::spawn(pod_certificates::run(
        world.operator_client.clone(),
        policy,
        shared,
        cancel.clone(),
    ));
    let signer = format!("sigil.dev/{}", world.td_object);
    Signer {
        world,
        signer,
        metrics,
        cancel,
    }
}

impl Signer {
    /// A pod bound to `node` with label `app`, mounting a `podCertificate` volume of the
    /// signer (NodeRestriction lets a node ask only for signers its pods mount).
    async fn pod(&self, name: &str, node: &str, app: &str) -> Pod {
        create(
            &Api::<Pod>::namespaced(self.world.client.clone(), &self.world.ns),
            json!({
                "metadata": {"name": name, "labels": {"app": app}},
                "spec": {"nodeName": node, "serviceAccountName": "web", "automountServiceAccountToken": false,
                         "containers": [{"name": "main", "image": "registry.invalid/none",
                                         "volumeMounts": [{"name": "svid", "mountPath": "/var/run/svid"}]}],
                         "volumes": [{"name": "svid", "projected": {"sources": [{"podCertificate": {
                             "signerName": self.signer, "keyType": "ECDSAP256",
                             "credentialBundlePath": "credentialbundle.pem"}}]}}]},
            }),
        )
        .await
    }

    /// What `node`'s kubelet would send for `pod`: the node's and the service account's
    /// UIDs and a stub CSR of a fresh key.
    async fn request_spec(
        &self,
        pod: &Pod,
        node: &str,
        key: &rcgen::KeyPair,
        annotations: Option<Value>,
    ) -> Value {
        let node_uid = Api::<k8s_openapi::api::core::v1::Node>::all(self.world.client.clone())
            .get(node)
            .await
            .unwrap()
            .uid()
            .unwrap();
        let sa_uid = Api::<ServiceAccount>::namespaced(self.world.client.clone(), &self.world.ns)
            .get("web")
            .await
            .unwrap()
            .uid()
            .unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(key)
            .unwrap();
        let mut spec = json!({
            "signerName": self.signer,
            "podName": pod.name_any(), "podUID": pod.uid().unwrap(),
            "serviceAccountName": "web", "serviceAccountUID": sa_uid,
            "nodeName": node, "nodeUID": node_uid,
            "stubPKCS10Request": base64(csr.der()),
        });
        if let Some(a) = annotations {
            spec["unverifiedUserAnnotations"] = a;
        }
        spec
    }

    async fn node_client(&self, node: &str) -> Client {
        sigil_e2e::shared()
            .await
            .user_client(&format!("system:node:{node}"), Some("system:nodes"))
            .await
            .unwrap()
    }

    /// Creates a request as `client`; the API server's answer.
    async fn create_request(
        &self,
        client: &Client,
        spec: Value,
    ) -> Result<PodCertificateRequest, kube::Error> {
        Api::<PodCertificateRequest>::namespaced(client.clone(), &self.world.ns)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "apiVersion": "certificates.k8s.io/v1", "kind": "PodCertificateRequest",
                    "metadata": {"generateName": "req-"}, "spec": spec,
                }))
                .unwrap(),
            )
            .await
    }

    /// Creates a request as `client` and waits for its answer (see [`Signer::answer`]).
    async fn ask(
        &self,
        client: &Client,
        spec: Value,
    ) -> (String, String, String, PodCertificateRequest) {
        let pcr = self.create_request(client, spec).await.unwrap();
        self.answer(&pcr.name_any()).await
    }

    /// Waits for the request's terminal condition: (type, reason, message, request).
    async fn answer(&self, name: &str) -> (String, String, String, PodCertificateRequest) {
        let api =
            Api::<PodCertificateRequest>::namespaced(self.world.client.clone(), &self.world.ns);
        eventually(&format!("an answer to {name}"), WITHIN, || async {
            let pcr = api.get(name).await.ok()?;
            let c = pcr.status.as_ref()?.conditions.as_ref()?.first()?.clone();
            Some((c.type_, c.reason, c.message, pcr))
        })
        .await
    }

    fn spiffe_id(&self, path: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://{}/{path}", self.world.td)).unwrap()
    }
}

fn base64(der: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(der)
}

fn p256() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

async fn cluster_spiffe_id(s: &Signer, name: &str, app: &str, path: &str, hint: &str) {
    create(
        &Api::<ClusterSPIFFEID>::all(s.world.client.clone()),
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": name}, "spec": {
            "trustDomain": s.world.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": s.world.tag}},
            "podSelector": {"matchLabels": {"app": app}},
            "spiffeIDTemplate": format!("spiffe://{}/{path}", s.world.td),
            "hint": hint,
            "ttl": "2h",
        }}),
    )
    .await;
}

/// A node asks for its pod's certificate and gets an X509-SVID of the pod's ID, for the
/// kubelet's key, that validates against the TrustDomain's bundle, published as the
/// signer's ClusterTrustBundle; `beginRefreshAt` is near half-life. A pod with two
/// identities gets the default one, or the one its `sigil.dev/hint` names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_its_pods_svid_and_the_bundle_is_a_cluster_trust_bundle() {
    let s = start().await;
    let tag = s.world.tag.clone();
    cluster_spiffe_id(&s, &format!("{tag}-web"), "web", "web", "").await;
    cluster_spiffe_id(&s, &format!("{tag}-db"), "web", "zz-db-client", "db").await;
    let pod = s.pod("web", &s.world.node_a, "web").await;
    let kubelet = s.node_client(&s.world.node_a).await;
    let key = p256();
    // The index may not have rendered the second ClusterSPIFFEID yet: wait until the pod
    // has both identities before asking, so "default" is decided among both.
    eventually("both identities of pod web", WITHIN, || async {
        let p = s.world.index.pod_identities(&s.world.ns, "web")?;
        (p.entries.len() == 2).then_some(())
    })
    .await;
    let spec = s.request_spec(&pod, &s.world.node_a, &key, None).await;
    let (type_, reason, message, pcr) = s.ask(&kubelet, spec).await;
    assert_eq!(
        (type_.as_str(), reason.as_str()),
        ("Issued", "Issued"),
        "{message}"
    );

    let status = pcr.status.unwrap();
    let chain =
        sigil_identity::x509::certs_from_pem(status.certificate_chain.as_ref().unwrap()).unwrap();
    let bundle = s
        .world
        .replica
        .authorities
        .get(&s.world.td)
        .unwrap()
        .bundle
        .clone();
    let verified =
        sigil_identity::x509::validate_x509_svid(&chain, &bundle, SystemTime::now()).unwrap();
    assert_eq!(
        verified.spiffe_id,
        s.spiffe_id("web"),
        "the default identity: first by SPIFFE ID"
    );
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice(),
        "the certificate is for the kubelet's key"
    );
    let nb = status.not_before.unwrap().0.as_second();
    let na = status.not_after.unwrap().0.as_second();
    let refresh = status.begin_refresh_at.unwrap().0.as_second();
    assert_eq!(nb, leaf.validity().not_before.timestamp());
    assert_eq!(na, leaf.validity().not_after.timestamp());
    assert_eq!(
        na - nb,
        2 * 3600 + 10,
        "the ClusterSPIFFEID's ttl, back-dated 10 s"
    );
    let half = nb + (na - nb) / 2;
    assert!(
        (refresh - half).abs() <= (na - nb) / 20 + 1,
        "beginRefreshAt {refresh} is near half-life {half}"
    );

    // The hint picks the other identity.
    let key2 = p256();
    let spec = s
        .request_spec(
            &pod,
            &s.world.node_a,
            &key2,
            Some(json!({"sigil.dev/hint": "db"})),
        )
        .await;
    let (type_, _, message, pcr) = s.ask(&kubelet, spec).await;
    assert_eq!(type_, "Issued", "{message}");
    let chain = sigil_identity::x509::certs_from_pem(
        pcr.status.unwrap().certificate_chain.as_ref().unwrap(),
    )
    .unwrap();
    let verified =
        sigil_identity::x509::validate_x509_svid(&chain, &bundle, SystemTime::now()).unwrap();
    assert_eq!(verified.spiffe_id, s.spiffe_id("zz-db-client"));

    // The bundle, as a ClusterTrustBundle of the signer.
    let name = format!("sigil.dev:{}:bundle", s.world.td_object);
    let ctb = eventually("the signer's ClusterTrustBundle", WITHIN, || async {
        Api::<ClusterTrustBundle>::all(s.world.client.clone())
            .get_opt(&name)
            .await
            .unwrap()
    })
    .await;
    assert_eq!(ctb.spec.signer_name.as_deref(), Some(s.signer.as_str()));
    assert_eq!(
        sigil_identity::x509::certs_from_pem(&ctb.spec.trust_bundle).unwrap(),
        bundle.x509_authorities
    );
}

/// The denials a user can act on: a pod no ClusterSPIFFEID selects, a key type the signer
/// does not allow, an annotation it does not know. Each is a `Denied` condition with the
/// reason and a message naming the fix, and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_signer_cannot_honour_are_denied_with_a_reason() {
    let s = start().await;
    let tag = s.world.tag.clone();
    cluster_spiffe_id(&s, &format!("{tag}-web"), "web", "web", "").await;
    let kubelet = s.node_client(&s.world.node_a).await;

    let other = s.pod("other", &s.world.node_a, "other").await;
    let spec = s.request_spec(&other, &s.world.node_a, &p256(), None).await;
    let (type_, reason, message, _) = s.ask(&kubelet, spec).await;
    assert_eq!(
        (type_.as_str(), reason.as_str()),
        ("Denied", "NoIdentity"),
        "{message}"
    );
    assert!(
        message.contains(&format!("sigil explain pod {}/other", s.world.ns)),
        "{message}"
    );

    let web = s.pod("web", &s.world.node_a, "web").await;
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let spec = s.request_spec(&web, &s.world.node_a, &ed, None).await;
    let (type_, reason, message, _) = s.ask(&kubelet, spec).await;
    assert_eq!(
        (type_.as_str(), reason.as_str()),
        ("Denied", "UnsupportedKeyType"),
        "{message}"
    );
    assert!(
        message.contains("ED25519") && message.contains("ECDSAP256"),
        "{message}"
    );

    let spec = s
        .request_spec(
            &web,
            &s.world.node_a,
            &p256(),
            Some(json!({"example.com/team": "a"})),
        )
        .await;
    let (type_, reason, message, _) = s.ask(&kubelet, spec).await;
    assert_eq!(
        (type_.as_str(), reason.as_str()),
        ("Denied", "UnsupportedUserAnnotation"),
        "{message}"
    );

    let spec = s
        .request_spec(
            &web,
            &s.world.node_a,
            &p256(),
            Some(json!({"sigil.dev/hint": "nope"})),
        )
        .await;
    let (_, reason, message, _) = s.ask(&kubelet, spec).await;
    assert_eq!(reason, "UnknownHint", "{message}");

    let counted = |reason: &str| {
        s.metrics
            .requests
            .get_or_create(&pod_certificates::OutcomeLabels {
                result: "denied".into(),
                reason: reason.into(),
            })
            .get()
    };
    for reason in [
        "NoIdentity",
        "UnsupportedKeyType",
        "UnsupportedUserAnnotation",
        "UnknownHint",
    ] {
        assert_eq!(counted(reason), 1, "{reason} counted");
    }
}

/// The attacker's requests. A node asking for a pod on another node is refused by
/// NodeRestriction; the same request slipped past admission (created by someone allowed
/// to create requests, as an admin is) is denied by the signer. A replayed request — the
/// same key again — and a request for a pod that was deleted and recreated under the same
/// name are denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_other_nodes_pods_and_replays_are_refused() {
    let s = start().await;
    let tag = s.world.tag.clone();
    cluster_spiffe_id(&s, &format!("{tag}-web"), "web", "web", "").await;
    let kubelet_a = s.node_client(&s.world.node_a).await;
    let admin = s.world.client.clone();

    // Pod on node b; node a asks for it.
    let on_b = s.pod("web-b", &s.world.node_b, "web").await;
    let spec = s.request_spec(&on_b, &s.world.node_a, &p256(), None).await;
    match s.create_request(&kubelet_a, spec.clone()).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "NodeRestriction: {}", e.message),
        other => panic!("node a created a request for node b's pod: {other:?}"),
    }
    let (type_, reason, message, _) = s.ask(&admin, spec).await;
    assert_eq!(
        (type_.as_str(), reason.as_str()),
        ("Denied", "PodMismatch"),
        "{message}"
    );
    assert!(message.contains(&s.world.node_b), "{message}");

    // A request issued, then replayed with the same key.
    let web = s.pod("web", &s.world.node_a, "web").await;
    let key = p256();
    let spec = s.request_spec(&web, &s.world.node_a, &key, None).await;
    let first = s.create_request(&kubelet_a, spec.clone()).await.unwrap();
    assert_eq!(s.answer(&first.name_any()).await.0, "Issued");
    let replay = s.create_request(&kubelet_a, spec.clone()).await.unwrap();
    let (type_, reason, message, _) = s.answer(&replay.name_any()).await;
    assert_eq!(
        (type_.as_str(), reason.as_str()),
        ("Denied", "KeyReused"),
        "{message}"
    );

    // The pod is recreated under the same name: a request naming the old pod's UID is
    // refused by NodeRestriction, and denied by the signer when it gets past admission.
    let pods = Api::<Pod>::namespaced(admin.clone(), &s.world.ns);
    pods.delete("web", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually("pod web gone", WITHIN, || async {
        pods.get_opt("web").await.unwrap().is_none().then_some(())
    })
    .await;
    let again = s.pod("web", &s.world.node_a, "web").await;
    assert_ne!(again.uid(), web.uid());
    let stale = s.request_spec(&web, &s.world.node_a, &p256(), None).await;
    assert!(
        s.create_request(&kubelet_a, stale.clone()).await.is_err(),
        "the old UID is refused at admission"
    );
    let (type_, reason, message, _) = s.ask(&admin, stale).await;
    assert_eq!(
        (type_.as_str(), reason.as_str()),
        ("Denied", "PodMismatch"),
        "{message}"
    );
    assert!(message.contains("recreated"), "{message}");
}

/// A foreign trust domain a ClusterSPIFFEID federates with is published as a
/// ClusterTrustBundle of the signer, labelled with its name; when no ClusterSPIFFEID
/// federates with it any more, the bundle is deleted. (The FederatedBundle's endpoint is
/// unreachable on purpose: its bootstrap bundle is what the operator holds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_bundles_are_cluster_trust_bundles_while_a_clusterspiffeid_federates() {
    let s = start().await;
    let tag = s.world.tag.clone();
    let partner = format!("partner-{tag}.example");
    let ca = sigil_e2e::pki::Ca::new(&format!("{partner} root")).unwrap();
    create(
        &Api::<sigil_operator::crd::federated_bundle::FederatedBundle>::all(s.world.client.clone()),
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "FederatedBundle",
               "metadata": {"name": format!("{tag}-partner"),
                            "labels": {sigil_testkit::trust_domain::INSTANCE_LABEL: tag}},
               "spec": {"trustDomain": partner, "bundleEndpointURL": "https://127.0.0.1:1/bundle",
                        "bundleEndpointProfile": {"type": "https_web"},
                        "trustDomainBundle": ca.cert_pem}}),
    )
    .await;
    let csids = Api::<ClusterSPIFFEID>::all(s.world.client.clone());
    create(
        &csids,
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": format!("{tag}-fed")}, "spec": {
            "trustDomain": s.world.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
            "podSelector": {"matchLabels": {"app": "web"}},
            "federatesWith": [partner],
        }}),
    )
    .await;
    let bundles = Api::<ClusterTrustBundle>::all(s.world.client.clone());
    let name = format!("sigil.dev:{}:federated.{partner}", s.world.td_object);
    let ctb = eventually("the federated ClusterTrustBundle", WITHIN, || async {
        bundles.get_opt(&name).await.unwrap()
    })
    .await;
    assert_eq!(ctb.spec.signer_name.as_deref(), Some(s.signer.as_str()));
    assert_eq!(
        sigil_identity::x509::certs_from_pem(&ctb.spec.trust_bundle).unwrap(),
        sigil_identity::x509::certs_from_pem(&ca.cert_pem).unwrap()
    );
    let labels = ctb.labels();
    assert_eq!(
        labels.get("sigil.dev/bundle").map(String::as_str),
        Some("federated")
    );
    assert_eq!(
        labels.get("sigil.dev/federated-trust-domain"),
        Some(&partner)
    );

    csids
        .delete(&format!("{tag}-fed"), &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the federated ClusterTrustBundle deleted",
        WITHIN,
        || async {
            bundles
                .get_opt(&name)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    // The signer's own bundle stays.
    assert!(
        bundles
            .get_opt(&format!("sigil.dev:{}:bundle", s.world.td_object))
            .await
            .unwrap()
            .is_some()
    );
}

/// The ClusterTrustBundle follows CA rotation: a TrustDomain whose CA lives one minute
/// prepares the next CA at half-life, and the prepared CA is in the ClusterTrustBundle
/// (next to the active one) before it signs anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_trust_bundle_holds_the_next_ca_before_it_signs() {
    use sigil_testkit::trust_domain as td_common;
    let s = start().await;
    let tag = s.world.tag.clone();
    let object = format!("{tag}-fast");
    td_common::create_trust_domain(
        &s.world.client,
        &td_common::trust_domain(
            &object,
            &tag,
            json!({"trustDomain": format!("fast-{tag}.example"), "x509SVIDTTL": "20s", "ca": {"ttl": "1m"},
                   "bundle": {"namespaceSelector": {"matchLabels": {"sigil-test": tag}}}}),
        ),
    )
    .await;
    let bundles = Api::<ClusterTrustBundle>::all(s.world.client.clone());
    let name = format!("sigil.dev:{object}:bundle");
    let first = eventually(
        "the fast TrustDomain's ClusterTrustBundle",
        WITHIN,
        || async {
            let ctb = bundles.get_opt(&name).await.unwrap()?;
            Some(sigil_identity::x509::certs_from_pem(&ctb.spec.trust_bundle).unwrap())
        },
    )
    .await;
    assert_eq!(first.len(), 1, "one CA before the rotation starts");
    let td: sigil_identity::TrustDomain = format!("fast-{tag}.example").parse().unwrap();
    let active = s
        .world
        .replica
        .authorities
        .get(&td)
        .unwrap()
        .x509_ca
        .certificate()
        .to_vec();
    let both = eventually(
        "the prepared CA published",
        Duration::from_secs(60),
        || async {
            let ctb = bundles.get_opt(&name).await.unwrap()?;
            let certs = sigil_identity::x509::certs_from_pem(&ctb.spec.trust_bundle).unwrap();
            (certs.len() == 2).then_some(certs)
        },
    )
    .await;
    assert!(both.contains(&active), "the active CA stays");
    let prepared = both.into_iter().find(|c| *c != active).unwrap();
    assert_eq!(
        s.world
            .replica
            .authorities
            .get(&td)
            .unwrap()
            .x509_ca
            .certificate(),
        active.as_slice(),
        "the prepared CA is published while the first one still signs"
    );
    assert_ne!(prepared, active);
}
