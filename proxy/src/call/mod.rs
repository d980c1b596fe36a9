//! The request path: what happens to a client's call between the HTTP/2 server and etcd.
//!
//! [`Forwarder::serve`] takes every call. It first checks what etcd would check before reading
//! it ([`admission`]: a gRPC request, a message etcd accepts, arriving in time), reads a
//! single-message request whole (so that it can be sent again to another member), decides who
//! the call acts as (the proxy's auth session for its token, see `auth`), and then serves it by
//! its method's kind, from the route table:
//! - Authenticate: checked with etcd, answered with a token of the proxy's ([`session`]);
//! - Range: for a client with a message size limit, paged under its budget ([`limited_range`]);
//!   otherwise as any unary call;
//! - any other unary call: sent to a member, retried on the next when safe ([`attempts`]), as
//!   the session's etcd user ([`session`]), and answered with etcd's bytes ([`relay`]);
//! - Watch: relayed by a task of its own, so that its watches outlive their upstream stream and
//!   a slow client holds only its own share ([`watch`]);
//! - LeaseKeepAlive: run by a task that moves it between members ([`keepalive`]);
//! - other streams: forwarded frame by frame.
//!
//! Messages are not decoded on the way: the request's frames and headers go up as they came, and
//! etcd's headers, frames and trailers come back as they were sent, so status codes, messages,
//! metadata and fields unknown to the proxy's protos all survive the trip. Depends on the
//! cluster (`upstream`), the transport and the rules modules below it, never on the listener.
//!
//! One rule for the whole path: a call's future is moved when its task is spawned, so every
//! byte of state it holds inline costs every call. What is rare (dialling, token renewals,
//! paging, rerouting, the stream kinds) is boxed where it is awaited, and the future of a plain
//! unary call stays small (about 2.5 KiB).

pub mod admission;
mod attempts;
mod cache_watch;
mod cached_read;
pub mod client_queue;
pub mod keepalive;
mod limited_range;
pub mod relay;
mod session;
pub mod watch;
mod watch_hub;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::{Metrics, Refusal};
use crate::auth::{self, AuthSessions, ClientInfo, Identity, Session};
use crate::budget::{BudgetPolicy, ClientBudget, KeySizeEstimate, LimitRule, LimitedLog};
use crate::cache::{Cacheable, ReadCache, Written};
use crate::config::Config;
use crate::error::{CallError, ProxyFailure};
use crate::grpc::{self, CallShape, Code, MethodKind, Replay, Route, Writes};
use crate::migrate::Migration;
use crate::transport::{RecvBody, UnreadAnswers};
use crate::upstream::{Cluster, Member};

use admission::{HeldBytes, MemoryBudget, MemoryKind, MessageLimits, NotGrpc, Refused, StreamLimits};
use attempts::{PendingBody, Sender, Upstreamed};
use relay::{Buffered, CallRecord, HeldAnswer, ResponseBody, StreamStart, ANSWER_PIECE};

