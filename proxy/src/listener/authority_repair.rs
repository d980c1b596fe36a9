//! Lets requests from old gRPC clients through whose `:authority` is not a valid authority.
//!
//! Go clientv3 3.4 (and so `etcdctl endpoint status`, `snapshot save`, `defrag` with
//! `--endpoints=http://...`) dials single members as `passthrough:///http://host:port` and
//! sends `http://host:port` as the HTTP/2 `:authority`. grpc-go servers (etcd, etcd's
//! grpc-proxy) ignore it; the Rust HTTP/2 server resets such a stream with PROTOCOL_ERROR.
//! The proxy never uses the client's authority (it addresses members itself), so this layer
//! sits between the client's bytes and the HTTP/2 server and drops a malformed `:authority`.
//!
//! A gRPC client uses one `:authority` for every call on a connection, so only the first header
//! block of a connection is examined. If its authority is valid, the connection is handed to the
//! server untouched from then on, at no cost per call. If not, the connection stays in repair
//! mode: HPACK blocks refer to a per-connection table, so every block is decoded (tracking the
//! client's table) and re-encoded without the dynamic table (plain literals), which the server
//! can read whatever its own table holds. Frames other than HEADERS and CONTINUATION pass through
//! byte for byte, and the server-to-client direction is untouched.
//!
//! These are the first bytes a client controls, read before the HTTP/2 server checks anything,
//! so this layer is no looser than the server: a first block larger than the server's header list
//! limit (raw or decoded), spread over more CONTINUATION frames than the server accepts, or
//! asking for a bigger HPACK table than the server advertised, is not examined at all: it goes
//! to the server as it came, which refuses it. Nothing here grows with what the client sends.
//!
//! It also reports when the client has sent the connection preface and its first SETTINGS
//! frame, so that the listener can close connections that never get that far.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::admin::Metrics;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may have; re-encoded blocks are cut to it.
const MIN_MAX_FRAME_SIZE: usize = 16_384;
/// The HPACK table size the server advertises (HTTP/2's default, which the server keeps): a
/// client may not ask for more.
const SERVER_HEADER_TABLE_SIZE: usize = 4096;
/// CONTINUATION frames the server accepts in one block before it calls the client abusive (h2's
/// rule for a header list limit smaller than a frame).
const MAX_CONTINUATIONS: usize = 5;
/// What HPACK counts per header on top of name and value (RFC 7541, 4.1).
const HEADER_ENTRY_OVERHEAD: usize = 32;

/// A client connection whose incoming header blocks are repaired before the HTTP/2 server reads them.
pub struct AuthorityRepair<S> {
    inner: S,
    raw: BytesMut,
    ready: BytesMut,
    state: State,
    /// Payload bytes of a non-header frame still to pass through unchanged.
    passthrough: usize,
    block: Option<HeaderBlock>,
    decoder: loona_hpack::Decoder<'static>,
    /// Set after the first malformed `:authority`: blocks are re-encoded from then on.
    reencode: bool,
    metrics: Arc<Metrics>,
    /// The server's header list limit, which bounds what is buffered and decoded here.
    max_header_list: usize,
    /// Set once the preface and the first SETTINGS frame have arrived.
    handshake: Arc<AtomicBool>,
    /// The type of the first frame after the preface while it is still arriving.
    first_frame: Option<u8>,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Waiting for the 24-byte connection preface.
    Preface,
    /// Reading frames.
    Frames,
    /// Nothing to repair (the first block was fine, or this is not HTTP/2 and the server will
    /// answer that): bytes go to the server unchanged.
    Transparent,
}

struct HeaderBlock {
    stream_id: u32,
    end_stream: bool,
    fragments: Vec<u8>,
    /// The frames as received, forwarded as they are while no repair is needed.
    original: BytesMut,
    continuations: usize,
}

