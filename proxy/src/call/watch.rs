//! Watch streams that outlive their upstream stream: its member lost, its token expired, or its
//! client behind.
//!
//! A client's Watch stream is relayed message by message, and etcd's answers go back as the
//! bytes etcd sent. Alongside, the relay keeps what it needs to re-create every watch elsewhere:
//! the create request and the next revision the client has not yet received. When the upstream
//! stream breaks (member lost) or etcd refuses a new watch because the stream's token expired,
//! the relay opens a new upstream stream (on a healthy member, with a renewed token) and
//! re-creates each watch there from that revision, with the same watch id. The client's stream
//! and ids stay as they were; no event is lost or repeated, and a revision compacted meanwhile
//! reaches the client as etcd's own compaction cancel.
//!
//! Watch ids stay equal upstream and downstream by construction: on the first upstream stream
//! etcd assigns them as it would directly, and on later streams the relay asks for each id
//! explicitly (etcd 3.4+ accepts a client-chosen `watch_id`), so etcd's bytes need no rewriting.
//!
//! The relay runs in a task of its own and takes etcd's messages as they come, whether or not
//! its client reads them: left in the member connection, they would hold up every other stream
//! on it. A client that falls `--max-buffered-response-bytes` behind has its upstream stream
//! paused (closed, which cancels its watches at etcd); once the client has read half of what is
//! held, the watches are re-created from the next revision not yet delivered, exactly as after
//! the loss of a member. The client misses nothing and holds at most that much of the proxy.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_compat_proto::etcdserverpb::{
    watch_request, ResponseHeader, WatchCancelRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use http::HeaderMap;
use http_body::{Body, Frame};
use hyper::body::Incoming;
use prost::Message;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::admin::Refusal;
use crate::auth::Session;
use crate::error::ProxyFailure;
use crate::etcd_errors;
use crate::grpc::{self, Code, MessageReader, WireValue};
use crate::transport::{self, FeedReceiver, FeedSender, RecvBody, RequestBody};

use super::admission::{ClientMessages, MessageLimits, Refused, StallTimer, StreamLimits};
use super::attempts::Sender;
use super::client_queue::{self, QueueSender};
use super::relay::{CallRecord, StreamHead, StreamStart};
use super::watch_hub::{Delivery, Inbox, InboxReceiver, ShareKey, WatchHub};

/// How long the relay keeps trying to find a member before ending the client's stream.
const RESUME_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between attempts when no member takes the stream.
const RESUME_BACKOFF: Duration = Duration::from_millis(250);
/// Opens an upstream Watch stream fed by a channel; resolves when etcd sends response headers.
type Opening = Pin<Box<dyn Future<Output = Result<OpenedStream, (Code, String)>> + Send>>;

/// An upstream Watch stream etcd accepted.
pub struct OpenedStream {
    /// etcd's response, whose body carries the watch responses.
    pub response: http::Response<RecvBody>,
    /// The member it is on, for logs.
    pub member: Arc<str>,
    /// The session token generation it was opened with.
    pub token_generation: Option<u64>,
}

enum Upstream {
    Opening(Opening),
    Open {
        body: RecvBody,
        member: Arc<str>,
    },
    /// Waiting before the next attempt to find a member.
    Backoff(Pin<Box<tokio::time::Sleep>>),
    /// The client fell behind; re-opened once it has read half of what is held for it.
    Paused,
    /// Every watch is served by a shared one: no stream is kept at etcd until the client asks
    /// for a watch again or one goes back to its own.
    Idle,
    /// The client's stream is ending.
    Closed,
}

/// Client messages waiting for etcd, at most: a client that keeps sending while etcd does not
/// read is not read either.
const MAX_QUEUED_REQUESTS: usize = 64 * 1024;

/// Serves one Watch call: the relay runs in its own task, and the client is answered once etcd
/// answered the first upstream stream (answering earlier would tell it the watch exists before
/// it does: clients that write right after `watch()` returns would miss their own first event).
/// Everything but the wait for that answer happens before the returned future is first polled,
/// so that the future a fleet's thousands of new streams each hold meanwhile stays small.
#[allow(clippy::too_many_arguments)]
pub(super) fn serve(
    sender: Arc<Sender>,
    hub: Option<&Arc<WatchHub>>,
    session: Option<Arc<Session>>,
    headers: Arc<HeaderMap>,
    client: Incoming,
    record: CallRecord,
    shutdown: CancellationToken,
    limits: StreamLimits,
) -> StreamStart {
    let (head, started) = oneshot::channel();
    let (to_client, from_relay) = client_queue::channel(limits.max_buffered, limits.queue.clone());
    let client = RequestBody::Streaming(client);
    // With a shared watch to join, a stream opens none at etcd until its client asks for a
    // watch that needs one (see `WatchRelay::join_now`).
    let open_now = hub.is_none() || session.is_some();
    let mut relay = WatchRelay::new(sender, session, headers, client, to_client, head, limits.messages);
    // A client's messages count in the memory for requests; the hub's own do not.
    relay.client_messages = ClientMessages::new(limits.messages.max_message, Some(Arc::clone(&limits.memory)));
    if open_now {
        relay.open_first();
    }
    if let Some(hub) = hub {
        let (inbox, deliveries) = hub.inbox(limits.max_buffered);
        relay.coalescing = Some(Coalescing { hub: Arc::clone(hub), inbox, deliveries, counted: (0, 0) });
    }
    tokio::spawn(relay);
    StreamStart::new(started, from_relay, record, shutdown, "watch")
}

/// Runs the upstream stream of a user's shared watches (see `watch_hub`): a relay whose client
/// is the hub, so that shared watches survive member loss and token expiry as any other.
pub(super) fn spawn_shared_stream(
    sender: Arc<Sender>,
    session: Option<Arc<Session>>,
    headers: HeaderMap,
    requests: RequestBody,
    to_hub: QueueSender,
    limits: MessageLimits,
) {
    let (head, _) = oneshot::channel();
    let mut relay = WatchRelay::new(sender, session, Arc::new(headers), requests, to_hub, head, limits);
    relay.open_first();
    relay.shared_stream = true;
    tokio::spawn(relay);
}

/// A relay's link to the hub of shared watches.
struct Coalescing {
    hub: Arc<WatchHub>,
    inbox: Inbox,
    deliveries: InboxReceiver,
    /// What this relay added to the hub's gauges: (client watches, own upstream watches).
    counted: (u64, u64),
}

/// A watch the client has been told exists.
struct ActiveWatch {
    create: WatchCreateRequest,
    /// The first revision the client has not received (0 until known).
    next_revision: i64,
    /// Whether its events come from its own upstream watch or a shared one.
    sharing: Sharing,
}

/// A relay's watches by client id, in id order. A sorted vector rather than a `BTreeMap`, whose
/// first node has room for eleven: a stream holds one watch or a few, and a fleet many streams.
#[derive(Default)]
struct Watches(Vec<(i64, ActiveWatch)>);

impl Watches {
    fn find(&self, id: i64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&id, |(key, _)| *key)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn contains_key(&self, id: &i64) -> bool {
        self.find(*id).is_ok()
    }

    fn get(&self, id: &i64) -> Option<&ActiveWatch> {
        self.find(*id).ok().map(|at| &self.0[at].1)
    }

    fn get_mut(&mut self, id: &i64) -> Option<&mut ActiveWatch> {
        self.find(*id).ok().map(|at| &mut self.0[at].1)
    }

    fn insert(&mut self, id: i64, watch: ActiveWatch) {
        match self.find(id) {
            Ok(at) => self.0[at].1 = watch,
            Err(at) => {
                if self.0.len() == self.0.capacity() {
                    // Grows 1, 2, 4, ... rather than starting at four.
                    self.0.reserve_exact(self.0.len().max(1));
                }
                self.0.insert(at, (id, watch));
            }
        }
    }

