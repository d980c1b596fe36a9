//! etcdctl 3.4 and 3.5, pointed only at the proxy, against 3.4.23 and 3.5.1 clusters, in
//! plaintext and with TLS on both sides: every command an operator uses works and prints
//! exactly what it prints against etcd directly.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use etcd_compat_tests::{etcdctl, etcdctl_command, etcdctl_ok, ClientTls, EtcdVersion};

use crate::support::{both_versions, metric, Deployment, Wire};

/// One etcdctl version talking to the proxy.
struct Ctl<'a> {
    version: EtcdVersion,
    endpoint: &'a str,
    tls: Option<&'a ClientTls>,
}

impl Ctl<'_> {
    fn ok(&self, args: &[&str]) -> String {
        etcdctl_ok(self.version, self.endpoint, self.tls, args)
    }

    fn fails(&self, args: &[&str]) -> String {
        let output = etcdctl(self.version, self.endpoint, self.tls, args);
        assert!(!output.status.success(), "etcdctl {args:?} should fail");
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// Runs a long-running command (watch, elect) and returns its first `lines` lines of output.
    fn first_lines(&self, args: &[&str], lines: usize) -> Vec<String> {
        let mut command = etcdctl_command(self.version, self.endpoint, self.tls, args);
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn etcdctl");
        let stdout = child.stdout.take().expect("stdout");
        let read: Vec<String> = BufReader::new(stdout).lines().take(lines).map(|l| l.expect("line")).collect();
        let _ = child.kill();
        let _ = child.wait();
        read
    }

    fn txn(&self, script: &str) -> String {
        let mut command = etcdctl_command(self.version, self.endpoint, self.tls, &["txn", "--interactive=false"]);
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn etcdctl txn");
        child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write txn");
        let output = child.wait_with_output().expect("txn output");
        assert!(output.status.success(), "txn failed");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn revision(&self, key: &str) -> i64 {
        let json = self.ok(&["get", key, "-w", "json"]);
        let after = json.split("\"revision\":").nth(1).expect("revision in header");
        after.split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse().ok()).expect("revision number")
    }
}

/// The whole operator command set, run with one etcdctl version; keys are prefixed so two
/// versions can share a cluster.
fn operator_commands(ctl: &Ctl, deployment: &Deployment, cluster_version: EtcdVersion) {
    let p = format!("/{}/", ctl.version);
    let key = |name: &str| format!("{p}{name}");

    // put / get / del
    assert_eq!(ctl.ok(&["put", &key("a"), "1"]), "OK\n");
    assert_eq!(ctl.ok(&["put", &key("b"), "two words"]), "OK\n");
    assert_eq!(ctl.ok(&["get", &key("a")]), format!("{}\n1\n", key("a")));
    assert_eq!(ctl.ok(&["get", "--prefix", &p]), format!("{}\n1\n{}\ntwo words\n", key("a"), key("b")));
    assert_eq!(ctl.ok(&["get", "--prefix", "--keys-only", &p]), format!("{}\n\n{}\n\n", key("a"), key("b")));
    assert_eq!(ctl.ok(&["del", &key("b")]), "1\n");
    assert_eq!(ctl.ok(&["get", &key("b")]), "");

    // txn: the compare succeeds, so the success branch runs
    let script = format!("value(\"{a}\") = \"1\"\n\nput {a} 2\n\nput {a} 3\n\n", a = key("a"));
    assert_eq!(ctl.txn(&script), "SUCCESS\n\nOK\n");
    assert_eq!(ctl.ok(&["get", "--print-value-only", &key("a")]), "2\n");

    // watch from a known revision, so no race with the put
    let rev = ctl.revision(&key("a"));
    assert_eq!(ctl.ok(&["put", &key("w"), "watched"]), "OK\n");
    let events = ctl.first_lines(&["watch", "--rev", &(rev + 1).to_string(), &key("w")], 3);
    assert_eq!(events, vec!["PUT".to_owned(), key("w"), "watched".to_owned()]);

    // lease grant, keep-alive (a LeaseKeepAlive stream), time-to-live, revoke
    let granted = ctl.ok(&["lease", "grant", "60"]);
    let id = granted.split_whitespace().nth(1).expect("lease id").to_owned();
    assert_eq!(granted, format!("lease {id} granted with TTL(60s)\n"));
    assert_eq!(ctl.ok(&["lease", "keep-alive", "--once", &id]), format!("lease {id} keepalived with TTL(60)\n"));
    assert!(ctl
        .ok(&["lease", "timetolive", &id])
        .starts_with(&format!("lease {id} granted with TTL(60s), remaining(")));
    assert!(ctl.ok(&["lease", "list"]).lines().any(|l| l == id));
    assert_eq!(ctl.ok(&["lease", "revoke", &id]), format!("lease {id} revoked\n"));

    // lock (v3lockpb) runs the command while holding the lock
    assert_eq!(ctl.ok(&["lock", &key("lock"), "echo", "held"]), "held\n");

    // elect (v3electionpb): the campaign wins and prints the leader key and proposal
    let elected = ctl.first_lines(&["elect", &key("election"), "proposal-1"], 2);
    assert!(elected[0].starts_with(&format!("{}/", key("election"))), "{elected:?}");
    assert_eq!(elected[1], "proposal-1");

    // member list and endpoint status describe the real cluster through the proxy
    let members = ctl.ok(&["member", "list"]);
    assert_eq!(members.lines().count(), deployment.cluster.len());
    for i in 0..deployment.cluster.len() {
        let member = deployment.cluster.member(i);
        assert!(
            members.contains(&format!(", started, {}, {}, {}", member.name, member.peer_url, member.client_url)),
            "{members}"
        );
    }
    let status = ctl.ok(&["endpoint", "status"]);
    let proxy_addr = deployment.endpoint.split("://").nth(1).expect("host:port");
    assert!(status.contains(proxy_addr), "{status}");
    let full_version = match cluster_version {
        EtcdVersion::V3_4 => "3.4.23",
        EtcdVersion::V3_5 => "3.5.1",
    };
    assert!(status.contains(&format!(", {full_version}, ")), "{status}");

    // alarms, snapshot, defrag
    assert_eq!(ctl.ok(&["alarm", "list"]), "");
    let snapshot_dir = tempfile::tempdir().expect("snapshot dir");
    let snapshot = snapshot_dir.path().join("backup.db");
    let snapshot_path = snapshot.display().to_string();
    let saved = ctl.ok(&["snapshot", "save", &snapshot_path]);
    assert!(saved.contains(&format!("Snapshot saved at {snapshot_path}")), "{saved}");
    // etcdctl verifies the snapshot's SHA-256 trailer while saving; status re-reads the file.
    let snapshot_status =
        etcdctl_ok(EtcdVersion::V3_4, "127.0.0.1:1", None, &["snapshot", "status", &snapshot_path, "-w", "json"]);
    assert!(snapshot_status.contains("\"totalKey\":"), "{snapshot_status}");
    assert_eq!(ctl.ok(&["defrag"]), format!("Finished defragmenting etcd member[{}]\n", deployment.endpoint));

    // compaction, and etcd's error for a compacted revision arrives as etcd wrote it
    let head = ctl.revision(&key("a"));
    assert_eq!(ctl.ok(&["compact", &head.to_string()]), format!("compacted revision {head}\n"));
    let stderr = ctl.fails(&["get", "--rev", &(head - 1).to_string(), &key("a")]);
    assert!(stderr.contains("Error: etcdserver: mvcc: required revision has been compacted"), "{stderr}");
}

