//! `sigil migrate` on a corpus of spire-controller-manager objects written the way its docs
//! and users write them (tests/testdata/spire-gitops): what it converts, what its report
//! names, that the apiserver accepts what it writes, and that the same pods get the same
//! SPIFFE IDs from the original Go templates (rendered by `spire-templates`, a small Go
//! program doing what spire-controller-manager does) and from the translations (rendered
//! by Sigil's own index code).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};
use sigil_api::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_api::crd::federated_bundle::FederatedBundle;
use sigil_cli::migrate::{self, Options, Severity};
use sigil_index::{IndexConfig, TrustDomainInfo, Verdict, explain_pod};

const TRUST_DOMAIN: &str = "example.org";
const CLUSTER: &str = "prod";

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata")
}

fn corpus() -> Vec<Value> {
    let mut docs = Vec::new();
    migrate::read_path(&testdata().join("spire-gitops"), &mut docs).unwrap();
    docs
}

fn findings_of<'a>(report: &'a Value, object: &str) -> Vec<&'a Value> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["object"] == object)
        .collect()
}

#[tokio::test]
async fn the_corpus_converts_and_the_report_names_what_was_not_carried() {
    let out = tempfile::tempdir().unwrap();
    let written = out.path().join("sigil.yaml");
    let run = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(["migrate", "-o", "json", "-w"])
        .arg(&written)
        .arg(testdata().join("spire-gitops"))
        .output()
        .unwrap();
    // Some objects cannot be converted: exit status 3, the report on stderr.
    assert_eq!(
        run.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: Value = serde_json::from_slice(&run.stderr).unwrap();
    let spire = corpus()
        .iter()
        .filter(|d| {
            d["apiVersion"]
                .as_str()
                .unwrap_or_default()
                .starts_with("spire.spiffe.io/")
        })
        .count();
    assert!(
        spire >= 20,
        "the corpus holds {spire} spire-controller-manager objects"
    );
    assert_eq!(report["read"], spire);
    assert_eq!(
        report["skipped"], 2,
        "the Namespace and the kustomization are not SPIRE's"
    );

    // What could not be converted, each with its reason.
    let errors: BTreeMap<String, String> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "error")
        .map(|f| {
            (
                f["object"].as_str().unwrap().to_owned(),
                f["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        errors.keys().collect::<Vec<_>>(),
        [
            "ClusterSPIFFEID/conditional-tier",
            "ClusterSPIFFEID/printf-joined",
            "ClusterStaticEntry/downstream-spire",
            "ClusterStaticEntry/node-backup-agent"
        ],
        "{errors:#?}"
    );
    assert!(errors["ClusterSPIFFEID/printf-joined"].contains("the function `printf`"));
    assert!(errors["ClusterSPIFFEID/conditional-tier"].contains("`if`"));
    assert!(errors["ClusterStaticEntry/node-backup-agent"].contains("unix:uid:0"));
    assert!(errors["ClusterStaticEntry/downstream-spire"].contains("k8s:pod-image"));
    assert_eq!(report["written"], spire - errors.len());

    // What was converted but not carried whole: every dropped field is named.
    let has = |object: &str, field: &str, text: &str| {
        let f = findings_of(&report, object);
        assert!(
            f.iter()
                .any(|f| f["field"] == field && f["message"].as_str().unwrap().contains(text)),
            "{object}: no finding on {field} mentioning {text:?}: {f:#?}"
        );
    };
    has(
        "ClusterSPIFFEID/spire-spire-default",
        "spec.className",
        "one operator per cluster",
    );
    has(
        "ClusterSPIFFEID/other-instance",
        "spec.className",
        "spire-mgmt-other",
    );
    has(
        "ClusterFederatedTrustDomain/partner",
        "spec.className",
        "dropped",
    );
    has(
        "ClusterFederatedTrustDomain/lab",
        "spec.trustDomainBundle",
        "spire-server bundle show",
    );
    has(
        "ClusterSPIFFEID/kafka-brokers",
        "spec.spiffeIDTemplate",
        "spec.hostname",
    );
    has(
        "ClusterSPIFFEID/kafka-brokers",
        "spec.dnsNameTemplates[0]",
        "spec.hostname",
    );
    has(
        "ClusterSPIFFEID/payments-api",
        "spec.spiffeIDTemplate",
        "empty string",
    );
    has(
        "ClusterSPIFFEID/annotated",
        "spec.spiffeIDTemplate",
        "empty string",
    );
    has(
        "ClusterStaticEntry/legacy-billing",
        "spec.parentID",
        "the pod's own node",
    );
    // Dropped fields are "warning"; translations exact but for an edge are "differs".
    let severity = |object: &str, field: &str| {
        findings_of(&report, object)
            .iter()
            .find(|f| f["field"] == field)
            .map(|f| f["severity"].as_str().unwrap().to_owned())
    };
    assert_eq!(
        severity("ClusterSPIFFEID/other-instance", "spec.className").as_deref(),
        Some("warning")
    );
    assert_eq!(
        severity("ClusterSPIFFEID/kafka-brokers", "spec.spiffeIDTemplate").as_deref(),
        Some("differs")
    );
    assert_eq!(
        severity("ClusterStaticEntry/legacy-billing", "spec.parentID").as_deref(),
        Some("note")
    );
    // Objects carried whole say nothing.
    for clean in [
        "ClusterSPIFFEID/managed-identity",
        "ClusterSPIFFEID/istio-sidecars",
        "ClusterSPIFFEID/batch-jobs",
        "ClusterFederatedTrustDomain/bank",
    ] {
        assert!(
            findings_of(&report, clean).is_empty(),
            "{clean}: {:#?}",
            findings_of(&report, clean)
        );
    }

    // What was written: Sigil's own types read it, every template parses, and the
    // apiserver (CRD schema and CEL rules) accepts every object.
    let mut objects = Vec::new();
    migrate::parse(
        &std::fs::read_to_string(&written).unwrap(),
        "output",
        &mut objects,
    )
    .unwrap();
    assert_eq!(objects.len(), spire - errors.len());
    let cp = sigil_e2e::shared().await;
    let admin = cp.admin().await.unwrap();
    for o in &objects {
        let name = o["metadata"]["name"].as_str().unwrap();
        let from = o["metadata"]["annotations"][migrate::convert::MIGRATED_FROM]
            .as_str()
            .unwrap();
        assert!(from.ends_with(&format!("/{name}")), "{from}");
        assert!(
            o["metadata"]["annotations"]
                .get("kubectl.kubernetes.io/last-applied-configuration")
                .is_none()
        );
        match o["kind"].as_str().unwrap() {
            "ClusterSPIFFEID" => {
                let c: ClusterSPIFFEID = serde_json::from_value(o.clone()).unwrap();
                let templates = std::iter::once(&c.spec.spiffe_id_template)
                    .chain(&c.spec.dns_name_templates)
                    .chain(&c.spec.workload_selector_templates);
                for t in templates {
                    sigil_api::template::Template::parse(&t.0)
                        .unwrap_or_else(|e| panic!("{name}: {}: {e}", t.0));
                }
            }
            "FederatedBundle" => {
                serde_json::from_value::<FederatedBundle>(o.clone()).unwrap();
            }
            k => panic!("unexpected kind {k}"),
        }
        let mut dry = o.clone();
        dry["metadata"]["name"] = json!(format!("{name}-{}", sigil_e2e::unique("m")));
        let kind = o["kind"].as_str().unwrap();
        let gvk = GroupVersionKind::gvk("sigil.dev", "v1alpha1", kind);
        let api: Api<DynamicObject> = Api::all_with(
            admin.clone(),
            &ApiResource::from_gvk_with_plural(&gvk, &format!("{}s", kind.to_lowercase())),
        );
        api.create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &serde_json::from_value(dry).unwrap(),
        )
        .await
        .unwrap_or_else(|e| panic!("the apiserver refuses the migrated {kind} {name}: {e}"));
    }
    let legacy = objects
        .iter()
        .find(|o| o["metadata"]["name"] == "legacy-billing")
        .unwrap();
    assert_eq!(
        legacy["spec"],
        json!({
            "spiffeIDTemplate": "spiffe://example.org/billing/legacy",
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "billing"}},
            "podSelector": {"matchLabels": {"app": "billing"}},
            "workloadSelectorTemplates": ["k8s:sa:billing-legacy"],
            "dnsNameTemplates": ["billing.example.org"],
            "ttl": "2h",
            "hint": "billing",
        })
    );
    let text = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .arg("migrate")
        .arg(testdata().join("spire-gitops"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(
        stderr.contains("not converted: ClusterSPIFFEID/printf-joined spec.spiffeIDTemplate"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&text.stdout).contains("kind: FederatedBundle"));
}

/// One pod of tests/testdata/migrate-pods.yaml.
#[derive(serde::Deserialize, serde::Serialize, Clone)]
struct PodCase {
    pod: Pod,
    namespace: Namespace,
    node: Node,
}

#[derive(Debug, PartialEq)]
enum Outcome {
    NotSelected,
    Id { id: String, dns: BTreeSet<String> },
    Failed(String),
}

impl Outcome {
    fn same_as(&self, other: &Outcome) -> bool {
        match (self, other) {
            (Outcome::Failed(_), Outcome::Failed(_)) => true,
            (a, b) => a == b,
        }
    }
}

fn spire_side(objects: &[Value], pods: &[PodCase]) -> BTreeMap<(String, String), Outcome> {
    let input = json!({
        "trustDomain": TRUST_DOMAIN, "clusterName": CLUSTER, "clusterDomain": "cluster.local",
        "objects": objects.iter().map(|o| json!({"name": o["metadata"]["name"], "spec": o["spec"]})).collect::<Vec<_>>(),
        "pods": pods,
    });
    let mut child = Command::new(sigil_e2e::tools::tool("spire-templates").unwrap())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), &input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let key = (
                r["object"].as_str().unwrap().to_owned(),
                r["pod"].as_str().unwrap().to_owned(),
            );
            let outcome = if r["selected"] != true {
                Outcome::NotSelected
            } else if let Some(e) = r["error"].as_str() {
                Outcome::Failed(e.to_owned())
            } else {
                Outcome::Id {
                    id: r["spiffeID"].as_str().unwrap().to_owned(),
                    dns: r["dnsNames"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|d| d.as_str().unwrap().to_owned())
                        .collect(),
                }
            };
            (key, outcome)
        })
        .collect()
}

