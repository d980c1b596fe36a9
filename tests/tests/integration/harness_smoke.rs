//! Proves the harness itself against real etcd: clusters of both versions start, serve
//! etcdctl, survive member loss, restart from their data, and speak TLS with client
//! certificates; ProxyProcess drives a real `etcd grpc-proxy`.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use etcd_compat_certs::DevPki;
use etcd_compat_tests::{
    etcd3_python, etcdctl, etcdctl_ok, http_get, ClientTls, ClusterSpec, EtcdCluster, EtcdVersion, ProxyProcess,
    TlsSpec,
};

use crate::support::both_versions;

const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

fn client_addr(url: &str) -> SocketAddr {
    url.strip_prefix("http://").expect("plain http client URL").parse().expect("client URL is IP:port")
}

fn single_member_serves_etcdctl(version: EtcdVersion) {
    let mut cluster = EtcdCluster::start(ClusterSpec::new(version, 1)).expect("cluster starts");
    eprintln!("etcd {version} 1-member start: {:?}", cluster.startup_time());
    let endpoint = cluster.client_urls()[0].clone();
    assert_eq!(endpoint, cluster.client_endpoints_csv());
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");

    assert_eq!(etcdctl_ok(version, &endpoint, None, &["put", "greeting", "hello world"]), "OK\n");
    assert_eq!(etcdctl_ok(version, &endpoint, None, &["get", "greeting"]), "greeting\nhello world\n");
    assert_eq!(etcdctl_ok(version, &endpoint, None, &["get", "greeting", "--print-value-only"]), "hello world\n");
    assert_eq!(etcdctl_ok(version, &endpoint, None, &["get", "absent"]), "");
    let failed = etcdctl(version, &endpoint, None, &["no-such-command"]);
    assert!(!failed.status.success());

    let addr = client_addr(&endpoint);
    let (status, body) = http_get(addr, "/version", HTTP_TIMEOUT).expect("GET /version");
    assert_eq!(status, 200);
    let cluster_version = format!("\"etcdcluster\":\"{version}.0\"");
    assert!(body.contains(&cluster_version), "{body}");
    let (status, body) = http_get(addr, "/health", HTTP_TIMEOUT).expect("GET /health");
    assert_eq!(status, 200);
    assert!(body.starts_with("{\"health\":\"true\""), "{body}");

    assert_eq!(cluster.leader_index().expect("leader"), 0);
    let pid_before = cluster.member(0).pid.expect("running member has a pid");
    let status = cluster.stop(0).expect("SIGTERM stops etcd");
    assert!(status.success() || status.signal() == Some(15), "etcd exited with {status}");
    assert_eq!(cluster.member(0).pid, None);
    assert!(cluster.restart(0).is_ok());
    assert_ne!(cluster.member(0).pid, Some(pid_before));
    assert_eq!(cluster.etcdctl_ok(&["get", "greeting"]), "greeting\nhello world\n", "data survives a restart");
}

both_versions!(single_member_serves_etcdctl => single_member_serves_etcdctl_3_4, single_member_serves_etcdctl_3_5);

#[test]
fn three_member_survives_a_killed_member_3_5() {
    let version = EtcdVersion::V3_5;
    let mut cluster = EtcdCluster::start(ClusterSpec::new(version, 3)).expect("cluster starts");
    eprintln!("etcd 3.5 3-member start: {:?}", cluster.startup_time());
    assert_eq!(cluster.len(), 3);
    assert_eq!(cluster.client_endpoints_csv().split(',').count(), 3);
    let leader = cluster.leader_index().expect("leader");
    assert!(leader < 3);

    cluster.kill(1).expect("kill member 1");
    assert_eq!(cluster.member(1).pid, None);
    assert!(!cluster.is_running(1));
    assert!(cluster.kill(1).is_err(), "a dead member cannot be killed twice");
    // If member 1 led, a write sent before the survivors elect a successor is dropped
    // by raft and only fails after etcd's ~7 s request timeout.
    let new_leader = cluster.wait_for_leader(Duration::from_secs(15)).expect("survivors have a leader");
    assert!(new_leader == 0 || new_leader == 2, "leader {new_leader}");

    assert_eq!(cluster.etcdctl_ok(&["put", "survivor", "yes"]), "OK\n");
    for index in [0, 2] {
        let url = cluster.member(index).client_url;
        assert_eq!(etcdctl_ok(version, &url, None, &["get", "survivor"]), "survivor\nyes\n");
    }
    let dead_url = cluster.member(1).client_url;
    // etcdctl 3.5 keeps redialling a refused endpoint until the command timeout.
    let quick = ["--dial-timeout=1s", "--command-timeout=1s", "get", "survivor"];
    assert!(!etcdctl(version, &dead_url, None, &quick).status.success());

    cluster.restart(1).expect("member 1 rejoins");
    assert_eq!(etcdctl_ok(version, &dead_url, None, &["get", "survivor", "--print-value-only"]), "yes\n");
}

#[test]
fn three_member_elects_a_new_leader_after_the_leader_dies_3_4() {
    let mut cluster = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_4, 3)).expect("cluster starts");
    eprintln!("etcd 3.4 3-member start: {:?}", cluster.startup_time());
    let old_leader = cluster.leader_index().expect("leader");
    cluster.kill(old_leader).expect("kill the leader");
    let new_leader = cluster.wait_for_leader(Duration::from_secs(15)).expect("a new leader");
    assert_ne!(new_leader, old_leader);
    assert_eq!(cluster.etcdctl_ok(&["put", "after-election", "1"]), "OK\n");
}