/// Users, roles and auth enable/disable, once per cluster (auth state is cluster-wide).
fn auth_commands(ctl: &Ctl) {
    assert_eq!(ctl.ok(&["user", "add", "root:rootpw"]), "User root created\n");
    assert_eq!(ctl.ok(&["user", "grant-role", "root", "root"]), "Role root is granted to user root\n");
    assert_eq!(ctl.ok(&["role", "add", "reader"]), "Role reader created\n");
    assert_eq!(
        ctl.ok(&["role", "grant-permission", "reader", "--prefix=true", "read", "/public/"]),
        "Role reader updated\n"
    );
    assert_eq!(ctl.ok(&["user", "add", "alice:alicepw"]), "User alice created\n");
    assert_eq!(ctl.ok(&["user", "grant-role", "alice", "reader"]), "Role reader is granted to user alice\n");
    assert_eq!(ctl.ok(&["put", "/public/notice", "hello"]), "OK\n");
    assert_eq!(ctl.ok(&["auth", "enable"]), "Authentication Enabled\n");

    assert_eq!(ctl.ok(&["--user=alice:alicepw", "get", "/public/notice"]), "/public/notice\nhello\n");
    let denied = ctl.fails(&["--user=alice:alicepw", "put", "/public/notice", "changed"]);
    assert!(denied.contains("Error: etcdserver: permission denied"), "{denied}");
    let wrong_password = ctl.fails(&["--user=alice:wrong", "get", "/public/notice"]);
    assert!(wrong_password.contains("authentication failed, invalid user ID or password"), "{wrong_password}");
    assert!(ctl.ok(&["--user=root:rootpw", "user", "list"]).lines().eq(["alice", "root"]));
    assert!(ctl.ok(&["--user=root:rootpw", "role", "get", "reader"]).contains("[/public/, /public0)"));
    assert_eq!(ctl.ok(&["--user=root:rootpw", "auth", "disable"]), "Authentication Disabled\n");
    assert_eq!(ctl.ok(&["user", "delete", "alice"]), "User alice deleted\n");
}

fn etcdctl_through_proxy(cluster_version: EtcdVersion, wire: Wire) {
    // Debug level: the password check at the end must cover the most verbose logs.
    let deployment = Deployment::start(cluster_version, 1, wire, &["--debug"]);
    for ctl_version in [EtcdVersion::V3_4, EtcdVersion::V3_5] {
        let ctl = Ctl { version: ctl_version, endpoint: &deployment.endpoint, tls: deployment.client_tls.as_ref() };
        operator_commands(&ctl, &deployment, cluster_version);
    }
    // The auth flow changes cluster-wide state; run it once, with the older etcdctl.
    let ctl = Ctl { version: EtcdVersion::V3_4, endpoint: &deployment.endpoint, tls: deployment.client_tls.as_ref() };
    auth_commands(&ctl);
    // etcdctl 3.4 sends `http://host:port` as :authority for its per-endpoint calls over
    // plaintext (endpoint status and defrag here); they only work because the proxy drops it.
    let (_, metrics) = deployment.proxy.http_get("/metrics");
    let repairs = metric(&metrics, "etcd_compat_proxy_authority_repairs_total");
    let expected = if wire == Wire::Plain { 2.0 } else { 0.0 };
    assert_eq!(repairs, Some(expected), "malformed :authority repairs");
    let log = deployment.proxy.log_contents();
    assert!(!log.contains("rootpw") && !log.contains("alicepw"), "a password reached the proxy log:\n{log}");
}

both_versions!(etcdctl_through_proxy(Wire::Plain) => etcdctl_against_3_4_plaintext, etcdctl_against_3_5_plaintext);
both_versions!(
    etcdctl_through_proxy(Wire::Tls) => etcdctl_against_3_4_tls_both_sides, etcdctl_against_3_5_tls_both_sides
);