fn sigil_side(object: &Value, case: &PodCase) -> Outcome {
    let csid: ClusterSPIFFEID = serde_json::from_value(object.clone()).unwrap();
    let mut config = IndexConfig::new(CLUSTER);
    // spire-controller-manager's ignored namespaces are its own configuration; compare
    // the objects alone.
    config.ignore_namespaces.clear();
    let td = TrustDomainInfo::from_dynamic(
        &serde_json::from_value(json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "TrustDomain", "metadata": {"name": "default"}, "spec": {"trustDomain": TRUST_DOMAIN}})).unwrap(),
    )
    .unwrap();
    let verdicts = explain_pod(
        config,
        &case.pod,
        &case.namespace,
        Some(&case.node),
        &[csid],
        &[td],
        &[],
        &[],
    );
    match &verdicts[0].verdict {
        Verdict::Selected {
            spiffe_id,
            dns_names,
            ..
        } => Outcome::Id {
            id: spiffe_id.clone(),
            dns: dns_names.iter().cloned().collect(),
        },
        Verdict::NamespaceNotSelected(_) | Verdict::PodNotSelected(_) => Outcome::NotSelected,
        Verdict::RenderFailed(e) => Outcome::Failed(e.clone()),
        other => panic!(
            "{}: unexpected verdict {other:?}",
            verdicts[0].cluster_spiffe_id
        ),
    }
}