fn tls_single_member_requires_client_cert(version: EtcdVersion) {
    let pki_dir = tempfile::tempdir().expect("tempdir");
    let pki = DevPki::create(pki_dir.path(), "smoke").expect("dev PKI");
    let spec = ClusterSpec::new(version, 1).with_tls(TlsSpec::from_dev_pki(&pki));
    let cluster = EtcdCluster::start(spec).expect("TLS cluster starts");
    eprintln!("etcd {version} TLS 1-member start: {:?}", cluster.startup_time());
    let endpoint = cluster.client_endpoints_csv();
    assert!(endpoint.starts_with("https://127.0.0.1:"), "{endpoint}");

    let client = ClientTls::from_dev_pki(&pki);
    assert_eq!(cluster.client_tls(), Some(&client));
    assert_eq!(etcdctl_ok(version, &endpoint, Some(&client), &["put", "secure", "yes"]), "OK\n");
    assert_eq!(etcdctl_ok(version, &endpoint, Some(&client), &["get", "secure"]), "secure\nyes\n");

    // Trusting the CA is not enough: the server demands a client certificate.
    let ca_only = etcdctl(
        version,
        &endpoint,
        None,
        &[&format!("--cacert={}", pki.ca_cert.display()), "--dial-timeout=1s", "--command-timeout=2s", "get", "secure"],
    );
    assert!(
        !ca_only.status.success(),
        "etcdctl without a client certificate succeeded: {}",
        String::from_utf8_lossy(&ca_only.stdout)
    );
}

both_versions!(
    tls_single_member_requires_client_cert
        => tls_single_member_requires_client_cert_3_4, tls_single_member_requires_client_cert_3_5
);

/// etcd's own grpc-proxy takes the same --listen-addr/--metrics-addr flags as
/// etcd-compat-proxy, so it exercises ProxyProcess before the proxy binary exists.
#[test]
fn proxy_process_drives_etcd_grpc_proxy() {
    let version = EtcdVersion::V3_5;
    let cluster = EtcdCluster::start(ClusterSpec::new(version, 1)).expect("cluster starts");
    let args =
        vec!["grpc-proxy".to_owned(), "start".to_owned(), format!("--endpoints={}", cluster.client_endpoints_csv())];
    let mut proxy = ProxyProcess::start(&version.etcd_bin(), args).expect("grpc-proxy starts");
    let endpoint = proxy.endpoint();
    assert_eq!(endpoint, format!("http://{}", proxy.listen_addr()));
    assert!(proxy.metrics_url().starts_with("http://127.0.0.1:"));

    assert_eq!(etcdctl_ok(version, &endpoint, None, &["put", "via", "proxy"]), "OK\n");
    assert_eq!(cluster.etcdctl_ok(&["get", "via", "--print-value-only"]), "proxy\n");
    assert_eq!(proxy.http_get("/health"), (200, "{\"health\":\"true\",\"reason\":\"\"}".to_owned()));
    let (status, metrics) = proxy.http_get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("grpc_server_handled_total"), "{metrics}");
    assert!(proxy.log_contents().contains("gRPC proxy"));

    proxy.sigterm().expect("SIGTERM sent");
    let status = proxy.wait_exit(Duration::from_secs(10)).expect("grpc-proxy exits on SIGTERM");
    assert!(status.success() || status.signal() == Some(15), "grpc-proxy exited with {status}");
    assert!(proxy.sigterm().is_err(), "an exited proxy cannot be signalled");
}

/// The pinned legacy Python client (later tests drive it through the proxy) must
/// import and talk to a real cluster.
#[test]
fn python_etcd3_client_reads_and_writes() {
    let cluster = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_4, 1)).expect("cluster starts");
    assert_eq!(cluster.etcdctl_ok(&["put", "from-etcdctl", "v1"]), "OK\n");
    let addr = cluster.client_addrs()[0];
    let script = r#"
import sys, etcd3
client = etcd3.client(host=sys.argv[1], port=int(sys.argv[2]))
value, _ = client.get("from-etcdctl")
print(value.decode())
client.put("from-python", "v2")
"#;
    let output = Command::new(etcd3_python())
        .args(["-c", script, &addr.ip().to_string(), &addr.port().to_string()])
        .output()
        .expect("python runs");
    assert!(output.status.success(), "python failed: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "v1\n");
    assert_eq!(cluster.etcdctl_ok(&["get", "from-python", "--print-value-only"]), "v2\n");
}

/// A member that cannot bind must fail the start (after the port-race retries) with
/// its own log in the error, and leave no process behind.
#[test]
fn start_failure_quotes_the_member_log() {
    let occupied = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = occupied.local_addr().expect("local addr").port();
    let spec = ClusterSpec::new(EtcdVersion::V3_5, 1)
        .with_extra_args([format!("--listen-metrics-urls=http://127.0.0.1:{port}")]);
    let error = match EtcdCluster::start(spec) {
        Ok(_) => panic!("etcd started although its metrics port is taken"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("exited with exit status: 1 before becoming ready"), "{error}");
    assert!(error.contains("address already in use"), "{error}");
    assert!(error.contains("--- last 40 lines of "), "{error}");
}
