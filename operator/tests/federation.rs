//! FederatedBundle against the real apiserver: the leader fetches a foreign bundle
//! endpoint (a fake one on loopback, switched between good and bad answers), keeps the
//! last good bundle in a ConfigMap, reports status, and the Node API streams the bundle to
//! agents (applied by the agent's own sync code). Our own bundle endpoint and OIDC
//! discovery are checked from the outside with our fetcher and jsonwebtoken.
#![allow(clippy::unwrap_used)]

use sigil_testkit::federation as federation_common;
use sigil_testkit::node_api as node_api_common;
use sigil_testkit::trust_domain as trust_domain_common;

use std::sync::Arc;
use std::time::Duration;

use federation_common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use node_api_common::*;
use serde_json::{Value, json};
use sigil_agent::cache::Cache;
use sigil_agent::node_client::NodeClient;
use sigil_identity::{TrustBundle, TrustDomain};
use sigil_operator::crd::federated_bundle::FederatedBundle;
use sigil_operator::federation::fetch::{self, Profile};
use trust_domain_common::*;

/// A FederatedBundle handled by the world's operator replica.
async fn create_fb(w: &World, name: &str, spec: Value) -> FederatedBundle {
    create(
        &Api::<FederatedBundle>::all(w.client.clone()),
        json!({
            "apiVersion": "sigil.dev/v1alpha1", "kind": "FederatedBundle",
            "metadata": {"name": name, "labels": {INSTANCE_LABEL: w.tag}},
            "spec": spec,
        }),
    )
    .await
}

/// Waits until condition `type_` of FederatedBundle `name` has `reason`; returns the object.
async fn wait_fb(w: &World, name: &str, type_: &str, reason: &str) -> FederatedBundle {
    wait_fb_message(w, name, type_, reason, "").await
}

/// As `wait_fb`, also waiting for the condition's message to contain `needle` (a
/// condition can keep its reason while the message moves on to a new problem).
async fn wait_fb_message(
    w: &World,
    name: &str,
    type_: &str,
    reason: &str,
    needle: &str,
) -> FederatedBundle {
    let api = Api::<FederatedBundle>::all(w.client.clone());
    let what = format!("FederatedBundle {name} {type_} reason {reason} message ~ {needle:?}");
    let last = std::sync::Mutex::new(None);
    let found = tokio::time::timeout(SETTLE, async {
        loop {
            let fb = api.get(name).await.unwrap();
            let hit = fb.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == type_ && c.reason == reason && c.message.contains(needle))
            });
            if hit {
                return fb;
            }
            *last.lock().unwrap() = fb.status.clone();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "timed out waiting for {what}; last status {:?}",
            last.lock().unwrap()
        )
    })
}

/// The agent side: an attested Node API client whose stream is applied to a real agent
/// cache by the agent's own `sync::apply`.
struct AgentView {
    cache: Arc<Cache>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AgentView {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AgentView {
    async fn start(w: &World) -> Self {
        let node: NodeClient = w.attested_agent(&w.node_a).await;
        let cache = Cache::new();
        let mut stream = node.sync_entries(0).await.unwrap();
        let c = cache.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                sigil_agent::sync::apply(&c, &node, msg);
            }
        });
        Self { cache, task }
    }

    /// Waits until the agent holds a bundle for `td` that `f` accepts.
    async fn wait_bundle(
        &self,
        td: &TrustDomain,
        what: &str,
        f: impl Fn(Option<&TrustBundle>) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + SETTLE;
        let mut rx = self.cache.subscribe();
        loop {
            if f(self.cache.bundle(td).as_ref()) {
                return;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!(
                    "timed out waiting for the agent to hold {what}; holds {:?}",
                    self.cache.bundle(td).map(|b| b.sequence)
                );
            }
        }
    }
}

async fn config_map_bundle(w: &World, fb: &str, td: &TrustDomain) -> Option<TrustBundle> {
    let cm = Api::<ConfigMap>::namespaced(w.client.clone(), &w.ns)
        .get_opt(&format!("sigil-federated-{fb}"))
        .await
        .unwrap()?;
    let data = cm.data?;
    TrustBundle::from_jwks_json(td.clone(), data["bundle.spiffe"].as_bytes()).ok()
}

fn status_of(
    fb: &FederatedBundle,
) -> &sigil_operator::crd::federated_bundle::FederatedBundleStatus {
    fb.status.as_ref().unwrap()
}

