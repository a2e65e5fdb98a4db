//! The identity index, tested the way linkerd's policy-controller tests its indexes:
//! apply objects, read the per-node views. No API server, no mocks.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use sigil_identity::entry::RegistrationEntry;
use sigil_identity::keys::KeyType;
use sigil_identity::{SpiffeId, TrustDomain};
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_operator::index::{EntryIndex, IndexConfig, NodeDelta, TrustDomainInfo, entry_id};

// ---- object builders ----

fn pod(ns: &str, name: &str, uid: &str, node: Option<&str>, labels: &[(&str, &str)]) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "uid": uid, "labels": map(labels)},
        "spec": {"containers": [], "serviceAccountName": "sa-".to_owned() + name, "nodeName": node},
    }))
    .unwrap()
}

fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": map(labels)}})).unwrap()
}

fn node(name: &str, uid: &str, labels: &[(&str, &str)]) -> Node {
    serde_json::from_value(json!({"metadata": {"name": name, "uid": uid, "labels": map(labels)}}))
        .unwrap()
}

fn slice(ns: &str, name: &str, service: &str, pods: &[&str]) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": pods.iter().map(|p| json!({
            "addresses": ["10.0.0.1"],
            "targetRef": {"kind": "Pod", "namespace": ns, "name": p},
        })).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// A ClusterSPIFFEID created `age` seconds after a fixed epoch (smaller = older).
fn csid(name: &str, age: u32, spec: Value) -> ClusterSPIFFEID {
    serde_json::from_value(json!({
        "apiVersion": "sigil.dev/v1alpha1",
        "kind": "ClusterSPIFFEID",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": 1,
                     "creationTimestamp": format!("2025-01-01T00:{:02}:{:02}Z", age / 60, age % 60)},
        "spec": spec,
    }))
    .unwrap()
}

fn trust_domain(object: &str, td: &str) -> TrustDomainInfo {
    TrustDomainInfo {
        object_name: object.into(),
        trust_domain: TrustDomain::new(td).unwrap(),
        x509_ttl: Duration::from_secs(3600),
        jwt_ttl: Duration::from_secs(300),
    }
}

/// An index with one TrustDomain `example.org`, namespaces `prod` (env=prod) and `dev`,
/// nodes n1 and n2, synced.
fn index() -> EntryIndex {
    let ix = EntryIndex::new(IndexConfig::new("c1"));
    ix.apply_trust_domain(trust_domain("main", "example.org"));
    ix.apply_namespace(&namespace("prod", &[("env", "prod")]));
    ix.apply_namespace(&namespace("dev", &[("env", "dev")]));
    ix.apply_node(&node("n1", "node-uid-1", &[("zone", "a")]));
    ix.apply_node(&node("n2", "node-uid-2", &[("zone", "b")]));
    ix.mark_synced();
    ix
}

/// Pods `prod/p0` … on node n1, with UIDs `u0` …, and no labels.
fn apply_pods_on_n1(ix: &EntryIndex, n: usize) {
    for i in 0..n {
        ix.apply_pod(&pod(
            "prod",
            &format!("p{i}"),
            &format!("u{i}"),
            Some("n1"),
            &[],
        ));
    }
}

fn ids(d: &NodeDelta) -> Vec<String> {
    let mut v: Vec<String> = d.upserts.iter().map(|e| e.spiffe_id.to_string()).collect();
    v.sort();
    v
}

fn all(ix: &EntryIndex, node: &str) -> Vec<Arc<RegistrationEntry>> {
    ix.node(node).changes_since(0).upserts
}

fn spiffe_ids(ix: &EntryIndex, node: &str) -> Vec<String> {
    ids(&ix.node(node).changes_since(0))
}

fn sid(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

// ---- tests ----

#[tokio::test]
async fn new_pod_gets_an_entry_on_its_node() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid("default", 0, json!({})));
    let mut n1 = ix.node("n1");
    let start = n1.changes_since(0);
    assert!(start.full && start.upserts.is_empty());

    let waiter = tokio::spawn({
        let mut n1 = n1.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(5), n1.changed())
                .await
                .unwrap();
        }
    });
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n1"), &[("app", "web")]));
    waiter.await.unwrap();
    n1.changed().await;

    let delta = n1.changes_since(start.revision);
    assert!(!delta.full);
    assert_eq!(delta.upserts.len(), 1);
    let e = &delta.upserts[0];
    assert_eq!(
        e.spiffe_id.as_str(),
        "spiffe://example.org/ns/prod/sa/sa-web-0"
    );
    assert_eq!(
        e.id,
        entry_id("default", "u1"),
        "stable ID from ClusterSPIFFEID name and pod UID"
    );
    assert_eq!(
        e.selectors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["k8s:pod-uid:u1"]
    );
    assert_eq!(
        (e.x509_ttl, e.jwt_ttl),
        (Duration::from_secs(3600), Duration::from_secs(300)),
        "TTLs default to the TrustDomain's"
    );
    assert_eq!(e.revision, delta.revision);
    assert!(spiffe_ids(&ix, "n2").is_empty(), "other nodes see nothing");

    // Lookups the Node API authorises with.
    assert_eq!(n1.entry(&e.id).unwrap().spiffe_id, e.spiffe_id);
    assert!(ix.node("n2").entry(&e.id).is_none());
    assert_eq!(n1.entries_with_spiffe_id(&e.spiffe_id).len(), 1);
    assert!(
        ix.node("n2")
            .entries_with_spiffe_id(&e.spiffe_id)
            .is_empty()
    );

    let status = ix.status("default").unwrap();
    assert_eq!(status.stats.pods_selected, 1);
    assert_eq!(status.conditions[0].reason, "EntriesRendered");
}

