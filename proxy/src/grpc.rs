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
    /// Largest message accepted (client messages: etcd's receive limit); `None`: any.
    limit: Option<usize>,
}

impl MessageReader {
    /// A reader of client messages, which refuses any larger than `limit` bytes (prefix excluded)
    /// as soon as the prefix says so (see [`MessageReader::oversize`]).
    pub fn with_limit(limit: usize) -> Self {
        MessageReader { buffer: bytes::BytesMut::new(), limit: Some(limit) }
    }

    /// Adds the next chunk. Check [`MessageReader::oversize`] before reading more: the
    /// reader holds at most one message over the limit's first chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The largest message accepted, if there is a limit.
    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// The length the next message claims, if that is over the limit: the caller must stop
    /// reading and refuse the stream (see [`too_large_status`]).
    pub fn oversize(&self) -> Option<u64> {
        let limit = self.limit?;
        let claimed = framed_length(&self.buffer)? - 5;
        (claimed > limit).then_some(claimed as u64)
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

/// etcd's refusal of a request message over its receive limit, word for word (its gRPC server's).
pub fn too_large_status(claimed: u64, limit: usize) -> (Code, String) {
    (Code::ResourceExhausted, format!("grpc: received message larger than max ({claimed} vs. {limit})"))
}

/// Whether a request's `content-type` makes it a gRPC request, by grpc-go's rule (which etcd
/// applies): `application/grpc`, optionally followed by `+subtype` or `;parameters`.
pub fn is_grpc_content_type(value: &[u8]) -> bool {
    const BASE: &[u8] = b"application/grpc";
    value.starts_with(BASE) && matches!(value.get(BASE.len()), None | Some(b'+' | b';'))
}

/// Reads a `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &[u8]) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let number: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(number * 3600),
        b'M' => Duration::from_secs(number * 60),
        b'S' => Duration::from_secs(number),
        b'm' => Duration::from_millis(number),
        b'u' => Duration::from_micros(number),
        b'n' => Duration::from_nanos(number),
        _ => return None,
    })
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
    fn oversize_messages_are_seen_from_their_prefix() {
        let mut reader = MessageReader::with_limit(10);
        reader.push(&[0, 0, 0]);
        assert_eq!(reader.oversize(), None);
        reader.push(&[0, 11]);
        assert_eq!(reader.oversize(), Some(11));
        let mut reader = MessageReader::with_limit(10);
        reader.push(&frame(b"0123456789"));
        assert_eq!(reader.oversize(), None);
        reader.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(reader.next_message(), Some(frame(b"0123456789")));
        assert_eq!(reader.oversize(), Some(u32::MAX as u64));
        let unlimited = {
            let mut reader = MessageReader::default();
            reader.push(&[0, 0xff, 0xff, 0xff, 0xff]);
            reader.oversize()
        };
        assert_eq!(unlimited, None);
        assert_eq!(
            too_large_status(104857610, 2097152).1,
            "grpc: received message larger than max (104857610 vs. 2097152)"
        );
    }

    #[test]
    fn grpc_request_headers() {
        for good in ["application/grpc", "application/grpc+proto", "application/grpc;charset=utf-8"] {
            assert!(is_grpc_content_type(good.as_bytes()), "{good}");
        }
        for bad in ["text/plain", "application/grpcx", "application/json", ""] {
            assert!(!is_grpc_content_type(bad.as_bytes()), "{bad}");
        }
        use std::time::Duration;
        assert_eq!(parse_grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        for bad in ["abc", "S", "123456789S", "10x", "-1S", ""] {
            assert_eq!(parse_grpc_timeout(bad.as_bytes()), None, "{bad}");
        }
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