/// The current reason of `name`'s Ready condition.
async fn ready_reason(w: &World, name: &str) -> String {
    let fb = Api::<FederatedBundle>::all(w.client.clone())
        .get(name)
        .await
        .unwrap();
    ready(&fb).1
}

fn ready(fb: &FederatedBundle) -> (String, String, String) {
    let c = status_of(fb)
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

#[tokio::test]
async fn https_spiffe_bundle_reaches_agents_and_survives_every_bad_answer() {
    let w = World::start("fed").await;
    let mut partner = Foreign::new(&format!("partner-{}.test", w.tag));
    let server_path = "/spire/server";
    let endpoint = FakeEndpoint::start("127.0.0.1", Behaviour::Serve(partner.bundle_json())).await;
    let (chain, key) = partner.svid(server_path);
    endpoint.cert.set(&chain, &key).unwrap();
    let agent = AgentView::start(&w).await;

    // The bootstrap bundle is the partner's first CA alone (no JWT key), as an admin would
    // paste it from `spire-server bundle show`.
    let mut bootstrap = partner.bundle();
    bootstrap.jwt_authorities.clear();
    bootstrap.sequence = None;
    let fb_name = format!("{}-partner", w.tag);
    create_fb(
        &w,
        &fb_name,
        json!({
            "trustDomain": partner.td.name(),
            "bundleEndpointURL": endpoint.url,
            "bundleEndpointProfile": {"type": "https_spiffe", "endpointSPIFFEID": partner.td.id(server_path).unwrap().to_string()},
            "trustDomainBundle": bootstrap.x509_pem(),
            "refreshInterval": "1s",
        }),
    )
    .await;
    let fb = wait_fb(&w, &fb_name, "Ready", "Fetched").await;
    let status = status_of(&fb);
    assert_eq!(status.sequence, Some(1));
    assert_eq!(status.keys, Some(2), "one CA and one JWT key");
    assert!(status.last_fetch.is_some() && status.next_fetch.is_some());
    assert_eq!(status.last_error, None);
    let held = config_map_bundle(&w, &fb_name, &partner.td).await.unwrap();
    assert_eq!(held, partner.bundle());
    agent
        .wait_bundle(&partner.td, "the fetched partner bundle", |b| {
            b == Some(&partner.bundle())
        })
        .await;

    // A rotation on the partner's side reaches the agent within a refresh (hint: 1 s).
    partner.rotate();
    endpoint.set(Behaviour::Serve(partner.bundle_json()));
    let rotated = partner.bundle();
    let started = tokio::time::Instant::now();
    agent
        .wait_bundle(&partner.td, "the rotated partner bundle", |b| {
            b == Some(&rotated)
        })
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the rotation took {:?} to reach the agent with a 1 s refresh hint",
        started.elapsed()
    );
    // The endpoint now presents an SVID from the new CA: it is trusted through the
    // fetched bundle, not the bootstrap one (which only has the first CA).
    let (chain, key) = partner.svid(server_path);
    endpoint.cert.set(&chain, &key).unwrap();
    let hits = endpoint.hits();
    wait_fb(&w, &fb_name, "Ready", "Fetched").await;
    eventually("another successful fetch", SETTLE, || async {
        (endpoint.hits() > hits + 1).then_some(())
    })
    .await;
    assert_eq!(ready_reason(&w, &fb_name).await, "Fetched");

    // Every bad answer: a precise reason and message, while the last good bundle stays
    // in the ConfigMap and on the agent.
    let other = Foreign::new(&format!("other-{}.test", w.tag));
    let wrong_id = partner.svid("/not/the/server");
    // (what, how to make the endpoint answer badly, expected reason, text in the message)
    type BadAnswer<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a str, &'a str);
    let bad: Vec<BadAnswer> = vec![
        (
            "a certificate for the wrong SPIFFE ID",
            Box::new(|| {
                endpoint.cert.set(&wrong_id.0, &wrong_id.1).unwrap();
                endpoint.set(Behaviour::Serve(partner.bundle_json()));
            }),
            "TLSFailed",
            "/not/the/server",
        ),
        (
            "a bundle with the same X.509 authority twice",
            Box::new(|| {
                endpoint.cert.set(&chain, &key).unwrap();
                endpoint.set(Behaviour::Serve(duplicate_key_bundle(&partner)));
            }),
            "InvalidBundle",
            "appears twice",
        ),
        (
            "a bundle with a garbage key",
            Box::new(|| endpoint.set(Behaviour::Serve(garbage_key_bundle()))),
            "InvalidBundle",
            "x5c",
        ),
        (
            "a huge response",
            Box::new(|| endpoint.set(Behaviour::Huge(3 * 1024 * 1024))),
            "TooLarge",
            "larger than",
        ),
        (
            "an endpoint that hangs",
            Box::new(|| endpoint.set(Behaviour::Hang)),
            "Timeout",
            "within",
        ),
        (
            "another trust domain's bundle",
            Box::new(|| {
                let mut doc: Value = serde_json::from_str(&other.bundle_json()).unwrap();
                doc["spiffe_sequence"] = json!(100);
                endpoint.set(Behaviour::Serve(doc.to_string()));
            }),
            "TrustDomainMismatch",
            &*Box::leak(other.td.to_string().into_boxed_str()),
        ),
        (
            "an HTTP error",
            Box::new(|| endpoint.set(Behaviour::Status(503))),
            "HTTPError",
            "503",
        ),
    ];
    for (what, make_bad, reason, needle) in bad {
        make_bad();
        let fb = wait_fb_message(&w, &fb_name, "Ready", reason, needle).await;
        let (st, _, message) = ready(&fb);
        assert_eq!(st, "False", "{what}");
        assert!(
            message.contains(needle),
            "{what}: {message:?} lacks {needle:?}"
        );
        let status = status_of(&fb);
        assert!(
            status.last_error.as_deref().unwrap().contains(needle),
            "{what}"
        );
        assert_eq!(
            status.sequence,
            Some(2),
            "{what}: status still describes the held bundle"
        );
        let available = status
            .conditions
            .iter()
            .find(|c| c.type_ == "BundleAvailable")
            .unwrap();
        assert_eq!(
            (available.status.as_str(), available.reason.as_str()),
            ("True", "Fetched"),
            "{what}"
        );
        assert_eq!(
            config_map_bundle(&w, &fb_name, &partner.td).await.as_ref(),
            Some(&rotated),
            "{what}: the ConfigMap keeps the last good bundle"
        );
        assert_eq!(
            agent.cache.bundle(&partner.td).as_ref(),
            Some(&rotated),
            "{what}: the agent keeps the last good bundle"
        );
        assert_eq!(
            w.replica.federated.get(&partner.td).as_ref(),
            Some(&rotated),
            "{what}"
        );
    }
    // The failures are counted by reason.
    let metrics = {
        let mut registry = prometheus_client::registry::Registry::default();
        w.replica.metrics.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    };
    for reason in [
        "ok",
        "TLSFailed",
        "InvalidBundle",
        "TooLarge",
        "Timeout",
        "TrustDomainMismatch",
    ] {
        assert!(
            metrics.contains(&format!(
                "sigil_federation_fetches_total{{trust_domain=\"{}\",result=\"{reason}\"}}",
                partner.td
            )),
            "no fetch counted as {reason}:\n{metrics}"
        );
    }

    // Back to good: Ready again, with an Event trail.
    endpoint.set(Behaviour::Serve(partner.bundle_json()));
    wait_fb(&w, &fb_name, "Ready", "Fetched").await;

    // Deleting the FederatedBundle drops the bundle from agents at once (no garbage
    // collector runs in this control plane; the loader does not wait for one).
    Api::<FederatedBundle>::all(w.client.clone())
        .delete(&fb_name, &DeleteParams::default())
        .await
        .unwrap();
    agent
        .wait_bundle(&partner.td, "no partner bundle", |b| b.is_none())
        .await;
    assert!(
        agent.cache.bundle(&w.td).is_some(),
        "the agent's own bundle stays"
    );
}

