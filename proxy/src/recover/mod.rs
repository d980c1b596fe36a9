//! `recover-space`: the NOSPACE runbook (field report F10) as one safe sequence. Compact the
//! history, defragment the members one at a time (learners and followers first, the leader
//! last, each only while every other member is healthy, so that a slow defragmentation never
//! costs the quorum), then disarm the NOSPACE alarms. Compaction drops old revisions only, never
//! a key's current value; the key count is read before and after to show it.
//!
//! The plan is made from what the cluster says now, and each step is re-checked against the
//! cluster before it runs; the first failure stops the sequence with what was done and what is left.

use std::fmt;
use std::time::{Duration, Instant};

use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Client, CompactionOptions, GetOptions};

use crate::cluster_access::ClusterAccess;
use crate::doctor::checks::{member_label, mib};
use crate::doctor::facts::{self, connect_one, describe, timed, MemberFacts};

/// A member as the plan names it.
#[derive(Debug, Clone)]
pub struct Target {
    pub id: u64,
    /// `m1 (8e9e05c52164694d)`.
    pub label: String,
    /// `learner`, `follower` or `leader`.
    pub role: &'static str,
    pub url: String,
    pub db_size: i64,
}

/// What `recover-space` will do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The revision when the plan was made.
    pub revision: i64,
    /// Compact to this revision; `None` when history is already compacted that far.
    pub compact_to: Option<i64>,
    /// The revision history was already compacted to (0: never).
    pub compacted: i64,
    /// Defragmentation order: learners, followers, the leader last.
    pub defragment: Vec<Target>,
    /// Members with an active NOSPACE alarm.
    pub nospace: Vec<u64>,
    /// Keys in the keyspace when the plan was made.
    pub keys: i64,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "plan ({} members, revision {}, {} keys):", self.defragment.len(), self.revision, self.keys)?;
        match self.compact_to {
            Some(to) => writeln!(
                f,
                "  1. compact history to revision {to} (revisions before it become unreadable; every key keeps its current value)"
            )?,
            None => writeln!(f, "  1. compact: nothing to do, history is already compacted to revision {}", self.compacted)?,
        }
        writeln!(f, "  2. defragment one member at a time, each only while every other member is healthy:")?;
        for target in &self.defragment {
            writeln!(f, "     - {} ({}, {}, {})", target.label, target.role, target.url, mib(target.db_size))?;
        }
        if self.nospace.is_empty() {
            writeln!(f, "  3. disarm NOSPACE alarms: none is active")
        } else {
            writeln!(
                f,
                "  3. disarm the NOSPACE alarm of {}",
                self.nospace.iter().map(|id| format!("{id:x}")).collect::<Vec<_>>().join(", ")
            )
        }
    }
}

/// How the runbook reports its steps as they go.
pub trait Progress {
    /// Step `step` (1-based, of 3) starts with `units` units of work.
    fn start(&mut self, step: usize, title: &str, units: usize);
    /// `done` units of the current step are done; `doing` says what runs now.
    fn advance(&mut self, done: usize, doing: &str);
    /// The current step finished; `outcome` says how.
    fn finish(&mut self, outcome: &str);
}

/// Where the runbook stopped.
#[derive(Debug)]
pub struct Stopped {
    /// What failed, in etcd's words where it said something.
    pub error: String,
    pub done: Vec<String>,
    pub left: Vec<String>,
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "stopped: {}", self.error)?;
        writeln!(f, "done:")?;
        for line in &self.done {
            writeln!(f, "  - {line}")?;
        }
        if self.done.is_empty() {
            writeln!(f, "  - nothing")?;
        }
        writeln!(f, "left to do:")?;
        for line in &self.left {
            writeln!(f, "  - {line}")?;
        }
        Ok(())
    }
}

/// What the runbook did.
#[derive(Debug)]
pub struct Recovered {
    pub done: Vec<String>,
    /// Keys before and after.
    pub keys: (i64, i64),
}

