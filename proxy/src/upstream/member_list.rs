//! `MemberList` answers that name the proxy: clients that sync their endpoints from the member
//! list (AutoSync) keep using the proxy instead of going around it to the members.

use crate::grpc::{fields, put_varint, WireValue};

/// Metadata an admin tool sends (value `real`) to get etcd's own member list through a proxy
/// that answers `MemberList` with its advertised URLs.
pub const MEMBER_LIST_HEADER: &str = "etcd-compat-proxy-member-list";

/// Rewrites a serialized `MemberListResponse` so that every member that has client URLs lists
/// `urls` instead. Works on the wire format so that every other byte (member ids, names, peer
/// URLs, learner flags, the header, fields unknown to the proxy) stays as etcd sent it, in its
/// order. `None` if the message is not a well-formed protobuf.
pub fn rewrite_client_urls(message: &[u8], urls: &[String]) -> Option<Vec<u8>> {
    const MEMBERS: u64 = 2;
    const CLIENT_URLS: u64 = 4;
    let mut out = Vec::with_capacity(message.len() + 64);
    for field in fields(message) {
        let field = field.ok()?;
        let WireValue::Bytes(payload) = field.value else {
            out.extend_from_slice(&message[field.span]);
            continue;
        };
        if field.number != MEMBERS {
            out.extend_from_slice(&message[field.span]);
            continue;
        }
        let mut member = Vec::with_capacity(payload.len() + 64);
        let mut replaced = false;
        for inner in fields(payload) {
            let inner = inner.ok()?;
            if inner.number != CLIENT_URLS {
                member.extend_from_slice(&payload[inner.span]);
                continue;
            }
            // The advertised URLs take the place of etcd's first client URL.
            if !replaced {
                replaced = true;
                for url in urls {
                    put_varint(&mut member, (CLIENT_URLS << 3) | 2);
                    put_varint(&mut member, url.len() as u64);
                    member.extend_from_slice(url.as_bytes());
                }
            }
        }
        put_varint(&mut out, (MEMBERS << 3) | 2);
        put_varint(&mut out, member.len() as u64);
        out.extend_from_slice(&member);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::listed;
    use etcd_compat_proto::etcdserverpb::MemberListResponse;
    use prost::Message;

    #[test]
    fn member_list_rewrite_replaces_only_client_urls() {
        let header =
            etcd_compat_proto::etcdserverpb::ResponseHeader { cluster_id: 5, member_id: 1, revision: 0, raft_term: 3 };
        let original = MemberListResponse {
            header: Some(header),
            members: vec![listed(1, &["http://127.0.0.1:2379", "http://10.0.0.1:2379"], false), listed(2, &[], true)],
        };
        let mut bytes = original.encode_to_vec();
        // A field the proxy's protos do not know must survive.
        bytes.extend_from_slice(&[0xf8, 0x01, 0x2a]);
        let urls = vec!["http://proxy:23790".to_owned()];
        let rewritten = rewrite_client_urls(&bytes, &urls).unwrap();
        let decoded = MemberListResponse::decode(rewritten.as_slice()).unwrap();
        assert_eq!(decoded.header, original.header);
        assert_eq!(decoded.members[0].client_ur_ls, urls);
        assert_eq!(decoded.members[0].peer_ur_ls, original.members[0].peer_ur_ls);
        assert_eq!((decoded.members[0].id, decoded.members[0].name.as_str()), (1, "m1"));
        assert!(decoded.members[1].client_ur_ls.is_empty());
        assert!(decoded.members[1].is_learner);
        assert!(rewritten.ends_with(&[0xf8, 0x01, 0x2a]));
        // Same URLs in: the same bytes out.
        let same = vec!["http://127.0.0.1:2379".to_owned(), "http://10.0.0.1:2379".to_owned()];
        assert_eq!(rewrite_client_urls(&bytes, &same).unwrap(), bytes);
        assert_eq!(rewrite_client_urls(&[0x12, 0x05, 0x01], &urls), None);
    }
}
