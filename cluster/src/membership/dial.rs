//! How the etcd client reaches etcd. The client's one HTTP/2 channel gets its connections from
//! [`Dialer`]: each new connection goes to the first endpoint that answers, starting one past
//! the last start (so a dead member is skipped on reconnect), and with TLS it uses the
//! certificates as they are at that moment ([`EtcdTls`] follows its files), so a renewed client
//! certificate applies from the next connection without a restart.

use crate::tls::EtcdTls;
use crate::{ClusterError, Result};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;
use tonic::transport::Uri;

/// etcd's client port, when an endpoint names none.
const DEFAULT_PORT: u16 = 2379;

/// One endpoint, as given and as dialled.
#[derive(Debug)]
struct Target {
    url: String,
    host: String,
    port: u16,
}

/// A connection to etcd: plain or TLS.
pub(super) type EtcdStream = TokioIo<Either<TcpStream, TlsStream<TcpStream>>>;

/// Makes the etcd channel's connections (a `tower::Service<Uri>`; the URI is ignored, the
/// endpoints are the dialler's own).
#[derive(Clone, Debug)]
pub(super) struct Dialer {
    targets: Arc<Vec<Target>>,
    next: Arc<AtomicUsize>,
    tls: Option<Arc<EtcdTls>>,
    /// Per endpoint tried.
    timeout: Duration,
}

impl Dialer {
    /// The dialler of `endpoints` (`http://host:port`, `https://host:port` or `host:port`).
    /// Errors name `etcd_endpoints`.
    pub(super) fn new(endpoints: &[String], tls: Option<Arc<EtcdTls>>, timeout: Duration) -> Result<Self> {
        let bad = |e: &str, why: &str| ClusterError::input("etcd_endpoints", format!("{e}: {why}"));
        let mut targets = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let uri: Uri = e.parse().map_err(|err| bad(e, &format!("not a URL ({err})")))?;
            let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| bad(e, "no host"))?;
            // An IPv6 literal comes bracketed; neither the socket address nor the TLS name wants them.
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            if tls.is_some() {
                ServerName::try_from(host.clone()).map_err(|err| bad(e, &format!("not a name TLS can check ({err})")))?;
            }
            targets.push(Target { url: e.clone(), host, port: uri.port_u16().unwrap_or(DEFAULT_PORT) });
        }
        if targets.is_empty() {
            return Err(ClusterError::input("etcd_endpoints", "no etcd endpoint given"));
        }
        Ok(Self { targets: Arc::new(targets), next: Arc::new(AtomicUsize::new(0)), tls, timeout })
    }

    /// The URL the channel is named after: the first endpoint, always `http://`, since tonic
    /// refuses an `https://` name unless it does the TLS itself (here the dialler does).
    pub(super) fn first_url(&self) -> String {
        let t = &self.targets[0];
        format!("http://{}:{}", if t.host.contains(':') { format!("[{}]", t.host) } else { t.host.clone() }, t.port)
    }

    /// A connection to the first endpoint that answers; the error lists every endpoint's.
    async fn dial(self) -> std::io::Result<EtcdStream> {
        let n = self.targets.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut errors = Vec::with_capacity(n);
        for k in 0..n {
            let target = &self.targets[(start + k) % n];
            match tokio::time::timeout(self.timeout, self.dial_one(target)).await {
                Ok(Ok(stream)) => return Ok(TokioIo::new(stream)),
                Ok(Err(e)) => errors.push(format!("{}: {e}", target.url)),
                Err(_) => errors.push(format!("{}: no connection within {:?}", target.url, self.timeout)),
            }
        }
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, errors.join("; ")))
    }

    async fn dial_one(&self, target: &Target) -> std::io::Result<Either<TcpStream, TlsStream<TcpStream>>> {
        let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.tls else { return Ok(Either::Left(tcp)) };
        let name = ServerName::try_from(target.host.clone()).map_err(std::io::Error::other)?;
        let connector = tokio_rustls::TlsConnector::from(tls.config());
        Ok(Either::Right(connector.connect(name, tcp).await?))
    }
}

impl tower_service::Service<Uri> for Dialer {
    type Response = EtcdStream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<EtcdStream>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        Box::pin(self.clone().dial())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_parsed_and_bad_ones_named() {
        let d = Dialer::new(&["http://10.0.0.1:2379".into(), "etcd-1:12379".into(), "http://[::1]".into()], None, Duration::from_secs(1)).unwrap();
        let t: Vec<_> = d.targets.iter().map(|t| (t.host.as_str(), t.port)).collect();
        assert_eq!(t, [("10.0.0.1", 2379), ("etcd-1", 12379), ("::1", 2379)]);
        assert_eq!(d.first_url(), "http://10.0.0.1:2379");
        let e = Dialer::new(&["http://".into()], None, Duration::from_secs(1)).unwrap_err().to_string();
        assert!(e.contains("etcd_endpoints") && e.contains("http://"), "{e}");
        assert!(Dialer::new(&[], None, Duration::from_secs(1)).unwrap_err().to_string().contains("no etcd endpoint"));
    }

    #[tokio::test]
    async fn a_dead_endpoint_is_skipped_and_every_failure_is_listed() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (live_port, dead_port) = (live.local_addr().unwrap().port(), dead.local_addr().unwrap().port());
        drop(dead);
        let endpoints = [format!("http://127.0.0.1:{dead_port}"), format!("http://127.0.0.1:{live_port}")];
        let d = Dialer::new(&endpoints, None, Duration::from_secs(2)).unwrap();
        for _ in 0..2 {
            // Whichever endpoint the rotation starts from, the live one is reached.
            let stream = d.clone().dial().await.unwrap();
            let Either::Left(tcp) = stream.inner() else { panic!("TLS without TLS settings") };
            assert_eq!(tcp.peer_addr().unwrap().port(), live_port);
        }
        drop(live);
        let e = d.clone().dial().await.unwrap_err().to_string();
        assert!(e.contains(&endpoints[0]) && e.contains(&endpoints[1]), "{e}");
    }
}
