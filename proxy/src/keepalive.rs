//! LeaseKeepAlive streams that outlive their member.
//!
//! A keep-alive stream carries independent requests (renew lease N) and answers (lease N has
//! TTL t), so it can move: when the member serving it fails, the proxy opens the stream on
//! another member and sends again every request not answered yet, and the client's stream goes
//! on as if nothing happened. Without this, a client whose member dies must notice, reconnect
//! and resend before its leases expire; old clients often do not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use etcd_compat_proto::etcdserverpb::{LeaseKeepAliveRequest, LeaseKeepAliveResponse};

use crate::body::{CallRecord, ResponseBody};
use crate::cluster::{self, Target};
use crate::error::{self, UpstreamError};
use crate::grpc::{self, Code, MessageReader};
use crate::h2_stream::RecvBody;
use crate::upstream::{Member, Upstream};

/// The keep-alive method's path.
pub const PATH: &str = "/etcdserverpb.Lease/LeaseKeepAlive";

/// Pause between rounds over all members when none can take the stream.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Whether `path` is the method this module serves.
pub fn handles(path: &str) -> bool {
    path == PATH
}

/// What the client receives first: etcd's response headers, or a status if no member took the stream.
type Head = Result<HeaderMap, HeaderMap>;

/// Serves one LeaseKeepAlive call: the stream runs in its own task and answers the client from
/// whichever member currently holds it.
pub async fn serve(
    upstream: Arc<Upstream>,
    path_and_query: http::uri::PathAndQuery,
    headers: HeaderMap,
    client: Incoming,
    record: CallRecord,
    shutdown: CancellationToken,
) -> Response<ResponseBody> {
    let (head_tx, head_rx) = oneshot::channel();
    let (frames_tx, frames_rx) = mpsc::channel(16);
    let stream = KeepAliveStream {
        upstream,
        path_and_query,
        headers,
        client,
        client_done: false,
        client_partial: MessageReader::default(),
        unanswered: Vec::new(),
        to_client: frames_tx,
        head: Some(head_tx),
        refusals: 0,
        last_refusal: None,
    };
    tokio::spawn(stream.run());
    match head_rx.await {
        Ok(Ok(headers)) => {
            let mut response = Response::new(ResponseBody::from_channel(frames_rx, record, shutdown.cancelled_owned()));
            *response.headers_mut() = headers;
            response
        }
        Ok(Err(status)) => {
            let code = Code::from_headers(&status).unwrap_or(Code::Unknown);
            let mut response = Response::new(ResponseBody::empty(record, code));
            *response.headers_mut() = status;
            response
        }
        Err(_) => {
            let mut response = Response::new(ResponseBody::empty(record, Code::Cancelled));
            *response.headers_mut() = grpc::status_headers(
                Code::Cancelled,
                "etcd-compat-proxy: the keep-alive stream ended before it started",
            );
            response
        }
    }
}

/// Why one member's stream ended.
enum Ended {
    /// The call is over (etcd's status or the client's departure was passed on).
    Done,
    /// The member failed; move the stream to another one.
    MemberFailed(String),
    /// The member refused the stream with a routing error (learner, no leader): try another
    /// one, and pass etcd's status on if every member refuses.
    Refused(HeaderMap),
}

struct KeepAliveStream {
    upstream: Arc<Upstream>,
    path_and_query: http::uri::PathAndQuery,
    headers: HeaderMap,
    client: Incoming,
    client_done: bool,
    /// Bytes of a client message not complete yet.
    client_partial: MessageReader,
    /// The latest unanswered request of each lease, sent again when the stream moves.
    unanswered: Vec<(i64, Bytes)>,
    to_client: mpsc::Sender<Frame<Bytes>>,
    /// Taken when the client's response headers are sent.
    head: Option<oneshot::Sender<Head>>,
    /// Routing refusals since the stream last delivered an answer.
    refusals: usize,
    /// etcd's status of the last refusal, the answer for a stream no member takes.
    last_refusal: Option<HeaderMap>,
}

