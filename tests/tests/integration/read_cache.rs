//! The serializable-read cache against real etcd: a write made around the proxy is never hidden
//! once the proxy has seen its event, a write acknowledged through the proxy is visible to the
//! next serializable read, a revoked permission takes effect within a second, memory stays
//! under its limit when the working set is ten times larger, and linearizable reads never
//! touch it. Every test checks that the cache did answer (hits counted), so that a proxy that
//! never caches cannot pass them.

use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, DeleteOptions, GetOptions, Txn, TxnOp};
use etcd_compat_tests::{ClusterSpec, EtcdCluster, EtcdVersion};

use crate::support::{both_versions, connect, grpc_status, metric, runtime, Deployment, Wire};

const HITS: &str = "etcd_compat_proxy_serializable_cache_hits_total";
const MISSES: &str = "etcd_compat_proxy_serializable_cache_misses_total";
const INVALIDATIONS: &str = "etcd_compat_proxy_serializable_cache_invalidations_total";
const BYTES: &str = "etcd_compat_proxy_serializable_cache_bytes";
const EVICTIONS: &str = "etcd_compat_proxy_serializable_cache_evictions_total";

fn counter(deployment: &Deployment, series: &str) -> f64 {
    let (_, text) = deployment.proxy.http_get("/metrics");
    metric(&text, series).unwrap_or_else(|| panic!("{series} missing from /metrics"))
}

async fn serializable_value(client: &mut Client, key: &str) -> Option<String> {
    let answer = client.get(key, Some(GetOptions::new().with_serializable())).await.expect("serializable get");
    answer.kvs().first().map(|kv| kv.value_str().expect("utf-8 value").to_owned())
}

/// `rounds` times: `key` read five times through the proxy (hits after the first), written
/// directly to etcd, and, once the proxy has seen the event (dropped the cached answer), read
/// again through the proxy, which must give the new value. `first` is the round to start at:
/// `key` holds `v{first - 1}`.
async fn direct_write_rounds(
    deployment: &Deployment,
    proxied: &mut Client,
    user: Option<&str>,
    key: &str,
    first: usize,
    rounds: usize,
) {
    for round in first..first + rounds {
        // Polled as a fleet polls: the first read fills the cache, the rest are hits.
        let hits = counter(deployment, HITS);
        for _ in 0..5 {
            assert_eq!(serializable_value(proxied, key).await.as_deref(), Some(&*format!("v{}", round - 1)));
        }
        assert!(counter(deployment, HITS) >= hits + 4.0, "round {round}: the cache answered no read");
        let invalidations = counter(deployment, INVALIDATIONS);
        etcdctl_around_the_proxy(&deployment.cluster, user, &["put", key, &format!("v{round}")]);
        wait_for_invalidation(deployment, invalidations, &format!("round {round}")).await;
        assert_eq!(serializable_value(proxied, key).await.as_deref(), Some(&*format!("v{round}")));
    }
}

