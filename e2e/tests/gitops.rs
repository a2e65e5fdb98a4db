//! GitOps as Argo CD and Flux run it (issue #29, item 6), on the real apiserver with the
//! operator running: `examples/gitops` applied with server-side apply twice is a no-op
//! with no field-manager conflict, the operator owns only status, kstatus (Flux's health
//! check, [`sigil_e2e::kstatus`]) and the Argo CD health checks of docs/gitops.md (run
//! with a real Lua) read the live objects, and deleting an object garbage-collects what
//! the operator made for it (Kubernetes' own garbage collector, from the pinned
//! kube-controller-manager).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use serde_json::{Value, json};
use sigil_e2e::kstatus::{self, Status};
use sigil_testkit::federation::{Behaviour, FakeEndpoint, Foreign};
use sigil_testkit::node_api::World;
use sigil_testkit::trust_domain::{INSTANCE_LABEL, SETTLE, eventually};

/// The field manager Argo CD applies with (`kubectl apply --server-side` would be
/// `kubectl`; Flux's is `kustomize-controller`).
const MANAGER: &str = "argocd-controller";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The objects of `examples/gitops`, in the kustomization's order.
fn examples() -> Vec<Value> {
    let dir = repo().join("examples/gitops");
    let k: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .unwrap();
    let mut out = Vec::new();
    for file in k["resources"].as_sequence().unwrap() {
        let text = std::fs::read_to_string(dir.join(file.as_str().unwrap())).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    assert_eq!(
        out.len(),
        4,
        "examples/gitops: a TrustDomain, two ClusterSPIFFEIDs, a FederatedBundle"
    );
    out
}

/// What a kustomize overlay for this test does to the examples: a name suffix (the
/// objects are cluster-scoped and the control plane is shared), the label that gives them
/// to this test's operator, a trust domain name of its own, and the partner's real
/// endpoint and bundle.
fn overlay(mut objects: Vec<Value>, w: &World, partner: &Foreign, url: &str) -> Vec<Value> {
    for o in &mut objects {
        let name = format!("{}-{}", o["metadata"]["name"].as_str().unwrap(), w.tag);
        o["metadata"]["name"] = json!(name);
        o["metadata"]["labels"] = json!({INSTANCE_LABEL: w.tag});
        match o["kind"].as_str().unwrap() {
            "TrustDomain" => {
                o["spec"]["trustDomain"] = json!(format!("{}.prod.example.org", w.tag));
                // Only this test's namespace: two tests' TrustDomains must not both
                // publish a ConfigMap of the same name into one namespace.
                o["spec"]["bundle"]["namespaceSelector"]["matchLabels"][BUNDLE_LABEL] =
                    json!(w.tag);
            }
            "ClusterSPIFFEID" => {
                let td = o["spec"]["trustDomain"].as_str().unwrap();
                o["spec"]["trustDomain"] = json!(format!("{td}-{}", w.tag));
                o["spec"]["federatesWith"] = json!([partner.td.name()]);
            }
            "FederatedBundle" => {
                o["spec"]["trustDomain"] = json!(partner.td.name());
                o["spec"]["bundleEndpointURL"] = json!(url);
                o["spec"]["bundleEndpointProfile"]["endpointSPIFFEID"] =
                    json!(partner.td.id("/spire/server").unwrap().to_string());
                o["spec"]["trustDomainBundle"] = json!(partner.bundle().x509_pem());
            }
            k => panic!("unexpected kind {k} in examples/gitops"),
        }
    }
    objects
}

fn api_for(client: &Client, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("sigil.dev", "v1alpha1", kind);
    let plural = format!("{}s", kind.to_lowercase());
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, &plural),
    )
}

/// Server-side apply as a GitOps controller does it: its own field manager, and no
/// `--force-conflicts`, so a field another manager owns is a 409, not silently taken.
async fn apply(client: &Client, obj: &Value, dry_run: bool) -> Result<DynamicObject, kube::Error> {
    let api = api_for(client, obj["kind"].as_str().unwrap());
    let mut params = PatchParams::apply(MANAGER);
    params.dry_run = dry_run;
    api.patch(
        obj["metadata"]["name"].as_str().unwrap(),
        &params,
        &Patch::Apply(obj),
    )
    .await
}

async fn live(client: &Client, obj: &Value) -> Value {
    let o = api_for(client, obj["kind"].as_str().unwrap())
        .get(obj["metadata"]["name"].as_str().unwrap())
        .await
        .unwrap();
    serde_json::to_value(o).unwrap()
}

fn ready(obj: &Value) -> Option<&Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
}

