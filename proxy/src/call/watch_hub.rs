//! Watch coalescing: client watches that ask for the same thing (key, range end, filters,
//! `prev_kv`, `progress_notify`) as the same etcd user share one upstream watch, so that etcd
//! sends each event once however many clients watch it.
//!
//! A client's watch starts as a watch of its own, on its relay's upstream stream (see `watch`):
//! etcd checks its permission, answers `created` with its own header, and serves its start
//! revision, compaction cancel included, exactly as it would directly. Once created, the relay
//! subscribes it here. One exception, the common case of a fleet: without auth, a watch from now
//! on (or from a revision to come) joins its shared watch at once ([`WatchHub::join_now`]),
//! creating it if there is none, so that thousands of watches arriving together (a fleet
//! reconnecting) cost etcd one watch. The hub asks the shared stream for its progress, and the
//! client is told its watch exists from the revision etcd answers with, which is what etcd would
//! have told it at that moment; events up to that revision still on their way are skipped for
//! it. A shared watch that already delivered past that revision cannot take it, and the watch is
//! created on its own as any other. The shared watch runs on one upstream stream per user, itself a
//! relay (so it survives member loss and token expiry as any relayed stream does), and the hub
//! tells the subscriber from which revision on it will deliver every event ([`Delivery::Joinable`]);
//! the relay switches over as soon as its own watch has delivered that far, and cancels its own.
//! A client whose watches are all shared asks the shared stream for its progress too
//! ([`WatchHub::progress`]): the answer follows the events delivered before it, and the client's
//! stream opens none at etcd.
//!
//! A subscriber whose relay does not take its deliveries (its client is not reading) past a
//! bounded backlog is detached ([`Delivery::Detached`]): its relay goes back to a watch of its
//! own from its next undelivered revision, and the shared watch goes on for the others. When the
//! last subscriber leaves, the shared watch is cancelled; when a user's last one goes, its stream.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use etcd_compat_proto::etcdserverpb::{watch_request, WatchCreateRequest, WatchProgressRequest};

use crate::auth::Session;
use crate::grpc::{self, MessageReader};
use crate::transport::{self, mailbox, FeedSender, MailboxReceiver, MailboxSender, RequestBody};

use super::admission::{MemoryBudget, StreamLimits};
use super::attempts::Sender;
use super::client_queue::{self, QueueReceiver};
use super::watch::{self, read_facts};

/// The etcd user a shared watch runs as; `None`: no auth.
type User = Option<Arc<str>>;

/// What a shared watch is: its user and its create request with the start revision and the
/// watch id cleared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ShareKey {
    user: User,
    create: Bytes,
}

impl ShareKey {
    /// The key of `create` as `session`'s user; `None` for watches that are not shared
    /// (fragmented ones, whose split the proxy does not reassemble across members).
    pub(crate) fn of(session: Option<&Session>, create: &WatchCreateRequest) -> Option<ShareKey> {
        if create.fragment {
            return None;
        }
        let normalized = WatchCreateRequest { start_revision: 0, watch_id: 0, ..create.clone() };
        Some(ShareKey {
            user: session.map(|s| Arc::from(s.user())),
            create: Bytes::from(prost::Message::encode_to_vec(&normalized)),
        })
    }
}

/// What the hub sends a client's relay about one of its watches (by the client's watch id).
pub(crate) enum Delivery {
    /// From now on the shared watch delivers every event after revision `from`.
    Joinable { client_id: i64, from: i64 },
    /// Joined without a watch of its own (see [`WatchHub::join_now`]): `progress` is etcd's
    /// answer to a progress request on the shared stream, whose header answers the create, and
    /// every event after revision `from` will be delivered.
    JoinedNow { client_id: i64, progress: Bytes, from: i64 },
    /// Not joined after all: the watch is created on its own, as any other.
    NotJoined { client_id: i64 },
    /// A message of the shared watch, carrying the client's watch id.
    Message { client_id: i64, message: Bytes },
    /// The shared watch serves this watch no more (its relay fell behind, or the shared stream
    /// was lost): the relay watches on its own again from its next undelivered revision.
    Detached { client_id: i64 },
    /// etcd's answer to the client's progress request, asked on the shared stream (see
    /// [`WatchHub::progress`]), after every event of that stream delivered before it.
    Progress { answer: Bytes },
    /// The shared stream was lost before it answered the client's progress request.
    ProgressUnanswered,
}

/// A relay's mailbox, counted in bytes so that the hub knows when the relay is behind.
#[derive(Clone)]
pub(crate) struct Inbox {
    deliveries: MailboxSender<Delivery>,
    limit: usize,
    relay: u64,
}

/// The relay's end of its [`Inbox`].
pub(crate) struct InboxReceiver {
    deliveries: MailboxReceiver<Delivery>,
}