    fn remove(&mut self, id: &i64) -> Option<ActiveWatch> {
        self.find(*id).ok().map(|at| self.0.remove(at).1)
    }

    fn iter(&self) -> impl Iterator<Item = (&i64, &ActiveWatch)> {
        self.0.iter().map(|(id, watch)| (id, watch))
    }

    fn values(&self) -> impl Iterator<Item = &ActiveWatch> {
        self.0.iter().map(|(_, watch)| watch)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut ActiveWatch> {
        self.0.iter_mut().map(|(_, watch)| watch)
    }

    /// A progress answer for the relay's own upstream stream: every watch on it has seen up to
    /// `revision`. A shared watch is not on it: the events the hub still holds for it may be
    /// older, and a watch moved to its own stream resumes from its next revision.
    fn progressed_on_stream(&mut self, revision: i64) {
        for watch in self.values_mut().filter(|watch| !matches!(watch.sharing, Sharing::Shared { .. })) {
            watch.next_revision = watch.next_revision.max(revision + 1);
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&i64, &mut ActiveWatch) -> bool) {
        self.0.retain_mut(|(id, watch)| keep(id, watch));
    }
}

impl<'a> IntoIterator for &'a Watches {
    type Item = (&'a i64, &'a ActiveWatch);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (i64, ActiveWatch)>, fn(&'a (i64, ActiveWatch)) -> Self::Item>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(id, watch)| (id, watch))
    }
}

/// Where a watch's events come from (see `watch_hub`).
enum Sharing {
    /// Its own upstream watch.
    Own,
    /// Its own watch, while subscribed to a shared one: it switches once its own has delivered
    /// up to `from` (once known); the shared watch's messages wait in `held` until then.
    Joining { key: ShareKey, from: Option<i64>, held: HeldShared },
    /// The shared watch; events up to `skip_through` came from its own before the switch.
    Shared { key: ShareKey, skip_through: i64 },
}

impl Sharing {
    fn key(&self) -> Option<&ShareKey> {
        match self {
            Sharing::Own => None,
            Sharing::Joining { key, .. } | Sharing::Shared { key, .. } => Some(key),
        }
    }
}

/// A joining watch's messages of the shared watch, counted in the relay's total of them too:
/// however they go (delivered, or dropped with the watch or its joining), the total drops with
/// them, so that it bounds what all of a client's joining watches hold together.
struct HeldShared {
    messages: VecDeque<Bytes>,
    bytes: usize,
    total: Arc<AtomicUsize>,
}

impl HeldShared {
    fn new(total: &Arc<AtomicUsize>) -> Self {
        HeldShared { messages: VecDeque::new(), bytes: 0, total: Arc::clone(total) }
    }

    fn push(&mut self, message: Bytes) {
        self.bytes += message.len();
        self.total.fetch_add(message.len(), Ordering::Relaxed);
        self.messages.push_back(message);
    }

    /// The messages, in order, no longer counted.
    fn take(&mut self) -> VecDeque<Bytes> {
        self.total.fetch_sub(std::mem::take(&mut self.bytes), Ordering::Relaxed);
        std::mem::take(&mut self.messages)
    }
}

impl Drop for HeldShared {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A create sent upstream whose `created` answer has not arrived.
struct PendingCreate {
    create: WatchCreateRequest,
    /// A re-creation of a watch the client already has: etcd's `created` is not forwarded.
    recreation: bool,
    /// Already sent again once with a renewed token.
    token_renewed: bool,
}

/// Facts read from one WatchResponse without decoding it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ResponseFacts {
    pub(crate) watch_id: i64,
    pub(crate) created: bool,
    pub(crate) canceled: bool,
    pub(crate) cancel_reason: String,
    pub(crate) fragment: bool,
    pub(crate) header_revision: i64,
    pub(crate) events: usize,
    pub(crate) last_event_revision: i64,
}

/// Relays one client Watch stream, in a task of its own.
struct WatchRelay {
    sender: Arc<Sender>,
    session: Option<Arc<Session>>,
    /// The client's request headers, for each upstream stream; shared by a fleet's streams.
    headers: Arc<HeaderMap>,
    client: Option<RequestBody>,
    client_messages: ClientMessages,
    /// Ends the stream if the client's incomplete message does not grow in time.
    stall: StallTimer,
    upstream: Upstream,
    upstream_messages: MessageReader,
    to_upstream: FeedSender,
    /// Token generation the current upstream stream was opened with.
    token_generation: Option<u64>,
    watches: Watches,
    pending: VecDeque<PendingCreate>,
    /// Cancels and progress requests the client sent between two upstream streams.
    held: Vec<Bytes>,
    /// Bytes of all requests the client sent between two upstream streams.
    held_bytes: usize,
    /// The id etcd would give the next watch created without one, as on one etcd stream.
    next_auto_id: i64,
    /// Set once the watches live on a stream other than the first: creates then carry their ids.
    moved: bool,
    /// Frames for the client, in order; counted so that the relay knows when it is behind.
    to_client: QueueSender,
    /// Taken when the client is answered: etcd's headers, or a status.
    head: Option<oneshot::Sender<StreamHead>>,
    finished: bool,
    /// When the current search for a member began.
    resuming_since: Option<Instant>,
    /// The hub of shared watches, unless coalescing is off or this relay is the hub's.
    coalescing: Option<Coalescing>,
    /// Own watches cancelled on switching to a shared one: etcd's confirmation is not the client's.
    own_cancels: Vec<i64>,
    /// The latest `created` answer from etcd, whose header answers a cancel the proxy makes itself.
    latest: Option<Bytes>,
    /// Watches were added, removed or switched since the gauges were last updated.
    recount: bool,
    /// A watch waiting for the hub to join it to a shared one at once; the client's next
    /// requests wait meanwhile, so that `created` answers keep the order of the creates.
    joining_now: Option<Box<JoiningNow>>,
    /// Watches whose last message from their own upstream watch was a fragment, not the last
    /// one: the stream is not paused before it, since the watch, re-created from its next
    /// revision, would be sent that revision's fragments again, and the client would see their
    /// events twice.
    mid_fragment: Vec<i64>,
    /// Bytes of shared messages all joining watches hold (see [`HeldShared`]).
    joining_held: Arc<AtomicUsize>,
    /// The client's progress request the hub holds (see `progress_through_hub`).
    hub_progress: HubProgress,
    /// A join was answered: the requests that waited for it are handled next.
    resume_client: bool,
    /// The hub's own stream of shared watches, whose progress answers the hub asked for.
    shared_stream: bool,
    /// On the hub's stream: its progress request is unanswered, and is sent again on a new
    /// stream (the hub sends the next one only once this one is answered).
    progress_unanswered: bool,
}

/// The relay's task. A future of its own rather than an async fn, which would hold the relay
/// twice: a fleet keeps thousands.
impl Future for WatchRelay {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.poll_run(cx)
    }
}

/// The request headers of the latest Watch stream: a fleet's clients send the same ones, which
/// each relay then shares instead of holding its own copy for as long as the stream lives.
#[derive(Default)]
pub(super) struct RecentHeaders(Mutex<Option<Arc<HeaderMap>>>);

impl RecentHeaders {
    /// `headers`, shared with earlier streams that sent the same.
    pub(super) fn share(&self, headers: HeaderMap) -> Arc<HeaderMap> {
        // Nothing can panic while it is held: a poisoned lock is usable.
        let mut recent = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match recent.as_ref() {
            Some(same) if **same == headers => Arc::clone(same),
            _ => Arc::clone(recent.insert(Arc::new(headers))),
        }
    }
}

