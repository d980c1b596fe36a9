//! Restarts nobody notices: `--reuse-port` lets a new proxy process take over the address while
//! the old one drains, and `/ready` says when a process should get clients.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_compat_tests::{free_port, ClusterSpec, EtcdCluster, EtcdVersion, ProxyProcess};

use crate::support::{connect, runtime, start_proxy};

/// What a client loop saw: calls answered, and every failure's text (none are expected).
#[derive(Default)]
struct Tally {
    answered: AtomicU64,
    /// Calls the client library failed without sending them, resent as grpc-go would.
    resent: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.lock().expect("tally").push(what);
    }
}

fn wait_ready(proxy: &ProxyProcess, want: u16, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = proxy.http_get("/ready");
        if status == want {
            assert_eq!(body, text);
            return;
        }
        assert!(Instant::now() < deadline, "/ready never answered {want}; last {status} {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Turns on `net.ipv4.tcp_migrate_req`, as the README recommends for `--reuse-port`: a
/// connection whose handshake completes between the old process's last accept and its close is
/// then handed to the new process instead of being reset. Without it (not root, or a kernel
/// before 5.14) the test still runs, and that microseconds-wide window is left to chance.
fn migrate_queued_connections() {
    const SETTING: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    match std::fs::read_to_string(SETTING) {
        Ok(value) if value.trim() == "1" => {}
        Ok(_) => {
            if let Err(error) = std::fs::write(SETTING, "1") {
                println!("cannot set {SETTING} ({error}): the kernel may reset a connection made during the restart");
            }
        }
        Err(error) => println!("no {SETTING} ({error}): the kernel may reset a connection made during the restart"),
    }
}

/// Whether a call failed without being sent: tonic fails a call it had queued for a connection
/// that was then told to go away (hyper: Canceled, "connection closed"), or whose stream the
/// final GOAWAY left out (h2: GoAway NO_ERROR, Remote; a stream above the GOAWAY's last id was
/// never processed). The drain's two-step GOAWAY answers every call the client sent before it,
/// and grpc-go, the legacy clients' library, resends such calls by itself.
fn not_taken(error: &etcd_client::Error) -> bool {
    let text = error.to_string();
    text.contains("connection closed") || text.contains("GoAway(b\"\", NO_ERROR, Remote)")
}

/// Two kinds of legacy client through a restart: one keeps its connection and calls in a
/// loop (as a service does), one connects afresh for every call (as scripts running etcdctl
/// do). Neither may see a refused connection or a failed call.
#[test]
fn restart_with_reuse_port_refuses_nobody() {
    migrate_queued_connections();
    let cluster = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_5, 1)).expect("cluster");
    let listen = format!("127.0.0.1:{}", free_port().expect("port"));
    let args = |metrics_port: u16| {
        vec![
            format!("--endpoints={}", cluster.client_endpoints_csv()),
            "--reuse-port".to_owned(),
            format!("--listen-addr={listen}"),
            format!("--metrics-addr=http://127.0.0.1:{metrics_port}"),
            "--shutdown-grace=5s".to_owned(),
        ]
    };
    let mut old = start_proxy(args(free_port().expect("port")));
    wait_ready(&old, 200, "ready\n");
    // A connection that sends nothing (made while the old process is the only one listening)
    // keeps it draining for a moment after SIGTERM, long enough to see its /ready turn.
    let silent = std::net::TcpStream::connect(old.listen_addr()).expect("a silent connection");
    let endpoint = format!("http://{listen}");

    let runtime = runtime();
    let running = Arc::new(AtomicBool::new(true));
    let (kept, fresh) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let kept_loop = runtime.spawn({
        let (running, tally, endpoint) = (Arc::clone(&running), Arc::clone(&kept), endpoint.clone());
        async move {
            let mut client = connect(&endpoint).await;
            let mut i = 0u64;
            while running.load(Ordering::Relaxed) {
                let mut outcome = client.put(format!("/restart/kept/{i}"), "v", None).await;
                // See `not_taken`: resent once, as grpc-go does, and counted.
                if outcome.as_ref().is_err_and(not_taken) {
                    tally.resent.fetch_add(1, Ordering::Relaxed);
                    outcome = client.put(format!("/restart/kept/{i}"), "v", None).await;
                }
                match outcome {
                    Ok(_) => tally.answered.fetch_add(1, Ordering::Relaxed),
                    Err(error) => {
                        tally.fail(format!("put {i}: {error}"));
                        0
                    }
                };
                i += 1;
            }
        }
    });
    let fresh_loop = runtime.spawn({
        let (running, tally, endpoint) = (Arc::clone(&running), Arc::clone(&fresh), endpoint.clone());
        async move {
            let mut i = 0u64;
            while running.load(Ordering::Relaxed) {
                let outcome = match etcd_client::Client::connect([endpoint.as_str()], None).await {
                    Ok(mut client) => {
                        let mut outcome = client.get(format!("/restart/kept/{i}"), None).await.map(|_| ());
                        // A connection the old process took just as it began to drain.
                        if outcome.as_ref().is_err_and(not_taken) {
                            tally.resent.fetch_add(1, Ordering::Relaxed);
                            outcome = client.get(format!("/restart/kept/{i}"), None).await.map(|_| ());
                        }
                        outcome
                    }
                    Err(error) => Err(error),
                };
                match outcome {
                    Ok(()) => tally.answered.fetch_add(1, Ordering::Relaxed),
                    Err(error) => {
                        tally.fail(format!("connect and get {i}: {error}"));
                        0
                    }
                };
                i += 1;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));

    // The new process binds the same address while the old one still serves, then the old one
    // is told to stop, as a rolling update does once the new one is ready.
    let new = start_proxy(args(free_port().expect("port")));
    wait_ready(&new, 200, "ready\n");
    let before = (kept.answered.load(Ordering::Relaxed), fresh.answered.load(Ordering::Relaxed));
    old.sigterm().expect("SIGTERM");
    wait_ready(&old, 503, "draining: the proxy is shutting down\n");
    drop(silent);
    let exit = old.wait_exit(Duration::from_secs(10)).expect("the old proxy exits");
    assert!(exit.success(), "the old proxy exited with {exit}");
    let at_exit = (kept.answered.load(Ordering::Relaxed), fresh.answered.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_millis(1000));
    running.store(false, Ordering::Relaxed);
    runtime.block_on(kept_loop).expect("kept loop");
    runtime.block_on(fresh_loop).expect("fresh loop");

    assert_eq!(*kept.failures.lock().expect("tally"), Vec::<String>::new(), "the client that kept its connection");
    assert_eq!(*fresh.failures.lock().expect("tally"), Vec::<String>::new(), "the client that connects per call");
    // Both went on through the new process once the old one was gone.
    assert!(kept.answered.load(Ordering::Relaxed) > at_exit.0, "no call answered after the restart");
    assert!(fresh.answered.load(Ordering::Relaxed) > at_exit.1, "no connection served after the restart");
    assert!(before.0 > 0 && before.1 > 0, "the loops ran before the restart: {before:?}");
    // At most one call per client, queued when its connection was told to go away.
    let resent = kept.resent.load(Ordering::Relaxed) + fresh.resent.load(Ordering::Relaxed);
    assert!(resent <= 2, "{resent} calls resent");
    println!("calls the client library failed unsent and the test resent: {resent}");
    let log = old.log_contents();
    assert!(log.contains("shutting down: no new connections"), "{log}");
}

/// `/ready` is 503 until a member that serves clients is healthy, while `/health` keeps etcd's
/// shape; both turn 200 once the member is back.
#[test]
fn ready_waits_for_a_healthy_member() {
    let mut cluster = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_4, 1)).expect("cluster");
    cluster.stop(0).expect("stop the member");
    let proxy = start_proxy(vec![
        format!("--endpoints={}", cluster.client_endpoints_csv()),
        "--health-interval=200ms".to_owned(),
    ]);
    let (status, body) = proxy.http_get("/ready");
    assert_eq!((status, body.as_str()), (503, "not ready: no etcd member that serves clients is healthy yet\n"));
    assert_eq!(proxy.http_get("/health").0, 503);
    cluster.restart(0).expect("start the member again");
    wait_ready(&proxy, 200, "ready\n");
    assert_eq!(proxy.http_get("/health").0, 200);
}

