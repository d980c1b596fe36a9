//! The two HTTP/2 bodies of a proxied call: the request going up and the response coming down.
//!
//! Both carry the client's and etcd's bytes untouched. The response body additionally watches
//! the call end (for metrics), turns a broken upstream stream into a proper gRPC `Unavailable`
//! status instead of a reset, and ends streams cleanly when the proxy shuts down.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use prost::Message;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::admin::Metrics;
use crate::error::{self, ProxyFailure};
use crate::grpc::{self, Code, MessageReader, Route};
use crate::transport::{AnswerProgress, RecvBody};

use super::admission::HeldBytes;
use super::client_queue::QueueReceiver;

/// Records how a call ended, exactly once, even if the client goes away first.
pub struct CallRecord {
    metrics: Arc<Metrics>,
    method: usize,
    started: Instant,
    /// Latency is only meaningful for calls with one response; streams live as long as the client wants.
    time_it: bool,
    done: bool,
}

impl CallRecord {
    /// Starts recording a call of `method` (index into the method table).
    pub fn new(metrics: Arc<Metrics>, method: usize, time_it: bool) -> Self {
        metrics.started(method);
        CallRecord { metrics, method, started: Instant::now(), time_it, done: false }
    }

    /// Records the final status of the call.
    pub fn finish(&mut self, code: Code) {
        if !self.done {
            self.done = true;
            let elapsed: Option<Duration> = self.time_it.then(|| self.started.elapsed());
            self.metrics.handled(self.method, code, elapsed);
        }
    }

    /// Records the final status of the call, and shows one that is not OK to the explainer
    /// (see `explain`); `message` is only read then, so answers that succeed pay nothing more.
    pub fn finish_explained(&mut self, code: Code, message: impl FnOnce() -> String) {
        if code != Code::Ok && !self.done {
            self.metrics.explainer.call_ended(self.method, code, &message());
        }
        self.finish(code);
    }

    /// The metrics this record writes to.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        // Dropped before a status was seen: the client cancelled or disconnected.
        self.finish(Code::Cancelled);
    }
}

/// A response body sent to the client.
pub struct ResponseBody {
    state: State,
    record: Option<CallRecord>,
    /// Resolves when the proxy shuts down; only set for streams, which would otherwise never end.
    shutdown: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Names the member in the message of a broken stream; none for answers of the proxy's own
    /// or held whole (an allocation saved on every call).
    member: Option<Arc<str>>,
    /// For Watch streams of size-limited clients: splits oversize messages.
    splitter: Option<WatchSplitter>,
    /// For other answers to size-limited clients: the largest message allowed through (boxed:
    /// few answers carry one).
    guard: Option<Box<AnswerGuard>>,
    /// For answers that may wait for their client: what they keep meanwhile (boxed: few do).
    held: Option<Box<HeldAnswer>>,
}

/// Answers larger than this are counted in `--max-held-response-bytes` and handed to the
/// client's connection in pieces of this size: what the connection has taken is then what the
/// client's window let through, give or take a piece, so the count stays true. Smaller answers
/// leave in one piece, as they came.
pub const ANSWER_PIECE: usize = 64 * 1024;

/// What an answer that may wait for its client keeps meanwhile.
pub struct HeldAnswer {
    /// Its bytes not yet taken, counted in `--max-held-response-bytes`; none for answers that
    /// are delivered in any case (those of calls that changed something) and relayed ones
    /// (bounded by flow control).
    bytes: Option<HeldBytes>,
    /// Whether it waits for the client, watched by the client's connection
    /// (`--unread-response-timeout`).
    progress: Option<Arc<AnswerProgress>>,
}

impl HeldAnswer {
    /// `bytes` counted and `progress` reported until the answer is taken.
    pub fn new(bytes: Option<HeldBytes>, progress: Option<Arc<AnswerProgress>>) -> HeldAnswer {
        HeldAnswer { bytes, progress }
    }
}

