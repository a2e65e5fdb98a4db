//! The informers that feed the index: one watcher per kind (Pods, Namespaces, Nodes,
//! EndpointSlices, Services, ClusterSPIFFEIDs, TrustDomains), no polling. All are
//! kube-runtime's except the Pods', which lists in protobuf (`pod_watch.rs`); Services are
//! watched as metadata only (the index needs their names).
//!
//! Each watcher applies its events as they arrive. After a relist (the watch was lost and
//! listed again) objects the index holds that the new list lacks are deleted. When every
//! kind has listed once the index is marked synced (and the readiness component, if any,
//! turns ready). The custom resources are read as dynamic objects, so one malformed
//! object is skipped with a warning instead of failing the whole list.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::pod_watch;
use super::status::{StatusOptions, write_statuses};
use crate::crd::cluster_spiffe_id::ClusterSPIFFEID;
use crate::crd::trust_domain::TrustDomain;
use crate::telemetry::ReadyHandle;
use sigil_index::EntryIndex;
use sigil_index::Kind;
use sigil_index::WatchedPod;
use sigil_index::{EventLabels, KindLabels};

/// How [`run`] runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// How ClusterSPIFFEID status is written.
    pub status: StatusOptions,
    /// Turned ready once every informer has listed (for `/ready`).
    pub ready: Option<ReadyHandle>,
}

/// Watches the seven kinds, feeds `index`, and writes ClusterSPIFFEID status while
/// `leader` is true, until `cancel`. Watch errors are logged, counted and retried with
/// backoff; this only returns on cancellation.
pub async fn run(
    client: Client,
    index: EntryIndex,
    leader: watch::Receiver<bool>,
    options: RunOptions,
    cancel: CancellationToken,
) {
    let RunOptions { status, ready } = options;
    info!("starting the identity index informers");
    let gate = Arc::new(SyncGate {
        remaining: AtomicUsize::new(7),
        index: index.clone(),
        ready,
    });
    let csid = ApiResource::erase::<ClusterSPIFFEID>(&());
    let td = ApiResource::erase::<TrustDomain>(&());
    let config = watcher::Config::default;
    let informers = async {
        tokio::join!(
            feed(
                pod_watch::pod_watcher(client.clone()),
                Kind::Pod,
                "Pod",
                &index,
                &gate,
                |ix, p: WatchedPod| ix.apply_watched_pod(p),
                |ix, key| with_namespace(key, |ns, n| ix.delete_pod(ns, n)),
            ),
            feed(
                watcher::watcher(Api::<Namespace>::all(client.clone()), config()),
                Kind::Namespace,
                "Namespace",
                &index,
                &gate,
                |ix, ns: Namespace| ix.apply_namespace(&ns),
                |ix, key| ix.delete_namespace(key),
            ),
            feed(
                watcher::watcher(Api::<Node>::all(client.clone()), config()),
                Kind::Node,
                "Node",
                &index,
                &gate,
                |ix, n: Node| ix.apply_node(&n),
                |ix, key| ix.delete_node(key),
            ),
            feed(
                watcher::watcher(Api::<EndpointSlice>::all(client.clone()), config()),
                Kind::EndpointSlice,
                "EndpointSlice",
                &index,
                &gate,
                |ix, s: EndpointSlice| ix.apply_endpoint_slice(&s),
                |ix, key| with_namespace(key, |ns, n| ix.delete_endpoint_slice(ns, n)),
            ),
            feed(
                watcher::watcher(
                    Api::<PartialObjectMeta<Service>>::all(client.clone()),
                    config()
                ),
                Kind::Service,
                "Service",
                &index,
                &gate,
                |ix, s: PartialObjectMeta<Service>| with_namespace(&key_of(&s), |ns, n| {
                    ix.apply_service(ns, n)
                }),
                |ix, key| with_namespace(key, |ns, n| ix.delete_service(ns, n)),
            ),
            feed(
                watcher::watcher(
                    Api::<DynamicObject>::all_with(client.clone(), &csid),
                    config()
                ),
                Kind::ClusterSpiffeId,
                "ClusterSPIFFEID",
                &index,
                &gate,
                |ix, o: DynamicObject| ix.apply_cluster_spiffe_id_dynamic(&o),
                |ix, key| ix.delete_cluster_spiffe_id(key),
            ),
            feed(
                watcher::watcher(
                    Api::<DynamicObject>::all_with(client.clone(), &td),
                    config()
                ),
                Kind::TrustDomain,
                "TrustDomain",
                &index,
                &gate,
                |ix, o: DynamicObject| ix.apply_trust_domain_dynamic(&o),
                |ix, key| ix.delete_trust_domain(key),
            ),
        )
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = informers => {}
        _ = write_statuses(client.clone(), index.clone(), leader, status, cancel.clone()) => {}
    }
    info!("identity index informers stopped");
}

