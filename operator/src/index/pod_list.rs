//! A Pod LIST response, read as its bytes arrive.
//!
//! The informer asks for every Pod in one protobuf response (`pod_watch.rs`). At 100k Pods
//! that body is about 90 MiB; [`PodListReader`] hands out each Pod as soon as its bytes are
//! in, so the index renders while the apiserver is still sending, and the operator never
//! holds more of the body than one Pod.
//!
//! The body is apimachinery's protobuf encoding: the four bytes `k8s\0`, then a
//! `runtime.Unknown` whose field 2 (`raw`) holds a `PodList`: field 1 its `ListMeta`, field 2
//! each Pod. The reader walks that wire format field by field with prost's primitives and
//! decodes each Pod, and the `ListMeta`, with prost once it is whole. Fields it does not read
//! are skipped as they stream past, whatever their size; a Pod or `ListMeta` larger than
//! [`MAX_MESSAGE`] is an error before any of it is buffered.
//!
//! The messages below are the subset of the published `generated.proto` files that the
//! index reads, with the upstream field numbers (`k8s.io/api/core/v1`,
//! `k8s.io/apimachinery/pkg/apis/meta/v1`, `k8s.io/apimachinery/pkg/runtime`). Fields not
//! declared here are skipped by the decoder.

use std::collections::BTreeMap;

use bytes::{Buf, Bytes, BytesMut};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{ObjectList, Status};
use prost::Message;
use prost::encoding::{WireType, decode_varint};

use sigil_index::{WatchedPod, WatchedPodSpec, WatchedPodStatus};

/// What the apiserver prefixes every protobuf body with (apimachinery's protobuf
/// serializer).
pub(super) const PROTOBUF_MAGIC: &[u8] = b"k8s\0";
pub(super) const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

/// The largest Pod (or list metadata) the reader buffers. etcd refuses objects above
/// 1.5 MiB by default; this leaves room for a cluster that raised that limit.
pub const MAX_MESSAGE: usize = 16 << 20;

/// `runtime.Unknown.raw` and `PodList.items`; `PodList.metadata` is field 1.
const RAW: u64 = 2;
const LIST_META: u64 = 1;
const ITEMS: u64 = 2;

/// Reads a protobuf Pod list pushed to it in pieces ([`push`](Self::push)), handing out
/// each Pod once whole ([`next_pod`](Self::next_pod)), then the list's metadata
/// ([`finish`](Self::finish)).
#[derive(Debug)]
pub struct PodListReader {
    /// Bytes pushed and not yet consumed: never more than one field's header and one
    /// message of at most [`MAX_MESSAGE`], plus the last piece pushed.
    pending: BytesMut,
    place: Place,
    meta: Option<proto::ListMeta>,
    /// Whether the envelope's `raw` was entered: a body without it holds no list.
    listed: bool,
    /// Bytes pushed in all.
    read: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Before the `k8s\0` prefix.
    Prefix,
    /// Among the envelope's fields.
    Envelope,
    /// Inside the envelope's `raw`, with this many of its bytes still to come.
    List { left: usize },
    /// Inside a field that is not read: `skip` bytes to pass, then back inside the list
    /// (with `left` of it after them) or, for `None`, among the envelope's fields.
    Skip { skip: usize, then: Option<usize> },
}

/// What a varint, a key or a whole field needs: more bytes, or it is complete.
enum Have<T> {
    More,
    Got(T),
}

/// The end of a list: its resourceVersion, continue token and `remainingItemCount`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ListEnd {
    pub resource_version: Option<String>,
    pub continue_token: Option<String>,
    pub remaining: Option<i64>,
}

impl Default for PodListReader {
    fn default() -> Self {
        Self::new()
    }
}

impl PodListReader {
    #[must_use]
    pub fn new() -> Self {
        Self {
            pending: BytesMut::new(),
            place: Place::Prefix,
            meta: None,
            listed: false,
            read: 0,
        }
    }

    /// The bytes pushed so far.
    #[must_use]
    pub fn bytes_read(&self) -> usize {
        self.read
    }

    /// Adds the next piece of the body. Call it when [`next_pod`](Self::next_pod) says it
    /// needs more.
    pub fn push(&mut self, piece: &[u8]) {
        self.read += piece.len();
        self.pending.extend_from_slice(piece);
    }

