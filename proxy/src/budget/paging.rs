//! A limited client's Range, served from etcd's pages: each page asked for at the first page's
//! revision and sized to fill the answer, the answer made of slices of the pages (no copy of
//! the values it carries).

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use bytes::Bytes;
use etcd_compat_proto::etcdserverpb::{range_request, RangeRequest, RangeResponse};
use prost::Message;

use super::{printable, BudgetPolicy, Outcome};
use crate::error::ProxyFailure;

/// Most keys fetched in a Range's first page, before the sizes under its prefix are known; later
/// pages are sized from the bytes per key seen. Kept small because a first page of large values
/// is held in full (64 keys of 64 KiB are one 4 MiB answer; 256 were 16 MiB).
const FIRST_PAGE_KEYS: i64 = 64;
/// Most keys of a client's own page (`limit`) asked of etcd as they are, when the sizes seen so
/// far say the page fits the budget.
const PASS_THROUGH_PAGE_KEYS: i64 = 256;
/// Starting guess of bytes per key, before any Range was seen.
const INITIAL_BYTES_PER_KEY: usize = 4096;
/// Page size while only counting past the budget (nothing is kept from those pages).
const COUNTING_PAGE_BYTES: usize = 4 * 1024 * 1024;
const MAX_PAGE_KEYS: i64 = 10_000;
/// One upstream page: etcd's raw message bytes and its decoded form.
pub struct Page {
    /// The encoded RangeResponse as etcd sent it (without the gRPC frame prefix).
    pub raw: Bytes,
    /// The same, decoded.
    pub decoded: RangeResponse,
    /// Where each of `decoded.kvs` is encoded in `raw` (tag, length and message), in order.
    kv_spans: Vec<Range<usize>>,
}

impl Page {
    /// Decodes etcd's encoded RangeResponse and locates its KeyValues, so that an answer can
    /// reuse etcd's bytes instead of re-encoding them.
    pub fn parse(raw: Bytes) -> Result<Page, String> {
        let decoded = RangeResponse::decode(raw.clone()).map_err(|e| e.to_string())?;
        let kv_spans = field_spans(&raw, RANGE_RESPONSE_KVS)?;
        if kv_spans.len() != decoded.kvs.len() {
            return Err(format!("{} kvs fields for {} decoded KeyValues", kv_spans.len(), decoded.kvs.len()));
        }
        Ok(Page { raw, decoded, kv_spans })
    }
}

/// Field number of `kvs` in RangeResponse.
const RANGE_RESPONSE_KVS: u64 = 2;

/// Byte ranges of every top-level length-delimited field numbered `wanted` in an encoded message.
fn field_spans(message: &[u8], wanted: u64) -> Result<Vec<Range<usize>>, String> {
    let mut spans = Vec::new();
    crate::grpc::for_each_field(message, |field, value, span| {
        if field == wanted && matches!(value, crate::grpc::WireValue::Bytes(_)) {
            spans.push(span);
        }
    })?;
    Ok(spans)
}

/// The KeyValues chosen for an answer, as slices of etcd's pages: consecutive entries of one
/// page are one slice, so an answer costs no copy of the values it carries.
#[derive(Default)]
struct TakenKvs {
    chunks: Vec<Bytes>,
    count: usize,
    /// The run being extended within the current page.
    run: Option<Range<usize>>,
}

impl TakenKvs {
    fn take(&mut self, span: Range<usize>, raw: &Bytes) {
        self.count += 1;
        match self.run.as_mut() {
            Some(run) if run.end == span.start => run.end = span.end,
            _ => {
                self.end_page(raw);
                self.run = Some(span);
            }
        }
    }

    /// Closes the current run; called before moving on to the next page.
    fn end_page(&mut self, raw: &Bytes) {
        if let Some(run) = self.run.take() {
            self.chunks.push(raw.slice(run));
        }
    }
}

