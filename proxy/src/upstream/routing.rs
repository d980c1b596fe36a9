//! Routing rules, as pure functions of what the view knows: which members a call may go to, in
//! which order, and what etcd's routing errors (learner, no leader, ...) mean for a retry.
//!
//! Learners never get client traffic (except serializable Ranges with
//! `--learner-serializable-reads`); member-management calls go to the leader first, because a
//! follower forwards `MemberPromote` to the leader without the caller's credentials (etcd issue
//! 14070) and `MoveLeader` only works on the leader.

use bytes::Bytes;
use etcd_compat_proto::etcdserverpb::RangeRequest;
use http::HeaderMap;

use crate::etcd_errors;
use crate::grpc::{self, Code, Replay, Route};

use super::MemberState;

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
        && route.kind == grpc::MethodKind::Range
        && request.is_some_and(is_serializable_range)
    {
        Target::VoterThenLearner
    } else {
        Target::Voter
    }
}

fn is_serializable_range(framed: &Bytes) -> bool {
    grpc::decode_framed::<RangeRequest>(framed).is_some_and(|r| r.serializable)
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
    /// `raft proposal dropped` (code `Unknown`): raft refused a write before appending it to
    /// any log, because leadership is being handed over (a leader stopped with SIGTERM, or
    /// `MoveLeader`) or an election is under way; nothing was proposed.
    ProposalDropped,
}

impl RoutingError {
    /// etcd's exact status message for this error.
    pub fn message(self) -> &'static str {
        match self {
            RoutingError::Learner => etcd_errors::LEARNER,
            RoutingError::NotLeader => etcd_errors::NOT_LEADER,
            RoutingError::NoLeader => etcd_errors::NO_LEADER,
            RoutingError::LeaderChanged => etcd_errors::LEADER_CHANGED,
            RoutingError::ProposalDropped => etcd_errors::PROPOSAL_DROPPED,
        }
    }

    /// How many times one call is sent elsewhere after this error. `leader changed` and
    /// `raft proposal dropped` come from an election or handover under way, which outlasts one
    /// retry: five, paused 100 ms doubling (1.5 s in all; etcd's default election timeout is
    /// 1 s). The others name a fact a second member settles (`no leader` is also what
    /// `hasleader` callers want to hear at once): one.
    pub fn max_reroutes(self) -> u32 {
        match self {
            RoutingError::LeaderChanged | RoutingError::ProposalDropped => 5,
            RoutingError::Learner | RoutingError::NotLeader | RoutingError::NoLeader => 1,
        }
    }

    /// Whether a request that got this answer may be sent again, to another member. Reads
    /// always. Writes when etcd refused them before proposing anything (learner, not leader,
    /// no leader, proposal dropped). `leader changed` is only retried for leader-routed calls (promote, move
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

/// Recognises etcd's routing errors in a trailers-only answer's headers: etcd's own errors by
/// their codes (`Unavailable`, `FailedPrecondition`), raft's by `Unknown`, which is what etcd
/// gives an error it has no code for.
pub fn routing_error(headers: &HeaderMap) -> Option<RoutingError> {
    let candidates: &[RoutingError] = match Code::from_headers(headers)? {
        Code::Unavailable | Code::FailedPrecondition => {
            &[RoutingError::Learner, RoutingError::NotLeader, RoutingError::NoLeader, RoutingError::LeaderChanged]
        }
        Code::Unknown => &[RoutingError::ProposalDropped],
        _ => return None,
    };
    let message = headers.get(&crate::grpc::GRPC_MESSAGE)?.as_bytes();
    candidates.iter().copied().find(|e| e.message().as_bytes() == message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

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
        assert_eq!(
            routing_error(&headers(Code::Unknown, "raft proposal dropped")),
            Some(RoutingError::ProposalDropped)
        );
        assert_eq!(routing_error(&headers(Code::Unavailable, "raft proposal dropped")), None);
        assert_eq!(routing_error(&HeaderMap::new()), None);
    }

    #[test]
    fn only_elections_and_handovers_are_retried_for_long() {
        assert_eq!(RoutingError::LeaderChanged.max_reroutes(), 5);
        assert_eq!(RoutingError::ProposalDropped.max_reroutes(), 5);
        for error in [RoutingError::Learner, RoutingError::NotLeader, RoutingError::NoLeader] {
            assert_eq!(error.max_reroutes(), 1, "{error:?}");
        }
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
        assert!(RoutingError::ProposalDropped.allows_retry(&put, Target::Voter));
        assert!(!RoutingError::ProposalDropped.allows_retry(&watch, Target::Voter));
        assert!(RoutingError::Learner.allows_retry(&put, Target::Voter));
        assert!(RoutingError::NotLeader.allows_retry(&promote, Target::Leader));
        assert!(!RoutingError::Learner.allows_retry(&watch, Target::Voter));
    }
}
