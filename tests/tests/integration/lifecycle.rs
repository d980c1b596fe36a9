//! The proxy process: it refuses bad configuration before binding anything, says clearly when
//! no member can be reached, and on SIGTERM ends streams with a status and exits cleanly.

use std::process::Command;
use std::time::Duration;

use etcd_client::WatchOptions;
use etcd_compat_tests::{free_port, http_get, EtcdVersion};

use crate::support::{
    assert_flags_in_help_with_env_twins, connect, grpc_status, run_proxy, runtime, start_proxy, Deployment, Wire,
    PROXY_BIN,
};

#[test]
fn bad_configuration_fails_fast_with_a_clear_message() {
    let port = free_port().expect("port");
    let listen = format!("--listen-addr=127.0.0.1:{port}");
    let cases: [(&[&str], &str); 5] = [
        (
            &["start", "--endpoints=127.0.0.1", &listen],
            "invalid --endpoints \"127.0.0.1\": the port is missing; etcd's client port is usually 2379",
        ),
        (
            &["start", "--namespace=/tenant/", &listen],
            "--namespace is not supported: namespacing is not implemented yet",
        ),
        (
            &["start", "--cert-file=/nonexistent/server.pem", "--key-file=/nonexistent/server-key.pem", &listen],
            "/nonexistent/server.pem",
        ),
        (
            &["start", "--dial-timeout=soon", &listen],
            "invalid --dial-timeout \"soon\": expected a positive duration such as 500ms, 2s, 1m",
        ),
        (&["start", "--config=/nonexistent/proxy.toml", &listen], "cannot read config file /nonexistent/proxy.toml"),
    ];
    for (args, expected) in cases {
        let (code, stderr) = run_proxy(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in {stderr:?}");
    }
    // Nothing was bound: the port is still free.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the listen port was never bound");

    let (code, stderr) = run_proxy(&["start", "--no-such-flag"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("unexpected argument '--no-such-flag'"), "{stderr}");
}

#[test]
fn every_flag_has_an_environment_twin_and_help() {
    assert_flags_in_help_with_env_twins(&[
        "endpoints",
        "listen-addr",
        "advertise-client-url",
        "metrics-addr",
        "admin-token-file",
        "cert-file",
        "key-file",
        "trusted-ca-file",
        "cert",
        "key",
        "cacert",
        "insecure-skip-tls-verify",
        "max-concurrent-streams",
        "max-held-request-bytes",
        "max-held-response-bytes",
        "unread-response-timeout",
        "serializable-cache-bytes",
        "watch-coalescing",
        "reuse-port",
        "session-key-file",
        "workers",
        "quota-backend-bytes",
        "history-warning-revisions",
        "doctor-scan-bytes",
        "debug",
        "data-dir",
        "namespace",
    ]);
}

/// Starts the binary with `args` and `env`, waits for `/health` on `metrics`, returns the body.
fn health_of_proxy_started_with(args: &[String], env: &[(&str, String)], metrics: u16) -> String {
    let mut child =
        Command::new(PROXY_BIN).args(args).envs(env.iter().map(|(k, v)| (k, v))).spawn().expect("spawn proxy");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], metrics));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        if let Ok((_, body)) = http_get(addr, "/health", Duration::from_secs(2)) {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "proxy did not serve /health on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    body
}

#[test]
fn environment_and_config_file_configure_the_proxy() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("proxy.toml");
    let (listen, metrics) = (free_port().expect("port"), free_port().expect("port"));
    std::fs::write(
        &config,
        format!("listen-addr = \"127.0.0.1:{listen}\"\nmetrics-addr = \"http://127.0.0.1:{metrics}\"\nendpoints = [\"127.0.0.1:1\"]\n"),
    )
    .expect("write config");
    let health =
        health_of_proxy_started_with(&["start".into(), format!("--config={}", config.display())], &[], metrics);
    assert!(health.contains("\"endpoint\":\"http://127.0.0.1:1\""), "{health}");

    // The environment beats the file; a flag beats the environment.
    let (listen, metrics) = (free_port().expect("port"), free_port().expect("port"));
    let env = [
        ("ETCD_COMPAT_PROXY_CONFIG", config.display().to_string()),
        ("ETCD_COMPAT_PROXY_LISTEN_ADDR", format!("127.0.0.1:{listen}")),
        ("ETCD_COMPAT_PROXY_METRICS_ADDR", format!("http://127.0.0.1:{metrics}")),
        ("ETCD_COMPAT_PROXY_ENDPOINTS", "127.0.0.1:2,127.0.0.1:3".to_owned()),
    ];
    let health = health_of_proxy_started_with(&["start".into(), "--endpoints=127.0.0.1:4".into()], &env, metrics);
    assert!(health.contains("\"members\":[{\"endpoint\":\"http://127.0.0.1:4\""), "{health}");
    assert!(!health.contains("127.0.0.1:2"), "{health}");
}