impl InboxReceiver {
    /// The next delivery, if one is waiting.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.deliveries.poll_next(cx)
    }

    /// The relay takes nothing for now, its client being behind: until it asks again, its
    /// watches may be detached sooner while the memory for answers is full.
    pub(crate) fn pause(&self) {
        self.deliveries.pause();
    }
}

impl Inbox {
    fn send(&self, delivery: Delivery) -> bool {
        let weight = match &delivery {
            Delivery::Message { message, .. } => message.len(),
            Delivery::Joinable { .. }
            | Delivery::JoinedNow { .. }
            | Delivery::NotJoined { .. }
            | Delivery::Detached { .. }
            | Delivery::Progress { .. }
            | Delivery::ProgressUnanswered => 0,
        };
        self.deliveries.send(delivery, weight)
    }

    /// Whether its relay is too far behind to stay on the shared watch: past its limit, or,
    /// while the memory for answers is full, past what may wait uncounted with the relay taking
    /// nothing (see `client_queue`). A relay that is taking is not detached for what it has not
    /// taken yet: a fleet's relays all hold the last large event for a moment.
    fn is_behind(&self, memory_full: bool) -> bool {
        let queued = self.deliveries.queued();
        queued > self.limit || (memory_full && queued > client_queue::UNCOUNTED && self.deliveries.is_reader_paused())
    }

    /// Identifies the relay this inbox belongs to.
    pub(crate) fn relay(&self) -> u64 {
        self.relay
    }

    /// Bytes past which the relay's watches are detached.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }
}

/// Counters of the hub, rendered in `/metrics`.
#[derive(Default)]
pub struct CoalescingStats {
    shared_watches: AtomicU64,
    subscribers: AtomicU64,
    detached: AtomicU64,
    /// Client watches joined to a shared watch without one of their own.
    joined_now: AtomicU64,
    /// Client watches, shared or not (kept by the relays).
    pub(crate) client_watches: AtomicU64,
    /// Watches of the relays' own upstream streams (kept by the relays).
    pub(crate) own_upstream_watches: AtomicU64,
}

impl crate::admin::RenderMetrics for CoalescingStats {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let upstream = self.shared_watches.load(Ordering::Relaxed) + self.own_upstream_watches.load(Ordering::Relaxed);
        let series: [(&str, &str, &str, u64); 6] = [
            ("watch_client_watches", "gauge", "Watches clients have open through the proxy.", self.client_watches.load(Ordering::Relaxed)),
            ("watch_upstream_watches", "gauge", "Watches the proxy has open at etcd: shared ones plus clients' own.", upstream),
            ("watch_shared_watches", "gauge", "Upstream watches shared by client watches that ask for the same thing as the same user.", self.shared_watches.load(Ordering::Relaxed)),
            ("watch_shared_subscribers", "gauge", "Client watches served by a shared upstream watch.", self.subscribers.load(Ordering::Relaxed)),
            ("watch_detached_total", "counter", "Client watches moved off a shared watch to one of their own because their client fell behind, or the shared stream was lost.", self.detached.load(Ordering::Relaxed)),
            ("watch_joined_at_once_total", "counter", "Client watches from now on joined to a shared watch without a watch of their own at etcd.", self.joined_now.load(Ordering::Relaxed)),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP etcd_compat_proxy_{name} {help}\n# TYPE etcd_compat_proxy_{name} {kind}");
            let _ = writeln!(out, "etcd_compat_proxy_{name} {value}");
        }
    }
}

/// Every shared watch of the process.
pub(crate) struct WatchHub {
    sender: Arc<Sender>,
    limits: StreamLimits,
    state: Mutex<HubState>,
    next_relay: AtomicU64,
    stats: Arc<CoalescingStats>,
}

#[derive(Default)]
struct HubState {
    shared: HashMap<ShareKey, SharedWatch>,
    by_id: HashMap<i64, ShareKey>,
    streams: HashMap<User, HubStream>,
    /// Upstream ids are chosen by the hub, never 0 (which asks etcd to pick one).
    next_id: i64,
    next_generation: u64,
}

/// A user's upstream stream of shared watches.
struct HubStream {
    requests: FeedSender,
    watches: usize,
    generation: u64,
    /// Watches joining at once, answered by the progress request in flight.
    asked: Vec<Joiner>,
    /// Watches joining at once that came after that request was sent: its answer may predate
    /// their create, so they wait for the next request, sent once it is answered. One request
    /// at a time keeps answers and requests paired: etcd 3.5.8 and later answer several pending
    /// progress requests once.
    waiting: Vec<Joiner>,
    /// Relays whose client asked for progress, answered by the request in flight.
    progress_asked: Vec<Inbox>,
    /// Relays whose client asked for progress after it was sent, as `waiting`.
    progress_waiting: Vec<Inbox>,
    /// A progress request is in flight (the stream's relay sends it again on a new stream).
    asking: bool,
    /// When the request in flight was sent.
    asked_at: Option<Instant>,
}

