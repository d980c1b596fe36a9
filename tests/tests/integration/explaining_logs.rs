//! Logs that explain: a failure from the field reports, seen by clients through the proxy, is
//! logged once a minute with its likely cause and the command that helps, however many clients
//! meet it.

use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use etcd_compat_certs::DevPki;
use etcd_compat_tests::{
    fill_until_nospace, quota_arg, ClusterSpec, EtcdCluster, EtcdVersion, TlsSpec, NOSPACE_MESSAGE, SMALL_QUOTA_BYTES,
};

use crate::support::{both_versions, connect, grpc_status, path, runtime, start_proxy, Deployment, Wire};

/// The proxy's log lines that explain `cause` (the value of their `cause` field).
fn explaining_lines<'a>(log: &'a str, cause: &str) -> Vec<&'a str> {
    let field = format!("cause=\"{cause}\"");
    log.lines().filter(|line| line.contains(&field)).collect()
}

fn nospace_is_explained_once(version: EtcdVersion) {
    let spec = ClusterSpec::new(version, 1).with_extra_args([quota_arg(SMALL_QUOTA_BYTES)]);
    let deployment = Deployment::start_with(spec, Wire::Plain, &[]);
    let member = deployment.cluster.client_urls()[0].clone();
    runtime().block_on(async {
        // Filled around the proxy: every NOSPACE it sees is one of the Puts below.
        let mut direct = connect(&member).await;
        let filled = fill_until_nospace(&mut direct, "/fill/", 4 * SMALL_QUOTA_BYTES).await.expect("fill");
        assert!(filled.values > 0, "{filled:?}");
        let mut proxied = connect(&deployment.endpoint).await;
        for i in 0..20 {
            let status = grpc_status(proxied.put(format!("/after-fill/{i}"), "v", None).await);
            assert_eq!(status, ("ResourceExhausted".to_owned(), NOSPACE_MESSAGE.to_owned()), "put {i}");
        }
    });
    // The line is written before the call's status is sent: the log is complete here.
    let log = deployment.proxy.log_contents();
    let lines = explaining_lines(&log, "nospace");
    assert_eq!(lines.len(), 1, "one explaining line for 20 refused Puts:\n{log}");
    let line = lines[0];
    for expected in
        ["WARN", "database space exceeded", "`etcd-compat-proxy recover-space`", "`etcd-compat-proxy doctor`"]
    {
        assert!(line.contains(expected), "{expected:?} missing from {line}");
    }
    assert!(line.contains("method=\"/etcdserverpb.KV/Put\""), "{line}");
    assert!(line.contains("once a minute"), "{line}");
}

both_versions!(nospace_is_explained_once => nospace_is_explained_once_3_4, nospace_is_explained_once_3_5);

#[test]
fn repeated_failed_logins_are_explained_once_naming_the_user() {
    let deployment = Deployment::start(EtcdVersion::V3_5, 1, Wire::Plain, &[]);
    let member = deployment.cluster.client_urls()[0].clone();
    let wrong_password = "not-the-password-4f1c";
    runtime().block_on(async {
        let mut direct = connect(&member).await;
        direct.user_add("root", "rootpw", None).await.expect("root");
        direct.user_grant_role("root", "root").await.expect("root role");
        direct.user_add("mallory", "mallorypw", None).await.expect("user");
        direct.auth_enable().await.expect("auth enable");
        let failed_login = || async {
            let options = ConnectOptions::new().with_user("mallory", wrong_password);
            match Client::connect([deployment.endpoint.as_str()], Some(options)).await {
                Err(etcd_client::Error::GRpcStatus(status)) => {
                    assert_eq!(status.message(), "etcdserver: authentication failed, invalid user ID or password")
                }
                Err(other) => panic!("expected a status, got {other}"),
                Ok(_) => panic!("a login with a wrong password succeeded"),
            }
        };
        // One mistyped password is not worth a warning; five in a minute are.
        for _ in 0..4 {
            failed_login().await;
        }
        let log = deployment.proxy.log_contents();
        assert_eq!(explaining_lines(&log, "login_failures"), Vec::<&str>::new(), "said before the threshold");
        for _ in 0..4 {
            failed_login().await;
        }
        // Right credentials say nothing.
        Client::connect([deployment.endpoint.as_str()], Some(ConnectOptions::new().with_user("mallory", "mallorypw")))
            .await
            .expect("login with the right password");
    });
    let log = deployment.proxy.log_contents();
    let lines = explaining_lines(&log, "login_failures");
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("user=\"mallory\""), "{}", lines[0]);
    assert!(lines[0].contains("`etcd-compat-proxy doctor`"), "{}", lines[0]);
    for secret in [wrong_password, "mallorypw", "rootpw"] {
        assert!(!log.contains(secret), "{secret:?} reached the proxy log");
    }
}

#[test]
fn a_refused_member_certificate_is_explained_once_naming_the_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster_pki = DevPki::create(dir.path(), "cluster").expect("cluster pki");
    // The proxy trusts another CA than the one that signed the member's certificate, as after a
    // CA change that reached the members before the proxy.
    let other_pki = DevPki::create(dir.path(), "other").expect("other pki");
    let spec = ClusterSpec::new(EtcdVersion::V3_5, 1).with_tls(TlsSpec::from_dev_pki(&cluster_pki));
    let cluster = EtcdCluster::start(spec).expect("cluster");
    let member = cluster.client_urls()[0].clone();
    let proxy = start_proxy(vec![
        format!("--endpoints={member}"),
        format!("--cacert={}", path(&other_pki.ca_cert)),
        format!("--cert={}", path(&cluster_pki.client_cert)),
        format!("--key={}", path(&cluster_pki.client_key)),
        "--health-interval=100ms".to_owned(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while explaining_lines(&proxy.log_contents(), "member_certificate").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Many more dials fail meanwhile (every health check dials): still one line.
    std::thread::sleep(Duration::from_secs(2));
    let log = proxy.log_contents();
    let lines = explaining_lines(&log, "member_certificate");
    assert_eq!(lines.len(), 1, "{log}");
    let line = lines[0];
    assert!(line.contains(&format!("endpoint=\"{member}\"")), "{line}");
    assert!(line.contains("`etcd-compat-proxy certs inspect --endpoints`"), "{line}");
    assert!(line.contains("invalid peer certificate"), "{line}");
}
