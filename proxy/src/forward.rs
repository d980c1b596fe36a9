//! Where a client's call goes: classify it, pick a member, forward the bytes, relay the answer.
//!
//! Messages are not decoded here: the request's frames and headers go up as they came, and
//! etcd's response headers, frames and trailers come back as they were sent, so status codes,
//! messages, metadata and fields unknown to the proxy's protos all survive the trip.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use etcd_compat_proto::etcdserverpb::{AuthenticateRequest, AuthenticateResponse, RangeRequest};
use prost::Message;

use crate::admission::{self, MessageLimits, NotGrpc, Refused, StreamLimits};
use crate::auth::{
    self, AuthSessions, Authenticated, ClientInfo, Credentials, Identity, Secret, Session, UpstreamToken,
};
use crate::body::{Buffered, CallRecord, FeedReceiver, RequestBody, ResponseBody};
use crate::budget::{self, BudgetPolicy, ClientBudget, KeySizeEstimate, LimitedLog};
use crate::cluster;
use crate::config::ClientLimits;
use crate::error::{self, CallError, UpstreamError};
use crate::grpc::{self, CallShape, Code, Route};
use crate::h2_stream::RecvBody;
use crate::keepalive;
use crate::metrics::{Metrics, Refusal};
use crate::upstream::{Lane, Member, Upstream};
use crate::watch::{self, OpenedStream};

/// Further attempts of an Authenticate the proxy makes for a session, when etcd is unavailable.
const AUTHENTICATE_RETRIES: usize = 3;
/// Pause before each of them: about one election.
const AUTHENTICATE_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(300);

