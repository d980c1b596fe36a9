use std::net::IpAddr;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use crate::CertError;

/// The facts about a certificate that operators and renewal logic care about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject distinguished name, e.g. `CN=root`.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Subject alternative names in OpenSSL style: `DNS:localhost`, `IP:127.0.0.1`, `URI:...`, `email:...`.
    pub sans: Vec<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity (inclusive, as in RFC 5280).
    pub not_after: OffsetDateTime,
    /// True if basicConstraints says CA:TRUE.
    pub is_ca: bool,
    /// Serial number as colon-separated lowercase hex bytes, as `openssl x509 -text` prints it.
    pub serial: String,
    /// The subject's first common name, if any (what pre-SAN clients matched host names against).
    pub common_name: Option<String>,
    /// Extended key usages by their OpenSSL short names (`serverAuth`, `clientAuth`, ...); empty when the extension is absent.
    pub extended_key_usages: Vec<String>,
}

impl CertInfo {
    /// Whole days from `now` until `not_after`, rounded down: 0 means less than a
    /// day left, negative means already expired.
    pub fn days_left(&self, now: OffsetDateTime) -> i64 {
        const SECONDS_PER_DAY: i64 = 86_400;
        (self.not_after - now).whole_seconds().div_euclid(SECONDS_PER_DAY)
    }

    /// True once `now` is past `not_after`.
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        now > self.not_after
    }
}

/// Parses a DER certificate into a [`CertInfo`].
pub fn inspect(der: &CertificateDer) -> Result<CertInfo, CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|error| CertError::Parse { detail: error.to_string() })?;
    let san_extension = cert
        .subject_alternative_name()
        .map_err(|error| CertError::Parse { detail: format!("bad subjectAltName extension: {error}") })?;
    let sans = san_extension
        .map(|extension| extension.value.general_names.iter().map(describe_san).collect())
        .unwrap_or_default();
    let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned);
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        sans,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        is_ca: cert.is_ca(),
        serial: cert.raw_serial_as_string(),
        common_name,
        extended_key_usages: extended_key_usages(&cert)?,
    })
}

fn extended_key_usages(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<Vec<String>, CertError> {
    let extension = cert
        .extended_key_usage()
        .map_err(|error| CertError::Parse { detail: format!("bad extendedKeyUsage extension: {error}") })?;
    let Some(extension) = extension else {
        return Ok(Vec::new());
    };
    let usage = extension.value;
    let named = [
        (usage.any, "anyExtendedKeyUsage"),
        (usage.server_auth, "serverAuth"),
        (usage.client_auth, "clientAuth"),
        (usage.code_signing, "codeSigning"),
        (usage.email_protection, "emailProtection"),
        (usage.time_stamping, "timeStamping"),
        (usage.ocsp_signing, "OCSPSigning"),
    ];
    Ok(named.iter().filter(|(present, _)| *present).map(|(_, name)| (*name).to_owned()).collect())
}

fn describe_san(name: &GeneralName) -> String {
    match name {
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::IPAddress(bytes) => match ip_from_bytes(bytes) {
            Some(ip) => format!("IP:{ip}"),
            None => format!("IP:<{} bytes>", bytes.len()),
        },
        GeneralName::URI(uri) => format!("URI:{uri}"),
        GeneralName::RFC822Name(email) => format!("email:{email}"),
        other => other.to_string(),
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from)
}
