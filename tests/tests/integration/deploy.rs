//! The packaging in `deploy/`: the systemd unit passes `systemd-analyze verify`, the Kubernetes
//! YAML parses, every flag and variable they use exists, and the unit's settings and the
//! sidecar's flags run the proxy against a real TLS cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_compat_certs::DevPki;
use etcd_compat_tests::{
    etcd3_python, etcdctl_ok, free_port, http_get, workspace_root, ClusterSpec, EtcdCluster, EtcdVersion, TlsSpec,
};

use crate::support::{path, start_proxy, Running, PROXY_BIN};

fn deploy_file(relative: &str) -> PathBuf {
    workspace_root().join("deploy").join(relative)
}

/// `start --help` of the binary under test.
fn start_help() -> String {
    let output = Command::new(PROXY_BIN).args(["start", "--help"]).output().expect("start --help");
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Every container of the Kubernetes examples, as `deploy_yaml.py` reads them with PyYAML.
fn kubernetes_containers() -> Vec<serde_json::Value> {
    let files = ["kubernetes/sidecar.yaml", "kubernetes/shared.yaml"].map(|f| path(&deploy_file(f)));
    let output = Command::new(etcd3_python())
        .arg(workspace_root().join("tests/python/deploy_yaml.py"))
        .args(&files)
        .output()
        .expect("run deploy_yaml.py");
    assert!(output.status.success(), "the YAML does not parse: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout).expect("JSON")
}

fn proxy_args(containers: &[serde_json::Value], file: &str) -> Vec<String> {
    let container = containers
        .iter()
        .find(|c| c["file"].as_str().is_some_and(|f| f.ends_with(file)) && c["container"] == "etcd-compat-proxy")
        .unwrap_or_else(|| panic!("no etcd-compat-proxy container in {file}"));
    container["args"].as_array().expect("args").iter().map(|a| a.as_str().expect("arg").to_owned()).collect()
}

/// `NAME=value` lines of an environment file (comments and blank lines skipped).
fn env_file(file: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(file).expect("read the env file");
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (name, value) = line.split_once('=').unwrap_or_else(|| panic!("not NAME=value: {line}"));
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

#[test]
fn the_systemd_unit_verifies() {
    let dir = tempfile::tempdir().expect("dir");
    let unit = std::fs::read_to_string(deploy_file("systemd/etcd-compat-proxy.service")).expect("read the unit");
    // The binary and the env file where this checkout has them; everything else as shipped.
    let binary = std::fs::canonicalize(PROXY_BIN).expect("binary path");
    let unit = unit
        .replace("/usr/local/bin/etcd-compat-proxy", &path(&binary))
        .replace("/etc/etcd-compat-proxy/env", &path(&deploy_file("systemd/etcd-compat-proxy.env")));
    let file = dir.path().join("etcd-compat-proxy.service");
    std::fs::write(&file, unit).expect("write the unit");
    let output = Command::new("systemd-analyze").arg("verify").arg(&file).output().expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Unknown or misspelled settings are only warnings: any output at all fails the test.
    assert!(output.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}

#[test]
fn deploy_files_use_only_flags_that_exist() {
    let help = start_help();
    let mut checked = 0;
    let mut flag_exists = |flag: &str, whence: &str| {
        let name = flag.split('=').next().unwrap_or(flag);
        assert!(
            help.contains(&format!("{name} ")) || help.contains(&format!("{name}\n")),
            "{whence}: {name} is not a flag of `start`"
        );
        checked += 1;
    };
    let containers = kubernetes_containers();
    for file in ["sidecar.yaml", "shared.yaml"] {
        let args = proxy_args(&containers, file);
        assert_eq!(args.first().map(String::as_str), Some("start"), "{file}");
        for arg in &args[1..] {
            assert!(arg.starts_with("--"), "{file}: {arg}");
            flag_exists(arg, file);
        }
    }
    let env_exists = |name: &str, whence: &str| {
        assert!(help.contains(&format!("env: {name}=")), "{whence}: {name} is not the env twin of a flag");
    };
    for name in env_file(&deploy_file("systemd/etcd-compat-proxy.env")).keys() {
        env_exists(name, "etcd-compat-proxy.env");
    }
    // The unit's own (commented) Environment= lines, which operators uncomment.
    let unit = std::fs::read_to_string(deploy_file("systemd/etcd-compat-proxy.service")).expect("read the unit");
    let mut in_unit = 0;
    for line in unit.lines() {
        if let Some(setting) = line.trim_start_matches('#').strip_prefix("Environment=") {
            env_exists(setting.split('=').next().unwrap_or(setting), "etcd-compat-proxy.service");
            in_unit += 1;
        }
    }
    assert_eq!((checked, in_unit), (13, 3), "flags in the YAML, variables in the unit");
}

fn wait_until_ready(metrics: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, body)) = http_get(metrics, "/ready", Duration::from_millis(500)) {
            assert_eq!(body, "ready\n");
            return;
        }
        assert!(Instant::now() < deadline, "the proxy was not ready within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The env file's settings (as systemd passes them) and the sidecar's flags, each pointed at a
/// real TLS cluster instead of the example addresses, serve a client.
#[test]
fn the_unit_settings_and_the_sidecar_flags_serve_a_tls_cluster() {
    let pki_dir = tempfile::tempdir().expect("pki dir");
    let pki = DevPki::create(pki_dir.path(), "cluster").expect("pki");
    let cluster = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_5, 1).with_tls(TlsSpec::from_dev_pki(&pki)))
        .expect("cluster");
    let endpoints = cluster.client_endpoints_csv();
    let tls = [("ca", path(&pki.ca_cert)), ("cert", path(&pki.client_cert)), ("key", path(&pki.client_key))];

    // The unit: `etcd-compat-proxy start` with the env file's variables.
    let mut env = env_file(&deploy_file("systemd/etcd-compat-proxy.env"));
    let listen = format!("127.0.0.1:{}", free_port().expect("port"));
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port().expect("port")).parse().expect("addr");
    for (name, value) in [
        ("ETCD_COMPAT_PROXY_ENDPOINTS", endpoints.clone()),
        ("ETCD_COMPAT_PROXY_LISTEN_ADDR", listen.clone()),
        ("ETCD_COMPAT_PROXY_METRICS_ADDR", format!("http://{metrics}")),
        ("ETCD_COMPAT_PROXY_CACERT", tls[0].1.clone()),
        ("ETCD_COMPAT_PROXY_CERT", tls[1].1.clone()),
        ("ETCD_COMPAT_PROXY_KEY", tls[2].1.clone()),
    ] {
        assert!(env.insert(name.to_owned(), value).is_some(), "the env file sets {name}");
    }
    let mut command = Command::new(PROXY_BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ETCD_COMPAT_PROXY_") {
            command.env_remove(name);
        }
    }
    let _unit = Running(
        command.arg("start").envs(&env).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start the proxy"),
    );
    wait_until_ready(metrics);
    etcdctl_ok(EtcdVersion::V3_4, &listen, None, &["put", "/deploy/unit", "ok"]);
    let got = etcdctl_ok(EtcdVersion::V3_4, &listen, None, &["get", "/deploy/unit", "--print-value-only"]);
    assert_eq!(got.trim(), "ok");

    // The sidecar: its flags, with the cluster's addresses and files.
    let mut args = proxy_args(&kubernetes_containers(), "sidecar.yaml");
    args.remove(0);
    for arg in args.iter_mut() {
        let (flag, _) = arg.split_once('=').expect("--flag=value");
        let value = match flag {
            "--endpoints" => endpoints.clone(),
            "--cacert" => tls[0].1.clone(),
            "--cert" => tls[1].1.clone(),
            "--key" => tls[2].1.clone(),
            // The harness picks free loopback ports for these.
            "--listen-addr" | "--metrics-addr" => continue,
            other => panic!("the sidecar sets {other}, which this test does not know how to point at the cluster"),
        };
        *arg = format!("{flag}={value}");
    }
    args.retain(|arg| !arg.starts_with("--listen-addr=") && !arg.starts_with("--metrics-addr="));
    let sidecar = start_proxy(args);
    wait_until_ready(sidecar.metrics_addr());
    let endpoint = sidecar.listen_addr().to_string();
    etcdctl_ok(EtcdVersion::V3_5, &endpoint, None, &["put", "/deploy/sidecar", "ok"]);
    let got = etcdctl_ok(EtcdVersion::V3_5, &endpoint, None, &["get", "/deploy/unit", "--print-value-only"]);
    assert_eq!(got.trim(), "ok");
}
