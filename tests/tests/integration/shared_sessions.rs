//! Sessions any replica accepts (`--session-key-file`): a client that authenticated through one
//! proxy process keeps its token through another that shares the key file, and through the first
//! one restarted (the Rust client, etcdctl, the legacy Python etcd3 client); tokens no key opens are
//! refused with etcd's own `invalid auth token`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use etcd_client::WatchOptions;
use etcd_compat_certs::DevPki;
use etcd_compat_proto::etcdserverpb::{AuthenticateRequest, AuthenticateResponse, PutRequest};
use etcd_compat_tests::{
    etcd3_python, etcdctl_ok, free_port, grpc_frame, workspace_root, ClientTls, ClusterSpec, EtcdCluster, EtcdVersion,
    ProxyProcess,
};
use prost::Message;

use crate::auth_sessions::{app_client, enable_auth, invalid_token, APP_PASSWORD};
use crate::support::{both_versions, grpc_status, path, raw_unary, runtime, start_proxy};

/// A new key, made exactly as the README says: `head -c 32 /dev/urandom | base64`.
fn new_key() -> String {
    let output =
        Command::new("sh").args(["-c", "head -c 32 /dev/urandom | base64"]).output().expect("make a session key");
    assert!(output.status.success());
    String::from_utf8(output.stdout).expect("base64").trim().to_owned()
}

fn write_keys(file: &Path, keys: &[&str]) {
    std::fs::write(file, keys.join("\n") + "\n").expect("write the key file");
}

/// A proxy on the shared `listen` address (`--reuse-port`), with the key file.
fn replica(cluster: &EtcdCluster, listen: &str, keys: &Path) -> ProxyProcess {
    start_proxy(replica_args(cluster, listen, keys))
}

fn replica_args(cluster: &EtcdCluster, listen: &str, keys: &Path) -> Vec<String> {
    vec![
        format!("--endpoints={}", cluster.client_endpoints_csv()),
        "--reuse-port".to_owned(),
        format!("--listen-addr={listen}"),
        format!("--session-key-file={}", path(keys)),
        "--cert-reload-interval=100ms".to_owned(),
        "--shutdown-grace=2s".to_owned(),
    ]
}

fn stop(mut proxy: ProxyProcess) {
    proxy.sigterm().expect("SIGTERM");
    let exit = proxy.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(exit.success(), "{exit}");
}

/// A Put of `/app/raw` with `token` on a connection of its own: (grpc-status, grpc-message).
async fn put_with_token(proxy: &ProxyProcess, token: &str) -> (String, String) {
    let request =
        PutRequest { key: Bytes::from_static(b"/app/raw"), value: Bytes::from_static(b"v"), ..Default::default() };
    let answer = raw_unary(
        proxy.listen_addr(),
        "/etcdserverpb.KV/Put",
        &[("token", token)],
        grpc_frame(&request.encode_to_vec()),
    )
    .await;
    (answer.field("grpc-status").unwrap_or_default(), answer.field("grpc-message").unwrap_or_default())
}

async fn authenticate(proxy: &ProxyProcess) -> String {
    let request = AuthenticateRequest { name: "app".to_owned(), password: APP_PASSWORD.to_owned() };
    let answer =
        raw_unary(proxy.listen_addr(), "/etcdserverpb.Auth/Authenticate", &[], grpc_frame(&request.encode_to_vec()))
            .await;
    assert_eq!(answer.field("grpc-status").as_deref(), Some("0"), "{:?}", answer.field("grpc-message"));
    AuthenticateResponse::decode(&answer.body[5..]).expect("AuthenticateResponse").token
}

