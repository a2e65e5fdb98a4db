//! Bad input never damages anything and is never silent: each case is refused at
//! admission with a message naming the field and the fix, or reported as a condition with
//! its own reason plus a Warning Event, while whatever already issues keeps issuing.
#![allow(clippy::unwrap_used)]

use sigil_testkit::trust_domain as trust_domain_common;

use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use sigil_identity::TrustDomain as TdName;
use sigil_operator::crd::trust_domain::TrustDomain;
use trust_domain_common::*;

/// Creating this TrustDomain must fail at admission with a message containing `needle`.
async fn refused(client: &Client, spec: serde_json::Value, needle: &str) {
    use kube::core::{ApiResource, DynamicObject};
    let name = unique("refused");
    let ar = ApiResource::erase::<TrustDomain>(&());
    let obj: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "sigil.dev/v1alpha1",
        "kind": "TrustDomain",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    let err = Api::<DynamicObject>::all_with(client.clone(), &ar)
        .create(&PostParams::default(), &obj)
        .await
        .expect_err(&format!("apiserver accepted {spec}"));
    let kube::Error::Api(status) = &err else {
        panic!("unexpected error {err}")
    };
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains(needle),
        "message {:?} lacks {needle:?}",
        status.message
    );
}

#[tokio::test]
async fn malformed_trust_domains_and_fields_are_refused_at_admission() {
    let client = client().await;
    for bad in [
        "Example.org",
        "example.org:8443",
        "example.org/path",
        "spiffe://example.org",
        "exa mple.org",
    ] {
        refused(
            &client,
            serde_json::json!({"trustDomain": bad}),
            "is not a trust domain name",
        )
        .await;
    }
    refused(
        &client,
        serde_json::json!({"trustDomain": ""}),
        "spec.trustDomain",
    )
    .await;
    refused(
        &client,
        serde_json::json!({"trustDomain": "example.org", "x509SVIDTTL": "1d"}),
        "Go duration",
    )
    .await;
    // An upstream is either a Secret Sigil holds or a cert-manager issuer, never both or
    // neither.
    for upstream in [
        serde_json::json!({}),
        serde_json::json!({"secretRef": {"name": "ca"}, "certManager": {"issuerRef": {"name": "ca"}}}),
    ] {
        refused(
            &client,
            serde_json::json!({"trustDomain": "example.org", "upstreamAuthority": upstream}),
            "needs exactly one of secretRef",
        )
        .await;
    }
    refused(
        &client,
        serde_json::json!({"trustDomain": "example.org", "upstreamAuthority": {"certManager": {"issuerRef": {"name": "ca", "kind": "Vault"}}}}),
        "ClusterIssuer",
    )
    .await;
    refused(
        &client,
        serde_json::json!({"trustDomain": "example.org", "ca": {"ttl": "30s"}}),
        "spec.ca.ttl must be at least 1m",
    )
    .await;
    refused(&client, serde_json::json!({"trustDomain": "example.org", "ca": {"ttl": "24h", "activationDelay": "12h"}}), "spec.ca.activationDelay must be shorter than half").await;
    refused(
        &client,
        serde_json::json!({"trustDomain": "example.org", "ca": {"keyType": "RSA"}}),
        "keyType",
    )
    .await;
    refused(
        &client,
        serde_json::json!({"trustDomain": "example.org", "jwt": {"keyType": "Ed25519"}}),
        "keyType",
    )
    .await;
    refused(&client, serde_json::json!({"trustDomain": "example.org", "jwt": {"issuer": "http://oidc.example.org"}}), "spec.jwt.issuer must be an https:// URL").await;
    // An RSA size Sigil does not make: the message names the field and every choice.
    refused(
        &client,
        serde_json::json!({"trustDomain": "example.org", "ca": {"keyType": "RSA-1024"}}),
        r#"spec.ca.keyType: Unsupported value: "RSA-1024": supported values: "ECDSA-P256", "ECDSA-P384", "Ed25519", "RSA-2048", "RSA-3072", "RSA-4096""#,
    )
    .await;
    refused(
        &client,
        serde_json::json!({"trustDomain": "example.org", "jwt": {"algorithm": "HS256"}}),
        r#"spec.jwt.algorithm: Unsupported value: "HS256": supported values: "ES256", "ES384", "RS256", "PS256""#,
    )
    .await;
    for (key_type, alg) in [
        ("ECDSA-P256", "RS256"),
        ("RSA-2048", "ES256"),
        ("ECDSA-P256", "ES384"),
    ] {
        refused(
            &client,
            serde_json::json!({"trustDomain": "example.org", "jwt": {"keyType": key_type, "algorithm": alg}}),
            "spec.jwt.algorithm does not fit spec.jwt.keyType: ES256 needs ECDSA-P256, ES384 needs ECDSA-P384, RS256 and PS256 need RSA-2048, RSA-3072 or RSA-4096",
        )
        .await;
    }
    refused(
        &client,
        serde_json::json!({"trustDomain": "example.org", "bundle": {"configMapName": "Bad_Name"}}),
        "DNS-1123",
    )
    .await;

    // The trust domain is immutable.
    let name = unique("immutable");
    let api = Api::<TrustDomain>::all(client.clone());
    api.create(
        &PostParams::default(),
        &trust_domain(
            &name,
            "none",
            serde_json::json!({"trustDomain": "example.org"}),
        ),
    )
    .await
    .unwrap();
    let err = api
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"trustDomain": "other.org"}})),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("spec.trustDomain is immutable"),
        "{err}"
    );
    // Defaults are filled in by the apiserver.
    let td = api.get(&name).await.unwrap();
    assert_eq!(td.spec.x509_svid_ttl.0, "1h");
    assert_eq!(td.spec.ca.ttl.0, "24h");
    assert_eq!(td.spec.bundle.config_map_name, "sigil-trust-bundle");
    assert_eq!((td.spec.jwt.key_type, td.spec.jwt.algorithm), (None, None));

    // RSA keys and algorithms that fit are accepted.
    let name = unique("rsa");
    api.create(
        &PostParams::default(),
        &trust_domain(
            &name,
            "none",
            serde_json::json!({"trustDomain": "rsa.example.org", "ca": {"keyType": "RSA-4096"}, "jwt": {"keyType": "RSA-3072", "algorithm": "PS256"}}),
        ),
    )
    .await
    .unwrap();
}

