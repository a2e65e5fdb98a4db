//! spire-controller-manager objects (group `spire.spiffe.io`) to Sigil's: every field is
//! either carried, or named in a [`Finding`] that says why not.
//!
//! | spire-controller-manager | Sigil |
//! |---|---|
//! | ClusterSPIFFEID | ClusterSPIFFEID (Go templates translated) |
//! | ClusterFederatedTrustDomain | FederatedBundle |
//! | ClusterStaticEntry | ClusterSPIFFEID with a fixed ID, when its selectors are pod selectors |

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::gotemplate::{self, Translation};

/// The group of spire-controller-manager's objects.
pub const SPIRE_GROUP: &str = "spire.spiffe.io";
/// The annotation naming the object a Sigil object was migrated from.
pub const MIGRATED_FROM: &str = "sigil.dev/migrated-from";

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The object was not converted.
    Error,
    /// A field was not carried.
    Warning,
    /// Carried, but some pods may get a different result (the message says which).
    Differs,
    /// Carried differently, with the same effect.
    Note,
}

/// One thing the report says about one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `Kind/name` of the spire-controller-manager object.
    pub object: String,
    /// The field, e.g. `spec.className`.
    pub field: String,
    /// How serious.
    pub severity: Severity,
    /// What happened and why.
    pub message: String,
}

/// Options of a migration.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `spec.trustDomain` of the ClusterSPIFFEIDs written (the TrustDomain object's name);
    /// unset: left out, which Sigil accepts while exactly one TrustDomain exists.
    pub trust_domain_object: Option<String>,
}

/// The result of one migration.
#[derive(Debug, Default)]
pub struct Migration {
    /// Sigil objects, in input order.
    pub objects: Vec<Value>,
    /// What could not be carried, and why.
    pub findings: Vec<Finding>,
    /// spire-controller-manager objects read.
    pub read: usize,
    /// Documents that were not spire-controller-manager objects (skipped).
    pub skipped: usize,
}

impl Migration {
    /// Objects that could not be converted at all.
    pub fn errors(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count()
    }
}

/// Converts every spire-controller-manager object among `docs`.
pub fn migrate(docs: &[Value], options: &Options) -> Migration {
    let mut m = Migration::default();
    for doc in docs {
        let group = doc["apiVersion"]
            .as_str()
            .and_then(|v| v.split_once('/'))
            .map(|(g, _)| g);
        if group != Some(SPIRE_GROUP) {
            m.skipped += 1;
            continue;
        }
        m.read += 1;
        let kind = doc["kind"].as_str().unwrap_or_default();
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        let mut ctx = Ctx {
            object: format!("{kind}/{name}"),
            findings: Vec::new(),
        };
        let converted = match kind {
            "ClusterSPIFFEID" => cluster_spiffe_id(doc, options, &mut ctx),
            "ClusterFederatedTrustDomain" => federated_trust_domain(doc, &mut ctx),
            "ClusterStaticEntry" => static_entry(doc, options, &mut ctx),
            other => {
                ctx.error("kind", format!("{other} has no Sigil equivalent (spire-controller-manager's ControllerManagerConfig is the chart's values)"));
                None
            }
        };
        if let Some(obj) = converted {
            m.objects.push(obj);
        }
        m.findings.append(&mut ctx.findings);
    }
    m
}

struct Ctx {
    object: String,
    findings: Vec<Finding>,
}

impl Ctx {
    fn push(&mut self, field: &str, severity: Severity, message: String) {
        self.findings.push(Finding {
            object: self.object.clone(),
            field: field.to_owned(),
            severity,
            message,
        });
    }
    fn error(&mut self, field: &str, message: String) {
        self.push(field, Severity::Error, message);
    }
    fn warn(&mut self, field: &str, message: String) {
        self.push(field, Severity::Warning, message);
    }
    fn note(&mut self, field: &str, message: String) {
        self.push(field, Severity::Note, message);
    }
}