#[test]
fn every_spec_field_reaches_the_entry() {
    let ix = index();
    ix.apply_trust_domain(trust_domain("partner", "partner.org"));
    ix.apply_cluster_spiffe_id(&csid(
        "full",
        0,
        json!({
            "trustDomain": "main",
            "spiffeIDTemplate": "spiffe://{{trustDomain}}/{{clusterName}}/{{node.labels['zone']}}/{{pod.labels['app']}}",
            "dnsNameTemplates": ["{{pod.labels['app']}}.{{namespace.name}}.svc.{{clusterDomain}}", "{{pod.hostname}}"],
            "workloadSelectorTemplates": ["k8s:ns:{{pod.namespace}}", "k8s:sa:{{pod.serviceAccountName}}"],
            "ttl": "2h", "jwtTtl": "10m", "federatesWith": ["partner.org"], "hint": "web",
            "admin": true, "downstream": true, "workloadKeyType": "RSA-2048",
        }),
    ));
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n2"), &[("app", "web")]));
    let e = all(&ix, "n2").pop().unwrap();
    assert_eq!(e.spiffe_id.as_str(), "spiffe://example.org/c1/b/web");
    assert_eq!(e.dns_names, ["web.prod.svc.cluster.local", "web-0"]);
    assert_eq!(
        e.selectors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["k8s:pod-uid:u1", "k8s:ns:prod", "k8s:sa:sa-web-0"]
    );
    assert_eq!(
        (e.x509_ttl, e.jwt_ttl),
        (Duration::from_secs(7200), Duration::from_secs(600))
    );
    assert_eq!(e.federates_with, [TrustDomain::new("partner.org").unwrap()]);
    assert_eq!(e.hint, "web");
    assert!(e.admin && e.downstream);
    assert_eq!(e.key_type, KeyType::Rsa2048);
}

#[test]
fn a_change_of_workload_key_type_reaches_the_node() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid("default", 0, json!({})));
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n1"), &[]));
    let before = all(&ix, "n1").pop().unwrap();
    assert_eq!(before.key_type, KeyType::EcP256);
    ix.apply_cluster_spiffe_id(&csid("default", 0, json!({"workloadKeyType": "RSA-2048"})));
    let after = all(&ix, "n1").pop().unwrap();
    assert_eq!(after.key_type, KeyType::Rsa2048);
    assert!(
        after.revision > before.revision,
        "the changed entry is published again ({} -> {})",
        before.revision,
        after.revision
    );
}

#[test]
fn unscheduled_pod_appears_when_scheduled() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid("default", 0, json!({})));
    ix.apply_pod(&pod("prod", "web-0", "u1", None, &[]));
    assert!(spiffe_ids(&ix, "n1").is_empty());
    let status = ix.status("default").unwrap();
    assert_eq!(
        (
            status.stats.pods_selected,
            status.stats.pod_entry_render_failures
        ),
        (1, 0),
        "pending is not a failure"
    );
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n1"), &[]));
    assert_eq!(
        spiffe_ids(&ix, "n1"),
        ["spiffe://example.org/ns/prod/sa/sa-web-0"]
    );
}

/// Kubernetes never moves a Pod, but an informer that missed a delete can hand the index
/// a Pod of the same name on another node: its entry leaves the first node's log.
#[test]
fn a_pod_seen_on_another_node_takes_its_entry_along() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid("default", 0, json!({})));
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n1"), &[]));
    let (n1, n2) = (ix.node("n1"), ix.node("n2"));
    let r1 = n1.revision();
    let id = entry_id("default", "u1");
    assert!(n1.entry(&id).is_some());

    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n2"), &[]));
    assert_eq!(n1.changes_since(r1).removed, vec![id.clone()]);
    assert!(n1.is_empty());
    assert!(n2.entry(&id).is_some());
    let found = ix.pod_identities("prod", "web-0").unwrap();
    assert_eq!(
        found
            .entries
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        [id.as_str()],
        "looked up on the node it is published on now"
    );

    // Unscheduled again (no node): no log keeps it.
    ix.apply_pod(&pod("prod", "web-0", "u1", None, &[]));
    assert!(n2.is_empty() && n1.is_empty());
    assert!(
        ix.pod_identities("prod", "web-0")
            .unwrap()
            .entries
            .is_empty()
    );
}

#[test]
fn deleting_a_pod_removes_its_entry() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid("default", 0, json!({})));
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n1"), &[]));
    ix.apply_pod(&pod("prod", "web-1", "u2", Some("n1"), &[]));
    let n1 = ix.node("n1");
    let before = n1.changes_since(0);
    assert_eq!(before.upserts.len(), 2);
    ix.delete_pod("prod", "web-0");
    let d = n1.changes_since(before.revision);
    assert_eq!(d.removed, [entry_id("default", "u1")]);
    assert!(d.upserts.is_empty());
    assert_eq!(n1.len(), 1);
    assert_eq!(ix.status("default").unwrap().stats.pods_selected, 1);

    // A finished pod keeps no entry either.
    let mut done = pod("prod", "web-1", "u2", Some("n1"), &[]);
    done.status = Some(serde_json::from_value(json!({"phase": "Succeeded"})).unwrap());
    ix.apply_pod(&done);
    assert!(n1.is_empty());
}

#[test]
fn selector_change_moves_entries() {
    let ix = index();
    ix.apply_pod(&pod("prod", "a-0", "ua0", Some("n1"), &[("app", "a")]));
    ix.apply_pod(&pod("prod", "a-1", "ua1", Some("n1"), &[("app", "a")]));
    ix.apply_pod(&pod("prod", "b-0", "ub0", Some("n2"), &[("app", "b")]));
    ix.apply_pod(&pod("dev", "b-1", "ub1", Some("n2"), &[("app", "b")]));
    ix.apply_cluster_spiffe_id(&csid(
        "sel",
        0,
        json!({"podSelector": {"matchLabels": {"app": "a"}}}),
    ));
    let (n1, n2) = (ix.node("n1"), ix.node("n2"));
    let (r1, r2) = (n1.revision(), n2.revision());
    assert_eq!(n1.len(), 2);
    assert_eq!(n2.len(), 0);

    let mut moved = csid(
        "sel",
        0,
        json!({
            "podSelector": {"matchLabels": {"app": "b"}},
            "namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]},
        }),
    );
    moved.metadata.generation = Some(2);
    ix.apply_cluster_spiffe_id(&moved);
    let d1 = n1.changes_since(r1);
    assert_eq!(d1.removed.len(), 2, "both a pods lose their entries");
    let d2 = n2.changes_since(r2);
    assert_eq!(
        ids(&d2),
        ["spiffe://example.org/ns/prod/sa/sa-b-0"],
        "only b in the prod namespace gains one"
    );
    let status = ix.status("sel").unwrap();
    assert_eq!(
        (status.stats.pods_selected, status.stats.namespaces_selected),
        (1, 1)
    );
    assert_eq!(status.observed_generation, Some(2));

    // A pod relabelled into the selection gets its entry; out of it, loses it.
    ix.apply_pod(&pod("prod", "a-0", "ua0", Some("n1"), &[("app", "b")]));
    assert_eq!(n1.len(), 1);
    ix.apply_pod(&pod("prod", "a-0", "ua0", Some("n1"), &[("app", "c")]));
    assert_eq!(n1.len(), 0);

    // A namespace relabelled out of the selection takes its pods' entries along.
    ix.apply_namespace(&namespace("prod", &[("env", "staging")]));
    assert_eq!(n2.len(), 0);
    assert_eq!(ix.status("sel").unwrap().stats.namespaces_selected, 0);
    ix.apply_namespace(&namespace("prod", &[("env", "prod")]));
    assert_eq!(n2.len(), 1);
}

