//! gRPC message framing: a flag byte, a 4-byte big-endian length, the message.

use bytes::{Bytes, BytesMut};

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
    buffer: BytesMut,
    /// Largest message accepted (client messages: etcd's receive limit); `None`: any.
    limit: Option<usize>,
}

impl MessageReader {
    /// A reader of client messages, which refuses any larger than `limit` bytes (prefix excluded)
    /// as soon as the prefix says so (see [`MessageReader::oversize`]).
    pub fn with_limit(limit: usize) -> Self {
        MessageReader { buffer: BytesMut::new(), limit: Some(limit) }
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
    /// reading and refuse the stream (see `error::ProxyFailure::MessageTooLarge`).
    pub fn oversize(&self) -> Option<u64> {
        let limit = self.limit?;
        let claimed = framed_length(&self.buffer)? - 5;
        (claimed > limit).then_some(claimed as u64)
    }

    /// Whether no partial message is held.
    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// Bytes held: messages not taken yet, and the start of the next one.
    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    /// The next complete message, if one is there.
    pub fn next_message(&mut self) -> Option<Bytes> {
        let length = framed_length(&self.buffer).filter(|length| self.buffer.len() >= *length)?;
        let message = self.buffer.split_to(length).freeze();
        if self.buffer.is_empty() {
            // Release the allocation between bursts instead of keeping the largest ever seen.
            self.buffer = BytesMut::new();
        }
        Some(message)
    }
}

/// The 5-byte prefix of an uncompressed gRPC message of `length` bytes.
pub fn frame_prefix(length: usize) -> Bytes {
    let mut prefix = Vec::with_capacity(5);
    prefix.push(0);
    prefix.extend_from_slice(&(length as u32).to_be_bytes());
    Bytes::from(prefix)
}

/// Frames one uncompressed message as gRPC does: flag byte 0, big-endian 32-bit length, bytes.
pub fn frame(message: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    Bytes::from(framed)
}

/// Encodes and frames a message in one allocation (answers can be several MiB).
pub fn frame_message(message: &impl prost::Message) -> Bytes {
    let length = message.encoded_len();
    let mut framed = Vec::with_capacity(length + 5);
    framed.push(0);
    framed.extend_from_slice(&(length as u32).to_be_bytes());
    // Encoding into a Vec with enough capacity cannot fail.
    let _ = message.encode(&mut framed);
    Bytes::from(framed)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
