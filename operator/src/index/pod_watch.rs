//! The Pod informer: kube-runtime's list-then-watch, except that LIST pages are asked for
//! in protobuf (`application/vnd.kubernetes.protobuf`, JSON still accepted).
//!
//! Listing every Pod is what an operator restart costs, since Kubernetes is the only
//! datastore. The apiserver serves protobuf pages faster and in fewer bytes than JSON, and
//! prost skips the fields the index does not read (containers, volumes, conditions,
//! managedFields) without building them; the figures are in bench/README.md ("Reading the
//! `servers` rows"). Watch events stay JSON: they come one object at a time, and kube's
//! watch decoder handles them.
//!
//! The messages below are the subset of the published `generated.proto` files that the
//! index reads, with the upstream field numbers (`k8s.io/api/core/v1`,
//! `k8s.io/apimachinery/pkg/apis/meta/v1`, `k8s.io/apimachinery/pkg/runtime`). Fields not
//! declared here are skipped by the decoder.
//!
//! The stream's states and events follow kube-runtime's `watcher` (ListWatch strategy):
//! `Init`, one `InitApply` per listed Pod, `InitDone`, then `Apply`/`Delete` from a watch
//! resumed at the list's resourceVersion, with bookmarks. A 410 Gone (an expired continue
//! token or resourceVersion) starts a fresh list; any other error is returned and the
//! same step is tried again, after the caller's backoff.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use http::header::{ACCEPT, CONTENT_TYPE};
use http_body_util::BodyExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::client::Body;
use kube::core::{ObjectList, Request, Status};
use kube::runtime::watcher::{Error, Event};
use kube::{Client, Resource};
use prost::Message;
use tokio_util::task::AbortOnDropHandle;
use tracing::debug;

use sigil_index::{WatchedPod, WatchedPodSpec, WatchedPodStatus};

/// Pods in the first LIST page: kube-runtime's and client-go's page size.
const FIRST_PAGE: u32 = 500;
/// The most Pods asked for in one page (about 5 MiB of protobuf).
const MAX_PAGE: u32 = 5000;
/// The rest of a LIST is asked for in about this many pages.
const PAGES: u64 = 20;

/// The size of the pages after the first, from the first page's `remainingItemCount`.
///
/// The apiserver's cost for each continued page grows with the number of Pods it holds,
/// so paging a large list 500 at a time is quadratic. So the number of pages is bounded,
/// not their size, up to [`MAX_PAGE`] Pods a page (bench/README.md has the figures).
fn page_size(remaining: Option<i64>) -> u32 {
    let remaining = remaining.and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
    let wanted = remaining.div_ceil(PAGES);
    u32::try_from(wanted)
        .unwrap_or(MAX_PAGE)
        .clamp(FIRST_PAGE, MAX_PAGE)
}

/// Watch requests ask the apiserver to end the watch after this long (kube-runtime's
/// default), and a watch silent for this long plus a margin is assumed dead. Bookmarks
/// arrive about once a minute, so a live watch is never that quiet.
const WATCH_TIMEOUT_SECS: u32 = 290;
const WATCH_IDLE_MARGIN: Duration = Duration::from_secs(5);

/// What the apiserver prefixes every protobuf body with (apimachinery's protobuf
/// serializer).
const PROTOBUF_MAGIC: &[u8] = b"k8s\0";
const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

/// The Pod informer's events, as `kube::runtime::watcher` gives them.
pub(crate) fn pod_watcher(
    client: Client,
) -> impl Stream<Item = Result<Event<WatchedPod>, Error>> + Send {
    watcher_from(client, FIRST_PAGE)
}

/// [`pod_watcher`], with `first` Pods in each list's first page (tests use small pages).
fn watcher_from(
    client: Client,
    first: u32,
) -> impl Stream<Item = Result<Event<WatchedPod>, Error>> + Send {
    futures::stream::unfold(
        (client, State::Relist),
        move |(client, mut state)| async move {
            loop {
                let (item, next) = step(&client, first, state).await;
                state = next;
                if let Some(item) = item {
                    return Some((item, (client, state)));
                }
            }
        },
    )
}

