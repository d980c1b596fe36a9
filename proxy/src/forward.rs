//! Where a client's call goes: classify it, pick a member, forward the bytes, relay the answer.
//!
//! Messages are not decoded here: the request's frames and headers go up as they came, and
//! etcd's response headers, frames and trailers come back as they were sent, so status codes,
//! messages, metadata and fields unknown to the proxy's protos all survive the trip.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use etcd_compat_proto::etcdserverpb::RangeRequest;
use prost::Message;

use crate::body::{Buffered, CallRecord, RequestBody, ResponseBody};
use crate::budget::{self, BudgetPolicy, ClientBudget, KeySizeEstimate, LimitedLog};
use crate::error::{self, UpstreamError};
use crate::grpc::{self, CallShape, Code, Route};
use crate::keepalive;
use crate::metrics::Metrics;
use crate::upstream::{Member, Upstream};

/// Connection-specific headers: meaningless across hops, and forbidden in HTTP/2.
const HOP_BY_HOP: [&str; 5] = ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"];

/// The forwarding service shared by all client connections.
pub struct Forwarder {
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    budget: BudgetPolicy,
    key_sizes: KeySizeEstimate,
    limited_log: LimitedLog,
    /// Cancelled at shutdown so that long-lived streams end with a status instead of hanging.
    shutdown: CancellationToken,
}

/// A request's body before it is sent: buffered bytes can be sent again, a stream only once.
enum PendingBody {
    Buffered(Bytes),
    Streaming(Option<Incoming>),
}

impl PendingBody {
    /// The buffered request message, if the body is one.
    fn message(&self) -> Option<&Bytes> {
        match self {
            PendingBody::Buffered(message) => Some(message),
            PendingBody::Streaming(_) => None,
        }
    }
}

