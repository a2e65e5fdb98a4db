//! cert-manager as Sigil's upstream authority (`spec.upstreamAuthority.certManager`),
//! against the real cert-manager controllers (the pinned cert-manager module's approver,
//! CA issuer and Issuer/ClusterIssuer controllers, run by e2e/clients/cert-manager-controller
//! on the harness's apiserver) and an operator replica under the Helm chart's RBAC.
//!
//! The enterprise CA's key is in a Secret of a namespace the operator has no grant in;
//! only a ClusterIssuer (cert-manager) reads it. Sigil sends a CSR and gets its CA back.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use sigil_e2e::process::Supervised;
use sigil_identity::ca::{CertificateAuthority, IssuedSvid, SvidTemplate};
use sigil_identity::keys::{KeyType, PrivateKey};
use sigil_identity::x509::{cert_summary, certs_from_pem, validate_x509_svid};
use sigil_identity::{SpiffeId, TrustDomain as TdName};
use sigil_operator::crd::trust_domain::{COMPONENT_LABEL, OWNER_LABEL, TrustDomain};
use sigil_operator::trust_domain::cert_manager::{
    CERTIFICATE_REQUEST, REQUEST_COMPONENT, certificate_request_resource,
};
use sigil_testkit::trust_domain::*;
use x509_parser::prelude::*;

/// cert-manager's controllers, running against the shared apiserver until dropped.
struct CertManager {
    _process: Supervised,
}

async fn start_cert_manager(controllers: &str, cluster_resource_namespace: &str) -> CertManager {
    let cp = sigil_e2e::shared().await;
    let program = sigil_e2e::tools::tool("cert-manager-controller").unwrap();
    let log = cp
        .dir()
        .join(format!("{}.log", unique("cert-manager-controller")));
    let args = [
        "-kubeconfig".to_owned(),
        cp.kubeconfig_path().display().to_string(),
        "-controllers".to_owned(),
        controllers.to_owned(),
        "-cluster-resource-namespace".to_owned(),
        cluster_resource_namespace.to_owned(),
    ];
    let process = Supervised::start("cert-manager-controller", &program, &args, &log).unwrap();
    println!(
        "cert-manager controllers {controllers} log: {}",
        log.display()
    );
    CertManager { _process: process }
}

/// Applies cert-manager's CRDs (from its module, installed next to the tool) and waits
/// until they are established.
async fn install_cert_manager_crds(client: &Client) {
    let path = sigil_e2e::tools::bin_dir().join("cert-manager-crds.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run `bash hack/test-tools.sh cert-manager`",
            path.display()
        )
    });
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let mut names = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let crd = CustomResourceDefinition::deserialize(doc).unwrap();
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply("sigil-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
        names.push(name);
    }
    assert!(
        names
            .iter()
            .any(|n| n == "certificaterequests.cert-manager.io")
    );
    for name in names {
        eventually(&format!("CRD {name} established"), SETTLE, || {
            let api = api.clone();
            let name = name.clone();
            async move {
                api.get(&name)
                    .await
                    .ok()
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .filter(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
                    .map(|_| ())
            }
        })
        .await;
    }
}

async fn create_dynamic(
    client: &Client,
    ns: Option<&str>,
    gvk: GroupVersionKind,
    body: serde_json::Value,
) {
    let ar = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let obj: DynamicObject = serde_json::from_value(body).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
}

/// The Helm chart's ServiceAccounts and RBAC, rendered by the pinned helm for a release
/// in `ns` and applied for real: a client as the chart's sigil-operator ServiceAccount.
async fn chart_operator(admin: &Client, ns: &str) -> Client {
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sigil");
    let release = unique("cm");
    let out = std::process::Command::new(sigil_e2e::tools::tool("helm").unwrap())
        .args(["template", &release])
        .arg(&chart)
        .args(["--namespace", ns, "-f"])
        .arg(chart.join("ci/default-values.yaml"))
        .args([
            "--set",
            "trustDomain.create=false",
            "--set",
            "clusterSPIFFEID.create=false",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut applied = 0;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_yaml::from_value(v).unwrap();
        let types = obj.types.clone().unwrap();
        let namespaced = match types.kind.as_str() {
            "ServiceAccount" | "Role" | "RoleBinding" => true,
            "ClusterRole" | "ClusterRoleBinding" => false,
            _ => continue,
        };
        let (group, version) = types
            .api_version
            .split_once('/')
            .unwrap_or(("", &types.api_version));
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &types.kind));
        let api: Api<DynamicObject> = if namespaced {
            Api::namespaced_with(admin.clone(), obj.namespace().as_deref().unwrap_or(ns), &ar)
        } else {
            Api::all_with(admin.clone(), &ar)
        };
        api.patch(
            &obj.name_any(),
            &PatchParams::apply("sigil-e2e").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap();
        applied += 1;
    }
    assert!(applied >= 5, "the chart rendered no RBAC:\n{text}");
    service_account_client(ns, "sigil-operator").await
}