/// Makes the plan from the cluster's state now. Refuses when a member does not answer:
/// defragmenting another one then could leave the cluster without a quorum.
pub async fn plan(access: &ClusterAccess, keep_revisions: i64) -> Result<Plan, String> {
    let mut client = facts::connect_any(access).await?;
    let mut facts = MemberFacts::listed(&timed(client.member_list()).await?);
    for member in &mut facts {
        member.status = facts::status_of_member(access, member).await;
    }
    if let Some(down) = facts.iter().find(|m| m.status.is_err()) {
        let why = down.status.as_ref().err().cloned().unwrap_or_default();
        return Err(format!(
            "{} does not answer ({why}); defragmenting another member meanwhile could cost the quorum: \
             bring it back (or remove it from the cluster) first; `etcd-compat-proxy doctor` shows the cluster's state",
            member_label(down)
        ));
    }
    let leader = facts.iter().filter_map(|m| m.status.as_ref().ok()).map(|s| s.leader).find(|l| *l != 0);
    let Some(leader) = leader else {
        return Err(
            "no member knows a leader: the cluster cannot compact; `etcd-compat-proxy doctor` shows why".to_owned()
        );
    };
    let mut defragment: Vec<Target> = facts
        .iter()
        .filter_map(|m| {
            let status = m.status.as_ref().ok()?;
            let role = if m.is_learner {
                "learner"
            } else if m.id == leader {
                "leader"
            } else {
                "follower"
            };
            Some(Target {
                id: m.id,
                label: member_label(m),
                role,
                url: m.client_urls.first()?.clone(),
                db_size: status.db_size,
            })
        })
        .collect();
    let order = |role: &str| match role {
        "learner" => 0,
        "follower" => 1,
        _ => 2,
    };
    defragment.sort_by_key(|t| (order(t.role), t.label.clone()));
    let (revision, keys) = key_count(&mut client).await?;
    let compacted = facts::oldest_readable_revision(&mut client, revision).await?;
    let target = revision - keep_revisions.max(0);
    let compact_to = (target > compacted.max(1)).then_some(target);
    let alarms = timed(client.alarm(AlarmAction::Get, AlarmType::None, None)).await?;
    let nospace = alarms.alarms().iter().filter(|a| a.alarm() == AlarmType::Nospace).map(|a| a.member_id()).collect();
    Ok(Plan { revision, compact_to, compacted, defragment, nospace, keys })
}

