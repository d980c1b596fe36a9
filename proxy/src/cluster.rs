//! The live view of the etcd cluster behind the proxy: which members exist, which are learners,
//! who leads; and the routing rules built on it.
//!
//! The view is refreshed every `--cluster-refresh-interval` and at once when etcd answers with a
//! routing error (a learner, a member without or no longer the leader). A refresh asks every
//! known member for its `Maintenance/Status` (member id, learner flag, leader, term) and one
//! member for `Cluster/MemberList`, over the connections requests use. Members in the list that
//! the proxy does not know yet are added to the pool (so a member added later is used without
//! reconfiguring the proxy); members that left the list stop getting requests.
//!
//! Routing: learners never get client traffic (except serializable Ranges with
//! `--learner-serializable-reads`); member-management calls go to the leader first, because a
//! follower forwards `MemberPromote` to the leader without the caller's credentials (etcd issue
//! 14070) and `MoveLeader` only works on the leader.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use prost::Message;
use tokio_util::sync::CancellationToken;

use etcd_compat_proto::etcdserverpb::{
    MemberListRequest, MemberListResponse, RangeRequest, StatusRequest, StatusResponse,
};

use crate::body::Buffered;
use crate::config::{Config, Endpoint, MemberListMode};
use crate::error::UpstreamError;
use crate::grpc::{self, Code, Replay, Route};
use crate::upstream::{Member, Upstream};

/// Metadata an admin tool sends (value `real`) to get etcd's own member list through a proxy
/// that answers `MemberList` with its advertised URLs.
pub const MEMBER_LIST_HEADER: &str = "etcd-compat-proxy-member-list";

const MEMBER_LIST_PATH: &str = "/etcdserverpb.Cluster/MemberList";
const STATUS_PATH: &str = "/etcdserverpb.Maintenance/Status";

/// What the view knows about the member behind one endpoint; updated by refreshes and by
/// routing errors, read on every request.
#[derive(Default)]
pub struct MemberRole {
    /// etcd's member id, 0 until a Status answer names it.
    id: AtomicU64,
    learner: AtomicBool,
    /// No longer in the member list (removed, or a second endpoint of a known member).
    departed: AtomicBool,
    /// etcd's member name, for `/health`.
    name: Mutex<Option<String>>,
}

impl MemberRole {
    /// etcd's member id, 0 while unknown.
    pub fn id(&self) -> u64 {
        self.id.load(Relaxed)
    }

    /// Whether the member is a learner (not yet promoted).
    pub fn is_learner(&self) -> bool {
        self.learner.load(Relaxed)
    }

    /// Whether the member left the cluster (or duplicates another endpoint of a member).
    pub fn is_departed(&self) -> bool {
        self.departed.load(Relaxed)
    }

    /// Whether ordinary client requests may go to this member.
    pub fn serves_clients(&self) -> bool {
        !self.is_learner() && !self.is_departed()
    }

    /// etcd's name for the member, once known.
    pub fn name(&self) -> Option<String> {
        self.name.lock().ok().and_then(|name| name.clone())
    }

    fn set_learner(&self, learner: bool, endpoint: &str) {
        let was = self.learner.swap(learner, Relaxed);
        if was && !learner {
            tracing::info!(member = endpoint, "learner was promoted; it now gets client requests");
        } else if !was && learner {
            tracing::info!(member = endpoint, "member is a learner; it gets no client requests");
        }
    }

    fn set_departed(&self, departed: bool, endpoint: &str) {
        if !self.departed.swap(departed, Relaxed) && departed {
            tracing::warn!(member = endpoint, "member is not in the cluster's member list; it gets no requests");
        }
    }
}

/// A copy of one member's routing facts, so that ordering is a pure function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemberState {
    /// The last health check or request succeeded.
    pub healthy: bool,
    /// The member is a learner.
    pub learner: bool,
    /// The member left the cluster.
    pub departed: bool,
    /// etcd's member id, 0 while unknown.
    pub id: u64,
}

/// Which members a request may go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Voting members, the pinned one first.
    Voter,
    /// The leader first, then the voting members (MemberAdd/Remove/Update/Promote, MoveLeader, Status).
    Leader,
    /// Voting members, then learners (serializable Ranges with `--learner-serializable-reads`).
    VoterThenLearner,
}

