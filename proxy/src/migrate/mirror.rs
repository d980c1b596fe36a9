//! The mirror: every source revision after the seed, replayed onto the target as one `Txn`.
//!
//! Why this keeps revisions identical: etcd gives each transaction that changes keys exactly one
//! new revision, and every revision shows up in a watch as the events carrying it (a revoked or
//! expired lease's keys are deleted in one revision too). A target that held the source's data at
//! revision R and receives revision R+1's events as one transaction therefore gets revision R+1,
//! with the same `create_revision`, `mod_revision` and `version` for every key. The target's
//! revision after each transaction is checked against the source's: any other writer on the
//! target shows up as a revision that does not match, and stops the mirror at once.
//!
//! What a watch does not carry is done beside it, once a second: leases (granted on the target
//! with the source's id and TTL, kept alive there so that they never expire on their own, and
//! revoked once the source no longer has them and their keys are gone), the source's compaction
//! (applied on the target at the same revision), and a check that the auth store stayed still.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, DeleteOptions, EventType, GetOptions, LeaseGrantOptions, LeaseKeepAliveStream, LeaseKeeper,
    LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use tokio_util::sync::CancellationToken;

use super::compare::{self, printable};
use super::{ClusterAccess, MigrateError, Migration};

/// How often the mirror checks the target's revision, leases and the source's auth store.
const TICK: Duration = Duration::from_secs(1);
/// How often the source's compaction revision and auth store are looked up.
const SLOW_CHECKS: Duration = Duration::from_secs(5);
/// How long the mirror keeps trying to go on through errors that may pass.
const OUTAGE_LIMIT: Duration = Duration::from_secs(60);
/// How long the compaction probe waits for etcd to say a watch from revision 1 is compacted.
const COMPACTION_PROBE_WAIT: Duration = Duration::from_millis(500);
/// A key no client uses, watched by the compaction probe.
const PROBE_KEY: &[u8] = b"\0etcd-compat-proxy/compaction-probe";

/// Both clusters, checked and ready to mirror.
pub struct Prepared {
    source: Client,
    target: Client,
    seed_revision: i64,
    source_revision: i64,
}

impl Prepared {
    /// The revision the target was seeded at.
    pub fn seed_revision(&self) -> i64 {
        self.seed_revision
    }

    /// The source's revision when the mirror was prepared.
    pub fn source_revision(&self) -> i64 {
        self.source_revision
    }
}

/// Checks that `target` is a different cluster holding exactly the source's data at its own
/// revision, and that the source still has every revision after it.
pub async fn prepare(source: &ClusterAccess, target: &ClusterAccess) -> Result<Prepared, MigrateError> {
    let mut source = source.connect("the source cluster").await?;
    let mut target = target.connect("the target cluster").await?;
    let (source_cluster, source_revision) = current_revision(&mut source, "the source").await.map_err(needs_user)?;
    let (target_cluster, seed_revision) = current_revision(&mut target, "the target").await.map_err(needs_user)?;
    if source_cluster == target_cluster {
        return Err(MigrateError::Setup(format!(
            "--to names the source cluster itself (cluster id {source_cluster:x}); name the new cluster's members"
        )));
    }
    if seed_revision > source_revision {
        return Err(MigrateError::Setup(format!(
            "the target is at revision {seed_revision}, ahead of the source ({source_revision}): it was written to, \
             or seeded from another cluster; restore it again from a new `etcd-compat-proxy migrate snapshot`"
        )));
    }
    let comparison = compare::at_revision(source.clone(), target.clone(), seed_revision).await.map_err(|error| {
        if error.to_string().contains("required revision has been compacted") {
            MigrateError::Setup(format!(
                "the source has compacted its history past the target's revision {seed_revision}, so the revisions \
                 after it can no longer be replayed; take a new `etcd-compat-proxy migrate snapshot`, restore the \
                 target from it and start the mirror before the source compacts again"
            ))
        } else {
            error
        }
    })?;
    if !comparison.equal {
        return Err(MigrateError::Setup(format!(
            "the target is not a copy of the source at revision {seed_revision}: {} key(s) differ (first: {}); \
             restore it from a `etcd-compat-proxy migrate snapshot` of this source",
            comparison.differences,
            comparison.first_differences.first().map_or("none listed", String::as_str)
        )));
    }
    Ok(Prepared { source, target, seed_revision, source_revision })
}

