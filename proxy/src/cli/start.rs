//! Command line, environment and TOML configuration, validated in full before any port is bound.
//!
//! Every setting has three spellings that mean the same thing: a flag (`--listen-addr`), an
//! environment variable (`ETCD_COMPAT_PROXY_LISTEN_ADDR`) and a key in the `--config` TOML file
//! (`listen-addr`). Precedence: flag, then environment, then file, then the built-in default.
//! Flag names shared with `etcd grpc-proxy start` keep its spelling and defaults so an operator's
//! unit file works with only the binary name changed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::config::{ClientLimits, Config, DoctorLimits, Endpoint, IgnoredFlag, MemberListMode};
use crate::tls::{LegacyClientException, ListenerTlsFiles, UpstreamTlsFiles};

/// The built-in defaults, each written once: `--help` shows them and validation applies them.
mod defaults {
    pub const ENDPOINTS: &str = "127.0.0.1:2379";
    pub const LISTEN_ADDR: &str = "127.0.0.1:23790";
    pub const ADVERTISE_CLIENT_URL: &str = "127.0.0.1:23790";
    pub const MEMBER_LIST: &str = "proxy";
    pub const CLUSTER_REFRESH_INTERVAL: &str = "5s";
    pub const LEARNER_SERIALIZABLE_READS: bool = false;
    pub const CERT_EXPIRY_WARNING_DAYS: u32 = 30;
    pub const CERT_EXPIRY_CRITICAL_DAYS: u32 = 7;
    pub const CERT_RELOAD_INTERVAL: &str = "1s";
    /// grpc-proxy's default.
    pub const MAX_CONCURRENT_STREAMS: u32 = u32::MAX;
    pub const DIAL_TIMEOUT: &str = "2s";
    pub const HEALTH_INTERVAL: &str = "1s";
    pub const SHUTDOWN_GRACE: &str = "10s";
    /// The usual gRPC receive limit of legacy clients.
    pub const MAX_RESPONSE_BYTES: u64 = 4 * 1024 * 1024;
    pub const LIMIT_GO_WITHOUT_API_VERSION: bool = true;
    pub const AUTH_SESSION_IDLE_TIMEOUT: &str = "24h";
    pub const MAX_LOGIN_DELAY: &str = "5s";
    /// etcd's own default `--max-request-bytes`.
    pub const MAX_REQUEST_BYTES: u64 = 1536 * 1024;
    /// hyper's default, which no etcd client comes near (their headers are a few hundred bytes).
    pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
    /// One answer at the legacy clients' gRPC limit.
    pub const MAX_BUFFERED_RESPONSE_BYTES: u64 = 4 * 1024 * 1024;
    pub const MAX_HELD_REQUEST_BYTES: u64 = 256 * 1024 * 1024;
    pub const MAX_HELD_RESPONSE_BYTES: u64 = 256 * 1024 * 1024;
    /// gRPC libraries read a unary answer as it arrives; one that takes none of it for this
    /// long is stuck or hostile.
    pub const UNREAD_RESPONSE_TIMEOUT: &str = "30s";
    pub const HANDSHAKE_TIMEOUT: &str = "10s";
    pub const IDLE_CONNECTION_TIMEOUT: &str = "3m";
    pub const REQUEST_BODY_TIMEOUT: &str = "10s";
    /// Room for the hot keys of a large fleet; a small fraction of what etcd itself holds.
    pub const SERIALIZABLE_CACHE_BYTES: u64 = 64 * 1024 * 1024;
    pub const WATCH_COALESCING: bool = true;
    pub const REUSE_PORT: bool = false;
    pub const WORKERS: usize = 1;
    /// etcd's own default `--quota-backend-bytes`.
    pub const QUOTA_BACKEND_BYTES: u64 = 2 * 1024 * 1024 * 1024;
    /// A busy cluster compacting every few minutes keeps far less.
    pub const HISTORY_WARNING_REVISIONS: u64 = 1_000_000;
    pub const DOCTOR_SCAN_BYTES: u64 = 64 * 1024 * 1024;
}

/// A flag's help text with its default, so that the default is written only in [`defaults`].
fn with_default(text: &str, default: impl std::fmt::Display) -> String {
    format!("{text} [default: {default}]")
}

