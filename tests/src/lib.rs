//! Test harness for etcd-compat-proxy: real etcd clusters (3.4 and 3.5) on loopback,
//! etcdctl helpers, the proxy binary as a child process, and hand-made HTTP/2 and gRPC bytes
//! ([`frame`], [`grpc_frame`]) for requests no client library sends, and a cluster run out of
//! space ([`fill_until_nospace`]).
//!
//! Everything spawned here is killed when its owner is dropped, including while a test
//! panics. Owners must therefore not be parked in `static`s (statics are never dropped):
//! keep clusters and proxies in test-local variables.
//!
//! Binaries come from `/usr/bin` (etcd 3.4) and `<workspace>/.deps/etcd-v3.5.1` (etcd 3.5),
//! or from `ETCD_3_4_DIR` / `ETCD_3_5_DIR`; missing ones are installed once per process by
//! `scripts/install-deps.sh`.

#![warn(missing_docs)]

mod cluster;
mod deps;
mod etcdctl;
mod http;
mod link;
mod logs;
mod ports;
mod proxy;
mod space;
mod wire;

pub use cluster::{ClusterSpec, EtcdCluster, MemberInfo, TlsSpec, MAX_MEMBERS};
pub use deps::{chromium, etcd3_python, workspace_root, EtcdVersion};
pub use etcdctl::{etcdctl, etcdctl_command, etcdctl_ok, ClientTls};
pub use http::http_get;
pub use link::FaultyLink;
pub use ports::free_port;
pub use proxy::ProxyProcess;
pub use space::{
    fill_history_until_nospace, fill_until_nospace, quota_arg, Filled, FILL_VALUE_BYTES, NOSPACE_MESSAGE,
    SMALL_QUOTA_BYTES,
};
pub use wire::{
    error_code_name, frame, frame_flags, frame_type, grpc_frame, grpc_prefix, grpc_request_headers, hpack_integer,
    hpack_literal, hpack_table_size_update, read_frame, settings_frame, Frame, GrpcMessages, PREFACE,
};
