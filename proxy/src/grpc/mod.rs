//! gRPC as the proxy sees it on the wire: status codes and the headers or trailers carrying them,
//! message framing, request headers gRPC defines, the protobuf wire format, and the table of
//! etcd's methods. Depends on nothing else in the crate: everything above it reads bytes with it.

mod framing;
mod headers;
mod methods;
mod status;
mod wire;

pub use framing::{frame, frame_message, frame_prefix, framed_length, MessageReader};
pub use headers::{is_grpc_content_type, own_call_headers, parse_grpc_timeout, response_headers};
pub use methods::{route, CallShape, MethodKind, Replay, Route, Writes, AUTHENTICATE_PATH, WATCH_PATH};
pub use status::{status_headers, status_message, Code, ALL_CODES, GRPC_MESSAGE, GRPC_STATUS};
pub use wire::{fields, for_each_field, put_varint, WireValue};

/// Decodes a framed message (prefix included) as a `T`; `None` if it is compressed, cut short
/// or not a `T`. The one way the proxy reads a message it needs whole.
pub fn decode_framed<T: prost::Message + Default>(framed: &[u8]) -> Option<T> {
    match framed.first() {
        Some(0) if framed_length(framed) == Some(framed.len()) => T::decode(&framed[5..]).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_compat_proto::etcdserverpb::RangeRequest;
    use prost::Message;

    #[test]
    fn framed_messages_decode_only_whole_and_uncompressed() {
        let request = RangeRequest { key: bytes::Bytes::from_static(b"k"), ..Default::default() };
        let framed = frame(&request.encode_to_vec());
        assert_eq!(decode_framed::<RangeRequest>(&framed), Some(request));
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        assert_eq!(decode_framed::<RangeRequest>(&compressed), None);
        assert_eq!(decode_framed::<RangeRequest>(&framed[..framed.len() - 1]), None);
        assert_eq!(decode_framed::<RangeRequest>(&[0, 0, 0]), None);
    }
}
