//! A member of three dies during a load run: the proxy keeps serving through the others,
//! nothing acknowledged is lost, and `/health` and `/metrics` show which member is down.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use etcd_compat_tests::{ClusterSpec, EtcdCluster, EtcdVersion, ProxyProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{
    assert_failures_among, both_versions, connect, grpc_status, health_entry, metric, runtime, start_proxy,
    upstream_requests, wait_for_health, Deployment, Tally, Wire, OUTCOME_UNKNOWN,
};

fn member_dies_under_load(version: EtcdVersion) {
    let mut deployment = Deployment::start(version, 3, Wire::Plain, &["--health-interval=200ms"]);
    let runtime = runtime();
    let mut client = runtime.block_on(connect(&deployment.endpoint));

    // The proxy pins the first member in --endpoints order; killing it forces a failover.
    let mut tally = Tally::default();
    runtime.block_on(tally.put_each(&mut client, "/load/", 0..200));
    assert!(tally.failed.is_empty(), "failures before any member died: {:?}", tally.failed);

    deployment.cluster.kill(0).expect("kill member 0");
    let killed_at = Instant::now();
    runtime.block_on(tally.put_each(&mut client, "/load/", 200..400));
    // After a leader election at most, every request must succeed again.
    let failed_during_failover = tally.failed.len();
    runtime.block_on(tally.put_each(&mut client, "/load/", 400..600));
    assert_eq!(
        tally.failed.len(),
        failed_during_failover,
        "writes failed long after the failover ({:?} after the kill): {:?}",
        killed_at.elapsed(),
        &tally.failed[failed_during_failover..]
    );
    // A write in flight when its member died may or may not have been applied: the proxy
    // must say so rather than retry it; a leader election may add etcd's own errors.
    tally.assert_failures_acceptable();
    assert!(tally.failed.len() <= 5, "too many failed writes during the failover: {:?}", tally.failed);

    // Nothing acknowledged is lost: every acknowledged key is readable through the proxy.
    runtime.block_on(tally.assert_acknowledged_stored(&mut client, "/load/"));
    // Reads are always safe to retry, so none fails once the member is marked down.
    runtime.block_on(async {
        for _ in 0..100 {
            client.get("/load/00000", None).await.expect("reads keep working");
        }
    });

    let dead = deployment.cluster.member(0).client_url;
    let (status, health) = wait_for_health(&deployment.proxy, Duration::from_secs(5), |_, body| {
        body.contains(&format!("{{\"endpoint\":\"{dead}\",\"healthy\":false"))
    });
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

both_versions!(member_dies_under_load => member_dies_under_load_3_4, member_dies_under_load_3_5);

/// Requests each member received, by client URL, from `/metrics`.
fn requests_by_member(deployment: &Deployment) -> Vec<f64> {
    let (_, metrics) = deployment.proxy.http_get("/metrics");
    (0..deployment.cluster.len())
        .map(|i| upstream_requests(&metrics, &deployment.cluster.member(i).client_url).unwrap_or(0.0))
        .collect()
}

/// The member the proxy pins, and so the one a watch opened now is on: the one whose request
/// count grows most while `client` reads `key` 20 times.
async fn pinned_member(deployment: &Deployment, client: &mut Client, key: &str) -> usize {
    let before = requests_by_member(deployment);
    for _ in 0..20 {
        client.get(key, None).await.expect("get");
    }
    let after = requests_by_member(deployment);
    (0..3).max_by(|a, b| (after[*a] - before[*a]).total_cmp(&(after[*b] - before[*b]))).expect("member")
}

/// Moves leadership to member `to` with etcdctl; returns the leader the cluster names afterwards.
fn move_leader(cluster: &mut EtcdCluster, to: usize) -> usize {
    let id = format!("{:x}", cluster.member(to).member_id.expect("id"));
    cluster.etcdctl_ok(&["move-leader", &id]);
    cluster.wait_for_leader(Duration::from_secs(10)).expect("leader")
}

/// `call`, failing as "no answer within 20 s" instead of hanging the test when it is stuck on a
/// stopped or frozen member.
async fn bounded<T>(call: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, String> {
    match tokio::time::timeout(Duration::from_secs(20), call).await {
        Ok(outcome) => outcome.map_err(|error| error.to_string()),
        Err(_) => Err("no answer within 20 s".to_owned()),
    }
}

/// A client writes and watches through the proxy while the member its watch stream is on is
/// killed, first as leader, then as follower: no acknowledged write is lost, and the watch,
/// never interrupted, sees every committed write exactly once, in revision order.
fn watch_resumes_after_member_loss(version: EtcdVersion) {
    let mut deployment = Deployment::start(version, 3, Wire::Plain, &["--health-interval=200ms"]);
    let runtime = runtime();
    let endpoint = deployment.endpoint.clone();

    let (events, acknowledged, failed) = runtime.block_on(async {
        let mut watcher = connect(&endpoint).await;
        let mut writer = connect(&endpoint).await;
        let mut stream = watcher
            .watch("/wf/", Some(etcd_client::WatchOptions::new().with_prefix()))
            .await
            .expect("watch through the proxy");
        let first = stream.message().await.expect("created").expect("open");
        assert!(first.created());
        let collector = tokio::spawn(async move {
            let mut events: Vec<(String, i64)> = Vec::new();
            // Quiet for 8 s after the last write: everything has arrived.
            while let Some(more) = next_events(&mut stream, Duration::from_secs(8)).await {
                events.extend(more);
            }
            events
        });
        let mut acknowledged: Vec<(String, i64)> = Vec::new();
        let mut failed: Vec<String> = Vec::new();
        let mut next = 0;
        let mut write = |count: usize| {
            let range = next..next + count;
            next += count;
            range
        };
        for phase in 0..3 {
            for i in write(100) {
                let key = format!("/wf/{i:05}");
                match writer.put(key.as_str(), "v", None).await {
                    Ok(put) => acknowledged.push((key, put.header().expect("header").revision())),
                    Err(error) => failed.push(format!("{key}: {error}")),
                }
            }
            if phase == 2 {
                break;
            }
            // The member serving the proxy's requests (and the watch) is the one whose count grows.
            let pinned = pinned_member(&deployment, &mut writer, "/wf/00000").await;
            // The first loss is the leader's, the second a follower's: move leadership to or away
            // from the pinned member first.
            let leader = deployment.cluster.wait_for_leader(Duration::from_secs(10)).expect("leader");
            let transferee = match phase {
                0 if leader != pinned => Some(pinned),
                1 if leader == pinned => (0..3).find(|i| *i != pinned && deployment.cluster.is_running(*i)),
                _ => None,
            };
            if let Some(transferee) = transferee {
                let leader = move_leader(&mut deployment.cluster, transferee);
                assert_eq!(leader == pinned, phase == 0, "leadership moved as intended");
            }
            deployment.cluster.kill(pinned).expect("kill the member the watch is on");
            if phase == 0 {
                // Back to three, so that the follower's loss keeps a quorum.
                deployment.cluster.restart(pinned).expect("restart");
            }
        }
        let events = collector.await.expect("collector");
        (events, acknowledged, failed)
    });

    assert_failures_among(&failed, &[OUTCOME_UNKNOWN, "etcdserver: leader changed"]);
    assert!(failed.len() <= 10, "too many failed writes: {failed:?}");
    // Every event once, in revision order; every acknowledged write among them at its revision.
    assert_watch_saw_every_write(&deployment, &events, &acknowledged, failed.len(), 2);
}

/// The (key, revision) of the events in the watch's next message; `None` if none came `within`.
/// A canceled or ended watch fails the test.
async fn next_events(stream: &mut etcd_client::WatchStream, within: Duration) -> Option<Vec<(String, i64)>> {
    match tokio::time::timeout(within, stream.message()).await {
        Ok(Ok(Some(message))) => {
            assert!(!message.canceled(), "the watch was canceled: {message:?}");
            let events = message.events().iter().map(|event| {
                let kv = event.kv().expect("kv");
                (kv.key_str().expect("utf8").to_owned(), kv.mod_revision())
            });
            Some(events.collect())
        }
        Ok(other) => panic!("the watch stream ended: {other:?}"),
        Err(_) => None,
    }
}

/// The watch saw every acknowledged write once, in revision order, and no more events than
/// writes that may have been applied; `/metrics` counts at least `moves` re-created watches.
fn assert_watch_saw_every_write(
    deployment: &Deployment,
    events: &[(String, i64)],
    acknowledged: &[(String, i64)],
    failed: usize,
    moves: u32,
) {
    let revisions: Vec<i64> = events.iter().map(|(_, r)| *r).collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "events out of order or repeated: {revisions:?}");
    for write in acknowledged {
        assert!(events.contains(write), "acknowledged write {write:?} was not seen by the watch");
    }
    let unacknowledged = events.len() - acknowledged.len();
    assert!(unacknowledged <= failed, "{unacknowledged} events for writes that were never made");
    let (_, metrics) = deployment.proxy.http_get("/metrics");
    let recreated = metric(&metrics, "etcd_compat_proxy_watch_recreations_total").expect("metric");
    assert!(recreated >= f64::from(moves), "the watch moved {moves} time(s): {metrics}");
}

both_versions!(
    watch_resumes_after_member_loss => watch_resumes_after_member_loss_3_4, watch_resumes_after_member_loss_3_5
);

/// A member stops answering without closing its connections (SIGSTOP: a paused VM, a host cut
/// off without a reset). The proxy's pings notice: writes go on through the other members, and
/// the watch stream that was on the frozen member moves and sees every write once, in order.
/// Without pings nothing would ever break that watch's TCP connection.
fn frozen_member_is_left_behind(version: EtcdVersion) {
    let mut deployment = Deployment::start(version, 3, Wire::Plain, &["--health-interval=200ms"]);
    let runtime = runtime();
    let mut writer = runtime.block_on(connect(&deployment.endpoint));
    let mut watcher = runtime.block_on(connect(&deployment.endpoint));

    // The member the proxy pins, and so the one the watch will be on.
    let pinned = runtime.block_on(pinned_member(&deployment, &mut writer, "/fz/none"));
    // Leadership elsewhere, so the cluster itself does not stall on an election.
    let leader = deployment.cluster.wait_for_leader(Duration::from_secs(10)).expect("leader");
    if leader == pinned {
        assert_ne!(move_leader(&mut deployment.cluster, (pinned + 1) % 3), pinned);
    }

    let (events, acknowledged, failed, last_event_after) = runtime.block_on(async {
        let mut stream = watcher
            .watch("/fz/", Some(etcd_client::WatchOptions::new().with_prefix()))
            .await
            .expect("watch through the proxy");
        assert!(stream.message().await.expect("created").expect("open").created());
        let mut acknowledged: Vec<(String, i64)> = Vec::new();
        let mut failed: Vec<String> = Vec::new();
        for i in 0..40 {
            if i == 10 {
                deployment.cluster.freeze(pinned).expect("freeze the member the watch is on");
            }
            let key = format!("/fz/{i:03}");
            match bounded(writer.put(key.as_str(), "v", None)).await {
                Ok(put) => acknowledged.push((key, put.header().expect("header").revision())),
                Err(error) => failed.push(format!("{key}: {error}")),
            }
        }
        let frozen_at = Instant::now();
        let mut events: Vec<(String, i64)> = Vec::new();
        let deadline = frozen_at + Duration::from_secs(30);
        while !acknowledged.iter().all(|write| events.contains(write)) {
            match next_events(&mut stream, deadline.saturating_duration_since(Instant::now())).await {
                Some(more) => events.extend(more),
                None => break,
            }
        }
        (events, acknowledged, failed, frozen_at.elapsed())
    });
    deployment.cluster.thaw(pinned).expect("thaw");

    // A write in flight on the frozen member may or may not have been applied.
    assert_failures_among(&failed, &[OUTCOME_UNKNOWN]);
    assert!(failed.len() <= 2, "writes went on failing after the member froze: {failed:?}");
    let missing: Vec<_> = acknowledged.iter().filter(|write| !events.contains(write)).collect();
    assert!(missing.is_empty(), "the watch never saw {missing:?} ({last_event_after:?} after the writes)");
    assert_watch_saw_every_write(&deployment, &events, &acknowledged, failed.len(), 1);
}

both_versions!(frozen_member_is_left_behind => frozen_member_is_left_behind_3_4, frozen_member_is_left_behind_3_5);

/// Leadership is handed over and back ten times while writers go through the proxy and, for
/// comparison, straight to the leader. During a handover the leader's raft drops new proposals:
/// etcd answers `raft proposal dropped` (code `Unknown`), nothing was proposed, and a direct
/// client gets that error. The proxy sends such a write again, so its clients never see it.
/// Whether a given handover catches a write in its window is chance: the old proxy passed the
/// error on 4-6 times per run here, and the run fails if no direct write met it.
fn writes_during_leader_handovers(version: EtcdVersion) {
    let mut deployment = Deployment::start(version, 3, Wire::Plain, &["--health-interval=200ms"]);
    let runtime = runtime();
    let mut probe = runtime.block_on(connect(&deployment.endpoint));
    let pinned = runtime.block_on(pinned_member(&deployment, &mut probe, "/ho/none"));
    if deployment.cluster.wait_for_leader(Duration::from_secs(10)).expect("leader") != pinned {
        assert_eq!(move_leader(&mut deployment.cluster, pinned), pinned);
    }
    let leader_url = deployment.cluster.member(pinned).client_url;
    let running = Arc::new(AtomicBool::new(true));
    // Writers pause while leadership comes back to the pinned member: the member then forwards
    // to a leader that hands over, which drops them silently (each write then times out after
    // seconds, directly as through the proxy), and they would miss the next handovers.
    let paused = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let writers = |endpoint: String, prefix: &'static str| -> Vec<_> {
        (0..6)
            .map(|worker| {
                let (running, paused, in_flight) = (Arc::clone(&running), Arc::clone(&paused), Arc::clone(&in_flight));
                let endpoint = endpoint.clone();
                runtime.spawn(async move {
                    let mut client = connect(&endpoint).await;
                    let mut writes = Tally::default();
                    let mut i = 0;
                    while running.load(Ordering::SeqCst) {
                        // Counted before `paused` is read, so a pause that sees no write in
                        // flight sees every later write wait.
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        if paused.load(Ordering::SeqCst) {
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                        let key = format!("{prefix}{worker}/{i:05}");
                        i += 1;
                        writes.record(key.clone(), bounded(client.put(key.as_str(), "v", None)).await);
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                    writes
                })
            })
            .collect()
    };
    let through_proxy = writers(deployment.endpoint.clone(), "/ho/proxy/");
    let direct = writers(leader_url, "/ho/direct/");
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(150));
        move_leader(&mut deployment.cluster, (pinned + 1) % 3);
        std::thread::sleep(Duration::from_millis(150));
        paused.store(true, Ordering::SeqCst);
        let drained = Instant::now();
        while in_flight.load(Ordering::SeqCst) > 0 {
            assert!(drained.elapsed() < Duration::from_secs(30), "writes still in flight after 30 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        move_leader(&mut deployment.cluster, pinned);
        paused.store(false, Ordering::SeqCst);
    }
    running.store(false, Ordering::Relaxed);
    let collect = |loads: Vec<tokio::task::JoinHandle<Tally>>| {
        let mut all = Tally::default();
        for load in loads {
            all.extend(runtime.block_on(load).expect("writer"));
        }
        all
    };
    let (through_proxy, direct) = (collect(through_proxy), collect(direct));
    let dropped = |tally: &Tally| tally.failed.iter().filter(|f| f.contains("raft proposal dropped")).count();
    eprintln!(
        "direct: {} acknowledged, {} failed ({} dropped); through the proxy: {} acknowledged, {} failed; retries {}",
        direct.acknowledged.len(),
        direct.failed.len(),
        dropped(&direct),
        through_proxy.acknowledged.len(),
        through_proxy.failed.len(),
        retries(&deployment.proxy)
    );
    // Without drops among the direct writes, this run would show nothing about the proxy.
    assert!(dropped(&direct) > 0, "no handover dropped a direct write: {:?}", direct.failed);
    assert_eq!(dropped(&through_proxy), 0, "{:?}", through_proxy.failed);
    through_proxy.assert_failures_acceptable();
    runtime.block_on(through_proxy.assert_acknowledged_stored(&mut probe, "/ho/proxy/"));
}

both_versions!(
    writes_during_leader_handovers => writes_during_leader_handovers_3_4, writes_during_leader_handovers_3_5
);

/// A rolling restart, as an upgrade does it: each member of three in turn stopped with SIGTERM
/// (etcd hands leadership over and closes its connections with GOAWAY) and started again. See
/// [`roll_members`] for what clients through the proxy see.
fn rolling_restart(version: EtcdVersion) {
    let mut deployment = Deployment::start(version, 3, Wire::Plain, &["--health-interval=200ms"]);
    roll_members(&mut deployment, "/rr/", version, |cluster, member| {
        cluster.stop(member).expect("SIGTERM stops the member");
        cluster.restart(member).expect("the member starts again");
    });
}

both_versions!(rolling_restart => rolling_restart_3_4, rolling_restart_3_5);

/// The in-place upgrade of a 3-member etcd 3.4.23 cluster to 3.5.1, member by member (SIGTERM,
/// then the new binary on the same data directory), clients untouched: as [`roll_members`], and
/// `/health` shows each member's release as it changes.
#[test]
fn rolling_upgrade_3_4_to_3_5() {
    let mut deployment = Deployment::start(EtcdVersion::V3_4, 3, Wire::Plain, &["--health-interval=200ms"]);
    let (_, health) = wait_for_health(&deployment.proxy, Duration::from_secs(10), |_, body| {
        body.matches("\"version\":\"3.4.").count() == 3
    });
    assert_eq!(health.matches("\"version\":\"3.4.").count(), 3, "{health}");
    roll_members(&mut deployment, "/upgrade/", EtcdVersion::V3_5, |cluster, member| {
        cluster.upgrade(member, EtcdVersion::V3_5).expect("the member runs etcd 3.5.1 on its 3.4.23 data");
    });
    let (_, health) = deployment.proxy.http_get("/health");
    assert_eq!(health.matches("\"version\":\"3.5.").count(), 3, "{health}");
}

/// Eight clients write and read, and one watches their prefix, through the proxy while `change`
/// is done to each member of three in turn. Reads never fail; writes fail at most with "may or
/// may not have been applied" or etcd's own election errors; nothing acknowledged is lost; the
/// watch, never interrupted, sees every write once, in revision order; each member is healthy
/// again in `/health`, running a release of `version`'s line, before the next one is changed.
fn roll_members(
    deployment: &mut Deployment,
    prefix: &'static str,
    version: EtcdVersion,
    mut change: impl FnMut(&mut EtcdCluster, usize),
) {
    let runtime = runtime();
    let endpoint = deployment.endpoint.clone();
    let running = Arc::new(AtomicBool::new(true));
    let (_watcher, mut watch) = runtime.block_on(async {
        let mut watcher = connect(&endpoint).await;
        let mut stream = watcher
            .watch(prefix, Some(etcd_client::WatchOptions::new().with_prefix()))
            .await
            .expect("watch through the proxy");
        assert!(stream.message().await.expect("created").expect("open").created());
        (watcher, stream)
    });
    let collector = runtime.spawn(async move {
        let mut events: Vec<(String, i64)> = Vec::new();
        // Quiet for 8 s after the last write: everything has arrived.
        while let Some(more) = next_events(&mut watch, Duration::from_secs(8)).await {
            events.extend(more);
        }
        events
    });
    // Eight callers, so that some calls are in flight on the member whenever it stops.
    let loads: Vec<_> = (0..8)
        .map(|worker| {
            let (running, endpoint) = (Arc::clone(&running), endpoint.clone());
            runtime.spawn(async move {
                let mut client = connect(&endpoint).await;
                let (mut writes, mut failed_reads) = (Tally::default(), Vec::new());
                let mut i = 0;
                while running.load(Ordering::Relaxed) {
                    let key = format!("{prefix}{worker}/{i:05}");
                    i += 1;
                    writes.record_put(key.clone(), bounded(client.put(key.as_str(), "v", None)).await);
                    if let Err(error) = bounded(client.get(key.as_str(), None)).await {
                        failed_reads.push(format!("read after {key}: {error}"));
                    }
                }
                (writes, failed_reads)
            })
        })
        .collect();
    for member in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        change(&mut deployment.cluster, member);
        let url = deployment.cluster.member(member).client_url;
        let again = |body: &str| {
            health_entry(body, &url).is_some_and(|entry| {
                entry.contains("\"healthy\":true") && entry.contains(&format!("\"version\":\"{version}."))
            })
        };
        let (_, health) = wait_for_health(&deployment.proxy, Duration::from_secs(10), |_, body| again(body));
        assert!(again(&health), "member {member} not healthy on etcd {version} again in /health: {health}");
    }
    std::thread::sleep(Duration::from_millis(500));
    running.store(false, Ordering::Relaxed);
    let (mut writes, mut failed_reads) = (Tally::default(), Vec::new());
    for load in loads {
        let (worker_writes, worker_reads) = runtime.block_on(load).expect("load");
        writes.extend(worker_writes);
        failed_reads.extend(worker_reads);
    }
    let events = runtime.block_on(collector).expect("collector");

    assert_eq!(failed_reads, Vec::<String>::new(), "reads failed");
    writes.assert_failures_acceptable();
    assert!(writes.failed.len() <= 40, "{:?}", writes.failed);
    assert!(writes.acknowledged.len() >= 50, "too few writes went through: {}", writes.acknowledged.len());
    runtime.block_on(async {
        let mut client = connect(&deployment.endpoint).await;
        writes.assert_acknowledged_stored(&mut client, prefix).await;
    });
    assert_watch_saw_every_write(deployment, &events, &writes.acknowledged_at, writes.failed.len(), 1);
}

/// A TCP relay in front of one member that can hold the member's answers after a given number
/// of HTTP/2 frames and then cut its connections, as a member stopping under a call cuts them:
/// the proxy has then read part of an answer, and no more will come.
struct CuttingRelay {
    addr: SocketAddr,
    /// Answer frames (HEADERS or DATA of a stream) still passed before holding; -1 passes all.
    frames_left: Arc<AtomicI64>,
    /// Bytes passed toward the proxy so far.
    answered: Arc<AtomicUsize>,
    cut: tokio::sync::watch::Sender<bool>,
}

impl CuttingRelay {
    async fn start(member: SocketAddr) -> CuttingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let (cut, _) = tokio::sync::watch::channel(false);
        let relay = CuttingRelay { addr, frames_left: Arc::new(AtomicI64::new(-1)), answered: Arc::default(), cut };
        let (frames_left, answered, cut) =
            (Arc::clone(&relay.frames_left), Arc::clone(&relay.answered), relay.cut.clone());
        tokio::spawn(async move {
            // Connections made after the cut are refused: the member is gone.
            let mut cut_signal = cut.subscribe();
            loop {
                let inbound = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok((inbound, _)) => inbound, Err(_) => return },
                    _ = cut_signal.changed() => return,
                };
                let Ok(outbound) = TcpStream::connect(member).await else { continue };
                let (frames_left, answered) = (Arc::clone(&frames_left), Arc::clone(&answered));
                let mut cut_signal = cut.subscribe();
                tokio::spawn(async move {
                    let (mut in_read, mut in_write) = inbound.into_split();
                    let (mut out_read, mut out_write) = outbound.into_split();
                    let upward = tokio::io::copy(&mut in_read, &mut out_write);
                    let downward = async {
                        let (mut pending, mut buf) = (Vec::new(), vec![0u8; 64 * 1024]);
                        loop {
                            match out_read.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => pending.extend_from_slice(&buf[..n]),
                            }
                            // Whole frames only, so that holding stops exactly between two.
                            while pending.len() >= 9 && frames_left.load(Ordering::SeqCst) != 0 {
                                let length = usize::from(pending[0]) << 16
                                    | usize::from(pending[1]) << 8
                                    | usize::from(pending[2]);
                                if pending.len() < 9 + length {
                                    break;
                                }
                                if in_write.write_all(&pending[..9 + length]).await.is_err() {
                                    return;
                                }
                                answered.fetch_add(9 + length, Ordering::SeqCst);
                                let on_a_stream = pending[5..9] != [0, 0, 0, 0];
                                if on_a_stream && matches!(pending[3], 0 | 1) && frames_left.load(Ordering::SeqCst) > 0
                                {
                                    frames_left.fetch_sub(1, Ordering::SeqCst);
                                }
                                pending.drain(..9 + length);
                            }
                        }
                    };
                    // Dropping both halves on the cut closes the connection under its calls.
                    tokio::select! {
                        _ = async { tokio::join!(upward, downward) } => {}
                        _ = cut_signal.changed() => {}
                    }
                });
            }
        });
        relay
    }

    /// Passes `frames` more answer frames, then holds everything.
    fn hold_after(&self, frames: i64) {
        self.frames_left.store(frames, Ordering::SeqCst);
    }

    /// Waits (up to 10 s) until the relay holds; panics if it does not.
    async fn wait_holding(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.frames_left.load(Ordering::SeqCst) != 0 {
            assert!(Instant::now() < deadline, "the answer's first frames never came through the relay");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }
}