/// The request's path and query, as sent on to etcd.
fn path_and_query(uri: &http::Uri) -> http::uri::PathAndQuery {
    uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

/// A call's outcome: the client's answer, or a reset of its stream.
pub type ServeResult = Result<Response<ResponseBody>, h2::Error>;
/// What [`Forwarder::call`] returns: boxed, so that each kind's future is only as large as it.
pub type ServeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ServeResult> + Send>>;

/// The forwarding service shared by all client connections.
pub struct Forwarder {
    sender: Arc<Sender>,
    budget: BudgetPolicy,
    key_sizes: KeySizeEstimate,
    limited_log: LimitedLog,
    /// Cancelled at shutdown so that long-lived streams end with a status instead of hanging.
    shutdown: CancellationToken,
    /// How client messages are read (size limit, stalls).
    message_limits: MessageLimits,
    /// What all single-message requests together may hold (`--max-held-request-bytes`).
    request_memory: Arc<MemoryBudget>,
    /// What answers waiting for their clients may hold together (`--max-held-response-bytes`).
    response_memory: Arc<MemoryBudget>,
    /// Largest unary answer read whole from etcd (`--max-buffered-response-bytes`).
    max_buffered_response: usize,
    /// Holds the auth store still while a migration mirrors the cluster.
    migration: Arc<Migration>,
    /// Answers to serializable Ranges (`--serializable-cache-bytes`); `None` when off.
    read_cache: Option<Arc<ReadCache<Buffered>>>,
    /// Shared upstream watches (`--watch-coalescing`); `None` when off.
    watch_hub: Option<Arc<watch_hub::WatchHub>>,
    watch_headers: watch::RecentHeaders,
}

/// A call once admitted and read: what every kind of call is served from.
struct Admitted {
    route: Route,
    record: CallRecord,
    headers: HeaderMap,
    path_and_query: http::uri::PathAndQuery,
    body: PendingBody,
    session: Option<Arc<Session>>,
    /// From the call's `grpc-timeout`.
    deadline: Option<Instant>,
    /// Counts the buffered request in `--max-held-request-bytes` until the call ends.
    _held: Option<HeldBytes>,
    /// Who calls, from the listener; its connection is told when the client stops taking a large
    /// answer or a stream it is behind on.
    client: Option<Arc<ClientInfo>>,
}

impl Forwarder {
    /// The forwarder of calls to `cluster`, as the sessions of `auth`, by `config`'s rules.
    pub fn new(
        cluster: Arc<Cluster>,
        metrics: Arc<Metrics>,
        auth: Arc<AuthSessions>,
        migration: Arc<Migration>,
        config: &Config,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let limits = &config.limits;
        let read_cache = cached_read::read_cache(config.serializable_cache_bytes);
        if let Some(cache) = &read_cache {
            let _ = metrics.read_cache.set(cache.stats());
        }
        let request_memory = MemoryBudget::new(limits.max_held_requests, MemoryKind::Requests);
        let _ = metrics.request_memory.set(Arc::clone(&request_memory) as Arc<dyn crate::admin::RenderMetrics>);
        let response_memory = MemoryBudget::new(limits.max_held_responses, MemoryKind::Responses);
        let _ = metrics.response_memory.set(Arc::clone(&response_memory) as Arc<dyn crate::admin::RenderMetrics>);
        let sender = Arc::new(Sender::new(cluster, metrics, auth));
        let stream_limits = StreamLimits {
            messages: MessageLimits {
                max_message: limits.max_request_message,
                stall_timeout: limits.request_body_timeout,
            },
            max_buffered: limits.max_buffered_response,
            memory: Arc::clone(&request_memory),
            queue: client_queue::Watched { memory: Some(Arc::clone(&response_memory)), unread: None },
        };
        let watch_hub = config.watch_coalescing.then(|| watch_hub::WatchHub::new(Arc::clone(&sender), stream_limits));
        if let Some(hub) = &watch_hub {
            let stats: Arc<dyn crate::admin::RenderMetrics> = hub.stats().clone();
            let _ = sender.metrics.watch_coalescing.set(stats);
        }
        Arc::new(Forwarder {
            sender,
            budget: config.budget.clone(),
            key_sizes: KeySizeEstimate::default(),
            limited_log: LimitedLog::default(),
            shutdown,
            message_limits: MessageLimits {
                max_message: limits.max_request_message,
                stall_timeout: limits.request_body_timeout,
            },
            request_memory,
            response_memory,
            max_buffered_response: limits.max_buffered_response,
            migration,
            read_cache,
            watch_hub,
            watch_headers: watch::RecentHeaders::default(),
        })
    }

    /// Serves one client call: etcd's answer, a gRPC status of the proxy's own, or (for what
    /// etcd would reset) a reset of the client's stream with etcd's reason.
    pub fn call(self: Arc<Self>, request: Request<Incoming>) -> ServeFuture {
        let route = grpc::route(request.uri().path());
        match route.kind {
            // A future of their own, far smaller than a unary call's: hyper holds it until the
            // answer's head, which for a stream waits on etcd, and a fleet opens thousands at once.
            MethodKind::Watch | MethodKind::KeepAlive => self.serve_long_lived(request, route),
            _ => Box::pin(self.serve(request, route)),
        }
    }

    /// A Watch or LeaseKeepAlive stream, relayed by a task of its own. Admitted before the
    /// returned future is first polled: only the wait for etcd's first answer is held in it.
    fn serve_long_lived(self: Arc<Self>, request: Request<Incoming>, route: Route) -> ServeFuture {
        let (record, parts, body, deadline) = match self.open_call(request, route) {
            Ok(opened) => opened,
            Err(reset) => return Box::pin(std::future::ready(Err(reset))),
        };
        let client = parts.extensions.get::<Arc<ClientInfo>>();
        let mut headers = parts.headers;
        let session = match self.identify(&mut headers, client.map(Arc::as_ref), route.kind) {
            Ok(session) => session,
            Err(failure) => return Box::pin(std::future::ready(Ok(status_response(record, failure)))),
        };
        let path_and_query = path_and_query(&parts.uri);
        let body = PendingBody::Streaming(Some(body));
        // Their queue tells the connection when the client stops taking what it holds.
        let client = client.cloned();
        let call = Admitted { route, record, headers, path_and_query, body, session, deadline, _held: None, client };
        match route.kind {
            MethodKind::Watch => match self.serve_watch(call) {
                Ok(started) => Box::pin(futures_util::FutureExt::map(started, Ok)),
                Err(refused) => Box::pin(std::future::ready(Ok(*refused))),
            },
            _ => Box::pin(async move { Ok(self.serve_keepalive(call).await) }),
        }
    }

    /// A Watch or LeaseKeepAlive call, by its kind.
    async fn serve_relayed_stream(&self, call: Admitted) -> Response<ResponseBody> {
        match call.route.kind {
            MethodKind::KeepAlive => self.serve_keepalive(call).await,
            _ => match self.serve_watch(call) {
                Ok(started) => started.await,
                Err(refused) => *refused,
            },
        }
    }

    /// What every call meets first: its record, and a reset for what is not gRPC, as etcd
    /// resets it (sent on, it would only come back as one).
    fn open_call(
        &self,
        request: Request<Incoming>,
        route: Route,
    ) -> Result<(CallRecord, http::request::Parts, Incoming, Option<Instant>), h2::Error> {
        let metrics = Arc::clone(&self.sender.metrics);
        let mut record = CallRecord::new(metrics, route.index, route.shape == CallShape::Unary);
        let deadline = match admission::check_headers(request.method(), request.headers()) {
            Ok(deadline) => deadline,
            Err(NotGrpc(why)) => {
                self.sender.metrics.refused(Refusal::Malformed);
                tracing::debug!(
                    path = request.uri().path(),
                    why,
                    "not a gRPC request; stream reset with PROTOCOL_ERROR, as etcd does"
                );
                record.finish(Code::Internal);
                return Err(h2::Error::from(h2::Reason::PROTOCOL_ERROR));
            }
        };
        // Connection-specific headers need no removing: h2 resets a stream that carries one
        // with PROTOCOL_ERROR before it becomes a request (etcd's server would answer it).
        let (parts, body) = request.into_parts();
        Ok((record, parts, body, deadline))
    }

    /// The caller's session, from its token or configured identity. Client tokens never go to
    /// etcd: the proxy's own session for the caller supplies one.
    fn identify(
        &self,
        headers: &mut HeaderMap,
        client: Option<&ClientInfo>,
        kind: MethodKind,
    ) -> Result<Option<Arc<Session>>, ProxyFailure> {
        let identity = self.sender.auth.identify(headers, client);
        headers.remove(&auth::TOKEN_HEADER);
        headers.remove(&auth::AUTHORIZATION_HEADER);
        match (kind, identity) {
            // A login needs no session, and a client with a stale token logs in again.
            (MethodKind::Authenticate, _) => Ok(None),
            (_, Identity::Session(session)) => Ok(Some(session)),
            (_, Identity::Anonymous) => Ok(None),
            (_, Identity::UnknownToken) => Err(ProxyFailure::InvalidToken),
        }
    }

    async fn serve(self: Arc<Self>, request: Request<Incoming>, route: Route) -> ServeResult {
        let (record, parts, mut body, deadline) = self.open_call(request, route)?;
        let mut headers = parts.headers;
        let path_and_query = path_and_query(&parts.uri);

        // Single-message requests are small; holding them is what makes a retry on another member possible.
        let (body, held) = match route.shape {
            CallShape::ClientStreaming => (PendingBody::Streaming(Some(body)), None),
            CallShape::Unary | CallShape::ServerStreaming => {
                match admission::read_unary(&mut body, self.message_limits, deadline, &self.request_memory).await {
                    Ok(Ok((message, held))) => (PendingBody::Buffered(message), Some(held)),
                    Ok(Err(refused)) => return Ok(self.refuse(record, refused)),
                    Err(error) => {
                        return Ok(status_response(record, ProxyFailure::RequestUnreadable(error.to_string())))
                    }
                }
            }
        };

        let mut extensions = parts.extensions;
        let client = extensions.remove::<Arc<ClientInfo>>();
        let session = match self.identify(&mut headers, client.as_deref(), route.kind) {
            Ok(session) => session,
            Err(failure) => return Ok(status_response(record, failure)),
        };
        let client_addr = client.as_ref().and_then(|c| c.addr);
        let mut call =
            Admitted { route, record, headers, path_and_query, body, session, deadline, _held: held, client };
        // Boxed: the rare and long-lived kinds; the plain unary call stays inline.
        match route.kind {
            MethodKind::Authenticate => Ok(Box::pin(self.serve_authenticate(call, client_addr)).await),
            MethodKind::Range | MethodKind::Unary => {
                // The mirror cannot carry users and roles to the new cluster: they stay still.
                if route.changes_auth_store {
                    if let Some(why) = self.migration.auth_store_frozen() {
                        return Ok(status_response(call.record, ProxyFailure::Migrating(why)));
                    }
                }
                let budget = self.budget.classify(&call.headers);
                // Serializable Ranges of fleets polling the same keys: answered from memory.
                let cacheable = match route.kind {
                    MethodKind::Range => self.cacheable(&call),
                    _ => None,
                };
                if cacheable.is_some() {
                    if let Some(answer) = self.cached_answer(&call, budget.bytes()) {
                        let unread = unread_of(&call.client);
                        return Ok(self.respond(answer, call.record, &call.route, &call.body, unread));
                    }
                }
                let limit = match budget {
                    // A Range of one key cannot be paged: it is forwarded below, under the same limit.
                    ClientBudget::Limited { bytes, rule }
                        if route.kind == MethodKind::Range
                            && call.body.message().is_some_and(|m| {
                                crate::budget::range_asked(m) == crate::budget::RangeAsked::KeyRange
                            }) =>
                    {
                        return Box::pin(self.serve_limited_range(call, bytes, rule, cacheable)).await;
                    }
                    budget => budget.bytes(),
                };
                // During a cutover, writes wait here until clients are switched (or not).
                let _pass = match route.replay {
                    Replay::Idempotent => None,
                    _ => match self.migration.hold.try_pass() {
                        Some(pass) => Some(pass),
                        None => Some(Box::pin(self.migration.hold.pass()).await),
                    },
                };
                let answer = self.forward_unary(&mut call).await;
                if let Ok(Ok(answered)) = &answer {
                    self.update_cache(&call, cacheable, answered);
                }
                self.unary_response(call, answer, limit)
            }
            // Not reached through `call`, which gives these a future of their own.
            MethodKind::Watch | MethodKind::KeepAlive => Ok(Box::pin(self.serve_relayed_stream(call)).await),
            MethodKind::ServerStream | MethodKind::ClientStream => Box::pin(self.serve_stream(call)).await,
        }
    }

    /// A client's login: checked with etcd, answered with a token of the proxy's.
    async fn serve_authenticate(&self, call: Admitted, client: Option<std::net::IpAddr>) -> Response<ResponseBody> {
        let Admitted { record, headers, path_and_query, body, deadline, .. } = call;
        let PendingBody::Buffered(message) = body else {
            return status_response(record, ProxyFailure::AuthenticateUndecodable);
        };
        let login = Box::pin(self.sender.authenticate(&headers, &path_and_query, &message, client));
        match admission::within(deadline, login).await {
            Ok(answer) => answer.finish(record),
            Err(refused) => self.refuse(record, refused),
        }
    }

    /// A Range from a client with a message size limit: paged under its budget, or forwarded
    /// as it is when it cannot be paged.
    async fn serve_limited_range(
        &self,
        mut call: Admitted,
        budget: usize,
        rule: LimitRule<'_>,
        cacheable: Option<Cacheable>,
    ) -> Result<Response<ResponseBody>, h2::Error> {
        if let PendingBody::Buffered(message) = &call.body {
            let limited =
                self.limited_range(&call.headers, &call.path_and_query, message, budget, rule, call.session.as_deref());
            match admission::within(call.deadline, Box::pin(limited)).await {
                Ok(Some((answer, whole))) => {
                    // Only a whole result is stored (etcd's own answer, or one assembled from pages
                    // read at one revision): a page, a cut or a refusal made for this budget is not.
                    if let (Some(range), true) = (cacheable, whole) {
                        self.remember(&call, range, &answer);
                    }
                    let unread = unread_of(&call.client);
                    return Ok(self.respond(answer, call.record, &call.route, &call.body, unread));
                }
                Ok(None) => {}
                Err(refused) => return Ok(self.refuse(call.record, refused)),
            }
        }
        let answer = self.forward_unary(&mut call).await;
        if let Ok(Ok(answered)) = &answer {
            self.update_cache(&call, cacheable, answered);
        }
        self.unary_response(call, answer, Some(budget))
    }

    /// Forwards a unary call within its deadline, and reads etcd's answer whole when it is no
    /// larger than `--max-buffered-response-bytes`: its bytes then leave the member connection
    /// at once, whether or not the client reads them (a few clients that stop reading would
    /// otherwise hold the connection's flow-control window, and every call on it would wait).
    /// The call's parts are used in place: a copy of them would sit in every call's future.
    async fn forward_unary(&self, call: &mut Admitted) -> Result<Result<UnaryAnswer, CallError>, Refused> {
        let work = std::pin::pin!(self.read_answer(
            call.session.as_deref(),
            &call.route,
            &call.path_and_query,
            &mut call.headers,
            &mut call.body,
            true
        ));
        admission::within(call.deadline, work).await
    }

    /// The client's answer to a unary call. `limit` is the client's message size limit: an
    /// answer over it cannot be cut, so it is refused with a clear status instead of the client
    /// library's size error.
    fn unary_response(
        &self,
        call: Admitted,
        answer: Result<Result<UnaryAnswer, CallError>, Refused>,
        limit: Option<usize>,
    ) -> Result<Response<ResponseBody>, h2::Error> {
        let record = call.record;
        let unread = unread_of(&call.client);
        match answer {
            Ok(Ok(UnaryAnswer::Whole(answer))) => Ok(
                match limit.and_then(|budget| answer.oversize_for(budget, || one_key_asked(&call.route, &call.body))) {
                    Some(refusal) => Buffered::status(refusal.status()).finish(record),
                    None => self.respond(answer, record, &call.route, &call.body, unread),
                },
            ),
            Ok(Ok(UnaryAnswer::Large { response, first, member })) => {
                let relayed = self.relay(response, Some(first), record, &call.route, &member, unread);
                Ok(match limit {
                    Some(budget) => {
                        relayed.map(|body| body.refuse_messages_over(budget, one_key_asked(&call.route, &call.body)))
                    }
                    None => relayed,
                })
            }
            Ok(Err(error)) => fail(record, error),
            Err(refused) => Ok(self.refuse(record, refused)),
        }
    }

    /// Sends a unary call and reads etcd's answer (whole when it is small enough). A read
    /// whose answer broke off with its member's connection is sent once more (`may_resend`),
    /// to the next member: reading again changes nothing, and a member stopped for a rolling
    /// restart or upgrade closes its connections under the calls it was answering.
    async fn read_answer(
        &self,
        session: Option<&Session>,
        route: &Route,
        path_and_query: &http::uri::PathAndQuery,
        headers: &mut HeaderMap,
        body: &mut PendingBody,
        may_resend: bool,
    ) -> Result<UnaryAnswer, CallError> {
        let (upstreamed, member) = self.sender.send_as(session, route, path_and_query, headers, body).await?;
        let broke = 'answered: {
            let (response, first) = match upstreamed {
                Upstreamed::Ended(answer) => return Ok(UnaryAnswer::Whole(answer)),
                Upstreamed::Streaming { response, first } => (response, first),
                Upstreamed::Broke(error) => break 'answered error,
            };
            let cluster = &self.sender.cluster;
            if cluster.view.rewrites_member_list(route, headers) {
                match Buffered::collect(response, first).await {
                    Ok(answer) => {
                        return Ok(UnaryAnswer::Whole(answer.with_client_urls(cluster.view.advertised_urls())))
                    }
                    Err(error) => break 'answered error,
                }
            }
            let (response, first) = match first {
                Some(first) => (response, first),
                None => match Upstreamed::peek(response).await {
                    Upstreamed::Ended(answer) => return Ok(UnaryAnswer::Whole(answer)),
                    Upstreamed::Streaming { response, first } => (response, first.unwrap_or_default()),
                    Upstreamed::Broke(error) => break 'answered error,
                },
            };
            match grpc::framed_length(&first) {
                Some(length) if length <= self.max_buffered_response + 5 => {
                    match Buffered::collect(response, Some(first)).await {
                        Ok(answer) => return Ok(UnaryAnswer::Whole(answer)),
                        Err(error) => error,
                    }
                }
                _ => return Ok(UnaryAnswer::Large { response, first, member }),
            }
        };
        let resend = may_resend && route.replay == Replay::Idempotent && matches!(body, PendingBody::Buffered(_));
        if !(resend && connection_lost(&broke)) {
            return Ok(UnaryAnswer::Whole(Buffered::broken(&broke, route)));
        }
        self.sender.cluster.mark_failed(&member, &broke);
        self.sender.metrics().retried();
        // Boxed: a rare path (see `call`), kept out of every call's future.
        Box::pin(self.read_answer(session, route, path_and_query, headers, body, false)).await
    }

    /// A Watch stream: relayed by a task of its own (see [`watch`]); the responses of a client
    /// with a message size limit are split under it.
    fn serve_watch(&self, call: Admitted) -> Result<StreamStart, Box<Response<ResponseBody>>> {
        let Admitted { record, headers, body, session, client: caller, .. } = call;
        let limit = self.budget.classify(&headers).bytes();
        let PendingBody::Streaming(Some(client)) = body else {
            return Err(Box::new(status_response(record, ProxyFailure::StreamNotStarted("watch"))));
        };
        let shutdown = self.shutdown.clone();
        let sender = Arc::clone(&self.sender);
        let hub = self.watch_hub.as_ref();
        let headers = self.watch_headers.share(headers);
        let started =
            watch::serve(sender, hub, session, headers, client, record, shutdown, self.stream_limits(&caller));
        Ok(started.split_watch_responses(limit))
    }

    /// A LeaseKeepAlive stream: run by a task that moves it between members (see [`keepalive`]).
    /// etcd checks no token on it, so the one it opens with may expire without harm.
    async fn serve_keepalive(&self, call: Admitted) -> Response<ResponseBody> {
        let Admitted { record, mut headers, path_and_query, body, session, client: caller, .. } = call;
        let PendingBody::Streaming(Some(client)) = body else {
            return status_response(record, ProxyFailure::StreamNotStarted("keep-alive"));
        };
        if let Some(session) = session.as_deref() {
            match self.sender.session_token(session, None).await {
                Ok(token) => Session::authorize(&token, &mut headers),
                Err(status) => return status_response(record, status),
            }
        }
        let context = keepalive::StreamContext {
            cluster: Arc::clone(&self.sender.cluster),
            metrics: Arc::clone(&self.sender.metrics),
            limits: self.stream_limits(&caller),
            shutdown: self.shutdown.clone(),
        };
        keepalive::serve(context, path_and_query, headers, client, record).await
    }

    /// Other streams (Snapshot, Observe, methods the protos don't know): forwarded frame by frame.
    async fn serve_stream(&self, call: Admitted) -> Result<Response<ResponseBody>, h2::Error> {
        let Admitted { route, record, mut headers, path_and_query, mut body, session, client, .. } = call;
        match self.sender.send_as(session.as_deref(), &route, &path_and_query, &mut headers, &mut body).await {
            Ok((Upstreamed::Ended(answer), _)) => Ok(answer.finish(record)),
            Ok((Upstreamed::Broke(error), _)) => Ok(Buffered::broken(&error, &route).finish(record)),
            Ok((Upstreamed::Streaming { response, first }, member)) => {
                Ok(self.relay(response, first, record, &route, &member, unread_of(&client)))
            }
            Err(error) => fail(record, error),
        }
    }

    /// Limits of the streams relayed message by message (Watch, keep-alives) for `client`.
    fn stream_limits(&self, client: &Option<Arc<ClientInfo>>) -> StreamLimits {
        StreamLimits {
            messages: self.message_limits,
            max_buffered: self.max_buffered_response,
            memory: Arc::clone(&self.request_memory),
            queue: client_queue::Watched {
                memory: Some(Arc::clone(&self.response_memory)),
                unread: unread_of(client).cloned(),
            },
        }
    }

    /// Ends a call the proxy refused itself.
    fn refuse(&self, record: CallRecord, refused: Refused) -> Response<ResponseBody> {
        self.sender.metrics.refused(refused.why);
        status_response(record, refused.failure)
    }

    /// Wraps etcd's response for the client, headers untouched.
    fn relay(
        &self,
        response: Response<RecvBody>,
        first: Option<Bytes>,
        record: CallRecord,
        route: &Route,
        member: &Member,
        unread: Option<&Arc<UnreadAnswers>>,
    ) -> Response<ResponseBody> {
        // Only streams need to hear about shutdown; unary calls finish on their own.
        let shutdown = (route.shape != CallShape::Unary).then(|| self.shutdown.clone().cancelled_owned());
        let (parts, incoming) = response.into_parts();
        let status_in_headers = Code::from_headers(&parts.headers).map(|code| (code, &parts.headers));
        let mut body = ResponseBody::upstream(incoming, first, record, status_in_headers, shutdown, member.name());
        // Flow control bounds what it holds, but a client that never reads would hold the
        // member connection's window (and with it every call on that connection) for ever.
        if let Some(unread) = unread {
            body.hold(HeldAnswer::new(None, Some(unread.register())));
        }
        Response::from_parts(parts, body)
    }

    /// The client's response carrying `answer`, read whole. One over [`ANSWER_PIECE`] may wait
    /// for its client: its bytes are counted in `--max-held-response-bytes` until the client's
    /// connection takes them, and its connection watches it (`--unread-response-timeout`). The
    /// answer of a call that changed nothing (`request`: a read, or a Txn that only reads) that
    /// finds no room is refused, since the call can be made again; that of a call that changed
    /// something is delivered in any case, uncounted.
    fn respond(
        &self,
        answer: Buffered,
        record: CallRecord,
        route: &Route,
        request: &PendingBody,
        unread: Option<&Arc<UnreadAnswers>>,
    ) -> Response<ResponseBody> {
        let length = answer.data_len();
        if length <= ANSWER_PIECE {
            return answer.finish(record);
        }
        let bytes = match self.response_memory.try_hold(length) {
            Some(bytes) => Some(bytes),
            None if changes_nothing(route, request) => {
                let limit = self.response_memory.limit();
                return self.refuse(record, Refused::response_memory_full(limit, length));
            }
            None => None,
        };
        let mut response = answer.finish(record);
        response.body_mut().hold(HeldAnswer::new(bytes, unread.map(UnreadAnswers::register)));
        response
    }
}

