//! The custom resources of group `sigil.dev`. These types are the single source of the
//! YAML in `crds/` (`make crds` regenerates it; `make test` fails when it is stale).

pub mod cluster_spiffe_id;
pub mod trust_domain;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// Every CRD with the file name it is written to under `crds/`.
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    use kube::CustomResourceExt;
    vec![
        (
            "trustdomains.sigil.dev.yaml",
            trust_domain::TrustDomain::crd(),
        ),
        (
            "clusterspiffeids.sigil.dev.yaml",
            cluster_spiffe_id::ClusterSPIFFEID::crd(),
        ),
    ]
}
