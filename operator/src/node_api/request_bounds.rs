//! What a caller may make the Node API hold while it reads requests.
//!
//! tonic buffers a request's whole message (up to the 4 MiB agents may send) before the
//! service sees it, and a caller that sends most of a message and stalls keeps that
//! buffer until the RPC deadline. [`RequestBoundsLayer`] sits in front of the Node API
//! service and follows every request body as it arrives:
//! - request bytes held at once are bounded per source address and in total
//!   ([`RequestBounds`]), so neither a compromised agent nor anyone else can push the
//!   operator out of its memory limit; a body is charged as its bytes arrive and gives them
//!   back when tonic drops it (once its message is decoded);
//! - for a connection that presented no client certificate (only AttestNode and
//!   AttestNodeTpm serve such callers; every other RPC refuses them): such requests in
//!   flight are capped, and each gRPC message's length prefix is checked as it arrives, so
//!   a message longer than the bound is refused before any of it is buffered (and a call
//!   whose messages add up to more than twice that).
//!
//! Every refusal is ResourceExhausted with the reason in its message, logged (without any
//! of the request's content) and counted in `sigil_node_api_denials_total`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use futures::future::{Either, Ready, ready as ready_future};
use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::metrics::NodeApiMetrics;

/// The Node API's RPC names, for metric labels (a path is the caller's to choose).
const RPCS: [&str; 6] = [
    "AttestNode",
    "AttestNodeTpm",
    "RenewAgent",
    "SyncEntries",
    "SignX509Svids",
    "MintJwtSvid",
];

/// The RPC a path names, or `unknown`.
fn rpc_of(path: &str) -> &'static str {
    let method = path.rsplit('/').next().unwrap_or_default();
    RPCS.into_iter().find(|r| *r == method).unwrap_or("unknown")
}

/// The bounds ([`super::limits::NodeApiLimits`] holds their defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBounds {
    /// Request bytes held at once for one source address.
    pub max_bytes_per_address: usize,
    /// Request bytes held at once in total.
    pub max_bytes: usize,
    /// Largest message from a caller without a client certificate.
    pub max_unauthenticated_message: usize,
    /// Requests without a client certificate in flight at once.
    pub max_unauthenticated_requests: usize,
}

/// Bytes held, by source address and in total.
type Held = (HashMap<Option<IpAddr>, usize>, usize);

#[derive(Debug)]
struct Shared {
    bounds: RequestBounds,
    in_flight: Arc<Semaphore>,
    held: Mutex<Held>,
    metrics: NodeApiMetrics,
}

impl Shared {
    fn deny(&self, rpc: &str, reason: &str, peer: Option<SocketAddr>, status: Status) -> Status {
        self.metrics.deny(rpc, reason);
        tracing::warn!(
            rpc,
            reason,
            peer = ?peer,
            message = status.message(),
            "node API request refused while it was read"
        );
        status
    }

    /// Charges `n` more bytes to `address`, or says which bound that would break.
    fn hold(&self, address: Option<IpAddr>, n: usize) -> Result<(), (&'static str, String)> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (by_address, total) = &mut *held;
        let mine = by_address.get(&address).copied().unwrap_or(0);
        let b = &self.bounds;
        if mine + n > b.max_bytes_per_address {
            return Err((
                "request_bytes_per_address",
                format!(
                    "requests from this address hold {mine} bytes in transit already (at most {}); retry with backoff",
                    b.max_bytes_per_address
                ),
            ));
        }
        if *total + n > b.max_bytes {
            return Err((
                "request_bytes_total",
                format!(
                    "this operator replica holds {} bytes of requests in transit already (at most {}); retry with backoff",
                    *total, b.max_bytes
                ),
            ));
        }
        *by_address.entry(address).or_insert(0) += n;
        *total += n;
        Ok(())
    }

