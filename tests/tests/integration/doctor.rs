//! `doctor`, `GET /doctor` and `recover-space` against real clusters: each field-report failure
//! (F7 history never compacted, F10 NOSPACE, F11/F15 a member down, a learner left unpromoted, a
//! certificate about to expire) is flagged with its verdict, evidence and fix, the exit codes
//! are the documented ones, and the NOSPACE runbook brings writes back without losing a key or
//! the quorum.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::GetOptions;
use etcd_compat_certs::DevPki;
use etcd_compat_tests::{
    fill_history_until_nospace, quota_arg, ClusterSpec, EtcdCluster, EtcdVersion, TlsSpec, SMALL_QUOTA_BYTES,
};
use serde_json::Value;

use crate::support::{both_versions, connect, path, runtime, Deployment, Wire, PROXY_BIN};

/// Runs `etcd-compat-proxy <command> args`, returning the exit code, stdout and stderr.
fn run(command: &str, args: &[String]) -> (i32, String, String) {
    let output = Command::new(PROXY_BIN).arg(command).args(args).output().expect("run the proxy binary");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `doctor --output json` with `args`: its exit code and report.
fn doctor(args: &[String]) -> (i32, Value) {
    let mut all = vec!["--output=json".to_owned()];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = run("doctor", &all);
    let report =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("doctor printed no JSON ({e}):\n{stdout}\n{stderr}"));
    (code, report)
}

/// The check `group/name` of a report.
fn check<'a>(report: &'a Value, group: &str, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["group"] == group && c["name"] == name))
        .unwrap_or_else(|| panic!("no check {group}/{name} in {report:#}"))
}