    /// The next whole Pod, or `None` when the bytes pushed so far hold no more.
    ///
    /// # Errors
    /// The body is not a protobuf Pod list, or a Pod in it is larger than [`MAX_MESSAGE`].
    pub fn next_pod(&mut self) -> kube::Result<Option<WatchedPod>> {
        loop {
            let progressed = match self.place {
                Place::Prefix => self.prefix()?,
                Place::Envelope => self.envelope_field()?,
                Place::List { left: 0 } => {
                    self.place = Place::Envelope;
                    true
                }
                Place::List { left } => match self.list_field(left)? {
                    Have::Got(Some(pod)) => return Ok(Some(pod)),
                    Have::Got(None) => true,
                    Have::More => false,
                },
                Place::Skip { skip, then } => self.skip(skip, then),
            };
            if !progressed {
                return Ok(None);
            }
        }
    }

    /// The list's metadata, once the body has ended and every Pod was taken. (Its bytes
    /// read stay counted.)
    ///
    /// # Errors
    /// The body ended inside a field, or before the prefix.
    pub fn finish(&mut self) -> kube::Result<ListEnd> {
        if let Some(pod) = self.next_pod()? {
            let name = pod.metadata.name.unwrap_or_default();
            return Err(decode_error(format!(
                "Pod {name} was not taken from the reader"
            )));
        }
        // `next_pod` has moved out of a list with nothing left in it.
        let whole = self.listed && self.place == Place::Envelope && self.pending.is_empty();
        if !whole {
            return Err(decode_error(format!(
                "the body ended after {} bytes, before the whole list",
                self.read
            )));
        }
        let meta = self.meta.take().unwrap_or_default();
        Ok(ListEnd {
            resource_version: meta.resource_version.filter(|v| !v.is_empty()),
            continue_token: meta.continue_token.filter(|v| !v.is_empty()),
            remaining: meta.remaining_item_count,
        })
    }

    fn prefix(&mut self) -> kube::Result<bool> {
        let n = PROTOBUF_MAGIC.len().min(self.pending.len());
        if self.pending[..n] != PROTOBUF_MAGIC[..n] {
            return Err(decode_error(
                "the body does not start with the k8s protobuf prefix",
            ));
        }
        if n < PROTOBUF_MAGIC.len() {
            return Ok(false);
        }
        self.pending.advance(n);
        self.place = Place::Envelope;
        Ok(true)
    }

    /// One field of the envelope: `raw` is entered, every other field skipped.
    fn envelope_field(&mut self) -> kube::Result<bool> {
        let Have::Got((header, field, wire)) = key(&self.pending)? else {
            return Ok(false);
        };
        if (field, wire) != (RAW, WireType::LengthDelimited) {
            return self.skip_field(header, wire, None);
        }
        let Have::Got((len_bytes, len)) = varint(&self.pending[header..])? else {
            return Ok(false);
        };
        let len = usize::try_from(len)
            .map_err(|_| decode_error("the list's length does not fit in memory"))?;
        if self.listed {
            return Err(decode_error("a second list in the envelope"));
        }
        self.pending.advance(header + len_bytes);
        self.place = Place::List { left: len };
        self.listed = true;
        Ok(true)
    }

