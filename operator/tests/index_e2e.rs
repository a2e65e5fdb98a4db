//! The identity index against a real kube-apiserver: the CRD's admission rules refuse bad
//! templates with a clear message; `index::run` feeds node views from real watches and
//! writes ClusterSPIFFEID status that `kubectl get` shows through the printer columns.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_operator::index::{
    self, EntryIndex, IndexConfig, NodeView, RunOptions, StatusOptions, entry_id,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const SETTLE: Duration = Duration::from_secs(20);

// ---- control plane access ----
// One real control plane per test binary, from the e2e harness, with crds/ installed.

async fn client() -> Client {
    sigil_e2e::shared().await.admin().await.unwrap()
}

use sigil_e2e::{eventually, unique};

async fn create<K>(api: &Api<K>, v: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.create(&PostParams::default(), &serde_json::from_value(v).unwrap())
        .await
        .unwrap()
}

fn pod_json(name: &str, node: &str, labels: Value) -> Value {
    json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": "web", "automountServiceAccountToken": false,
                 "containers": [{"name": "main", "image": "registry.invalid/none"}]},
    })
}

/// Waits until the view satisfies `f`, woken by the view itself (no polling of the index).
async fn wait_view<T>(
    view: &mut NodeView,
    what: &str,
    mut f: impl FnMut(&NodeView) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        if let Some(t) = f(view) {
            return t;
        }
        if tokio::time::timeout_at(deadline, view.changed())
            .await
            .is_err()
        {
            panic!(
                "timed out waiting for node {} to {what}; it holds {:?}",
                view.name(),
                view.changes_since(0).upserts
            );
        }
    }
}

// ---- tests ----

#[tokio::test]
async fn admission_refuses_bad_templates_with_a_clear_message() {
    let api = Api::<ClusterSPIFFEID>::all(client().await);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let attempt = |spec: Value| {
        let api = api.clone();
        let dry = dry.clone();
        async move {
            let obj: ClusterSPIFFEID = serde_json::from_value(json!({
                "apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID",
                "metadata": {"name": unique("adm")}, "spec": spec,
            }))
            .unwrap();
            match api.create(&dry, &obj).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) => Err((e.code, e.message)),
                Err(e) => panic!("{e}"),
            }
        }
    };

    let (code, msg) =
        attempt(json!({"spiffeIDTemplate": "spiffe://{{trustDomain}}/ns/{{pod.nmespace}}"}))
            .await
            .unwrap_err();
    assert_eq!(code, 422, "{msg}");
    for needle in [
        "spec.spiffeIDTemplate",
        "{{pod.nmespace}}",
        "is not a valid template",
        "pod.serviceAccountName",
    ] {
        assert!(msg.contains(needle), "message lacks {needle:?}: {msg}");
    }
    let (_, msg) = attempt(json!({"dnsNameTemplates": ["ok.example", "{{ .Pod.Name }}.svc"]}))
        .await
        .unwrap_err();
    assert!(
        msg.contains("spec.dnsNameTemplates[1]") && msg.contains(".Pod.Name"),
        "{msg}"
    );
    let (_, msg) = attempt(json!({"workloadSelectorTemplates": ["k8s:sa:{{pod.labels[app]}}"]}))
        .await
        .unwrap_err();
    assert!(msg.contains("spec.workloadSelectorTemplates[0]"), "{msg}");
    let (_, msg) = attempt(json!({"spiffeIDTemplate": "https://{{trustDomain}}/x"}))
        .await
        .unwrap_err();
    assert!(msg.contains("must start with spiffe://"), "{msg}");
    let (_, msg) = attempt(json!({"ttl": "1d"})).await.unwrap_err();
    assert!(msg.contains("spec.ttl"), "{msg}");

    // Every field of the language is admitted, with keys in labels and annotations.
    attempt(json!({
        "spiffeIDTemplate": "spiffe://{{ trustDomain }}/{{clusterName}}/{{node.labels['topology.kubernetes.io/zone']}}/{{pod.annotations['sigil.dev/role']}}",
        "dnsNameTemplates": ["{{pod.hostname}}.{{namespace.name}}.svc.{{clusterDomain}}", "{{node.name}}-{{node.uid}}-{{pod.uid}}-{{pod.nodeName}}"],
        "workloadSelectorTemplates": ["k8s:ns:{{pod.namespace}}", "k8s:sa:{{pod.serviceAccountName}}", "k8s:pod-name:{{pod.name}}", "x:{{namespace.labels['team']}}{{pod.labels['app']}}"],
    }))
    .await
    .unwrap();
}

