//! The operator's TLS listeners (Node API, bundle endpoint): accept TCP, run each TLS
//! handshake in its own task with a deadline (a slow or silent client never blocks the
//! accept loop), and hand finished connections on as a stream. For the Node API, client
//! certificates are optional at the TLS layer (a new agent has none yet); the service
//! requires one on every RPC except AttestNode, and reads the verified chain through
//! `Request::peer_certs`.
//!
//! This module also owns the connection caps ([`ConnectionLimits`]): connections open at
//! once in total and from one source address (handshakes included), and, once the
//! handshake shows the client presented no certificate, connections without one. A
//! connection over a cap is closed at once; each refusal is counted by reason in
//! [`ListenerMetrics`] and logged (at most once a second per listener and reason, with the
//! number left unlogged, so a flood cannot flood the logs too).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Longest a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in flight at once.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// How many connections a listener keeps open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// In total (handshakes included).
    pub max_connections: usize,
    /// From one source address (handshakes included).
    pub max_per_address: usize,
    /// Whose client presented no certificate.
    pub max_unauthenticated: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 2048,
            max_per_address: 64,
            max_unauthenticated: 2048,
        }
    }
}

/// Labels of a refused connection.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// Why.
    pub reason: String,
}

/// A listener's connection metrics.
#[derive(Debug, Clone, Default)]
pub struct ListenerMetrics {
    /// Connections open (handshakes included).
    pub open: Gauge,
    /// Connections closed at once because a cap was reached, by reason.
    pub refused: Family<RefusalLabels, Counter>,
    /// TLS handshakes that failed, by reason ([`handshake_failure`]).
    pub handshakes_failed: Family<RefusalLabels, Counter>,
}

impl ListenerMetrics {
    /// Registers `<prefix>_open_connections`, `<prefix>_connections_refused` and
    /// `<prefix>_tls_handshakes_failed`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "open_connections",
            "Connections open (TLS handshakes included)",
            self.open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at accept because a connection cap was reached, by reason",
            self.refused.clone(),
        );
        registry.register(
            "tls_handshakes_failed",
            "TLS handshakes that failed, by reason (bad_client_certificate, tls_error, io_error, timeout)",
            self.handshakes_failed.clone(),
        );
    }

    fn handshake_failed(&self, reason: &str) {
        self.handshakes_failed
            .get_or_create(&RefusalLabels {
                reason: reason.into(),
            })
            .inc();
    }
}

/// The reason label of a failed TLS handshake: a client certificate the verifier refused
/// (an unknown CA, an expired or a workload SVID) is `bad_client_certificate`; any other
/// TLS alert or protocol error `tls_error`; the connection failing under it `io_error`.
pub fn handshake_failure(e: &std::io::Error) -> &'static str {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(_)) => "bad_client_certificate",
        Some(_) => "tls_error",
        None => "io_error",
    }
}

/// Logs a refusal at most once a second per reason.
#[derive(Debug, Default)]
struct Throttle(Mutex<HashMap<&'static str, (Instant, u64)>>);

impl Throttle {
    fn refuse(
        &self,
        what: &'static str,
        reason: &'static str,
        peer: SocketAddr,
        metrics: &ListenerMetrics,
        detail: String,
    ) {
        metrics
            .refused
            .get_or_create(&RefusalLabels {
                reason: reason.into(),
            })
            .inc();
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (last, unlogged) = map
            .entry(reason)
            .or_insert((now - Duration::from_secs(2), 0));
        if now.duration_since(*last) >= Duration::from_secs(1) {
            tracing::warn!(listener = what, reason, %peer, unlogged = *unlogged, "{detail}; connection closed");
            *last = now;
            *unlogged = 0;
        } else {
            *unlogged += 1;
        }
    }
}

/// The counts every connection of one listener shares.
#[derive(Debug)]
struct Caps {
    limits: ConnectionLimits,
    total: Arc<Semaphore>,
    unauthenticated: Arc<Semaphore>,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    metrics: ListenerMetrics,
    throttle: Throttle,
}

/// One connection's place under the caps, given back when the connection closes.
#[derive(Debug)]
struct Slot {
    caps: Arc<Caps>,
    address: IpAddr,
    _total: OwnedSemaphorePermit,
    _unauthenticated: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.caps.metrics.open.dec();
        let mut map = self
            .caps
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.address);
            }
        }
    }
}