    /// One field of the list, which has `left` bytes to come: a Pod (handed out), the
    /// list's metadata (kept), or a field skipped.
    fn list_field(&mut self, left: usize) -> kube::Result<Have<Option<WatchedPod>>> {
        let window = &self.pending[..left.min(self.pending.len())];
        let Have::Got((header, field, wire)) = key(window)? else {
            return Ok(Have::More);
        };
        let is_message = wire == WireType::LengthDelimited && matches!(field, LIST_META | ITEMS);
        if !is_message {
            return Ok(if self.skip_field(header, wire, Some(left))? {
                Have::Got(None)
            } else {
                Have::More
            });
        }
        let Have::Got((len_bytes, len)) = varint(&window[header..])? else {
            return Ok(Have::More);
        };
        let start = header + len_bytes;
        let what = if field == ITEMS {
            "a Pod"
        } else {
            "the list's metadata"
        };
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= left - start)
            .ok_or_else(|| decode_error(format!("{what} runs past the end of the list")))?;
        if len > MAX_MESSAGE {
            return Err(decode_error(format!(
                "{what} of {len} bytes, more than the {} MiB the operator reads",
                MAX_MESSAGE >> 20
            )));
        }
        if self.pending.len() < start + len {
            // Room for the whole message now, rather than a regrowth per piece pushed.
            self.pending.reserve(start + len - self.pending.len());
            return Ok(Have::More);
        }
        self.pending.advance(start);
        let message = self.pending.split_to(len).freeze();
        self.place = Place::List {
            left: left - start - len,
        };
        if field == LIST_META {
            self.meta = Some(proto::ListMeta::decode(message).map_err(decode_error)?);
            return Ok(Have::Got(None));
        }
        let pod = proto::Pod::decode(message).map_err(decode_error)?;
        Ok(Have::Got(Some(pod.into())))
    }

    /// Passes a field that is not read, whose key is `header` bytes: a varint or fixed
    /// value once whole, a length-delimited one as its bytes arrive. `list` is what is left
    /// of the list it is in, if it is in the list.
    fn skip_field(
        &mut self,
        header: usize,
        wire: WireType,
        list: Option<usize>,
    ) -> kube::Result<bool> {
        let bound = list.unwrap_or(usize::MAX).min(self.pending.len());
        let rest = &self.pending[header..bound];
        let (value_header, skip) = match wire {
            WireType::Varint => match varint(rest)? {
                Have::Got((n, _)) => (n, 0),
                Have::More => return Ok(false),
            },
            WireType::SixtyFourBit => (0, 8),
            WireType::ThirtyTwoBit => (0, 4),
            WireType::LengthDelimited => match varint(rest)? {
                Have::Got((n, len)) => (
                    n,
                    usize::try_from(len)
                        .map_err(|_| decode_error("a field's length does not fit in memory"))?,
                ),
                Have::More => return Ok(false),
            },
            WireType::StartGroup | WireType::EndGroup => {
                return Err(decode_error("a group field, which Kubernetes never sends"));
            }
        };
        let consumed = header + value_header;
        let then = match list {
            Some(left) => Some(
                left.checked_sub(consumed)
                    .and_then(|l| l.checked_sub(skip))
                    .ok_or_else(|| decode_error("a field runs past the end of the list"))?,
            ),
            None => None,
        };
        self.pending.advance(consumed);
        self.place = Place::Skip { skip, then };
        Ok(true)
    }

    /// Passes what of a skipped field has arrived; true once it is all passed.
    fn skip(&mut self, skip: usize, then: Option<usize>) -> bool {
        let n = skip.min(self.pending.len());
        self.pending.advance(n);
        if n == skip {
            self.place = then.map_or(Place::Envelope, |left| Place::List { left });
            return true;
        }
        self.place = Place::Skip {
            skip: skip - n,
            then,
        };
        false
    }
}

/// A varint at the start of `buf`: its length in bytes and its value, or `More` if `buf`
/// ends inside it.
fn varint(buf: &[u8]) -> kube::Result<Have<(usize, u64)>> {
    // A varint is at most ten bytes; its last byte is the first without the high bit.
    let Some(end) = buf.iter().take(10).position(|b| b & 0x80 == 0) else {
        return if buf.len() < 10 {
            Ok(Have::More)
        } else {
            Err(decode_error("a varint longer than ten bytes"))
        };
    };
    let value = decode_varint(&mut &buf[..=end]).map_err(decode_error)?;
    Ok(Have::Got((end + 1, value)))
}

/// A field's key at the start of `buf`: its length, field number and wire type.
fn key(buf: &[u8]) -> kube::Result<Have<(usize, u64, WireType)>> {
    let Have::Got((len, key)) = varint(buf)? else {
        return Ok(Have::More);
    };
    let wire = WireType::try_from(key & 7).map_err(decode_error)?;
    let field = key >> 3;
    if field == 0 {
        return Err(decode_error("a field numbered 0"));
    }
    Ok(Have::Got((len, field, wire)))
}