/// Sigil's metadata: the name, labels and annotations (not server-set fields), and where
/// it came from.
fn metadata(doc: &Value) -> Value {
    let m = &doc["metadata"];
    let mut annotations: Map<String, Value> =
        m["annotations"].as_object().cloned().unwrap_or_default();
    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    annotations.insert(
        MIGRATED_FROM.into(),
        json!(format!(
            "{} {}/{}",
            doc["apiVersion"].as_str().unwrap_or_default(),
            doc["kind"].as_str().unwrap_or_default(),
            m["name"].as_str().unwrap_or_default()
        )),
    );
    let mut out = json!({"name": m["name"], "annotations": annotations});
    if let Some(labels) = m["labels"].as_object().filter(|l| !l.is_empty()) {
        out["labels"] = json!(labels);
    }
    out
}

fn sigil_object(kind: &str, doc: &Value, spec: Map<String, Value>) -> Value {
    json!({
        "apiVersion": "sigil.dev/v1alpha1",
        "kind": kind,
        "metadata": metadata(doc),
        "spec": spec,
    })
}

fn translate(ctx: &mut Ctx, field: &str, go: &str) -> Option<String> {
    match gotemplate::translate(go) {
        Ok(Translation { template, caveats }) => {
            for c in caveats {
                ctx.push(field, Severity::Differs, c.0);
            }
            Some(template)
        }
        Err(e) => {
            ctx.error(field, format!("{go:?} cannot be translated: {e}"));
            None
        }
    }
}

/// Copies the fields both kinds spell the same, reporting unknown ones.
fn common(spec: &Map<String, Value>, out: &mut Map<String, Value>, ctx: &mut Ctx, known: &[&str]) {
    for (k, v) in spec {
        match k.as_str() {
            "federatesWith"
            | "hint"
            | "admin"
            | "downstream"
            | "fallback"
            | "autoPopulateDNSNames" => {
                if !v.is_null() && v != &json!(false) && v != &json!("") && v != &json!([]) {
                    out.insert(k.clone(), v.clone());
                }
            }
            "className" => {
                if v.as_str().is_some_and(|s| !s.is_empty()) {
                    ctx.warn(
                        "spec.className",
                        format!("{v} dropped: it chose which spire-controller-manager instance handles the object; Sigil has one operator per cluster, and it handles every object"),
                    );
                }
            }
            k if known.contains(&k) => {}
            other => ctx.warn(
                &format!("spec.{other}"),
                format!("{other} is not a field Sigil knows; dropped"),
            ),
        }
    }
}

fn cluster_spiffe_id(doc: &Value, options: &Options, ctx: &mut Ctx) -> Option<Value> {
    let spec = doc["spec"].as_object().cloned().unwrap_or_default();
    let mut out = Map::new();
    if let Some(td) = &options.trust_domain_object {
        out.insert("trustDomain".into(), json!(td));
    }
    let Some(go) = spec.get("spiffeIDTemplate").and_then(Value::as_str) else {
        ctx.error(
            "spec.spiffeIDTemplate",
            "missing (spire-controller-manager refuses such an object too)".into(),
        );
        return None;
    };
    let id = translate(ctx, "spec.spiffeIDTemplate", go)?;
    out.insert("spiffeIDTemplate".into(), json!(id));
    for sel in ["namespaceSelector", "podSelector"] {
        if let Some(v) = spec.get(sel).filter(|v| !v.is_null()) {
            out.insert(sel.into(), v.clone());
        }
    }
    for (field, sigil) in [
        ("dnsNameTemplates", "dnsNameTemplates"),
        ("workloadSelectorTemplates", "workloadSelectorTemplates"),
    ] {
        let mut list = Vec::new();
        for (i, t) in spec
            .get(field)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let path = format!("spec.{field}[{i}]");
            match t.as_str().and_then(|t| translate(ctx, &path, t)) {
                Some(s) => list.push(json!(s)),
                None => {
                    // The entry would lack a DNS name or a selector: the object as a whole
                    // would not mean the same.
                    return None;
                }
            }
        }
        if !list.is_empty() {
            out.insert(sigil.into(), json!(list));
        }
    }
    for (field, sigil) in [("ttl", "ttl"), ("jwtTtl", "jwtTtl")] {
        if let Some(d) = spec
            .get(field)
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty())
        {
            match duration(d) {
                Some(d) => {
                    out.insert(sigil.into(), json!(d));
                }
                None => ctx.warn(&format!("spec.{field}"), format!("{d:?} is not a positive duration; dropped (the TrustDomain's default applies)")),
            }
        }
    }
    common(
        &spec,
        &mut out,
        ctx,
        &[
            "spiffeIDTemplate",
            "namespaceSelector",
            "podSelector",
            "dnsNameTemplates",
            "workloadSelectorTemplates",
            "ttl",
            "jwtTtl",
        ],
    );
    Some(sigil_object("ClusterSPIFFEID", doc, out))
}

