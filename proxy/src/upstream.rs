//! The upstream cluster view: the etcd members, one multiplexed HTTP/2 connection to each, and
//! which of them are healthy.
//!
//! Requests go to one preferred ("pinned") member, as etcd's own clients do, so that a client's
//! serializable reads keep seeing one member's history; the pin moves when that member fails.
//!
//! Each member has two connections, one per [`Lane`]: unary calls and the proxy's own health
//! checks on one, long-lived streams (Watch, keep-alives, snapshots) on the other. HTTP/2 flow
//! control is shared by all streams of a connection, so a stream whose client stops reading can
//! hold the others up; on separate connections, no stream can delay a unary call or a health
//! check, and a member is never judged by a stall of its clients' making.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Buf;
use http::{HeaderValue, Request};
use http_body_util::BodyExt;
use prost::Message;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::batched_writes::BatchedWrites;
use crate::body::RequestBody;
use crate::config::{Config, Endpoint};
use crate::connection::Connection;
use crate::error::UpstreamError;
use crate::grpc::Code;

/// HTTP/2 flow-control windows toward etcd: large responses (ranges, snapshots) need large
/// windows to stream at full speed, and many small watch streams need room not to stall.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// See [`STREAM_WINDOW`].
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// The connection window toward etcd, far larger than the client side's: answers up to
/// `--max-buffered-response-bytes` leave it as soon as they arrive, but a larger answer (or a
/// snapshot) whose client stops reading holds up to [`STREAM_WINDOW`] of it, and it takes this
/// many such clients at once before the member's other streams wait.
pub const UPSTREAM_CONNECTION_WINDOW: u32 = 32 * STREAM_WINDOW;

/// Which of a member's two connections a request travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Unary calls and the proxy's own calls: one answer each.
    Calls = 0,
    /// Streams that live as long as their client wants.
    Streams = 1,
}

/// Counters of one member, rendered in `/metrics`.
#[derive(Default)]
pub struct MemberStats {
    /// Requests sent to the member.
    pub requests: AtomicU64,
    /// Failed connections, sends and health checks.
    pub failures: AtomicU64,
}

/// One etcd member and the proxy's connection to it.
pub struct Member {
    /// Where the member listens.
    pub endpoint: Endpoint,
    /// The member's URL, for log and error messages.
    name: Arc<str>,
    scheme: http::uri::Scheme,
    index: usize,
    healthy: AtomicBool,
    /// The live connection of each [`Lane`], cloned per request (cheap: a handle to the
    /// connection task).
    connections: [Mutex<Option<Connection>>; 2],
    /// Serialises dialing per lane so a burst of requests to a dead connection dials once.
    dialing: [tokio::sync::Mutex<()>; 2],
    /// Last failure, for `/health` and error messages.
    last_error: Mutex<Option<String>>,
    /// Counters for `/metrics`.
    pub stats: MemberStats,
    /// What the cluster view knows about this endpoint's member (id, learner, still in the cluster).
    pub role: crate::cluster::MemberRole,
}

impl Member {
    /// Whether the last health check or request to this member succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// The most recent failure seen on this member, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// The member's URL, shared cheaply for log and error messages.
    pub fn name(&self) -> Arc<str> {
        Arc::clone(&self.name)
    }

    /// Builds the URI for `path_and_query` on this member.
    pub fn uri(&self, path_and_query: http::uri::PathAndQuery) -> Result<http::Uri, http::Error> {
        // Scheme, authority and path are all shared buffers: building the URI copies nothing.
        http::Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.endpoint.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }

    /// The member's position in the pool.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// What routing needs to know about the member, read once per request.
    pub fn state(&self) -> crate::cluster::MemberState {
        crate::cluster::MemberState {
            healthy: self.is_healthy(),
            learner: self.role.is_learner(),
            departed: self.role.is_departed(),
            id: self.role.id(),
        }
    }

    fn cached_connection(&self, lane: Lane) -> Option<Connection> {
        let guard = self.connections[lane as usize].lock().ok()?;
        guard.as_ref().filter(|c| !c.is_closed()).cloned()
    }
}