#[tokio::test]
async fn https_web_with_a_private_ca_follows_redirects_and_checks_the_host() {
    let w = World::start("fedweb").await;
    let partner = Foreign::new(&format!("web-{}.test", w.tag));
    let pki = sigil_e2e::pki::Ca::new("partner web CA").unwrap();
    let serving = pki.serving_for("partner", &["localhost"]).unwrap();
    let endpoint = FakeEndpoint::start("localhost", Behaviour::Serve(partner.bundle_json())).await;
    endpoint
        .cert
        .set_pem(serving.cert_pem.as_bytes(), serving.key_pem.as_bytes())
        .unwrap();
    Api::<Secret>::namespaced(w.client.clone(), &w.ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "partner-ca"}, "stringData": {"ca.crt": pki.cert_pem}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let fb_name = format!("{}-web", w.tag);
    create_fb(
        &w,
        &fb_name,
        json!({
            "trustDomain": partner.td.name(),
            "bundleEndpointURL": endpoint.url,
            "bundleEndpointProfile": {"type": "https_web", "caBundleSecretRef": {"name": "partner-ca"}},
            "refreshInterval": "1s",
        }),
    )
    .await;
    let fb = wait_fb(&w, &fb_name, "Ready", "Fetched").await;
    assert_eq!(status_of(&fb).keys, Some(2));
    assert_eq!(w.replica.federated.get(&partner.td), Some(partner.bundle()));

    // A redirect to another path on the same endpoint is followed under the same checks.
    endpoint.set(Behaviour::Redirect {
        location: "/moved/bundle".into(),
        body: partner.bundle_json(),
    });
    let hits = endpoint.hits();
    eventually("fetches through the redirect", SETTLE, || async {
        (endpoint.hits() >= hits + 4).then_some(())
    })
    .await;
    assert_eq!(ready_reason(&w, &fb_name).await, "Fetched");
    // A redirect to plain http is refused.
    endpoint.set(Behaviour::Redirect {
        location: format!("http://localhost:{}/", endpoint.port),
        body: partner.bundle_json(),
    });
    let fb = wait_fb(&w, &fb_name, "Ready", "RedirectRefused").await;
    assert!(ready(&fb).2.contains("only https"), "{:?}", ready(&fb));

    // The certificate must name the URL's host: one for another name fails, and the
    // bundle held stays.
    let elsewhere = pki.serving_for("elsewhere", &["elsewhere.test"]).unwrap();
    endpoint
        .cert
        .set_pem(elsewhere.cert_pem.as_bytes(), elsewhere.key_pem.as_bytes())
        .unwrap();
    endpoint.set(Behaviour::Serve(partner.bundle_json()));
    let fb = wait_fb(&w, &fb_name, "Ready", "TLSFailed").await;
    assert!(
        ready(&fb).2.to_lowercase().contains("certificate"),
        "{:?}",
        ready(&fb)
    );
    assert_eq!(w.replica.federated.get(&partner.td), Some(partner.bundle()));

    // A missing CA bundle Secret is named, with the fix.
    Api::<FederatedBundle>::all(w.client.clone())
        .patch(
            &fb_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"bundleEndpointProfile": {"caBundleSecretRef": {"name": "no-such-secret"}}}})),
        )
        .await
        .unwrap();
    let fb = wait_fb(&w, &fb_name, "Ready", "CABundleSecretNotFound").await;
    let message = ready(&fb).2;
    assert!(
        message.contains("caBundleSecretRef") && message.contains("no-such-secret"),
        "{message}"
    );
}