/// Waits until the operator reports the object's current generation, and returns it.
async fn reconciled(client: &Client, obj: &Value, ready_status: &str) -> Value {
    let what = format!(
        "{} {} reconciled with Ready={ready_status}",
        obj["kind"], obj["metadata"]["name"]
    );
    eventually(&what, SETTLE, || async {
        let o = live(client, obj).await;
        let current = o["status"]["observedGeneration"] == o["metadata"]["generation"];
        (current && ready(&o).is_some_and(|c| c["status"] == ready_status)).then_some(o)
    })
    .await
}

/// The Argo CD health checks of docs/gitops.md: `kind` → its Lua script.
fn argocd_health_checks() -> BTreeMap<String, String> {
    let doc = std::fs::read_to_string(repo().join("docs/gitops.md")).unwrap();
    let block = doc
        .split("```yaml")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains("name: argocd-cm"))
        .expect("docs/gitops.md shows the argocd-cm ConfigMap");
    let cm: Value = serde_yaml::from_str(block).unwrap();
    let mut out = BTreeMap::new();
    for (key, script) in cm["data"].as_object().unwrap() {
        let kind = key
            .strip_prefix("resource.customizations.health.sigil.dev_")
            .unwrap_or_else(|| panic!("unexpected argocd-cm key {key}"));
        out.insert(kind.to_owned(), script.as_str().unwrap().to_owned());
    }
    assert_eq!(
        out.keys().collect::<Vec<_>>(),
        ["ClusterSPIFFEID", "FederatedBundle", "TrustDomain"]
    );
    out
}

/// `v` as a Lua expression (JSON null is nil: the key is absent, as in Argo CD).
fn lua_literal(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut out = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\{}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
        Value::Array(a) => format!(
            "{{{}}}",
            a.iter().map(lua_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!(
                    "[{}] = {}",
                    lua_literal(&Value::String(k.clone())),
                    lua_literal(v)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs an Argo CD health script on `obj` with Debian's lua5.4 (Argo CD sets the global
/// `obj` and reads the table the script returns); returns (status, message).
fn argocd_health(script: &str, obj: &Value) -> (String, String) {
    let lua = ["/usr/bin/lua5.4", "/usr/local/bin/lua5.4"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("lua5.4 not installed: `make test-tools` installs Debian's lua5.4");
    let program = format!(
        "obj = {}\nlocal function health()\n{script}\nend\nlocal hs = health()\nio.write(hs.status, \"\\n\", hs.message or \"\")\n",
        lua_literal(obj)
    );
    let out = std::process::Command::new(lua)
        .args(["-e", &program])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lua failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\n').unwrap();
    (status.to_owned(), message.to_owned())
}

/// The label the example TrustDomain's bundle namespaceSelector matches.
const BUNDLE_LABEL: &str = "sigil.dev/trust-bundle";

async fn label_namespace(client: &Client, ns: &str, tag: &str) {
    Api::<Namespace>::all(client.clone())
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {BUNDLE_LABEL: tag}}})),
        )
        .await
        .unwrap();
}

/// The examples with a partner endpoint serving a real bundle, applied once and Ready.
struct Applied {
    w: World,
    _endpoint: FakeEndpoint,
    objects: Vec<Value>,
}

async fn apply_examples(prefix: &str) -> Applied {
    let w = World::start(prefix).await;
    label_namespace(&w.client, &w.ns, &w.tag).await;
    let partner = Foreign::new(&format!("partner-{}.test", w.tag));
    let endpoint = FakeEndpoint::start("127.0.0.1", Behaviour::Serve(partner.bundle_json())).await;
    let (chain, key) = partner.svid("/spire/server");
    endpoint.cert.set(&chain, &key).unwrap();
    let objects = overlay(examples(), &w, &partner, &endpoint.url);
    for o in &objects {
        apply(&w.client, o, false)
            .await
            .unwrap_or_else(|e| panic!("first apply of {}: {e}", o["metadata"]["name"]));
    }
    for o in &objects {
        reconciled(&w.client, o, "True").await;
    }
    Applied {
        w,
        _endpoint: endpoint,
        objects,
    }
}

