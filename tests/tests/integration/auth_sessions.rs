//! Clients never see an etcd token expire: not after idling past its TTL, not in a watch created
//! once the stream's token has expired, not on a member that joined after they authenticated.
//! Tokens expire after 2 s, simple and JWT, on etcd 3.4 and 3.5; where a test makes the same calls
//! directly, they fail with etcd's own token errors.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions, WatchOptions};
use etcd_compat_tests::{etcd3_python, etcdctl_ok, workspace_root, ClientTls, ClusterSpec, EtcdCluster, EtcdVersion};

use crate::support::{
    both_versions, connect, grpc_status, metric, openssl, path, runtime, upstream_requests, Deployment, Wire,
};

const TOKEN_TTL: Duration = Duration::from_secs(2);
/// Longer than the token TTL, so every token issued before it has expired.
const IDLE: Duration = Duration::from_secs(5);
const ROOT: &str = "root:rootpw";
pub(crate) const APP_PASSWORD: &str = "apppw-3d1f";

#[derive(Debug, Clone, Copy)]
enum Tokens {
    Simple,
    Jwt,
}

/// A one-member cluster with auth enabled: `root`, and `app` with read-write on `/app/` only.
fn deployment(
    version: EtcdVersion,
    tokens: Tokens,
    wire: Wire,
    proxy_args: &[&str],
) -> (Deployment, tempfile::TempDir) {
    let keys = tempfile::tempdir().expect("key dir");
    let token_args = match tokens {
        Tokens::Simple => vec![format!("--auth-token-ttl={}", TOKEN_TTL.as_secs())],
        Tokens::Jwt => {
            let private = keys.path().join("jwt.key");
            let public = keys.path().join("jwt.pub");
            openssl(&["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", &path(&private)]);
            openssl(&["ec", "-in", &path(&private), "-pubout", "-out", &path(&public)]);
            vec![format!(
                "--auth-token=jwt,pub-key={},priv-key={},sign-method=ES256,ttl={}s",
                path(&public),
                path(&private),
                TOKEN_TTL.as_secs()
            )]
        }
    };
    let spec = ClusterSpec::new(version, 1).with_extra_args(token_args);
    let deployment = Deployment::start_with(spec, wire, proxy_args);
    enable_auth(&deployment.cluster);
    (deployment, keys)
}

/// Adds `root`, and `app` with read-write on `/app/` only, then enables auth.
pub(crate) fn enable_auth(cluster: &EtcdCluster) {
    let ctl = |args: &[&str]| cluster.etcdctl_ok(args);
    ctl(&["user", "add", ROOT]);
    ctl(&["role", "add", "app"]);
    ctl(&["role", "grant-permission", "app", "--prefix=true", "readwrite", "/app/"]);
    ctl(&["user", "add", &format!("app:{APP_PASSWORD}")]);
    ctl(&["user", "grant-role", "app", "app"]);
    ctl(&["auth", "enable"]);
}

pub(crate) async fn app_client(endpoint: &str) -> Client {
    app_client_tls(endpoint, None).await
}

async fn app_client_tls(endpoint: &str, tls: Option<&ClientTls>) -> Client {
    let mut options = ConnectOptions::new().with_user("app", APP_PASSWORD);
    if let Some(tls) = tls {
        let read = |p: &Path| std::fs::read(p).expect("read TLS file");
        options = options.with_tls(
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(read(&tls.ca_cert)))
                .identity(Identity::from_pem(read(&tls.cert), read(&tls.key))),
        );
    }
    Client::connect([endpoint], Some(options)).await.expect("connect and authenticate")
}

/// The cancel reason etcd gives a watch created with an expired token.
fn expired_watch_reason(version: EtcdVersion) -> &'static str {
    match version {
        EtcdVersion::V3_4 => "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token",
        EtcdVersion::V3_5 => "rpc error: code = PermissionDenied desc = etcdserver: permission denied",
    }
}

pub(crate) fn invalid_token() -> (String, String) {
    ("Unauthenticated".to_owned(), "etcdserver: invalid auth token".to_owned())
}

