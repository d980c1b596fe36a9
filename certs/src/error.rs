use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in this crate; each message is self-contained
/// (names the file, the problem and the fix) and includes its cause, so
/// print it with `{}` rather than walking `source()`.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read {}: {error}; check that the file exists and is readable", path.display())]
    Read { path: PathBuf, error: io::Error },

    /// A file or directory could not be written.
    #[error("cannot write {}: {error}; check that the directory exists and is writable", path.display())]
    Write { path: PathBuf, error: io::Error },

    /// The file is not well-formed PEM.
    #[error("malformed PEM in {}: {error}; re-export the file as PEM text", path.display())]
    Pem { path: PathBuf, error: rustls_pki_types::pem::Error },

    /// The file holds no certificate.
    #[error(
        "no CERTIFICATE block in {}; expected PEM text with -----BEGIN CERTIFICATE----- \
         (convert DER with `openssl x509 -inform der -in FILE -out FILE.pem`)",
        path.display()
    )]
    NoCertificate { path: PathBuf },

    /// A certificate in the file is not valid X.509.
    #[error(
        "certificate #{number} in {} is not valid X.509: {detail}; re-export or reissue it",
        path.display()
    )]
    BadCertificate { path: PathBuf, number: usize, detail: String },

    /// The file holds no unencrypted private key.
    #[error(
        "no private key in {}; expected a PEM block RSA PRIVATE KEY (PKCS#1), \
         EC PRIVATE KEY (SEC1) or PRIVATE KEY (PKCS#8)",
        path.display()
    )]
    NoPrivateKey { path: PathBuf },

    /// The private key is password-protected, which the proxy cannot use.
    #[error(
        "private key in {} is encrypted; decrypt it first, e.g. \
         `openssl pkey -in FILE -out FILE.plain` and keep the result mode 0600",
        path.display()
    )]
    EncryptedKey { path: PathBuf },

    /// `load_ca_bundle` was called without any file.
    #[error("no CA certificate files given; pass at least one CA file to build a trust store")]
    NoCaFiles,

    /// DER bytes handed to `inspect` are not an X.509 certificate.
    #[error("cannot parse certificate: {detail}; pass a DER-encoded X.509 certificate")]
    Parse { detail: String },

    /// A CA certificate or key given to `Authority::from_pem` cannot be used for signing.
    #[error("cannot use CA: {detail}")]
    InvalidCa { detail: String },

    /// The requested validity window does not fit in a certificate date.
    #[error("validity of {validity:?} starting {offset} from now is out of range; use shorter durations")]
    ValidityOutOfRange { validity: std::time::Duration, offset: time::Duration },

    /// rcgen refused to build a key or certificate.
    #[error("cannot {action}: {error}")]
    Generate { action: String, error: rcgen::Error },
}
