//! What the cache reads from etcd's messages, without decoding them: which Ranges it may
//! answer, which keys a write touched, and the revision of an answer.

use bytes::Bytes;

use crate::grpc::{self, WireValue, Writes};

/// A key range as etcd writes it: an empty `range_end` is the single `key`, `range_end` "\0"
/// is every key from `key` on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyRange {
    pub key: Bytes,
    pub range_end: Bytes,
}

impl KeyRange {
    /// Just `key`.
    pub fn is_single_key(&self) -> bool {
        self.range_end.is_empty()
    }

    /// The first key after the range; `None` when the range has no end.
    pub fn end_bound(&self) -> Option<Bytes> {
        match self.range_end.as_ref() {
            [] => {
                let mut after = Vec::with_capacity(self.key.len() + 1);
                after.extend_from_slice(&self.key);
                after.push(0);
                Some(after.into())
            }
            [0] => None,
            _ => Some(self.range_end.clone()),
        }
    }

    /// Whether some key is in both ranges.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        let before_end = |key: &Bytes, range: &KeyRange| range.end_bound().is_none_or(|end| key < &end);
        before_end(&self.key, other) && before_end(&other.key, self)
    }
}

/// The keys a write acknowledged through the proxy may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// These ranges (a Put's key, a DeleteRange's range, every write of a Txn's two branches).
    Ranges(Vec<KeyRange>),
    /// Keys the proxy cannot name (a revoked lease's, a lock's, an unreadable request).
    Everything,
}

/// The range of a Range request the cache may answer: serializable, at the latest revision.
/// `message` is the request without its frame prefix.
pub fn cacheable_range(message: &[u8]) -> Option<KeyRange> {
    // Every Range reaches this test: a walk of its own, which allocates nothing and stops at
    // the first field it cannot read.
    let (mut key, mut range_end): (&[u8], &[u8]) = (&[], &[]);
    let (mut serializable, mut at_revision) = (false, false);
    let mut at = 0;
    while at < message.len() {
        let tag = varint(message, &mut at)?;
        match tag & 7 {
            0 => {
                let value = varint(message, &mut at)?;
                match tag >> 3 {
                    4 => at_revision = value != 0,
                    7 => serializable = value != 0,
                    _ => {}
                }
            }
            2 => {
                let length = usize::try_from(varint(message, &mut at)?).ok()?;
                let bytes = message.get(at..at.checked_add(length)?)?;
                at += length;
                match tag >> 3 {
                    1 => key = bytes,
                    2 => range_end = bytes,
                    _ => {}
                }
            }
            _ => return None,
        }
    }
    (serializable && !at_revision)
        .then(|| KeyRange { key: Bytes::copy_from_slice(key), range_end: Bytes::copy_from_slice(range_end) })
}

/// What a write of kind `writes` with request `message` (without its frame prefix) changed;
/// `None` for calls that change no key.
pub fn written_ranges(writes: Writes, message: &[u8]) -> Option<Written> {
    let mut ranges = Vec::new();
    let readable = match writes {
        Writes::Nothing => return None,
        Writes::Unknown => false,
        Writes::Key => key_and_end(message, false, &mut ranges),
        Writes::Range => key_and_end(message, true, &mut ranges),
        Writes::Txn => txn_writes(message, &mut ranges),
    };
    Some(if readable { Written::Ranges(ranges) } else { Written::Everything })
}

/// A Put's key, or a DeleteRange's key and range end.
fn key_and_end(message: &[u8], with_end: bool, out: &mut Vec<KeyRange>) -> bool {
    let mut range = KeyRange { key: Bytes::new(), range_end: Bytes::new() };
    let read = grpc::for_each_field(message, |field, value, _| match (field, value) {
        (1, WireValue::Bytes(key)) => range.key = Bytes::copy_from_slice(key),
        (2, WireValue::Bytes(end)) if with_end => range.range_end = Bytes::copy_from_slice(end),
        _ => {}
    });
    out.push(range);
    read.is_ok()
}

/// Every Put and DeleteRange of both branches of a Txn, nested Txns included.
fn txn_writes(message: &[u8], out: &mut Vec<KeyRange>) -> bool {
    let mut readable = true;
    let read = grpc::for_each_field(message, |field, value, _| {
        let (2 | 3, WireValue::Bytes(op)) = (field, value) else { return };
        let read_op = grpc::for_each_field(op, |field, value, _| match (field, value) {
            (2, WireValue::Bytes(put)) => readable &= key_and_end(put, false, out),
            (3, WireValue::Bytes(delete)) => readable &= key_and_end(delete, true, out),
            (4, WireValue::Bytes(txn)) => readable &= txn_writes(txn, out),
            _ => {}
        });
        readable &= read_op.is_ok();
    });
    readable && read.is_ok()
}