/// A create the hub is joining to a shared watch without a watch of its own.
struct JoiningNow {
    id: i64,
    create: WatchCreateRequest,
    key: ShareKey,
    /// Past it the watch is created on its own: the hub's progress request may have been lost
    /// with its member.
    deadline: Pin<Box<tokio::time::Sleep>>,
}

/// How long a watch waits to join a shared one at once; etcd answers within a round trip.
pub(super) const JOIN_NOW_DEADLINE: Duration = Duration::from_secs(2);

/// Where a client's progress request given to the hub stands.
enum HubProgress {
    /// The hub holds none.
    None,
    /// The client's next requests wait for the answer, as they wait for a joining watch (one
    /// request at a time keeps what the hub holds for a client bounded), until the deadline.
    Blocking(Pin<Box<tokio::time::Sleep>>),
    /// Past the deadline: the client's next requests are read meanwhile.
    Overdue,
}

impl HubProgress {
    fn blocks_client(&self) -> bool {
        matches!(self, HubProgress::Blocking(_))
    }
}

impl WatchRelay {
    fn new(
        sender: Arc<Sender>,
        session: Option<Arc<Session>>,
        headers: Arc<HeaderMap>,
        client: RequestBody,
        to_client: QueueSender,
        head: oneshot::Sender<StreamHead>,
        limits: MessageLimits,
    ) -> WatchRelay {
        WatchRelay {
            sender,
            session,
            headers,
            client: Some(client),
            client_messages: ClientMessages::new(limits.max_message, None),
            stall: StallTimer::new(limits.stall_timeout),
            upstream: Upstream::Idle,
            upstream_messages: MessageReader::default(),
            to_upstream: FeedSender::closed(),
            token_generation: None,
            watches: Watches::default(),
            pending: VecDeque::new(),
            held: Vec::new(),
            held_bytes: 0,
            next_auto_id: 0,
            moved: false,
            to_client,
            head: Some(head),
            finished: false,
            resuming_since: None,
            coalescing: None,
            own_cancels: Vec::new(),
            latest: None,
            recount: false,
            joining_now: None,
            mid_fragment: Vec::new(),
            joining_held: Arc::default(),
            hub_progress: HubProgress::None,
            resume_client: false,
            shared_stream: false,
            progress_unanswered: false,
        }
    }

    /// Opens the stream's first upstream stream, before any request, as a client's stream to
    /// etcd is opened.
    fn open_first(&mut self) {
        let (to_upstream, receiver) = transport::feed();
        self.to_upstream = to_upstream;
        let opening =
            open(Arc::clone(&self.sender), self.session.clone(), HeaderMap::clone(&self.headers), receiver, None);
        self.upstream = Upstream::Opening(opening);
    }