/// Connection-specific headers: meaningless across hops, and forbidden in HTTP/2.
const HOP_BY_HOP: [http::HeaderName; 5] = [
    http::header::CONNECTION,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// The forwarding service shared by all client connections.
pub struct Forwarder {
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    auth: Arc<AuthSessions>,
    budget: BudgetPolicy,
    key_sizes: KeySizeEstimate,
    limited_log: LimitedLog,
    /// Cancelled at shutdown so that long-lived streams end with a status instead of hanging.
    shutdown: CancellationToken,
    /// How client messages are read (size limit, stalls).
    message_limits: MessageLimits,
    /// Largest unary answer read whole from etcd (`--max-buffered-response-bytes`).
    max_buffered_response: usize,
}

/// A request's body before it is sent: buffered bytes can be sent again, a stream only once.
enum PendingBody {
    Buffered(Bytes),
    Streaming(Option<Incoming>),
    /// Messages the proxy writes itself (relayed Watch streams).
    Channel(Option<FeedReceiver>),
}

impl PendingBody {
    /// The buffered request message, if the body is one.
    fn message(&self) -> Option<&Bytes> {
        match self {
            PendingBody::Buffered(message) => Some(message),
            PendingBody::Streaming(_) | PendingBody::Channel(_) => None,
        }
    }
}

impl Forwarder {
    /// Creates the forwarder.
    pub fn new(
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
        budget: BudgetPolicy,
        auth: Arc<AuthSessions>,
        limits: &ClientLimits,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Forwarder {
            upstream,
            metrics,
            auth,
            budget,
            key_sizes: KeySizeEstimate::default(),
            limited_log: LimitedLog::default(),
            shutdown,
            message_limits: MessageLimits {
                max_message: limits.max_request_message,
                stall_timeout: limits.request_body_timeout,
            },
            max_buffered_response: limits.max_buffered_response,
        })
    }

    /// Limits of the streams relayed message by message (Watch, keep-alives).
    pub(crate) fn stream_limits(&self) -> StreamLimits {
        StreamLimits { messages: self.message_limits, max_buffered: self.max_buffered_response }
    }

    /// Serves one client call: etcd's answer, a gRPC status of the proxy's own, or (for what
    /// etcd would reset) a reset of the client's stream with etcd's reason.
    pub async fn serve(self: Arc<Self>, request: Request<Incoming>) -> Result<Response<ResponseBody>, h2::Error> {
        let route = grpc::route(request.uri().path());
        let mut record = CallRecord::new(Arc::clone(&self.metrics), route.index, route.shape == CallShape::Unary);
        // What etcd refuses before reading a request is refused here the same way: sent on, it
        // would only come back as a reset.
        let deadline = match admission::check_headers(request.method(), request.headers()) {
            Ok(deadline) => deadline,
            Err(NotGrpc(why)) => {
                self.metrics.refused(Refusal::Malformed);
                tracing::debug!(
                    path = request.uri().path(),
                    why,
                    "not a gRPC request; stream reset with PROTOCOL_ERROR, as etcd does"
                );
                record.finish(Code::Internal);
                return Err(h2::Error::from(h2::Reason::PROTOCOL_ERROR));
            }
        };
        let (parts, mut body) = request.into_parts();
        let mut headers = parts.headers;
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
        let path_and_query =
            parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));

        // Single-message requests are small; holding them is what makes a retry on another member possible.
        let mut body = match route.shape {
            CallShape::ClientStreaming => PendingBody::Streaming(Some(body)),
            CallShape::Unary | CallShape::ServerStreaming => {
                match admission::read_unary(&mut body, self.message_limits, deadline).await {
                    Ok(Ok(message)) => PendingBody::Buffered(message),
                    Ok(Err(refused)) => return Ok(self.refuse(record, refused)),
                    Err(error) => {
                        let message =
                            format!("etcd-compat-proxy: the request could not be read from the client: {error}");
                        return Ok(status_response(record, Code::Cancelled, &message));
                    }
                }
            }
        };

        // Client tokens never go to etcd: the proxy's own session for the caller supplies one.
        let identity = self.auth.identify(&headers, parts.extensions.get::<ClientInfo>());
        headers.remove(&auth::TOKEN_HEADER);
        headers.remove(&auth::AUTHORIZATION_HEADER);
        if route.index == grpc::authenticate_index() {
            if let PendingBody::Buffered(message) = &body {
                let client = parts.extensions.get::<ClientInfo>().and_then(|c| c.addr);
                let answer = admission::within(
                    deadline,
                    Box::pin(self.authenticate(&headers, &path_and_query, message, client)),
                );
                return Ok(match answer.await {
                    Ok(answer) => answer.finish(record),
                    Err(refused) => self.refuse(record, refused),
                });
            }
        }
        let session = match identity {
            Identity::Session(session) => Some(session),
            Identity::Anonymous => None,
            Identity::UnknownToken => {
                return Ok(status_response(record, Code::Unauthenticated, auth::INVALID_TOKEN_MESSAGE));
            }
        };

        // Keep-alive streams move to another member when theirs fails (see `keepalive`). etcd
        // checks no token on them, so the one they open with may expire without harm.
        let keepalive_client = match &mut body {
            PendingBody::Streaming(client) if keepalive::handles(path_and_query.path()) => client.take(),
            _ => None,
        };
        if let Some(client) = keepalive_client {
            if let Some(session) = session.as_deref() {
                match Box::pin(self.session_token(session, None)).await {
                    Ok(token) => Session::authorize(&token, &mut headers),
                    Err((code, message)) => return Ok(status_response(record, code, &message)),
                }
            }
            let context = keepalive::StreamContext {
                upstream: Arc::clone(&self.upstream),
                metrics: Arc::clone(&self.metrics),
                limits: self.stream_limits(),
                shutdown: self.shutdown.clone(),
            };
            // Boxed: rare, and its state would otherwise be copied with every call's future.
            return Ok(Box::pin(keepalive::serve(context, path_and_query, headers, client, record)).await);
        }

        // Only answers that grow with the data can outgrow a client's message size limit.
        let client_budget = match route.shape == CallShape::Unary || route.index == grpc::watch_index() {
            true => self.budget.classify(&headers),
            false => ClientBudget::Unlimited,
        };
        if let (ClientBudget::Limited { bytes, rule }, PendingBody::Buffered(message)) = (&client_budget, &body) {
            if route.index == grpc::range_index() {
                // Boxed: paging state is large and rare; inline it would be copied with every call's future.
                let limited =
                    Box::pin(self.limited_range(&headers, &path_and_query, message, *bytes, rule, session.as_deref()));
                match admission::within(deadline, limited).await {
                    Ok(Some(response)) => return Ok(response.finish(record)),
                    Ok(None) => {}
                    Err(refused) => return Ok(self.refuse(record, refused)),
                }
            }
        }
        if route.index == grpc::watch_index() {
            if let PendingBody::Streaming(Some(client)) = body {
                let limit = match client_budget {
                    ClientBudget::Limited { bytes, .. } => Some(bytes),
                    ClientBudget::Unlimited => None,
                };
                let shutdown = self.shutdown.clone().cancelled_owned();
                // Boxed: rare, and its state would otherwise be copied with every call's future.
                let response = Box::pin(watch::serve(Arc::clone(&self), session, headers, client, record, shutdown));
                let response = response.await;
                return Ok(match limit {
                    Some(budget) => response.map(|body| body.split_watch_responses(budget)),
                    None => response,
                });
            }
        }
        // Watch responses of limited clients are split when oversize. Other single answers (Txn
        // with ranges, sorted Ranges) cannot be cut, so oversize ones are refused with a clear
        // status instead of the client library's size error.
        let limit = match client_budget {
            ClientBudget::Limited { bytes, .. } => Some(bytes),
            ClientBudget::Unlimited => None,
        };
        if route.shape == CallShape::Unary {
            let work = std::pin::pin!(self.forward_unary(
                session.as_deref(),
                &route,
                &path_and_query,
                &mut headers,
                &mut body
            ));
            return match admission::within(deadline, work).await {
                Ok(Ok(UnaryAnswer::Whole(answer))) => Ok(match limit.and_then(|budget| answer.oversize_for(budget)) {
                    Some(status) => Buffered::status(status).finish(record),
                    None => answer.finish(record),
                }),
                Ok(Ok(UnaryAnswer::Large { response, first, member })) => {
                    let relayed = self.relay(response, Some(first), record, &route, &member);
                    Ok(match limit {
                        Some(budget) => relayed.map(|body| body.refuse_messages_over(budget)),
                        None => relayed,
                    })
                }
                Ok(Err(error)) => self.fail(record, error),
                Err(refused) => Ok(self.refuse(record, refused)),
            };
        }
        match self.send_as(session.as_deref(), &route, &path_and_query, &mut headers, &mut body).await {
            Ok((Upstreamed::Ended(answer), _)) => Ok(answer.finish(record)),
            Ok((Upstreamed::Streaming { response, first }, member)) => {
                let relayed = self.relay(response, first, record, &route, &member);
                Ok(match limit {
                    Some(budget) if route.index == grpc::watch_index() => {
                        relayed.map(|body| body.split_watch_responses(budget))
                    }
                    _ => relayed,
                })
            }
            Err(error) => self.fail(record, error),
        }
    }

    /// Forwards a unary call and reads etcd's answer whole when it is no larger than
    /// `--max-buffered-response-bytes`: its bytes then leave the member connection at once,
    /// whether or not the client reads them (a few clients that stop reading would otherwise
    /// hold the connection's flow-control window, and every call on it would wait).
    async fn forward_unary(
        &self,
        session: Option<&Session>,
        route: &Route,
        path_and_query: &http::uri::PathAndQuery,
        headers: &mut HeaderMap,
        body: &mut PendingBody,
    ) -> Result<UnaryAnswer, CallError> {
        let (upstreamed, member) = self.send_as(session, route, path_and_query, headers, body).await?;
        let (response, first) = match upstreamed {
            Upstreamed::Ended(answer) => return Ok(UnaryAnswer::Whole(answer)),
            Upstreamed::Streaming { response, first } => (response, first),
        };
        if self.upstream.view.rewrites_member_list(route, headers) {
            return Ok(UnaryAnswer::Whole(self.upstream.view.rewrite_member_list(response, first).await));
        }
        let (response, first) = match first {
            Some(first) => (response, first),
            None => match Upstreamed::peek(response).await {
                Upstreamed::Ended(answer) => return Ok(UnaryAnswer::Whole(answer)),
                Upstreamed::Streaming { response, first } => (response, first.unwrap_or_default()),
            },
        };
        match grpc::framed_length(&first) {
            Some(length) if length <= self.max_buffered_response + 5 => {
                Ok(UnaryAnswer::Whole(Buffered::collect(response, Some(first)).await.unwrap_or_else(|broken| broken)))
            }
            _ => Ok(UnaryAnswer::Large { response, first, member }),
        }
    }

    /// Ends a call the proxy refused itself.
    fn refuse(&self, record: CallRecord, refused: Refused) -> Response<ResponseBody> {
        self.metrics.refused(refused.why);
        status_response(record, refused.code, &refused.message)
    }

    /// Ends a call that could not be forwarded: with a status, or with etcd's reset.
    fn fail(&self, mut record: CallRecord, error: CallError) -> Result<Response<ResponseBody>, h2::Error> {
        match error {
            CallError::Status(code, message) => Ok(status_response(record, code, &message)),
            CallError::Reset(reason) => {
                record.finish(error::reset_status(reason).0);
                Err(h2::Error::from(reason))
            }
        }
    }

    /// The process's metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Opens an upstream Watch stream as `session`'s user (renewing its token first if `rejected`
    /// names the current one), with request messages from `receiver`.
    pub(crate) async fn open_watch_stream(
        &self,
        session: Option<&Session>,
        mut headers: HeaderMap,
        receiver: FeedReceiver,
        rejected: Option<u64>,
    ) -> Result<OpenedStream, (Code, String)> {
        let token_generation = match session {
            Some(session) => {
                let token = self.session_token(session, rejected).await?;
                Session::authorize(&token, &mut headers);
                Some(token.generation())
            }
            None => None,
        };
        let path = http::uri::PathAndQuery::from_static(grpc::WATCH_PATH);
        let route = grpc::route(grpc::WATCH_PATH);
        let mut body = PendingBody::Channel(Some(receiver));
        let (response, member) = self.send(&route, &path, &headers, &mut body).await.map_err(CallError::into_status)?;
        Ok(OpenedStream { response, member: member.name(), token_generation })
    }

    /// Sends a request as `session`'s etcd user (or as it came, without one); when etcd refuses
    /// the token, renews it once for all concurrent callers and sends a replayable request again.
    async fn send_as(
        &self,
        session: Option<&Session>,
        route: &Route,
        path_and_query: &http::uri::PathAndQuery,
        headers: &mut HeaderMap,
        body: &mut PendingBody,
    ) -> Result<(Upstreamed, Arc<Member>), CallError> {
        let Some(session) = session else {
            let (response, member) = self.send(route, path_and_query, headers, body).await?;
            return Ok((Upstreamed::Streaming { response, first: None }, member));
        };
        // Boxed: renewals and retries make this path's state large; inline it would be copied
        // with every call's future, authenticated or not.
        Box::pin(self.send_with_session(session, route, path_and_query, headers, body)).await
    }

    async fn send_with_session(
        &self,
        session: &Session,
        route: &Route,
        path_and_query: &http::uri::PathAndQuery,
        headers: &mut HeaderMap,
        body: &mut PendingBody,
    ) -> Result<(Upstreamed, Arc<Member>), CallError> {
        let mut rejected = None;
        loop {
            let token = self.session_token(session, rejected).await?;
            Session::authorize(&token, headers);
            let (response, member) = self.send(route, path_and_query, headers, body).await?;
            let retryable = rejected.is_none() && matches!(body, PendingBody::Buffered(_));
            let answer = match Code::from_headers(response.headers()) {
                Some(_) => Upstreamed::Ended(Buffered::collect(response, None).await.unwrap_or_else(|failed| failed)),
                // etcd behind TLS sends a unary error as headers, then trailers: look at the first frame.
                None if retryable && route.shape == CallShape::Unary => Upstreamed::peek(response).await,
                None => Upstreamed::Streaming { response, first: None },
            };
            let refused_token = match &answer {
                Upstreamed::Ended(ended) => {
                    ended.code().is_some_and(|code| auth::is_token_rejection(code, &ended.status_message()))
                }
                Upstreamed::Streaming { .. } => false,
            };
            if !refused_token || !retryable {
                return Ok((answer, member));
            }
            self.metrics.auth_retried();
            rejected = Some(token.generation());
        }
    }

    /// The session's current etcd token, renewed first if due or if `rejected` names it.
    async fn session_token(&self, session: &Session, rejected: Option<u64>) -> Result<UpstreamToken, (Code, String)> {
        let renewed = session.token(rejected, |credentials| self.authenticate_upstream(credentials)).await;
        renewed.map_err(|(code, message)| {
            tracing::warn!(user = session.user(), code = code.name(), %message, "etcd refused to renew a session's token");
            // Only a refusal of the credentials themselves is worth a new login; a cluster that is
            // briefly unavailable is reported as such, and the client retries.
            let credentials_refused = matches!(code, Code::InvalidArgument | Code::PermissionDenied | Code::NotFound);
            if session.issued_to_client() && credentials_refused {
                // The client authenticates again and then sees etcd's own answer to its credentials.
                (Code::Unauthenticated, auth::INVALID_TOKEN_MESSAGE.to_owned())
            } else {
                (code, message)
            }
        })
    }

    /// Asks etcd for a token for `credentials` (sessions renewing theirs).
    async fn authenticate_upstream(&self, credentials: Credentials) -> Authenticated {
        self.metrics.auth_renewed();
        let mut request = AuthenticateRequest {
            name: credentials.user.clone(),
            password: String::from_utf8_lossy(credentials.password.expose()).into_owned(),
        };
        let mut encoded = request.encode_to_vec();
        zeroize::Zeroize::zeroize(&mut request.password);
        let framed = grpc::frame(&encoded);
        zeroize::Zeroize::zeroize(&mut encoded);
        let mut headers = HeaderMap::with_capacity(2);
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        let path = http::uri::PathAndQuery::from_static(grpc::AUTHENTICATE_PATH);
        // Authenticating again is harmless (at worst etcd issues two tokens), so a cluster busy
        // electing a leader is given a few tries.
        let mut answer = self.call(&path, &headers, framed.clone()).await;
        for _ in 0..AUTHENTICATE_RETRIES {
            if answer.code() != Some(Code::Unavailable) {
                break;
            }
            tokio::time::sleep(AUTHENTICATE_RETRY_PAUSE).await;
            answer = self.call(&path, &headers, framed.clone()).await;
        }
        match answer.code() {
            Some(Code::Ok) => match answer.message().and_then(|m| AuthenticateResponse::decode(m).ok()) {
                Some(response) => Authenticated::Token(response.token),
                None => Authenticated::Refused(
                    Code::Internal,
                    "etcd-compat-proxy: cannot decode etcd's Authenticate answer".to_owned(),
                ),
            },
            code => Authenticated::Refused(code.unwrap_or(Code::Unknown), answer.status_message()),
        }
    }

    /// A client's Authenticate: checked with etcd, answered with a proxy token standing for a new
    /// session; etcd's refusals pass through unchanged, and repeated failures are slowed down.
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        path_and_query: &http::uri::PathAndQuery,
        message: &Bytes,
        client: Option<std::net::IpAddr>,
    ) -> Buffered {
        let request = match message.first() {
            Some(0) if message.len() >= 5 => AuthenticateRequest::decode(&message[5..]).ok(),
            _ => None,
        };
        let Some(mut request) = request else {
            return Buffered::status((
                Code::InvalidArgument,
                "etcd-compat-proxy: the Authenticate request could not be decoded (compressed or malformed); send an uncompressed AuthenticateRequest".to_owned(),
            ));
        };
        let turn = self.auth.admit_login(client).await;
        let answer = self.call(path_and_query, headers, message.clone()).await;
        let password = Secret::new(std::mem::take(&mut request.password).into_bytes());
        let credentials = Credentials { user: std::mem::take(&mut request.name), password };
        // etcd answers wrong credentials with InvalidArgument; anything else says nothing about them.
        turn.finish(match answer.code() {
            Some(Code::Ok) => Some(true),
            Some(Code::InvalidArgument) => Some(false),
            _ => None,
        });
        if answer.code() != Some(Code::Ok) {
            return answer;
        }
        let Some(mut response) = answer.message().and_then(|m| AuthenticateResponse::decode(m).ok()) else {
            return Buffered::status((
                Code::Internal,
                "etcd-compat-proxy: cannot decode etcd's Authenticate answer".to_owned(),
            ));
        };
        let user = credentials.user.clone();
        match self.auth.open(credentials, std::mem::take(&mut response.token)) {
            Ok(proxy_token) => {
                tracing::debug!(%user, "client authenticated; session opened");
                response.token = proxy_token;
                Buffered::message_ok(vec![grpc::frame_message(&response)])
            }
            Err(status) => Buffered::status(status),
        }
    }

    /// A unary call made by the proxy itself, read in full.
    async fn call(&self, path_and_query: &http::uri::PathAndQuery, headers: &HeaderMap, framed: Bytes) -> Buffered {
        let route = grpc::route(path_and_query.path());
        let mut body = PendingBody::Buffered(framed);
        match self.send(&route, path_and_query, headers, &mut body).await {
            Ok((response, _)) => Buffered::collect(response, None).await.unwrap_or_else(|failed| failed),
            Err(error) => Buffered::status(error.into_status()),
        }
    }

    /// Sends a request to the first member that takes it, retrying on the next one when safe.
    async fn send(
        &self,
        route: &Route,
        path_and_query: &http::uri::PathAndQuery,
        headers: &HeaderMap,
        body: &mut PendingBody,
    ) -> Result<(Response<RecvBody>, Arc<Member>), CallError> {
        let mut failures: Vec<UpstreamError> = Vec::new();
        // Unary calls and streams travel on separate connections (see `upstream::Lane`).
        let lane = if route.shape == CallShape::Unary { Lane::Calls } else { Lane::Streams };
        let target = self.upstream.view.target(route, body.message());
        let mut order = self.upstream.attempts(target);
        // etcd's routing error, kept to answer with if the retry finds no other member.
        let mut refused: Option<(Response<RecvBody>, Arc<Member>)> = None;
        let mut attempts = 0;
        while let Some(member) = order.next() {
            if attempts > 0 {
                self.metrics.retried();
            }
            attempts += 1;
            match self.attempt(&member, lane, path_and_query, headers, body).await {
                Ok(response) => {
                    // etcd's routing errors (learner, not or no leader) get one retry elsewhere when safe.
                    let may_retry = refused.is_none() && !matches!(body, PendingBody::Streaming(None));
                    // Boxed: refreshing the view is rare and its state large.
                    let rerouted = match cluster::routing_error(response.headers()) {
                        Some(_) => {
                            Box::pin(self.upstream.reroute(&member, response.headers(), route, target, may_retry)).await
                        }
                        None => None,
                    };
                    if let Some(next) = rerouted {
                        order.restart_with(next);
                        refused = Some((response, member));
                        continue;
                    }
                    return Ok((response, member));
                }
                Err(UpstreamError::Reset { endpoint, reason }) => {
                    // etcd's answer to this request, which any member would give too: passed on,
                    // and no reason to avoid the member.
                    tracing::debug!(
                        member = endpoint,
                        ?reason,
                        path = path_and_query.path(),
                        "etcd reset the stream; resetting the client's with the same reason"
                    );
                    return Err(CallError::Reset(reason));
                }
                Err(failure) => {
                    // A request the proxy could not build says nothing about the member's health.
                    if failure.is_member_fault() {
                        self.upstream.mark_failed(&member, &failure);
                        self.upstream.refresh_in_background();
                    }
                    let consumed = matches!(body, PendingBody::Streaming(None) | PendingBody::Channel(None));
                    let retry = failure.allows_retry(route.replay) && !consumed;
                    if !retry {
                        return Err(error::outcome_unknown_status(&failure).into());
                    }
                    failures.push(failure);
                }
            }
        }
        refused.ok_or_else(|| error::no_member_status(&failures).into())
    }

    /// A Range from a client with a size budget; `None` when it is simply forwarded.
    async fn limited_range(
        &self,
        headers: &HeaderMap,
        path_and_query: &http::uri::PathAndQuery,
        message: &Bytes,
        budget: usize,
        rule: &str,
        session: Option<&Session>,
    ) -> Option<Buffered> {
        // Compressed (flag 1) or malformed frames are left for etcd to judge.
        let request = match message.first() {
            Some(0) if message.len() >= 5 => RangeRequest::decode(&message[5..]).ok()?,
            _ => return None,
        };
        if !budget::pageable(&request) {
            return None;
        }
        let route = grpc::route(path_and_query.path());
        let key = request.key.clone();
        let fetch = |page: RangeRequest| {
            let mut body = PendingBody::Buffered(grpc::frame(&page.encode_to_vec()));
            let mut headers = headers.clone();
            async move {
                let (answer, _) = self
                    .send_as(session, &route, path_and_query, &mut headers, &mut body)
                    .await
                    .map_err(|error| Buffered::status(error.into_status()))?;
                let buffered = match answer {
                    Upstreamed::Ended(ended) => ended,
                    Upstreamed::Streaming { response, first } => Buffered::collect(response, first).await?,
                };
                if buffered.code() != Some(Code::Ok) {
                    return Err(buffered);
                }
                let raw = buffered.message().ok_or_else(|| {
                    Buffered::status((
                        Code::Internal,
                        "etcd-compat-proxy: etcd answered a Range page without a message".to_owned(),
                    ))
                })?;
                budget::Page::parse(raw).map_err(|e| {
                    Buffered::status((
                        Code::Internal,
                        format!("etcd-compat-proxy: cannot decode etcd's Range page: {e}"),
                    ))
                })
            }
        };
        let answer = budget::serve_range(&self.budget, budget, &self.key_sizes, request, fetch).await;
        let (outcome, response) = match answer {
            budget::Answer::Raw(raw) => {
                (budget::Outcome::Whole, Buffered::message_ok(vec![grpc::frame_prefix(raw.len()), raw]))
            }
            budget::Answer::Assembled(framed, outcome) => (outcome, Buffered::message_ok(framed)),
            budget::Answer::Refused(message) => {
                (budget::Outcome::Refused, Buffered::status((Code::ResourceExhausted, message)))
            }
            budget::Answer::Upstream(failed) => return Some(failed),
        };
        self.metrics.budget_applied(outcome, self.budget.truncate_prefix_label(&key));
        if outcome != budget::Outcome::Whole && self.limited_log.should_log(&key) {
            tracing::info!(
                key = %budget::printable(&key),
                rule,
                budget,
                outcome = outcome.label(),
                "Range answer limited for a client with a message size limit"
            );
        } else {
            tracing::debug!(key = %budget::printable(&key), rule, budget, outcome = outcome.label(), "limited Range");
        }
        Some(response)
    }

    /// Sends the request to one member and waits for its response headers.
    async fn attempt(
        &self,
        member: &Member,
        lane: Lane,
        path_and_query: &http::uri::PathAndQuery,
        headers: &HeaderMap,
        body: &mut PendingBody,
    ) -> Result<Response<RecvBody>, UpstreamError> {
        let mut connection = self.upstream.connection(member, lane).await?;
        // Waiting for capacity before taking the body keeps a client stream usable for the next member.
        connection
            .ready()
            .await
            .map_err(|source| UpstreamError::NotSent { endpoint: member.endpoint.url(), source })?;
        let upstream_body = match body {
            PendingBody::Buffered(bytes) => RequestBody::Buffered(Some(bytes.clone())),
            PendingBody::Streaming(stream) => match stream.take() {
                Some(stream) => RequestBody::Streaming(stream),
                None => return Err(already_sent()),
            },
            PendingBody::Channel(receiver) => match receiver.take() {
                Some(receiver) => RequestBody::Channel(receiver),
                None => return Err(already_sent()),
            },
        };
        let mut request = Request::new(upstream_body);
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = member
            .uri(path_and_query.clone())
            .map_err(|e| UpstreamError::Request { why: format!("cannot address {path_and_query}: {e}") })?;
        *request.headers_mut() = headers.clone();
        member.stats.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        connection.send_request(request).await.map_err(|source| UpstreamError::sending(member.endpoint.url(), source))
    }

    /// Wraps etcd's response for the client, headers untouched.
    fn relay(
        &self,
        response: Response<RecvBody>,
        first: Option<Bytes>,
        record: CallRecord,
        route: &Route,
        member: &Member,
    ) -> Response<ResponseBody> {
        let status_in_headers = Code::from_headers(response.headers());
        // Only streams need to hear about shutdown; unary calls finish on their own.
        let shutdown = (route.shape != CallShape::Unary).then(|| self.shutdown.clone().cancelled_owned());
        response
            .map(|incoming| ResponseBody::upstream(incoming, first, record, status_in_headers, shutdown, member.name()))
    }
}