/// The revision in an answer's header: field 1 of every KV, lock and election response, which
/// etcd encodes first, so that the start of a longer answer is enough. Every write's answer is
/// read here, so the walk is a tight one: a header holds only varints.
pub fn header_revision(message: &[u8]) -> Option<i64> {
    let mut at = 0;
    if varint(message, &mut at)? != (1 << 3 | 2) {
        return None;
    }
    let length = usize::try_from(varint(message, &mut at)?).ok()?;
    let header = message.get(at..at.checked_add(length)?)?;
    let mut at = 0;
    while at < header.len() {
        let tag = varint(header, &mut at)?;
        if tag & 7 != 0 {
            return None;
        }
        let value = varint(header, &mut at)?;
        if tag >> 3 == 3 {
            return i64::try_from(value).ok();
        }
    }
    None
}

/// The varint at `*at`, which is moved past it.
fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_compat_proto::etcdserverpb::{
        request_op, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, ResponseHeader, TxnRequest,
    };
    use prost::Message;

    fn range(key: &str, end: &str) -> KeyRange {
        KeyRange { key: Bytes::copy_from_slice(key.as_bytes()), range_end: Bytes::copy_from_slice(end.as_bytes()) }
    }

    #[test]
    fn only_serializable_reads_of_the_latest_revision_are_cacheable() {
        let request = |serializable, revision| {
            RangeRequest { key: "a".into(), range_end: "b".into(), serializable, revision, ..Default::default() }
                .encode_to_vec()
        };
        assert_eq!(cacheable_range(&request(true, 0)), Some(range("a", "b")));
        assert_eq!(cacheable_range(&request(false, 0)), None);
        assert_eq!(cacheable_range(&request(true, 7)), None);
        assert_eq!(cacheable_range(b"\xff\xff"), None);
        let every_field = RangeRequest {
            key: "k".into(),
            range_end: "l".into(),
            limit: 10,
            sort_order: 1,
            sort_target: 2,
            serializable: true,
            keys_only: true,
            count_only: true,
            min_mod_revision: 1 << 33,
            max_create_revision: 5,
            ..Default::default()
        };
        assert_eq!(cacheable_range(&every_field.encode_to_vec()), Some(range("k", "l")));
    }

    #[test]
    fn writes_name_the_ranges_they_touch() {
        let put = PutRequest { key: "k".into(), value: "v".into(), ..Default::default() }.encode_to_vec();
        assert_eq!(written_ranges(Writes::Key, &put), Some(Written::Ranges(vec![range("k", "")])));
        let delete = DeleteRangeRequest { key: "a".into(), range_end: "\0".into(), ..Default::default() };
        assert_eq!(
            written_ranges(Writes::Range, &delete.encode_to_vec()),
            Some(Written::Ranges(vec![range("a", "\0")]))
        );
        let op = |request| RequestOp { request: Some(request) };
        let inner = TxnRequest {
            success: vec![op(request_op::Request::RequestPut(PutRequest { key: "n".into(), ..Default::default() }))],
            ..Default::default()
        };
        let txn = TxnRequest {
            success: vec![
                op(request_op::Request::RequestRange(RangeRequest { key: "r".into(), ..Default::default() })),
                op(request_op::Request::RequestPut(PutRequest { key: "p".into(), ..Default::default() })),
            ],
            failure: vec![
                op(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                    key: "d".into(),
                    range_end: "e".into(),
                    ..Default::default()
                })),
                op(request_op::Request::RequestTxn(inner)),
            ],
            ..Default::default()
        };
        assert_eq!(
            written_ranges(Writes::Txn, &txn.encode_to_vec()),
            Some(Written::Ranges(vec![range("p", ""), range("d", "e"), range("n", "")]))
        );
        assert_eq!(written_ranges(Writes::Unknown, &put), Some(Written::Everything));
        assert_eq!(written_ranges(Writes::Txn, b"\x12\xff"), Some(Written::Everything));
        assert_eq!(written_ranges(Writes::Nothing, &put), None);
    }

    #[test]
    fn ranges_overlap_by_etcd_rules() {
        assert!(range("a", "").overlaps(&range("a", "")));
        assert!(!range("a", "").overlaps(&range("a\0", "")));
        assert!(range("a", "c").overlaps(&range("b", "")));
        assert!(!range("a", "c").overlaps(&range("c", "")));
        assert!(range("a", "\0").overlaps(&range("zzz", "")));
        assert!(!range("b", "\0").overlaps(&range("a", "b")));
        assert!(range("", "\0").overlaps(&range("", "")));
    }

    #[test]
    fn header_revision_is_read_from_any_answer() {
        let answer = RangeResponse {
            header: Some(ResponseHeader { revision: 42, raft_term: 3, ..Default::default() }),
            count: 1,
            ..Default::default()
        };
        let encoded = answer.encode_to_vec();
        assert_eq!(header_revision(&encoded), Some(42));
        assert_eq!(header_revision(&encoded[..encoded.len() - 1]), Some(42), "the header alone is enough");
        assert_eq!(header_revision(&[]), None);
        let big = ResponseHeader { cluster_id: u64::MAX, member_id: 1 << 62, revision: 1 << 40, raft_term: 9 };
        let answer = RangeResponse { header: Some(big), ..Default::default() };
        assert_eq!(header_revision(&answer.encode_to_vec()), Some(1 << 40));
    }
}