/// Settings of `etcd-compat-proxy start`; every field is optional so that the sources can be merged.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StartArgs {
    /// TOML file with any of these settings; keys are the flag names without dashes in front (e.g. `listen-addr = "127.0.0.1:23790"`).
    #[arg(long, env = "ETCD_COMPAT_PROXY_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_ENDPOINTS", value_delimiter = ',', num_args = 1.., help = with_default("Comma-separated etcd client endpoints, `host:port` or `http(s)://host:port`", defaults::ENDPOINTS))]
    pub endpoints: Option<Vec<String>>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_LISTEN_ADDR", value_name = "HOST:PORT", help = with_default("Address the gRPC listener binds to", defaults::LISTEN_ADDR))]
    pub listen_addr: Option<String>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_ADVERTISE_CLIENT_URL", value_name = "URL", help = with_default("Address(es) clients should use to reach this proxy, comma-separated; when given, `MemberList` answers list them as every member's client URLs (see `--member-list`)", format!("{}, member lists unchanged", defaults::ADVERTISE_CLIENT_URL)))]
    pub advertise_client_url: Option<String>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_MEMBER_LIST", value_name = "proxy|real", help = with_default("`MemberList` answers: `proxy` lists the `--advertise-client-url`s as every member's client URLs (clients that sync endpoints keep using the proxy), `real` passes etcd's list unchanged", defaults::MEMBER_LIST))]
    pub member_list: Option<String>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_CLUSTER_REFRESH_INTERVAL", value_name = "DURATION", help = with_default("How often the cluster view (members, learners, leader) is refreshed; routing errors refresh it at once", defaults::CLUSTER_REFRESH_INTERVAL))]
    pub cluster_refresh_interval: Option<String>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_LEARNER_SERIALIZABLE_READS", num_args = 0..=1, default_missing_value = "true", help = with_default("Let learners serve serializable Range requests (after every voting member); otherwise learners get no client requests", defaults::LEARNER_SERIALIZABLE_READS))]
    pub learner_serializable_reads: Option<bool>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_WORKERS", value_name = "N", help = with_default("Event loops serving clients, sharing the listener, the cluster view, auth sessions, the read cache and shared watches; `0`: one per available CPU. One keeps everything on one thread, the cheapest per call; see README, \"Deploying\", for workers against replicas", defaults::WORKERS))]
    pub workers: Option<usize>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_REUSE_PORT", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", help = with_default("Bind the listener and the admin address with SO_REUSEPORT, so that a new proxy process can take over the addresses while the old one drains after SIGTERM (see README, \"Restarts nobody notices\")", defaults::REUSE_PORT))]
    pub reuse_port: Option<bool>,

    /// Serve `/metrics` and `/health` over HTTP on this URL, e.g. `http://127.0.0.1:6633`; also the admin calls of `etcd-compat-proxy migrate`.
    #[arg(long, env = "ETCD_COMPAT_PROXY_METRICS_ADDR", value_name = "URL")]
    pub metrics_addr: Option<String>,

    /// File holding the bearer token that admin calls which change or read out the cluster (`migrate snapshot`, `mirror`, `verify`, `abort`) must present; without it they are refused. Make one with `head -c 32 /dev/urandom | base64 > FILE`.
    #[arg(long, env = "ETCD_COMPAT_PROXY_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Client side: the proxy's TLS certificate (PEM) presented to clients; enables TLS on the listener.
    #[arg(long, env = "ETCD_COMPAT_PROXY_CERT_FILE", value_name = "FILE")]
    pub cert_file: Option<PathBuf>,

    /// Client side: private key (PEM: PKCS#8, PKCS#1 or SEC1) for `--cert-file`.
    #[arg(long, env = "ETCD_COMPAT_PROXY_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,

    /// Client side: CA bundle (PEM) that client certificates must chain to; when set, clients must present a certificate. Repeatable or comma-separated to trust old and new CAs during a migration; reloaded on change.
    #[arg(long, env = "ETCD_COMPAT_PROXY_TRUSTED_CA_FILE", value_name = "FILE", value_delimiter = ',')]
    #[serde(default, deserialize_with = "one_or_many")]
    pub trusted_ca_file: Option<Vec<PathBuf>>,

    /// Client side: certificate revocation list (PEM) checked against client certificates.
    #[arg(long, env = "ETCD_COMPAT_PROXY_CLIENT_CRL_FILE", value_name = "FILE")]
    pub client_crl_file: Option<PathBuf>,

    /// Upstream: client certificate (PEM) the proxy presents to etcd.
    #[arg(long, env = "ETCD_COMPAT_PROXY_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// Upstream: private key (PEM) for `--cert`.
    #[arg(long, env = "ETCD_COMPAT_PROXY_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// Upstream: CA bundle (PEM) that etcd's server certificates must chain to; enables TLS to etcd. Repeatable or comma-separated for several CAs; reloaded on change.
    #[arg(long, env = "ETCD_COMPAT_PROXY_CACERT", value_name = "FILE", value_delimiter = ',')]
    #[serde(default, deserialize_with = "one_or_many")]
    pub cacert: Option<Vec<PathBuf>>,

    /// Upstream: do not verify etcd's server certificates (testing only).
    #[arg(long, env = "ETCD_COMPAT_PROXY_INSECURE_SKIP_TLS_VERIFY", num_args = 0..=1, default_missing_value = "true")]
    pub insecure_skip_tls_verify: Option<bool>,

    /// Client side: CA (PEM) of legacy clients whose expired certificates are still let in until --legacy-client-expired-until (each such connection is logged and counted); certificates must otherwise verify against it.
    #[arg(long, env = "ETCD_COMPAT_PROXY_LEGACY_CLIENT_CA_FILE", value_name = "FILE")]
    pub legacy_client_ca_file: Option<PathBuf>,

    /// Client side: last day (YYYY-MM-DD, UTC, inclusive) on which --legacy-client-ca-file lets expired client certificates in; required with it.
    #[arg(long, env = "ETCD_COMPAT_PROXY_LEGACY_CLIENT_EXPIRED_UNTIL", value_name = "YYYY-MM-DD")]
    pub legacy_client_expired_until: Option<String>,

    /// Upstream: accept etcd server certificates that have no subjectAltName when their subject CN is this name (old certificates; chain and signatures are still verified).
    #[arg(long, env = "ETCD_COMPAT_PROXY_UPSTREAM_SERVER_CN", value_name = "NAME")]
    pub upstream_server_cn: Option<String>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_CERT_EXPIRY_WARNING_DAYS", value_name = "DAYS", help = with_default("Log a warning for every loaded certificate that expires within this many days", defaults::CERT_EXPIRY_WARNING_DAYS))]
    pub cert_expiry_warning_days: Option<u32>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_CERT_EXPIRY_CRITICAL_DAYS", value_name = "DAYS", help = with_default("`/health` reports `\"degraded\":true` while a loaded certificate expires within this many days", defaults::CERT_EXPIRY_CRITICAL_DAYS))]
    pub cert_expiry_critical_days: Option<u32>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_CERT_RELOAD_INTERVAL", value_name = "DURATION", help = with_default("How often certificate, key, CA and CRL files are checked for changes, e.g. `1s` (SIGHUP reloads at once)", defaults::CERT_RELOAD_INTERVAL))]
    pub cert_reload_interval: Option<String>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_MAX_CONCURRENT_STREAMS", help = with_default("Maximum concurrent streams each client connection may open", defaults::MAX_CONCURRENT_STREAMS))]
    pub max_concurrent_streams: Option<u32>,

    /// Enable debug-level logging.
    #[arg(long, env = "ETCD_COMPAT_PROXY_DEBUG", num_args = 0..=1, default_missing_value = "true")]
    pub debug: Option<bool>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_DIAL_TIMEOUT", value_name = "DURATION", help = with_default("Timeout for connecting to an etcd member, e.g. `2s`, `500ms`", defaults::DIAL_TIMEOUT))]
    pub dial_timeout: Option<String>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_HEALTH_INTERVAL", value_name = "DURATION", help = with_default("How often each member's health is checked, e.g. `1s`", defaults::HEALTH_INTERVAL))]
    pub health_interval: Option<String>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_SHUTDOWN_GRACE", value_name = "DURATION", help = with_default("On SIGTERM, how long in-flight unary calls may take to finish before connections are closed", defaults::SHUTDOWN_GRACE))]
    pub shutdown_grace: Option<String>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_MAX_RESPONSE_BYTES", value_name = "BYTES", help = with_default("Largest message, in encoded bytes, sent to a client classified as size-limited", defaults::MAX_RESPONSE_BYTES))]
    pub max_response_bytes: Option<u64>,

    /// Key prefix whose oversize Range results are cut to a first page with `more=true` for limited clients that did not set `limit` (repeatable; only for clients known to follow `more`).
    #[arg(long, env = "ETCD_COMPAT_PROXY_TRUNCATE_OVERSIZE_PREFIX", value_name = "PREFIX", value_delimiter = ',')]
    pub truncate_oversize_prefix: Option<Vec<String>>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_LIMITED_USER_AGENT", value_name = "PREFIX", value_delimiter = ',', help = format!("User-agent prefix of clients that are size-limited (repeatable; replaces the default list: {})", crate::budget::DEFAULT_LIMITED_USER_AGENTS.join(", ")))]
    pub limited_user_agent: Option<Vec<String>>,

    /// User-agent prefix of clients that are never size-limited, checked before every other rule (repeatable).
    #[arg(long, env = "ETCD_COMPAT_PROXY_UNLIMITED_USER_AGENT", value_name = "PREFIX", value_delimiter = ',')]
    pub unlimited_user_agent: Option<Vec<String>>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_LIMIT_GO_WITHOUT_API_VERSION", value_name = "BOOL", help = with_default("Size-limit grpc-go clients that send no `client-api-version` metadata (clientv3 before 3.4, plain grpc-go programs)", defaults::LIMIT_GO_WITHOUT_API_VERSION))]
    pub limit_go_without_api_version: Option<bool>,

    /// etcd user that clients sending no token act as; its password comes from --password-file or the ETCD_COMPAT_PROXY_PASSWORD environment variable, never from the command line.
    #[arg(long, env = "ETCD_COMPAT_PROXY_USER", value_name = "NAME")]
    pub user: Option<String>,

    /// File holding the password of --user (a trailing newline is ignored).
    #[arg(long, env = "ETCD_COMPAT_PROXY_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// etcd identity for mTLS clients whose certificate has this CN and that send no token, as CN=USER:PASSWORD_FILE (repeatable).
    #[arg(
        long,
        env = "ETCD_COMPAT_PROXY_CLIENT_CN_IDENTITY",
        value_name = "CN=USER:PASSWORD_FILE",
        value_delimiter = ','
    )]
    pub client_cn_identity: Option<Vec<String>>,

    /// Keys that seal the proxy's session tokens, one per line, each the base64 of at least 32 random bytes (`head -c 32 /dev/urandom | base64`); the first seals new tokens, all open them. Replicas sharing the file accept each other's tokens, and tokens survive restarts; reloaded on change. Without it, a random key per process.
    #[arg(long, env = "ETCD_COMPAT_PROXY_SESSION_KEY_FILE", value_name = "FILE")]
    pub session_key_file: Option<PathBuf>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_AUTH_SESSION_IDLE_TIMEOUT", value_name = "DURATION", help = with_default("A session unused this long is dropped from memory (with its etcd token); its proxy token still opens it again while its key is loaded", defaults::AUTH_SESSION_IDLE_TIMEOUT))]
    pub auth_session_idle_timeout: Option<String>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_MAX_LOGIN_DELAY", value_name = "DURATION", help = with_default("Longest delay of an Authenticate call from an address whose recent logins failed; the delay doubles from 100ms after 3 failures, and that address's logins are answered one at a time", defaults::MAX_LOGIN_DELAY))]
    pub max_login_delay: Option<String>,

    // --- Limits that keep one client from costing the others (see README, "Limits"). ---
    #[arg(long, env = "ETCD_COMPAT_PROXY_MAX_REQUEST_BYTES", value_name = "BYTES", help = with_default("etcd's `--max-request-bytes` on the cluster: request messages larger than this plus gRPC's 512 KiB allowance are refused as etcd refuses them, before they are read", defaults::MAX_REQUEST_BYTES))]
    pub max_request_bytes: Option<u64>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_MAX_HEADER_LIST_BYTES", value_name = "BYTES", help = with_default("Largest header block a client may send (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE, counted as decoded)", defaults::MAX_HEADER_LIST_BYTES))]
    pub max_header_list_bytes: Option<u32>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_MAX_BUFFERED_RESPONSE_BYTES", value_name = "BYTES", help = with_default("etcd data held for one client call or stream that is not reading: unary answers up to this size are read whole from etcd, and a Watch or keep-alive stream whose client falls this far behind is paused upstream and resumed from its next undelivered revision", defaults::MAX_BUFFERED_RESPONSE_BYTES))]
    pub max_buffered_response_bytes: Option<u64>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_MAX_HELD_REQUEST_BYTES", value_name = "BYTES", help = with_default("Request messages all calls together may make the proxy hold: unary requests until their call ends (kept for retries), and what Watch and keep-alive streams hold of their clients' messages; a unary request that finds no room waits up to --request-body-timeout, then gets Unavailable, a stream is ended at once. At least the largest request message (--max-request-bytes + 512 KiB + 5)", defaults::MAX_HELD_REQUEST_BYTES))]
    pub max_held_request_bytes: Option<u64>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_MAX_HELD_RESPONSE_BYTES", value_name = "BYTES", help = with_default("Answers all calls together may make the proxy hold for clients that have not taken them yet: answers over 64 KiB read whole from etcd (up to --max-buffered-response-bytes) count until the client's connection has taken their last byte; a read (a Range, or a Txn that only reads) whose answer finds no room gets Unavailable (safe to retry), the answer of a call that changed something is always delivered. etcd's messages waiting on a Watch or keep-alive stream behind its first 64 KiB count until the connection has taken them (a shared watch's once for all its clients); while the memory is full, a stream more than 64 KiB behind takes no more until its client catches up. At least --max-buffered-response-bytes + 5", defaults::MAX_HELD_RESPONSE_BYTES))]
    pub max_held_response_bytes: Option<u64>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_UNREAD_RESPONSE_TIMEOUT", value_name = "DURATION", help = with_default("A client connection that takes nothing of an answer waiting for it (over 64 KiB, or streamed), or of a Watch or keep-alive stream more than 64 KiB behind, for this long is closed, and what it held is freed", defaults::UNREAD_RESPONSE_TIMEOUT))]
    pub unread_response_timeout: Option<String>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_HANDSHAKE_TIMEOUT", value_name = "DURATION", help = with_default("Time a new client connection has to complete its TLS handshake and send the HTTP/2 preface and SETTINGS", defaults::HANDSHAKE_TIMEOUT))]
    pub handshake_timeout: Option<String>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_IDLE_CONNECTION_TIMEOUT", value_name = "DURATION", help = with_default("After this long with nothing received on a client connection, the proxy pings it, and closes it if the ping is not answered within the same time (at most 20s); `0s` turns this off", defaults::IDLE_CONNECTION_TIMEOUT))]
    pub idle_connection_timeout: Option<String>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_REQUEST_BODY_TIMEOUT", value_name = "DURATION", help = with_default("Longest pause allowed while a request message is incomplete; the call then ends with DeadlineExceeded", defaults::REQUEST_BODY_TIMEOUT))]
    pub request_body_timeout: Option<String>,

    // --- Serving many identical clients (see README, "Serving a fleet"). ---
    #[arg(long, env = "ETCD_COMPAT_PROXY_SERIALIZABLE_CACHE_BYTES", value_name = "BYTES", help = with_default("Memory for answers to serializable Ranges, kept coherent by a watch of the cached keys and by writes made through the proxy; `0` turns the cache off", defaults::SERIALIZABLE_CACHE_BYTES))]
    pub serializable_cache_bytes: Option<u64>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_WATCH_COALESCING", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", help = with_default("Client watches that ask for the same thing as the same etcd user share one upstream watch, so that etcd sends each event once", defaults::WATCH_COALESCING))]
    pub watch_coalescing: Option<bool>,

    // --- What the doctor judges the cluster against (`doctor` and the admin `/doctor`). ---
    #[arg(long, env = "ETCD_COMPAT_PROXY_QUOTA_BACKEND_BYTES", value_name = "BYTES", help = with_default("The members' --quota-backend-bytes, which etcd before 3.6 does not report: the doctor judges database sizes against it", defaults::QUOTA_BACKEND_BYTES))]
    pub quota_backend_bytes: Option<u64>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_HISTORY_WARNING_REVISIONS", value_name = "N", help = with_default("Revisions of history (current minus compacted) past which the doctor warns that compaction does not run", defaults::HISTORY_WARNING_REVISIONS))]
    pub history_warning_revisions: Option<u64>,

    #[arg(long, env = "ETCD_COMPAT_PROXY_DOCTOR_SCAN_BYTES", value_name = "BYTES", help = with_default("Keys and values the doctor reads at most to find prefixes near the response budget", defaults::DOCTOR_SCAN_BYTES))]
    pub doctor_scan_bytes: Option<u64>,

    // --- grpc-proxy flags that have no meaning here: accepted so unit files keep working. ---
    /// Accepted for grpc-proxy compatibility; the proxy keeps no persistent data.
    #[arg(long, env = "ETCD_COMPAT_PROXY_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<String>,

    /// Accepted for grpc-proxy compatibility; no profiling endpoint is served.
    #[arg(long, env = "ETCD_COMPAT_PROXY_ENABLE_PPROF", num_args = 0..=1, default_missing_value = "true")]
    pub enable_pprof: Option<bool>,

    /// Accepted for grpc-proxy compatibility; proxy self-registration is not done.
    #[arg(long, env = "ETCD_COMPAT_PROXY_RESOLVER_PREFIX")]
    pub resolver_prefix: Option<String>,

    /// Accepted for grpc-proxy compatibility; see `--resolver-prefix`.
    #[arg(long, env = "ETCD_COMPAT_PROXY_RESOLVER_TTL")]
    pub resolver_ttl: Option<i64>,

    /// Accepted for grpc-proxy compatibility; request messages are limited by `--max-request-bytes`.
    #[arg(long, env = "ETCD_COMPAT_PROXY_MAX_SEND_BYTES")]
    pub max_send_bytes: Option<u64>,

    /// Accepted for grpc-proxy compatibility; answers from etcd are forwarded without a size limit.
    #[arg(long, env = "ETCD_COMPAT_PROXY_MAX_RECV_BYTES")]
    pub max_recv_bytes: Option<u64>,

    /// Accepted for grpc-proxy compatibility; reads are forwarded to one pinned member at a time.
    #[arg(long, env = "ETCD_COMPAT_PROXY_EXPERIMENTAL_SERIALIZABLE_ORDERING", num_args = 0..=1, default_missing_value = "true")]
    pub experimental_serializable_ordering: Option<bool>,

    // --- grpc-proxy flags that change semantics and are not implemented: refused if set. ---
    /// Not supported yet: prefix all keys with this namespace (refused rather than ignored, since ignoring it would write outside the namespace).
    #[arg(long, env = "ETCD_COMPAT_PROXY_NAMESPACE")]
    pub namespace: Option<String>,

    /// Not supported: DNS SRV discovery; list the members in `--endpoints`.
    #[arg(long, env = "ETCD_COMPAT_PROXY_DISCOVERY_SRV")]
    pub discovery_srv: Option<String>,

    /// Not supported: see `--discovery-srv`.
    #[arg(long, env = "ETCD_COMPAT_PROXY_DISCOVERY_SRV_NAME")]
    pub discovery_srv_name: Option<String>,

    /// Not supported: see `--discovery-srv`.
    #[arg(long, env = "ETCD_COMPAT_PROXY_INSECURE_DISCOVERY", num_args = 0..=1, default_missing_value = "true")]
    pub insecure_discovery: Option<bool>,

    /// Not supported: leasing cache.
    #[arg(long, env = "ETCD_COMPAT_PROXY_EXPERIMENTAL_LEASING_PREFIX")]
    pub experimental_leasing_prefix: Option<String>,

    /// Not supported yet: generated self-signed listener certificates; pass `--cert-file`/`--key-file`.
    #[arg(long, env = "ETCD_COMPAT_PROXY_AUTO_TLS", num_args = 0..=1, default_missing_value = "true")]
    pub auto_tls: Option<bool>,

    /// Not supported yet: restrict client-side TLS cipher suites (the defaults are TLS 1.3 and TLS 1.2 ECDHE AEAD suites).
    #[arg(long, env = "ETCD_COMPAT_PROXY_LISTEN_CIPHER_SUITES", value_delimiter = ',')]
    pub listen_cipher_suites: Option<Vec<String>>,
}