/// What a stream task (relayed Watch, keep-alives) sends first: etcd's response headers for the
/// client, or the headers of a trailers-only status if the stream never started.
pub type StreamHead = Result<HeaderMap, HeaderMap>;

/// The answer to a call served by a stream task: once the task sends its [`StreamHead`], etcd's
/// headers and the frames the task queues, or a trailers-only status. A struct rather than an
/// async fn: each of a fleet's new streams holds one until etcd answers, and an async fn awaited
/// through a wrapper or two holds its state once per level.
pub struct StreamStart {
    head: tokio::sync::oneshot::Receiver<StreamHead>,
    /// Taken when the head arrives.
    waiting: Option<(QueueReceiver, CallRecord, CancellationToken)>,
    /// Names the stream in the status of a task that ended before it started.
    what: &'static str,
    /// See [`ResponseBody::split_watch_responses`].
    split: Option<usize>,
}

impl StreamStart {
    /// Waits for `head`; the body then carries `frames`, and ends with a status at `shutdown`.
    pub fn new(
        head: tokio::sync::oneshot::Receiver<StreamHead>,
        frames: QueueReceiver,
        record: CallRecord,
        shutdown: CancellationToken,
        what: &'static str,
    ) -> Self {
        StreamStart { head, waiting: Some((frames, record, shutdown)), what, split: None }
    }

    /// Splits the watch responses of the started stream to `budget` (see
    /// [`ResponseBody::split_watch_responses`]).
    pub fn split_watch_responses(mut self, budget: Option<usize>) -> Self {
        self.split = budget;
        self
    }
}

impl Future for StreamStart {
    type Output = http::Response<ResponseBody>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let head = std::task::ready!(Pin::new(&mut self.head).poll(cx));
        // Polled again after it was ready: there is nothing more to give.
        let Some((frames, mut record, shutdown)) = self.waiting.take() else { return Poll::Pending };
        let (headers, body) = match head {
            Ok(Ok(headers)) => {
                let body = ResponseBody {
                    state: State::Queue(frames),
                    record: Some(record),
                    shutdown: Some(Box::pin(shutdown.cancelled_owned())),
                    member: None,
                    splitter: None,
                    guard: None,
                    held: None,
                };
                let body = match self.split {
                    Some(budget) => body.split_watch_responses(budget),
                    None => body,
                };
                (headers, body)
            }
            Ok(Err(status)) => {
                let code = Code::from_headers(&status).unwrap_or(Code::Unknown);
                record.finish_explained(code, || grpc::status_message(&status));
                (status, ResponseBody::empty(record, code))
            }
            Err(_) => {
                let (code, message) = ProxyFailure::StreamNotStarted(self.what).status();
                record.finish(code);
                (grpc::status_headers(code, &message), ResponseBody::empty(record, code))
            }
        };
        let mut response = http::Response::new(body);
        *response.headers_mut() = headers;
        Poll::Ready(response)
    }
}

enum State {
    /// Relaying etcd's response; `first` is a DATA chunk the proxy read before relaying.
    Upstream { incoming: RecvBody, first: Option<Bytes> },
    /// Frames written by a task of the proxy (a relayed Watch, a keep-alive stream: streams that
    /// move between members); ends after a trailers frame.
    Queue(QueueReceiver),
    /// A response the proxy holds in full: its data chunks in order, then trailers.
    Buffered { data: std::collections::VecDeque<Bytes>, trailers: Option<HeaderMap> },
    /// Nothing more to send.
    Done,
}

impl ResponseBody {
    /// Relays an upstream response body. `status_in_headers` is the code and headers of a
    /// trailers-only response.
    pub fn upstream(
        incoming: RecvBody,
        first: Option<Bytes>,
        mut record: CallRecord,
        status_in_headers: Option<(Code, &HeaderMap)>,
        shutdown: Option<WaitForCancellationFutureOwned>,
        member: Arc<str>,
    ) -> Self {
        if let Some((code, headers)) = status_in_headers {
            record.finish_explained(code, || grpc::status_message(headers));
        }
        ResponseBody {
            state: State::Upstream { incoming, first },
            record: Some(record),
            shutdown: shutdown.map(Box::pin),
            member: Some(member),
            splitter: None,
            guard: None,
            held: None,
        }
    }