    /// Relays until the stream is over or the client is gone (which drops the upstream stream
    /// and so cancels the watches at etcd).
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.finished || self.to_client.is_closed() {
                return Poll::Ready(());
            }
            let client = self.poll_client(cx);
            let stalled = self.poll_stall(cx) || self.poll_join_deadline(cx) || self.poll_progress_deadline(cx);
            let upstream = self.poll_upstream(cx);
            let shared = self.poll_deliveries(cx);
            if self.recount {
                self.update_gauges();
            }
            if !client && !stalled && !upstream && !shared {
                // Woken as well when the client goes away or, when paused, has caught up.
                let waiting = match self.upstream {
                    Upstream::Paused => self.to_client.poll_room(cx),
                    _ => self.to_client.poll_closed(cx),
                };
                if waiting.is_pending() {
                    return Poll::Pending;
                }
            }
        }
    }

    /// Sends the client a message from etcd, or of the proxy's; pauses the upstream stream if
    /// the client is now too far behind.
    fn deliver(&mut self, message: Bytes) {
        self.to_client.push(Frame::data(message));
        self.pause_if_behind();
    }

    /// Sends the client a message of a shared watch, counted by the hub once for all its
    /// subscribers.
    fn deliver_counted(&mut self, message: Bytes) {
        self.to_client.push_counted(Frame::data(message));
        self.pause_if_behind();
    }

    fn pause_if_behind(&mut self) {
        if self.to_client.is_full() && matches!(self.upstream, Upstream::Open { .. }) && self.mid_fragment.is_empty() {
            tracing::debug!(watches = self.watches.len(), "watch client is not reading; pausing its upstream stream");
            self.sender.metrics().stream_paused();
            self.upstream = Upstream::Paused;
            self.moved = true;
            self.to_upstream = FeedSender::closed();
            self.upstream_messages = MessageReader::default();
        }
    }

    /// Ends the client's stream with `trailers`: etcd's, or a status of the proxy's.
    fn end(&mut self, trailers: HeaderMap) {
        self.upstream = Upstream::Closed;
        match self.head.take() {
            Some(head) => {
                let _ = head.send(Err(trailers));
            }
            None => {
                self.to_client.push(Frame::trailers(trailers));
            }
        }
        self.finished = true;
    }

    /// Creates a watch on its own if the hub has not joined it in time; true if it did.
    fn poll_join_deadline(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(joining) = self.joining_now.as_mut() else { return false };
        if joining.deadline.as_mut().poll(cx).is_pending() {
            return false;
        }
        let Some(joining) = self.joining_now.take() else { return false };
        tracing::debug!(
            watch = joining.id,
            "no answer from the shared watch stream in time; creating the watch on its own"
        );
        if let Some(coalescing) = &self.coalescing {
            coalescing.hub.unsubscribe(&joining.key, coalescing.inbox.relay(), joining.id);
        }
        self.create_on_own(*joining);
        true
    }

    /// Reads the client's next requests again once the hub's progress answer is overdue; true
    /// if it did. The answer is still the client's when it comes: etcd (3.5.8 and later) holds
    /// it while a shared watch catches up, and an answer from elsewhere could pass shared events
    /// on their way.
    fn poll_progress_deadline(&mut self, cx: &mut Context<'_>) -> bool {
        let HubProgress::Blocking(deadline) = &mut self.hub_progress else { return false };
        if deadline.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.hub_progress = HubProgress::Overdue;
        self.resume_client = true;
        tracing::debug!(
            "progress answer from the shared watch stream overdue; reading the client's next requests meanwhile"
        );
        true
    }

    /// The client's progress request, which the hub will not answer (its shared watches left it),
    /// withdrawn from the hub and sent to etcd on the client's own stream, after the watches
    /// re-created there; the client's next requests are read after it.
    fn ask_progress_on_own_stream(&mut self) {
        if matches!(std::mem::replace(&mut self.hub_progress, HubProgress::None), HubProgress::None) {
            return;
        }
        if let Some(coalescing) = &self.coalescing {
            coalescing.hub.forget_progress(coalescing.inbox.relay());
        }
        self.resume_client = true;
        let progress = watch_request::RequestUnion::ProgressRequest(Default::default());
        self.on_client_request(frame_request(progress), false);
    }

    /// Ends the stream if the client's incomplete message stalled; true if it did.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> bool {
        if self.stall.poll_stalled(cx).is_pending() {
            return false;
        }
        let refused = Refused::stalled(self.stall.timeout());
        self.sender.metrics().refused(refused.why);
        let (code, message) = refused.failure.status();
        self.end(grpc::status_headers(code, &message));
        true
    }

    /// Reads the client's requests; true if anything happened.
    fn poll_client(&mut self, cx: &mut Context<'_>) -> bool {
        if self.joining_now.is_some() || self.hub_progress.blocks_client() {
            // Woken by the hub's answer, through the inbox.
            return false;
        }
        if self.resume_client {
            // Requests read while a watch was joining waited in the reader, in order.
            self.resume_client = false;
            self.handle_client_messages();
            return true;
        }
        if self.to_client.is_full() {
            // Answers the proxy makes itself (created, cancelled) would pile up for a client
            // that sends without reading; etcd too stops reading such a client.
            let _ = self.to_client.poll_room(cx);
            self.stall.pause();
            return false;
        }
        let Some(client) = self.client.as_mut() else { return false };
        // Requests etcd has not taken yet are bounded: nothing more is read until they leave
        // (the feed wakes the relay) or, between streams, until the next stream takes them.
        if self.held_bytes >= MAX_QUEUED_REQUESTS || self.to_upstream.poll_room(cx, MAX_QUEUED_REQUESTS).is_pending() {
            self.stall.pause();
            return false;
        }
        self.stall.resume();
        match Pin::new(client).poll_frame(cx) {
            Poll::Pending => false,
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    self.client_messages.reader().push(&data);
                    self.handle_client_messages();
                }
                true
            }
            Poll::Ready(Some(Err(_)) | None) => {
                // Closing the upstream request side makes etcd end the stream, as it would directly.
                self.client = None;
                self.stall.restart(false);
                self.to_upstream = FeedSender::closed();
                if matches!(self.upstream, Upstream::Idle) {
                    // No stream at etcd to end it: ended as etcd ends it.
                    self.end(grpc::status_headers(Code::Ok, ""));
                }
                true
            }
        }
    }

    /// Handles the client's complete requests in order; those after a create that is joining a
    /// shared watch wait for the hub's answer, so that `created` answers keep the creates' order.
    fn handle_client_messages(&mut self) {
        while self.joining_now.is_none() && !self.hub_progress.blocks_client() && !self.finished {
            if let Some(claimed) = self.client_messages.reader().oversize() {
                // As etcd ends a stream that sends a message over its limit.
                self.sender.metrics().refused(Refusal::TooLarge);
                let limit = self.client_messages.reader().limit().unwrap_or(usize::MAX);
                let (code, message) = ProxyFailure::MessageTooLarge { claimed, limit }.status();
                self.end(grpc::status_headers(code, &message));
                return;
            }
            let Some(message) = self.client_messages.reader().next_message() else { break };
            self.on_client_message(message);
        }
        if let Err(refused) = self.client_messages.recount() {
            self.sender.metrics().refused(refused.why);
            let (code, message) = refused.failure.status();
            self.end(grpc::status_headers(code, &message));
            return;
        }
        // Only an incomplete message read from the client can stall; waiting ones do not.
        self.stall.restart(
            !self.client_messages.is_empty() && self.joining_now.is_none() && !self.hub_progress.blocks_client(),
        );
    }

    fn on_client_message(&mut self, message: Bytes) {
        self.on_client_request(message, true);
    }

    /// One client request. `from_client`: as the client sent it, rather than the relay's own
    /// fallback for what the hub did not do; a create asking for events from now on may then
    /// join a shared watch at once, and a progress request go to the hub.
    fn on_client_request(&mut self, message: Bytes, from_client: bool) {
        let request = grpc::decode_framed::<WatchRequest>(&message);
        let request = match request {
            Some(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) })
                if from_client =>
            {
                match self.join_now(create) {
                    Ok(()) => return,
                    Err(create) => {
                        Some(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) })
                    }
                }
            }
            other => other,
        };
        if from_client
            && matches!(
                &request,
                Some(WatchRequest { request_union: Some(watch_request::RequestUnion::ProgressRequest(_)) })
            )
        {
            // Asked again before the hub's overdue answer came: that answer answers both, as etcd
            // 3.5.8 and later answer the progress requests made while a watch catches up once.
            if matches!(self.hub_progress, HubProgress::Overdue) || self.progress_through_hub() {
                return;
            }
        }
        // Between two upstream streams (paused, or waiting for a member) requests wait for the
        // next one: creates as pending creates, which every new stream gets, the rest after them.
        let idle = matches!(self.upstream, Upstream::Idle);
        let between_streams = idle || matches!(self.upstream, Upstream::Paused | Upstream::Backoff(_));
        let union = request.and_then(|r| r.request_union);
        match &union {
            Some(watch_request::RequestUnion::CancelRequest(cancel)) if self.leave_shared(cancel.watch_id) => return,
            // etcd never had a shared watch on this stream, and would take the id again.
            Some(watch_request::RequestUnion::CreateRequest(create))
                if create.watch_id != 0
                    && self
                        .watches
                        .get(&create.watch_id)
                        .is_some_and(|w| matches!(w.sharing, Sharing::Shared { .. })) =>
            {
                self.refuse_duplicate_id();
                return;
            }
            _ => {}
        }
        if self.shared_stream && matches!(union, Some(watch_request::RequestUnion::ProgressRequest(_))) {
            // Sent by `reopen` on the next stream if this one ends before answering.
            self.progress_unanswered = true;
            if between_streams {
                return;
            }
        }
        // Counted only once it is kept: what is answered here is not held.
        if between_streams {
            self.held_bytes += message.len();
        }
        let Some(watch_request::RequestUnion::CreateRequest(mut create)) = union else {
            // Cancels and progress requests carry ids that are the same upstream.
            match between_streams {
                true => self.held.push(message),
                false => self.to_upstream.send(message),
            }
            if idle {
                self.reopen(None);
            }
            return;
        };
        if between_streams {
            // Sent by the next stream, which gives it its id then (id 0 can only be had there).
        } else if self.moved && create.watch_id == 0 {
            // The new stream's own counter may differ from the one the client saw.
            create.watch_id = self.take_auto_id();
            self.to_upstream.send(encode_create(&create));
        } else {
            self.to_upstream.send(message);
        }
        self.pending.push_back(PendingCreate { create, recreation: false, token_renewed: false });
        if idle {
            self.reopen(None);
        }
    }

    /// Asks the hub for the client's progress when every watch of the client is shared and its
    /// stream has nothing at etcd: the answer then comes after the shared events delivered before
    /// it (etcd's own answer on a stream of the client's could pass them), and the client's
    /// stream opens none at etcd. True if the hub took the request. A client that is not reading
    /// is asked of etcd as before, where its stream's flow control holds it back.
    fn progress_through_hub(&mut self) -> bool {
        let eligible = matches!(self.upstream, Upstream::Idle)
            && !self.to_client.is_full()
            && !self.shared_stream
            && self.pending.is_empty()
            && self.held.is_empty()
            && self.joining_now.is_none()
            && !self.watches.is_empty()
            && self.watches.values().all(|watch| matches!(watch.sharing, Sharing::Shared { .. }));
        let Some(coalescing) = self.coalescing.as_ref().filter(|_| eligible) else { return false };
        if !coalescing.hub.progress(self.session.as_deref(), &coalescing.inbox) {
            return false;
        }
        self.hub_progress = HubProgress::Blocking(Box::pin(tokio::time::sleep(JOIN_NOW_DEADLINE)));
        true
    }

    /// The next id etcd would assign on the client's original stream (0 means "let etcd pick").
    fn take_auto_id(&mut self) -> i64 {
        while self.watches.contains_key(&self.next_auto_id) {
            self.next_auto_id = self.next_auto_id.wrapping_add(1);
        }
        let id = self.next_auto_id;
        self.next_auto_id = self.next_auto_id.wrapping_add(1);
        id
    }

    /// Drives the upstream stream; true if anything happened.
    fn poll_upstream(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.upstream {
            Upstream::Closed | Upstream::Idle => false,
            Upstream::Paused => match self.to_client.poll_room(cx) {
                Poll::Pending => false,
                Poll::Ready(()) => {
                    tracing::debug!(watches = self.watches.len(), "watch client caught up; resuming its watches");
                    self.reopen(None);
                    true
                }
            },
            Upstream::Backoff(sleep) => match sleep.as_mut().poll(cx) {
                Poll::Pending => false,
                Poll::Ready(()) => {
                    self.reopen(None);
                    true
                }
            },
            Upstream::Opening(opening) => match opening.as_mut().poll(cx) {
                Poll::Pending => false,
                Poll::Ready(Ok(OpenedStream { response, member, token_generation })) => {
                    self.token_generation = token_generation;
                    let (parts, body) = response.into_parts();
                    match Code::from_headers(&parts.headers) {
                        // A trailers-only answer: etcd refused the stream itself.
                        Some(code) if code != Code::Ok => self.on_upstream_end(Some(parts.headers)),
                        _ => {
                            if let Some(head) = self.head.take() {
                                let _ = head.send(Ok(parts.headers));
                            }
                            self.resuming_since = None;
                            self.upstream = Upstream::Open { body, member };
                        }
                    }
                    true
                }
                Poll::Ready(Err((code, message))) => {
                    self.retry_or_end(code, message);
                    true
                }
            },
            Upstream::Open { body, member } => match Pin::new(body).poll_frame(cx) {
                Poll::Pending => false,
                Poll::Ready(Some(Ok(frame))) => {
                    match frame.into_data() {
                        Ok(data) => {
                            self.upstream_messages.push(&data);
                            while let Some(message) = self.upstream_messages.next_message() {
                                self.on_upstream_message(message);
                                if !matches!(self.upstream, Upstream::Open { .. }) {
                                    // Paused or moved: the rest comes again from the new stream.
                                    break;
                                }
                            }
                        }
                        Err(frame) => self.on_upstream_end(frame.into_trailers().ok()),
                    }
                    true
                }
                Poll::Ready(Some(Err(error))) => {
                    tracing::warn!(%member, %error, watches = self.watches.len(), "upstream watch stream broke; re-creating its watches on another member");
                    self.reopen(None);
                    true
                }
                Poll::Ready(None) => {
                    self.on_upstream_end(None);
                    true
                }
            },
        }
    }

    fn on_upstream_message(&mut self, message: Bytes) {
        let facts = match message.first() {
            Some(0) => read_facts(&message[5..]).ok(),
            _ => None,
        };
        let Some(facts) = facts else {
            self.deliver(message);
            return;
        };
        if facts.created && self.coalescing.is_some() {
            // Copied (a slice would keep its whole receive buffer): its header answers a cancel the
            // proxy makes itself.
            self.latest = Some(Bytes::copy_from_slice(&message));
        }
        if facts.canceled && !facts.created {
            if let Some(at) = self.own_cancels.iter().position(|&id| id == facts.watch_id) {
                // The confirmation of an own watch cancelled on switching to a shared one.
                self.own_cancels.swap_remove(at);
                return;
            }
        }
        let shared =
            matches!(self.watches.get(&facts.watch_id), Some(ActiveWatch { sharing: Sharing::Shared { .. }, .. }));
        if shared && !facts.created {
            // Events of the own watch still in flight when it was cancelled: the shared watch
            // delivers them. (A refused create may carry any id.)
            return;
        }
        if facts.created {
            let Some(pending) = self.pending.pop_front() else {
                self.deliver(message);
                return;
            };
            if self.pending.is_empty() {
                // A stream asks for its watches once and then holds them for hours: the room
                // its creates took is given back.
                self.pending = VecDeque::new();
            }
            if facts.canceled {
                let token_refusal =
                    etcd_errors::WATCH_TOKEN_CANCEL_REASONS.iter().any(|reason| facts.cancel_reason.ends_with(reason));
                if token_refusal && self.session.is_some() && !pending.token_renewed {
                    // The stream's token expired: renew it and create the watch on a new stream.
                    self.pending.push_front(PendingCreate { token_renewed: true, ..pending });
                    self.reopen(self.token_generation);
                    return;
                }
                if !pending.recreation {
                    self.deliver(message);
                }
                return;
            }
            let next_revision = match pending.create.start_revision {
                0 => facts.header_revision + 1,
                start => start,
            };
            // etcd moves its counter past the ids it picks, never past those a client chose.
            if pending.create.watch_id == 0 && facts.watch_id >= self.next_auto_id {
                self.next_auto_id = facts.watch_id.wrapping_add(1);
            }
            let recreation = pending.recreation;
            let watch = ActiveWatch { create: pending.create, next_revision, sharing: Sharing::Own };
            self.watches.insert(facts.watch_id, watch);
            self.recount = true;
            if !recreation {
                self.deliver(message);
            }
            self.join_shared(facts.watch_id);
            return;
        }
        if facts.canceled {
            self.mid_fragment.retain(|&id| id != facts.watch_id);
            if let Some(watch) = self.watches.remove(&facts.watch_id) {
                self.recount = true;
                self.unsubscribe(facts.watch_id, &watch.sharing);
            }
        } else if facts.watch_id == -1 && self.shared_stream {
            // The answer to the hub's progress request, which times watches that join. It moves
            // no watch: etcd 3.4 and 3.5.1 answer at once, ahead of events still on their way.
            self.progress_unanswered = false;
        } else if facts.watch_id == -1 {
            self.watches.progressed_on_stream(facts.header_revision);
        } else if let Some(watch) = self.watches.get_mut(&facts.watch_id) {
            advance(watch, &facts);
            let listed = self.mid_fragment.iter().position(|&id| id == facts.watch_id);
            match (facts.fragment, listed) {
                (true, None) => self.mid_fragment.push(facts.watch_id),
                (false, Some(at)) => {
                    self.mid_fragment.swap_remove(at);
                }
                _ => {}
            }
        }
        self.deliver(message);
        if !facts.canceled && facts.watch_id != -1 {
            self.try_switch(facts.watch_id);
        }
    }

    /// etcd ended the stream: with a status worth passing on, or because it is going away.
    fn on_upstream_end(&mut self, trailers: Option<HeaderMap>) {
        let code = trailers.as_ref().and_then(Code::from_headers);
        let member_going_away = match code {
            None => true,
            Some(Code::Unavailable) => true,
            Some(_) => false,
        };
        // Before the client was answered there is nothing to resume: it gets etcd's status.
        if self.client.is_some() && member_going_away && self.head.is_none() {
            self.reopen(None);
            return;
        }
        self.end(trailers.unwrap_or_else(|| grpc::status_headers(Code::Ok, "")));
    }

    fn retry_or_end(&mut self, code: Code, message: String) {
        let since = *self.resuming_since.get_or_insert_with(Instant::now);
        let retryable = matches!(code, Code::Unavailable | Code::DeadlineExceeded);
        if retryable && self.head.is_none() && since.elapsed() < RESUME_DEADLINE && self.client.is_some() {
            self.upstream = Upstream::Backoff(Box::pin(tokio::time::sleep(RESUME_BACKOFF)));
            return;
        }
        tracing::warn!(code = code.name(), %message, "cannot re-open the watch stream on any member; ending the client's stream");
        self.end(grpc::status_headers(code, &message));
    }

    /// Opens a new upstream stream (renewing the token first if `rejected` names the current one)
    /// and re-creates every watch on it from its next revision, with its id.
    fn reopen(&mut self, rejected: Option<u64>) {
        self.resuming_since.get_or_insert_with(Instant::now);
        self.moved = true;
        self.upstream_messages = MessageReader::default();
        let (to_upstream, receiver) = transport::feed();
        self.to_upstream = to_upstream;
        let mut recreations = Vec::with_capacity(self.watches.len());
        // Shared watches are not on this stream; those joining one watch on their own again.
        let joining: Vec<i64> = self
            .watches
            .iter()
            .filter(|(_, w)| matches!(w.sharing, Sharing::Joining { .. }))
            .map(|(&id, _)| id)
            .collect();
        for id in joining {
            self.stop_joining(id);
        }
        // Watch 0 cannot be asked for by id (0 means "pick one"), so it goes first on a fresh stream.
        for (&id, watch) in &self.watches {
            if !matches!(watch.sharing, Sharing::Own) {
                continue;
            }
            let mut create = watch.create.clone();
            create.watch_id = id;
            if watch.next_revision > 0 {
                create.start_revision = watch.next_revision;
            }
            recreations.push(PendingCreate { create, recreation: true, token_renewed: rejected.is_some() });
        }
        let count = recreations.len() as u64;
        let mut unanswered: Vec<PendingCreate> = self.pending.drain(..).collect();
        // The new stream's counter cannot know the ids of watches that are not on it (shared
        // ones): unanswered creates take the id the client's stream would have given them.
        for pending in unanswered.iter_mut().filter(|p| p.create.watch_id == 0 && !p.recreation) {
            pending.create.watch_id = self.take_auto_id();
        }
        self.watches.retain(|_, watch| matches!(watch.sharing, Sharing::Shared { .. }));
        self.own_cancels.clear();
        self.recount = true;
        for pending in recreations.into_iter().chain(unanswered) {
            self.to_upstream.send(encode_create(&pending.create));
            self.pending.push_back(pending);
        }
        for request in self.held.drain(..) {
            self.to_upstream.send(request);
        }
        if self.progress_unanswered {
            self.to_upstream.send(frame_request(watch_request::RequestUnion::ProgressRequest(Default::default())));
        }
        self.held_bytes = 0;
        // The new stream sends whole revisions again.
        self.mid_fragment.clear();
        if count > 0 {
            self.sender.metrics().watches_recreated(count);
        }
        tracing::debug!(watches = count, token_renewal = rejected.is_some(), "re-opening the upstream watch stream");
        let session = self.session.clone();
        self.upstream = Upstream::Opening(open(
            Arc::clone(&self.sender),
            session,
            HeaderMap::clone(&self.headers),
            receiver,
            rejected,
        ));
    }
}