/// Sigil's CertificateRequests for TrustDomain `name`.
async fn requests_of(client: &Client, ns: &str, name: &str) -> Vec<DynamicObject> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &certificate_request_resource());
    api.list(&ListParams::default().labels(&format!(
        "{OWNER_LABEL}={name},{COMPONENT_LABEL}={REQUEST_COMPONENT}"
    )))
    .await
    .unwrap()
    .items
}

fn cr_condition(cr: &DynamicObject, type_: &str) -> Option<(String, String)> {
    cr.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

/// Waits (up to `within`) until TrustDomain `name` satisfies `check`.
async fn wait_td(
    client: &Client,
    name: &str,
    what: &str,
    within: Duration,
    check: impl Fn(&TrustDomain) -> bool,
) -> TrustDomain {
    let api = Api::<TrustDomain>::all(client.clone());
    let check = &check;
    eventually(&format!("TrustDomain {name}: {what}"), within, || {
        let api = api.clone();
        async move { api.get(name).await.ok().filter(|td| check(td)) }
    })
    .await
}

fn has(td: &TrustDomain, type_: &str, status: &str, reason: &str) -> bool {
    condition(td, type_).is_some_and(|(s, r, _)| s == status && r == reason)
}

fn serial_of(td: &TrustDomain) -> Option<String> {
    td.status
        .as_ref()?
        .active_ca
        .as_ref()
        .map(|c| c.serial.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_manager_signs_sigils_ca_and_explains_pending_and_denied_requests() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let started = Instant::now();
    let admin = client().await;
    install_cert_manager_crds(&admin).await;
    let ns = namespace("cm").await;
    let pki_ns = namespace("cm-pki").await;
    let instance = unique("cm");

    // The enterprise CA: an issuing CA under a root. Its key is only in pki_ns, read by
    // cert-manager's ClusterIssuer; tls.crt carries the root too, so cert-manager returns
    // the root as status.ca.
    let (cluster_issuer, root_der, intermediate_der) = enterprise_issuer(&admin, &pki_ns).await;

    // The operator runs on exactly the chart's RBAC.
    let sa_client = chart_operator(&admin, &ns).await;
    // Sigil never sees the enterprise key: its ServiceAccount cannot read that Secret.
    match Api::<Secret>::namespaced(sa_client.clone(), &pki_ns)
        .get("enterprise-ca")
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("the operator could read the enterprise CA Secret: {other:?}"),
    }
    let bundle_ns = unique("ns-cm");
    let selected = unique("sel");
    let bundle_namespace: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": bundle_ns, "labels": {"sigil-bundle": selected}}
        }))
        .unwrap();
    Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
        .create(&PostParams::default(), &bundle_namespace)
        .await
        .unwrap();

    let replica = Replica::start(sa_client.clone(), ReplicaConfig::new(&ns, &instance));
    let approving = start_cert_manager(
        "issuers,clusterissuers,certificaterequests-approver,certificaterequests-issuer-ca,certificaterequests-issuer-selfsigned",
        &pki_ns,
    )
    .await;

    // ---- 1. Issued: the CA chains to the enterprise root, which the bundle publishes.
    let td_name = "cm.example.org";
    let good = unique("td");
    create_trust_domain(
        &admin,
        &trust_domain(
            &good,
            &instance,
            serde_json::json!({
                "trustDomain": td_name,
                "ca": {"ttl": "1m", "activationDelay": "10s"},
                "upstreamAuthority": {"certManager": {"issuerRef": {"name": cluster_issuer, "kind": "ClusterIssuer"}}},
                "bundle": {"namespaceSelector": {"matchLabels": {"sigil-bundle": selected}}},
            }),
        ),
    )
    .await;
    let td = wait_condition(&admin, &good, "Ready", "True", "BundlePublished").await;
    println!("Ready through cert-manager after {:?}", started.elapsed());
    let (_, _, message) = condition(&td, CERTIFICATE_REQUEST).unwrap();
    assert!(
        has(&td, CERTIFICATE_REQUEST, "True", "CertificateRequestIssued"),
        "{message}"
    );
    let first_serial = serial_of(&td).unwrap();

    let crs = requests_of(&admin, &ns, &good).await;
    assert_eq!(crs.len(), 1, "{crs:?}");
    let cr = &crs[0];
    assert!(message.contains(&cr.name_any()), "{message}");
    assert_eq!(
        cr_condition(cr, "Approved"),
        Some(("True".into(), "cert-manager.io".into()))
    );
    assert_eq!(
        cr_condition(cr, "Ready"),
        Some(("True".into(), "Issued".into()))
    );
    assert_eq!(cr.data["spec"]["isCA"], true);
    assert_eq!(cr.data["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    // Only a CSR left the operator.
    let request =
        String::from_utf8(base64_decode(cr.data["spec"]["request"].as_str().unwrap())).unwrap();
    assert!(request.contains("BEGIN CERTIFICATE REQUEST"), "{request}");
    assert!(!request.contains("PRIVATE KEY"));
    assert_eq!(
        cr.owner_references()[0].name,
        good,
        "the TrustDomain owns its request"
    );

    let cm = eventually("bundle ConfigMap", SETTLE, || {
        bundle_config_map(&admin, &bundle_ns, "sigil-trust-bundle")
    })
    .await;
    let (pem, spiffe) = decode_bundle(&cm, td_name);
    assert_eq!(pem.x509_authorities, vec![root_der.clone()]);
    assert_eq!(spiffe.x509_authorities, vec![root_der.clone()]);

    // An SVID Sigil signs verifies up to the enterprise root: leaf → Sigil's CA (the
    // CSR's key, signed by the issuing CA) → the issuing CA → root.
    let tdn = TdName::new(td_name).unwrap();
    let authority = eventually("the replica loads the CA", SETTLE, || async {
        replica
            .authorities
            .get(&tdn)
            .filter(|a| a.x509_ca.serial() == first_serial)
    })
    .await;
    let sigil_ca = authority.x509_ca.certificate().to_vec();
    let (_, parsed) = X509Certificate::from_der(&sigil_ca).unwrap();
    let (_, issuing) = X509Certificate::from_der(&intermediate_der).unwrap();
    assert_eq!(parsed.issuer(), issuing.subject());
    parsed.verify_signature(Some(issuing.public_key())).unwrap();
    assert!(parsed.is_ca());
    let now = SystemTime::now();
    let issued = web_svid(&authority.x509_ca, td_name, now);
    assert_eq!(issued.intermediates.len(), 2);
    assert_eq!(
        cert_summary(&issued.intermediates[0]).unwrap().0,
        first_serial
    );
    assert_eq!(issued.intermediates[1], intermediate_der);
    validate_x509_svid(&issued.chain(), &pem, now).unwrap();
    assert!(validate_x509_svid(&issued.chain()[..2], &pem, now).is_err());

    // Approved, but the issuer does not exist: pending, and the condition says why.
    let orphan = unique("td");
    create_trust_domain(
        &admin,
        &trust_domain(
            &orphan,
            &instance,
            serde_json::json!({
                "trustDomain": "cm-orphan.example.org",
                "upstreamAuthority": {"certManager": {"issuerRef": {"name": "no-such-issuer"}}},
                "bundle": {"namespaceSelector": {"matchLabels": {"sigil-bundle": "none"}}},
            }),
        ),
    )
    .await;
    let td = wait_td(
        &admin,
        &orphan,
        "pending on a missing Issuer",
        SETTLE,
        |td| {
            condition(td, CERTIFICATE_REQUEST).is_some_and(|(_, r, m)| {
                r == "CertificateRequestPending" && m.contains("approved and waits")
            })
        },
    )
    .await;
    let (_, _, message) = condition(&td, CERTIFICATE_REQUEST).unwrap();
    println!("missing issuer: {message}");
    assert!(
        message.contains("Issuer no-such-issuer") && message.contains(&ns),
        "{message}"
    );
    assert!(has(&td, "Ready", "False", "CertificateRequestPending"));
    assert!(has(&td, "Issuing", "False", "CertificateRequestPending"));

    // Failed: a selfSigned issuer signs only with a key handed to it in a Secret, which
    // Sigil never does; cert-manager fails the request and the condition carries why.
    let self_signed = unique("self-signed");
    create_dynamic(
        &admin,
        None,
        GroupVersionKind::gvk("cert-manager.io", "v1", "ClusterIssuer"),
        serde_json::json!({
            "apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer",
            "metadata": {"name": self_signed},
            "spec": {"selfSigned": {}},
        }),
    )
    .await;
    let failing = unique("td");
    create_trust_domain(
        &admin,
        &trust_domain(
            &failing,
            &instance,
            serde_json::json!({
                "trustDomain": "cm-failing.example.org",
                "upstreamAuthority": {"certManager": {"issuerRef": {"name": self_signed, "kind": "ClusterIssuer"}}},
                "bundle": {"namespaceSelector": {"matchLabels": {"sigil-bundle": "none"}}},
            }),
        ),
    )
    .await;
    let td = wait_condition(
        &admin,
        &failing,
        CERTIFICATE_REQUEST,
        "False",
        "CertificateRequestFailed",
    )
    .await;
    let (_, _, message) = condition(&td, CERTIFICATE_REQUEST).unwrap();
    println!("failed: {message}");
    let failed_cr = requests_of(&admin, &ns, &failing).await.remove(0);
    assert_eq!(
        cr_condition(&failed_cr, "Ready"),
        Some(("False".into(), "Failed".into()))
    );
    assert!(
        message.contains(&failed_cr.name_any())
            && message.contains(&format!("ClusterIssuer {self_signed}"))
            && message.contains("cert-manager.io/private-key-secret-name"),
        "{message}"
    );
    assert!(has(&td, "Ready", "False", "CertificateRequestFailed"));

    // ---- 2. Rotation: before the 1-minute CA expires, Sigil requests the next one,
    // cert-manager signs it, and it takes over.
    let rotated = wait_td(
        &admin,
        &good,
        "a new CA from a new request",
        Duration::from_secs(90),
        |td| serial_of(td).is_some_and(|s| s != first_serial),
    )
    .await;
    let second_serial = serial_of(&rotated).unwrap();
    println!(
        "rotated {first_serial} -> {second_serial} after {:?}",
        started.elapsed()
    );
    let crs = requests_of(&admin, &ns, &good).await;
    assert!(
        crs.iter().all(|c| c.name_any() != cr.name_any()),
        "the consumed first request was cleaned up: {crs:?}"
    );
    let authority = eventually("the replica loads the new CA", SETTLE, || async {
        replica
            .authorities
            .get(&tdn)
            .filter(|a| a.x509_ca.serial() == second_serial)
    })
    .await;
    let now = SystemTime::now();
    let issued = web_svid(&authority.x509_ca, td_name, now);
    assert_eq!(issued.intermediates[1], intermediate_der);
    validate_x509_svid(&issued.chain(), &pem, now).unwrap();
    let reasons: Vec<String> = events_for(&admin, &good)
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r == "CAPrepared")
            && reasons.iter().any(|r| r == "CAActivated")
            && reasons.iter().any(|r| r == "CertificateRequestSent")
            && !reasons.iter().any(|r| r == "BundleConfigMapConflict"),
        "{reasons:?}"
    );

    // ---- 3. No approver (as with approver-policy and no matching policy): requests stay
    // pending, a denied one is reported as such, and the active CA keeps signing.
    drop(approving);
    let _unapproving = start_cert_manager(
        "issuers,clusterissuers,certificaterequests-issuer-ca",
        &pki_ns,
    )
    .await;
    let td = wait_td(
        &admin,
        &good,
        "its next request pending, unapproved, while the CA signs",
        Duration::from_secs(90),
        |td| {
            condition(td, CERTIFICATE_REQUEST).is_some_and(|(_, r, m)| {
                r == "CertificateRequestPending" && m.contains("not approved yet")
            })
        },
    )
    .await;
    let (_, _, message) = condition(&td, CERTIFICATE_REQUEST).unwrap();
    println!("unapproved: {message}");
    assert!(message.contains("keeps signing"), "{message}");
    assert!(has(&td, "Issuing", "True", "ActiveCA"), "{:?}", td.status);
    assert!(
        has(&td, "Ready", "True", "BundlePublished"),
        "{:?}",
        td.status
    );

    let pending = unique("td");
    let denied = unique("td");
    for (name, domain) in [
        (&pending, "cm-pending.example.org"),
        (&denied, "cm-denied.example.org"),
    ] {
        create_trust_domain(
            &admin,
            &trust_domain(
                name,
                &instance,
                serde_json::json!({
                    "trustDomain": domain,
                    "upstreamAuthority": {"certManager": {"issuerRef": {"name": cluster_issuer, "kind": "ClusterIssuer"}}},
                    "bundle": {"namespaceSelector": {"matchLabels": {"sigil-bundle": "none"}}},
                }),
            ),
        )
        .await;
    }
    let td = wait_td(&admin, &pending, "pending, not approved", SETTLE, |td| {
        condition(td, CERTIFICATE_REQUEST).is_some_and(|(_, r, m)| {
            r == "CertificateRequestPending" && m.contains("not approved yet")
        })
    })
    .await;
    let pending_cr = requests_of(&admin, &ns, &pending)
        .await
        .remove(0)
        .name_any();
    let (_, _, message) = condition(&td, CERTIFICATE_REQUEST).unwrap();
    assert!(
        message.contains(&pending_cr) && message.contains("cmctl approve"),
        "{message}"
    );
    assert!(has(&td, "Ready", "False", "CertificateRequestPending"));

    // Deny the other one as `cmctl deny` does: a Denied condition on the status.
    let denied_cr = eventually("the denied TrustDomain's request", SETTLE, || async {
        requests_of(&admin, &ns, &denied).await.pop()
    })
    .await
    .name_any();
    let crs: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), &ns, &certificate_request_resource());
    let deny = serde_json::json!({"status": {"conditions": [{
        "type": "Denied", "status": "True", "reason": "EnterprisePolicy",
        "message": "intermediate CAs for this team need a ticket",
        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
    }]}});
    crs.patch_status(&denied_cr, &PatchParams::default(), &Patch::Merge(&deny))
        .await
        .unwrap();
    let td = wait_condition(
        &admin,
        &denied,
        CERTIFICATE_REQUEST,
        "False",
        "CertificateRequestDenied",
    )
    .await;
    let (_, _, message) = condition(&td, CERTIFICATE_REQUEST).unwrap();
    println!("denied: {message}");
    assert!(
        message.contains(&denied_cr)
            && message.contains("EnterprisePolicy")
            && message.contains("need a ticket")
            && message.contains("delete the CertificateRequest"),
        "{message}"
    );
    assert!(has(&td, "Ready", "False", "CertificateRequestDenied"));
    wait_warning_event(&admin, &denied, "CertificateRequestDenied").await;

    // Nothing else broke: a self-signed TrustDomain of the same operator still comes up.
    let plain = unique("td");
    create_trust_domain(
        &admin,
        &trust_domain(
            &plain,
            &instance,
            serde_json::json!({
                "trustDomain": "cm-plain.example.org",
                "bundle": {"namespaceSelector": {"matchLabels": {"sigil-bundle": "none"}}},
            }),
        ),
    )
    .await;
    wait_condition(&admin, &plain, "Ready", "True", "BundlePublished").await;
    println!("test took {:?}", started.elapsed());
    replica.stop().await;
}