enum State {
    /// The next step starts a LIST from the first page.
    Relist,
    /// Paging through a LIST: the Pods of the page handed out, and the next page, already
    /// asked for (`None` before the first page and after the last).
    Listing {
        items: std::vec::IntoIter<WatchedPod>,
        next: Option<NextPage>,
        resource_version: Option<String>,
    },
    /// Listed; the next step opens a watch from `resource_version`.
    Listed { resource_version: String },
    Watching {
        resource_version: String,
        stream: BoxStream<'static, kube::Result<WatchEvent<WatchedPod>>>,
    },
}

/// The next LIST page, asked for as soon as its continue token arrived: the apiserver
/// serves it while the index renders the Pods of the page before (at 100k Pods, about
/// 40 ms of the operator's CPU for each 5000-Pod page). A list abandoned midway (the stream
/// dropped) aborts it.
struct NextPage {
    page: AbortOnDropHandle<kube::Result<PodPage>>,
    size: u32,
}

impl NextPage {
    fn fetch(client: &Client, size: u32, token: String) -> Self {
        let client = client.clone();
        let task = tokio::spawn(async move { list_page(&client, size, Some(token), true).await });
        Self {
            page: AbortOnDropHandle::new(task),
            size,
        }
    }
}

/// One step: an event (or error) to hand out, if any, and the state after it.
async fn step(
    client: &Client,
    first_page: u32,
    state: State,
) -> (Option<Result<Event<WatchedPod>, Error>>, State) {
    match state {
        State::Relist => (
            Some(Ok(Event::Init)),
            State::Listing {
                items: Vec::new().into_iter(),
                next: None,
                resource_version: None,
            },
        ),
        State::Listing {
            mut items,
            next,
            resource_version,
        } => {
            if let Some(pod) = items.next() {
                return (
                    Some(Ok(Event::InitApply(pod))),
                    State::Listing {
                        items,
                        next,
                        resource_version,
                    },
                );
            }
            let (page, size) = match (next, resource_version) {
                // A fetch that panicked or was aborted fails the list like any error.
                (Some(next), _) => (
                    next.page
                        .await
                        .unwrap_or_else(|e| Err(kube::Error::Service(e.into()))),
                    Some(next.size),
                ),
                (None, Some(resource_version)) => {
                    return (
                        Some(Ok(Event::InitDone)),
                        State::Listed { resource_version },
                    );
                }
                (None, None) => (list_page(client, first_page, None, true).await, None),
            };
            match page {
                Ok(page) if page.resource_version.is_none() && page.continue_token.is_none() => {
                    (Some(Err(Error::NoResourceVersion)), State::Relist)
                }
                Ok(page) => {
                    // The first page sets the size of the others.
                    let size = size.unwrap_or_else(|| page_size(page.remaining));
                    let next = page
                        .continue_token
                        .map(|token| NextPage::fetch(client, size, token));
                    (
                        None,
                        State::Listing {
                            items: page.items.into_iter(),
                            next,
                            resource_version: page.resource_version,
                        },
                    )
                }
                // Every failed page lists again from the start, as kube-runtime does: a
                // continue token is only good for a few minutes (410 Gone after that).
                Err(e) => (Some(Err(Error::InitialListFailed(e))), State::Relist),
            }
        }
        State::Listed { resource_version } => {
            // Bookmarks are on by default.
            let params = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
            match Api::<WatchedPod>::all(client.clone())
                .watch(&params, &resource_version)
                .await
            {
                Ok(stream) => (
                    None,
                    State::Watching {
                        resource_version,
                        stream: stream.boxed(),
                    },
                ),
                Err(e) if is_gone(&e) => (Some(Err(Error::WatchStartFailed(e))), State::Relist),
                Err(e) => (
                    Some(Err(Error::WatchStartFailed(e))),
                    State::Listed { resource_version },
                ),
            }
        }
        State::Watching {
            resource_version,
            mut stream,
        } => {
            let idle = Duration::from_secs(WATCH_TIMEOUT_SECS.into()) + WATCH_IDLE_MARGIN;
            let event = tokio::time::timeout(idle, stream.next())
                .await
                .ok()
                .flatten();
            let watching = |resource_version, stream| State::Watching {
                resource_version,
                stream,
            };
            match event {
                Some(Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod))) => {
                    changed(Event::Apply, pod, stream)
                }
                Some(Ok(WatchEvent::Deleted(pod))) => changed(Event::Delete, pod, stream),
                Some(Ok(WatchEvent::Bookmark(mark))) => {
                    (None, watching(mark.metadata.resource_version, stream))
                }
                // 410 Gone: the watch fell out of the apiserver's window; list again.
                Some(Ok(WatchEvent::Error(e))) if e.code == 410 => {
                    (Some(Err(Error::WatchError(e))), State::Relist)
                }
                Some(Ok(WatchEvent::Error(e))) => (
                    Some(Err(Error::WatchError(e))),
                    watching(resource_version, stream),
                ),
                Some(Err(e)) => (
                    Some(Err(Error::WatchFailed(e))),
                    watching(resource_version, stream),
                ),
                // The apiserver closed the watch (its timeout) or it went quiet: resume.
                None => {
                    debug!("Pod watch ended; resuming from {resource_version}");
                    (None, State::Listed { resource_version })
                }
            }
        }
    }
}