#[test]
fn the_same_pods_get_the_same_spiffe_ids_from_spire_templates_and_their_translations() {
    let docs = corpus();
    let spire_csids: Vec<Value> = docs
        .iter()
        .filter(|d| {
            d["kind"] == "ClusterSPIFFEID"
                && d["apiVersion"]
                    .as_str()
                    .unwrap()
                    .starts_with("spire.spiffe.io/")
        })
        .cloned()
        .collect();
    let m = migrate::migrate(&docs, &Options::default());
    let pods: Vec<PodCase> = serde_yaml::from_str(
        &std::fs::read_to_string(testdata().join("migrate-pods.yaml")).unwrap(),
    )
    .unwrap();
    let spire = spire_side(&spire_csids, &pods);

    let (mut same, mut issued, mut explained) = (0, 0, Vec::new());
    for o in m.objects.iter().filter(|o| o["kind"] == "ClusterSPIFFEID") {
        let name = o["metadata"]["name"].as_str().unwrap();
        let from_static = o["metadata"]["annotations"][migrate::convert::MIGRATED_FROM]
            .as_str()
            .unwrap()
            .contains("ClusterStaticEntry");
        if from_static {
            continue;
        }
        // Where the report said the two may differ.
        let caveats: Vec<&str> = m
            .findings
            .iter()
            .filter(|f| {
                f.object == format!("ClusterSPIFFEID/{name}") && f.severity == Severity::Differs
            })
            .map(|f| f.message.as_str())
            .collect();
        for case in &pods {
            let pod = format!(
                "{}/{}",
                case.pod.metadata.namespace.as_deref().unwrap(),
                case.pod.metadata.name.as_deref().unwrap()
            );
            let theirs = &spire[&(name.to_owned(), pod.clone())];
            let ours = sigil_side(o, case);
            if ours.same_as(theirs) {
                same += 1;
                issued += matches!(ours, Outcome::Id { .. }) as usize;
                continue;
            }
            assert!(
                !caveats.is_empty(),
                "{name} on {pod}: spire-controller-manager {theirs:?}, Sigil {ours:?}, and the report named no difference"
            );
            explained.push(format!(
                "{name} on {pod}: SPIRE {theirs:?} / Sigil {ours:?} (reported: {})",
                caveats[0]
            ));
        }
    }
    println!(
        "{same} (ClusterSPIFFEID, pod) pairs agree, {issued} of them an issued SPIFFE ID; differences the report names:"
    );
    for e in &explained {
        println!("  {e}");
    }
    assert!(issued >= 15, "only {issued} issued identities compared");
    // The reported edges do show up on this corpus: the test can tell them apart.
    assert!(
        explained
            .iter()
            .any(|e| e.starts_with("kafka-brokers on data/kafka-no-hostname")),
        "{explained:#?}"
    );
    assert!(explained.len() <= 3, "{explained:#?}");
}

