//! The serializable-read cache: etcd's answers to serializable Ranges, held by the etcd user
//! they were read as and the request's exact bytes, and dropped as soon as they may be stale.
//!
//! Every answer records its revision `A` (its header's), and these rules keep it honest:
//! - each cached key range of a user has a watch, as that user, from `A + 1` of the first
//!   answer stored for it; an event at revision `E` drops the range's answers older than `E`,
//!   and an answer older than a change already seen, or than its watch's start, is not stored;
//! - a write acknowledged through the proxy at revision `W` drops the answers older than `W` of
//!   every range it touches before its answer reaches the client, and no answer older than `W`
//!   is stored afterwards (a read that raced the write);
//! - a watch stream that fails or ends drops every answer of its user: nothing proves them fresh;
//! - an answer older than [`RECHECK_AFTER`] is not served but read again, so that a permission
//!   revoked in etcd, which no watch reports, stops cached answers within that time.
//!
//! Memory is bounded by the configured bytes: least recently used answers go first. The store
//! knows nothing of etcd's wire: the request path (`call::cached_read`) reads requests and
//! answers, and runs each user's watch stream from the [`WatchCommand`]s the store issues.

mod requests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub use requests::{cacheable_range, header_revision, written_ranges, KeyRange, Written};

/// Age after which a cached answer is read again from etcd instead of served.
pub const RECHECK_AFTER: Duration = Duration::from_secs(1);
/// Bookkeeping of one answer beyond its bytes (slot, index entries, links).
const ENTRY_OVERHEAD: usize = 192;
/// Bookkeeping of one watched range beyond its keys.
const GROUP_OVERHEAD: usize = 256;
/// Watched ranges kept after their last answer was dropped: a key written often would otherwise
/// create and cancel a watch on every write.
const IDLE_GROUPS_KEPT: usize = 1024;
/// No answer larger than this share of the cache is stored: one huge range would evict the rest.
const MAX_ENTRY_SHARE: usize = 8;
/// Marks the end of the LRU list.
const NIL: usize = usize::MAX;

/// The etcd user an answer was read as; `None`: no auth (anonymous requests).
pub type User = Option<Arc<str>>;

/// What a user's watch stream must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchCommand {
    /// Watch `range` from `start_revision`, with `id` as the watch id.
    Create { id: i64, range: KeyRange, start_revision: i64 },
    /// Stop the watch `id`.
    Cancel { id: i64 },
}

/// A user's watch stream to start: the store made its command channel.
pub struct NewWatcher {
    /// Whose answers the stream keeps fresh.
    pub user: User,
    /// Told to [`ReadCache::forget_user`] when the stream ends, so that a later stream survives.
    pub generation: u64,
    /// Creates and cancels, from the store.
    pub commands: UnboundedReceiver<WatchCommand>,
}

/// Counters and gauges of the cache, rendered in `/metrics`.
#[derive(Default)]
pub struct CacheStats {
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    evictions: AtomicU64,
    bytes: AtomicU64,
    entries: AtomicU64,
    watched_ranges: AtomicU64,
    limit: AtomicU64,
}

impl CacheStats {
    /// Appends the cache's series in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let series: [(&str, &str, &str, &AtomicU64); 8] = [
            ("serializable_cache_hits_total", "counter", "Serializable Ranges answered from the cache.", &self.hits),
            ("serializable_cache_misses_total", "counter", "Serializable Ranges the cache could not answer, sent to etcd.", &self.misses),
            ("serializable_cache_invalidations_total", "counter", "Cached answers dropped because their keys changed (a watch event or a write through the proxy), their watch ended, or their user's stream failed.", &self.invalidations),
            ("serializable_cache_evictions_total", "counter", "Cached answers dropped to stay under --serializable-cache-bytes.", &self.evictions),
            ("serializable_cache_bytes", "gauge", "Memory held by cached answers and their bookkeeping.", &self.bytes),
            ("serializable_cache_limit_bytes", "gauge", "--serializable-cache-bytes.", &self.limit),
            ("serializable_cache_entries", "gauge", "Cached answers.", &self.entries),
            ("serializable_cache_watched_ranges", "gauge", "Key ranges watched upstream to keep cached answers fresh.", &self.watched_ranges),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP etcd_compat_proxy_{name} {help}\n# TYPE etcd_compat_proxy_{name} {kind}");
            let _ = writeln!(out, "etcd_compat_proxy_{name} {}", value.load(Ordering::Relaxed));
        }
    }
}