#[test]
fn unreachable_cluster_gives_unavailable_with_the_reason() {
    let dead = free_port().expect("port");
    // The proxy starts even when etcd is down.
    let proxy = start_proxy(vec![format!("--endpoints=127.0.0.1:{dead}"), "--dial-timeout=500ms".into()]);
    let (status, health) = proxy.http_get("/health");
    assert_eq!(status, 503, "{health}");
    assert!(health.starts_with("{\"health\":\"false\",\"reason\":\"no etcd member is reachable\""), "{health}");

    let runtime = runtime();
    runtime.block_on(async {
        // The proxy accepts the connection.
        let mut client = connect(&proxy.endpoint()).await;
        assert_eq!(
            grpc_status(client.get("k", None).await),
            (
                "Unavailable".to_owned(),
                format!(
                    "etcd-compat-proxy: no etcd member could serve the request (cannot connect to http://127.0.0.1:{dead}: Connection refused (os error 111)); check that the members in --endpoints are running and reachable"
                )
            )
        );
    });
}

#[test]
fn sigterm_ends_streams_with_a_status_and_exits_cleanly() {
    let mut deployment = Deployment::start(EtcdVersion::V3_5, 1, Wire::Plain, &["--shutdown-grace=5s"]);
    let runtime = runtime();
    let endpoint = deployment.endpoint.clone();
    let mut stream = runtime.block_on(async {
        let mut client = connect(&endpoint).await;
        let mut stream = client.watch("/shutdown/k", Some(WatchOptions::new())).await.expect("watch");
        client.put("/shutdown/k", "before", None).await.expect("put");
        // The first message may be the creation notice; wait for the event itself.
        loop {
            let message = stream.message().await.expect("watch message").expect("stream open");
            if let Some(event) = message.events().first() {
                assert_eq!(event.kv().expect("kv").value(), b"before");
                break;
            }
        }
        stream
    });

    deployment.proxy.sigterm().expect("SIGTERM");
    let ended = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), stream.message()).await });
    assert_eq!(
        grpc_status(ended.expect("the watch ended within the grace period")),
        ("Unavailable".to_owned(), "etcd-compat-proxy is shutting down; reconnect to continue".to_owned())
    );
    let exit = deployment.proxy.wait_exit(Duration::from_secs(10)).expect("proxy exits");
    assert!(exit.success(), "proxy exited with {exit}");
}

/// `--insecure-skip-tls-verify` reaches a member whose CA the proxy was not given (and still
/// presents its client certificate); verifying against another CA, the member is reported
/// unhealthy with the reason.
#[test]
fn insecure_skip_tls_verify_accepts_an_unknown_ca() {
    let pki_dir = tempfile::tempdir().expect("pki dir");
    let pki = etcd_compat_certs::DevPki::create(pki_dir.path(), "cluster").expect("pki");
    let spec = etcd_compat_tests::ClusterSpec::new(EtcdVersion::V3_5, 1)
        .with_tls(etcd_compat_tests::TlsSpec::from_dev_pki(&pki));
    let cluster = etcd_compat_tests::EtcdCluster::start(spec).expect("cluster");
    let other = etcd_compat_certs::DevPki::create(pki_dir.path(), "other").expect("other pki");
    let start = |skip: bool| {
        let mut args = vec![
            format!("--endpoints={}", cluster.client_urls()[0]),
            format!("--cert={}", pki.client_cert.display()),
            format!("--key={}", pki.client_key.display()),
            "--health-interval=200ms".to_owned(),
        ];
        args.push(match skip {
            true => "--insecure-skip-tls-verify".to_owned(),
            false => format!("--cacert={}", other.ca_cert.display()),
        });
        start_proxy(args)
    };
    let skipping = start(true);
    let endpoint = skipping.endpoint();
    etcd_compat_tests::etcdctl_ok(EtcdVersion::V3_5, &endpoint, None, &["put", "/skip", "1"]);
    let got =
        etcd_compat_tests::etcdctl_ok(EtcdVersion::V3_5, &endpoint, None, &["get", "/skip", "--print-value-only"]);
    assert_eq!(got.trim(), "1");

    let verifying = start(false);
    std::thread::sleep(Duration::from_millis(600));
    let (code, health) = verifying.http_get("/health");
    assert_eq!(code, 503, "{health}");
    assert!(health.contains("UnknownIssuer"), "{health}");
}
