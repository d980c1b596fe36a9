//! The verdicts: pure functions from what was read ([`Facts`]) to checks, one per failure the
//! field reports describe (F7 history never compacted, F10 NOSPACE, F11 a member lost, F14 a
//! slow member, F15 a member down), each with the evidence and the exact fix.

use etcd_client::AlarmType;

use super::facts::{AuthFacts, Facts, MemberFacts, StatusSample};
use super::report::{CertRow, Check, Verdict};
use super::Thresholds;

/// Raft entries a member may be behind (committed but not applied, or behind the leader)
/// before it counts as lagging; etcd itself refuses requests at 5000.
const LAG_ENTRIES: u64 = 1000;
/// Status answers slower than this mark a member slow.
const SLOW_STATUS_MS: f64 = 500.0;

/// Every check, in the order they are shown.
pub fn run(facts: &Facts, certs: &[CertRow], cert_errors: &[String], limits: &Thresholds) -> Vec<Check> {
    let mut checks = Vec::new();
    match &facts.members {
        Ok(members) => {
            checks.push(reachable(members));
            checks.push(leader(members));
            checks.push(elections(members));
            checks.push(quorum(members));
            checks.push(learners(members));
        }
        Err(error) => checks.push(
            Check::found(
                "members",
                "member-list",
                Verdict::Critical,
                "the member list cannot be read",
                "check that the endpoints are etcd client URLs and that at least one member runs; the error says why",
            )
            .with_evidence(vec![format!("{}: {error}", facts.endpoints.join(","))]),
        ),
    }
    checks.push(endpoints(facts));
    checks.push(alarms(facts));
    checks.push(quota(facts, limits));
    checks.push(fragmentation(facts, limits));
    checks.push(history(facts, limits));
    checks.push(budget(facts, limits));
    checks.push(certificates(certs, cert_errors, limits));
    checks.push(auth(&facts.auth));
    checks.push(latency(facts));
    checks.push(lag(facts));
    checks
}

/// `name (id)`, or the id alone for a member never started.
pub fn member_label(member: &MemberFacts) -> String {
    if member.name.is_empty() {
        format!("{:x} (never started)", member.id)
    } else {
        format!("{} ({:x})", member.name, member.id)
    }
}

fn voters(members: &[MemberFacts]) -> impl Iterator<Item = &MemberFacts> {
    members.iter().filter(|m| !m.is_learner)
}

fn reachable(members: &[MemberFacts]) -> Check {
    let down: Vec<String> = members
        .iter()
        .filter_map(|m| m.status.as_ref().err().map(|error| format!("{}: {error}", member_label(m))))
        .collect();
    let total = members.len();
    if down.is_empty() {
        return Check::ok("members", "reachable", format!("{total} of {total} members answer"));
    }
    Check::found(
        "members",
        "reachable",
        Verdict::Critical,
        format!("{} of {total} members do not answer", down.len()),
        "start the member (its log says why it stopped: a full disk, wrong permissions on its data dir); \
         if its machine is gone, replace it: `etcdctl member remove <id>`, `etcdctl member add <name> --peer-urls=<url>`, \
         then start it with an empty data dir and --initial-cluster-state=existing",
    )
    .with_evidence(down)
}

fn leader(members: &[MemberFacts]) -> Check {
    let leaders: Vec<u64> =
        members.iter().filter_map(|m| m.status.as_ref().ok()).map(|s| s.leader).filter(|l| *l != 0).collect();
    match leaders.first() {
        Some(leader) => {
            let name = members.iter().find(|m| m.id == *leader).map_or_else(|| format!("{leader:x}"), member_label);
            Check::ok("members", "leader", format!("{name} leads"))
        }
        None if members.iter().all(|m| m.status.is_err()) => Check::found(
            "members",
            "leader",
            Verdict::Critical,
            "no member answers, so no leader is known",
            "start the members",
        ),
        None => Check::found(
            "members",
            "leader",
            Verdict::Critical,
            "no member knows a leader: the cluster cannot accept writes",
            "bring back enough voting members for a quorum; `etcd-compat-proxy doctor` lists which do not answer",
        ),
    }
}