/// Adds what to do to an auth refusal: the migration acts as the proxy's `--user`.
fn needs_user(error: MigrateError) -> MigrateError {
    let text = error.to_string();
    if text.contains("user name is empty") || text.contains("permission denied") || text.contains("invalid auth token")
    {
        MigrateError::Setup(format!(
            "{text}: with auth on, the migration acts as the proxy's --user on both clusters, which must be root \
             (or may read every key, lease and the auth store)"
        ))
    } else {
        error
    }
}

/// Mirrors until `stop` is cancelled or a failure, which is recorded in `migration`.
pub async fn run(migration: Arc<Migration>, prepared: Prepared, run: u64, stop: CancellationToken) {
    let outcome = tokio::select! {
        _ = stop.cancelled() => Ok(()),
        outcome = replay(&migration, prepared, run) => outcome,
    };
    if let Err(error) = outcome {
        migration.fail(run, error.to_string());
    }
}

async fn replay(migration: &Migration, prepared: Prepared, run: u64) -> Result<(), MigrateError> {
    let Prepared { mut source, mut target, seed_revision, .. } = prepared;
    let mut mirror = Replay {
        applied: seed_revision,
        leases: LeaseMirror::default(),
        compaction: Compaction { source: 0, target: 0, checked: None },
        auth_store: match auth_store_digest(&mut source).await {
            Some(digest) => Some(digest),
            None => {
                tracing::warn!(
                    "the mirror cannot read the source's users and roles (is --user root?): changes to them made \
                     around the proxy during mirroring will not be noticed"
                );
                None
            }
        },
        auth_checked: Instant::now(),
        outage: None,
    };
    // A member restarting or a connection lost on either side pauses the mirror, which then
    // goes on from the next revision it has not replayed; only a long outage stops it.
    loop {
        let error = match mirror.follow(migration, run, &mut source, &mut target).await {
            Ok(()) => return Ok(()),
            Err(error) if !error.is_transient() => return Err(error),
            Err(error) => error,
        };
        let began = *mirror.outage.get_or_insert_with(|| {
            tracing::warn!("the mirror paused: {error}; trying again every second");
            Instant::now()
        });
        if began.elapsed() >= OUTAGE_LIMIT {
            return Err(MigrateError::Setup(format!(
                "the mirror could not go on for {}s: {error}",
                OUTAGE_LIMIT.as_secs()
            )));
        }
        tokio::time::sleep(TICK).await;
    }
}

/// The mirror's progress, kept across the watches it opens.
struct Replay {
    /// The last source revision replayed onto the target.
    applied: i64,
    leases: LeaseMirror,
    compaction: Compaction,
    /// The source's auth store when mirroring began; `None` when it cannot be read.
    auth_store: Option<String>,
    auth_checked: Instant,
    /// Since when the mirror has been failing to go on, if it is.
    outage: Option<Instant>,
}

