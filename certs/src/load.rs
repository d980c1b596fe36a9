use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::CertError;

/// Reads every CERTIFICATE block of a PEM file, in file order; fails if there
/// is none or one is not parseable X.509, so bad files are caught at startup
/// with their path instead of during a handshake.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| CertError::Pem { path: path.to_owned(), error })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate { path: path.to_owned() });
    }
    for (index, cert) in certs.iter().enumerate() {
        if let Err(error) = x509_parser::parse_x509_certificate(cert) {
            return Err(CertError::BadCertificate {
                path: path.to_owned(),
                number: index + 1,
                detail: error.to_string(),
            });
        }
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file: PKCS#1 (`RSA PRIVATE KEY`),
/// SEC1 (`EC PRIVATE KEY`) or PKCS#8 (`PRIVATE KEY`); other blocks, such as a
/// certificate in the same file, are skipped. Encrypted keys are rejected.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = read(path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(key) => Ok(key),
        // Encrypted keys are either an unknown PEM label (PKCS#8) or carry
        // legacy Proc-Type headers (PKCS#1/SEC1); both deserve a precise hint.
        Err(_) if contains(&pem, b"ENCRYPTED") => Err(CertError::EncryptedKey { path: path.to_owned() }),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(CertError::NoPrivateKey { path: path.to_owned() }),
        Err(error) => Err(CertError::Pem { path: path.to_owned(), error }),
    }
}

/// Concatenates the certificates of several CA files (each must hold at least
/// one) for a trust store; an empty list is an error so a trust store is never
/// silently empty.
pub fn load_ca_bundle(paths: &[PathBuf]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    if paths.is_empty() {
        return Err(CertError::NoCaFiles);
    }
    let mut bundle = Vec::new();
    for path in paths {
        bundle.extend(load_certs(path)?);
    }
    Ok(bundle)
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|error| CertError::Read { path: path.to_owned(), error })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}