#[tokio::test]
async fn the_examples_apply_twice_with_no_diff_no_conflict_and_report_current() {
    let a = apply_examples("gitops").await;
    let client = &a.w.client;
    let checks = argocd_health_checks();
    for o in &a.objects {
        let kind = o["kind"].as_str().unwrap();
        let name = o["metadata"]["name"].as_str().unwrap();
        let before = reconciled(client, o, "True").await;
        assert_eq!(
            before["metadata"]["generation"], 1,
            "{kind} {name}: spec written after the first apply"
        );

        // What Argo CD's diff and `kubectl apply --server-side --dry-run=server` compute:
        // applying Git again changes nothing but (at most) status.
        let dry = serde_json::to_value(apply(client, o, true).await.unwrap()).unwrap();
        assert_eq!(
            dry["spec"], before["spec"],
            "{kind} {name}: a second apply would change the spec"
        );
        assert_eq!(dry["metadata"]["labels"], before["metadata"]["labels"]);

        // The second apply, for real: no conflict, no new generation, and the GitOps
        // manager's entry untouched (a server-side apply that changes nothing writes
        // nothing).
        let manager_entry = |v: &Value| {
            v["metadata"]["managedFields"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["manager"] == MANAGER)
                .cloned()
                .unwrap()
        };
        let second = serde_json::to_value(
            apply(client, o, false)
                .await
                .unwrap_or_else(|e| panic!("{kind} {name}: second apply: {e}")),
        )
        .unwrap();
        assert_eq!(second["metadata"]["generation"], 1, "{kind} {name}");
        assert_eq!(
            manager_entry(&second),
            manager_entry(&before),
            "{kind} {name}"
        );
        assert_eq!(second["spec"], before["spec"]);

        // Every other field manager (the operator's) owns status only, through the
        // status subresource: nothing for Git to fight over.
        for m in second["metadata"]["managedFields"].as_array().unwrap() {
            if m["manager"] == MANAGER {
                assert_eq!(m["operation"], "Apply");
                continue;
            }
            assert_eq!(m["subresource"], "status", "{kind} {name}: {m}");
            let fields = m["fieldsV1"].as_object().unwrap();
            assert!(
                fields.keys().all(|k| k == "f:status"),
                "{kind} {name}: manager {} owns {:?}",
                m["manager"],
                fields.keys().collect::<Vec<_>>()
            );
        }

        // Flux: kstatus. Argo CD: the health check of docs/gitops.md.
        let (status, message) = kstatus::compute(&second);
        assert_eq!(status, Status::Current, "{kind} {name}: {message}");
        let (health, message) = argocd_health(&checks[kind], &second);
        assert_eq!(health, "Healthy", "{kind} {name}: {message}");
        println!("{kind} {name}: kstatus {status:?}, Argo CD {health} ({message})");

        // A newer generation the operator has not seen yet: both say in progress.
        let mut ahead = second.clone();
        ahead["metadata"]["generation"] = json!(2);
        assert_eq!(kstatus::compute(&ahead).0, Status::InProgress);
        assert_eq!(argocd_health(&checks[kind], &ahead).0, "Progressing");
        let mut fresh = second.clone();
        fresh.as_object_mut().unwrap().remove("status");
        assert_eq!(argocd_health(&checks[kind], &fresh).0, "Progressing");
    }

    // A spec change from Git: the operator catches up, generation 2 observed.
    let mut changed = a
        .objects
        .iter()
        .find(|o| o["kind"] == "ClusterSPIFFEID")
        .unwrap()
        .clone();
    changed["spec"]["ttl"] = json!("45m");
    apply(client, &changed, false).await.unwrap();
    let after = reconciled(client, &changed, "True").await;
    assert_eq!(after["metadata"]["generation"], 2);
    assert_eq!(after["status"]["observedGeneration"], 2);
    assert_eq!(kstatus::compute(&after).0, Status::Current);

    // Failing objects, as the operator reports them, read as Degraded by Argo CD.
    let mut orphan = changed.clone();
    orphan["metadata"]["name"] = json!(format!("orphan-{}", a.w.tag));
    orphan["spec"]["trustDomain"] = json!(format!("missing-{}", a.w.tag));
    apply(client, &orphan, false).await.unwrap();
    let orphan = reconciled(client, &orphan, "False").await;
    let (health, message) = argocd_health(&checks["ClusterSPIFFEID"], &orphan);
    assert_eq!(health, "Degraded", "{message}");
    assert!(message.starts_with("TrustDomainNotFound"), "{message}");
    // kstatus reads no Ready condition; the Stalled condition next to it says Failed,
    // with Ready's reason.
    let (status, kmessage) = kstatus::compute(&orphan);
    assert_eq!(status, Status::Failed, "{kmessage}");
    assert!(kmessage.contains("does not exist"), "{kmessage}");
    println!("a failing ClusterSPIFFEID: Argo CD {health} ({message}); kstatus {status:?}");

    let other = Foreign::new(&format!("other-{}.test", a.w.tag));
    let mut unreachable = a
        .objects
        .iter()
        .find(|o| o["kind"] == "FederatedBundle")
        .unwrap()
        .clone();
    unreachable["metadata"]["name"] = json!(format!("unreachable-{}", a.w.tag));
    unreachable["spec"]["trustDomain"] = json!(other.td.name());
    unreachable["spec"]["bundleEndpointURL"] = json!("https://127.0.0.1:1");
    unreachable["spec"]["bundleEndpointProfile"]["endpointSPIFFEID"] =
        json!(other.td.id("/spire/server").unwrap().to_string());
    unreachable["spec"]["trustDomainBundle"] = json!(other.bundle().x509_pem());
    apply(client, &unreachable, false).await.unwrap();
    let unreachable = reconciled(client, &unreachable, "False").await;
    let (health, message) = argocd_health(&checks["FederatedBundle"], &unreachable);
    assert_eq!(health, "Degraded", "{message}");
    assert!(
        message.starts_with("ConnectFailed")
            && message.ends_with("(workloads keep the bundle already held)"),
        "{message}"
    );
    let (status, _) = kstatus::compute(&unreachable);
    assert_eq!(status, Status::Failed);
    println!("an unreachable FederatedBundle: Argo CD {health} ({message}); kstatus {status:?}");
    for o in [&orphan, &unreachable] {
        let kind = o["kind"].as_str().unwrap();
        api_for(client, kind)
            .delete(
                o["metadata"]["name"].as_str().unwrap(),
                &DeleteParams::default(),
            )
            .await
            .unwrap();
    }
}

