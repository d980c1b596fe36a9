//! Property-based fuzzing of the code that reads bytes a client (or etcd) controls before
//! anything else has checked them: the header-block repair, which reads a client's connection
//! before the HTTP/2 server does; gRPC message framing; and the protobuf walkers that read
//! messages the proxy forwards without decoding.
//!
//! Every property runs `PROPTEST_CASES` cases (proptest's default of 256 in `cargo test`, a few
//! seconds). Longer runs, e.g. before a release:
//! `PROPTEST_CASES=200000 cargo test --release -p etcd-compat-proxy --lib fuzz::`.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use proptest::prelude::*;
use prost::Message;
use tokio::io::AsyncReadExt;

use etcd_compat_proto::etcdserverpb::{Member, MemberListResponse, ResponseHeader, WatchResponse};
use etcd_compat_proto::mvccpb::{Event, KeyValue};

use crate::admin::Metrics;
use crate::grpc::{self, MessageReader};
use crate::listener::authority_repair::AuthorityRepair;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADER_LIST_LIMIT: u32 = 16 * 1024;

/// A client connection's bytes, handed out in pieces of the given sizes.
struct Pieces {
    data: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
    next: usize,
}

impl tokio::io::AsyncRead for Pieces {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let size = self.sizes.get(self.next % self.sizes.len().max(1)).copied().unwrap_or(1).max(1);
        self.next += 1;
        let end = (self.at + size).min(self.data.len()).min(self.at + buf.remaining());
        let at = self.at;
        buf.put_slice(&self.data[at..end]);
        self.at = end;
        std::task::Poll::Ready(Ok(()))
    }
}

/// Runs `input` through the repair layer in pieces; returns what the server would read and the
/// most the layer held at once.
fn repair(input: Vec<u8>, sizes: Vec<usize>) -> (Vec<u8>, usize) {
    let source = Pieces { data: input, at: 0, sizes, next: 0 };
    let mut repaired = AuthorityRepair::new(source, Arc::new(Metrics::default()), HEADER_LIST_LIMIT, Arc::default());
    let mut output = Vec::new();
    let mut held = 0;
    let mut buf = [0u8; 4096];
    loop {
        // The source is always ready, so a read never waits.
        let n = repaired.read(&mut buf).now_or_never().expect("reads from memory never wait").expect("read");
        held = held.max(repaired.held());
        if n == 0 {
            return (output, held);
        }
        output.extend_from_slice(&buf[..n]);
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// One gRPC request as a client's HTTP/2 frames would carry it.
#[derive(Debug, Clone)]
struct Request {
    metadata: Vec<(String, String)>,
    path: &'static str,
    /// Where the header block is cut into HEADERS + CONTINUATION frames.
    cuts: Vec<usize>,
    padding: Option<u8>,
    body: Vec<u8>,
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop::collection::vec(("[a-z][a-z-]{0,11}", "[ -~]{0,120}"), 0..6),
        prop::sample::select(vec![
            "/etcdserverpb.KV/Range",
            "/etcdserverpb.KV/Put",
            "/etcdserverpb.Maintenance/Status",
        ]),
        prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        prop::option::of(any::<u8>()),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(metadata, path, cut_points, padding, body)| Request {
            metadata,
            path,
            cuts: cut_points.iter().map(|index| index.index(4096)).collect(),
            padding,
            body,
        })
}

type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

fn header_list(request: &Request, authority: &str) -> HeaderList {
    let mut list: HeaderList = vec![
        (b":method".to_vec(), b"POST".to_vec()),
        (b":scheme".to_vec(), b"http".to_vec()),
        (b":path".to_vec(), request.path.as_bytes().to_vec()),
        (b":authority".to_vec(), authority.as_bytes().to_vec()),
        (b"content-type".to_vec(), b"application/grpc".to_vec()),
    ];
    list.extend(request.metadata.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())));
    list
}