/// The set of members and how to reach them.
pub struct Upstream {
    /// Append-only (a member's `index` is its position); replaced as a whole when the cluster
    /// view discovers a member, so a request only pays for one read lock and an `Arc` clone.
    members: RwLock<Arc<Vec<Arc<Member>>>>,
    preferred: AtomicUsize,
    /// Replaced when the certificate files change (see `reload`); read at every dial.
    tls: Option<Arc<crate::reload::Reloadable<rustls::ClientConfig>>>,
    dial_timeout: Duration,
    /// Health-check period and stop signal, kept so that discovered members get checked too.
    health_checks: Mutex<Option<(Duration, CancellationToken)>>,
    /// Leader, learners, discovery and routing rules (see [`crate::cluster`]).
    pub view: crate::cluster::ClusterView,
}

impl Upstream {
    /// Creates the pool; no connection is made until [`Upstream::spawn_health_checks`] or the first request.
    pub fn new(config: &Config) -> Result<Arc<Self>, crate::tls::TlsError> {
        let tls = match &config.upstream_tls {
            Some(files) => Some(Arc::new(crate::reload::Reloadable::new(crate::tls::client_config(files)?))),
            None => None,
        };
        let members = config
            .endpoints
            .iter()
            .enumerate()
            .map(|(index, endpoint)| Arc::new(new_member(endpoint, index)))
            .collect();
        Ok(Arc::new(Upstream {
            members: RwLock::new(Arc::new(members)),
            preferred: AtomicUsize::new(0),
            tls,
            dial_timeout: config.dial_timeout,
            health_checks: Mutex::new(None),
            view: crate::cluster::ClusterView::new(config),
        }))
    }

