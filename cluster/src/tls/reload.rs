//! Certificates that follow their files. cert-manager renews a certificate weeks before it
//! expires and the kubelet swaps the mounted Secret's files in place; a process that read them
//! once at start would present the old certificate until it expired. [`Watched`] looks at the
//! files again (at most once a second, when a connection needs them) and, when they changed and
//! load cleanly, every later handshake uses the new ones: the certificate this process
//! presents, and the CA it checks the other end against. Connections already open keep the
//! certificates they were made with. [`InternalTls`] (the internal API, both ends) and
//! [`super::EtcdTls`] (the etcd client) are both made of it.
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

/// The stamps of the files, in their order.
type Stamps = Vec<Option<Stamp>>;

/// Turns the files' bytes into what a connection uses; errors name the flag at fault.
type Loader<T> = Box<dyn Fn(&[PathBuf]) -> Result<T, String> + Send + Sync>;

/// Files followed on disk, and what was last made of them.
pub struct Watched<T> {
    paths: Vec<PathBuf>,
    load: Loader<T>,
    state: Mutex<State<T>>,
}

/// The mutable part: the generation in use and the files' stamps when it was loaded, when the
/// files were last looked at, and the stamps of a change that failed to load (logged once).
struct State<T> {
    loaded: Arc<T>,
    stamps: Stamps,
    checked: Instant,
    failed: Option<Stamps>,
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").field("paths", &self.paths).finish_non_exhaustive()
    }
}

fn stamps(paths: &[PathBuf]) -> Stamps {
    paths.iter().map(|p| Stamp::of(p)).collect()
}

impl<T> Watched<T> {
    /// Loads the files once; the error is the loader's.
    pub fn open(paths: Vec<PathBuf>, load: Loader<T>) -> Result<Self, String> {
        // Stamps first: a change that lands while reading shows as a change at the next look.
        let stamps = stamps(&paths);
        let loaded = Arc::new(load(&paths)?);
        Ok(Self { paths, load, state: Mutex::new(State { loaded, stamps, checked: Instant::now(), failed: None }) })
    }

    /// The generation to use now: the files are looked at again when the last look is older
    /// than [`RECHECK`], and reloaded when they changed.
    pub fn current(&self) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.checked.elapsed() < RECHECK {
            return state.loaded.clone();
        }
        state.checked = Instant::now();
        let now = stamps(&self.paths);
        if now == state.stamps || state.failed.as_ref() == Some(&now) {
            return state.loaded.clone();
        }
        match (self.load)(&self.paths) {
            Ok(loaded) => {
                tracing::info!(files = ?self.paths, "TLS files changed on disk: new connections use them");
                state.loaded = Arc::new(loaded);
                state.stamps = now;
                state.failed = None;
            }
            Err(error) => {
                tracing::warn!(%error, "TLS files changed on disk but do not load; keeping the previous ones");
                state.failed = Some(now);
            }
        }
        state.loaded.clone()
    }
}

/// One generation of the internal API's certificates, parsed and checked.
#[derive(Debug)]
struct Loaded {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
    /// What a server presents.
    certified: Arc<CertifiedKey>,
    /// How a server checks a client's certificate: it must chain to the CA.
    verifier: Arc<dyn ClientCertVerifier>,
}

/// Mutual TLS on the internal API, from `--tls-cert`, `--tls-key` and `--tls-ca`, following
/// the files as they are renewed. A server takes its side with [`InternalTls::incoming`]; a
/// client asks [`InternalTls::client`] for each new connection.
#[derive(Debug)]
pub struct InternalTls {
    provider: Arc<CryptoProvider>,
    files: Watched<Loaded>,
}

/// The flags the three files come from, in [`Stamps`] order; errors name them.
const FLAGS: [&str; 3] = ["--tls-cert", "--tls-key", "--tls-ca"];

impl InternalTls {
    /// Loads the files once; errors name the flag at fault.
    pub(super) fn open(cert: &Path, key: &Path, ca: &Path) -> Result<Arc<Self>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let for_load = provider.clone();
        let files = Watched::open(vec![cert.to_path_buf(), key.to_path_buf(), ca.to_path_buf()], Box::new(move |paths| load(paths, &for_load)))?;
        Ok(Arc::new(Self { provider, files }))
    }

    fn current(&self) -> Arc<Loaded> {
        self.files.current()
    }

    /// A client's side, for one new connection: this process's certificate, and the server's
    /// checked against the CA (and its name against the address dialled).
    pub fn client(&self) -> ClientTlsConfig {
        let now = self.current();
        ClientTlsConfig::new().identity(Identity::from_pem(&now.cert_pem, &now.key_pem)).ca_certificate(Certificate::from_pem(&now.ca_pem))
    }

    /// A server's side: it presents the current certificate, requires a client certificate
    /// that chains to the current CA, and speaks HTTP/2 (gRPC) only. No session resumption: a
    /// resumed session skips the certificate check, so a client of a retired CA could come back
    /// on its old session (connections here live long, so a full handshake each costs nothing).
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let builder = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .expect("ring supports rustls' default protocol versions");
        let mut config = builder.with_client_cert_verifier(Arc::new(Verifier(self.clone()))).with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Arc::new(config)
    }
}

/// Reads, parses and cross-checks the three files: the key must be the certificate's, and the
/// CA must make a client verifier.
fn load(paths: &[PathBuf], provider: &Arc<CryptoProvider>) -> Result<Loaded, String> {
    let (cert, key, ca) = (Pem::read(FLAGS[0], &paths[0])?, Pem::read(FLAGS[1], &paths[1])?, Pem::read(FLAGS[2], &paths[2])?);
    let certified = CertifiedKey::from_der(cert.chain()?, key.key()?, provider).map_err(|e| key.error(&format!("does not go with --tls-cert: {e}")))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots()?), provider.clone()).build().map_err(|e| ca.error(&e))?;
    Ok(Loaded { cert_pem: cert.bytes, key_pem: key.bytes, ca_pem: ca.bytes, certified: Arc::new(certified), verifier })
}

/// One PEM file as read, with the flag it came from (which every error names).
pub(super) struct Pem<'a> {
    flag: &'a str,
    path: &'a Path,
    pub(super) bytes: Vec<u8>,
}

impl<'a> Pem<'a> {
    pub(super) fn read(flag: &'a str, path: &'a Path) -> Result<Self, String> {
        Ok(Self { flag, path, bytes: read_pem(flag, path)? })
    }

    pub(super) fn error(&self, e: &dyn std::fmt::Display) -> String {
        format!("{} {}: {e}", self.flag, self.path.display())
    }

    /// The certificates in the file, leaf first; at least one.
    pub(super) fn chain(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        let chain = CertificateDer::pem_slice_iter(&self.bytes).collect::<Result<Vec<_>, _>>().map_err(|e| self.error(&e))?;
        match chain.is_empty() {
            true => Err(self.error(&"no CERTIFICATE block")),
            false => Ok(chain),
        }
    }

    /// The file's private key.
    pub(super) fn key(&self) -> Result<PrivateKeyDer<'static>, String> {
        PrivateKeyDer::from_pem_slice(&self.bytes).map_err(|e| self.error(&e))
    }

    /// The file's certificates as trust anchors.
    pub(super) fn roots(&self) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        for ca in self.chain()? {
            roots.add(ca).map_err(|e| self.error(&e))?;
        }
        Ok(roots)
    }
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
