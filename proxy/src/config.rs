//! The proxy's configuration once validated: every setting in the form the proxy uses it. How
//! it is read (flags, environment, TOML file) and checked is the command line's business
//! (`cli::start`); this module only describes the result, so that the rest of the proxy never
//! depends on the command line.

use std::net::SocketAddr;
use std::time::Duration;

/// A fully validated configuration for one proxy process.
#[derive(Debug, Clone)]
pub struct Config {
    /// The etcd members to forward to, in the order given.
    pub endpoints: Vec<Endpoint>,
    /// Where the gRPC listener binds.
    pub listen_addr: SocketAddr,
    /// Whether both addresses are bound with SO_REUSEPORT, for a restart that refuses no one.
    pub reuse_port: bool,
    /// Event loops (threads) serving clients; 1 runs everything on the main thread.
    pub workers: usize,
    /// The address clients should use to reach the proxy.
    pub advertise_client_url: String,
    /// `--advertise-client-url` as URLs, only when it was given: what `MemberList` answers list.
    pub advertised_client_urls: Option<Vec<String>>,
    /// Whether `MemberList` answers are rewritten with `advertised_client_urls`.
    pub member_list: MemberListMode,
    /// Period of the cluster view refresh.
    pub cluster_refresh_interval: Duration,
    /// Whether learners may serve serializable Ranges.
    pub learner_serializable_reads: bool,
    /// Where the admin HTTP server binds, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The bearer token of the admin calls that change or read out the cluster; `None` refuses them.
    pub admin_token: Option<crate::auth::Secret>,
    /// Client-facing TLS; `None` means plaintext (h2c).
    pub listener_tls: Option<crate::tls::ListenerTlsFiles>,
    /// Upstream TLS; `None` means plaintext to etcd.
    pub upstream_tls: Option<crate::tls::UpstreamTlsFiles>,
    /// HTTP/2 concurrent stream limit per client connection.
    pub max_concurrent_streams: u32,
    /// What one client connection or call may cost the proxy.
    pub limits: ClientLimits,
    /// Debug-level logging.
    pub debug: bool,
    /// Timeout for TCP connect plus TLS and HTTP/2 handshakes to a member.
    pub dial_timeout: Duration,
    /// Period of the active member health check.
    pub health_interval: Duration,
    /// How long in-flight calls may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Response-size budget rules.
    pub budget: crate::budget::BudgetPolicy,
    /// Identities for clients that do not authenticate, and session expiry.
    pub auth: crate::auth::AuthConfig,
    /// grpc-proxy flags that were set but have no effect here, to be logged once at startup.
    pub ignored_flags: Vec<IgnoredFlag>,
    /// Certificate expiry warning and critical windows.
    pub cert_expiry: crate::tls::ExpiryPolicy,
    /// How often TLS files are checked for changes.
    pub cert_reload_interval: Duration,
    /// Memory for cached serializable Range answers; 0: no cache.
    pub serializable_cache_bytes: usize,
    /// Whether identical client watches share upstream watches.
    pub watch_coalescing: bool,
    /// What the doctor judges the cluster against.
    pub doctor: DoctorLimits,
}

/// The cluster facts the doctor cannot read and the bounds of what it reads.
#[derive(Debug, Clone, Copy)]
pub struct DoctorLimits {
    /// The members' `--quota-backend-bytes` (etcd before 3.6 does not report it).
    pub quota_backend_bytes: i64,
    /// History kept past which compaction counts as not running.
    pub history_warning_revisions: i64,
    /// Bytes of keys and values read at most to size prefixes.
    pub scan_bytes: u64,
}