impl HubState {
    /// `user`'s stream `generation` ended: its subscribers watch on their own, and those waiting
    /// for its progress answer are told it will not come. Subscribers first: a relay re-creates
    /// its detached watches on its own stream before it asks there for the progress this stream
    /// did not answer, so that etcd's answer follows their events.
    fn stream_ended(&mut self, user: &User, generation: u64, stats: &CoalescingStats) {
        if self.streams.get(user).is_none_or(|stream| stream.generation != generation) {
            return;
        }
        let stream = self.streams.remove(user);
        let keys: Vec<ShareKey> = self.shared.keys().filter(|key| &key.user == user).cloned().collect();
        for key in keys {
            if let Some(shared) = self.shared.remove(&key) {
                self.by_id.remove(&shared.id);
                stats.shared_watches.fetch_sub(1, Ordering::Relaxed);
                detach_all(stats, shared.subscribers);
            }
        }
        if let Some(stream) = stream {
            stream.give_up_waiters();
        }
    }
}

/// Tells `subscribers` their shared watch no longer serves them.
fn detach_all(stats: &CoalescingStats, subscribers: Vec<Subscriber>) {
    for subscriber in subscribers {
        stats.subscribers.fetch_sub(1, Ordering::Relaxed);
        stats.detached.fetch_add(1, Ordering::Relaxed);
        subscriber.inbox.send(Delivery::Detached { client_id: subscriber.client_id });
    }
}

impl HubStream {
    fn new(requests: FeedSender, generation: u64) -> HubStream {
        HubStream {
            requests,
            watches: 0,
            generation,
            asked: Vec::new(),
            waiting: Vec::new(),
            progress_asked: Vec::new(),
            progress_waiting: Vec::new(),
            asking: false,
            asked_at: None,
        }
    }

    /// Whether the progress request in flight has gone unanswered as long as a watch waits to
    /// join (etcd 3.5.8 and later hold the answer while a watch of the stream catches up): new
    /// joiners are then created on their own at once. Progress requests still wait for it.
    fn answer_overdue(&self, now: Instant) -> bool {
        self.asking && self.asked_at.is_some_and(|at| now.saturating_duration_since(at) >= watch::JOIN_NOW_DEADLINE)
    }

    /// Sends a progress request for the waiting joiners and clients, unless one is in flight.
    fn ask_progress(&mut self) {
        if self.asking || (self.waiting.is_empty() && self.progress_waiting.is_empty()) {
            return;
        }
        self.asked.append(&mut self.waiting);
        self.progress_asked.append(&mut self.progress_waiting);
        let progress = watch_request::RequestUnion::ProgressRequest(WatchProgressRequest {});
        self.requests.send(watch::frame_request(progress));
        self.asking = true;
        self.asked_at = Some(Instant::now());
    }

    /// Tells the watches joining on a stream that is gone to watch on their own, and the
    /// clients waiting for its progress that it will not come from here.
    fn give_up_waiters(self) {
        for joiner in self.asked.into_iter().chain(self.waiting) {
            joiner.subscriber.inbox.send(Delivery::NotJoined { client_id: joiner.subscriber.client_id });
        }
        for inbox in self.progress_asked.into_iter().chain(self.progress_waiting) {
            inbox.send(Delivery::ProgressUnanswered);
        }
    }

    /// Forgets the progress request of `relay`'s client, which is gone: if etcd never answered,
    /// clients that ask and leave would otherwise pile up here.
    fn forget_progress(&mut self, relay: u64) {
        self.progress_asked.retain(|inbox| inbox.relay != relay);
        self.progress_waiting.retain(|inbox| inbox.relay != relay);
    }

    fn has_joiner_for(&self, key: &ShareKey) -> bool {
        self.asked.iter().chain(&self.waiting).any(|joiner| &joiner.key == key)
    }
}

/// A watch joining a shared one at once, with the start revision it asked for (0: now).
struct Joiner {
    key: ShareKey,
    start: i64,
    subscriber: Subscriber,
}

struct SharedWatch {
    id: i64,
    /// The revision it was created from (0: from now): its first subscriber's next one, or the
    /// start of the first watch joining it at once.
    start: i64,
    /// Every event after this revision is delivered; `None` until etcd created the watch.
    position: Option<i64>,
    subscribers: Vec<Subscriber>,
}

struct Subscriber {
    client_id: i64,
    inbox: Inbox,
}