/// Authenticate, idle past the TTL, then put, get and watch: through the proxy everything works;
/// directly the first call after the idle period fails with etcd's token error. TLS on both
/// sides, because grpcio (the Python client) sends tokens only over TLS.
fn idle_clients_keep_working(version: EtcdVersion, tokens: Tokens) {
    let (deployment, _keys) = deployment(version, tokens, Wire::Tls, &[]);
    let direct = deployment.cluster.client_urls()[0].clone();
    let proxy_tls = deployment.client_tls.clone().expect("client TLS");
    let cluster_tls = deployment.cluster.client_tls().cloned().expect("cluster TLS");
    let runtime = runtime();
    runtime.block_on(async {
        let mut proxied = app_client_tls(&deployment.endpoint, Some(&proxy_tls)).await;
        let mut direct_client = app_client_tls(&direct, Some(&cluster_tls)).await;
        tokio::time::sleep(IDLE).await;

        assert_eq!(
            grpc_status(direct_client.put("/app/k", "direct", None).await),
            invalid_token(),
            "{tokens:?} directly"
        );

        proxied.put("/app/k", "v1", None).await.expect("put through the proxy after idling");
        let got = proxied.get("/app/k", None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), b"v1");
        tokio::time::sleep(IDLE).await;
        let mut watch = proxied.watch("/app/w", None).await.expect("watch");
        let created = watch.message().await.expect("created").expect("stream open");
        assert!(created.created() && !created.canceled(), "{created:?}");
        proxied.put("/app/w", "event", None).await.expect("put the watched key");
        let event = watch.message().await.expect("event").expect("stream open");
        assert_eq!(event.events().len(), 1);
        assert_eq!(event.events()[0].kv().expect("kv").value(), b"event");

        // Lease keep-alive streams opened after the token expired work too.
        tokio::time::sleep(IDLE).await;
        let lease = proxied.lease_grant(10, None).await.expect("lease grant after idling").id();
        let (mut keeper, mut answers) = proxied.lease_keep_alive(lease).await.expect("keep-alive stream");
        keeper.keep_alive().await.expect("send a keep-alive");
        let answer = answers.message().await.expect("keep-alive answer").expect("stream open");
        assert_eq!((answer.id(), answer.ttl()), (lease, 10));
    });

    // The legacy Python client: one Authenticate when it is made, then idle.
    let python = |endpoint: &str, tls: &ClientTls| {
        let script = workspace_root().join("tests/python/auth_client.py");
        let address = endpoint.trim_start_matches("https://");
        let idle = IDLE.as_secs().to_string();
        let output = Command::new(etcd3_python())
            .arg(script)
            .args([address, "app", APP_PASSWORD, &idle, "/app/py/"])
            .args([&tls.ca_cert, &tls.cert, &tls.key])
            .output()
            .expect("run python");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    assert_eq!(python(&deployment.endpoint, &proxy_tls), "OK v1 /app/py/w");
    assert_eq!(python(&direct, &cluster_tls), "ERROR put UNAUTHENTICATED etcdserver: invalid auth token");

    // etcdctl authenticates per command; through the proxy it gets the proxy's token.
    for ctl in [EtcdVersion::V3_4, EtcdVersion::V3_5] {
        let user = format!("--user=app:{APP_PASSWORD}");
        etcdctl_ok(ctl, &deployment.endpoint, Some(&proxy_tls), &[&user, "put", "/app/ctl", "x"]);
        let got =
            etcdctl_ok(ctl, &deployment.endpoint, Some(&proxy_tls), &[&user, "get", "/app/ctl", "--print-value-only"]);
        assert_eq!(got.trim(), "x");
    }

    let (_, metrics) = deployment.proxy.http_get("/metrics");
    let renewals = metric(&metrics, "etcd_compat_proxy_auth_renewals_total").expect("renewals metric");
    let retries = metric(&metrics, "etcd_compat_proxy_auth_retries_total").expect("retries metric");
    // Simple tokens are renewed when etcd refuses them (and the call retried); JWTs before they expire.
    let expected_retries = match tokens {
        Tokens::Simple => retries >= 1.0,
        Tokens::Jwt => retries == 0.0,
    };
    assert!(renewals >= 1.0 && expected_retries, "{tokens:?}: {metrics}");
}

both_versions!(
    idle_clients_keep_working(Tokens::Simple)
        => idle_clients_keep_working_simple_3_4, idle_clients_keep_working_simple_3_5
);
both_versions!(
    idle_clients_keep_working(Tokens::Jwt) => idle_clients_keep_working_jwt_3_4, idle_clients_keep_working_jwt_3_5
);

