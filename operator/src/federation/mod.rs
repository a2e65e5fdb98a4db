//! Federation (SPIFFE_Federation.md): foreign trust domains' bundles in, ours out.
//!
//! In:
//! - [`spec`]: a FederatedBundle's spec, checked, and which bundle is held for it;
//! - [`fetch`]: fetching a bundle endpoint under `https_web` or `https_spiffe`, bounded;
//! - `controller` (leader only): fetches when due, keeps the last good bundle in a
//!   ConfigMap owned by the FederatedBundle, reports status, Events and metrics;
//! - `loader` (every replica): FederatedBundles + ConfigMaps -> [`FederatedBundles`], which
//!   the Node API streams to agents; workloads get a foreign bundle when their
//!   ClusterSPIFFEID lists its trust domain in `federatesWith`.
//!
//! Out: [`endpoint`] serves our trust domain's bundle (SPIFFE bundle endpoint) and OIDC
//! discovery for JWT-SVIDs.
//!
//! Never: fall back from one profile to another, take a trust domain from a URL or a
//! document, merge bundles of two trust domains, or federate with a local trust domain.

pub mod endpoint;
pub mod fetch;
pub mod spec;
pub mod store;

mod controller;
mod loader;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::Api;
use kube::runtime::controller::{self as kcontroller, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sigil_identity::clock::SharedClock;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use controller::{BUNDLE_AVAILABLE, READY};
pub use store::FederatedBundles;

use crate::authority::Authorities;
use crate::crd::federated_bundle::FederatedBundle;
use crate::crd::trust_domain::COMPONENT_LABEL;
use crate::telemetry::{ErrorLabels, FederationMetrics, ReadyHandle};

/// Configuration of the federation subsystem.
#[derive(Debug, Clone)]
pub struct Options {
    /// The operator's namespace: the ConfigMaps holding fetched bundles live here, and it
    /// is the default namespace of `caBundleSecretRef`.
    pub namespace: String,
    /// Field manager of status writes and reporting controller of Events.
    pub controller_name: String,
    /// This replica's name (pod name) for Events.
    pub instance: Option<String>,
    /// Label selector limiting which FederatedBundles this operator manages (`None`:
    /// all). Lets several installations, or tests, share an API server.
    pub selector: Option<String>,
    /// Shortest time between two fetches of one endpoint, whatever its refresh hint says.
    pub min_refresh: Duration,
    /// Deadline of one fetch (connect, TLS, redirects, body).
    pub fetch_timeout: Duration,
    /// How soon an object with a problem that may resolve by itself is looked at again.
    pub retry_interval: Duration,
}

impl Options {
    /// Defaults for an operator running in `namespace`.
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            controller_name: "sigil-operator".to_owned(),
            instance: None,
            selector: None,
            min_refresh: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(10),
            retry_interval: Duration::from_secs(30),
        }
    }
}

/// What the subsystem shares with the rest of the process.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The bundles held for foreign trust domains (filled here, read by the Node API).
    pub federated: Arc<FederatedBundles>,
    /// Local trust domains (never federated with; may authenticate an endpoint).
    pub authorities: Arc<Authorities>,
    /// The clock.
    pub clock: SharedClock,
    /// Whether this replica leads.
    pub leader: watch::Receiver<bool>,
    /// Federation metrics.
    pub metrics: FederationMetrics,
    /// Problems, by controller and reason (`sigil_reconcile_errors`).
    pub errors: Family<ErrorLabels, Counter>,
    /// Set ready once the FederatedBundle and ConfigMap caches have synced.
    pub ready: Option<ReadyHandle>,
}

/// Runs the loader (every replica) and the controller (writes only while leading) until
/// `cancel` fires.
pub async fn run(client: Client, options: Options, shared: Shared, cancel: CancellationToken) {
    info!(namespace = %options.namespace, "starting FederatedBundle controller");
    let load = loader::run(
        client.clone(),
        options.namespace.clone(),
        fb_watch_config(&options),
        shared.federated.clone(),
        shared.metrics.clone(),
        shared.ready.clone(),
        cancel.clone(),
    );
    let control = run_controller(client, options, shared, cancel);
    tokio::join!(load, control);
}

fn fb_watch_config(options: &Options) -> watcher::Config {
    match &options.selector {
        Some(s) => watcher::Config::default().labels(s),
        None => watcher::Config::default(),
    }
}

async fn run_controller(
    client: Client,
    options: Options,
    shared: Shared,
    cancel: CancellationToken,
) {
    let controller = Controller::new(
        Api::<FederatedBundle>::all(client.clone()),
        fb_watch_config(&options),
    )
    .owns(
        Api::<ConfigMap>::namespaced(client.clone(), &options.namespace),
        watcher::Config::default().labels(&format!("{COMPONENT_LABEL}={}", spec::COMPONENT)),
    )
    .with_config(kcontroller::Config::default().debounce(Duration::from_millis(100)))
    .trigger_backoff(crate::watch_backoff());
    let store = controller.store();
    let leader_gained = WatchStream::new(shared.leader.clone())
        .filter(|l| futures::future::ready(*l))
        .map(|_| ());
    // A local TrustDomain appearing or disappearing changes which FederatedBundles are
    // usable, and may authenticate an https_spiffe endpoint in that trust domain.
    let authorities_changed = WatchStream::new(shared.authorities.subscribe()).map(|_| ());
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: options.controller_name.clone(),
            instance: options.instance.clone(),
        },
    );
    let ctx = Arc::new(controller::Context {
        client,
        namespace: options.namespace.clone(),
        field_manager: options.controller_name.clone(),
        clock: shared.clock.clone(),
        leader: shared.leader.clone(),
        metrics: shared.metrics.clone(),
        errors: shared.errors.clone(),
        recorder,
        store: store.clone(),
        authorities: shared.authorities.clone(),
        federated: shared.federated.clone(),
        min_refresh: options.min_refresh,
        fetch_timeout: options.fetch_timeout,
        retry: options.retry_interval,
    });
    let run = controller
        .reconcile_all_on(leader_gained)
        .reconcile_all_on(authorities_changed)
        .graceful_shutdown_on(cancel.clone().cancelled_owned())
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                debug!(error = %e, "FederatedBundle controller event");
            }
        });
    crate::shutdown::run_with_grace("federated-bundle", run, &cancel, crate::shutdown::GRACE).await;
}
