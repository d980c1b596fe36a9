//! LeaseKeepAlive streams that outlive their member.
//!
//! A keep-alive stream carries independent requests (renew lease N) and answers (lease N has
//! TTL t), so it can move: when the member serving it fails, the proxy opens the stream on
//! another member and sends again the latest unanswered request of each lease, and the client's
//! stream goes on as if nothing happened. Without this, a client whose member dies must notice,
//! reconnect and resend before its leases expire; old clients often do not.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use etcd_compat_proto::etcdserverpb::{LeaseKeepAliveRequest, LeaseKeepAliveResponse};

use crate::admin::Metrics;
use crate::error::{self, ProxyFailure, UpstreamError};
use crate::grpc::{self, Code, MessageReader};
use crate::transport::{RecvBody, Upload};
use crate::upstream::{self, Cluster, Lane, Member, Target};

use super::admission::{ClientMessages, Refused, StallTimer, StreamLimits};
use super::client_queue::{self, QueueSender};
use super::relay::{CallRecord, ResponseBody, StreamHead, StreamStart};

/// Pause between rounds over all members when none can take the stream.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Keep-alive requests forwarded and not yet answered, at most: a client that sends without
/// reading its answers must not make etcd hold a backlog of them in the member connection.
const MAX_IN_FLIGHT: usize = 1024;

/// Serves one LeaseKeepAlive call: the stream runs in its own task and answers the client from
/// whichever member currently holds it.
pub async fn serve(
    context: StreamContext,
    path_and_query: http::uri::PathAndQuery,
    headers: HeaderMap,
    client: Incoming,
    record: CallRecord,
) -> Response<ResponseBody> {
    let StreamContext { cluster, metrics, limits, shutdown } = context;
    let (head_tx, head_rx) = oneshot::channel();
    let (to_client, from_task) = client_queue::channel(limits.max_buffered, limits.queue);
    let stream = KeepAliveStream {
        cluster,
        path_and_query,
        headers,
        client,
        client_done: false,
        client_partial: ClientMessages::new(limits.messages.max_message, Some(limits.memory)),
        stall: StallTimer::new(limits.messages.stall_timeout),
        unanswered: HashMap::new(),
        in_flight: 0,
        to_client,
        head: Some(head_tx),
        refusals: 0,
        last_refusal: None,
        metrics,
    };
    tokio::spawn(stream.run());
    StreamStart::new(head_rx, from_task, record, shutdown, "keep-alive").await
}

/// What a keep-alive stream needs of the proxy.
pub struct StreamContext {
    /// The members it may move between.
    pub cluster: Arc<Cluster>,
    /// Where refusals are counted.
    pub metrics: Arc<Metrics>,
    /// How much of the client's and etcd's messages it may hold.
    pub limits: StreamLimits,
    /// Cancelled at shutdown.
    pub shutdown: CancellationToken,
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
    cluster: Arc<Cluster>,
    path_and_query: http::uri::PathAndQuery,
    headers: HeaderMap,
    client: Incoming,
    client_done: bool,
    /// Bytes of a client message not complete yet.
    client_partial: ClientMessages,
    /// Ends the stream if the client's incomplete message does not grow in time.
    stall: StallTimer,
    /// The latest unanswered request of each lease, sent again when the stream moves. By lease:
    /// one client frame can carry a hundred thousand requests, each looked up here.
    unanswered: HashMap<i64, Bytes>,
    /// Requests sent to the current member and not answered yet.
    in_flight: usize,
    to_client: QueueSender,
    /// Taken when the client's response headers are sent.
    head: Option<oneshot::Sender<StreamHead>>,
    /// Routing refusals since the stream last delivered an answer.
    refusals: usize,
    /// etcd's status of the last refusal, the answer for a stream no member takes.
    last_refusal: Option<HeaderMap>,
    metrics: Arc<Metrics>,
}

