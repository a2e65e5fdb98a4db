//! `sigil explain pod`: reads the pod, its namespace and node, every ClusterSPIFFEID and
//! TrustDomain, and the namespace's EndpointSlices and Services from the API server, then
//! renders with the operator's own index code ([`sigil_index::explain_pod`]).

use std::path::Path;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use serde_json::json;
use sigil_api::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_api::crd::trust_domain::TrustDomain;
use sigil_index::{IndexConfig, TrustDomainInfo, Verdict, explain_pod};

use crate::{EXIT_NEGATIVE, Output};

pub(crate) async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("read kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes configuration: set KUBECONFIG or --kubeconfig")?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// `sigil explain pod <ns>/<name>`.
pub(crate) async fn pod(
    which: &str,
    kubeconfig: Option<&Path>,
    cluster_name: &str,
    output: Output,
) -> anyhow::Result<i32> {
    let (ns, name) = which
        .split_once('/')
        .context("name the pod as <namespace>/<name>")?;
    let client = client(kubeconfig).await?;
    let pod = Api::<Pod>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .with_context(|| format!("pod {ns}/{name}"))?;
    let namespace = Api::<Namespace>::all(client.clone())
        .get(ns)
        .await
        .with_context(|| format!("namespace {ns}"))?;
    let node = match pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        Some(n) => Api::<Node>::all(client.clone())
            .get_opt(n)
            .await
            .with_context(|| format!("node {n}"))?,
        None => None,
    };
    let csids = Api::<ClusterSPIFFEID>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("list ClusterSPIFFEIDs (is the CRD installed?)")?
        .items;
    let td_resource = ApiResource::erase::<TrustDomain>(&());
    let tds: Vec<TrustDomainInfo> = Api::<DynamicObject>::all_with(client.clone(), &td_resource)
        .list(&ListParams::default())
        .await
        .context("list TrustDomains")?
        .items
        .iter()
        .filter_map(|o| TrustDomainInfo::from_dynamic(o).ok())
        .collect();
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .context("list EndpointSlices")?
        .items;
    let services: Vec<String> = Api::<Service>::namespaced(client, ns)
        .list_metadata(&ListParams::default())
        .await
        .context("list Services")?
        .items
        .iter()
        .map(kube::ResourceExt::name_any)
        .collect();
    let explained = explain_pod(
        IndexConfig::new(cluster_name),
        &pod,
        &namespace,
        node.as_ref(),
        &csids,
        &tds,
        &slices,
        &services,
    );
    let selected = explained
        .iter()
        .filter(|e| matches!(e.verdict, Verdict::Selected { .. }))
        .count();

    match output {
        Output::Json => {
            let items: Vec<_> = explained
                .iter()
                .map(|e| match &e.verdict {
                    Verdict::Selected { spiffe_id, dns_names, selectors, x509_ttl_seconds } => json!({
                        "clusterSPIFFEID": e.cluster_spiffe_id, "selected": true, "spiffeID": spiffe_id,
                        "dnsNames": dns_names, "selectors": selectors, "x509TTLSeconds": x509_ttl_seconds,
                    }),
                    other => json!({"clusterSPIFFEID": e.cluster_spiffe_id, "selected": false, "reason": reason(other)}),
                })
                .collect();
            println!(
                "{}",
                json!({"pod": which, "identities": selected, "clusterSPIFFEIDs": items})
            );
        }
        Output::Text => {
            println!(
                "Pod {which} (node {}):",
                pod.spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_else(|| "<none yet>".into())
            );
            if explained.is_empty() {
                println!("  no ClusterSPIFFEID exists: create one to give pods identities");
            }
            for e in &explained {
                match &e.verdict {
                    Verdict::Selected {
                        spiffe_id,
                        dns_names,
                        selectors,
                        x509_ttl_seconds,
                    } => {
                        println!("  ✔ {}: {spiffe_id}", e.cluster_spiffe_id);
                        if !dns_names.is_empty() {
                            println!("      DNS names: {}", dns_names.join(", "));
                        }
                        println!(
                            "      X509-SVID TTL: {x509_ttl_seconds}s; selectors: {}",
                            selectors.join(" ")
                        );
                    }
                    other => println!("  ✘ {}: {}", e.cluster_spiffe_id, reason(other)),
                }
            }
            println!(
                "{selected} identit{} for this pod",
                if selected == 1 { "y" } else { "ies" }
            );
        }
    }
    Ok(if selected == 0 { EXIT_NEGATIVE } else { 0 })
}

fn reason(v: &Verdict) -> String {
    match v {
        Verdict::Selected { spiffe_id, .. } => format!("selected: {spiffe_id}"),
        Verdict::InvalidSpec(m) => format!("invalid spec: {m}"),
        Verdict::TrustDomain(m) => format!("trust domain: {m}"),
        Verdict::NamespaceIgnored(m)
        | Verdict::NamespaceNotSelected(m)
        | Verdict::PodNotSelected(m)
        | Verdict::RenderFailed(m)
        | Verdict::NotUsed(m) => m.clone(),
        Verdict::Unscheduled => {
            "selects the pod, but it has no node yet (entries live on the pod's node)".into()
        }
    }
}