/// A Kubernetes duration (`1h0m0s`, `30m`) as a Go duration Sigil accepts; `None` for zero.
fn duration(d: &str) -> Option<String> {
    let std = sigil_api::crd::trust_domain::GoDuration::new(d)
        .to_std()
        .ok()?;
    (!std.is_zero()).then(|| d.to_owned())
}

fn federated_trust_domain(doc: &Value, ctx: &mut Ctx) -> Option<Value> {
    let spec = doc["spec"].as_object().cloned().unwrap_or_default();
    let mut out = Map::new();
    for field in ["trustDomain", "bundleEndpointURL"] {
        match spec.get(field).and_then(Value::as_str) {
            Some(v) => {
                out.insert(field.into(), json!(v));
            }
            None => {
                ctx.error(&format!("spec.{field}"), "missing".into());
                return None;
            }
        }
    }
    let profile = &spec
        .get("bundleEndpointProfile")
        .cloned()
        .unwrap_or_default();
    let kind = profile["type"].as_str().unwrap_or_default();
    match kind {
        "https_spiffe" => {
            let Some(id) = profile["endpointSPIFFEID"].as_str() else {
                ctx.error(
                    "spec.bundleEndpointProfile.endpointSPIFFEID",
                    "missing with type https_spiffe".into(),
                );
                return None;
            };
            out.insert(
                "bundleEndpointProfile".into(),
                json!({"type": kind, "endpointSPIFFEID": id}),
            );
        }
        "https_web" => {
            out.insert("bundleEndpointProfile".into(), json!({"type": kind}));
        }
        other => {
            ctx.error(
                "spec.bundleEndpointProfile.type",
                format!("{other:?}: Sigil knows https_spiffe and https_web"),
            );
            return None;
        }
    }
    match spec.get("trustDomainBundle").and_then(Value::as_str).filter(|b| !b.is_empty()) {
        Some(b) => {
            out.insert("trustDomainBundle".into(), json!(b));
        }
        None if kind == "https_spiffe" => ctx.warn(
            "spec.trustDomainBundle",
            "unset: with https_spiffe Sigil needs the partner's current bundle to authenticate the endpoint the first time (spire-server bundle show -format spiffe on their side); the FederatedBundle stays not Ready until it is set".into(),
        ),
        None => {}
    }
    common(
        &spec,
        &mut out,
        ctx,
        &[
            "trustDomain",
            "bundleEndpointURL",
            "bundleEndpointProfile",
            "trustDomainBundle",
        ],
    );
    Some(sigil_object("FederatedBundle", doc, out))
}

/// k8s selectors the agent produces for a workload (besides `pod-uid`), which a
/// ClusterSPIFFEID can require through `workloadSelectorTemplates`.
const WORKLOAD_SELECTORS: &[&str] = &["sa", "container-name", "pod-name", "node-name", "pod-uid"];