#[test]
fn fallback_applies_only_when_no_other_matches() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid("catch-all", 0, json!({"fallback": true, "spiffeIDTemplate": "spiffe://{{trustDomain}}/fallback/{{pod.name}}"})));
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n1"), &[("app", "web")]));
    ix.apply_pod(&pod("prod", "db-0", "u2", Some("n1"), &[("app", "db")]));
    assert_eq!(
        spiffe_ids(&ix, "n1"),
        [
            "spiffe://example.org/fallback/db-0",
            "spiffe://example.org/fallback/web-0"
        ]
    );

    ix.apply_cluster_spiffe_id(&csid(
        "web",
        1,
        json!({"podSelector": {"matchLabels": {"app": "web"}}}),
    ));
    assert_eq!(
        spiffe_ids(&ix, "n1"),
        [
            "spiffe://example.org/fallback/db-0",
            "spiffe://example.org/ns/prod/sa/sa-web-0"
        ]
    );
    assert_eq!(
        ix.status("catch-all").unwrap().stats.pods_selected,
        2,
        "a fallback still counts the pods it selects"
    );

    ix.delete_cluster_spiffe_id("web");
    assert_eq!(
        spiffe_ids(&ix, "n1"),
        [
            "spiffe://example.org/fallback/db-0",
            "spiffe://example.org/fallback/web-0"
        ]
    );
    assert!(ix.status("web").is_none());
}

#[test]
fn the_oldest_cluster_spiffe_id_wins_a_conflict() {
    let ix = index();
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n1"), &[]));
    // Created later, applied first: it is masked once the older one arrives.
    ix.apply_cluster_spiffe_id(&csid("newer", 30, json!({"dnsNameTemplates": ["newer"]})));
    ix.apply_cluster_spiffe_id(&csid("older", 10, json!({"dnsNameTemplates": ["older"]})));
    let entries = all(&ix, "n1");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].dns_names, ["older"]);
    assert_eq!(entries[0].id, entry_id("older", "u1"));
    let newer = ix.status("newer").unwrap();
    assert_eq!(newer.stats.entries_masked, 1);
    assert_eq!(ix.status("older").unwrap().stats.entries_masked, 0);

    ix.delete_cluster_spiffe_id("older");
    let entries = all(&ix, "n1");
    assert_eq!(entries[0].dns_names, ["newer"]);
    assert_eq!(ix.status("newer").unwrap().stats.entries_masked, 0);
}

/// SPIFFE_Workload_API.md 5.2.1/6.2.1: a non-empty hint MUST be unique among the SVIDs
/// of one response. Two ClusterSPIFFEIDs giving one pod the same hint: the older keeps it,
/// the younger's entry is issued without it, and its status says so.
///
/// Before the fix: both entries carried hint "internal", so one X509SVIDResponse held
/// it twice (the test failed at "one hint per pod").
#[test]
fn a_hint_is_unique_per_pod_the_oldest_keeps_it_and_the_loser_is_reported() {
    let ix = index();
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n1"), &[]));
    ix.apply_cluster_spiffe_id(&csid(
        "newer",
        30,
        json!({"spiffeIDTemplate": "spiffe://{{trustDomain}}/b/{{pod.name}}", "hint": "internal"}),
    ));
    ix.apply_cluster_spiffe_id(&csid(
        "older",
        10,
        json!({"spiffeIDTemplate": "spiffe://{{trustDomain}}/a/{{pod.name}}", "hint": "internal"}),
    ));
    let entries = all(&ix, "n1");
    assert_eq!(entries.len(), 2, "both identities are issued");
    let hinted: Vec<_> = entries.iter().filter(|e| e.hint == "internal").collect();
    assert_eq!(hinted.len(), 1, "one hint per pod: {entries:?}");
    assert_eq!(hinted[0].id, entry_id("older", "u1"));
    let ready = |name: &str| {
        ix.status(name)
            .unwrap()
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap()
    };
    let loser = ready("newer");
    assert_eq!(loser.reason, "HintConflict");
    assert!(
        loser.message.contains("older") && loser.message.contains("prod/web-0"),
        "{}",
        loser.message
    );
    assert_eq!(ready("older").reason, "EntriesRendered");
    // The older one goes: the younger gets its hint back.
    ix.delete_cluster_spiffe_id("older");
    let entries = all(&ix, "n1");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].hint, "internal");
    assert_eq!(ready("newer").reason, "EntriesRendered");
}

#[test]
fn a_missing_label_is_a_render_failure_for_that_pod_only() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid(
        "by-app",
        0,
        json!({"spiffeIDTemplate": "spiffe://{{trustDomain}}/app/{{pod.labels['app']}}"}),
    ));
    ix.apply_pod(&pod("prod", "ok", "u1", Some("n1"), &[("app", "web")]));
    ix.apply_pod(&pod("prod", "zz-bad", "u2", Some("n1"), &[]));
    ix.apply_pod(&pod(
        "dev",
        "bad",
        "u3",
        Some("n1"),
        &[("app", "not a path")],
    ));
    assert_eq!(spiffe_ids(&ix, "n1"), ["spiffe://example.org/app/web"]);
    let s = ix.status("by-app").unwrap();
    assert_eq!(
        (s.stats.pods_selected, s.stats.pod_entry_render_failures),
        (3, 2)
    );
    let first = s.stats.first_render_failure.clone().unwrap();
    assert!(
        first.starts_with("dev/bad: spiffeIDTemplate renders")
            && first.contains("path contains ' '"),
        "{first}"
    );
    let ready = &s.conditions[0];
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RenderFailures")
    );
    assert!(ready.message.contains("2 of 3"), "{}", ready.message);

    // Fixing the pods clears the failures.
    ix.apply_pod(&pod("prod", "zz-bad", "u2", Some("n1"), &[("app", "api")]));
    ix.delete_pod("dev", "bad");
    let s = ix.status("by-app").unwrap();
    assert_eq!(s.stats.pod_entry_render_failures, 0);
    assert_eq!(s.stats.first_render_failure, None);
    assert_eq!(s.conditions[0].status, "True");
    assert_eq!(spiffe_ids(&ix, "n1").len(), 2);
}

