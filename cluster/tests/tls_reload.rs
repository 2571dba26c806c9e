//! Certificates renewed on disk take effect without a restart: a serving process presents the
//! renewed certificate and checks clients against a rotated CA, a dialling process presents its
//! renewed certificate (to a worker, and to etcd), and a rotation that does not load leaves the
//! last good one in use.
//! Files are replaced the way the kubelet updates a mounted Secret: new files renamed over the old.

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tessera_cluster::tls::{EtcdTls, EtcdTlsArgs, InternalTls, TlsArgs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A throwaway CA.
struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ca { cert: params.self_signed(&key).unwrap(), key }
    }

    /// A certificate for localhost and its key, PEM.
    fn issue(&self) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// One process's three files.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl Files {
    fn new(dir: &Path, name: &str) -> Files {
        Files { cert: dir.join(format!("{name}.crt")), key: dir.join(format!("{name}.key")), ca: dir.join(format!("{name}-ca.crt")) }
    }

    /// Writes (or renews) all three, each by rename.
    fn write(&self, (cert, key): &(String, String), ca: &Ca) {
        replace(&self.cert, cert);
        replace(&self.key, key);
        replace(&self.ca, &ca.cert.pem());
    }

    fn open(&self) -> Arc<InternalTls> {
        let args = TlsArgs { tls_cert: Some(self.cert.clone()), tls_key: Some(self.key.clone()), tls_ca: Some(self.ca.clone()) };
        args.load().unwrap().unwrap()
    }
}

/// A new file renamed over `path`: a new inode, as a Secret volume's swap gives.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Past the files' recheck interval (one second), so that the next handshake looks again.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1200)).await;
}

/// A server on the internal API's TLS path that answers each accepted connection with one byte.
async fn serve(tls: &Arc<InternalTls>) -> u16 {
    use futures_util::StreamExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut incoming = Box::pin(tls.incoming(listener));
    tokio::spawn(async move {
        while let Some(Ok(mut conn)) = incoming.next().await {
            tokio::spawn(async move {
                let _ = conn.write_all(b"k").await;
                let _ = conn.flush().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            });
        }
    });
    port
}

/// Connects with the given trust and client certificate: the server's certificate, once the
/// server has also accepted ours (its first byte arrived), or the error.
async fn handshake(port: u16, ca: &Ca, (cert, key): &(String, String)) -> Result<CertificateDer<'static>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap())
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut conn = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte).await.map_err(|e| format!("refused after the handshake: {e}"))?;
    Ok(conn.get_ref().1.peer_certificates().unwrap()[0].clone())
}

fn der(cert: &(String, String)) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(cert.0.as_bytes()).unwrap()
}

#[tokio::test]
async fn a_server_presents_its_renewed_certificate_and_checks_clients_against_a_rotated_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (Ca::new(), Ca::new());
    let server = Files::new(dir.path(), "worker");
    let first = ca1.issue();
    server.write(&first, &ca1);
    let tls = server.open();
    let port = serve(&tls).await;
    let client1 = ca1.issue();
    assert_eq!(handshake(port, &ca1, &client1).await.unwrap(), der(&first));

    // Renewed: a new key and certificate from the same CA.
    let renewed = ca1.issue();
    server.write(&renewed, &ca1);
    settle().await;
    assert_eq!(handshake(port, &ca1, &client1).await.unwrap(), der(&renewed), "the renewed certificate is presented");

    // A rotation that does not load (the key is not the certificate's) keeps the last good one.
    replace(&server.key, &ca1.issue().1);
    settle().await;
    assert_eq!(handshake(port, &ca1, &client1).await.unwrap(), der(&renewed), "a broken rotation keeps the previous certificate");

    // The CA rotated: clients of the old CA are refused, the new CA's are let in.
    let under_ca2 = ca2.issue();
    server.write(&under_ca2, &ca2);
    settle().await;
    let refused = handshake(port, &ca2, &client1).await;
    assert!(refused.is_err(), "a client certificate of the retired CA was accepted");
    assert_eq!(handshake(port, &ca2, &ca2.issue()).await.unwrap(), der(&under_ca2));

    // A client with no certificate of any kind never gets a byte.
    let other = Ca::new();
    assert!(handshake(port, &ca2, &other.issue()).await.is_err(), "a stranger CA's client certificate was accepted");
}

/// gRPC over the TLS path, with tonic at both ends, as the coordinator dials a worker.
async fn health(port: u16, tls: &InternalTls) -> Result<(), String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://localhost:{port}")).unwrap();
    let channel = endpoint.tls_config(tls.client()).map_err(|e| e.to_string())?.connect().await.map_err(|e| format!("{e:?}"))?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.map_err(|e| e.to_string())?;
    Ok(())
}

#[tokio::test]
async fn a_client_dials_with_its_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (Ca::new(), Ca::new());
    let (server, client) = (Files::new(dir.path(), "worker"), Files::new(dir.path(), "coordinator"));
    server.write(&ca1.issue(), &ca1);
    client.write(&ca1.issue(), &ca1);
    let (server_tls, client_tls) = (server.open(), client.open());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_reporter, service) = tonic_health::server::health_reporter();
    let incoming = server_tls.incoming(listener);
    tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
    health(port, &client_tls).await.expect("mutual TLS between two processes of one CA");

    // The worker moves to a new CA first: the coordinator's old certificate no longer passes.
    server.write(&ca2.issue(), &ca2);
    settle().await;
    assert!(health(port, &client_tls).await.is_err(), "a certificate of the retired CA got through");
    // Then the coordinator's files are renewed under the new CA: its next dial uses them.
    client.write(&ca2.issue(), &ca2);
    settle().await;
    health(port, &client_tls).await.expect("the renewed client certificate");
}

/// One connection as the etcd client makes it (`EtcdTls::config`), accepted once the server's
/// first byte arrives.
async fn etcd_handshake(port: u16, tls: &EtcdTls) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls.config());
    let mut conn = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte).await.map_err(|e| format!("refused after the handshake: {e}"))?;
    Ok(())
}

#[tokio::test]
async fn the_etcd_client_connects_with_its_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (Ca::new(), Ca::new());
    let (server, client) = (Files::new(dir.path(), "etcd"), Files::new(dir.path(), "worker"));
    server.write(&ca1.issue(), &ca1);
    client.write(&ca1.issue(), &ca1);
    let port = serve(&server.open()).await;
    let args = EtcdTlsArgs { etcd_ca: Some(client.ca.clone()), etcd_cert: Some(client.cert.clone()), etcd_key: Some(client.key.clone()) };
    let etcd = args.load().unwrap().unwrap();
    etcd_handshake(port, &etcd).await.expect("the client certificate of the server's CA");

    server.write(&ca2.issue(), &ca2);
    settle().await;
    assert!(etcd_handshake(port, &etcd).await.is_err(), "a client of the retired CA got through");
    client.write(&ca2.issue(), &ca2);
    settle().await;
    etcd_handshake(port, &etcd).await.expect("the renewed client certificate and CA");
}