/// Fills every unset field of `$self` from `$other` (the lower-precedence source).
macro_rules! merge_fields {
    ($self:ident, $other:ident, $($field:ident),+ $(,)?) => {
        $( if $self.$field.is_none() { $self.$field = $other.$field; } )+
    };
}

impl StartArgs {
    /// Fills unset settings from the `--config` file, if one was given.
    pub fn merge_config_file(mut self) -> Result<Self, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text =
            std::fs::read_to_string(&path).map_err(|source| ConfigError::ReadFile { path: path.clone(), source })?;
        let file: StartArgs = toml::from_str(&text)
            .map_err(|source| ConfigError::ParseFile { path: path.clone(), message: source.to_string() })?;
        merge_fields!(
            self,
            file,
            endpoints,
            listen_addr,
            advertise_client_url,
            member_list,
            cluster_refresh_interval,
            learner_serializable_reads,
            workers,
            reuse_port,
            metrics_addr,
            admin_token_file,
            cert_file,
            key_file,
            trusted_ca_file,
            client_crl_file,
            cert,
            key,
            cacert,
            insecure_skip_tls_verify,
            legacy_client_ca_file,
            legacy_client_expired_until,
            upstream_server_cn,
            cert_expiry_warning_days,
            cert_expiry_critical_days,
            cert_reload_interval,
            max_concurrent_streams,
            debug,
            dial_timeout,
            health_interval,
            shutdown_grace,
            max_response_bytes,
            truncate_oversize_prefix,
            limited_user_agent,
            unlimited_user_agent,
            limit_go_without_api_version,
            user,
            password_file,
            client_cn_identity,
            session_key_file,
            auth_session_idle_timeout,
            max_login_delay,
            max_request_bytes,
            max_header_list_bytes,
            max_buffered_response_bytes,
            max_held_request_bytes,
            max_held_response_bytes,
            unread_response_timeout,
            serializable_cache_bytes,
            watch_coalescing,
            quota_backend_bytes,
            history_warning_revisions,
            doctor_scan_bytes,
            handshake_timeout,
            idle_connection_timeout,
            request_body_timeout,
            data_dir,
            enable_pprof,
            resolver_prefix,
            resolver_ttl,
            max_send_bytes,
            max_recv_bytes,
            experimental_serializable_ordering,
            namespace,
            discovery_srv,
            discovery_srv_name,
            insecure_discovery,
            experimental_leasing_prefix,
            auto_tls,
            listen_cipher_suites,
        );
        Ok(self)
    }

    /// Checks every setting and turns them into a [`Config`]; reads (but does not keep open) the TLS files.
    pub fn validate(self) -> Result<Config, ConfigError> {
        refuse_if_set(
            "namespace",
            self.namespace.as_deref().filter(|s| !s.is_empty()),
            "namespacing is not implemented yet; run without it or use etcd grpc-proxy for namespaced clients",
        )?;
        refuse_if_set(
            "discovery-srv",
            self.discovery_srv.as_deref().filter(|s| !s.is_empty()),
            "DNS SRV discovery is not supported; list the members in --endpoints",
        )?;
        refuse_if_set(
            "discovery-srv-name",
            self.discovery_srv_name.as_deref().filter(|s| !s.is_empty()),
            "DNS SRV discovery is not supported; list the members in --endpoints",
        )?;
        refuse_if_set(
            "insecure-discovery",
            self.insecure_discovery.filter(|b| *b),
            "DNS SRV discovery is not supported; list the members in --endpoints",
        )?;
        refuse_if_set(
            "experimental-leasing-prefix",
            self.experimental_leasing_prefix.as_deref().filter(|s| !s.is_empty()),
            "the leasing cache is not supported; remove the flag",
        )?;
        refuse_if_set("auto-tls", self.auto_tls.filter(|b| *b), "generated listener certificates are not supported yet; create them with openssl or cfssl and pass --cert-file/--key-file")?;
        refuse_if_set("listen-cipher-suites", self.listen_cipher_suites.as_ref().filter(|v| !v.is_empty()), "cipher suite selection is not supported yet; the listener offers TLS 1.3 and TLS 1.2 ECDHE-AES-GCM/CHACHA20 suites")?;

        let max_concurrent_streams = self.max_concurrent_streams.unwrap_or(defaults::MAX_CONCURRENT_STREAMS);
        if max_concurrent_streams == 0 {
            return Err(ConfigError::invalid(
                "max-concurrent-streams",
                "0",
                "must be at least 1; with 0 a client could open no call at all",
            ));
        }
        let limits = client_limits(&self)?;

        let endpoints = self.endpoints.unwrap_or_else(|| vec![defaults::ENDPOINTS.to_owned()]);
        let upstream_tls_requested = self.cacert.is_some()
            || self.cert.is_some()
            || self.key.is_some()
            || self.insecure_skip_tls_verify == Some(true);
        let endpoints = endpoints
            .iter()
            .map(|raw| {
                Endpoint::parse(raw, upstream_tls_requested).map_err(|why| ConfigError::invalid("endpoints", raw, why))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(ConfigError::invalid("endpoints", "", "at least one etcd endpoint is required"));
        }
        let upstream_tls = if endpoints.iter().any(|e| e.tls) {
            Some(upstream_tls_files(
                self.cacert.unwrap_or_default(),
                self.cert,
                self.key,
                self.insecure_skip_tls_verify == Some(true),
                self.upstream_server_cn,
            )?)
        } else {
            None
        };

        let listen_raw = self.listen_addr.unwrap_or_else(|| defaults::LISTEN_ADDR.to_owned());
        let listen_addr = parse_socket_addr("listen-addr", &listen_raw)?;
        let advertised_client_urls = self
            .advertise_client_url
            .as_deref()
            .map(|raw| advertised_urls(raw, self.cert_file.is_some()))
            .transpose()?;
        let advertise_client_url =
            self.advertise_client_url.unwrap_or_else(|| defaults::ADVERTISE_CLIENT_URL.to_owned());
        let member_list = match self.member_list.as_deref().unwrap_or(defaults::MEMBER_LIST) {
            "proxy" => MemberListMode::Proxy,
            "real" => MemberListMode::Real,
            other => return Err(ConfigError::invalid("member-list", other, "expected proxy or real")),
        };
        let metrics_addr = self.metrics_addr.as_deref().map(parse_metrics_addr).transpose()?;
        let admin_token = self.admin_token_file.as_deref().map(read_admin_token).transpose()?;
        if admin_token.is_some() && metrics_addr.is_none() {
            return Err(ConfigError::invalid(
                "admin-token-file",
                &self.admin_token_file.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
                "admin calls are served on --metrics-addr, which is not set; set both",
            ));
        }
        let legacy = legacy_exception(self.legacy_client_ca_file, self.legacy_client_expired_until)?;
        let listener_tls = listener_tls_files(
            self.cert_file,
            self.key_file,
            self.trusted_ca_file.unwrap_or_default(),
            self.client_crl_file,
            legacy,
        )?;
        let cert_expiry = crate::tls::ExpiryPolicy {
            warning_days: self.cert_expiry_warning_days.unwrap_or(defaults::CERT_EXPIRY_WARNING_DAYS),
            critical_days: self.cert_expiry_critical_days.unwrap_or(defaults::CERT_EXPIRY_CRITICAL_DAYS),
        };

        let mut ignored = Vec::new();
        let mut note_ignored = |flag: &'static str, set: bool, why: &'static str| {
            if set {
                ignored.push(IgnoredFlag { flag, why });
            }
        };
        note_ignored("data-dir", self.data_dir.is_some(), "the proxy keeps no persistent data");
        note_ignored("enable-pprof", self.enable_pprof == Some(true), "no profiling endpoint is served");
        note_ignored("resolver-prefix", self.resolver_prefix.is_some(), "the proxy does not register itself in etcd");
        note_ignored("resolver-ttl", self.resolver_ttl.is_some(), "the proxy does not register itself in etcd");
        note_ignored(
            "max-send-bytes",
            self.max_send_bytes.is_some(),
            "request messages are limited by --max-request-bytes",
        );
        note_ignored(
            "max-recv-bytes",
            self.max_recv_bytes.is_some(),
            "answers from etcd are forwarded without a size limit",
        );
        note_ignored(
            "experimental-serializable-ordering",
            self.experimental_serializable_ordering == Some(true),
            "reads go to one pinned member at a time",
        );

        let max_response_bytes = self.max_response_bytes.unwrap_or(defaults::MAX_RESPONSE_BYTES);
        if max_response_bytes < 1024 {
            return Err(ConfigError::invalid(
                "max-response-bytes",
                &max_response_bytes.to_string(),
                "must be at least 1024; the usual gRPC limit is 4194304",
            ));
        }
        let truncate_prefixes = self.truncate_oversize_prefix.unwrap_or_default();
        if truncate_prefixes.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::invalid(
                "truncate-oversize-prefix",
                "",
                "an empty prefix would cut every oversize range; name the key prefixes whose clients follow `more`",
            ));
        }
        let budget = crate::budget::BudgetPolicy {
            max_response_bytes: usize::try_from(max_response_bytes).unwrap_or(usize::MAX),
            limited_user_agents: self
                .limited_user_agent
                .unwrap_or_else(|| crate::budget::DEFAULT_LIMITED_USER_AGENTS.iter().map(|s| s.to_string()).collect()),
            unlimited_user_agents: self.unlimited_user_agent.unwrap_or_default(),
            limit_go_without_api_version: self
                .limit_go_without_api_version
                .unwrap_or(defaults::LIMIT_GO_WITHOUT_API_VERSION),
            truncate_prefixes: truncate_prefixes.into_iter().map(bytes::Bytes::from).collect(),
        };

        let auth = crate::auth::AuthConfig {
            default_identity: default_identity(self.user, self.password_file)?,
            cn_identities: self
                .client_cn_identity
                .unwrap_or_default()
                .iter()
                .map(|raw| cn_identity(raw))
                .collect::<Result<_, _>>()?,
            session_idle_timeout: parse_duration_setting(
                "auth-session-idle-timeout",
                self.auth_session_idle_timeout.as_deref(),
                defaults::AUTH_SESSION_IDLE_TIMEOUT,
            )?,
            max_login_delay: parse_duration_setting(
                "max-login-delay",
                self.max_login_delay.as_deref(),
                defaults::MAX_LOGIN_DELAY,
            )?,
            session_keys: self.session_key_file.map(|path| session_keys(&path)).transpose()?,
        };

        Ok(Config {
            auth,
            budget,
            endpoints,
            listen_addr,
            reuse_port: self.reuse_port.unwrap_or(defaults::REUSE_PORT),
            workers: workers(self.workers)?,
            advertise_client_url,
            advertised_client_urls,
            member_list,
            cluster_refresh_interval: parse_duration_setting(
                "cluster-refresh-interval",
                self.cluster_refresh_interval.as_deref(),
                defaults::CLUSTER_REFRESH_INTERVAL,
            )?,
            learner_serializable_reads: self.learner_serializable_reads.unwrap_or(defaults::LEARNER_SERIALIZABLE_READS),
            metrics_addr,
            admin_token,
            listener_tls,
            upstream_tls,
            max_concurrent_streams,
            limits,
            debug: self.debug.unwrap_or(false),
            dial_timeout: parse_duration_setting("dial-timeout", self.dial_timeout.as_deref(), defaults::DIAL_TIMEOUT)?,
            health_interval: parse_duration_setting(
                "health-interval",
                self.health_interval.as_deref(),
                defaults::HEALTH_INTERVAL,
            )?,
            shutdown_grace: parse_duration_setting(
                "shutdown-grace",
                self.shutdown_grace.as_deref(),
                defaults::SHUTDOWN_GRACE,
            )?,
            ignored_flags: ignored,
            serializable_cache_bytes: usize::try_from(
                self.serializable_cache_bytes.unwrap_or(defaults::SERIALIZABLE_CACHE_BYTES),
            )
            .unwrap_or(usize::MAX),
            watch_coalescing: self.watch_coalescing.unwrap_or(defaults::WATCH_COALESCING),
            doctor: DoctorLimits {
                quota_backend_bytes: i64::try_from(self.quota_backend_bytes.unwrap_or(defaults::QUOTA_BACKEND_BYTES))
                    .unwrap_or(i64::MAX),
                history_warning_revisions: i64::try_from(
                    self.history_warning_revisions.unwrap_or(defaults::HISTORY_WARNING_REVISIONS),
                )
                .unwrap_or(i64::MAX),
                scan_bytes: self.doctor_scan_bytes.unwrap_or(defaults::DOCTOR_SCAN_BYTES),
            },
            cert_expiry,
            cert_reload_interval: parse_duration_setting(
                "cert-reload-interval",
                self.cert_reload_interval.as_deref(),
                defaults::CERT_RELOAD_INTERVAL,
            )?,
        })
    }
}

