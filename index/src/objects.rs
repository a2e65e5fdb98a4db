//! The few facts the index keeps from each Kubernetes object, and a ClusterSPIFFEID
//! compiled into parsed templates and selectors.
//!
//! The index never stores whole objects: a pod costs its names, UID, labels and
//! annotations, not its spec and status. A malformed object becomes an error string
//! here, which the caller logs and skips.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::core::DynamicObject;
use serde::Deserialize;
use sigil_identity::TrustDomain as TrustDomainName;

use sigil_api::crd::cluster_spiffe_id::{
    ClusterSPIFFEID, ClusterSpiffeIdSpec, ClusterSpiffeIdStatus,
};
use sigil_api::crd::trust_domain::GoDuration;
use sigil_api::template::{KeyValues, Source, Template};

/// Labels or annotations, stored compactly (sorted by key, binary-searched): a pod's
/// handful of labels in one allocation instead of a B-tree node with room for eleven.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    pub(crate) fn new(map: Option<&BTreeMap<String, String>>) -> Self {
        // A BTreeMap iterates in key order, so the slice is sorted.
        Self(
            map.into_iter()
                .flatten()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect(),
        )
    }

    /// [`Labels::new`] of a map handed over: its strings are moved, not copied.
    pub(crate) fn from_map(map: Option<BTreeMap<String, String>>) -> Self {
        Self(
            map.into_iter()
                .flatten()
                .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
                .collect(),
        )
    }
}

impl KeyValues for Labels {
    fn value(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_ref())
    }
}

/// A compiled Kubernetes label selector (`matchLabels` and `matchExpressions`, ANDed).
/// The empty selector matches everything.
#[derive(Debug, Clone, Default)]
pub(crate) struct LabelMatcher(Vec<Requirement>);

#[derive(Debug, Clone)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl LabelMatcher {
    /// Compiles a selector; the error names the requirement that is wrong (`field` is the
    /// spec field, for the message).
    pub(crate) fn compile(field: &str, selector: &LabelSelector) -> Result<Self, String> {
        let mut reqs: Vec<Requirement> = selector
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()]))
            .collect();
        for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
            let at = format!("{field}.matchExpressions[{i}] (key {:?})", e.key);
            let values = e.values.clone().unwrap_or_default();
            reqs.push(match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!("{at}: operator {} needs values", e.operator));
                }
                "In" => Requirement::In(e.key.clone(), values),
                "NotIn" => Requirement::NotIn(e.key.clone(), values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!("{at}: operator {} takes no values", e.operator));
                }
                "Exists" => Requirement::Exists(e.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
                other => {
                    return Err(format!(
                        "{at}: unknown operator {other:?}; use In, NotIn, Exists or DoesNotExist"
                    ));
                }
            });
        }
        Ok(Self(reqs))
    }

    pub(crate) fn matches(&self, labels: &dyn KeyValues) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.value(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            Requirement::NotIn(k, vs) => labels.value(k).is_none_or(|v| vs.iter().all(|x| x != v)),
            Requirement::Exists(k) => labels.value(k).is_some(),
            Requirement::DoesNotExist(k) => labels.value(k).is_none(),
        })
    }
}

/// Label EndpointSlices carry with the name of their Service.
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What templates and selectors may read of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub node: Option<String>,
    pub hostname: Option<String>,
    pub labels: Labels,
    pub annotations: Labels,
    /// Succeeded or Failed: it runs nothing any more and gets no entries.
    pub terminal: bool,
}

/// The Pod fields [`PodFacts`] reads, from a full `Pod` (tests, `sigil explain`) or from
/// the informer's slim [`WatchedPod`].
pub trait PodFields {
    /// The metadata, then spec.serviceAccountName, spec.nodeName, spec.hostname and
    /// status.phase.
    fn fields(&self) -> (&ObjectMeta, [Option<&str>; 4]);
}

/// `Pod` and `WatchedPod` name these fields alike; one body serves both.
macro_rules! pod_fields {
    ($($pod:ty),*) => {$(
        impl PodFields for $pod {
            fn fields(&self) -> (&ObjectMeta, [Option<&str>; 4]) {
                let spec = self.spec.as_ref();
                (
                    &self.metadata,
                    [
                        spec.and_then(|s| s.service_account_name.as_deref()),
                        spec.and_then(|s| s.node_name.as_deref()),
                        spec.and_then(|s| s.hostname.as_deref()),
                        self.status.as_ref().and_then(|s| s.phase.as_deref()),
                    ],
                )
            }
        }
    )*};
}
pod_fields!(Pod, WatchedPod);