/// A watched change, handed out; the watch goes on from its resourceVersion (a change
/// without one cannot be resumed from, so the Pods are listed again).
fn changed(
    event: fn(WatchedPod) -> Event<WatchedPod>,
    pod: WatchedPod,
    stream: BoxStream<'static, kube::Result<WatchEvent<WatchedPod>>>,
) -> (Option<Result<Event<WatchedPod>, Error>>, State) {
    match pod
        .meta()
        .resource_version
        .clone()
        .filter(|v| !v.is_empty())
    {
        Some(resource_version) => (
            Some(Ok(event(pod))),
            State::Watching {
                resource_version,
                stream,
            },
        ),
        None => (Some(Err(Error::NoResourceVersion)), State::Relist),
    }
}

fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 410)
}

/// One LIST page of Pods.
#[derive(Debug)]
pub struct PodPage {
    /// The Pods, as the index reads them.
    pub items: Vec<WatchedPod>,
    /// The list's resourceVersion (the watch resumes from it).
    pub resource_version: Option<String>,
    /// The token for the next page; none on the last.
    pub continue_token: Option<String>,
    /// How many Pods the pages after this one hold (`remainingItemCount`), if told.
    pub remaining: Option<i64>,
    /// Whether the page was protobuf.
    pub protobuf: bool,
    /// The size of the response body.
    pub bytes: usize,
}

/// Lists one page of Pods across all namespaces, asking for protobuf if `protobuf` (JSON is
/// accepted too, should something in front of the apiserver only speak JSON), else JSON.
/// An error status, in either encoding, becomes `kube::Error::Api` with the apiserver's
/// code, reason and message.
pub(crate) async fn list_page(
    client: &Client,
    limit: u32,
    continue_token: Option<String>,
    protobuf: bool,
) -> kube::Result<PodPage> {
    let mut params = ListParams::default().limit(limit);
    params.continue_token = continue_token;
    let mut request = Request::new(WatchedPod::url_path(&(), None))
        .list(&params)
        .map_err(kube::Error::BuildRequest)?;
    let accept = if protobuf {
        "application/vnd.kubernetes.protobuf, application/json"
    } else {
        "application/json"
    };
    request
        .headers_mut()
        .insert(ACCEPT, http::HeaderValue::from_static(accept));
    let response = client.send(request.map(Body::from)).await?;
    let status = response.status();
    let protobuf = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(PROTOBUF));
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(kube::Error::Api(Box::new(error_status(
            status, protobuf, &body,
        ))));
    }
    decode_pod_list(body, protobuf)
}

