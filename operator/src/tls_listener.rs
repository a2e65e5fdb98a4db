//! The operator's TLS listeners (Node API, bundle endpoint): accept TCP, run each TLS
//! handshake in its own task with a deadline (a slow or silent client never blocks the
//! accept loop), and hand finished connections on as a stream. For the Node API, client
//! certificates are optional at the TLS layer (a new agent has none yet); the service
//! requires one on every RPC except AttestNode, and reads the verified chain through
//! `Request::peer_certs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Longest a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in flight at once.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// A stream of established TLS connections for `tonic::transport::Server::serve_with_incoming`.
pub fn incoming(
    what: &'static str,
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    cancel: CancellationToken,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
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
            let _ = tcp.set_nodelay(true);
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::warn!(listener = what, %peer, "too many TLS handshakes in flight; dropping connection");
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(listener = what, %peer, error = %e, "TLS handshake refused")
                    }
                    Err(_) => tracing::info!(listener = what, %peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
