//! TLS on both sides: the client-facing listener config and the upstream (proxy to etcd) config.
//!
//! Both are built with the ring provider passed explicitly, so nothing depends on which
//! provider happens to be installed process-wide.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::{ListenerTlsFiles, UpstreamTlsFiles};

/// ALPN protocol id for HTTP/2; gRPC clients refuse a TLS connection that does not negotiate it.
const ALPN_H2: &[u8] = b"h2";

/// The one crypto provider of this process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client-facing TLS config from the listener files; fails with the file and the reason.
pub fn server_config(files: &ListenerTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = etcd_compat_certs::load_certs(&files.cert)?;
    let key = etcd_compat_certs::load_private_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        // TLS 1.2 stays on for Go 1.11-era clients; rustls prefers 1.3 when both sides have it.
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rustls)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let roots = root_store(&etcd_compat_certs::load_ca_bundle(std::slice::from_ref(ca_path))?, ca_path)?;
            let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            if let Some(crl_path) = &files.client_crl {
                verifier = verifier.with_crls(load_crls(crl_path)?);
            }
            let verifier = verifier.build().map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| TlsError::KeyMismatch {
        cert: files.cert.display().to_string(),
        key: files.key.display().to_string(),
        reason: e.to_string(),
    })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Builds the upstream TLS config (CA bundle, optional client certificate).
pub fn client_config(files: &UpstreamTlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rustls)?;
    let builder = if files.insecure_skip_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(SkipServerVerification(provider())))
    } else {
        let mut roots = RootCertStore::empty();
        if let Some(ca) = &files.ca {
            roots = root_store(&etcd_compat_certs::load_ca_bundle(std::slice::from_ref(ca))?, ca)?;
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match &files.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = etcd_compat_certs::load_certs(cert)?;
            let private_key = etcd_compat_certs::load_private_key(key)?;
            builder.with_client_auth_cert(chain, private_key).map_err(|e| TlsError::KeyMismatch {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
                reason: e.to_string(),
            })?
        }
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
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

/// Accepts any server certificate but still checks handshake signatures (`--insecure-skip-tls-verify`).
#[derive(Debug)]
struct SkipServerVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
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