    /// Refuses (with `ResourceExhausted`) an answer whose message is larger than `budget`, before
    /// any of it is sent: the client's gRPC library would fail on it with a less helpful error.
    /// `key`: the one key the call asked for, named in the refusal.
    pub fn refuse_messages_over(mut self, budget: usize, key: Option<String>) -> Self {
        self.guard = Some(Box::new(AnswerGuard { budget, key }));
        self
    }

    /// Keeps `held` until the client has taken the answer, handing it over in pieces.
    pub fn hold(&mut self, held: HeldAnswer) {
        self.held = Some(Box::new(held));
    }

    /// Splits watch responses larger than `budget` bytes (for clients with a message size limit).
    pub fn split_watch_responses(mut self, budget: usize) -> Self {
        self.splitter = Some(WatchSplitter { budget, pending: MessageReader::default() });
        self
    }

    /// An empty body, for trailers-only responses produced by the proxy.
    pub fn empty(mut record: CallRecord, code: Code) -> Self {
        record.finish(code);
        ResponseBody::of(State::Done, record)
    }

    /// A body in `state`, with nothing more to it.
    fn of(state: State, record: CallRecord) -> Self {
        ResponseBody {
            state,
            record: Some(record),
            shutdown: None,
            member: None,
            splitter: None,
            guard: None,
            held: None,
        }
    }

    fn end_with(&mut self, failure: ProxyFailure) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let (code, message) = failure.status();
        if let Some(record) = self.record.as_mut() {
            record.finish(code);
        }
        self.state = State::Done;
        Poll::Ready(Some(Ok(Frame::trailers(grpc::status_headers(code, &message)))))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    /// An error resets the client's stream with its reason (see `State::Upstream`).
    type Error = h2::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        match this.held.is_some() {
            true => this.poll_held(cx),
            false => this.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Done => true,
            State::Buffered { data, trailers } => data.is_empty() && trailers.is_none(),
            State::Queue(_) => false,
            // A trailers-only answer (an etcd error) must end with its HEADERS frame: gRPC
            // clients reject a stream that sends an empty DATA frame after such headers.
            State::Upstream { incoming, first } => first.is_none() && incoming.is_end_stream(),
        }
    }
}