/// The environment variable that may hold --user's password (kept off the command line, where
/// every user of the machine can read it).
const PASSWORD_ENV: &str = "ETCD_COMPAT_PROXY_PASSWORD";

fn default_identity(
    user: Option<String>,
    password_file: Option<PathBuf>,
) -> Result<Option<crate::auth::Credentials>, ConfigError> {
    let env_password = std::env::var_os(PASSWORD_ENV).map(|p| p.into_encoded_bytes());
    let Some(user) = user else {
        if password_file.is_some() || env_password.is_some() {
            return Err(ConfigError::invalid(
                "user",
                "",
                "a password is set but no --user; name the etcd user that clients without a token act as",
            ));
        }
        return Ok(None);
    };
    let password = match (password_file, env_password) {
        (Some(path), _) => read_password_file("password-file", &path)?,
        (None, Some(password)) if !password.is_empty() => password,
        _ => {
            return Err(ConfigError::invalid(
                "user",
                &user,
                "needs a password: --password-file FILE or the ETCD_COMPAT_PROXY_PASSWORD environment variable",
            ))
        }
    };
    Ok(Some(crate::auth::Credentials { user, password: crate::auth::Secret::new(password) }))
}

fn cn_identity(raw: &str) -> Result<(String, crate::auth::Credentials), ConfigError> {
    const FLAG: &str = "client-cn-identity";
    let parsed = raw.split_once('=').and_then(|(cn, rest)| Some((cn, rest.split_once(':')?)));
    let Some((cn, (user, file))) =
        parsed.filter(|(cn, (user, file))| !cn.is_empty() && !user.is_empty() && !file.is_empty())
    else {
        return Err(ConfigError::invalid(
            FLAG,
            raw,
            "expected CN=USER:PASSWORD_FILE, e.g. scheduler=jobs:/etc/etcd-proxy/jobs.password",
        ));
    };
    let password = read_password_file(FLAG, std::path::Path::new(file))?;
    Ok((
        cn.to_owned(),
        crate::auth::Credentials { user: user.to_owned(), password: crate::auth::Secret::new(password) },
    ))
}