/// etcd's answer to a unary call.
enum UnaryAnswer {
    /// Read whole.
    Whole(Buffered),
    /// Larger than the proxy holds for a client: relayed as it arrives, `first` already read.
    Large { response: Response<RecvBody>, first: Bytes, member: Arc<Member> },
}

/// Whether a call changes nothing in etcd: a read, or a Txn whose branches only read (a
/// client may read through a Txn as well as through a Range).
fn changes_nothing(route: &Route, request: &PendingBody) -> bool {
    match route.replay {
        Replay::Idempotent => true,
        _ => {
            route.writes == Writes::Txn
                && request.message().and_then(|framed| framed.get(5..)).is_some_and(|message| {
                    matches!(crate::cache::written_ranges(route.writes, message), Some(Written::Ranges(ranges)) if ranges.is_empty())
                })
        }
    }
}

/// The answers the caller's connection (see [`Admitted::client`]) has not taken; a function of
/// the one field, so that the call's other parts can be moved meanwhile.
fn unread_of(client: &Option<Arc<ClientInfo>>) -> Option<&Arc<UnreadAnswers>> {
    client.as_ref()?.unread.as_ref()
}

/// The key of a Range of one key, printable, for a refusal that names it.
fn one_key_asked(route: &Route, body: &PendingBody) -> Option<String> {
    if route.kind != MethodKind::Range {
        return None;
    }
    match crate::budget::range_asked(body.message()?) {
        crate::budget::RangeAsked::OneKey(key) => Some(crate::budget::printable(key)),
        _ => None,
    }
}