/// One watch stream open across ten token expiries, with a new watch added to the same stream
/// after each (directly, etcd refuses a watch created once the stream's token has expired): every
/// event arrives once, in order.
fn watch_survives_token_expiries(version: EtcdVersion) {
    const ROUNDS: usize = 10;
    let (deployment, _keys) = deployment(version, Tokens::Simple, Wire::Plain, &[]);
    let direct = deployment.cluster.client_urls()[0].clone();
    let runtime = runtime();
    runtime.block_on(async {
        // Directly: a watch added to an existing stream after the token expired is refused.
        let mut direct_client = app_client(&direct).await;
        let mut direct_watch = direct_client.watch("/app/d0", None).await.expect("watch directly");
        assert!(direct_watch.message().await.expect("created").expect("open").created());
        tokio::time::sleep(TOKEN_TTL + Duration::from_secs(1)).await;
        direct_watch.watch("/app/d1", None).await.expect("send a second create");
        let refused = direct_watch.message().await.expect("answer").expect("open");
        assert!(refused.canceled(), "directly, the late watch is refused: {refused:?}");
        assert_eq!(refused.cancel_reason(), expired_watch_reason(version));

        let mut client = app_client(&deployment.endpoint).await;
        let mut watch = client.watch("/app/ten/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
        let first = watch.message().await.expect("created").expect("open");
        assert!(first.created() && !first.canceled());
        let prefix_watch = first.watch_id();
        let mut events: Vec<String> = Vec::new();
        let mut extra_watches: Vec<i64> = Vec::new();
        for round in 1..=ROUNDS {
            tokio::time::sleep(TOKEN_TTL + Duration::from_millis(500)).await;
            watch.watch(format!("/app/extra/{round}"), None).await.expect("add a watch to the stream");
            client.put(format!("/app/ten/{round:02}"), "v", None).await.expect("put after the token expired");
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut created = false;
            while !(created && events.len() == round) {
                let left = deadline.saturating_duration_since(Instant::now());
                let message = tokio::time::timeout(left, watch.message())
                    .await
                    .unwrap_or_else(|_| panic!("round {round}: created {created}, events {events:?}"))
                    .expect("message")
                    .expect("stream open");
                assert!(!message.canceled(), "round {round}: {message:?}");
                if message.created() {
                    created = true;
                    extra_watches.push(message.watch_id());
                }
                for event in message.events() {
                    assert_eq!(message.watch_id(), prefix_watch);
                    events.push(String::from_utf8_lossy(event.kv().expect("kv").key()).into_owned());
                }
            }
        }
        let expected: Vec<String> = (1..=ROUNDS).map(|r| format!("/app/ten/{r:02}")).collect();
        assert_eq!(events, expected);
        let mut distinct = extra_watches.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ROUNDS, "watch ids {extra_watches:?}");
        assert!(!distinct.contains(&prefix_watch));
        // Every added watch works.
        for round in 1..=ROUNDS {
            client.put(format!("/app/extra/{round}"), "x", None).await.expect("put");
        }
        let mut seen = Vec::new();
        while seen.len() < ROUNDS {
            let message = tokio::time::timeout(Duration::from_secs(10), watch.message())
                .await
                .expect("events of the added watches")
                .expect("message")
                .expect("open");
            for event in message.events() {
                seen.push((message.watch_id(), String::from_utf8_lossy(event.kv().expect("kv").key()).into_owned()));
            }
        }
        // Each watch gets its one key; etcd orders events per watch, not across watches.
        let mut expected: Vec<(i64, String)> =
            extra_watches.iter().enumerate().map(|(i, id)| (*id, format!("/app/extra/{}", i + 1))).collect();
        expected.sort();
        seen.sort();
        assert_eq!(seen, expected);
    });
    let (_, metrics) = deployment.proxy.http_get("/metrics");
    let recreated = metric(&metrics, "etcd_compat_proxy_watch_recreations_total").expect("metric");
    assert!(recreated >= ROUNDS as f64, "{metrics}");
}

both_versions!(watch_survives_token_expiries => watch_survives_token_expiries_3_4, watch_survives_token_expiries_3_5);

