//! Watch streams that outlive their upstream stream (field reports F9, F11).
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

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_compat_proto::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest};
use http::HeaderMap;
use http_body::{Body, Frame};
use hyper::body::Incoming;
use prost::Message;
use tokio::sync::mpsc;

use crate::auth::Session;
use crate::forward::Forwarder;
use crate::grpc::{self, Code, MessageReader, WireValue};
use crate::h2_stream::RecvBody;

/// How long the relay keeps trying to find a member before ending the client's stream.
const RESUME_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between attempts when no member takes the stream.
const RESUME_BACKOFF: Duration = Duration::from_millis(250);
/// Endings of cancel reasons of a refused create that a renewed token can fix: an expired token
/// reads `rpc error: code = Unauthenticated desc = etcdserver: invalid auth token` from etcd 3.4
/// and `rpc error: code = PermissionDenied desc = etcdserver: permission denied` from 3.5.
const TOKEN_CANCEL_REASONS: [&str; 3] =
    ["etcdserver: permission denied", "etcdserver: invalid auth token", "etcdserver: user name is empty"];

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
    /// The client's stream is ending.
    Closed,
}

/// A watch the client has been told exists.
struct ActiveWatch {
    create: WatchCreateRequest,
    /// The first revision the client has not received (0 until known).
    next_revision: i64,
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
struct ResponseFacts {
    watch_id: i64,
    created: bool,
    canceled: bool,
    cancel_reason: String,
    fragment: bool,
    header_revision: i64,
    events: usize,
    last_event_revision: i64,
}

/// Relays one client Watch stream; polled as the client's response body.
pub struct WatchRelay {
    forwarder: Arc<Forwarder>,
    session: Option<Arc<Session>>,
    headers: HeaderMap,
    client: Option<Incoming>,
    client_messages: MessageReader,
    upstream: Upstream,
    upstream_messages: MessageReader,
    to_upstream: mpsc::UnboundedSender<Bytes>,
    /// Token generation the current upstream stream was opened with.
    token_generation: Option<u64>,
    watches: BTreeMap<i64, ActiveWatch>,
    pending: VecDeque<PendingCreate>,
    /// The id etcd would give the next watch created without one, as on one etcd stream.
    next_auto_id: i64,
    /// Set once the watches live on a stream other than the first: creates then carry their ids.
    moved: bool,
    out: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    finished: bool,
    /// When the current search for a member began.
    resuming_since: Option<Instant>,
    /// etcd's response headers of the first upstream stream, until they are sent to the client.
    first_headers: Option<HeaderMap>,
    /// Whether the client has been sent response headers.
    answered: bool,
}

impl WatchRelay {
    /// Starts relaying: opens the first upstream stream at once.
    pub fn start(
        forwarder: Arc<Forwarder>,
        session: Option<Arc<Session>>,
        headers: HeaderMap,
        client: Incoming,
    ) -> WatchRelay {
        let (to_upstream, receiver) = mpsc::unbounded_channel();
        let upstream =
            Upstream::Opening(open(Arc::clone(&forwarder), session.clone(), headers.clone(), receiver, None));
        WatchRelay {
            forwarder,
            session,
            headers,
            client: Some(client),
            client_messages: MessageReader::default(),
            upstream,
            upstream_messages: MessageReader::default(),
            to_upstream,
            token_generation: None,
            watches: BTreeMap::new(),
            pending: VecDeque::new(),
            next_auto_id: 0,
            moved: false,
            out: VecDeque::new(),
            trailers: None,
            finished: false,
            resuming_since: None,
            first_headers: None,
            answered: false,
        }
    }

    /// Relays until etcd answered the first upstream stream, and returns etcd's response headers
    /// for the client (or, if no member took the stream, the headers of a trailers-only status).
    /// Answering the client before etcd did would tell it the watch exists before it does:
    /// clients that write right after `watch()` returns would miss their own first event.
    pub async fn first_response(&mut self) -> Result<HeaderMap, HeaderMap> {
        std::future::poll_fn(|cx| loop {
            if let Some(headers) = self.first_headers.take() {
                return Poll::Ready(Ok(headers));
            }
            if let Some(trailers) = self.trailers.take() {
                self.finished = true;
                return Poll::Ready(Err(trailers));
            }
            let client = self.poll_client(cx);
            let upstream = self.poll_upstream(cx);
            if !client && !upstream {
                return Poll::Pending;
            }
        })
        .await
    }

