//! TLS to etcd: etcd's CA, and this process's client certificate when etcd requires one, followed
//! on disk as they are renewed ([`super::reload::Watched`]). The etcd client makes its own
//! connections (`membership::dial`) and asks [`EtcdTls::config`] for each.

use super::reload::{Pem, Watched};
use rustls::crypto::CryptoProvider;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The etcd client's TLS, from `--etcd-ca` and optionally `--etcd-cert`/`--etcd-key`.
#[derive(Debug)]
pub struct EtcdTls {
    files: Watched<rustls::ClientConfig>,
}

impl EtcdTls {
    /// Loads the files once; errors name the flag at fault.
    pub(super) fn open(ca: &Path, client: Option<(&Path, &Path)>) -> Result<Arc<Self>, String> {
        let mut paths = vec![ca.to_path_buf()];
        if let Some((cert, key)) = client {
            paths.extend([cert.to_path_buf(), key.to_path_buf()]);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(Arc::new(Self { files: Watched::open(paths, Box::new(move |paths| load(paths, &provider)))? }))
    }

    /// The client configuration for one new connection: etcd's certificate checked against the
    /// CA (and its name against the endpoint's host), this process's certificate presented.
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.files.current()
    }
}

/// A client configuration from the CA and, when given, the client certificate and key.
fn load(paths: &[PathBuf], provider: &Arc<CryptoProvider>) -> Result<rustls::ClientConfig, String> {
    let ca = Pem::read("--etcd-ca", &paths[0])?;
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .expect("ring supports rustls' default protocol versions")
        .with_root_certificates(ca.roots()?);
    let mut config = match paths {
        [_, cert, key] => {
            let (cert, key) = (Pem::read("--etcd-cert", cert)?, Pem::read("--etcd-key", key)?);
            builder.with_client_auth_cert(cert.chain()?, key.key()?).map_err(|e| key.error(&format!("does not go with --etcd-cert: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    // etcd serves gRPC on HTTP/2, which TLS must negotiate.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
