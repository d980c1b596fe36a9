//! etcd v3 API message types and gRPC method table for the compat proxy.
//!
//! The `.proto` files under `vendor/` are upstream's, copied unmodified (see
//! `UPSTREAM.md`); `build.rs` compiles them with prost. Only message and enum
//! types are generated — there are no client or server stubs, because the
//! proxy forwards gRPC frames itself and routes on [`METHODS`].
//!
//! `bytes` fields are [`prost::bytes::Bytes`] so payloads can be passed through
//! without copying.

/// `etcdserverpb`: KV, Watch, Lease, Cluster, Maintenance and Auth messages (`rpc.proto`).
#[allow(clippy::all)]
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

/// `mvccpb`: `KeyValue` and watch `Event` (`kv.proto`).
#[allow(clippy::all)]
pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
}

/// `authpb`: users, roles and permissions (`auth.proto`).
#[allow(clippy::all)]
pub mod authpb {
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
}

/// `v3lockpb`: the Lock service's messages (`v3lock.proto`).
#[allow(clippy::all)]
pub mod v3lockpb {
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.rs"));
}

/// `v3electionpb`: the Election service's messages (`v3election.proto`).
#[allow(clippy::all)]
pub mod v3electionpb {
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
}

/// `grpc.health.v1`: the standard gRPC health-checking messages (`health.proto`).
#[allow(clippy::all)]
pub mod health {
    include!(concat!(env!("OUT_DIR"), "/grpc.health.v1.rs"));
}

/// One gRPC method declared by a vendored service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MethodInfo {
    /// HTTP/2 `:path` of the call, e.g. `/etcdserverpb.KV/Range`.
    pub path: &'static str,
    /// Fully-qualified proto service name, e.g. `etcdserverpb.KV`.
    pub service: &'static str,
    /// Method name as written in the proto, e.g. `Range`.
    pub method: &'static str,
    /// True when the client sends a stream of requests.
    pub client_streaming: bool,
    /// True when the server replies with a stream of responses.
    pub server_streaming: bool,
}

impl MethodInfo {
    /// True when either side streams; such calls must not be treated as unary.
    pub const fn is_streaming(&self) -> bool {
        self.client_streaming || self.server_streaming
    }
}

// Defines `pub const METHODS: &[MethodInfo]`, generated from the protos so the
// proxy's routing tables cannot drift from the vendored API.
include!(concat!(env!("OUT_DIR"), "/methods.rs"));

/// Looks up a method by its HTTP/2 `:path`; `None` if no vendored service declares it.
pub fn method_by_path(path: &str) -> Option<&'static MethodInfo> {
    METHODS.iter().find(|m| m.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::collections::HashSet;

    fn count(service: &str) -> usize {
        METHODS.iter().filter(|m| m.service == service).count()
    }

    fn get(path: &str) -> &'static MethodInfo {
        method_by_path(path).unwrap_or_else(|| panic!("{path} missing from METHODS"))
    }

    #[test]
    fn method_counts_match_vendored_protos() {
        // Counted by hand from the vendored rpc.proto (etcd v3.6), v3lock.proto,
        // v3election.proto and grpc-proto's health.proto.
        let expected = [
            ("etcdserverpb.KV", 5),
            ("etcdserverpb.Watch", 1),
            ("etcdserverpb.Lease", 5),
            ("etcdserverpb.Cluster", 5),
            ("etcdserverpb.Maintenance", 8),
            ("etcdserverpb.Auth", 17),
            ("v3lockpb.Lock", 2),
            ("v3electionpb.Election", 5),
            ("grpc.health.v1.Health", 2),
        ];
        for (service, n) in expected {
            assert_eq!(count(service), n, "method count for {service}");
        }
        let total: usize = expected.iter().map(|(_, n)| n).sum();
        assert_eq!(METHODS.len(), total, "METHODS has services beyond the expected set");
    }

    #[test]
    fn paths_are_unique_and_well_formed() {
        let mut seen = HashSet::new();
        for m in METHODS {
            assert!(seen.insert(m.path), "duplicate path {}", m.path);
            assert_eq!(m.path, format!("/{}/{}", m.service, m.method));
        }
    }

    #[test]
    fn streaming_shapes() {
        for path in ["/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive"] {
            let m = get(path);
            assert!(m.client_streaming && m.server_streaming, "{path} should be bidi");
        }
        for path in
            ["/etcdserverpb.Maintenance/Snapshot", "/v3electionpb.Election/Observe", "/grpc.health.v1.Health/Watch"]
        {
            let m = get(path);
            assert!(!m.client_streaming && m.server_streaming, "{path} should be server-streaming");
        }
        let streaming: Vec<_> = METHODS.iter().filter(|m| m.is_streaming()).map(|m| m.path).collect();
        assert_eq!(streaming.len(), 5, "unexpected streaming methods: {streaming:?}");
        assert!(!get("/etcdserverpb.KV/Range").is_streaming());
    }

    #[test]
    fn unknown_path_is_not_found() {
        assert!(method_by_path("/etcdserverpb.KV/Nope").is_none());
    }

    #[test]
    fn range_request_round_trips() {
        use etcdserverpb::range_request::{SortOrder, SortTarget};
        let req = etcdserverpb::RangeRequest {
            key: prost::bytes::Bytes::from_static(b"foo"),
            range_end: prost::bytes::Bytes::from_static(b"fop"),
            limit: 10,
            revision: 42,
            sort_order: SortOrder::Descend as i32,
            sort_target: SortTarget::Mod as i32,
            serializable: true,
            keys_only: true,
            min_mod_revision: 7,
            ..Default::default()
        };
        let wire = req.encode_to_vec();
        let back = etcdserverpb::RangeRequest::decode(wire.as_slice()).expect("decode");
        assert_eq!(back, req);
        assert_eq!(back.sort_order(), SortOrder::Descend);
    }

    #[test]
    fn range_request_wire_format_is_etcds() {
        // key = 1 (bytes), limit = 3 (varint): hand-encoded to pin field numbers.
        let req =
            etcdserverpb::RangeRequest { key: prost::bytes::Bytes::from_static(b"a"), limit: 2, ..Default::default() };
        assert_eq!(req.encode_to_vec(), vec![0x0a, 0x01, b'a', 0x18, 0x02]);
    }
}