fn read_password_file(flag: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    let shown = path.display().to_string();
    let mut password = std::fs::read(path)
        .map_err(|e| ConfigError::invalid(flag, &shown, &format!("cannot read the password file: {e}")))?;
    while password.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        password.pop();
    }
    if password.is_empty() {
        return Err(ConfigError::invalid(flag, &shown, "the password file is empty"));
    }
    Ok(password)
}

/// Shortest admin token accepted: a guessable one would open the admin calls to anyone who can
/// reach the admin address.
const MIN_ADMIN_TOKEN_BYTES: usize = 16;

/// Reads `--admin-token-file`: its content without the trailing newline, at least 16 bytes.
pub fn read_admin_token(path: &std::path::Path) -> Result<crate::auth::Secret, ConfigError> {
    let token = read_password_file("admin-token-file", path)?;
    if token.len() < MIN_ADMIN_TOKEN_BYTES || token.iter().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(ConfigError::invalid(
            "admin-token-file",
            &path.display().to_string(),
            "the token must be one line of at least 16 printable characters; make one with `head -c 32 /dev/urandom | base64`",
        ));
    }
    Ok(crate::auth::Secret::new(token))
}

fn refuse_if_set<T>(flag: &'static str, value: Option<T>, why: &'static str) -> Result<(), ConfigError> {
    match value {
        Some(_) => Err(ConfigError::Unsupported { flag, why }),
        None => Ok(()),
    }
}

