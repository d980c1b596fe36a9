//! The h2 floor against a real etcd 3.4: what the bench measures must be a working forwarder,
//! or its rows would compare the proxy with something that does less than forward.

use std::path::Path;
use std::time::Duration;

use etcd_client::{Client, EventType};
use etcd_compat_tests::{ClusterSpec, EtcdCluster, EtcdVersion, ProxyProcess};

const FLOOR: &str = env!("CARGO_BIN_EXE_etcd-compat-h2-floor");

/// etcd's gRPC status code and message of a failed call.
fn status<T: std::fmt::Debug>(result: Result<T, etcd_client::Error>) -> (i32, String) {
    match result {
        Err(etcd_client::Error::GRpcStatus(status)) => (status.code() as i32, status.message().to_owned()),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

#[test]
fn the_floor_forwards_unary_calls_streams_and_statuses_as_etcd_gives_them() {
    let cluster = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_4, 1)).expect("etcd 3.4");
    let member = cluster.client_urls()[0].clone();
    // Started as the bench starts it: its readiness is a real answer on --metrics-addr.
    let floor = ProxyProcess::start(Path::new(FLOOR), vec!["start".to_owned(), format!("--endpoints={member}")])
        .expect("the h2 floor starts");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio");
    runtime.block_on(async {
        let mut through = Client::connect([floor.endpoint()], None).await.expect("connect through the floor");
        let mut direct = Client::connect([member.clone()], None).await.expect("connect directly");

        // Unary: a write and a read of it.
        let put = through.put("/floor/k", "v1", None).await.expect("put through the floor");
        let got = through.get("/floor/k", None).await.expect("get through the floor");
        assert_eq!(got.kvs().len(), 1);
        assert_eq!(
            (got.kvs()[0].value(), got.kvs()[0].mod_revision()),
            (&b"v1"[..], put.header().expect("header").revision())
        );

        // Bidirectional streams: keep-alives, and a watch that sees a write made directly.
        let lease = through.lease_grant(60, None).await.expect("lease grant");
        let (mut keeper, mut answers) = through.lease_keep_alive(lease.id()).await.expect("keep-alive stream");
        for _ in 0..3 {
            keeper.keep_alive().await.expect("a keep-alive");
            let answer = answers.message().await.expect("an answer").expect("the stream goes on");
            assert_eq!((answer.id(), answer.ttl()), (lease.id(), 60));
        }
        let mut events = through.watch("/floor/w", None).await.expect("watch through the floor");
        let written = direct.put("/floor/w", "x", None).await.expect("put directly");
        let event = loop {
            let message = tokio::time::timeout(Duration::from_secs(10), events.message())
                .await
                .expect("the event within 10 s")
                .expect("a watch response")
                .expect("the watch goes on");
            if let Some(event) = message.events().first() {
                break event.clone();
            }
        };
        assert_eq!(event.event_type(), EventType::Put);
        assert_eq!(event.kv().expect("kv").mod_revision(), written.header().expect("header").revision());

        // An error: etcd's status, unchanged.
        let expected = status(direct.lease_revoke(123_456).await);
        assert_eq!(expected, (5, "etcdserver: requested lease not found".to_owned()), "directly");
        assert_eq!(status(through.lease_revoke(123_456).await), expected, "through the floor");
    });
}

#[test]
fn the_floor_refuses_to_start_without_what_it_needs() {
    let output = std::process::Command::new(FLOOR)
        .args(["start", "--endpoints=127.0.0.1:1,127.0.0.1:2", "--listen-addr", "127.0.0.1:0", "--metrics-addr", "x"])
        .output()
        .expect("run the floor");
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "etcd-compat-h2-floor: --endpoints 127.0.0.1:1,127.0.0.1:2: the h2 floor forwards to one member\n"
    );
}