impl WatchHub {
    /// The hub of the relays sending with `sender`.
    pub(crate) fn new(sender: Arc<Sender>, limits: StreamLimits) -> Arc<WatchHub> {
        Arc::new(WatchHub {
            sender,
            limits,
            state: Mutex::new(HubState { next_id: 1, ..HubState::default() }),
            next_relay: AtomicU64::new(1),
            stats: Arc::default(),
        })
    }

    /// The hub's counters, shared with the relays and `/metrics`.
    pub(crate) fn stats(&self) -> &Arc<CoalescingStats> {
        &self.stats
    }

    /// A mailbox for a new relay; deliveries past `limit` bytes detach its watches.
    pub(crate) fn inbox(&self, limit: usize) -> (Inbox, InboxReceiver) {
        let (deliveries, receiver) = mailbox();
        let relay = self.next_relay.fetch_add(1, Ordering::Relaxed);
        (Inbox { deliveries, limit, relay }, InboxReceiver { deliveries: receiver })
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // Every change completes before anything that could panic: a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Subscribes the client watch `client_id` (whose own watch has delivered everything before
    /// `next_revision`) to the shared watch `key`, created from `next_revision` if there is none.
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        key: &ShareKey,
        session: Option<&Arc<Session>>,
        create: &WatchCreateRequest,
        client_id: i64,
        next_revision: i64,
        inbox: &Inbox,
    ) {
        let mut state = self.lock();
        self.stats.subscribers.fetch_add(1, Ordering::Relaxed);
        let subscriber = Subscriber { client_id, inbox: inbox.clone() };
        let shared = self.shared_watch(&mut state, key, session, create, next_revision);
        if let Some(from) = shared.position {
            subscriber.inbox.send(Delivery::Joinable { client_id, from });
        }
        // Until etcd answers a new one, the subscriber keeps its own watch; `Joinable` follows
        // `created`.
        shared.subscribers.push(subscriber);
    }