/// Runs `plan`, reporting to `progress`; `defrag_timeout` bounds each member's defragmentation.
pub async fn execute(
    access: &ClusterAccess,
    plan: &Plan,
    defrag_timeout: Duration,
    progress: &mut dyn Progress,
) -> Result<Recovered, Stopped> {
    let mut done = Vec::new();
    let mut left: Vec<String> = Vec::new();
    if let Some(to) = plan.compact_to {
        left.push(format!("compact to revision {to}"));
    }
    left.extend(plan.defragment.iter().map(|t| format!("defragment {}", t.label)));
    left.push("disarm NOSPACE alarms".to_owned());
    let stop =
        |error: String, done: &[String], left: &[String]| Stopped { error, done: done.to_vec(), left: left.to_vec() };

    let mut client = facts::connect_any(access).await.map_err(|e| stop(e, &done, &left))?;

    // 1. Compaction: physical, so that the freed pages exist before defragmentation.
    progress.start(1, "compact", 1);
    match plan.compact_to {
        Some(to) => {
            let started = Instant::now();
            progress.advance(0, &format!("compacting to revision {to}"));
            let compaction = client.compact(to, Some(CompactionOptions::new().with_physical()));
            match tokio::time::timeout(defrag_timeout, compaction).await {
                Ok(Ok(_)) => {}
                // Someone compacted further meanwhile: what this step wanted is done.
                Ok(Err(error)) if describe(&error).contains("required revision has been compacted") => {}
                Ok(Err(error)) => {
                    return Err(stop(format!("compacting to revision {to} failed: {}", describe(&error)), &done, &left))
                }
                Err(_) => {
                    return Err(stop(
                        format!(
                            "compacting to revision {to} took longer than --defrag-timeout; run recover-space again"
                        ),
                        &done,
                        &left,
                    ))
                }
            }
            left.remove(0);
            done.push(format!("compacted to revision {to} ({:.1}s)", started.elapsed().as_secs_f64()));
            progress.finish(&format!("compacted to revision {to}"));
        }
        None => progress.finish("nothing to compact"),
    }

    // 2. Defragmentation, one member at a time.
    progress.start(2, "defragment", plan.defragment.len());
    for (index, target) in plan.defragment.iter().enumerate() {
        if let Err(why) = others_healthy(access, plan, target.id).await {
            return Err(stop(
                format!("not defragmenting {}: {why}; the rest of the cluster must be healthy first", target.label),
                &done,
                &left,
            ));
        }
        progress.advance(index, &format!("defragmenting {} ({})", target.label, target.role));
        let started = Instant::now();
        let mut member = connect_one(access, &target.url).await.map_err(|e| stop(e, &done, &left))?;
        match tokio::time::timeout(defrag_timeout, member.defragment()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                return Err(stop(format!("defragmenting {} failed: {}", target.label, describe(&error)), &done, &left))
            }
            Err(_) => {
                return Err(stop(
                    format!(
                        "defragmenting {} took longer than --defrag-timeout ({}s); it may still be running: \
                         wait until `etcd-compat-proxy doctor` shows it healthy, then run recover-space again",
                        target.label,
                        defrag_timeout.as_secs()
                    ),
                    &done,
                    &left,
                ))
            }
        }
        let size = facts::status_of_member(access, &member_facts(target)).await.map(|s| s.db_size).ok();
        left.retain(|l| l != &format!("defragment {}", target.label));
        done.push(format!(
            "defragmented {} ({} -> {}, {:.1}s)",
            target.label,
            mib(target.db_size),
            size.map_or_else(|| "size unknown".to_owned(), mib),
            started.elapsed().as_secs_f64()
        ));
        progress.advance(index + 1, &format!("defragmented {}", target.label));
    }
    progress.finish(&format!("{} members defragmented", plan.defragment.len()));

    // 3. The alarms, read again: a member may have raised NOSPACE since the plan was made.
    let alarms = timed(client.alarm(AlarmAction::Get, AlarmType::None, None))
        .await
        .map_err(|e| stop(format!("reading the alarms failed: {e}"), &done, &left))?;
    let nospace: Vec<u64> =
        alarms.alarms().iter().filter(|a| a.alarm() == AlarmType::Nospace).map(|a| a.member_id()).collect();
    progress.start(3, "disarm", nospace.len());
    for (index, member) in nospace.iter().enumerate() {
        progress.advance(index, &format!("disarming NOSPACE of {member:x}"));
        let mut options = AlarmOptions::new();
        options.with_member(*member);
        timed(client.alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(options)))
            .await
            .map_err(|e| stop(format!("disarming the NOSPACE alarm of {member:x} failed: {e}"), &done, &left))?;
    }
    left.clear();
    done.push(if nospace.is_empty() {
        "no NOSPACE alarm was active".to_owned()
    } else {
        format!("disarmed {} NOSPACE alarm(s)", nospace.len())
    });
    progress.finish(&format!("{} alarm(s) disarmed", nospace.len()));

    let (_, keys_after) = key_count(&mut client).await.map_err(|e| stop(e, &done, &left))?;
    Ok(Recovered { done, keys: (plan.keys, keys_after) })
}

/// Every member but `except` answers Status and knows a leader.
async fn others_healthy(access: &ClusterAccess, plan: &Plan, except: u64) -> Result<(), String> {
    for other in plan.defragment.iter().filter(|t| t.id != except) {
        let status = facts::status_of_member(access, &member_facts(other)).await;
        match status {
            Ok(status) if status.leader != 0 => {}
            Ok(_) => return Err(format!("{} knows no leader", other.label)),
            Err(error) => return Err(format!("{} does not answer ({error})", other.label)),
        }
    }
    Ok(())
}

fn member_facts(target: &Target) -> MemberFacts {
    MemberFacts {
        id: target.id,
        name: target.label.clone(),
        client_urls: vec![target.url.clone()],
        is_learner: target.role == "learner",
        status: Err(String::new()),
        later: None,
    }
}

/// The revision and the number of keys, from one count-only Range over the whole keyspace.
async fn key_count(client: &mut Client) -> Result<(i64, i64), String> {
    let options = GetOptions::new().with_from_key().with_count_only();
    let answer = timed(client.get(vec![0u8], Some(options))).await?;
    Ok((answer.header().map_or(0, |h| h.revision()), answer.count()))
}