/// Cached answers of type `T` (the request path's whole gRPC answer), bounded in bytes.
pub struct ReadCache<T> {
    limit: usize,
    store: Mutex<Store<T>>,
    /// The highest revision of a write acknowledged through the proxy: kept outside the lock so
    /// that writes pay for the cache only while it holds something (see [`ReadCache::written`]).
    write_floor: AtomicI64,
    /// Set while the store holds anything; set by an insert before it checks `write_floor`.
    occupied: AtomicBool,
    /// How many times everything was forgotten (a write at a revision the proxy could not read).
    forgotten: AtomicU64,
    stats: Arc<CacheStats>,
}

/// A Range the cache may answer, from the lookup that missed to the store of etcd's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cacheable {
    pub range: KeyRange,
    /// [`ReadCache::epoch`] before the request was forwarded: an answer read across a write
    /// whose revision is unknown is not stored (`write_floor` cannot stop it).
    pub epoch: u64,
}

struct Store<T> {
    slots: Vec<Slot<T>>,
    free: Vec<usize>,
    /// Most recently used first.
    head: usize,
    tail: usize,
    /// Slots by request bytes; one per user that sent the same request.
    by_request: HashMap<Bytes, Vec<usize>>,
    groups: HashMap<i64, Group>,
    group_ids: HashMap<(User, KeyRange), i64>,
    /// Single-key groups by key, for writes.
    single_keys: BTreeMap<Bytes, Vec<i64>>,
    /// Groups over a key range, checked one by one on writes (fleets poll few of them).
    range_groups: BTreeSet<i64>,
    idle_groups: VecDeque<i64>,
    watchers: HashMap<User, Watcher>,
    next_group: i64,
    next_generation: u64,
    bytes: usize,
}

struct Watcher {
    commands: UnboundedSender<WatchCommand>,
    generation: u64,
    /// Groups watched on this stream; the stream ends with the last one.
    groups: usize,
}

struct Slot<T> {
    entry: Option<Entry<T>>,
    prev: usize,
    next: usize,
}

struct Entry<T> {
    user: User,
    request: Bytes,
    answer: T,
    revision: i64,
    stored_at: Instant,
    group: i64,
    cost: usize,
}

/// One user's watched key range and the answers it keeps fresh.
struct Group {
    user: User,
    range: KeyRange,
    /// The watch reports changes from this revision on.
    watch_start: i64,
    /// The latest change seen (event or write through the proxy).
    last_change: i64,
    slots: Vec<usize>,
    cost: usize,
    /// In the queue of idle groups: a group goes in once however often it empties, so the
    /// queue counts distinct groups.
    queued_idle: bool,
}

