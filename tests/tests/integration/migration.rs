//! The move to a new cluster through the proxy (`etcd-compat-proxy migrate`): a 3.4.23 source,
//! a 3.5.1 target restored from a snapshot taken through the proxy with 3.5.1's `etcdutl`, every
//! later revision replayed with the same numbers, and the admin calls guarded by the token.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, PutOptions};
use etcd_compat_tests::{ClusterSpec, EtcdCluster, EtcdVersion, FaultyLink, ProxyProcess};
use tempfile::TempDir;

use crate::support::{connect, grpc_status, metric, path, run_proxy, runtime, start_proxy, PROXY_BIN};

const TOKEN: &str = "migration-test-token-0123456789abcdef";

/// Runs `etcd-compat-proxy migrate ARGS` with no inherited `ETCD_COMPAT_PROXY_*`: (exit code, stdout, stderr).
fn migrate(args: &[&str]) -> (i32, String, String) {
    let mut command = Command::new(PROXY_BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ETCD_COMPAT_PROXY_") {
            command.env_remove(name);
        }
    }
    let output = command.arg("migrate").args(args).output().expect("run migrate");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `migrate SUBCOMMAND --admin URL --admin-token-file FILE ARGS`, which must succeed; its stdout.
fn migrate_ok(subcommand: &str, proxy: &ProxyProcess, token_file: &Path, args: &[&str]) -> String {
    let token = path(token_file);
    let mut full = vec![subcommand, "--admin", proxy.metrics_url(), "--admin-token-file", &token];
    full.extend(args);
    let (code, stdout, stderr) = migrate(&full);
    assert_eq!(code, 0, "migrate {full:?} failed:\n{stdout}\n{stderr}");
    stdout
}

fn token_file(dir: &TempDir, token: &str) -> std::path::PathBuf {
    let file = dir.path().join("admin-token");
    std::fs::write(&file, format!("{token}\n")).expect("write the token file");
    file
}

/// A 3.4.23 source cluster of `members` with the proxy in front (`--admin-token-file` set, plus
/// `proxy_args`): the temporary directory, the token file, the cluster and the proxy.
fn source_behind_proxy(
    members: usize,
    proxy_args: &[String],
) -> (TempDir, std::path::PathBuf, EtcdCluster, ProxyProcess) {
    let dir = tempfile::tempdir().expect("temp dir");
    let token = token_file(&dir, TOKEN);
    let source = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_4, members)).expect("source cluster");
    let mut args =
        vec![format!("--endpoints={}", source.client_endpoints_csv()), format!("--admin-token-file={}", path(&token))];
    args.extend_from_slice(proxy_args);
    let proxy = start_proxy(args);
    (dir, token, source, proxy)
}

