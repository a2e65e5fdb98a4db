//! TrustDomain: the signing CA of a trust domain, its rotation, an optional upstream CA,
//! and publication of the trust bundle.
//!
//! What it owns:
//! - one CA Secret per TrustDomain in the operator's namespace ([`store`]), the only place
//!   CA and JWT private keys are written;
//! - the rotation of CAs and JWT keys ([`rotation`], a pure state machine driven by an
//!   injected clock);
//! - the bundle ConfigMaps in the selected namespaces ([`publisher`]);
//! - `status` and Events of TrustDomain objects (`reconciler`);
//! - this replica's [`Authorities`] (`loader`), so every replica can sign.
//!
//! What it must not do: write anything while not the leader (only the loader runs
//! everywhere, and it only reads), log key material, or replace a CA Secret it cannot
//! read.
//!
//! # Wiring
//!
//! ```ignore
//! let (election, leader) = LeaderElection::new(client.clone(), LeaderConfig::new(&ns, "sigil-operator", &pod));
//! let shared = trust_domain::Shared {
//!     authorities: authorities.clone(),
//!     clock: Arc::new(SystemClock),
//!     leader,
//!     metrics: metrics.trust_domain.clone(),
//!     ready: Some(readiness.component("trust-domains")),
//!     resync: trust_domain::Resync::default(),
//! };
//! tokio::join!(election.run(cancel.clone()), trust_domain::run(client, trust_domain::Options::new(&ns), shared, cancel.clone()));
//! ```

// Errors carry the object, field and fix in their text, so they are large; they are
// rare and never on a per-request path.
#![allow(clippy::result_large_err)]

pub mod cert_manager;
pub mod error;
mod loader;
pub mod policy;
pub mod publisher;
mod reconciler;
pub mod rotation;
pub mod store;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::Client;
use kube::api::Api;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use sigil_identity::clock::SharedClock;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use error::Error;
pub use reconciler::{ISSUING, READY};

use crate::authority::Authorities;
use crate::crd::trust_domain::{COMPONENT_LABEL, TrustDomain as TrustDomainObject};
use crate::telemetry::{ReadyHandle, TrustDomainMetrics};

/// Configuration of the TrustDomain subsystem.
#[derive(Debug, Clone)]
pub struct Options {
    /// Namespace the operator runs in: CA Secrets live here, and it is the default
    /// namespace of `spec.upstreamAuthority.secretRef`.
    pub namespace: String,
    /// Field manager of status writes and reporting controller of Events.
    pub controller_name: String,
    /// This replica's name (pod name) for Events.
    pub instance: Option<String>,
    /// Label selector limiting which TrustDomains this operator manages (`None`: all).
    /// Lets several Sigil installations, or tests, share an API server.
    pub selector: Option<String>,
    /// How soon a TrustDomain with a problem (e.g. a broken upstream Secret) is looked at
    /// again.
    pub retry_interval: Duration,
    /// Where CA and JWT keys are made and kept (default: software, in the CA Secret).
    pub keys: crate::keys::Keys,
}

impl Options {
    /// Defaults for an operator running in `namespace`.
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            controller_name: "sigil-operator".to_owned(),
            instance: None,
            selector: None,
            retry_interval: Duration::from_secs(30),
            keys: crate::keys::Keys::default(),
        }
    }
}

/// A handle that makes the controller reconcile every TrustDomain now (tests that move a
/// manual clock use it; so can a SIGHUP handler).
#[derive(Debug, Clone)]
pub struct Resync(watch::Sender<u64>);

impl Default for Resync {
    fn default() -> Self {
        Self(watch::channel(0).0)
    }
}

impl Resync {
    /// Requests a reconcile of every TrustDomain.
    pub fn trigger(&self) {
        self.0.send_modify(|n| *n += 1);
    }
}