/// Frames a RangeResponse made of `skeleton`'s fields and KeyValues already encoded in
/// `kv_chunks`, in field order: header, kvs, more, count.
fn framed_range_response(skeleton: &RangeResponse, kv_chunks: Vec<Bytes>) -> Vec<Bytes> {
    let head = RangeResponse { header: skeleton.header, ..Default::default() }.encode_to_vec();
    let tail = RangeResponse { more: skeleton.more, count: skeleton.count, ..Default::default() }.encode_to_vec();
    let length = head.len() + kv_chunks.iter().map(Bytes::len).sum::<usize>() + tail.len();
    let mut first = Vec::with_capacity(5 + head.len());
    first.push(0);
    first.extend_from_slice(&(length as u32).to_be_bytes());
    first.extend_from_slice(&head);
    let mut framed = Vec::with_capacity(kv_chunks.len() + 2);
    framed.push(Bytes::from(first));
    framed.extend(kv_chunks);
    framed.push(Bytes::from(tail));
    framed
}

/// The answer to a limited Range.
pub enum Answer<E> {
    /// etcd's own message, untouched (the whole result fit in the first page).
    Raw(Bytes),
    /// A message assembled from pages, framed, in chunks that share the pages' memory.
    Assembled(Vec<Bytes>, Outcome),
    /// Refused, with why.
    Refused(ProxyFailure),
    /// An upstream page failed; its answer goes to the client as etcd sent it.
    Upstream(E),
}

/// Whether a Range can be served page by page with a key cursor: etcd applies `limit` after
/// sorting and filtering, so other requests are forwarded as they are. A target other than the
/// key is sorted by even with no order asked (ascending, after `limit`), so only key order pages.
pub fn pageable(request: &RangeRequest) -> bool {
    let key_order = request.sort_target == range_request::SortTarget::Key as i32
        && (request.sort_order == range_request::SortOrder::None as i32
            || request.sort_order == range_request::SortOrder::Ascend as i32);
    key_order
        && !request.count_only
        && request.min_mod_revision == 0
        && request.max_mod_revision == 0
        && request.min_create_revision == 0
        && request.max_create_revision == 0
        && !request.range_end.is_empty()
}

/// What a framed Range request asks for, read from the wire without decoding it: most Ranges
/// are of one key, and are then forwarded as they came.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeAsked<'a> {
    /// One key (no `range_end`).
    OneKey(&'a [u8]),
    /// A range of keys, the one shape [`pageable`] may accept.
    KeyRange,
    /// Compressed or malformed: forwarded as it is.
    Unreadable,
}

/// Reads what the framed Range request `framed` asks for (see [`RangeAsked`]).
pub fn range_asked(framed: &[u8]) -> RangeAsked<'_> {
    use crate::grpc::{fields, WireValue};
    const KEY: u64 = 1;
    const RANGE_END: u64 = 2;
    let Some(([0, ..], message)) = framed.split_at_checked(5) else {
        return RangeAsked::Unreadable;
    };
    // As protobuf decoders do, the last occurrence of a field wins.
    let (mut key, mut range_end): (&[u8], &[u8]) = (&[], &[]);
    for field in fields(message) {
        match field {
            Ok(field) => match field.value {
                WireValue::Bytes(bytes) if field.number == KEY => key = bytes,
                WireValue::Bytes(bytes) if field.number == RANGE_END => range_end = bytes,
                _ => {}
            },
            Err(_) => return RangeAsked::Unreadable,
        }
    }
    if range_end.is_empty() {
        RangeAsked::OneKey(key)
    } else {
        RangeAsked::KeyRange
    }
}