/// The JSON status, polled until `done` holds (10 s at most).
fn wait_for_status(proxy: &ProxyProcess, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, stdout, stderr) = migrate(&["status", "--admin", proxy.metrics_url(), "--output", "json"]);
        assert!(code == 0 || code == 1, "migrate status failed: {stdout}{stderr}");
        let status: serde_json::Value = serde_json::from_str(&stdout).expect("status is JSON");
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: not within 10 s; last status {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Takes a snapshot through the proxy and returns its file and the revision the command printed.
fn snapshot(proxy: &ProxyProcess, token: &Path, dir: &TempDir) -> (std::path::PathBuf, i64) {
    let file = dir.path().join("source.db");
    let printed = migrate_ok("snapshot", proxy, token, &["--out", &path(&file)]);
    let revision = printed
        .split("revision ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse::<i64>().ok())
        .unwrap_or_else(|| panic!("no revision in the snapshot's output:\n{printed}"));
    assert!(printed.contains("SHA-256 checked"), "{printed}");
    assert!(printed.contains("etcdutl snapshot restore"), "{printed}");
    (file, revision)
}

async fn revision_of(client: &mut Client) -> i64 {
    client.get("/no-such-key", None).await.expect("read the revision").header().expect("header").revision()
}

#[test]
fn mirror_replays_every_revision_with_the_same_numbers() {
    let (dir, token, source, proxy) = source_behind_proxy(1, &[]);
    let endpoint = format!("http://{}", proxy.listen_addr());
    let runtime = runtime();
    let mut client = runtime.block_on(connect(&endpoint));

    // Before the snapshot: keys, one of them on a lease kept alive through the proxy.
    let lease_before = runtime.block_on(async {
        let lease = client.lease_grant(30, None).await.expect("lease").id();
        client.put("/m/leased-before", "l", Some(PutOptions::new().with_lease(lease))).await.expect("leased put");
        for i in 0..20 {
            client.put(format!("/m/before/{i:03}"), format!("b{i}"), None).await.expect("put");
        }
        client.delete("/m/before/000", None).await.expect("delete");
        lease
    });
    let keeping = Arc::new(AtomicBool::new(true));
    let keeper = keep_alive(&runtime, &client, lease_before, &keeping);
    // A writer through the proxy for the whole run, recording what etcd acknowledged.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = runtime.spawn({
        let (mut client, writing) = (client.clone(), Arc::clone(&writing));
        async move {
            let mut acknowledged = Vec::new();
            let mut i = 0;
            while writing.load(Ordering::Relaxed) {
                let (key, value) = (format!("/m/live/{i:05}"), format!("v{i}"));
                let put = client.put(key.as_str(), value.as_str(), None).await.expect("writes never fail");
                acknowledged.push((key, value, put.header().expect("header").revision()));
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acknowledged
        }
    });

    let (snapshot_file, snapshot_revision) = snapshot(&proxy, &token, &dir);
    assert!(snapshot_revision > 22, "the snapshot holds the writes made before it: revision {snapshot_revision}");
    let target = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_5, 1).restored_from(&snapshot_file))
        .expect("target restored from the snapshot");
    let mut direct = runtime.block_on(connect(&target.client_urls()[0]));
    assert_eq!(runtime.block_on(revision_of(&mut direct)), snapshot_revision, "the restored target's revision");

    let started = migrate_ok("mirror", &proxy, &token, &["--to", &target.client_endpoints_csv()]);
    assert!(started.contains(&format!("holds the current one's data at revision {snapshot_revision}")), "{started}");
    // Auth-store changes cannot be mirrored, so they are refused while the mirror runs.
    let (code, message) = grpc_status(runtime.block_on(client.user_add("during", "pw", None)));
    assert_eq!(
        (code.as_str(), message.as_str()),
        (
            "FailedPrecondition",
            "etcd-compat-proxy: a migration to a new cluster is mirroring this cluster, and users, roles and \
             permissions are not mirrored: auth-store changes are refused until `etcd-compat-proxy migrate abort` \
             or the cutover"
        )
    );
    // A lease granted during mirroring, with a key; another one granted and revoked.
    let (lease_during, lease_revoked) = runtime.block_on(async {
        let lease = client.lease_grant(60, None).await.expect("lease").id();
        client.put("/m/leased-during", "d", Some(PutOptions::new().with_lease(lease))).await.expect("leased put");
        let revoked = client.lease_grant(60, None).await.expect("lease").id();
        client.put("/m/leased-revoked", "r", Some(PutOptions::new().with_lease(revoked))).await.expect("leased put");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        client.lease_revoke(revoked).await.expect("revoke");
        (lease, revoked)
    });
    // Revisions that change more keys than a Txn may hold (etcd's --max-txn-ops is 128): a
    // prefix deletion, and one transaction deleting two prefixes around a key it puts.
    runtime.block_on(async {
        for prefix in ["/m/bulk/", "/m/t/a/", "/m/t/c/"] {
            for i in 0..150 {
                client.put(format!("{prefix}{i:03}"), "x", None).await.expect("put");
            }
        }
        client.delete("/m/bulk/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.expect("delete");
        let both = etcd_client::Txn::new().and_then([
            etcd_client::TxnOp::delete("/m/t/a/", Some(etcd_client::DeleteOptions::new().with_prefix())),
            etcd_client::TxnOp::put("/m/t/b", "between", None),
            etcd_client::TxnOp::delete("/m/t/c/", Some(etcd_client::DeleteOptions::new().with_prefix())),
        ]);
        client.txn(both).await.expect("txn");
    });
    std::thread::sleep(Duration::from_millis(1500));
    writing.store(false, Ordering::Relaxed);
    let acknowledged = runtime.block_on(writer).expect("writer");
    let source_revision = runtime.block_on(revision_of(&mut client));
    let status = wait_for_status(&proxy, "the mirror catches up", |s| s["applied_revision"] == source_revision);
    assert_eq!(status["phase"], "mirroring", "{status}");
    assert_eq!(status["lag_revisions"], 0, "{status}");
    assert_eq!(status["seed_revision"], snapshot_revision, "{status}");
    assert_eq!(status["transactions"], source_revision - snapshot_revision, "one transaction per revision: {status}");
    assert!(acknowledged.len() > 100, "the writer wrote during the whole run: {}", acknowledged.len());

    // Every acknowledged write is on the target with its value and the revision it was acknowledged at.
    runtime.block_on(async {
        assert_eq!(revision_of(&mut direct).await, source_revision);
        let on_target = direct.get("/m/live/", Some(GetOptions::new().with_prefix())).await.expect("read the target");
        let stored: Vec<(String, String, i64)> = on_target
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_owned(), kv.value_str().unwrap().to_owned(), kv.mod_revision()))
            .collect();
        assert_eq!(stored, acknowledged, "the target holds exactly the acknowledged writes, at their revisions");
        let leases: Vec<i64> = direct.leases().await.expect("leases").leases().iter().map(|l| l.id()).collect();
        assert!(leases.contains(&lease_before) && leases.contains(&lease_during), "{leases:x?}");
        // The revoked lease is gone from the target too, after its key (deleted at the revoke's revision).
        let deadline = Instant::now() + Duration::from_secs(5);
        while direct.leases().await.expect("leases").leases().iter().any(|l| l.id() == lease_revoked) {
            assert!(Instant::now() < deadline, "lease {lease_revoked:x} was not revoked on the target");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(direct.get("/m/leased-revoked", None).await.expect("read").count(), 0);
        let left = direct.get("/m/", Some(GetOptions::new().with_prefix().with_keys_only())).await.expect("read");
        let left: Vec<&str> =
            left.kvs().iter().map(|kv| kv.key_str().unwrap()).filter(|k| !k.starts_with("/m/live/")).collect();
        assert!(
            left.contains(&"/m/t/b") && !left.iter().any(|k| k.starts_with("/m/bulk/") || k.starts_with("/m/t/a/")),
            "{left:?}"
        );
        for (key, lease) in [("/m/leased-before", lease_before), ("/m/leased-during", lease_during)] {
            let kv = direct.get(key, None).await.expect("read").kvs().first().cloned().expect("the leased key");
            assert_eq!(kv.lease(), lease, "{key}");
        }
    });
    let verified = migrate_ok("verify", &proxy, &token, &[]);
    assert!(verified.starts_with(&format!("equal at revision {source_revision} (")), "{verified}");
    let human = migrate_ok("status", &proxy, &token, &[]);
    assert!(human.contains("phase:            mirroring") && human.contains("(lag 0 revisions)"), "{human}");
    let (_, metrics) = proxy.http_get("/metrics");
    assert_eq!(metric(&metrics, "etcd_compat_proxy_migration_phase{phase=\"mirroring\"}"), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, "etcd_compat_proxy_migration_phase{phase=\"idle\"}"), Some(0.0));
    assert_eq!(metric(&metrics, "etcd_compat_proxy_migration_lag_revisions"), Some(0.0));
    assert_eq!(metric(&metrics, "etcd_compat_proxy_migration_applied_revision"), Some(source_revision as f64));

    // A compaction of the source is applied to the target at the same revision.
    let compact_at = source_revision - 5;
    runtime.block_on(client.compact(compact_at, None)).expect("compact through the proxy");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let old = runtime.block_on(direct.get("/m/live/00000", Some(GetOptions::new().with_revision(compact_at - 1))));
        match old {
            Err(error) if error.to_string().contains("required revision has been compacted") => break,
            other => assert!(Instant::now() < deadline, "the target was not compacted: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let current = runtime.block_on(direct.get("/m/live/00000", Some(GetOptions::new().with_revision(compact_at))));
    assert!(current.is_ok(), "compacted at the source's revision, not later: {current:?}");
    let verified = migrate_ok("verify", &proxy, &token, &[]);
    assert!(verified.starts_with(&format!("equal at revision {source_revision} (")), "after compaction: {verified}");

    // Users changed on the source around the proxy: reported, and cutover refused until fixed.
    source.etcdctl_ok(&["user", "add", "around", "--new-user-password=pw"]);
    let changed = wait_for_status(&proxy, "the auth-store change is noticed", |s| s["auth_store_changed"] == true);
    assert!(changed["error"].as_str().unwrap_or("").starts_with("users, roles or permissions changed on the source"));
    let token_arg = path(&token);
    let (code, _, stderr) = migrate(&["cutover", "--admin", proxy.metrics_url(), "--admin-token-file", &token_arg]);
    assert_eq!(code, 2);
    assert!(stderr.contains("not cutting over: users, roles or permissions changed on the source"), "{stderr}");

    // A write sent to the target behind the mirror's back stops it, naming the revision and key.
    runtime.block_on(direct.put("/m/intruder", "x", None)).expect("direct write");
    let failed = wait_for_status(&proxy, "the mirror notices the foreign write", |s| s["phase"] == "failed");
    let error = failed["error"].as_str().expect("error");
    assert!(
        error.contains(&format!("revision {} wrote key /m/intruder", source_revision + 1)),
        "the error names the foreign write: {error}"
    );
    let (code, stdout, _) = migrate(&["status", "--admin", proxy.metrics_url()]);
    assert_eq!(code, 1, "a failed mirror's status exits 1: {stdout}");

    // Abort: clients stay on the source, and the auth store may change again.
    let aborted = migrate_ok("abort", &proxy, &token, &["--output", "json"]);
    assert!(aborted.contains("\"phase\":\"aborted\""), "{aborted}");
    runtime.block_on(client.user_add("after", "pw", None)).expect("auth-store changes are allowed again");
    keeping.store(false, Ordering::Relaxed);
    runtime.block_on(keeper).expect("keeper");
    assert!(!proxy.log_contents().contains(TOKEN), "the admin token reached the log");
}

#[test]
fn admin_calls_need_the_token_and_a_seeded_target() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token = token_file(&dir, TOKEN);
    let source = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_4, 1)).expect("source cluster");
    let endpoints = format!("--endpoints={}", source.client_endpoints_csv());

    // Without --admin-token-file: status is open, everything else is refused with how to enable it.
    let open = start_proxy(vec![endpoints.clone()]);
    let (code, stdout, _) = migrate(&["status", "--admin", open.metrics_url()]);
    assert_eq!((code, stdout.as_str()), (0, "phase:            idle\n"));
    // The admin address also comes from the environment, or from the proxy's own TOML file.
    let output = Command::new(PROXY_BIN)
        .args(["migrate", "status", "--output", "json"])
        .env("ETCD_COMPAT_PROXY_ADMIN", open.metrics_url())
        .output()
        .expect("run migrate");
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("{\"phase\":\"idle\","), "{output:?}");
    let toml = dir.path().join("proxy.toml");
    std::fs::write(
        &toml,
        format!("metrics-addr = \"{}\"\nadmin-token-file = \"{}\"\n", open.metrics_url(), path(&token)),
    )
    .expect("write the TOML file");
    let (code, stdout, _) = migrate(&["status", "--config", &path(&toml)]);
    assert_eq!((code, stdout.as_str()), (0, "phase:            idle\n"));
    let (code, _, stderr) = migrate(&["status"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no admin address: pass --admin URL"), "{stderr}");
    let (_, help, _) = migrate(&["cutover", "--help"]);
    assert!(help.contains("--max-hold <DURATION>") && help.contains("[default: 5s]"), "{help}");
    let out = path(&dir.path().join("refused.db"));
    let (code, _, stderr) = migrate(&["snapshot", "--admin", open.metrics_url(), "--out", &out]);
    assert_eq!(code, 2);
    assert!(stderr.contains("this admin call is disabled: start the proxy with --admin-token-file FILE"), "{stderr}");
    assert!(!Path::new(&out).exists() && !Path::new(&format!("{out}.part")).exists());

    // With it: a wrong token is refused without being echoed or logged.
    let guarded = start_proxy(vec![endpoints.clone(), format!("--admin-token-file={}", path(&token))]);
    let wrong_dir = tempfile::tempdir().expect("temp dir");
    let wrong = token_file(&wrong_dir, "wrong-token-0123456789abcdef");
    for args in [vec!["abort"], vec!["verify"], vec!["mirror", "--to", "127.0.0.1:1"]] {
        let mut full = args.clone();
        let wrong_path = path(&wrong);
        full.extend(["--admin", guarded.metrics_url(), "--admin-token-file", &wrong_path]);
        let (code, _, stderr) = migrate(&full);
        assert_eq!(code, 2, "{args:?}");
        assert!(stderr.contains("this admin call needs the proxy's admin token"), "{args:?}: {stderr}");
    }
    let (code, _, stderr) = migrate(&["abort", "--admin", guarded.metrics_url()]);
    assert_eq!(code, 2);
    assert!(stderr.contains("this admin call needs the proxy's admin token"), "no token at all: {stderr}");
    let log = guarded.log_contents();
    assert!(log.contains("an admin call was refused: its bearer token is missing or wrong"), "{log}");
    assert!(!log.contains("wrong-token") && !log.contains(TOKEN), "a token reached the log: {log}");

    // A target that is not a copy of the source is refused before anything is replayed.
    let runtime = runtime();
    runtime.block_on(async {
        let mut client = connect(&source.client_urls()[0]).await;
        for key in ["/a", "/b", "/c"] {
            client.put(key, "source", None).await.expect("put on the source");
        }
    });
    let stranger = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_5, 1)).expect("unrelated cluster");
    runtime.block_on(async { connect(&stranger.client_urls()[0]).await.put("/b", "other", None).await.expect("put") });
    let token_arg = path(&token);
    let admin = ["--admin", guarded.metrics_url(), "--admin-token-file", token_arg.as_str()];
    let stranger_url = stranger.client_urls()[0].clone();
    let mut args = vec!["mirror", "--to", stranger_url.as_str()];
    args.extend(admin);
    let (code, _, stderr) = migrate(&args);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(
            "the target is not a copy of the source at revision 2: 2 key(s) differ (first: /a: only on the source)"
        ),
        "{stderr}"
    );
    let source_url = source.client_urls()[0].clone();
    let mut args = vec!["mirror", "--to", source_url.as_str()];
    args.extend(admin);
    let (code, _, stderr) = migrate(&args);
    assert_eq!(code, 2);
    assert!(stderr.contains("--to names the source cluster itself"), "{stderr}");
    let (_, stdout, _) = migrate(&["status", "--admin", guarded.metrics_url()]);
    assert_eq!(stdout, "phase:            idle\n", "refused mirrors leave the migration idle");

    // The token file is checked before the proxy binds anything.
    let short = dir.path().join("short-token");
    std::fs::write(&short, "short\n").expect("write");
    let short_arg = format!("--admin-token-file={}", path(&short));
    let (code, stderr) = run_proxy(&["start", &endpoints, "--metrics-addr=http://127.0.0.1:0", &short_arg]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("the token must be one line of at least 16 printable characters"), "{stderr}");
    let token_arg = format!("--admin-token-file={}", path(&token));
    let (code, stderr) = run_proxy(&["start", &endpoints, &token_arg]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("admin calls are served on --metrics-addr, which is not set"), "{stderr}");
}