/// The password of the user `broken` (read-write on `/broken/`) when auth is on.
const BROKEN_USER_PASSWORD: &str = "brokenpw-7c2a";

/// A client of `endpoint`, as the user `broken` when `auth`.
async fn client_of(endpoint: &str, auth: bool) -> Client {
    let options = auth.then(|| etcd_client::ConnectOptions::new().with_user("broken", BROKEN_USER_PASSWORD));
    Client::connect([endpoint], options).await.unwrap_or_else(|error| panic!("connect to {endpoint}: {error}"))
}

/// Which of `relays` carries the proxy's calls: the one `client`'s read crosses.
async fn pinned<'a>(relays: &'a [CuttingRelay], client: &mut Client) -> &'a CuttingRelay {
    let before: Vec<usize> = relays.iter().map(CuttingRelay::answered).collect();
    client.get("/broken/none", None).await.expect("a read through the proxy");
    let crossed: Vec<&CuttingRelay> =
        relays.iter().zip(before).filter(|(relay, before)| relay.answered() > *before).map(|(r, _)| r).collect();
    assert_eq!(crossed.len(), 1, "one member serves the proxy's calls");
    crossed[0]
}

/// A read or write through `client` whose answer the member behind `relay` cuts after
/// `frames` of its frames (1: its headers; 2: its headers and first DATA frame).
async fn cut_after<T: Send + 'static>(
    relay: &CuttingRelay,
    frames: i64,
    call: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
) -> Result<T, etcd_client::Error> {
    relay.hold_after(frames);
    let call = tokio::spawn(call);
    relay.wait_holding().await;
    relay.cut();
    tokio::time::timeout(Duration::from_secs(20), call).await.expect("answered within 20 s").expect("call task")
}

