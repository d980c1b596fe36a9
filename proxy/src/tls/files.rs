//! The files TLS material is loaded from, on each side of the proxy; checked when the
//! configuration is validated, watched for changes afterwards.

use std::path::PathBuf;

/// Client-facing TLS files.
#[derive(Debug, Clone)]
pub struct ListenerTlsFiles {
    /// Server certificate chain presented to clients.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// When not empty, clients must present a certificate chaining to one of these bundles.
    pub client_cas: Vec<PathBuf>,
    /// Optional CRL for client certificates.
    pub client_crl: Option<PathBuf>,
    /// Opt-in exception for expired certificates of legacy clients.
    pub legacy: Option<LegacyClientException>,
}

impl ListenerTlsFiles {
    /// Every file the listener's TLS is built from, for change detection.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_cas.iter().cloned());
        paths.extend(self.client_crl.iter().cloned());
        paths.extend(self.legacy.iter().map(|legacy| legacy.ca.clone()));
        paths
    }
}

/// Expired client certificates from one legacy CA let in until an end date.
#[derive(Debug, Clone)]
pub struct LegacyClientException {
    /// The legacy clients' CA (PEM).
    pub ca: PathBuf,
    /// End of the exception: the last second of the configured day, unix seconds.
    pub until_unix: i64,
}

/// Upstream (proxy to etcd) TLS files.
#[derive(Debug, Clone)]
pub struct UpstreamTlsFiles {
    /// CA bundles for etcd's server certificates; empty uses no roots (only valid with `insecure_skip_verify`).
    pub cas: Vec<PathBuf>,
    /// Client certificate and key presented to etcd.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Skip server certificate verification (testing only).
    pub insecure_skip_verify: bool,
    /// Accept SAN-less server certificates with this subject CN.
    pub server_cn: Option<String>,
}

/// The upstream TLS files in use, shared by the reloader and the migration, which replaces them
/// when it switches clusters; `None` while the upstream is plaintext.
pub type SharedUpstreamFiles = std::sync::Arc<std::sync::RwLock<Option<UpstreamTlsFiles>>>;

impl UpstreamTlsFiles {
    /// Every file the upstream TLS is built from, for change detection.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = self.cas.clone();
        if let Some((cert, key)) = &self.client_cert {
            paths.push(cert.clone());
            paths.push(key.clone());
        }
        paths
    }
}
