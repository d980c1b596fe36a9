//! How the control plane (the migration, `doctor`, `recover-space`) reaches a cluster as a
//! client of its own, with the typed `etcd-client` crate: endpoints, TLS files and the etcd user.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::auth::Credentials;
use crate::config::Config;

/// Why a control-plane client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The configuration or its files keep the client from being made.
    #[error("{0}")]
    Setup(String),
    /// etcd could not be reached; `what` says which cluster and endpoints.
    #[error("{what}: {error}")]
    Etcd { what: String, error: etcd_client::Error },
}

/// The TLS files a control-plane client presents and trusts (PEM).
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA bundles the cluster's server certificates must chain to.
    pub cas: Vec<PathBuf>,
    /// Client certificate and key.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// One cluster, as the control plane connects to it.
#[derive(Debug, Clone)]
pub struct ClusterAccess {
    /// Client URLs (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// `None`: plaintext.
    pub tls: Option<TlsFiles>,
    /// The etcd user the control plane acts as, when the cluster has auth enabled.
    pub credentials: Option<Credentials>,
    /// What in the configuration keeps this access from working, said when it is used.
    pub unsupported: Option<String>,
}

impl ClusterAccess {
    /// The cluster behind the proxy, as its configuration reaches it: the same endpoints and TLS
    /// files, and the identity of clients that send no token (`--user`).
    pub fn source_of(config: &Config) -> Self {
        let unsupported = config.upstream_tls.as_ref().and_then(|tls| {
            if tls.insecure_skip_verify {
                Some("--insecure-skip-tls-verify is set: the migration only talks to clusters whose certificates it verifies; pass --cacert")
            } else if tls.server_cn.is_some() {
                Some("--upstream-server-cn is set: the migration's client needs server certificates with a subjectAltName; renew them with `etcd-compat-proxy certs`")
            } else {
                None
            }
        });
        ClusterAccess {
            endpoints: config.endpoints.iter().map(|e| e.url()).collect(),
            tls: config
                .upstream_tls
                .as_ref()
                .map(|tls| TlsFiles { cas: tls.cas.clone(), client_cert: tls.client_cert.clone() }),
            credentials: config.auth.default_identity.clone(),
            unsupported: unsupported.map(str::to_owned),
        }
    }

    /// A client of this cluster; `what` names it in errors ("the target cluster").
    pub async fn connect(&self, what: &str) -> Result<Client, ConnectError> {
        if let Some(why) = &self.unsupported {
            return Err(ConnectError::Setup(format!("cannot reach {what}: {why}")));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(tls) = &self.tls {
            let mut config = TlsOptions::new();
            for ca in &tls.cas {
                config = config.ca_certificate(Certificate::from_pem(read(what, ca)?));
            }
            if let Some((cert, key)) = &tls.client_cert {
                config = config.identity(Identity::from_pem(read(what, cert)?, read(what, key)?));
            }
            options = options.with_tls(config);
        }
        if let Some(credentials) = &self.credentials {
            let password = String::from_utf8_lossy(credentials.password.expose()).into_owned();
            options = options.with_user(credentials.user.clone(), password);
        }
        Client::connect(&self.endpoints, Some(options)).await.map_err(|error| ConnectError::Etcd {
            what: format!("cannot connect to {what} ({})", self.endpoints.join(",")),
            error,
        })
    }
}

fn read(what: &str, path: &PathBuf) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path)
        .map_err(|error| ConnectError::Setup(format!("cannot read {} for {what}: {error}", path.display())))
}