/// `group/name` of every check whose verdict is not ok.
fn findings(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .map(|checks| {
            checks
                .iter()
                .filter(|c| c["verdict"] != "ok")
                .map(|c| {
                    format!(
                        "{}/{}: {}",
                        c["group"].as_str().unwrap_or(""),
                        c["name"].as_str().unwrap_or(""),
                        c["verdict"]
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn evidence(check: &Value) -> Vec<String> {
    check["evidence"]
        .as_array()
        .map(|lines| lines.iter().filter_map(|l| l.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn endpoints_arg(cluster: &EtcdCluster) -> String {
    format!("--endpoints={}", cluster.client_endpoints_csv())
}

/// Every key and value, read through `endpoint`.
async fn all_keys(endpoint: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut client = connect(endpoint).await;
    let answer = client.get(vec![0u8], Some(GetOptions::new().with_from_key())).await.expect("read every key");
    answer.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())).collect()
}

/// A cluster out of space through history (the same keys overwritten, never compacted): the
/// doctor says critical with `recover-space` as the fix, and `recover-space --yes` brings writes
/// back while linearizable reads through the proxy keep succeeding, with every key as it was.
fn nospace_is_critical_and_recover_space_brings_writes_back(version: EtcdVersion) {
    let quota = SMALL_QUOTA_BYTES.to_string();
    let spec = ClusterSpec::new(version, 3).with_extra_args([quota_arg(SMALL_QUOTA_BYTES)]);
    let deployment = Deployment::start_with(spec, Wire::Plain, &["--quota-backend-bytes", &quota]);
    let doctor_args = vec![endpoints_arg(&deployment.cluster), format!("--quota-backend-bytes={quota}")];
    let rt = runtime();
    let before = rt.block_on(async {
        let mut client = connect(&deployment.endpoint).await;
        for i in 0..50 {
            client.put(format!("/app/key-{i:02}"), format!("value-{i}"), None).await.expect("put");
        }
        let filled = fill_history_until_nospace(&mut client, "/fill/", 4, 4 * SMALL_QUOTA_BYTES).await.expect("fill");
        assert!(filled.values > 4, "{filled:?}");
        all_keys(&deployment.endpoint).await
    });
    assert_eq!(before.len(), 54, "50 application keys and the 4 overwritten ones");

    let (code, report) = doctor(&doctor_args);
    assert_eq!(code, 2, "critical: {:?}", findings(&report));
    assert_eq!(report["verdict"], "critical");
    let alarms = check(&report, "space", "alarms");
    assert_eq!(alarms["verdict"], "critical");
    assert!(alarms["summary"].as_str().is_some_and(|s| s.starts_with("NOSPACE alarm")), "{alarms:#}");
    assert!(
        alarms["fix"].as_str().is_some_and(|f| f.starts_with("run `etcd-compat-proxy recover-space`")),
        "{alarms:#}"
    );
    assert!(evidence(alarms).iter().all(|line| line.ends_with(": NOSPACE")), "{alarms:#}");
    // The running proxy says the same at /doctor.
    let (status, body) = deployment.proxy.try_http_get("/doctor").expect("GET /doctor");
    assert_eq!(status, 200);
    let served: Value = serde_json::from_str(&body).expect("/doctor is JSON");
    assert_eq!(served["verdict"], "critical");
    assert_eq!(check(&served, "space", "alarms")["verdict"], "critical");
    // For people: the finding and its fix under it.
    let (code, text, _) = run("doctor", &doctor_args);
    assert_eq!(code, 2);
    assert!(text.starts_with("cluster: critical ("), "{text}");
    assert!(text.lines().any(|l| l.starts_with("critical space/alarms")), "{text}");
    assert!(text.lines().any(|l| l.trim_start().starts_with("fix: run `etcd-compat-proxy recover-space`")), "{text}");

    // Linearizable reads through the proxy need a quorum: they show one never went missing.
    let reading = Arc::new(AtomicBool::new(true));
    let (reads, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let reader = {
        let (reading, reads, failures) = (reading.clone(), reads.clone(), failures.clone());
        let endpoint = deployment.endpoint.clone();
        std::thread::spawn(move || {
            runtime().block_on(async {
                let mut client = connect(&endpoint).await;
                while reading.load(Ordering::Relaxed) {
                    match client.get("/app/key-00", None).await {
                        Ok(_) => reads.fetch_add(1, Ordering::Relaxed),
                        Err(error) => {
                            eprintln!("read failed during recover-space: {error}");
                            failures.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
    };
    let mut recover_args = doctor_args.clone();
    recover_args.push("--yes".to_owned());
    let (code, stdout, stderr) = run("recover-space", &recover_args);
    reading.store(false, Ordering::Relaxed);
    reader.join().expect("reader");
    assert_eq!(code, 0, "recover-space failed:\n{stdout}\n{stderr}");
    // The plan defragments the leader last.
    let order: Vec<&str> = stdout.lines().filter(|l| l.starts_with("     - ")).collect();
    assert_eq!(order.len(), 3, "{stdout}");
    assert!(order[2].contains("(leader, "), "{stdout}");
    assert!(order[..2].iter().all(|l| l.contains("(follower, ")), "{stdout}");
    assert!(stdout.contains("[3/3] disarm"), "{stdout}");
    assert!(stdout.contains("  - keys: 54 before, 54 after"), "{stdout}");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "linearizable reads failed during recover-space");
    assert!(reads.load(Ordering::Relaxed) > 0, "the reader read nothing");

    rt.block_on(async {
        let mut client = connect(&deployment.endpoint).await;
        client.put("/app/after-recovery", "written", None).await.expect("writes are back");
        let mut after = all_keys(&deployment.endpoint).await;
        after.retain(|(key, _)| key != b"/app/after-recovery");
        assert!(after == before, "keys or values changed across recover-space");
    });
    let alarms_left = deployment.cluster.etcdctl_ok(&["alarm", "list"]);
    assert_eq!(alarms_left.trim(), "", "alarms left: {alarms_left}");
    let (_, report) = doctor(&doctor_args);
    assert_eq!(check(&report, "space", "alarms")["verdict"], "ok");
}

both_versions!(
    nospace_is_critical_and_recover_space_brings_writes_back
        => nospace_is_critical_and_recover_space_brings_writes_back_3_4,
        nospace_is_critical_and_recover_space_brings_writes_back_3_5
);

/// A healthy three-member cluster is ok (exit 0) until, one at a time: history grows with no
/// compaction (exit 1), a learner is left unpromoted (exit 1), a member stops (exit 2).
fn history_learner_and_stopped_member_are_flagged(version: EtcdVersion) {
    let mut cluster = EtcdCluster::start(ClusterSpec::new(version, 3)).expect("cluster");
    // The proxy's own configuration file is what the doctor reads: endpoints and thresholds.
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("proxy.toml");
    let endpoints: Vec<String> = cluster.client_urls().iter().map(|url| format!("{url:?}")).collect();
    std::fs::write(&config, format!("endpoints = [{}]\nhistory-warning-revisions = 200\n", endpoints.join(", ")))
        .expect("write config");
    let args = vec![format!("--config={}", path(&config))];
    let (code, report) = doctor(&args);
    assert_eq!((code, findings(&report)), (0, Vec::<String>::new()), "a fresh cluster is ok");
    assert_eq!(check(&report, "members", "quorum")["summary"], "1 of 3 voting members may fail");

    runtime().block_on(async {
        let mut client = connect(&cluster.client_urls()[0]).await;
        for i in 0..300 {
            client.put("/jobs/state", format!("run-{i}"), None).await.expect("put");
        }
    });
    let (code, report) = doctor(&args);
    assert_eq!((code, findings(&report)), (1, vec!["space/history: \"warning\"".to_owned()]));
    let history = check(&report, "space", "history");
    let revision = report["cluster"]["revision"].as_i64().expect("revision");
    assert_eq!(report["cluster"]["compact_revision"], 0);
    assert_eq!(
        history["summary"],
        format!("{revision} revisions of history and no compaction ever ran: the database grows until NOSPACE")
    );
    assert!(history["fix"].as_str().is_some_and(|f| f.contains("--auto-compaction-mode")), "{history:#}");

    cluster.etcdctl_ok(&["compact", &revision.to_string()]);
    let (code, report) = doctor(&args);
    assert_eq!((code, findings(&report)), (0, Vec::<String>::new()), "compacted");
    assert_eq!(report["cluster"]["compact_revision"], revision);

    let learner = cluster.add_member(true, &[]).expect("learner joins");
    let learner_id = format!("{:x}", cluster.member(learner).member_id.expect("learner id"));
    let (code, report) = doctor(&args);
    assert_eq!((code, findings(&report)), (1, vec!["members/learners: \"warning\"".to_owned()]));
    let learners = check(&report, "members", "learners");
    assert_eq!(learners["fix"], format!("once in sync, promote: `etcdctl member promote {learner_id}`"));
    let lines = evidence(learners);
    assert_eq!(lines.len(), 1, "{learners:#}");
    assert!(lines[0].starts_with(&format!("m3 ({learner_id}): ")), "{learners:#}");
    let roles: Vec<&str> =
        report["members"].as_array().expect("members").iter().filter_map(|m| m["role"].as_str()).collect();
    assert_eq!(roles.iter().filter(|r| **r == "learner").count(), 1, "{roles:?}");
    assert_eq!(roles.iter().filter(|r| **r == "leader").count(), 1, "{roles:?}");

    let stopped = (cluster.leader_index().expect("leader") + 1) % 3;
    cluster.kill(stopped).expect("kill");
    let stopped_name = format!("m{stopped} (");
    let (code, report) = doctor(&args);
    assert_eq!(code, 2, "{:?}", findings(&report));
    let reachable = check(&report, "members", "reachable");
    assert_eq!(reachable["verdict"], "critical");
    assert_eq!(reachable["summary"], "1 of 4 members do not answer");
    let lines = evidence(reachable);
    assert_eq!(lines.len(), 1, "{reachable:#}");
    assert!(lines[0].starts_with(&stopped_name), "{reachable:#}");
    assert!(reachable["fix"].as_str().is_some_and(|f| f.contains("--initial-cluster-state=existing")), "{reachable:#}");
    assert_eq!(check(&report, "members", "quorum")["verdict"], "warning");
    assert_eq!(check(&report, "members", "quorum")["summary"], "one more member lost and the cluster loses quorum");

    // Removed from the cluster, still in the proxy's --endpoints: named as such.
    let stopped_id = format!("{:x}", cluster.member(stopped).member_id.expect("id"));
    cluster.etcdctl_ok(&["member", "remove", &stopped_id]);
    let (code, report) = doctor(&args);
    assert_eq!(
        (code, findings(&report)),
        (
            1,
            vec![
                "members/quorum: \"warning\"".to_owned(),
                "members/learners: \"warning\"".to_owned(),
                "members/endpoints: \"warning\"".to_owned()
            ]
        )
    );
    let lines = evidence(check(&report, "members", "endpoints"));
    let removed_url = &cluster.client_urls()[stopped];
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("{removed_url} is no member's client URL and does not answer: ")),
        "{lines:?}"
    );
}

both_versions!(
    history_learner_and_stopped_member_are_flagged
        => history_learner_and_stopped_member_are_flagged_3_4,
        history_learner_and_stopped_member_are_flagged_3_5
);

/// `certs <args>`, which must succeed.
fn certs(args: &[String]) {
    let (code, stdout, stderr) = run("certs", args);
    assert_eq!(code, 0, "certs {args:?}:\n{stdout}{stderr}");
}

/// Replaces the dev PKI's files (valid a day) with ones from a CA valid for years, so that only
/// the certificate a test makes short-lived is near expiry.
fn long_lived(pki: &DevPki) {
    let ca = [format!("--ca={}", path(&pki.ca_cert)), format!("--ca-key={}", path(&pki.ca_key))];
    certs(&[
        "ca".into(),
        "--cn=doctor test CA".into(),
        format!("--out-cert={}", path(&pki.ca_cert)),
        format!("--out-key={}", path(&pki.ca_key)),
        "--force".into(),
    ]);
    for (kind, cert, key) in [("server", &pki.server_cert, &pki.server_key), ("peer", &pki.peer_cert, &pki.peer_key)] {
        let mut args = vec![kind.to_owned()];
        args.extend(ca.iter().cloned());
        args.extend(["--cn=etcd".into(), "--san=127.0.0.1".into(), "--san=localhost".into(), "--days=400".into()]);
        args.extend([format!("--out-cert={}", path(cert)), format!("--out-key={}", path(key)), "--force".into()]);
        certs(&args);
    }
    let mut args = vec!["client".to_owned()];
    args.extend(ca.iter().cloned());
    args.extend(["--cn=root".into(), "--days=400".into()]);
    args.extend([
        format!("--out-cert={}", path(&pki.client_cert)),
        format!("--out-key={}", path(&pki.client_key)),
        "--force".into(),
    ]);
    certs(&args);
}

/// A listener certificate with 10 days left is a warning naming the file; the members'
/// served certificates are listed with their days left.
fn a_certificate_expiring_in_10_days_is_flagged(version: EtcdVersion) {
    let dir = tempfile::tempdir().expect("dir");
    let pki = DevPki::create(dir.path(), "cluster").expect("pki");
    long_lived(&pki);
    let cluster =
        EtcdCluster::start(ClusterSpec::new(version, 1).with_tls(TlsSpec::from_dev_pki(&pki))).expect("cluster");
    let (ca, ca_key) = (dir.path().join("proxy-ca.pem"), dir.path().join("proxy-ca.key"));
    let (cert, key) = (dir.path().join("listener.pem"), dir.path().join("listener.key"));
    certs(&[
        "ca".into(),
        "--cn=proxy-ca".into(),
        format!("--out-cert={}", path(&ca)),
        format!("--out-key={}", path(&ca_key)),
    ]);
    certs(&[
        "server".into(),
        format!("--ca={}", path(&ca)),
        format!("--ca-key={}", path(&ca_key)),
        "--cn=proxy".into(),
        "--san=127.0.0.1".into(),
        "--days=10".into(),
        format!("--out-cert={}", path(&cert)),
        format!("--out-key={}", path(&key)),
    ]);
    let args = vec![
        endpoints_arg(&cluster),
        format!("--cacert={}", path(&pki.ca_cert)),
        format!("--cert={}", path(&pki.client_cert)),
        format!("--key={}", path(&pki.client_key)),
        format!("--cert-file={}", path(&cert)),
        format!("--key-file={}", path(&key)),
    ];
    let (code, report) = doctor(&args);
    assert_eq!(code, 1, "{:?}", findings(&report));
    let expiry = check(&report, "certificates", "expiry");
    assert_eq!(expiry["verdict"], "warning");
    assert_eq!(expiry["summary"], "certificates expire within 30 days (or cannot be read)");
    let lines = evidence(expiry);
    assert_eq!(lines.len(), 1, "{expiry:#}");
    let days = ["9 days left", "10 days left"];
    assert!(lines[0].starts_with(&format!("listener {} (", path(&cert))), "{expiry:#}");
    assert!(days.iter().any(|d| lines[0].contains(d)), "{expiry:#}");
    assert!(expiry["fix"].as_str().is_some_and(|f| f.contains("etcd-compat-proxy certs renew")), "{expiry:#}");
    let certificates = report["certificates"].as_array().expect("certificates");
    let member = certificates
        .iter()
        .find(|c| c["source"].as_str().is_some_and(|s| s.starts_with("member m0 (")))
        .unwrap_or_else(|| panic!("the member's served certificate is listed: {certificates:#?}"));
    assert_eq!(member["path"], cluster.client_urls()[0]);
    assert!(member["days_left"].as_i64().is_some_and(|d| d > 30), "{member:#}");
}

both_versions!(
    a_certificate_expiring_in_10_days_is_flagged
        => a_certificate_expiring_in_10_days_is_flagged_3_4,
        a_certificate_expiring_in_10_days_is_flagged_3_5
);

/// A configuration that does not validate is exit code 3 with the reason, before any etcd call;
/// recover-space refuses to act unconfirmed off a terminal.
#[test]
fn invalid_configuration_and_unconfirmed_recovery_are_refused() {
    let (code, stdout, stderr) = run("doctor", &["--dial-timeout=soon".to_owned()]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(stderr.starts_with("etcd-compat-proxy doctor: "), "{stderr}");
    assert!(stderr.contains("dial-timeout"), "{stderr}");

    let cluster = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_5, 1)).expect("cluster");
    let (code, stdout, stderr) = run("recover-space", &[endpoints_arg(&cluster)]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stdout.starts_with("plan (1 members, revision "), "{stdout}");
    assert_eq!(
        stderr,
        "etcd-compat-proxy recover-space: refusing to change the cluster without confirmation: run it on a terminal, or pass --yes\n"
    );
    let (code, stdout, _) = run("recover-space", &[endpoints_arg(&cluster), "--dry-run".to_owned()]);
    assert_eq!(code, 0);
    assert!(stdout.ends_with("dry run: nothing was changed\n"), "{stdout}");
}

/// Prefixes whose `get --prefix` answer would be near a legacy client's 4 MiB limit are named,
/// each at both depths a key counts under, with its size against the budget.
fn prefixes_near_the_response_budget_are_named(version: EtcdVersion) {
    let cluster = EtcdCluster::start(ClusterSpec::new(version, 1)).expect("cluster");
    runtime().block_on(async {
        let mut client = connect(&cluster.client_urls()[0]).await;
        // 7 values of 512 KiB: 3.5 MiB, past 75% of the 4 MiB budget.
        for i in 0..7 {
            client.put(format!("/registry/pods/p{i}"), vec![b'x'; 512 << 10], None).await.expect("put");
        }
        client.put("/registry/small/one", "v", None).await.expect("put");
    });
    let (_, report) = doctor(&[endpoints_arg(&cluster)]);
    let budget = check(&report, "space", "budget");
    assert_eq!(budget["verdict"], "warning");
    let lines = evidence(budget);
    assert_eq!(lines.len(), 3, "{budget:#}");
    assert!(lines[0].starts_with("/registry/: 3.5 MiB in 8 keys ("), "{budget:#}");
    assert!(lines[1].starts_with("/registry/pods/: 3.5 MiB in 7 keys (88% of the 4.0 MiB budget)"), "{budget:#}");
    assert_eq!(lines[2], "scanned 8 keys, 3.5 MiB");
}

both_versions!(
    prefixes_near_the_response_budget_are_named
        => prefixes_near_the_response_budget_are_named_3_4,
        prefixes_near_the_response_budget_are_named_3_5
);