fn static_entry(doc: &Value, options: &Options, ctx: &mut Ctx) -> Option<Value> {
    let spec = doc["spec"].as_object().cloned().unwrap_or_default();
    let mut out = Map::new();
    if let Some(td) = &options.trust_domain_object {
        out.insert("trustDomain".into(), json!(td));
    }
    let Some(id) = spec.get("spiffeID").and_then(Value::as_str) else {
        ctx.error("spec.spiffeID", "missing".into());
        return None;
    };
    if id.contains(['{', '}']) {
        ctx.error(
            "spec.spiffeID",
            format!("{id:?} holds '{{' or '}}', which a Sigil template cannot"),
        );
        return None;
    }
    out.insert("spiffeIDTemplate".into(), json!(id));
    let mut namespaces = Vec::new();
    let mut pod_labels = BTreeMap::new();
    let mut workload = Vec::new();
    for s in spec
        .get("selectors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let s = s.as_str().unwrap_or_default();
        let Some(rest) = s.strip_prefix("k8s:") else {
            ctx.error("spec.selectors", format!("{s:?}: Sigil attests Kubernetes pods only (k8s: selectors); a static entry for processes outside pods or for nodes has no equivalent"));
            return None;
        };
        let (ty, value) = rest.split_once(':').unwrap_or((rest, ""));
        match ty {
            "ns" => namespaces.push(value.to_owned()),
            "pod-label" => {
                let (k, v) = value.split_once(':').unwrap_or((value, ""));
                pod_labels.insert(k.to_owned(), v.to_owned());
            }
            t if WORKLOAD_SELECTORS.contains(&t) => workload.push(s.to_owned()),
            _ => {
                ctx.error("spec.selectors", format!("{s:?}: Sigil's agent does not produce k8s:{ty} selectors, so the identity would never be issued"));
                return None;
            }
        }
    }
    namespaces.sort();
    namespaces.dedup();
    match namespaces.as_slice() {
        [] => ctx.warn("spec.selectors", "no k8s:ns selector: the ClusterSPIFFEID considers the pods of every namespace (one entry per selected pod); add a namespaceSelector if you can".into()),
        [ns] => {
            out.insert("namespaceSelector".into(), json!({"matchLabels": {"kubernetes.io/metadata.name": ns}}));
        }
        _ => {
            ctx.error("spec.selectors", format!("k8s:ns selectors for {namespaces:?}: no pod is in two namespaces, the entry never matched"));
            return None;
        }
    }
    if !pod_labels.is_empty() {
        out.insert("podSelector".into(), json!({"matchLabels": pod_labels}));
    }
    if !workload.is_empty() {
        out.insert("workloadSelectorTemplates".into(), json!(workload));
    }
    if spec.get("parentID").and_then(Value::as_str).is_some() {
        ctx.note(
            "spec.parentID",
            "not carried: Sigil issues a pod's identity through the agent of the pod's own node"
                .into(),
        );
    }
    if let Some(names) = spec
        .get("dnsNames")
        .and_then(Value::as_array)
        .filter(|n| !n.is_empty())
    {
        out.insert("dnsNameTemplates".into(), json!(names));
    }
    for (field, sigil) in [("x509SVIDTTL", "ttl"), ("jwtSVIDTTL", "jwtTtl")] {
        if let Some(d) = spec.get(field).and_then(Value::as_str).and_then(duration) {
            out.insert(sigil.into(), json!(d));
        }
    }
    if spec.get("downstream").and_then(Value::as_bool) == Some(true) {
        ctx.warn(
            "spec.downstream",
            "carried as a flag only: Sigil has no downstream CA yet".into(),
        );
    }
    common(
        &spec,
        &mut out,
        ctx,
        &[
            "spiffeID",
            "parentID",
            "selectors",
            "dnsNames",
            "x509SVIDTTL",
            "jwtSVIDTTL",
        ],
    );
    Some(sigil_object("ClusterSPIFFEID", doc, out))
}