fn any_replica_accepts_the_session(version: EtcdVersion) {
    let cluster = EtcdCluster::start(ClusterSpec::new(version, 1)).expect("cluster");
    enable_auth(&cluster);
    let dir = tempfile::tempdir().expect("dir");
    let keys: PathBuf = dir.path().join("session-keys");
    let first_key = new_key();
    write_keys(&keys, &[&first_key]);
    let listen = format!("127.0.0.1:{}", free_port().expect("port"));
    let endpoint = format!("http://{listen}");
    let runtime = runtime();

    let first = replica(&cluster, &listen, &keys);
    let mut client = runtime.block_on(app_client(&endpoint));
    let lease = runtime.block_on(async {
        client.put("/app/first", "1", None).await.expect("put through the first replica");
        client.lease_grant(30, None).await.expect("lease").id()
    });

    // The first replica goes; the client's connection comes back to the second, with its token.
    let second = replica(&cluster, &listen, &keys);
    stop(first);
    runtime.block_on(async {
        client.put("/app/second", "2", None).await.expect("put through the second replica, same token");
        let got = client.get("/app/first", None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), b"1");
        // Streams re-opened on the other replica: no auth error.
        let mut watch = client.watch("/app/w", Some(WatchOptions::new())).await.expect("watch");
        let created = watch.message().await.expect("created").expect("open");
        assert!(created.created() && !created.canceled(), "{created:?}");
        client.put("/app/w", "event", None).await.expect("put the watched key");
        let event = watch.message().await.expect("event").expect("open");
        assert_eq!(event.events()[0].kv().expect("kv").value(), b"event");
        let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.expect("keep-alive stream");
        keeper.keep_alive().await.expect("keep-alive");
        let answer = answers.message().await.expect("answer").expect("open");
        assert_eq!((answer.id(), answer.ttl()), (lease, 30));
    });
    for ctl in [EtcdVersion::V3_4, EtcdVersion::V3_5] {
        let user = format!("--user=app:{APP_PASSWORD}");
        etcdctl_ok(ctl, &endpoint, None, &[&user, "put", "/app/ctl", "x"]);
    }

    // The first replica restarted: the same token still works.
    let restarted = replica(&cluster, &listen, &keys);
    stop(second);
    runtime.block_on(async {
        client.put("/app/restarted", "3", None).await.expect("put through the restarted first replica");
    });

    // Forged, truncated and foreign tokens; then a rotated-out one.
    runtime.block_on(async {
        let token = authenticate(&restarted).await;
        assert_eq!(put_with_token(&restarted, &token).await, ("0".to_owned(), String::new()));
        let invalid = (16.to_string(), invalid_token().1);
        let mut forged: Vec<char> = token.chars().collect();
        let at = forged.len() / 2;
        forged[at] = if forged[at] == 'A' { 'B' } else { 'A' };
        assert_eq!(put_with_token(&restarted, &forged.into_iter().collect::<String>()).await, invalid, "forged");
        assert_eq!(put_with_token(&restarted, &token[..token.len() - 4]).await, invalid, "truncated");
        assert_eq!(put_with_token(&restarted, "ecp.").await, invalid, "empty");

        let other_dir = tempfile::tempdir().expect("dir");
        let other_keys = other_dir.path().join("keys");
        write_keys(&other_keys, &[&new_key()]);
        let stranger = start_proxy(vec![
            format!("--endpoints={}", cluster.client_endpoints_csv()),
            format!("--session-key-file={}", path(&other_keys)),
        ]);
        assert_eq!(put_with_token(&stranger, &token).await, invalid, "a token sealed with another key");

        // Rotation: a new first key seals, the old one still opens until it is removed.
        let new_first = new_key();
        write_keys(&keys, &[&new_first, &first_key]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rotated = authenticate(&restarted).await;
        assert_eq!(put_with_token(&restarted, &token).await, ("0".to_owned(), String::new()), "old key kept");
        write_keys(&keys, &[&new_first]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(put_with_token(&restarted, &token).await, invalid, "rotated out");
        assert_eq!(put_with_token(&restarted, &rotated).await, ("0".to_owned(), String::new()), "new key");
        // The long-lived client's token was sealed with the removed key too.
        assert_eq!(grpc_status(client.put("/app/after", "4", None).await), invalid_token());

        // A changed password revokes the user's tokens: in the process that held the session,
        // and in one that opens the token afresh.
        let root = "--user=root:rootpw";
        cluster.etcdctl_ok(&[root, "user", "delete", "app"]);
        cluster.etcdctl_ok(&[root, "user", "add", "app:a-new-password"]);
        cluster.etcdctl_ok(&[root, "user", "grant-role", "app", "app"]);
        assert_eq!(put_with_token(&restarted, &rotated).await, invalid, "password changed");
        assert_eq!(put_with_token(&restarted, &rotated).await, invalid, "replayed after the change");
        // On an address of its own, so that the kernel cannot hand the call to the other one.
        let fresh = start_proxy(vec![
            format!("--endpoints={}", cluster.client_endpoints_csv()),
            format!("--session-key-file={}", path(&keys)),
        ]);
        assert_eq!(put_with_token(&fresh, &rotated).await, invalid, "opened afresh after the change");
        drop(fresh);
    });
    let log = restarted.log_contents();
    assert!(log.contains("session keys reloaded"), "{log}");
    for secret in [APP_PASSWORD, first_key.as_str()] {
        assert!(!log.contains(secret), "a secret reached the log");
    }
}

both_versions!(
    any_replica_accepts_the_session => any_replica_accepts_the_session_3_4, any_replica_accepts_the_session_3_5
);

/// The legacy Python client (etcd3 0.12, which authenticates once when it is made) logs in
/// through one replica and keeps calling while that replica is replaced by another on the same
/// address: every call succeeds, with the first one's token. TLS, because grpcio sends tokens
/// over TLS only. (A grpcio client that is idle while its proxy goes away reads the old
/// connection's GOAWAY only with its next call, which then fails with `Unavailable`, as it does
/// when etcd itself restarts; see the README.)
fn python_client_keeps_its_token_across_replicas(version: EtcdVersion) {
    let cluster = EtcdCluster::start(ClusterSpec::new(version, 1)).expect("cluster");
    enable_auth(&cluster);
    let dir = tempfile::tempdir().expect("dir");
    let pki = DevPki::create(dir.path(), "proxy").expect("listener pki");
    let keys = dir.path().join("session-keys");
    write_keys(&keys, &[&new_key()]);
    let listen = format!("127.0.0.1:{}", free_port().expect("port"));
    let tls_replica = || {
        let mut args = replica_args(&cluster, &listen, &keys);
        args.push(format!("--cert-file={}", path(&pki.server_cert)));
        args.push(format!("--key-file={}", path(&pki.server_key)));
        start_proxy(args)
    };
    let first = tls_replica();
    let tls = ClientTls::from_dev_pki(&pki);
    let stop_file = dir.path().join("stop");
    let mut python = Command::new(etcd3_python())
        .arg(workspace_root().join("tests/python/calls_until.py"))
        .args([&listen, "app", APP_PASSWORD, "/app/py/k"])
        .arg(&stop_file)
        .args([&tls.ca_cert, &tls.cert, &tls.key])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python");
    // The client has logged in through the first replica once that one answered an Authenticate.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !first
        .http_get("/metrics")
        .1
        .lines()
        .any(|line| line.starts_with("grpc_server_handled_total{") && line.contains("grpc_method=\"Authenticate\""))
    {
        assert!(std::time::Instant::now() < deadline, "the Python client never logged in");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = tls_replica();
    stop(first);
    // Calls go on through the second replica for a while.
    let served_before = puts_served(&second);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while puts_served(&second) < served_before + 20 {
        assert!(std::time::Instant::now() < deadline, "the Python client's calls never reached the second replica");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&stop_file, "").expect("stop the client");
    let mut printed = String::new();
    python.stdout.take().expect("stdout").read_to_string(&mut printed).expect("read");
    assert!(python.wait().expect("python exits").success());
    assert!(printed.starts_with("OK "), "every call succeeded, through both replicas: {printed}");
    assert!(!second.http_get("/metrics").1.contains("grpc_method=\"Authenticate\""), "no new login on the second");
}

/// Puts the proxy has answered.
fn puts_served(proxy: &ProxyProcess) -> u64 {
    proxy
        .http_get("/metrics")
        .1
        .lines()
        .filter(|line| line.starts_with("grpc_server_handled_total{") && line.contains("grpc_method=\"Put\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

both_versions!(
    python_client_keeps_its_token_across_replicas
        => python_client_keeps_its_token_across_replicas_3_4, python_client_keeps_its_token_across_replicas_3_5
);

/// A malformed or short key is refused at startup, naming the line.
#[test]
fn bad_session_keys_are_refused_at_startup() {
    let dir = tempfile::tempdir().expect("dir");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{}\nc2hvcnQ=\n", new_key())).expect("write");
    let (code, stderr) = crate::support::run_proxy(&["start", &format!("--session-key-file={}", path(&keys))]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("line 2: 5 bytes, shorter than 32; make a key with `head -c 32 /dev/urandom | base64`"),
        "{stderr}"
    );
}