/// etcd's answer to a forwarded call.
enum Upstreamed {
    /// Still arriving; `first` is a DATA chunk already read from it.
    Streaming { response: Response<RecvBody>, first: Option<Bytes> },
    /// Complete: a status without a message, read in full.
    Ended(Buffered),
}

impl Upstreamed {
    /// Reads the first frame of a response: a unary answer that starts with trailers is an
    /// error, complete and small; one that starts with data goes on streaming.
    async fn peek(response: Response<RecvBody>) -> Upstreamed {
        let (parts, mut body) = response.into_parts();
        match body.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => Upstreamed::Streaming { response: Response::from_parts(parts, body), first: Some(data) },
                Err(frame) => Upstreamed::Ended(Buffered::ended(parts, frame.into_trailers().ok())),
            },
            Some(Err(error)) => Upstreamed::Ended(Buffered::broken(&error)),
            None => Upstreamed::Ended(Buffered::ended(parts, None)),
        }
    }
}

/// etcd's answer to a unary call.
enum UnaryAnswer {
    /// Read whole.
    Whole(Buffered),
    /// Larger than the proxy holds for a client: relayed as it arrives, `first` already read.
    Large { response: Response<RecvBody>, first: Bytes, member: Arc<Member> },
}

fn already_sent() -> UpstreamError {
    UpstreamError::Request { why: "the client's stream was already sent to another member".to_owned() }
}

/// A trailers-only gRPC response carrying a status produced by the proxy.
fn status_response(record: CallRecord, code: Code, message: &str) -> Response<ResponseBody> {
    if code != Code::Ok {
        tracing::debug!(code = code.name(), message, "call failed in the proxy");
    }
    let mut response = Response::new(ResponseBody::empty(record, code));
    *response.headers_mut() = grpc::status_headers(code, message);
    response
}