impl KeepAliveStream {
    async fn run(mut self) {
        let mut previous: Option<Arc<Member>> = None;
        let mut failures: Vec<UpstreamError> = Vec::new();
        loop {
            // Another member than the one that just failed, if there is one.
            let order = self.cluster.attempt_order_for(Target::Voter);
            let next =
                order.iter().find(|m| previous.as_ref().is_none_or(|p| !Arc::ptr_eq(p, m))).or(order.first()).cloned();
            let Some(member) = next else {
                // A client that left while no member could take its stream needs no member.
                if self.give_up_before_start(&failures) || self.to_client.is_closed() {
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
                    self.cluster.refresh_in_background();
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
                        self.cluster.mark_failed(&member, &failure);
                        self.cluster.refresh_in_background();
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
            // Everything not answered is sent again on the next member.
            self.in_flight = self.unanswered.len();
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
                self.to_client.push(Frame::trailers(status));
            }
        }
    }

    /// Before the client has its response headers, a stream no member takes fails as any call
    /// would; afterwards the proxy keeps trying, since ending the stream is what it must avoid.
    fn give_up_before_start(&mut self, failures: &[UpstreamError]) -> bool {
        match self.head.take() {
            Some(head) => {
                let status = self.last_refusal.take().unwrap_or_else(|| {
                    let (code, message) =
                        ProxyFailure::NoMember(failures.iter().map(ToString::to_string).collect()).status();
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
        // Nothing of the client is read until the stream is open again.
        self.stall.pause();
        // This task writes the stream itself: a keep-alive is a few bytes, and a copy task
        // between here and etcd would cost a wake-up per keep-alive.
        let (response, to_member) =
            self.cluster.open(member, Lane::Streams, &self.path_and_query, &self.headers, Upload::ByCaller).await?;
        let mut to_member = to_member.ok_or_else(|| UpstreamError::Request {
            why: "the connection returned no stream to write the keep-alives into".to_owned(),
        })?;
        for request in self.unanswered.values() {
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
            // Neither the client's requests nor etcd's answers are taken while the client is
            // behind on its answers: the backlog stays bounded wherever it would form.
            let client_behind = self.to_client.is_full();
            let reading = !self.client_done && !client_behind && self.in_flight < MAX_IN_FLIGHT;
            match reading {
                true => self.stall.resume(),
                false => self.stall.pause(),
            }
            tokio::select! {
                frame = self.client.frame(), if reading => match frame {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            let messages = match self.client_messages(data) {
                                Ok(messages) => messages,
                                Err(refused) => {
                                    self.metrics.refused(refused.why);
                                    let (code, message) = refused.failure.status();
                                    self.pass_on(grpc::status_headers(code, &message)).await;
                                    return Ok(Ended::Done);
                                }
                            };
                            for message in messages {
                                self.in_flight += 1;
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
                _ = std::future::poll_fn(|cx| self.stall.poll_stalled(cx)) => {
                    let refused = Refused::stalled(self.stall.timeout());
                    self.metrics.refused(refused.why);
                    let (code, message) = refused.failure.status();
                    self.pass_on(grpc::status_headers(code, &message)).await;
                    return Ok(Ended::Done);
                }
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
                        let failure = UpstreamError::sending(member.endpoint.url(), source);
                        if let UpstreamError::Reset { reason, .. } = failure {
                            // etcd's answer to this stream: any member would give it.
                            let (code, message) = ProxyFailure::Reset(reason).status();
                            self.pass_on(grpc::status_headers(code, &message)).await;
                            return Ok(Ended::Done);
                        }
                        if self.head.is_some() {
                            return Err(failure);
                        }
                        self.cluster.mark_failed(member, &failure);
                        return Ok(Ended::MemberFailed(failure.to_string()));
                    }
                },
                frame = next_frame(&mut answers), if answers.is_some() && !client_behind => match frame {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            answer_partial.push(&data);
                            while let Some(message) = answer_partial.next_message() {
                                self.answered(&message);
                                self.refusals = 0;
                                self.in_flight = self.in_flight.saturating_sub(1);
                                if !self.to_client.push(Frame::data(message)) {
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
                        self.cluster.mark_failed(member, &why);
                        return Ok(Ended::MemberFailed(why));
                    }
                    None => return Ok(Ended::MemberFailed("the stream ended without a status".to_owned())),
                },
                _ = self.to_client.room(), if client_behind => {}
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
        if let Some(routing) = upstream::routing_error(&status) {
            self.cluster.reroute_in_background(member, routing);
            tracing::info!(member = %member.name(), error = routing.message(), "lease keep-alive stream refused; trying another member");
            return Ended::Refused(status);
        }
        self.pass_on(status).await;
        Ended::Done
    }

    /// Splits client data into whole messages and remembers each lease's latest request; a
    /// message over etcd's limit ends the call as etcd would end it.
    fn client_messages(&mut self, data: Bytes) -> Result<Vec<Bytes>, Refused> {
        self.client_partial.reader().push(&data);
        let mut messages = Vec::new();
        loop {
            if let Some(claimed) = self.client_partial.reader().oversize() {
                return Err(Refused::too_large(claimed, self.client_partial_limit()));
            }
            let Some(message) = self.client_partial.reader().next_message() else { break };
            if let Some(id) = lease_of_request(&message) {
                self.unanswered.insert(id, message.clone());
            }
            messages.push(message);
        }
        self.client_partial.recount()?;
        self.stall.restart(!self.client_partial.is_empty());
        Ok(messages)
    }

    fn client_partial_limit(&mut self) -> usize {
        self.client_partial.reader().limit().unwrap_or(usize::MAX)
    }

    fn answered(&mut self, message: &Bytes) {
        if let Some(id) = lease_of_answer(message) {
            self.unanswered.remove(&id);
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
pub(crate) fn lease_of_request(framed: &[u8]) -> Option<i64> {
    grpc::decode_framed::<LeaseKeepAliveRequest>(framed).map(|request| request.id)
}

/// The lease a framed, uncompressed keep-alive answer is about.
pub(crate) fn lease_of_answer(framed: &[u8]) -> Option<i64> {
    grpc::decode_framed::<LeaseKeepAliveResponse>(framed).map(|answer| answer.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

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