impl<S> AuthorityRepair<S> {
    /// Wraps a client connection whose server accepts header lists up to `max_header_list`
    /// bytes; `handshake` is set once the client has sent the preface and its SETTINGS.
    pub fn new(inner: S, metrics: Arc<Metrics>, max_header_list: u32, handshake: Arc<AtomicBool>) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(SERVER_HEADER_TABLE_SIZE);
        AuthorityRepair {
            inner,
            raw: BytesMut::with_capacity(16 * 1024),
            ready: BytesMut::new(),
            state: State::Preface,
            passthrough: 0,
            block: None,
            decoder,
            reencode: false,
            metrics,
            max_header_list: max_header_list as usize,
            handshake,
            first_frame: None,
        }
    }

    /// Bytes held back from the server right now (a header block being collected).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.raw.len() + self.block.as_ref().map_or(0, |block| block.original.len())
    }

    /// Hands everything held so far to the server unexamined, and all later bytes too: for
    /// anything the server must judge (and refuse) itself.
    fn give_up(&mut self) {
        if let Some(block) = self.block.take() {
            self.ready.unsplit(block.original);
        }
        let rest = self.raw.split();
        self.ready.unsplit(rest);
        self.state = State::Transparent;
    }

    /// Notes the end of the first frame after the preface.
    fn first_frame_done(&mut self) {
        if self.first_frame.take() == Some(SETTINGS) {
            self.handshake.store(true, Relaxed);
        }
    }

    /// Moves as much of `raw` as can be processed into `ready`.
    fn process(&mut self) {
        loop {
            match self.state {
                State::Transparent => {
                    let all = self.raw.split();
                    self.ready.unsplit(all);
                    return;
                }
                State::Preface => {
                    if self.raw.len() < PREFACE.len() {
                        return;
                    }
                    if &self.raw[..PREFACE.len()] == PREFACE {
                        let preface = self.raw.split_to(PREFACE.len());
                        self.ready.unsplit(preface);
                        self.state = State::Frames;
                    } else {
                        self.state = State::Transparent;
                    }
                }
                State::Frames => {
                    if self.passthrough > 0 {
                        let n = self.passthrough.min(self.raw.len());
                        if n == 0 {
                            return;
                        }
                        let bytes = self.raw.split_to(n);
                        self.ready.unsplit(bytes);
                        self.passthrough -= n;
                        if self.passthrough == 0 {
                            self.first_frame_done();
                        }
                        continue;
                    }
                    if self.raw.len() < FRAME_HEADER_LEN {
                        return;
                    }
                    let length = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
                    let kind = self.raw[3];
                    if !self.handshake.load(Relaxed) && self.first_frame.is_none() {
                        self.first_frame = Some(kind);
                    }
                    if kind != HEADERS && kind != CONTINUATION {
                        let header = self.raw.split_to(FRAME_HEADER_LEN);
                        self.ready.unsplit(header);
                        self.passthrough = length;
                        if length == 0 {
                            self.first_frame_done();
                        }
                        continue;
                    }
                    self.first_frame = None;
                    let held = self.block.as_ref().map_or(0, |block| block.original.len());
                    if held + FRAME_HEADER_LEN + length > self.max_block_bytes() {
                        self.give_up();
                        return;
                    }
                    if self.raw.len() < FRAME_HEADER_LEN + length {
                        self.raw.reserve(FRAME_HEADER_LEN + length - self.raw.len());
                        return;
                    }
                    let frame = self.raw.split_to(FRAME_HEADER_LEN + length);
                    if let Err(frame) = self.header_frame(frame) {
                        // Something the server must reject anyway: give it the bytes as they came.
                        if let Some(block) = self.block.take() {
                            self.ready.unsplit(block.original);
                        }
                        self.ready.unsplit(frame);
                        self.give_up();
                    }
                }
            }
        }
    }

    /// The most raw bytes (frame headers included) one header block may take here: the
    /// server's decoded limit, which a compressed block does not exceed, plus its frame headers.
    fn max_block_bytes(&self) -> usize {
        self.max_header_list + (1 + MAX_CONTINUATIONS) * FRAME_HEADER_LEN
    }

    /// Collects a HEADERS or CONTINUATION frame; on END_HEADERS checks (and maybe re-encodes) the block.
    fn header_frame(&mut self, frame: BytesMut) -> Result<(), BytesMut> {
        let kind = frame[3];
        let flags = frame[4];
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER_LEN..];
        if kind == HEADERS {
            if self.block.is_some() {
                return Err(frame);
            }
            let mut start = 0;
            let mut end = payload.len();
            if flags & PADDED != 0 {
                let Some(&pad) = payload.first() else { return Err(frame) };
                start += 1;
                end = match end.checked_sub(pad as usize) {
                    Some(end) if end >= start => end,
                    _ => return Err(frame),
                };
            }
            // Stream priority is advisory and the server ignores it; a re-encoded block drops it.
            if flags & PRIORITY != 0 {
                start += 5;
            }
            if start > end {
                return Err(frame);
            }
            let fragments = payload[start..end].to_vec();
            self.block = Some(HeaderBlock {
                stream_id,
                end_stream: flags & END_STREAM != 0,
                fragments,
                original: frame,
                continuations: 0,
            });
        } else {
            match self.block.as_mut() {
                Some(block) if block.stream_id == stream_id && block.continuations < MAX_CONTINUATIONS => {
                    block.fragments.extend_from_slice(payload);
                    block.original.unsplit(frame);
                    block.continuations += 1;
                }
                _ => return Err(frame),
            }
        }
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let Some(block) = self.block.take() else { return Ok(()) };
        let reencoding = self.reencode;
        let mut kept: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut malformed = false;
        // Counted as the server counts its limit; references to the HPACK table make a small
        // block decode into a large list, so nothing is kept past the limit.
        let mut decoded_size = 0;
        let limit = self.max_header_list;
        let decoded = self.decoder.decode_with_cb(&block.fragments, |name, value| {
            decoded_size += name.len() + value.len() + HEADER_ENTRY_OVERHEAD;
            if decoded_size > limit {
                return;
            }
            let bad = name.as_ref() == b":authority" && http::uri::Authority::try_from(value.as_ref()).is_err();
            malformed |= bad;
            if !bad {
                kept.push((name.into_owned(), value.into_owned()));
            }
        });
        if decoded.is_err() || decoded_size > limit {
            return Err(block.original);
        }
        if malformed {
            self.metrics.authority_repaired();
            tracing::debug!(stream = block.stream_id, "dropped a malformed :authority sent by a legacy client");
            self.reencode = true;
        }
        if !self.reencode {
            self.ready.unsplit(block.original);
            // The first block had a valid authority: the client is not one that needs repair.
            self.state = State::Transparent;
            return Ok(());
        }
        if !reencoding {
            tracing::debug!("header blocks on this connection are re-encoded from now on");
        }
        let mut encoded = Vec::with_capacity(block.fragments.len() + 64);
        for (name, value) in &kept {
            encode_literal(&mut encoded, name, value);
        }
        self.write_block(block.stream_id, block.end_stream, &encoded);
        Ok(())
    }

    fn write_block(&mut self, stream_id: u32, end_stream: bool, encoded: &[u8]) {
        let mut chunks = encoded.chunks(MIN_MAX_FRAME_SIZE).peekable();
        let mut first = true;
        // An empty block still needs its HEADERS frame.
        let empty: &[u8] = &[];
        let mut next = chunks.next().or(Some(empty));
        while let Some(chunk) = next {
            next = chunks.next();
            let kind = if first { HEADERS } else { CONTINUATION };
            let mut flags = 0;
            if first && end_stream {
                flags |= END_STREAM;
            }
            if next.is_none() {
                flags |= END_HEADERS;
            }
            self.ready.reserve(FRAME_HEADER_LEN + chunk.len());
            self.ready.put_uint(chunk.len() as u64, 3);
            self.ready.put_u8(kind);
            self.ready.put_u8(flags);
            self.ready.put_u32(stream_id);
            self.ready.put_slice(chunk);
            first = false;
        }
    }
}

