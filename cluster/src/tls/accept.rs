//! The server side of the internal API's mutual TLS: accepted TCP connections go through the
//! handshake with the certificates current at that moment ([`super::InternalTls`] follows its
//! files), and those that complete it are handed to tonic (`serve_with_incoming*`).
//!
//! Handshakes run concurrently, each within [`HANDSHAKE_TIMEOUT`], at most
//! [`MAX_HANDSHAKES`] at once, so idle or slow sockets cannot hold the port for anyone else.
//! A failed handshake (no certificate, another CA's) is logged and dropped; it never ends the
//! server.

use super::InternalTls;
use futures_util::Stream;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; more connections wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 64;

impl InternalTls {
    /// The TLS connections accepted on `listener`, for `serve_with_incoming`. The accepting task
    /// ends when the stream is dropped (the server shut down).
    pub fn incoming(self: &Arc<Self>, listener: TcpListener) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static {
        let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
        let acceptor = TlsAcceptor::from(self.server_config());
        tokio::spawn(accept_loop(listener, acceptor, tx));
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// Accepts until the receiving side is gone; each connection's handshake is its own task.
async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, tx: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = tx.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors and the like: the listener itself is fine, so wait and retry.
                tracing::warn!(%error, "accepting a connection on the internal API failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send(Ok(tls)).await;
                }
                Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake on the internal API refused"),
                Err(_) => tracing::info!(%peer, "TLS handshake on the internal API timed out"),
            }
        });
    }
}
