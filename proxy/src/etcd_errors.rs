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