impl WatchRelay {
    /// Subscribes the newly created own watch `id` to the shared watch of the same request.
    fn join_shared(&mut self, id: i64) {
        let Some(coalescing) = &self.coalescing else { return };
        let Some(watch) = self.watches.get_mut(&id) else { return };
        let Some(key) = ShareKey::of(self.session.as_deref(), &watch.create) else { return };
        coalescing.hub.subscribe(
            &key,
            self.session.as_ref(),
            &watch.create,
            id,
            watch.next_revision,
            &coalescing.inbox,
        );
        watch.sharing = Sharing::Joining { key, from: None, held: HeldShared::new(&self.joining_held) };
    }

    /// Switches a joining watch to the shared one once its own has delivered everything up to
    /// where the shared watch takes over (and its own can be cancelled now).
    fn try_switch(&mut self, id: i64) {
        if !matches!(self.upstream, Upstream::Open { .. }) {
            return;
        }
        let Some(watch) = self.watches.get_mut(&id) else { return };
        let Sharing::Joining { from: Some(from), .. } = &watch.sharing else { return };
        let delivered_through = watch.next_revision - 1;
        if delivered_through < *from {
            return;
        }
        let Sharing::Joining { key, mut held, .. } = std::mem::replace(&mut watch.sharing, Sharing::Own) else {
            return;
        };
        watch.sharing = Sharing::Shared { key, skip_through: delivered_through };
        self.to_upstream.send(frame_cancel(id));
        self.own_cancels.push(id);
        self.recount = true;
        for message in held.take() {
            self.deliver_shared(id, message);
        }
        self.idle_if_unneeded();
    }