fn retries(proxy: &ProxyProcess) -> f64 {
    metric(&proxy.http_get("/metrics").1, "etcd_compat_proxy_retries_total").expect("retries metric")
}

/// The member answering a call closes its connection while the answer is under way. A read is
/// sent once more, to another member, and the client gets its answer; a write is not sent
/// again (etcd applied it once) and the client is told it may or may not have been applied.
/// With `auth`, the calls are a session's (sent with the proxy's etcd token for the user).
fn broken_answers(version: EtcdVersion, auth: bool) {
    let cluster = EtcdCluster::start(ClusterSpec::new(version, 3)).expect("etcd cluster starts");
    if auth {
        for args in [
            &["user", "add", "root:rootpw"][..],
            &["role", "add", "broken"],
            &["role", "grant-permission", "broken", "--prefix=true", "readwrite", "/broken/"],
            &["user", "add", &format!("broken:{BROKEN_USER_PASSWORD}")],
            &["user", "grant-role", "broken", "broken"],
            &["auth", "enable"],
        ] {
            cluster.etcdctl_ok(args);
        }
    }
    let runtime = runtime();
    let relays: Vec<CuttingRelay> =
        cluster.client_addrs().into_iter().map(|member| runtime.block_on(CuttingRelay::start(member))).collect();
    let endpoints: Vec<String> = relays.iter().map(|relay| format!("http://{}", relay.addr)).collect();
    // Health checks and view refreshes are rare, so that only the call under test is answered
    // through a relay while it holds.
    let proxy = start_proxy(vec![
        format!("--endpoints={}", endpoints.join(",")),
        "--health-interval=1m".to_owned(),
        "--cluster-refresh-interval=1m".to_owned(),
    ]);
    let (_, health) =
        wait_for_health(&proxy, Duration::from_secs(10), |_, body| body.matches("\"healthy\":true").count() == 3);
    assert_eq!(health.matches("\"healthy\":true").count(), 3, "{health}");
    let endpoint = proxy.endpoint();
    let value = vec![b'r'; 1024 * 1024];

    runtime.block_on(async {
        let mut client = client_of(&endpoint, auth).await;
        client.put("/broken/big", value.clone(), None).await.expect("put through the proxy");
        // A 1 MiB answer cut after its first DATA frame (16 KiB), then one cut before any
        // message: each read is answered by another member, sent there once more.
        for (frames, what) in [(2, "after the first DATA frame"), (1, "after the headers")] {
            let relay = pinned(&relays, &mut client).await;
            let retried = retries(&proxy);
            let mut reader = client.clone();
            let read = cut_after(relay, frames, async move { reader.get("/broken/big", None).await }).await;
            let read = read.unwrap_or_else(|error| panic!("a read cut {what} failed: {error}"));
            assert_eq!(read.kvs().len(), 1, "cut {what}");
            assert!(read.kvs()[0].value() == &value[..], "cut {what}: another value came back");
            assert_eq!(retries(&proxy) - retried, 1.0, "cut {what}: sent once more");
        }

        // A write cut after its answer's headers: etcd applied it; the proxy does not send it
        // again, and says it may or may not have been applied.
        let relay = pinned(&relays, &mut client).await;
        let retried = retries(&proxy);
        let mut writer = client.clone();
        let written = cut_after(relay, 1, async move { writer.put("/broken/write", "once", None).await }).await;
        let (code, message) = grpc_status(written);
        assert_eq!(code, "Unavailable");
        assert!(message.contains(OUTCOME_UNKNOWN), "{message}");
        assert_eq!(retries(&proxy) - retried, 0.0, "a write is never sent again");
        let mut direct = client_of(&cluster.client_urls()[0], auth).await;
        let stored = direct.get("/broken/write", None).await.expect("read directly");
        let versions: Vec<i64> = stored.kvs().iter().map(|kv| kv.version()).collect();
        assert_eq!(versions, [1], "applied once");
    });
}

fn broken_answers_of_clients(version: EtcdVersion) {
    broken_answers(version, false);
}

fn broken_answers_of_sessions(version: EtcdVersion) {
    broken_answers(version, true);
}

both_versions!(broken_answers_of_clients => broken_answers_of_clients_3_4, broken_answers_of_clients_3_5);
both_versions!(broken_answers_of_sessions => broken_answers_of_sessions_3_4, broken_answers_of_sessions_3_5);
