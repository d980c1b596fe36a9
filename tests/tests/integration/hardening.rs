//! No client can crash, freeze or mislead the proxy. Hostile or broken clients
//! (oversized and endless header blocks, oversized messages, watchers that never read,
//! malformed gRPC, connections that go silent, password guessing, foreign tokens) are refused
//! or cut off while the proxy's memory stays bounded and every other client is still served.
//!
//! Byte streams an HTTP/2 library refuses to produce are written by hand ([`etcd_compat_tests::frame`]);
//! well-formed calls that need control (a zero receive window, a body sent in pieces) use the
//! `h2` crate as the client.

use std::future::poll_fn;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream as StdTcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_compat_certs::DevPki;
use etcd_compat_proto::etcdserverpb::{
    watch_request::RequestUnion, AuthenticateRequest, AuthenticateResponse, LeaseKeepAliveRequest, PutRequest,
    RangeRequest, RangeResponse, WatchCreateRequest, WatchRequest, WatchResponse,
};
use etcd_compat_tests::{
    error_code_name, etcdctl_ok, frame, frame_flags, frame_type, free_port, grpc_frame, grpc_prefix,
    grpc_request_headers, hpack_literal, hpack_table_size_update, read_frame, settings_frame, ClusterSpec, EtcdVersion,
    Frame, GrpcMessages, ProxyProcess, PREFACE,
};
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::{Request, Response};
use prost::Message;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::support::{
    both_versions, connect, grpc_status, metric, revisions_seen, run_proxy, runtime, start_proxy, upstream_requests,
    Deployment, Wire,
};

const MIB: u64 = 1024 * 1024;
/// The proxy's memory ceiling under every attack here; it idles at about 10 MiB.
const PEAK_RSS_LIMIT: u64 = 64 * MIB;
/// etcd's default `--max-request-bytes` (1.5 MiB) plus grpc-go's 512 KiB allowance: the largest
/// request message etcd's gRPC server reads, and by default the proxy's too.
const DEFAULT_MAX_RECEIVE: u64 = 2_097_152;
const RESOURCE_EXHAUSTED: &str = "8";
const DEADLINE_EXCEEDED: &str = "4";
const UNAUTHENTICATED: &str = "16";

// ---------------------------------------------------------------------------------------------
// Shared checks.

/// Put then get of a key named after `step` through the proxy with etcdctl: the proxy still serves
/// after whatever `step` did to it.
fn etcdctl_still_works(deployment: &Deployment, step: &str) {
    let version = deployment.cluster.version();
    let key = format!("/hardening/after-{step}");
    let tls = deployment.client_tls.as_ref();
    assert_eq!(etcdctl_ok(version, &deployment.endpoint, tls, &["put", &key, "still-serving"]), "OK\n", "after {step}");
    assert_eq!(
        etcdctl_ok(version, &deployment.endpoint, tls, &["get", &key]),
        format!("{key}\nstill-serving\n"),
        "after {step}"
    );
}

/// The proxy's peak RSS so far, printed so that a run shows it even when an earlier
/// assertion fails.
fn peak_rss(proxy: &ProxyProcess, what: &str) -> u64 {
    let peak = proxy.peak_rss_bytes().expect("proxy peak RSS");
    eprintln!("{what}: proxy peak RSS {:.1} MiB", peak as f64 / MIB as f64);
    peak
}

fn assert_peak_rss_bounded(peak: u64, what: &str) {
    assert!(
        peak < PEAK_RSS_LIMIT,
        "{what}: the proxy's peak RSS reached {:.1} MiB (limit {} MiB)",
        peak as f64 / MIB as f64,
        PEAK_RSS_LIMIT / MIB
    );
}

// ---------------------------------------------------------------------------------------------
// gRPC calls over the h2 crate.

/// An HTTP/2 connection made with the `h2` crate, driven by its own task (which also answers
/// PINGs); `window` changes the connection's initial stream window while it runs.
struct H2 {
    send: SendRequest<Bytes>,
    addr: SocketAddr,
    window: mpsc::UnboundedSender<u32>,
    driver: JoinHandle<()>,
}

async fn h2_connect(addr: SocketAddr) -> H2 {
    h2_connect_with(addr, h2::client::Builder::new()).await
}

async fn h2_connect_with(addr: SocketAddr, builder: h2::client::Builder) -> H2 {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let _ = tcp.set_nodelay(true);
    let (send, mut connection) = builder.handshake::<_, Bytes>(tcp).await.expect("HTTP/2 handshake");
    let (window, mut sizes) = mpsc::unbounded_channel::<u32>();
    let driver = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut connection => return,
                Some(size) = sizes.recv() => {
                    connection.set_initial_window_size(size).expect("set the initial stream window");
                }
            }
        }
    });
    H2 { send, addr, window, driver }
}

/// A gRPC request to `path` with the usual headers plus `extra`.
fn grpc_request(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> Request<()> {
    let mut builder = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra {
        builder = builder.header(*name, *value);
    }
    builder.body(()).expect("request")
}

/// How a call ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    /// An HTTP answer; the gRPC status fields come from the trailers, or from the headers of a
    /// trailers-only answer.
    Answer(Answer),
    /// The server reset the stream.
    Reset(Reason),
    /// The server closed the connection with GOAWAY.
    GoAway(Reason),
    /// Anything else: I/O failure, a reset by the client library itself, ...
    Broken(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    http_status: u16,
    grpc_status: Option<String>,
    grpc_message: Option<String>,
    messages: Vec<Vec<u8>>,
}

impl Ending {
    /// `(grpc-status, grpc-message)` of an answer; panics (naming `what`) otherwise.
    fn status(&self, what: &str) -> (String, String) {
        match self {
            Ending::Answer(Answer { grpc_status: Some(code), grpc_message, .. }) => {
                (code.clone(), grpc_message.clone().unwrap_or_default())
            }
            other => panic!("{what}: expected an answer with a gRPC status, got {other:?}"),
        }
    }

    fn answer(&self, what: &str) -> &Answer {
        match self {
            Ending::Answer(answer) => answer,
            other => panic!("{what}: expected an answer, got {other:?}"),
        }
    }
}

fn ending_of(error: h2::Error) -> Ending {
    match error.reason() {
        Some(reason) if error.is_go_away() => Ending::GoAway(reason),
        Some(reason) if error.is_reset() && error.is_remote() => Ending::Reset(reason),
        _ => Ending::Broken(error.to_string()),
    }
}

async fn read_answer(response: Response<RecvStream>) -> Result<Answer, h2::Error> {
    let (parts, mut body) = response.into_parts();
    let mut reassembler = GrpcMessages::new();
    let mut messages = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        body.flow_control().release_capacity(chunk.len())?;
        reassembler.push(&chunk);
        while let Some(message) = reassembler.next_message() {
            messages.push(message);
        }
    }
    let trailers = body.trailers().await?;
    let field = |name: &str| {
        trailers
            .as_ref()
            .and_then(|trailers| trailers.get(name))
            .or_else(|| parts.headers.get(name))
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    };
    Ok(Answer {
        http_status: parts.status.as_u16(),
        grpc_status: field("grpc-status"),
        grpc_message: field("grpc-message").map(|message| percent_decode(&message)),
        messages,
    })
}

/// gRPC percent-encodes `grpc-message` bytes outside printable ASCII (and `%` itself).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn finish(response: ResponseFuture) -> Ending {
    match response.await {
        Err(error) => ending_of(error),
        Ok(response) => match read_answer(response).await {
            Ok(answer) => Ending::Answer(answer),
            Err(error) => ending_of(error),
        },
    }
}

/// One unary call: headers, `body` (gRPC-framed already, may be empty) and end of stream.
async fn unary(h2: &mut H2, request: Request<()>, body: Vec<u8>) -> Ending {
    let mut send = match h2.send.clone().ready().await {
        Ok(send) => send,
        Err(error) => return ending_of(error),
    };
    let end_with_headers = body.is_empty();
    let (response, mut stream) = match send.send_request(request, end_with_headers) {
        Ok(sent) => sent,
        Err(error) => return ending_of(error),
    };
    // A body refused because the peer already reset the stream (the proxy may reject the headers
    // before this line runs) is not the ending: the response future carries the reset reason.
    if !end_with_headers {
        let _refused_after_reset = stream.send_data(Bytes::from(body), true);
    }
    tokio::time::timeout(Duration::from_secs(20), finish(response))
        .await
        .unwrap_or_else(|_| Ending::Broken("no answer within 20 s".to_owned()))
}

/// A unary call with standard gRPC headers plus `extra`.
async fn call(h2: &mut H2, path: &str, extra: &[(&str, &str)], message: &[u8]) -> Ending {
    let request = grpc_request(h2.addr, path, extra);
    unary(h2, request, grpc_frame(message)).await
}

/// A request body produced as it is sent: `head`, then filler bytes up to `total` bytes.
#[derive(Clone)]
struct Body {
    head: Vec<u8>,
    total: u64,
    filler: Bytes,
}

const PIECE: usize = 256 * 1024;

impl Body {
    fn new(head: Vec<u8>, total: u64) -> Body {
        Body { head, total, filler: Bytes::from(vec![b'x'; PIECE]) }
    }

    fn piece(&self, offset: u64, len: usize) -> Bytes {
        let head_len = self.head.len() as u64;
        if offset >= head_len {
            return self.filler.slice(..len);
        }
        let mut piece = self.head[offset as usize..].to_vec();
        piece.truncate(len);
        piece.resize(len, b'x');
        Bytes::from(piece)
    }
}

/// The gRPC-framed bytes of a PutRequest whose value is `value_len` filler bytes, and the
/// message's encoded length, without holding the value in memory.
fn oversize_put(key: &str, value_len: u64) -> (Body, u64) {
    let mut message = PutRequest { key: Bytes::from(key.to_owned()), ..Default::default() }.encode_to_vec();
    message.push(0x12); // field 2 (value), length-delimited
    prost::encoding::encode_varint(value_len, &mut message);
    let length = message.len() as u64 + value_len;
    let mut head = grpc_prefix(u32::try_from(length).expect("under 4 GiB")).to_vec();
    head.extend_from_slice(&message);
    (Body::new(head, 5 + length), length)
}

/// What [`send_until_answered`] observed.
#[derive(Debug)]
struct Streamed {
    ending: Ending,
    /// Body bytes handed to the connection when the answer's headers arrived (or when sending ended).
    sent_before_answer: u64,
    /// Why sending stopped before the answer, if it did.
    sending_ended: Option<String>,
    answered_after: Duration,
}

/// How long a sender waits for flow-control window before it concludes that the server reads
/// no more and just waits for the answer.
const STALL: Duration = Duration::from_secs(2);

/// Sends `body` as fast as flow control allows (ending the stream with it if `end_stream`)
/// while waiting for the answer; stops sending as soon as the answer's headers arrive.
async fn send_until_answered(
    send: &SendRequest<Bytes>,
    request: Request<()>,
    body: Body,
    end_stream: bool,
) -> Streamed {
    let started = Instant::now();
    let mut send = send.clone().ready().await.expect("connection ready");
    let (response, mut stream) = send.send_request(request, false).expect("send the request headers");
    let sent = AtomicU64::new(0);
    let mut response = response;
    let mut sending_ended = None;
    let answered = {
        let pump = pump(&mut stream, &body, end_stream, &sent);
        tokio::pin!(pump);
        tokio::select! {
            answer = &mut response => Some(answer),
            end = &mut pump => {
                sending_ended = Some(end);
                None
            }
        }
    };
    let sent_before_answer = sent.load(Ordering::SeqCst);
    let response = match answered {
        Some(response) => response,
        None => match tokio::time::timeout(Duration::from_secs(10), response).await {
            Ok(response) => response,
            Err(_) => {
                return Streamed {
                    ending: Ending::Broken("no answer within 10 s after sending ended".to_owned()),
                    sent_before_answer,
                    sending_ended,
                    answered_after: started.elapsed(),
                }
            }
        },
    };
    let answered_after = started.elapsed();
    let ending = match response {
        Err(error) => ending_of(error),
        Ok(response) => match tokio::time::timeout(Duration::from_secs(30), read_answer(response)).await {
            Ok(Ok(answer)) => Ending::Answer(answer),
            Ok(Err(error)) => ending_of(error),
            Err(_) => Ending::Broken("the answer's body did not end within 30 s".to_owned()),
        },
    };
    drop(stream);
    Streamed { ending, sent_before_answer, sending_ended, answered_after }
}