impl KeepAliveStream {
    async fn run(mut self) {
        let mut previous: Option<Arc<Member>> = None;
        let mut failures: Vec<UpstreamError> = Vec::new();
        loop {
            // Another member than the one that just failed, if there is one.
            let order = self.upstream.attempt_order_for(Target::Voter);
            let next =
                order.iter().find(|m| previous.as_ref().is_none_or(|p| !Arc::ptr_eq(p, m))).or(order.first()).cloned();
            let Some(member) = next else {
                if self.give_up_before_start(&failures) {
                    return;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            };
            let started = Instant::now();
            match self.serve_on(&member).await {
                Ok(Ended::Done) => return,
                Ok(Ended::MemberFailed(why)) => {
                    tracing::info!(member = %member.name(), why, leases = self.unanswered.len(), "lease keep-alive stream lost its member; moving it to another member");
                    self.upstream.refresh_in_background();
                }
                Ok(Ended::Refused(status)) => {
                    self.refusals += 1;
                    if self.refusals >= order.len().max(1) {
                        self.pass_on(status).await;
                        return;
                    }
                    self.last_refusal = Some(status);
                }
                Err(failure) => {
                    if failure.is_member_fault() {
                        self.upstream.mark_failed(&member, &failure);
                        self.upstream.refresh_in_background();
                    }
                    // Only needed to explain a stream that never started.
                    if self.head.is_some() {
                        failures.push(failure);
                    }
                    let tried_all = failures.len() >= order.len().max(1);
                    if tried_all && self.give_up_before_start(&failures) {
                        return;
                    }
                }
            }
            previous = Some(member);
            if self.to_client.is_closed() {
                return;
            }
            // A member that fails at once must not make this loop spin.
            if started.elapsed() < RETRY_PAUSE {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }

    /// Ends the client's call with etcd's `status`.
    async fn pass_on(&mut self, status: HeaderMap) {
        match self.head.take() {
            Some(head) => {
                let _ = head.send(Err(status));
            }
            None => {
                let _ = self.to_client.send(Frame::trailers(status)).await;
            }
        }
    }

    /// Before the client has its response headers, a stream no member takes fails as any call
    /// would; afterwards the proxy keeps trying, since ending the stream is what it must avoid.
    fn give_up_before_start(&mut self, failures: &[UpstreamError]) -> bool {
        match self.head.take() {
            Some(head) => {
                let status = self.last_refusal.take().unwrap_or_else(|| {
                    let (code, message) = error::no_member_status(failures);
                    grpc::status_headers(code, &message)
                });
                let _ = head.send(Err(status));
                true
            }
            None => false,
        }
    }

    /// Runs the stream on `member` until the call ends or the member fails; `Err` when the
    /// stream could not even be opened.
    async fn serve_on(&mut self, member: &Arc<Member>) -> Result<Ended, UpstreamError> {
        let mut connection = self.upstream.connection(member).await?;
        connection
            .ready()
            .await
            .map_err(|source| UpstreamError::NotSent { endpoint: member.endpoint.url(), source })?;
        let mut request = Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = member
            .uri(self.path_and_query.clone())
            .map_err(|e| UpstreamError::Request { why: format!("cannot address {}: {e}", self.path_and_query) })?;
        *request.headers_mut() = self.headers.clone();
        member.stats.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // This task writes the stream itself: a keep-alive is a few bytes, and a copy task
        // between here and etcd would cost a wake-up per keep-alive.
        let (response, mut to_member) = connection
            .open(request)
            .map_err(|source| UpstreamError::NotSent { endpoint: member.endpoint.url(), source })?;
        for (_, request) in &self.unanswered {
            let _ = to_member.send_data(request.clone(), false);
        }
        if self.client_done {
            let _ = to_member.send_data(Bytes::new(), true);
        }
        let mut to_member = (!self.client_done).then_some(to_member);
        let mut response = Box::pin(response);
        let mut answers: Option<RecvBody> = None;
        let mut answer_partial = MessageReader::default();
        loop {
            tokio::select! {
                frame = self.client.frame(), if !self.client_done => match frame {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            for message in self.client_messages(data) {
                                if let Some(to_member) = to_member.as_mut() {
                                    let _ = to_member.send_data(message, false);
                                }
                            }
                        }
                    }
                    // The client closed its side: so does the proxy, and etcd then ends the call.
                    None => {
                        self.client_done = true;
                        if let Some(mut to_member) = to_member.take() {
                            let _ = to_member.send_data(Bytes::new(), true);
                        }
                    }
                    Some(Err(_)) => return Ok(Ended::Done),
                },
                head = &mut response, if answers.is_none() => match head {
                    Ok(head) => {
                        if let Some(status) = self.trailers_only(&head) {
                            return Ok(self.finish_or_move(member, status).await);
                        }
                        if let Some(client_head) = self.head.take() {
                            let _ = client_head.send(Ok(head.headers().clone()));
                        }
                        answers = Some(head.into_body());
                    }
                    Err(source) => {
                        let failure = UpstreamError::Send { endpoint: member.endpoint.url(), source };
                        if self.head.is_some() {
                            return Err(failure);
                        }
                        self.upstream.mark_failed(member, &failure);
                        return Ok(Ended::MemberFailed(failure.to_string()));
                    }
                },
                frame = next_frame(&mut answers), if answers.is_some() => match frame {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            answer_partial.push(&data);
                            while let Some(message) = answer_partial.next_message() {
                                self.answered(&message);
                                self.refusals = 0;
                                if self.to_client.send(Frame::data(message)).await.is_err() {
                                    return Ok(Ended::Done);
                                }
                            }
                        }
                        Err(frame) => {
                            let trailers = frame.into_trailers().unwrap_or_default();
                            return Ok(self.finish_or_move(member, trailers).await);
                        }
                    },
                    Some(Err(error)) => {
                        let why = format!("the stream broke: {}", error::chain(&error));
                        self.upstream.mark_failed(member, &why);
                        return Ok(Ended::MemberFailed(why));
                    }
                    None => return Ok(Ended::MemberFailed("the stream ended without a status".to_owned())),
                },
                _ = self.to_client.closed() => return Ok(Ended::Done),
            }
        }
    }

    /// The status of a response that has nothing but headers, if that is what `head` is.
    fn trailers_only(&self, head: &Response<RecvBody>) -> Option<HeaderMap> {
        Code::from_headers(head.headers()).map(|_| head.headers().clone())
    }

    /// etcd ended the stream with `status`: a routing error (learner, no leader) moves the
    /// stream; anything else is the call's answer and goes to the client.
    async fn finish_or_move(&mut self, member: &Arc<Member>, status: HeaderMap) -> Ended {
        if let Some(routing) = cluster::routing_error(&status) {
            self.upstream.reroute_in_background(member, routing);
            tracing::info!(member = %member.name(), error = routing.message(), "lease keep-alive stream refused; trying another member");
            return Ended::Refused(status);
        }
        self.pass_on(status).await;
        Ended::Done
    }

    /// Splits client data into whole messages and remembers each lease's latest request.
    fn client_messages(&mut self, data: Bytes) -> Vec<Bytes> {
        self.client_partial.push(&data);
        let mut messages = Vec::new();
        while let Some(message) = self.client_partial.next_message() {
            if let Some(id) = lease_of_request(&message) {
                match self.unanswered.iter_mut().find(|(lease, _)| *lease == id) {
                    Some(entry) => entry.1 = message.clone(),
                    None => self.unanswered.push((id, message.clone())),
                }
            }
            messages.push(message);
        }
        messages
    }

    fn answered(&mut self, message: &Bytes) {
        if let Some(id) = lease_of_answer(message) {
            self.unanswered.retain(|(lease, _)| *lease != id);
        }
    }
}