impl PodFacts {
    /// The facts of `pod`, or why it cannot be read.
    pub fn new(pod: &impl PodFields) -> Result<Self, String> {
        let (meta, [service_account, node, hostname, phase]) = pod.fields();
        let copy = |s: Option<&str>| s.map(str::to_owned);
        Self::of(
            [meta.name.clone(), meta.namespace.clone(), meta.uid.clone()],
            [copy(service_account), copy(node), copy(hostname)],
            phase,
            [
                Labels::new(meta.labels.as_ref()),
                Labels::new(meta.annotations.as_ref()),
            ],
        )
    }

    /// [`PodFacts::new`] of a Pod handed over by the informer: its strings are moved into
    /// the facts instead of copied (this runs for every Pod a list reads).
    pub fn from_watched(pod: WatchedPod) -> Result<Self, String> {
        let meta = pod.metadata;
        let spec = pod.spec.unwrap_or_default();
        let phase = pod.status.and_then(|s| s.phase);
        Self::of(
            [meta.name, meta.namespace, meta.uid],
            [spec.service_account_name, spec.node_name, spec.hostname],
            phase.as_deref(),
            [
                Labels::from_map(meta.labels),
                Labels::from_map(meta.annotations),
            ],
        )
    }

    fn of(
        [name, namespace, uid]: [Option<String>; 3],
        [service_account, node, hostname]: [Option<String>; 3],
        phase: Option<&str>,
        [labels, annotations]: [Labels; 2],
    ) -> Result<Self, String> {
        let name = name.ok_or("pod without metadata.name")?;
        let namespace =
            namespace.ok_or_else(|| format!("pod {name} without metadata.namespace"))?;
        let uid = uid
            .filter(|u| !u.is_empty())
            .ok_or_else(|| format!("pod {namespace}/{name} without metadata.uid"))?;
        let present = |s: Option<String>| s.filter(|s| !s.is_empty());
        Ok(Self {
            namespace,
            name,
            uid,
            service_account: present(service_account).unwrap_or_else(|| "default".to_owned()),
            node: present(node),
            hostname: present(hostname),
            labels,
            annotations,
            terminal: matches!(phase, Some("Succeeded" | "Failed")),
        })
    }
}

/// A Pod as the index's informer decodes it: only the fields [`PodFacts`] reads, plus the
/// resourceVersion the watcher resumes from. A listed or watched Pod's containers,
/// volumes, conditions and managedFields are skipped by the parser instead of being
/// built into a full `Pod` and dropped, which is most of the work of listing Pods.
#[derive(kube::Resource, Clone, Debug, Deserialize)]
#[resource(inherit = "Pod")]
pub struct WatchedPod {
    /// name, namespace, uid, resourceVersion, labels and annotations only.
    #[serde(deserialize_with = "watched_meta")]
    pub metadata: ObjectMeta,
    /// What the index reads of the spec.
    #[serde(default)]
    pub spec: Option<WatchedPodSpec>,
    /// What the index reads of the status.
    #[serde(default)]
    pub status: Option<WatchedPodStatus>,
}

/// What [`PodFacts`] reads of a Pod's spec.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedPodSpec {
    /// `spec.serviceAccountName`.
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// `spec.nodeName`.
    #[serde(default)]
    pub node_name: Option<String>,
    /// `spec.hostname`.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// What [`PodFacts`] reads of a Pod's status.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WatchedPodStatus {
    /// `status.phase`.
    #[serde(default)]
    pub phase: Option<String>,
}

/// The metadata fields the index and the watcher use; managedFields, ownerReferences and
/// the rest are skipped.
fn watched_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Fields {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        uid: Option<String>,
        #[serde(default)]
        resource_version: Option<String>,
        #[serde(default)]
        labels: Option<BTreeMap<String, String>>,
        #[serde(default)]
        annotations: Option<BTreeMap<String, String>>,
    }
    let f = Fields::deserialize(d)?;
    Ok(ObjectMeta {
        name: f.name,
        namespace: f.namespace,
        uid: f.uid,
        resource_version: f.resource_version,
        labels: f.labels,
        annotations: f.annotations,
        ..ObjectMeta::default()
    })
}

