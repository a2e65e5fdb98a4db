//! The Helm chart (charts/sigil), with the helm built by `make test-tools`: it lints,
//! renders over every values file in charts/sigil/ci, every rendered object passes a
//! server-side dry-run apply on the real apiserver (schemas, RBAC, the CRD-backed
//! TrustDomain and ClusterSPIFFEID), and the operator runs on exactly the chart's RBAC.
#![allow(clippy::unwrap_used)]

use sigil_testkit::federation as federation_common;
use sigil_testkit::node_api as node_api_common;
use sigil_testkit::trust_domain as trust_domain_common;

use std::path::{Path, PathBuf};

use federation_common::{Behaviour, FakeEndpoint, Foreign};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::{Discovery, Scope};
use kube::{Client, ResourceExt};
use node_api_common::{World, WorldOptions};
use serde_json::json;
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_operator::crd::federated_bundle::FederatedBundle;
use trust_domain_common::{INSTANCE_LABEL, SETTLE, eventually, unique};

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sigil")
}

fn helm(args: &[&str]) -> String {
    let out = std::process::Command::new(sigil_e2e::tools::tool("helm").unwrap())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn values_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    assert!(
        v.len() >= 3,
        "charts/sigil/ci should hold several values files"
    );
    v
}

fn render(release: &str, namespace: &str, values: &Path, set: &[&str]) -> Vec<DynamicObject> {
    let chart = chart();
    let mut args = vec![
        "template",
        release,
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
        "-f",
        values.to_str().unwrap(),
    ];
    for s in set {
        args.push("--set");
        args.push(s);
    }
    let text = helm(&args);
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        out.push(serde_yaml::from_value::<DynamicObject>(v).unwrap());
    }
    out
}

async fn apply(
    client: &Client,
    discovery: &Discovery,
    obj: &DynamicObject,
    namespace: &str,
    dry_run: bool,
) -> Result<(), String> {
    let types = obj.types.clone().unwrap();
    let (group, version) = types
        .api_version
        .split_once('/')
        .unwrap_or(("", &types.api_version));
    let gvk = kube::core::GroupVersionKind::gvk(group, version, &types.kind);
    let (resource, caps) = discovery
        .resolve_gvk(&gvk)
        .ok_or_else(|| format!("the apiserver does not serve {}", types.kind))?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            obj.namespace().as_deref().unwrap_or(namespace),
            &resource,
        ),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let mut params = PatchParams::apply("sigil-chart-test").force();
    params.dry_run = dry_run;
    api.patch(&obj.name_any(), &params, &Patch::Apply(obj))
        .await
        .map(|_| ())
        .map_err(|e| format!("{} {}: {e}", types.kind, obj.name_any()))
}

