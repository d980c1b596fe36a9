//! Bytes as they travel on a client connection: HTTP/2 frames, HPACK literals and gRPC message
//! framing, written by hand for requests that an HTTP/2 library refuses to produce (oversized or
//! endless header blocks, table-size updates a peer never allowed) and read back without any
//! protocol state, so a test sees exactly what the proxy sent.

use std::io::{self, Read};

/// The client connection preface (RFC 9113, section 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types used by the tests (RFC 9113, section 6).
pub mod frame_type {
    /// DATA.
    pub const DATA: u8 = 0x0;
    /// HEADERS.
    pub const HEADERS: u8 = 0x1;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// PING.
    pub const PING: u8 = 0x6;
    /// GOAWAY.
    pub const GOAWAY: u8 = 0x7;
    /// WINDOW_UPDATE.
    pub const WINDOW_UPDATE: u8 = 0x8;
    /// CONTINUATION.
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags used by the tests.
pub mod frame_flags {
    /// END_STREAM on DATA and HEADERS.
    pub const END_STREAM: u8 = 0x1;
    /// ACK on SETTINGS and PING.
    pub const ACK: u8 = 0x1;
    /// END_HEADERS on HEADERS and CONTINUATION.
    pub const END_HEADERS: u8 = 0x4;
}

/// HTTP/2 error codes (RFC 9113, section 7) by name, for messages.
pub fn error_code_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "unknown error code",
    }
}

/// One frame: 24-bit payload length, type, flags, 31-bit stream id, then the payload.
///
/// Panics if `payload` is longer than 2^24 - 1 bytes, which no frame can carry.
pub fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 1 << 24, "an HTTP/2 frame carries at most 2^24-1 bytes, not {}", payload.len());
    let length = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A SETTINGS frame (not an ACK) with `(identifier, value)` pairs.
pub fn settings_frame(values: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(values.len() * 6);
    for (identifier, value) in values {
        payload.extend_from_slice(&identifier.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    frame(frame_type::SETTINGS, 0, 0, &payload)
}

/// Appends an HPACK integer (RFC 7541, section 5.1) with a `prefix_bits`-bit prefix; the bits of
/// `first_byte` above the prefix (the representation's pattern) are kept.
pub fn hpack_integer(out: &mut Vec<u8>, prefix_bits: u8, first_byte: u8, value: usize) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(first_byte | value as u8);
        return;
    }
    out.push(first_byte | max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// Appends a literal header field with a literal name, both strings without Huffman coding;
/// `indexed` picks "with incremental indexing" (the decoder adds it to its dynamic table)
/// instead of "without indexing".
pub fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8], indexed: bool) {
    if indexed {
        out.push(0x40);
    } else {
        out.push(0x00);
    }
    hpack_integer(out, 7, 0x00, name.len());
    out.extend_from_slice(name);
    hpack_integer(out, 7, 0x00, value.len());
    out.extend_from_slice(value);
}

/// Appends a dynamic table size update (RFC 7541, section 6.3) to `size` bytes.
pub fn hpack_table_size_update(out: &mut Vec<u8>, size: usize) {
    hpack_integer(out, 5, 0x20, size);
}

/// The request pseudo-headers and gRPC headers of a call to `path`, as HPACK literals (no
/// dynamic table, no Huffman), ready to start a header block.
pub fn grpc_request_headers(authority: &str, path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        hpack_literal(&mut block, name.as_bytes(), value.as_bytes(), false);
    }
    block
}

/// A frame as read from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame type.
    pub kind: u8,
    /// Flags.
    pub flags: u8,
    /// Stream id, reserved bit cleared.
    pub stream_id: u32,
    /// Payload as sent.
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            frame_type::RST_STREAM => 0,
            frame_type::GOAWAY => 4,
            _ => return None,
        };
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}

/// Reads one frame; an EOF before its first byte is `UnexpectedEof` like any other.
pub fn read_frame(reader: &mut impl Read) -> io::Result<Frame> {
    let mut header = [0u8; 9];
    reader.read_exact(&mut header)?;
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; length];
    reader.read_exact(&mut payload)?;
    Ok(Frame {
        kind: header[3],
        flags: header[4],
        stream_id: u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// The 5-byte gRPC message prefix: not compressed, then the length, big-endian.
pub fn grpc_prefix(length: u32) -> [u8; 5] {
    let [a, b, c, d] = length.to_be_bytes();
    [0, a, b, c, d]
}

/// One gRPC message framed as on the wire: [`grpc_prefix`] then the message.
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let length = u32::try_from(message.len()).expect("a gRPC message is shorter than 4 GiB");
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.extend_from_slice(&grpc_prefix(length));
    framed.extend_from_slice(message);
    framed
}

/// Splits a stream of gRPC-framed bytes, fed in pieces of any size, back into messages.
#[derive(Debug, Default)]
pub struct GrpcMessages {
    pending: Vec<u8>,
}

impl GrpcMessages {
    /// An empty reassembler.
    pub fn new() -> GrpcMessages {
        GrpcMessages::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The next complete message, if one has arrived whole. Panics on a compressed message,
    /// which no test asks for.
    pub fn next_message(&mut self) -> Option<Vec<u8>> {
        if self.pending.len() < 5 {
            return None;
        }
        assert_eq!(self.pending[0], 0, "compressed gRPC message");
        let length = u32::from_be_bytes([self.pending[1], self.pending[2], self.pending[3], self.pending[4]]) as usize;
        if self.pending.len() < 5 + length {
            return None;
        }
        let message = self.pending[5..5 + length].to_vec();
        self.pending.drain(..5 + length);
        Some(message)
    }

    /// Bytes received that do not make a whole message yet.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_rfc_7541_examples() {
        // C.1.1 and C.1.2: 10 and 1337 with a 5-bit prefix.
        let mut out = Vec::new();
        hpack_integer(&mut out, 5, 0, 10);
        assert_eq!(out, [0x0a]);
        out.clear();
        hpack_integer(&mut out, 5, 0, 1337);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        out.clear();
        hpack_table_size_update(&mut out, 2 * 1024 * 1024);
        // 0x3f, then 2097152 - 31 in 7-bit groups, least significant first.
        assert_eq!(out, [0x3f, 0xe1, 0xff, 0x7f]);
    }

    #[test]
    fn frames_round_trip() {
        let bytes = frame(frame_type::RST_STREAM, 0, 0x8000_0003, &1u32.to_be_bytes());
        assert_eq!(&bytes[..9], &[0, 0, 4, 3, 0, 0, 0, 0, 3]);
        let read = read_frame(&mut &bytes[..]).expect("frame");
        assert_eq!(read.stream_id, 3);
        assert_eq!(read.error_code(), Some(1));
        assert_eq!(settings_frame(&[(4, 0)]), [0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0]);
    }

    #[test]
    fn grpc_messages_are_reassembled_across_pieces() {
        let mut stream = grpc_frame(b"first");
        stream.extend_from_slice(&grpc_frame(b""));
        stream.extend_from_slice(&grpc_frame(b"third"));
        let mut messages = GrpcMessages::new();
        let mut seen = Vec::new();
        for byte in stream {
            messages.push(&[byte]);
            while let Some(message) = messages.next_message() {
                seen.push(message);
            }
        }
        assert_eq!(seen, [b"first".to_vec(), Vec::new(), b"third".to_vec()]);
        assert_eq!(messages.pending_len(), 0);
    }
}