    /// The shared watch `key`, created from `start` (0: now) on its user's stream if there is none.
    fn shared_watch<'a>(
        self: &Arc<Self>,
        state: &'a mut HubState,
        key: &ShareKey,
        session: Option<&Arc<Session>>,
        create: &WatchCreateRequest,
        start: i64,
    ) -> &'a mut SharedWatch {
        let HubState { shared, by_id, streams, next_id, next_generation } = state;
        let entry = match shared.entry(key.clone()) {
            Entry::Occupied(entry) => return entry.into_mut(),
            Entry::Vacant(entry) => entry,
        };
        let id = *next_id;
        *next_id += 1;
        let stream = streams.entry(key.user.clone()).or_insert_with(|| {
            let generation = *next_generation;
            *next_generation += 1;
            HubStream::new(self.open_stream(key.user.clone(), session.cloned(), generation), generation)
        });
        stream.watches += 1;
        let request = WatchCreateRequest { start_revision: start, watch_id: id, ..create.clone() };
        stream.requests.send(watch::frame_request(watch_request::RequestUnion::CreateRequest(request)));
        by_id.insert(id, key.clone());
        self.stats.shared_watches.fetch_add(1, Ordering::Relaxed);
        entry.insert(SharedWatch { id, start, position: None, subscribers: Vec::new() })
    }

    /// Joins the client watch `client_id`, which asks for events from now on (`start` 0) or from a
    /// revision to come, to the shared watch `key` without a watch of its own, creating that one
    /// if there is none: the shared stream is asked for its progress, and [`Delivery::JoinedNow`]
    /// follows with etcd's revision at that moment (or [`Delivery::NotJoined`]). A fleet's new
    /// watches then cost etcd and the proxy no stream each, even when they all come at once.
    pub(crate) fn join_now(
        self: &Arc<Self>,
        key: &ShareKey,
        create: &WatchCreateRequest,
        client_id: i64,
        inbox: &Inbox,
    ) {
        let mut state = self.lock();
        if state.streams.get(&key.user).is_some_and(|stream| stream.answer_overdue(Instant::now())) {
            // The watch would wait for that answer only to be created on its own after all: it
            // is created on its own at once, and joins once etcd has created it.
            inbox.send(Delivery::NotJoined { client_id });
            return;
        }
        self.shared_watch(&mut state, key, None, create, create.start_revision);
        let Some(stream) = state.streams.get_mut(&key.user) else { return };
        let subscriber = Subscriber { client_id, inbox: inbox.clone() };
        stream.waiting.push(Joiner { key: key.clone(), start: create.start_revision, subscriber });
        stream.ask_progress();
    }

    /// Asks the shared stream of `session`'s user for its progress for a client whose watches are
    /// all served by it; the answer comes as [`Delivery::Progress`] through `inbox`, after every
    /// event the stream delivered before it, as etcd orders a progress answer after its
    /// stream's events. False (nothing asked) when the user has no shared stream. An overdue
    /// answer is waited for too: etcd holds it while a watch of the stream catches up, and an
    /// answer from another stream could pass the events it still owes.
    pub(crate) fn progress(&self, session: Option<&Session>, inbox: &Inbox) -> bool {
        let user: User = session.map(|s| Arc::from(s.user()));
        let mut state = self.lock();
        let Some(stream) = state.streams.get_mut(&user) else { return false };
        stream.progress_waiting.push(inbox.clone());
        stream.ask_progress();
        true
    }

    /// Withdraws the progress request `relay` made through [`WatchHub::progress`] (its client left
    /// before the answer came).
    pub(crate) fn forget_progress(&self, relay: u64) {
        for stream in self.lock().streams.values_mut() {
            stream.forget_progress(relay);
        }
    }

    /// etcd answered the progress request of `user`'s stream with its revision `now`: a watch
    /// from now on starts after it, one from a later revision after the revision before that.
    /// A watch from an earlier revision (which might be compacted, or need events gone by), or
    /// whose shared watch already delivered past where it starts, is created on its own. Clients
    /// that asked for progress get the answer.
    fn progress_answered(&self, state: &mut HubState, user: &User, generation: u64, progress: &Bytes, now: i64) {
        let HubState { shared, streams, .. } = &mut *state;
        // An answer of a stream that was closed is not the answer to its successor's request.
        let Some(stream) = streams.get_mut(user).filter(|stream| stream.generation == generation) else { return };
        stream.asking = false;
        stream.asked_at = None;
        let mut not_joined = Vec::new();
        for joiner in std::mem::take(&mut stream.asked) {
            let client_id = joiner.subscriber.client_id;
            let Some(watch) = shared.get_mut(&joiner.key) else {
                joiner.subscriber.inbox.send(Delivery::NotJoined { client_id });
                continue;
            };
            let Some(position) = watch.position else {
                // etcd answered ahead of creating the shared watch: asked again.
                stream.waiting.push(joiner);
                continue;
            };
            let from = match joiner.start {
                0 => Some(now),
                start if start > now => Some(start - 1),
                _ => None,
            };
            match from {
                Some(from) if position <= from => {
                    let joined = Delivery::JoinedNow { client_id, progress: progress.clone(), from };
                    if joiner.subscriber.inbox.send(joined) {
                        self.stats.subscribers.fetch_add(1, Ordering::Relaxed);
                        self.stats.joined_now.fetch_add(1, Ordering::Relaxed);
                        watch.subscribers.push(joiner.subscriber);
                    }
                }
                _ => {
                    joiner.subscriber.inbox.send(Delivery::NotJoined { client_id });
                    not_joined.push(joiner.key);
                }
            }
        }
        for inbox in std::mem::take(&mut stream.progress_asked) {
            inbox.send(Delivery::Progress { answer: progress.clone() });
        }
        stream.ask_progress();
        for key in not_joined {
            self.cancel_if_unused(state, &key);
        }
    }

    /// Ends the subscription of `relay`'s watch `client_id` to `key`, or its wait to join it.
    pub(crate) fn unsubscribe(&self, key: &ShareKey, relay: u64, client_id: i64) {
        let mut state = self.lock();
        let is_it = |s: &Subscriber| s.inbox.relay == relay && s.client_id == client_id;
        if let Some(stream) = state.streams.get_mut(&key.user) {
            stream.asked.retain(|joiner| !is_it(&joiner.subscriber));
            stream.waiting.retain(|joiner| !is_it(&joiner.subscriber));
        }
        if let Some(shared) = state.shared.get_mut(key) {
            let before = shared.subscribers.len();
            shared.subscribers.retain(|s| !is_it(s));
            let removed = before - shared.subscribers.len();
            self.stats.subscribers.fetch_sub(removed as u64, Ordering::Relaxed);
        }
        self.cancel_if_unused(&mut state, key);
    }

    /// Cancels the shared watch `key` if no watch is served by it or waiting to join it.
    fn cancel_if_unused(&self, state: &mut HubState, key: &ShareKey) {
        let Some(shared) = state.shared.get(key) else { return };
        let joining = state.streams.get(&key.user).is_some_and(|stream| stream.has_joiner_for(key));
        if shared.subscribers.is_empty() && !joining {
            self.cancel_shared(state, key);
        }
    }

    /// Cancels the shared watch `key` at etcd and forgets it; ends its user's stream with the last.
    fn cancel_shared(&self, state: &mut HubState, key: &ShareKey) {
        let Some(shared) = state.shared.remove(key) else { return };
        state.by_id.remove(&shared.id);
        self.stats.shared_watches.fetch_sub(1, Ordering::Relaxed);
        let Some(stream) = state.streams.get_mut(&key.user) else { return };
        stream.watches -= 1;
        if stream.watches == 0 {
            // Closing the request side ends the stream at etcd, which ends its relay.
            if let Some(stream) = state.streams.remove(&key.user) {
                stream.give_up_waiters();
            }
        } else {
            stream.requests.send(watch::frame_cancel(shared.id));
        }
    }

    /// Starts `user`'s stream of shared watches: a relay whose client is the hub.
    fn open_stream(self: &Arc<Self>, user: User, session: Option<Arc<Session>>, generation: u64) -> FeedSender {
        let (requests, receiver) = transport::feed();
        // Uncounted: the hub takes each message at once, and counts what it fans out.
        let (to_hub, from_relay) = client_queue::channel(self.limits.max_buffered, client_queue::Watched::default());
        let headers = grpc::own_call_headers();
        let client = RequestBody::Channel(receiver);
        watch::spawn_shared_stream(Arc::clone(&self.sender), session, headers, client, to_hub, self.limits.messages);
        tokio::spawn(Arc::clone(self).dispatch(user, generation, from_relay));
        requests
    }

    /// Fans the messages of `user`'s stream out to the subscribers, until the stream ends.
    async fn dispatch(self: Arc<Self>, user: User, generation: u64, mut from_relay: QueueReceiver) {
        let mut messages = MessageReader::default();
        while let Some(frame) = std::future::poll_fn(|cx| from_relay.poll_next(cx)).await {
            let Ok(data) = frame.into_data() else { break };
            messages.push(&data);
            while let Some(message) = messages.next_message() {
                self.on_message(&user, generation, &message);
            }
        }
        tracing::debug!(
            user = user.as_deref().unwrap_or(""),
            "shared watch stream ended; its subscribers watch on their own"
        );
        self.lock().stream_ended(&user, generation, &self.stats);
    }

    fn detach_all(&self, subscribers: Vec<Subscriber>) {
        detach_all(&self.stats, subscribers);
    }

    /// One message of `user`'s shared stream `generation`.
    fn on_message(&self, user: &User, generation: u64, message: &Bytes) {
        let Some(Ok(facts)) = (message.first() == Some(&0)).then(|| read_facts(&message[5..])) else { return };
        let mut state = self.lock();
        if facts.watch_id == -1 && !facts.created && !facts.canceled {
            // Only the hub asks this stream for progress: for watches joining at once, and for
            // clients whose watches are all on it.
            self.progress_answered(&mut state, user, generation, message, facts.header_revision);
            return;
        }
        let Some(key) = state.by_id.get(&facts.watch_id).cloned() else { return };
        if facts.created && facts.canceled {
            // etcd refused it (compacted, or the user lost its permission): each subscriber
            // asks again on its own and gets etcd's answer.
            if let Some(shared) = state.shared.remove(&key) {
                state.by_id.remove(&shared.id);
                self.stats.shared_watches.fetch_sub(1, Ordering::Relaxed);
                if let Some(stream) = state.streams.get_mut(&key.user) {
                    stream.watches -= 1;
                }
                self.detach_all(shared.subscribers);
            }
            return;
        }
        let Some(shared) = state.shared.get_mut(&key) else { return };
        if facts.created {
            // Created from `start`, or from now (etcd's revision then): every event after the
            // revision before it will come.
            let from = match shared.start {
                0 => facts.header_revision,
                start => start - 1,
            };
            shared.position = Some(from);
            for subscriber in &shared.subscribers {
                subscriber.inbox.send(Delivery::Joinable { client_id: subscriber.client_id, from });
            }
            if let Some(stream) = state.streams.get_mut(&key.user) {
                // Watches joining it at once wait for a progress answer after its creation.
                stream.ask_progress();
            }
            return;
        }
        if facts.canceled {
            // Compacted while resuming after a member loss: each subscriber's watch ends the way
            // its own would have.
            let Some(shared) = state.shared.remove(&key) else { return };
            state.by_id.remove(&shared.id);
            self.stats.shared_watches.fetch_sub(1, Ordering::Relaxed);
            if let Some(stream) = state.streams.get_mut(&key.user) {
                stream.watches -= 1;
            }
            let mut rewritten = Rewritten::new(message, self.limits.queue.memory.as_ref());
            for subscriber in shared.subscribers {
                self.stats.subscribers.fetch_sub(1, Ordering::Relaxed);
                let message = rewritten.for_id(subscriber.client_id);
                subscriber.inbox.send(Delivery::Message { client_id: subscriber.client_id, message });
            }
            return;
        }
        if facts.events > 0 && !facts.fragment {
            shared.position = Some(shared.position.unwrap_or(0).max(facts.last_event_revision));
        } else if facts.events == 0 {
            shared.position = Some(shared.position.unwrap_or(0).max(facts.header_revision));
        }
        let memory = self.limits.queue.memory.as_ref();
        let memory_full = memory.is_some_and(|memory| memory.is_full());
        let mut rewritten = Rewritten::new(message, memory);
        let mut detached = Vec::new();
        shared.subscribers.retain(|subscriber| {
            if subscriber.inbox.is_behind(memory_full) {
                detached.push(Subscriber { client_id: subscriber.client_id, inbox: subscriber.inbox.clone() });
                return false;
            }
            let message = rewritten.for_id(subscriber.client_id);
            subscriber.inbox.send(Delivery::Message { client_id: subscriber.client_id, message })
        });
        let emptied = shared.subscribers.is_empty();
        if !detached.is_empty() {
            tracing::debug!(watches = detached.len(), "watch clients fell behind; moving them off the shared watch");
        }
        self.detach_all(detached);
        if emptied {
            self.cancel_shared(&mut state, &key);
        }
    }
}