    /// Closes the upstream stream once it carries nothing: every watch shared, nothing asked
    /// for and unanswered. A fleet's clients then cost etcd no stream each.
    fn idle_if_unneeded(&mut self) {
        let unneeded = matches!(self.upstream, Upstream::Open { .. })
            && self.head.is_none()
            && self.client.is_some()
            && self.pending.is_empty()
            && self.held.is_empty()
            && self.watches.values().all(|w| matches!(w.sharing, Sharing::Shared { .. }));
        if unneeded {
            self.upstream = Upstream::Idle;
            self.moved = true;
            self.to_upstream = FeedSender::closed();
            self.upstream_messages = MessageReader::default();
            self.own_cancels.clear();
        }
    }

    /// Takes what the hub delivered, while the client is reading; true if anything happened.
    fn poll_deliveries(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(coalescing) = self.coalescing.as_mut() else { return false };
        if self.to_client.is_full() {
            // Left in the inbox: past its limit the hub moves these watches to their own.
            coalescing.deliveries.pause();
            let _ = self.to_client.poll_room(cx);
            return false;
        }
        let held_limit = coalescing.inbox.limit();
        let delivery = match coalescing.deliveries.poll_next(cx) {
            Poll::Ready(Some(delivery)) => delivery,
            Poll::Ready(None) | Poll::Pending => return false,
        };
        match delivery {
            Delivery::Joinable { client_id, from } => {
                if let Some(ActiveWatch { sharing: Sharing::Joining { from: joinable, .. }, .. }) =
                    self.watches.get_mut(&client_id)
                {
                    *joinable = Some(from);
                    self.try_switch(client_id);
                }
            }
            Delivery::Message { client_id, message } => match self.watches.get_mut(&client_id) {
                Some(ActiveWatch { sharing: Sharing::Joining { held, .. }, .. }) => {
                    held.push(message);
                    // Its own watch is far behind the shared one, or the client's joining
                    // watches hold too much together: it stays on its own.
                    if held.bytes > held_limit || self.joining_held.load(Ordering::Relaxed) > held_limit {
                        self.stop_joining(client_id);
                    }
                }
                Some(ActiveWatch { sharing: Sharing::Shared { .. }, .. }) => self.deliver_shared(client_id, message),
                // Left the shared watch meanwhile.
                _ => {}
            },
            Delivery::JoinedNow { client_id, progress, from } => self.joined_now(client_id, &progress, from),
            Delivery::NotJoined { client_id } => self.not_joined(client_id),
            Delivery::Detached { client_id } => self.detached(client_id),
            // An answer that comes after the relay withdrew the request (it went to etcd on the
            // client's own stream) is not the client's.
            Delivery::Progress { answer } => {
                if !matches!(std::mem::replace(&mut self.hub_progress, HubProgress::None), HubProgress::None) {
                    self.resume_client = true;
                    self.deliver(answer);
                }
            }
            Delivery::ProgressUnanswered => self.ask_progress_on_own_stream(),
        }
        true
    }

    /// Joins a create (with no id of its own) to the shared watch of the same request, without a
    /// watch of its own at etcd (see `WatchHub::join_now`); gives the create back if it cannot.
    /// Without auth only: etcd checks a user's permission when a watch is created, and a shared
    /// watch may have been created earlier.
    fn join_now(&mut self, create: WatchCreateRequest) -> Result<(), WatchCreateRequest> {
        let eligible = self.session.is_none()
            && create.start_revision >= 0
            && create.watch_id == 0
            && self.pending.is_empty()
            && self.held.is_empty()
            && matches!(self.upstream, Upstream::Idle | Upstream::Open { .. });
        let (Some(coalescing), true) = (&self.coalescing, eligible) else { return Err(create) };
        let Some(key) = ShareKey::of(None, &create) else { return Err(create) };
        let (hub, inbox) = (Arc::clone(&coalescing.hub), coalescing.inbox.clone());
        let id = self.take_auto_id();
        hub.join_now(&key, &create, id, &inbox);
        // etcd's counter on this stream no longer knows every id: later creates carry theirs.
        self.moved = true;
        let deadline = Box::pin(tokio::time::sleep(JOIN_NOW_DEADLINE));
        self.joining_now = Some(Box::new(JoiningNow { id, create, key, deadline }));
        Ok(())
    }

