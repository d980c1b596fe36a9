//! A legacy client with a 4 MiB gRPC receive limit reading a 5 MiB prefix (a job list grown past it).
//! Through the proxy it gets every key exactly once when it pages, a clear `ResourceExhausted`
//! instead of the gRPC size error when it doesn't, and a first page where the operator opted in;
//! etcdctl (unlimited) still gets everything, as directly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use etcd_client::{Txn, TxnOp};
use etcd_compat_tests::{etcd3_python, etcdctl_ok, workspace_root, ClusterSpec, EtcdVersion};

use crate::support::{both_versions, connect, metric, runtime, Deployment, Wire};

const KEYS: usize = 600;
const VALUE_BYTES: usize = 9 * 1024;

/// Runs the legacy Python client (grpcio, default limits) and returns its one result line.
fn python(endpoint: &str, args: &[&str]) -> String {
    let script = workspace_root().join("tests/python/range_client.py");
    let address = endpoint.trim_start_matches("http://");
    let output = Command::new(etcd3_python()).arg(script).arg(address).args(args).output().expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        output.status.success() && !stdout.is_empty(),
        "python failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn load(endpoint: &str, prefix: &str, keys: usize, value_bytes: usize) {
    runtime().block_on(async {
        let mut client = connect(endpoint).await;
        let value = vec![b'x'; value_bytes];
        for i in 0..keys {
            client.put(format!("{prefix}{i:04}"), value.clone(), None).await.expect("put");
        }
    });
}

/// Parses "PAGES 2 KEYS 600 ..." into its numbers, by label.
fn field(line: &str, label: &str) -> String {
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == label {
            return words.next().unwrap_or_default().to_owned();
        }
    }
    panic!("{label} missing from {line:?}")
}

