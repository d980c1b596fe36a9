//! Certificate verifiers for the two opt-in exceptions of the certificate lifecycle (legacy
//! clients with expired certificates, and etcd members whose server certificates have a CN but
//! no subjectAltName), and the one that accepts any server certificate
//! (`--insecure-skip-tls-verify`, `certs inspect`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use super::status::format_unix;

/// The handshake-signature half of a `ServerCertVerifier` whose `provider` field does the
/// checking: the exceptions change which certificates are accepted, never how signatures are.
macro_rules! signatures_checked_by_provider {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider.signature_verification_algorithms.supported_schemes()
        }
    };
}

/// Verifies client certificates normally; a certificate that fails only because it expired is
/// still let in when it chains to the legacy CA (checked as of its last valid second) and the
/// exception's end date has not passed. Each such connection is logged and counted.
#[derive(Debug)]
pub struct LegacyExpiredClientVerifier {
    normal: Arc<dyn ClientCertVerifier>,
    legacy: Arc<dyn ClientCertVerifier>,
    /// End of the exception, unix seconds (the end of the configured day, UTC).
    until: i64,
    accepted: Arc<AtomicU64>,
    /// Both CAs' names: Go clients send a certificate only if its issuer is in this list.
    hints: Vec<DistinguishedName>,
}

impl LegacyExpiredClientVerifier {
    /// Combines the normal verifier with one trusting only the legacy CA.
    pub fn new(
        normal: Arc<dyn ClientCertVerifier>,
        legacy: Arc<dyn ClientCertVerifier>,
        until: i64,
        accepted: Arc<AtomicU64>,
    ) -> Self {
        let mut hints = normal.root_hint_subjects().to_vec();
        for hint in legacy.root_hint_subjects() {
            if !hints.iter().any(|known| known.as_ref() == hint.as_ref()) {
                hints.push(hint.clone());
            }
        }
        LegacyExpiredClientVerifier { normal, legacy, until, accepted, hints }
    }
}

impl ClientCertVerifier for LegacyExpiredClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let normal_error = match self.normal.verify_client_cert(end_entity, intermediates, now) {
            Ok(verified) => return Ok(verified),
            Err(error) => error,
        };
        let Ok(info) = etcd_compat_certs::inspect(end_entity) else {
            return Err(normal_error);
        };
        let now_seconds = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let not_after = info.not_after.unix_timestamp();
        if not_after >= now_seconds {
            return Err(normal_error);
        }
        if now_seconds > self.until {
            tracing::warn!(
                subject = %info.subject,
                expired = %format_unix(not_after),
                exception_ended = %format_unix(self.until),
                "expired client certificate refused: the --legacy-client-expired-until exception has ended"
            );
            return Err(normal_error);
        }
        // Checked as of the certificate's last valid second: chain, signatures, usage and CRL
        // must all be right then; only the passing of time is forgiven.
        let as_of = UnixTime::since_unix_epoch(std::time::Duration::from_secs(u64::try_from(not_after).unwrap_or(0)));
        match self.legacy.verify_client_cert(end_entity, intermediates, as_of) {
            Ok(verified) => {
                self.accepted.fetch_add(1, Relaxed);
                tracing::warn!(
                    subject = %info.subject,
                    serial = %info.serial,
                    issuer = %info.issuer,
                    expired = %format_unix(not_after),
                    exception_until = %format_unix(self.until),
                    "legacy client let in with an expired certificate (--legacy-client-ca-file); replace its certificate before the exception ends"
                );
                Ok(verified)
            }
            Err(legacy_error) => {
                tracing::info!(subject = %info.subject, %legacy_error, "expired client certificate does not chain to the legacy CA");
                Err(normal_error)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.normal.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.normal.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.normal.supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.normal.client_auth_mandatory()
    }
}

/// Verifies etcd's server certificate chain and signatures against the CA bundle like the
/// default verifier; the name matches if a subjectAltName matches the dialled host, or, for
/// certificates without any subjectAltName, if the subject CN equals the expected one
/// (`--upstream-server-cn`), as Go accepted before 1.15.
#[derive(Debug)]
pub struct CommonNameServerVerifier {
    roots: Arc<RootCertStore>,
    expected_cn: String,
    provider: Arc<CryptoProvider>,
}

impl CommonNameServerVerifier {
    /// A verifier trusting `roots` that accepts SAN-less certificates with CN `expected_cn`.
    pub fn new(roots: Arc<RootCertStore>, expected_cn: String, provider: Arc<CryptoProvider>) -> Self {
        CommonNameServerVerifier { roots, expected_cn, provider }
    }
}

impl ServerCertVerifier for CommonNameServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let name_error = match verify_server_name(&cert, server_name) {
            Ok(()) => return Ok(ServerCertVerified::assertion()),
            Err(error) => error,
        };
        let info = etcd_compat_certs::inspect(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if info.sans.is_empty() && info.common_name.as_deref() == Some(self.expected_cn.as_str()) {
            return Ok(ServerCertVerified::assertion());
        }
        tracing::debug!(subject = %info.subject, sans = ?info.sans, expected_cn = %self.expected_cn, "upstream certificate matches neither the host nor --upstream-server-cn");
        Err(name_error)
    }

    signatures_checked_by_provider!();
}

/// Accepts any server certificate but still checks handshake signatures, and keeps the chain it
/// was shown: for `--insecure-skip-tls-verify`, and for `certs inspect`, which shows what an
/// endpoint serves even when it would not verify.
#[derive(Debug)]
pub(crate) struct AnyServerCertificate {
    provider: Arc<CryptoProvider>,
    served: std::sync::Mutex<Vec<CertificateDer<'static>>>,
}

impl AnyServerCertificate {
    pub(crate) fn new() -> Self {
        AnyServerCertificate { provider: super::provider(), served: std::sync::Mutex::new(Vec::new()) }
    }

    /// The chain the last server presented, leaf first.
    pub(crate) fn served_chain(&self) -> Vec<CertificateDer<'static>> {
        self.served.lock().map(|chain| chain.clone()).unwrap_or_default()
    }
}

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut chain) = self.served.lock() {
            *chain = std::iter::once(end_entity).chain(intermediates).map(|c| c.clone().into_owned()).collect();
        }
        Ok(ServerCertVerified::assertion())
    }

    signatures_checked_by_provider!();
}
