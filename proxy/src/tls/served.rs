//! The certificate chain a TLS server presents, read without trusting it: what `certs inspect
//! --endpoints` prints and what `doctor` counts the days left of.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};

/// A server's certificate chain, leaf first, and the name it was asked for.
pub struct ServedChain {
    /// As served, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The host part of the endpoint, for verifying the chain against it.
    pub server_name: ServerName<'static>,
}

/// Connects to `endpoint` (`host:port` or `https://host:port`), presenting `client_cert`
/// (certificate and key files) when given, and records the chain it serves. Blocking; a
/// handshake refused after the certificate was seen still yields the chain.
pub fn fetch_served_chain(
    endpoint: &str,
    client_cert: Option<(&Path, &Path)>,
    timeout: Duration,
) -> Result<ServedChain, String> {
    let authority = endpoint.trim().trim_start_matches("https://").trim_end_matches('/');
    let host = match authority.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => return Err(format!("{endpoint}: expected host:port")),
    };
    let server_name =
        ServerName::try_from(host.to_owned()).map_err(|_| format!("{endpoint}: {host:?} is not a valid host name"))?;
    let recorder = Arc::new(super::verify::AnyServerCertificate::new());
    let builder = rustls::ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone());
    let config = match client_cert {
        Some((cert, key)) => {
            let chain = etcd_compat_certs::load_certs(cert).map_err(|e| e.to_string())?;
            let key = etcd_compat_certs::load_private_key(key).map_err(|e| e.to_string())?;
            builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
        }
        None => builder.with_no_client_auth(),
    };
    let address = authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| format!("{endpoint}: cannot resolve {authority:?}"))?;
    let mut tcp =
        TcpStream::connect_timeout(&address, timeout).map_err(|e| format!("{endpoint}: cannot connect: {e}"))?;
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    let mut connection =
        rustls::ClientConnection::new(Arc::new(config), server_name.clone()).map_err(|e| format!("{endpoint}: {e}"))?;
    let mut handshake_error = None;
    while connection.is_handshaking() {
        if let Err(error) = connection.complete_io(&mut tcp) {
            handshake_error = Some(error);
            break;
        }
    }
    let chain = recorder.served_chain();
    if chain.is_empty() {
        let reason = handshake_error.map_or_else(|| "no certificate served".to_owned(), |e| e.to_string());
        return Err(format!("{endpoint}: TLS handshake failed before a certificate was seen: {reason}"));
    }
    Ok(ServedChain { chain, server_name })
}