impl Replay {
    /// Watches the source from the next revision to replay and replays until stopped (`Ok`) or
    /// an error.
    async fn follow(
        &mut self,
        migration: &Migration,
        run: u64,
        source: &mut Client,
        target: &mut Client,
    ) -> Result<(), MigrateError> {
        if !self.take_lost_answer(migration, run, source, target).await? {
            return Ok(());
        }
        self.leases.sync(migration, run, source, target).await?;
        let options = WatchOptions::new().with_from_key().with_start_revision(self.applied + 1);
        let mut watch =
            source.watch(vec![0u8], Some(options)).await.map_err(|e| MigrateError::etcd("watching the source", e))?;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                message = watch.message() => {
                    let answer = message
                        .map_err(|e| MigrateError::etcd("the source's watch", e))?
                        .ok_or_else(|| MigrateError::answer("the source's watch", "etcd closed it"))?;
                    if answer.canceled() {
                        return Err(watch_cancelled(answer.compact_revision(), answer.cancel_reason(), self.applied));
                    }
                    let source_revision = answer.header().map_or(0, |h| h.revision());
                    // One answer holds whole revisions (etcd never splits a revision's events
                    // across answers unless the watch asks for fragments, which this one does not).
                    let mut revisions: BTreeMap<i64, Vec<&etcd_client::Event>> = BTreeMap::new();
                    for event in answer.events() {
                        let revision = event.kv().map_or(0, |kv| kv.mod_revision());
                        revisions.entry(revision).or_default().push(event);
                    }
                    for (revision, events) in revisions {
                        if revision != self.applied + 1 {
                            return Err(MigrateError::Setup(format!(
                                "the source's watch skipped from revision {} to {revision}; the mirror cannot \
                                 carry a gap: abort, take a new snapshot and mirror again",
                                self.applied
                            )));
                        }
                        apply(source, target, &mut self.leases, revision, &events).await?;
                        self.applied = revision;
                        self.outage = None;
                        let alive = migration.update(run, |state| {
                            state.applied_revision = revision;
                            state.source_revision = state.source_revision.max(source_revision).max(revision);
                            state.transactions += 1;
                        });
                        if !alive {
                            return Ok(());
                        }
                    }
                }
                _ = tick.tick() => {
                    if !self.check(migration, run, source, target).await? {
                        return Ok(());
                    }
                    self.outage = None;
                }
            }
        }
    }

    /// Counts as replayed a transaction that landed on the target although its answer was lost
    /// (the connection broke after etcd applied it, and reading the revision failed too): the
    /// target is then exactly one revision ahead, holding the source's next revision. Anything
    /// else one revision ahead is left for `check` to report as a foreign write. False when the
    /// mirror was stopped.
    async fn take_lost_answer(
        &mut self,
        migration: &Migration,
        run: u64,
        source: &mut Client,
        target: &mut Client,
    ) -> Result<bool, MigrateError> {
        let next = self.applied + 1;
        let (_, target_revision) = current_revision(target, "the target").await?;
        if target_revision != next {
            return Ok(true);
        }
        let on_target = changes_at(target, next, "the target").await?;
        if on_target != changes_at(source, next, "the source").await? {
            return Ok(true);
        }
        tracing::info!(
            revision = next,
            "the target holds the revision whose answer was lost; the mirror goes on after it"
        );
        self.applied = next;
        Ok(migration.update(run, |state| {
            state.applied_revision = next;
            state.transactions += 1;
        }))
    }

    /// The once-a-second work beside the watch: the target's revision, leases, compaction, and
    /// (less often) the auth store. False when the mirror was stopped.
    async fn check(
        &mut self,
        migration: &Migration,
        run: u64,
        source: &mut Client,
        target: &mut Client,
    ) -> Result<bool, MigrateError> {
        let (_, target_revision) = current_revision(target, "the target").await?;
        if target_revision != self.applied {
            return Err(foreign_write(target, self.applied, target_revision).await);
        }
        let (_, source_revision) = current_revision(source, "the source").await?;
        self.leases.sync(migration, run, source, target).await?;
        self.compaction.follow(source, target, self.applied).await?;
        let mut changed = false;
        if self.auth_checked.elapsed() >= SLOW_CHECKS {
            self.auth_checked = Instant::now();
            if let Some(before) = &self.auth_store {
                changed = auth_store_digest(source).await.is_some_and(|now| &now != before);
            }
        }
        if changed {
            tracing::warn!("the source's users, roles or permissions changed during mirroring; they are not mirrored");
        }
        Ok(migration.update(run, |state| {
            state.source_revision = state.source_revision.max(source_revision);
            if changed && !state.auth_store_changed {
                state.auth_store_changed = true;
                state.error = Some(
                    "users, roles or permissions changed on the source during mirroring (not through this proxy); \
                     they are not mirrored: make the same change on the target, or abort and start again from a \
                     new snapshot, before cutover"
                        .to_owned(),
                );
            }
        }))
    }
}