/// A namespace's name and labels.
pub(crate) fn namespace_facts(
    ns: &Namespace,
) -> Result<(String, BTreeMap<String, String>), String> {
    let name = ns
        .metadata
        .name
        .clone()
        .ok_or("namespace without metadata.name")?;
    Ok((name, ns.metadata.labels.clone().unwrap_or_default()))
}

/// What templates may read of a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeFacts {
    pub(crate) uid: String,
    pub(crate) labels: Labels,
}

pub(crate) fn node_facts(node: &Node) -> Result<(String, NodeFacts), String> {
    let name = node
        .metadata
        .name
        .clone()
        .ok_or("node without metadata.name")?;
    let uid = node.metadata.uid.clone().unwrap_or_default();
    Ok((
        name,
        NodeFacts {
            uid,
            labels: Labels::new(node.metadata.labels.as_ref()),
        },
    ))
}

/// An EndpointSlice reduced to its Service and the pods it lists (ready or not: a pod
/// may need its DNS names before it can become ready). `service` is the
/// `kubernetes.io/service-name` label only when it is a DNS-1035 label, the only shape a
/// Service name has: anyone who can write an EndpointSlice writes that label, and a dotted
/// value (`api.prod`) would render another namespace's short name into the SVID. The
/// index also requires a Service of that name to exist in the slice's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SliceFacts {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) service: Option<String>,
    pub(crate) pods: Vec<String>,
}

pub(crate) fn slice_facts(slice: &EndpointSlice) -> Result<SliceFacts, String> {
    let name = slice
        .metadata
        .name
        .clone()
        .ok_or("EndpointSlice without metadata.name")?;
    let namespace = slice
        .metadata
        .namespace
        .clone()
        .ok_or_else(|| format!("EndpointSlice {name} without namespace"))?;
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| is_dns1035_label(s))
        .cloned();
    let mut pods: Vec<String> = slice
        .endpoints
        .iter()
        .flatten()
        .filter_map(|e| e.target_ref.as_ref())
        .filter(|r| r.kind.as_deref() == Some("Pod"))
        .filter(|r| r.namespace.as_deref().is_none_or(|ns| ns == namespace))
        .filter_map(|r| r.name.clone())
        .collect();
    pods.sort();
    pods.dedup();
    Ok(SliceFacts {
        namespace,
        name,
        service,
        pods,
    })
}

/// What the index needs of a TrustDomain object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustDomainInfo {
    /// `metadata.name` of the TrustDomain object.
    pub object_name: String,
    /// `spec.trustDomain`.
    pub trust_domain: TrustDomainName,
    /// `spec.x509SVIDTTL`.
    pub x509_ttl: Duration,
    /// `spec.jwtSVIDTTL`.
    pub jwt_ttl: Duration,
}

impl TrustDomainInfo {
    /// Reads a TrustDomain object of any shape; the error says which field is wrong.
    pub fn from_dynamic(obj: &DynamicObject) -> Result<Self, String> {
        let name = obj
            .metadata
            .name
            .clone()
            .ok_or("TrustDomain without metadata.name")?;
        let spec = obj
            .data
            .get("spec")
            .ok_or_else(|| format!("TrustDomain {name} has no spec"))?;
        let td = spec
            .get("trustDomain")
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("TrustDomain {name}: spec.trustDomain is missing"))?;
        let trust_domain = TrustDomainName::new(td)
            .map_err(|e| format!("TrustDomain {name}: spec.trustDomain: {e}"))?;
        let ttl = |field: &str, default: &str| -> Result<Duration, String> {
            let s = spec.get(field).and_then(|v| v.as_str()).unwrap_or(default);
            GoDuration::new(s)
                .to_std()
                .map_err(|e| format!("TrustDomain {name}: spec.{field}: {e}"))
        };
        Ok(Self {
            x509_ttl: ttl("x509SVIDTTL", "1h")?,
            jwt_ttl: ttl("jwtSVIDTTL", "5m")?,
            trust_domain,
            object_name: name,
        })
    }
}