/// A message with its watch id replaced per subscriber: most clients use the same id (0, their
/// stream's first watch), so each distinct id is written once, and counted once in the memory
/// for answers however many subscribers it waits for.
struct Rewritten<'a> {
    message: &'a Bytes,
    memory: Option<&'a Arc<MemoryBudget>>,
    last: Option<(i64, Bytes)>,
}

impl<'a> Rewritten<'a> {
    fn new(message: &'a Bytes, memory: Option<&'a Arc<MemoryBudget>>) -> Self {
        Rewritten { message, memory, last: None }
    }

    fn for_id(&mut self, id: i64) -> Bytes {
        match &self.last {
            Some((last, bytes)) if *last == id => bytes.clone(),
            _ => {
                let bytes = with_watch_id(self.message, id);
                let bytes = match self.memory {
                    Some(memory) => memory.counted(bytes),
                    None => bytes,
                };
                self.last = Some((id, bytes.clone()));
                bytes
            }
        }
    }
}

/// `framed` (a framed WatchResponse) with its watch id (field 2) set to `id`, every other field
/// as etcd wrote it, in etcd's order (the header first).
pub(crate) fn with_watch_id(framed: &Bytes, id: i64) -> Bytes {
    let message = &framed[5..];
    let mut out = Vec::with_capacity(framed.len() + 11);
    out.extend_from_slice(&[0; 5]);
    let mut written = false;
    for field in grpc::fields(message) {
        let Ok(field) = field else { return framed.clone() };
        if field.number == 2 {
            continue;
        }
        if field.number > 2 && !written {
            put_watch_id(&mut out, id);
            written = true;
        }
        out.extend_from_slice(&message[field.span]);
    }
    if !written {
        put_watch_id(&mut out, id);
    }
    let length = (out.len() - 5) as u32;
    out[1..5].copy_from_slice(&length.to_be_bytes());
    Bytes::from(out)
}