/// The enterprise CA: an issuing CA under a root, its key only in `pki_ns` (read by a
/// cert-manager ClusterIssuer, never by Sigil). tls.crt carries the root too, so
/// cert-manager returns the root as status.ca. Returns the ClusterIssuer's name, the root
/// and the issuing CA (DER).
async fn enterprise_issuer(admin: &kube::Client, pki_ns: &str) -> (String, Vec<u8>, Vec<u8>) {
    let pki = sigil_e2e::pki::upstream_pki(::time::Duration::days(90), true).unwrap();
    let ca_secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "enterprise-ca"},
        "type": "kubernetes.io/tls",
        "stringData": {
            "tls.crt": format!("{}{}", pki.intermediate_pem, pki.root_pem),
            "tls.key": pki.intermediate_key_pem,
        },
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), pki_ns)
        .create(&PostParams::default(), &ca_secret)
        .await
        .unwrap();
    let root_der = certs_from_pem(&pki.root_pem).unwrap().remove(0);
    let intermediate_der = certs_from_pem(&pki.intermediate_pem).unwrap().remove(0);
    let cluster_issuer = unique("enterprise");
    create_dynamic(
        admin,
        None,
        GroupVersionKind::gvk("cert-manager.io", "v1", "ClusterIssuer"),
        serde_json::json!({
            "apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer",
            "metadata": {"name": cluster_issuer},
            "spec": {"ca": {"secretName": "enterprise-ca"}},
        }),
    )
    .await;
    (cluster_issuer, root_der, intermediate_der)
}

