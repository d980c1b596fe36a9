//! A real etcd cluster with the proxy in front of it, as most proxy tests need.

use std::path::Path;

use etcd_compat_certs::DevPki;
use etcd_compat_tests::{ClientTls, ClusterSpec, EtcdCluster, EtcdVersion, ProxyProcess, TlsSpec};
use tempfile::TempDir;

/// The proxy binary built from this workspace (a thin copy of `proxy/src/main.rs`, so that
/// cargo builds it for these tests).
pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_etcd-compat-proxy-under-test");

/// Whether TLS is on between client and proxy and between proxy and etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// Plaintext both sides (the sidecar setup).
    Plain,
    /// TLS with client certificates on both sides, with two unrelated CAs: the client trusts
    /// only the proxy's CA, the proxy trusts only the cluster's.
    Tls,
}

/// etcd behind the proxy.
pub struct Deployment {
    /// The cluster.
    pub cluster: EtcdCluster,
    /// The proxy in front of every member.
    pub proxy: ProxyProcess,
    /// What a client needs to reach the proxy (TLS only).
    pub client_tls: Option<ClientTls>,
    /// The proxy's address as a client endpoint (`https://` with TLS).
    pub endpoint: String,
    _pki_dir: TempDir,
}

impl Deployment {
    /// Starts `members` members of `version` and the proxy in front of them; `extra` goes to the proxy.
    pub fn start(version: EtcdVersion, members: usize, wire: Wire, extra: &[&str]) -> Deployment {
        Self::start_with(ClusterSpec::new(version, members), wire, extra)
    }

    /// Like [`Deployment::start`] with a custom cluster spec (TLS is added for [`Wire::Tls`]).
    pub fn start_with(spec: ClusterSpec, wire: Wire, extra: &[&str]) -> Deployment {
        let pki_dir = tempfile::tempdir().expect("pki dir");
        let (spec, proxy_tls_args, client_tls) = match wire {
            Wire::Plain => (spec, Vec::new(), None),
            Wire::Tls => {
                let cluster_pki = DevPki::create(pki_dir.path(), "cluster").expect("cluster pki");
                let proxy_pki = DevPki::create(pki_dir.path(), "proxy").expect("proxy pki");
                let args = vec![
                    format!("--cacert={}", path(&cluster_pki.ca_cert)),
                    format!("--cert={}", path(&cluster_pki.client_cert)),
                    format!("--key={}", path(&cluster_pki.client_key)),
                    format!("--cert-file={}", path(&proxy_pki.server_cert)),
                    format!("--key-file={}", path(&proxy_pki.server_key)),
                    format!("--trusted-ca-file={}", path(&proxy_pki.ca_cert)),
                ];
                (spec.with_tls(TlsSpec::from_dev_pki(&cluster_pki)), args, Some(ClientTls::from_dev_pki(&proxy_pki)))
            }
        };
        let cluster = EtcdCluster::start(spec).expect("etcd cluster starts");
        let mut args = vec!["start".to_owned(), format!("--endpoints={}", cluster.client_endpoints_csv())];
        args.extend(proxy_tls_args);
        args.extend(extra.iter().map(|s| s.to_string()));
        let proxy = ProxyProcess::start(Path::new(PROXY_BIN), args).expect("proxy starts");
        let scheme = if client_tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://{}", proxy.listen_addr());
        Deployment { cluster, proxy, client_tls, endpoint, _pki_dir: pki_dir }
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Reads a counter or gauge from Prometheus text: the value of the first line starting with `series`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}