/// Replays one source revision onto the target as one transaction and checks its revision.
async fn apply(
    source: &mut Client,
    target: &mut Client,
    leases: &mut LeaseMirror,
    revision: i64,
    events: &[&etcd_client::Event],
) -> Result<(), MigrateError> {
    let mut operations = Vec::with_capacity(events.len());
    let (mut deleted, mut put) = (Vec::new(), Vec::new());
    for event in events {
        let Some(kv) = event.kv() else { continue };
        match event.event_type() {
            EventType::Put => {
                if kv.lease() != 0 {
                    leases.ensure(source, target, kv.lease()).await?;
                }
                let options = PutOptions::new().with_lease(kv.lease());
                operations.push(TxnOp::put(kv.key(), kv.value(), Some(options)));
                put.push(kv.key());
            }
            EventType::Delete => deleted.push(kv.key().to_vec()),
        }
    }
    if operations.len() + deleted.len() > ETCD_DEFAULT_MAX_TXN_OPS {
        for (from, to) in deleted_ranges(target, &mut deleted, &put).await? {
            operations.push(TxnOp::delete(from, Some(DeleteOptions::new().with_range(to))));
        }
    } else {
        operations.extend(deleted.into_iter().map(|key| TxnOp::delete(key, None)));
    }
    let landed = match target.txn(Txn::new().and_then(operations)).await {
        Ok(answer) => answer.header().map_or(0, |h| h.revision()),
        Err(error) if error.to_string().contains("too many operations in txn request") => {
            return Err(MigrateError::Setup(format!(
                "replaying revision {revision} onto the target: it changed {} keys at once, more than the target's \
                 --max-txn-ops: raise it to at least that and start the mirror again",
                events.len()
            )))
        }
        Err(error) => {
            let failed = MigrateError::etcd(format!("replaying revision {revision} onto the target"), error);
            if !failed.is_transient() {
                return Err(failed);
            }
            // The transaction may have been applied before its answer was lost: the target's
            // revision says whether (the mirror is its only writer).
            match current_revision(target, "the target").await {
                Ok((_, now)) if now == revision => now,
                Ok((_, now)) if now == revision - 1 => return Err(failed),
                Ok((_, now)) => now,
                Err(_) => return Err(failed),
            }
        }
    };
    if landed != revision {
        return Err(foreign_write(target, revision - 1, landed).await);
    }
    Ok(())
}

/// `--max-txn-ops` of an etcd left at its default: a revision with more changes is replayed with
/// its deletions as ranges.
const ETCD_DEFAULT_MAX_TXN_OPS: usize = 128;