/// Counts the kinds that have listed once; marks the index synced after the last.
#[derive(Debug)]
struct SyncGate {
    remaining: AtomicUsize,
    index: EntryIndex,
    ready: Option<ReadyHandle>,
}

impl SyncGate {
    fn listed(&self, kind: &str) {
        info!(kind, "initial list done");
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.index.mark_synced();
            if let Some(r) = &self.ready {
                r.set_ready();
            }
            info!("identity index synced; entries published");
        }
    }
}

fn with_namespace(key: &str, f: impl FnOnce(&str, &str)) {
    if let Some((ns, name)) = key.split_once('/') {
        f(ns, name);
    }
}

fn key_of<K: Resource>(obj: &K) -> String {
    match obj.namespace() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

/// Applies one watcher's events to the index until the stream ends.
async fn feed<K, S>(
    stream: S,
    kind: Kind,
    label: &'static str,
    index: &EntryIndex,
    gate: &SyncGate,
    apply: impl Fn(&EntryIndex, K),
    delete: impl Fn(&EntryIndex, &str),
) where
    K: Resource + Clone + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send,
{
    let stream = stream.backoff(crate::watch_backoff());
    futures::pin_mut!(stream);
    // During a list: the keys the index held when it began and the list has not named yet.
    // What is left when it ends was deleted while the watch was down. The first list
    // starts from nothing, so it keys nothing.
    let mut unseen: HashSet<String> = HashSet::new();
    let mut listed_once = false;
    // The counters are looked up once, not per event: a lookup allocates its labels.
    let counter = |action: &str| {
        index
            .metrics()
            .events
            .get_or_create(&EventLabels {
                kind: label.to_owned(),
                action: action.to_owned(),
            })
            .clone()
    };
    let (applied, deleted, relisted) = (counter("apply"), counter("delete"), counter("relist"));
    while let Some(event) = stream.next().await {
        // A LIST hands out thousands of events without waiting; this yields to the
        // runtime every so often, so the next page's fetch and the Node API get to run
        // even on one worker thread (an operator limited to one CPU has one).
        tokio::task::coop::consume_budget().await;
        match event {
            Ok(Event::Init) => unseen = index.keys(kind).into_iter().collect(),
            Ok(Event::InitApply(obj)) => {
                if !unseen.is_empty() {
                    unseen.remove(&key_of(&obj));
                }
                apply(index, obj);
                applied.inc();
            }
            Ok(Event::InitDone) => {
                for gone in std::mem::take(&mut unseen) {
                    delete(index, &gone);
                    deleted.inc();
                }
                relisted.inc();
                if !listed_once {
                    listed_once = true;
                    gate.listed(label);
                }
            }
            Ok(Event::Apply(obj)) => {
                apply(index, obj);
                applied.inc();
            }
            Ok(Event::Delete(obj)) => {
                delete(index, &key_of(&obj));
                deleted.inc();
            }
            Err(e) => {
                warn!(kind = label, error = %e, "watch failed; retrying with backoff");
                index
                    .metrics()
                    .watch_errors
                    .get_or_create(&KindLabels {
                        kind: label.to_owned(),
                    })
                    .inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::index::IndexConfig;

    fn node(name: &str) -> Node {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap()
    }

    /// A relist deletes what the index held and the new list lacks, and nothing else; the
    /// events come as kube-runtime's watcher hands them out after a lost watch.
    #[tokio::test]
    async fn a_relist_deletes_only_what_the_new_list_lacks() {
        let index = EntryIndex::new(IndexConfig::new("c1"));
        let gate = SyncGate {
            remaining: AtomicUsize::new(1),
            index: index.clone(),
            ready: None,
        };
        let events = [
            Event::Init,
            Event::InitApply(node("a")),
            Event::InitApply(node("b")),
            Event::InitDone,
            Event::Apply(node("c")),
            Event::Apply(node("d")),
            Event::Delete(node("d")),
            // The watch was lost; while it was down b was deleted and e created.
            Event::Init,
            Event::InitApply(node("a")),
            Event::InitApply(node("c")),
            Event::InitApply(node("e")),
            Event::InitDone,
        ];
        feed(
            futures::stream::iter(events.map(Ok)),
            Kind::Node,
            "Node",
            &index,
            &gate,
            |ix, n: Node| ix.apply_node(&n),
            |ix, key| ix.delete_node(key),
        )
        .await;
        let mut keys = index.keys(Kind::Node);
        keys.sort();
        assert_eq!(keys, ["a", "c", "e"]);
        assert!(index.is_synced(), "the first list marked the index synced");
        let deleted = index
            .metrics()
            .events
            .get_or_create(&EventLabels {
                kind: "Node".into(),
                action: "delete".into(),
            })
            .get();
        assert_eq!(deleted, 2, "d by its event, b by the relist");
    }
}