#[test]
fn an_id_outside_the_trust_domain_and_bad_selectors_are_failures() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid(
        "elsewhere",
        0,
        json!({"spiffeIDTemplate": "spiffe://other.org/x"}),
    ));
    ix.apply_cluster_spiffe_id(&csid(
        "badsel",
        1,
        json!({
            "spiffeIDTemplate": "spiffe://{{trustDomain}}/y",
            "workloadSelectorTemplates": ["{{pod.labels['sel']}}"],
        }),
    ));
    ix.apply_pod(&pod("prod", "p", "u1", Some("n1"), &[("sel", "novalue")]));
    assert!(spiffe_ids(&ix, "n1").is_empty());
    let e = ix
        .status("elsewhere")
        .unwrap()
        .stats
        .first_render_failure
        .unwrap();
    assert!(e.contains("outside trust domain example.org"), "{e}");
    let e = ix
        .status("badsel")
        .unwrap()
        .stats
        .first_render_failure
        .unwrap();
    assert!(
        e.contains("workloadSelectorTemplates[0]") && e.contains("type:value"),
        "{e}"
    );
}

#[test]
fn dns_names_from_endpoint_slices() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid(
        "auto",
        0,
        json!({"autoPopulateDNSNames": true, "dnsNameTemplates": ["static.example"]}),
    ));
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n1"), &[]));
    ix.apply_pod(&pod("prod", "web-1", "u2", Some("n2"), &[]));
    assert_eq!(all(&ix, "n1")[0].dns_names, ["static.example"]);

    let n1 = ix.node("n1");
    let n2 = ix.node("n2");
    let r2 = n2.revision();
    // autoPopulateDNSNames names Services that exist (the slice's label is not enough).
    ix.apply_service("prod", "web");
    ix.apply_service("prod", "api");
    ix.apply_endpoint_slice(&slice("prod", "web-abc", "web", &["web-0"]));
    assert_eq!(
        n1.entry(&entry_id("auto", "u1")).unwrap().dns_names,
        [
            "static.example",
            "web",
            "web.prod",
            "web.prod.svc",
            "web.prod.svc.cluster.local"
        ]
    );
    assert!(
        n2.changes_since(r2).is_empty(),
        "a pod the slice does not list is not touched"
    );

    // A second Service; then the first one's slice drops the pod.
    ix.apply_endpoint_slice(&slice("prod", "api-xyz", "api", &["web-0", "web-1"]));
    assert!(
        n1.entry(&entry_id("auto", "u1"))
            .unwrap()
            .dns_names
            .contains(&"api.prod.svc".to_owned())
    );
    assert!(
        n2.entry(&entry_id("auto", "u2"))
            .unwrap()
            .dns_names
            .contains(&"api".to_owned())
    );
    ix.apply_endpoint_slice(&slice("prod", "web-abc", "web", &[]));
    assert_eq!(
        n1.entry(&entry_id("auto", "u1")).unwrap().dns_names,
        [
            "static.example",
            "api",
            "api.prod",
            "api.prod.svc",
            "api.prod.svc.cluster.local"
        ]
    );
    ix.delete_endpoint_slice("prod", "api-xyz");
    assert_eq!(
        n2.entry(&entry_id("auto", "u2")).unwrap().dns_names,
        ["static.example"]
    );

    // A slice whose service-name label names no Service, or one that is not a DNS-1035
    // label (a dotted name would be another namespace's short name), adds nothing.
    ix.apply_endpoint_slice(&slice("prod", "ghost-1", "ghost", &["web-1"]));
    ix.apply_endpoint_slice(&slice("prod", "dotted-1", "kubernetes.default", &["web-1"]));
    assert_eq!(
        n2.entry(&entry_id("auto", "u2")).unwrap().dns_names,
        ["static.example"]
    );
    // The Service appears: its names follow; it goes: they go.
    ix.apply_service("prod", "ghost");
    assert!(
        n2.entry(&entry_id("auto", "u2"))
            .unwrap()
            .dns_names
            .contains(&"ghost.prod.svc".to_owned())
    );
    ix.delete_service("prod", "ghost");
    assert_eq!(
        n2.entry(&entry_id("auto", "u2")).unwrap().dns_names,
        ["static.example"]
    );
    // Names are per namespace: a Service "ghost" in another namespace, and a slice there
    // listing a Pod of the same name, give prod's Pod nothing.
    ix.apply_service("dev", "ghost");
    ix.apply_endpoint_slice(&slice("dev", "ghost-1", "ghost", &["web-1"]));
    assert_eq!(
        n2.entry(&entry_id("auto", "u2")).unwrap().dns_names,
        ["static.example"]
    );
}

#[test]
fn reconnect_with_a_known_revision_gets_only_the_changes() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid("default", 0, json!({})));
    apply_pods_on_n1(&ix, 10);
    let n1 = ix.node("n1");
    let snapshot = n1.changes_since(0);
    assert!(snapshot.full);
    assert_eq!(snapshot.upserts.len(), 10);

    // The agent goes away; meanwhile one pod leaves, one arrives, one is relabelled into
    // a second identity.
    ix.delete_pod("prod", "p3");
    ix.apply_pod(&pod("prod", "p10", "u10", Some("n1"), &[]));
    ix.apply_cluster_spiffe_id(&csid("tier", 1, json!({
        "podSelector": {"matchLabels": {"tier": "gold"}}, "spiffeIDTemplate": "spiffe://{{trustDomain}}/gold/{{pod.name}}"
    })));
    ix.apply_pod(&pod("prod", "p5", "u5", Some("n1"), &[("tier", "gold")]));

    let d = n1.changes_since(snapshot.revision);
    assert!(!d.full);
    assert_eq!(d.removed, [entry_id("default", "u3")]);
    assert_eq!(
        ids(&d),
        [
            "spiffe://example.org/gold/p5",
            "spiffe://example.org/ns/prod/sa/sa-p10"
        ]
    );
    assert!(n1.changes_since(d.revision).is_empty(), "caught up");

    // A pod update that changes nothing templates read publishes nothing.
    let mut p0 = pod("prod", "p0", "u0", Some("n1"), &[]);
    p0.status =
        Some(serde_json::from_value(json!({"phase": "Running", "podIP": "10.1.1.1"})).unwrap());
    ix.apply_pod(&p0);
    assert_eq!(n1.revision(), d.revision);
}

