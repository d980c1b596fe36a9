use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use etcd_compat_certs::DevPki;

use crate::EtcdVersion;

/// Timeouts given to every etcdctl call; later `args` override them because etcdctl
/// takes the last occurrence of a flag.
const DEFAULT_TIMEOUT_ARGS: [&str; 2] = ["--dial-timeout=3s", "--command-timeout=10s"];

/// Client-side TLS material for etcdctl: the CA to trust plus the client certificate
/// and key to present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificate that signed the server certificates.
    pub ca_cert: PathBuf,
    /// Client certificate presented to the server.
    pub cert: PathBuf,
    /// Private key of `cert`.
    pub key: PathBuf,
}

impl ClientTls {
    /// The dev PKI's CA plus its client certificate (CN "root").
    pub fn from_dev_pki(pki: &DevPki) -> ClientTls {
        ClientTls { ca_cert: pki.ca_cert.clone(), cert: pki.client_cert.clone(), key: pki.client_key.clone() }
    }

    /// The etcdctl flags that present this material.
    pub fn etcdctl_args(&self) -> Vec<String> {
        vec![
            format!("--cacert={}", self.ca_cert.display()),
            format!("--cert={}", self.cert.display()),
            format!("--key={}", self.key.display()),
        ]
    }
}

/// An etcdctl command (API v3, endpoints, TLS flags, default timeouts, then `args`) ready
/// to be adjusted (stdin, env) and run. Inherited `ETCDCTL_*` variables are removed so
/// the developer's shell cannot redirect tests to another cluster.
pub fn etcdctl_command(version: EtcdVersion, endpoints: &str, tls: Option<&ClientTls>, args: &[&str]) -> Command {
    let mut command = Command::new(version.etcdctl_bin());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ETCDCTL_") {
            command.env_remove(name);
        }
    }
    command.env("ETCDCTL_API", "3").arg(format!("--endpoints={endpoints}")).args(DEFAULT_TIMEOUT_ARGS);
    if let Some(tls) = tls {
        command.args(tls.etcdctl_args());
    }
    command.args(args).stdin(Stdio::null());
    command
}

/// Runs etcdctl of `version` against `endpoints` (comma-separated) and returns its output,
/// whatever the exit status. Panics only if etcdctl cannot be spawned.
pub fn etcdctl(version: EtcdVersion, endpoints: &str, tls: Option<&ClientTls>, args: &[&str]) -> Output {
    let mut command = etcdctl_command(version, endpoints, tls, args);
    match command.output() {
        Ok(output) => output,
        Err(error) => panic!("cannot run {command:?}: {error}"),
    }
}

/// Like [`etcdctl`], but panics (quoting status, stdout and stderr) unless etcdctl
/// succeeds, and returns its stdout.
pub fn etcdctl_ok(version: EtcdVersion, endpoints: &str, tls: Option<&ClientTls>, args: &[&str]) -> String {
    let output = etcdctl(version, endpoints, tls, args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        panic!(
            "etcdctl {version} {args:?} against {endpoints} failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
        );
    }
    stdout
}
