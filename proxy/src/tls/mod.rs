//! TLS on both sides: the files it is loaded from ([`files`]), the client-facing listener config
//! and the upstream (proxy to etcd) config built from them, the opt-in certificate exceptions
//! ([`verify`]), replacement of the material when its files change ([`reload`]), what is known about every
//! certificate in use, for expiry warnings and metrics ([`status`]), and what a server presents
//! ([`served`]).
//!
//! Both configs are built with the ring provider passed explicitly, so nothing depends on which
//! provider happens to be installed process-wide. Depends on nothing else in the crate.

pub mod files;
pub mod reload;
pub mod served;
pub mod status;
pub mod verify;

pub use files::{LegacyClientException, ListenerTlsFiles, SharedUpstreamFiles, UpstreamTlsFiles};
pub use reload::Reloadable;
pub use status::{format_unix, now_unix, CertRegistry, ExpiryPolicy, LoadedCert, Side};

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// ALPN protocol id for HTTP/2; gRPC clients refuse a TLS connection that does not negotiate it.
const ALPN_H2: &[u8] = b"h2";

/// The one crypto provider of this process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS config together with the certificates it was built from (for expiry reporting).
pub struct Built<C> {
    /// The rustls config new handshakes should use.
    pub config: Arc<C>,
    /// Every certificate loaded into it.
    pub certs: Vec<LoadedCert>,
}

/// Builds the client-facing TLS config from the listener files; fails with the file and the reason.
pub fn server_config(files: &ListenerTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(build_listener(files, &Arc::default())?.config)
}

/// Builds the client-facing TLS config and describes its certificates; `legacy_counter` counts
/// clients let in by the legacy expired-certificate exception.
pub fn build_listener(
    files: &ListenerTlsFiles,
    legacy_counter: &Arc<AtomicU64>,
) -> Result<Built<ServerConfig>, TlsError> {
    let chain = etcd_compat_certs::load_certs(&files.cert)?;
    let key = etcd_compat_certs::load_private_key(&files.key)?;
    let mut certs = vec![describe("listener", &files.cert, &chain[0])?];
    refuse_expired(certs.first())?;
    let builder = ServerConfig::builder_with_provider(provider())
        // TLS 1.2 stays on for Go 1.11-era clients; rustls prefers 1.3 when both sides have it.
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rustls)?;
    let builder = if files.client_cas.is_empty() {
        builder.with_no_client_auth()
    } else {
        let (roots, ca_certs) = root_store_from_files("client-ca", &files.client_cas)?;
        certs.extend(ca_certs);
        let crls = files.client_crl.as_deref().map(load_crls).transpose()?.unwrap_or_default();
        let verifier = client_verifier(roots, &crls)?;
        match &files.legacy {
            None => builder.with_client_cert_verifier(verifier),
            Some(legacy) => {
                let (legacy_roots, legacy_certs) =
                    root_store_from_files("legacy-client-ca", std::slice::from_ref(&legacy.ca))?;
                certs.extend(legacy_certs);
                let legacy_verifier = client_verifier(legacy_roots, &crls)?;
                builder.with_client_cert_verifier(Arc::new(verify::LegacyExpiredClientVerifier::new(
                    verifier,
                    legacy_verifier,
                    legacy.until_unix,
                    Arc::clone(legacy_counter),
                )))
            }
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| TlsError::KeyMismatch {
        cert: files.cert.display().to_string(),
        key: files.key.display().to_string(),
        reason: e.to_string(),
    })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Built { config: Arc::new(config), certs })
}

/// Builds the upstream TLS config (CA bundle, optional client certificate).
pub fn client_config(files: &UpstreamTlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    Ok(build_upstream(files)?.config)
}