impl Caps {
    /// A slot for a new connection from `peer`, or why not.
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Slot, (&'static str, String)> {
        let total = self.total.clone().try_acquire_owned().map_err(|_| {
            (
                "too_many_connections",
                format!(
                    "{} connections are open already (the listener's cap)",
                    self.limits.max_connections
                ),
            )
        })?;
        let address = peer.ip();
        {
            let mut map = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
            let n = map.entry(address).or_insert(0);
            if *n >= self.limits.max_per_address {
                return Err((
                    "too_many_connections_from_address",
                    format!(
                        "{address} has {} connections open already (the per-address cap)",
                        self.limits.max_per_address
                    ),
                ));
            }
            *n += 1;
        }
        self.metrics.open.inc();
        Ok(Slot {
            caps: self.clone(),
            address,
            _total: total,
            _unauthenticated: None,
        })
    }
}

/// An established connection holding its place under the caps until it closes.
#[derive(Debug)]
pub struct CappedConnection<S> {
    io: S,
    _slot: Slot,
}

impl<S> CappedConnection<S> {
    /// The connection.
    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CappedConnection<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CappedConnection<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for CappedConnection<TlsStream<TcpStream>> {
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// A stream of established TLS connections for `tonic::transport::Server::serve_with_incoming`,
/// under the default [`ConnectionLimits`] (for listeners whose caps are not configured).
pub fn incoming(
    what: &'static str,
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    cancel: CancellationToken,
) -> ReceiverStream<Result<CappedConnection<TlsStream<TcpStream>>, std::io::Error>> {
    incoming_capped(
        what,
        listener,
        config,
        ConnectionLimits::default(),
        ListenerMetrics::default(),
        cancel,
    )
}

/// As [`incoming`], under `limits`, counting in `metrics`.
pub fn incoming_capped(
    what: &'static str,
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    limits: ConnectionLimits,
    metrics: ListenerMetrics,
    cancel: CancellationToken,
) -> ReceiverStream<Result<CappedConnection<TlsStream<TcpStream>>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    let caps = Arc::new(Caps {
        limits,
        total: Arc::new(Semaphore::new(limits.max_connections)),
        unauthenticated: Arc::new(Semaphore::new(limits.max_unauthenticated)),
        per_address: Mutex::default(),
        metrics,
        throttle: Throttle::default(),
    });
    tokio::spawn(async move {
        loop {
            let (tcp, peer): (TcpStream, SocketAddr) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(listener = what, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let mut slot = match caps.admit(peer) {
                Ok(s) => s,
                Err((reason, detail)) => {
                    caps.throttle
                        .refuse(what, reason, peer, &caps.metrics, detail);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                caps.throttle.refuse(
                    what,
                    "too_many_handshakes",
                    peer,
                    &caps.metrics,
                    format!("{MAX_CONCURRENT_HANDSHAKES} TLS handshakes are in flight already"),
                );
                continue;
            };
            let (acceptor, tx, caps) = (acceptor.clone(), tx.clone(), caps.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let presented = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .is_some_and(|c| !c.is_empty());
                        if !presented {
                            match caps.unauthenticated.clone().try_acquire_owned() {
                                Ok(p) => slot._unauthenticated = Some(p),
                                Err(_) => {
                                    caps.throttle.refuse(
                                        what,
                                        "too_many_unauthenticated_connections",
                                        peer,
                                        &caps.metrics,
                                        format!(
                                            "{} connections without a client certificate are open already",
                                            caps.limits.max_unauthenticated
                                        ),
                                    );
                                    return;
                                }
                            }
                        }
                        let _ = tx
                            .send(Ok(CappedConnection {
                                io: tls,
                                _slot: slot,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        let reason = handshake_failure(&e);
                        caps.metrics.handshake_failed(reason);
                        tracing::info!(listener = what, %peer, reason, error = %e, "TLS handshake refused")
                    }
                    Err(_) => {
                        caps.metrics.handshake_failed("timeout");
                        tracing::info!(listener = what, %peer, "TLS handshake timed out")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn caps(limits: ConnectionLimits) -> Arc<Caps> {
        Arc::new(Caps {
            limits,
            total: Arc::new(Semaphore::new(limits.max_connections)),
            unauthenticated: Arc::new(Semaphore::new(limits.max_unauthenticated)),
            per_address: Mutex::default(),
            metrics: ListenerMetrics::default(),
            throttle: Throttle::default(),
        })
    }

    #[test]
    fn caps_per_address_and_in_total_and_give_slots_back() {
        let c = caps(ConnectionLimits {
            max_connections: 3,
            max_per_address: 2,
            max_unauthenticated: 3,
        });
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1000".parse().unwrap();
        let a1 = c.admit(a).unwrap();
        let _a2 = c.admit(a).unwrap();
        assert_eq!(
            c.admit(a).unwrap_err().0,
            "too_many_connections_from_address"
        );
        let _b1 = c.admit(b).unwrap();
        assert_eq!(c.admit(b).unwrap_err().0, "too_many_connections");
        assert_eq!(c.metrics.open.get(), 3);
        drop(a1);
        assert_eq!(c.metrics.open.get(), 2);
        let _a3 = c.admit(a).unwrap();
    }
}