/// Writes made around the proxy: `etcdctl` against the running members, as `user` if given,
/// again while etcd answers that a leader is being elected (after a member was killed).
fn etcdctl_around_the_proxy(cluster: &EtcdCluster, user: Option<&str>, args: &[&str]) {
    let mut full: Vec<&str> = user.into_iter().collect();
    full.extend_from_slice(args);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = cluster.etcdctl(&full);
        if output.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("timed out") || stderr.contains("leader") || stderr.contains("deadline exceeded"),
            "etcdctl {args:?}: {stderr}"
        );
        assert!(Instant::now() < deadline, "etcdctl {args:?} still failing after 10 s: {stderr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the proxy dropped a cached answer since the invalidation count was `before`.
async fn wait_for_invalidation(deployment: &Deployment, before: f64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while counter(deployment, INVALIDATIONS) < before + 1.0 {
        assert!(Instant::now() < deadline, "{what}: the proxy never saw the direct write");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn direct_writes_are_never_hidden_after_their_event(version: EtcdVersion) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &[]);
    runtime().block_on(async {
        let mut proxied = connect(&deployment.endpoint).await;
        etcdctl_around_the_proxy(&deployment.cluster, None, &["put", "/cfg/k", "v0"]);
        direct_write_rounds(&deployment, &mut proxied, None, "/cfg/k", 1, 20).await;
        // A deletion made around the proxy is an event too.
        let invalidations = counter(&deployment, INVALIDATIONS);
        etcdctl_around_the_proxy(&deployment.cluster, None, &["del", "/cfg/k"]);
        wait_for_invalidation(&deployment, invalidations, "delete").await;
        assert_eq!(serializable_value(&mut proxied, "/cfg/k").await, None);
    });
}
both_versions!(direct_writes_are_never_hidden_after_their_event => direct_writes_never_hidden_3_4, direct_writes_never_hidden_3_5);

/// A member killed under the cache's watch stream, then every token expired: the cache drops
/// what it can no longer prove fresh and goes on answering, correctly, from new streams.
fn member_loss_and_token_expiry_keep_it_correct(version: EtcdVersion) {
    let spec = ClusterSpec::new(version, 3).with_extra_args(["--auth-token-ttl=2"]);
    let mut deployment = Deployment::start_with(spec, Wire::Plain, &[]);
    for args in [&["user", "add", "root:rootpw"][..], &["put", "/cfg/k", "v0"], &["auth", "enable"]] {
        deployment.cluster.etcdctl_ok(args);
    }
    runtime().block_on(async {
        let root = || Some(ConnectOptions::new().with_user("root", "rootpw"));
        let mut proxied = Client::connect([deployment.endpoint.as_str()], root()).await.expect("connect");
        let root_user = Some("--user=root:rootpw");
        direct_write_rounds(&deployment, &mut proxied, root_user, "/cfg/k", 1, 5).await;
        // The proxy's streams start on the first member it lists.
        deployment.cluster.kill(0).expect("kill member 0");
        direct_write_rounds(&deployment, &mut proxied, root_user, "/cfg/k", 6, 10).await;
        // Idle past the token TTL: the cache's stream holds an expired token.
        tokio::time::sleep(Duration::from_secs(4)).await;
        // A key not cached yet: its watch is asked for on the stream whose token expired.
        etcdctl_around_the_proxy(&deployment.cluster, root_user, &["put", "/cfg/j", "v10"]);
        // Asking for it ends that stream (etcd refuses the token) and drops what it kept fresh;
        // a new stream with a renewed token takes over within a few reads.
        let hits = counter(&deployment, HITS);
        for read in 0.. {
            assert_eq!(serializable_value(&mut proxied, "/cfg/j").await.as_deref(), Some("v10"));
            if counter(&deployment, HITS) > hits {
                break;
            }
            assert!(read < 20, "no read of /cfg/j answered from the cache");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        direct_write_rounds(&deployment, &mut proxied, root_user, "/cfg/j", 11, 5).await;
        direct_write_rounds(&deployment, &mut proxied, root_user, "/cfg/k", 16, 3).await;
    });
}
both_versions!(member_loss_and_token_expiry_keep_it_correct => member_loss_and_token_expiry_3_4, member_loss_and_token_expiry_3_5);

fn writes_through_the_proxy_are_visible_to_the_next_read(version: EtcdVersion) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &[]);
    runtime().block_on(async {
        let mut writer = connect(&deployment.endpoint).await;
        let mut reader = connect(&deployment.endpoint).await;
        let prefix = || Some(GetOptions::new().with_serializable().with_prefix());
        let hits_before = counter(&deployment, HITS);
        for i in 0..100 {
            writer.put("/jobs/k", format!("{i}"), None).await.expect("put");
            // The writer's next read, and another connection's, both see it.
            assert_eq!(serializable_value(&mut writer, "/jobs/k").await, Some(i.to_string()), "put {i}");
            assert_eq!(serializable_value(&mut reader, "/jobs/k").await, Some(i.to_string()), "put {i}");
            let listed = reader.get("/jobs/", prefix()).await.expect("prefix get");
            assert_eq!(listed.kvs().len(), 1 + usize::from(i >= 50), "put {i}");
            if i == 49 {
                // A key new under a cached prefix, written in a Txn.
                let txn = Txn::new().and_then([TxnOp::put("/jobs/new", "n", None)]);
                writer.txn(txn).await.expect("txn");
            }
        }
        assert!(counter(&deployment, HITS) >= hits_before + 99.0, "the reader's second read of each value is a hit");
        writer.delete("/jobs/", Some(DeleteOptions::new().with_prefix())).await.expect("delete prefix");
        assert_eq!(reader.get("/jobs/", prefix()).await.expect("prefix get").kvs().len(), 0);
        assert_eq!(serializable_value(&mut reader, "/jobs/k").await, None);
    });
}
both_versions!(writes_through_the_proxy_are_visible_to_the_next_read => writes_through_proxy_visible_3_4, writes_through_proxy_visible_3_5);

fn a_revoked_permission_takes_effect_within_a_second(version: EtcdVersion) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &[]);
    let cluster = &deployment.cluster;
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["role", "add", "reader"],
        &["role", "grant-permission", "reader", "--prefix=true", "read", "/app/"],
        &["user", "add", "agent:agentpw"],
        &["user", "grant-role", "agent", "reader"],
        &["put", "/app/k", "v"],
        &["auth", "enable"],
    ] {
        cluster.etcdctl_ok(args);
    }
    runtime().block_on(async {
        let options = ConnectOptions::new().with_user("agent", "agentpw");
        let mut agent = Client::connect([deployment.endpoint.as_str()], Some(options)).await.expect("agent connects");
        let hits = counter(&deployment, HITS);
        for _ in 0..10 {
            assert_eq!(serializable_value(&mut agent, "/app/k").await.as_deref(), Some("v"));
        }
        assert!(counter(&deployment, HITS) >= hits + 9.0, "the agent's reads were not cached");
        cluster.etcdctl_ok(&["--user=root:rootpw", "role", "revoke-permission", "reader", "/app/", "--prefix=true"]);
        let revoked = Instant::now();
        let refused = loop {
            match agent.get("/app/k", Some(GetOptions::new().with_serializable())).await {
                Ok(_) => {
                    assert!(revoked.elapsed() < Duration::from_millis(1500), "still served 1.5 s after the revocation");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => break grpc_status::<()>(Err(error)),
            }
        };
        assert_eq!(refused, ("PermissionDenied".to_owned(), "etcdserver: permission denied".to_owned()));
    });
}
both_versions!(a_revoked_permission_takes_effect_within_a_second => revoked_permission_within_a_second_3_4, revoked_permission_within_a_second_3_5);