/// A ClusterSPIFFEID's identity and order: the oldest object wins a conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CsidMeta {
    pub(crate) name: String,
    pub(crate) uid: Option<String>,
    pub(crate) generation: Option<i64>,
    pub(crate) created: Option<Timestamp>,
}

impl CsidMeta {
    pub(crate) fn of(obj: &ClusterSPIFFEID) -> Result<Self, String> {
        Self::from_meta(&obj.metadata)
    }

    pub(crate) fn from_meta(meta: &kube::core::ObjectMeta) -> Result<Self, String> {
        Ok(Self {
            name: meta
                .name
                .clone()
                .ok_or("ClusterSPIFFEID without metadata.name")?,
            uid: meta.uid.clone(),
            generation: meta.generation,
            created: meta.creation_timestamp.as_ref().map(|t| t.0),
        })
    }
}

/// A ClusterSPIFFEID as read from a dynamic object: its meta, its status as last written,
/// and its spec or why the spec cannot be read.
pub(crate) type DynamicCsid = (
    CsidMeta,
    Option<ClusterSpiffeIdStatus>,
    Result<ClusterSpiffeIdSpec, String>,
);

/// Reads a ClusterSPIFFEID of any shape; only a missing name is an error.
pub(crate) fn csid_from_dynamic(obj: &DynamicObject) -> Result<DynamicCsid, String> {
    let meta = CsidMeta::from_meta(&obj.metadata)?;
    let status = obj
        .data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok());
    let spec = match obj.data.get("spec") {
        Some(s) => serde_json::from_value::<ClusterSpiffeIdSpec>(s.clone())
            .map_err(|e| format!("spec does not parse: {e}")),
        None => Err("the object has no spec".to_owned()),
    };
    Ok((meta, status, spec))
}

/// A ClusterSPIFFEID with its templates parsed and its selectors compiled.
#[derive(Debug)]
pub(crate) struct CompiledCsid {
    pub(crate) spec: ClusterSpiffeIdSpec,
    pub(crate) namespace_selector: LabelMatcher,
    pub(crate) pod_selector: LabelMatcher,
    pub(crate) spiffe_id: Template,
    pub(crate) dns_names: Vec<Template>,
    pub(crate) workload_selectors: Vec<Template>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) jwt_ttl: Option<Duration>,
    pub(crate) federates_with: Vec<TrustDomainName>,
    /// Renders read the Node object (uid or labels).
    pub(crate) uses_node: bool,
    /// Renders read namespace labels.
    pub(crate) uses_namespace_labels: bool,
}

fn selector(field: &str, s: &Option<LabelSelector>) -> Result<LabelMatcher, String> {
    match s {
        None => Ok(LabelMatcher::default()),
        Some(s) => LabelMatcher::compile(&format!("spec.{field}"), s),
    }
}

fn template(field: &str, s: &str) -> Result<Template, String> {
    Template::parse(s).map_err(|e| format!("{field} {s:?}: {e}"))
}