/// `sigil migrate --from-cluster`: the same objects, read from the apiserver, give the
/// same Sigil objects as the files. spire-controller-manager's CRDs are not available
/// offline (the Go module proxy refuses its module), so stand-in CRDs of the same group,
/// kinds and scope, with an open schema, hold the corpus.
#[tokio::test]
async fn from_the_cluster_it_writes_what_it_writes_from_the_files() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let cp = sigil_e2e::shared().await;
    let admin = cp.admin().await.unwrap();
    let crds = Api::<CustomResourceDefinition>::all(admin.clone());
    let kinds = [
        ("ClusterSPIFFEID", "clusterspiffeids"),
        (
            "ClusterFederatedTrustDomain",
            "clusterfederatedtrustdomains",
        ),
        ("ClusterStaticEntry", "clusterstaticentries"),
    ];
    for (kind, plural) in kinds {
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.spire.spiffe.io")},
            "spec": {
                "group": "spire.spiffe.io", "scope": "Cluster",
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "listKind": format!("{kind}List")},
                "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}],
            },
        });
        crds.create(
            &PostParams::default(),
            &serde_json::from_value(crd).unwrap(),
        )
        .await
        .unwrap();
    }
    for (_, plural) in kinds {
        let name = format!("{plural}.spire.spiffe.io");
        sigil_e2e::eventually(
            &format!("CRD {name} established"),
            std::time::Duration::from_secs(30),
            || async {
                let c = crds.get(&name).await.ok()?;
                c.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            },
        )
        .await;
    }
    let docs: Vec<Value> = corpus()
        .into_iter()
        .filter(|d| {
            d["apiVersion"]
                .as_str()
                .unwrap_or_default()
                .starts_with("spire.spiffe.io/")
        })
        .collect();
    for d in &docs {
        let kind = d["kind"].as_str().unwrap();
        let plural = kinds.iter().find(|(k, _)| *k == kind).unwrap().1;
        let gvk = GroupVersionKind::gvk("spire.spiffe.io", "v1alpha1", kind);
        Api::<DynamicObject>::all_with(
            admin.clone(),
            &ApiResource::from_gvk_with_plural(&gvk, plural),
        )
        .create(
            &PostParams::default(),
            &serde_json::from_value(d.clone()).unwrap(),
        )
        .await
        .unwrap();
    }
    let run = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args([
            "migrate",
            "--from-cluster",
            "--trust-domain-object",
            "default",
            "--kubeconfig",
        ])
        .arg(cp.kubeconfig_path())
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let mut from_cluster = Vec::new();
    migrate::parse(
        &String::from_utf8(run.stdout).unwrap(),
        "stdout",
        &mut from_cluster,
    )
    .unwrap();
    let from_files = migrate::migrate(
        &docs,
        &Options {
            trust_domain_object: Some("default".into()),
        },
    );
    let by_name = |objects: &[Value]| -> BTreeMap<String, Value> {
        objects
            .iter()
            .map(|o| {
                (
                    format!(
                        "{}/{}",
                        o["kind"].as_str().unwrap(),
                        o["metadata"]["name"].as_str().unwrap()
                    ),
                    o["spec"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(by_name(&from_cluster), by_name(&from_files.objects));
    assert_eq!(from_cluster.len(), docs.len() - from_files.errors());
    assert!(
        from_cluster
            .iter()
            .filter(|o| o["kind"] == "ClusterSPIFFEID")
            .all(|o| o["spec"]["trustDomain"] == "default")
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains(&format!(
            "{} spire-controller-manager object(s) read",
            docs.len()
        )),
        "{stderr}"
    );
}