#[test]
fn too_old_or_foreign_revisions_get_a_full_snapshot() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid("default", 0, json!({})));
    ix.apply_pod(&pod("prod", "keep", "keep", Some("n1"), &[]));
    let n1 = ix.node("n1");
    let old = n1.changes_since(0).revision;
    // Enough churn that the log forgets the oldest removals.
    for i in 0..1500 {
        ix.apply_pod(&pod("prod", "churn", &format!("c{i}"), Some("n1"), &[]));
        ix.delete_pod("prod", "churn");
    }
    let d = n1.changes_since(old);
    assert!(d.full, "older than the log remembers");
    assert_eq!(ids(&d), ["spiffe://example.org/ns/prod/sa/sa-keep"]);

    // A revision from another replica (another epoch) is not trusted either.
    let other = index();
    other.apply_cluster_spiffe_id(&csid("default", 0, json!({})));
    other.apply_pod(&pod("prod", "x", "x", Some("n1"), &[]));
    let foreign = other.node("n1").revision();
    assert!(n1.changes_since(foreign).full);
    assert!(
        n1.changes_since(n1.revision() + 1).full,
        "a revision from the future"
    );
}

#[tokio::test]
async fn nothing_is_published_before_sync() {
    let ix = EntryIndex::new(IndexConfig::new("c1"));
    let mut view = ix.node("n1");
    ix.apply_cluster_spiffe_id(&csid("default", 0, json!({})));
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n1"), &[]));
    ix.apply_trust_domain(trust_domain("main", "example.org"));
    assert!(
        view.is_empty() && !ix.is_synced(),
        "the namespace has not been listed yet"
    );
    assert_eq!(
        ix.status("default").unwrap().conditions[0].reason,
        "Syncing"
    );
    ix.apply_namespace(&namespace("prod", &[]));
    ix.mark_synced();
    tokio::time::timeout(Duration::from_secs(1), view.changed())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), ix.synced())
        .await
        .unwrap();
    assert_eq!(view.len(), 1);
}

/// Every node's entries, without the revision they were published at, by entry ID.
fn published(ix: &EntryIndex, nodes: &[&str]) -> BTreeMap<String, (String, RegistrationEntry)> {
    let mut out = BTreeMap::new();
    for n in nodes {
        for e in all(ix, n) {
            let mut e = RegistrationEntry::clone(&e);
            e.revision = 0;
            assert!(out.insert(e.id.clone(), (n.to_string(), e)).is_none());
        }
    }
    out
}

/// Before sync the index renders as objects arrive but holds what it rendered; at sync it
/// publishes the held entries, netted. What it publishes must be exactly what rendering
/// the final world once publishes, whatever changed on the way.
#[test]
fn entries_held_before_sync_net_to_a_render_of_the_final_world() {
    let web = json!({"podSelector": {"matchLabels": {"app": "web"}}});
    let prod_only = json!({
        "namespaceSelector": {"matchLabels": {"env": "prod"}},
        "spiffeIDTemplate": "spiffe://{{ .TrustDomain }}/prod/{{ .PodMeta.Name }}",
    });
    let final_world = |ix: &EntryIndex| {
        ix.apply_trust_domain(trust_domain("main", "example.org"));
        ix.apply_namespace(&namespace("prod", &[("env", "prod")]));
        ix.apply_namespace(&namespace("dev", &[("env", "dev")]));
        ix.apply_node(&node("n1", "node-uid-1", &[]));
        ix.apply_node(&node("n2", "node-uid-2", &[]));
        ix.apply_cluster_spiffe_id(&csid("web", 0, web.clone()));
        ix.apply_pod(&pod("prod", "p1", "u1", Some("n1"), &[("app", "web")]));
        ix.apply_pod(&pod("dev", "p3", "u3", Some("n2"), &[("app", "db")]));
        ix.apply_pod(&pod("dev", "p4", "u4", Some("n2"), &[("app", "web")]));
        ix.apply_pod(&pod("prod", "p5", "u5", Some("n1"), &[("app", "web")]));
    };

    // The order a restart sees: Pods before the rest, and changes while listing.
    let held = EntryIndex::new(IndexConfig::new("c1"));
    held.apply_pod(&pod("prod", "p1", "u1", Some("n1"), &[("app", "web")]));
    held.apply_pod(&pod("prod", "p2", "u2", Some("n1"), &[("app", "web")]));
    held.apply_pod(&pod("dev", "p3", "u3", Some("n2"), &[("app", "web")]));
    held.apply_pod(&pod("dev", "p4", "u4", Some("n2"), &[("app", "db")]));
    held.apply_pod(&pod("prod", "p5", "u5", None, &[("app", "web")]));
    held.apply_cluster_spiffe_id(&csid("prod-only", 1, prod_only));
    held.apply_cluster_spiffe_id(&csid("web", 0, web.clone()));
    held.apply_namespace(&namespace("prod", &[("env", "prod")]));
    held.apply_namespace(&namespace("dev", &[("env", "prod")]));
    held.apply_trust_domain(trust_domain("main", "example.org"));
    held.apply_node(&node("n1", "node-uid-1", &[]));
    held.apply_node(&node("n2", "node-uid-2", &[]));
    // Rendered and held by now: p2, and prod-only's entries for dev's pods.
    held.delete_pod("prod", "p2");
    held.apply_pod(&pod("dev", "p3", "u3", Some("n2"), &[("app", "db")]));
    held.apply_pod(&pod("dev", "p4", "u4", Some("n2"), &[("app", "web")]));
    held.apply_pod(&pod("prod", "p5", "u5", Some("n1"), &[("app", "web")]));
    held.apply_namespace(&namespace("dev", &[("env", "dev")]));
    held.delete_cluster_spiffe_id("prod-only");
    assert!(
        held.node("n1").is_empty() && held.node("n2").is_empty(),
        "nothing is published before sync"
    );
    held.mark_synced();

    let once = EntryIndex::new(IndexConfig::new("c1"));
    final_world(&once);
    once.mark_synced();

    let nodes = ["n1", "n2"];
    let expected = published(&once, &nodes);
    assert_eq!(
        expected.keys().cloned().collect::<Vec<_>>(),
        {
            let mut v = vec![
                entry_id("web", "u1"),
                entry_id("web", "u4"),
                entry_id("web", "u5"),
            ];
            v.sort();
            v
        },
        "the final world has web's entries for p1, p4 and p5"
    );
    assert_eq!(published(&held, &nodes), expected);
    assert_eq!(
        held.status("web").unwrap().stats,
        once.status("web").unwrap().stats
    );
}