async fn pump(stream: &mut SendStream<Bytes>, body: &Body, end_stream: bool, sent: &AtomicU64) -> String {
    let mut offset = 0u64;
    while offset < body.total {
        let want = PIECE.min((body.total - offset) as usize);
        stream.reserve_capacity(want);
        let granted = match tokio::time::timeout(STALL, poll_fn(|cx| stream.poll_capacity(cx))).await {
            Err(_) => return format!("no flow-control window for {STALL:?} after {offset} bytes"),
            Ok(None) => return format!("stream closed after {offset} bytes"),
            Ok(Some(Err(error))) => return format!("stream failed after {offset} bytes: {error}"),
            Ok(Some(Ok(granted))) => granted.min(want),
        };
        if granted == 0 {
            continue;
        }
        let last = offset + granted as u64 == body.total;
        if let Err(error) = stream.send_data(body.piece(offset, granted), last && end_stream) {
            return format!("sending failed after {offset} bytes: {error}");
        }
        offset += granted as u64;
        sent.store(offset, Ordering::SeqCst);
    }
    format!("all {offset} bytes sent")
}

/// `body` sent to `path` directly and through the proxy, each on a fresh connection:
/// `(direct, proxied)`.
async fn direct_and_proxied(
    deployment: &Deployment,
    path: &str,
    body: &Body,
    end_stream: bool,
) -> (Streamed, Streamed) {
    let mut results = Vec::new();
    for addr in [deployment.cluster.client_addrs()[0], deployment.proxy.listen_addr()] {
        let h2 = h2_connect(addr).await;
        let request = grpc_request(addr, path, &[]);
        results.push(send_until_answered(&h2.send, request, body.clone(), end_stream).await);
    }
    let proxied = results.pop().expect("proxied");
    (results.pop().expect("direct"), proxied)
}

fn larger_than_max(length: u64, max: u64) -> (String, String) {
    (RESOURCE_EXHAUSTED.to_owned(), format!("grpc: received message larger than max ({length} vs. {max})"))
}

// ---------------------------------------------------------------------------------------------
// Raw connections.

/// What a hand-written connection saw from the proxy after its request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RawVerdict {
    /// EOF or a reset connection.
    Closed(String),
    GoAway(&'static str),
    Reset(&'static str),
    /// Response headers (and trailers) for stream 1.
    Answered {
        status: String,
        grpc_status: Option<String>,
        grpc_message: Option<String>,
    },
    /// The connection stayed open without an answer.
    Silent,
}

impl RawVerdict {
    /// Closing the connection, GOAWAY, RST_STREAM or a non-OK status all refuse the request;
    /// a gRPC success or silence does not.
    fn refused(&self) -> bool {
        match self {
            RawVerdict::Closed(_) | RawVerdict::GoAway(_) | RawVerdict::Reset(_) => true,
            RawVerdict::Answered { status, grpc_status, .. } => status != "200" || grpc_status.as_deref() != Some("0"),
            RawVerdict::Silent => false,
        }
    }
}

/// Reads the proxy's frames until it decides about stream 1 or `wait` passes.
fn raw_verdict(stream: &mut StdTcpStream, wait: Duration) -> RawVerdict {
    let deadline = Instant::now() + wait;
    let mut decoder = loona_hpack::Decoder::new();
    let mut block: Vec<u8> = Vec::new();
    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return RawVerdict::Silent;
        }
        stream.set_read_timeout(Some(left)).expect("read timeout");
        let frame = match read_frame(stream) {
            Ok(frame) => frame,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return RawVerdict::Silent
            }
            Err(error) => return RawVerdict::Closed(error.to_string()),
        };
        match frame.kind {
            frame_type::GOAWAY => return RawVerdict::GoAway(error_code_name(frame.error_code().unwrap_or(u32::MAX))),
            frame_type::RST_STREAM if frame.stream_id == 1 => {
                return RawVerdict::Reset(error_code_name(frame.error_code().unwrap_or(u32::MAX)))
            }
            frame_type::HEADERS | frame_type::CONTINUATION if frame.stream_id == 1 => {
                block.extend_from_slice(header_fragment(&frame));
                if frame.flags & frame_flags::END_HEADERS == 0 {
                    continue;
                }
                let decoded = decoder.decode(&block).expect("the proxy's header block decodes");
                block.clear();
                headers.extend(decoded.into_iter().map(|(name, value)| {
                    (String::from_utf8_lossy(&name).into_owned(), String::from_utf8_lossy(&value).into_owned())
                }));
                let find = |name: &str| headers.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.clone());
                let ended = frame.flags & frame_flags::END_STREAM != 0;
                if ended || find("grpc-status").is_some() || find(":status").is_some_and(|status| status != "200") {
                    return RawVerdict::Answered {
                        status: find(":status").unwrap_or_default(),
                        grpc_status: find("grpc-status"),
                        grpc_message: find("grpc-message"),
                    };
                }
            }
            _ => {}
        }
    }
}

/// The header block fragment of a HEADERS or CONTINUATION frame (padding and priority removed).
fn header_fragment(frame: &Frame) -> &[u8] {
    const PADDED: u8 = 0x8;
    const PRIORITY: u8 = 0x20;
    let mut payload = &frame.payload[..];
    if frame.kind != frame_type::HEADERS {
        return payload;
    }
    let mut padding = 0;
    if frame.flags & PADDED != 0 {
        padding = payload[0] as usize;
        payload = &payload[1..];
    }
    if frame.flags & PRIORITY != 0 {
        payload = &payload[5..];
    }
    &payload[..payload.len() - padding]
}

/// A header block cut into a HEADERS frame and CONTINUATION frames of at most 16 KiB payload
/// (the frame size every HTTP/2 peer accepts), END_HEADERS on the last.
fn header_frames(stream_id: u32, block: &[u8]) -> Vec<u8> {
    let pieces: Vec<&[u8]> = block.chunks(16 * 1024).collect();
    let mut out = Vec::with_capacity(block.len() + pieces.len() * 9);
    for (i, piece) in pieces.iter().enumerate() {
        let kind = if i == 0 { frame_type::HEADERS } else { frame_type::CONTINUATION };
        let flags = if i + 1 == pieces.len() { frame_flags::END_HEADERS } else { 0 };
        out.extend_from_slice(&frame(kind, flags, stream_id, piece));
    }
    out
}

/// Connects to `addr`, sends the preface, an empty SETTINGS and `attack` (from another thread,
/// so a proxy that stops reading cannot block the verdict), and returns the verdict on stream 1
/// and what became of the write.
fn raw_attack(addr: SocketAddr, attack: Vec<u8>) -> (RawVerdict, Result<(), String>) {
    let mut stream = StdTcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut writer = stream.try_clone().expect("clone the socket");
    writer.set_write_timeout(Some(Duration::from_secs(10))).expect("write timeout");
    let sending = thread::spawn(move || {
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&settings_frame(&[]));
        bytes.extend_from_slice(&attack);
        writer.write_all(&bytes).map_err(|error| error.to_string())
    });
    let verdict = raw_verdict(&mut stream, Duration::from_secs(10));
    let _ = stream.shutdown(Shutdown::Both);
    let written = sending.join().expect("writer thread");
    (verdict, written)
}

fn range_body(key: &str) -> Vec<u8> {
    grpc_frame(&RangeRequest { key: Bytes::from(key.to_owned()), ..Default::default() }.encode_to_vec())
}

// ---------------------------------------------------------------------------------------------
// 1. Header blocks: refused, memory bounded, the proxy keeps serving.

/// The header block attacks: each is the first block of a fresh connection (the only one the
/// proxy's own header repair examines), asking for a Range that a served request would answer.
fn header_block_attack(name: &str, block: Vec<u8>) {
    let deployment = Deployment::start(EtcdVersion::V3_4, 1, Wire::Plain, &[]);
    let addr = deployment.proxy.listen_addr();
    let mut attack = header_frames(1, &block);
    attack.extend_from_slice(&frame(frame_type::DATA, frame_flags::END_STREAM, 1, &range_body("/hardening/k")));
    let started = Instant::now();
    let (verdict, written) = raw_attack(addr, attack);
    eprintln!("{name}: {verdict:?} after {:?}; write: {written:?}", started.elapsed());
    let peak = peak_rss(&deployment.proxy, name);
    assert!(verdict.refused(), "{name}: the proxy did not refuse the header block: {verdict:?}");
    assert_peak_rss_bounded(peak, name);
    etcdctl_still_works(&deployment, name);
}

/// Literal headers (no indexing) of 1000-byte values after the call's own headers, until the
/// block holds `size` bytes.
fn padded_block(authority: &str, size: usize) -> Vec<u8> {
    let mut block = grpc_request_headers(authority, "/etcdserverpb.KV/Range");
    let value = vec![b'v'; 1000];
    let mut i = 0;
    while block.len() < size {
        hpack_literal(&mut block, format!("x-pad-{i:05}").as_bytes(), &value, false);
        i += 1;
    }
    block
}

#[test]
fn one_mebibyte_header_block_is_refused() {
    header_block_attack("1-MiB-header-block", padded_block("127.0.0.1", MIB as usize));
}

/// A dynamic table size update to 2 MiB, far over any SETTINGS_HEADER_TABLE_SIZE the proxy
/// announces, then large headers the decoder is told to keep in that table.
#[test]
fn two_mebibyte_hpack_table_is_refused() {
    let mut block = Vec::new();
    hpack_table_size_update(&mut block, 2 * MIB as usize);
    block.extend_from_slice(&grpc_request_headers("127.0.0.1", "/etcdserverpb.KV/Range"));
    let value = vec![b't'; 16 * 1024];
    for i in 0..64 {
        hpack_literal(&mut block, format!("x-table-{i:02}").as_bytes(), &value, true);
    }
    header_block_attack("2-MiB-HPACK-table", block);
}

/// HEADERS without END_HEADERS, then 16 KiB CONTINUATION frames as fast as the socket takes
/// them: the proxy must stop reading them long before 300 MiB (by closing the connection), not
/// buffer them.
#[test]
fn continuation_flood_is_cut_off() {
    const FLOOD_LIMIT: u64 = 300 * MIB;
    /// Kernel buffers on loopback can hold tens of MiB written before the proxy even looks.
    const ACCEPTED_LIMIT: u64 = 64 * MIB;
    let deployment = Deployment::start(EtcdVersion::V3_4, 1, Wire::Plain, &[]);
    let addr = deployment.proxy.listen_addr();
    let mut stream = StdTcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut reader = stream.try_clone().expect("clone the socket");
    let watching = thread::spawn(move || raw_verdict(&mut reader, Duration::from_secs(30)));

    let mut opening = PREFACE.to_vec();
    opening.extend_from_slice(&settings_frame(&[]));
    let headers = grpc_request_headers(&addr.to_string(), "/etcdserverpb.KV/Range");
    opening.extend_from_slice(&frame(frame_type::HEADERS, 0, 1, &headers));
    // 64 CONTINUATION frames of one 16 KiB literal header each, written again and again.
    let mut literal = Vec::new();
    hpack_literal(&mut literal, b"x-flood", &vec![b'f'; 16 * 1024 - 12], false);
    assert_eq!(literal.len(), 16 * 1024);
    let one = frame(frame_type::CONTINUATION, 0, 1, &literal);
    let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 64).collect();

    stream.set_write_timeout(Some(Duration::from_secs(5))).expect("write timeout");
    let started = Instant::now();
    stream.write_all(&opening).expect("preface, SETTINGS and HEADERS");
    let mut accepted = 0u64;
    let mut at = 0usize;
    let stopped = loop {
        if accepted >= FLOOD_LIMIT {
            break None;
        }
        match stream.write(&batch[at..]) {
            Ok(0) => break Some("write returned 0".to_owned()),
            Ok(n) => {
                accepted += n as u64;
                at = (at + n) % batch.len();
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => break Some(format!("{:?}: {error}", error.kind())),
        }
    };
    let took = started.elapsed();
    let _ = stream.shutdown(Shutdown::Both);
    let verdict = watching.join().expect("reader thread");
    eprintln!(
        "flood: {:.1} MiB accepted in {took:?}, write ended with {stopped:?}; verdict {verdict:?}",
        accepted as f64 / MIB as f64
    );
    let peak = peak_rss(&deployment.proxy, "CONTINUATION flood");
    let stopped = stopped.unwrap_or_else(|| {
        panic!("the proxy accepted all {} MiB of CONTINUATION frames ({verdict:?})", FLOOD_LIMIT / MIB)
    });
    // A write timing out means the proxy stopped reading but kept the connection (and whatever
    // it had buffered) open; refusing means closing it.
    assert!(
        stopped.starts_with("BrokenPipe") || stopped.starts_with("ConnectionReset"),
        "the flood ended without the proxy closing the connection: {stopped}"
    );
    assert!(
        accepted < ACCEPTED_LIMIT,
        "{:.1} MiB of CONTINUATION frames were accepted before the connection closed",
        accepted as f64 / MIB as f64
    );
    assert_peak_rss_bounded(peak, "CONTINUATION flood");
    etcdctl_still_works(&deployment, "continuation-flood");
}