/// The deletions of one revision as few key ranges: each range covers a run of deleted keys with
/// no other key of the target between them, nor a key the same revision puts. The target holds
/// the source's keys as of the revision before, so each range deletes exactly those keys. Keys
/// are read from the target a page at a time; `deleted` is sorted in place.
async fn deleted_ranges(
    target: &mut Client,
    deleted: &mut [Vec<u8>],
    puts: &[&[u8]],
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, MigrateError> {
    deleted.sort();
    let (Some(first), Some(last)) = (deleted.first(), deleted.last()) else { return Ok(Vec::new()) };
    let mut end = last.clone();
    end.push(0);
    // Every key of the target from the first deleted key to the last, in order.
    let mut present = Vec::new();
    let mut from = first.clone();
    loop {
        let options = GetOptions::new()
            .with_range(end.clone())
            .with_keys_only()
            .with_limit(1000)
            .with_sort(etcd_client::SortTarget::Key, etcd_client::SortOrder::Ascend);
        let page = target
            .get(from.clone(), Some(options))
            .await
            .map_err(|e| MigrateError::etcd("reading the target's keys around a large deletion", e))?;
        let more = page.more();
        present.extend(page.kvs().iter().map(|kv| kv.key().to_vec()));
        match (more, present.last()) {
            (true, Some(last)) => {
                from = last.clone();
                from.push(0);
            }
            _ => break,
        }
    }
    // A key the same revision puts must stay outside every range, present on the target or not.
    present.extend(puts.iter().map(|key| key.to_vec()));
    present.sort();
    present.dedup();
    let mut ranges = Vec::new();
    let mut run: Option<(Vec<u8>, Vec<u8>)> = None;
    let mut wanted = deleted.iter().peekable();
    for key in present {
        let is_deleted = wanted.peek().is_some_and(|next| **next == key);
        let breaks_run = !is_deleted || puts.contains(&key.as_slice());
        if is_deleted {
            wanted.next();
        }
        if breaks_run {
            ranges.extend(run.take());
        }
        if is_deleted {
            match &mut run {
                Some((_, to)) => {
                    *to = key;
                    to.push(0);
                }
                None => {
                    let mut to = key.clone();
                    to.push(0);
                    run = Some((key, to));
                }
            }
        }
    }
    ranges.extend(run);
    // Deleted keys missing on the target mean it diverged.
    if wanted.next().is_some() {
        return Err(MigrateError::Setup(
            "a key the source deleted is missing on the target: the target has diverged from the source; abort, \
             restore it from a new snapshot"
                .to_owned(),
        ));
    }
    Ok(ranges)
}

/// The error for a target whose revision moved past `applied` without the mirror: names the
/// first foreign revision and its key.
async fn foreign_write(target: &mut Client, applied: i64, target_revision: i64) -> MigrateError {
    let first = first_event_after(target, applied).await;
    let which = match first {
        Some((revision, key)) => format!("revision {revision} wrote key {}", printable(&key)),
        None => format!("revision {}", applied + 1),
    };
    MigrateError::Setup(format!(
        "the target was written to by something other than the mirror: it is at revision {target_revision} while \
         the mirror had applied {applied}, and {which}; the target has diverged from the source: abort, restore it \
         from a new snapshot, and keep every client away from it until cutover"
    ))
}

async fn first_event_after(target: &mut Client, applied: i64) -> Option<(i64, Vec<u8>)> {
    let options = WatchOptions::new().with_from_key().with_start_revision(applied + 1);
    let mut watch = target.watch(vec![0u8], Some(options)).await.ok()?;
    let found = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(answer)) = watch.message().await {
            if let Some(kv) = answer.events().first().and_then(|e| e.kv()) {
                return Some((kv.mod_revision(), kv.key().to_vec()));
            }
            if answer.canceled() {
                return None;
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    found
}

/// One revision's changes as (deleted, key, value, lease), sorted: the same on both sides when
/// the target's revision is the source's replayed, whatever order the transaction had.
async fn changes_at(
    client: &mut Client,
    revision: i64,
    side: &str,
) -> Result<Vec<(bool, Vec<u8>, Vec<u8>, i64)>, MigrateError> {
    let reading = format!("reading revision {revision} on {side}");
    let options = WatchOptions::new().with_from_key().with_start_revision(revision);
    let mut watch = client.watch(vec![0u8], Some(options)).await.map_err(|e| MigrateError::etcd(reading.clone(), e))?;
    // etcd sends a revision's events in one answer, so the first answer with events has them all.
    let first = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch.message().await {
                Ok(Some(answer)) if answer.canceled() => {
                    return Err(MigrateError::answer(reading.clone(), "etcd cancelled the watch (compacted?)"))
                }
                Ok(Some(answer)) if !answer.events().is_empty() => return Ok(answer),
                Ok(Some(_)) => continue,
                Ok(None) => return Err(MigrateError::answer(reading.clone(), "etcd closed the watch")),
                Err(error) => return Err(MigrateError::etcd(reading.clone(), error)),
            }
        }
    })
    .await
    .map_err(|_| MigrateError::answer(reading.clone(), "no events within 5s"))??;
    let mut changes: Vec<_> = first
        .events()
        .iter()
        .filter_map(|event| event.kv().map(|kv| (event, kv)))
        .filter(|(_, kv)| kv.mod_revision() == revision)
        .map(|(event, kv)| {
            (event.event_type() == EventType::Delete, kv.key().to_vec(), kv.value().to_vec(), kv.lease())
        })
        .collect();
    changes.sort();
    Ok(changes)
}

fn watch_cancelled(compact_revision: i64, reason: &str, applied: i64) -> MigrateError {
    if compact_revision > 0 {
        MigrateError::Setup(format!(
            "the source compacted its history at revision {compact_revision} before the mirror replayed revision {}; \
             abort, take a new snapshot and mirror again",
            applied + 1
        ))
    } else {
        MigrateError::answer("the source's watch", &format!("etcd cancelled it: {reason}"))
    }
}