/// proto3 leaves a zero id out.
fn put_watch_id(out: &mut Vec<u8>, id: i64) {
    if id != 0 {
        out.push(0x10);
        grpc::put_varint(out, id as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_relay_still_taking_is_not_detached_while_the_memory_is_full() {
        let (deliveries, receiver) = mailbox();
        let inbox = Inbox { deliveries, limit: 4 << 20, relay: 1 };
        let mut receiver = InboxReceiver { deliveries: receiver };
        let message = Bytes::from(vec![0; client_queue::UNCOUNTED + 1]);
        assert!(inbox.send(Delivery::Message { client_id: 0, message }));
        assert!(!inbox.is_behind(false));
        assert!(!inbox.is_behind(true), "a relay that takes was detached for what it has not taken yet");
        receiver.pause();
        assert!(inbox.is_behind(true), "a relay that takes nothing stays while the memory is full");
        assert!(!inbox.is_behind(false), "detached under its limit with room in the memory");
        let waker = std::task::Waker::noop();
        assert!(receiver.poll_next(&mut Context::from_waker(waker)).is_ready());
        assert!(inbox.send(Delivery::Message { client_id: 0, message: Bytes::from(vec![0; 1 << 17]) }));
        assert!(!inbox.is_behind(true), "asking again ends the pause");
    }

    fn joiner(client_id: i64) -> Joiner {
        let create = WatchCreateRequest { key: Bytes::from_static(b"k"), ..Default::default() };
        let key = ShareKey::of(None, &create).expect("a shareable create");
        let inbox = Inbox { deliveries: mailbox().0, limit: usize::MAX, relay: 1 };
        Joiner { key, start: 0, subscriber: Subscriber { client_id, inbox } }
    }

    /// What reached an inbox so far, in order, as short descriptions.
    fn delivered(receiver: &mut MailboxReceiver<Delivery>) -> Vec<String> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut got = Vec::new();
        while let Poll::Ready(Some(delivery)) = receiver.poll_next(&mut cx) {
            got.push(match delivery {
                Delivery::NotJoined { client_id } => format!("not joined {client_id}"),
                Delivery::Detached { client_id } => format!("detached {client_id}"),
                Delivery::ProgressUnanswered => "progress unanswered".to_owned(),
                _ => "other".to_owned(),
            });
        }
        got
    }

    #[test]
    fn a_progress_request_unanswered_as_long_as_a_joiner_waits_is_overdue() {
        let mut stream = HubStream::new(transport::FeedSender::closed(), 0);
        stream.ask_progress();
        assert!(!stream.asking, "nothing to ask for without a joiner");
        stream.waiting.push(joiner(1));
        stream.ask_progress();
        let sent = stream.asked_at.expect("the request's time");
        assert!(stream.asking);
        assert!(!stream.answer_overdue(sent + watch::JOIN_NOW_DEADLINE - Duration::from_millis(1)));
        assert!(stream.answer_overdue(sent + watch::JOIN_NOW_DEADLINE));
        // A second joiner waits for the next request; the one in flight keeps its time.
        stream.waiting.push(joiner(2));
        stream.ask_progress();
        assert_eq!(stream.asked_at, Some(sent));
        assert_eq!((stream.asked.len(), stream.waiting.len()), (1, 1));
    }

    #[test]
    fn a_client_asking_for_progress_alone_gets_a_request_sent() {
        let mut stream = HubStream::new(transport::FeedSender::closed(), 0);
        stream.progress_waiting.push(joiner(1).subscriber.inbox);
        stream.ask_progress();
        assert!(stream.asking);
        assert_eq!((stream.progress_asked.len(), stream.progress_waiting.len()), (1, 0));
    }

    #[test]
    fn a_client_that_left_is_forgotten_by_the_progress_request() {
        let mut stream = HubStream::new(transport::FeedSender::closed(), 0);
        let other = |relay| Inbox { relay, ..joiner(1).subscriber.inbox };
        stream.progress_waiting.extend([other(1), other(2)]);
        stream.ask_progress();
        stream.progress_waiting.extend([other(2), other(3)]);
        stream.forget_progress(2);
        let relays = |inboxes: &[Inbox]| inboxes.iter().map(Inbox::relay).collect::<Vec<_>>();
        assert_eq!((relays(&stream.progress_asked), relays(&stream.progress_waiting)), (vec![1], vec![3]));
    }

    #[test]
    fn a_lost_stream_sends_its_joiners_and_progress_askers_elsewhere() {
        let (deliveries, mut receiver) = mailbox();
        let inbox = Inbox { deliveries, limit: usize::MAX, relay: 7 };
        let mut stream = HubStream::new(transport::FeedSender::closed(), 0);
        stream.progress_waiting.push(inbox.clone());
        stream.ask_progress();
        stream.waiting.push(Joiner { subscriber: Subscriber { client_id: 3, inbox: inbox.clone() }, ..joiner(3) });
        stream.progress_waiting.push(inbox);
        stream.give_up_waiters();
        assert_eq!(delivered(&mut receiver), ["not joined 3", "progress unanswered", "progress unanswered"]);
    }

    #[test]
    fn an_ended_stream_detaches_its_subscribers_before_it_gives_up_their_progress() {
        let (deliveries, mut receiver) = mailbox();
        let inbox = Inbox { deliveries, limit: usize::MAX, relay: 7 };
        let mut state = HubState::default();
        let key = joiner(0).key;
        let subscribers = vec![Subscriber { client_id: 0, inbox: inbox.clone() }];
        state.shared.insert(key.clone(), SharedWatch { id: 5, start: 0, position: Some(10), subscribers });
        state.by_id.insert(5, key);
        let mut stream = HubStream::new(transport::FeedSender::closed(), 3);
        stream.progress_waiting.push(inbox);
        stream.ask_progress();
        state.streams.insert(None, stream);
        let stats = CoalescingStats::default();
        // A stream that was replaced ends without touching its successor.
        state.stream_ended(&None, 2, &stats);
        assert_eq!((state.shared.len(), state.streams.len()), (1, 1));
        state.stream_ended(&None, 3, &stats);
        assert_eq!((state.shared.len(), state.by_id.len(), state.streams.len()), (0, 0, 0));
        // The relay re-creates watch 0 on a fresh stream of its own, then asks there.
        assert_eq!(delivered(&mut receiver), ["detached 0", "progress unanswered"]);
    }
}
