//! The Pod informer: kube-runtime's list-then-watch, except that the LIST is one
//! protobuf response (`application/vnd.kubernetes.protobuf`, JSON still accepted), read as
//! it arrives.
//!
//! Listing every Pod is what an operator restart costs, since Kubernetes is the only
//! datastore. The apiserver serves protobuf faster and in fewer bytes than JSON, and prost
//! skips the fields the index does not read (containers, volumes, conditions,
//! managedFields) without building them. The list is not paged: the apiserver serves an
//! unpaged list from its watch cache as one stream (as it does client-go's informers, whose
//! first list asks for resourceVersion 0 and so is never paged), while each continued page
//! costs it more the more Pods it holds. [`PodListReader`] hands out each Pod as its bytes
//! arrive, so the index renders while the apiserver is still sending. The figures are in
//! bench/README.md ("Reading the `servers` rows"). Watch events stay JSON: they come one
//! object at a time, and kube's watch decoder handles them.
//!
//! The stream's states and events follow kube-runtime's `watcher` (ListWatch strategy):
//! `Init`, one `InitApply` per listed Pod, `InitDone`, then `Apply`/`Delete` from a watch
//! resumed at the list's resourceVersion, with bookmarks. A 410 Gone (an expired continue
//! token or resourceVersion) starts a fresh list; any other error is returned and the
//! same step is tried again, after the caller's backoff.

use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use http::header::{ACCEPT, CONTENT_TYPE};
use http_body_util::BodyExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::client::Body;
use kube::core::Request;
use kube::runtime::watcher::{Error, Event};
use kube::{Client, Resource};
use tracing::{debug, warn};

use super::pod_list::{ListEnd, PROTOBUF, PodListReader, decode_pod_list, error_status};
use sigil_index::WatchedPod;

/// Pods in each page of a JSON list (the benches' comparison, and the informer's lists once
/// the apiserver has answered in JSON): kube-runtime's and client-go's page size.
const JSON_PAGE: u32 = 500;

/// Pods a page once an unpaged list has failed midway. The apiserver ends a request after
/// its `--request-timeout` (60 s by default), and a list too large to send within it
/// would fail the same way at every try; pages each end well within it.
const FALLBACK_PAGE: u32 = 5000;

/// Watch requests ask the apiserver to end the watch after this long (kube-runtime's
/// default), and a watch silent for this long plus a margin is assumed dead. Bookmarks
/// arrive about once a minute, so a live watch is never that quiet.
const WATCH_TIMEOUT_SECS: u32 = 290;
const WATCH_IDLE_MARGIN: Duration = Duration::from_secs(5);

/// The Pod informer's events, as `kube::runtime::watcher` gives them.
pub(crate) fn pod_watcher(
    client: Client,
) -> impl Stream<Item = Result<Event<WatchedPod>, Error>> + Send {
    watcher_from(client, None)
}

/// [`pod_watcher`], listing `limit` Pods a page if given (tests page, so that continue
/// tokens are followed).
fn watcher_from(
    client: Client,
    limit: Option<u32>,
) -> impl Stream<Item = Result<Event<WatchedPod>, Error>> + Send {
    futures::stream::unfold(
        (client, limit, State::Relist),
        |(client, mut limit, mut state)| async move {
            loop {
                let (item, next) = step(&client, &mut limit, state).await;
                state = next;
                if let Some(item) = item {
                    return Some((item, (client, limit, state)));
                }
            }
        },
    )
}

enum State {
    /// The next step starts a LIST.
    Relist,
    /// The next step asks for the list, or for its next page after `continue_token`.
    Request { continue_token: Option<String> },
    /// Handing out the Pods of a list response as they arrive.
    Listing(Box<Listing>),
    /// Listed; the next step opens a watch from `resource_version`.
    Listed { resource_version: String },
    Watching {
        resource_version: String,
        stream: BoxStream<'static, kube::Result<WatchEvent<WatchedPod>>>,
    },
}