    fn release(&self, address: Option<IpAddr>, n: usize) {
        if n == 0 {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (by_address, total) = &mut *held;
        *total = total.saturating_sub(n);
        if let Some(mine) = by_address.get_mut(&address) {
            *mine = mine.saturating_sub(n);
            if *mine == 0 {
                by_address.remove(&address);
            }
        }
    }
}

/// The layer (see the module documentation).
#[derive(Debug, Clone)]
pub struct RequestBoundsLayer {
    shared: Arc<Shared>,
}

impl RequestBoundsLayer {
    /// Requests held to `bounds`; refusals counted in `metrics`.
    pub fn new(bounds: RequestBounds, metrics: NodeApiMetrics) -> Self {
        Self {
            shared: Arc::new(Shared {
                bounds,
                in_flight: Arc::new(Semaphore::new(bounds.max_unauthenticated_requests)),
                held: Mutex::default(),
                metrics,
            }),
        }
    }
}

impl<S> tower::Layer<S> for RequestBoundsLayer {
    type Service = Bounded<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Bounded {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`RequestBoundsLayer`] wraps around the Node API.
#[derive(Debug, Clone)]
pub struct Bounded<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> tower::Service<http::Request<Body>> for Bounded<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<http::Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
        let authenticated = info
            .and_then(|i| i.peer_certs())
            .is_some_and(|c| !c.is_empty());
        let peer = info.and_then(|i| i.get_ref().remote_addr());
        let rpc = rpc_of(req.uri().path());
        let permit = if authenticated {
            None
        } else {
            match self.shared.in_flight.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let status = self.shared.deny(
                        rpc,
                        "unauthenticated_requests_in_flight",
                        peer,
                        Status::resource_exhausted(format!(
                            "{} requests without a client certificate are in flight already; retry with backoff",
                            self.shared.bounds.max_unauthenticated_requests
                        )),
                    );
                    return Either::Right(ready_future(Ok(status.into_http())));
                }
            }
        };
        let shared = self.shared.clone();
        let req = req.map(|inner| {
            Body::new(CheckedBody {
                inner,
                framing: (!authenticated).then(Framing::default),
                shared,
                rpc,
                peer,
                held: 0,
                failed: false,
                _permit: permit,
            })
        });
        Either::Left(self.inner.call(req))
    }
}

/// Where a body is in its gRPC framing (a 5-byte prefix, then that many bytes).
#[derive(Debug, Default)]
struct Framing {
    prefix: [u8; 5],
    prefix_len: usize,
    left_in_message: usize,
    total: usize,
}