/// Builds the upstream TLS config and describes its certificates.
pub fn build_upstream(files: &UpstreamTlsFiles) -> Result<Built<ClientConfig>, TlsError> {
    let mut certs = Vec::new();
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rustls)?;
    let builder = if files.insecure_skip_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(verify::AnyServerCertificate::new()))
    } else {
        let (roots, ca_certs) = if files.cas.is_empty() {
            (RootCertStore::empty(), Vec::new())
        } else {
            root_store_from_files("upstream-ca", &files.cas)?
        };
        certs.extend(ca_certs);
        match &files.server_cn {
            None => builder.with_root_certificates(roots),
            Some(expected) => builder.dangerous().with_custom_certificate_verifier(Arc::new(
                verify::CommonNameServerVerifier::new(Arc::new(roots), expected.clone(), provider()),
            )),
        }
    };
    let mut config = match &files.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = etcd_compat_certs::load_certs(cert)?;
            let private_key = etcd_compat_certs::load_private_key(key)?;
            let leaf = describe("upstream-client", cert, &chain[0])?;
            refuse_expired(Some(&leaf))?;
            certs.insert(0, leaf);
            builder.with_client_auth_cert(chain, private_key).map_err(|e| TlsError::KeyMismatch {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
                reason: e.to_string(),
            })?
        }
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Built { config: Arc::new(config), certs })
}

fn client_verifier(
    roots: RootCertStore,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if !crls.is_empty() {
        verifier = verifier.with_crls(crls.iter().cloned());
    }
    verifier.build().map_err(|e| TlsError::Verifier(e.to_string()))
}

/// Describes the first certificate of a file for expiry reporting.
fn describe(role: &'static str, path: &Path, cert: &CertificateDer<'_>) -> Result<LoadedCert, TlsError> {
    let info = etcd_compat_certs::inspect(cert)
        .map_err(|e| TlsError::Unreadable { path: path.display().to_string(), reason: e.to_string() })?;
    Ok(LoadedCert {
        role,
        path: path.display().to_string(),
        subject: info.subject,
        not_after: info.not_after.unix_timestamp(),
    })
}

/// Refuses a leaf certificate past its end date: presenting it would fail every handshake.
fn refuse_expired(leaf: Option<&LoadedCert>) -> Result<(), TlsError> {
    match leaf {
        Some(leaf) if leaf.not_after < status::now_unix() => Err(TlsError::Expired {
            path: leaf.path.clone(),
            subject: leaf.subject.clone(),
            not_after: leaf.expiry_text(),
        }),
        _ => Ok(()),
    }
}

fn root_store_from_files(role: &'static str, paths: &[PathBuf]) -> Result<(RootCertStore, Vec<LoadedCert>), TlsError> {
    let mut roots = RootCertStore::empty();
    let mut described = Vec::new();
    for path in paths {
        let certs = etcd_compat_certs::load_ca_bundle(std::slice::from_ref(path))?;
        for cert in &certs {
            described.push(describe(role, path, cert)?);
        }
        roots.roots.extend(root_store(&certs, path)?.roots);
    }
    Ok((roots, described))
}

fn root_store(certs: &[CertificateDer<'static>], path: &std::path::Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert.clone())
            .map_err(|e| TlsError::BadCa { path: path.display().to_string(), reason: e.to_string() })?;
    }
    Ok(roots)
}

fn load_crls(path: &std::path::Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::BadCrl { path: path.display().to_string(), reason };
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if crls.is_empty() {
        return Err(bad("no X509 CRL block found; expected a PEM CRL".to_owned()));
    }
    Ok(crls)
}

/// Why TLS material could not be used; messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error(transparent)]
    Load(#[from] etcd_compat_certs::CertError),
    /// The key does not belong to the certificate, or the certificate is unusable.
    #[error("certificate {cert} and key {key} cannot be used together: {reason}; check that the key file belongs to the certificate")]
    KeyMismatch { cert: String, key: String, reason: String },
    /// A certificate to present is past its end date.
    #[error("certificate {path} ({subject}) expired on {not_after}; renew it (e.g. `etcd-compat-proxy certs renew --cert {path} ...`) and replace the file")]
    Expired { path: String, subject: String, not_after: String },
    /// A certificate's names or dates cannot be read.
    #[error("cannot read the names and dates of a certificate in {path}: {reason}; re-export or reissue it")]
    Unreadable { path: String, reason: String },
    /// A CA bundle entry is not a usable trust anchor.
    #[error("CA bundle {path} contains a certificate that cannot be a trust anchor: {reason}")]
    BadCa { path: String, reason: String },
    /// The CRL file could not be parsed.
    #[error("certificate revocation list {path} is unusable: {reason}")]
    BadCrl { path: String, reason: String },
    /// The client certificate verifier could not be built.
    #[error("cannot verify client certificates: {0}")]
    Verifier(String),
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(rustls::Error),
}