impl ResponseBody {
    /// [`ResponseBody::poll_next`] for an answer that may wait for its client: a piece at a
    /// time, its count given back as the connection takes it, the wait for the client reported.
    fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if let Some(progress) = self.held.as_ref().and_then(|held| held.progress.as_ref()) {
            progress.taken();
        }
        if let State::Buffered { data, .. } = &mut self.state {
            if let Some(chunk) = data.front_mut() {
                if chunk.len() > ANSWER_PIECE {
                    let rest = chunk.split_off(ANSWER_PIECE);
                    data.insert(1, rest);
                }
            }
        }
        let polled = self.poll_next(cx);
        let more = !self.is_end_stream();
        if let (Some(held), Poll::Ready(Some(Ok(frame)))) = (self.held.as_mut(), &polled) {
            if let (Some(bytes), Some(data)) = (held.bytes.as_mut(), frame.data_ref()) {
                // Given back as the connection takes each piece; all of it once the last is taken.
                match more {
                    true => drop(bytes.split(data.len())),
                    false => held.bytes = None,
                }
            }
            if let Some(progress) = held.progress.as_ref().filter(|_| more && frame.is_data()) {
                progress.waiting();
            }
        }
        polled
    }

    /// The next frame of the answer.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self;
        if let Some(shutdown) = this.shutdown.as_mut() {
            if shutdown.as_mut().poll(cx).is_ready() {
                this.shutdown = None;
                if matches!(this.state, State::Upstream { .. } | State::Queue(_)) {
                    // Dropping the upstream body resets the stream at etcd, which cancels its watches.
                    return this.end_with(ProxyFailure::ShuttingDown);
                }
            }
        }
        match &mut this.state {
            State::Done => Poll::Ready(None),
            State::Queue(frames) => match frames.poll_next(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(frame)) => {
                    if frame.is_trailers() {
                        this.state = State::Done;
                    }
                    this.deliver(frame)
                }
                Poll::Ready(None) => this.end_with(ProxyFailure::StreamEndedWithoutStatus),
            },
            State::Buffered { data, trailers } => {
                if let Some(chunk) = data.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                let trailers = trailers.take();
                this.state = State::Done;
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
            State::Upstream { first: first @ Some(_), .. } => {
                let chunk = first.take().unwrap_or_default();
                this.deliver(Frame::data(chunk))
            }
            State::Upstream { incoming, .. } => match Pin::new(incoming).poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => this.deliver(frame),
                Poll::Ready(Some(Err(error))) if error::is_stream_answer(&error) => {
                    // etcd ended this stream on purpose: the client's ends the same way.
                    if let (Some(record), Some(reason)) = (this.record.as_mut(), error.reason()) {
                        record.finish(ProxyFailure::Reset(reason).status().0);
                    }
                    this.state = State::Done;
                    Poll::Ready(Some(Err(error)))
                }
                Poll::Ready(Some(Err(error))) => {
                    if let Some(record) = this.record.as_ref() {
                        record.metrics().stream_broken();
                    }
                    let member = this.member.as_deref().unwrap_or_default().to_owned();
                    tracing::warn!(%member, %error, "upstream stream broke; ending the client's call with Unavailable");
                    this.end_with(ProxyFailure::StreamBroke { member, error: error.to_string() })
                }
                Poll::Ready(None) => {
                    this.state = State::Done;
                    Poll::Ready(None)
                }
            },
        }
    }
}

impl ResponseBody {
    /// Passes one frame of etcd's answer on: splitting or refusing oversize messages for limited
    /// clients, and recording the status carried by trailers.
    fn deliver(&mut self, frame: Frame<Bytes>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self;
        match frame {
            frame if frame.is_data() && this.splitter.is_some() => {
                let (Ok(data), Some(splitter)) = (frame.into_data(), this.splitter.as_mut()) else {
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::new()))));
                };
                let (out, split) = splitter.feed(data);
                if split > 0 {
                    if let Some(record) = this.record.as_ref() {
                        record.metrics().watch_responses_split(split);
                    }
                }
                Poll::Ready(Some(Ok(Frame::data(out))))
            }
            frame if frame.is_data() && this.guard.is_some() => {
                let Some(guard) = this.guard.take() else {
                    return Poll::Ready(Some(Ok(frame)));
                };
                let length = frame.data_ref().and_then(|data| grpc::framed_length(data)).map(|length| length - 5);
                match length.and_then(|length| oversize_answer(length, guard.budget, || guard.key)) {
                    Some(refusal) => this.end_with(refusal),
                    None => Poll::Ready(Some(Ok(frame))),
                }
            }
            frame => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = Code::from_headers(trailers).unwrap_or(Code::Unknown);
                    if let Some(record) = this.record.as_mut() {
                        record.finish_explained(code, || grpc::status_message(trailers));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }
}

/// What a size-limited client's answer is checked against.
struct AnswerGuard {
    budget: usize,
    /// The one key the call asked for, printable: such an answer cannot be paged.
    key: Option<String>,
}

/// The refusal of an answer of `length` bytes to a client whose messages may not exceed `budget`
/// (its gRPC library would fail on it with a less helpful error), naming the call's one `key`.
fn oversize_answer(length: usize, budget: usize, key: impl FnOnce() -> Option<String>) -> Option<ProxyFailure> {
    (length > budget).then(|| ProxyFailure::AnswerTooLarge { length, budget, key: key() })
}