// ---------------------------------------------------------------------------------------------
// 2. Request size.

/// A 100 MiB Put is refused with grpc-go's own status, from the message's length prefix: the
/// answer comes while the client is still sending, as it does from etcd directly.
fn oversize_put_is_refused_early(version: EtcdVersion) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &[]);
    let (body, length) = oversize_put("/size/huge", 100 * MIB);
    let runtime = runtime();
    let (direct, proxied) = runtime.block_on(direct_and_proxied(&deployment, "/etcdserverpb.KV/Put", &body, true));
    eprintln!("direct: {direct:?}\nproxied: {proxied:?}");
    let peak = peak_rss(&deployment.proxy, "100 MiB Put");
    let expected = larger_than_max(length, DEFAULT_MAX_RECEIVE);
    assert_eq!(direct.ending.status("directly"), expected);
    assert_eq!(proxied.ending.status("through the proxy"), expected);
    assert!(
        proxied.sent_before_answer < 10 * MIB,
        "the proxy answered only after {:.1} MiB of the {:.1} MiB body, {:?} after the headers ({:?})",
        proxied.sent_before_answer as f64 / MIB as f64,
        body.total as f64 / MIB as f64,
        proxied.answered_after,
        proxied.sending_ended
    );
    assert_peak_rss_bounded(peak, "100 MiB Put");
    etcdctl_still_works(&deployment, "oversize-put");
}

both_versions!(oversize_put_is_refused_early => oversize_put_is_refused_early_3_4, oversize_put_is_refused_early_3_5);

/// Four 100 MiB Puts at once, each on its own connection: memory is bounded by what the proxy
/// reads, not by what the clients send.
#[test]
fn four_oversize_puts_in_parallel_are_refused() {
    let deployment = Deployment::start(EtcdVersion::V3_4, 1, Wire::Plain, &[]);
    let addr = deployment.proxy.listen_addr();
    let runtime = runtime();
    let results = runtime.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..4 {
            tasks.push(tokio::spawn(async move {
                let (body, length) = oversize_put(&format!("/size/parallel/{i}"), 100 * MIB);
                let h2 = h2_connect(addr).await;
                let request = grpc_request(addr, "/etcdserverpb.KV/Put", &[]);
                (send_until_answered(&h2.send, request, body, true).await, length)
            }));
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.expect("put task"));
        }
        results
    });
    for (i, (streamed, _)) in results.iter().enumerate() {
        eprintln!("put {i}: {streamed:?}");
    }
    let peak = peak_rss(&deployment.proxy, "four parallel 100 MiB Puts");
    for (i, (streamed, length)) in results.iter().enumerate() {
        assert_eq!(streamed.ending.status(&format!("put {i}")), larger_than_max(*length, DEFAULT_MAX_RECEIVE));
        assert!(
            streamed.sent_before_answer < 10 * MIB,
            "put {i}: answered only after {:.1} MiB",
            streamed.sent_before_answer as f64 / MIB as f64
        );
    }
    assert_peak_rss_bounded(peak, "four parallel 100 MiB Puts");
    etcdctl_still_works(&deployment, "parallel-oversize-puts");
}

/// Watch and LeaseKeepAlive streams whose first message claims 4 GiB - 1 bytes, followed by as
/// much data as the proxy takes (at most 200 MiB): refused as etcd refuses them directly.
fn stream_claiming_4_gib_is_refused(version: EtcdVersion) {
    const FOLLOWING: u64 = 200 * MIB;
    let deployment = Deployment::start(version, 1, Wire::Plain, &[]);
    let body = Body::new(grpc_prefix(u32::MAX).to_vec(), 5 + FOLLOWING);
    let runtime = runtime();
    let mut outcomes = Vec::new();
    for path in ["/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive"] {
        // A stream that stays open: the claimed message never ends.
        let (direct, proxied) = runtime.block_on(direct_and_proxied(&deployment, path, &body, false));
        eprintln!("{path} direct: {direct:?}\n{path} proxied: {proxied:?}");
        let peak = peak_rss(&deployment.proxy, path);
        outcomes.push((path, direct, proxied, peak));
    }
    let expected = larger_than_max(u64::from(u32::MAX), DEFAULT_MAX_RECEIVE);
    for (path, direct, proxied, peak) in outcomes {
        assert_eq!(direct.ending.status(&format!("{path} directly")), expected);
        assert_eq!(proxied.ending.status(&format!("{path} through the proxy")), expected);
        assert_eq!(proxied.ending.answer(path).http_status, direct.ending.answer(path).http_status);
        assert_peak_rss_bounded(peak, path);
    }
    etcdctl_still_works(&deployment, "4gib-claims");
}

both_versions!(
    stream_claiming_4_gib_is_refused => stream_claiming_4_gib_is_refused_3_4, stream_claiming_4_gib_is_refused_3_5
);

/// Requests the proxy has sent to the deployment's (only) member so far.
fn requests_to_etcd(deployment: &Deployment) -> f64 {
    let (_, metrics) = deployment.proxy.http_get("/metrics");
    upstream_requests(&metrics, &deployment.cluster.member(0).client_url).unwrap_or(0.0)
}

/// With `--max-request-bytes 4194304` (a cluster whose etcd was raised to 4 MiB), a 3 MiB Put
/// is etcd's to judge: this cluster keeps etcd's default, so it answers with its own limit,
/// exactly as directly. A 5 MiB Put is over the raised limit plus 512 KiB and is the proxy's.
fn raised_max_request_bytes_lets_etcd_judge(version: EtcdVersion) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &["--max-request-bytes=4194304"]);
    let proxy_addr = deployment.proxy.listen_addr();
    let runtime = runtime();
    let (three_mib, length) = oversize_put("/size/3mib", 3 * MIB);
    let before = requests_to_etcd(&deployment);
    let (direct, proxied) = runtime.block_on(direct_and_proxied(&deployment, "/etcdserverpb.KV/Put", &three_mib, true));
    let reached_etcd = requests_to_etcd(&deployment) - before;
    assert_eq!(direct.ending.status("3 MiB directly"), larger_than_max(length, DEFAULT_MAX_RECEIVE));
    assert_eq!(proxied.ending, direct.ending, "3 MiB through the proxy");
    assert_eq!(reached_etcd, 1.0, "the 3 MiB Put was sent to etcd once");

    let (five_mib, length) = oversize_put("/size/5mib", 5 * MIB);
    let before = requests_to_etcd(&deployment);
    let refused = runtime.block_on(async {
        let h2 = h2_connect(proxy_addr).await;
        let request = grpc_request(proxy_addr, "/etcdserverpb.KV/Put", &[]);
        send_until_answered(&h2.send, request, five_mib, true).await
    });
    assert_eq!(refused.ending.status("5 MiB through the proxy"), larger_than_max(length, 4_194_304 + 524_288));
    assert_eq!(requests_to_etcd(&deployment) - before, 0.0, "the 5 MiB Put never reached etcd");
    etcdctl_still_works(&deployment, "raised-max-request-bytes");
}

both_versions!(
    raised_max_request_bytes_lets_etcd_judge
        => raised_max_request_bytes_lets_etcd_judge_3_4, raised_max_request_bytes_lets_etcd_judge_3_5
);

// ---------------------------------------------------------------------------------------------
// 3. Slow readers.

/// Five watchers that read nothing while 12 MiB of events arrive for each cost the other
/// clients nothing (every call answered within a second); once they read, each gets every
/// event exactly once, in order.
fn slow_watchers_do_not_stall_others(version: EtcdVersion) {
    const WATCHERS: usize = 5;
    const PUTS: usize = 12;
    let deployment = Deployment::start(version, 1, Wire::Plain, &[]);
    let addr = deployment.proxy.listen_addr();
    let endpoint = deployment.endpoint.clone();
    let runtime = runtime();
    runtime.block_on(async {
        let mut client = connect(&endpoint).await;
        let head = client.get("/slow/", None).await.expect("get").header().expect("header").revision();
        // The watchers cannot read their `created` answers yet, so a start revision instead of
        // creation order makes sure they cover every Put below.
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: Bytes::from_static(b"/slow/"),
                range_end: Bytes::from_static(b"/slow0"),
                start_revision: head + 1,
                ..Default::default()
            })),
        }
        .encode_to_vec();
        let mut watchers = Vec::new();
        for _ in 0..WATCHERS {
            let mut builder = h2::client::Builder::new();
            builder.initial_window_size(0).initial_connection_window_size(64 * MIB as u32);
            let mut h2 = h2_connect_with(addr, builder).await;
            let request = grpc_request(addr, "/etcdserverpb.Watch/Watch", &[]);
            let (response, mut stream) = h2.send.send_request(request, false).expect("open the watch stream");
            stream.send_data(Bytes::from(grpc_frame(&create)), false).expect("send the create request");
            watchers.push((h2, response, stream));
        }

        let mut revisions = Vec::new();
        for i in 0..PUTS {
            let value = vec![b'a' + i as u8; MIB as usize];
            let put = tokio::time::timeout(Duration::from_secs(10), client.put(format!("/slow/{i:02}"), value, None))
                .await
                .unwrap_or_else(|_| panic!("put {i} got no answer within 10 s while the watchers were not reading"))
                .expect("put");
            revisions.push(put.header().expect("header").revision());
        }

        let mut slowest = Duration::ZERO;
        for i in 0..20 {
            let started = Instant::now();
            let got = tokio::time::timeout(Duration::from_secs(5), client.get(format!("/slow/{:02}", i % PUTS), None))
                .await
                .unwrap_or_else(|_| panic!("range {i} got no answer within 5 s while the watchers were not reading"))
                .expect("range");
            let took = started.elapsed();
            assert_eq!(got.kvs().len(), 1);
            assert!(took < Duration::from_secs(1), "range {i} took {took:?} while the watchers were not reading");
            slowest = slowest.max(took);
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        eprintln!("slowest range while the watchers were not reading: {slowest:?}");
        let metrics_addr = deployment.proxy.metrics_addr();
        let started = Instant::now();
        let (status, health) = tokio::task::spawn_blocking(move || {
            etcd_compat_tests::http_get(metrics_addr, "/health", Duration::from_secs(5)).expect("GET /health")
        })
        .await
        .expect("health task");
        assert_eq!(status, 200, "{health}");
        assert!(started.elapsed() < Duration::from_secs(1), "GET /health took {:?}", started.elapsed());
        let ctl_deployment = &deployment;
        tokio::task::block_in_place(|| etcdctl_still_works(ctl_deployment, "slow-watchers"));

        // Opening the windows applies to the streams already open.
        for (h2, _, _) in &watchers {
            h2.window.send(16 * MIB as u32).expect("the watcher's connection is still driven");
        }
        let mut readers = Vec::new();
        for (index, (h2, response, stream)) in watchers.into_iter().enumerate() {
            let revisions = revisions.clone();
            readers.push(tokio::spawn(async move {
                let _keep = (h2, stream);
                read_watch_events(index, response, &revisions).await
            }));
        }
        for reader in readers {
            reader.await.expect("watcher task");
        }
        // Each watcher fell more than --max-buffered-response-bytes (4 MiB) behind: its own
        // upstream stream was paused, or it was detached from the shared watch (its backlog
        // bounded), then resumed from its next undelivered revision.
        let (_, metrics) = deployment.proxy.http_get("/metrics");
        let pauses = metric(&metrics, "etcd_compat_proxy_stream_pauses_total").expect("pauses metric");
        let detached = metric(&metrics, "etcd_compat_proxy_watch_detached_total").expect("detached metric");
        assert!(
            pauses + detached >= WATCHERS as f64,
            "{pauses} pauses and {detached} detaches for {WATCHERS} watchers"
        );
    });
}

