//! gRPC wire facts the proxy needs without decoding messages: status codes, the method table,
//! and trailers-only error responses.

use std::collections::HashMap;
use std::sync::LazyLock;

use http::{HeaderMap, HeaderValue};

/// gRPC status codes (the numbering is fixed by the gRPC spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

/// Every code, indexed by its number.
pub const ALL_CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

impl Code {
    /// The name used by go-grpc-prometheus labels, so existing dashboards keep working.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "Canceled",
            Code::Unknown => "Unknown",
            Code::InvalidArgument => "InvalidArgument",
            Code::DeadlineExceeded => "DeadlineExceeded",
            Code::NotFound => "NotFound",
            Code::AlreadyExists => "AlreadyExists",
            Code::PermissionDenied => "PermissionDenied",
            Code::ResourceExhausted => "ResourceExhausted",
            Code::FailedPrecondition => "FailedPrecondition",
            Code::Aborted => "Aborted",
            Code::OutOfRange => "OutOfRange",
            Code::Unimplemented => "Unimplemented",
            Code::Internal => "Internal",
            Code::Unavailable => "Unavailable",
            Code::DataLoss => "DataLoss",
            Code::Unauthenticated => "Unauthenticated",
        }
    }

    /// Reads the `grpc-status` header or trailer; anything unparsable counts as `Unknown`, as gRPC clients do.
    pub fn from_headers(headers: &HeaderMap) -> Option<Code> {
        let value = headers.get("grpc-status")?;
        let number: usize = value.to_str().ok().and_then(|s| s.parse().ok()).unwrap_or(Code::Unknown as usize);
        Some(ALL_CODES.get(number).copied().unwrap_or(Code::Unknown))
    }
}

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

/// What the proxy knows about one gRPC method path.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// Index into [`etcd_compat_proto::METHODS`], or `METHODS.len()` for a method the protos don't know.
    pub index: usize,
    /// Message flow.
    pub shape: CallShape,
    /// Retry rule.
    pub replay: Replay,
    /// Whether the leader should serve it (see [`LEADER_FIRST`]).
    pub leader_first: bool,
}

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
            (m.path, Route { index, shape, replay, leader_first })
        })
        .collect()
});

/// Classifies a request path; unknown methods are forwarded as opaque streams, never replayed.
pub fn route(path: &str) -> Route {
    ROUTES.get(path).copied().unwrap_or(Route {
        index: etcd_compat_proto::METHODS.len(),
        shape: CallShape::ClientStreaming,
        replay: Replay::Never,
        leader_first: false,
    })
}

/// Index of `/etcdserverpb.KV/Range` in the method table (the call the size budget pages).
pub fn range_index() -> usize {
    static RANGE: LazyLock<usize> = LazyLock::new(|| route("/etcdserverpb.KV/Range").index);
    *RANGE
}

/// The path of etcd's Watch call.
pub const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";

/// Index of `/etcdserverpb.Watch/Watch` in the method table.
pub fn watch_index() -> usize {
    static WATCH: LazyLock<usize> = LazyLock::new(|| route(WATCH_PATH).index);
    *WATCH
}

/// Index of `/etcdserverpb.Auth/Authenticate` in the method table (answered with a proxy token).
pub fn authenticate_index() -> usize {
    static AUTHENTICATE: LazyLock<usize> = LazyLock::new(|| route(AUTHENTICATE_PATH).index);
    *AUTHENTICATE
}

/// The path of etcd's Authenticate call.
pub const AUTHENTICATE_PATH: &str = "/etcdserverpb.Auth/Authenticate";