fn legacy_client_reads_a_5_mib_prefix(version: EtcdVersion) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &["--truncate-oversize-prefix=/truncated/"]);
    let direct = deployment.cluster.client_urls()[0].clone();
    load(&direct, "/jobs/", KEYS, VALUE_BYTES);
    load(&direct, "/truncated/", KEYS, VALUE_BYTES);
    let proxy = deployment.endpoint.as_str();

    // Directly, the legacy client fails with gRPC's `received message larger than max`.
    let failed = python(&direct, &["get_prefix", "/jobs/"]);
    assert!(failed.starts_with("ERROR RESOURCE_EXHAUSTED "), "{failed}");
    assert!(failed.contains("larger than max"), "{failed}");

    // Through the proxy, without `limit`: a clear refusal that says what to do.
    let refused = python(proxy, &["get_prefix", "/jobs/"]);
    let expected_start = "ERROR RESOURCE_EXHAUSTED etcd-compat-proxy: the range from \"/jobs/\" holds 600 keys, ";
    let expected_end = "bytes encoded, more than this client's limit of 4194304 bytes per message; read it in pages with `limit` (`more` and `count` in each response tell when to stop), raise the client's gRPC receive limit, or let the proxy return a first page for this key prefix with --truncate-oversize-prefix";
    assert!(refused.starts_with(expected_start) && refused.ends_with(expected_end), "{refused}");
    let total: usize = refused[expected_start.len()..].split(' ').next().and_then(|n| n.parse().ok()).expect("size");
    assert!(total > KEYS * VALUE_BYTES && total < KEYS * (VALUE_BYTES + 100), "reported size {total}");

    // With a `limit` larger than fits, every key arrives exactly once, in order, each message in budget.
    let paged = python(proxy, &["paged", "/jobs/", "1000"]);
    assert_eq!(field(&paged, "PAGES"), "2", "{paged}");
    assert_eq!(field(&paged, "KEYS"), "600", "{paged}");
    assert_eq!(field(&paged, "UNIQUE"), "600", "{paged}");
    assert_eq!(field(&paged, "ORDERED"), "True", "{paged}");
    assert!(field(&paged, "MAXMSG").parse::<usize>().expect("size") <= 4_194_304, "{paged}");
    // With a `limit` that fits, etcd's own answers pass through.
    let small_pages = python(proxy, &["paged", "/jobs/", "100"]);
    assert_eq!((field(&small_pages, "PAGES"), field(&small_pages, "UNIQUE")), ("6".to_owned(), "600".to_owned()));

    // Where the operator opted in, the first page with more=true and the true count.
    let once = python(proxy, &["once", "/truncated/"]);
    let returned: usize = field(&once, "ONCE").parse().expect("keys");
    assert!(returned > 400 && returned < KEYS, "{once}");
    assert_eq!((field(&once, "MORE"), field(&once, "COUNT")), ("True".to_owned(), "600".to_owned()), "{once}");
    assert!(field(&once, "MSG").parse::<usize>().expect("size") <= 4_194_304, "{once}");

    // A transaction's ranges cannot be paged: an oversize answer is refused before it is sent.
    let txn = python(proxy, &["txn", "/jobs/"]);
    let (start, end) = (
        "ERROR RESOURCE_EXHAUSTED etcd-compat-proxy: etcd's answer is a ",
        "-byte message, more than this client's limit of 4194304 bytes per message; read large results with paged Range calls (`limit`) or raise the client's gRPC receive limit",
    );
    assert!(txn.starts_with(start) && txn.ends_with(end), "{txn}");
    assert_eq!(python(proxy, &["txn", "/nothing/"]), "TXN 0");

    // etcdctl (grpc-go with client-api-version, 2 GiB limit) gets everything, as directly.
    for ctl in [EtcdVersion::V3_4, EtcdVersion::V3_5] {
        let through_proxy = etcdctl_ok(ctl, proxy, None, &["get", "--prefix", "/jobs/"]);
        assert_eq!(through_proxy.lines().count(), 2 * KEYS, "etcdctl {ctl} through the proxy");
        assert_eq!(through_proxy, etcdctl_ok(ctl, &direct, None, &["get", "--prefix", "/jobs/"]));
    }

    let (_, metrics) = deployment.proxy.http_get("/metrics");
    let count = |prefix: &str, outcome: &str| {
        metric(
            &metrics,
            &format!("etcd_compat_proxy_limited_responses_total{{prefix=\"{prefix}\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(count("none", "refused"), Some(1.0), "{metrics}");
    assert_eq!(count("none", "paged"), Some(1.0), "{metrics}");
    assert_eq!(count("none", "whole"), Some(7.0), "{metrics}");
    assert_eq!(count("/truncated/", "truncated"), Some(1.0), "{metrics}");
    let log = deployment.proxy.log_contents();
    assert!(log.contains("Range answer limited for a client with a message size limit"), "{log}");
    assert!(!log.contains(&"x".repeat(64)), "a value reached the log");
}

both_versions!(
    legacy_client_reads_a_5_mib_prefix => legacy_client_reads_a_5_mib_prefix_3_4, legacy_client_reads_a_5_mib_prefix_3_5
);

#[test]
fn a_single_key_larger_than_the_budget_is_named() {
    let deployment = Deployment::start(EtcdVersion::V3_5, 1, Wire::Plain, &["--max-response-bytes=65536"]);
    let direct = deployment.cluster.client_urls()[0].clone();
    load(&direct, "/big/", 1, 100 * 1024);
    load(&direct, "/small/", 3, 10);
    let answer = python(&deployment.endpoint, &["once", "/big/"]);
    assert_eq!(
        answer,
        "ERROR RESOURCE_EXHAUSTED etcd-compat-proxy: the key \"/big/0000\" alone is 102425 bytes with its value, more than this client's limit of 65536 bytes per message; read it with a client whose gRPC receive limit is larger"
    );
    assert_eq!(
        python(&deployment.endpoint, &["once", "/small/"]),
        "ONCE 3 MORE False COUNT 3 MSG ".to_owned() + &field(&python(&direct, &["once", "/small/"]), "MSG")
    );
    // A Range of one key is never paged: it goes to etcd as it came, and its answer is refused
    // only when it is over the limit, naming the key and the size of etcd's answer (the same
    // answer read directly: its header's varints, the member id's among them, vary by cluster).
    let direct_big = python(&direct, &["get", "/big/0000"]);
    assert!(direct_big.starts_with("GET 1 COUNT 1 MSG "), "{direct_big}");
    assert_eq!(
        python(&deployment.endpoint, &["get", "/big/0000"]),
        format!(
            "ERROR RESOURCE_EXHAUSTED etcd-compat-proxy: etcd's answer for the key \"/big/0000\" is a {}-byte message, more than this client's limit of 65536 bytes per message; one key cannot be paged: read it with a client whose gRPC receive limit is larger",
            field(&direct_big, "MSG")
        )
    );
    assert_eq!(python(&deployment.endpoint, &["get", "/small/0001"]), python(&direct, &["get", "/small/0001"]));
}

/// Starts the Python watcher on `prefix`, waits for READY, runs `write`, returns its result line.
fn python_watch(endpoint: &str, prefix: &str, events: usize, write: impl FnOnce()) -> String {
    let script = workspace_root().join("tests/python/range_client.py");
    let mut child = Command::new("timeout")
        .arg("60")
        .arg(etcd3_python())
        .arg(script)
        .arg(endpoint.trim_start_matches("http://"))
        .args(["watch", prefix, &events.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python watcher");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("utf8"), "READY");
    write();
    let result = lines.next().expect("a result line").expect("utf8");
    let _ = child.wait();
    result
}

fn watch_receives_a_5_mib_transaction(version: EtcdVersion) {
    // One revision of 600 x 9 KiB needs a cluster that accepts such a transaction.
    let spec = ClusterSpec::new(version, 1).with_extra_args(["--max-txn-ops=1000", "--max-request-bytes=10485760"]);
    let deployment = Deployment::start_with(spec, Wire::Plain, &[]);
    let direct = deployment.cluster.client_urls()[0].clone();
    let big_transaction = |prefix: &'static str| {
        let direct = direct.clone();
        move || {
            runtime().block_on(async {
                let mut client = connect(&direct).await;
                let value = vec![b'w'; VALUE_BYTES];
                let puts: Vec<TxnOp> =
                    (0..KEYS).map(|i| TxnOp::put(format!("{prefix}{i:04}"), value.clone(), None)).collect();
                client.txn(Txn::new().and_then(puts)).await.expect("5 MiB transaction");
            });
        }
    };

    // Directly, the legacy client's watch dies on the oversize message.
    let failed = python_watch(&direct, "/direct/", KEYS, big_transaction("/direct/"));
    assert!(failed.starts_with("ERROR RESOURCE_EXHAUSTED ") && failed.contains("larger than max"), "{failed}");

    // Through the proxy: every event once, in order, in messages under the limit.
    let watched = python_watch(&deployment.endpoint, "/watched/", KEYS, big_transaction("/watched/"));
    assert_eq!(field(&watched, "MESSAGES"), "2", "{watched}");
    assert_eq!(field(&watched, "EVENTS"), "600", "{watched}");
    assert_eq!(field(&watched, "UNIQUE"), "600", "{watched}");
    assert_eq!(field(&watched, "ORDERED"), "True", "{watched}");
    assert!(field(&watched, "MAXMSG").parse::<usize>().expect("size") <= 4_194_304, "{watched}");
    let (_, metrics) = deployment.proxy.http_get("/metrics");
    assert_eq!(metric(&metrics, "etcd_compat_proxy_watch_responses_split_total"), Some(1.0));
}

both_versions!(
    watch_receives_a_5_mib_transaction => watch_receives_a_5_mib_transaction_3_4, watch_receives_a_5_mib_transaction_3_5
);