/// An X509-SVID for `spiffe://<td_name>/ns/default/sa/web` (a fresh P-256 key, 20 s)
/// signed by `ca` at `now`.
fn web_svid(ca: &CertificateAuthority, td_name: &str, now: SystemTime) -> IssuedSvid {
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let id = SpiffeId::parse(&format!("spiffe://{td_name}/ns/default/sa/web")).unwrap();
    ca.sign_public_key(
        &key.public_key_der(),
        &SvidTemplate {
            spiffe_id: &id,
            ttl: Duration::from_secs(20),
            dns_names: &[],
        },
        now,
    )
    .unwrap()
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

const HSM_TEST: &str = "with_the_pkcs11_key_manager_the_csr_key_is_made_and_kept_in_the_token";

/// With `--key-manager pkcs11`, the key of Sigil's CA signed through cert-manager is made
/// in the token like any other CA key: the CSR is signed there, the CA Secret keeps only
/// a reference (while the request is pending and once the CA is installed), and SVIDs the
/// token-held CA signs verify up to the issuer's root. SoftHSM2 stands in for the HSM;
/// as in e2e/tests/hsm.rs, the test runs itself again in a child with `SOFTHSM2_CONF`.
#[test]
fn with_the_pkcs11_key_manager_the_csr_key_is_made_and_kept_in_the_token() {
    sigil_testkit::hsm::run_with_token("sigil-cm", HSM_TEST, hsm_scenario);
}

async fn hsm_scenario(hsm: sigil_testkit::hsm::SoftHsm) {
    use sigil_operator::keys::Keys;
    use sigil_operator::keys::pkcs11::Pkcs11Keys;
    let admin = client().await;
    install_cert_manager_crds(&admin).await;
    let ns = namespace("cm-hsm").await;
    let pki_ns = namespace("cm-hsm-pki").await;
    let instance = unique("cm-hsm");
    let (cluster_issuer, root_der, _) = enterprise_issuer(&admin, &pki_ns).await;
    let _cert_manager = start_cert_manager(
        "issuers,clusterissuers,certificaterequests-approver,certificaterequests-issuer-ca",
        &pki_ns,
    )
    .await;
    let keys = Keys::new(std::sync::Arc::new(
        Pkcs11Keys::open(hsm.module(), hsm.label(), hsm.pin().to_owned()).unwrap(),
    ));
    let replica = Replica::start(
        admin.clone(),
        ReplicaConfig {
            keys,
            ..ReplicaConfig::new(&ns, &instance)
        },
    );
    let td_name = "cm-hsm.example.org";
    let name = unique("td");
    create_trust_domain(
        &admin,
        &trust_domain(
            &name,
            &instance,
            serde_json::json!({
                "trustDomain": td_name,
                "upstreamAuthority": {"certManager": {"issuerRef": {"name": cluster_issuer, "kind": "ClusterIssuer"}}},
                "bundle": {"namespaceSelector": {"matchLabels": {"sigil-bundle": "none"}}},
            }),
        ),
    )
    .await;
    let td = wait_condition(&admin, &name, "Ready", "True", "BundlePublished").await;
    assert!(has(
        &td,
        CERTIFICATE_REQUEST,
        "True",
        "CertificateRequestIssued"
    ));
    let serial = serial_of(&td).unwrap();
    let secret = ca_secret(&admin, &ns, &name).await.unwrap();
    let raw = String::from_utf8(secret.data.unwrap()["authorities.json"].0.clone()).unwrap();
    assert!(
        !raw.contains("PRIVATE KEY"),
        "no key in the CA Secret: {raw}"
    );
    let doc: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        doc["x509"]["active"]["keyRef"]["manager"], "pkcs11",
        "{doc}"
    );

    let tdn = TdName::new(td_name).unwrap();
    let authority = eventually("the replica loads the CA", SETTLE, || async {
        replica
            .authorities
            .get(&tdn)
            .filter(|a| a.x509_ca.serial() == serial)
    })
    .await;
    assert!(
        authority.x509_ca.key().reference().is_some(),
        "the CA key is in the token"
    );
    let now = SystemTime::now();
    let issued = web_svid(&authority.x509_ca, td_name, now);
    let mut bundle = sigil_identity::TrustBundle::new(tdn.clone());
    bundle.x509_authorities = vec![root_der];
    validate_x509_svid(&issued.chain(), &bundle, now).unwrap();
    replica.stop().await;
}