#[tokio::test]
async fn spec_problems_are_reported_on_the_object() {
    let w = World::start("fedspec").await;
    let partner = Foreign::new(&format!("dup-{}.test", w.tag));
    let endpoint = FakeEndpoint::start("127.0.0.1", Behaviour::Serve(partner.bundle_json())).await;
    let (chain, key) = partner.svid("/server");
    endpoint.cert.set(&chain, &key).unwrap();
    let spec = json!({
        "trustDomain": partner.td.name(),
        "bundleEndpointURL": endpoint.url,
        "bundleEndpointProfile": {"type": "https_spiffe", "endpointSPIFFEID": partner.td.id("/server").unwrap().to_string()},
        "refreshInterval": "1s",
    });

    // https_spiffe without a bootstrap bundle: nothing to authenticate the endpoint with.
    let first = format!("{}-first", w.tag);
    create_fb(&w, &first, spec.clone()).await;
    let fb = wait_fb(&w, &first, "Ready", "NoBundle").await;
    assert!(
        ready(&fb).2.contains("spec.trustDomainBundle"),
        "{:?}",
        ready(&fb)
    );
    let available = status_of(&fb)
        .conditions
        .iter()
        .find(|c| c.type_ == "BundleAvailable")
        .unwrap();
    assert_eq!(
        (available.status.as_str(), available.reason.as_str()),
        ("False", "NoBundle")
    );
    assert_eq!(
        endpoint.hits(),
        0,
        "no request without a way to authenticate the endpoint"
    );

    // A second FederatedBundle for the same trust domain is refused: bundles are never merged.
    let second = format!("{}-second", w.tag);
    let mut with_bootstrap = spec.clone();
    with_bootstrap["trustDomainBundle"] = json!(partner.bundle_json());
    create_fb(&w, &second, with_bootstrap).await;
    let fb = wait_fb(&w, &second, "Ready", "DuplicateTrustDomain").await;
    assert!(ready(&fb).2.contains(&first), "{:?}", ready(&fb));

    // A FederatedBundle for our own trust domain is refused.
    let local = format!("{}-local", w.tag);
    let mut local_spec = spec.clone();
    local_spec["trustDomain"] = json!(w.td.name());
    create_fb(&w, &local, local_spec).await;
    wait_fb(&w, &local, "Ready", "LocalTrustDomain").await;

    // Fixing the first one (a bootstrap bundle) makes it fetch at once.
    Api::<FederatedBundle>::all(w.client.clone())
        .patch(
            &first,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"trustDomainBundle": partner.bundle().x509_pem()}})),
        )
        .await
        .unwrap();
    wait_fb(&w, &first, "Ready", "Fetched").await;

    // Admission refuses what CEL can check, naming the field.
    let err = Api::<FederatedBundle>::all(w.client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "sigil.dev/v1alpha1", "kind": "FederatedBundle",
                "metadata": {"name": format!("{}-bad", w.tag)},
                "spec": {"trustDomain": "x.test", "bundleEndpointURL": "http://x.test", "bundleEndpointProfile": {"type": "https_spiffe"}},
            }))
            .unwrap(),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("spec.bundleEndpointURL must be an https:// URL"),
        "{text}"
    );
    assert!(text.contains("endpointSPIFFEID is required"), "{text}");
}