#[test]
fn trust_domain_resolution() {
    let ix = EntryIndex::new(IndexConfig::new("c1"));
    ix.apply_namespace(&namespace("prod", &[]));
    ix.mark_synced();
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n1"), &[]));
    ix.apply_cluster_spiffe_id(&csid("implicit", 0, json!({})));
    ix.apply_cluster_spiffe_id(&csid(
        "named",
        1,
        json!({"trustDomain": "second", "spiffeIDTemplate": "spiffe://{{trustDomain}}/named"}),
    ));
    let reason = |n: &str| ix.status(n).unwrap().conditions[0].reason.clone();
    assert_eq!(reason("implicit"), "TrustDomainNotFound");
    assert_eq!(reason("named"), "TrustDomainNotFound");
    assert!(spiffe_ids(&ix, "n1").is_empty());

    ix.apply_trust_domain(trust_domain("first", "one.org"));
    assert_eq!(
        spiffe_ids(&ix, "n1"),
        ["spiffe://one.org/ns/prod/sa/sa-web-0"],
        "the only TrustDomain is the default"
    );
    ix.apply_trust_domain(trust_domain("second", "two.org"));
    assert_eq!(reason("implicit"), "TrustDomainAmbiguous");
    assert_eq!(spiffe_ids(&ix, "n1"), ["spiffe://two.org/named"]);
    let mut longer = trust_domain("second", "two.org");
    longer.x509_ttl = Duration::from_secs(60);
    ix.apply_trust_domain(longer);
    assert_eq!(
        all(&ix, "n1")[0].x509_ttl,
        Duration::from_secs(60),
        "a TrustDomain's TTL change re-renders"
    );
    ix.delete_trust_domain("first");
    ix.delete_trust_domain("second");
    assert!(spiffe_ids(&ix, "n1").is_empty());
}

#[test]
fn ignored_namespaces_are_counted_not_served() {
    let ix = index();
    ix.apply_namespace(&namespace("kube-system", &[("env", "prod")]));
    ix.apply_cluster_spiffe_id(&csid(
        "prod",
        0,
        json!({"namespaceSelector": {"matchLabels": {"env": "prod"}}}),
    ));
    ix.apply_pod(&pod("kube-system", "dns", "u1", Some("n1"), &[]));
    ix.apply_pod(&pod("prod", "web", "u2", Some("n1"), &[]));
    assert_eq!(
        spiffe_ids(&ix, "n1"),
        ["spiffe://example.org/ns/prod/sa/sa-web"]
    );
    let s = ix.status("prod").unwrap().stats;
    assert_eq!(
        (s.namespaces_selected, s.namespaces_ignored, s.pods_selected),
        (1, 1, 1)
    );
}

#[test]
fn node_fields_render_once_the_node_is_known() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid(
        "by-node",
        0,
        json!({"spiffeIDTemplate": "spiffe://{{trustDomain}}/node/{{node.uid}}/{{pod.name}}"}),
    ));
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n3"), &[]));
    assert!(spiffe_ids(&ix, "n3").is_empty());
    assert!(
        ix.status("by-node")
            .unwrap()
            .stats
            .first_render_failure
            .unwrap()
            .contains("Node object has not been seen")
    );
    ix.apply_node(&node("n3", "node-uid-3", &[]));
    assert_eq!(
        spiffe_ids(&ix, "n3"),
        ["spiffe://example.org/node/node-uid-3/web-0"]
    );
}

#[test]
fn an_invalid_cluster_spiffe_id_says_why() {
    let ix = index();
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n1"), &[]));
    ix.apply_cluster_spiffe_id(&csid(
        "bad",
        0,
        json!({"spiffeIDTemplate": "spiffe://{{trustDomain}}/{{pod.nmae}}"}),
    ));
    let s = ix.status("bad").unwrap();
    let ready = &s.conditions[0];
    assert_eq!(ready.reason, "InvalidSpec");
    assert!(
        ready.message.contains("spec.spiffeIDTemplate") && ready.message.contains("\"pod.nmae\""),
        "{}",
        ready.message
    );
    assert!(spiffe_ids(&ix, "n1").is_empty());
    // And a malformed object from a dynamic watch is reported, not fatal.
    let obj: kube::core::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID",
        "metadata": {"name": "garbled"}, "spec": {"podSelector": "not an object"},
    }))
    .unwrap();
    ix.apply_cluster_spiffe_id_dynamic(&obj);
    assert_eq!(
        ix.status("garbled").unwrap().conditions[0].reason,
        "InvalidSpec"
    );
    assert!(
        ix.metrics()
            .skipped
            .get_or_create(&sigil_operator::index::KindLabels {
                kind: "ClusterSPIFFEID".into()
            })
            .get()
            >= 1
    );

    // A good one that turns unreadable keeps its last good spec (and its entries).
    let good: kube::core::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID",
        "metadata": {"name": "good", "uid": "g1"}, "spec": {},
    }))
    .unwrap();
    ix.apply_cluster_spiffe_id_dynamic(&good);
    assert_eq!(spiffe_ids(&ix, "n1").len(), 1);
    let mut broken = good.clone();
    broken.data["spec"] = json!({"fallback": "sometimes"});
    ix.apply_cluster_spiffe_id_dynamic(&broken);
    assert_eq!(
        spiffe_ids(&ix, "n1").len(),
        1,
        "still served from the last good spec"
    );
    assert_eq!(
        ix.status("good").unwrap().conditions[0].reason,
        "EntriesRendered"
    );
}

#[test]
fn a_recreated_pod_gets_a_new_entry_id() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid("default", 0, json!({})));
    ix.apply_pod(&pod("prod", "web-0", "old-uid", Some("n1"), &[]));
    let n1 = ix.node("n1");
    let r = n1.revision();
    ix.apply_pod(&pod("prod", "web-0", "new-uid", Some("n1"), &[]));
    let d = n1.changes_since(r);
    assert_eq!(d.removed, [entry_id("default", "old-uid")]);
    assert_eq!(d.upserts[0].id, entry_id("default", "new-uid"));
    assert_eq!(d.upserts[0].selectors[0].to_string(), "k8s:pod-uid:new-uid");
}

