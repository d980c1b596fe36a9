//! Watch coalescing against real etcd: client watches that ask for the same thing as the same
//! user share one upstream watch, and each client still sees exactly what it would see
//! directly: its ids, its events from its own start revision with its filters and `prev_kv`,
//! compaction cancels; across a member kill and a token expiry; a stalled client delays nobody
//! and loses nothing; a user never gets events of keys it may not read.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, EventType, Txn, TxnOp, WatchFilterType, WatchOptions, WatchStream};
use etcd_compat_tests::{ClusterSpec, EtcdCluster, EtcdVersion};

use crate::support::{both_versions, connect, metric, revisions_seen, runtime, Deployment, Wire};

/// One event as a client sees it: type, key, value, mod revision, previous value.
type SeenEvent = (&'static str, String, String, i64, Option<String>);

/// What one watch stream saw, by watch id: its creation, events in order, and its cancel.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    created: Vec<i64>,
    events: BTreeMap<i64, Vec<SeenEvent>>,
    /// (watch id, compact revision, reason)
    canceled: Vec<(i64, i64, String)>,
}

fn gauge(deployment: &Deployment, series: &str) -> f64 {
    let (_, text) = deployment.proxy.http_get("/metrics");
    metric(&text, series).unwrap_or_else(|| panic!("{series} missing from /metrics"))
}

/// The options of watch `i` of the mix: start revisions now and in the past, filters, prev_kv.
fn mixed_options(i: usize) -> WatchOptions {
    let mut options = WatchOptions::new().with_prefix();
    let start = [0, 0, 3, 8, 15][i % 5];
    if start > 0 {
        options = options.with_start_revision(start);
    }
    options = match i % 3 {
        0 => options,
        1 => options.with_filters([WatchFilterType::NoPut]),
        _ => options.with_filters([WatchFilterType::NoDelete]),
    };
    if (i / 3) % 2 == 1 {
        options = options.with_prev_key();
    }
    options
}

/// Opens `streams` watch streams of `per_stream` watches each on `prefix`, with the mix of
/// options; waits until every watch is created.
async fn open_mixed(client: &mut Client, prefix: &str, streams: usize, per_stream: usize) -> Vec<(WatchStream, Seen)> {
    let mut opened = Vec::new();
    for s in 0..streams {
        let mut stream = client.watch(prefix, Some(mixed_options(s * per_stream))).await.expect("watch");
        for j in 1..per_stream {
            stream.watch(prefix, Some(mixed_options(s * per_stream + j))).await.expect("another watch");
        }
        let mut seen = Seen::default();
        while seen.created.len() < per_stream {
            let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("created in time")
                .expect("watch response")
                .expect("stream open");
            record(&mut seen, &response);
        }
        opened.push((stream, seen));
    }
    opened
}

fn record(seen: &mut Seen, response: &etcd_client::WatchResponse) {
    let id = response.watch_id();
    if response.created() {
        seen.created.push(id);
    }
    if response.canceled() {
        seen.canceled.push((id, response.compact_revision(), response.cancel_reason().to_owned()));
    }
    for event in response.events() {
        let kv = event.kv().expect("event kv");
        let kind = match event.event_type() {
            EventType::Put => "PUT",
            EventType::Delete => "DELETE",
        };
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        seen.events.entry(id).or_default().push((
            kind,
            text(kv.key()),
            text(kv.value()),
            kv.mod_revision(),
            event.prev_kv().map(|prev| text(prev.value())),
        ));
    }
}

/// Reads every stream until it has had no message for a while: `quiet` for the first, which
/// lets everything in flight arrive, a moment for the others.
async fn drain(streams: &mut [(WatchStream, Seen)], quiet: Duration) {
    let mut wait = quiet;
    for (stream, seen) in streams.iter_mut() {
        while let Ok(Ok(Some(response))) = tokio::time::timeout(wait, stream.message()).await {
            record(seen, &response);
        }
        wait = Duration::from_millis(50);
    }
}

/// 20 puts under `prefix`: revisions 2 to 21 on a fresh cluster.
async fn history(client: &mut Client, prefix: &str) {
    for n in 0..20 {
        client.put(format!("{prefix}k{}", n % 7), format!("h{n}"), None).await.expect("put");
    }
}