/// Whether an answer broke off because its member's connection was lost (closed, failed, or
/// going away), rather than because etcd reset this one stream, which it would do again.
fn connection_lost(error: &h2::Error) -> bool {
    error.is_io() || error.is_go_away()
}

/// Ends a call that could not be forwarded: with a status, or with etcd's reset.
fn fail(mut record: CallRecord, error: CallError) -> Result<Response<ResponseBody>, h2::Error> {
    match error {
        CallError::Status(code, message) => Ok(status_response(record, (code, message))),
        CallError::Reset(reason) => {
            record.finish(ProxyFailure::Reset(reason).status().0);
            Err(h2::Error::from(reason))
        }
    }
}

/// A trailers-only gRPC response carrying a status of the proxy's own.
fn status_response(record: CallRecord, status: impl Into<Status>) -> Response<ResponseBody> {
    let Status(code, message) = status.into();
    if code != Code::Ok {
        tracing::debug!(code = code.name(), message, "call failed in the proxy");
    }
    let mut response = Response::new(ResponseBody::empty(record, code));
    *response.headers_mut() = grpc::status_headers(code, &message);
    response
}

/// A status for the client: a failure of the proxy's, or a code and message passed on.
struct Status(Code, String);

impl From<ProxyFailure> for Status {
    fn from(failure: ProxyFailure) -> Self {
        let (code, message) = failure.status();
        Status(code, message)
    }
}