/// Encoded size of a length-delimited field with `len` bytes of content (tag + length + content).
pub(super) fn field_size(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// Bytes per key seen in recent limited Ranges, to size first pages: a page of large values
/// must not be fetched only to be thrown away when the budget is full.
#[derive(Debug)]
pub struct KeySizeEstimate(AtomicUsize);

impl Default for KeySizeEstimate {
    fn default() -> Self {
        KeySizeEstimate(AtomicUsize::new(INITIAL_BYTES_PER_KEY))
    }
}

impl KeySizeEstimate {
    /// Keys expected to fill `room` bytes, plus one to learn whether more would have fit.
    fn keys_for(&self, room: usize) -> i64 {
        let per_key = self.0.load(Relaxed).max(1);
        (room / per_key + 1) as i64
    }

    fn observe(&self, per_key: usize) {
        // Weighted towards the latest page: workloads move between prefixes of different sizes.
        let old = self.0.load(Relaxed);
        self.0.store((old + 3 * per_key.max(1)) / 4, Relaxed);
    }
}

/// Serves a limited Range from pages fetched by `fetch`, all at the first page's revision.
pub async fn serve_range<E, F, Fut>(
    policy: &BudgetPolicy,
    budget: usize,
    estimate: &KeySizeEstimate,
    request: RangeRequest,
    mut fetch: F,
) -> Answer<E>
where
    F: FnMut(RangeRequest) -> Fut,
    Fut: Future<Output = Result<Page, E>>,
{
    let client_limit = request.limit.max(0);
    // Every upstream page costs etcd a count over the rest of the range, so pages are sized to
    // fill the answer in one or two round trips rather than many small ones.
    let fitting = estimate.keys_for(budget);
    // A client page that probably fits is asked for as it is, so that etcd's answer passes through.
    let mut page_keys = if client_limit > 0 && client_limit <= fitting.min(PASS_THROUGH_PAGE_KEYS) {
        client_limit
    } else {
        let first_page = fitting.clamp(1, FIRST_PAGE_KEYS);
        if client_limit > 0 {
            client_limit.min(first_page)
        } else {
            first_page
        }
    };
    let mut cursor = request.key.clone();
    let mut revision = request.revision;
    let mut first: Option<RangeResponse> = None;
    let mut taken = TakenKvs::default();
    // Encoded size of the response being assembled.
    let mut size = 0usize;
    let mut full = false;
    // Bytes of the whole result and its largest entry, counted while scanning past the budget.
    let mut total_bytes = 0usize;
    let mut largest: Option<(Bytes, usize)> = None;

    loop {
        let page_request = RangeRequest { key: cursor.clone(), limit: page_keys, revision, ..request.clone() };
        let Page { raw, decoded, kv_spans } = match fetch(page_request).await {
            Ok(page) => page,
            Err(error) => return Answer::Upstream(error),
        };
        if first.is_none() {
            // The first page is exactly etcd's answer to the client's own request when it asked
            // for no more keys than the page held; then etcd's bytes go back untouched.
            let same_as_asked = (client_limit > 0 && page_keys == client_limit) || !decoded.more;
            if same_as_asked && raw.len() <= budget {
                if let Some(per_key) = raw.len().checked_div(decoded.kvs.len()) {
                    estimate.observe(per_key);
                }
                return Answer::Raw(raw);
            }
            // The header carries etcd's current revision, not the one a client asked to read at.
            if revision <= 0 {
                revision = decoded.header.as_ref().map_or(0, |h| h.revision);
            }
            let mut skeleton = decoded.clone();
            skeleton.kvs.clear();
            skeleton.more = true;
            size = skeleton.encoded_len();
            first = Some(skeleton);
        }
        let page_more = decoded.more;
        let page_len = decoded.kvs.len();
        let mut page_bytes = 0;
        for (kv, span) in decoded.kvs.into_iter().zip(kv_spans) {
            let kv_size = span.len();
            page_bytes += kv_size;
            total_bytes += kv_size;
            cursor = next_key(&kv.key);
            if largest.as_ref().is_none_or(|(_, s)| kv_size > *s) {
                largest = Some((kv.key.clone(), kv_size));
            }
            if full || (client_limit > 0 && taken.count as i64 >= client_limit) || size + kv_size > budget {
                full = true;
                continue;
            }
            size += kv_size;
            taken.take(span, &raw);
        }
        taken.end_page(&raw);
        if let Some(per_key) = page_bytes.checked_div(page_len) {
            estimate.observe(per_key);
        }
        if !page_more || page_len == 0 {
            break;
        }
        // Settled: the client pages, or the operator allowed a cut. Otherwise the refusal should
        // say how big the result really is, so scanning goes on without holding anything.
        if full && (client_limit > 0 || policy.truncation_allowed(&request.key).is_some()) {
            break;
        }
        let average = (page_bytes / page_len.max(1)).max(1);
        let room = if full { COUNTING_PAGE_BYTES } else { budget.saturating_sub(size) };
        let mut next = (room / average + 1) as i64;
        if client_limit > 0 && !full {
            next = next.min(client_limit - taken.count as i64 + 1);
        }
        page_keys = next.clamp(1, MAX_PAGE_KEYS);
    }

    let Some(mut response) = first else {
        return Answer::Refused(ProxyFailure::NoRangePage);
    };
    if taken.count == 0 && full {
        let (key, key_size) = largest.unwrap_or_default();
        return Answer::Refused(ProxyFailure::KeyTooLarge { key: printable(&key), size: key_size, budget });
    }
    response.more = (taken.count as i64) < response.count;
    let outcome = if !full {
        Outcome::Whole
    } else if client_limit > 0 {
        Outcome::Paged
    } else if policy.truncation_allowed(&request.key).is_some() {
        Outcome::Truncated
    } else {
        Outcome::Refused
    };
    if outcome != Outcome::Refused {
        return Answer::Assembled(framed_range_response(&response, taken.chunks), outcome);
    }
    let skeleton = response;
    Answer::Refused(ProxyFailure::RangeTooLarge {
        key: printable(&request.key),
        keys: skeleton.count,
        bytes: total_bytes + skeleton.encoded_len(),
        budget,
    })
}

/// The smallest key after `key`.
fn next_key(key: &[u8]) -> Bytes {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    Bytes::from(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_compat_proto::etcdserverpb::ResponseHeader;
    use etcd_compat_proto::mvccpb::KeyValue;

    fn kv(key: &str, value_len: usize) -> KeyValue {
        KeyValue {
            key: key.to_owned().into(),
            value: vec![b'v'; value_len].into(),
            mod_revision: 9,
            ..Default::default()
        }
    }

    /// A store of `keys` keys under "/k/", answering each page at the current revision 500.
    fn page_of(keys: usize, request: &RangeRequest) -> Page {
        let all: Vec<KeyValue> = (0..keys).map(|i| kv(&format!("/k/{i:04}"), 100)).collect();
        let rest: Vec<KeyValue> = all.into_iter().filter(|kv| kv.key >= request.key).collect();
        let take = if request.limit > 0 { (request.limit as usize).min(rest.len()) } else { rest.len() };
        let header = Some(ResponseHeader { revision: 500, ..Default::default() });
        let response =
            RangeResponse { header, kvs: rest[..take].to_vec(), more: take < rest.len(), count: rest.len() as i64 };
        Page::parse(Bytes::from(response.encode_to_vec())).expect("a page")
    }

    #[tokio::test]
    async fn every_page_is_read_at_the_revision_asked_for() {
        let policy = BudgetPolicy {
            max_response_bytes: 4 << 20,
            limited_user_agents: Vec::new(),
            unlimited_user_agents: Vec::new(),
            limit_go_without_api_version: false,
            truncate_prefixes: Vec::new(),
        };
        for (asked, read_at) in [(100, 100), (0, 500)] {
            let request =
                RangeRequest { key: "/k/".into(), range_end: "/k0".into(), revision: asked, ..Default::default() };
            let mut revisions = Vec::new();
            let answer = serve_range(&policy, 4096, &KeySizeEstimate::default(), request, |page: RangeRequest| {
                revisions.push(page.revision);
                std::future::ready(Ok::<_, ()>(page_of(200, &page)))
            })
            .await;
            assert!(matches!(answer, Answer::Refused(_)), "20 KiB of keys over a 4 KiB budget");
            assert!(revisions.len() > 2, "read in pages: {revisions:?}");
            assert_eq!(revisions[0], asked);
            assert!(revisions[1..].iter().all(|&r| r == read_at), "asked {asked}: {revisions:?}");
        }
    }

    #[test]
    fn answers_reuse_etcd_bytes_and_encode_like_prost() {
        let header = Some(ResponseHeader { revision: 42, member_id: 7, ..Default::default() });
        let page =
            RangeResponse { header, kvs: vec![kv("a", 10), kv("b", 300), kv("c", 70_000)], more: true, count: 5 };
        let page = Page::parse(Bytes::from(page.encode_to_vec())).unwrap();
        assert_eq!(page.kv_spans.len(), 3);
        let mut taken = TakenKvs::default();
        for span in page.kv_spans[..2].iter().cloned() {
            taken.take(span, &page.raw);
        }
        taken.end_page(&page.raw);
        // Consecutive entries of one page are one slice of etcd's buffer, not a copy.
        assert_eq!(taken.chunks.len(), 1);
        assert_eq!(taken.chunks[0].as_ptr(), page.raw[page.kv_spans[0].start..].as_ptr());
        let skeleton = RangeResponse { header, kvs: Vec::new(), more: true, count: 5 };
        let framed: Vec<u8> = framed_range_response(&skeleton, taken.chunks).concat();
        let expected = RangeResponse { header, kvs: vec![kv("a", 10), kv("b", 300)], more: true, count: 5 };
        assert_eq!(framed[5..], expected.encode_to_vec()[..]);
        assert_eq!(framed[0], 0);
        assert_eq!(framed[1..5], ((framed.len() - 5) as u32).to_be_bytes());
    }

    #[test]
    fn malformed_pages_are_refused() {
        assert!(field_spans(&[0x12, 0x05, 0x01], 2).unwrap_err().contains("runs past the message"));
        assert!(field_spans(&[0x13], 2).unwrap_err().contains("wire type 3"));
    }

    #[test]
    fn only_key_ordered_unfiltered_ranges_are_paged() {
        let prefix = RangeRequest { key: "/a/".into(), range_end: "/a0".into(), ..Default::default() };
        assert!(pageable(&prefix));
        let framed = |request: &RangeRequest| crate::grpc::frame(&request.encode_to_vec());
        assert_eq!(range_asked(&framed(&prefix)), RangeAsked::KeyRange);
        let one_key = RangeRequest { range_end: Bytes::new(), ..prefix.clone() };
        assert_eq!(range_asked(&framed(&one_key)), RangeAsked::OneKey(b"/a/"));
        assert_eq!(range_asked(&[1, 0, 0, 0, 2, 0x12, 0]), RangeAsked::Unreadable, "compressed");
        assert_eq!(range_asked(&[0, 0]), RangeAsked::Unreadable, "cut short");
        assert_eq!(range_asked(&[0, 0, 0, 0, 2, 0x12, 5]), RangeAsked::Unreadable, "runs past the message");
        assert!(!pageable(&RangeRequest { range_end: Bytes::new(), ..prefix.clone() }));
        assert!(!pageable(&RangeRequest { count_only: true, ..prefix.clone() }));
        assert!(!pageable(&RangeRequest { sort_order: range_request::SortOrder::Descend as i32, ..prefix.clone() }));
        assert!(!pageable(&RangeRequest { max_mod_revision: 9, ..prefix.clone() }));
        let by_mod = RangeRequest { sort_target: range_request::SortTarget::Mod as i32, ..prefix.clone() };
        assert!(!pageable(&by_mod), "etcd sorts by the target even with no order asked");
        let by_key = RangeRequest { sort_order: range_request::SortOrder::Ascend as i32, ..prefix };
        assert!(pageable(&by_key));
    }
}