/// The decoded `grpc-message` of a status, empty when there is none.
pub fn status_message(headers: &HeaderMap) -> String {
    let Some(raw) = headers.get("grpc-message") else { return String::new() };
    let raw = raw.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = raw
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (raw[i], hex) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// The whole length (5-byte prefix included) of the gRPC message at the start of `data`, once its
/// prefix is there.
pub fn framed_length(data: &[u8]) -> Option<usize> {
    let prefix = data.get(..5)?;
    Some(5 + u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize)
}

/// Reassembles whole gRPC messages (prefix included) from a stream's DATA chunks, which cut
/// messages anywhere.
#[derive(Default)]
pub struct MessageReader {
    buffer: bytes::BytesMut,
}

impl MessageReader {
    /// Adds the next chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// Whether no partial message is held.
    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// The next complete message, if one is there.
    pub fn next_message(&mut self) -> Option<bytes::Bytes> {
        let length = framed_length(&self.buffer).filter(|length| self.buffer.len() >= *length)?;
        let message = self.buffer.split_to(length).freeze();
        if self.buffer.is_empty() {
            // Release the allocation between bursts instead of keeping the largest ever seen.
            self.buffer = bytes::BytesMut::new();
        }
        Some(message)
    }
}

/// The 5-byte prefix of an uncompressed gRPC message of `length` bytes.
pub fn frame_prefix(length: usize) -> bytes::Bytes {
    let mut prefix = Vec::with_capacity(5);
    prefix.push(0);
    prefix.extend_from_slice(&(length as u32).to_be_bytes());
    bytes::Bytes::from(prefix)
}

/// Frames one uncompressed message as gRPC does: flag byte 0, big-endian 32-bit length, bytes.
pub fn frame(message: &[u8]) -> bytes::Bytes {
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    bytes::Bytes::from(framed)
}

/// Encodes and frames a message in one allocation (answers can be several MiB).
pub fn frame_message(message: &impl prost::Message) -> bytes::Bytes {
    let length = message.encoded_len();
    let mut framed = Vec::with_capacity(length + 5);
    framed.push(0);
    framed.extend_from_slice(&(length as u32).to_be_bytes());
    // Encoding into a Vec with enough capacity cannot fail.
    let _ = message.encode(&mut framed);
    bytes::Bytes::from(framed)
}

/// One protobuf field's value as it is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireValue<'a> {
    /// Integers, booleans and enums.
    Varint(u64),
    /// Strings, bytes and embedded messages.
    Bytes(&'a [u8]),
    /// Fixed-width numbers, which etcd's messages do not use.
    Fixed,
}

/// Walks the top-level fields of an encoded message without decoding it: `visit` gets each
/// field's number, value and byte range (tag included). Used where the proxy needs a few facts
/// from a message it forwards unchanged.
pub fn for_each_field<'a>(
    message: &'a [u8],
    mut visit: impl FnMut(u64, WireValue<'a>, std::ops::Range<usize>),
) -> Result<(), String> {
    use prost::encoding::decode_varint;
    let mut rest = message;
    while !rest.is_empty() {
        let start = message.len() - rest.len();
        let key = decode_varint(&mut rest).map_err(|e| e.to_string())?;
        let value = match key & 7 {
            0 => WireValue::Varint(decode_varint(&mut rest).map_err(|e| e.to_string())?),
            2 => {
                let length = decode_varint(&mut rest).map_err(|e| e.to_string())? as usize;
                let content =
                    rest.get(..length).ok_or_else(|| format!("field at byte {start} runs past the message"))?;
                rest = &rest[length..];
                WireValue::Bytes(content)
            }
            wire_type @ (1 | 5) => {
                let width = if wire_type == 1 { 8 } else { 4 };
                rest = rest.get(width..).ok_or_else(|| format!("field at byte {start} runs past the message"))?;
                WireValue::Fixed
            }
            wire_type => return Err(format!("unexpected wire type {wire_type} at byte {start}")),
        };
        visit(key >> 3, value, start..message.len() - rest.len());
    }
    Ok(())
}

/// Builds the headers of a trailers-only gRPC response carrying an error.
pub fn status_headers(code: Code, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(3);
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(code as u16));
    if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", value);
    }
    headers
}

/// Percent-encodes a grpc-message as the gRPC spec requires (printable ASCII except `%` stays).
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

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
        assert_eq!(unknown.replay, Replay::Never);
        for path in READ_ONLY {
            assert!(ROUTES.contains_key(path), "{path} is not in the protos");
        }
    }

    #[test]
    fn messages_are_reassembled_across_chunks() {
        let first = frame(b"hello");
        let second = frame(b"");
        let joined = [first.clone(), second.clone()].concat();
        let mut reader = MessageReader::default();
        reader.push(&joined[..3]);
        assert_eq!(reader.next_message(), None);
        reader.push(&joined[3..]);
        assert_eq!(reader.next_message(), Some(first));
        assert_eq!(reader.next_message(), Some(second));
        assert_eq!(reader.next_message(), None);
        assert!(reader.is_empty());
    }

    #[test]
    fn grpc_message_encoding() {
        let headers = status_headers(Code::Unavailable, "etcdserver: 100% done\né");
        assert_eq!(status_message(&headers), "etcdserver: 100% done\né");
        assert_eq!(percent_encode("etcdserver: 100% done\n"), "etcdserver: 100%25 done%0A");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn status_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(Code::from_headers(&headers), None);
        headers.insert("grpc-status", HeaderValue::from_static("9"));
        assert_eq!(Code::from_headers(&headers), Some(Code::FailedPrecondition));
        headers.insert("grpc-status", HeaderValue::from_static("99"));
        assert_eq!(Code::from_headers(&headers), Some(Code::Unknown));
    }
}
