//! A member of three dies during a load run: the proxy keeps serving through the others,
//! nothing acknowledged is lost, and `/health` and `/metrics` show which member is down.

use std::time::{Duration, Instant};

use etcd_client::Client;
use etcd_compat_tests::EtcdVersion;

use crate::support::{metric, Deployment, Wire};

/// How a write through the proxy ended.
#[derive(Debug, Default)]
struct Tally {
    acknowledged: Vec<String>,
    failed: Vec<String>,
}

fn member_dies_under_load(version: EtcdVersion) {
    let mut deployment = Deployment::start(version, 3, Wire::Plain, &["--health-interval=200ms"]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let endpoint = deployment.endpoint.clone();
    let mut client = runtime.block_on(Client::connect([endpoint.as_str()], None)).expect("connect to the proxy");

    // The proxy pins the first member in --endpoints order; killing it forces a failover.
    let mut tally = Tally::default();
    let run = |client: &mut Client, tally: &mut Tally, from: usize, to: usize| {
        runtime.block_on(async {
            for i in from..to {
                let key = format!("/load/{i:05}");
                match client.put(key.as_str(), "v", None).await {
                    Ok(_) => tally.acknowledged.push(key),
                    Err(error) => tally.failed.push(format!("{key}: {error}")),
                }
            }
        })
    };
    run(&mut client, &mut tally, 0, 200);
    assert!(tally.failed.is_empty(), "failures before any member died: {:?}", tally.failed);

    deployment.cluster.kill(0).expect("kill member 0");
    let killed_at = Instant::now();
    run(&mut client, &mut tally, 200, 400);
    // After a leader election at most, every request must succeed again.
    let failed_during_failover = tally.failed.len();
    run(&mut client, &mut tally, 400, 600);
    assert_eq!(
        tally.failed.len(),
        failed_during_failover,
        "writes failed long after the failover ({:?} after the kill): {:?}",
        killed_at.elapsed(),
        &tally.failed[failed_during_failover..]
    );
    for failure in &tally.failed {
        // A write in flight when its member died may or may not have been applied: the proxy
        // must say so rather than retry it; a leader election may add etcd's own errors.
        assert!(
            failure.contains("may or may not have been applied")
                || failure.contains("etcdserver: leader changed")
                || failure.contains("etcdserver: no leader")
                || failure.contains("etcdserver: request timed out"),
            "unexpected failure: {failure}"
        );
    }
    assert!(tally.failed.len() <= 5, "too many failed writes during the failover: {:?}", tally.failed);

    // Nothing acknowledged is lost: every acknowledged key is readable through the proxy.
    let stored: Vec<String> = runtime.block_on(async {
        let response = client
            .get("/load/", Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()))
            .await
            .expect("read back");
        response.kvs().iter().map(|kv| kv.key_str().expect("utf8").to_owned()).collect()
    });
    for key in &tally.acknowledged {
        assert!(stored.contains(key), "acknowledged write {key} is missing");
    }
    // Reads are always safe to retry, so none fails once the member is marked down.
    runtime.block_on(async {
        for _ in 0..100 {
            client.get("/load/00000", None).await.expect("reads keep working");
        }
    });

    let dead = deployment.cluster.member(0).client_url;
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, health) = loop {
        let (status, body) = deployment.proxy.http_get("/health");
        if body.contains(&format!("{{\"endpoint\":\"{dead}\",\"healthy\":false")) || Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, 200, "two of three members still serve: {health}");
    assert!(health.starts_with("{\"health\":\"true\""), "{health}");
    assert!(health.contains(&format!("{{\"endpoint\":\"{dead}\",\"healthy\":false,\"error\":\"")), "{health}");
    let (_, metrics) = deployment.proxy.http_get("/metrics");
    assert_eq!(metric(&metrics, &format!("etcd_compat_proxy_upstream_healthy{{endpoint=\"{dead}\"}}")), Some(0.0));
    for i in 1..3 {
        let alive = deployment.cluster.member(i).client_url;
        assert_eq!(metric(&metrics, &format!("etcd_compat_proxy_upstream_healthy{{endpoint=\"{alive}\"}}")), Some(1.0));
    }
    let put_ok = metric(&metrics, "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"etcdserverpb.KV\",grpc_method=\"Put\",grpc_code=\"OK\"}");
    assert_eq!(put_ok, Some(tally.acknowledged.len() as f64));
}

#[test]
fn member_dies_under_load_3_4() {
    member_dies_under_load(EtcdVersion::V3_4);
}

#[test]
fn member_dies_under_load_3_5() {
    member_dies_under_load(EtcdVersion::V3_5);
}