impl CompiledCsid {
    /// Compiles a spec; the error names the field and what is wrong with it.
    pub(crate) fn compile(spec: &ClusterSpiffeIdSpec) -> Result<Self, String> {
        let spiffe_id = template("spec.spiffeIDTemplate", &spec.spiffe_id_template.0)?;
        let dns_names = spec
            .dns_name_templates
            .iter()
            .enumerate()
            .map(|(i, t)| template(&format!("spec.dnsNameTemplates[{i}]"), &t.0))
            .collect::<Result<Vec<_>, _>>()?;
        let workload_selectors = spec
            .workload_selector_templates
            .iter()
            .enumerate()
            .map(|(i, t)| template(&format!("spec.workloadSelectorTemplates[{i}]"), &t.0))
            .collect::<Result<Vec<_>, _>>()?;
        let duration = |field: &str, d: &Option<GoDuration>| -> Result<Option<Duration>, String> {
            d.as_ref()
                .map(|d| d.to_std().map_err(|e| format!("spec.{field}: {e}")))
                .transpose()
        };
        let federates_with = spec
            .federates_with
            .iter()
            .map(|t| TrustDomainName::new(t).map_err(|e| format!("spec.federatesWith {t:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let all: Vec<&Template> = std::iter::once(&spiffe_id)
            .chain(&dns_names)
            .chain(&workload_selectors)
            .collect();
        Ok(Self {
            namespace_selector: selector("namespaceSelector", &spec.namespace_selector)?,
            pod_selector: selector("podSelector", &spec.pod_selector)?,
            ttl: duration("ttl", &spec.ttl)?,
            jwt_ttl: duration("jwtTtl", &spec.jwt_ttl)?,
            uses_node: all
                .iter()
                .any(|t| t.uses_any(&[Source::NodeUid, Source::NodeLabel])),
            uses_namespace_labels: all.iter().any(|t| t.uses_any(&[Source::NamespaceLabel])),
            spiffe_id,
            dns_names,
            workload_selectors,
            federates_with,
            spec: spec.clone(),
        })
    }
}

/// Whether `name` is a DNS name an X509-SVID may carry: dot-separated labels of letters,
/// digits and '-', none empty or longer than 63 or starting or ending with '-', at most 253
/// bytes in all; a leading `*.` wildcard is allowed.
/// A DNS-1035 label, what a Service name must be: 1–63 lowercase letters, digits and '-',
/// starting with a letter and ending with a letter or digit (no dots).
pub(crate) fn is_dns1035_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

pub(crate) use sigil_identity::id::is_dns_name;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        for ok in ["web", "web.prod.svc.cluster.local", "*.web.prod", "a-b.c9"] {
            assert!(is_dns_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a..b", "a_b", "*.", "a.*.b"] {
            assert!(!is_dns_name(bad), "{bad}");
        }
        assert!(!is_dns_name(&"a".repeat(64)));
    }

    #[test]
    fn service_names_are_dns_1035_labels() {
        for ok in ["web", "a", "api-v2", &"a".repeat(63)] {
            assert!(is_dns1035_label(ok), "{ok}");
        }
        for bad in [
            "",
            "api.prod",
            "kubernetes.default",
            "Web",
            "1web",
            "web-",
            "-web",
            "a_b",
            &"a".repeat(64),
        ] {
            assert!(!is_dns1035_label(bad), "{bad}");
        }
    }

    /// A Pod as the apiserver serves it, with what the slim decoding skips.
    fn served_pod(phase: &str, sa: serde_json::Value, labels: serde_json::Value) -> String {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-0", "namespace": "prod", "uid": "u-1", "resourceVersion": "42",
                "labels": labels, "annotations": {"team": "a"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "s-1"}],
                "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:spec": {"f:containers": {"k:{\"name\":\"main\"}": {}}}}}]
            },
            "spec": {
                "serviceAccountName": sa, "nodeName": "n1", "hostname": "",
                "containers": [{"name": "main", "image": "example/web", "ports": [{"containerPort": 80}],
                                "resources": {"limits": {"cpu": "1"}}}],
                "volumes": [{"name": "spiffe", "csi": {"driver": "csi.sigil.dev", "readOnly": true}}]
            },
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "True"}],
                       "podIP": "10.0.0.1"}
        })
        .to_string()
    }

    #[test]
    fn watched_pod_reads_what_a_full_pod_gives() {
        use kube::ResourceExt;
        for (phase, sa, labels) in [
            (
                "Running",
                serde_json::json!("web"),
                serde_json::json!({"app": "web"}),
            ),
            (
                "Succeeded",
                serde_json::Value::Null,
                serde_json::Value::Null,
            ),
            ("Pending", serde_json::json!(""), serde_json::json!({})),
        ] {
            let text = served_pod(phase, sa, labels);
            let full: Pod = serde_json::from_str(&text).unwrap();
            let slim: WatchedPod = serde_json::from_str(&text).unwrap();
            assert_eq!(PodFacts::new(&slim).unwrap(), PodFacts::new(&full).unwrap());
            assert_eq!(
                PodFacts::from_watched(slim.clone()).unwrap(),
                PodFacts::new(&full).unwrap()
            );
            // What the watcher itself reads: the resource version and the key.
            assert_eq!(slim.resource_version().as_deref(), Some("42"));
            assert_eq!(
                (slim.namespace().as_deref(), slim.name_any()),
                (Some("prod"), "web-0".to_owned())
            );
            assert!(slim.metadata.managed_fields.is_none());
        }
        let facts = PodFacts::new(
            &serde_json::from_str::<WatchedPod>(&served_pod(
                "Succeeded",
                serde_json::Value::Null,
                serde_json::json!({}),
            ))
            .unwrap(),
        )
        .unwrap();
        assert!(facts.terminal);
        assert_eq!(facts.service_account, "default");
        assert_eq!(facts.hostname, None);
        // A pod without a spec or status (the apiserver always serves both, but one
        // malformed object must not fail the whole list).
        let bare: WatchedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"}
        }))
        .unwrap();
        assert_eq!(PodFacts::new(&bare).unwrap().node, None);
        assert_eq!(PodFacts::from_watched(bare).unwrap().node, None);
        let nameless: WatchedPod =
            serde_json::from_value(serde_json::json!({"metadata": {}})).unwrap();
        assert!(
            PodFacts::new(&nameless)
                .unwrap_err()
                .contains("metadata.name")
        );
        let uidless: WatchedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": ""}
        }))
        .unwrap();
        assert!(
            PodFacts::from_watched(uidless)
                .unwrap_err()
                .contains("pod n/p without metadata.uid")
        );
    }

    #[test]
    fn label_selectors() {
        let labels = Labels::new(Some(&BTreeMap::from([
            ("app".to_owned(), "web".to_owned()),
            ("tier".to_owned(), "gold".to_owned()),
        ])));
        assert_eq!(labels.value("app"), Some("web"));
        assert_eq!(labels.value("zzz"), None);
        let m =
            |v: serde_json::Value| LabelMatcher::compile("s", &serde_json::from_value(v).unwrap());
        let yes = |v: serde_json::Value| m(v).unwrap().matches(&labels);
        assert!(yes(serde_json::json!({})));
        assert!(yes(serde_json::json!({"matchLabels": {"app": "web"}})));
        assert!(!yes(
            serde_json::json!({"matchLabels": {"app": "web", "tier": "bronze"}})
        ));
        assert!(yes(
            serde_json::json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gold", "silver"]}]})
        ));
        assert!(!yes(
            serde_json::json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gold"]}]})
        ));
        assert!(yes(
            serde_json::json!({"matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["gold"]}]})
        ));
        assert!(yes(
            serde_json::json!({"matchExpressions": [{"key": "app", "operator": "Exists"}, {"key": "x", "operator": "DoesNotExist"}]})
        ));
        assert!(!yes(
            serde_json::json!({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]})
        ));
        let e = m(serde_json::json!({"matchExpressions": [{"key": "a", "operator": "In"}]}))
            .unwrap_err();
        assert!(
            e.contains("s.matchExpressions[0]") && e.contains("needs values"),
            "{e}"
        );
        assert!(m(serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]})).is_err());
        assert!(
            m(serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Near"}]}))
                .unwrap_err()
                .contains("unknown operator")
        );
    }

    #[test]
    fn compile_names_the_bad_field() {
        let spec: ClusterSpiffeIdSpec =
            serde_json::from_value(serde_json::json!({"dnsNameTemplates": ["ok", "{{pod.nam}}"]}))
                .unwrap();
        let e = CompiledCsid::compile(&spec).unwrap_err();
        assert!(
            e.starts_with("spec.dnsNameTemplates[1]") && e.contains("pod.nam"),
            "{e}"
        );
        let spec: ClusterSpiffeIdSpec =
            serde_json::from_value(serde_json::json!({"ttl": "1d"})).unwrap();
        assert!(
            CompiledCsid::compile(&spec)
                .unwrap_err()
                .starts_with("spec.ttl")
        );
        let spec: ClusterSpiffeIdSpec = serde_json::from_value(serde_json::json!({
            "podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}
        }))
        .unwrap();
        assert!(
            CompiledCsid::compile(&spec)
                .unwrap_err()
                .starts_with("spec.podSelector")
        );
        let spec: ClusterSpiffeIdSpec = serde_json::from_value(serde_json::json!({
            "spiffeIDTemplate": "spiffe://{{trustDomain}}/n/{{node.labels['zone']}}"
        }))
        .unwrap();
        let c = CompiledCsid::compile(&spec).unwrap();
        assert!(c.uses_node && !c.uses_namespace_labels);
    }
}