#[tokio::test]
async fn run_publishes_entries_to_node_views_and_writes_status() {
    let client = client().await;
    let tag = unique("idx");
    let ns = tag.clone();
    let node_name = format!("{tag}-node");
    let td_name = format!("{tag}-td");
    let csid_name = format!("{tag}-web");

    // The world: a namespace the ClusterSPIFFEID selects, a Node, a TrustDomain object (its
    // controller is not running; the index only reads its spec), a service account.
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": ns, "labels": {"sigil-test": tag}}}),
    )
    .await;
    create(
        &Api::<Node>::all(client.clone()),
        json!({"metadata": {"name": node_name, "labels": {"zone": "z1"}}}),
    )
    .await;
    let tds = Api::<DynamicObject>::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<sigil_operator::crd::trust_domain::TrustDomain>(&()),
    );
    tds.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "sigil.dev/v1alpha1", "kind": "TrustDomain",
            "metadata": {"name": td_name}, "spec": {"trustDomain": format!("{tag}.example.org"), "x509SVIDTTL": "30m"},
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    create(
        &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
        json!({"metadata": {"name": "web"}}),
    )
    .await;
    let csids = Api::<ClusterSPIFFEID>::all(client.clone());
    let spec = |app: &str| {
        json!({
            "trustDomain": td_name,
            "namespaceSelector": {"matchLabels": {"sigil-test": tag}},
            "podSelector": {"matchLabels": {"app": app}},
            "dnsNameTemplates": ["{{pod.name}}.{{node.labels['zone']}}"],
            "autoPopulateDNSNames": true,
        })
    };
    create(&csids, json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": csid_name}, "spec": spec("web")})).await;

    // The index, not leading yet.
    let ix = EntryIndex::new(IndexConfig::new("e2e"));
    let (leader_tx, leader_rx) = watch::channel(false);
    let cancel = CancellationToken::new();
    let options = RunOptions {
        status: StatusOptions {
            interval: Duration::from_millis(100),
            ..StatusOptions::default()
        },
        ready: None,
    };
    let task = tokio::spawn(index::run(
        client.clone(),
        ix.clone(),
        leader_rx,
        options,
        cancel.clone(),
    ));
    tokio::time::timeout(SETTLE, ix.synced())
        .await
        .expect("the index syncs");

    // A new matching pod: its entry reaches the node's view.
    let mut view = ix.node(&node_name);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let web = create(&pods, pod_json("web-0", &node_name, json!({"app": "web"}))).await;
    let web_uid = web.metadata.uid.clone().unwrap();
    let started = view.changes_since(0).revision;
    let entry = wait_view(&mut view, "receive web-0's entry", |v| {
        v.entry(&entry_id(&csid_name, &web_uid))
    })
    .await;
    assert_eq!(
        entry.spiffe_id.as_str(),
        format!("spiffe://{tag}.example.org/ns/{ns}/sa/web")
    );
    assert_eq!(
        entry.selectors[0].to_string(),
        format!("k8s:pod-uid:{web_uid}")
    );
    assert_eq!(entry.dns_names, ["web-0.z1"]);
    assert_eq!(
        entry.x509_ttl,
        Duration::from_secs(1800),
        "the TrustDomain's x509SVIDTTL"
    );
    assert!(ix.node("some-other-node").is_empty());

    // An EndpointSlice listing the pod adds its Service's names (the Service must exist).
    create(
        &Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), &ns),
        json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 443}]}}),
    )
    .await;
    create(
        &Api::<EndpointSlice>::namespaced(client.clone(), &ns),
        json!({
            "metadata": {"name": "web-x1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.9.9.9"], "targetRef": {"kind": "Pod", "namespace": ns, "name": "web-0", "uid": web_uid}}],
        }),
    )
    .await;
    wait_view(&mut view, "add the Service's DNS names", |v| {
        v.entry(&entry_id(&csid_name, &web_uid)).filter(|e| {
            e.dns_names
                .iter()
                .any(|d| d == &format!("web.{ns}.svc.cluster.local"))
        })
    })
    .await;

    // Not leader: no status is written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        csids.get(&csid_name).await.unwrap().status.is_none(),
        "a follower writes no status"
    );

    // Leader: status appears, and `kubectl get clusterspiffeids` shows it in the columns.
    leader_tx.send(true).unwrap();
    let status = eventually("status with one pod", SETTLE, || async {
        csids
            .get(&csid_name)
            .await
            .unwrap()
            .status
            .filter(|s| s.stats.pods_selected == 1)
    })
    .await;
    assert_eq!(status.conditions[0].type_, "Ready");
    assert_eq!(
        (
            status.conditions[0].status.as_str(),
            status.conditions[0].reason.as_str()
        ),
        ("True", "EntriesRendered")
    );
    assert_eq!(
        (
            status.stats.namespaces_selected,
            status.stats.pod_entry_render_failures
        ),
        (1, 0)
    );
    let table = kubectl_get(&client, &csid_name).await;
    assert_eq!(table.get("Pods"), Some(&json!(1)), "{table:?}");
    assert_eq!(table.get("Failures"), Some(&json!(0)));
    assert_eq!(table.get("Masked"), Some(&json!(0)));
    assert_eq!(table.get("Ready"), Some(&json!("True")));
    assert!(table.contains_key("Age") && table.get("Name") == Some(&json!(csid_name)));

    // Moving the selector moves the entries: web-0 loses its entry, db-0 gets one.
    let db = create(&pods, pod_json("db-0", &node_name, json!({"app": "db"}))).await;
    let db_uid = db.metadata.uid.clone().unwrap();
    csids
        .patch(
            &csid_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"podSelector": {"matchLabels": {"app": "db"}}}})),
        )
        .await
        .unwrap();
    wait_view(&mut view, "swap web-0's entry for db-0's", |v| {
        (v.entry(&entry_id(&csid_name, &web_uid)).is_none()
            && v.entry(&entry_id(&csid_name, &db_uid)).is_some())
        .then_some(())
    })
    .await;
    let delta = view.changes_since(started);
    assert!(
        !delta.full && delta.removed.contains(&entry_id(&csid_name, &web_uid)),
        "{delta:?}"
    );

    // A pod whose template does not render is counted, and named, in status.
    csids
        .patch(
            &csid_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"spiffeIDTemplate": "spiffe://{{trustDomain}}/team/{{pod.labels['team']}}"}})),
        )
        .await
        .unwrap();
    let status = eventually("a render failure in status", SETTLE, || async {
        csids
            .get(&csid_name)
            .await
            .unwrap()
            .status
            .filter(|s| s.stats.pod_entry_render_failures == 1)
    })
    .await;
    let first = status.stats.first_render_failure.unwrap();
    assert!(
        first.starts_with(&format!("{ns}/db-0:"))
            && first.contains("pod.labels['team'] is not set"),
        "{first}"
    );
    assert_eq!(status.conditions[0].reason, "RenderFailures");
    assert_eq!(
        kubectl_get(&client, &csid_name).await.get("Ready"),
        Some(&json!("False"))
    );
    wait_view(&mut view, "drop db-0's entry", |v| {
        v.is_empty().then_some(())
    })
    .await;

    // Fixed pod, then deleted pod: the entry comes, then goes.
    pods.patch(
        "db-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"team": "data"}}})),
    )
    .await
    .unwrap();
    let e = wait_view(&mut view, "receive db-0's fixed entry", |v| {
        v.entry(&entry_id(&csid_name, &db_uid))
    })
    .await;
    assert_eq!(
        e.spiffe_id.as_str(),
        format!("spiffe://{tag}.example.org/team/data")
    );
    pods.delete("db-0", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_view(&mut view, "drop the deleted pod's entry", |v| {
        v.is_empty().then_some(())
    })
    .await;

    cancel.cancel();
    task.await.unwrap();
    csids
        .delete(&csid_name, &DeleteParams::default())
        .await
        .unwrap();
    tds.delete(&td_name, &DeleteParams::default())
        .await
        .unwrap();
    Api::<Node>::all(client.clone())
        .delete(&node_name, &DeleteParams::default())
        .await
        .unwrap();
    Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
}

/// What `kubectl get clusterspiffeid <name>` prints: the server-side Table built from the
/// CRD's printer columns, as column name → cell.
async fn kubectl_get(client: &Client, name: &str) -> serde_json::Map<String, Value> {
    let url = format!("/apis/sigil.dev/v1alpha1/clusterspiffeids/{name}");
    let req = http::Request::get(url)
        .header(
            "Accept",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        )
        .body(Vec::new())
        .unwrap();
    let table: Value = client.request(req).await.unwrap();
    assert_eq!(table["kind"], "Table", "{table}");
    let columns: Vec<String> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    let cells = table["rows"][0]["cells"].as_array().unwrap().clone();
    columns.into_iter().zip(cells).collect()
}