/// A LIST response being read.
pub(crate) enum Listing {
    /// Protobuf, decoded as its bytes arrive.
    Streaming { reader: PodListReader, body: Body },
    /// JSON (something in front of the apiserver that only speaks it), decoded whole. Only
    /// pages are read this way ([`Listing::start`]), so one page is held at a time.
    Decoded {
        items: std::vec::IntoIter<WatchedPod>,
        end: ListEnd,
        bytes: usize,
    },
}

/// What a [`Listing`] gives next. (Nearly every one is a Pod: boxing it would cost an
/// allocation each.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum Listed {
    Pod(WatchedPod),
    /// The response has ended: its resourceVersion and continue token.
    End(ListEnd),
}

impl Listing {
    /// Asks for every Pod (or `limit` a page) across all namespaces, from `continue_token`
    /// if given, in protobuf unless `protobuf` is false. An error status, in either
    /// encoding, becomes `kube::Error::Api` with the apiserver's code, reason and message.
    ///
    /// An unpaged list answered in JSON (something in front of the apiserver that only
    /// speaks it, or `protobuf` false) is not read: JSON is decoded whole, and every Pod
    /// at once would be held in memory. The request is sent again in pages of
    /// [`JSON_PAGE`], and `limit` stays set so that the list's later pages, and the lists
    /// after it, are paged too.
    pub(crate) async fn start(
        client: &Client,
        limit: &mut Option<u32>,
        continue_token: Option<String>,
        protobuf: bool,
    ) -> kube::Result<Self> {
        let mut response = send_list(client, *limit, continue_token.clone(), protobuf).await?;
        if response.status().is_success() && !is_protobuf(&response) && limit.is_none() {
            if protobuf {
                warn!(
                    "the Pod list came back in JSON, not protobuf (a proxy in front of the apiserver?); Pods are listed in JSON pages of {JSON_PAGE} from now on"
                );
            }
            *limit = Some(JSON_PAGE);
            drop(response);
            response = send_list(client, *limit, continue_token, protobuf).await?;
        }
        let status = response.status();
        let protobuf = is_protobuf(&response);
        let body = response.into_body();
        if status.is_success() && protobuf {
            return Ok(Self::Streaming {
                reader: PodListReader::new(),
                body,
            });
        }
        let body = body.collect().await?.to_bytes();
        if !status.is_success() {
            return Err(kube::Error::Api(Box::new(error_status(
                status, protobuf, &body,
            ))));
        }
        let page = decode_pod_list(body, false)?;
        Ok(Self::Decoded {
            items: page.items.into_iter(),
            end: page.end,
            bytes: page.bytes,
        })
    }

    /// The next Pod, waiting for its bytes, or the end of the response.
    ///
    /// # Errors
    /// The connection failed, or the body is not a Pod list.
    pub(crate) async fn next(&mut self) -> kube::Result<Listed> {
        match self {
            Self::Decoded { items, end, .. } => Ok(items
                .next()
                .map_or_else(|| Listed::End(end.clone()), Listed::Pod)),
            Self::Streaming { reader, body } => loop {
                if let Some(pod) = reader.next_pod()? {
                    return Ok(Listed::Pod(pod));
                }
                match body.frame().await {
                    Some(frame) => {
                        if let Ok(data) = frame?.into_data() {
                            reader.push(&data);
                        }
                    }
                    None => return reader.finish().map(Listed::End),
                }
            },
        }
    }

    /// The body bytes read so far.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::Decoded { bytes, .. } => *bytes,
            Self::Streaming { reader, .. } => reader.bytes_read(),
        }
    }
}

/// Sends a LIST of every Pod (`limit` a page if given), accepting protobuf first if
/// `protobuf`, else only JSON.
async fn send_list(
    client: &Client,
    limit: Option<u32>,
    continue_token: Option<String>,
    protobuf: bool,
) -> kube::Result<http::Response<Body>> {
    let params = ListParams {
        limit,
        continue_token,
        ..ListParams::default()
    };
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
    client.send(request.map(Body::from)).await
}

fn is_protobuf(response: &http::Response<Body>) -> bool {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(PROTOBUF))
}

