//! etcd's errors reach clients of the proxy with the same gRPC code and message as directly
//! (etcd's own grpc-proxy turns them into `Unknown`; old clients classify errors by message).

use etcd_client::{Client, ConnectOptions, GetOptions, Txn, TxnOp};
use etcd_compat_tests::EtcdVersion;

use crate::support::{both_versions, grpc_status, runtime, Deployment, Wire};

/// A gRPC status as (code name, message).
type Status = (String, String);

async fn connect(endpoint: &str, user: Option<(&str, &str)>) -> Client {
    let options = user.map(|(name, password)| ConnectOptions::new().with_user(name, password));
    Client::connect([endpoint], options).await.expect("connect")
}

/// Each failing call, made directly and through the proxy: (code, message) must be equal and
/// equal to what etcd documents.
async fn same_errors(direct_endpoint: &str, proxy_endpoint: &str) {
    let mut direct = connect(direct_endpoint, None).await;
    let mut proxied = connect(proxy_endpoint, None).await;

    for i in 0..3 {
        direct.put("/errors/k", format!("v{i}"), None).await.expect("put");
    }
    let head = direct.get("/errors/k", None).await.expect("get").header().expect("header").revision();
    direct.compact(head, None).await.expect("compact");

    let mut cases: Vec<(&str, Status, Status)> = Vec::new();
    let compacted = GetOptions::new().with_revision(head - 1);
    cases.push((
        "compacted revision",
        grpc_status(direct.get("/errors/k", Some(compacted.clone())).await),
        grpc_status(proxied.get("/errors/k", Some(compacted)).await),
    ));
    let future = GetOptions::new().with_revision(head + 1000);
    cases.push((
        "future revision",
        grpc_status(direct.get("/errors/k", Some(future.clone())).await),
        grpc_status(proxied.get("/errors/k", Some(future)).await),
    ));
    cases.push((
        "lease not found",
        grpc_status(direct.lease_revoke(0x1234).await),
        grpc_status(proxied.lease_revoke(0x1234).await),
    ));
    let duplicate = || Txn::new().and_then([TxnOp::put("/errors/d", "1", None), TxnOp::put("/errors/d", "2", None)]);
    cases.push((
        "duplicate key in txn",
        grpc_status(direct.txn(duplicate()).await),
        grpc_status(proxied.txn(duplicate()).await),
    ));
    cases.push((
        "empty key",
        grpc_status(direct.put("", "v", None).await),
        grpc_status(proxied.put("", "v", None).await),
    ));
    direct.user_add("bob", "bobpw", None).await.expect("user add");
    cases.push((
        "user exists",
        grpc_status(direct.user_add("bob", "x", None).await),
        grpc_status(proxied.user_add("bob", "x", None).await),
    ));

    let expected = [
        ("compacted revision", "OutOfRange", "etcdserver: mvcc: required revision has been compacted"),
        ("future revision", "OutOfRange", "etcdserver: mvcc: required revision is a future revision"),
        ("lease not found", "NotFound", "etcdserver: requested lease not found"),
        ("duplicate key in txn", "InvalidArgument", "etcdserver: duplicate key given in txn request"),
        ("empty key", "InvalidArgument", "etcdserver: key is not provided"),
        ("user exists", "FailedPrecondition", "etcdserver: user name already exists"),
    ];
    assert_eq!(cases.len(), expected.len());
    for ((name, direct, proxied), (expected_name, code, message)) in cases.into_iter().zip(expected) {
        assert_eq!(name, expected_name);
        assert_eq!(direct, (code.to_owned(), message.to_owned()), "{name}: direct");
        assert_eq!(proxied, direct, "{name}: through the proxy");
    }

    // Permission denied needs auth on: root for setup, a user without any role for the failure.
    direct.user_add("root", "rootpw", None).await.expect("root");
    direct.user_grant_role("root", "root").await.expect("root role");
    direct.user_add("nobody", "nobodypw", None).await.expect("nobody");
    direct.auth_enable().await.expect("auth enable");
    let mut direct_nobody = connect(direct_endpoint, Some(("nobody", "nobodypw"))).await;
    let mut proxied_nobody = connect(proxy_endpoint, Some(("nobody", "nobodypw"))).await;
    let denied_direct = grpc_status(direct_nobody.put("/errors/secret", "x", None).await);
    let denied_proxied = grpc_status(proxied_nobody.put("/errors/secret", "x", None).await);
    assert_eq!(denied_direct, ("PermissionDenied".to_owned(), "etcdserver: permission denied".to_owned()));
    assert_eq!(denied_proxied, denied_direct);
    let bad_login = |endpoint: String| async move {
        match Client::connect([endpoint], Some(ConnectOptions::new().with_user("nobody", "wrong"))).await {
            Err(etcd_client::Error::GRpcStatus(s)) => (format!("{:?}", s.code()), s.message().to_owned()),
            Err(other) => panic!("expected a status, got {other}"),
            Ok(_) => panic!("login with a wrong password succeeded"),
        }
    };
    let login_direct = bad_login(direct_endpoint.to_owned()).await;
    assert_eq!(
        login_direct,
        ("InvalidArgument".to_owned(), "etcdserver: authentication failed, invalid user ID or password".to_owned())
    );
    assert_eq!(bad_login(proxy_endpoint.to_owned()).await, login_direct);
}

fn etcd_errors_pass_through_unchanged(version: EtcdVersion) {
    // Debug level: the password check below must cover the most verbose logs.
    let deployment = Deployment::start(version, 1, Wire::Plain, &["--debug"]);
    let direct = deployment.cluster.client_urls()[0].clone();
    let runtime = runtime();
    runtime.block_on(same_errors(&direct, &deployment.endpoint));
    let log = deployment.proxy.log_contents();
    for secret in ["rootpw", "nobodypw", "bobpw"] {
        assert!(!log.contains(secret), "password {secret} reached the proxy log");
    }
}

both_versions!(
    etcd_errors_pass_through_unchanged => etcd_errors_pass_through_unchanged_3_4, etcd_errors_pass_through_unchanged_3_5
);