/// One LIST response body of Pods, in protobuf (`protobuf`) or JSON, as a page. This is
/// the parser the informer feeds with the apiserver's bytes (and the fuzz target
/// `pod_list` with arbitrary ones).
///
/// # Errors
/// A body that is not a Pod list in the encoding given.
pub fn decode_pod_list(body: Bytes, protobuf: bool) -> kube::Result<PodPage> {
    let (items, resource_version, continue_token, remaining) = if protobuf {
        let list = proto::PodList::decode(unwrap_protobuf(&body)?).map_err(decode_error)?;
        let meta = list.metadata.unwrap_or_default();
        let items = list.items.into_iter().map(WatchedPod::from).collect();
        (
            items,
            meta.resource_version,
            meta.continue_token,
            meta.remaining_item_count,
        )
    } else {
        let list: ObjectList<WatchedPod> =
            serde_json::from_slice(&body).map_err(kube::Error::SerdeError)?;
        let meta = list.metadata;
        (
            list.items,
            meta.resource_version,
            meta.continue_,
            meta.remaining_item_count,
        )
    };
    Ok(PodPage {
        items,
        resource_version: resource_version.filter(|v| !v.is_empty()),
        continue_token: continue_token.filter(|v| !v.is_empty()),
        remaining,
        protobuf,
        bytes: body.len(),
    })
}

/// What [`list_every_pod`] read.
#[derive(Debug, Clone, Copy)]
pub struct ListTotals {
    /// Pods decoded.
    pub pods: usize,
    /// Pages asked for.
    pub pages: usize,
    /// Response body bytes.
    pub bytes: usize,
}

/// Lists and decodes every Pod, without an index: in protobuf with the informer's page
/// sizes if `protobuf`, else in JSON 500 Pods a page, as kube-runtime's watcher (and this
/// operator before it listed in protobuf) asks. The servers bench times both beside a
/// restart: they are its floor.
///
/// # Errors
/// The first failed page's.
pub async fn list_every_pod(client: &Client, protobuf: bool) -> kube::Result<ListTotals> {
    let mut totals = ListTotals {
        pods: 0,
        pages: 0,
        bytes: 0,
    };
    let (mut size, mut token) = (FIRST_PAGE, None);
    loop {
        let page = list_page(client, size, token, protobuf).await?;
        if protobuf && totals.pages == 0 {
            size = page_size(page.remaining);
        }
        totals.pods += page.items.len();
        totals.pages += 1;
        totals.bytes += page.bytes;
        token = page.continue_token;
        if token.is_none() {
            return Ok(totals);
        }
    }
}

/// The object inside a protobuf body: the magic prefix, then a `runtime.Unknown` whose
/// `raw` holds the encoded object.
fn unwrap_protobuf(body: &Bytes) -> kube::Result<Bytes> {
    if !body.starts_with(PROTOBUF_MAGIC) {
        return Err(decode_error(
            "the body does not start with the k8s protobuf prefix",
        ));
    }
    let unknown =
        proto::Unknown::decode(body.slice(PROTOBUF_MAGIC.len()..)).map_err(decode_error)?;
    Ok(unknown.raw)
}

fn decode_error(e: impl std::fmt::Display) -> kube::Error {
    kube::Error::Service(format!("the apiserver's protobuf Pod list could not be read: {e}").into())
}

/// The apiserver's error status, from a protobuf or JSON `Status`, or from the HTTP status
/// and body text when the body is neither (a proxy's error page).
fn error_status(status: http::StatusCode, protobuf: bool, body: &Bytes) -> Status {
    let decoded = if protobuf {
        unwrap_protobuf(body)
            .ok()
            .and_then(|raw| proto::Status::decode(raw).ok())
            .map(|s| {
                Status::failure(
                    s.message.as_deref().unwrap_or_default(),
                    s.reason.as_deref().unwrap_or_default(),
                )
                .with_code(
                    s.code
                        .and_then(|c| u16::try_from(c).ok())
                        .unwrap_or(status.as_u16()),
                )
            })
    } else {
        serde_json::from_slice::<Status>(body).ok()
    };
    decoded.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        Status::failure(text.trim(), status.canonical_reason().unwrap_or("Unknown"))
            .with_code(status.as_u16())
    })
}