/// The client limits from their flags.
fn client_limits(args: &StartArgs) -> Result<ClientLimits, ConfigError> {
    let max_request_bytes = args.max_request_bytes.unwrap_or(defaults::MAX_REQUEST_BYTES);
    if max_request_bytes < 1024 {
        return Err(ConfigError::invalid(
            "max-request-bytes",
            &max_request_bytes.to_string(),
            "must be at least 1024; set it to the cluster's etcd --max-request-bytes (1572864 by default)",
        ));
    }
    let max_request_message = usize::try_from(max_request_bytes)
        .ok()
        .and_then(|bytes| bytes.checked_add(ClientLimits::GRPC_OVERHEAD_BYTES))
        .filter(|bytes| *bytes <= u32::MAX as usize)
        .ok_or_else(|| {
            ConfigError::invalid(
                "max-request-bytes",
                &max_request_bytes.to_string(),
                "too large: a gRPC message is at most 4 GiB",
            )
        })?;
    let max_header_list = args.max_header_list_bytes.unwrap_or(defaults::MAX_HEADER_LIST_BYTES);
    if max_header_list < 1024 {
        return Err(ConfigError::invalid(
            "max-header-list-bytes",
            &max_header_list.to_string(),
            "must be at least 1024; etcd clients send a few hundred bytes of headers, tokens included",
        ));
    }
    let max_buffered_response = args.max_buffered_response_bytes.unwrap_or(defaults::MAX_BUFFERED_RESPONSE_BYTES);
    if max_buffered_response < 64 * 1024 {
        return Err(ConfigError::invalid(
            "max-buffered-response-bytes",
            &max_buffered_response.to_string(),
            "must be at least 65536; smaller values pause watches of clients that are only a little behind",
        ));
    }
    let max_held_requests = args.max_held_request_bytes.unwrap_or(defaults::MAX_HELD_REQUEST_BYTES);
    if max_held_requests < max_request_message as u64 + 5 {
        return Err(ConfigError::invalid(
            "max-held-request-bytes",
            &max_held_requests.to_string(),
            &format!(
                "must be at least {}, the largest request message (--max-request-bytes + 512 KiB, and its 5-byte prefix), or such a request could never be read",
                max_request_message + 5
            ),
        ));
    }
    let max_held_responses = args.max_held_response_bytes.unwrap_or(defaults::MAX_HELD_RESPONSE_BYTES);
    if max_held_responses < max_buffered_response + 5 {
        return Err(ConfigError::invalid(
            "max-held-response-bytes",
            &max_held_responses.to_string(),
            &format!(
                "must be at least {}, the largest answer read whole (--max-buffered-response-bytes, and its 5-byte prefix), or such an answer to a read could never be held",
                max_buffered_response + 5
            ),
        ));
    }
    let unread_response_timeout = parse_duration_setting(
        "unread-response-timeout",
        args.unread_response_timeout.as_deref(),
        defaults::UNREAD_RESPONSE_TIMEOUT,
    )?;
    if unread_response_timeout < Duration::from_secs(1) {
        return Err(ConfigError::invalid(
            "unread-response-timeout",
            args.unread_response_timeout.as_deref().unwrap_or_default(),
            "must be at least 1s; a client on a slow link may take a moment between pieces of an answer",
        ));
    }
    let idle_raw = args.idle_connection_timeout.as_deref().unwrap_or(defaults::IDLE_CONNECTION_TIMEOUT);
    let idle_connection_timeout = match parse_duration(idle_raw) {
        Some(duration) if duration.is_zero() => None,
        Some(duration) => Some(duration),
        None => {
            return Err(ConfigError::invalid(
                "idle-connection-timeout",
                idle_raw,
                "expected a duration such as 30s or 3m, or 0s to never ping idle clients",
            ))
        }
    };
    Ok(ClientLimits {
        max_request_message,
        max_header_list,
        max_buffered_response: usize::try_from(max_buffered_response).unwrap_or(usize::MAX),
        max_held_requests: usize::try_from(max_held_requests).unwrap_or(usize::MAX),
        max_held_responses: usize::try_from(max_held_responses).unwrap_or(usize::MAX),
        unread_response_timeout,
        handshake_timeout: parse_duration_setting(
            "handshake-timeout",
            args.handshake_timeout.as_deref(),
            defaults::HANDSHAKE_TIMEOUT,
        )?,
        idle_connection_timeout,
        request_body_timeout: parse_duration_setting(
            "request-body-timeout",
            args.request_body_timeout.as_deref(),
            defaults::REQUEST_BODY_TIMEOUT,
        )?,
    })
}

/// Parses `--advertise-client-url`: comma-separated `host:port` or `http(s)://host:port`; a bare
/// `host:port` gets the listener's scheme.
fn advertised_urls(raw: &str, listener_tls: bool) -> Result<Vec<String>, ConfigError> {
    let urls = raw
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            let endpoint = Endpoint::parse(u, listener_tls).map_err(|_| {
                ConfigError::invalid("advertise-client-url", u, "expected host:port or http(s)://host:port")
            })?;
            Ok(endpoint.url())
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    if urls.is_empty() {
        return Err(ConfigError::invalid("advertise-client-url", raw, "at least one URL is required"));
    }
    Ok(urls)
}

/// The legacy-client exception from its two flags, which go together.
fn legacy_exception(ca: Option<PathBuf>, until: Option<String>) -> Result<Option<LegacyClientException>, ConfigError> {
    match (ca, until) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::invalid(
            "legacy-client-expired-until",
            "",
            "--legacy-client-ca-file needs an end date for the exception, e.g. --legacy-client-expired-until=2027-06-30",
        )),
        (None, Some(until)) => Err(ConfigError::invalid(
            "legacy-client-ca-file",
            &until,
            "--legacy-client-expired-until needs --legacy-client-ca-file naming the legacy clients' CA",
        )),
        (Some(ca), Some(until)) => {
            let day = parse_date(&until).ok_or_else(|| {
                ConfigError::invalid("legacy-client-expired-until", &until, "expected a date YYYY-MM-DD (UTC)")
            })?;
            let until_unix = day.midnight().assume_utc().unix_timestamp() + 86_399;
            if until_unix < crate::tls::now_unix() {
                return Err(ConfigError::invalid(
                    "legacy-client-expired-until",
                    &until,
                    "the date has passed, so the exception would let nobody in; remove both legacy flags or give a future date",
                ));
            }
            Ok(Some(LegacyClientException { ca, until_unix }))
        }
    }
}

fn parse_date(raw: &str) -> Option<time::Date> {
    let mut parts = raw.trim().splitn(3, '-');
    let year: i32 = parts.next()?.parse().ok()?;
    let month: u8 = parts.next()?.parse().ok()?;
    let day: u8 = parts.next()?.parse().ok()?;
    time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()
}