/// Bounds on what one client connection or call may make the proxy hold or wait for, so that
/// no client, however broken or hostile, costs the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Largest request message accepted, in bytes: etcd's `--max-request-bytes` plus the
    /// allowance etcd's gRPC server adds, so that the proxy refuses exactly what etcd would.
    pub max_request_message: usize,
    /// Largest header block a client may send, decoded.
    pub max_header_list: u32,
    /// etcd data held for one call or stream whose client is not reading.
    pub max_buffered_response: usize,
    /// Request messages held by all calls together.
    pub max_held_requests: usize,
    /// Answers held whole for clients that have not taken them yet, all calls together.
    pub max_held_responses: usize,
    /// Longest a client connection may take nothing of an answer waiting for it.
    pub unread_response_timeout: Duration,
    /// TLS handshake plus HTTP/2 preface and SETTINGS.
    pub handshake_timeout: Duration,
    /// Silence after which a client connection is pinged; `None`: never.
    pub idle_connection_timeout: Option<Duration>,
    /// Longest pause inside an incomplete request message.
    pub request_body_timeout: Duration,
}

impl ClientLimits {
    /// Allowance etcd's gRPC server adds to `--max-request-bytes` for its receive limit
    /// (`grpcOverheadBytes` in etcd's server setup).
    pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
}

/// What `MemberList` answers list as members' client URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberListMode {
    /// The proxy's advertised URLs (when `--advertise-client-url` is given).
    Proxy,
    /// etcd's own URLs, unchanged.
    Real,
}

/// A grpc-proxy flag accepted for compatibility that has no effect in this proxy.
#[derive(Debug, Clone)]
pub struct IgnoredFlag {
    /// The flag name without dashes.
    pub flag: &'static str,
    /// Why it has no effect.
    pub why: &'static str,
}

/// One etcd member's client endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port` as given (used as the HTTP/2 authority and to connect).
    pub authority: http::uri::Authority,
    /// The host part, without brackets for IPv6.
    pub host: String,
    /// Whether to speak TLS to this member.
    pub tls: bool,
}

impl Endpoint {
    /// Parses `host:port`, `http://host:port` or `https://host:port`; a bare `host:port` uses
    /// TLS when upstream TLS files were given. The error says what is wrong with it.
    pub fn parse(raw: &str, tls_by_default: bool) -> Result<Self, &'static str> {
        let trimmed = raw.trim().trim_end_matches('/');
        let (tls, rest) = if let Some(rest) = trimmed.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = trimmed.strip_prefix("http://") {
            (false, rest)
        } else if trimmed.contains("://") {
            return Err("only http:// and https:// endpoints are supported");
        } else {
            (tls_by_default, trimmed)
        };
        let port_out_of_range = rest
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u64>().ok())
            .is_some_and(|port| port == 0 || port > u64::from(u16::MAX));
        if port_out_of_range {
            return Err("the port must be a number from 1 to 65535");
        }
        let authority: http::uri::Authority = rest.parse().map_err(|_| "expected host:port, e.g. 127.0.0.1:2379")?;
        if authority.port_u16().is_none() {
            return Err("the port is missing; etcd's client port is usually 2379");
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        Ok(Endpoint { authority, host, tls })
    }

    /// The endpoint as a URL, for logs and labels.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.authority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        let plain = Endpoint::parse("127.0.0.1:2379", false).unwrap();
        assert_eq!(
            plain,
            Endpoint { authority: "127.0.0.1:2379".parse().unwrap(), host: "127.0.0.1".into(), tls: false }
        );
        assert!(Endpoint::parse("127.0.0.1:2379", true).unwrap().tls);
        assert!(Endpoint::parse("https://etcd-0:2379/", false).unwrap().tls);
        assert!(!Endpoint::parse("http://[::1]:2379", true).unwrap().tls);
        assert_eq!(Endpoint::parse("http://[::1]:2379", true).unwrap().host, "::1");
        assert_eq!(Endpoint::parse("127.0.0.1", false), Err("the port is missing; etcd's client port is usually 2379"));
        for raw in ["127.0.0.1:99999", "127.0.0.1:0", "http://etcd:65536"] {
            assert_eq!(Endpoint::parse(raw, false), Err("the port must be a number from 1 to 65535"));
        }
        assert_eq!(Endpoint::parse("127.0.0.1:65535", false).unwrap().authority.port_u16(), Some(65535));
    }
}