impl From<proto::Pod> for WatchedPod {
    fn from(pod: proto::Pod) -> Self {
        let meta = pod.metadata.unwrap_or_default();
        let spec = pod.spec.unwrap_or_default();
        let some_map = |m: BTreeMap<String, String>| (!m.is_empty()).then_some(m);
        Self {
            metadata: ObjectMeta {
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                resource_version: meta.resource_version,
                labels: some_map(meta.labels),
                annotations: some_map(meta.annotations),
                ..ObjectMeta::default()
            },
            spec: Some(WatchedPodSpec {
                service_account_name: spec.service_account_name,
                node_name: spec.node_name,
                hostname: spec.hostname,
            }),
            status: pod.status.map(|s| WatchedPodStatus { phase: s.phase }),
        }
    }
}

/// The fields of the upstream messages that the index reads (proto2, so every scalar is
/// optional), with their upstream names and numbers.
mod proto {
    use std::collections::BTreeMap;

    /// `k8s.io.apimachinery.pkg.runtime.Unknown`: the envelope of every protobuf body.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Unknown {
        #[prost(bytes = "bytes", tag = "2")]
        pub(super) raw: bytes::Bytes,
    }

    /// `k8s.io.api.core.v1.PodList`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct PodList {
        #[prost(message, optional, tag = "1")]
        pub(super) metadata: Option<ListMeta>,
        #[prost(message, repeated, tag = "2")]
        pub(super) items: Vec<Pod>,
    }

    /// `k8s.io.apimachinery.pkg.apis.meta.v1.ListMeta`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ListMeta {
        #[prost(string, optional, tag = "2")]
        pub(super) resource_version: Option<String>,
        /// `continue`.
        #[prost(string, optional, tag = "3")]
        pub(super) continue_token: Option<String>,
        #[prost(int64, optional, tag = "4")]
        pub(super) remaining_item_count: Option<i64>,
    }

    /// `k8s.io.api.core.v1.Pod`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Pod {
        #[prost(message, optional, tag = "1")]
        pub(super) metadata: Option<ObjectMeta>,
        #[prost(message, optional, tag = "2")]
        pub(super) spec: Option<PodSpec>,
        #[prost(message, optional, tag = "3")]
        pub(super) status: Option<PodStatus>,
    }

    /// `k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ObjectMeta {
        #[prost(string, optional, tag = "1")]
        pub(super) name: Option<String>,
        #[prost(string, optional, tag = "3")]
        pub(super) namespace: Option<String>,
        #[prost(string, optional, tag = "5")]
        pub(super) uid: Option<String>,
        #[prost(string, optional, tag = "6")]
        pub(super) resource_version: Option<String>,
        #[prost(btree_map = "string, string", tag = "11")]
        pub(super) labels: BTreeMap<String, String>,
        #[prost(btree_map = "string, string", tag = "12")]
        pub(super) annotations: BTreeMap<String, String>,
    }

    /// `k8s.io.api.core.v1.PodSpec`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct PodSpec {
        #[prost(string, optional, tag = "8")]
        pub(super) service_account_name: Option<String>,
        #[prost(string, optional, tag = "10")]
        pub(super) node_name: Option<String>,
        #[prost(string, optional, tag = "16")]
        pub(super) hostname: Option<String>,
    }

    /// `k8s.io.api.core.v1.PodStatus`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct PodStatus {
        #[prost(string, optional, tag = "1")]
        pub(super) phase: Option<String>,
    }

    /// `k8s.io.apimachinery.pkg.apis.meta.v1.Status`: an error response.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Status {
        #[prost(string, optional, tag = "3")]
        pub(super) message: Option<String>,
        #[prost(string, optional, tag = "4")]
        pub(super) reason: Option<String>,
        #[prost(int32, optional, tag = "6")]
        pub(super) code: Option<i32>,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! Against the e2e harness's real kube-apiserver.
    use std::collections::BTreeMap;
    use std::time::Duration;

    use futures::StreamExt;
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
    use kube::runtime::watcher::Event;
    use kube::{Client, Resource};
    use serde_json::{Value, json};

    use super::{FIRST_PAGE, MAX_PAGE, list_page, page_size, watcher_from};
    use sigil_index::{PodFacts, WatchedPod};

    async fn client() -> Client {
        sigil_e2e::shared().await.admin().await.unwrap()
    }

    async fn namespace(client: &Client) -> String {
        let name = sigil_e2e::unique("podwatch");
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        name
    }

    async fn create_pod(client: &Client, ns: &str, pod: Value) -> Pod {
        let mut pod: Pod = serde_json::from_value(pod).unwrap();
        pod.spec.get_or_insert_default().containers =
            serde_json::from_value(json!([{"name": "main", "image": "registry.invalid/none"}]))
                .unwrap();
        Api::<Pod>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &pod)
            .await
            .unwrap()
    }

    /// What the index would take from a Pod, and the resourceVersion the watcher resumes from.
    fn facts(pod: &WatchedPod) -> (PodFacts, Option<String>) {
        (
            PodFacts::new(pod).unwrap(),
            pod.meta().resource_version.clone(),
        )
    }

    #[test]
    fn later_pages_bound_the_number_of_pages() {
        assert_eq!(page_size(None), FIRST_PAGE);
        assert_eq!(page_size(Some(0)), FIRST_PAGE);
        assert_eq!(page_size(Some(19_500)), 975);
        assert_eq!(page_size(Some(99_500)), 4975);
        assert_eq!(page_size(Some(10_000_000)), MAX_PAGE);
        assert_eq!(page_size(Some(i64::MAX)), MAX_PAGE);
    }

    /// The fuzz target's seeds (fuzz/seeds/pod_list) are one page from a real apiserver in
    /// each encoding, behind the byte that picks it: both decode, to the same Pods.
    #[test]
    fn the_fuzz_seeds_are_the_same_page_in_both_encodings() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/pod_list");
        let page = |file: &str, protobuf: bool| {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let body = if protobuf {
                [b"k8s\0".as_slice(), &bytes[1..]].concat()
            } else {
                bytes[1..].to_vec()
            };
            let page = super::decode_pod_list(body.into(), protobuf).unwrap();
            assert_eq!(page.protobuf, protobuf);
            page
        };
        let (p, j) = (page("protobuf-page", true), page("json-page", false));
        assert_eq!(p.items.len(), 2);
        assert_eq!(
            p.items.iter().map(facts).collect::<Vec<_>>(),
            j.items.iter().map(facts).collect::<Vec<_>>()
        );
        assert_eq!(
            (&p.resource_version, &p.continue_token, p.remaining),
            (&j.resource_version, &j.continue_token, j.remaining)
        );
        assert!(p.continue_token.is_some() && p.remaining.is_some_and(|n| n > 0));
    }

    #[tokio::test]
    async fn protobuf_pages_read_what_json_gives() {
        let client = client().await;
        let ns = namespace(&client).await;
        create_pod(
            &client,
            &ns,
            json!({
            "metadata": {"name": "full", "labels": {"app": "web", "empty": ""},
                         "annotations": {"sigil.dev/note": "ünïcode ✓", "b": "2"}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web", "hostname": "web-0",
                     "automountServiceAccountToken": false}}),
        )
        .await;
        create_pod(
            &client,
            &ns,
            json!({"metadata": {"name": "bare"}, "spec": {}}),
        )
        .await;
        create_pod(
            &client,
            &ns,
            json!({"metadata": {"name": "done"}, "spec": {"nodeName": "node-b"}}),
        )
        .await;
        Api::<Pod>::namespaced(client.clone(), &ns)
            .patch_status(
                "done",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
            )
            .await
            .unwrap();

        // Protobuf, two Pods a page, so continue tokens are followed.
        let (mut by_protobuf, mut pages, mut token) = (BTreeMap::new(), 0, None);
        loop {
            let page = list_page(&client, 2, token, true).await.unwrap();
            assert!(page.protobuf, "the apiserver answered in JSON");
            pages += 1;
            for pod in page
                .items
                .iter()
                .filter(|p| p.meta().namespace.as_deref() == Some(ns.as_str()))
            {
                by_protobuf.insert(pod.meta().name.clone().unwrap(), facts(pod));
            }
            token = page.continue_token;
            if token.is_none() {
                assert!(
                    page.resource_version.is_some(),
                    "the last page has no resourceVersion"
                );
                break;
            }
        }
        assert!(
            pages >= 2,
            "one page only: continue tokens were not exercised"
        );

        let by_json: BTreeMap<_, _> = Api::<WatchedPod>::namespaced(client.clone(), &ns)
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|p| (p.meta().name.clone().unwrap(), facts(p)))
            .collect();
        assert_eq!(by_json.len(), 3);
        assert_eq!(by_protobuf, by_json);
        // And the facts are the ones written, not merely equal.
        let (full, _) = &by_protobuf["full"];
        assert_eq!(
            (
                full.node.as_deref(),
                full.hostname.as_deref(),
                full.service_account.as_str()
            ),
            (Some("node-a"), Some("web-0"), "web")
        );
        assert_eq!(
            crate::template::KeyValues::value(&full.annotations, "sigil.dev/note"),
            Some("ünïcode ✓")
        );
        assert_eq!(
            crate::template::KeyValues::value(&full.labels, "empty"),
            Some("")
        );
        assert!(by_protobuf["done"].0.terminal);
        assert!(!by_protobuf["bare"].0.terminal);
        assert_eq!(by_protobuf["bare"].0.service_account, "default");

        // The bench's floor rows list the same Pods both ways, protobuf in fewer bytes.
        // Other tests of this binary create Pods in the same apiserver meanwhile: the JSON
        // list is compared with protobuf lists taken just before and after it, again
        // while the cluster's Pod count changed between those two.
        let mut tries = 0;
        let (p, j) = loop {
            let before = super::list_every_pod(&client, true).await.unwrap();
            let j = super::list_every_pod(&client, false).await.unwrap();
            let after = super::list_every_pod(&client, true).await.unwrap();
            tries += 1;
            if before.pods == after.pods || tries == 20 {
                break (after, j);
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        assert!(p.pods >= 3 && p.pods == j.pods, "{p:?} vs {j:?}");
        assert!(p.bytes < j.bytes, "{p:?} vs {j:?}");
    }

    #[tokio::test]
    async fn an_error_status_in_protobuf_names_the_apiservers_reason() {
        let client = client().await;
        let err = list_page(&client, 10, Some("not-a-continue-token".into()), true)
            .await
            .unwrap_err();
        let kube::Error::Api(status) = err else {
            panic!("not an API error: {err}")
        };
        assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));
        assert!(
            status.message.contains("continue"),
            "message: {}",
            status.message
        );
    }

    #[tokio::test]
    async fn the_stream_lists_then_watches() {
        let client = client().await;
        let ns = namespace(&client).await;
        for name in ["before", "also-before"] {
            let pod = json!({"metadata": {"name": name}, "spec": {"nodeName": "n"}});
            create_pod(&client, &ns, pod).await;
        }
        let ours = |p: &WatchedPod| {
            (p.meta().namespace.as_deref() == Some(ns.as_str()))
                .then(|| p.meta().name.clone().unwrap())
        };
        // One Pod in the first page, so the list takes at least two.
        let stream = watcher_from(client.clone(), 1);
        futures::pin_mut!(stream);
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(20), stream.next())
                .await
                .expect("no event within 20 s")
                .expect("the stream ended")
                .expect("a watch error")
        };
        assert!(matches!(next().await, Event::Init));
        let mut listed = Vec::new();
        loop {
            match next().await {
                Event::InitApply(p) => listed.extend(ours(&p)),
                Event::InitDone => break,
                other => panic!("{other:?} during the initial list"),
            }
        }
        listed.sort();
        assert_eq!(listed, ["also-before", "before"]);

        create_pod(
            &client,
            &ns,
            json!({"metadata": {"name": "after"}, "spec": {"nodeName": "n"}}),
        )
        .await;
        Api::<Pod>::namespaced(client.clone(), &ns)
            .delete("before", &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
        let (mut applied, mut deleted) = (Vec::new(), Vec::new());
        while !(applied.contains(&"after".to_owned()) && deleted.contains(&"before".to_owned())) {
            match next().await {
                Event::Apply(p) => applied.extend(ours(&p)),
                Event::Delete(p) => deleted.extend(ours(&p)),
                other => panic!("{other:?} while watching"),
            }
        }
    }
}