fn elections(members: &[MemberFacts]) -> Check {
    let mut evidence = Vec::new();
    for member in members {
        if let (Ok(first), Some(later)) = (&member.status, &member.later) {
            if later.raft_term > first.raft_term {
                evidence.push(format!(
                    "{}: raft term {} -> {} while the doctor read",
                    member_label(member),
                    first.raft_term,
                    later.raft_term
                ));
            }
        }
    }
    let mut leaders: Vec<u64> = members
        .iter()
        .filter_map(|m| m.later.as_ref().or(m.status.as_ref().ok()))
        .map(|s| s.leader)
        .filter(|l| *l != 0)
        .collect();
    leaders.sort_unstable();
    leaders.dedup();
    if leaders.len() > 1 {
        evidence.push(format!(
            "members name different leaders: {}",
            leaders.iter().map(|l| format!("{l:x}")).collect::<Vec<_>>().join(", ")
        ));
    }
    if evidence.is_empty() {
        return Check::ok("members", "elections", "no election while the doctor read");
    }
    Check::found(
        "members",
        "elections",
        Verdict::Warning,
        "the leader changed while the doctor read",
        "frequent elections come from slow disks or an overloaded network: check the members' logs for \
         `wal: sync duration` and `failed to send out heartbeat on time`, and raise --heartbeat-interval and \
         --election-timeout together if the network is slow",
    )
    .with_evidence(evidence)
}

fn quorum(members: &[MemberFacts]) -> Check {
    let voting = voters(members).count();
    let up = voters(members).filter(|m| m.status.is_ok()).count();
    let needed = voting / 2 + 1;
    let evidence = vec![format!("{up} of {voting} voting members answer; a quorum is {needed}")];
    if up < needed {
        return Check::found(
            "members",
            "quorum",
            Verdict::Critical,
            "quorum is lost: writes and linearizable reads fail",
            "bring back voting members until a quorum answers; if they are lost for good, restore the cluster from a snapshot",
        )
        .with_evidence(evidence);
    }
    if voting == 1 {
        return Check::found(
            "members",
            "quorum",
            Verdict::Warning,
            "a single voting member: the cluster does not survive its loss",
            "run three or five voting members",
        )
        .with_evidence(evidence);
    }
    if up == needed {
        return Check::found(
            "members",
            "quorum",
            Verdict::Warning,
            "one more member lost and the cluster loses quorum",
            "bring back the members that do not answer before anything else (see members/reachable)",
        )
        .with_evidence(evidence);
    }
    Check::ok("members", "quorum", format!("{} of {voting} voting members may fail", up - needed))
        .with_evidence(evidence)
}

fn learners(members: &[MemberFacts]) -> Check {
    let leader_index = members
        .iter()
        .filter_map(|m| m.status.as_ref().ok())
        .find(|s| s.leader != 0 && members.iter().any(|m| m.id == s.leader))
        .and_then(|s| members.iter().find(|m| m.id == s.leader))
        .and_then(|leader| leader.status.as_ref().ok())
        .map(|s| s.raft_index);
    let learners: Vec<&MemberFacts> = members.iter().filter(|m| m.is_learner).collect();
    if learners.is_empty() {
        return Check::ok("members", "learners", "no learner waits for promotion");
    }
    let evidence = learners
        .iter()
        .map(|learner| match (&learner.status, leader_index) {
            (Ok(status), Some(leader)) if status.raft_applied_index + LAG_ENTRIES >= leader => format!(
                "{}: in sync (applied {} of the leader's {leader}) and still a learner",
                member_label(learner),
                status.raft_applied_index
            ),
            (Ok(status), Some(leader)) => format!(
                "{}: catching up (applied {} of the leader's {leader})",
                member_label(learner),
                status.raft_applied_index
            ),
            (Ok(status), None) => {
                format!("{}: applied {}, leader unknown", member_label(learner), status.raft_applied_index)
            }
            (Err(error), _) => format!("{}: does not answer: {error}", member_label(learner)),
        })
        .collect();
    let ids: Vec<String> = learners.iter().map(|l| format!("{:x}", l.id)).collect();
    Check::found(
        "members",
        "learners",
        Verdict::Warning,
        format!("{} learner(s) not promoted: they hold data but do not count for quorum", learners.len()),
        format!(
            "once in sync, promote: {}",
            ids.iter().map(|id| format!("`etcdctl member promote {id}`")).collect::<Vec<_>>().join(", ")
        ),
    )
    .with_evidence(evidence)
}

