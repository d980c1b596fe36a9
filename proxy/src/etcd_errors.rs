//! etcd's own words: the status messages the proxy recognises in etcd's answers, and those it
//! gives itself where etcd would answer the same situation. Kept exact (clients match on them),
//! and each written once.

/// etcd's answer to an unknown or expired token; every etcd client re-authenticates on it.
pub const INVALID_AUTH_TOKEN: &str = "etcdserver: invalid auth token";
/// etcd's answer to a token issued before the auth store changed; a new token fixes it.
pub const AUTH_REVISION_OLD: &str = "etcdserver: revision of auth store is old";
/// How a refused watch create's cancel reason ends when a renewed token fixes it: an expired
/// token reads `rpc error: code = Unauthenticated desc = etcdserver: invalid auth token` from
/// etcd 3.4 and `rpc error: code = PermissionDenied desc = etcdserver: permission denied` from 3.5.
pub const WATCH_TOKEN_CANCEL_REASONS: [&str; 3] =
    ["etcdserver: permission denied", INVALID_AUTH_TOKEN, "etcdserver: user name is empty"];

/// Refused by a learner before the handler ran.
pub const LEARNER: &str = "etcdserver: rpc not supported for learner";
/// A leader-only call refused by a follower.
pub const NOT_LEADER: &str = "etcdserver: not leader";
/// Refused because the member has no leader; nothing was proposed.
pub const NO_LEADER: &str = "etcdserver: no leader";
/// A linearizable read or lease lookup interrupted by an election.
pub const LEADER_CHANGED: &str = "etcdserver: leader changed";
/// raft's refusal of a proposal it did not append to any log (the leader is handing over
/// leadership, or the member knows no leader); etcd passes it on with code `Unknown`.
pub const PROPOSAL_DROPPED: &str = "raft proposal dropped";

/// A watch create refused because the stream already has a watch of the id it asks for.
pub const DUPLICATE_WATCH_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";

/// A write refused because the database reached its quota (the NOSPACE alarm is raised).
pub const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";
/// A proposal that was not applied in time; the variants of etcd 3.5 add a reason after a comma.
pub const REQUEST_TIMED_OUT: &str = "etcdserver: request timed out";
/// Refused because the member applies committed entries too far behind its log.
pub const TOO_MANY_REQUESTS: &str = "etcdserver: too many requests";
/// A login with a wrong user name or password.
pub const AUTH_FAILED: &str = "etcdserver: authentication failed, invalid user ID or password";
/// A promotion of a member that is already a voting member.
pub const MEMBER_NOT_LEARNER: &str = "etcdserver: can only promote a learner member";
/// A promotion of a learner that has not caught up with the leader.
pub const LEARNER_NOT_READY: &str = "etcdserver: can only promote a learner member which is in sync with leader";
/// A learner added while the cluster already has as many as etcd allows.
pub const TOO_MANY_LEARNERS: &str = "etcdserver: too many learner members in cluster";

/// etcd's gRPC server's answer to a call whose `grpc-timeout` passed.
pub const DEADLINE_EXCEEDED: &str = "context deadline exceeded";

/// etcd's gRPC server's answer to a request message over its receive limit.
pub fn message_too_large(claimed: u64, limit: usize) -> String {
    format!("grpc: received message larger than max ({claimed} vs. {limit})")
}

/// What a grpc-go client (etcd's own, etcdctl) reports for a stream reset with `reason`.
pub fn stream_reset(reason: h2::Reason) -> String {
    format!("stream terminated by RST_STREAM with error code: {reason:?}")
}
