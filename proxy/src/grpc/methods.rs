//! The method table: what the proxy knows about each gRPC method path of etcd's API (how its
//! messages flow, whether it may be replayed, where it goes, how it is served).

use std::collections::HashMap;
use std::sync::LazyLock;

/// How a method's messages flow, which decides whether the request can be buffered and replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallShape {
    /// One request, one response.
    Unary,
    /// One request, a stream of responses (Snapshot, Observe).
    ServerStreaming,
    /// A stream of requests (Watch, LeaseKeepAlive) or a method the proxy does not know.
    ClientStreaming,
}

/// Whether a failed attempt may be sent again to another member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Reads: always safe to send again.
    Idempotent,
    /// Writes: only when etcd cannot have seen the request.
    IfNotSent,
    /// Client streams: the request cannot be replayed by the proxy.
    Never,
}

/// How the proxy serves a method: what the request path dispatches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodKind {
    /// A client's login, answered with a token of the proxy's.
    Authenticate,
    /// A Range, paged for clients with a message size limit.
    Range,
    /// A Watch stream, relayed so that its watches outlive their upstream stream.
    Watch,
    /// A LeaseKeepAlive stream, which moves between members.
    KeepAlive,
    /// Any other call with one request and one answer.
    Unary,
    /// One request, a stream of answers (Snapshot, Observe).
    ServerStream,
    /// A stream of requests forwarded frame by frame, and methods the protos don't know.
    ClientStream,
}

/// Which keys a successful call may have changed, for the serializable-read cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// None: reads, and calls that change no key.
    Nothing,
    /// The request's key (field 1): Put.
    Key,
    /// The request's key and range end (fields 1 and 2): DeleteRange.
    Range,
    /// The Puts and DeleteRanges of a Txn's branches.
    Txn,
    /// Keys the request does not name: a revoked lease's, a lock's or an election's.
    Unknown,
}

/// Methods that change keys, and how their requests name them.
const WRITES: &[(&str, Writes)] = &[
    ("/etcdserverpb.KV/Put", Writes::Key),
    ("/etcdserverpb.KV/DeleteRange", Writes::Range),
    ("/etcdserverpb.KV/Txn", Writes::Txn),
    ("/etcdserverpb.Lease/LeaseRevoke", Writes::Unknown),
    ("/v3lockpb.Lock/Lock", Writes::Unknown),
    ("/v3lockpb.Lock/Unlock", Writes::Unknown),
    ("/v3electionpb.Election/Campaign", Writes::Unknown),
    ("/v3electionpb.Election/Proclaim", Writes::Unknown),
    ("/v3electionpb.Election/Resign", Writes::Unknown),
];

/// What the proxy knows about one gRPC method path.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// Index into [`etcd_compat_proto::METHODS`], or `METHODS.len()` for a method the protos don't know.
    pub index: usize,
    /// Message flow.
    pub shape: CallShape,
    /// How the proxy serves it.
    pub kind: MethodKind,
    /// Retry rule.
    pub replay: Replay,
    /// Whether the leader should serve it (see [`LEADER_FIRST`]).
    pub leader_first: bool,
    /// Whether it is `Cluster/MemberList`, whose answers may name the proxy.
    pub member_list: bool,
    /// Whether it changes users, roles, permissions or auth itself (an `Auth` call that is not a read).
    pub changes_auth_store: bool,
    /// Which keys it changes, for the serializable-read cache.
    pub writes: Writes,
}

/// Methods the proxy serves in its own way, by path.
const SPECIAL: &[(&str, MethodKind)] = &[
    (AUTHENTICATE_PATH, MethodKind::Authenticate),
    ("/etcdserverpb.KV/Range", MethodKind::Range),
    (WATCH_PATH, MethodKind::Watch),
    ("/etcdserverpb.Lease/LeaseKeepAlive", MethodKind::KeepAlive),
];

/// Methods that never change etcd's state, so a retry on another member is harmless.
const READ_ONLY: &[&str] = &[
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.Lease/LeaseTimeToLive",
    "/etcdserverpb.Lease/LeaseLeases",
    "/etcdserverpb.Cluster/MemberList",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/Hash",
    "/etcdserverpb.Maintenance/HashKV",
    "/etcdserverpb.Maintenance/Snapshot",
    "/etcdserverpb.Auth/AuthStatus",
    "/etcdserverpb.Auth/Authenticate",
    "/etcdserverpb.Auth/UserGet",
    "/etcdserverpb.Auth/UserList",
    "/etcdserverpb.Auth/RoleGet",
    "/etcdserverpb.Auth/RoleList",
    "/v3electionpb.Election/Leader",
    "/v3electionpb.Election/Observe",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
];

