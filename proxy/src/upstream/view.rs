//! The live view of the cluster: which members exist, which are learners, who leads.
//!
//! The view is refreshed every `--cluster-refresh-interval` and at once when etcd answers with a
//! routing error (a learner, a member without or no longer the leader). A refresh asks every
//! known member for its `Maintenance/Status` (member id, learner flag, leader, term) and one
//! member for `Cluster/MemberList`, over the connections requests use. Members in the list that
//! the proxy does not know yet are added to the pool (so a member added later is used without
//! reconfiguring the proxy); members that left the list stop getting requests.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use tokio_util::sync::CancellationToken;

use etcd_compat_proto::etcdserverpb::{MemberListRequest, MemberListResponse, StatusRequest, StatusResponse};

use crate::config::{Config, Endpoint, MemberListMode};
use crate::grpc::Route;

use super::{routing, routing_error, Cluster, Member, RoutingError, Target, MEMBER_LIST_HEADER};

const MEMBER_LIST_PATH: &str = "/etcdserverpb.Cluster/MemberList";
const STATUS_PATH: &str = "/etcdserverpb.Maintenance/Status";

/// The view's shared state and settings; lives in [`Cluster`].
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

    /// Forgets the leader (the cluster was switched); the next refresh finds the new one.
    pub fn forget_leader(&self) {
        self.leader.store(0, Relaxed);
    }

    /// Where a call should go (see [`target_for`]).
    pub fn target(&self, route: &Route, request: Option<&Bytes>) -> Target {
        routing::target_for(route, request, self.learner_serializable_reads)
    }

    /// Whether this call's `MemberList` answer gets the proxy's advertised client URLs.
    pub fn rewrites_member_list(&self, route: &Route, headers: &HeaderMap) -> bool {
        self.advertised_urls.is_some()
            && route.member_list
            && headers.get(MEMBER_LIST_HEADER).is_none_or(|v| v.as_bytes() != b"real")
    }

    /// The client URLs `MemberList` answers carry instead of etcd's, when the proxy rewrites them.
    pub fn advertised_urls(&self) -> Option<&[String]> {
        self.advertised_urls.as_deref()
    }
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

impl Cluster {
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
            RoutingError::NoLeader | RoutingError::LeaderChanged | RoutingError::ProposalDropped => {
                self.view.leader.store(0, Relaxed)
            }
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

    /// [`Cluster::reroute_after`] without waiting, for an answer that is passed on as it is.
    pub fn reroute_in_background(self: &Arc<Self>, member: &Arc<Member>, error: RoutingError) {
        let upstream = Arc::clone(self);
        let member = Arc::clone(member);
        tokio::spawn(async move { upstream.reroute_after(&member, error).await });
    }

    async fn refresh_once(self: &Arc<Self>) {
        let set = self.member_set();
        let members = self.members();
        let call_timeout = self.dial_timeout().min(Duration::from_secs(2));
        let statuses = futures_util::future::join_all(members.iter().map(|member| {
            let member = Arc::clone(member);
            async move {
                let status = tokio::time::timeout(
                    call_timeout,
                    self.control_call::<StatusResponse>(&member, STATUS_PATH, &StatusRequest {}),
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
                    member.role.set_version(&status.version, &member.name());
                    terms.push((status.raft_term, status.leader));
                    answered.push(member);
                }
                Ok(Err(error)) => tracing::debug!(member = %member.name(), %error, "cluster view: Status failed"),
                Err(_) => tracing::debug!(member = %member.name(), "cluster view: Status got no answer in time"),
            }
        }
        if self.member_set() != set {
            // Switched to another cluster meanwhile: these answers describe the old one.
            return;
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
                self.control_call::<MemberListResponse>(source, MEMBER_LIST_PATH, &request),
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
        self.apply_member_list(&listed, set);
    }

    /// Applies the member list that a member of member set `set` answered.
    fn apply_member_list(self: &Arc<Self>, listed: &[etcd_compat_proto::etcdserverpb::Member], set: usize) {
        // Read before the check: members read after a switch always fail it.
        let members = self.members();
        if self.member_set() != set {
            return;
        }
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
            let Some(added) = self.add_member(&endpoint, set) else { return };
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::listed;

    #[test]
    fn leader_is_the_one_named_at_the_highest_term() {
        assert_eq!(leader_from_statuses(&[(3, 7), (4, 9), (4, 9)]), 9);
        assert_eq!(leader_from_statuses(&[(3, 7), (4, 0)]), 0);
        assert_eq!(leader_from_statuses(&[]), 0);
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
        let args = crate::cli::start::StartArgs {
            endpoints: Some(vec!["http://127.0.0.1:2001".into(), "http://127.0.0.1:2002".into()]),
            ..Default::default()
        };
        let upstream = Cluster::new(&args.validate().unwrap(), crate::explain::Explainer::default()).unwrap();
        let seeds = upstream.members();
        // Status answers named the seeds' ids; the first seed is pinned.
        seeds[0].role.id.store(1, Relaxed);
        seeds[1].role.id.store(2, Relaxed);
        // Member 1 was removed, member 2 is a learner, member 3 is new.
        let list = vec![listed(2, &["http://127.0.0.1:2002"], true), listed(3, &["http://127.0.0.1:2003"], false)];
        upstream.apply_member_list(&list, 0);
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
        upstream.apply_member_list(&list, 0);
        let ids: Vec<u64> = upstream.attempt_order().iter().map(|m| m.role.id()).collect();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(upstream.members().len(), 3);
    }

    #[tokio::test]
    async fn a_member_list_from_before_a_switch_changes_nothing_after_it() {
        let args = crate::cli::start::StartArgs {
            endpoints: Some(vec!["http://127.0.0.1:2101".into(), "http://127.0.0.1:2102".into()]),
            ..Default::default()
        };
        let upstream = Cluster::new(&args.validate().unwrap(), crate::explain::Explainer::default()).unwrap();
        let before = upstream.member_set();
        let target = Endpoint::parse("http://127.0.0.1:2201", false).unwrap();
        upstream.switch_to(std::slice::from_ref(&target), None);
        // The old cluster's list, answered by a refresh that started before the switch.
        let old = vec![listed(1, &["http://127.0.0.1:2101"], false), listed(2, &["http://127.0.0.1:2103"], false)];
        upstream.apply_member_list(&old, before);
        let members = upstream.members();
        assert_eq!(members.iter().map(|m| m.endpoint.url()).collect::<Vec<_>>(), vec!["http://127.0.0.1:2201"]);
        assert!(!members[0].role.is_departed(), "the new member is not marked as gone by the old list");
        let discovered = Endpoint::parse("http://127.0.0.1:2103", false).unwrap();
        assert!(upstream.add_member(&discovered, before).is_none(), "no old member comes back");
        assert!(upstream.add_member(&discovered, upstream.member_set()).is_some());
    }

    #[test]
    fn attempts_try_the_pinned_member_first_then_the_rest_in_order() {
        let args = crate::cli::start::StartArgs {
            endpoints: Some((1..=3).map(|i| format!("http://127.0.0.1:300{i}")).collect()),
            ..Default::default()
        };
        let upstream = Cluster::new(&args.validate().unwrap(), crate::explain::Explainer::default()).unwrap();
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
}