    /// The next frame for the client: etcd's messages, then etcd's (or the proxy's) trailers.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame<Bytes>>> {
        loop {
            if let Some(message) = self.out.pop_front() {
                return Poll::Ready(Some(Frame::data(message)));
            }
            if let Some(trailers) = self.trailers.take() {
                self.finished = true;
                return Poll::Ready(Some(Frame::trailers(trailers)));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            let client = self.poll_client(cx);
            let upstream = self.poll_upstream(cx);
            if !client && !upstream {
                return Poll::Pending;
            }
        }
    }

    /// Reads the client's requests; true if anything happened.
    fn poll_client(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(client) = self.client.as_mut() else { return false };
        match Pin::new(client).poll_frame(cx) {
            Poll::Pending => false,
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    self.client_messages.push(&data);
                    while let Some(message) = self.client_messages.next_message() {
                        self.on_client_message(message);
                    }
                }
                true
            }
            Poll::Ready(Some(Err(_)) | None) => {
                // Closing the upstream request side makes etcd end the stream, as it would directly.
                self.client = None;
                let (closed, _) = mpsc::unbounded_channel();
                self.to_upstream = closed;
                true
            }
        }
    }

    fn on_client_message(&mut self, message: Bytes) {
        let request = match message.first() {
            Some(0) => WatchRequest::decode(&message[5..]).ok(),
            _ => None,
        };
        let Some(watch_request::RequestUnion::CreateRequest(mut create)) = request.and_then(|r| r.request_union) else {
            // Cancels and progress requests carry ids that are the same upstream.
            let _ = self.to_upstream.send(message);
            return;
        };
        if self.moved && create.watch_id == 0 {
            // The new stream's own counter may differ from the one the client saw.
            create.watch_id = self.take_auto_id();
            let _ = self.to_upstream.send(encode_create(&create));
        } else {
            let _ = self.to_upstream.send(message);
        }
        self.pending.push_back(PendingCreate { create, recreation: false, token_renewed: false });
    }

    /// The next id etcd would assign on the client's original stream (0 means "let etcd pick").
    fn take_auto_id(&mut self) -> i64 {
        while self.watches.contains_key(&self.next_auto_id) {
            self.next_auto_id += 1;
        }
        let id = self.next_auto_id;
        self.next_auto_id += 1;
        id
    }

    /// Drives the upstream stream; true if anything happened.
    fn poll_upstream(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.upstream {
            Upstream::Closed => false,
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
                            if !self.answered {
                                self.answered = true;
                                self.first_headers = Some(parts.headers);
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
            self.out.push_back(message);
            return;
        };
        if facts.created {
            let Some(pending) = self.pending.pop_front() else {
                self.out.push_back(message);
                return;
            };
            if facts.canceled {
                let token_refusal = TOKEN_CANCEL_REASONS.iter().any(|reason| facts.cancel_reason.ends_with(reason));
                if token_refusal && self.session.is_some() && !pending.token_renewed {
                    // The stream's token expired: renew it and create the watch on a new stream.
                    self.pending.push_front(PendingCreate { token_renewed: true, ..pending });
                    self.reopen(self.token_generation);
                    return;
                }
                if !pending.recreation {
                    self.out.push_back(message);
                }
                return;
            }
            let next_revision = match pending.create.start_revision {
                0 => facts.header_revision + 1,
                start => start,
            };
            if facts.watch_id >= self.next_auto_id {
                self.next_auto_id = facts.watch_id + 1;
            }
            let recreation = pending.recreation;
            self.watches.insert(facts.watch_id, ActiveWatch { create: pending.create, next_revision });
            if !recreation {
                self.out.push_back(message);
            }
            return;
        }
        if facts.canceled {
            self.watches.remove(&facts.watch_id);
        } else if facts.watch_id == -1 {
            // A progress answer for the whole stream: every watch has seen up to this revision.
            for watch in self.watches.values_mut() {
                watch.next_revision = watch.next_revision.max(facts.header_revision + 1);
            }
        } else if let Some(watch) = self.watches.get_mut(&facts.watch_id) {
            if facts.events > 0 && !facts.fragment {
                watch.next_revision = watch.next_revision.max(facts.last_event_revision + 1);
            } else if facts.events == 0 {
                watch.next_revision = watch.next_revision.max(facts.header_revision + 1);
            }
        }
        self.out.push_back(message);
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
        if self.client.is_some() && member_going_away && self.answered {
            self.reopen(None);
            return;
        }
        self.upstream = Upstream::Closed;
        self.trailers = Some(trailers.unwrap_or_else(|| grpc::status_headers(Code::Ok, "")));
    }

    fn retry_or_end(&mut self, code: Code, message: String) {
        let since = *self.resuming_since.get_or_insert_with(Instant::now);
        let retryable = matches!(code, Code::Unavailable | Code::DeadlineExceeded);
        if retryable && self.answered && since.elapsed() < RESUME_DEADLINE && self.client.is_some() {
            self.upstream = Upstream::Backoff(Box::pin(tokio::time::sleep(RESUME_BACKOFF)));
            return;
        }
        tracing::warn!(code = code.name(), %message, "cannot re-open the watch stream on any member; ending the client's stream");
        self.upstream = Upstream::Closed;
        self.trailers = Some(grpc::status_headers(code, &message));
    }

    /// Opens a new upstream stream (renewing the token first if `rejected` names the current one)
    /// and re-creates every watch on it from its next revision, with its id.
    fn reopen(&mut self, rejected: Option<u64>) {
        self.resuming_since.get_or_insert_with(Instant::now);
        self.moved = true;
        self.upstream_messages = MessageReader::default();
        let (to_upstream, receiver) = mpsc::unbounded_channel();
        self.to_upstream = to_upstream;
        let mut recreations = Vec::with_capacity(self.watches.len());
        // Watch 0 cannot be asked for by id (0 means "pick one"), so it goes first on a fresh stream.
        for (&id, watch) in &self.watches {
            let mut create = watch.create.clone();
            create.watch_id = id;
            if watch.next_revision > 0 {
                create.start_revision = watch.next_revision;
            }
            recreations.push(PendingCreate { create, recreation: true, token_renewed: rejected.is_some() });
        }
        let count = recreations.len() as u64;
        self.watches.clear();
        let unanswered: Vec<PendingCreate> = self.pending.drain(..).collect();
        for pending in recreations.into_iter().chain(unanswered) {
            let _ = self.to_upstream.send(encode_create(&pending.create));
            self.pending.push_back(pending);
        }
        if count > 0 {
            self.forwarder.metrics().watches_recreated(count);
        }
        tracing::debug!(watches = count, token_renewal = rejected.is_some(), "re-opening the upstream watch stream");
        let session = self.session.clone();
        self.upstream =
            Upstream::Opening(open(Arc::clone(&self.forwarder), session, self.headers.clone(), receiver, rejected));
    }
}

/// Opens an upstream Watch stream whose request messages come from `receiver`.
fn open(
    forwarder: Arc<Forwarder>,
    session: Option<Arc<Session>>,
    headers: HeaderMap,
    receiver: mpsc::UnboundedReceiver<Bytes>,
    rejected: Option<u64>,
) -> Opening {
    Box::pin(async move { forwarder.open_watch_stream(session.as_deref(), headers, receiver, rejected).await })
}

fn encode_create(create: &WatchCreateRequest) -> Bytes {
    let request = WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create.clone())) };
    grpc::frame_message(&request)
}

/// Reads the facts the relay needs from an encoded WatchResponse.
fn read_facts(message: &[u8]) -> Result<ResponseFacts, String> {
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