#[tokio::test]
async fn our_bundle_endpoint_and_oidc_discovery_serve_the_current_keys() {
    // The TrustDomain controller runs on a manual clock, so the test can bring the JWT
    // key to its half-life (when the next key is prepared and published).
    let clock = sigil_identity::clock::ManualClock::new(std::time::SystemTime::now());
    let w = World::start_with(
        "fedout",
        WorldOptions {
            clock: Arc::new(clock.clone()),
            ..WorldOptions::default()
        },
    )
    .await;
    let issuer = format!("https://oidc.{}.example.org/sigil", w.tag);
    Api::<sigil_operator::crd::trust_domain::TrustDomain>::all(w.client.clone())
        .patch(
            &w.td_object,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"jwt": {"issuer": issuer}}})),
        )
        .await
        .unwrap();
    eventually("the JWT issuer to be loaded", SETTLE, || async {
        w.replica
            .authorities
            .get(&w.td)
            .filter(|a| a.jwt_issuer.as_deref() == Some(issuer.as_str()))
    })
    .await;

    let (url, _stop) = w.serve_bundle_endpoint().await;

    // A peer fetches our bundle as https_spiffe: the endpoint's SVID is exactly
    // spiffe://<td>/sigil/bundle-endpoint, verified with the bundle it holds for us.
    let ours = w.replica.authorities.get(&w.td).unwrap().bundle.clone();
    let profile = Profile::Spiffe {
        id: w.td.id("/sigil/bundle-endpoint").unwrap(),
        trust: ours.clone(),
    };
    let fetched = eventually("our bundle endpoint", SETTLE, || async {
        fetch::fetch(&url, &profile, &w.td, Duration::from_secs(5))
            .await
            .ok()
    })
    .await;
    assert_eq!(fetched, ours);
    assert!(
        fetched.sequence.is_some() && fetched.refresh_hint.is_some(),
        "spiffe_sequence and spiffe_refresh_hint are served"
    );
    // Expecting another ID fails the handshake: the endpoint is not someone else.
    let wrong = Profile::Spiffe {
        id: w.td.id("/sigil/operator").unwrap(),
        trust: ours.clone(),
    };
    let e = fetch::fetch(&url, &wrong, &w.td, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "TLSFailed", "{e}");

    // SPIFFE_Federation.md 5.2.2.3: UTF-8 JSON with Content-Type application/json;
    // X509-SVID.md 6.1: x509-svid entries have no kid and exactly one x5c certificate;
    // SPIFFE_Trust_Domain_and_Bundle.md 4.2: every element has kty and use.
    let http = reqwest_like(&ours);
    let (status, content_type, body) = http.request_typed(&format!("{url}/")).await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/json");
    let doc: Value = serde_json::from_slice(&body).unwrap();
    for key in doc["keys"].as_array().unwrap() {
        assert!(key["kty"].as_str().is_some_and(|k| !k.is_empty()), "{key}");
        match key["use"].as_str() {
            Some("x509-svid") => {
                assert!(
                    key.get("kid").is_none(),
                    "x509-svid entry with a kid: {key}"
                );
                assert_eq!(key["x5c"].as_array().unwrap().len(), 1, "{key}");
            }
            Some("jwt-svid") => assert!(key["kid"].is_string(), "{key}"),
            other => panic!("unexpected use {other:?}: {key}"),
        }
    }

    // A foreign trust domain running go-spiffe: its federation client fetches our bundle
    // endpoint (https_spiffe, bootstrapped with our bundle), and its own validators accept
    // an X509-SVID and a JWT-SVID we issued, verified against the bundle it fetched.
    let authority = w.replica.authorities.get(&w.td).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key =
        sigil_identity::keys::PrivateKey::generate(sigil_identity::keys::KeyType::EcP256).unwrap();
    let id = w.td.id("/ns/prod/sa/api").unwrap();
    let issued = authority
        .x509_ca
        .sign_public_key(
            &key.public_key_der(),
            &sigil_identity::ca::SvidTemplate {
                spiffe_id: &id,
                ttl: Duration::from_secs(600),
                dns_names: &[],
            },
            std::time::SystemTime::now(),
        )
        .unwrap();
    let mut chain = vec![issued.leaf.clone()];
    chain.extend(issued.intermediates.clone());
    let svid_file = dir.path().join("svid.pem");
    std::fs::write(&svid_file, sigil_identity::x509::certs_to_pem(&chain)).unwrap();
    let bundle_file = dir.path().join("bundle.json");
    std::fs::write(&bundle_file, ours.to_jwks_json()).unwrap();
    let token = authority
        .jwt_key
        .mint(
            &id,
            &["partner-api".into()],
            Duration::from_secs(300),
            std::time::SystemTime::now(),
            None,
        )
        .unwrap();
    let out = tokio::process::Command::new(sigil_e2e::tools::tool("go-spiffe-client").unwrap())
        .args([
            "fetch-bundle",
            "-url",
            &url,
            "-trust-domain",
            w.td.name(),
            "-endpoint-id",
            &w.td.id("/sigil/bundle-endpoint").unwrap().to_string(),
            "-bundle-file",
            bundle_file.to_str().unwrap(),
            "-svid-file",
            svid_file.to_str().unwrap(),
            "-token",
            &token,
            "-audience",
            "partner-api",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "go-spiffe refused our bundle endpoint or SVIDs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["trust_domain"], json!(w.td.name()));
    assert_eq!(got["x509_verified"], json!(id.to_string()));
    assert_eq!(got["jwt_verified"], json!(id.to_string()));
    assert_eq!(
        got["x509_authorities"],
        json!(ours.x509_authorities.len()),
        "{got}"
    );
    assert_eq!(got["jwt_authorities"], json!(ours.jwt_authorities.len()));
    assert_eq!(got["sequence"], json!(ours.sequence.unwrap()));

    // OIDC discovery at the issuer's path, over the same listener.
    let config: Value = serde_json::from_slice(
        &http
            .get(&format!("{url}/sigil/.well-known/openid-configuration"))
            .await,
    )
    .unwrap();
    assert_eq!(config["issuer"], json!(issuer));
    assert_eq!(config["jwks_uri"], json!(format!("{issuer}/keys")));
    assert!(
        config["id_token_signing_alg_values_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("ES256"))
    );
    let keys: Value =
        serde_json::from_slice(&http.get(&format!("{url}/sigil/keys")).await).unwrap();
    let keys = keys["keys"].as_array().unwrap().clone();
    let authority = w.replica.authorities.get(&w.td).unwrap();
    assert_eq!(keys.len(), authority.bundle.jwt_authorities.len());
    assert!(
        keys.iter()
            .all(|k| k["use"] == json!("sig") && k["alg"].is_string() && k["x5c"].is_null())
    );

    // A JWT-SVID the Node API mints verifies with those keys, and carries the issuer, as
    // a cloud IAM would check it.
    let agent = w.attested_agent(&w.node_a).await;
    w.pod("oidc", &w.node_a, "web", json!({"app": "oidc"}))
        .await;
    w.cluster_spiffe_id(&format!("{}-oidc", w.tag), "oidc")
        .await;
    let entry = eventually("the entry for the oidc pod", SETTLE, || async {
        let mut stream = agent.sync_entries(0).await.ok()?;
        let msg = stream.next().await?.ok()?;
        msg.upserts
            .into_iter()
            .find(|e| e.spiffe_id.ends_with("/sa/web"))
    })
    .await;
    let (token, _) = agent
        .mint_jwt(&entry.id, &["sts.amazonaws.com".to_owned()])
        .await
        .unwrap();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let jwk = keys
        .iter()
        .find(|k| k["kid"] == json!(header.kid.clone().unwrap()))
        .unwrap();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&["sts.amazonaws.com"]);
    validation.set_issuer(&[issuer.as_str()]);
    let claims = jsonwebtoken::decode::<Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
        &validation,
    )
    .unwrap();
    assert_eq!(claims.claims["sub"], json!(entry.spiffe_id));

    // A JWT key rotation shows up in /keys: with keyType ECDSA-P384, the next key (prepared
    // at half of the 24 h default lifetime) is an ES384 key.
    let before: Vec<String> = keys
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();
    Api::<sigil_operator::crd::trust_domain::TrustDomain>::all(w.client.clone())
        .patch(
            &w.td_object,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"jwt": {"keyType": "ECDSA-P384"}}})),
        )
        .await
        .unwrap();
    eventually("the P-384 key type to be loaded", SETTLE, || async {
        Api::<sigil_operator::crd::trust_domain::TrustDomain>::all(w.client.clone())
            .get(&w.td_object)
            .await
            .ok()
            .filter(|td| {
                td.status.as_ref().and_then(|s| s.observed_generation) == td.metadata.generation
            })
    })
    .await;
    clock.advance(Duration::from_secs(12 * 3600 + 60));
    w.replica.resync.trigger();
    let after = eventually("a new JWT key in /keys", SETTLE, || async {
        let keys: Value =
            serde_json::from_slice(&http.get(&format!("{url}/sigil/keys")).await).ok()?;
        let kids: Vec<String> = keys["keys"]
            .as_array()?
            .iter()
            .map(|k| k["kid"].as_str().unwrap_or_default().to_owned())
            .collect();
        kids.iter().any(|k| !before.contains(k)).then_some(keys)
    })
    .await;
    assert!(
        after["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["alg"] == json!("ES384")),
        "{after}"
    );

    // Anything else is refused with a precise status.
    assert_eq!(http.status(&format!("{url}/nope")).await, 404);
}