/// Threads of `proxy` named as the runtime's workers.
fn worker_threads(proxy: &ProxyProcess) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", proxy.pid())).expect("the proxy's threads");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "proxy-worker")
        .count()
}

/// `--workers N` runs N event loops (named `proxy-worker`), `0` one per CPU, and the default
/// none beside the main thread; out-of-range values are refused before anything is bound.
#[test]
fn workers_are_event_loops_of_their_own() {
    let cluster = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_5, 1)).expect("cluster");
    let endpoints = format!("--endpoints={}", cluster.client_endpoints_csv());
    let one = start_proxy(vec![endpoints.clone(), "--workers=1".to_owned()]);
    assert_eq!(worker_threads(&one), 0, "one worker is the main thread");
    let three = start_proxy(vec![endpoints.clone(), "--workers=3".to_owned()]);
    assert_eq!(worker_threads(&three), 3);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_cpu = start_proxy(vec![endpoints.clone(), "--workers=0".to_owned()]);
    assert_eq!(worker_threads(&per_cpu), if cpus == 1 { 0 } else { cpus });
    let runtime = runtime();
    runtime.block_on(async {
        let mut client = connect(&format!("http://{}", three.listen_addr())).await;
        client.put("/workers/k", "v", None).await.expect("put with 3 workers");
        let got = client.get("/workers/k", None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), b"v");
    });
    let (code, stderr) = crate::support::run_proxy(&["start", "--workers=5000"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid --workers \"5000\": at most 1024; more event loops than CPUs only add switching"),
        "{stderr}"
    );
}

/// Under systemd (`Type=notify`, `NOTIFY_SOCKET` set) the proxy says `READY=1` once a member is
/// healthy and `STOPPING=1` when SIGTERM starts the drain; systemd is played by a datagram socket.
#[test]
fn systemd_hears_ready_and_stopping() {
    let cluster = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_4, 1)).expect("cluster");
    let dir = tempfile::tempdir().expect("dir");
    let socket_path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut proxy = crate::support::Running(
        std::process::Command::new(crate::support::PROXY_BIN)
            .args(["start", &format!("--endpoints={}", cluster.client_endpoints_csv())])
            .arg(format!("--listen-addr=127.0.0.1:{}", free_port().expect("port")))
            .env("NOTIFY_SOCKET", &socket_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the proxy"),
    );
    let mut buffer = [0u8; 256];
    let read = socket.recv(&mut buffer).expect("READY=1 within 10 s");
    assert_eq!(&buffer[..read], b"READY=1\nSTATUS=serving");
    let status = std::process::Command::new("kill").args(["-TERM", &proxy.0.id().to_string()]).status();
    assert!(status.expect("kill").success());
    let read = socket.recv(&mut buffer).expect("STOPPING=1 within 10 s");
    assert_eq!(&buffer[..read], b"STOPPING=1\nSTATUS=draining");
    assert!(proxy.0.wait().expect("exits").success());
}