impl<T: Clone> ReadCache<T> {
    /// A cache of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        let stats = Arc::new(CacheStats::default());
        stats.limit.store(limit as u64, Ordering::Relaxed);
        ReadCache {
            limit,
            store: Mutex::new(Store {
                slots: Vec::new(),
                free: Vec::new(),
                head: NIL,
                tail: NIL,
                by_request: HashMap::new(),
                groups: HashMap::new(),
                group_ids: HashMap::new(),
                single_keys: BTreeMap::new(),
                range_groups: BTreeSet::new(),
                idle_groups: VecDeque::new(),
                watchers: HashMap::new(),
                next_group: 1,
                next_generation: 1,
                bytes: 0,
            }),
            write_floor: AtomicI64::new(0),
            occupied: AtomicBool::new(false),
            forgotten: AtomicU64::new(0),
            stats,
        }
    }

    /// The cache's counters, for `/metrics`.
    pub fn stats(&self) -> Arc<CacheStats> {
        Arc::clone(&self.stats)
    }

    fn lock(&self) -> MutexGuard<'_, Store<T>> {
        // A panic elsewhere while holding the lock leaves consistent data: every change is
        // completed before anything that could panic.
        self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The answer cached for `user`'s `request`, if it is fresh; counted as a hit or a miss.
    pub fn get(&self, user: Option<&str>, request: &[u8]) -> Option<T> {
        let found = {
            let mut store = self.lock();
            let slot = store.by_request.get(request).and_then(|slots| {
                slots
                    .iter()
                    .copied()
                    .find(|&slot| store.slots[slot].entry.as_ref().is_some_and(|entry| entry.user.as_deref() == user))
            });
            match slot {
                Some(slot) => {
                    let fresh = store.slots[slot]
                        .entry
                        .as_ref()
                        .filter(|entry| entry.stored_at.elapsed() < RECHECK_AFTER)
                        .map(|entry| entry.answer.clone());
                    if fresh.is_some() {
                        store.touch(slot);
                    }
                    fresh
                }
                None => None,
            }
        };
        let counter = if found.is_some() { &self.stats.hits } else { &self.stats.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// What [`Cacheable::epoch`] is taken from, before a cacheable request is forwarded.
    pub fn epoch(&self) -> u64 {
        self.forgotten.load(Ordering::SeqCst)
    }

    /// Stores `answer` (read at `revision`, costing `cost` bytes) for `user`'s `request` over
    /// the range of `cacheable`, unless it may already be stale or is too large. Returns a
    /// watch stream to start when `user` has none yet.
    pub fn insert(
        &self,
        user: User,
        request: Bytes,
        cacheable: Cacheable,
        revision: i64,
        answer: T,
        cost: usize,
    ) -> Option<NewWatcher> {
        let Cacheable { range, epoch } = cacheable;
        let cost = cost + request.len() + ENTRY_OVERHEAD;
        if cost > self.limit / MAX_ENTRY_SHARE {
            return None;
        }
        let mut store = self.lock();
        // Before the floor is read (see `written`): a write either sees this store occupied, or
        // this insert sees its revision.
        self.occupied.store(true, Ordering::SeqCst);
        // Under the lock, as `forget_everything` counts: one or the other comes first.
        if revision < self.write_floor.load(Ordering::SeqCst) || epoch != self.forgotten.load(Ordering::SeqCst) {
            return None;
        }
        let (group_id, new_watcher) = match store.group_ids.get(&(user.clone(), range.clone())).copied() {
            Some(id) => {
                let group = &store.groups[&id];
                if revision < group.last_change || revision < group.watch_start - 1 {
                    return None;
                }
                (id, None)
            }
            None => store.create_group(user.clone(), range, revision + 1, &self.stats),
        };
        // Only one answer per user and request: a newer one replaces it. The old one goes after
        // the new one is in, so that the group never empties here (an empty group may be
        // dropped with its watch, and the new answer would then be kept fresh by nothing).
        let existing = store.by_request.get(&request).and_then(|slots| {
            slots.iter().copied().find(|&slot| store.slots[slot].entry.as_ref().is_some_and(|e| e.user == user))
        });
        let entry = Entry { user, request, answer, revision, stored_at: Instant::now(), group: group_id, cost };
        store.add_entry(entry, &self.stats);
        if let Some(slot) = existing {
            store.remove_slot(slot, &self.stats);
        }
        let evicted = store.evict_to(self.limit, &self.stats);
        self.stats.evictions.fetch_add(evicted, Ordering::Relaxed);
        self.publish(&store);
        new_watcher
    }

    /// A write acknowledged through the proxy at `revision` changed what `written` names (read
    /// only while the cache holds anything): drops the answers it made stale, before its
    /// answer goes to the client.
    pub fn written(&self, revision: i64, written: impl FnOnce() -> Written) {
        self.write_floor.fetch_max(revision, Ordering::SeqCst);
        if !self.occupied.load(Ordering::SeqCst) {
            return;
        }
        let written = written();
        let mut store = self.lock();
        let groups: Vec<i64> = match &written {
            Written::Everything => store.groups.keys().copied().collect(),
            Written::Ranges(ranges) => {
                let mut touched = Vec::new();
                for range in ranges {
                    store.groups_overlapping(range, &mut touched);
                }
                touched
            }
        };
        for id in groups {
            store.changed(id, revision, &self.stats);
        }
        self.publish(&store);
    }

    /// A write changed keys at a revision the proxy could not read: nothing cached is proven
    /// fresh, and every answer and watch goes.
    pub fn forget_everything(&self) {
        let mut store = self.lock();
        self.forgotten.fetch_add(1, Ordering::SeqCst);
        store.watchers.clear();
        let groups: Vec<i64> = store.groups.keys().copied().collect();
        for id in groups {
            store.drop_group(id, &self.stats);
        }
        self.publish(&store);
    }

    /// The watch `group` of `user` reported a change at `revision`.
    pub fn changed(&self, group: i64, revision: i64) {
        let mut store = self.lock();
        store.changed(group, revision, &self.stats);
        self.publish(&store);
    }

    /// etcd ended the watch of `group` (compacted); its answers go. A refused permission or
    /// token ends the whole stream instead (see `forget_user`).
    pub fn watch_ended(&self, group: i64) {
        let mut store = self.lock();
        store.drop_group(group, &self.stats);
        self.publish(&store);
    }

    /// The watch stream `generation` of `user` ended: every answer it kept fresh goes.
    pub fn forget_user(&self, user: &User, generation: u64) {
        let mut store = self.lock();
        if store.watchers.get(user).is_none_or(|watcher| watcher.generation != generation) {
            return;
        }
        store.watchers.remove(user);
        let groups: Vec<i64> = store.groups.iter().filter(|(_, g)| &g.user == user).map(|(id, _)| *id).collect();
        for id in groups {
            store.drop_group(id, &self.stats);
        }
        self.publish(&store);
    }

    /// Publishes the store's size; an empty store lets writes skip the cache (see `written`).
    fn publish(&self, store: &Store<T>) {
        self.stats.bytes.store(store.bytes as u64, Ordering::Relaxed);
        if store.groups.is_empty() {
            self.occupied.store(false, Ordering::SeqCst);
        }
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

impl<T> Store<T> {
    fn create_group(
        &mut self,
        user: User,
        range: KeyRange,
        watch_start: i64,
        stats: &CacheStats,
    ) -> (i64, Option<NewWatcher>) {
        let id = self.next_group;
        self.next_group += 1;
        let cost = GROUP_OVERHEAD + 2 * (range.key.len() + range.range_end.len());
        if range.is_single_key() {
            self.single_keys.entry(range.key.clone()).or_default().push(id);
        } else {
            self.range_groups.insert(id);
        }
        self.group_ids.insert((user.clone(), range.clone()), id);
        let create = WatchCommand::Create { id, range: range.clone(), start_revision: watch_start };
        self.groups.insert(
            id,
            Group {
                user: user.clone(),
                range,
                watch_start,
                last_change: 0,
                slots: Vec::new(),
                cost,
                queued_idle: false,
            },
        );
        self.bytes += cost;
        stats.watched_ranges.fetch_add(1, Ordering::Relaxed);
        let new_watcher = match self.watchers.get_mut(&user) {
            Some(watcher) if watcher.commands.send(create.clone()).is_ok() => {
                watcher.groups += 1;
                None
            }
            _ => {
                // No stream for this user, or its task is gone (its groups go with it when it
                // reports; these are dropped now so that the new stream starts clean).
                let stale: Vec<i64> =
                    self.groups.iter().filter(|(g, group)| **g != id && group.user == user).map(|(g, _)| *g).collect();
                for group in stale {
                    self.drop_group(group, stats);
                }
                let (commands, receiver) = unbounded_channel();
                let generation = self.next_generation;
                self.next_generation += 1;
                let _ = commands.send(create);
                self.watchers.insert(user.clone(), Watcher { commands, generation, groups: 1 });
                Some(NewWatcher { user, generation, commands: receiver })
            }
        };
        (id, new_watcher)
    }

    fn add_entry(&mut self, entry: Entry<T>, stats: &CacheStats) {
        let cost = entry.cost;
        let group = entry.group;
        let request = entry.request.clone();
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot].entry = Some(entry);
                slot
            }
            None => {
                self.slots.push(Slot { entry: Some(entry), prev: NIL, next: NIL });
                self.slots.len() - 1
            }
        };
        self.link_front(slot);
        self.by_request.entry(request).or_default().push(slot);
        if let Some(group) = self.groups.get_mut(&group) {
            group.slots.push(slot);
        }
        self.bytes += cost;
        stats.entries.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes the answer in `slot`; its group becomes idle when it was the last one.
    fn remove_slot(&mut self, slot: usize, stats: &CacheStats) {
        let Some(entry) = self.slots[slot].entry.take() else { return };
        self.unlink(slot);
        self.free.push(slot);
        self.bytes -= entry.cost;
        stats.entries.fetch_sub(1, Ordering::Relaxed);
        if let Some(slots) = self.by_request.get_mut(&entry.request) {
            slots.retain(|&s| s != slot);
            if slots.is_empty() {
                self.by_request.remove(&entry.request);
            }
        }
        if let Some(group) = self.groups.get_mut(&entry.group) {
            group.slots.retain(|&s| s != slot);
            if group.slots.is_empty() && !group.queued_idle {
                group.queued_idle = true;
                self.idle_groups.push_back(entry.group);
                if self.idle_groups.len() > IDLE_GROUPS_KEPT {
                    self.drop_oldest_idle_group(stats);
                }
            }
        }
    }

    fn drop_oldest_idle_group(&mut self, stats: &CacheStats) -> bool {
        while let Some(id) = self.idle_groups.pop_front() {
            let Some(group) = self.groups.get_mut(&id) else { continue };
            group.queued_idle = false;
            // Groups that got answers again since they went idle stay.
            if group.slots.is_empty() {
                self.drop_group(id, stats);
                return true;
            }
        }
        false
    }

    /// Drops a watched range, its answers and its watch.
    fn drop_group(&mut self, id: i64, stats: &CacheStats) {
        let Some(group) = self.groups.get(&id) else { return };
        let slots = group.slots.clone();
        for slot in slots {
            stats.invalidations.fetch_add(1, Ordering::Relaxed);
            self.remove_slot(slot, stats);
        }
        let Some(group) = self.groups.remove(&id) else { return };
        self.bytes -= group.cost;
        stats.watched_ranges.fetch_sub(1, Ordering::Relaxed);
        self.group_ids.remove(&(group.user.clone(), group.range.clone()));
        if group.range.is_single_key() {
            if let Some(ids) = self.single_keys.get_mut(&group.range.key) {
                ids.retain(|&g| g != id);
                if ids.is_empty() {
                    self.single_keys.remove(&group.range.key);
                }
            }
        } else {
            self.range_groups.remove(&id);
        }
        if let Some(watcher) = self.watchers.get_mut(&group.user) {
            watcher.groups -= 1;
            match watcher.groups {
                // Closing the channel ends the user's stream, which cancels its watches at etcd.
                0 => drop(self.watchers.remove(&group.user)),
                _ => drop(watcher.commands.send(WatchCommand::Cancel { id })),
            }
        }
    }

    /// Keys of `id` changed at `revision`: its older answers go, and none older is stored.
    fn changed(&mut self, id: i64, revision: i64, stats: &CacheStats) {
        let Some(group) = self.groups.get_mut(&id) else { return };
        group.last_change = group.last_change.max(revision);
        let stale: Vec<usize> = group
            .slots
            .iter()
            .copied()
            .filter(|&slot| self.slots[slot].entry.as_ref().is_some_and(|e| e.revision < revision))
            .collect();
        for slot in stale {
            stats.invalidations.fetch_add(1, Ordering::Relaxed);
            self.remove_slot(slot, stats);
        }
    }

    fn groups_overlapping(&self, range: &KeyRange, out: &mut Vec<i64>) {
        match range.end_bound() {
            // An end before the key names no key (etcd accepts it, and changes nothing).
            Some(end) if end <= range.key => return,
            Some(end) => {
                for (_, ids) in self.single_keys.range::<[u8], _>((
                    std::ops::Bound::Included(range.key.as_ref()),
                    std::ops::Bound::Excluded(end.as_ref()),
                )) {
                    out.extend_from_slice(ids);
                }
            }
            None => {
                for (_, ids) in self
                    .single_keys
                    .range::<[u8], _>((std::ops::Bound::Included(range.key.as_ref()), std::ops::Bound::Unbounded))
                {
                    out.extend_from_slice(ids);
                }
            }
        }
        out.extend(self.range_groups.iter().copied().filter(|id| self.groups[id].range.overlaps(range)));
    }

    /// Drops idle groups (they hold no answer), then least recently used answers, until under
    /// `limit`; returns the number of answers evicted.
    fn evict_to(&mut self, limit: usize, stats: &CacheStats) -> u64 {
        let mut evicted = 0;
        while self.bytes > limit {
            if self.drop_oldest_idle_group(stats) {
                continue;
            }
            if self.tail == NIL {
                break;
            }
            let slot = self.tail;
            self.remove_slot(slot, stats);
            evicted += 1;
        }
        evicted
    }

    fn link_front(&mut self, slot: usize) {
        self.slots[slot].prev = NIL;
        self.slots[slot].next = self.head;
        if self.head != NIL {
            self.slots[self.head].prev = slot;
        }
        self.head = slot;
        if self.tail == NIL {
            self.tail = slot;
        }
    }

    fn unlink(&mut self, slot: usize) {
        let (prev, next) = (self.slots[slot].prev, self.slots[slot].next);
        match prev {
            NIL => self.head = next,
            prev => self.slots[prev].next = next,
        }
        match next {
            NIL => self.tail = prev,
            next => self.slots[next].prev = prev,
        }
        self.slots[slot].prev = NIL;
        self.slots[slot].next = NIL;
    }

    fn touch(&mut self, slot: usize) {
        if self.head != slot {
            self.unlink(slot);
            self.link_front(slot);
        }
    }
}

#[cfg(test)]
mod tests;