/// Starts a replica and creates a TrustDomain with an upstream Secret reference; returns
/// (namespace, TrustDomain name, replica).
async fn with_upstream(
    client: &Client,
    test: &str,
    secret: Option<Secret>,
) -> (String, String, Replica) {
    let ns = namespace(test).await;
    let instance = unique(test);
    if let Some(s) = secret {
        Api::<Secret>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &s)
            .await
            .unwrap();
    }
    let replica = Replica::start(client.clone(), ReplicaConfig::new(&ns, &instance));
    let name = unique("td");
    create_trust_domain(
        client,
        &trust_domain(
            &name,
            &instance,
            serde_json::json!({
                "trustDomain": format!("{test}.example.org"),
                "upstreamAuthority": {"secretRef": {"name": "upstream"}},
                "bundle": {"namespaceSelector": {"matchLabels": {"none": "none"}}},
            }),
        ),
    )
    .await;
    (ns, name, replica)
}

fn upstream_secret(entries: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("upstream".into()),
            ..Default::default()
        },
        data: Some(
            entries
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

struct Pki {
    root: String,
    cert: String,
    key: String,
}

/// Root → issuing certificate; `is_ca` and `valid_for` shape the issuing certificate.
fn pki(valid_for: time::Duration, is_ca: bool) -> Pki {
    let p = sigil_e2e::pki::upstream_pki(valid_for, is_ca).unwrap();
    Pki {
        root: p.root_pem,
        cert: p.intermediate_pem,
        key: p.intermediate_key_pem,
    }
}

/// Asserts the reported problem: Ready=False with `reason` (and Issuing=False, since no CA
/// exists yet), a Warning Event with the same reason, and no CA minted.
async fn assert_reported(client: &Client, ns: &str, name: &str, reason: &str, needle: &str) {
    let td = wait_condition(client, name, "Ready", "False", reason).await;
    let (_, issuing_reason, _) = condition(&td, "Issuing").unwrap();
    assert_eq!(issuing_reason, reason);
    let (_, _, message) = condition(&td, "Ready").unwrap();
    assert!(
        message.contains(name) && message.contains(needle),
        "message {message:?} lacks the object or {needle:?}"
    );
    let note = wait_warning_event(client, name, reason).await;
    assert!(note.contains(needle), "{note}");
    assert!(
        ca_secret(client, ns, name).await.is_none(),
        "a CA was minted despite the bad upstream"
    );
}

/// This test binary's apiserver has no cert-manager CRDs: a certManager upstream says so,
/// with no CA minted, and nothing else in the operator stops (no watch on them exists).
#[tokio::test]
async fn cert_manager_upstream_without_cert_manager_says_so() {
    let client = client().await;
    let ns = namespace("cm-absent").await;
    let instance = unique("cm-absent");
    let replica = Replica::start(client.clone(), ReplicaConfig::new(&ns, &instance));
    let name = unique("td");
    create_trust_domain(
        &client,
        &trust_domain(
            &name,
            &instance,
            serde_json::json!({
                "trustDomain": "cm-absent.example.org",
                "upstreamAuthority": {"certManager": {"issuerRef": {"name": "enterprise", "kind": "ClusterIssuer"}}},
                "bundle": {"namespaceSelector": {"matchLabels": {"none": "none"}}},
            }),
        ),
    )
    .await;
    assert_reported(
        &client,
        &ns,
        &name,
        "CertManagerNotInstalled",
        "install cert-manager",
    )
    .await;
    let td = wait_condition(
        &client,
        &name,
        "CertificateRequest",
        "False",
        "CertManagerNotInstalled",
    )
    .await;
    assert!(td.status.unwrap().active_ca.is_none());
    // The same replica still issues for a self-signed TrustDomain.
    let plain = unique("td");
    create_trust_domain(
        &client,
        &trust_domain(
            &plain,
            &instance,
            serde_json::json!({
                "trustDomain": "cm-absent-plain.example.org",
                "bundle": {"namespaceSelector": {"matchLabels": {"none": "none"}}},
            }),
        ),
    )
    .await;
    wait_condition(&client, &plain, "Ready", "True", "BundlePublished").await;
    replica.stop().await;
}

#[tokio::test]
async fn upstream_secret_not_found() {
    let client = client().await;
    let (ns, name, replica) = with_upstream(&client, "up-missing", None).await;
    assert_reported(
        &client,
        &ns,
        &name,
        "UpstreamSecretNotFound",
        "does not exist",
    )
    .await;
    replica.stop().await;
}

#[tokio::test]
async fn upstream_secret_missing_a_key() {
    let client = client().await;
    let p = pki(time::Duration::days(30), true);
    let (ns, name, replica) = with_upstream(
        &client,
        "up-nokey",
        Some(upstream_secret(&[
            ("tls.crt", &p.cert),
            ("ca.crt", &p.root),
        ])),
    )
    .await;
    assert_reported(
        &client,
        &ns,
        &name,
        "UpstreamSecretMissingKey",
        "privateKeyKey",
    )
    .await;
    replica.stop().await;
}

#[tokio::test]
async fn upstream_certificate_is_not_a_ca() {
    let client = client().await;
    let p = pki(time::Duration::days(30), false);
    let (ns, name, replica) = with_upstream(
        &client,
        "up-notca",
        Some(upstream_secret(&[
            ("tls.crt", &p.cert),
            ("tls.key", &p.key),
            ("ca.crt", &p.root),
        ])),
    )
    .await;
    assert_reported(&client, &ns, &name, "UpstreamNotCA", "is not a CA").await;
    replica.stop().await;
}

#[tokio::test]
async fn upstream_key_does_not_match() {
    let client = client().await;
    let p = pki(time::Duration::days(30), true);
    let other = pki(time::Duration::days(30), true);
    let (ns, name, replica) = with_upstream(
        &client,
        "up-mismatch",
        Some(upstream_secret(&[
            ("tls.crt", &p.cert),
            ("tls.key", &other.key),
            ("ca.crt", &p.root),
        ])),
    )
    .await;
    assert_reported(&client, &ns, &name, "UpstreamKeyMismatch", "does not match").await;
    replica.stop().await;
}

#[tokio::test]
async fn upstream_certificate_expired() {
    let client = client().await;
    let p = pki(time::Duration::hours(-1), true);
    let (ns, name, replica) = with_upstream(
        &client,
        "up-expired",
        Some(upstream_secret(&[
            ("tls.crt", &p.cert),
            ("tls.key", &p.key),
            ("ca.crt", &p.root),
        ])),
    )
    .await;
    assert_reported(&client, &ns, &name, "UpstreamExpired", "expired").await;
    replica.stop().await;
}

#[tokio::test]
async fn upstream_certificate_expires_before_the_ca_ttl() {
    let client = client().await;
    let p = pki(time::Duration::hours(6), true);
    let (ns, name, replica) = with_upstream(
        &client,
        "up-short",
        Some(upstream_secret(&[
            ("tls.crt", &p.cert),
            ("tls.key", &p.key),
            ("ca.crt", &p.root),
        ])),
    )
    .await;
    assert_reported(
        &client,
        &ns,
        &name,
        "UpstreamExpiresTooSoon",
        "renew the upstream certificate",
    )
    .await;
    replica.stop().await;
}

/// A working upstream that breaks later: reported, but the CA already issued keeps
/// signing, and nothing is revoked.
#[tokio::test]
async fn broken_upstream_keeps_the_existing_ca_signing() {
    let client = client().await;
    let good = pki(time::Duration::days(30), true);
    let (ns, name, replica) = with_upstream(
        &client,
        "up-breaks",
        Some(upstream_secret(&[
            ("tls.crt", &good.cert),
            ("tls.key", &good.key),
            ("ca.crt", &good.root),
        ])),
    )
    .await;
    let td = wait_condition(&client, &name, "Ready", "True", "BundlePublished").await;
    let serial = td.status.unwrap().active_ca.unwrap().serial;
    let secret_before = ca_secret(&client, &ns, &name).await.unwrap();

    let bad = pki(time::Duration::days(30), false);
    let broken = upstream_secret(&[
        ("tls.crt", &bad.cert),
        ("tls.key", &bad.key),
        ("ca.crt", &bad.root),
    ]);
    Api::<Secret>::namespaced(client.clone(), &ns)
        .patch(
            "upstream",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": broken.data})),
        )
        .await
        .unwrap();
    replica.resync.trigger();
    let td = wait_condition(&client, &name, "Ready", "False", "UpstreamNotCA").await;
    assert_eq!(
        condition(&td, "Issuing").unwrap().0,
        "True",
        "the existing CA must keep issuing"
    );
    assert_eq!(td.status.unwrap().active_ca.unwrap().serial, serial);
    wait_warning_event(&client, &name, "UpstreamNotCA").await;
    let authority = replica
        .authorities
        .get(&TdName::new("up-breaks.example.org").unwrap())
        .unwrap();
    assert_eq!(authority.x509_ca.serial(), serial);
    assert!(authority.x509_ca.not_after() > SystemTime::now());
    let secret_after = ca_secret(&client, &ns, &name).await.unwrap();
    assert_eq!(
        secret_before.data, secret_after.data,
        "the CA Secret must not change"
    );
    replica.stop().await;
}

#[tokio::test]
async fn duplicate_trust_domain_newer_object_gets_the_error() {
    let client = client().await;
    let ns = namespace("td-dup").await;
    let instance = unique("dup");
    let replica = Replica::start(client.clone(), ReplicaConfig::new(&ns, &instance));
    let spec = serde_json::json!({"trustDomain": "dup.example.org", "bundle": {"namespaceSelector": {"matchLabels": {"none": "none"}}}});
    let older = unique("td-old");
    create_trust_domain(&client, &trust_domain(&older, &instance, spec.clone())).await;
    let td = wait_condition(&client, &older, "Ready", "True", "BundlePublished").await;
    let serial = td.status.unwrap().active_ca.unwrap().serial;
    // Creation timestamps have one-second resolution: make sure the newer one is newer.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let newer = unique("td-new");
    create_trust_domain(&client, &trust_domain(&newer, &instance, spec)).await;

    let td = wait_condition(&client, &newer, "Ready", "False", "DuplicateTrustDomain").await;
    let (_, _, message) = condition(&td, "Ready").unwrap();
    assert!(
        message.contains(&older) && message.contains("dup.example.org"),
        "{message}"
    );
    assert_eq!(condition(&td, "Issuing").unwrap().1, "DuplicateTrustDomain");
    wait_warning_event(&client, &newer, "DuplicateTrustDomain").await;
    assert!(ca_secret(&client, &ns, &newer).await.is_none());
    // The older one keeps working with its CA.
    replica.resync.trigger();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let td = wait_condition(&client, &older, "Ready", "True", "BundlePublished").await;
    assert_eq!(td.status.unwrap().active_ca.unwrap().serial, serial);
    let authority = replica
        .authorities
        .get(&TdName::new("dup.example.org").unwrap())
        .unwrap();
    assert_eq!(authority.object_name, older);
    assert_eq!(authority.x509_ca.serial(), serial);
    replica.stop().await;
}

/// A CA Secret that cannot be read is reported and left exactly as it is: no new root.
#[tokio::test]
async fn unreadable_ca_secret_is_left_untouched() {
    let client = client().await;
    let ns = namespace("td-corrupt").await;
    let instance = unique("corrupt");
    let replica = Replica::start(client.clone(), ReplicaConfig::new(&ns, &instance));
    let name = unique("td");
    create_trust_domain(
        &client,
        &trust_domain(&name, &instance, serde_json::json!({"trustDomain": "corrupt.example.org", "bundle": {"namespaceSelector": {"matchLabels": {"none": "none"}}}})),
    )
    .await;
    wait_condition(&client, &name, "Ready", "True", "BundlePublished").await;
    let secret = ca_secret(&client, &ns, &name).await.unwrap();
    let corrupt =
        serde_json::json!({"data": {"authorities.json": ByteString(b"{\"format\": 1".to_vec())}});
    Api::<Secret>::namespaced(client.clone(), &ns)
        .patch(
            &secret.name_any(),
            &PatchParams::default(),
            &Patch::Merge(corrupt),
        )
        .await
        .unwrap();
    let td = wait_condition(&client, &name, "Ready", "False", "CASecretInvalid").await;
    let (_, _, message) = condition(&td, "Ready").unwrap();
    assert!(message.contains("leaves it untouched"), "{message}");
    wait_warning_event(&client, &name, "CASecretInvalid").await;
    replica.resync.trigger();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = ca_secret(&client, &ns, &name).await.unwrap();
    assert_eq!(
        after.data.unwrap()["authorities.json"].0,
        b"{\"format\": 1".to_vec()
    );
    replica.stop().await;
}

/// A ConfigMap of the bundle's name that Sigil did not write is left alone and reported;
/// the namespaces without one get the bundle.
#[tokio::test]
async fn a_foreign_config_map_of_the_bundles_name_is_a_conflict() {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    let client = client().await;
    let ns = namespace("cm-conflict").await;
    let instance = unique("conflict");
    let selected = unique("sel");
    let (foreign_ns, clean_ns) = (unique("ns-foreign"), unique("ns-clean"));
    for n in [&foreign_ns, &clean_ns] {
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": n, "labels": {"sigil-bundle": selected}}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
    }
    let foreign: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "sigil-trust-bundle"},
        "data": {"owner": "someone else"},
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), &foreign_ns)
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    let replica = Replica::start(client.clone(), ReplicaConfig::new(&ns, &instance));
    let name = unique("td");
    create_trust_domain(
        &client,
        &trust_domain(
            &name,
            &instance,
            serde_json::json!({
                "trustDomain": "conflict.example.org",
                "bundle": {"namespaceSelector": {"matchLabels": {"sigil-bundle": selected}}},
            }),
        ),
    )
    .await;
    let td = wait_condition(&client, &name, "Ready", "False", "BundleConfigMapConflict").await;
    let (_, _, message) = condition(&td, "Ready").unwrap();
    assert!(
        message.contains(&foreign_ns) && !message.contains(&clean_ns),
        "{message}"
    );
    assert!(
        bundle_config_map(&client, &clean_ns, "sigil-trust-bundle")
            .await
            .is_some_and(|cm| cm.data.unwrap().contains_key("bundle.pem"))
    );
    let untouched = bundle_config_map(&client, &foreign_ns, "sigil-trust-bundle")
        .await
        .unwrap();
    assert_eq!(untouched.data.unwrap()["owner"], "someone else");
    replica.stop().await;
}