/// A whole gRPC response held by the proxy: used where the proxy must read etcd's answer
/// before answering (paged Ranges), or answers itself.
#[derive(Clone)]
pub struct Buffered {
    status: http::StatusCode,
    headers: HeaderMap,
    /// The body's chunks, sent in order without being joined.
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Buffered {
    /// Reads an upstream response to the end into one contiguous buffer; the error of a body
    /// that broke off (see [`Buffered::broken`]).
    pub async fn collect(response: http::Response<RecvBody>, first: Option<Bytes>) -> Result<Buffered, h2::Error> {
        let (parts, mut body) = response.into_parts();
        let mut whole = Contiguous::default();
        if let Some(first) = first {
            whole.push(first);
        }
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(error) => return Err(error),
            };
            match frame.into_data() {
                Ok(chunk) => whole.push(chunk),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        let data = whole.finish();
        let data = if data.is_empty() { Vec::new() } else { vec![data] };
        Ok(Buffered { status: parts.status, headers: parts.headers, data, trailers })
    }

    /// An answer that ended without data: etcd's headers and trailers.
    pub fn ended(parts: http::response::Parts, trailers: Option<HeaderMap>) -> Buffered {
        Buffered { status: parts.status, headers: parts.headers, data: Vec::new(), trailers }
    }

    /// The answer to a call of `route` whose upstream connection broke while etcd's answer was
    /// read: `Unavailable`, saying whether the call may have been applied.
    pub fn broken(error: &h2::Error, route: &Route) -> Buffered {
        Buffered::status(ProxyFailure::AnswerBroke { error: error.to_string(), replay: route.replay }.status())
    }

    /// A trailers-only answer with a status of the proxy's own.
    pub fn status((code, message): (Code, String)) -> Buffered {
        Buffered {
            status: http::StatusCode::OK,
            headers: grpc::status_headers(code, &message),
            data: Vec::new(),
            trailers: None,
        }
    }

    /// A successful answer carrying one message, already framed, in one or more chunks.
    pub fn message_ok(framed: Vec<Bytes>) -> Buffered {
        let mut headers = HeaderMap::with_capacity(1);
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        let mut trailers = HeaderMap::with_capacity(2);
        trailers.insert(grpc::GRPC_STATUS, http::HeaderValue::from_static("0"));
        Buffered { status: http::StatusCode::OK, headers, data: framed, trailers: Some(trailers) }
    }

    /// The same answer with its message replaced by `framed` (a framed message): etcd's
    /// headers and trailers are kept.
    pub fn with_message(mut self, framed: Bytes) -> Buffered {
        self.data = vec![framed];
        self
    }

    /// The same answer in memory of its own: chunks read from a connection may share a buffer
    /// much larger than themselves, which a long-lived copy would keep alive.
    pub fn detached(&self) -> Buffered {
        let mut data = Vec::with_capacity(self.data.iter().map(Bytes::len).sum());
        for chunk in &self.data {
            data.extend_from_slice(chunk);
        }
        Buffered {
            status: self.status,
            headers: self.headers.clone(),
            data: if data.is_empty() { Vec::new() } else { vec![Bytes::from(data)] },
            trailers: self.trailers.clone(),
        }
    }

    /// The gRPC status, from the headers (trailers-only) or the trailers.
    pub fn code(&self) -> Option<Code> {
        Code::from_headers(&self.headers).or_else(|| self.trailers.as_ref().and_then(Code::from_headers))
    }

    /// The status message, from the headers (trailers-only) or the trailers.
    pub fn status_message(&self) -> String {
        match Code::from_headers(&self.headers) {
            Some(_) => grpc::status_message(&self.headers),
            None => self.trailers.as_ref().map(grpc::status_message).unwrap_or_default(),
        }
    }

    /// The same answer with the client URLs of its `MemberList` message replaced by `urls`
    /// (see `upstream::rewrite_client_urls`); errors and unparsable answers pass unchanged.
    pub fn with_client_urls(self, urls: Option<&[String]>) -> Buffered {
        let (Some(urls), Some(Code::Ok), Some(message)) = (urls, self.code(), self.message()) else {
            return self;
        };
        match crate::upstream::rewrite_client_urls(&message, urls) {
            Some(rewritten) => self.with_message(grpc::frame(&rewritten)),
            None => self,
        }
    }

    /// The refusal to send this answer to a client whose messages may not exceed `budget`.
    pub fn oversize_for(&self, budget: usize, key: impl FnOnce() -> Option<String>) -> Option<ProxyFailure> {
        oversize_answer(self.message_length()?, budget, key)
    }

    /// Whether a client whose messages may not exceed `budget` can receive this answer.
    pub fn fits(&self, budget: usize) -> bool {
        self.message_length().is_none_or(|length| length <= budget)
    }

    /// Bytes of the answer's body.
    pub fn data_len(&self) -> usize {
        self.data.iter().map(Bytes::len).sum()
    }

    /// The length of the answer's message, without its frame prefix; `None` without one.
    fn message_length(&self) -> Option<usize> {
        self.data_len().checked_sub(5)
    }

    /// The single uncompressed message of the answer, without its frame prefix.
    pub fn message(&self) -> Option<Bytes> {
        let [data] = self.data.as_slice() else { return None };
        self.message_bytes().map(|message| data.slice_ref(message))
    }

    /// [`Buffered::message`], borrowed: no reference count moves (every write's answer is read).
    pub fn message_bytes(&self) -> Option<&[u8]> {
        let [data] = self.data.as_slice() else { return None };
        (data.first() == Some(&0) && grpc::framed_length(data) == Some(data.len())).then(|| &data[5..])
    }

    /// Turns it into the client's response, recording the call's status.
    pub fn finish(self, mut record: CallRecord) -> http::Response<ResponseBody> {
        let code = self.code().unwrap_or(Code::Unknown);
        record.finish_explained(code, || self.status_message());
        let state = if self.data.is_empty() && self.trailers.is_none() {
            State::Done
        } else {
            State::Buffered {
                data: self.data.into_iter().filter(|chunk| !chunk.is_empty()).collect(),
                trailers: self.trailers,
            }
        };
        let mut response = http::Response::new(ResponseBody::of(state, record));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

/// Joins a body's chunks into one buffer as they arrive, so that each chunk (and the connection
/// buffer it points into) is released at once instead of all of them living until the end:
/// a paged Range holds one page, not two.
#[derive(Default)]
struct Contiguous {
    /// A lone chunk is kept as it came: most answers arrive in one piece.
    first: Option<Bytes>,
    joined: Option<BytesMut>,
}

impl Contiguous {
    /// Room reserved up front from a message's length prefix; larger messages grow as they come.
    const MAX_RESERVE: usize = 64 << 20;

    fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        if let Some(joined) = self.joined.as_mut() {
            joined.extend_from_slice(&chunk);
            return;
        }
        let Some(first) = self.first.take() else {
            self.first = Some(chunk);
            return;
        };
        let expected = grpc::framed_length(&first).unwrap_or(0);
        let mut joined = BytesMut::with_capacity(expected.min(Self::MAX_RESERVE).max(first.len() + chunk.len()));
        joined.extend_from_slice(&first);
        joined.extend_from_slice(&chunk);
        self.joined = Some(joined);
    }

    fn finish(self) -> Bytes {
        match (self.joined, self.first) {
            (Some(joined), _) => joined.freeze(),
            (None, Some(first)) => first,
            (None, None) => Bytes::new(),
        }
    }
}

/// Reassembles gRPC messages of a Watch response stream and splits those over the budget.
struct WatchSplitter {
    budget: usize,
    /// Bytes of an incomplete message.
    pending: MessageReader,
}

impl WatchSplitter {
    /// Takes the next DATA chunk; returns what can be sent now and how many messages were split.
    fn feed(&mut self, data: Bytes) -> (Bytes, u64) {
        if self.pending.is_empty() && self.whole_messages_within_budget(&data) {
            return (data, 0);
        }
        self.pending.push(&data);
        let mut out = BytesMut::new();
        let mut split = 0;
        while let Some(message) = self.pending.next_message() {
            let parts = (message[0] == 0 && message.len() - 5 > self.budget)
                .then(|| etcd_compat_proto::etcdserverpb::WatchResponse::decode(&message[5..]).ok())
                .flatten();
            match parts {
                Some(response) => {
                    split += 1;
                    for part in crate::budget::split_watch_response(response, self.budget) {
                        out.extend_from_slice(&grpc::frame(&part.encode_to_vec()));
                    }
                }
                None => out.extend_from_slice(&message),
            }
        }
        (out.freeze(), split)
    }

    /// Whether `data` is a run of complete messages none of which is over the budget (the common case).
    fn whole_messages_within_budget(&self, data: &[u8]) -> bool {
        let mut rest = data;
        while !rest.is_empty() {
            match grpc::framed_length(rest) {
                Some(length) if length - 5 <= self.budget && rest.len() >= length => rest = &rest[length..],
                _ => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_answer_is_handed_over_in_pieces_and_its_count_given_back_as_they_go() {
        use crate::call::admission::{MemoryBudget, MemoryKind};
        use crate::transport::UnreadAnswers;

        let framed = grpc::frame(&vec![7u8; 200 * 1024]);
        let length = framed.len();
        let memory = MemoryBudget::new(1 << 20, MemoryKind::Responses);
        let unread = UnreadAnswers::new(Duration::from_secs(30), tokio_util::sync::CancellationToken::new());
        let record = CallRecord::new(Arc::new(Metrics::default()), 0, true);
        let mut response = Buffered::message_ok(vec![framed.clone()]).finish(record);
        let progress = unread.register();
        response.body_mut().hold(HeldAnswer::new(memory.try_hold(length), Some(Arc::clone(&progress))));
        assert_eq!(memory.held(), length);

        let mut body = response.into_body();
        let mut pieces = Vec::new();
        let mut held_after = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(piece) => {
                    assert!(progress.waiting_since() > 0, "a piece handed over waits for the client");
                    pieces.push(piece);
                    held_after.push(memory.held());
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        let sizes: Vec<usize> = pieces.iter().map(Bytes::len).collect();
        assert_eq!(sizes, vec![ANSWER_PIECE, ANSWER_PIECE, ANSWER_PIECE, length - 3 * ANSWER_PIECE]);
        assert_eq!(pieces.concat(), framed.to_vec(), "the answer's bytes, unchanged and in order");
        assert_eq!(held_after, vec![length - ANSWER_PIECE, length - 2 * ANSWER_PIECE, length - 3 * ANSWER_PIECE, 0]);
        assert_eq!(trailers.and_then(|t| Code::from_headers(&t)), Some(Code::Ok));
        assert_eq!(progress.waiting_since(), 0, "nothing waits once the trailers are taken");
        drop(body);
        assert_eq!(memory.held(), 0);
    }

    #[test]
    fn an_answer_fits_a_budget_as_large_as_its_message() {
        // Two chunks, as a limited client's assembled answer comes: the prefix counts for nothing.
        let framed = grpc::frame(&[7u8; 100]);
        let answer = Buffered::message_ok(vec![framed.slice(..40), framed.slice(40..)]);
        assert!(answer.fits(100));
        assert!(!answer.fits(99));
        assert!(answer.oversize_for(100, || None).is_none());
        match answer.oversize_for(99, || Some("k".to_owned())) {
            Some(ProxyFailure::AnswerTooLarge { length: 100, budget: 99, key: Some(key) }) => assert_eq!(key, "k"),
            other => panic!("expected AnswerTooLarge, got {other:?}"),
        }
        // A status without a message fits any budget.
        assert!(Buffered::status((Code::NotFound, "gone".to_owned())).fits(0));
    }
}