/// Keeps `lease` alive through `client` every second until `keeping` is cleared; panics if the
/// lease expires or its keep-alives fail.
fn keep_alive(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    lease: i64,
    keeping: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let (mut client, keeping) = (client.clone(), Arc::clone(keeping));
    runtime.spawn(async move {
        let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.expect("keep-alive");
        while keeping.load(Ordering::Relaxed) {
            keeper.keep_alive().await.expect("renew");
            let answer = answers.message().await.expect("renewed").expect("answer");
            assert!(answer.ttl() > 0, "the lease expired");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// What a prefix watcher through the proxy saw: (key, mod_revision) per event, in order.
type Seen = Arc<std::sync::Mutex<Vec<(String, i64)>>>;

fn watch_prefix(runtime: &tokio::runtime::Runtime, client: &Client, prefix: &str, start_revision: i64) -> Seen {
    let seen: Seen = Arc::default();
    let (mut client, prefix, sink) = (client.clone(), prefix.to_owned(), Arc::clone(&seen));
    runtime.spawn(async move {
        let options = etcd_client::WatchOptions::new().with_prefix().with_start_revision(start_revision);
        let mut stream = client.watch(prefix.as_str(), Some(options)).await.expect("watch through the proxy");
        while let Some(answer) = stream.message().await.expect("the watch never breaks") {
            assert!(!answer.canceled(), "the watch was cancelled: {}", answer.cancel_reason());
            let mut seen = sink.lock().expect("lock");
            for event in answer.events() {
                let kv = event.kv().expect("kv");
                seen.push((kv.key_str().expect("utf8").to_owned(), kv.mod_revision()));
            }
        }
    });
    seen
}

/// Writers through the proxy until `writing` is cleared: every write's (key, value, revision);
/// a failed write panics, since no call may fail during the hold.
fn spawn_writers(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    writing: &Arc<AtomicBool>,
    writers: usize,
) -> Vec<tokio::task::JoinHandle<Vec<(String, String, i64)>>> {
    (0..writers)
        .map(|w| {
            let (mut client, writing) = (client.clone(), Arc::clone(writing));
            runtime.spawn(async move {
                let mut acknowledged = Vec::new();
                let mut i = 0;
                while writing.load(Ordering::Relaxed) {
                    let (key, value) = (format!("/c/w{w}/{i:05}"), format!("v{i}"));
                    match client.put(key.as_str(), value.as_str(), None).await {
                        Ok(put) => acknowledged.push((key, value, put.header().expect("header").revision())),
                        Err(error) => panic!("a write failed during the migration: {key}: {error}"),
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                acknowledged
            })
        })
        .collect()
}

#[test]
fn cutover_moves_clients_to_the_new_cluster_without_a_failed_call() {
    let (dir, token, source, proxy) = source_behind_proxy(1, &[]);
    let runtime = runtime();
    let mut client = runtime.block_on(connect(&format!("http://{}", proxy.listen_addr())));

    // A lease with a key, kept alive through the proxy from before the snapshot to the end.
    let (lease_before, first_revision) = runtime.block_on(async {
        let lease = client.lease_grant(5, None).await.expect("lease").id();
        let put = client.put("/c/leased-before", "l", Some(PutOptions::new().with_lease(lease))).await.expect("put");
        (lease, put.header().expect("header").revision())
    });
    let keeping = Arc::new(AtomicBool::new(true));
    let keeper = keep_alive(&runtime, &client, lease_before, &keeping);
    let watched_from_now = watch_prefix(&runtime, &client, "/c/", first_revision + 1);
    let writing = Arc::new(AtomicBool::new(true));
    let writers = spawn_writers(&runtime, &client, &writing, 4);

    let (snapshot_file, _) = snapshot(&proxy, &token, &dir);
    let target = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_5, 1).restored_from(&snapshot_file))
        .expect("target restored from the snapshot");
    migrate_ok("mirror", &proxy, &token, &["--to", &target.client_endpoints_csv()]);
    let lease_during = runtime.block_on(async {
        let lease = client.lease_grant(60, None).await.expect("lease").id();
        client.put("/c/leased-during", "d", Some(PutOptions::new().with_lease(lease))).await.expect("leased put");
        lease
    });
    // A watch that starts before the cutover from an old revision: history from the source, the rest from the target.
    let watched_from_old = watch_prefix(&runtime, &client, "/c/", first_revision);
    std::thread::sleep(Duration::from_millis(500));

    let verified = migrate_ok("verify", &proxy, &token, &[]);
    assert!(verified.starts_with("equal at revision "), "{verified}");
    let cut = migrate_ok("cutover", &proxy, &token, &["--max-hold", "2s"]);
    let held_ms: u64 = cut
        .split("writes were held for ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the hold time is printed: {cut}"));
    assert!(held_ms < 2000, "{cut}");
    assert!(cut.contains(&format!("clients are now served by {}", target.client_urls()[0])), "{cut}");
    let cut_revision: i64 = cut
        .split("Cut over at revision ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|r| r.parse().ok())
        .expect("revision");
    eprintln!("cutover: {cut}");

    // Writes go on, now to the target; the lease's 5 s TTL passes with keep-alives through the proxy.
    std::thread::sleep(Duration::from_secs(6));
    writing.store(false, Ordering::Relaxed);
    let mut acknowledged: Vec<(String, String, i64)> =
        writers.into_iter().flat_map(|w| runtime.block_on(w).expect("writer")).collect();
    acknowledged.sort_by_key(|(_, _, revision)| *revision);
    assert!(acknowledged.iter().any(|(_, _, r)| *r > cut_revision + 100), "writes continued after the cutover");
    keeping.store(false, Ordering::Relaxed);
    runtime.block_on(keeper).expect("the lease was kept alive across the cutover");

    let mut source_direct = runtime.block_on(connect(&source.client_urls()[0]));
    let mut target_direct = runtime.block_on(connect(&target.client_urls()[0]));
    runtime.block_on(async {
        // No write reached the source after the cutover (its own lease expiry may: the lease's
        // keep-alives now go to the target).
        let on_source = source_direct.get("/c/w", Some(GetOptions::new().with_prefix())).await.expect("read");
        let latest = on_source.kvs().iter().map(|kv| kv.mod_revision()).max();
        assert_eq!(latest, Some(cut_revision), "the source's last write is the cutover's revision");
        let last = acknowledged.last().expect("writes").2;
        assert_eq!(revision_of(&mut target_direct).await, last);
        // Every acknowledged write is on the target, with its value, at the revision it was acknowledged at.
        let stored = target_direct.get("/c/w", Some(GetOptions::new().with_prefix())).await.expect("read the target");
        let mut stored: Vec<(String, String, i64)> = stored
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_owned(), kv.value_str().unwrap().to_owned(), kv.mod_revision()))
            .collect();
        stored.sort_by_key(|(_, _, revision)| *revision);
        assert_eq!(stored, acknowledged);
        let leases: Vec<i64> = target_direct.leases().await.expect("leases").leases().iter().map(|l| l.id()).collect();
        assert!(leases.contains(&lease_before) && leases.contains(&lease_during), "{leases:x?}");
        let leased = target_direct.get("/c/leased-before", None).await.expect("read");
        assert_eq!(leased.kvs().first().map(|kv| kv.lease()), Some(lease_before), "the leased key outlived its TTL");
    });

    // Both watchers saw every write exactly once, in order, with the revisions etcd acknowledged.
    std::thread::sleep(Duration::from_millis(500));
    let writes: Vec<(String, i64)> = acknowledged.iter().map(|(k, _, r)| (k.clone(), *r)).collect();
    for (name, seen) in [("watch from before", &watched_from_now), ("watch from an old revision", &watched_from_old)] {
        let seen: Vec<(String, i64)> =
            seen.lock().expect("lock").iter().filter(|(k, _)| k.starts_with("/c/w")).cloned().collect();
        assert_eq!(seen.len(), writes.len(), "{name}: events seen vs writes acknowledged");
        assert!(seen == writes, "{name}: the events differ from the writes");
    }
    let status = wait_for_status(&proxy, "the migration is done", |s| s["phase"] == "cut-over");
    let (_, metrics) = proxy.http_get("/metrics");
    assert_eq!(metric(&metrics, "etcd_compat_proxy_migration_phase{phase=\"cut-over\"}"), Some(1.0), "{metrics}");
    assert_eq!(status["error"], serde_json::Value::Null, "{status}");
    // Auth-store changes are allowed again, now on the new cluster.
    runtime.block_on(client.user_add("after-cutover", "pw", None)).expect("user add after the cutover");
    let users = runtime.block_on(target_direct.user_list()).expect("users on the target");
    assert!(users.users().contains(&"after-cutover".to_owned()));
}

#[test]
fn cutover_that_cannot_catch_up_changes_nothing() {
    let (dir, token, source, proxy) = source_behind_proxy(1, &[]);
    let runtime = runtime();
    let mut client = runtime.block_on(connect(&format!("http://{}", proxy.listen_addr())));
    runtime.block_on(client.put("/c/seed", "s", None)).expect("put");
    let (snapshot_file, _) = snapshot(&proxy, &token, &dir);
    let mut target = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_5, 1).restored_from(&snapshot_file))
        .expect("target restored from the snapshot");
    migrate_ok("mirror", &proxy, &token, &["--to", &target.client_endpoints_csv()]);

    // A mirror stopped and started again (as after a proxy restart) goes on from the target's revision.
    runtime.block_on(client.put("/c/between", "b", None)).expect("put");
    migrate_ok("abort", &proxy, &token, &[]);
    runtime.block_on(client.put("/c/after-abort", "a", None)).expect("put");
    let mut target_direct = runtime.block_on(connect(&target.client_urls()[0]));
    let target_revision = runtime.block_on(revision_of(&mut target_direct));
    let again = migrate_ok("mirror", &proxy, &token, &["--to", &target.client_endpoints_csv()]);
    assert!(again.contains(&format!("at revision {target_revision}")), "{again}");
    drop(target_direct);

    // The target stops answering; writes still go to the source, and the mirror falls behind.
    target.freeze(0).expect("SIGSTOP the target");
    let writing = Arc::new(AtomicBool::new(true));
    let writers = spawn_writers(&runtime, &client, &writing, 2);
    std::thread::sleep(Duration::from_millis(300));
    let token_arg = path(&token);
    let (code, stdout, stderr) =
        migrate(&["cutover", "--admin", proxy.metrics_url(), "--admin-token-file", &token_arg, "--max-hold", "1s"]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("cutover abandoned after holding writes for")
            && stderr.contains("the mirror did not catch up within --max-hold 1s")
            && stderr
                .contains("clients stay on the current cluster and the held writes went on to it: nothing was lost"),
        "{stderr}"
    );
    std::thread::sleep(Duration::from_millis(300));
    writing.store(false, Ordering::Relaxed);
    let acknowledged: Vec<(String, String, i64)> =
        writers.into_iter().flat_map(|w| runtime.block_on(w).expect("writer")).collect();
    let mut source_direct = runtime.block_on(connect(&source.client_urls()[0]));
    let last = runtime.block_on(revision_of(&mut source_direct));
    assert_eq!(acknowledged.iter().map(|(_, _, r)| *r).max(), Some(last), "every write went to the source");

    // Once the target answers again, the mirror catches up and a cutover succeeds.
    target.thaw(0).expect("SIGCONT the target");
    let status = wait_for_status(&proxy, "the mirror catches up", |s| s["applied_revision"] == last);
    assert_eq!(status["phase"], "mirroring", "{status}");
    let cut = migrate_ok("cutover", &proxy, &token, &[]);
    assert!(cut.starts_with(&format!("Cut over at revision {last}:")), "{cut}");

    // Abort after a cutover is refused: clients are on the new cluster.
    let (code, _, stderr) = migrate(&["abort", "--admin", proxy.metrics_url(), "--admin-token-file", &token_arg]);
    assert_eq!(code, 2);
    assert!(stderr.contains("the cutover is done"), "{stderr}");
}

