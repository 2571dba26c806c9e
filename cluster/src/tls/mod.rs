//! TLS inside the cluster. Mutual TLS on the internal API (coordinator ↔ workers): each end
//! presents a certificate the cluster's CA signed and checks the other's against that CA, so only
//! the cluster's own processes can drive a worker or pose as one; the files come from
//! `--tls-cert`, `--tls-key` and `--tls-ca` (PEM; all three or none), the same flags on both
//! binaries, and are followed as they are renewed ([`reload`]); servers accept through
//! [`InternalTls::incoming`] ([`accept`]). TLS to etcd ([`EtcdTlsArgs`]): etcd's CA, and this process's client certificate when
//! etcd requires one (`--client-cert-auth`).

pub mod accept;
pub mod etcd;
pub mod reload;

pub use etcd::EtcdTls;
pub use reload::InternalTls;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The internal API's TLS files (flags of `tessera serve --etcd` and `tessera-worker serve`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// This process's certificate (PEM), signed by --tls-ca: turns on mutual TLS on the internal
    /// API (with --tls-key and --tls-ca).
    #[arg(long, env = "TESSERA_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TESSERA_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The cluster's CA certificate (PEM): the other end must present a certificate it signed.
    #[arg(long, env = "TESSERA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

/// A PEM file's bytes; errors name the flag.
fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(format!("{flag} {}: not a PEM file (no -----BEGIN line)", path.display()));
    }
    Ok(bytes)
}

impl TlsArgs {
    /// Whether any of the flags is given.
    pub fn given(&self) -> bool {
        self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_ca.is_some()
    }

    /// The certificates, parsed and checked (the key goes with the certificate), or `None` when
    /// TLS is off. Errors name the flag at fault.
    pub fn load(&self) -> Result<Option<Arc<InternalTls>>, String> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => InternalTls::open(cert, key, ca).map(Some),
            _ => Err("--tls-cert, --tls-key and --tls-ca: give all three (mutual TLS) or none".into()),
        }
    }
}

/// TLS to etcd (flags of `tessera serve --etcd` and `tessera-worker serve --etcd`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct EtcdTlsArgs {
    /// The CA certificate (PEM) that signed etcd's: turns on TLS to etcd (https:// endpoints).
    #[arg(long, env = "TESSERA_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// This process's client certificate for etcd (PEM, with --etcd-key), for an etcd that
    /// requires client certificates.
    #[arg(long, env = "TESSERA_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// The private key of --etcd-cert (PEM).
    #[arg(long, env = "TESSERA_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdTlsArgs {
    /// The client's TLS, parsed and checked, or `None` when TLS to etcd is off. Errors name the
    /// flag.
    pub fn load(&self) -> Result<Option<Arc<EtcdTls>>, String> {
        let Some(ca) = &self.etcd_ca else {
            return match self.etcd_cert.is_some() || self.etcd_key.is_some() {
                true => Err("--etcd-cert/--etcd-key need --etcd-ca (the CA that signed etcd's certificate)".into()),
                false => Ok(None),
            };
        };
        match (&self.etcd_cert, &self.etcd_key) {
            (None, None) => EtcdTls::open(ca, None).map(Some),
            (Some(cert), Some(key)) => EtcdTls::open(ca, Some((cert, key))).map(Some),
            _ => Err("--etcd-cert and --etcd-key: give both or neither".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_three_files_or_none_and_errors_name_the_flag() {
        assert!(TlsArgs::default().load().unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("a.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let half = TlsArgs { tls_cert: Some(pem.clone()), ..Default::default() };
        assert!(half.given() && half.load().unwrap_err().contains("all three"));
        let bad = TlsArgs { tls_cert: Some(pem.clone()), tls_key: Some(junk), tls_ca: Some(pem.clone()) };
        assert!(bad.load().unwrap_err().starts_with("--tls-key"), "{:?}", bad.load());
        let missing = TlsArgs { tls_cert: Some(pem.clone()), tls_key: Some(pem.clone()), tls_ca: Some(dir.path().join("none.pem")) };
        assert!(missing.load().unwrap_err().starts_with("--tls-ca"));
        let full = TlsArgs { tls_cert: Some(pem.clone()), tls_key: Some(pem.clone()), tls_ca: Some(pem.clone()) };
        assert!(full.load().unwrap_err().starts_with("--tls-key"), "PEM is parsed at start: a certificate is no private key");

        assert!(EtcdTlsArgs::default().load().unwrap().is_none());
        let no_ca = EtcdTlsArgs { etcd_cert: Some(pem.clone()), etcd_key: Some(pem.clone()), ..Default::default() };
        assert!(no_ca.load().unwrap_err().contains("--etcd-ca"));
        let half = EtcdTlsArgs { etcd_ca: Some(pem.clone()), etcd_cert: Some(pem.clone()), ..Default::default() };
        assert!(half.load().unwrap_err().contains("both or neither"));
        assert!(EtcdTlsArgs { etcd_ca: Some(pem.clone()), ..Default::default() }.load().unwrap_err().starts_with("--etcd-ca"), "the CA is parsed at start");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, params.self_signed(&ca_key).unwrap().pem()).unwrap();
        assert!(EtcdTlsArgs { etcd_ca: Some(ca.clone()), ..Default::default() }.load().unwrap().is_some(), "server authentication only");
        let wrong_key = EtcdTlsArgs { etcd_ca: Some(ca.clone()), etcd_cert: Some(ca.clone()), etcd_key: Some(pem.clone()) };
        assert!(wrong_key.load().unwrap_err().starts_with("--etcd-key"));
        let junk = EtcdTlsArgs { etcd_ca: Some(dir.path().join("junk.pem")), ..Default::default() };
        assert!(junk.load().unwrap_err().starts_with("--etcd-ca"));
    }
}
