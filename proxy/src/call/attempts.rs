//! Getting a request to a member: the members to try, in order; one attempt; and a retry on the
//! next member only when it is safe (a read, or a write etcd cannot have seen). [`Sender`] is
//! what every path that sends to etcd holds: the unary path, the Watch relay, the proxy's own
//! calls.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::admin::Metrics;
use crate::auth::AuthSessions;
use crate::error::{CallError, ProxyFailure, UpstreamError};
use crate::grpc::{self, CallShape, Route};
use crate::transport::{FeedReceiver, RecvBody, RequestBody, Upload};
use crate::upstream::{Cluster, Lane, Member, Target};

use super::relay::Buffered;

/// The pause before the second retry after a routing error (see `RoutingError::max_reroutes`).
const REROUTE_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Sends requests to the cluster, as a session's user when there is one (see `session`).
pub(crate) struct Sender {
    pub(super) cluster: Arc<Cluster>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) auth: Arc<AuthSessions>,
}

/// A request's body before it is sent: buffered bytes can be sent again, a stream only once.
pub(crate) enum PendingBody {
    Buffered(Bytes),
    Streaming(Option<Incoming>),
    /// Messages the proxy writes itself (relayed Watch streams).
    Channel(Option<FeedReceiver>),
}

impl PendingBody {
    /// The buffered request message, if the body is one.
    pub(crate) fn message(&self) -> Option<&Bytes> {
        match self {
            PendingBody::Buffered(message) => Some(message),
            PendingBody::Streaming(_) | PendingBody::Channel(_) => None,
        }
    }
}

impl Sender {
    /// The sender of requests to `cluster`, as the sessions of `auth`.
    pub(crate) fn new(cluster: Arc<Cluster>, metrics: Arc<Metrics>, auth: Arc<AuthSessions>) -> Sender {
        Sender { cluster, metrics, auth }
    }

    /// The process's metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Sends a request to the first member that takes it, retrying on the next one when safe.
    pub(crate) async fn send(
        &self,
        route: &Route,
        path_and_query: &http::uri::PathAndQuery,
        headers: &HeaderMap,
        body: &mut PendingBody,
    ) -> Result<(Response<RecvBody>, Arc<Member>), CallError> {
        let mut failures: Vec<UpstreamError> = Vec::new();
        // Unary calls and streams travel on separate connections (see `upstream::Lane`).
        let lane = if route.shape == CallShape::Unary { Lane::Calls } else { Lane::Streams };
        let target = self.cluster.view.target(route, body.message());
        let mut order = self.cluster.attempts(target);
        // etcd's latest routing error, kept to answer with if the retries find no member.
        let mut refused: Option<(Response<RecvBody>, Arc<Member>)> = None;
        let mut reroutes = 0;
        let mut attempts = 0;
        while let Some(member) = order.next() {
            if attempts > 0 {
                self.metrics.retried();
            }
            attempts += 1;
            match self.attempt(&member, lane, path_and_query, headers, body).await {
                Ok(response) => {
                    // Boxed: a rare path (see `call`).
                    let rerouted = match crate::upstream::routing_error(response.headers()) {
                        Some(error) => {
                            let may_retry =
                                reroutes < error.max_reroutes() && !matches!(body, PendingBody::Streaming(None));
                            Box::pin(self.reroute(&member, &response, route, target, may_retry, reroutes)).await
                        }
                        None => None,
                    };
                    if let Some(next) = rerouted {
                        reroutes += 1;
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
                        self.cluster.mark_failed(&member, &failure);
                        self.cluster.refresh_in_background();
                    }
                    let consumed = matches!(body, PendingBody::Streaming(None) | PendingBody::Channel(None));
                    let retry = failure.allows_retry(route.replay) && !consumed;
                    if !retry {
                        return Err(ProxyFailure::OutcomeUnknown(failure).into());
                    }
                    failures.push(failure);
                }
            }
        }
        refused.ok_or_else(|| ProxyFailure::NoMember(failures.iter().map(ToString::to_string).collect()).into())
    }

    /// The members to try after etcd's routing error in `response` from `member`, if it may be
    /// retried (see `Cluster::reroute`); from the second retry on, after a pause that doubles
    /// each time, so that retries span an election (about a second with etcd's defaults).
    async fn reroute(
        &self,
        member: &Arc<Member>,
        response: &Response<RecvBody>,
        route: &Route,
        target: Target,
        may_retry: bool,
        reroutes: u32,
    ) -> Option<Vec<Arc<Member>>> {
        let next = self.cluster.reroute(member, response.headers(), route, target, may_retry).await?;
        if reroutes > 0 {
            tokio::time::sleep(REROUTE_PAUSE * (1 << (reroutes - 1))).await;
        }
        Some(next)
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
        let upload = match body {
            PendingBody::Buffered(bytes) => Upload::Message(bytes.clone()),
            PendingBody::Streaming(stream) => match stream.take() {
                Some(stream) => Upload::Body(RequestBody::Streaming(stream)),
                None => return Err(already_sent()),
            },
            PendingBody::Channel(receiver) => match receiver.take() {
                Some(receiver) => Upload::Body(RequestBody::Channel(receiver)),
                None => return Err(already_sent()),
            },
        };
        let (response, _) = self.cluster.open(member, lane, path_and_query, headers, upload).await?;
        response.await.map_err(|source| UpstreamError::sending(member.endpoint.url(), source))
    }

    /// A unary call made by the proxy itself, read in full.
    pub(crate) async fn call(
        &self,
        path_and_query: &http::uri::PathAndQuery,
        headers: &HeaderMap,
        framed: Bytes,
    ) -> Buffered {
        let route = grpc::route(path_and_query.path());
        let mut body = PendingBody::Buffered(framed);
        match self.send(&route, path_and_query, headers, &mut body).await {
            Ok((response, _)) => {
                Buffered::collect(response, None).await.unwrap_or_else(|broken| Buffered::broken(&broken, &route))
            }
            Err(error) => Buffered::status(error.into_status()),
        }
    }
}

/// etcd's answer to a forwarded call.
pub(crate) enum Upstreamed {
    /// Still arriving; `first` is a DATA chunk already read from it.
    Streaming { response: Response<RecvBody>, first: Option<Bytes> },
    /// Complete: a status without a message, read in full.
    Ended(Buffered),
    /// Broke off before the proxy had read it (the member's connection failed): the caller
    /// decides whether the call may be sent again (see `Forwarder::read_answer`).
    Broke(h2::Error),
}

impl Upstreamed {
    /// Reads the first frame of a response: a unary answer that starts with trailers is an
    /// error, complete and small; one that starts with data goes on streaming.
    pub(crate) async fn peek(response: Response<RecvBody>) -> Upstreamed {
        let (parts, mut body) = response.into_parts();
        match body.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => Upstreamed::Streaming { response: Response::from_parts(parts, body), first: Some(data) },
                Err(frame) => Upstreamed::Ended(Buffered::ended(parts, frame.into_trailers().ok())),
            },
            Some(Err(error)) => Upstreamed::Broke(error),
            None => Upstreamed::Ended(Buffered::ended(parts, None)),
        }
    }
}

fn already_sent() -> UpstreamError {
    UpstreamError::Request { why: "the client's stream was already sent to another member".to_owned() }
}
