//! `sigil migrate`: spire-controller-manager's objects (ClusterSPIFFEID,
//! ClusterFederatedTrustDomain, ClusterStaticEntry), read from YAML files or directories
//! (a GitOps repository) or from the cluster, written as Sigil's equivalents, with a
//! report of every field that could not be carried and why ([`convert`]).
//!
//! Go templates are translated by [`gotemplate`]; what has no exact equivalent is refused
//! and reported, never guessed.

pub mod convert;
pub mod gotemplate;

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::Value;

use crate::{EXIT_NEGATIVE, Output};
pub use convert::{Finding, Migration, Options, Severity, migrate};

/// `sigil migrate` arguments.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// YAML or JSON files, or directories searched recursively for *.yaml, *.yml and
    /// *.json (`-`: standard input). Documents that are not spire-controller-manager
    /// objects are skipped.
    pub paths: Vec<PathBuf>,
    /// Read the objects from the cluster instead (spire.spiffe.io/v1alpha1).
    #[arg(long, conflicts_with = "paths")]
    pub from_cluster: bool,
    /// Kubeconfig for --from-cluster (default: KUBECONFIG, then in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// spec.trustDomain of the ClusterSPIFFEIDs written: the name of the TrustDomain object
    /// (default: left out, which works while exactly one TrustDomain exists).
    #[arg(long)]
    pub trust_domain_object: Option<String>,
    /// Write the Sigil objects here (default: standard output).
    #[arg(long, short = 'w')]
    pub write: Option<PathBuf>,
    /// Report format, on standard error.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: Output,
}

/// Runs `sigil migrate`: 0 when every object was converted (fields may have been
/// dropped: the report says which), 3 when some could not be.
pub async fn run(args: &MigrateArgs) -> anyhow::Result<i32> {
    let docs = if args.from_cluster {
        from_cluster(args.kubeconfig.as_deref()).await?
    } else {
        if args.paths.is_empty() {
            anyhow::bail!("name the files or directories to read, or --from-cluster");
        }
        let mut docs = Vec::new();
        for p in &args.paths {
            read_path(p, &mut docs)?;
        }
        docs
    };
    let m = migrate(
        &docs,
        &Options {
            trust_domain_object: args.trust_domain_object.clone(),
        },
    );
    let yaml = to_yaml(&m.objects)?;
    match &args.write {
        Some(p) => std::fs::write(p, yaml).with_context(|| format!("write {}", p.display()))?,
        None => print!("{yaml}"),
    }
    eprint!("{}", report(&m, args.output)?);
    Ok(if m.errors() > 0 { EXIT_NEGATIVE } else { 0 })
}

/// The objects as one multi-document YAML stream.
pub fn to_yaml(objects: &[Value]) -> anyhow::Result<String> {
    let mut out =
        String::from("# Written by `sigil migrate` from spire-controller-manager objects.\n");
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(o)?);
    }
    Ok(out)
}

/// The report, for people or as JSON.
pub fn report(m: &Migration, output: Output) -> anyhow::Result<String> {
    if output == Output::Json {
        return Ok(serde_json::to_string_pretty(&serde_json::json!({
            "read": m.read,
            "written": m.objects.len(),
            "skipped": m.skipped,
            "findings": m.findings,
        }))? + "\n");
    }
    let mut out = format!(
        "sigil migrate: {} spire-controller-manager object(s) read, {} Sigil object(s) written, {} other document(s) skipped\n",
        m.read,
        m.objects.len(),
        m.skipped
    );
    let mut findings = m.findings.clone();
    findings.sort_by(|a, b| (a.severity, &a.object).cmp(&(b.severity, &b.object)));
    for f in &findings {
        let tag = match f.severity {
            Severity::Error => "not converted",
            Severity::Warning => "not carried",
            Severity::Differs => "differs",
            Severity::Note => "note",
        };
        out.push_str(&format!(
            "  {tag}: {} {}: {}\n",
            f.object, f.field, f.message
        ));
    }
    Ok(out)
}

/// Reads a file, a directory (recursively: *.yaml, *.yml, *.json) or `-` (stdin).
pub fn read_path(p: &Path, docs: &mut Vec<Value>) -> anyhow::Result<()> {
    if p == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        return parse(&text, "standard input", docs);
    }
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("read directory {}", p.display()))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            let yaml = e
                .extension()
                .is_some_and(|x| x == "yaml" || x == "yml" || x == "json");
            if e.is_dir() || yaml {
                read_path(&e, docs)?;
            }
        }
        return Ok(());
    }
    let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
    parse(&text, &p.display().to_string(), docs)
}

/// Every document of a YAML stream; a `List` is flattened (what `kubectl get -o yaml`
/// prints).
pub fn parse(text: &str, what: &str, docs: &mut Vec<Value>) -> anyhow::Result<()> {
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v: Value =
            serde::Deserialize::deserialize(doc).with_context(|| format!("{what}: not YAML"))?;
        if v["kind"] == "List" {
            docs.extend(v["items"].as_array().cloned().unwrap_or_default());
        } else if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(())
}

async fn from_cluster(kubeconfig: Option<&Path>) -> anyhow::Result<Vec<Value>> {
    let client = crate::explain::client(kubeconfig).await?;
    let mut docs = Vec::new();
    for (kind, plural) in [
        ("ClusterSPIFFEID", "clusterspiffeids"),
        (
            "ClusterFederatedTrustDomain",
            "clusterfederatedtrustdomains",
        ),
        ("ClusterStaticEntry", "clusterstaticentries"),
    ] {
        let gvk = GroupVersionKind::gvk(convert::SPIRE_GROUP, "v1alpha1", kind);
        let api: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &ApiResource::from_gvk_with_plural(&gvk, plural),
        );
        let list = match api.list(&ListParams::default()).await {
            Ok(l) => l,
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("list {plural}.{}", convert::SPIRE_GROUP));
            }
        };
        for mut o in list.items {
            o.types = Some(kube::api::TypeMeta {
                api_version: format!("{}/v1alpha1", convert::SPIRE_GROUP),
                kind: kind.to_owned(),
            });
            docs.push(serde_json::to_value(o)?);
        }
    }
    Ok(docs)
}