#[test]
fn the_chart_lints() {
    let out = helm(&["lint", chart().to_str().unwrap(), "--strict"]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

/// The rendered agent container (sigil-agent) and its pod's volumes.
fn agent_of(objects: &[DynamicObject]) -> (serde_json::Value, serde_json::Value) {
    let ds = objects
        .iter()
        .find(|o| o.types.as_ref().unwrap().kind == "DaemonSet")
        .expect("a DaemonSet");
    let spec = &ds.data["spec"]["template"]["spec"];
    let agent = spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("an agent container")
        .clone();
    (agent, spec["volumes"].clone())
}

fn args_of(container: &serde_json::Value) -> Vec<&str> {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

#[test]
fn hsm_values_pass_the_module_the_token_and_the_pin_as_a_mounted_file() {
    let ci = chart().join("ci");
    let operator_of = |objects: &[DynamicObject]| {
        objects
            .iter()
            .find(|o| o.types.as_ref().unwrap().kind == "Deployment")
            .unwrap()
            .data["spec"]["template"]["spec"]
            .clone()
    };
    // Software keys by default: no PKCS#11 flag, no PIN volume.
    let op = operator_of(&render(
        "r",
        "sigil-system",
        &ci.join("default-values.yaml"),
        &[],
    ));
    assert!(!op.to_string().contains("pkcs11"));

    let op = operator_of(&render(
        "r",
        "sigil-system",
        &ci.join("hsm-values.yaml"),
        &[],
    ));
    let container = &op["containers"][0];
    let args = args_of(container);
    for flag in [
        "--key-manager=pkcs11",
        "--pkcs11-module=/opt/hsm/lib/libpkcs11.so",
        "--pkcs11-token-label=sigil",
        "--pkcs11-pin-file=/etc/sigil/pkcs11/pin",
    ] {
        assert!(args.contains(&flag), "{flag} in {args:?}");
    }
    let pin = op["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "pkcs11-pin")
        .expect("the PIN volume");
    assert_eq!(pin["secret"]["secretName"], "sigil-hsm-pin");
    assert_eq!(
        pin["secret"]["items"][0],
        json!({"key": "pin", "path": "pin"})
    );
    let mounts = container["volumeMounts"].to_string();
    assert!(
        mounts.contains("/etc/sigil/pkcs11") && mounts.contains("/opt/hsm"),
        "{mounts}"
    );
    // The PIN is never an environment variable.
    assert!(!container["env"].to_string().to_lowercase().contains("pin"));

    // pkcs11 without its module, token or PIN Secret is refused with the fix.
    let out = std::process::Command::new(sigil_e2e::tools::tool("helm").unwrap())
        .args(["template", "r", chart().to_str().unwrap()])
        .args(["--set", "operator.keyManager.type=pkcs11"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("operator.keyManager.pkcs11.module") && err.contains("docs/hsm.md"),
        "{err}"
    );
}

#[test]
fn tpm_values_wire_the_ca_bundle_the_device_and_the_flags() {
    let ci = chart().join("ci");
    // Off by default: no TPM flag, no device, the agent keeps its two capabilities only.
    let objects = render("r", "sigil-system", &ci.join("default-values.yaml"), &[]);
    let (agent, volumes) = agent_of(&objects);
    assert!(!args_of(&agent).iter().any(|a| a.starts_with("--tpm")));
    assert!(agent["securityContext"]["privileged"].is_null());
    assert!(!volumes.to_string().contains("tpm"));

    // Privileged, with the host's device mounted.
    let objects = render("r", "sigil-system", &ci.join("tpm-values.yaml"), &[]);
    let (agent, volumes) = agent_of(&objects);
    assert!(args_of(&agent).contains(&"--tpm-tcti=device:/dev/tpmrm0"));
    assert_eq!(agent["securityContext"]["privileged"], true);
    let device = volumes
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "tpm-device")
        .expect("the TPM device volume");
    assert_eq!(device["hostPath"]["path"], "/dev/tpmrm0");
    assert_eq!(device["hostPath"]["type"], "CharDevice");
    let operator = objects
        .iter()
        .find(|o| o.types.as_ref().unwrap().kind == "Deployment")
        .unwrap();
    let op = &operator.data["spec"]["template"]["spec"];
    assert!(
        args_of(&op["containers"][0]).contains(&"--tpm-ek-ca-bundle=/etc/sigil/tpm/ek-cas.pem")
    );
    assert!(args_of(&op["containers"][0]).contains(&"--require-tpm"));
    assert!(op["volumes"].to_string().contains("sigil-tpm-ek-cas"));

    // Through a device plugin: a resource limit instead of privileged, the EK certificate
    // from a host file.
    let objects = render(
        "r",
        "sigil-system",
        &ci.join("tpm-device-plugin-values.yaml"),
        &[],
    );
    let (agent, volumes) = agent_of(&objects);
    let args = args_of(&agent);
    assert!(args.contains(&"--tpm-ek-certificate-file=/etc/sigil/tpm/ek-certificate"));
    assert!(agent["securityContext"]["privileged"].is_null());
    assert_eq!(
        agent["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert_eq!(
        agent["resources"]["limits"]["devices.example.com/tpmrm"],
        json!(1)
    );
    assert_eq!(agent["resources"]["limits"]["memory"], "256Mi");
    assert!(!volumes.to_string().contains("tpm-device"));
    assert!(volumes.to_string().contains("/etc/tpm/ek-certificate.der"));

    // Agents on TPM with no CA bundle for the operator: refused at render time, saying why.
    let out = std::process::Command::new(sigil_e2e::tools::tool("helm").unwrap())
        .args(["template", "r", chart().to_str().unwrap()])
        .args(["--set", "tpm.agent.enabled=true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tpm.agent.enabled needs tpm.ekCASecretName"),
        "{err}"
    );

    // Requiring TPM with agents that don't use it would refuse every agent: refused at
    // render time too.
    let out = std::process::Command::new(sigil_e2e::tools::tool("helm").unwrap())
        .args(["template", "r", chart().to_str().unwrap()])
        .args(["--set", "tpm.required=true,tpm.ekCASecretName=cas"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tpm.required needs"), "{err}");
}

#[tokio::test]
async fn every_rendering_passes_a_server_side_dry_run() {
    let cp = sigil_e2e::shared().await;
    let admin = cp.admin().await.unwrap();
    let discovery = Discovery::new(admin.clone()).run().await.unwrap();
    for values in values_files() {
        let ns = cp.namespace("chart-dry").await.unwrap();
        let objects = render(&unique("r"), &ns, &values, &[]);
        let kinds: Vec<String> = objects
            .iter()
            .map(|o| o.types.as_ref().unwrap().kind.clone())
            .collect();
        for expected in [
            "Deployment",
            "DaemonSet",
            "ClusterRole",
            "ServiceAccount",
            "Service",
            "PodDisruptionBudget",
            "TrustDomain",
            "ClusterSPIFFEID",
        ] {
            assert!(
                kinds.iter().any(|k| k == expected),
                "{}: no {expected} rendered: {kinds:?}",
                values.display()
            );
        }
        let mut parsed_binaries = 0;
        // The operator's and the agent's rendered arguments parse with the binaries' own
        // command lines (a renamed flag fails here, not in a user's CrashLoopBackOff).
        for obj in &objects {
            let kind = obj.types.as_ref().unwrap().kind.as_str();
            if !matches!(kind, "Deployment" | "DaemonSet") {
                continue;
            }
            for c in obj.data["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
            {
                let args: Vec<String> = c["args"]
                    .as_array()
                    .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
                    .unwrap_or_default();
                let image = c["image"].as_str().unwrap();
                let argv = std::iter::once("bin".to_owned()).chain(args);
                let parsed = if image.contains("/sigil-operator:") {
                    <sigil_operator::app::Args as clap::Parser>::try_parse_from(argv)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                } else if image.contains("/sigil-agent:") {
                    <sigil_agent::app::Args as clap::Parser>::try_parse_from(argv)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                } else if image.contains("/sigil-csi:") {
                    <sigil_csi::app::Args as clap::Parser>::try_parse_from(argv)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                } else {
                    continue;
                };
                parsed.unwrap_or_else(|e| {
                    panic!("{}: {image} rejects its chart args: {e}", values.display())
                });
                parsed_binaries += 1;
            }
        }
        let with_csi = objects.iter().any(|o| {
            o.data["spec"]["template"]["spec"]["containers"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["name"] == "csi"))
        });
        assert_eq!(
            parsed_binaries,
            2 + usize::from(with_csi),
            "operator, agent (and sigil-csi) args checked"
        );
        let mut checked = 0;
        for obj in &objects {
            let kind = obj.types.as_ref().unwrap().kind.as_str();
            // The Prometheus Operator's CRDs are not part of a bare control plane.
            if matches!(kind, "ServiceMonitor" | "PodMonitor") {
                continue;
            }
            apply(&admin, &discovery, obj, &ns, true)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", values.display()));
            checked += 1;
        }
        println!(
            "{}: {checked} objects accepted by the apiserver (dry run)",
            values.display().to_string().rsplit('/').next().unwrap()
        );
    }
}

#[tokio::test]
async fn the_operator_runs_on_the_charts_rbac() {
    let cp = sigil_e2e::shared().await;
    let admin = cp.admin().await.unwrap();
    let discovery = Discovery::new(admin.clone()).run().await.unwrap();
    let ns = cp.namespace("chart-rbac").await.unwrap();
    let release = unique("rbac");
    // Only the chart's ServiceAccounts and RBAC, for real (no workloads, no CRD objects).
    let defaults = chart().join("ci").join("default-values.yaml");
    for obj in render(
        &release,
        &ns,
        &defaults,
        &["trustDomain.create=false", "clusterSPIFFEID.create=false"],
    ) {
        let kind = obj.types.as_ref().unwrap().kind.clone();
        if matches!(
            kind.as_str(),
            "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
        ) {
            apply(&admin, &discovery, &obj, &ns, false).await.unwrap();
        }
    }
    let operator = cp
        .service_account_client(&ns, "sigil-operator")
        .await
        .unwrap();
    // TrustDomain (CA Secret, bundle ConfigMap, status, Events, Lease), identity index
    // (watches, ClusterSPIFFEID status), Node API (TokenReview, pods, nodes): all as the
    // chart's sigil-operator ServiceAccount.
    let w = World::start_with(
        "rbac",
        WorldOptions {
            namespace: Some(ns.clone()),
            operator_client: Some(operator),
            ..Default::default()
        },
    )
    .await;
    let agent = w.attested_agent(&w.node_a).await;
    let web = w.pod("web", &w.node_a, "web", json!({"app": "web"})).await;
    let csid = format!("{}-web", w.tag);
    w.cluster_spiffe_id(&csid, "web").await;
    let mut stream = agent.sync_entries(0).await.unwrap();
    let entry = sigil_operator::index::entry_id(&csid, &web.uid().unwrap());
    eventually("the entry on the agent's stream", SETTLE, || {
        let got = futures::FutureExt::now_or_never(futures::StreamExt::next(&mut stream));
        let found = match got {
            Some(Some(Ok(m))) => m.upserts.iter().any(|e| e.id == entry),
            _ => false,
        };
        async move { found.then_some(()) }
    })
    .await;
    let csids = Api::<ClusterSPIFFEID>::all(admin.clone());
    eventually(
        "ClusterSPIFFEID status written by the operator",
        SETTLE,
        || async {
            let status = csids.get(&csid).await.ok()?.status?;
            (status.stats.pods_selected >= 1).then_some(())
        },
    )
    .await;

    // FederatedBundle: the fetched bundle kept in a ConfigMap in the release namespace,
    // status and Events, all under the chart's grants.
    let partner = Foreign::new(&format!("partner-{}.test", w.tag));
    let endpoint = FakeEndpoint::start("127.0.0.1", Behaviour::Serve(partner.bundle_json())).await;
    let (chain, key) = partner.svid("/spire/server");
    endpoint.cert.set(&chain, &key).unwrap();
    let fb_name = format!("{}-partner", w.tag);
    let fbs = Api::<FederatedBundle>::all(admin.clone());
    fbs.create(
        &kube::api::PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "sigil.dev/v1alpha1", "kind": "FederatedBundle",
            "metadata": {"name": fb_name, "labels": {INSTANCE_LABEL: w.tag}},
            "spec": {
                "trustDomain": partner.td.name(),
                "bundleEndpointURL": endpoint.url,
                "bundleEndpointProfile": {"type": "https_spiffe", "endpointSPIFFEID": partner.td.id("/spire/server").unwrap().to_string()},
                "trustDomainBundle": partner.bundle().x509_pem(),
            },
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    eventually(
        "the FederatedBundle fetched under the chart's RBAC",
        SETTLE,
        || async {
            let status = fbs.get(&fb_name).await.ok()?.status?;
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == "Fetched")
                .then_some(())
        },
    )
    .await;
    let cm = Api::<ConfigMap>::namespaced(admin.clone(), &ns)
        .get(&format!("sigil-federated-{fb_name}"))
        .await
        .unwrap();
    assert!(cm.data.unwrap().contains_key("bundle.spiffe"));
    assert_eq!(w.replica.federated.get(&partner.td), Some(partner.bundle()));
    assert!(
        w.replica.readiness.is_ready(),
        "not ready under the chart's RBAC: {:?}",
        w.replica.readiness.pending()
    );
}

/// The chart's hardening, over every values file: every pod runs under the runtime's
/// seccomp profile, only the agent container holds an API token (sigil-csi and the
/// registrar, which face pods, hold none), and only the release's agents reach the Node
/// API port. Fails on the chart before issue #21: no seccomp profile on the DaemonSet, the
/// default token automounted into every container, no NetworkPolicy.
#[test]
fn every_pod_is_confined_and_only_the_agent_holds_an_api_token() {
    for values in values_files() {
        let objects = render("r", "sigil-system", &values, &[]);
        let file = values.file_name().unwrap().to_string_lossy().into_owned();
        for o in &objects {
            let kind = o.types.as_ref().unwrap().kind.as_str();
            if kind != "DaemonSet" && kind != "Deployment" {
                continue;
            }
            let spec = &o.data["spec"]["template"]["spec"];
            assert_eq!(
                spec["securityContext"]["seccompProfile"]["type"],
                "RuntimeDefault",
                "{file}: {kind} {} runs without the RuntimeDefault seccomp profile",
                o.name_any()
            );
            if kind != "DaemonSet" {
                continue;
            }
            assert_eq!(
                spec["automountServiceAccountToken"], false,
                "{file}: the node pod automounts its token into every container"
            );
            for c in spec["containers"].as_array().unwrap() {
                let mounts = c["volumeMounts"].to_string();
                let has_token = mounts.contains("kube-api-access");
                assert_eq!(
                    has_token,
                    c["name"] == "agent",
                    "{file}: container {} API token mount: {mounts}",
                    c["name"]
                );
            }
        }
        let policy = objects
            .iter()
            .find(|o| o.types.as_ref().unwrap().kind == "NetworkPolicy")
            .unwrap_or_else(|| panic!("{file}: no NetworkPolicy for the operator"));
        let rules = policy.data["spec"]["ingress"].as_array().unwrap();
        let node_api = rules
            .iter()
            .find(|r| r["ports"][0]["port"] == "node-api")
            .unwrap_or_else(|| panic!("{file}: no rule for the Node API port"));
        assert_eq!(
            node_api["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
            "agent",
            "{file}: {node_api}"
        );
    }
}

fn render_values(values: &str, set: &[&str]) -> Vec<DynamicObject> {
    render("r", "sigil-system", &chart().join("ci").join(values), set)
}

fn object<'a>(objects: &'a [DynamicObject], kind: &str) -> Option<&'a DynamicObject> {
    objects
        .iter()
        .find(|o| o.types.as_ref().unwrap().kind == kind)
}

fn pod_spec<'a>(objects: &'a [DynamicObject], kind: &str) -> &'a serde_json::Value {
    &object(objects, kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
        .data["spec"]["template"]["spec"]
}

fn container<'a>(spec: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn names(list: &serde_json::Value) -> Vec<&str> {
    list.as_array()
        .map(|a| a.iter().map(|v| v["name"].as_str().unwrap()).collect())
        .unwrap_or_default()
}

/// Every option of issue #29 (item 5) lands where it belongs, from
/// ci/hardened-values.yaml, which `every_rendering_passes_a_server_side_dry_run` also
/// applies (dry run) on the real apiserver; and the defaults keep what they had.
#[test]
fn every_chart_option_lands_where_it_belongs() {
    let objects = render_values("hardened-values.yaml", &[]);
    let op = pod_spec(&objects, "Deployment");
    let node = pod_spec(&objects, "DaemonSet");

    // Registry override and pull secrets, on every image and both pods.
    for spec in [op, node] {
        assert_eq!(spec["imagePullSecrets"], json!([{"name": "mirror-pull"}]));
        assert_eq!(spec["priorityClassName"], "system-cluster-critical");
        assert_eq!(spec["nodeSelector"]["kubernetes.io/os"], "linux");
        for c in spec["containers"].as_array().unwrap() {
            let image = c["image"].as_str().unwrap();
            assert!(
                image.starts_with("mirror.example.com:5000/"),
                "{} keeps its registry: {image}",
                c["name"]
            );
            assert!(
                c["resources"]["limits"]["memory"].is_string(),
                "container {} has no memory limit",
                c["name"]
            );
        }
    }
    assert_eq!(
        container(node, "node-driver-registrar")["image"],
        "mirror.example.com:5000/sig-storage/csi-node-driver-registrar:v2.13.0"
    );
    assert_eq!(
        container(op, "operator")["image"],
        "mirror.example.com:5000/sigil-dev/sigil-operator:0.1.0"
    );

    // Scheduling, per component.
    assert_eq!(op["nodeSelector"]["node-role.example.com/infra"], "true");
    assert_eq!(
        op["tolerations"][0]["key"], "node-role.example.com/infra",
        "{op}"
    );
    assert_eq!(
        op["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"],
        "topology.kubernetes.io/zone"
    );
    assert_eq!(
        node["tolerations"],
        json!([{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}])
    );
    assert_eq!(
        node["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][0]["operator"],
        "DoesNotExist"
    );

    // Resources of every container.
    assert_eq!(container(op, "operator")["resources"]["limits"]["cpu"], "2");
    assert_eq!(
        container(node, "agent")["resources"]["limits"]["memory"],
        "512Mi"
    );
    assert_eq!(
        container(node, "csi")["resources"]["requests"]["memory"],
        "32Mi"
    );
    assert_eq!(
        container(node, "node-driver-registrar")["resources"]["limits"]["cpu"],
        "100m"
    );

    // PodDisruptionBudget: minAvailable replaces maxUnavailable.
    let pdb = &object(&objects, "PodDisruptionBudget").unwrap().data["spec"];
    assert_eq!(pdb["minAvailable"], 2);
    assert!(pdb["maxUnavailable"].is_null(), "{pdb}");
    assert_eq!(pdb["unhealthyPodEvictionPolicy"], "AlwaysAllow");

    // Pod Security Admission labels on the namespace the chart now manages.
    let ns = object(&objects, "Namespace").expect("namespace.create renders the Namespace");
    assert_eq!(ns.name_any(), "sigil-system");
    let labels = ns.labels();
    for mode in ["enforce", "audit", "warn"] {
        assert_eq!(
            labels
                .get(&format!("pod-security.kubernetes.io/{mode}"))
                .map(String::as_str),
            Some("privileged")
        );
    }
    assert_eq!(labels.get("team").map(String::as_str), Some("identity"));

    // Extra env, volumes and mounts, next to (not instead of) the chart's own.
    let operator = container(op, "operator");
    let env = names(&operator["env"]);
    assert_eq!(
        env,
        [
            "POD_NAME",
            "POD_NAMESPACE",
            "MIMALLOC_ALLOW_THP",
            "HTTPS_PROXY",
            "NO_PROXY"
        ]
    );
    let thp = operator["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "MIMALLOC_ALLOW_THP")
        .unwrap();
    assert_eq!(thp["value"], "0", "{thp}");
    assert_eq!(names(&op["volumes"]), ["corporate-ca"]);
    assert_eq!(names(&operator["volumeMounts"]), ["corporate-ca"]);
    assert!(names(&container(node, "agent")["env"]).contains(&"RUST_BACKTRACE"));
    assert!(names(&container(node, "csi")["env"]).contains(&"RUST_LOG"));
    let node_volumes = names(&node["volumes"]);
    assert!(node_volumes.contains(&"agent-scratch") && node_volumes.contains(&"csi-data"));
    for c in ["agent", "csi"] {
        assert!(names(&container(node, c)["volumeMounts"]).contains(&"agent-scratch"));
    }

    // The defaults: no Namespace object, no pull secrets, the operator's replicas spread
    // over nodes, the agent node-critical, a PDB of maxUnavailable 1, images unchanged.
    // Admission warnings: the port on the container, the Service, the webhook and the
    // NetworkPolicy rule (restricted to the control plane's block), and the timeout.
    let vwc = &object(&objects, "ValidatingWebhookConfiguration")
        .unwrap()
        .data["webhooks"][0];
    assert_eq!(vwc["timeoutSeconds"], 5);
    assert_eq!(vwc["clientConfig"]["service"]["port"], 9444);
    assert_eq!(vwc["failurePolicy"], "Ignore");
    assert!(args_of(container(op, "operator")).contains(&"--admission-addr=0.0.0.0:9444"));
    let svc = objects
        .iter()
        .find(|o| {
            o.types.as_ref().unwrap().kind == "Service" && o.name_any().ends_with("-operator")
        })
        .unwrap();
    assert!(
        svc.data["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "admission" && p["port"] == 9444),
        "{}",
        svc.data["spec"]["ports"]
    );
    let policy = &object(&objects, "NetworkPolicy").unwrap().data["spec"]["ingress"];
    let rule = policy
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ports"][0]["port"] == "admission")
        .unwrap();
    assert_eq!(rule["from"], json!([{"ipBlock": {"cidr": "10.0.0.0/28"}}]));

    let objects = render_values("default-values.yaml", &[]);
    assert!(object(&objects, "Namespace").is_none());
    let op = pod_spec(&objects, "Deployment");
    let node = pod_spec(&objects, "DaemonSet");
    assert!(op["imagePullSecrets"].is_null() && op["priorityClassName"].is_null());
    assert_eq!(
        op["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
            ["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert!(op["volumes"].is_null(), "{}", op["volumes"]);
    assert_eq!(node["priorityClassName"], "system-node-critical");
    assert_eq!(node["tolerations"], json!([{"operator": "Exists"}]));
    assert!(node["affinity"].is_null());
    assert_eq!(
        container(node, "node-driver-registrar")["image"],
        "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.13.0"
    );
    let pdb = &object(&objects, "PodDisruptionBudget").unwrap().data["spec"];
    assert_eq!(pdb["maxUnavailable"], 1);

    // Admission off: no webhook, no flag, no port, no RBAC rule.
    let off = render_values("default-values.yaml", &["admission.enabled=false"]);
    assert!(object(&off, "ValidatingWebhookConfiguration").is_none());
    let text = serde_json::to_string(&off.iter().map(|o| &o.data).collect::<Vec<_>>()).unwrap();
    for absent in [
        "--admission-",
        "validatingwebhookconfigurations",
        "\"admission\"",
    ] {
        assert!(
            !text.contains(absent),
            "{absent} rendered with admission.enabled=false"
        );
    }

    // PDB off; a registry override on references with no registry host.
    let objects = render_values(
        "default-values.yaml",
        &[
            "operator.podDisruptionBudget.enabled=false",
            "imageRegistry=localhost:5000",
            "image.repository=sigil",
            "csi.registrar.image=registrar:v1",
        ],
    );
    assert!(object(&objects, "PodDisruptionBudget").is_none());
    let node = pod_spec(&objects, "DaemonSet");
    assert_eq!(
        container(node, "agent")["image"],
        "localhost:5000/sigil/sigil-agent:0.1.0"
    );
    assert_eq!(
        container(node, "node-driver-registrar")["image"],
        "localhost:5000/registrar:v1"
    );
}

/// The RSA choices reach the TrustDomain and the ClusterSPIFFEID; by default the chart
/// writes no JWT key type or algorithm (so setting only one never conflicts with the
/// other) and no workload key type.
#[test]
fn rsa_key_types_and_the_jwt_algorithm_reach_the_objects() {
    let objects = render_values("rsa-values.yaml", &[]);
    let td = &object(&objects, "TrustDomain").unwrap().data["spec"];
    assert_eq!(td["ca"]["keyType"], "RSA-3072");
    assert_eq!(td["jwt"]["algorithm"], "RS256");
    assert!(td["jwt"]["keyType"].is_null(), "{td}");
    let csid = &object(&objects, "ClusterSPIFFEID").unwrap().data["spec"];
    assert_eq!(csid["workloadKeyType"], "RSA-2048");

    let objects = render_values("default-values.yaml", &[]);
    let td = &object(&objects, "TrustDomain").unwrap().data["spec"];
    assert_eq!(td["ca"]["keyType"], "ECDSA-P256");
    assert!(
        td["jwt"]["keyType"].is_null() && td["jwt"]["algorithm"].is_null(),
        "{td}"
    );
    let csid = &object(&objects, "ClusterSPIFFEID").unwrap().data["spec"];
    assert!(csid["workloadKeyType"].is_null(), "{csid}");
}

/// values.schema.json: a wrong value fails `helm template` (and so `helm install`) with a
/// message naming the field, before anything reaches the cluster.
#[test]
fn the_schema_refuses_wrong_values_naming_the_field() {
    let cases: &[(&[&str], &str)] = &[
        (&["operator.replicas=two"], "/operator/replicas"),
        (&["image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (
            &["trustDomain.x509SVIDTTL=1hour"],
            "/trustDomain/x509SVIDTTL",
        ),
        (
            &["trustDomain.ca.keyType=RSA-1024"],
            "/trustDomain/ca/keyType",
        ),
        (
            &["trustDomain.jwt.algorithm=HS256"],
            "/trustDomain/jwt/algorithm",
        ),
        (
            &["clusterSPIFFEID.workloadKeyType=RSA-4096"],
            "/clusterSPIFFEID/workloadKeyType",
        ),
        (
            &["operater.replicas=1"],
            "additional properties 'operater' not allowed",
        ),
        (
            &["agent.tolerance[0].key=x"],
            "additional properties 'tolerance' not allowed",
        ),
        (
            &["agent.tolerations[0].operator=Maybe"],
            "/agent/tolerations/0/operator",
        ),
        (&["imagePullSecrets[0]=regcred"], "/imagePullSecrets/0"),
        (
            &["admission.timeoutSeconds=60"],
            "/admission/timeoutSeconds",
        ),
        (
            &["operator.podDisruptionBudget.minAvailable=half"],
            "/operator/podDisruptionBudget/minAvailable",
        ),
        (
            &["namespace.podSecurity.enforce=strict"],
            "/namespace/podSecurity/enforce",
        ),
        (
            &["operator.extraVolumeMounts[0].name=x"],
            "/operator/extraVolumeMounts/0",
        ),
        (
            &["csi.registrar.resources.limits.memory=lots"],
            "/csi/registrar/resources/limits/memory",
        ),
        (&["operator.nodeAPIPort=70000"], "/operator/nodeAPIPort"),
        (
            &["operator.keyManager.type=vault"],
            "/operator/keyManager/type",
        ),
    ];
    for (set, field) in cases {
        let mut cmd = std::process::Command::new(sigil_e2e::tools::tool("helm").unwrap());
        cmd.args(["template", "r", chart().to_str().unwrap()]);
        for s in *set {
            cmd.args(["--set", s]);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{set:?} was accepted");
        assert!(
            err.contains("don't meet the specifications of the schema") && err.contains(field),
            "{set:?}: the error does not name {field}:\n{err}"
        );
    }
}

/// The namespace labels the chart writes admit the node pod (hostPID, hostPath, a
/// privileged sigil-csi) under Pod Security Admission on the real apiserver, while the
/// `restricted` level refuses it, naming why; the operator's pod alone passes
/// `restricted`.
#[tokio::test]
async fn pod_security_labels_admit_the_charts_pods() {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    let cp = sigil_e2e::shared().await;
    let admin = cp.admin().await.unwrap();
    let discovery = Discovery::new(admin.clone()).run().await.unwrap();
    let ns = cp.namespace("chart-psa").await.unwrap();
    let objects = render(
        &unique("psa"),
        &ns,
        &chart().join("ci").join("hardened-values.yaml"),
        &[],
    );
    let namespace = object(&objects, "Namespace").unwrap();
    apply(&admin, &discovery, namespace, &ns, false)
        .await
        .unwrap();
    let pods = Api::<Pod>::namespaced(admin.clone(), &ns);
    let dry = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    let pod_of = |kind: &str| -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{}-pod", kind.to_lowercase()), "namespace": ns},
            "spec": pod_spec(&objects, kind),
        }))
        .unwrap()
    };
    for kind in ["DaemonSet", "Deployment"] {
        pods.create(&dry, &pod_of(kind))
            .await
            .unwrap_or_else(|e| panic!("{kind}'s pod refused under the chart's labels: {e}"));
    }

    // Restricted, as a cluster-wide default would make it: the node pod is refused.
    let namespaces = Api::<Namespace>::all(admin.clone());
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})),
        )
        .await
        .unwrap();
    let err = pods
        .create(&dry, &pod_of("DaemonSet"))
        .await
        .expect_err("the node pod admitted under restricted")
        .to_string();
    assert!(
        err.contains("violates PodSecurity") && err.contains("hostPID"),
        "{err}"
    );
    pods.create(&dry, &pod_of("Deployment"))
        .await
        .unwrap_or_else(|e| panic!("the operator's pod refused under restricted: {e}"));
}

/// `kubectl create -f -` of `pod`, as the admin: its stderr (where kubectl prints the API
/// server's warnings) on success.
async fn kubectl_create(kubeconfig: &Path, pod: &serde_json::Value) -> String {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new(sigil_e2e::tools::tool("kubectl").unwrap())
        .args([
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "create",
            "-f",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(pod.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "kubectl create failed: {stderr}");
    stderr
}

/// Admission warnings, as the chart installs them: the chart's ValidatingWebhookConfiguration
/// (its matchConditions, failurePolicy and rules, with the Service swapped for this test's
/// loopback URL), the operator's webhook running on the chart's RBAC (it makes its Secret
/// and writes the caBundle itself), and the real kubectl printing the API server's warning.
#[tokio::test]
async fn kubectl_warns_about_a_pod_with_a_sigil_volume_that_no_cluster_spiffe_id_selects() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cp = sigil_e2e::shared().await;
    let admin = cp.admin().await.unwrap();
    let discovery = Discovery::new(admin.clone()).run().await.unwrap();
    let ns = cp.namespace("chart-admission").await.unwrap();
    let release = unique("adm");
    let objects = render(
        &release,
        &ns,
        &chart().join("ci").join("default-values.yaml"),
        &["trustDomain.create=false", "clusterSPIFFEID.create=false"],
    );
    for obj in &objects {
        let kind = obj.types.as_ref().unwrap().kind.clone();
        if matches!(
            kind.as_str(),
            "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
        ) {
            apply(&admin, &discovery, obj, &ns, false).await.unwrap();
        }
    }
    let operator = cp
        .service_account_client(&ns, "sigil-operator")
        .await
        .unwrap();
    let w = World::start_with(
        "adm",
        WorldOptions {
            namespace: Some(ns.clone()),
            ..Default::default()
        },
    )
    .await;

    // The operator's flags as the chart renders them, but serving on loopback.
    let operator_args = {
        let deployment = object(&objects, "Deployment").unwrap();
        let spec = &deployment.data["spec"]["template"]["spec"];
        args_of(container(spec, "operator"))
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let flag = |name: &str| {
        operator_args
            .iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("--{name} in {operator_args:?}"))
            .to_owned()
    };
    let configuration = flag("admission-webhook-configuration");
    let secret = flag("admission-secret");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut vwc = object(&objects, "ValidatingWebhookConfiguration")
        .expect("the chart renders the admission webhook by default")
        .clone();
    assert_eq!(vwc.name_any(), configuration);
    let hook = &mut vwc.data["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["clientConfig"]["service"]["path"], "/validate/pods");
    hook["clientConfig"] = json!({"url": format!("https://127.0.0.1:{port}/validate/pods")});
    apply(&admin, &discovery, &vwc, &ns, false).await.unwrap();

    let cancel = tokio_util::sync::CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let metrics = sigil_operator::admission::AdmissionMetrics::default();
    tokio::spawn(sigil_operator::admission::run(
        operator,
        ns.clone(),
        sigil_operator::admission::AdmissionArgs {
            admission_addr: None,
            admission_secret: secret.clone(),
            admission_dns_names: vec!["127.0.0.1".into()],
            admission_webhook_configuration: configuration.clone(),
        },
        listener,
        sigil_operator::admission::Webhook {
            index: w.index.clone(),
            metrics: metrics.clone(),
        },
        cancel.clone(),
    ));
    let vwcs =
        Api::<k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration>::all(
            admin.clone(),
        );
    let ca = eventually("the operator to set the caBundle", SETTLE, || async {
        let v = vwcs.get(&configuration).await.ok()?;
        v.webhooks?.first()?.client_config.ca_bundle.clone()
    })
    .await;
    let stored = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), &ns)
        .get(&secret)
        .await
        .unwrap();
    assert_eq!(
        stored.data.unwrap()["ca.crt"].0,
        ca.0,
        "the caBundle is the CA in the Secret every replica reads"
    );

    let csid = format!("{}-api", w.tag);
    w.cluster_spiffe_id(&csid, "api").await;
    let pod = |name: &str, app: &str, driver: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": w.ns, "labels": {"app": app}},
            "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}],
                     "volumes": [{"name": "spiffe", "csi": {"driver": driver, "readOnly": true}}]}})
    };
    // The index learns of the new ClusterSPIFFEID through its watch: until it has, the
    // nearest miss may be another one; the pods are new each time.
    let mut attempt = 0;
    let warning = eventually("a warning naming the ClusterSPIFFEID", SETTLE, || {
        attempt += 1;
        let web = pod(&format!("web-{attempt}"), "web", "csi.sigil.dev");
        let (kubeconfig, csid) = (cp.kubeconfig_path().to_owned(), csid.clone());
        async move {
            let stderr = kubectl_create(&kubeconfig, &web).await;
            stderr
                .contains(&format!("ClusterSPIFFEID {csid}"))
                .then_some(stderr)
        }
    })
    .await;
    println!("kubectl printed: {warning}");
    for part in [
        "Warning:",
        "mounts Sigil volume \"spiffe\"",
        "no ClusterSPIFFEID selects it",
        "spec.podSelector does not match the pod's labels (app=web)",
        "sigil explain pod",
    ] {
        assert!(warning.contains(part), "{part:?} missing: {warning}");
    }
    // Whoever applies a Deployment or a CronJob is warned about its pod template.
    let template = |p: serde_json::Value| json!({"metadata": {"labels": p["metadata"]["labels"]}, "spec": p["spec"]});
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": w.ns},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": template(pod("x", "web", "csi.sigil.dev"))}});
    let said = kubectl_create(cp.kubeconfig_path(), &deployment).await;
    assert!(
        said.contains(&format!(
            "deployment {}/web: its pods mount Sigil volume",
            w.ns
        )) && said.contains("fix the pod template's labels"),
        "{said}"
    );
    let mut job_pod = template(pod("x", "web", "csi.sigil.dev"));
    job_pod["spec"]["restartPolicy"] = "Never".into();
    let cronjob = json!({"apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": "nightly", "namespace": w.ns},
        "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": job_pod}}}});
    let said = kubectl_create(cp.kubeconfig_path(), &cronjob).await;
    assert!(
        said.contains(&format!("cronjob {}/nightly: its pods mount", w.ns)),
        "{said}"
    );

    let selected =
        kubectl_create(cp.kubeconfig_path(), &pod("api-1", "api", "csi.sigil.dev")).await;
    assert!(!selected.contains("Warning"), "a selected pod: {selected}");
    let other = kubectl_create(
        cp.kubeconfig_path(),
        &pod("other-1", "web", "csi.example.com"),
    )
    .await;
    assert!(
        !other.contains("Warning"),
        "another driver's volume: {other}"
    );

    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let count = |outcome: &str| {
        sigil_e2e::http::metric(
            &text,
            &format!("sigil_admission_reviews_total{{outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(count("warned") >= 1.0, "{text}");
    assert_eq!(count("selected"), 1.0, "{text}");
    assert_eq!(
        count("not_concerned"),
        0.0,
        "matchConditions kept the other driver's pod away from the webhook: {text}"
    );
    vwcs.delete(&configuration, &Default::default())
        .await
        .unwrap();
}