/// A tiny HTTPS GET client trusting our endpoint by SPIFFE ID (what a peer would run).
struct SpiffeGet {
    bundle: TrustBundle,
}

fn reqwest_like(bundle: &TrustBundle) -> SpiffeGet {
    SpiffeGet {
        bundle: bundle.clone(),
    }
}

impl SpiffeGet {
    async fn request(&self, url: &str) -> (u16, Vec<u8>) {
        let (status, _, body) = self.request_typed(url).await;
        (status, body)
    }

    /// Status, Content-Type and body of a GET.
    async fn request_typed(&self, url: &str) -> (u16, String, Vec<u8>) {
        use http_body_util::BodyExt;
        let uri: http::Uri = url.parse().unwrap();
        let mut set = sigil_identity::BundleSet::new();
        set.upsert(self.bundle.clone());
        let verifier = sigil_identity::tls::SpiffeServerVerifier::new(
            Arc::new(set),
            sigil_identity::tls::Authorizer::Any,
        );
        let mut tls = rustls::ClientConfig::builder_with_provider(sigil_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect((uri.host().unwrap(), uri.port_u16().unwrap()))
            .await
            .unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(
                rustls::pki_types::ServerName::try_from(uri.host().unwrap().to_owned()).unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let response = sender
            .send_request(
                http::Request::get(uri.path())
                    .header("host", uri.host().unwrap())
                    .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, content_type, body)
    }

    async fn get(&self, url: &str) -> Vec<u8> {
        let (status, body) = self.request(url).await;
        assert_eq!(status, 200, "GET {url}: {}", String::from_utf8_lossy(&body));
        body
    }

    async fn status(&self, url: &str) -> u16 {
        self.request(url).await.0
    }
}

/// Without the grant to keep the fetched bundle in its ConfigMap, the object says so,
/// names the grant, and agents keep the bootstrap bundle.
#[tokio::test]
async fn a_missing_config_map_grant_is_reported_on_the_object() {
    let admin = client().await;
    let ns = namespace("fed-rbac").await;
    let instance = unique("fedrbac");
    let role = format!("sigil-fed-{instance}");
    let rbac: Vec<(bool, Value)> = vec![
        (
            false,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": role}, "rules": [
                {"apiGroups": ["sigil.dev"], "resources": ["trustdomains", "federatedbundles"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["sigil.dev"], "resources": ["trustdomains/status", "federatedbundles/status"], "verbs": ["get", "patch", "update"]},
                {"apiGroups": [""], "resources": ["namespaces", "configmaps"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
            ]}),
        ),
        (
            false,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": role},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "sigil-operator", "namespace": ns}]}),
        ),
        (
            true,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "leases"}, "rules": [
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
            ]}),
        ),
        (
            true,
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "leases"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "leases"},
            "subjects": [{"kind": "ServiceAccount", "name": "sigil-operator", "namespace": ns}]}),
        ),
    ];
    for (namespaced, body) in rbac {
        let kind = body["kind"].as_str().unwrap().to_owned();
        let gvk = kube::core::GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", &kind);
        let ar = kube::core::ApiResource::from_gvk(&gvk);
        let api: Api<kube::core::DynamicObject> = if namespaced {
            Api::namespaced_with(admin.clone(), &ns, &ar)
        } else {
            Api::all_with(admin.clone(), &ar)
        };
        api.create(
            &PostParams::default(),
            &serde_json::from_value(body).unwrap(),
        )
        .await
        .unwrap();
    }
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "sigil-operator"}})).unwrap(),
        )
        .await
        .unwrap();
    let sa = service_account_client(&ns, "sigil-operator").await;
    let replica = Replica::start(sa, ReplicaConfig::new(&ns, &instance));

    let partner = Foreign::new(&format!("partner-{instance}.test"));
    let endpoint = FakeEndpoint::start("127.0.0.1", Behaviour::Serve(partner.bundle_json())).await;
    let (chain, key) = partner.svid("/spire/server");
    endpoint.cert.set(&chain, &key).unwrap();
    let name = format!("{instance}-partner");
    let fbs = Api::<FederatedBundle>::all(admin.clone());
    create(
        &fbs,
        json!({
            "apiVersion": "sigil.dev/v1alpha1", "kind": "FederatedBundle",
            "metadata": {"name": name, "labels": {INSTANCE_LABEL: instance}},
            "spec": {
                "trustDomain": partner.td.name(),
                "bundleEndpointURL": endpoint.url,
                "bundleEndpointProfile": {"type": "https_spiffe", "endpointSPIFFEID": partner.td.id("/spire/server").unwrap().to_string()},
                "trustDomainBundle": partner.bundle().x509_pem(),
            },
        }),
    )
    .await;
    let fb = eventually("Ready=False ConfigMapForbidden", SETTLE, || async {
        fbs.get(&name).await.ok().filter(|fb| {
            fb.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.reason == "ConfigMapForbidden")
            })
        })
    })
    .await;
    let status = fb.status.unwrap();
    let message = &status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message;
    assert!(
        message.contains(&format!("ConfigMap {ns}/sigil-federated-{name}"))
            && message.contains("grant its ServiceAccount get, create and update on configmaps"),
        "{message}"
    );
    let available = status
        .conditions
        .iter()
        .find(|c| c.type_ == "BundleAvailable")
        .unwrap();
    assert_eq!(available.reason, "Bootstrap", "{available:?}");
    let mut registry = prometheus_client::registry::Registry::default();
    replica.metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.lines().any(|l| l.contains("reconcile_errors")
            && l.contains("federated_bundle")
            && l.contains("reason=\"ConfigMapForbidden\"")),
        "counted: {text}"
    );
    replica.stop().await;
}