/// Methods sent to the leader first: member changes and leader transfer are refused or slow
/// elsewhere, and the leader's Status is what `etcdctl move-leader` (which looks for the endpoint
/// whose status says it leads) and `endpoint status` need to see through the proxy.
const LEADER_FIRST: &[&str] = &[
    "/etcdserverpb.Cluster/MemberAdd",
    "/etcdserverpb.Cluster/MemberRemove",
    "/etcdserverpb.Cluster/MemberUpdate",
    "/etcdserverpb.Cluster/MemberPromote",
    "/etcdserverpb.Maintenance/MoveLeader",
    "/etcdserverpb.Maintenance/Status",
];

static ROUTES: LazyLock<HashMap<&'static str, Route>> = LazyLock::new(|| {
    etcd_compat_proto::METHODS
        .iter()
        .enumerate()
        .map(|(index, m)| {
            let shape = match (m.client_streaming, m.server_streaming) {
                (false, false) => CallShape::Unary,
                (false, true) => CallShape::ServerStreaming,
                (true, _) => CallShape::ClientStreaming,
            };
            let replay = if shape == CallShape::ClientStreaming {
                Replay::Never
            } else if READ_ONLY.contains(&m.path) {
                Replay::Idempotent
            } else {
                Replay::IfNotSent
            };
            let leader_first = LEADER_FIRST.contains(&m.path);
            let kind = match SPECIAL.iter().find(|(path, _)| *path == m.path) {
                Some((_, kind)) => *kind,
                None => match shape {
                    CallShape::Unary => MethodKind::Unary,
                    CallShape::ServerStreaming => MethodKind::ServerStream,
                    CallShape::ClientStreaming => MethodKind::ClientStream,
                },
            };
            let member_list = m.path == "/etcdserverpb.Cluster/MemberList";
            let changes_auth_store = m.path.starts_with("/etcdserverpb.Auth/") && !READ_ONLY.contains(&m.path);
            let writes = WRITES.iter().find(|(path, _)| *path == m.path).map_or(Writes::Nothing, |(_, w)| *w);
            (m.path, Route { index, shape, kind, replay, leader_first, member_list, changes_auth_store, writes })
        })
        .collect()
});

/// Classifies a request path; unknown methods are forwarded as opaque streams, never replayed.
pub fn route(path: &str) -> Route {
    ROUTES.get(path).copied().unwrap_or(Route {
        index: etcd_compat_proto::METHODS.len(),
        shape: CallShape::ClientStreaming,
        kind: MethodKind::ClientStream,
        replay: Replay::Never,
        leader_first: false,
        member_list: false,
        changes_auth_store: false,
        writes: Writes::Nothing,
    })
}

/// The path of etcd's Watch call.
pub const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";

/// The path of etcd's Authenticate call.
pub const AUTHENTICATE_PATH: &str = "/etcdserverpb.Auth/Authenticate";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let range = route("/etcdserverpb.KV/Range");
        assert_eq!((range.shape, range.replay), (CallShape::Unary, Replay::Idempotent));
        let put = route("/etcdserverpb.KV/Put");
        assert_eq!((put.shape, put.replay), (CallShape::Unary, Replay::IfNotSent));
        let watch = route("/etcdserverpb.Watch/Watch");
        assert_eq!((watch.shape, watch.replay), (CallShape::ClientStreaming, Replay::Never));
        let snapshot = route("/etcdserverpb.Maintenance/Snapshot");
        assert_eq!((snapshot.shape, snapshot.replay), (CallShape::ServerStreaming, Replay::Idempotent));
        let unknown = route("/etcdserverpb.KV/RangeStream");
        assert_eq!(unknown.index, etcd_compat_proto::METHODS.len());
        assert_eq!((unknown.replay, unknown.kind), (Replay::Never, MethodKind::ClientStream));
        let kinds = |path| route(path).kind;
        assert_eq!(kinds("/etcdserverpb.Auth/Authenticate"), MethodKind::Authenticate);
        assert_eq!(kinds("/etcdserverpb.KV/Range"), MethodKind::Range);
        assert_eq!(kinds("/etcdserverpb.Watch/Watch"), MethodKind::Watch);
        assert_eq!(kinds("/etcdserverpb.Lease/LeaseKeepAlive"), MethodKind::KeepAlive);
        assert_eq!(kinds("/etcdserverpb.KV/Put"), MethodKind::Unary);
        assert_eq!(kinds("/etcdserverpb.Maintenance/Snapshot"), MethodKind::ServerStream);
        assert!(route("/etcdserverpb.Cluster/MemberList").member_list);
        for (path, _) in SPECIAL {
            assert!(ROUTES.contains_key(path), "{path} is not in the protos");
        }
        for path in READ_ONLY {
            assert!(ROUTES.contains_key(path), "{path} is not in the protos");
        }
        for (path, _) in WRITES {
            assert!(ROUTES.contains_key(path), "{path} is not in the protos");
        }
        assert_eq!(route("/etcdserverpb.KV/Txn").writes, Writes::Txn);
        assert_eq!(route("/etcdserverpb.KV/Range").writes, Writes::Nothing);
    }
}
