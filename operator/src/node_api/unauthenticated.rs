//! What a caller without a client certificate may make the Node API read.
//!
//! Only AttestNode and AttestNodeTpm serve such callers (every other RPC refuses them), yet
//! tonic would first buffer their whole message, up to the 4 MiB agents may send.
//! [`UnauthenticatedLayer`] sits in front of the Node API service and, for each request on
//! a connection that presented no client certificate:
//! - refuses it at once when too many such requests are already in flight;
//! - reads each gRPC message's length prefix as the body arrives and refuses a message
//!   longer than [`super::limits::NodeApiLimits::max_unauthenticated_message`] before any of
//!   it is buffered (and a call whose messages add up to more than twice that).
//!
//! Every refusal is ResourceExhausted with the reason in its message, logged (without any
//! of the request's content) and counted in `sigil_node_api_denials_total`. Requests of
//! callers with a client certificate pass untouched.

use std::pin::Pin;
use std::sync::Arc;
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

#[derive(Debug)]
struct Shared {
    max_message: usize,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    metrics: NodeApiMetrics,
}

impl Shared {
    fn deny(
        &self,
        rpc: &str,
        reason: &str,
        peer: Option<std::net::SocketAddr>,
        status: Status,
    ) -> Status {
        self.metrics.deny(rpc, reason);
        tracing::warn!(
            rpc,
            reason,
            peer = ?peer,
            message = status.message(),
            "node API request without a client certificate refused"
        );
        status
    }
}

/// The layer (see the module documentation).
#[derive(Debug, Clone)]
pub struct UnauthenticatedLayer {
    shared: Arc<Shared>,
}

impl UnauthenticatedLayer {
    /// At most `max_in_flight` requests without a client certificate at once, each message
    /// at most `max_message` bytes; refusals counted in `metrics`.
    pub fn new(max_message: usize, max_in_flight: usize, metrics: NodeApiMetrics) -> Self {
        Self {
            shared: Arc::new(Shared {
                max_message,
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
                max_in_flight,
                metrics,
            }),
        }
    }
}

impl<S> tower::Layer<S> for UnauthenticatedLayer {
    type Service = Unauthenticated<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Unauthenticated {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`UnauthenticatedLayer`] wraps around the Node API.
#[derive(Debug, Clone)]
pub struct Unauthenticated<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> tower::Service<http::Request<Body>> for Unauthenticated<S>
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
        if authenticated {
            return Either::Left(self.inner.call(req));
        }
        let peer = info.and_then(|i| i.get_ref().remote_addr());
        let rpc = rpc_of(req.uri().path());
        let Ok(permit) = self.shared.in_flight.clone().try_acquire_owned() else {
            let status = self.shared.deny(
                rpc,
                "unauthenticated_requests_in_flight",
                peer,
                Status::resource_exhausted(format!(
                    "{} requests without a client certificate are in flight already; retry with backoff",
                    self.shared.max_in_flight
                )),
            );
            return Either::Right(ready_future(Ok(status.into_http())));
        };
        let shared = self.shared.clone();
        let req = req.map(|inner| {
            Body::new(CheckedBody {
                inner,
                framing: Framing::default(),
                shared,
                rpc,
                peer,
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

/// A request body held to the limits as it arrives; holds its in-flight slot until tonic
/// drops it.
struct CheckedBody {
    inner: Body,
    framing: Framing,
    shared: Arc<Shared>,
    rpc: &'static str,
    peer: Option<std::net::SocketAddr>,
    failed: bool,
    _permit: OwnedSemaphorePermit,
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
            && let Err(why) = this.framing.follow(data, this.shared.max_message)
        {
            this.failed = true;
            let status = this.shared.deny(
                this.rpc,
                "message_too_large",
                this.peer,
                Status::resource_exhausted(why),
            );
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
    fn rpc_labels_are_only_known_names() {
        assert_eq!(rpc_of("/sigil.node.v1.Node/AttestNode"), "AttestNode");
        assert_eq!(rpc_of("/x/../../evil"), "unknown");
    }
}