/// Puts and deletes under `prefix`, `rounds` times.
async fn churn(client: &mut Client, prefix: &str, rounds: usize) {
    for n in 0..rounds {
        client.put(format!("{prefix}k{}", n % 5), format!("v{n}"), None).await.expect("put");
        if n % 4 == 3 {
            client.delete(format!("{prefix}k{}", (n + 2) % 5), None).await.expect("delete");
        }
    }
}

fn coalesced_watchers_see_what_direct_watchers_see(version: EtcdVersion) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &[]);
    runtime().block_on(async {
        let mut writer = connect(&deployment.endpoint).await;
        history(&mut writer, "/p/").await;
        let mut through_proxy = connect(&deployment.endpoint).await;
        let mut direct = connect(&deployment.cluster.client_urls()[0]).await;
        // 200 watches: 40 streams of 5, through the proxy and directly, the same mix.
        let mut proxied = open_mixed(&mut through_proxy, "/p/", 40, 5).await;
        let mut directly = open_mixed(&mut direct, "/p/", 40, 5).await;
        churn(&mut writer, "/p/", 40).await;
        drain(&mut proxied, Duration::from_millis(500)).await;
        drain(&mut directly, Duration::from_millis(100)).await;
        let events: usize = proxied.iter().map(|(_, seen)| seen.events.values().map(Vec::len).sum::<usize>()).sum();
        assert!(events > 2000, "only {events} events delivered");
        for (n, ((_, through), (_, direct))) in proxied.iter().zip(&directly).enumerate() {
            assert_eq!(through, direct, "stream {n}");
        }
        // Six kinds of watch (filters by prev_kv): six upstream watches serve all 200.
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_client_watches"), 200.0);
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_shared_watches"), 6.0);
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_upstream_watches"), 6.0);

        // A watch from a compacted revision is cancelled the same way through the proxy.
        writer.compact(30, None).await.expect("compact");
        let mut compacted = Vec::new();
        for client in [&mut through_proxy, &mut direct] {
            let options = WatchOptions::new().with_prefix().with_start_revision(5);
            let mut stream = client.watch("/p/", Some(options)).await.expect("watch");
            let mut seen = Seen::default();
            while seen.canceled.is_empty() {
                let response = stream.message().await.expect("response").expect("open");
                record(&mut seen, &response);
            }
            compacted.push(seen);
        }
        assert_eq!(compacted[0], compacted[1]);
        assert_eq!(compacted[0].canceled[0].1, 30);
        // Streams that end leave nothing upstream.
        drop(proxied);
        let deadline = Instant::now() + Duration::from_secs(5);
        while gauge(&deployment, "etcd_compat_proxy_watch_upstream_watches") > 0.0 {
            assert!(Instant::now() < deadline, "upstream watches left after every client went");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}
both_versions!(coalesced_watchers_see_what_direct_watchers_see => coalesced_like_direct_3_4, coalesced_like_direct_3_5);

/// Every change made under `/app/` as (kind, key, value, revision), in order.
type Truth = Vec<SeenEvent>;

async fn write_through_elections(writer: &mut Client, truth: &mut Truth, key: String, value: String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match writer.put(key.as_str(), value.as_str(), None).await {
            Ok(answer) => {
                let revision = answer.header().expect("header").revision();
                truth.push(("PUT", key, value, revision, None));
                return;
            }
            Err(error) => {
                assert!(Instant::now() < deadline, "writes fail for 15 s: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Streams of `app`'s watches on `/app/` from revision `start` (0: from now).
async fn watches_of_app_prefix(client: &mut Client, count: usize, start: i64) -> Vec<(WatchStream, Seen)> {
    let mut opened = Vec::new();
    for _ in 0..count {
        let mut options = WatchOptions::new().with_prefix();
        if start > 0 {
            options = options.with_start_revision(start);
        }
        let mut stream = client.watch("/app/", Some(options)).await.expect("watch");
        let mut seen = Seen::default();
        while seen.created.is_empty() {
            let response = stream.message().await.expect("response").expect("open");
            record(&mut seen, &response);
        }
        opened.push((stream, seen));
    }
    opened
}

fn coalesced_watches_survive_member_kill_and_token_expiry(version: EtcdVersion) {
    let spec = ClusterSpec::new(version, 3).with_extra_args(["--auth-token-ttl=2"]);
    let mut deployment = Deployment::start_with(spec, Wire::Plain, &[]);
    enable_auth(&deployment.cluster);
    runtime().block_on(async {
        let app = || Some(ConnectOptions::new().with_user("app", "apppw"));
        let mut client = Client::connect([deployment.endpoint.as_str()], app()).await.expect("connect");
        let mut writer = Client::connect([deployment.endpoint.as_str()], app()).await.expect("connect");
        let mut truth = Truth::new();
        for n in 0..5 {
            write_through_elections(&mut writer, &mut truth, format!("/app/k{n}"), format!("a{n}")).await;
        }
        let first = truth[0].3;
        let mut watches = watches_of_app_prefix(&mut client, 30, 0).await;
        watches.extend(watches_of_app_prefix(&mut client, 20, first).await);
        for n in 0..10 {
            write_through_elections(&mut writer, &mut truth, format!("/app/k{n}"), format!("b{n}")).await;
        }
        // The shared stream lives on the first member the proxy lists.
        deployment.cluster.kill(0).expect("kill member 0");
        for n in 0..10 {
            write_through_elections(&mut writer, &mut truth, format!("/app/k{n}"), format!("c{n}")).await;
        }
        // Every token expires; new watches are then asked for on the shared stream.
        tokio::time::sleep(Duration::from_secs(4)).await;
        watches.extend(watches_of_app_prefix(&mut client, 10, first).await);
        for n in 0..10 {
            write_through_elections(&mut writer, &mut truth, format!("/app/k{n}"), format!("d{n}")).await;
        }
        drain(&mut watches, Duration::from_millis(1500)).await;
        let since = |start: i64| -> Vec<SeenEvent> { truth.iter().filter(|e| e.3 >= start).cloned().collect() };
        for (n, (_, seen)) in watches.iter().enumerate() {
            let id = seen.created[0];
            let expected = if n < 30 { since(truth[5].3) } else { since(first) };
            assert_eq!(seen.events.get(&id).cloned().unwrap_or_default(), expected, "watch {n}");
            assert!(seen.canceled.is_empty(), "watch {n}: {:?}", seen.canceled);
        }
        assert!(gauge(&deployment, "etcd_compat_proxy_watch_shared_watches") >= 1.0);
    });
}
both_versions!(coalesced_watches_survive_member_kill_and_token_expiry => coalesced_survive_kill_and_expiry_3_4, coalesced_survive_kill_and_expiry_3_5);

/// `root`; `app` with read-write on `/app/`; `other` with read-write on `/other/`; auth on.
fn enable_auth(cluster: &EtcdCluster) {
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["role", "add", "app"],
        &["role", "grant-permission", "app", "--prefix=true", "readwrite", "/app/"],
        &["user", "add", "app:apppw"],
        &["user", "grant-role", "app", "app"],
        &["role", "add", "other"],
        &["role", "grant-permission", "other", "--prefix=true", "readwrite", "/other/"],
        &["user", "add", "other:otherpw"],
        &["user", "grant-role", "other", "other"],
        &["auth", "enable"],
    ] {
        cluster.etcdctl_ok(args);
    }
}

fn a_user_never_receives_events_it_may_not_read(version: EtcdVersion) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &[]);
    enable_auth(&deployment.cluster);
    runtime().block_on(async {
        let login = |user: &str, password: &str| Some(ConnectOptions::new().with_user(user, password));
        let mut app = Client::connect([deployment.endpoint.as_str()], login("app", "apppw")).await.expect("app");
        let mut root = Client::connect([deployment.endpoint.as_str()], login("root", "rootpw")).await.expect("root");
        let mut other =
            Client::connect([deployment.endpoint.as_str()], login("other", "otherpw")).await.expect("other");
        let mut direct_other =
            Client::connect(deployment.cluster.client_urls(), login("other", "otherpw")).await.expect("direct");
        let mut app_watches = watches_of_app_prefix(&mut app, 3, 0).await;
        let mut root_watches = watches_of_app_prefix(&mut root, 2, 0).await;
        // `other` asks for the same watch: refused as etcd refuses it directly.
        let mut refused = Vec::new();
        for client in [&mut other, &mut direct_other] {
            let mut stream = client.watch("/app/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
            let mut seen = Seen::default();
            while seen.canceled.is_empty() {
                let response = stream.message().await.expect("response").expect("open");
                record(&mut seen, &response);
            }
            refused.push((stream, seen));
        }
        assert_eq!(refused[0].1, refused[1].1);
        assert!(refused[0].1.canceled[0].2.contains("permission denied"), "{:?}", refused[0].1);
        for n in 0..5 {
            app.put(format!("/app/k{n}"), "v", None).await.expect("put");
        }
        drain(&mut app_watches, Duration::from_millis(500)).await;
        drain(&mut root_watches, Duration::from_millis(100)).await;
        drain(&mut refused, Duration::from_millis(300)).await;
        for (_, seen) in app_watches.iter().chain(&root_watches) {
            assert_eq!(seen.events.values().map(Vec::len).sum::<usize>(), 5);
        }
        assert!(refused[0].1.events.is_empty(), "other received {:?}", refused[0].1.events);
        // One shared watch per user: app's and root's.
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_shared_watches"), 2.0);
    });
}
both_versions!(a_user_never_receives_events_it_may_not_read => no_events_without_permission_3_4, no_events_without_permission_3_5);

fn a_stalled_watcher_delays_nobody_and_loses_nothing(version: EtcdVersion) {
    stalled_watcher(version, false);
}
both_versions!(a_stalled_watcher_delays_nobody_and_loses_nothing => stalled_watcher_delays_nobody_3_4, stalled_watcher_delays_nobody_3_5);

/// As above, and the stalled client asks for progress before it reads again: etcd's answer on the
/// client's own stream says nothing of the events the shared watch still holds for it, which it
/// must get all the same when it is moved to a watch of its own.
fn a_stalled_watcher_asking_for_progress_loses_nothing(version: EtcdVersion) {
    stalled_watcher(version, true);
}
both_versions!(a_stalled_watcher_asking_for_progress_loses_nothing => stalled_progress_3_4, stalled_progress_3_5);

fn stalled_watcher(version: EtcdVersion, ask_progress: bool) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &["--max-buffered-response-bytes=65536"]);
    runtime().block_on(async {
        let mut writer = connect(&deployment.endpoint).await;
        // Its own connection: a client that stops reading holds its connection's window too.
        let mut stalled_client = connect(&deployment.endpoint).await;
        let mut stalled = stalled_client.watch("/s/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
        let created = stalled.message().await.expect("created").expect("open");
        assert!(created.created());
        let mut readers = Vec::new();
        for _ in 0..10 {
            let mut client = connect(&deployment.endpoint).await;
            let mut stream = client.watch("/s/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
            assert!(stream.message().await.expect("created").expect("open").created());
            readers.push((client, stream));
        }
        // 6.4 MiB: more than the stalled client's HTTP/2 windows (2 MiB per stream, 5 MiB per
        // connection) and the proxy's send buffer hold together, so that it is certainly detached
        // (at 3.2 MiB it sometimes was not, with the proxy on two workers).
        let value = "x".repeat(16 * 1024);
        let mut revisions = Vec::new();
        for n in 0..400 {
            let answer = writer.put(format!("/s/k{}", n % 10), value.as_str(), None).await.expect("put");
            revisions.push(answer.header().expect("header").revision());
        }
        // The others get everything while one client reads nothing.
        for (n, (_, stream)) in readers.iter_mut().enumerate() {
            let mut got = Vec::new();
            while got.len() < revisions.len() {
                let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
                    .await
                    .unwrap_or_else(|_| panic!("reader {n} stalled with {} of {} events", got.len(), revisions.len()))
                    .expect("response")
                    .expect("open");
                got.extend(response.events().iter().map(|e| e.kv().expect("kv").mod_revision()));
            }
            assert_eq!(got, revisions, "reader {n}");
        }
        assert!(
            gauge(&deployment, "etcd_compat_proxy_watch_detached_total") >= 1.0,
            "the stalled watch was never detached"
        );
        if ask_progress {
            stalled.request_progress().await.expect("progress request");
            // Answered on the client's own stream while the shared watch's events wait for it.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // The stalled client reads at last: every event, in order, once.
        let mut got = Vec::new();
        while got.len() < revisions.len() {
            let response = tokio::time::timeout(Duration::from_secs(10), stalled.message())
                .await
                .unwrap_or_else(|_| {
                    panic!("the stalled watch stopped after {} of {} events", got.len(), revisions.len())
                })
                .expect("response")
                .expect("open");
            got.extend(response.events().iter().map(|e| e.kv().expect("kv").mod_revision()));
        }
        assert_eq!(got, revisions);
    });
}

/// Watches from now on, or from the next revision, join a shared watch at once, with no watch of
/// their own at etcd (the first creates the shared one): each is told it exists with the revision
/// etcd had when it asked, and then sees exactly the events a watch created directly at the same
/// moment sees.
fn watches_from_now_join_at_once(version: EtcdVersion) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &[]);
    runtime().block_on(async {
        let mut writer = connect(&deployment.endpoint).await;
        history(&mut writer, "/n/").await;
        let mut first_client = connect(&deployment.endpoint).await;
        let mut first = first_client.watch("/n/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
        assert!(first.message().await.expect("created").expect("open").created());
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_shared_subscribers"), 1.0);
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_upstream_watches"), 1.0);
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_joined_at_once_total"), 1.0);
        let mut joined = Vec::new();
        for n in 0..20 {
            let before = writer.put("/n/before", format!("b{n}"), None).await.expect("put");
            let written = before.header().expect("header").revision();
            let mut client = connect(&deployment.endpoint).await;
            // Every other one from the next revision, as clients that read and then watch ask.
            let mut options = WatchOptions::new().with_prefix();
            if n % 2 == 1 {
                options = options.with_start_revision(written + 1);
            }
            let mut stream = client.watch("/n/", Some(options)).await.expect("watch");
            let created = stream.message().await.expect("created").expect("open");
            assert!(created.created(), "watch {n}");
            assert_eq!(created.watch_id(), 0, "watch {n}: the id etcd gives a stream's first watch");
            let from = created.header().expect("header").revision();
            assert!(from >= written, "watch {n} created at {from}, before the write at {written} it followed");
            assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_upstream_watches"), 1.0, "watch {n} has its own");
            joined.push((client, stream, from));
        }
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_joined_at_once_total"), 21.0);
        let mut direct_client = connect(&deployment.cluster.client_urls()[0]).await;
        let mut direct = direct_client.watch("/n/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
        assert!(direct.message().await.expect("created").expect("open").created());
        let mut revisions = Vec::new();
        for n in 0..10 {
            let answer = writer.put(format!("/n/k{n}"), format!("after{n}"), None).await.expect("put");
            revisions.push(answer.header().expect("header").revision());
        }
        assert_eq!(revisions_seen(&mut direct, revisions.len()).await, revisions, "direct");
        for (n, (_, stream, from)) in joined.iter_mut().enumerate() {
            // The puts to /n/before made after this watch was created come first.
            let expected: Vec<i64> = (*from + 1..revisions[0]).chain(revisions.iter().copied()).collect();
            assert_eq!(revisions_seen(stream, expected.len()).await, expected, "watch {n}");
        }
    });
}
both_versions!(watches_from_now_join_at_once => joined_at_once_3_4, joined_at_once_3_5);

/// etcd's count of watch streams (every client stream through the proxy that reaches etcd is one).
fn etcd_watch_streams(deployment: &Deployment) -> f64 {
    let url = &deployment.cluster.client_urls()[0];
    let addr = url.trim_start_matches("http://").parse().expect("the member's address");
    let (status, text) = etcd_compat_tests::http_get(addr, "/metrics", Duration::from_secs(5)).expect("etcd's metrics");
    assert_eq!(status, 200, "{text}");
    metric(&text, "etcd_debugging_mvcc_watch_stream_total").expect("etcd_debugging_mvcc_watch_stream_total")
}

/// Clients whose watches are all shared ask for progress: each gets etcd's progress answer (watch
/// id -1, a revision no older than the last write), ahead of the next event, and their streams
/// still cost etcd nothing: the answer comes from the shared stream, asked by the hub.
fn progress_of_shared_watches_costs_etcd_no_stream(version: EtcdVersion) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &[]);
    runtime().block_on(async {
        let mut writer = connect(&deployment.endpoint).await;
        writer.put("/g/a", "1", None).await.expect("put");
        let mut watchers = Vec::new();
        for n in 0..10 {
            let mut client = connect(&deployment.endpoint).await;
            let mut stream = client.watch("/g/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
            assert!(stream.message().await.expect("created").expect("open").created(), "watch {n}");
            watchers.push((client, stream));
        }
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_joined_at_once_total"), 10.0);
        let streams_before = etcd_watch_streams(&deployment);
        let written = writer.put("/g/b", "2", None).await.expect("put").header().expect("header").revision();
        for (n, (_, stream)) in watchers.iter_mut().enumerate() {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("the event in time")
                .expect("response")
                .expect("open");
            assert_eq!(event.events().len(), 1, "watcher {n}: {event:?}");
            stream.request_progress().await.expect("progress request");
            let progress = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .unwrap_or_else(|_| panic!("watcher {n}: no progress answer"))
                .expect("response")
                .expect("open");
            assert_eq!(progress.watch_id(), -1, "watcher {n}: {progress:?}");
            assert!(progress.events().is_empty(), "watcher {n}: {progress:?}");
            assert!(progress.header().expect("header").revision() >= written, "watcher {n}: {progress:?}");
        }
        // Requests sent together are answered one by one, each once (checked below).
        let (_, stream) = &mut watchers[0];
        for _ in 0..3 {
            stream.request_progress().await.expect("progress request");
        }
        for n in 0..3 {
            let progress = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .unwrap_or_else(|_| panic!("progress answer {n} missing"))
                .expect("response")
                .expect("open");
            assert_eq!((progress.watch_id(), progress.events().len()), (-1, 0), "answer {n}: {progress:?}");
        }
        let next = writer.put("/g/c", "3", None).await.expect("put").header().expect("header").revision();
        for (n, (_, stream)) in watchers.iter_mut().enumerate() {
            // The next message is the event: no answer came twice.
            let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .unwrap_or_else(|_| panic!("watcher {n}: no event"))
                .expect("response")
                .expect("open");
            let revisions: Vec<i64> = event.events().iter().map(|e| e.kv().expect("kv").mod_revision()).collect();
            assert_eq!(revisions, [next], "watcher {n}: {event:?}");
        }
        assert_eq!(etcd_watch_streams(&deployment), streams_before, "a progress request opened a stream at etcd");
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_upstream_watches"), 1.0);
    });
}
both_versions!(progress_of_shared_watches_costs_etcd_no_stream => shared_progress_3_4, shared_progress_3_5);

/// A fleet reconnecting: 100 watches of one prefix arrive at once, before any shared watch
/// exists. They share one watch at etcd from the start (every one joins at once, none gets a
/// watch of its own), and each sees exactly the events a direct watch sees.
fn a_fleet_arriving_at_once_shares_one_watch(version: EtcdVersion) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &[]);
    runtime().block_on(async {
        let mut writer = connect(&deployment.endpoint).await;
        let current = writer.put("/f/start", "s", None).await.expect("put").header().expect("header").revision();
        let mut clients = Vec::new();
        for _ in 0..10 {
            clients.push(connect(&deployment.endpoint).await);
        }
        let mut creating = tokio::task::JoinSet::new();
        for n in 0..100usize {
            let mut client = clients[n % clients.len()].clone();
            creating.spawn(async move {
                // Half from now, half from the next revision, as agents that read first ask.
                let mut options = WatchOptions::new().with_prefix();
                if n % 2 == 1 {
                    options = options.with_start_revision(current + 1);
                }
                let mut stream = client.watch("/f/", Some(options)).await.expect("watch");
                let created = stream.message().await.expect("created").expect("open");
                assert!(created.created(), "watch {n}");
                assert_eq!(created.watch_id(), 0, "watch {n}");
                stream
            });
        }
        let mut streams = Vec::new();
        while let Some(stream) = creating.join_next().await {
            streams.push(stream.expect("watcher"));
        }
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_joined_at_once_total"), 100.0);
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_upstream_watches"), 1.0);
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_shared_subscribers"), 100.0);
        let mut direct_client = connect(&deployment.cluster.client_urls()[0]).await;
        let mut direct = direct_client.watch("/f/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
        assert!(direct.message().await.expect("created").expect("open").created());
        let mut revisions = Vec::new();
        for n in 0..10 {
            let answer = writer.put(format!("/f/k{n}"), format!("v{n}"), None).await.expect("put");
            revisions.push(answer.header().expect("header").revision());
        }
        assert_eq!(revisions_seen(&mut direct, revisions.len()).await, revisions, "direct");
        for (n, stream) in streams.iter_mut().enumerate() {
            assert_eq!(revisions_seen(stream, revisions.len()).await, revisions, "watch {n}");
        }
        drop(streams);
        drop(clients);
        // The last client gone, the shared watch goes too.
        let deadline = Instant::now() + Duration::from_secs(5);
        while gauge(&deployment, "etcd_compat_proxy_watch_upstream_watches") > 0.0 {
            assert!(Instant::now() < deadline, "the shared watch outlived its clients");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}
both_versions!(a_fleet_arriving_at_once_shares_one_watch => fleet_at_once_3_4, fleet_at_once_3_5);

/// A create that asks for the id of a watch already on the stream is refused as etcd refuses it,
/// also when that watch is shared (etcd never had it on the client's stream, and would have
/// accepted the id, handing the client the shared watch's events under the new watch).
fn a_create_reusing_a_shared_watch_id_is_refused_as_etcd_refuses_it(version: EtcdVersion) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &[]);
    runtime().block_on(async {
        let mut writer = connect(&deployment.cluster.client_urls()[0]).await;
        let (mut outcomes, mut open) = (Vec::new(), Vec::new());
        for endpoint in [deployment.cluster.client_urls()[0].clone(), deployment.endpoint.clone()] {
            let mut client = connect(&endpoint).await;
            let mut stream = client.watch("/d/a", None).await.expect("watch a");
            let mut seen = Vec::new();
            let answer = |response: etcd_client::WatchResponse| {
                let keys: Vec<String> = response
                    .events()
                    .iter()
                    .filter_map(|e| e.kv())
                    .map(|kv| kv.key_str().unwrap_or("?").to_owned())
                    .collect();
                (
                    response.watch_id(),
                    response.created(),
                    response.canceled(),
                    response.cancel_reason().to_owned(),
                    keys,
                )
            };
            seen.push(answer(stream.message().await.expect("a created").expect("open")));
            stream.watch("/d/b", None).await.expect("watch b");
            seen.push(answer(stream.message().await.expect("b created").expect("open")));
            stream.watch("/d/c", Some(WatchOptions::new().with_watch_id(1))).await.expect("watch c");
            seen.push(answer(stream.message().await.expect("c answered").expect("open")));
            for key in ["/d/c", "/d/b"] {
                writer.put(key, "v", None).await.expect("put");
            }
            seen.push(answer(stream.message().await.expect("event").expect("open")));
            outcomes.push(seen);
            open.push((client, stream));
        }
        let refused = (-1, true, true, "mvcc: duplicate watch ID provided on the WatchStream".to_owned(), Vec::new());
        assert_eq!(outcomes[0][2], refused, "direct");
        assert_eq!(outcomes[1], outcomes[0], "through the proxy, as directly");
        assert_eq!(outcomes[1][3], (1, false, false, String::new(), vec!["/d/b".to_owned()]));
        // Both of the client's watches were shared: the case etcd alone would get wrong.
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_shared_subscribers"), 2.0);
    });
}
both_versions!(a_create_reusing_a_shared_watch_id_is_refused_as_etcd_refuses_it => duplicate_shared_id_3_4, duplicate_shared_id_3_5);

/// A client whose watches are all shared creates and cancels watches for a long time: every
/// answer comes from the proxy or the hub, and none of it counts against what the client may
/// have waiting for etcd (cancels of shared watches did, and after about 6000 of them the
/// client's stream was no longer read).
#[test]
fn creating_and_cancelling_shared_watches_for_long_keeps_the_stream_served() {
    let deployment = Deployment::start(EtcdVersion::V3_5, 1, Wire::Plain, &[]);
    runtime().block_on(async {
        let mut client = connect(&deployment.endpoint).await;
        let mut stream = client.watch("/loop/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
        assert!(stream.message().await.expect("created").expect("open").created());
        for round in 0..8000 {
            stream.watch("/loop/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
            let created = tokio::time::timeout(Duration::from_secs(5), stream.message())
                .await
                .unwrap_or_else(|_| panic!("round {round}: no created answer within 5 s"))
                .expect("created")
                .expect("open");
            assert!(created.created(), "round {round}");
            stream.cancel(created.watch_id()).await.expect("cancel");
            let cancelled = stream.message().await.expect("cancelled").expect("open");
            assert!(cancelled.canceled(), "round {round}");
        }
        assert_eq!(gauge(&deployment, "etcd_compat_proxy_watch_shared_subscribers"), 1.0);
    });
}

/// A client that stops reading in the middle of a fragmented response (a revision too large for
/// one message, with `fragment` asked) gets each of its events once when it reads again: the
/// stream is not paused between two fragments of a revision (re-created from that revision,
/// the watch was sent its first fragments again).
#[test]
fn a_stalled_fragmented_watch_gets_each_event_once() {
    let spec = ClusterSpec::new(EtcdVersion::V3_5, 1).with_extra_args(["--max-txn-ops=1000"]);
    let deployment = Deployment::start_with(spec, Wire::Plain, &["--max-buffered-response-bytes=65536"]);
    runtime().block_on(async {
        let mut writer = connect(&deployment.cluster.client_urls()[0]).await;
        let keys: Vec<String> = (0..170).map(|n| format!("/f/k{n:03}")).collect();
        let value = "v".repeat(8 * 1024);
        for key in &keys {
            writer.put(key.as_str(), value.as_str(), None).await.expect("put");
        }
        let options = || Some(WatchOptions::new().with_prefix().with_prev_key().with_fragment());
        let mut direct_client = connect(&deployment.cluster.client_urls()[0]).await;
        let mut direct = direct_client.watch("/f/", options()).await.expect("direct watch");
        assert!(direct.message().await.expect("created").expect("open").created());
        let mut stalled_client = connect(&deployment.endpoint).await;
        let mut stalled = stalled_client.watch("/f/", options()).await.expect("watch");
        assert!(stalled.message().await.expect("created").expect("open").created());
        // Nearly the client's 2 MiB stream window, then a revision of 2.7 MiB with its previous
        // values, which etcd sends in fragments of at most 1.5 MiB: the proxy's queue fills in
        // the middle of that revision.
        writer.put("/f/pad1", "p".repeat(1 << 20), None).await.expect("pad");
        writer.put("/f/pad2", "p".repeat(900 << 10), None).await.expect("pad");
        let changed = "w".repeat(8 * 1024);
        let ops: Vec<TxnOp> = keys.iter().map(|key| TxnOp::put(key.as_str(), changed.as_str(), None)).collect();
        let txn = writer.txn(Txn::new().and_then(ops)).await.expect("txn");
        let txn_revision = txn.header().expect("header").revision();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut outcomes = Vec::new();
        for stream in [&mut direct, &mut stalled] {
            let mut events = Vec::new();
            let mut fragments = 0;
            // Until quiet, or far past what etcd sent (the stream re-sent the revision in a loop).
            while events.len() <= 4 * (2 + keys.len()) {
                let Ok(response) = tokio::time::timeout(Duration::from_secs(2), stream.message()).await else { break };
                let response = response.expect("response").expect("open");
                let revisions = response.events().iter().map(|e| e.kv().expect("kv").mod_revision());
                fragments += usize::from(revisions.clone().any(|revision| revision == txn_revision));
                events.extend(response.events().iter().map(|e| {
                    (e.kv().expect("kv").mod_revision(), e.kv().expect("kv").key_str().unwrap_or("?").to_owned())
                }));
            }
            outcomes.push((events, fragments));
        }
        let (direct_events, direct_fragments) = &outcomes[0];
        assert_eq!(direct_events.len(), 2 + keys.len(), "direct");
        assert!(*direct_fragments >= 2, "etcd fragmented the transaction's events");
        assert_eq!(outcomes[1].0, *direct_events, "through the proxy, every event once, in order");
    });
}
