//! The proxy forwards bytes: a request field its protos don't know reaches etcd's socket
//! unchanged, and etcd's response (headers, message bytes, trailers) reaches the client
//! exactly as a direct call receives it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use etcd_compat_proto::etcdserverpb::{PutRequest, RangeRequest};
use etcd_compat_tests::{grpc_frame, ClusterSpec, EtcdCluster, EtcdVersion};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{raw_unary, runtime, start_proxy};

/// A TCP relay in front of `target` that records every byte sent toward it.
async fn recording_relay(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = listener.local_addr().expect("relay addr");
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&recorded);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = TcpStream::connect(target).await.expect("relay connects to etcd");
            let sink = Arc::clone(&sink);
            tokio::spawn(async move {
                let (mut in_read, mut in_write) = inbound.into_split();
                let (mut out_read, mut out_write) = outbound.into_split();
                let upward = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match in_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        sink.lock().expect("recording").extend_from_slice(&buf[..n]);
                        if out_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let downward = async move {
                    let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
                };
                tokio::join!(upward, downward);
            });
        }
    });
    (addr, recorded)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn unknown_fields_and_responses_survive_byte_for_byte() {
    let cluster = EtcdCluster::start(ClusterSpec::new(EtcdVersion::V3_5, 1)).expect("cluster");
    let etcd_addr = cluster.client_addrs()[0];
    let runtime = runtime();
    runtime.block_on(async {
        let (relay_addr, recorded) = recording_relay(etcd_addr).await;
        let proxy = start_proxy(vec![format!("--endpoints={relay_addr}")]);

        // A PutRequest from a "newer client": fields 99 (varint) and 100 (bytes) are unknown to
        // etcd 3.5 and to the proxy's protos.
        let mut message =
            PutRequest { key: "/bytes/k".into(), value: "v".into(), ..Default::default() }.encode_to_vec();
        message.extend_from_slice(&[0x98, 0x06, 0x01]); // field 99, varint, value 1
        message.extend_from_slice(&[0xa2, 0x06, 0x06]); // field 100, length-delimited, 6 bytes
        message.extend_from_slice(b"future");
        let framed = grpc_frame(&message);
        let put = raw_unary(proxy.listen_addr(), "/etcdserverpb.KV/Put", &[], framed.clone()).await;
        assert_eq!(put.status, 200);
        assert_eq!(put.trailers.as_ref().and_then(|t| t.get("grpc-status")).map(|v| v.as_bytes()), Some(&b"0"[..]));
        assert!(
            contains(&recorded.lock().expect("recording"), &framed),
            "the request message, unknown fields included, did not reach etcd byte for byte"
        );

        // The same Range directly and through the proxy: identical status, headers, bytes, trailers.
        let range = grpc_frame(&RangeRequest { key: "/bytes/k".into(), ..Default::default() }.encode_to_vec());
        let direct = raw_unary(etcd_addr, "/etcdserverpb.KV/Range", &[], range.clone()).await;
        let proxied = raw_unary(proxy.listen_addr(), "/etcdserverpb.KV/Range", &[], range).await;
        assert!(direct.body.len() > 5, "direct Range returned no message");
        assert_eq!(proxied, direct);

        // An error answer (trailers-only on the wire) is also identical, code and message.
        let future = grpc_frame(
            &RangeRequest { key: "/bytes/k".into(), revision: 1_000_000, ..Default::default() }.encode_to_vec(),
        );
        let direct = raw_unary(etcd_addr, "/etcdserverpb.KV/Range", &[], future.clone()).await;
        let proxied = raw_unary(proxy.listen_addr(), "/etcdserverpb.KV/Range", &[], future).await;
        assert_eq!(direct.headers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"11"[..]));
        assert_eq!(proxied, direct);
    });
}