/// Accepts a TOML string or an array of strings for settings that may name several files.
fn one_or_many<'de, D>(deserializer: D) -> Result<Option<Vec<PathBuf>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(Some(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(path) => vec![path],
        OneOrMany::Many(paths) => paths,
    }))
}

/// The listener's TLS files from their flags: all or nothing, and loadable.
fn listener_tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_cas: Vec<PathBuf>,
    client_crl: Option<PathBuf>,
    legacy: Option<LegacyClientException>,
) -> Result<Option<ListenerTlsFiles>, ConfigError> {
    if legacy.is_some() && client_cas.is_empty() {
        return Err(ConfigError::invalid(
            "legacy-client-ca-file",
            "",
            "the legacy exception applies to client certificate verification: also pass --trusted-ca-file",
        ));
    }
    match (cert, key) {
        (None, None) => {
            if !client_cas.is_empty() || client_crl.is_some() || legacy.is_some() {
                return Err(ConfigError::invalid(
                    "trusted-ca-file",
                    "",
                    "client certificate verification needs TLS on the listener: also pass --cert-file and --key-file",
                ));
            }
            Ok(None)
        }
        (Some(_), None) => Err(ConfigError::invalid("key-file", "", "--cert-file was given without --key-file")),
        (None, Some(_)) => Err(ConfigError::invalid("cert-file", "", "--key-file was given without --cert-file")),
        (Some(cert), Some(key)) => {
            let files = ListenerTlsFiles { cert, key, client_cas, client_crl, legacy };
            // Loading now is what makes a bad file fail before any port is bound.
            crate::tls::server_config(&files).map_err(ConfigError::Tls)?;
            Ok(Some(files))
        }
    }
}

/// The upstream TLS files from their flags; the CA is required unless verification is off.
fn upstream_tls_files(
    cas: Vec<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    insecure_skip_verify: bool,
    server_cn: Option<String>,
) -> Result<UpstreamTlsFiles, ConfigError> {
    let client_cert = match (cert, key) {
        (None, None) => None,
        (Some(_), None) => return Err(ConfigError::invalid("key", "", "--cert was given without --key")),
        (None, Some(_)) => return Err(ConfigError::invalid("cert", "", "--key was given without --cert")),
        (Some(cert), Some(key)) => Some((cert, key)),
    };
    if cas.is_empty() && !insecure_skip_verify {
        return Err(ConfigError::invalid("cacert", "", "an https endpoint needs --cacert with the CA that signed etcd's server certificates (or --insecure-skip-tls-verify for testing)"));
    }
    if server_cn.as_deref().is_some_and(str::is_empty) {
        return Err(ConfigError::invalid("upstream-server-cn", "", "name the CN etcd's old server certificates carry"));
    }
    let files = UpstreamTlsFiles { cas, client_cert, insecure_skip_verify, server_cn };
    crate::tls::client_config(&files).map_err(ConfigError::Tls)?;
    Ok(files)
}

fn parse_socket_addr(flag: &'static str, raw: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    raw.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| ConfigError::invalid(flag, raw, "expected host:port, e.g. 127.0.0.1:23790"))
}

fn parse_metrics_addr(raw: &str) -> Result<SocketAddr, ConfigError> {
    let rest = if let Some(rest) = raw.strip_prefix("http://") {
        rest
    } else if raw.starts_with("https://") {
        return Err(ConfigError::invalid(
            "metrics-addr",
            raw,
            "the metrics listener serves plain HTTP only; use http://",
        ));
    } else {
        raw
    };
    parse_socket_addr("metrics-addr", rest.trim_end_matches('/'))
}

/// Parses durations written as `500ms`, `2s`, `1m` or `1h`.
pub fn parse_duration(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = raw.split_at(split);
    let number: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(number)),
        "s" => Some(Duration::from_secs(number)),
        "m" => Some(Duration::from_secs(number.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(number.checked_mul(3600)?)),
        _ => None,
    }
}

/// A duration setting, or its `default` (from [`defaults`]), which must be positive.
fn parse_duration_setting(flag: &'static str, raw: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let raw = raw.unwrap_or(default);
    parse_duration(raw)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| ConfigError::invalid(flag, raw, "expected a positive duration such as 500ms, 2s, 1m"))
}

/// Why a configuration was refused; each message names the setting and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    /// The `--config` file is not valid TOML for these settings.
    #[error("invalid config file {path}: {message}(keys are the flag names, e.g. listen-addr = \"127.0.0.1:23790\")")]
    ParseFile { path: PathBuf, message: String },
    /// A setting has a value that cannot work.
    #[error("invalid --{flag} {value:?}: {why}")]
    Invalid { flag: &'static str, value: String, why: String },
    /// A grpc-proxy flag that changes semantics and is not implemented.
    #[error("--{flag} is not supported: {why}")]
    Unsupported { flag: &'static str, why: &'static str },
    /// A TLS file could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl ConfigError {
    fn invalid(flag: &'static str, value: &str, why: &str) -> Self {
        ConfigError::Invalid { flag, value: value.to_owned(), why: why.to_owned() }
    }
}

/// `--workers`, with `0` resolved to the CPUs this process may use.
fn workers(requested: Option<usize>) -> Result<usize, ConfigError> {
    match requested.unwrap_or(defaults::WORKERS) {
        0 => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
        n if n > MAX_WORKERS => Err(ConfigError::invalid(
            "workers",
            &n.to_string(),
            &format!("at most {MAX_WORKERS}; more event loops than CPUs only add switching"),
        )),
        n => Ok(n),
    }
}

/// More event loops than any machine this runs on has CPUs.
const MAX_WORKERS: usize = 1024;