/// The cluster id and current revision, read linearizably (a follower's serializable answer
/// may not include the mirror's last transaction yet).
pub(super) async fn current_revision(client: &mut Client, side: &str) -> Result<(u64, i64), MigrateError> {
    let answer = client
        .get(PROBE_KEY, Some(GetOptions::new().with_count_only()))
        .await
        .map_err(|e| MigrateError::etcd(format!("reading {side}'s revision"), e))?;
    let header =
        answer.header().ok_or_else(|| MigrateError::answer(format!("reading {side}'s revision"), "no header"))?;
    Ok((header.cluster_id(), header.revision()))
}

/// The target's leases, matched to the source's and kept alive.
#[derive(Default)]
struct LeaseMirror {
    /// Leases the mirror keeps alive on the target, by id.
    kept: HashMap<i64, KeptLease>,
}

struct KeptLease {
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
    /// The TTL the lease was granted with, in seconds.
    ttl: i64,
    /// `None` until the mirror first renewed it.
    renewed: Option<Instant>,
}

impl LeaseMirror {
    /// Grants on the target what the source has, revokes what it no longer has (once their keys
    /// are gone, so that the revoke changes no key), and renews the target's leases.
    async fn sync(
        &mut self,
        migration: &Migration,
        run: u64,
        source: &mut Client,
        target: &mut Client,
    ) -> Result<(), MigrateError> {
        let on_source = lease_ids(source, "the source").await?;
        let on_target = lease_ids(target, "the target").await?;
        let (mut granted, mut revoked) = (0, 0);
        for &id in on_source.difference(&on_target) {
            if self.grant(source, target, id).await? {
                granted += 1;
            }
        }
        for &id in on_target.difference(&on_source) {
            let keys = target
                .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
                .await
                .map_err(|e| MigrateError::etcd(format!("reading lease {id:x} on the target"), e))?;
            if keys.keys().is_empty() {
                self.kept.remove(&id);
                target
                    .lease_revoke(id)
                    .await
                    .map_err(|e| MigrateError::etcd(format!("revoking lease {id:x} on the target"), e))?;
                revoked += 1;
            }
        }
        for &id in on_source.intersection(&on_target) {
            self.renew(target, id).await?;
        }
        if granted + revoked > 0 {
            migration.update(run, |state| {
                state.leases_granted += granted;
                state.leases_revoked += revoked;
            });
        }
        Ok(())
    }

    /// Makes sure lease `id` exists on the target before a key is put with it.
    async fn ensure(&mut self, source: &mut Client, target: &mut Client, id: i64) -> Result<(), MigrateError> {
        if self.kept.contains_key(&id) {
            return Ok(());
        }
        let exists = target
            .lease_time_to_live(id, None)
            .await
            .map_err(|e| MigrateError::etcd(format!("reading lease {id:x} on the target"), e))?
            .ttl()
            > 0;
        if !exists {
            self.grant(source, target, id).await?;
        }
        self.renew(target, id).await
    }

    /// Grants lease `id` on the target with the source's TTL; false when the source no longer has it.
    async fn grant(&mut self, source: &mut Client, target: &mut Client, id: i64) -> Result<bool, MigrateError> {
        let on_source = source
            .lease_time_to_live(id, None)
            .await
            .map_err(|e| MigrateError::etcd(format!("reading lease {id:x} on the source"), e))?;
        // A lease revoked since it was listed: its keys' deletion comes through the watch. A put
        // replayed with it still needs it, so it is granted for that long anyway.
        let ttl = if on_source.granted_ttl() > 0 { on_source.granted_ttl() } else { 60 };
        target
            .lease_grant(ttl, Some(LeaseGrantOptions::new().with_id(id)))
            .await
            .map_err(|e| MigrateError::etcd(format!("granting lease {id:x} on the target"), e))?;
        tracing::debug!(lease = format!("{id:x}"), ttl, "lease granted on the target");
        Ok(on_source.granted_ttl() > 0)
    }