/// Reads watcher `index`'s stream: its `created` answer, then exactly the Puts at `revisions`,
/// in order, and nothing else for a moment after them.
async fn read_watch_events(index: usize, response: ResponseFuture, revisions: &[i64]) {
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .unwrap_or_else(|_| panic!("watcher {index}: no response headers"))
        .unwrap_or_else(|error| panic!("watcher {index}: {error}"));
    assert_eq!(response.status(), 200, "watcher {index}");
    let mut body = response.into_body();
    let mut messages = GrpcMessages::new();
    let mut created = false;
    let mut events: Vec<(String, i64, usize, u8)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while events.len() < revisions.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, body.data())
            .await
            .unwrap_or_else(|_| {
                panic!("watcher {index}: only {} of {} events within 30 s", events.len(), revisions.len())
            })
            .unwrap_or_else(|| panic!("watcher {index}: stream ended after {} events", events.len()))
            .unwrap_or_else(|error| panic!("watcher {index}: {error}"));
        body.flow_control().release_capacity(chunk.len()).expect("release capacity");
        messages.push(&chunk);
        while let Some(message) = messages.next_message() {
            let watch = WatchResponse::decode(&message[..]).expect("a WatchResponse");
            assert!(!watch.canceled, "watcher {index}: canceled: {}", watch.cancel_reason);
            if watch.created {
                assert!(!created && events.is_empty(), "watcher {index}: `created` is not first and only once");
                created = true;
            }
            for event in watch.events {
                let kv = event.kv.expect("kv");
                assert_eq!(event.r#type, 0, "watcher {index}: a PUT event");
                events.push((
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    kv.mod_revision,
                    kv.value.len(),
                    kv.value.first().copied().unwrap_or(0),
                ));
            }
        }
    }
    assert!(created, "watcher {index}: no `created` answer");
    let expected: Vec<(String, i64, usize, u8)> = revisions
        .iter()
        .enumerate()
        .map(|(i, revision)| (format!("/slow/{i:02}"), *revision, MIB as usize, b'a' + i as u8))
        .collect();
    assert_eq!(events, expected, "watcher {index}");
    // Nothing repeated after the last one.
    if let Ok(Some(Ok(extra))) = tokio::time::timeout(Duration::from_millis(500), body.data()).await {
        messages.push(&extra);
        while let Some(message) = messages.next_message() {
            let watch = WatchResponse::decode(&message[..]).expect("a WatchResponse");
            assert!(watch.events.is_empty(), "watcher {index}: events after the last Put: {:?}", watch.events.len());
        }
    }
}

both_versions!(
    slow_watchers_do_not_stall_others => slow_watchers_do_not_stall_others_3_4, slow_watchers_do_not_stall_others_3_5
);

// ---------------------------------------------------------------------------------------------
// 4. Malformed requests.

/// The three malformed calls: what is wrong, and the request.
fn malformed_requests(addr: SocketAddr) -> Vec<(&'static str, Request<()>, Vec<u8>)> {
    let range = range_body("/malformed/k");
    let mut text_plain = grpc_request(addr, "/etcdserverpb.KV/Range", &[]);
    text_plain.headers_mut().insert("content-type", http::HeaderValue::from_static("text/plain"));
    let get = Request::get(format!("http://{addr}/etcdserverpb.KV/Range"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let bad_timeout = grpc_request(addr, "/etcdserverpb.KV/Range", &[("grpc-timeout", "abc")]);
    vec![
        ("content-type text/plain", text_plain, range.clone()),
        ("GET", get, Vec::new()),
        ("grpc-timeout abc", bad_timeout, range),
    ]
}

/// Malformed gRPC requests are the client's fault: the proxy resets them as etcd does, and never
/// counts them against a member.
fn malformed_requests_do_not_blame_members(version: EtcdVersion) {
    let deployment = Deployment::start(version, 3, Wire::Plain, &[]);
    let proxy_addr = deployment.proxy.listen_addr();
    let direct_addr = deployment.cluster.client_addrs()[0];
    let runtime = runtime();
    runtime.block_on(async {
        for (what, request, body) in malformed_requests(direct_addr) {
            // Each on a fresh connection, as the first request, as etcd's multiplexer sees it.
            let mut h2 = h2_connect(direct_addr).await;
            let ending = tokio::time::timeout(Duration::from_secs(3), unary(&mut h2, request, body)).await;
            match (version, what) {
                // etcd 3.4's gRPC server never answers a GET; the proxy does better than etcd there.
                (EtcdVersion::V3_4, "GET") => assert!(ending.is_err(), "etcd 3.4 answered a GET: {ending:?}"),
                _ => assert_eq!(ending.ok(), Some(Ending::Reset(Reason::PROTOCOL_ERROR)), "{what} directly"),
            }
        }
        for (what, request, body) in malformed_requests(proxy_addr) {
            let mut h2 = h2_connect(proxy_addr).await;
            assert_eq!(
                unary(&mut h2, request, body).await,
                Ending::Reset(Reason::PROTOCOL_ERROR),
                "{what} through the proxy"
            );
        }
        // 100 more, mixed, ten per connection.
        for connection in 0..10 {
            let mut h2 = h2_connect(proxy_addr).await;
            for i in 0..10 {
                let n = connection * 10 + i;
                let (what, request, body) = malformed_requests(proxy_addr).swap_remove(n % 3);
                assert_eq!(
                    unary(&mut h2, request, body).await,
                    Ending::Reset(Reason::PROTOCOL_ERROR),
                    "request {n} ({what}) through the proxy"
                );
            }
        }
    });
    let (status, health) = deployment.proxy.http_get("/health");
    assert_eq!(status, 200, "{health}");
    assert!(health.starts_with("{\"health\":\"true\""), "{health}");
    let (_, metrics) = deployment.proxy.http_get("/metrics");
    for index in 0..3 {
        let url = deployment.cluster.member(index).client_url;
        assert!(health.contains(&format!("{{\"endpoint\":\"{url}\",\"healthy\":true,")), "{url}: {health}");
        let failures = metric(&metrics, &format!("etcd_compat_proxy_upstream_failures_total{{endpoint=\"{url}\"}}"));
        assert_eq!(failures, Some(0.0), "failures counted against {url}");
    }
    etcdctl_still_works(&deployment, "malformed-requests");
}

both_versions!(
    malformed_requests_do_not_blame_members
        => malformed_requests_do_not_blame_members_3_4, malformed_requests_do_not_blame_members_3_5
);

/// How a connection's first call, a Range carrying the header `name: value` besides gRPC's own,
/// ends at `addr`: the first RST_STREAM, HEADERS or GOAWAY frame for it, named.
fn ending_with_header(addr: SocketAddr, name: &str, value: &str) -> String {
    let mut stream = StdTcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
    let mut block = grpc_request_headers(&addr.to_string(), "/etcdserverpb.KV/Range");
    hpack_literal(&mut block, name.as_bytes(), value.as_bytes(), false);
    let mut opening = PREFACE.to_vec();
    opening.extend_from_slice(&settings_frame(&[]));
    opening.extend_from_slice(&frame(frame_type::HEADERS, frame_flags::END_HEADERS, 1, &block));
    opening.extend_from_slice(&frame(frame_type::DATA, frame_flags::END_STREAM, 1, &range_body("/hop/k")));
    stream.write_all(&opening).expect("preface, SETTINGS and the call");
    loop {
        let frame = match read_frame(&mut stream) {
            Ok(frame) => frame,
            Err(error) => return format!("no ending: {error}"),
        };
        let code = frame.error_code().map(error_code_name).unwrap_or("");
        match frame.kind {
            frame_type::RST_STREAM if frame.stream_id == 1 => return format!("RST_STREAM {code}"),
            frame_type::HEADERS if frame.stream_id == 1 => return "answered".to_owned(),
            frame_type::GOAWAY => return format!("GOAWAY {code}"),
            _ => {}
        }
    }
}

/// Connection-specific headers (and a `te` other than `trailers`) make a request malformed in
/// HTTP/2 (RFC 9113, 8.2.2). etcd's gRPC server answers it anyway; the proxy's HTTP/2 server (h2)
/// resets it with PROTOCOL_ERROR before the proxy sees it, and nothing is sent on. This pins
/// that difference: if either side changes, the README's row on it must too.
fn connection_specific_headers_are_reset_by_the_proxy_not_by_etcd(version: EtcdVersion) {
    let deployment = Deployment::start(version, 1, Wire::Plain, &[]);
    let (proxy_addr, direct_addr) = (deployment.proxy.listen_addr(), deployment.cluster.client_addrs()[0]);
    let member = deployment.cluster.member(0).client_url;
    let sent_on = || upstream_requests(&deployment.proxy.http_get("/metrics").1, &member).unwrap_or(0.0);
    let before = sent_on();
    let headers = [
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "h2c"),
        ("te", "gzip"),
    ];
    for (name, value) in headers {
        assert_eq!(ending_with_header(direct_addr, name, value), "answered", "{name}: {value} directly");
        let through = ending_with_header(proxy_addr, name, value);
        assert_eq!(through, "RST_STREAM PROTOCOL_ERROR", "{name}: {value} through the proxy");
    }
    // The same call without them is answered, so the resets were for the headers alone.
    assert_eq!(ending_with_header(proxy_addr, "x-custom", "1"), "answered");
    assert_eq!(sent_on() - before, 1.0, "only the well-formed call reached etcd");
}

both_versions!(
    connection_specific_headers_are_reset_by_the_proxy_not_by_etcd
        => connection_specific_headers_are_reset_3_4, connection_specific_headers_are_reset_3_5
);

// ---------------------------------------------------------------------------------------------
// 5. Timeouts.

/// Time from connecting until the proxy closes a connection that sends `opening` and then
/// nothing; `None` if it is still open after 10 s.
fn closed_after(addr: SocketAddr, opening: &[u8]) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = StdTcpStream::connect(addr).expect("connect");
    stream.write_all(opening).expect("write the opening bytes");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let mut sink = [0u8; 4096];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return None,
            Err(_) => return Some(started.elapsed()),
        }
    }
}

/// A connection that completes the preface and SETTINGS, then answers nothing, PINGs
/// included: `(first PING after, closed after)`, `None` for what did not happen within 10 s.
fn silent_after_settings(addr: SocketAddr) -> (Option<Duration>, Option<Duration>, Vec<&'static str>) {
    let started = Instant::now();
    let mut stream = StdTcpStream::connect(addr).expect("connect");
    let mut opening = PREFACE.to_vec();
    opening.extend_from_slice(&settings_frame(&[]));
    stream.write_all(&opening).expect("preface and SETTINGS");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let mut ping = None;
    let mut seen = Vec::new();
    loop {
        match read_frame(&mut stream) {
            Ok(frame) => {
                seen.push(match frame.kind {
                    frame_type::SETTINGS => "SETTINGS",
                    frame_type::PING => "PING",
                    frame_type::GOAWAY => "GOAWAY",
                    frame_type::WINDOW_UPDATE => "WINDOW_UPDATE",
                    _ => "other",
                });
                if frame.kind == frame_type::PING && frame.flags & frame_flags::ACK == 0 && ping.is_none() {
                    ping = Some(started.elapsed());
                }
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (ping, None, seen)
            }
            Err(_) => return (ping, Some(started.elapsed()), seen),
        }
    }
}