    /// All members: the `--endpoints` seeds in configuration order, then discovered ones.
    pub fn members(&self) -> Arc<Vec<Arc<Member>>> {
        match self.members.read() {
            Ok(members) => Arc::clone(&members),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Adds a member discovered from the cluster's member list and starts checking its health;
    /// returns the existing one if the endpoint is already known.
    pub fn add_member(self: &Arc<Self>, endpoint: &Endpoint) -> Arc<Member> {
        let added = {
            let mut guard = match self.members.write() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            if let Some(known) = guard.iter().find(|m| m.endpoint == *endpoint) {
                return Arc::clone(known);
            }
            let member = Arc::new(new_member(endpoint, guard.len()));
            let mut members = Vec::clone(&guard);
            members.push(Arc::clone(&member));
            *guard = Arc::new(members);
            member
        };
        tracing::info!(member = %added.name, "etcd member discovered from the member list; sending it requests once healthy");
        let checks = self.health_checks.lock().ok().and_then(|c| c.clone());
        if let Some((interval, stop)) = checks {
            self.spawn_health_check(Arc::clone(&added), interval, stop);
        }
        added
    }

    /// Members in the order a request should try them: healthy ones from the preferred one on,
    /// then the unhealthy ones (health information may be stale; trying beats failing).
    /// Learners and members that left the cluster are left out.
    pub fn attempt_order(&self) -> Vec<Arc<Member>> {
        self.attempt_order_for(crate::cluster::Target::Voter)
    }

    /// Members in the order a request for `target` should try them (see [`crate::cluster::Target`]).
    pub fn attempt_order_for(&self, target: crate::cluster::Target) -> Vec<Arc<Member>> {
        let members = self.members();
        let states: Vec<crate::cluster::MemberState> = members.iter().map(|m| m.state()).collect();
        crate::cluster::attempt_order(&states, self.preferred.load(Relaxed), self.view.leader(), target)
            .into_iter()
            .map(|i| Arc::clone(&members[i]))
            .collect()
    }

    /// The members a request for `target` tries, in the order of [`Upstream::attempt_order_for`];
    /// when the pinned member serves the request, as it usually does, nothing else is computed
    /// unless it fails.
    pub fn attempts(&self, target: crate::cluster::Target) -> AttemptOrder<'_> {
        let first = match target {
            crate::cluster::Target::Voter => self.pinned_voter(),
            _ => None,
        };
        AttemptOrder { upstream: self, target, first, tried: None, rest: None }
    }

    /// The pinned member, if it is a healthy voting member of the cluster: the first member of
    /// every ordinary request's attempt order.
    fn pinned_voter(&self) -> Option<Arc<Member>> {
        let members = self.members();
        let member = members.get(self.preferred.load(Relaxed))?;
        let state = member.state();
        (state.healthy && !state.learner && !state.departed).then(|| Arc::clone(member))
    }

    /// Whether any member is currently healthy.
    pub fn any_healthy(&self) -> bool {
        self.members().iter().any(|m| m.is_healthy() && m.role.serves_clients())
    }

    /// Returns a ready connection to `member` for `lane`, dialing if there is none.
    pub async fn connection(&self, member: &Member, lane: Lane) -> Result<Connection, UpstreamError> {
        if let Some(connection) = member.cached_connection(lane) {
            return Ok(connection);
        }
        let _dialing = member.dialing[lane as usize].lock().await;
        if let Some(connection) = member.cached_connection(lane) {
            return Ok(connection);
        }
        // Boxed: a TLS handshake's state is large and dialling is rare; inline it would be copied
        // with every call's future.
        let connection = Box::pin(tokio::time::timeout(self.dial_timeout, self.dial(member)))
            .await
            .map_err(|_| UpstreamError::DialTimeout { endpoint: member.endpoint.url(), after: self.dial_timeout })??;
        if let Ok(mut slot) = member.connections[lane as usize].lock() {
            *slot = Some(connection.clone());
        }
        Ok(connection)
    }

    /// Opens a stream on `member`'s [`Lane::Streams`] connection whose body the caller writes
    /// itself, message by message; the answer's headers come with the returned future.
    pub async fn open_stream(
        &self,
        member: &Member,
        path_and_query: &http::uri::PathAndQuery,
        headers: &http::HeaderMap,
    ) -> Result<(crate::connection::ResponseFuture, h2::SendStream<bytes::Bytes>), UpstreamError> {
        let mut connection = self.connection(member, Lane::Streams).await?;
        connection
            .ready()
            .await
            .map_err(|source| UpstreamError::NotSent { endpoint: member.endpoint.url(), source })?;
        let mut request = Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = member
            .uri(path_and_query.clone())
            .map_err(|e| UpstreamError::Request { why: format!("cannot address {path_and_query}: {e}") })?;
        *request.headers_mut() = headers.clone();
        member.stats.requests.fetch_add(1, Relaxed);
        connection.open(request).map_err(|source| UpstreamError::NotSent { endpoint: member.endpoint.url(), source })
    }

    async fn dial(&self, member: &Member) -> Result<Connection, UpstreamError> {
        self.dial_with(member, self.tls.as_ref().map(|tls| tls.current())).await
    }

    async fn dial_with(
        &self,
        member: &Member,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Connection, UpstreamError> {
        let endpoint = &member.endpoint;
        let connect_error = |source: std::io::Error| UpstreamError::Connect { endpoint: endpoint.url(), source };
        let tcp = TcpStream::connect(endpoint.authority.as_str()).await.map_err(connect_error)?;
        // gRPC messages are small and latency-bound: never wait to coalesce them.
        tcp.set_nodelay(true).map_err(connect_error)?;
        match tls {
            Some(tls) if endpoint.tls => {
                let connector = tokio_rustls::TlsConnector::from(tls);
                let server_name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                    .map_err(|_| UpstreamError::BadServerName { endpoint: endpoint.url() })?;
                let stream = connector
                    .connect(server_name, tcp)
                    .await
                    .map_err(|source| UpstreamError::Tls { endpoint: endpoint.url(), source })?;
                handshake(BatchedWrites(stream), member).await
            }
            _ => handshake(BatchedWrites(tcp), member).await,
        }
    }

    /// The upstream TLS config, for the certificate reloader.
    pub fn tls_config(&self) -> Option<Arc<crate::reload::Reloadable<rustls::ClientConfig>>> {
        self.tls.clone()
    }

    /// Tries a reloaded upstream TLS config before adopting it: every member that has a
    /// connection is dialled with `candidate` and health-checked over the new connection (a
    /// client certificate etcd refuses only shows there, after the TLS 1.3 handshake). If any
    /// member accepts it, or none is connected, it becomes the config of all later dials and each
    /// accepting member's new connection replaces its old one, which is left to finish its calls
    /// and streams; members that refused it keep their connection. If every connected member
    /// refuses it, nothing changes and the refusals are returned.
    pub async fn adopt_tls_config(
        &self,
        candidate: Arc<rustls::ClientConfig>,
    ) -> Result<RedialCounts, (RedialCounts, String)> {
        let Some(current) = &self.tls else {
            return Err((
                RedialCounts { redialled: 0, failed: 0 },
                "the upstream connections do not use TLS".to_owned(),
            ));
        };
        // A trial is a dial plus one health check, so it gets a little more than a dial.
        let trial_timeout = self.dial_timeout.max(Duration::from_secs(2));
        let mut accepted = Vec::new();
        let mut refusals = Vec::new();
        let members = self.members();
        for member in members.iter() {
            if member.cached_connection(Lane::Calls).is_none() && member.cached_connection(Lane::Streams).is_none() {
                // The next request dials with the adopted config anyway.
                continue;
            }
            let attempt = async {
                let connection = self.dial_with(member, Some(Arc::clone(&candidate))).await?;
                self.check_over(member, connection.clone()).await?;
                Ok::<_, UpstreamError>(connection)
            };
            match tokio::time::timeout(trial_timeout, attempt).await {
                Ok(Ok(connection)) => accepted.push((member, connection)),
                Ok(Err(error)) => refusals.push(format!("{}: {error}", member.name)),
                Err(_) => refusals.push(format!("{}: no answer within {trial_timeout:?}", member.name)),
            }
        }
        if accepted.is_empty() && !refusals.is_empty() {
            return Err((RedialCounts { redialled: 0, failed: refusals.len() }, refusals.join("; ")));
        }
        current.replace(candidate);
        for (member, connection) in &accepted {
            // A dial still running with the old config must not overwrite the new connection.
            let _calls = member.dialing[Lane::Calls as usize].lock().await;
            let _streams = member.dialing[Lane::Streams as usize].lock().await;
            if let Ok(mut slot) = member.connections[Lane::Calls as usize].lock() {
                *slot = Some(connection.clone());
            }
            // The next stream dials with the new material; streams running now stay where they are.
            if let Ok(mut slot) = member.connections[Lane::Streams as usize].lock() {
                *slot = None;
            }
        }
        for refusal in &refusals {
            tracing::error!(%refusal, "a member refused the reloaded TLS material; its existing connection stays in use");
        }
        Ok(RedialCounts { redialled: accepted.len(), failed: refusals.len() })
    }

    /// Marks a member unhealthy after a failed request or check, and moves the pin away from it.
    pub fn mark_failed(&self, member: &Member, error: &dyn std::fmt::Display) {
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

    fn spawn_health_check(self: &Arc<Self>, member: Arc<Member>, interval: Duration, stop: CancellationToken) {
        let upstream = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
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

    /// `--dial-timeout`, which also bounds the cluster view's own calls.
    pub(crate) fn dial_timeout(&self) -> Duration {
        self.dial_timeout
    }

    /// One gRPC health check (`grpc.health.v1.Health/Check`) over the member's shared connection.
    async fn check(&self, member: &Member) -> Result<(), UpstreamError> {
        let connection = self.connection(member, Lane::Calls).await?;
        self.check_over(member, connection).await
    }

    async fn check_over(&self, member: &Member, connection: Connection) -> Result<(), UpstreamError> {
        use etcd_compat_proto::health::{
            health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse,
        };
        let answer: HealthCheckResponse =
            control_call(member, connection, "/grpc.health.v1.Health/Check", &HealthCheckRequest::default()).await?;
        if answer.status != ServingStatus::Serving as i32 {
            let why = format!("member reports health status {}", answer.status);
            return Err(UpstreamError::Unhealthy { endpoint: member.endpoint.url(), why });
        }
        Ok(())
    }
}

/// One unary call made by the proxy itself over `connection` (health checks, the cluster view),
/// without client credentials: the calls it makes need none.
pub(crate) async fn control_call<T: Message + Default>(
    member: &Member,
    mut connection: Connection,
    path: &'static str,
    request: &impl Message,
) -> Result<T, UpstreamError> {
    let failed = |why: String| UpstreamError::Unhealthy { endpoint: member.endpoint.url(), why };
    let request =
        Request::post(member.uri(http::uri::PathAndQuery::from_static(path)).map_err(|e| failed(e.to_string()))?)
            .header(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"))
            .header(http::header::TE, HeaderValue::from_static("trailers"))
            .body(RequestBody::Buffered(Some(crate::grpc::frame(&request.encode_to_vec()))))
            .map_err(|e| failed(e.to_string()))?;
    connection.ready().await.map_err(|source| UpstreamError::NotSent { endpoint: member.endpoint.url(), source })?;
    let response = connection
        .send_request(request)
        .await
        .map_err(|source| UpstreamError::Send { endpoint: member.endpoint.url(), source })?;
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

/// The members one request tries, in order (see [`Upstream::attempts`]).
pub struct AttemptOrder<'a> {
    upstream: &'a Upstream,
    target: crate::cluster::Target,
    /// The pinned member, not yet tried.
    first: Option<Arc<Member>>,
    /// The pinned member once tried, left out of the rest.
    tried: Option<Arc<Member>>,
    rest: Option<std::vec::IntoIter<Arc<Member>>>,
}

impl AttemptOrder<'_> {
    /// Goes on with `members` instead (after a routing error, once the view was refreshed).
    pub fn restart_with(&mut self, members: Vec<Arc<Member>>) {
        self.first = None;
        self.rest = Some(members.into_iter());
    }
}

impl Iterator for AttemptOrder<'_> {
    type Item = Arc<Member>;

    fn next(&mut self) -> Option<Arc<Member>> {
        if let Some(first) = self.first.take() {
            self.tried = Some(Arc::clone(&first));
            return Some(first);
        }
        let (upstream, target, tried) = (self.upstream, self.target, self.tried.take());
        let rest = self.rest.get_or_insert_with(|| {
            let mut order = upstream.attempt_order_for(target);
            if let Some(tried) = tried {
                order.retain(|member| !Arc::ptr_eq(member, &tried));
            }
            order.into_iter()
        });
        rest.next()
    }
}

/// Upstream connections replaced after a TLS reload, and members that refused the new material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedialCounts {
    /// Members now on a new connection.
    pub redialled: usize,
    /// Members that refused the new material and keep their old connection.
    pub failed: usize,
}

fn new_member(endpoint: &Endpoint, index: usize) -> Member {
    Member {
        name: Arc::from(endpoint.url()),
        scheme: if endpoint.tls { http::uri::Scheme::HTTPS } else { http::uri::Scheme::HTTP },
        endpoint: endpoint.clone(),
        index,
        healthy: AtomicBool::new(false),
        connections: [Mutex::new(None), Mutex::new(None)],
        dialing: [tokio::sync::Mutex::new(()), tokio::sync::Mutex::new(())],
        last_error: Mutex::new(None),
        stats: MemberStats::default(),
        role: crate::cluster::MemberRole::default(),
    }
}

async fn handshake<T>(io: T, member: &Member) -> Result<Connection, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    Connection::handshake(io, member.name())
        .await
        .map_err(|source| UpstreamError::Handshake { endpoint: member.endpoint.url(), source })
}