async fn next_frame(body: &mut Option<RecvBody>) -> Option<Result<Frame<Bytes>, h2::Error>> {
    match body {
        Some(body) => body.frame().await,
        None => std::future::pending().await,
    }
}

/// The lease a framed, uncompressed keep-alive request is for.
fn lease_of_request(framed: &[u8]) -> Option<i64> {
    (framed.first() == Some(&0)).then(|| LeaseKeepAliveRequest::decode(framed.get(5..)?).ok().map(|r| r.id)).flatten()
}

/// The lease a framed, uncompressed keep-alive answer is about.
fn lease_of_answer(framed: &[u8]) -> Option<i64> {
    (framed.first() == Some(&0)).then(|| LeaseKeepAliveResponse::decode(framed.get(5..)?).ok().map(|r| r.id)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_their_lease() {
        let request = grpc::frame(&LeaseKeepAliveRequest { id: 9 }.encode_to_vec());
        assert_eq!(lease_of_request(&request), Some(9));
        assert_eq!(lease_of_request(&[1, 0, 0, 0, 0]), None);
    }

    #[test]
    fn answers_name_their_lease() {
        let answer = grpc::frame(&LeaseKeepAliveResponse { id: 42, ttl: 5, header: None }.encode_to_vec());
        assert_eq!(lease_of_answer(&answer), Some(42));
    }
}