/// Time from connecting until the proxy closes a TLS connection that completes the handshake
/// and then sends nothing.
async fn tls_silent_closed_after(addr: SocketAddr, ca: &Path) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in etcd_compat_certs::load_certs(ca).expect("CA") {
        roots.add(certificate).expect("trust the CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let started = Instant::now();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let mut tls = connector.connect(name, tcp).await.expect("the TLS handshake completes");
    eprintln!("TLS handshake done after {:?}", started.elapsed());
    let mut sink = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut sink)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

fn assert_about(what: &str, took: Option<Duration>, from: Duration, to: Duration) {
    let took = took.unwrap_or_else(|| panic!("{what}: the connection was still open after 10 s"));
    assert!(took >= from && took < to, "{what}: closed after {took:?}, expected {from:?}..{to:?}");
}

/// A Range request whose `framed` bytes are sent one every `interval` after the headers
/// (`extra` headers added), until the answer comes: the ending and when it came.
async fn trickled_range(
    addr: SocketAddr,
    extra: &[(&str, &str)],
    framed: Vec<u8>,
    interval: Duration,
) -> (Ending, Duration) {
    let h2 = h2_connect(addr).await;
    let mut send = h2.send.clone().ready().await.expect("ready");
    let request = grpc_request(addr, "/etcdserverpb.KV/Range", extra);
    let started = Instant::now();
    let (response, mut stream) = send.send_request(request, false).expect("headers");
    let trickle = async {
        for byte in framed {
            tokio::time::sleep(interval).await;
            if stream.send_data(Bytes::from(vec![byte]), false).is_err() {
                break;
            }
        }
        std::future::pending::<()>().await
    };
    let ending = tokio::select! {
        ending = finish(response) => ending,
        _ = trickle => unreachable!("the trickle never ends by itself"),
        _ = tokio::time::sleep(Duration::from_secs(15)) => Ending::Broken("no answer within 15 s".to_owned()),
    };
    (ending, started.elapsed())
}

/// A Range whose body stops after `sent` bytes of `framed`: the ending and when it came.
async fn stalled_range(addr: SocketAddr, framed: &[u8], sent: usize) -> (Ending, Duration) {
    let h2 = h2_connect(addr).await;
    let mut send = h2.send.clone().ready().await.expect("ready");
    let request = grpc_request(addr, "/etcdserverpb.KV/Range", &[]);
    let started = Instant::now();
    let (response, mut stream) = send.send_request(request, false).expect("headers");
    stream.send_data(Bytes::copy_from_slice(&framed[..sent]), false).expect("the first bytes");
    let ending = tokio::time::timeout(Duration::from_secs(15), finish(response))
        .await
        .unwrap_or_else(|_| Ending::Broken("no answer within 15 s".to_owned()));
    drop(stream);
    (ending, started.elapsed())
}

fn slow_and_silent_clients_time_out(version: EtcdVersion) {
    let flags = ["--handshake-timeout=1s", "--idle-connection-timeout=2s", "--request-body-timeout=1s"];
    let deployment = Deployment::start(version, 1, Wire::Plain, &flags);
    let addr = deployment.proxy.listen_addr();
    let direct_addr = deployment.cluster.client_addrs()[0];
    let pki_dir = tempfile::tempdir().expect("pki dir");
    let pki = DevPki::create(pki_dir.path(), "listener").expect("pki");
    let mut tls_args = vec![
        format!("--endpoints={}", deployment.cluster.client_endpoints_csv()),
        format!("--cert-file={}", pki.server_cert.display()),
        format!("--key-file={}", pki.server_key.display()),
    ];
    tls_args.extend(flags.iter().map(|flag| flag.to_string()));
    let tls_proxy = start_proxy(tls_args);

    let silent = thread::spawn(move || closed_after(addr, b""));
    let half_preface = thread::spawn(move || closed_after(addr, b"PRI * HTTP/2.0\r\n"));
    let no_pings = thread::spawn(move || silent_after_settings(addr));
    let runtime = runtime();
    let tls_addr = tls_proxy.listen_addr();
    let framed = range_body("/timeouts/k");
    let (tls, idle, stalled_in_prefix, stalled_in_message, trickled, trickled_direct) = runtime.block_on(async {
        let tls = tls_silent_closed_after(tls_addr, &pki.ca_cert);
        let idle = async {
            let mut h2 = h2_connect(addr).await;
            tokio::time::sleep(Duration::from_secs(6)).await;
            let still_open = !h2.driver.is_finished();
            (
                still_open,
                call(
                    &mut h2,
                    "/etcdserverpb.KV/Range",
                    &[],
                    &RangeRequest { key: Bytes::from_static(b"/timeouts/k"), ..Default::default() }.encode_to_vec(),
                )
                .await,
            )
        };
        let stalled_in_prefix = stalled_range(addr, &framed, 3);
        let stalled_in_message = stalled_range(addr, &framed, 5 + 3);
        let slow = Duration::from_millis(700);
        let trickled = trickled_range(addr, &[("grpc-timeout", "3S")], framed.clone(), slow);
        let trickled_direct = trickled_range(direct_addr, &[("grpc-timeout", "3S")], framed.clone(), slow);
        tokio::join!(tls, idle, stalled_in_prefix, stalled_in_message, trickled, trickled_direct)
    });
    let silent = silent.join().expect("silent probe");
    let half_preface = half_preface.join().expect("half-preface probe");
    let (ping, no_pings_closed, frames) = no_pings.join().expect("no-pings probe");
    eprintln!(
        "silent {silent:?}, half preface {half_preface:?}, TLS {tls:?}, no PING answers: ping {ping:?} closed {no_pings_closed:?} {frames:?}"
    );
    eprintln!("idle h2: {idle:?}");
    eprintln!("stalled in prefix {stalled_in_prefix:?}\nstalled in message {stalled_in_message:?}");
    eprintln!("trickled {trickled:?}\ntrickled directly {trickled_direct:?}");

    let handshake = (Duration::from_millis(500), Duration::from_secs(4));
    assert_about("TCP connection sending nothing", silent, handshake.0, handshake.1);
    assert_about("half a preface", half_preface, handshake.0, handshake.1);
    assert_about("TLS connection sending nothing after the handshake", tls, handshake.0, handshake.1);
    // Idle for 2 s, then a PING, then 2 s for its answer.
    let ping = ping.unwrap_or_else(|| panic!("no PING within 10 s of silence; frames {frames:?}"));
    assert!(ping >= Duration::from_millis(1500) && ping < Duration::from_secs(4), "first PING after {ping:?}");
    assert_about("connection not answering PINGs", no_pings_closed, ping, Duration::from_secs(8));

    let (still_open, range) = idle;
    assert!(still_open, "the h2 client's connection ended while idle");
    assert_eq!(range.status("Range after 6 s idle"), ("0".to_owned(), String::new()));

    for (what, (ending, took)) in
        [("3 bytes of the prefix", stalled_in_prefix), ("prefix and 3 bytes", stalled_in_message)]
    {
        let (code, message) = ending.status(what);
        assert_eq!(code, DEADLINE_EXCEEDED, "{what}: {message}");
        assert!(message.starts_with("etcd-compat-proxy:"), "{what}: {message}");
        assert!(message.contains("--request-body-timeout"), "{what}: {message}");
        assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(4), "{what}: answered after {took:?}");
    }

    let (direct, direct_took) = trickled_direct;
    let (proxied, proxied_took) = trickled;
    assert_eq!(
        direct.status("trickled directly"),
        (DEADLINE_EXCEEDED.to_owned(), "context deadline exceeded".to_owned())
    );
    assert_eq!(proxied.status("trickled through the proxy"), direct.status("trickled directly"));
    for (what, took) in [("directly", direct_took), ("through the proxy", proxied_took)] {
        assert!(
            took >= Duration::from_millis(2500) && took < Duration::from_secs(5),
            "trickled {what}: answered after {took:?}, expected about 3 s"
        );
    }
    etcdctl_still_works(&deployment, "timeouts");
}

both_versions!(
    slow_and_silent_clients_time_out => slow_and_silent_clients_time_out_3_4, slow_and_silent_clients_time_out_3_5
);

/// A single member behind a proxy that holds at most 4 MiB of request messages and cuts off a
/// message that stops arriving for 2 s.
fn deployment_with_little_request_memory() -> Deployment {
    Deployment::start(
        EtcdVersion::V3_5,
        1,
        Wire::Plain,
        &["--max-held-request-bytes=4194304", "--request-body-timeout=2s"],
    )
}

/// `etcd_compat_proxy_held_request_bytes` now.
fn held_request_bytes(proxy: &ProxyProcess) -> f64 {
    metric(&proxy.http_get("/metrics").1, "etcd_compat_proxy_held_request_bytes").expect("gauge")
}

/// Opens a stream to each of `paths` on `h2`, `pause` apart, and sends all of `framed` but its
/// last 1000 bytes on each: the streams, kept open, and their endings to come.
async fn send_all_but_the_end(
    h2: &H2,
    paths: &[&str],
    framed: &[u8],
    pause: Duration,
) -> (Vec<SendStream<Bytes>>, Vec<JoinHandle<Ending>>) {
    let mut streams = Vec::new();
    let mut endings = Vec::new();
    for path in paths {
        let mut send = h2.send.clone().ready().await.expect("ready");
        let (response, mut stream) = send.send_request(grpc_request(h2.addr, path, &[]), false).expect("headers");
        stream.send_data(Bytes::copy_from_slice(&framed[..framed.len() - 1000]), false).expect("most of the message");
        streams.push(stream);
        endings.push(tokio::spawn(finish(response)));
        tokio::time::sleep(pause).await;
    }
    (streams, endings)
}

/// Six streams on one connection, each with a 1.5 MB Put of which the client sent all but the
/// last 1000 bytes and then nothing: what the proxy holds of them stays under
/// `--max-held-request-bytes` in sum (read before, it was all 9 MB: and as much again for each
/// further stream), those that found no room are told why, another client's small write goes
/// through once the stalled ones are cut off, and nothing stays counted.
#[test]
fn held_request_messages_are_bounded_in_sum() {
    const LIMIT: f64 = 4.0 * 1024.0 * 1024.0;
    let deployment = deployment_with_little_request_memory();
    let put =
        PutRequest { key: Bytes::from_static(b"/held/big"), value: vec![b'v'; 1_500_000].into(), ..Default::default() };
    let framed = grpc_frame(&put.encode_to_vec());
    let runtime = runtime();
    let (endings, held_while_stalled, small_put) = runtime.block_on(async {
        let h2 = h2_connect(deployment.proxy.listen_addr()).await;
        let (streams, answers) = send_all_but_the_end(&h2, &["/etcdserverpb.KV/Put"; 6], &framed, Duration::ZERO).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let held_while_stalled = tokio::task::block_in_place(|| held_request_bytes(&deployment.proxy));
        let mut client = connect(&deployment.endpoint).await;
        let small_put = tokio::time::timeout(Duration::from_secs(15), client.put("/held/small", "v", None)).await;
        let mut endings = Vec::new();
        for answer in answers {
            endings.push(answer.await.expect("answer"));
        }
        drop(streams);
        (endings, held_while_stalled, small_put)
    });
    eprintln!("held while stalled: {held_while_stalled}; endings: {endings:?}");
    assert!(held_while_stalled <= LIMIT && held_while_stalled > 3_000_000.0, "held {held_while_stalled}");
    small_put.expect("the small put got room within 15 s").expect("the small put succeeds");
    let stalled = (
        "4".to_owned(),
        "etcd-compat-proxy: the request message stopped arriving: nothing for 2s (--request-body-timeout); send each \
         message whole"
            .to_owned(),
    );
    let no_room = (
        "14".to_owned(),
        "etcd-compat-proxy: the request messages the proxy holds reached --max-held-request-bytes (4194304 bytes) and \
         this one found no room within 2s; nothing was sent to etcd, so it is safe to retry; if this is no flood of \
         large requests, raise --max-held-request-bytes"
            .to_owned(),
    );
    let statuses: Vec<_> = endings.iter().map(|ending| ending.status("stalled Put")).collect();
    assert!(statuses.iter().all(|status| *status == stalled || *status == no_room), "{statuses:?}");
    assert!(statuses.contains(&stalled) && statuses.contains(&no_room), "{statuses:?}");
    let metrics = deployment.proxy.http_get("/metrics").1;
    let refused = |reason: &str| {
        metric(&metrics, &format!("etcd_compat_proxy_requests_refused_total{{reason=\"{reason}\"}}")).expect("refusals")
    };
    let count = |status: &(String, String)| statuses.iter().filter(|s| *s == status).count() as f64;
    assert_eq!((refused("stalled"), refused("memory_full")), (count(&stalled), count(&no_room)));
    assert_eq!(metric(&metrics, "etcd_compat_proxy_held_request_bytes"), Some(0.0));
    assert_eq!(metric(&metrics, "etcd_compat_proxy_held_request_bytes_limit"), Some(LIMIT));
}

