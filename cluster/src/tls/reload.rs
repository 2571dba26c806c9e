//! Certificates that follow their files. cert-manager renews a certificate weeks before it
//! expires and the kubelet swaps the mounted Secret's files in place; a process that read them
//! once at start would present the old certificate until it expired. [`InternalTls`] looks at
//! the three files again (at most once a second, when a connection needs them) and, when they
//! changed and load cleanly, every later handshake uses the new ones: the certificate this
//! process presents, and the CA it checks the other end against. Connections already open keep
//! the certificates they were made with.
//!
//! A change that does not load (a half-written file, a key that is not the certificate's) is
//! logged once and the last good certificates stay in use, so a botched rotation never turns a
//! serving process into one that refuses everyone.

use super::read_pem;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// How long a look at the files stays current: a handshake storm stats them once a second.
const RECHECK: Duration = Duration::from_secs(1);

/// A file as last seen on disk. Kubernetes updates a mounted Secret by swapping a symlink to a
/// new directory (a new inode); an operator may rewrite a file in place (a new mtime or length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    /// The file's stamp; a file that cannot be read stamps as missing, which is a change too.
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Some(Stamp { modified: m.modified().ok(), len: m.len(), inode })
    }
}

/// The stamps of (certificate, key, CA).
type Stamps = [Option<Stamp>; 3];

/// One generation of certificates, parsed and checked.
#[derive(Debug)]
struct Loaded {
    stamps: Stamps,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
    /// What a server presents.
    certified: Arc<CertifiedKey>,
    /// How a server checks a client's certificate: it must chain to the CA.
    verifier: Arc<dyn ClientCertVerifier>,
}

/// The mutable part: the generation in use, when the files were last looked at, and the stamps
/// of a change that failed to load (logged once).
#[derive(Debug)]
struct State {
    loaded: Arc<Loaded>,
    checked: Instant,
    failed: Option<Stamps>,
}

/// Mutual TLS on the internal API, from `--tls-cert`, `--tls-key` and `--tls-ca`, following
/// the files as they are renewed. A server takes its side with [`InternalTls::incoming`]; a
/// client asks [`InternalTls::client`] for each new connection.
#[derive(Debug)]
pub struct InternalTls {
    paths: [PathBuf; 3],
    provider: Arc<CryptoProvider>,
    state: Mutex<State>,
}

/// The flags the three files come from, in [`Stamps`] order; errors name them.
const FLAGS: [&str; 3] = ["--tls-cert", "--tls-key", "--tls-ca"];

impl InternalTls {
    /// Loads the files once; errors name the flag at fault.
    pub(super) fn open(cert: &Path, key: &Path, ca: &Path) -> Result<Arc<Self>, String> {
        let paths = [cert.to_path_buf(), key.to_path_buf(), ca.to_path_buf()];
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = load(&paths, &provider)?;
        Ok(Arc::new(Self { paths, provider, state: Mutex::new(State { loaded: Arc::new(loaded), checked: Instant::now(), failed: None }) }))
    }

    /// The generation to use now: the files are looked at again when the last look is older
    /// than [`RECHECK`], and reloaded when they changed.
    fn current(&self) -> Arc<Loaded> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.checked.elapsed() < RECHECK {
            return state.loaded.clone();
        }
        state.checked = Instant::now();
        let stamps = self.paths.each_ref().map(|p| Stamp::of(p));
        if stamps == state.loaded.stamps || state.failed == Some(stamps) {
            return state.loaded.clone();
        }
        match load(&self.paths, &self.provider) {
            Ok(loaded) => {
                tracing::info!(cert = %self.paths[0].display(), ca = %self.paths[2].display(), "TLS certificates changed on disk: new connections use them");
                state.loaded = Arc::new(loaded);
                state.failed = None;
            }
            Err(error) => {
                tracing::warn!(%error, "TLS certificates changed on disk but do not load; keeping the previous ones");
                state.failed = Some(stamps);
            }
        }
        state.loaded.clone()
    }

    /// A client's side, for one new connection: this process's certificate, and the server's
    /// checked against the CA (and its name against the address dialled).
    pub fn client(&self) -> ClientTlsConfig {
        let now = self.current();
        ClientTlsConfig::new().identity(Identity::from_pem(&now.cert_pem, &now.key_pem)).ca_certificate(Certificate::from_pem(&now.ca_pem))
    }

    /// A server's side: it presents the current certificate, requires a client certificate
    /// that chains to the current CA, and speaks HTTP/2 (gRPC) only.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let builder = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .expect("ring supports rustls' default protocol versions");
        let mut config = builder.with_client_cert_verifier(Arc::new(Verifier(self.clone()))).with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

/// Reads, parses and cross-checks the three files: the key must be the certificate's, and the
/// CA must make a client verifier.
fn load(paths: &[PathBuf; 3], provider: &Arc<CryptoProvider>) -> Result<Loaded, String> {
    // Stamps first: a change that lands while reading shows as a change at the next look.
    let stamps = paths.each_ref().map(|p| Stamp::of(p));
    let [cert_pem, key_pem, ca_pem] = [0, 1, 2].map(|i| read_pem(FLAGS[i], &paths[i]));
    let (cert_pem, key_pem, ca_pem) = (cert_pem?, key_pem?, ca_pem?);
    let named = |i: usize, e: &dyn std::fmt::Display| format!("{} {}: {e}", FLAGS[i], paths[i].display());
    let chain = CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| named(0, &e))?;
    if chain.is_empty() {
        return Err(named(0, &"no CERTIFICATE block"));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| named(1, &e))?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| named(1, &format!("does not go with --tls-cert: {e}")))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(ca.map_err(|e| named(2, &e))?).map_err(|e| named(2, &e))?;
    }
    if roots.is_empty() {
        return Err(named(2, &"no CERTIFICATE block"));
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().map_err(|e| named(2, &e))?;
    Ok(Loaded { stamps, cert_pem, key_pem, ca_pem, certified: Arc::new(certified), verifier })
}

/// The server's certificate, looked up per handshake.
#[derive(Debug)]
struct Resolver(Arc<InternalTls>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

/// The client-certificate check, delegated per handshake to the current CA's verifier.
#[derive(Debug)]
struct Verifier(Arc<InternalTls>);

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No hints: they would borrow from one generation of the CA. Clients here hold a single
    /// certificate and present it whatever the hints say.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.current().verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().verifier.supported_verify_schemes()
    }
}