/// Revoking a user's role takes effect through the proxy exactly as directly; no password or
/// token reaches the proxy's debug log.
fn revoked_permission_is_denied(version: EtcdVersion) {
    let (deployment, _keys) = deployment(version, Tokens::Simple, Wire::Plain, &["--debug"]);
    let direct = deployment.cluster.client_urls()[0].clone();
    let runtime = runtime();
    let tokens = runtime.block_on(async {
        let mut client = app_client(&deployment.endpoint).await;
        client.put("/app/r", "1", None).await.expect("allowed before the revocation");
        let proxy_token = client
            .auth_client()
            .authenticate("app".to_owned(), APP_PASSWORD.to_owned())
            .await
            .expect("authenticate through the proxy")
            .token()
            .to_owned();
        let direct_client = app_client(&direct).await;
        let etcd_token = direct_client
            .auth_client()
            .authenticate("app".to_owned(), APP_PASSWORD.to_owned())
            .await
            .expect("authenticate directly")
            .token()
            .to_owned();
        // Sealed (see README): 17 bytes of header, app's session (23 bytes) and the tag, in base64.
        assert!(proxy_token.starts_with("ecp.") && proxy_token.len() == 4 + 75, "{proxy_token}");

        deployment.cluster.etcdctl_ok(&[&format!("--user={ROOT}"), "user", "revoke-role", "app", "app"]);
        let denied = ("PermissionDenied".to_owned(), "etcdserver: permission denied".to_owned());
        assert_eq!(grpc_status(client.put("/app/r", "2", None).await), denied, "put through the proxy");
        assert_eq!(grpc_status(client.get("/app/r", None).await), denied, "get through the proxy");
        let mut fresh_direct = app_client(&direct).await;
        assert_eq!(grpc_status(fresh_direct.put("/app/r", "2", None).await), denied, "put directly");

        // A watch refused for a revoked permission reaches the client as etcd sends it, after the
        // proxy's one renewal: created and canceled, with etcd's reason.
        let mut proxied_watch = client.watch("/app/w", None).await.expect("watch through the proxy");
        let mut direct_watch = fresh_direct.watch("/app/w", None).await.expect("watch directly");
        let proxied = tokio::time::timeout(Duration::from_secs(10), proxied_watch.message())
            .await
            .expect("the refusal reaches the client")
            .expect("answer")
            .expect("open");
        let direct = direct_watch.message().await.expect("answer").expect("open");
        assert!(direct.created() && direct.canceled(), "{direct:?}");
        assert!(direct.cancel_reason().ends_with("etcdserver: permission denied"), "{direct:?}");
        assert_eq!(
            (proxied.created(), proxied.canceled(), proxied.cancel_reason()),
            (direct.created(), direct.canceled(), direct.cancel_reason())
        );

        // A token this proxy never issued (or issued before a restart) is etcd's token error.
        let mut python_raw = Command::new(etcd3_python());
        let script = "import sys, etcd3, grpc\nfrom etcd3.etcdrpc import rpc_pb2\nc = etcd3.client(host=sys.argv[1], port=int(sys.argv[2]))\ntry:\n    c.kvstub.Range(rpc_pb2.RangeRequest(key=b'/app/r'), metadata=[('token', sys.argv[3])], timeout=5)\n    print('OK')\nexcept grpc.RpcError as e:\n    print(e.code().name, e.details())\n";
        let address = deployment.proxy.listen_addr();
        python_raw.args(["-c", script, &address.ip().to_string(), &address.port().to_string(), &etcd_token]);
        let output = python_raw.output().expect("python");
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "UNAUTHENTICATED etcdserver: invalid auth token");
        (proxy_token, etcd_token)
    });
    let log = deployment.proxy.log_contents();
    assert!(log.contains("DEBUG"), "the proxy ran at debug level");
    for secret in [APP_PASSWORD, "rootpw", tokens.0.as_str(), tokens.1.as_str(), "ecp."] {
        assert!(!log.contains(secret), "{secret:?} reached the proxy log");
    }
}

both_versions!(revoked_permission_is_denied => revoked_permission_is_denied_3_4, revoked_permission_is_denied_3_5);