/// Watch and keep-alive streams count the messages they hold unread in the same memory: a
/// Watch, a LeaseKeepAlive and another Watch stream each send most of a 1.5 MB message; the
/// first two fit under 4 MiB, the third stream is ended at once with a status that says why,
/// and once the others are cut off as stalled nothing stays counted.
#[test]
fn stream_messages_count_in_the_same_memory() {
    let deployment = deployment_with_little_request_memory();
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: vec![b'k'; 1_500_000].into(),
            ..Default::default()
        })),
    };
    let framed = grpc_frame(&create.encode_to_vec());
    let runtime = runtime();
    let (endings, held_meanwhile) = runtime.block_on(async {
        let h2 = h2_connect(deployment.proxy.listen_addr()).await;
        let paths = ["/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive", "/etcdserverpb.Watch/Watch"];
        let (streams, endings) = send_all_but_the_end(&h2, &paths, &framed, Duration::from_millis(300)).await;
        let held_meanwhile = tokio::task::block_in_place(|| held_request_bytes(&deployment.proxy));
        let mut ended = Vec::new();
        for ending in endings {
            ended.push(ending.await.expect("ending"));
        }
        drop(streams);
        (ended, held_meanwhile)
    });
    eprintln!("held meanwhile: {held_meanwhile}; endings: {endings:?}");
    let expected_held = 2.0 * (framed.len() - 1000) as f64;
    assert_eq!(held_meanwhile, expected_held);
    assert_eq!(
        endings[2].status("third stream"),
        (
            "14".to_owned(),
            "etcd-compat-proxy: the request messages the proxy holds reached --max-held-request-bytes (4194304 bytes) \
             and this stream's next message found no room; the messages before it reached etcd; open the stream \
             again, and if this is no flood of large requests, raise --max-held-request-bytes"
                .to_owned()
        )
    );
    let metrics = deployment.proxy.http_get("/metrics").1;
    assert_eq!(metric(&metrics, "etcd_compat_proxy_requests_refused_total{reason=\"memory_full\"}"), Some(1.0));
    assert_eq!(metric(&metrics, "etcd_compat_proxy_held_request_bytes"), Some(0.0));
}

/// A watch client behind on its answers, with the start of its next request already read: the
/// proxy stops reading it (as etcd stops reading such a client), and the rest of the request,
/// sent meanwhile, waits unread for as long as the client does not read. That wait is the
/// proxy's, not a stall of the client's: once the client reads again, the request is taken and
/// answered and the stream goes on. Before, the stream was cut off as stalled after
/// `--request-body-timeout`.
#[test]
fn a_watch_client_the_proxy_stops_reading_is_not_called_stalled() {
    const PUTS: usize = 40;
    let deployment = Deployment::start(
        EtcdVersion::V3_5,
        1,
        Wire::Plain,
        &["--request-body-timeout=2s", "--max-buffered-response-bytes=65536"],
    );
    let addr = deployment.proxy.listen_addr();
    let runtime = runtime();
    runtime.block_on(async {
        let mut client = connect(&deployment.endpoint).await;
        let mut revisions = Vec::new();
        for i in 0..PUTS {
            let put = client.put(format!("/behind/{i:02}"), vec![b'v'; 4096], None).await.expect("put");
            revisions.push(put.header().expect("header").revision());
        }
        let create = |key: &'static [u8], range_end: &'static [u8], start_revision: i64| {
            grpc_frame(
                &WatchRequest {
                    request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                        key: Bytes::from_static(key),
                        range_end: Bytes::from_static(range_end),
                        start_revision,
                        ..Default::default()
                    })),
                }
                .encode_to_vec(),
            )
        };
        // 160 KiB of past events for a client that reads nothing yet, and most of a second create.
        let history = create(b"/behind/", b"/behind0", revisions[0]);
        let second = create(b"/later/", b"/later0", 0);
        let mut builder = h2::client::Builder::new();
        builder.initial_window_size(0).initial_connection_window_size(64 * MIB as u32);
        let h2 = h2_connect_with(addr, builder).await;
        let mut send = h2.send.clone().ready().await.expect("ready");
        let (response, mut stream) =
            send.send_request(grpc_request(addr, "/etcdserverpb.Watch/Watch", &[]), false).expect("open the stream");
        let mut first = history.clone();
        first.extend_from_slice(&second[..second.len() - 3]);
        stream.send_data(Bytes::from(first), false).expect("the first create and most of the second");

        // Once the client is behind, the proxy stops reading it; the rest of the create waits.
        let behind_since = Instant::now();
        loop {
            let metrics = tokio::task::block_in_place(|| deployment.proxy.http_get("/metrics").1);
            let pauses = metric(&metrics, "etcd_compat_proxy_stream_pauses_total").unwrap_or(0.0);
            let detached = metric(&metrics, "etcd_compat_proxy_watch_detached_total").unwrap_or(0.0);
            if pauses + detached >= 1.0 {
                break;
            }
            assert!(behind_since.elapsed() < Duration::from_secs(1), "the watch stream was not paused within 1 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stream.send_data(Bytes::copy_from_slice(&second[second.len() - 3..]), false).expect("the rest");
        tokio::time::sleep(Duration::from_secs(5)).await;

        h2.window.send(16 * MIB as u32).expect("the connection is still driven");
        let response =
            tokio::time::timeout(Duration::from_secs(5), response).await.expect("response headers").expect("response");
        let mut body = response.into_body();
        let mut messages = GrpcMessages::new();
        let mut seen: Vec<(i64, bool, Vec<i64>)> = Vec::new();
        let mut later_put = false;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !seen.iter().any(|(id, _, events)| *id == 1 && !events.is_empty()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = match tokio::time::timeout(left, body.data()).await {
                Ok(Some(Ok(chunk))) => chunk,
                Ok(None) => {
                    let trailers = body.trailers().await.ok().flatten();
                    panic!("the stream ended after {seen:?}: {trailers:?}")
                }
                Ok(Some(Err(error))) => panic!("the stream failed after {seen:?}: {error}"),
                Err(_) => panic!("no more answers within 20 s after {seen:?}"),
            };
            body.flow_control().release_capacity(chunk.len()).expect("release capacity");
            messages.push(&chunk);
            while let Some(message) = messages.next_message() {
                let watch = WatchResponse::decode(&message[..]).expect("a WatchResponse");
                assert!(!watch.canceled, "watch {} canceled: {}", watch.watch_id, watch.cancel_reason);
                let events = watch.events.iter().map(|event| event.kv.as_ref().expect("kv").mod_revision).collect();
                seen.push((watch.watch_id, watch.created, events));
            }
            if !later_put && seen.iter().any(|(id, created, _)| *id == 1 && *created) {
                later_put = true;
                client.put("/later/k", "v", None).await.expect("put /later/k");
            }
        }
        let created: Vec<i64> = seen.iter().filter(|(_, created, _)| *created).map(|(id, _, _)| *id).collect();
        assert_eq!(created, vec![0, 1], "created answers in order");
        let history_events: Vec<i64> =
            seen.iter().filter(|(id, _, _)| *id == 0).flat_map(|(_, _, events)| events.clone()).collect();
        assert_eq!(history_events, revisions, "every past event once, in order");
        let metrics = deployment.proxy.http_get("/metrics").1;
        assert_eq!(metric(&metrics, "etcd_compat_proxy_requests_refused_total{reason=\"stalled\"}"), Some(0.0));
        drop(stream);
    });
}

/// The Unavailable refusal of a read whose answer of `length` bytes found no room among the
/// answers held for clients (`--max-held-response-bytes=4194309`).
fn no_room_for_answer(length: usize) -> String {
    format!(
        "etcd-compat-proxy: the answers the proxy holds for clients that have not taken them reached \
         --max-held-response-bytes (4194309 bytes), so this answer of {length} bytes was not kept; the call changed \
         nothing, so it is safe to retry; connections that take nothing for --unread-response-timeout are closed, \
         which frees their room; if clients are reading, raise --max-held-response-bytes"
    )
}

/// `etcd_compat_proxy_held_response_bytes` of `proxy` now.
fn held_response_bytes(proxy: &ProxyProcess) -> Option<f64> {
    metric(&proxy.http_get("/metrics").1, "etcd_compat_proxy_held_response_bytes")
}

/// Client connections `proxy` closed for taking nothing of what waited for them.
fn connections_closed_unread(proxy: &ProxyProcess) -> Option<f64> {
    metric(
        &proxy.http_get("/metrics").1,
        "etcd_compat_proxy_client_connections_closed_total{reason=\"response_unread\"}",
    )
}