/// Appends a "literal header field without indexing, new name" (RFC 7541 6.2.2): it neither
/// reads nor changes the server's dynamic table, so it is valid whatever that table holds.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_string(out, name);
    encode_string(out, value);
}

/// A string literal without Huffman coding: 7-bit-prefix length, then the bytes.
fn encode_string(out: &mut Vec<u8>, bytes: &[u8]) {
    encode_integer(out, bytes.len(), 7, 0x00);
    out.extend_from_slice(bytes);
}

/// HPACK integer with an N-bit prefix (RFC 7541 5.1); `flags` fills the bits above the prefix.
fn encode_integer(out: &mut Vec<u8>, value: usize, prefix_bits: u8, flags: u8) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityRepair<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.state == State::Transparent && this.raw.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if this.raw.capacity() - this.raw.len() < 4096 {
                this.raw.reserve(16 * 1024);
            }
            let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.raw))?;
            if n == 0 {
                // End of stream: whatever is left is incomplete; the server will notice.
                let rest = this.raw.split();
                this.ready.unsplit(rest);
                if this.ready.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.process();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityRepair<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn request_headers(authority: &str) -> HeaderList {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/etcdserverpb.Maintenance/Status"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-go/1.26.0"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    type Frame = (u8, u8, u32, Vec<u8>);
    type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

    /// Splits the repaired stream back into frames and decodes its header blocks.
    fn parse(output: &[u8]) -> (Vec<Frame>, Vec<HeaderList>) {
        assert_eq!(&output[..PREFACE.len()], PREFACE);
        let mut rest = &output[PREFACE.len()..];
        let mut frames = Vec::new();
        let mut blocks = Vec::new();
        let mut decoder = loona_hpack::Decoder::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let payload = rest[9..9 + len].to_vec();
            if rest[3] == HEADERS {
                blocks.push(decoder.decode(&payload).expect("server-side decode"));
            }
            frames.push((rest[3], rest[4], stream, payload));
            rest = &rest[9 + len..];
        }
        (frames, blocks)
    }

    async fn repair(input: Vec<u8>) -> Vec<u8> {
        let mut repaired = AuthorityRepair::new(&input[..], Arc::new(Metrics::default()), 16384, Arc::default());
        let mut output = Vec::new();
        repaired.read_to_end(&mut output).await.expect("read");
        output
    }

    #[tokio::test]
    async fn malformed_authority_is_dropped_and_everything_else_kept() {
        let mut client = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        input.extend_from_slice(&settings);
        // Two requests: the second refers to the client's dynamic table for its headers.
        for stream in [1u32, 3] {
            let headers = request_headers("http://127.0.0.1:23790");
            let block = client.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
            // Split the first block over HEADERS + CONTINUATION with padding, as a client may.
            let (head, tail) = block.split_at(block.len() / 2);
            let mut padded = vec![2u8];
            padded.extend_from_slice(head);
            padded.extend_from_slice(&[0, 0]);
            input.extend_from_slice(&frame(HEADERS, PADDED, stream, &padded));
            input.extend_from_slice(&frame(CONTINUATION, END_HEADERS, stream, tail));
            input.extend_from_slice(&frame(0x0, END_STREAM, stream, &[0, 0, 0, 0, 0]));
        }
        let (frames, blocks) = parse(&repair(input).await);
        assert_eq!(frames.len(), 5);
        assert_eq!(frames[0], (0x4, 0, 0, settings[9..].to_vec()));
        let mut expected = request_headers("unused");
        expected.retain(|(n, _)| n != b":authority");
        assert_eq!(blocks, vec![expected.clone(), expected]);
        assert_eq!((frames[1].0, frames[1].1, frames[1].2), (HEADERS, END_HEADERS, 1));
        assert_eq!(frames[2], (0x0, END_STREAM, 1, vec![0, 0, 0, 0, 0]));
        assert_eq!((frames[3].0, frames[3].1, frames[3].2), (HEADERS, END_HEADERS, 3));
    }

    #[tokio::test]
    async fn valid_blocks_pass_through_byte_for_byte() {
        let mut client = loona_hpack::Encoder::new();
        let headers = request_headers("127.0.0.1:23790");
        let block = client.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut input = PREFACE.to_vec();
        let priority_and_block = [[0, 0, 0, 0, 16].as_slice(), &block].concat();
        input.extend_from_slice(&frame(HEADERS, END_HEADERS | END_STREAM | PRIORITY, 1, &priority_and_block));
        assert_eq!(repair(input.clone()).await, input);
    }

    #[tokio::test]
    async fn a_connection_that_starts_valid_is_passed_through_untouched() {
        // Only the first block is examined: gRPC clients keep one authority per connection.
        let mut client = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        for (stream, authority) in [(1u32, "127.0.0.1:23790"), (3, "http://127.0.0.1:23790")] {
            let headers = request_headers(authority);
            let block = client.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
            input.extend_from_slice(&frame(HEADERS, END_HEADERS | END_STREAM, stream, &block));
            input.extend_from_slice(&frame(0x0, END_STREAM, stream, &[0, 0, 0, 0, 0]));
        }
        assert_eq!(repair(input.clone()).await, input);
    }

    /// Runs `input` through the layer in `chunk`-byte reads, returning the output and the most
    /// bytes the layer held at any time.
    async fn repair_in_chunks(input: &[u8], chunk: usize) -> (Vec<u8>, usize) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut repaired = AuthorityRepair::new(server, Arc::new(Metrics::default()), 16384, Arc::default());
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            for piece in input.chunks(chunk) {
                tokio::io::AsyncWriteExt::write_all(&mut client, piece).await.unwrap();
            }
        });
        let mut output = Vec::new();
        let mut held = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = repaired.read(&mut buf).await.unwrap();
            held = held.max(repaired.raw.len() + repaired.block.as_ref().map_or(0, |b| b.original.len()));
            if n == 0 {
                break;
            }
            output.extend_from_slice(&buf[..n]);
        }
        writer.await.unwrap();
        (output, held)
    }

    fn literal_block(headers: usize, value_len: usize) -> Vec<u8> {
        let mut block = Vec::new();
        for i in 0..headers {
            encode_literal(&mut block, format!("x-h{i}").as_bytes(), &vec![b'v'; value_len]);
        }
        block
    }

    #[tokio::test]
    async fn an_oversize_first_block_goes_to_the_server_unexamined_and_unbuffered() {
        // 1 MiB of headers over 16 KiB frames: far over the 16 KiB limit.
        let block = literal_block(64, 16 * 1024);
        let mut input = PREFACE.to_vec();
        let mut frames = block.chunks(16 * 1024).peekable();
        let mut first = true;
        while let Some(piece) = frames.next() {
            let flags = if frames.peek().is_none() { END_HEADERS } else { 0 };
            input.extend_from_slice(&frame(if first { HEADERS } else { CONTINUATION }, flags, 1, piece));
            first = false;
        }
        let (output, held) = repair_in_chunks(&input, 4096).await;
        assert_eq!(output, input);
        assert!(held <= 16384 + 6 * FRAME_HEADER_LEN + 4096, "held {held} bytes");
    }

    #[tokio::test]
    async fn a_continuation_flood_is_not_collected() {
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(HEADERS, 0, 1, &[0x82]));
        for _ in 0..1000 {
            input.extend_from_slice(&frame(CONTINUATION, 0, 1, &[]));
        }
        let (output, held) = repair_in_chunks(&input, 512).await;
        assert_eq!(output, input);
        assert!(held < 1024, "held {held} bytes");
    }

    #[tokio::test]
    async fn a_table_size_beyond_the_servers_or_a_block_that_decodes_too_large_is_not_examined() {
        // A size update to 2 MiB, which the server never allowed.
        let mut oversize_table = vec![0x3f];
        let mut rest = Vec::new();
        encode_integer(&mut rest, 2 * 1024 * 1024 - 31, 0, 0);
        oversize_table.extend_from_slice(&rest[1..]);
        oversize_table.extend_from_slice(&literal_block(1, 10));
        // One 3 KiB entry added to the table, then referenced 4000 times: 4 KiB on the wire
        // decoding to 12 MiB.
        let mut amplified = vec![0x40];
        encode_string(&mut amplified, b"x-big");
        encode_string(&mut amplified, &[b'v'; 3000]);
        amplified.extend(std::iter::repeat_n(0xbe, 4000));
        for mut block in [oversize_table, amplified] {
            // A malformed authority, which would make the layer re-encode a block it examined.
            encode_literal(&mut block, b":authority", b"http://127.0.0.1:2379");
            let mut input = PREFACE.to_vec();
            input.extend_from_slice(&frame(HEADERS, END_HEADERS, 1, &block));
            let (output, _) = repair_in_chunks(&input, 1024).await;
            assert_eq!(output, input);
        }
    }

    #[tokio::test]
    async fn the_handshake_is_done_once_the_first_settings_frame_arrived() {
        let (mut client, server) = tokio::io::duplex(1024);
        let handshake = Arc::new(AtomicBool::new(false));
        let mut repaired = AuthorityRepair::new(server, Arc::new(Metrics::default()), 16384, Arc::clone(&handshake));
        let mut buf = [0u8; 128];
        let settings = frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
        tokio::io::AsyncWriteExt::write_all(&mut client, &PREFACE[..10]).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut client, &PREFACE[10..]).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut client, &settings[..12]).await.unwrap();
        let n = repaired.read(&mut buf).await.unwrap();
        assert!(n > 0);
        assert!(!handshake.load(Relaxed), "half a SETTINGS frame is not a handshake");
        tokio::io::AsyncWriteExt::write_all(&mut client, &settings[12..]).await.unwrap();
        let _ = repaired.read(&mut buf).await.unwrap();
        assert!(handshake.load(Relaxed));
    }

    #[test]
    fn hpack_integers() {
        let mut out = Vec::new();
        encode_integer(&mut out, 10, 5, 0);
        encode_integer(&mut out, 1337, 5, 0);
        assert_eq!(out, vec![10, 31, 154, 10]); // RFC 7541 C.1.1 and C.1.2
    }

    #[tokio::test]
    async fn anything_else_passes_through_unchanged() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(repair(input.clone()).await, input);
    }
}