    /// The hub joined watch `id`, to deliver every event after revision `from`: the client is
    /// told the watch exists with the header of etcd's answer in `progress`, as etcd would have
    /// told it at that moment.
    fn joined_now(&mut self, id: i64, progress: &Bytes, from: i64) {
        let Some(joining) = self.joining_now.take_if(|joining| joining.id == id) else { return };
        let framed = progress.first() == Some(&0);
        let header = WatchResponse::decode(progress.get(5..).unwrap_or_default()).ok().and_then(|r| r.header);
        let (true, Some(header)) = (framed, header) else {
            // Not an answer to go by: the watch leaves the shared one and is created on its own.
            if let Some(coalescing) = &self.coalescing {
                coalescing.hub.unsubscribe(&joining.key, coalescing.inbox.relay(), id);
            }
            self.create_on_own(*joining);
            return;
        };
        self.resume_client = true;
        let created = WatchResponse { header: Some(header), watch_id: id, created: true, ..Default::default() };
        let created = grpc::frame_message(&created);
        let sharing = Sharing::Shared { key: joining.key, skip_through: from };
        self.watches.insert(id, ActiveWatch { create: joining.create, next_revision: from + 1, sharing });
        self.recount = true;
        self.latest = Some(created.clone());
        if let Some(head) = self.head.take() {
            let _ = head.send(Ok(grpc::response_headers()));
        }
        self.deliver(created);
    }

    /// The hub could not join watch `id` at once: it is created on its own, as any other.
    fn not_joined(&mut self, id: i64) {
        if let Some(joining) = self.joining_now.take_if(|joining| joining.id == id) {
            self.create_on_own(*joining);
        }
    }

    fn create_on_own(&mut self, joining: JoiningNow) {
        self.resume_client = true;
        // It takes the id it would have had.
        self.next_auto_id = self.next_auto_id.min(joining.id);
        let message = grpc::frame_message(&WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(joining.create)),
        });
        self.on_client_request(message, false);
    }

    /// A message of the shared watch for the client's watch `id`.
    fn deliver_shared(&mut self, id: i64, message: Bytes) {
        let Some(Ok(facts)) = (message.first() == Some(&0)).then(|| read_facts(&message[5..])) else { return };
        let Some(watch) = self.watches.get_mut(&id) else { return };
        let Sharing::Shared { skip_through, .. } = &mut watch.sharing else { return };
        if facts.canceled {
            // Compacted while the shared watch resumed: the client's watch ends as its own would.
            self.watches.remove(&id);
            self.recount = true;
            self.latest = Some(message.clone());
            self.deliver_counted(message);
            return;
        }
        // Counted by the hub, unless it is a copy of the client's own.
        let (message, counted) = if facts.events > 0 && facts.last_event_revision <= *skip_through {
            return;
        } else if facts.events > 1 && *skip_through != i64::MIN {
            // May hold events its own watch delivered before the switch.
            let kept = without_events_through(&message, *skip_through);
            *skip_through = i64::MIN;
            match kept {
                Some(kept) => (kept, false),
                None => return,
            }
        } else if facts.events == 0 && facts.header_revision <= *skip_through {
            return;
        } else {
            if facts.events > 0 {
                *skip_through = i64::MIN;
            }
            (message, true)
        };
        advance(watch, &facts);
        match counted {
            true => self.deliver_counted(message),
            false => self.deliver(message),
        }
    }

    /// The hub no longer serves watch `id`: it watches on its own from its next revision.
    fn detached(&mut self, id: i64) {
        let Some(watch) = self.watches.get_mut(&id) else { return };
        let was_shared = matches!(watch.sharing, Sharing::Shared { .. });
        watch.sharing = Sharing::Own;
        self.recount = true;
        if !was_shared {
            // Its own watch never stopped.
            return;
        }
        match self.upstream {
            // Watch 0 can only be had on a fresh stream; the next stream re-creates the others.
            Upstream::Open { .. } | Upstream::Opening(_) if id != 0 => {
                let mut create = watch.create.clone();
                create.watch_id = id;
                create.start_revision = watch.next_revision;
                self.to_upstream.send(encode_create(&create));
                self.watches.remove(&id);
                self.pending.push_back(PendingCreate { create, recreation: true, token_renewed: false });
            }
            Upstream::Open { .. } | Upstream::Opening(_) => self.reopen(None),
            Upstream::Idle => self.reopen(None),
            Upstream::Paused | Upstream::Backoff(_) | Upstream::Closed => {}
        }
        // The hub's answer covers only the shared stream's events; the watch's own stream, from
        // its next revision, may still owe it older ones. etcd orders its answer after them.
        self.ask_progress_on_own_stream();
    }

    /// A create asking for the id of one of the client's shared watches, refused as etcd refuses
    /// a duplicate id on its stream.
    fn refuse_duplicate_id(&mut self) {
        let header = self.latest_header();
        let refusal = WatchResponse {
            header,
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: etcd_errors::DUPLICATE_WATCH_ID.to_owned(),
            ..Default::default()
        };
        self.deliver(grpc::frame_message(&refusal));
    }

    /// The header of the latest response the client got, for answers the proxy makes itself.
    fn latest_header(&self) -> Option<ResponseHeader> {
        self.latest.as_ref().and_then(|latest| WatchResponse::decode(&latest[5..]).ok()).and_then(|r| r.header)
    }

    /// The client cancelled watch `id`: a shared watch's cancel is answered by the proxy (etcd
    /// never had it on this stream); true if it was.
    fn leave_shared(&mut self, id: i64) -> bool {
        let Some(watch) = self.watches.get(&id) else { return false };
        match &watch.sharing {
            Sharing::Own => false,
            Sharing::Joining { .. } => {
                self.stop_joining(id);
                false
            }
            Sharing::Shared { .. } => {
                if let Some(watch) = self.watches.remove(&id) {
                    self.unsubscribe(id, &watch.sharing);
                }
                self.recount = true;
                let answer =
                    WatchResponse { header: self.latest_header(), watch_id: id, canceled: true, ..Default::default() };
                self.deliver(grpc::frame_message(&answer));
                true
            }
        }
    }

    /// Watch `id` stops joining a shared watch and stays on its own.
    fn stop_joining(&mut self, id: i64) {
        let Some(watch) = self.watches.get_mut(&id) else { return };
        if let Sharing::Joining { .. } = watch.sharing {
            let sharing = std::mem::replace(&mut watch.sharing, Sharing::Own);
            self.unsubscribe(id, &sharing);
        }
    }

    fn unsubscribe(&self, id: i64, sharing: &Sharing) {
        if let (Some(coalescing), Some(key)) = (&self.coalescing, sharing.key()) {
            coalescing.hub.unsubscribe(key, coalescing.inbox.relay(), id);
        }
    }

    /// Brings the hub's gauges of client and upstream watches up to date with this relay's.
    fn update_gauges(&mut self) {
        self.recount = false;
        let Some(coalescing) = self.coalescing.as_mut() else { return };
        let clients = self.watches.len() as u64;
        let own = self.watches.values().filter(|w| !matches!(w.sharing, Sharing::Shared { .. })).count() as u64;
        coalescing.publish(clients, own);
    }
}