/// A client that takes none of its answers (its stream windows stay shut, though its connection
/// is alive) asks for a 1 MB value twelve times on one connection. What the proxy holds for it
/// stays under `--max-held-response-bytes` (before, it held all twelve answers, and as much again
/// for every further call), the reads that found no room are refused saying why, and after
/// `--unread-response-timeout` its connection is closed, which gives everything back. A client
/// that reads slowly, a piece at a time, gets its whole answer and keeps its connection.
#[test]
fn answers_nobody_takes_are_bounded_in_sum_and_their_connection_closed() {
    const CALLS: usize = 12;
    const HELD: usize = 4;
    const UNREAD_TIMEOUT: Duration = Duration::from_secs(5);
    const PIECE: usize = 64 * 1024;
    let deployment = Deployment::start(
        EtcdVersion::V3_5,
        1,
        Wire::Plain,
        &["--max-held-response-bytes=4194309", "--unread-response-timeout=5s"],
    );
    let addr = deployment.proxy.listen_addr();
    let held_bytes = || held_response_bytes(&deployment.proxy);
    let closed_unread = || connections_closed_unread(&deployment.proxy);
    let runtime = runtime();
    runtime.block_on(async {
        let mut client = connect(&deployment.endpoint).await;
        client.put("/unread/big", vec![b'u'; 1_000_000], None).await.expect("put the large value");
        client.put("/unread/small", "s", None).await.expect("put the small value");
        let mut reader = h2_connect(addr).await;
        let read = call(&mut reader, "/etcdserverpb.KV/Range", &[], &range_body("/unread/big")[5..]).await;
        let length = read.answer("a read with room").messages[0].len() + 5;

        let mut builder = h2::client::Builder::new();
        builder.initial_window_size(0).initial_connection_window_size(64 * MIB as u32);
        let hog = h2_connect_with(addr, builder).await;
        let started = Instant::now();
        let mut endings = Vec::new();
        for _ in 0..CALLS {
            let mut send = hog.send.clone().ready().await.expect("ready");
            let request = grpc_request(addr, "/etcdserverpb.KV/Range", &[]);
            let (response, mut stream) = send.send_request(request, false).expect("headers");
            stream.send_data(Bytes::from(range_body("/unread/big")), true).expect("the request");
            endings.push(tokio::spawn(finish(response)));
        }
        // Four answers fit; the other reads are refused at once.
        let refused_by = Instant::now() + Duration::from_secs(4);
        while endings.iter().filter(|ending| ending.is_finished()).count() < CALLS - HELD {
            assert!(Instant::now() < refused_by, "the reads without room were not refused within 4 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut held = Vec::new();
        for ending in endings {
            match ending.is_finished() {
                true => assert_eq!(
                    ending.await.expect("ending").status("a read without room"),
                    ("14".to_owned(), no_room_for_answer(length))
                ),
                false => held.push(ending),
            }
        }
        assert_eq!(held.len(), HELD);
        // Each holds all but the piece the connection took while waiting for the window.
        let expected_held = (HELD * (length - PIECE)) as f64;
        let settled_by = Instant::now() + Duration::from_secs(2);
        while tokio::task::block_in_place(held_bytes) != Some(expected_held) && Instant::now() < settled_by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(tokio::task::block_in_place(held_bytes), Some(expected_held));

        // Meanwhile others are served when their answers fit, and told why when they do not.
        let small = client.get("/unread/small", None).await.expect("a small read while the memory is full");
        assert_eq!(small.kvs()[0].value(), b"s");
        assert_eq!(
            grpc_status(client.get("/unread/big", None).await),
            ("Unavailable".to_owned(), no_room_for_answer(length))
        );
        // A Txn that only reads is a read; a write's answer is delivered in any case.
        let reading = etcd_client::Txn::new().and_then([etcd_client::TxnOp::get("/unread/big", None)]);
        let (code, message) = grpc_status(client.txn(reading).await);
        assert_eq!(code, "Unavailable");
        let before_length = "etcd-compat-proxy: the answers the proxy holds for clients that have not taken them \
                             reached --max-held-response-bytes (4194309 bytes), so this answer of ";
        assert!(message.starts_with(before_length), "{message}");
        let rewrite = etcd_client::PutOptions::new().with_prev_key();
        let rewritten = client.put("/unread/big", vec![b'u'; 1_000_000], Some(rewrite)).await.expect("a write");
        assert_eq!(rewritten.prev_key().expect("the previous value").value().len(), 1_000_000);

        let closed_by = started + UNREAD_TIMEOUT + Duration::from_secs(4);
        while tokio::task::block_in_place(closed_unread) != Some(1.0) {
            assert!(Instant::now() < closed_by, "the connection taking nothing was not closed in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = started.elapsed();
        assert!(took >= UNREAD_TIMEOUT, "closed after {took:?}, before --unread-response-timeout");
        for ending in held {
            let ending = tokio::time::timeout(Duration::from_secs(5), ending).await.expect("ended").expect("ending");
            assert!(!matches!(ending, Ending::Answer(_)), "an answer arrived through a shut window: {ending:?}");
        }
        assert_eq!(tokio::task::block_in_place(held_bytes), Some(0.0));
        let big = client.get("/unread/big", None).await.expect("a large read once the room is back");
        assert_eq!(big.kvs()[0].value().len(), 1_000_000);
        let metrics = deployment.proxy.http_get("/metrics").1;
        let refused = (CALLS - HELD + 2) as f64;
        assert_eq!(
            metric(&metrics, "etcd_compat_proxy_requests_refused_total{reason=\"response_memory_full\"}"),
            Some(refused)
        );

        // A slow reader, whose 64 KiB window the proxy fills and then waits 2 s (under the 5 s
        // timeout) after every 256 KiB, takes longer than the timeout in all and keeps going.
        let mut builder = h2::client::Builder::new();
        builder.initial_window_size(PIECE as u32).initial_connection_window_size(64 * MIB as u32);
        let slow = h2_connect_with(addr, builder).await;
        let mut send = slow.send.clone().ready().await.expect("ready");
        let request = grpc_request(addr, "/etcdserverpb.KV/Range", &[]);
        let (response, mut stream) = send.send_request(request, false).expect("headers");
        stream.send_data(Bytes::from(range_body("/unread/big")), true).expect("the request");
        let mut body = response.await.expect("response headers").into_body();
        let (mut received, mut since_pause) = (0, 0);
        let reading_since = Instant::now();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("a piece of the slow reader's answer");
            received += chunk.len();
            since_pause += chunk.len();
            if since_pause >= 256 * 1024 {
                since_pause = 0;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            body.flow_control().release_capacity(chunk.len()).expect("release");
        }
        assert!(reading_since.elapsed() > UNREAD_TIMEOUT, "the slow reader was not slower than the timeout");
        let trailers = body.trailers().await.expect("trailers").expect("a status");
        assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
        assert_eq!(received, length);
        assert_eq!(tokio::task::block_in_place(closed_unread), Some(1.0), "the slow reader was closed");
        drop((hog, slow, stream));
    });
}

/// A client that takes nothing of an answer too large to be read whole, which the proxy relays
/// under flow control (and which thus holds its member connection's window), has its
/// connection closed after `--unread-response-timeout` as well; another client's reads on the
/// same member go on.
#[test]
fn a_streamed_answer_nobody_takes_closes_its_connection() {
    const UNREAD_TIMEOUT: Duration = Duration::from_secs(2);
    let deployment = Deployment::start(
        EtcdVersion::V3_4,
        1,
        Wire::Plain,
        &["--max-buffered-response-bytes=65536", "--unread-response-timeout=2s"],
    );
    let addr = deployment.proxy.listen_addr();
    let closed_unread = || connections_closed_unread(&deployment.proxy);
    let runtime = runtime();
    runtime.block_on(async {
        let mut client = connect(&deployment.endpoint).await;
        client.put("/streamed/big", vec![b's'; 1_000_000], None).await.expect("put the large value");
        let mut builder = h2::client::Builder::new();
        builder.initial_window_size(0).initial_connection_window_size(64 * MIB as u32);
        let stuck = h2_connect_with(addr, builder).await;
        let mut send = stuck.send.clone().ready().await.expect("ready");
        let (response, mut stream) =
            send.send_request(grpc_request(addr, "/etcdserverpb.KV/Range", &[]), false).expect("headers");
        stream.send_data(Bytes::from(range_body("/streamed/big")), true).expect("the request");
        let started = Instant::now();
        let ending = tokio::spawn(finish(response));
        let mut other = h2_connect(addr).await;
        let read = call(&mut other, "/etcdserverpb.KV/Range", &[], &range_body("/streamed/big")[5..]).await;
        assert_eq!(read.answer("another client's read").messages.len(), 1);
        while tokio::task::block_in_place(closed_unread) != Some(1.0) {
            assert!(started.elapsed() < UNREAD_TIMEOUT + Duration::from_secs(4), "not closed in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(started.elapsed() >= UNREAD_TIMEOUT, "closed after {:?}", started.elapsed());
        let ending = tokio::time::timeout(Duration::from_secs(5), ending).await.expect("ended").expect("ending");
        assert!(!matches!(ending, Ending::Answer(_)), "an answer arrived through a shut window: {ending:?}");
        drop((stuck, stream));
    });
}

// ---------------------------------------------------------------------------------------------
// 6. Login throttling.

const ROOT_PASSWORD: &str = "root-pw-8f2c";

/// A 1-member cluster with auth on (user root) behind the proxy.
fn auth_deployment(version: EtcdVersion, proxy_args: &[&str]) -> Deployment {
    let deployment = Deployment::start_with(ClusterSpec::new(version, 1), Wire::Plain, proxy_args);
    deployment.cluster.etcdctl_ok(&["put", "/auth/k", "secret-value"]);
    deployment.cluster.etcdctl_ok(&["user", "add", &format!("root:{ROOT_PASSWORD}")]);
    deployment.cluster.etcdctl_ok(&["auth", "enable"]);
    deployment
}

fn failed_login() -> (String, String) {
    ("InvalidArgument".to_owned(), "etcdserver: authentication failed, invalid user ID or password".to_owned())
}

/// 30 wrong passwords from one address cost at least the delay schedule (3 free, then 100 ms,
/// doubling, capped at `--max-login-delay`): serially, and just as much in parallel.
#[test]
fn password_guessing_is_slowed_down_serially_and_in_parallel() {
    const ATTEMPTS: usize = 30;
    // 3 free, 100 ms, then 26 at the 200 ms cap.
    const SCHEDULE: Duration = Duration::from_millis(100 + 26 * 200);
    let deployment = auth_deployment(EtcdVersion::V3_4, &["--max-login-delay=200ms"]);
    let runtime = runtime();
    runtime.block_on(async {
        let client = connect(&deployment.endpoint).await;
        let auth = client.auth_client();
        let started = Instant::now();
        let serial = async {
            for i in 0..ATTEMPTS {
                let answer = auth.clone().authenticate("root".to_owned(), format!("wrong-{i}")).await;
                assert_eq!(grpc_status(answer), failed_login(), "serial attempt {i}");
            }
        };
        // Each attempt also costs etcd a bcrypt check (about 100 ms here, more under load); uncapped
        // 5 s delays would take about 110 s, so the cap is part of what is tested.
        tokio::time::timeout(Duration::from_secs(60), serial).await.expect("30 serial attempts within 60 s");
        let serial_took = started.elapsed();

        auth.clone().authenticate("root".to_owned(), ROOT_PASSWORD.to_owned()).await.expect("the right password");

        let started = Instant::now();
        let mut attempts = Vec::new();
        for i in 0..ATTEMPTS {
            let mut auth = auth.clone();
            attempts
                .push(tokio::spawn(async move { auth.authenticate("root".to_owned(), format!("guess-{i}")).await }));
        }
        for (i, attempt) in attempts.into_iter().enumerate() {
            let answer = tokio::time::timeout(Duration::from_secs(60), attempt)
                .await
                .expect("30 parallel attempts within 60 s")
                .expect("attempt task");
            assert_eq!(grpc_status(answer), failed_login(), "parallel attempt {i}");
        }
        let parallel_took = started.elapsed();
        eprintln!("30 wrong passwords: serially {serial_took:?}, in parallel {parallel_took:?}");
        assert!(serial_took >= SCHEDULE, "30 serial wrong passwords took only {serial_took:?}");
        assert!(parallel_took >= SCHEDULE, "30 parallel wrong passwords took only {parallel_took:?}");
    });
    let user = format!("--user=root:{ROOT_PASSWORD}");
    let version = EtcdVersion::V3_4;
    assert_eq!(etcdctl_ok(version, &deployment.endpoint, None, &[&user, "put", "/after-guessing", "v"]), "OK\n");
    assert_eq!(
        etcdctl_ok(version, &deployment.endpoint, None, &[&user, "get", "/after-guessing"]),
        "/after-guessing\nv\n"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Configuration.

#[test]
fn unusable_settings_exit_with_code_2() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    let metrics = format!("--metrics-addr=http://127.0.0.1:{}", free_port().expect("port"));
    let (code, stderr) =
        run_proxy(&["start", "--endpoints=127.0.0.1:2379", &format!("--listen-addr={taken_addr}"), &metrics]);
    assert_eq!(code, Some(2), "listen address in use: {stderr}");
    assert!(stderr.contains(&taken_addr), "{stderr}");
    assert!(stderr.contains("is another process using the port?"), "{stderr}");

    let port = free_port().expect("port");
    let listen = format!("--listen-addr=127.0.0.1:{port}");
    let cases: [(&[&str], &str); 2] = [
        (
            &["start", "--endpoints=127.0.0.1:99999", &listen, &metrics],
            "invalid --endpoints \"127.0.0.1:99999\": the port must be a number from 1 to 65535",
        ),
        (
            &["start", "--max-concurrent-streams=0", &listen, &metrics],
            "invalid --max-concurrent-streams \"0\": must be at least 1",
        ),
    ];
    for (args, expected) in cases {
        let (code, stderr) = run_proxy(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in {stderr:?}");
    }
    // Refused before anything was bound.
    TcpListener::bind(("127.0.0.1", port)).expect("the listen port was never bound");
}

// ---------------------------------------------------------------------------------------------
// 8. Tokens in `authorization` metadata.

async fn authenticate(h2: &mut H2) -> String {
    let request = AuthenticateRequest { name: "root".to_owned(), password: ROOT_PASSWORD.to_owned() };
    let ending = call(h2, "/etcdserverpb.Auth/Authenticate", &[], &request.encode_to_vec()).await;
    assert_eq!(ending.status("Authenticate"), ("0".to_owned(), String::new()));
    let answer = ending.answer("Authenticate");
    AuthenticateResponse::decode(&answer.messages[0][..]).expect("AuthenticateResponse").token
}

/// A Range of `/auth/k` with `metadata`: `Ok(value)` or `Err((grpc-status, grpc-message))`.
async fn range_with(h2: &mut H2, metadata: &[(&str, &str)]) -> Result<String, (String, String)> {
    let request = RangeRequest { key: Bytes::from_static(b"/auth/k"), ..Default::default() };
    let ending = call(h2, "/etcdserverpb.KV/Range", metadata, &request.encode_to_vec()).await;
    match ending.status("Range") {
        (code, _) if code == "0" => {
            let answer = ending.answer("Range");
            let range = RangeResponse::decode(&answer.messages[0][..]).expect("RangeResponse");
            Ok(String::from_utf8_lossy(&range.kvs[0].value).into_owned())
        }
        failed => Err(failed),
    }
}

/// etcd accepts its tokens as `authorization` as well as `token`; the proxy treats
/// `authorization` exactly like `token`: only its own tokens, never etcd's.
fn authorization_metadata_is_a_proxy_token(version: EtcdVersion) {
    let deployment = auth_deployment(version, &[]);
    let direct_addr = deployment.cluster.client_addrs()[0];
    let proxy_addr = deployment.proxy.listen_addr();
    let runtime = runtime();
    runtime.block_on(async {
        let mut direct = h2_connect(direct_addr).await;
        let mut proxied = h2_connect(proxy_addr).await;
        let etcd_token = authenticate(&mut direct).await;
        let proxy_token = authenticate(&mut proxied).await;
        assert!(proxy_token.starts_with("ecp."), "{proxy_token}");
        let secret = Ok("secret-value".to_owned());
        let invalid = Err((UNAUTHENTICATED.to_owned(), "etcdserver: invalid auth token".to_owned()));

        assert_eq!(range_with(&mut direct, &[("authorization", &etcd_token)]).await, secret, "etcd token directly");
        assert_eq!(range_with(&mut direct, &[("token", &etcd_token)]).await, secret, "etcd token directly");
        assert_eq!(
            range_with(&mut proxied, &[("authorization", &etcd_token)]).await,
            invalid,
            "etcd token as authorization through the proxy"
        );
        assert_eq!(
            range_with(&mut proxied, &[("token", &etcd_token)]).await,
            invalid,
            "etcd token as token through the proxy"
        );
        assert_eq!(
            range_with(&mut proxied, &[("authorization", &proxy_token)]).await,
            secret,
            "proxy token as authorization"
        );
        assert_eq!(range_with(&mut proxied, &[("token", &proxy_token)]).await, secret, "proxy token as token");
    });
}

both_versions!(
    authorization_metadata_is_a_proxy_token
        => authorization_metadata_is_a_proxy_token_3_4, authorization_metadata_is_a_proxy_token_3_5
);

/// One DATA frame carrying 40 000 keep-alives, each for another (unknown) lease: the proxy takes
/// them without holding up any other client. Each was looked up among all the others before, a
/// quadratic scan that kept the proxy's event loop busy for seconds.
#[test]
fn a_frame_of_forty_thousand_keep_alives_holds_up_nobody() {
    let deployment = Deployment::start(EtcdVersion::V3_5, 1, Wire::Plain, &[]);
    let addr = deployment.proxy.listen_addr();
    let endpoint = deployment.endpoint.clone();
    runtime().block_on(async {
        let mut client = connect(&endpoint).await;
        client.put("k", "v", None).await.expect("put");
        let h2 = h2_connect(addr).await;
        let mut payload = Vec::new();
        for lease in 1..=40_000i64 {
            payload.extend(grpc_frame(&LeaseKeepAliveRequest { id: lease }.encode_to_vec()));
        }
        assert!(payload.len() < 1024 * 1024, "one frame of the proxy's largest: {}", payload.len());
        let mut send = h2.send.clone().ready().await.expect("connection ready");
        let request = grpc_request(addr, "/etcdserverpb.Lease/LeaseKeepAlive", &[]);
        let (_response, mut stream) = send.send_request(request, false).expect("open the keep-alive stream");
        stream.send_data(Bytes::from(payload), false).expect("send the frame");
        for n in 0..20 {
            // The scan before held the proxy longer than this (this test failed on it); taking
            // the frame now costs a fraction of it.
            tokio::time::timeout(Duration::from_secs(2), client.get("k", None))
                .await
                .unwrap_or_else(|_| panic!("get {n}: no answer within 2 s while the proxy took the frame"))
                .expect("get");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(stream);
    });
}

/// Watch streams whose client takes nothing are bounded together, not only one by one: etcd's
/// messages waiting for clients count in `--max-held-response-bytes`, and once that is full a
/// stream more than 64 KiB behind takes no more of etcd's data: moved off its shared watches
/// (with `--watch-coalescing`), or its own upstream watches paused (without), to resume from its
/// next revision. The connection that takes nothing is closed after `--unread-response-timeout`,
/// which gives everything back. Meanwhile a client that reads gets every event of its watch, once
/// and in order.
#[test]
fn watch_streams_nobody_reads_are_bounded_in_sum_and_their_connection_closed() {
    watch_streams_nobody_reads(true);
}

/// As above, each stream with upstream watches of its own.
#[test]
fn watch_streams_nobody_reads_are_bounded_in_sum_without_coalescing() {
    watch_streams_nobody_reads(false);
}

fn watch_streams_nobody_reads(coalescing: bool) {
    const STREAMS: usize = 8;
    const ROUNDS: usize = 8;
    const VALUE: usize = 64 * 1024;
    const LIMIT: usize = 2 * MIB as usize;
    const UNREAD_TIMEOUT: Duration = Duration::from_secs(5);
    // Each stream gets 512 KiB, under the 1 MiB each may hold; all of them 4 MiB, twice the limit.
    let coalescing_flag = format!("--watch-coalescing={coalescing}");
    let deployment = Deployment::start(
        EtcdVersion::V3_5,
        1,
        Wire::Plain,
        &[
            "--max-buffered-response-bytes=1048576",
            "--max-held-response-bytes=2097152",
            "--unread-response-timeout=5s",
            &coalescing_flag,
        ],
    );
    let addr = deployment.proxy.listen_addr();
    let metrics = || tokio::task::block_in_place(|| deployment.proxy.http_get("/metrics").1);
    let held_bytes = || tokio::task::block_in_place(|| held_response_bytes(&deployment.proxy)).unwrap_or(-1.0);
    let runtime = runtime();
    runtime.block_on(async {
        let mut client = connect(&deployment.endpoint).await;
        let calm = etcd_client::WatchOptions::new().with_prefix();
        let mut calm_events = client.watch("/calm/", Some(calm)).await.expect("the calm watch");

        let mut builder = h2::client::Builder::new();
        builder.initial_window_size(0).initial_connection_window_size(64 * MIB as u32);
        let hog = h2_connect_with(addr, builder).await;
        let mut hog_streams = Vec::new();
        for i in 0..STREAMS {
            let create = WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: Bytes::from(format!("/flood/{i}/")),
                    range_end: Bytes::from(format!("/flood/{i}0")),
                    ..Default::default()
                })),
            };
            let mut send = hog.send.clone().ready().await.expect("ready");
            let request = grpc_request(addr, "/etcdserverpb.Watch/Watch", &[]);
            let (response, mut stream) = send.send_request(request, false).expect("open a watch stream");
            stream.send_data(Bytes::from(grpc_frame(&create.encode_to_vec())), false).expect("the create");
            hog_streams.push((response, stream));
        }
        // Response headers pass a shut window: each stream is answered once its watch is set up.
        let mut hog_bodies = Vec::new();
        for (response, stream) in hog_streams {
            let response = tokio::time::timeout(Duration::from_secs(5), response)
                .await
                .expect("a hog stream answered within 5 s")
                .expect("a hog stream's response");
            hog_bodies.push((response.into_body(), stream));
        }

        let flood_started = Instant::now();
        let mut calm_revisions = Vec::new();
        for round in 0..ROUNDS {
            for i in 0..STREAMS {
                client.put(format!("/flood/{i}/{round}"), vec![b'f'; VALUE], None).await.expect("a flood put");
            }
            let put = client.put(format!("/calm/{round}"), "c", None).await.expect("a calm put");
            calm_revisions.push(put.header().expect("header").revision());
        }

        // Every hog stream takes nothing more until its client reads, although none holds the
        // 1 MiB it may hold alone: moved off its shared watch, or its own watch paused.
        let stopped = match coalescing {
            true => "etcd_compat_proxy_watch_detached_total",
            false => "etcd_compat_proxy_stream_pauses_total",
        };
        let stopped_by = Instant::now() + Duration::from_secs(5);
        loop {
            let metrics = metrics();
            let count = metric(&metrics, stopped).unwrap_or(0.0);
            if count == STREAMS as f64 {
                break;
            }
            assert!(Instant::now() < stopped_by, "{count} of {STREAMS} hog streams stopped ({stopped})");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Held: the limit, and at most a message past 64 KiB in each stream's queue and inbox.
        let held = held_bytes();
        let most = LIMIT + STREAMS * 2 * (64 * 1024 + VALUE + 1024);
        assert!(held >= LIMIT as f64 && held <= most as f64, "held {held} bytes, not within [{LIMIT}, {most}]");

        // The calm watcher got every event, once and in order.
        assert_eq!(revisions_seen(&mut calm_events, ROUNDS).await, calm_revisions, "the calm watcher");

        // The hog's connection is closed once it has taken nothing for the timeout.
        let closed_by = flood_started + UNREAD_TIMEOUT + Duration::from_secs(6);
        while tokio::task::block_in_place(|| connections_closed_unread(&deployment.proxy)) != Some(1.0) {
            assert!(Instant::now() < closed_by, "the connection taking nothing was not closed in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = flood_started.elapsed();
        assert!(took >= UNREAD_TIMEOUT, "closed after {took:?}, before --unread-response-timeout");
        let freed_by = Instant::now() + Duration::from_secs(3);
        while held_bytes() != 0.0 {
            assert!(Instant::now() < freed_by, "still held after the close: {}", held_bytes());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (mut body, _stream) in hog_bodies {
            let received = tokio::time::timeout(Duration::from_secs(5), async {
                let mut received = 0;
                while let Some(Ok(chunk)) = body.data().await {
                    received += chunk.len();
                }
                received
            });
            let received = received.await.expect("the hog's streams end with its connection");
            assert_eq!(received, 0, "a hog stream got data through a shut window");
        }
        let later = client.put("/calm/later", "c", None).await.expect("a later put");
        let response = tokio::time::timeout(Duration::from_secs(5), calm_events.message())
            .await
            .expect("the calm watcher's later event")
            .expect("the calm watch")
            .expect("the calm watch goes on");
        let revisions: Vec<i64> = response.events().iter().map(|e| e.kv().expect("kv").mod_revision()).collect();
        assert_eq!(revisions, vec![later.header().expect("header").revision()]);
    });
}

/// A keep-alive client that takes none of its answers has its connection closed once more than
/// 64 KiB of them has waited `--unread-response-timeout`; what they held is given back, and
/// another client's keep-alives go on.
#[test]
fn a_keep_alive_stream_nobody_reads_closes_its_connection() {
    const KEEP_ALIVES: usize = 3000;
    const UNREAD_TIMEOUT: Duration = Duration::from_secs(2);
    let deployment = Deployment::start(EtcdVersion::V3_4, 1, Wire::Plain, &["--unread-response-timeout=2s"]);
    let addr = deployment.proxy.listen_addr();
    let closed_unread = || tokio::task::block_in_place(|| connections_closed_unread(&deployment.proxy));
    let held_bytes = || tokio::task::block_in_place(|| held_response_bytes(&deployment.proxy));
    runtime().block_on(async {
        let mut client = connect(&deployment.endpoint).await;
        let lease = client.lease_grant(60, None).await.expect("grant").id();
        let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.expect("keep-alive stream");

        let mut builder = h2::client::Builder::new();
        builder.initial_window_size(0).initial_connection_window_size(64 * MIB as u32);
        let hog = h2_connect_with(addr, builder).await;
        let mut payload = Vec::new();
        for _ in 0..KEEP_ALIVES {
            payload.extend(grpc_frame(&LeaseKeepAliveRequest { id: lease }.encode_to_vec()));
        }
        let mut send = hog.send.clone().ready().await.expect("ready");
        let request = grpc_request(addr, "/etcdserverpb.Lease/LeaseKeepAlive", &[]);
        let (_response, mut stream) = send.send_request(request, false).expect("open the keep-alive stream");
        let sent = Instant::now();
        stream.send_data(Bytes::from(payload), false).expect("the keep-alives");

        // The other client's keep-alives are answered meanwhile.
        let (mut kept, mut most_held) = (0, 0.0f64);
        while closed_unread() != Some(1.0) {
            most_held = most_held.max(held_bytes().unwrap_or(0.0));
            assert!(sent.elapsed() < UNREAD_TIMEOUT + Duration::from_secs(4), "the connection was not closed in time");
            keeper.keep_alive().await.expect("send a keep-alive");
            let answer = tokio::time::timeout(Duration::from_secs(2), answers.message())
                .await
                .expect("a keep-alive answered within 2 s")
                .expect("the keep-alive stream")
                .expect("an answer");
            assert_eq!((answer.id(), answer.ttl() > 0), (lease, true));
            kept += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = sent.elapsed();
        assert!(took >= UNREAD_TIMEOUT, "closed after {took:?}, before --unread-response-timeout");
        assert!(kept >= 10, "only {kept} keep-alives of the other client were answered");
        // Answers past the stream's first 64 KiB were counted while they waited.
        assert!(most_held > 0.0 && most_held < (KEEP_ALIVES * 64) as f64, "held at most {most_held} bytes");
        assert_eq!(held_bytes(), Some(0.0));
        keeper.keep_alive().await.expect("a keep-alive after the close");
        let answer = answers.message().await.expect("the keep-alive stream").expect("an answer");
        assert_eq!(answer.id(), lease);
    });
}