impl Framing {
    /// Follows `data`; an error names the limit it broke.
    fn follow(&mut self, mut data: &[u8], max_message: usize) -> Result<(), String> {
        self.total = self.total.saturating_add(data.len());
        if self.total > 2 * max_message {
            return Err(format!(
                "a call without a client certificate may send at most {} bytes; present the agent's X509-SVID",
                2 * max_message
            ));
        }
        while !data.is_empty() {
            if self.left_in_message > 0 {
                let n = self.left_in_message.min(data.len());
                self.left_in_message -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == 5 {
                self.prefix_len = 0;
                let [_, a, b, c, d] = self.prefix;
                let len = u32::from_be_bytes([a, b, c, d]) as usize;
                if len > max_message {
                    return Err(format!(
                        "a message of {len} bytes is larger than the {max_message} bytes a caller without a client certificate may send; present the agent's X509-SVID"
                    ));
                }
                self.left_in_message = len;
            }
        }
        Ok(())
    }
}

/// A request body held to the bounds as it arrives; holds its bytes (and, without a
/// client certificate, its in-flight slot) until tonic drops it.
struct CheckedBody {
    inner: Body,
    /// The gRPC framing, followed for callers without a client certificate.
    framing: Option<Framing>,
    shared: Arc<Shared>,
    rpc: &'static str,
    peer: Option<SocketAddr>,
    /// Bytes charged so far.
    held: usize,
    failed: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

impl CheckedBody {
    /// Charges and checks one data frame; an error is the refusal to send.
    fn check(&mut self, data: &[u8]) -> Result<(), Status> {
        let shared = self.shared.clone();
        if let Some(framing) = &mut self.framing
            && let Err(why) = framing.follow(data, shared.bounds.max_unauthenticated_message)
        {
            return Err(shared.deny(
                self.rpc,
                "message_too_large",
                self.peer,
                Status::resource_exhausted(why),
            ));
        }
        match shared.hold(self.peer.map(|p| p.ip()), data.len()) {
            Ok(()) => {
                self.held += data.len();
                Ok(())
            }
            Err((reason, why)) => {
                Err(shared.deny(self.rpc, reason, self.peer, Status::resource_exhausted(why)))
            }
        }
    }
}

impl Drop for CheckedBody {
    fn drop(&mut self) {
        self.shared.release(self.peer.map(|p| p.ip()), self.held);
    }
}

impl HttpBody for CheckedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
            && let Err(status) = this.check(data)
        {
            this.failed = true;
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    #[test]
    fn a_declared_length_over_the_limit_is_refused_at_its_prefix() {
        let mut f = Framing::default();
        // Only the prefix has arrived: refused before any of the message is read.
        let e = f.follow(&[0, 0, 0x40, 0, 0], 32 * 1024).unwrap_err();
        assert!(e.contains("4194304 bytes"), "{e}");
        assert!(e.contains("client certificate"), "{e}");
    }

    #[test]
    fn messages_within_the_limit_pass_in_any_split() {
        let body: Vec<u8> = [message(100), message(32 * 1024), message(0)].concat();
        for split in [1, 2, 5, 7, 4096] {
            let mut f = Framing::default();
            for chunk in body.chunks(split) {
                f.follow(chunk, 32 * 1024).unwrap();
            }
            assert_eq!(f.left_in_message, 0);
            assert_eq!(f.prefix_len, 0);
        }
    }

    #[test]
    fn a_prefix_split_across_frames_is_still_checked() {
        let mut f = Framing::default();
        f.follow(&[0, 0, 1], 1024).unwrap();
        assert!(f.follow(&[0, 0], 1024).is_err(), "65536 > 1024");
    }

    #[test]
    fn many_small_messages_add_up_to_the_call_limit() {
        let mut f = Framing::default();
        let one = message(1000);
        let mut refused = false;
        for _ in 0..100 {
            if f.follow(&one, 1024).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
    }

    #[test]
    fn request_bytes_are_bounded_per_address_and_in_total_and_given_back() {
        let shared = Shared {
            bounds: RequestBounds {
                max_bytes_per_address: 100,
                max_bytes: 150,
                max_unauthenticated_message: 10,
                max_unauthenticated_requests: 1,
            },
            in_flight: Arc::new(Semaphore::new(1)),
            held: Mutex::default(),
            metrics: NodeApiMetrics::default(),
        };
        let a = Some("10.0.0.1".parse().unwrap());
        let b = Some("10.0.0.2".parse().unwrap());
        shared.hold(a, 100).unwrap();
        assert_eq!(
            shared.hold(a, 1).unwrap_err().0,
            "request_bytes_per_address"
        );
        shared.hold(b, 50).unwrap();
        assert_eq!(shared.hold(b, 1).unwrap_err().0, "request_bytes_total");
        shared.release(a, 100);
        shared.hold(b, 50).unwrap();
        assert_eq!(shared.held.lock().unwrap().1, 100);
        assert!(!shared.held.lock().unwrap().0.contains_key(&a));
    }

    #[test]
    fn rpc_labels_are_only_known_names() {
        assert_eq!(rpc_of("/sigil.node.v1.Node/AttestNode"), "AttestNode");
        assert_eq!(rpc_of("/x/../../evil"), "unknown");
    }
}
