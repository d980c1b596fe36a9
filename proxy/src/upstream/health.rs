//! Member health: a gRPC health check of every member every `--health-interval`, failures of
//! calls and connections, and the pin that moves away from a member that failed.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use http::{HeaderValue, Request};
use http_body_util::BodyExt;
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::error::UpstreamError;
use crate::grpc::Code;
use crate::transport::{Connection, Upload};

use super::{Cluster, Lane, Member};

impl Cluster {
    /// Marks a member unhealthy after a failed request or check, and moves the pin away from it.
    pub fn mark_failed(&self, member: &Member, error: &dyn std::fmt::Display) {
        // A member of a cluster the proxy switched away from fails as its connections close;
        // its position may be a current member's, whose pin must not move for it.
        if member.retired.is_cancelled() {
            return;
        }
        member.stats.failures.fetch_add(1, Relaxed);
        if let Ok(mut last) = member.last_error.lock() {
            *last = Some(error.to_string());
        }
        if member.healthy.swap(false, Relaxed) {
            tracing::warn!(member = %member.endpoint.url(), %error, "etcd member is unhealthy; sending requests to the others");
        }
        if self.preferred.load(Relaxed) == member.index {
            self.move_pin_from(member.index);
        }
    }

    /// Position of the pinned member in the pool.
    pub(crate) fn pinned_index(&self) -> usize {
        self.preferred.load(Relaxed)
    }

    /// Moves the pin to the next healthy member that serves clients (learners never hold it).
    pub(crate) fn move_pin_from(&self, index: usize) {
        let members = self.members();
        let n = members.len();
        let usable = |m: &Member| m.is_healthy() && m.role.serves_clients();
        if let Some(next) = (1..n).map(|i| (index + i) % n).find(|i| usable(&members[*i])) {
            self.preferred.store(next, Relaxed);
        }
    }

    pub(crate) fn mark_healthy(&self, member: &Member) {
        if !member.healthy.swap(true, Relaxed) {
            tracing::info!(member = %member.endpoint.url(), "etcd member is healthy");
            // Prefer the first healthy member in configuration order when the pinned one is down.
            let members = self.members();
            let pinned_usable = members
                .get(self.preferred.load(Relaxed) % members.len().max(1))
                .is_some_and(|m| m.is_healthy() && m.role.serves_clients());
            if !pinned_usable && member.role.serves_clients() {
                self.preferred.store(member.index, Relaxed);
            }
        }
    }

    /// Starts one health-check loop per member, including members discovered later; they stop
    /// when `stop` is cancelled.
    pub fn spawn_health_checks(self: &Arc<Self>, interval: Duration, stop: CancellationToken) {
        if let Ok(mut checks) = self.health_checks.lock() {
            *checks = Some((interval, stop.clone()));
        }
        for member in self.members().iter() {
            self.spawn_health_check(Arc::clone(member), interval, stop.clone());
        }
    }

    pub(super) fn spawn_health_check(
        self: &Arc<Self>,
        member: Arc<Member>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let upstream = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = member.retired.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                // A check must finish within the interval, or it is a failure: a member that
                // answers too slowly is as bad as one that does not answer.
                let timeout = interval.max(Duration::from_millis(500));
                match tokio::time::timeout(timeout, upstream.check(&member)).await {
                    Ok(Ok(())) => upstream.mark_healthy(&member),
                    Ok(Err(error)) => upstream.mark_failed(&member, &error),
                    Err(_) => upstream.mark_failed(&member, &format!("health check got no answer within {timeout:?}")),
                }
            }
        });
    }

    /// One gRPC health check (`grpc.health.v1.Health/Check`) over the member's shared connection.
    async fn check(&self, member: &Member) -> Result<(), UpstreamError> {
        let connection = self.connection(member, Lane::Calls).await?;
        check_over(member, connection).await
    }

    /// One unary call made by the proxy itself to `member` (the cluster view's Status and
    /// MemberList), without client credentials: the calls it makes need none.
    pub(super) async fn control_call<T: Message + Default>(
        &self,
        member: &Member,
        path: &'static str,
        request: &impl Message,
    ) -> Result<T, UpstreamError> {
        let connection = self.connection(member, Lane::Calls).await?;
        control_call_over(member, connection, path, request).await
    }
}

/// A health check over `connection` (the member's, or one dialled to try new TLS material).
pub(super) async fn check_over(member: &Member, connection: Connection) -> Result<(), UpstreamError> {
    use etcd_compat_proto::health::{health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse};
    let answer: HealthCheckResponse =
        control_call_over(member, connection, "/grpc.health.v1.Health/Check", &HealthCheckRequest::default()).await?;
    if answer.status != ServingStatus::Serving as i32 {
        let why = format!("member reports health status {}", answer.status);
        return Err(UpstreamError::Unhealthy { endpoint: member.endpoint.url(), why });
    }
    Ok(())
}

/// A unary call of the proxy's own over `connection`, its answer decoded.
async fn control_call_over<T: Message + Default>(
    member: &Member,
    mut connection: Connection,
    path: &'static str,
    request: &impl Message,
) -> Result<T, UpstreamError> {
    let failed = |why: String| UpstreamError::Unhealthy { endpoint: member.endpoint.url(), why };
    let head =
        Request::post(member.uri(http::uri::PathAndQuery::from_static(path)).map_err(|e| failed(e.to_string()))?)
            .header(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"))
            .header(http::header::TE, HeaderValue::from_static("trailers"))
            .body(())
            .map_err(|e| failed(e.to_string()))?;
    connection.ready().await.map_err(|source| UpstreamError::NotSent { endpoint: member.endpoint.url(), source })?;
    let (response, _) = connection
        .send(head, Upload::Message(crate::grpc::frame(&request.encode_to_vec())))
        .map_err(|source| UpstreamError::NotSent { endpoint: member.endpoint.url(), source })?;
    let response = response.await.map_err(|source| UpstreamError::Send { endpoint: member.endpoint.url(), source })?;
    let header_code = Code::from_headers(response.headers());
    let collected = response.into_body().collect().await.map_err(|e| failed(e.to_string()))?;
    let code = header_code.or_else(|| collected.trailers().and_then(Code::from_headers));
    if code != Some(Code::Ok) {
        return Err(failed(format!("{path} answered {code:?}")));
    }
    let mut bytes = collected.to_bytes();
    if bytes.len() < 5 {
        return Err(failed(format!("{path} answered with no message")));
    }
    bytes.advance(5);
    T::decode(bytes).map_err(|e| failed(format!("cannot decode the answer to {path}: {e}")))
}