/// `--session-key-file`'s keys, read and checked at startup.
fn session_keys(path: &std::path::Path) -> Result<(PathBuf, Vec<crate::auth::Secret>), ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile { path: path.to_owned(), source })?;
    let keys = crate::auth::parse_key_file(&text)
        .map_err(|error| ConfigError::invalid("session-key-file", &path.display().to_string(), &error.to_string()))?;
    Ok((path.to_owned(), keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn client_limits() {
        let defaults = StartArgs::default().validate().unwrap().limits;
        assert_eq!(
            defaults,
            ClientLimits {
                max_request_message: 2 * 1024 * 1024,
                max_header_list: 16384,
                max_buffered_response: 4 * 1024 * 1024,
                max_held_requests: 256 * 1024 * 1024,
                max_held_responses: 256 * 1024 * 1024,
                unread_response_timeout: Duration::from_secs(30),
                handshake_timeout: Duration::from_secs(10),
                idle_connection_timeout: Some(Duration::from_secs(180)),
                request_body_timeout: Duration::from_secs(10),
            }
        );
        let off = StartArgs { idle_connection_timeout: Some("0s".into()), ..StartArgs::default() };
        assert_eq!(off.validate().unwrap().limits.idle_connection_timeout, None);
        let zero_streams = StartArgs { max_concurrent_streams: Some(0), ..StartArgs::default() };
        assert!(zero_streams
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("invalid --max-concurrent-streams \"0\": must be at least 1"));
        let no_room = StartArgs { max_held_request_bytes: Some(2 * 1024 * 1024), ..StartArgs::default() };
        assert_eq!(
            no_room.validate().unwrap_err().to_string(),
            "invalid --max-held-request-bytes \"2097152\": must be at least 2097157, the largest request message \
             (--max-request-bytes + 512 KiB, and its 5-byte prefix), or such a request could never be read"
        );
        let just_room = StartArgs { max_held_request_bytes: Some(2 * 1024 * 1024 + 5), ..StartArgs::default() };
        assert_eq!(just_room.validate().unwrap().limits.max_held_requests, 2 * 1024 * 1024 + 5);
        let no_answer_room = StartArgs { max_held_response_bytes: Some(4 * 1024 * 1024), ..StartArgs::default() };
        assert_eq!(
            no_answer_room.validate().unwrap_err().to_string(),
            "invalid --max-held-response-bytes \"4194304\": must be at least 4194309, the largest answer read whole \
             (--max-buffered-response-bytes, and its 5-byte prefix), or such an answer to a read could never be held"
        );
        let hasty = StartArgs { unread_response_timeout: Some("500ms".into()), ..StartArgs::default() };
        assert_eq!(
            hasty.validate().unwrap_err().to_string(),
            "invalid --unread-response-timeout \"500ms\": must be at least 1s; a client on a slow link may take a \
             moment between pieces of an answer"
        );
        let tiny = StartArgs { max_request_bytes: Some(10), ..StartArgs::default() };
        assert!(tiny
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("invalid --max-request-bytes \"10\": must be at least 1024"));
    }

    #[test]
    fn every_flag_round_trips_through_the_config_file() {
        use clap::CommandFactory;
        let command = Cli::command();
        let start = command.find_subcommand("start").expect("the start command");
        let dir = tempfile_dir();
        let mut checked = 0;
        for arg in start.get_arguments() {
            let Some(key) = arg.get_long().filter(|key| *key != "config" && *key != "help") else { continue };
            // Whatever kind of value the setting takes, one of these is it.
            let sample = ["\"x\"", "7", "true", "[\"x\"]"]
                .into_iter()
                .find(|sample| toml::from_str::<StartArgs>(&format!("{key} = {sample}")).is_ok())
                .unwrap_or_else(|| panic!("the config file takes no value for {key}: is it a TOML key?"));
            let path = dir.join(format!("{key}.toml"));
            std::fs::write(&path, format!("{key} = {sample}\n")).unwrap();
            let merged = StartArgs { config: Some(path), ..Default::default() }.merge_config_file().unwrap();
            let field = key.replace('-', "_");
            assert!(
                format!("{merged:?}").contains(&format!(" {field}: Some(")),
                "--{key} set in the config file is lost by the merge; add it to merge_fields!"
            );
            checked += 1;
        }
        assert!(checked > 50, "only {checked} settings found");
    }

    #[test]
    fn built_in_defaults_are_valid_settings() {
        for duration in [
            defaults::CLUSTER_REFRESH_INTERVAL,
            defaults::CERT_RELOAD_INTERVAL,
            defaults::DIAL_TIMEOUT,
            defaults::HEALTH_INTERVAL,
            defaults::SHUTDOWN_GRACE,
            defaults::AUTH_SESSION_IDLE_TIMEOUT,
            defaults::MAX_LOGIN_DELAY,
            defaults::HANDSHAKE_TIMEOUT,
            defaults::IDLE_CONNECTION_TIMEOUT,
            defaults::REQUEST_BODY_TIMEOUT,
        ] {
            assert!(parse_duration(duration).is_some_and(|d| !d.is_zero()), "{duration}");
        }
        let config = StartArgs::default().validate().unwrap();
        assert_eq!(config.health_interval, Duration::from_secs(1));
        assert_eq!(config.auth.max_login_delay, Duration::from_secs(5));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("2"), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn defaults_match_grpc_proxy() {
        let config = StartArgs::default().validate().unwrap();
        assert_eq!(config.listen_addr.to_string(), "127.0.0.1:23790");
        assert_eq!(config.endpoints[0].authority, "127.0.0.1:2379");
        assert_eq!(config.advertise_client_url, "127.0.0.1:23790");
        assert_eq!(config.max_concurrent_streams, u32::MAX);
        assert!(config.metrics_addr.is_none());
    }

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let dir = tempfile_dir();
        let path = dir.join("proxy.toml");
        std::fs::write(&path, "listen-addr = \"127.0.0.1:1111\"\nendpoints = [\"127.0.0.1:2222\"]\ndebug = true\n")
            .unwrap();
        let args = StartArgs { config: Some(path), listen_addr: Some("127.0.0.1:3333".into()), ..Default::default() };
        let config = args.merge_config_file().unwrap().validate().unwrap();
        assert_eq!(config.listen_addr.to_string(), "127.0.0.1:3333");
        assert_eq!(config.endpoints[0].authority, "127.0.0.1:2222");
        assert!(config.debug);
    }

    #[test]
    fn unknown_file_key_is_refused_with_its_name() {
        let dir = tempfile_dir();
        let path = dir.join("proxy.toml");
        std::fs::write(&path, "listen_adr = \"x\"\n").unwrap();
        let err = StartArgs { config: Some(path), ..Default::default() }.merge_config_file().unwrap_err().to_string();
        assert!(err.contains("unknown field `listen_adr`"), "{err}");
    }

    #[test]
    fn semantic_flags_are_refused_not_ignored() {
        let err = StartArgs { namespace: Some("/tenant-a/".into()), ..Default::default() }.validate().unwrap_err();
        assert_eq!(err.to_string(), "--namespace is not supported: namespacing is not implemented yet; run without it or use etcd grpc-proxy for namespaced clients");
        let config = StartArgs { data_dir: Some("default.proxy".into()), ..Default::default() }.validate().unwrap();
        assert_eq!(config.ignored_flags.len(), 1);
        assert_eq!(config.ignored_flags[0].flag, "data-dir");
    }

    #[test]
    fn empty_truncation_prefix_is_refused() {
        let args =
            StartArgs { truncate_oversize_prefix: Some(vec!["/jobs/".into(), String::new()]), ..Default::default() };
        let err = args.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid --truncate-oversize-prefix \"\": an empty prefix"), "{err}");
    }

    #[test]
    fn advertised_urls_and_member_list_mode() {
        let config = StartArgs::default().validate().unwrap();
        assert_eq!((config.advertised_client_urls, config.member_list), (None, MemberListMode::Proxy));
        assert_eq!(config.cluster_refresh_interval, Duration::from_secs(5));
        assert!(!config.learner_serializable_reads);
        let args = StartArgs {
            advertise_client_url: Some("10.0.0.9:23790, https://proxy.example:443".into()),
            member_list: Some("real".into()),
            ..Default::default()
        };
        let config = args.validate().unwrap();
        assert_eq!(
            config.advertised_client_urls,
            Some(vec!["http://10.0.0.9:23790".to_owned(), "https://proxy.example:443".to_owned()])
        );
        assert_eq!(config.member_list, MemberListMode::Real);
        let err = StartArgs { member_list: Some("fake".into()), ..Default::default() }.validate().unwrap_err();
        assert_eq!(err.to_string(), "invalid --member-list \"fake\": expected proxy or real");
    }

    #[test]
    fn https_endpoint_without_ca_is_refused() {
        let err = StartArgs { endpoints: Some(vec!["https://127.0.0.1:2379".into()]), ..Default::default() }
            .validate()
            .unwrap_err();
        assert!(err.to_string().starts_with("invalid --cacert"), "{err}");
    }

    #[test]
    fn ca_files_are_one_or_many_in_toml_and_repeatable_as_flags() {
        let one: StartArgs =
            toml::from_str("trusted-ca-file = \"/pki/old.pem\"\ncacert = [\"/a.pem\", \"/b.pem\"]\n").unwrap();
        assert_eq!(one.trusted_ca_file, Some(vec![PathBuf::from("/pki/old.pem")]));
        assert_eq!(one.cacert, Some(vec![PathBuf::from("/a.pem"), PathBuf::from("/b.pem")]));
        let cli = <Cli as clap::Parser>::try_parse_from([
            "etcd-compat-proxy",
            "start",
            "--trusted-ca-file=/old.pem,/new.pem",
            "--cacert=/a.pem",
            "--cacert=/b.pem",
        ])
        .unwrap();
        let Command::Start(args) = cli.command else { panic!("not start") };
        assert_eq!(args.trusted_ca_file.unwrap().len(), 2);
        assert_eq!(args.cacert.unwrap().len(), 2);
    }

    #[test]
    fn legacy_exception_dates() {
        assert_eq!(parse_date("2027-06-30"), time::Date::from_calendar_date(2027, time::Month::June, 30).ok());
        assert_eq!(parse_date("2027-02-30"), None);
        let exception = legacy_exception(Some("/ca.pem".into()), Some("2999-01-01".into())).unwrap().unwrap();
        // The whole named day is included.
        assert_eq!(crate::tls::format_unix(exception.until_unix), "2999-01-01 23:59:59 UTC");
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ecp-config-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
