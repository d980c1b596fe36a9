use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Authority, CertError, LeafSpec, San, Usage};

const ONE_DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Paths of a throwaway PKI for tests: one CA plus server, client and peer
/// certificates (each key PKCS#8, mode 0600), all valid for one day from creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// Directory holding all files.
    pub dir: PathBuf,
    /// `<name>-ca.pem`: the CA certificate, for trust stores.
    pub ca_cert: PathBuf,
    /// `<name>-ca-key.pem`: the CA key, to issue extra certificates via `Authority::from_pem`.
    pub ca_key: PathBuf,
    /// `<name>-server.pem`: serverAuth, SANs localhost, 127.0.0.1 and ::1.
    pub server_cert: PathBuf,
    /// `<name>-server-key.pem`.
    pub server_key: PathBuf,
    /// `<name>-client.pem`: clientAuth, CN `root` so etcd with auth on maps it to user root.
    pub client_cert: PathBuf,
    /// `<name>-client-key.pem`.
    pub client_key: PathBuf,
    /// `<name>-peer.pem`: serverAuth + clientAuth, same SANs as the server certificate.
    pub peer_cert: PathBuf,
    /// `<name>-peer-key.pem`.
    pub peer_key: PathBuf,
}

impl DevPki {
    /// Creates `dir` if needed and writes a fresh CA and leaf certificates into it,
    /// overwriting files of the same names.
    pub fn create(dir: &Path, name: &str) -> Result<DevPki, CertError> {
        fs::create_dir_all(dir).map_err(|error| CertError::Write { path: dir.to_owned(), error })?;
        let file = |suffix: &str| dir.join(format!("{name}-{suffix}.pem"));
        let pki = DevPki {
            dir: dir.to_owned(),
            ca_cert: file("ca"),
            ca_key: file("ca-key"),
            server_cert: file("server"),
            server_key: file("server-key"),
            client_cert: file("client"),
            client_key: file("client-key"),
            peer_cert: file("peer"),
            peer_key: file("peer-key"),
        };

        let ca = Authority::new(&format!("{name} dev CA"), ONE_DAY)?;
        write_public(&pki.ca_cert, ca.cert_pem())?;
        write_secret(&pki.ca_key, &ca.key_pem())?;

        let local_sans = vec![
            San::Dns("localhost".to_owned()),
            San::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            San::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ];
        let leaves = [
            (format!("{name}-server"), local_sans.clone(), Usage::Server, &pki.server_cert, &pki.server_key),
            ("root".to_owned(), Vec::new(), Usage::Client, &pki.client_cert, &pki.client_key),
            (format!("{name}-peer"), local_sans, Usage::Peer, &pki.peer_cert, &pki.peer_key),
        ];
        for (common_name, sans, usage, cert_path, key_path) in leaves {
            let issued =
                ca.issue(&LeafSpec { common_name, sans, usage, validity: ONE_DAY, not_before_offset: None })?;
            write_public(cert_path, &issued.cert_pem)?;
            write_secret(key_path, &issued.key_pem)?;
        }
        Ok(pki)
    }
}

fn write_public(path: &Path, contents: &str) -> Result<(), CertError> {
    fs::write(path, contents).map_err(|error| CertError::Write { path: path.to_owned(), error })
}

fn write_secret(path: &Path, contents: &str) -> Result<(), CertError> {
    let write = || -> std::io::Result<()> {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            options.mode(0o600);
            let file = options.open(path)?;
            // mode() only applies to new files; tighten a pre-existing one
            // before the secret lands in it.
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
            write_all(file, contents)
        }
        #[cfg(not(unix))]
        write_all(options.open(path)?, contents)
    };
    write().map_err(|error| CertError::Write { path: path.to_owned(), error })
}

fn write_all(mut file: fs::File, contents: &str) -> std::io::Result<()> {
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}