fn memory_stays_under_the_limit_with_a_ten_times_larger_working_set(version: EtcdVersion) {
    const LIMIT: usize = 1 << 20;
    let deployment = Deployment::start(version, 1, Wire::Plain, &[&format!("--serializable-cache-bytes={LIMIT}")]);
    runtime().block_on(async {
        let mut client = connect(&deployment.endpoint).await;
        // 10 MiB of values: ten times the cache.
        let keys = 1000;
        for i in 0..keys {
            client.put(format!("/big/{i:04}"), format!("{i:04}").repeat(2560), None).await.expect("put");
        }
        let mut peak = 0.0_f64;
        for pass in 0..2 {
            for i in 0..keys {
                let value = serializable_value(&mut client, &format!("/big/{i:04}")).await.expect("value");
                assert_eq!(value, format!("{i:04}").repeat(2560), "pass {pass}, key {i}");
                if i % 10 == 0 {
                    // Read again at once: the answer just stored.
                    let hits = counter(&deployment, HITS);
                    assert!(serializable_value(&mut client, &format!("/big/{i:04}")).await.is_some());
                    assert_eq!(counter(&deployment, HITS), hits + 1.0, "pass {pass}, key {i}: not from the cache");
                    peak = peak.max(counter(&deployment, BYTES));
                }
            }
        }
        assert!(peak > 0.0 && peak <= LIMIT as f64, "cache held {peak} bytes with a limit of {LIMIT}");
        assert!(counter(&deployment, EVICTIONS) >= 1500.0, "{} evictions", counter(&deployment, EVICTIONS));
    });
}
both_versions!(memory_stays_under_the_limit_with_a_ten_times_larger_working_set => memory_under_limit_3_4, memory_under_limit_3_5);

#[test]
fn linearizable_reads_never_touch_the_cache_and_zero_turns_it_off() {
    let deployment = Deployment::start(EtcdVersion::V3_5, 1, Wire::Plain, &[]);
    runtime().block_on(async {
        let mut client = connect(&deployment.endpoint).await;
        client.put("k", "v", None).await.expect("put");
        for _ in 0..10 {
            client.get("k", None).await.expect("linearizable get");
        }
        assert_eq!((counter(&deployment, HITS), counter(&deployment, MISSES)), (0.0, 0.0));
    });
    let off = Deployment::start(EtcdVersion::V3_5, 1, Wire::Plain, &["--serializable-cache-bytes=0"]);
    runtime().block_on(async {
        let mut client = connect(&off.endpoint).await;
        client.put("k", "v", None).await.expect("put");
        assert_eq!(serializable_value(&mut client, "k").await.as_deref(), Some("v"));
        let (_, text) = off.proxy.http_get("/metrics");
        assert_eq!(metric(&text, HITS), None, "a cache that is off has no series");
    });
}

/// etcd accepts a DeleteRange whose range end comes before its key, and deletes nothing; the
/// cache must take it as naming no key (looking it up panicked the call once a single key was
/// cached, after etcd had applied it).
#[test]
fn a_reversed_delete_range_is_answered_and_changes_nothing() {
    let deployment = Deployment::start(EtcdVersion::V3_5, 1, Wire::Plain, &[]);
    runtime().block_on(async {
        let mut client = connect(&deployment.endpoint).await;
        client.put("b", "v", None).await.expect("put");
        assert_eq!(serializable_value(&mut client, "b").await.as_deref(), Some("v"));
        assert_eq!(serializable_value(&mut client, "b").await.as_deref(), Some("v"));
        assert!(counter(&deployment, HITS) >= 1.0, "the second read came from the cache");
        for (key, end) in [("b", "a"), ("c", "a"), ("b", "b")] {
            let deleted = client
                .delete(key, Some(DeleteOptions::new().with_range(end)))
                .await
                .unwrap_or_else(|error| panic!("delete [{key}, {end}): {error}"));
            assert_eq!(deleted.deleted(), 0, "delete [{key}, {end})");
        }
        assert_eq!(serializable_value(&mut client, "b").await.as_deref(), Some("v"));
        assert_eq!(client.get("b", None).await.expect("linearizable get").kvs().len(), 1);
    });
}