/// One LIST response of Pods, decoded.
#[derive(Debug)]
pub struct PodPage {
    /// The Pods, as the index reads them.
    pub items: Vec<WatchedPod>,
    /// Its resourceVersion (the watch resumes from it), continue token (none on the last
    /// page) and `remainingItemCount`.
    pub end: ListEnd,
    /// Whether the page was protobuf.
    pub protobuf: bool,
    /// The size of the response body.
    pub bytes: usize,
}

/// One LIST response body of Pods, in protobuf (`protobuf`, through [`PodListReader`]) or
/// JSON, decoded whole. The fuzz target `pod_list` feeds it arbitrary bytes.
///
/// # Errors
/// A body that is not a Pod list in the encoding given.
pub fn decode_pod_list(body: Bytes, protobuf: bool) -> kube::Result<PodPage> {
    let (items, end) = if protobuf {
        let mut reader = PodListReader::new();
        reader.push(&body);
        let mut items = Vec::new();
        while let Some(pod) = reader.next_pod()? {
            items.push(pod);
        }
        (items, reader.finish()?)
    } else {
        let list: ObjectList<WatchedPod> =
            serde_json::from_slice(&body).map_err(kube::Error::SerdeError)?;
        let end = ListEnd {
            resource_version: list.metadata.resource_version.filter(|v| !v.is_empty()),
            continue_token: list.metadata.continue_.filter(|v| !v.is_empty()),
            remaining: list.metadata.remaining_item_count,
        };
        (list.items, end)
    };
    Ok(PodPage {
        items,
        end,
        protobuf,
        bytes: body.len(),
    })
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
pub(super) fn error_status(status: http::StatusCode, protobuf: bool, body: &Bytes) -> Status {
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

    // `k8s.io.api.core.v1.PodList` (field 1 `metadata`, field 2 `items`) is walked by
    // `PodListReader`, not decoded as one message.

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
    use bytes::BufMut;
    use prost::Message;
    use prost::encoding::{WireType, encode_key, encode_varint};

    use super::{ListEnd, MAX_MESSAGE, PodListReader, proto};
    use sigil_index::WatchedPod;

    /// A page from a real apiserver (the fuzz target's seed), with its prefix.
    fn real_page() -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/seeds/pod_list/protobuf-page");
        let bytes = std::fs::read(path).unwrap();
        [b"k8s\0".as_slice(), &bytes[1..]].concat()
    }

    fn names(pods: &[WatchedPod]) -> Vec<String> {
        pods.iter()
            .map(|p| format!("{:?}", (&p.metadata, &p.spec, &p.status)))
            .collect()
    }

    /// Feeds `pieces` in order, taking Pods whenever the reader has them.
    fn read(pieces: &[&[u8]]) -> kube::Result<(Vec<WatchedPod>, ListEnd)> {
        let mut reader = PodListReader::new();
        let mut pods = Vec::new();
        for piece in pieces {
            reader.push(piece);
            while let Some(pod) = reader.next_pod()? {
                pods.push(pod);
            }
        }
        Ok((pods, reader.finish()?))
    }

    #[test]
    fn a_page_split_anywhere_reads_as_the_whole() {
        let body = real_page();
        let (pods, end) = read(&[&body]).unwrap();
        assert_eq!(pods.len(), 2);
        assert!(end.resource_version.is_some() && end.continue_token.is_some());
        let whole = names(&pods);
        for at in 0..=body.len() {
            let (a, b) = body.split_at(at);
            let (p, e) = read(&[a, b]).unwrap();
            assert_eq!((names(&p), &e), (whole.clone(), &end), "split at {at}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let (p, e) = read(&bytes).unwrap();
        assert_eq!((names(&p), e), (whole, end));
    }

    /// A body cut short is an error, unless what is cut is after the whole list.
    #[test]
    fn a_body_cut_short_is_never_a_shorter_list() {
        let body = real_page();
        let full = read(&[&body]).unwrap();
        for at in 0..body.len() {
            if let Ok((pods, end)) = read(&[&body[..at]]) {
                assert_eq!(
                    (names(&pods), end),
                    (names(&full.0), full.1.clone()),
                    "cut at {at} read as a different list"
                );
            }
        }
        assert!(read(&[b"k8s"]).is_err());
        assert!(read(&[b"{\"kind\":\"PodList\"}"]).is_err());
    }

    /// The envelope and list around `list_fields`, with extra fields the reader skips.
    fn body(list_fields: &[u8], skipped: usize) -> Vec<u8> {
        let mut out = b"k8s\0".to_vec();
        // `typeMeta`, a field the reader skips, made large.
        encode_key(1, WireType::LengthDelimited, &mut out);
        encode_varint(skipped as u64, &mut out);
        out.put_bytes(b'x', skipped);
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(list_fields.len() as u64, &mut out);
        out.extend_from_slice(list_fields);
        // `contentType`, after the list.
        encode_key(4, WireType::LengthDelimited, &mut out);
        encode_varint(0, &mut out);
        out
    }

    fn pod(name: &str) -> Vec<u8> {
        let pod = proto::Pod {
            metadata: Some(proto::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            }),
            spec: None,
            status: None,
        };
        let mut out = Vec::new();
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(pod.encoded_len() as u64, &mut out);
        pod.encode(&mut out).unwrap();
        out
    }

    #[test]
    fn fields_it_does_not_read_are_skipped_as_they_stream_past() {
        let mut list = pod("a");
        // A field of the list the reader does not read, large, in three wire types.
        encode_key(9, WireType::LengthDelimited, &mut list);
        encode_varint(100_000, &mut list);
        list.put_bytes(0, 100_000);
        encode_key(10, WireType::Varint, &mut list);
        encode_varint(u64::MAX, &mut list);
        encode_key(11, WireType::SixtyFourBit, &mut list);
        list.put_u64(7);
        list.extend(pod("b"));
        let meta = proto::ListMeta {
            resource_version: Some("42".into()),
            ..Default::default()
        };
        encode_key(1, WireType::LengthDelimited, &mut list);
        encode_varint(meta.encoded_len() as u64, &mut list);
        meta.encode(&mut list).unwrap();
        let body = body(&list, 300_000);
        for piece in [1, 7, 4096, body.len()] {
            let mut reader = PodListReader::new();
            let mut pods = Vec::new();
            for chunk in body.chunks(piece) {
                reader.push(chunk);
                while let Some(pod) = reader.next_pod().unwrap() {
                    pods.push(pod.metadata.name.unwrap());
                }
                // Skipped bytes are dropped as they come, not held.
                assert!(
                    reader.pending.len() <= piece + 64,
                    "{}",
                    reader.pending.len()
                );
            }
            assert_eq!(pods, ["a", "b"]);
            assert_eq!(
                reader.finish().unwrap().resource_version.as_deref(),
                Some("42")
            );
        }
    }

    #[test]
    fn a_pod_larger_than_the_bound_fails_before_it_is_buffered() {
        let mut list = Vec::new();
        encode_key(2, WireType::LengthDelimited, &mut list);
        encode_varint((MAX_MESSAGE + 1) as u64, &mut list);
        // Only the header is pushed: the list says it holds the Pod, the Pod's bytes never come.
        let mut out = b"k8s\0".to_vec();
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint((MAX_MESSAGE * 2) as u64, &mut out);
        out.extend(list);
        let mut reader = PodListReader::new();
        reader.push(&out);
        let err = reader.next_pod().unwrap_err().to_string();
        assert!(
            err.contains("a Pod of 16777217 bytes, more than the 16 MiB"),
            "{err}"
        );
    }

    #[test]
    fn a_pod_that_runs_past_its_list_is_refused() {
        let mut list = pod("a");
        let cut = list.len() - 3;
        list.truncate(cut);
        // The list's length says it ends 3 bytes before its last Pod does.
        let mut out = body(&list, 0);
        out.extend_from_slice(&[0, 0, 0]);
        let mut reader = PodListReader::new();
        reader.push(&out);
        let err = reader.next_pod().unwrap_err().to_string();
        assert!(err.contains("a Pod runs past the end of the list"), "{err}");
    }

    #[test]
    fn groups_and_field_zero_are_refused() {
        for key in [(1 << 3) | 3, 2] {
            let mut out = b"k8s\0".to_vec();
            encode_varint(key, &mut out);
            out.push(0);
            let mut reader = PodListReader::new();
            reader.push(&out);
            assert!(reader.next_pod().is_err(), "key {key}");
        }
    }
}