    /// Renews lease `id` on the target when a third of its TTL has passed since the last renewal.
    async fn renew(&mut self, target: &mut Client, id: i64) -> Result<(), MigrateError> {
        let failed = |e: etcd_client::Error| MigrateError::etcd(format!("keeping lease {id:x} alive on the target"), e);
        let lease = match self.kept.entry(id) {
            Entry::Occupied(kept) => kept.into_mut(),
            Entry::Vacant(new) => {
                let ttl = target.lease_time_to_live(id, None).await.map_err(failed)?;
                let (keeper, answers) = target.lease_keep_alive(id).await.map_err(failed)?;
                new.insert(KeptLease { keeper, answers, ttl: ttl.granted_ttl().max(1), renewed: None })
            }
        };
        let period = Duration::from_millis(u64::try_from(lease.ttl).unwrap_or(1) * 1000 / 3);
        if lease.renewed.is_some_and(|at| at.elapsed() < period) {
            return Ok(());
        }
        lease.keeper.keep_alive().await.map_err(failed)?;
        let answer = lease.answers.message().await.map_err(failed)?;
        if answer.is_some_and(|a| a.ttl() > 0) {
            lease.renewed = Some(Instant::now());
        }
        Ok(())
    }
}

async fn lease_ids(client: &mut Client, side: &str) -> Result<HashSet<i64>, MigrateError> {
    let answer = client.leases().await.map_err(|e| MigrateError::etcd(format!("listing {side}'s leases"), e))?;
    Ok(answer.leases().iter().map(|l| l.id()).collect())
}

/// The source's compaction, applied on the target at the same revision.
struct Compaction {
    /// The source's compaction revision when last seen.
    source: i64,
    /// The revision the target was compacted at by the mirror.
    target: i64,
    /// When the source was last asked; `None`: never.
    checked: Option<Instant>,
}

impl Compaction {
    async fn follow(&mut self, source: &mut Client, target: &mut Client, applied: i64) -> Result<(), MigrateError> {
        if self.checked.is_none_or(|at| at.elapsed() >= SLOW_CHECKS) {
            self.checked = Some(Instant::now());
            if let Some(revision) = compaction_revision(source).await {
                self.source = self.source.max(revision);
            }
        }
        // A compaction at a revision the target has not reached yet waits for it.
        if self.source > self.target && self.source <= applied {
            match target.compact(self.source, None).await {
                Ok(_) => {}
                Err(error) if error.to_string().contains("required revision has been compacted") => {}
                Err(error) => {
                    return Err(MigrateError::etcd(format!("compacting the target at revision {}", self.source), error))
                }
            }
            tracing::info!(revision = self.source, "the source's compaction applied to the target");
            self.target = self.source;
        }
        Ok(())
    }
}

/// The source's compaction revision: etcd cancels a watch from revision 1 with it, and says
/// nothing of it anywhere else in both 3.4 and 3.5. `None` when nothing was compacted yet.
async fn compaction_revision(source: &mut Client) -> Option<i64> {
    let options = WatchOptions::new().with_start_revision(1);
    let mut watch = source.watch(PROBE_KEY, Some(options)).await.ok()?;
    let revision = tokio::time::timeout(COMPACTION_PROBE_WAIT, async {
        while let Ok(Some(answer)) = watch.message().await {
            if answer.canceled() {
                return Some(answer.compact_revision()).filter(|r| *r > 0);
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    revision
}

/// Users with their roles and roles with their permissions, as one comparable text; `None`
/// when the mirror's user may not read them.
async fn auth_store_digest(source: &mut Client) -> Option<String> {
    let mut digest = String::new();
    let users = source.user_list().await.ok()?;
    for user in users.users() {
        let roles = source.user_get(user.clone()).await.ok()?;
        digest.push_str(&format!("user {user}: {:?}\n", roles.roles()));
    }
    let roles = source.role_list().await.ok()?;
    for role in roles.roles() {
        let permissions = source.role_get(role.clone()).await.ok()?;
        let mut lines: Vec<String> = permissions
            .permissions()
            .iter()
            .map(|p| format!("{} {} {}", p.get_type(), printable(p.key()), printable(p.range_end())))
            .collect();
        lines.sort();
        digest.push_str(&format!("role {role}: {lines:?}\n"));
    }
    Some(digest)
}