/// The frames of a connection carrying `requests`, their header blocks encoded with one HPACK
/// encoder (so later blocks refer to the client's table, as real clients' do).
fn connection(requests: &[Request], authority: &str) -> Vec<u8> {
    let mut encoder = loona_hpack::Encoder::new();
    let mut out = PREFACE.to_vec();
    out.extend_from_slice(&frame(0x4, 0, 0, &[]));
    for (i, request) in requests.iter().enumerate() {
        let stream = 1 + 2 * i as u32;
        let list = header_list(request, authority);
        let block = encoder.encode(list.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut cuts: Vec<usize> = request.cuts.iter().map(|cut| cut % (block.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut pieces = Vec::new();
        let mut start = 0;
        for cut in cuts {
            pieces.push(&block[start..cut]);
            start = cut;
        }
        pieces.push(&block[start..]);
        let last = pieces.len() - 1;
        for (j, piece) in pieces.iter().enumerate() {
            let end_headers = if j == last { 0x4 } else { 0 };
            if j == 0 {
                let (flags, payload) = match request.padding {
                    Some(pad) => {
                        let mut padded = vec![pad];
                        padded.extend_from_slice(piece);
                        padded.extend(std::iter::repeat_n(0, pad as usize));
                        (0x8 | end_headers, padded)
                    }
                    None => (end_headers, piece.to_vec()),
                };
                out.extend_from_slice(&frame(0x1, flags, stream, &payload));
            } else {
                out.extend_from_slice(&frame(0x9, end_headers, stream, piece));
            }
        }
        out.extend_from_slice(&frame(0x0, 0x1, stream, &grpc::frame(&request.body)));
    }
    out
}

/// The server's view of a connection: header lists (decoded with one table) and DATA payloads.
fn server_view(bytes: &[u8]) -> (Vec<HeaderList>, Vec<Vec<u8>>) {
    assert_eq!(&bytes[..PREFACE.len()], PREFACE);
    let mut rest = &bytes[PREFACE.len()..];
    let mut decoder = loona_hpack::Decoder::new();
    let (mut lists, mut data, mut block) = (Vec::new(), Vec::new(), Vec::new());
    while !rest.is_empty() {
        let length = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        let (kind, flags) = (rest[3], rest[4]);
        let mut payload = &rest[9..9 + length];
        if kind == 0x1 && flags & 0x8 != 0 {
            let pad = payload[0] as usize;
            payload = &payload[1..payload.len() - pad];
        }
        match kind {
            0x1 | 0x9 => {
                block.extend_from_slice(payload);
                if flags & 0x4 != 0 {
                    lists.push(decoder.decode(&block).expect("the server can decode every block"));
                    block.clear();
                }
            }
            0x0 => data.push(payload.to_vec()),
            _ => {}
        }
        rest = &rest[9 + length..];
    }
    (lists, data)
}

proptest! {
    /// Whatever a client sends, the layer neither panics nor holds more than the server's header
    /// list limit (plus one read).
    #[test]
    fn repair_survives_any_bytes(
        preface in any::<bool>(),
        body in prop::collection::vec(any::<u8>(), 0..20_000),
        sizes in prop::collection::vec(1usize..5000, 1..8),
    ) {
        let mut input = if preface { PREFACE.to_vec() } else { Vec::new() };
        input.extend_from_slice(&body);
        let (_, held) = repair(input, sizes);
        prop_assert!(held <= HEADER_LIST_LIMIT as usize + 6 * 9 + 5000, "held {held} bytes");
    }

    /// Frames that look like header frames (random lengths, flags, continuation runs) cannot
    /// make the layer hold more than the limit either.
    #[test]
    fn repair_survives_any_frames(
        frames in prop::collection::vec(
            (prop::sample::select(vec![0x0u8, 0x1, 0x4, 0x8, 0x9]), any::<u8>(), 0u32..4, prop::collection::vec(any::<u8>(), 0..3000)),
            0..40,
        ),
        sizes in prop::collection::vec(1usize..5000, 1..8),
    ) {
        let mut input = PREFACE.to_vec();
        for (kind, flags, stream, payload) in &frames {
            input.extend_from_slice(&frame(*kind, *flags, *stream, payload));
        }
        let (output, held) = repair(input.clone(), sizes);
        prop_assert!(held <= HEADER_LIST_LIMIT as usize + 6 * 9 + 5000, "held {held} bytes");
        prop_assert!(output.len() <= input.len() + 64 * 1024, "{} bytes out of {}", output.len(), input.len());
    }

    /// Real clients' requests: with a valid authority the connection passes byte for byte; with
    /// the malformed one of Go clientv3 3.4, the server reads the same headers without it and
    /// every DATA frame unchanged, however the blocks are cut and however the bytes arrive.
    #[test]
    fn repair_keeps_every_request(
        requests in prop::collection::vec(request(), 1..4),
        malformed in any::<bool>(),
        sizes in prop::collection::vec(1usize..300, 1..8),
    ) {
        let authority = if malformed { "http://127.0.0.1:2379" } else { "127.0.0.1:2379" };
        let input = connection(&requests, authority);
        let (output, _) = repair(input.clone(), sizes);
        if !malformed {
            prop_assert_eq!(output, input);
            return Ok(());
        }
        let (lists, data) = server_view(&output);
        let expected: Vec<HeaderList> = requests
            .iter()
            .map(|request| {
                let mut list = header_list(request, authority);
                list.retain(|(name, _)| name != b":authority");
                list
            })
            .collect();
        prop_assert_eq!(lists, expected);
        let expected_data: Vec<Vec<u8>> = requests.iter().map(|r| grpc::frame(&r.body).to_vec()).collect();
        prop_assert_eq!(data, expected_data);
    }

    /// Messages cut anywhere come out whole and in order, up to the first one over the limit,
    /// which is named by its prefix before its bytes arrive.
    #[test]
    fn framing_reassembles_and_bounds(
        messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..10),
        cuts in prop::collection::vec(1usize..200, 1..10),
        limit in 0usize..300,
    ) {
        let stream: Vec<u8> = messages.iter().flat_map(|m| grpc::frame(m).to_vec()).collect();
        let mut reader = MessageReader::with_limit(limit);
        let (mut out, mut refused) = (Vec::new(), None);
        let (mut at, mut i) = (0, 0);
        'feed: while at < stream.len() {
            let end = (at + cuts[i % cuts.len()]).min(stream.len());
            reader.push(&stream[at..end]);
            at = end;
            i += 1;
            loop {
                if let Some(claimed) = reader.oversize() {
                    refused = Some(claimed);
                    break 'feed;
                }
                match reader.next_message() {
                    Some(message) => out.push(message[5..].to_vec()),
                    None => break,
                }
            }
        }
        let first_over = messages.iter().position(|m| m.len() > limit);
        let kept = first_over.unwrap_or(messages.len());
        prop_assert_eq!(&out[..], &messages[..kept]);
        prop_assert_eq!(refused, first_over.map(|i| messages[i].len() as u64));
    }

    /// The walkers and the header checks take arbitrary bytes without panicking.
    #[test]
    fn walkers_survive_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        let _ = grpc::for_each_field(&bytes, |_, _, _| {});
        let _ = crate::call::watch::read_facts(&bytes);
        let _ = crate::budget::Page::parse(Bytes::from(bytes.clone()));
        let _ = crate::upstream::rewrite_client_urls(&bytes, &["http://proxy:23790".to_owned()]);
        let _ = crate::call::keepalive::lease_of_request(&bytes);
        let _ = crate::call::keepalive::lease_of_answer(&bytes);
        let _ = grpc::parse_grpc_timeout(&bytes);
        let _ = grpc::is_grpc_content_type(&bytes);
        let _ = grpc::framed_length(&bytes);
    }

    /// What the watch relay reads from a WatchResponse without decoding it is what decoding says.
    #[test]
    fn watch_facts_match_decoding(
        revision in 0i64..1 << 40,
        watch_id in -1i64..1 << 20,
        created in any::<bool>(),
        canceled in any::<bool>(),
        reason in "[ -~]{0,40}",
        fragment in any::<bool>(),
        mod_revisions in prop::collection::vec(1i64..1 << 40, 0..5),
    ) {
        let response = WatchResponse {
            header: Some(ResponseHeader { revision, cluster_id: 7, member_id: 9, raft_term: 3 }),
            watch_id,
            created,
            canceled,
            cancel_reason: reason.clone(),
            fragment,
            events: mod_revisions
                .iter()
                .map(|&mod_revision| Event {
                    kv: Some(KeyValue { key: Bytes::from_static(b"k"), mod_revision, ..Default::default() }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let facts = crate::call::watch::read_facts(&response.encode_to_vec()).expect("a valid message");
        prop_assert_eq!(facts.watch_id, watch_id);
        prop_assert_eq!((facts.created, facts.canceled, facts.fragment), (created, canceled, fragment));
        prop_assert_eq!(facts.cancel_reason, reason);
        prop_assert_eq!(facts.header_revision, revision);
        prop_assert_eq!(facts.events, mod_revisions.len());
        prop_assert_eq!(facts.last_event_revision, mod_revisions.last().copied().unwrap_or(0));
    }

    /// The MemberList rewrite changes client URLs and nothing else.
    #[test]
    fn member_list_rewrite_changes_only_client_urls(
        members in prop::collection::vec(
            (any::<u64>(), "[a-z0-9]{0,8}", prop::collection::vec("http://[a-z0-9.]{1,12}:[0-9]{1,5}", 0..3), any::<bool>()),
            0..5,
        ),
    ) {
        let list = MemberListResponse {
            header: Some(ResponseHeader { revision: 5, ..Default::default() }),
            members: members
                .iter()
                .map(|(id, name, client_urls, is_learner)| Member {
                    id: *id,
                    name: name.clone(),
                    peer_ur_ls: vec!["http://peer:2380".to_owned()],
                    client_ur_ls: client_urls.clone(),
                    is_learner: *is_learner,
                })
                .collect(),
        };
        let urls = vec!["http://proxy:23790".to_owned()];
        let rewritten = crate::upstream::rewrite_client_urls(&list.encode_to_vec(), &urls).expect("a valid message");
        let decoded = MemberListResponse::decode(&rewritten[..]).expect("still a valid message");
        let mut expected = list.clone();
        for member in &mut expected.members {
            if !member.client_ur_ls.is_empty() {
                member.client_ur_ls = urls.clone();
            }
        }
        prop_assert_eq!(decoded, expected);
    }
}