/// What the subsystem shares with the rest of the process.
#[derive(Debug, Clone)]
pub struct Shared {
    /// This replica's signing authorities; kept current from the CA Secrets.
    pub authorities: Arc<Authorities>,
    /// The clock all rotation decisions use.
    pub clock: SharedClock,
    /// Whether this replica leads (from [`crate::leader::LeaderElection`]).
    pub leader: watch::Receiver<bool>,
    /// Metric handles.
    pub metrics: TrustDomainMetrics,
    /// Set ready once the TrustDomain and CA Secret caches have synced.
    pub ready: Option<ReadyHandle>,
    /// Reconcile-everything trigger.
    pub resync: Resync,
}

/// Runs the loader (every replica) and the controller (writes only while leading) until
/// `cancel` fires.
pub async fn run(
    client: Client,
    options: Options,
    shared: Shared,
    cancel: CancellationToken,
) -> Result<(), Error> {
    info!(namespace = %options.namespace, selector = ?options.selector, "starting TrustDomain controller");
    let loader = loader::Loader::new(
        &options.namespace,
        shared.authorities.clone(),
        shared.metrics.clone(),
        options.keys.clone(),
    );
    let load = loader.run(
        client.clone(),
        options.selector.clone(),
        shared.ready.clone(),
        cancel.clone(),
    );
    let control = run_controller(client, options, shared, cancel);
    tokio::join!(load, control);
    Ok(())
}

async fn run_controller(
    client: Client,
    options: Options,
    shared: Shared,
    cancel: CancellationToken,
) {
    let mut td_config = watcher::Config::default();
    if let Some(s) = &options.selector {
        td_config = td_config.labels(s);
    }
    let controller = Controller::new(Api::<TrustDomainObject>::all(client.clone()), td_config)
        .owns(
            Api::<Secret>::namespaced(client.clone(), &options.namespace),
            watcher::Config::default().labels(&format!("{COMPONENT_LABEL}=ca")),
        )
        .owns(
            Api::<ConfigMap>::all(client.clone()),
            watcher::Config::default().labels(&format!("{COMPONENT_LABEL}=bundle")),
        )
        .with_config(controller::Config::default().debounce(Duration::from_millis(100)))
        // Every trigger (the watches, a leadership gained, a resync) goes through this one
        // backoff: with kube-runtime's 30 s default, a CA step due during an API server
        // outage waited up to 30 s more after the leadership came back.
        .trigger_backoff(crate::watch_backoff());
    let store = controller.store();
    // A namespace appearing, or gaining or losing labels, may change where bundles go.
    let every_trust_domain = {
        let store = store.clone();
        move |_: Namespace| {
            store
                .state()
                .into_iter()
                .map(|o| ObjectRef::from_obj(&*o))
                .collect::<Vec<_>>()
        }
    };
    let leader_gained = WatchStream::new(shared.leader.clone())
        .filter(|l| futures::future::ready(*l))
        .map(|_| ());
    let resync = WatchStream::new(shared.resync.0.subscribe()).map(|_| ());
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: options.controller_name.clone(),
            instance: options.instance.clone(),
        },
    );
    let ctx = Arc::new(reconciler::Context {
        client: client.clone(),
        namespace: options.namespace.clone(),
        field_manager: options.controller_name.clone(),
        clock: shared.clock.clone(),
        leader: shared.leader.clone(),
        metrics: shared.metrics.clone(),
        recorder,
        store,
        retry: options.retry_interval,
        keys: options.keys.clone(),
    });
    let run = controller
        .watches(
            Api::<Namespace>::all(client),
            watcher::Config::default(),
            every_trust_domain,
        )
        .reconcile_all_on(leader_gained)
        .reconcile_all_on(resync)
        .graceful_shutdown_on(cancel.clone().cancelled_owned())
        .run(reconciler::reconcile, reconciler::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                debug!(error = %e, "TrustDomain controller event");
            }
        });
    crate::shutdown::run_with_grace("trust-domain", run, &cancel, crate::shutdown::GRACE).await;
}