impl Drop for WatchRelay {
    fn drop(&mut self) {
        for (&id, watch) in &self.watches {
            self.unsubscribe(id, &watch.sharing);
        }
        if let (Some(joining), Some(coalescing)) = (self.joining_now.take(), &self.coalescing) {
            coalescing.hub.unsubscribe(&joining.key, coalescing.inbox.relay(), joining.id);
        }
        if let Some(coalescing) = self.coalescing.as_mut() {
            if !matches!(self.hub_progress, HubProgress::None) {
                coalescing.hub.forget_progress(coalescing.inbox.relay());
            }
            coalescing.publish(0, 0);
        }
    }
}

impl Coalescing {
    /// Replaces what this relay counts in the hub's gauges.
    fn publish(&mut self, clients: u64, own: u64) {
        let stats = self.hub.stats();
        let (old_clients, old_own) = self.counted;
        stats.client_watches.fetch_add(clients.wrapping_sub(old_clients), std::sync::atomic::Ordering::Relaxed);
        stats.own_upstream_watches.fetch_add(own.wrapping_sub(old_own), std::sync::atomic::Ordering::Relaxed);
        self.counted = (clients, own);
    }
}

/// Moves a watch's next revision past what `facts` delivered.
fn advance(watch: &mut ActiveWatch, facts: &ResponseFacts) {
    if facts.events > 0 && !facts.fragment {
        watch.next_revision = watch.next_revision.max(facts.last_event_revision + 1);
    } else if facts.events == 0 {
        watch.next_revision = watch.next_revision.max(facts.header_revision + 1);
    }
}

/// `framed` (a WatchResponse) without its events up to revision `through`; `None` if none is left.
fn without_events_through(framed: &Bytes, through: i64) -> Option<Bytes> {
    let Ok(mut response) = WatchResponse::decode(&framed[5..]) else { return Some(framed.clone()) };
    let before = response.events.len();
    response.events.retain(|event| event.kv.as_ref().is_some_and(|kv| kv.mod_revision > through));
    match response.events.len() {
        0 => None,
        kept if kept == before => Some(framed.clone()),
        _ => Some(grpc::frame_message(&response)),
    }
}

/// Opens an upstream Watch stream whose request messages come from `receiver`.
fn open(
    sender: Arc<Sender>,
    session: Option<Arc<Session>>,
    headers: HeaderMap,
    receiver: FeedReceiver,
    rejected: Option<u64>,
) -> Opening {
    Box::pin(async move { sender.open_watch_stream(session.as_deref(), headers, receiver, rejected).await })
}

fn encode_create(create: &WatchCreateRequest) -> Bytes {
    frame_request(watch_request::RequestUnion::CreateRequest(create.clone()))
}

/// A framed WatchRequest: what the relays, the hub and the cache's watch streams send etcd.
pub(super) fn frame_request(request: watch_request::RequestUnion) -> Bytes {
    grpc::frame_message(&WatchRequest { request_union: Some(request) })
}

/// The framed cancel of watch `id`.
pub(super) fn frame_cancel(id: i64) -> Bytes {
    frame_request(watch_request::RequestUnion::CancelRequest(WatchCancelRequest { watch_id: id }))
}

/// Reads the facts the relay needs from an encoded WatchResponse.
pub(crate) fn read_facts(message: &[u8]) -> Result<ResponseFacts, String> {
    let mut facts = ResponseFacts::default();
    let mut last_event: &[u8] = &[];
    grpc::for_each_field(message, |field, value, _| match (field, value) {
        (1, WireValue::Bytes(header)) => {
            let _ = grpc::for_each_field(header, |field, value, _| {
                if let (3, WireValue::Varint(revision)) = (field, value) {
                    facts.header_revision = revision as i64;
                }
            });
        }
        (2, WireValue::Varint(id)) => facts.watch_id = id as i64,
        (3, WireValue::Varint(v)) => facts.created = v != 0,
        (4, WireValue::Varint(v)) => facts.canceled = v != 0,
        (6, WireValue::Bytes(reason)) => facts.cancel_reason = String::from_utf8_lossy(reason).into_owned(),
        (7, WireValue::Varint(v)) => facts.fragment = v != 0,
        (11, WireValue::Bytes(event)) => {
            facts.events += 1;
            last_event = event;
        }
        _ => {}
    })?;
    grpc::for_each_field(last_event, |field, value, _| {
        if let (2, WireValue::Bytes(kv)) = (field, value) {
            let _ = grpc::for_each_field(kv, |field, value, _| {
                if let (3, WireValue::Varint(revision)) = (field, value) {
                    facts.last_event_revision = revision as i64;
                }
            });
        }
    })?;
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_compat_proto::etcdserverpb::{ResponseHeader, WatchResponse};
    use etcd_compat_proto::mvccpb::{Event, KeyValue};
    use prost::Message;

    #[test]
    fn what_joining_watches_hold_is_counted_together_however_it_goes() {
        let total = Arc::new(AtomicUsize::new(0));
        let mut first = HeldShared::new(&total);
        let mut second = HeldShared::new(&total);
        first.push(Bytes::from_static(b"abc"));
        first.push(Bytes::from_static(b"de"));
        second.push(Bytes::from_static(b"fghi"));
        assert_eq!(total.load(Ordering::Relaxed), 9);
        let delivered = first.take();
        assert_eq!(delivered, [Bytes::from_static(b"abc"), Bytes::from_static(b"de")]);
        assert_eq!(total.load(Ordering::Relaxed), 4);
        drop(first);
        assert_eq!(total.load(Ordering::Relaxed), 4, "taken messages are not counted twice");
        drop(second);
        assert_eq!(total.load(Ordering::Relaxed), 0, "dropped with the watch");
    }

    #[test]
    fn a_progress_answer_on_the_stream_moves_only_the_watches_on_it() {
        let watch =
            |next_revision, sharing| ActiveWatch { create: WatchCreateRequest::default(), next_revision, sharing };
        let key = ShareKey::of(None, &WatchCreateRequest::default()).expect("shareable");
        let mut watches = Watches::default();
        watches.insert(1, watch(5, Sharing::Own));
        watches.insert(2, watch(5, Sharing::Shared { key: key.clone(), skip_through: 4 }));
        let held = HeldShared::new(&Arc::default());
        watches.insert(3, watch(5, Sharing::Joining { key, from: None, held }));
        watches.insert(4, watch(12, Sharing::Own));
        watches.progressed_on_stream(9);
        let next: Vec<i64> = watches.values_mut().map(|watch| watch.next_revision).collect();
        assert_eq!(next, [10, 5, 10, 12]);
    }

    #[test]
    fn facts_match_the_decoded_message() {
        let event = |revision: i64| Event {
            kv: Some(KeyValue { key: "k".into(), mod_revision: revision, value: "v".into(), ..Default::default() }),
            ..Default::default()
        };
        let response = WatchResponse {
            header: Some(ResponseHeader { revision: 41, cluster_id: 3, ..Default::default() }),
            watch_id: 7,
            events: vec![event(39), event(40)],
            ..Default::default()
        };
        let facts = read_facts(&response.encode_to_vec()).unwrap();
        assert_eq!(
            facts,
            ResponseFacts {
                watch_id: 7,
                header_revision: 41,
                events: 2,
                last_event_revision: 40,
                ..Default::default()
            }
        );
        let canceled = WatchResponse {
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: "etcdserver: permission denied".into(),
            ..Default::default()
        };
        let facts = read_facts(&canceled.encode_to_vec()).unwrap();
        assert_eq!((facts.watch_id, facts.created, facts.canceled), (-1, true, true));
        assert_eq!(facts.cancel_reason, "etcdserver: permission denied");
    }
}