/// Clients that never authenticate act as a configured identity: the default (`--user`) or, for
/// mTLS clients, the one mapped from their certificate's CN.
#[test]
fn configured_identities() {
    let dir = tempfile::tempdir().expect("dir");
    let password_file = dir.path().join("app.password");
    std::fs::write(&password_file, format!("{APP_PASSWORD}\n")).expect("write password file");
    let denied = ("PermissionDenied".to_owned(), "etcdserver: permission denied".to_owned());

    let user_args = ["--user=app".to_owned(), format!("--password-file={}", path(&password_file))];
    let user_args: Vec<&str> = user_args.iter().map(String::as_str).collect();
    let (plain, _keys) = deployment(EtcdVersion::V3_5, Tokens::Simple, Wire::Plain, &user_args);
    let runtime = runtime();
    runtime.block_on(async {
        let mut anonymous = connect(&plain.endpoint).await;
        anonymous.put("/app/default", "1", None).await.expect("put as the default identity");
        tokio::time::sleep(IDLE).await;
        anonymous.put("/app/default", "2", None).await.expect("put after the token expired");
        assert_eq!(grpc_status(anonymous.put("/other", "1", None).await), denied);
    });

    // The dev PKI's client certificate has CN=root; it is mapped to the etcd user `app`.
    let mapping = format!("--client-cn-identity=root=app:{}", path(&password_file));
    let (tls, _keys) = deployment(EtcdVersion::V3_5, Tokens::Simple, Wire::Tls, &[&mapping]);
    let client_tls = tls.client_tls.as_ref();
    etcdctl_ok(EtcdVersion::V3_5, &tls.endpoint, client_tls, &["put", "/app/mtls", "1"]);
    let refused = etcd_compat_tests::etcdctl(EtcdVersion::V3_5, &tls.endpoint, client_tls, &["put", "/other", "1"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("etcdserver: permission denied"));
}

/// Wrong passwords get etcd's own answer, and a client that keeps guessing is slowed down.
#[test]
fn failed_logins_are_slowed_down() {
    let (deployment, _keys) = deployment(EtcdVersion::V3_5, Tokens::Simple, Wire::Plain, &[]);
    let runtime = runtime();
    runtime.block_on(async {
        let client = connect(&deployment.endpoint).await;
        let failed =
            ("InvalidArgument".to_owned(), "etcdserver: authentication failed, invalid user ID or password".to_owned());
        let mut took = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            let answer = client.auth_client().authenticate("app".to_owned(), "wrong".to_owned()).await;
            took.push(started.elapsed());
            assert_eq!(grpc_status(answer), failed);
        }
        assert!(took[3] >= Duration::from_millis(100) && took[4] >= Duration::from_millis(200), "{took:?}");
        let started = Instant::now();
        client.auth_client().authenticate("app".to_owned(), APP_PASSWORD.to_owned()).await.expect("right password");
        assert!(started.elapsed() >= Duration::from_millis(400), "still slowed down: {:?}", started.elapsed());
    });
}

/// A member joins after the client authenticated through the proxy, and the members that were
/// there are removed one by one: the client's requests, now all on the new member, succeed.
fn joined_member_serves_old_sessions(version: EtcdVersion) {
    let spec = ClusterSpec::new(version, 3).with_extra_args([format!("--auth-token-ttl={}", TOKEN_TTL.as_secs())]);
    let mut deployment =
        Deployment::start_with(spec, Wire::Plain, &["--cluster-refresh-interval=500ms", "--health-interval=200ms"]);
    enable_auth(&deployment.cluster);
    let runtime = runtime();
    let mut client = runtime.block_on(app_client(&deployment.endpoint));
    runtime.block_on(client.put("/app/before", "1", None)).expect("put before the join");

    let root = format!("--user={ROOT}");
    let joined = deployment.cluster.add_member(false, &[&root]).expect("add a member");
    for old in 0..3 {
        let id = format!("{:x}", deployment.cluster.member(old).member_id.expect("member id"));
        // Reconfiguration is refused while the cluster settles (`unhealthy cluster`, `leader changed`).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let removed = deployment.cluster.etcdctl(&[&root, "member", "remove", &id]);
            let stderr = String::from_utf8_lossy(&removed.stderr).into_owned();
            if removed.status.success() || stderr.contains("member not found") {
                break;
            }
            assert!(Instant::now() < deadline, "member remove {id}: {stderr}");
            std::thread::sleep(Duration::from_millis(500));
        }
        let _ = deployment.cluster.stop(old);
    }
    let joined_url = deployment.cluster.member(joined).client_url;
    deployment.cluster.wait_for_leader(Duration::from_secs(10)).expect("the joined member leads");
    runtime.block_on(async {
        client.put("/app/after", "2", None).await.expect("put on the joined member");
        let got = client.get("/app/before", None).await.expect("get on the joined member");
        assert_eq!(got.kvs()[0].value(), b"1");
    });
    let (_, metrics) = deployment.proxy.http_get("/metrics");
    let served = upstream_requests(&metrics, &joined_url);
    assert!(served.is_some_and(|n| n >= 2.0), "the joined member served the requests: {metrics}");
}

both_versions!(
    joined_member_serves_old_sessions => joined_member_serves_old_sessions_3_4, joined_member_serves_old_sessions_3_5
);