/// The order in which to try members (indices into `members`) for `target`, given the pinned
/// member `preferred` and the leader's id (0 if unknown): healthy before unhealthy (health may
/// be stale, so unhealthy ones are still tried last); learners only for
/// [`Target::VoterThenLearner`], after every voting member; departed members never.
pub fn attempt_order(members: &[MemberState], preferred: usize, leader: u64, target: Target) -> Vec<usize> {
    let n = members.len();
    let start = preferred % n.max(1);
    let rotated = || (0..n).map(move |i| (start + i) % n);
    let voter = |i: &usize| !members[*i].learner && !members[*i].departed;
    let learner = |i: &usize| members[*i].learner && !members[*i].departed;
    let mut order: Vec<usize> = Vec::with_capacity(n);
    if target == Target::Leader && leader != 0 {
        if let Some(i) = rotated().find(|i| voter(i) && members[*i].id == leader && members[*i].healthy) {
            order.push(i);
        }
    }
    let push = |order: &mut Vec<usize>, candidates: &mut dyn Iterator<Item = usize>| {
        for i in candidates {
            if !order.contains(&i) {
                order.push(i);
            }
        }
    };
    push(&mut order, &mut rotated().filter(|i| voter(i) && members[*i].healthy));
    push(&mut order, &mut rotated().filter(|i| voter(i) && !members[*i].healthy));
    if target == Target::VoterThenLearner {
        push(&mut order, &mut rotated().filter(|i| learner(i) && members[*i].healthy));
        push(&mut order, &mut rotated().filter(|i| learner(i) && !members[*i].healthy));
    }
    order
}

/// Where a call should go: by method, and for Ranges by whether the request is serializable.
pub fn target_for(route: &Route, request: Option<&Bytes>, learner_serializable_reads: bool) -> Target {
    if route.leader_first {
        Target::Leader
    } else if learner_serializable_reads
        && route.index == grpc::range_index()
        && request.is_some_and(is_serializable_range)
    {
        Target::VoterThenLearner
    } else {
        Target::Voter
    }
}

fn is_serializable_range(framed: &Bytes) -> bool {
    match framed.first() {
        Some(0) if framed.len() >= 5 => RangeRequest::decode(&framed[5..]).is_ok_and(|r| r.serializable),
        _ => false,
    }
}

/// An etcd answer saying the request went to the wrong member; see [`routing_error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingError {
    /// `etcdserver: rpc not supported for learner`: refused before the handler ran.
    Learner,
    /// `etcdserver: not leader`: a leader-only call (MoveLeader) refused by a follower.
    NotLeader,
    /// `etcdserver: no leader`: refused because the member has no leader (a `hasleader`
    /// request, or a lease call it could not forward); nothing was proposed.
    NoLeader,
    /// `etcdserver: leader changed`: a linearizable read or lease lookup interrupted by an
    /// election.
    LeaderChanged,
}

impl RoutingError {
    /// etcd's exact status message for this error.
    pub fn message(self) -> &'static str {
        match self {
            RoutingError::Learner => "etcdserver: rpc not supported for learner",
            RoutingError::NotLeader => "etcdserver: not leader",
            RoutingError::NoLeader => "etcdserver: no leader",
            RoutingError::LeaderChanged => "etcdserver: leader changed",
        }
    }

    /// Whether a request that got this answer may be sent once more, to another member. Reads
    /// always. Writes when etcd refused them before proposing anything (learner, not leader,
    /// no leader). `leader changed` is only retried for leader-routed calls (promote, move
    /// leader, member changes, which etcd checks again and refuses if already done): for any
    /// other write the proxy cannot rule out that the proposal was applied.
    pub fn allows_retry(self, route: &Route, target: Target) -> bool {
        match (self, route.replay) {
            (_, Replay::Idempotent) => true,
            (_, Replay::Never) => false,
            (RoutingError::LeaderChanged, Replay::IfNotSent) => target == Target::Leader,
            (_, Replay::IfNotSent) => true,
        }
    }
}

/// Recognises etcd's routing errors in a trailers-only answer's headers.
pub fn routing_error(headers: &HeaderMap) -> Option<RoutingError> {
    let code = Code::from_headers(headers)?;
    if code != Code::Unavailable && code != Code::FailedPrecondition {
        return None;
    }
    let message = headers.get("grpc-message")?.as_bytes();
    [RoutingError::Learner, RoutingError::NotLeader, RoutingError::NoLeader, RoutingError::LeaderChanged]
        .into_iter()
        .find(|e| e.message().as_bytes() == message)
}