impl From<(Code, String)> for Status {
    fn from((code, message): (Code, String)) -> Self {
        Status(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_compat_proto::etcdserverpb::{request_op, PutRequest, RangeRequest, RequestOp, TxnRequest};
    use prost::Message;

    fn framed(message: &impl Message) -> PendingBody {
        PendingBody::Buffered(grpc::frame(&message.encode_to_vec()))
    }

    #[test]
    fn reads_and_txns_that_only_read_change_nothing() {
        let range_op = RequestOp { request: Some(request_op::Request::RequestRange(RangeRequest::default())) };
        let put = PutRequest { key: b"k".to_vec().into(), ..Default::default() };
        let put_op = RequestOp { request: Some(request_op::Request::RequestPut(put.clone())) };
        let reading =
            TxnRequest { success: vec![range_op.clone()], failure: vec![range_op.clone()], ..Default::default() };
        let writing = TxnRequest { success: vec![range_op], failure: vec![put_op], ..Default::default() };
        let txn = grpc::route("/etcdserverpb.KV/Txn");
        assert!(changes_nothing(&grpc::route("/etcdserverpb.KV/Range"), &framed(&RangeRequest::default())));
        assert!(changes_nothing(&txn, &framed(&reading)));
        assert!(!changes_nothing(&txn, &framed(&writing)), "a Txn that may write");
        assert!(!changes_nothing(&grpc::route("/etcdserverpb.KV/Put"), &framed(&put)));
        assert!(
            !changes_nothing(&txn, &PendingBody::Buffered(Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff]))),
            "unreadable"
        );
    }
}