/// One step: an event (or error) to hand out, if any, and the state after it. Lists are of
/// `limit` Pods a page if given, else unpaged; a list that fails midway, or comes back in
/// JSON, sets it.
async fn step(
    client: &Client,
    limit: &mut Option<u32>,
    state: State,
) -> (Option<Result<Event<WatchedPod>, Error>>, State) {
    match state {
        State::Relist => (
            Some(Ok(Event::Init)),
            State::Request {
                continue_token: None,
            },
        ),
        State::Request { continue_token } => {
            match Listing::start(client, limit, continue_token, true).await {
                Ok(listing) => (None, State::Listing(Box::new(listing))),
                Err(e) => (Some(Err(Error::InitialListFailed(e))), State::Relist),
            }
        }
        State::Listing(mut listing) => match listing.next().await {
            Ok(Listed::Pod(pod)) => (Some(Ok(Event::InitApply(pod))), State::Listing(listing)),
            Ok(Listed::End(ListEnd {
                continue_token: Some(token),
                ..
            })) => (
                None,
                State::Request {
                    continue_token: Some(token),
                },
            ),
            Ok(Listed::End(ListEnd {
                resource_version: Some(resource_version),
                ..
            })) => (
                Some(Ok(Event::InitDone)),
                State::Listed { resource_version },
            ),
            Ok(Listed::End(_)) => (Some(Err(Error::NoResourceVersion)), State::Relist),
            // A list that failed midway starts again from the start, as kube-runtime does:
            // a continue token is only good for a few minutes (410 Gone after that), and a
            // broken stream cannot be resumed. Should the apiserver's request timeout have
            // cut an unpaged list, every list after it is paged.
            Err(e) => {
                if limit.is_none() {
                    warn!(
                        error = %e,
                        "the list of every Pod failed midway; from now on Pods are listed in pages of {FALLBACK_PAGE}"
                    );
                    *limit = Some(FALLBACK_PAGE);
                }
                (Some(Err(Error::InitialListFailed(e))), State::Relist)
            }
        },
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

/// Lists one page of Pods across all namespaces, `limit` at most, decoded whole.
#[cfg(test)]
pub(crate) async fn list_page(
    client: &Client,
    limit: u32,
    continue_token: Option<String>,
    protobuf: bool,
) -> kube::Result<super::PodPage> {
    let mut listing = Listing::start(client, &mut Some(limit), continue_token, protobuf).await?;
    let mut items = Vec::new();
    loop {
        match listing.next().await? {
            Listed::Pod(pod) => items.push(pod),
            Listed::End(end) => {
                return Ok(super::PodPage {
                    items,
                    end,
                    protobuf: matches!(listing, Listing::Streaming { .. }),
                    bytes: listing.bytes(),
                });
            }
        }
    }
}

/// What [`list_every_pod`] read.
#[derive(Debug, Clone, Copy)]
pub struct ListTotals {
    /// Pods decoded.
    pub pods: usize,
    /// Pages read. A JSON answer to the unpaged list, dropped unread and asked for again
    /// in pages (see `Listing::start`), is a request but not a page.
    pub pages: usize,
    /// Response body bytes.
    pub bytes: usize,
}

/// Lists and decodes every Pod, without an index: as the informer does (one protobuf
/// response, read as it arrives) if `protobuf`, else in JSON 500 Pods a page, as
/// kube-runtime's watcher (and this operator before it listed in protobuf) asks. The
/// servers bench times both beside a restart: they are its floor.
///
/// # Errors
/// The first failed request's.
pub async fn list_every_pod(client: &Client, protobuf: bool) -> kube::Result<ListTotals> {
    let mut totals = ListTotals {
        pods: 0,
        pages: 0,
        bytes: 0,
    };
    let mut limit = (!protobuf).then_some(JSON_PAGE);
    let mut token = None;
    loop {
        let mut listing = Listing::start(client, &mut limit, token, protobuf).await?;
        totals.pages += 1;
        let end = loop {
            match listing.next().await? {
                Listed::Pod(_) => totals.pods += 1,
                Listed::End(end) => break end,
            }
        };
        totals.bytes += listing.bytes();
        token = end.continue_token;
        if token.is_none() {
            return Ok(totals);
        }
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

    use super::{Error, FALLBACK_PAGE, JSON_PAGE, State, list_page, step, watcher_from};
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

    /// `n` Pods named `p-0`, `p-1`… in `ns`, created 16 at a time.
    async fn create_pods(client: &Client, ns: &str, n: usize) {
        futures::stream::iter(0..n)
            .for_each_concurrent(16, |i| async move {
                let pod =
                    json!({"metadata": {"name": format!("p-{i}")}, "spec": {"nodeName": "n"}});
                create_pod(client, ns, pod).await;
            })
            .await;
    }

    /// Steps the informer from `state` through one whole list; returns how many of the
    /// listed Pods are in namespace `ns`, and the state after the list.
    async fn list_in(
        client: &Client,
        limit: &mut Option<u32>,
        mut state: State,
        ns: &str,
    ) -> (usize, State) {
        let mut listed = 0;
        loop {
            let (event, next) = step(client, limit, state).await;
            state = next;
            match event {
                Some(Ok(Event::InitApply(p))) => {
                    listed += usize::from(p.meta().namespace.as_deref() == Some(ns));
                }
                Some(Ok(Event::InitDone)) => return (listed, state),
                Some(Ok(Event::Init)) | None => {}
                other => panic!("{other:?} in the list"),
            }
        }
    }

    /// What the index would take from a Pod, and the resourceVersion the watcher resumes from.
    fn facts(pod: &WatchedPod) -> (PodFacts, Option<String>) {
        (
            PodFacts::new(pod).unwrap(),
            pod.meta().resource_version.clone(),
        )
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
            let page = crate::index::decode_pod_list(body.into(), protobuf).unwrap();
            assert_eq!(page.protobuf, protobuf);
            page
        };
        let (p, j) = (page("protobuf-page", true), page("json-page", false));
        assert_eq!(p.items.len(), 2);
        assert_eq!(
            p.items.iter().map(facts).collect::<Vec<_>>(),
            j.items.iter().map(facts).collect::<Vec<_>>()
        );
        assert_eq!(&p.end, &j.end);
        assert!(p.end.continue_token.is_some() && p.end.remaining.is_some_and(|n| n > 0));
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
            token = page.end.continue_token;
            if token.is_none() {
                assert!(
                    page.end.resource_version.is_some(),
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
        // The informer's list is one response; JSON comes 500 a page.
        assert_eq!(p.pages, 1, "{p:?}");
        assert!(p.bytes > 0 && p.bytes < j.bytes, "{p:?} vs {j:?}");
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

    /// A TCP relay to the apiserver (`host:port`) that cuts its first connection once
    /// `cut` bytes have come back through it; later connections are relayed whole. TLS
    /// passes through it untouched.
    async fn cutting_relay(upstream: String, cut: u64) -> String {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((down, _)) = listener.accept().await {
                let up = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let cut = std::mem::replace(&mut first, false).then_some(cut);
                tokio::spawn(async move {
                    let (mut up_read, mut up_write) = up.into_split();
                    let (mut down_read, mut down_write) = down.into_split();
                    let to_server = tokio::io::copy(&mut down_read, &mut up_write);
                    let to_client = async {
                        let mut from_server = (&mut up_read).take(cut.unwrap_or(u64::MAX));
                        tokio::io::copy(&mut from_server, &mut down_write).await
                    };
                    // Either direction ending drops both connections.
                    tokio::select! {
                        _ = to_server => {}
                        _ = to_client => {}
                    }
                });
            }
        });
        format!("https://{addr}")
    }

    #[tokio::test]
    async fn a_list_cut_midway_is_listed_again_in_pages() {
        let cp = sigil_e2e::shared().await;
        let client = cp.admin().await.unwrap();
        let ns = namespace(&client).await;
        // Far more Pods than fit in the bytes relayed before the cut.
        create_pods(&client, &ns, 300).await;
        let relay = cutting_relay(
            cp.server().trim_start_matches("https://").to_owned(),
            32 << 10,
        )
        .await;
        let yaml = std::fs::read_to_string(cp.kubeconfig_path())
            .unwrap()
            .replace(cp.server(), &relay);
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::from_yaml(&yaml).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let relayed = Client::try_from(config).unwrap();

        // The unpaged list: some Pods, then the cut.
        let (mut state, mut limit) = (State::Relist, None);
        let mut before_cut = 0;
        let failed = loop {
            let (event, next) = step(&relayed, &mut limit, state).await;
            state = next;
            match event {
                Some(Ok(Event::InitApply(_))) => before_cut += 1,
                Some(Ok(Event::Init)) | None => {}
                Some(Err(e)) => break e,
                Some(Ok(other)) => panic!("{other:?} before the cut"),
            }
        };
        assert!(matches!(failed, Error::InitialListFailed(_)), "{failed:?}");
        assert!(before_cut > 0, "the cut came before any Pod, not midway");
        assert!(
            matches!(state, State::Relist),
            "the list is not started again"
        );
        assert_eq!(limit, Some(FALLBACK_PAGE), "the next list is not paged");

        // The paged list, on a new connection, reads every Pod.
        let listed;
        (listed, state) = list_in(&relayed, &mut limit, state, &ns).await;
        assert_eq!(listed, 300);
        assert!(matches!(state, State::Listed { .. }));
        // And it stays paged.
        assert_eq!(limit, Some(FALLBACK_PAGE));
    }

    /// A proxy in front of the apiserver that only speaks JSON (played by a client layer
    /// that asks for JSON whatever the informer accepts): the unpaged list is dropped
    /// unread and every list is asked for in JSON pages, so no list is ever held whole.
    #[tokio::test]
    async fn a_list_answered_in_json_is_asked_again_in_pages() {
        let cp = sigil_e2e::shared().await;
        let client = cp.admin().await.unwrap();
        let ns = namespace(&client).await;
        // More Pods than one JSON page holds.
        let pods = JSON_PAGE as usize + 1;
        create_pods(&client, &ns, pods).await;
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(cp.kubeconfig_path()).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let lists = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let json_only = tower::util::MapRequestLayer::new({
            let lists = lists.clone();
            move |mut request: http::Request<kube::client::Body>| {
                if request.uri().path() == "/api/v1/pods" {
                    lists
                        .lock()
                        .unwrap()
                        .push(request.uri().query().unwrap_or_default().to_owned());
                }
                request.headers_mut().insert(
                    http::header::ACCEPT,
                    http::HeaderValue::from_static("application/json"),
                );
                request
            }
        });
        let json_client = kube::client::ClientBuilder::try_from(config)
            .unwrap()
            .with_layer(&json_only)
            .build();

        let mut limit = None;
        // The second list starts from the start, as after a 410 from the watch.
        for _ in 0..2 {
            let (listed, state) = list_in(&json_client, &mut limit, State::Relist, &ns).await;
            assert_eq!(listed, pods);
            assert!(matches!(state, State::Listed { .. }));
            assert_eq!(
                limit,
                Some(JSON_PAGE),
                "the lists after a JSON answer are not paged"
            );
        }
        let lists = lists.lock().unwrap().clone();
        let paged = |q: &String| q.contains(&format!("limit={JSON_PAGE}"));
        // The first request is the unpaged one, dropped; every one after it is a page.
        assert!(!paged(&lists[0]), "{lists:?}");
        assert!(lists[1..].iter().all(paged), "{lists:?}");
        // At least two pages in each of the two lists.
        assert!(lists.len() >= 5, "{lists:?}");
        assert!(
            lists[1..].iter().any(|q| q.contains("continue=")),
            "{lists:?}"
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
        let stream = watcher_from(client.clone(), Some(1));
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

        // Unpaged, as the operator lists: the same Pods, from one response.
        let unpaged = watcher_from(client.clone(), None);
        futures::pin_mut!(unpaged);
        let mut whole = Vec::new();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(20), unpaged.next())
                .await
                .expect("no event within 20 s")
                .expect("the stream ended")
                .expect("a list error");
            match event {
                Event::Init => {}
                Event::InitApply(p) => whole.extend(ours(&p)),
                Event::InitDone => break,
                other => panic!("{other:?} during the initial list"),
            }
        }
        whole.sort();
        assert_eq!(whole, listed);

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