/// The view's shared state and settings; lives in [`Upstream`].
pub struct ClusterView {
    /// The leader's member id, 0 when unknown or when the cluster has none.
    leader: AtomicU64,
    /// Completed refreshes, so concurrent callers share one.
    generation: AtomicU64,
    refreshing: tokio::sync::Mutex<()>,
    interval: Duration,
    learner_serializable_reads: bool,
    /// Client URLs put into `MemberList` answers, when the proxy rewrites them.
    advertised_urls: Option<Vec<String>>,
    /// Whether discovered `https://` members can be dialled.
    upstream_tls: bool,
}

impl ClusterView {
    /// Reads the view's settings from the configuration.
    pub fn new(config: &Config) -> Self {
        let advertised_urls = match config.member_list {
            MemberListMode::Proxy => config.advertised_client_urls.clone(),
            MemberListMode::Real => None,
        };
        ClusterView {
            leader: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            refreshing: tokio::sync::Mutex::new(()),
            interval: config.cluster_refresh_interval,
            learner_serializable_reads: config.learner_serializable_reads,
            advertised_urls,
            upstream_tls: config.upstream_tls.is_some(),
        }
    }

    /// The leader's member id, 0 when unknown or when there is none.
    pub fn leader(&self) -> u64 {
        self.leader.load(Relaxed)
    }

    /// Where a call should go (see [`target_for`]).
    pub fn target(&self, route: &Route, request: Option<&Bytes>) -> Target {
        target_for(route, request, self.learner_serializable_reads)
    }

    /// Whether this call's `MemberList` answer gets the proxy's advertised client URLs.
    pub fn rewrites_member_list(&self, route: &Route, headers: &HeaderMap) -> bool {
        self.advertised_urls.is_some()
            && etcd_compat_proto::METHODS.get(route.index).is_some_and(|m| m.path == MEMBER_LIST_PATH)
            && headers.get(MEMBER_LIST_HEADER).is_none_or(|v| v.as_bytes() != b"real")
    }

    /// Replaces the client URLs in a `MemberList` answer with the advertised ones; anything
    /// else (errors, unparsable answers) passes unchanged.
    pub async fn rewrite_member_list(
        &self,
        response: http::Response<crate::h2_stream::RecvBody>,
        first: Option<bytes::Bytes>,
    ) -> Buffered {
        let buffered = match Buffered::collect(response, first).await {
            Ok(buffered) | Err(buffered) => buffered,
        };
        let (Some(urls), Some(Code::Ok), Some(message)) = (&self.advertised_urls, buffered.code(), buffered.message())
        else {
            return buffered;
        };
        match rewrite_client_urls(&message, urls) {
            Some(rewritten) => buffered.with_message(grpc::frame(&rewritten)),
            None => buffered,
        }
    }
}

/// Rewrites a serialized `MemberListResponse` so that every member that has client URLs lists
/// `urls` instead. Works on the wire format so that every other byte (member ids, names, peer
/// URLs, learner flags, the header, fields unknown to the proxy) stays as etcd sent it, in its
/// order. `None` if the message is not a well-formed protobuf.
pub fn rewrite_client_urls(message: &[u8], urls: &[String]) -> Option<Vec<u8>> {
    const MEMBERS: u64 = 2;
    const CLIENT_URLS: u64 = 4;
    let mut out = Vec::with_capacity(message.len() + 64);
    for field in Fields::new(message) {
        let field = field?;
        if field.number != MEMBERS || field.wire_type != 2 {
            out.extend_from_slice(field.raw);
            continue;
        }
        let mut member = Vec::with_capacity(field.payload.len() + 64);
        let mut replaced = false;
        for inner in Fields::new(field.payload) {
            let inner = inner?;
            if inner.number != CLIENT_URLS {
                member.extend_from_slice(inner.raw);
                continue;
            }
            // The advertised URLs take the place of etcd's first client URL.
            if !replaced {
                replaced = true;
                for url in urls {
                    put_varint(&mut member, (CLIENT_URLS << 3) | 2);
                    put_varint(&mut member, url.len() as u64);
                    member.extend_from_slice(url.as_bytes());
                }
            }
        }
        put_varint(&mut out, (MEMBERS << 3) | 2);
        put_varint(&mut out, member.len() as u64);
        out.extend_from_slice(&member);
    }
    Some(out)
}

/// One protobuf field: its number, wire type, payload (for length-delimited fields) and raw bytes.
struct Field<'a> {
    number: u64,
    wire_type: u8,
    payload: &'a [u8],
    raw: &'a [u8],
}