impl Forwarder {
    /// Creates the forwarder.
    pub fn new(
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
        budget: BudgetPolicy,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Forwarder {
            upstream,
            metrics,
            budget,
            key_sizes: KeySizeEstimate::default(),
            limited_log: LimitedLog::default(),
            shutdown,
        })
    }

    /// Serves one client call; errors become gRPC statuses, never HTTP errors.
    pub async fn serve(self: Arc<Self>, request: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
        let route = grpc::route(request.uri().path());
        let record = CallRecord::new(Arc::clone(&self.metrics), route.index, route.shape == CallShape::Unary);
        let (parts, body) = request.into_parts();
        let mut headers = parts.headers;
        for name in HOP_BY_HOP {
            headers.remove(name);
        }
        let path_and_query =
            parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));

        // Keep-alive streams move to another member when theirs fails (see `keepalive`).
        if keepalive::handles(path_and_query.path()) {
            let shutdown = self.shutdown.clone();
            let upstream = Arc::clone(&self.upstream);
            return Ok(keepalive::serve(upstream, path_and_query, headers, body, record, shutdown).await);
        }

        // Single-message requests are small; holding them is what makes a retry on another member possible.
        let mut body = match route.shape {
            CallShape::ClientStreaming => PendingBody::Streaming(Some(body)),
            CallShape::Unary | CallShape::ServerStreaming => match body.collect().await {
                Ok(collected) => PendingBody::Buffered(collected.to_bytes()),
                Err(error) => {
                    let message = format!("etcd-compat-proxy: the request could not be read from the client: {error}");
                    return Ok(status_response(record, Code::Cancelled, &message));
                }
            },
        };

        // Only answers that grow with the data can outgrow a client's message size limit.
        let client_budget = match route.shape == CallShape::Unary || route.index == grpc::watch_index() {
            true => self.budget.classify(&headers),
            false => ClientBudget::Unlimited,
        };
        if let (ClientBudget::Limited { bytes, rule }, PendingBody::Buffered(message)) = (&client_budget, &body) {
            if route.index == grpc::range_index() {
                // Boxed: paging state is large and rare; inline it would be copied with every call's future.
                let limited = Box::pin(self.limited_range(&headers, &path_and_query, message, *bytes, rule));
                if let Some(response) = limited.await {
                    return Ok(response.finish(record));
                }
            }
        }
        // Watch responses of limited clients are split when oversize. Other single answers (Txn
        // with ranges, sorted Ranges) cannot be cut, so oversize ones are refused with a clear
        // status instead of the client library's size error.
        let limit = match client_budget {
            ClientBudget::Limited { bytes, .. } => Some(bytes),
            ClientBudget::Unlimited => None,
        };
        match self.send(&route, &path_and_query, &headers, &mut body).await {
            Ok((response, member)) => {
                if self.upstream.view.rewrites_member_list(&route, &headers) {
                    return Ok(self.upstream.view.rewrite_member_list(response).await.finish(record));
                }
                let relayed = self.relay(response, record, &route, &member);
                Ok(match limit {
                    Some(budget) if route.index == grpc::watch_index() => {
                        relayed.map(|body| body.split_watch_responses(budget))
                    }
                    Some(budget) => relayed.map(|body| body.refuse_messages_over(budget)),
                    None => relayed,
                })
            }
            Err((code, message)) => Ok(status_response(record, code, &message)),
        }
    }

    /// Sends a request to the first member that takes it, retrying on the next one when safe.
    async fn send(
        &self,
        route: &Route,
        path_and_query: &http::uri::PathAndQuery,
        headers: &HeaderMap,
        body: &mut PendingBody,
    ) -> Result<(Response<Incoming>, Arc<Member>), (Code, String)> {
        let mut failures: Vec<UpstreamError> = Vec::new();
        let target = self.upstream.view.target(route, body.message());
        let mut order = self.upstream.attempt_order_for(target).into_iter();
        // etcd's routing error, kept to answer with if the retry finds no other member.
        let mut refused: Option<(Response<Incoming>, Arc<Member>)> = None;
        let mut attempts = 0;
        while let Some(member) = order.next() {
            if attempts > 0 {
                self.metrics.retried();
            }
            attempts += 1;
            match self.attempt(&member, path_and_query, headers, body).await {
                Ok(response) => {
                    // etcd's routing errors (learner, not or no leader) get one retry elsewhere when safe.
                    let may_retry = refused.is_none() && !matches!(body, PendingBody::Streaming(None));
                    if let Some(next) =
                        self.upstream.reroute(&member, response.headers(), route, target, may_retry).await
                    {
                        order = next.into_iter();
                        refused = Some((response, member));
                        continue;
                    }
                    return Ok((response, member));
                }
                Err(failure) => {
                    // A request the proxy could not build says nothing about the member's health.
                    if failure.is_member_fault() {
                        self.upstream.mark_failed(&member, &failure);
                        self.upstream.refresh_in_background();
                    }
                    let retry = failure.allows_retry(route.replay) && !matches!(body, PendingBody::Streaming(None));
                    if !retry {
                        return Err(error::outcome_unknown_status(&failure));
                    }
                    failures.push(failure);
                }
            }
        }
        refused.ok_or_else(|| error::no_member_status(&failures))
    }

    /// A Range from a client with a size budget; `None` when it is simply forwarded.
    async fn limited_range(
        &self,
        headers: &HeaderMap,
        path_and_query: &http::uri::PathAndQuery,
        message: &Bytes,
        budget: usize,
        rule: &str,
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
            async move {
                let (response, _) =
                    self.send(&route, path_and_query, headers, &mut body).await.map_err(Buffered::status)?;
                let buffered = Buffered::collect(response).await?;
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
        path_and_query: &http::uri::PathAndQuery,
        headers: &HeaderMap,
        body: &mut PendingBody,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut connection = self.upstream.connection(member).await?;
        // Waiting for capacity before taking the body keeps a client stream usable for the next member.
        connection.ready().await.map_err(|source| UpstreamError::Send { endpoint: member.endpoint.url(), source })?;
        let upstream_body = match body {
            PendingBody::Buffered(bytes) => RequestBody::Buffered(Some(bytes.clone())),
            PendingBody::Streaming(stream) => match stream.take() {
                Some(stream) => RequestBody::Streaming(stream),
                None => {
                    return Err(UpstreamError::Request {
                        why: "the client's stream was already sent to another member".to_owned(),
                    })
                }
            },
        };
        let mut request = Request::new(upstream_body);
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = member
            .uri(path_and_query.clone())
            .map_err(|e| UpstreamError::Request { why: format!("cannot address {path_and_query}: {e}") })?;
        *request.headers_mut() = headers.clone();
        member.stats.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        connection
            .send_request(request)
            .await
            .map_err(|source| UpstreamError::Send { endpoint: member.endpoint.url(), source })
    }

    /// Wraps etcd's response for the client, headers untouched.
    fn relay(
        &self,
        response: Response<Incoming>,
        record: CallRecord,
        route: &Route,
        member: &Member,
    ) -> Response<ResponseBody> {
        let status_in_headers = Code::from_headers(response.headers());
        // Only streams need to hear about shutdown; unary calls finish on their own.
        let shutdown = (route.shape != CallShape::Unary).then(|| self.shutdown.clone().cancelled_owned());
        response.map(|incoming| ResponseBody::upstream(incoming, record, status_in_headers, shutdown, member.name()))
    }
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