fn endpoints(facts: &Facts) -> Check {
    if facts.stray_endpoints.is_empty() {
        return Check::ok("members", "endpoints", "every endpoint is a member's client URL");
    }
    let evidence = facts
        .stray_endpoints
        .iter()
        .map(|stray| match &stray.answers_as {
            Ok(id) => format!("{} is no member's client URL; it answers as member {id:x}", stray.url),
            Err(error) => format!("{} is no member's client URL and does not answer: {error}", stray.url),
        })
        .collect();
    Check::found(
        "members",
        "endpoints",
        Verdict::Warning,
        "--endpoints lists addresses that are not members of the cluster (a member removed, or a typo)",
        "remove them from --endpoints (the proxy's unit file or TOML), or add the member back",
    )
    .with_evidence(evidence)
}

fn alarm_name(alarm: AlarmType) -> &'static str {
    match alarm {
        AlarmType::Nospace => "NOSPACE",
        AlarmType::Corrupt => "CORRUPT",
        AlarmType::None => "NONE",
    }
}

/// Active alarms by member id, named as etcdctl names them.
pub fn alarms_of(facts: &Facts, member: u64) -> Vec<String> {
    match &facts.alarms {
        Ok(alarms) => alarms.iter().filter(|(id, _)| *id == member).map(|(_, a)| alarm_name(*a).to_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

fn name_of(facts: &Facts, id: u64) -> String {
    facts
        .members
        .as_ref()
        .ok()
        .and_then(|members| members.iter().find(|m| m.id == id))
        .map_or_else(|| format!("{id:x}"), member_label)
}

fn alarms(facts: &Facts) -> Check {
    let alarms = match &facts.alarms {
        Ok(alarms) => alarms,
        Err(error) => {
            return Check::found(
                "space",
                "alarms",
                Verdict::Warning,
                "the alarms cannot be read",
                "run the doctor as a user with the root role (--user)",
            )
            .with_evidence(vec![error.clone()])
        }
    };
    if alarms.is_empty() {
        return Check::ok("space", "alarms", "no alarm is active");
    }
    let evidence: Vec<String> =
        alarms.iter().map(|(id, alarm)| format!("{}: {}", name_of(facts, *id), alarm_name(*alarm))).collect();
    if alarms.iter().any(|(_, a)| *a == AlarmType::Corrupt) {
        return Check::found(
            "space",
            "alarms",
            Verdict::Critical,
            "CORRUPT alarm: a member's data differs from the others'",
            "stop the corrupt member, remove it (`etcdctl member remove <id>`) and add it back with an empty data dir; \
             keep a snapshot of a healthy member first (`etcd-compat-proxy migrate snapshot` or `etcdctl snapshot save`)",
        )
        .with_evidence(evidence);
    }
    Check::found(
        "space",
        "alarms",
        Verdict::Critical,
        "NOSPACE alarm: the database reached its quota and every write fails with `mvcc: database space exceeded`",
        "run `etcd-compat-proxy recover-space` (compacts, defragments one member at a time, disarms the alarm), \
         then make sure compaction runs: etcd's --auto-compaction-mode=periodic --auto-compaction-retention=1h",
    )
    .with_evidence(evidence)
}

/// The quota a member's space is judged against: its own (etcd 3.6+ says it), else the one given.
pub fn quota_of(status: &StatusSample, limits: &Thresholds) -> i64 {
    if status.quota > 0 {
        status.quota
    } else {
        limits.quota_backend_bytes
    }
}

fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn statuses(facts: &Facts) -> Vec<(&MemberFacts, &StatusSample)> {
    match &facts.members {
        Ok(members) => members.iter().filter_map(|m| m.status.as_ref().ok().map(|s| (m, s))).collect(),
        Err(_) => Vec::new(),
    }
}

fn quota(facts: &Facts, limits: &Thresholds) -> Check {
    let mut worst = 0.0f64;
    let mut evidence = Vec::new();
    for (member, status) in statuses(facts) {
        let quota = quota_of(status, limits);
        let share = status.db_size as f64 / quota as f64;
        worst = worst.max(share);
        evidence.push(format!(
            "{}: {} of {} ({:.0}%)",
            member_label(member),
            mib(status.db_size),
            mib(quota),
            share * 100.0
        ));
    }
    if evidence.is_empty() {
        return Check::found("space", "quota", Verdict::Warning, "no member answered Status", "see members/reachable");
    }
    if statuses(facts).iter().all(|(_, s)| s.quota == 0) {
        evidence.push(format!(
            "the quota is taken as {} (--quota-backend-bytes; etcd before 3.6 does not report its own)",
            mib(limits.quota_backend_bytes)
        ));
    }
    let fix = "free space: `etcd-compat-proxy recover-space` (compact and defragment), delete data no one reads, \
               or raise etcd's --quota-backend-bytes (at most 8 GiB is recommended) and restart the members one at a time";
    if worst >= 0.95 {
        Check::found(
            "space",
            "quota",
            Verdict::Critical,
            format!("the database is at {:.0}% of its quota", worst * 100.0),
            fix,
        )
        .with_evidence(evidence)
    } else if worst >= 0.8 {
        Check::found(
            "space",
            "quota",
            Verdict::Warning,
            format!("the database is at {:.0}% of its quota", worst * 100.0),
            fix,
        )
        .with_evidence(evidence)
    } else {
        Check::ok("space", "quota", format!("the largest database is at {:.0}% of its quota", worst * 100.0))
            .with_evidence(evidence)
    }
}

fn fragmentation(facts: &Facts, limits: &Thresholds) -> Check {
    let mut evidence = Vec::new();
    for (member, status) in statuses(facts) {
        let free = status.db_size - status.db_size_in_use;
        // Free pages only matter when they are a real share of the file and of the quota.
        if status.db_size_in_use > 0 && free * 2 > status.db_size && free * 10 >= quota_of(status, limits) {
            evidence.push(format!(
                "{}: {} allocated, {} in use",
                member_label(member),
                mib(status.db_size),
                mib(status.db_size_in_use)
            ));
        }
    }
    if evidence.is_empty() {
        return Check::ok("space", "fragmentation", "no member's database is mostly free pages");
    }
    Check::found(
        "space",
        "fragmentation",
        Verdict::Warning,
        "databases hold more free pages than data: the file does not shrink until defragmented",
        "defragment one member at a time: `etcd-compat-proxy recover-space` (it also compacts; `--dry-run` shows the plan)",
    )
    .with_evidence(evidence)
}

fn history(facts: &Facts, limits: &Thresholds) -> Check {
    let (revision, compacted) = match (facts.revision, &facts.compact_revision) {
        (Some(revision), Ok(compacted)) => (revision, *compacted),
        (_, Err(error)) => {
            return Check::found(
                "space",
                "history",
                Verdict::Warning,
                "the compacted revision cannot be read",
                "run the doctor as a user that may read the keyspace (--user)",
            )
            .with_evidence(vec![error.clone()])
        }
        (None, _) => {
            return Check::found(
                "space",
                "history",
                Verdict::Warning,
                "the revision cannot be read",
                "see members/reachable",
            )
        }
    };
    let kept = revision - compacted.max(1) + 1;
    let evidence = vec![if compacted == 0 {
        format!("current revision {revision}; nothing was ever compacted (revision 1 is still readable)")
    } else {
        format!("current revision {revision}; compacted up to {compacted}; {kept} revisions of history kept")
    }];
    if kept <= limits.history_warning_revisions {
        return Check::ok("space", "history", format!("{kept} revisions of history kept")).with_evidence(evidence);
    }
    let summary = if compacted == 0 {
        format!("{kept} revisions of history and no compaction ever ran: the database grows until NOSPACE")
    } else {
        format!("{kept} revisions of history since the last compaction: the database grows until NOSPACE")
    };
    Check::found(
        "space",
        "history",
        Verdict::Warning,
        summary,
        "turn on compaction in every member's configuration (--auto-compaction-mode=periodic --auto-compaction-retention=1h, \
         or the same keys in its --config-file, where they have no default), then run `etcd-compat-proxy recover-space` once",
    )
    .with_evidence(evidence)
}

fn budget(facts: &Facts, limits: &Thresholds) -> Check {
    let scan = match &facts.key_scan {
        Ok(scan) => scan,
        Err(error) => {
            return Check::found(
                "space",
                "budget",
                Verdict::Warning,
                "the keyspace cannot be read to size its prefixes",
                "run the doctor as a user that may read the keyspace (--user)",
            )
            .with_evidence(vec![error.clone()])
        }
    };
    let near = limits.max_response_bytes as u64 * 3 / 4;
    let large: Vec<String> = scan
        .prefixes
        .iter()
        .filter(|p| p.bytes >= near)
        .map(|p| {
            format!(
                "{}: {} in {} keys ({:.0}% of the {} budget)",
                p.prefix,
                mib(p.bytes as i64),
                p.keys,
                p.bytes as f64 * 100.0 / limits.max_response_bytes as f64,
                mib(limits.max_response_bytes as i64)
            )
        })
        .collect();
    let scanned = format!(
        "scanned {} keys, {}{}",
        scan.keys,
        mib(scan.bytes as i64),
        if scan.partial { " (stopped at --scan-bytes; the rest was not read)" } else { "" }
    );
    if large.is_empty() {
        return Check::ok("space", "budget", "no prefix answers near the legacy clients' response budget")
            .with_evidence(vec![scanned]);
    }
    let mut evidence = large;
    evidence.push(scanned);
    Check::found(
        "space",
        "budget",
        Verdict::Warning,
        "prefixes whose `get --prefix` answer is near or over a legacy client's 4 MiB receive limit",
        "keep the clients that read them behind the proxy (it pages such answers under --max-response-bytes); \
         clients that read them directly fail with `received message larger than max`",
    )
    .with_evidence(evidence)
}

fn certificates(certs: &[CertRow], errors: &[String], limits: &Thresholds) -> Check {
    let mut verdict = Verdict::Ok;
    let mut evidence = Vec::new();
    for cert in certs {
        let this = if cert.days_left <= i64::from(limits.cert_expiry.critical_days) {
            Verdict::Critical
        } else if cert.days_left <= i64::from(limits.cert_expiry.warning_days) {
            Verdict::Warning
        } else {
            Verdict::Ok
        };
        if this > Verdict::Ok {
            evidence.push(format!(
                "{} {} ({}): {} days left, until {}",
                cert.source, cert.path, cert.subject, cert.days_left, cert.not_after
            ));
        }
        verdict = verdict.max(this);
    }
    for error in errors {
        evidence.push(error.clone());
        verdict = verdict.max(Verdict::Warning);
    }
    let soonest = certs.iter().map(|c| c.days_left).min();
    if verdict == Verdict::Ok {
        return Check::ok(
            "certificates",
            "expiry",
            match soonest {
                Some(days) => format!("{} certificates; the first expires in {days} days", certs.len()),
                None => "no TLS certificate is in use".to_owned(),
            },
        );
    }
    Check::found(
        "certificates",
        "expiry",
        verdict,
        format!(
            "certificates expire within {} days (or cannot be read)",
            if verdict == Verdict::Critical { limits.cert_expiry.critical_days } else { limits.cert_expiry.warning_days }
        ),
        "renew them in place: `etcd-compat-proxy certs renew --ca <ca.pem> --ca-key <ca.key> --cert <file>`; the proxy \
         reloads renewed files without a restart, and etcd members load their renewed leaf certificate on the next handshake; \
         `etcd-compat-proxy certs inspect --endpoints <member>` shows what a member serves",
    )
    .with_evidence(evidence)
}

fn auth(facts: &AuthFacts) -> Check {
    match facts {
        AuthFacts::Disabled => Check::ok("auth", "auth", "auth is off"),
        AuthFacts::Enabled { user: Some(user) } => {
            Check::ok("auth", "auth", format!("auth is on; --user {user} authenticates"))
        }
        AuthFacts::Enabled { user: None } => {
            Check::ok("auth", "auth", "auth is on; clients authenticate as themselves (no --user is configured)")
        }
        AuthFacts::Refused { user, error } => Check::found(
            "auth",
            "auth",
            Verdict::Critical,
            format!("auth is on and --user {user} is refused: clients that rely on it fail"),
            format!(
                "check the password in --password-file, and the user in etcd: `etcdctl --user root user get {user}`"
            ),
        )
        .with_evidence(vec![error.clone()]),
        AuthFacts::Unknown(error) => {
            Check::found("auth", "auth", Verdict::Warning, "whether auth is on cannot be told", "see members/reachable")
                .with_evidence(vec![error.clone()])
        }
    }
}

fn latency(facts: &Facts) -> Check {
    let mut slow = Vec::new();
    let mut all = Vec::new();
    for (member, status) in statuses(facts) {
        let ms = status.latency.as_secs_f64() * 1000.0;
        all.push(format!("{}: Status answered in {ms:.1} ms", member_label(member)));
        if ms > SLOW_STATUS_MS {
            slow.push(format!("{}: Status answered in {ms:.0} ms", member_label(member)));
        }
    }
    if slow.is_empty() {
        return Check::ok("performance", "latency", "every member answers Status promptly").with_evidence(all);
    }
    Check::found(
        "performance",
        "latency",
        Verdict::Warning,
        "members answer slowly",
        "look in their logs for `wal: sync duration` (a slow disk: give etcd an SSD of its own) and \
         `server is likely overloaded` (too many clients: put them behind this proxy's read cache and watch coalescing)",
    )
    .with_evidence(slow)
}

fn lag(facts: &Facts) -> Check {
    let statuses = statuses(facts);
    let leader_index = statuses.iter().find(|(m, s)| s.leader == m.id).map(|(_, s)| s.raft_index);
    let mut evidence = Vec::new();
    for (member, status) in &statuses {
        let latest = member.later.as_ref().unwrap_or(status);
        let unapplied = latest.raft_index.saturating_sub(latest.raft_applied_index);
        if unapplied > LAG_ENTRIES {
            evidence.push(format!("{}: {unapplied} committed entries not yet applied", member_label(member)));
        }
        if let Some(leader) = leader_index {
            let behind = leader.saturating_sub(status.raft_index);
            if behind > LAG_ENTRIES && !member.is_learner {
                evidence.push(format!("{}: {behind} entries behind the leader", member_label(member)));
            }
        }
    }
    if evidence.is_empty() {
        return Check::ok("performance", "lag", "every member applies what it commits");
    }
    Check::found(
        "performance",
        "lag",
        Verdict::Warning,
        "members fall behind: their reads are stale and etcd refuses requests past 5000 entries (`too many requests`)",
        "check the lagging member's disk (`wal: sync duration` and `apply request took too long` in its log) and CPU",
    )
    .with_evidence(evidence)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::doctor::facts::{KeyScan, PrefixSize};

    fn sample(leader: u64, db: i64, in_use: i64) -> StatusSample {
        StatusSample {
            version: "3.5.1".to_owned(),
            db_size: db,
            db_size_in_use: in_use,
            quota: 0,
            leader,
            raft_index: 100,
            raft_term: 2,
            raft_applied_index: 100,
            latency: Duration::from_millis(2),
        }
    }

    fn member(id: u64, status: Result<StatusSample, String>) -> MemberFacts {
        MemberFacts {
            id,
            name: format!("m{id}"),
            client_urls: vec![format!("http://127.0.0.1:{id}")],
            is_learner: false,
            later: status.as_ref().ok().cloned(),
            status,
        }
    }

    fn facts(members: Vec<MemberFacts>) -> Facts {
        Facts {
            endpoints: vec!["http://127.0.0.1:1".to_owned()],
            members: Ok(members),
            stray_endpoints: Vec::new(),
            alarms: Ok(Vec::new()),
            revision: Some(50),
            compact_revision: Ok(0),
            auth: AuthFacts::Disabled,
            key_scan: Ok(KeyScan { keys: 0, bytes: 0, partial: false, prefixes: Vec::new() }),
        }
    }

    fn thresholds() -> Thresholds {
        Thresholds {
            quota_backend_bytes: 100 << 20,
            history_warning_revisions: 1000,
            max_response_bytes: 4 << 20,
            cert_expiry: crate::tls::ExpiryPolicy { warning_days: 30, critical_days: 7 },
        }
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).expect("check present")
    }

    fn healthy_three() -> Vec<MemberFacts> {
        (1..=3).map(|id| member(id, Ok(sample(1, 1 << 20, 1 << 20)))).collect()
    }

    #[test]
    fn a_healthy_cluster_is_ok_everywhere() {
        let checks = run(&facts(healthy_three()), &[], &[], &thresholds());
        let bad: Vec<_> = checks.iter().filter(|c| c.verdict != Verdict::Ok).map(|c| c.name).collect();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(find(&checks, "quorum").summary, "1 of 3 voting members may fail");
    }

    #[test]
    fn a_stopped_member_is_critical_and_leaves_quorum_one_loss_away() {
        let mut members = healthy_three();
        members[2].status = Err("connection refused".to_owned());
        members[2].later = None;
        let checks = run(&facts(members), &[], &[], &thresholds());
        let reachable = find(&checks, "reachable");
        assert_eq!(reachable.verdict, Verdict::Critical);
        assert_eq!(reachable.summary, "1 of 3 members do not answer");
        assert_eq!(reachable.evidence, ["m3 (3): connection refused"]);
        assert_eq!(find(&checks, "quorum").verdict, Verdict::Warning);
    }

    #[test]
    fn nospace_is_critical_with_recover_space_as_the_fix() {
        let mut facts = facts(healthy_three());
        facts.alarms = Ok(vec![(1, AlarmType::Nospace)]);
        let checks = run(&facts, &[], &[], &thresholds());
        let alarms = find(&checks, "alarms");
        assert_eq!(alarms.verdict, Verdict::Critical);
        assert!(alarms.fix.as_deref().is_some_and(|f| f.starts_with("run `etcd-compat-proxy recover-space`")));
        assert_eq!(alarms.evidence, ["m1 (1): NOSPACE"]);
    }

    #[test]
    fn history_never_compacted_past_the_threshold_is_a_warning() {
        let mut facts = facts(healthy_three());
        facts.revision = Some(5000);
        let check = history(&facts, &thresholds());
        assert_eq!(check.verdict, Verdict::Warning);
        assert_eq!(
            check.summary,
            "5000 revisions of history and no compaction ever ran: the database grows until NOSPACE"
        );
        facts.compact_revision = Ok(4500);
        assert_eq!(history(&facts, &thresholds()).verdict, Verdict::Ok);
    }

    #[test]
    fn an_in_sync_learner_is_named_with_the_promote_command() {
        let mut members = healthy_three();
        members[2].is_learner = true;
        let check = learners(&members);
        assert_eq!(check.verdict, Verdict::Warning);
        assert_eq!(check.evidence, ["m3 (3): in sync (applied 100 of the leader's 100) and still a learner"]);
        assert_eq!(check.fix.as_deref(), Some("once in sync, promote: `etcdctl member promote 3`"));
    }

    #[test]
    fn space_verdicts_follow_the_quota() {
        let members = (1..=3).map(|id| member(id, Ok(sample(1, 90 << 20, 20 << 20)))).collect();
        let facts = facts(members);
        assert_eq!(quota(&facts, &thresholds()).verdict, Verdict::Warning);
        assert_eq!(fragmentation(&facts, &thresholds()).verdict, Verdict::Warning);
    }

    #[test]
    fn certificates_within_the_warning_window_are_flagged() {
        let cert = |days| CertRow {
            source: "member m1".to_owned(),
            path: "https://127.0.0.1:1".to_owned(),
            subject: "CN=m1".to_owned(),
            not_after: "2026-12-11 00:00:00 UTC".to_owned(),
            days_left: days,
        };
        assert_eq!(certificates(&[cert(10)], &[], &thresholds()).verdict, Verdict::Warning);
        assert_eq!(certificates(&[cert(3)], &[], &thresholds()).verdict, Verdict::Critical);
        assert_eq!(certificates(&[cert(300)], &[], &thresholds()).verdict, Verdict::Ok);
    }

    #[test]
    fn prefixes_near_the_budget_are_named() {
        let mut facts = facts(healthy_three());
        facts.key_scan = Ok(KeyScan {
            keys: 10,
            bytes: 4 << 20,
            partial: false,
            prefixes: vec![PrefixSize { prefix: "/big/".to_owned(), keys: 10, bytes: 4 << 20 }],
        });
        let check = budget(&facts, &thresholds());
        assert_eq!(check.verdict, Verdict::Warning);
        assert_eq!(check.evidence[0], "/big/: 4.0 MiB in 10 keys (100% of the 4.0 MiB budget)");
    }
}