/// Iterates the top-level fields of a protobuf message without decoding them.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(message: &'a [u8]) -> Self {
        Fields { rest: message }
    }

    fn next_field(&mut self) -> Option<Field<'a>> {
        let all = self.rest;
        let mut cursor = all;
        let key = take_varint(&mut cursor)?;
        let wire_type = (key & 7) as u8;
        let payload: &[u8] = match wire_type {
            0 => {
                take_varint(&mut cursor)?;
                &[]
            }
            1 => {
                cursor = cursor.get(8..)?;
                &[]
            }
            2 => {
                let length = usize::try_from(take_varint(&mut cursor)?).ok()?;
                let payload = cursor.get(..length)?;
                cursor = &cursor[length..];
                payload
            }
            5 => {
                cursor = cursor.get(4..)?;
                &[]
            }
            _ => return None,
        };
        let used = all.len() - cursor.len();
        self.rest = cursor;
        Some(Field { number: key >> 3, wire_type, payload, raw: &all[..used] })
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Option<Field<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let field = self.next_field();
        if field.is_none() {
            // A malformed field ends the walk with one `None`.
            self.rest = &[];
        }
        Some(field)
    }
}

fn take_varint(cursor: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = cursor.split_first()?;
        *cursor = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The leader by the answers of a refresh: the one named at the highest term (a member cut off
/// from the others may still name an old leader at an older term); 0 if that term has none.
pub fn leader_from_statuses(statuses: &[(u64, u64)]) -> u64 {
    // (raft term, leader id)
    statuses.iter().max_by_key(|(term, leader)| (*term, *leader)).map_or(0, |(_, leader)| *leader)
}

/// What a member list changes in the pool: which listed members are new endpoints to add
/// (their first client URL the proxy can dial), by position in `listed`.
pub fn discover(
    known: &[(u64, Endpoint)],
    listed: &[etcd_compat_proto::etcdserverpb::Member],
    upstream_tls: bool,
) -> Vec<(usize, Endpoint)> {
    let mut new = Vec::new();
    for (position, member) in listed.iter().enumerate() {
        if known.iter().any(|(id, _)| *id != 0 && *id == member.id) {
            continue;
        }
        let endpoints: Vec<Endpoint> =
            member.client_ur_ls.iter().filter_map(|url| Endpoint::parse(url, false).ok()).collect();
        if endpoints.iter().any(|e| known.iter().any(|(_, k)| k == e)) {
            continue;
        }
        if let Some(endpoint) = endpoints.into_iter().find(|e| !e.tls || upstream_tls) {
            new.push((position, endpoint));
        }
    }
    new
}

impl Upstream {
    /// Refreshes the view now and then every `--cluster-refresh-interval` until `stop`.
    pub fn spawn_view_refresh(self: &Arc<Self>, stop: CancellationToken) {
        let upstream = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(upstream.view.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                upstream.refresh_view().await;
            }
        });
    }

    /// Refreshes the view; callers arriving while a refresh runs wait for it instead of
    /// starting another.
    pub async fn refresh_view(self: &Arc<Self>) {
        let seen = self.view.generation.load(Relaxed);
        let _running = self.view.refreshing.lock().await;
        if self.view.generation.load(Relaxed) != seen {
            return;
        }
        self.refresh_once().await;
        self.view.generation.fetch_add(1, Relaxed);
    }

    /// Records what a routing error says about `member` and refreshes the view, so that the
    /// retry that follows goes where etcd wants it.
    pub async fn reroute_after(self: &Arc<Self>, member: &Member, error: RoutingError) {
        tracing::debug!(member = %member.name(), error = error.message(), "etcd answered with a routing error; refreshing the cluster view");
        match error {
            RoutingError::Learner => {
                member.role.set_learner(true, &member.name());
                self.move_pin_from(member.index());
            }
            RoutingError::NotLeader => {
                if self.view.leader() == member.role.id() {
                    self.view.leader.store(0, Relaxed);
                }
            }
            RoutingError::NoLeader | RoutingError::LeaderChanged => self.view.leader.store(0, Relaxed),
        }
        self.refresh_view().await;
    }

    /// Looks at an answer from `member`: if it is a routing error that may be retried
    /// (`may_retry`, and [`RoutingError::allows_retry`]), refreshes the view and returns the
    /// other members to try, in order; otherwise `None`, and a routing error only updates the
    /// view in the background while etcd's answer goes to the client.
    pub async fn reroute(
        self: &Arc<Self>,
        member: &Arc<Member>,
        headers: &HeaderMap,
        route: &Route,
        target: Target,
        may_retry: bool,
    ) -> Option<Vec<Arc<Member>>> {
        let routing = routing_error(headers)?;
        if !(may_retry && routing.allows_retry(route, target)) {
            self.reroute_in_background(member, routing);
            return None;
        }
        self.reroute_after(member, routing).await;
        Some(self.attempt_order_for(target).into_iter().filter(|m| !Arc::ptr_eq(m, member)).collect())
    }

    /// Starts a refresh without waiting for it (after a connection failure).
    pub fn refresh_in_background(self: &Arc<Self>) {
        let upstream = Arc::clone(self);
        tokio::spawn(async move { upstream.refresh_view().await });
    }

    /// [`Upstream::reroute_after`] without waiting, for an answer that is passed on as it is.
    pub fn reroute_in_background(self: &Arc<Self>, member: &Arc<Member>, error: RoutingError) {
        let upstream = Arc::clone(self);
        let member = Arc::clone(member);
        tokio::spawn(async move { upstream.reroute_after(&member, error).await });
    }

    async fn refresh_once(self: &Arc<Self>) {
        let members = self.members();
        let call_timeout = self.dial_timeout().min(Duration::from_secs(2));
        let statuses = futures_util::future::join_all(members.iter().map(|member| {
            let member = Arc::clone(member);
            async move {
                let status = tokio::time::timeout(
                    call_timeout,
                    self.unary::<StatusResponse>(&member, STATUS_PATH, &StatusRequest {}),
                )
                .await;
                (member, status)
            }
        }))
        .await;
        let mut terms = Vec::with_capacity(statuses.len());
        let mut answered = Vec::with_capacity(statuses.len());
        for (member, status) in statuses {
            match status {
                Ok(Ok(status)) => {
                    let id = status.header.as_ref().map_or(0, |h| h.member_id);
                    member.role.id.store(id, Relaxed);
                    member.role.set_learner(status.is_learner, &member.name());
                    terms.push((status.raft_term, status.leader));
                    answered.push(member);
                }
                Ok(Err(error)) => tracing::debug!(member = %member.name(), %error, "cluster view: Status failed"),
                Err(_) => tracing::debug!(member = %member.name(), "cluster view: Status got no answer in time"),
            }
        }
        let leader = leader_from_statuses(&terms);
        let previous = self.view.leader.swap(leader, Relaxed);
        if previous != leader {
            tracing::info!(leader = %format!("{leader:x}"), "cluster view: leader changed");
        }

        // The leader's list is the most current; any voting member that answered will do
        // (learners refuse MemberList; a member that left has a stale one).
        answered.sort_by_key(|m| m.role.id() != leader || leader == 0);
        let mut listed = None;
        for source in answered.iter().filter(|m| m.role.serves_clients()) {
            let request = MemberListRequest { linearizable: false };
            match tokio::time::timeout(
                call_timeout,
                self.unary::<MemberListResponse>(source, MEMBER_LIST_PATH, &request),
            )
            .await
            {
                Ok(Ok(list)) => {
                    listed = Some(list.members);
                    break;
                }
                Ok(Err(error)) => tracing::debug!(member = %source.name(), %error, "cluster view: MemberList failed"),
                Err(_) => tracing::debug!(member = %source.name(), "cluster view: MemberList got no answer in time"),
            }
        }
        let Some(listed) = listed else { return };
        self.apply_member_list(&listed);
    }

    fn apply_member_list(self: &Arc<Self>, listed: &[etcd_compat_proto::etcdserverpb::Member]) {
        let members = self.members();
        let mut first_endpoint_of: Vec<u64> = Vec::new();
        for member in members.iter() {
            let id = member.role.id();
            if id == 0 {
                continue;
            }
            match listed.iter().find(|m| m.id == id) {
                Some(entry) => {
                    member.role.set_learner(entry.is_learner, &member.name());
                    if let Ok(mut name) = member.role.name.lock() {
                        *name = Some(entry.name.clone());
                    }
                    // Two endpoints of one member would double its share; keep the first.
                    let duplicate = first_endpoint_of.contains(&id);
                    member.role.set_departed(duplicate, &member.name());
                    first_endpoint_of.push(id);
                }
                None => member.role.set_departed(true, &member.name()),
            }
        }
        let known: Vec<(u64, Endpoint)> = members.iter().map(|m| (m.role.id(), m.endpoint.clone())).collect();
        for (position, endpoint) in discover(&known, listed, self.view.upstream_tls) {
            let entry = &listed[position];
            let added = self.add_member(&endpoint);
            added.role.id.store(entry.id, Relaxed);
            added.role.set_learner(entry.is_learner, &added.name());
            if let Ok(mut name) = added.role.name.lock() {
                *name = Some(entry.name.clone());
            };
        }
        let pinned = self.pinned_index();
        if members.get(pinned).is_some_and(|m| !m.role.serves_clients()) {
            self.move_pin_from(pinned);
        }
    }

    /// One unary call made by the proxy itself (no client credentials: Status and MemberList
    /// need none).
    async fn unary<T: Message + Default>(
        &self,
        member: &Member,
        path: &'static str,
        request: &impl Message,
    ) -> Result<T, UpstreamError> {
        let connection = self.connection(member, crate::upstream::Lane::Calls).await?;
        crate::upstream::control_call(member, connection, path, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_compat_proto::etcdserverpb::Member as ListedMember;

    fn state(healthy: bool, learner: bool, id: u64) -> MemberState {
        MemberState { healthy, learner, departed: false, id }
    }

    #[test]
    fn learners_never_get_ordinary_requests() {
        let members = [state(true, true, 1), state(true, false, 2), state(false, false, 3)];
        assert_eq!(attempt_order(&members, 0, 2, Target::Voter), vec![1, 2]);
        assert_eq!(attempt_order(&members, 0, 2, Target::VoterThenLearner), vec![1, 2, 0]);
    }

    #[test]
    fn pinned_member_first_then_rotation_healthy_before_unhealthy() {
        let members = [state(true, false, 1), state(false, false, 2), state(true, false, 3)];
        assert_eq!(attempt_order(&members, 1, 0, Target::Voter), vec![2, 0, 1]);
        assert_eq!(attempt_order(&members, 2, 0, Target::Voter), vec![2, 0, 1]);
    }

    #[test]
    fn leader_routed_calls_go_to_the_healthy_leader_first() {
        let members = [state(true, false, 1), state(true, false, 2), state(true, true, 3)];
        assert_eq!(attempt_order(&members, 0, 2, Target::Leader), vec![1, 0]);
        // Unknown leader: the voting members in pin order.
        assert_eq!(attempt_order(&members, 0, 0, Target::Leader), vec![0, 1]);
        // An unhealthy leader is not put first.
        let members = [state(true, false, 1), state(false, false, 2)];
        assert_eq!(attempt_order(&members, 0, 2, Target::Leader), vec![0, 1]);
        // A learner is never the leader.
        let members = [state(true, false, 1), state(true, true, 2)];
        assert_eq!(attempt_order(&members, 0, 2, Target::Leader), vec![0]);
    }

    #[test]
    fn departed_members_are_never_tried() {
        let mut gone = state(true, false, 9);
        gone.departed = true;
        let members = [gone, state(false, false, 2)];
        assert_eq!(attempt_order(&members, 0, 0, Target::VoterThenLearner), vec![1]);
        assert!(attempt_order(&[], 0, 0, Target::Voter).is_empty());
    }

    #[test]
    fn targets_by_method() {
        let route = |path| grpc::route(path);
        let serializable = grpc::frame(
            &RangeRequest { key: b"k".to_vec().into(), serializable: true, ..Default::default() }.encode_to_vec(),
        );
        let linearizable =
            grpc::frame(&RangeRequest { key: b"k".to_vec().into(), ..Default::default() }.encode_to_vec());
        for path in [
            "/etcdserverpb.Cluster/MemberPromote",
            "/etcdserverpb.Maintenance/MoveLeader",
            "/etcdserverpb.Cluster/MemberAdd",
            "/etcdserverpb.Cluster/MemberRemove",
            "/etcdserverpb.Cluster/MemberUpdate",
            "/etcdserverpb.Maintenance/Status",
        ] {
            assert_eq!(target_for(&route(path), None, false), Target::Leader, "{path}");
        }
        let range = route("/etcdserverpb.KV/Range");
        assert_eq!(target_for(&range, Some(&serializable), true), Target::VoterThenLearner);
        assert_eq!(target_for(&range, Some(&serializable), false), Target::Voter);
        assert_eq!(target_for(&range, Some(&linearizable), true), Target::Voter);
        assert_eq!(target_for(&route("/etcdserverpb.KV/Put"), None, true), Target::Voter);
    }

    #[test]
    fn routing_errors_are_recognised_by_code_and_exact_message() {
        let headers = |code: Code, message: &str| grpc::status_headers(code, message);
        assert_eq!(
            routing_error(&headers(Code::Unavailable, "etcdserver: rpc not supported for learner")),
            Some(RoutingError::Learner)
        );
        assert_eq!(
            routing_error(&headers(Code::FailedPrecondition, "etcdserver: not leader")),
            Some(RoutingError::NotLeader)
        );
        assert_eq!(routing_error(&headers(Code::Unavailable, "etcdserver: no leader")), Some(RoutingError::NoLeader));
        assert_eq!(
            routing_error(&headers(Code::Unavailable, "etcdserver: leader changed")),
            Some(RoutingError::LeaderChanged)
        );
        assert_eq!(routing_error(&headers(Code::Unavailable, "etcdserver: request timed out")), None);
        assert_eq!(routing_error(&headers(Code::Unknown, "etcdserver: no leader")), None);
        assert_eq!(routing_error(&HeaderMap::new()), None);
    }

    #[test]
    fn retry_rules_of_routing_errors() {
        let put = grpc::route("/etcdserverpb.KV/Put");
        let range = grpc::route("/etcdserverpb.KV/Range");
        let promote = grpc::route("/etcdserverpb.Cluster/MemberPromote");
        let watch = grpc::route("/etcdserverpb.Watch/Watch");
        assert!(RoutingError::LeaderChanged.allows_retry(&range, Target::Voter));
        assert!(!RoutingError::LeaderChanged.allows_retry(&put, Target::Voter));
        assert!(RoutingError::LeaderChanged.allows_retry(&promote, Target::Leader));
        assert!(RoutingError::NoLeader.allows_retry(&put, Target::Voter));
        assert!(RoutingError::Learner.allows_retry(&put, Target::Voter));
        assert!(RoutingError::NotLeader.allows_retry(&promote, Target::Leader));
        assert!(!RoutingError::Learner.allows_retry(&watch, Target::Voter));
    }

    #[test]
    fn leader_is_the_one_named_at_the_highest_term() {
        assert_eq!(leader_from_statuses(&[(3, 7), (4, 9), (4, 9)]), 9);
        assert_eq!(leader_from_statuses(&[(3, 7), (4, 0)]), 0);
        assert_eq!(leader_from_statuses(&[]), 0);
    }

    fn listed(id: u64, urls: &[&str], learner: bool) -> ListedMember {
        ListedMember {
            id,
            name: format!("m{id}"),
            peer_ur_ls: vec![format!("http://127.0.0.1:{}", 9000 + id)],
            client_ur_ls: urls.iter().map(|u| u.to_string()).collect(),
            is_learner: learner,
        }
    }

    #[test]
    fn discovery_adds_only_unknown_reachable_members() {
        let seed = Endpoint::parse("http://127.0.0.1:2379", false).unwrap();
        let known = vec![(1, seed.clone())];
        let list = vec![
            listed(1, &["http://127.0.0.1:2379"], false),
            listed(2, &["http://127.0.0.1:2380"], true),
            // Added but never started: no client URL yet.
            listed(3, &[], true),
            listed(4, &["https://127.0.0.1:2381"], false),
        ];
        let found = discover(&known, &list, false);
        assert_eq!(found, vec![(1, Endpoint::parse("http://127.0.0.1:2380", false).unwrap())]);
        let found = discover(&known, &list, true);
        assert_eq!(found.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![1, 3]);
        // A seed whose id is not known yet is matched by URL.
        assert!(discover(&[(0, seed)], &list[..1], false).is_empty());
    }

    #[test]
    fn member_list_updates_the_pool() {
        let args = crate::config::StartArgs {
            endpoints: Some(vec!["http://127.0.0.1:2001".into(), "http://127.0.0.1:2002".into()]),
            ..Default::default()
        };
        let upstream = Upstream::new(&args.validate().unwrap()).unwrap();
        let seeds = upstream.members();
        // Status answers named the seeds' ids; the first seed is pinned.
        seeds[0].role.id.store(1, Relaxed);
        seeds[1].role.id.store(2, Relaxed);
        // Member 1 was removed, member 2 is a learner, member 3 is new.
        let list = vec![listed(2, &["http://127.0.0.1:2002"], true), listed(3, &["http://127.0.0.1:2003"], false)];
        upstream.apply_member_list(&list);
        let members = upstream.members();
        assert_eq!(members.len(), 3);
        assert!(members[0].role.is_departed());
        assert!(members[1].role.is_learner() && !members[1].role.is_departed());
        assert_eq!(members[1].role.name().as_deref(), Some("m2"));
        assert_eq!(members[2].endpoint.url(), "http://127.0.0.1:2003");
        assert_eq!((members[2].role.id(), members[2].role.is_learner()), (3, false));
        // Neither the departed seed nor the learner may stay pinned.
        assert_eq!(upstream.pinned_index(), 0, "no member is healthy yet, so the pin cannot move");
        assert!(upstream.attempt_order().iter().all(|m| m.role.id() == 3));
        // The learner's promotion puts it back into the pool; listing again adds nothing.
        let list = vec![listed(2, &["http://127.0.0.1:2002"], false), listed(3, &["http://127.0.0.1:2003"], false)];
        upstream.apply_member_list(&list);
        let ids: Vec<u64> = upstream.attempt_order().iter().map(|m| m.role.id()).collect();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(upstream.members().len(), 3);
    }

    #[test]
    fn attempts_try_the_pinned_member_first_then_the_rest_in_order() {
        let args = crate::config::StartArgs {
            endpoints: Some((1..=3).map(|i| format!("http://127.0.0.1:300{i}")).collect()),
            ..Default::default()
        };
        let upstream = Upstream::new(&args.validate().unwrap()).unwrap();
        let members = upstream.members();
        for (i, member) in members.iter().enumerate() {
            member.role.id.store(i as u64 + 1, Relaxed);
        }
        let ids = |order: Vec<Arc<Member>>| order.iter().map(|m| m.role.id()).collect::<Vec<u64>>();
        // Nobody healthy: no shortcut, the full order.
        assert_eq!(ids(upstream.attempts(Target::Voter).collect()), ids(upstream.attempt_order()));
        upstream.mark_healthy(&members[1]);
        upstream.mark_healthy(&members[2]);
        let pinned = upstream.pinned_index();
        let mut attempts = upstream.attempts(Target::Voter);
        assert_eq!(attempts.next().map(|m| m.index()), Some(pinned));
        let rest: Vec<Arc<Member>> = attempts.collect();
        assert!(rest.iter().all(|m| m.index() != pinned));
        let mut expected = ids(upstream.attempt_order());
        expected.retain(|id| *id != pinned as u64 + 1);
        assert_eq!(ids(rest), expected);
        for target in [Target::Leader, Target::VoterThenLearner] {
            assert_eq!(ids(upstream.attempts(target).collect()), ids(upstream.attempt_order_for(target)));
        }
    }

    #[test]
    fn member_list_rewrite_replaces_only_client_urls() {
        let header =
            etcd_compat_proto::etcdserverpb::ResponseHeader { cluster_id: 5, member_id: 1, revision: 0, raft_term: 3 };
        let original = MemberListResponse {
            header: Some(header),
            members: vec![listed(1, &["http://127.0.0.1:2379", "http://10.0.0.1:2379"], false), listed(2, &[], true)],
        };
        let mut bytes = original.encode_to_vec();
        // A field the proxy's protos do not know must survive.
        bytes.extend_from_slice(&[0xf8, 0x01, 0x2a]);
        let urls = vec!["http://proxy:23790".to_owned()];
        let rewritten = rewrite_client_urls(&bytes, &urls).unwrap();
        let decoded = MemberListResponse::decode(rewritten.as_slice()).unwrap();
        assert_eq!(decoded.header, original.header);
        assert_eq!(decoded.members[0].client_ur_ls, urls);
        assert_eq!(decoded.members[0].peer_ur_ls, original.members[0].peer_ur_ls);
        assert_eq!((decoded.members[0].id, decoded.members[0].name.as_str()), (1, "m1"));
        assert!(decoded.members[1].client_ur_ls.is_empty());
        assert!(decoded.members[1].is_learner);
        assert!(rewritten.ends_with(&[0xf8, 0x01, 0x2a]));
        // Same URLs in: the same bytes out.
        let same = vec!["http://127.0.0.1:2379".to_owned(), "http://10.0.0.1:2379".to_owned()];
        assert_eq!(rewrite_client_urls(&bytes, &same).unwrap(), bytes);
        assert_eq!(rewrite_client_urls(&[0x12, 0x05, 0x01], &urls), None);
    }
}