/// Kubernetes' garbage collector (kube-controller-manager with only that controller),
/// stopped when dropped.
fn garbage_collector(cp: &sigil_e2e::ControlPlane) -> sigil_e2e::process::Supervised {
    let bin = sigil_e2e::tools::tool("kube-controller-manager").unwrap();
    let args: Vec<String> = [
        format!("--kubeconfig={}", cp.kubeconfig_path().display()),
        "--controllers=garbagecollector".into(),
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        "--secure-port=0".into(),
    ]
    .into();
    sigil_e2e::process::Supervised::start(
        "kube-controller-manager",
        &bin,
        &args,
        &cp.dir().join("kube-controller-manager.log"),
    )
    .unwrap()
}

#[tokio::test]
async fn deleting_an_object_garbage_collects_what_the_operator_made_for_it() {
    let cp = sigil_e2e::shared().await;
    let mut gc = garbage_collector(cp);
    let a = apply_examples("gitops-gc").await;
    let client = &a.w.client;
    let td = a
        .objects
        .iter()
        .find(|o| o["kind"] == "TrustDomain")
        .unwrap();
    let fb = a
        .objects
        .iter()
        .find(|o| o["kind"] == "FederatedBundle")
        .unwrap();
    let td_name = td["metadata"]["name"].as_str().unwrap();
    let fb_name = fb["metadata"]["name"].as_str().unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), &a.w.ns);
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &a.w.ns);
    let ca_secret = sigil_operator::trust_domain::store::ca_secret_name(td_name);
    let bundle_cm = td["spec"]["bundle"]["configMapName"]
        .as_str()
        .unwrap()
        .to_owned();
    let fetched_cm = sigil_operator::federation::spec::config_map_name(fb_name);
    let world_ca = sigil_operator::trust_domain::store::ca_secret_name(&a.w.td_object);
    eventually(
        "the operator's objects for the examples",
        SETTLE,
        || async {
            (secrets.get_opt(&ca_secret).await.unwrap().is_some()
                && cms.get_opt(&bundle_cm).await.unwrap().is_some()
                && cms.get_opt(&fetched_cm).await.unwrap().is_some())
            .then_some(())
        },
    )
    .await;

    for o in [td, fb] {
        api_for(client, o["kind"].as_str().unwrap())
            .delete(
                o["metadata"]["name"].as_str().unwrap(),
                &DeleteParams::default(),
            )
            .await
            .unwrap();
    }
    let t = std::time::Instant::now();
    let left = || async {
        let mut left = Vec::new();
        if let Some(s) = secrets.get_opt(&ca_secret).await.unwrap() {
            left.push(format!(
                "Secret {ca_secret} owned by {:?}",
                s.metadata.owner_references
            ));
        }
        for name in [&bundle_cm, &fetched_cm] {
            if let Some(c) = cms.get_opt(name).await.unwrap() {
                left.push(format!(
                    "ConfigMap {name} owned by {:?}",
                    c.metadata.owner_references
                ));
            }
        }
        left
    };
    let collected = tokio::time::timeout(SETTLE, async {
        while !left().await.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        collected.is_ok(),
        "not garbage-collected after {SETTLE:?}: {:?}\nkube-controller-manager: {}",
        left().await,
        gc.log_tail(30)
    );
    println!(
        "owned objects collected {:.1}s after the deletes",
        t.elapsed().as_secs_f64()
    );
    assert!(
        gc.exited().is_none(),
        "kube-controller-manager exited: {}",
        gc.log_tail(20)
    );
    // Only what those two objects owned: the other TrustDomain's CA is untouched.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(secrets.get_opt(&world_ca).await.unwrap().is_some());
    gc.stop();
}