#[test]
fn cutover_with_auth_on_to_a_tls_cluster_keeps_clients_logged_in() {
    const ROOT_PASSWORD: &str = "root-pw";
    const APP_PASSWORD: &str = "app-pw";
    let secrets = tempfile::tempdir().expect("temp dir");
    let password_file = secrets.path().join("root-password");
    std::fs::write(&password_file, ROOT_PASSWORD).expect("write the password");
    let user_args = ["--user=root".to_owned(), format!("--password-file={}", path(&password_file))];
    let (dir, token, source, proxy) = source_behind_proxy(1, &user_args);
    for args in [
        vec!["user", "add", "root", "--new-user-password", ROOT_PASSWORD],
        vec!["role", "add", "app"],
        vec!["role", "grant-permission", "app", "--prefix=true", "readwrite", "/app/"],
        vec!["user", "add", "app", "--new-user-password", APP_PASSWORD],
        vec!["user", "grant-role", "app", "app"],
        vec!["auth", "enable"],
    ] {
        source.etcdctl_ok(&args);
    }
    let runtime = runtime();
    // `app` logs in through the proxy once, before the migration, and never again.
    let app = runtime.block_on(async {
        let options = etcd_client::ConnectOptions::new().with_user("app", APP_PASSWORD);
        Client::connect([format!("http://{}", proxy.listen_addr())], Some(options)).await.expect("app logs in")
    });
    let start =
        runtime.block_on(app.clone().put("/app/first", "f", None)).expect("put").header().expect("h").revision();
    let watched = watch_prefix(&runtime, &app, "/app/", start + 1);
    let writing = Arc::new(AtomicBool::new(true));
    let writer = runtime.spawn({
        let (mut app, writing) = (app.clone(), Arc::clone(&writing));
        async move {
            let mut acknowledged = Vec::new();
            let mut i = 0;
            while writing.load(Ordering::Relaxed) {
                let key = format!("/app/{i:05}");
                match app.put(key.as_str(), "v", None).await {
                    Ok(put) => acknowledged.push((key, put.header().expect("header").revision())),
                    Err(error) => panic!("a write failed during the migration: {key}: {error}"),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            acknowledged
        }
    });

    let (snapshot_file, _) = snapshot(&proxy, &token, &dir);
    let pki = etcd_compat_certs::DevPki::create(dir.path(), "target").expect("target pki");
    let spec = ClusterSpec::new(EtcdVersion::V3_5, 1)
        .with_tls(etcd_compat_tests::TlsSpec::from_dev_pki(&pki))
        .restored_from(&snapshot_file)
        .with_probe_user(&format!("root:{ROOT_PASSWORD}"));
    let target = EtcdCluster::start(spec).expect("TLS target restored from the snapshot");
    let target_url = target.client_urls()[0].clone();
    assert!(target_url.starts_with("https://"));
    migrate_ok(
        "mirror",
        &proxy,
        &token,
        &[
            "--to",
            &target_url,
            "--to-cacert",
            &path(&pki.ca_cert),
            "--to-cert",
            &path(&pki.client_cert),
            "--to-key",
            &path(&pki.client_key),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let cut = migrate_ok("cutover", &proxy, &token, &[]);
    assert!(cut.contains(&format!("clients are now served by {target_url}")), "{cut}");
    // From the cutover on, the target's TLS files are the upstream's: loaded, shown and watched.
    let ca_series = format!(
        "etcd_compat_proxy_certificate_expiry_timestamp_seconds{{role=\"upstream-ca\",path=\"{}\"",
        path(&pki.ca_cert)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = proxy.http_get("/metrics");
        let applied =
            metric(&metrics, "etcd_compat_proxy_certificate_reloads_total{side=\"upstream\",outcome=\"applied\"}");
        if applied == Some(1.0) && metrics.contains(&ca_series) {
            break;
        }
        assert!(Instant::now() < deadline, "the target's TLS files were not taken up: {metrics}");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1500));
    writing.store(false, Ordering::Relaxed);
    let acknowledged = runtime.block_on(writer).expect("writer");
    std::thread::sleep(Duration::from_millis(500));
    let seen: Vec<(String, i64)> =
        watched.lock().expect("lock").iter().filter(|(k, _)| k.as_str() != "/app/first").cloned().collect();
    assert_eq!(seen, acknowledged, "app's watch saw every write once, in order, across the cutover");

    // Read straight from the new cluster as root: app's writes are there at their revisions.
    let stored = runtime.block_on(async {
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(&pki.ca_cert).expect("ca")))
            .identity(etcd_client::Identity::from_pem(
                std::fs::read(&pki.client_cert).expect("cert"),
                std::fs::read(&pki.client_key).expect("key"),
            ));
        let options = etcd_client::ConnectOptions::new().with_tls(tls).with_user("root", ROOT_PASSWORD);
        let mut root = Client::connect([target_url.as_str()], Some(options)).await.expect("root on the target");
        let answer = root.get("/app/0", Some(GetOptions::new().with_prefix())).await.expect("read");
        answer.kvs().iter().map(|kv| (kv.key_str().unwrap().to_owned(), kv.mod_revision())).collect::<Vec<_>>()
    });
    assert_eq!(stored, acknowledged);
    assert!(acknowledged.len() > 100, "{}", acknowledged.len());
    assert!(!proxy.log_contents().contains(ROOT_PASSWORD) && !proxy.log_contents().contains(TOKEN));
}

#[test]
fn mirror_goes_on_through_member_restarts_on_both_sides() {
    let (dir, token, mut source, proxy) = source_behind_proxy(3, &[]);
    let runtime = runtime();
    let client = runtime.block_on(connect(&format!("http://{}", proxy.listen_addr())));
    let (snapshot_file, _) = snapshot(&proxy, &token, &dir);
    let mut target = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_5, 1).restored_from(&snapshot_file))
        .expect("target restored from the snapshot");
    migrate_ok("mirror", &proxy, &token, &["--to", &target.client_endpoints_csv()]);

    // A writer that keeps going whatever a restart costs it.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = runtime.spawn({
        let (mut client, writing) = (client.clone(), Arc::clone(&writing));
        async move {
            let mut i = 0;
            while writing.load(Ordering::Relaxed) {
                let _ = client.put(format!("/r/{i:05}"), "v", None).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    for index in 0..3 {
        source.stop(index).expect("stop a source member");
        std::thread::sleep(Duration::from_millis(500));
        source.restart(index).expect("start it again");
    }
    target.stop(0).expect("stop the target");
    std::thread::sleep(Duration::from_secs(2));
    target.restart(0).expect("start the target again");
    std::thread::sleep(Duration::from_millis(500));
    writing.store(false, Ordering::Relaxed);
    runtime.block_on(writer).expect("writer");

    let mut direct = runtime.block_on(connect(&source.client_urls()[0]));
    let last = runtime.block_on(revision_of(&mut direct));
    let status = wait_for_status(&proxy, "the mirror catches up after the restarts", |s| {
        s["applied_revision"] == last || s["phase"] != "mirroring"
    });
    assert_eq!(status["phase"], "mirroring", "{status}");
    assert_eq!(status["error"], serde_json::Value::Null, "{status}");
    let verified = migrate_ok("verify", &proxy, &token, &[]);
    assert!(verified.starts_with(&format!("equal at revision {last} (")), "{verified}");
    let log = proxy.log_contents();
    assert!(log.contains("the mirror paused: "), "the target's restart paused the mirror: {log}");
}

#[test]
fn mirror_counts_a_transaction_whose_answer_was_lost() {
    let (dir, token, _source, proxy) = source_behind_proxy(1, &[]);
    let runtime = runtime();
    let mut client = runtime.block_on(connect(&format!("http://{}", proxy.listen_addr())));
    let (snapshot_file, _) = snapshot(&proxy, &token, &dir);
    let target = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_5, 1).restored_from(&snapshot_file))
        .expect("target restored from the snapshot");
    let target_url = &target.client_urls()[0];
    let target_addr = target_url.trim_start_matches("http://").parse().expect("the target's address");
    let link = FaultyLink::start(target_addr).expect("a link to the target");
    migrate_ok("mirror", &proxy, &token, &["--to", &format!("http://{}", link.addr())]);
    let mut direct_target = runtime.block_on(connect(target_url));

    runtime.block_on(client.put("/before", "1", None)).expect("put");
    let before = runtime.block_on(revision_of(&mut client));
    wait_for_status(&proxy, "the mirror replays the first put", |s| s["applied_revision"] == before);

    // The mirror's transaction reaches the target, its answer does not; then the connection
    // breaks and the target cannot be reached for a while, so the mirror cannot read whether
    // the transaction landed. Answers are lost from the transaction on, not before: the
    // mirror's once-a-second check of the target would otherwise wait for a lost answer, and
    // the transaction behind it would not be sent in time.
    link.lose_answers_from_request_with(b"/lost-answer");
    runtime.block_on(client.put("/lost-answer", "2", None)).expect("put");
    let deadline = Instant::now() + Duration::from_secs(10);
    while runtime.block_on(revision_of(&mut direct_target)) != before + 1 {
        assert!(Instant::now() < deadline, "the mirror's transaction never reached the target");
        std::thread::sleep(Duration::from_millis(50));
    }
    link.refuse(true);
    link.cut();
    link.lose_answers(false);
    std::thread::sleep(Duration::from_millis(1500));
    link.refuse(false);

    runtime.block_on(client.put("/after", "3", None)).expect("put");
    let after = runtime.block_on(revision_of(&mut client));
    let status =
        wait_for_status(&proxy, "the mirror goes on", |s| s["applied_revision"] == after || s["phase"] != "mirroring");
    assert_eq!(status["phase"], "mirroring", "{status}");
    assert_eq!(status["error"], serde_json::Value::Null, "{status}");
    assert_eq!(status["transactions"], 3, "{status}");
    assert_eq!(runtime.block_on(revision_of(&mut direct_target)), after);
    let verified = migrate_ok("verify", &proxy, &token, &[]);
    assert!(verified.starts_with(&format!("equal at revision {after} (")), "{verified}");
    let log = proxy.log_contents();
    assert!(
        log.contains("the target holds the revision whose answer was lost; the mirror goes on after it"),
        "the lost answer was recognised: {log}"
    );
}