#[test]
fn shared_spiffe_ids_on_a_node_are_all_found() {
    let ix = index();
    ix.apply_cluster_spiffe_id(&csid(
        "by-app",
        0,
        json!({"spiffeIDTemplate": "spiffe://{{trustDomain}}/app/{{pod.labels['app']}}"}),
    ));
    ix.apply_pod(&pod("prod", "web-0", "u1", Some("n1"), &[("app", "web")]));
    ix.apply_pod(&pod("prod", "web-1", "u2", Some("n1"), &[("app", "web")]));
    let n1 = ix.node("n1");
    assert_eq!(
        n1.entries_with_spiffe_id(&sid("spiffe://example.org/app/web"))
            .len(),
        2
    );
    ix.delete_pod("prod", "web-0");
    assert_eq!(
        n1.entries_with_spiffe_id(&sid("spiffe://example.org/app/web"))
            .len(),
        1
    );
    assert!(
        n1.entries_with_spiffe_id(&sid("spiffe://example.org/app/db"))
            .is_empty()
    );
}

#[test]
fn admission_names_who_would_select_a_new_pod_or_the_nearest_miss_and_why() {
    use sigil_operator::index::Admission;
    let ix = index();
    let labels = map(&[("app", "web")]);
    assert_eq!(
        ix.admission("prod", Some(&labels)),
        Admission::NotSelected { nearest: None },
        "no ClusterSPIFFEID at all"
    );
    ix.apply_cluster_spiffe_id(&csid(
        "broken",
        0,
        json!({"spiffeIDTemplate": "spiffe://{{ .Bad"}),
    ));
    ix.apply_cluster_spiffe_id(&csid("elsewhere", 1, json!({"trustDomain": "missing"})));
    ix.apply_cluster_spiffe_id(&csid(
        "dev-only",
        2,
        json!({"namespaceSelector": {"matchLabels": {"env": "dev"}}}),
    ));
    ix.apply_cluster_spiffe_id(&csid(
        "api",
        3,
        json!({"podSelector": {"matchLabels": {"app": "api"}}}),
    ));
    // The nearest is the one whose last check failed: podSelector, after namespaceSelector,
    // the trust domain and the spec itself.
    match ix.admission("prod", Some(&labels)) {
        Admission::NotSelected {
            nearest: Some((name, why)),
        } => {
            assert_eq!(name, "api");
            assert!(
                why.contains("spec.podSelector") && why.contains("app=web"),
                "{why}"
            );
        }
        other => panic!("{other:?}"),
    }
    match ix.admission("prod", None) {
        Admission::NotSelected {
            nearest: Some((_, why)),
        } => assert!(why.contains("no labels"), "{why}"),
        other => panic!("{other:?}"),
    }
    let ix2 = index();
    ix2.apply_cluster_spiffe_id(&csid("elsewhere", 1, json!({"trustDomain": "missing"})));
    ix2.apply_cluster_spiffe_id(&csid(
        "dev-only",
        2,
        json!({"namespaceSelector": {"matchLabels": {"env": "dev"}}}),
    ));
    match ix2.admission("prod", Some(&labels)) {
        Admission::NotSelected {
            nearest: Some((name, why)),
        } => {
            assert_eq!(name, "dev-only");
            assert!(
                why.contains("spec.namespaceSelector") && why.contains("env=prod"),
                "{why}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Selected, fallbacks included; ignored and unknown namespaces are not guessed at.
    ix.apply_cluster_spiffe_id(&csid("catch-all", 4, json!({"fallback": true})));
    assert_eq!(
        ix.admission("prod", Some(&labels)),
        Admission::Selected(vec!["catch-all".into()])
    );
    assert_eq!(
        ix.admission("kube-system", Some(&labels)),
        Admission::NamespaceIgnored
    );
    assert!(matches!(
        ix.admission("created-a-moment-ago", Some(&labels)),
        Admission::Unknown(_)
    ));
    let unsynced = EntryIndex::new(IndexConfig::new("c1"));
    assert!(matches!(
        unsynced.admission("prod", Some(&labels)),
        Admission::Unknown(_)
    ));
}

/// A ClusterSPIFFEID edit that rewrites more entries than one thread publishes (the
/// index then applies the node logs on two threads): every node gets every change at the
/// same revision, and a stream that knew the revision before gets exactly its own.
#[test]
fn a_cluster_wide_edit_reaches_every_node_at_one_revision() {
    let ix = index();
    for n in 3..=8 {
        ix.apply_node(&node(&format!("n{n}"), &format!("node-uid-{n}"), &[]));
    }
    ix.apply_cluster_spiffe_id(&csid("default", 0, json!({})));
    let pods = 24_000;
    for i in 0..pods {
        let node = format!("n{}", i % 8 + 1);
        ix.apply_pod(&pod(
            "prod",
            &format!("p{i}"),
            &format!("u{i}"),
            Some(&node),
            &[],
        ));
    }
    let before: Vec<u64> = (1..=8)
        .map(|n| ix.node(&format!("n{n}")).revision())
        .collect();

    let mut edited = csid("default", 0, json!({"hint": "edited"}));
    edited.metadata.generation = Some(2);
    ix.apply_cluster_spiffe_id(&edited);

    let mut revisions = std::collections::BTreeSet::new();
    for (n, since) in (1..=8).zip(before) {
        let view = ix.node(&format!("n{n}"));
        let d = view.changes_since(since);
        assert!(!d.full);
        assert!(d.removed.is_empty());
        assert_eq!(d.upserts.len(), pods / 8, "node n{n}");
        assert!(d.upserts.iter().all(|e| e.hint == "edited"), "node n{n}");
        for e in &d.upserts {
            // The default template: spiffe://example.org/ns/prod/sa/sa-p<i>.
            let i: usize = e
                .spiffe_id
                .path()
                .rsplit("sa-p")
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(i % 8 + 1, n, "{} published on node n{n}", e.spiffe_id);
        }
        revisions.insert(d.revision);
    }
    assert_eq!(revisions.len(), 1, "one revision for the whole edit");
}

/// A re-render of thousands of pods evaluates on two threads (state.rs, PARALLEL_RENDER):
/// masking, failures, statistics and entries come out as one pod at a time gives them.
#[test]
fn a_large_rerender_masks_and_fails_as_one_pod_at_a_time_does() {
    let one_by_one = index();
    let batched = index();
    let pods = 10_000;
    for ix in [&one_by_one, &batched] {
        ix.apply_cluster_spiffe_id(&csid("older", 10, json!({"dnsNameTemplates": ["older"]})));
    }
    // Every third pod has no `app` label, so "by-app" fails for it.
    let pod_of = |i: usize| {
        let labels: &[(&str, &str)] = if i.is_multiple_of(3) {
            &[]
        } else {
            &[("app", "web")]
        };
        pod(
            "prod",
            &format!("p{i}"),
            &format!("u{i}"),
            Some(&format!("n{}", i % 4 + 1)),
            labels,
        )
    };
    // "newer" gives every pod the same SPIFFE ID as "older": masked everywhere. "by-app"
    // renders from a label.
    let newer = csid("newer", 30, json!({"dnsNameTemplates": ["newer"]}));
    let by_app = csid(
        "by-app",
        40,
        json!({"spiffeIDTemplate": "spiffe://{{trustDomain}}/app/{{pod.labels['app']}}"}),
    );
    // Pods first, then the ClusterSPIFFEIDs: one re-render of all 10k pods each.
    for i in 0..pods {
        batched.apply_pod(&pod_of(i));
    }
    batched.apply_cluster_spiffe_id(&newer);
    batched.apply_cluster_spiffe_id(&by_app);
    // The ClusterSPIFFEIDs first, then the pods: one pod at a time.
    one_by_one.apply_cluster_spiffe_id(&newer);
    one_by_one.apply_cluster_spiffe_id(&by_app);
    for i in 0..pods {
        one_by_one.apply_pod(&pod_of(i));
    }

    let failing = (0..pods).filter(|i| i.is_multiple_of(3)).count() as i64;
    for name in ["older", "newer", "by-app"] {
        let (a, b) = (
            one_by_one.status(name).unwrap().stats,
            batched.status(name).unwrap().stats,
        );
        assert_eq!(
            (
                a.pods_selected,
                a.entries_masked,
                a.pod_entry_render_failures
            ),
            (
                b.pods_selected,
                b.entries_masked,
                b.pod_entry_render_failures
            ),
            "{name}"
        );
    }
    let newer = batched.status("newer").unwrap().stats;
    assert_eq!(newer.entries_masked, pods as i64);
    let by_app = batched.status("by-app").unwrap().stats;
    assert_eq!(by_app.pod_entry_render_failures, failing);
    for n in 1..=4 {
        let node = format!("n{n}");
        let entries = |ix: &EntryIndex| {
            let mut v: Vec<(String, String, Vec<String>)> = all(ix, &node)
                .iter()
                .map(|e| (e.id.clone(), e.spiffe_id.to_string(), e.dns_names.clone()))
                .collect();
            v.sort();
            v
        };
        let (a, b) = (entries(&one_by_one), entries(&batched));
        let on_node = (0..pods).filter(|i| i % 4 + 1 == n);
        let labelled = on_node.clone().filter(|i| !i.is_multiple_of(3)).count();
        assert_eq!(
            a.len(),
            on_node.count() + labelled,
            "node {node}: older's entry for every pod, by-app's for the labelled ones"
        );
        assert_eq!(a, b, "node {node}");
    }
}

/// A list applies thousands of objects before sync; none of them may wake the status
/// watchers (the status writer), which act only after sync. Sync itself must wake them, and so must a change after it.
#[test]
fn status_watchers_are_woken_by_sync_not_by_each_object_before_it() {
    let ix = EntryIndex::new(IndexConfig::new("c1"));
    let mut changes = ix.status_changes();
    changes.borrow_and_update();
    ix.apply_trust_domain(trust_domain("main", "example.org"));
    ix.apply_namespace(&namespace("prod", &[("env", "prod")]));
    ix.apply_node(&node("n1", "node-uid-1", &[]));
    // A ClusterSPIFFEID listed before the Pods leaves its status to write.
    ix.apply_cluster_spiffe_id(&csid("all", 0, json!({})));
    apply_pods_on_n1(&ix, 50);
    assert!(
        !changes.has_changed().unwrap(),
        "an object applied before sync woke the status watchers"
    );
    ix.mark_synced();
    assert!(changes.has_changed().unwrap(), "sync did not wake them");
    assert_eq!(ix.take_dirty(), vec!["all".to_owned()]);
    changes.borrow_and_update();
    ix.apply_pod(&pod("prod", "late", "u-late", Some("n1"), &[]));
    assert!(
        changes.has_changed().unwrap(),
        "a Pod selected after sync did not wake them"
    );
    assert_eq!(ix.take_dirty(), vec!["all".to_owned()]);
}

/// The ClusterTrustBundle publisher waits on `federation_changes`: Pods, Namespaces and
/// Nodes never change which trust domains are federated with, so they must not wake it
/// (a standby, whose statuses are never written, used to wake it once per Pod event).
#[test]
fn federation_watchers_are_woken_only_when_federations_change() {
    let ix = index();
    let mut changes = ix.federation_changes();
    changes.borrow_and_update();
    let partner = || {
        BTreeMap::from([(
            "main".to_owned(),
            [TrustDomain::new("partner.org").unwrap()].into(),
        )])
    };

    ix.apply_cluster_spiffe_id(&csid("plain", 0, json!({})));
    apply_pods_on_n1(&ix, 20);
    ix.apply_namespace(&namespace("prod", &[("env", "prod"), ("tier", "web")]));
    ix.apply_node(&node("n3", "node-uid-3", &[]));
    ix.delete_pod("prod", "p0");
    assert!(
        !changes.has_changed().unwrap(),
        "a write that federates with nothing new woke the federation watchers"
    );
    assert!(ix.federations().is_empty());

    ix.apply_cluster_spiffe_id(&csid("fed", 1, json!({"federatesWith": ["partner.org"]})));
    assert!(
        changes.has_changed().unwrap(),
        "a new federatesWith did not wake them"
    );
    assert_eq!(**changes.borrow_and_update(), partner());
    assert_eq!(*ix.federations(), partner());

    // The same federation again, from another ClusterSPIFFEID, changes nothing.
    ix.apply_cluster_spiffe_id(&csid("fed2", 2, json!({"federatesWith": ["partner.org"]})));
    ix.delete_cluster_spiffe_id("fed");
    apply_pods_on_n1(&ix, 20);
    assert!(
        !changes.has_changed().unwrap(),
        "a write that left the federations as they were woke the watchers"
    );

    // Without its TrustDomain the ClusterSPIFFEID renders nothing, and federates with
    // nothing.
    ix.delete_trust_domain("main");
    assert!(
        changes.has_changed().unwrap(),
        "losing the TrustDomain did not wake them"
    );
    assert!(changes.borrow_and_update().is_empty());
    ix.apply_trust_domain(trust_domain("main", "example.org"));
    assert!(changes.has_changed().unwrap());
    assert_eq!(*ix.federations(), partner());
}
