//! Request metrics, kept in fixed arrays of atomics indexed by method so the hot path never
//! allocates or locks. Request metrics use go-grpc-prometheus names so dashboards built for
//! `etcd grpc-proxy` keep working; proxy-specific series are prefixed `etcd_compat_proxy_`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use etcd_compat_proto::METHODS;

use crate::grpc::{Code, ALL_CODES};
use crate::upstream::{Cluster, Member};

/// Latency bucket upper bounds in seconds.
const BUCKETS: [f64; 14] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(slot) = BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.buckets[slot].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(elapsed.as_micros() as u64, Relaxed);
    }
}

#[derive(Default)]
struct MethodStats {
    started: AtomicU64,
    handled: [AtomicU64; ALL_CODES.len()],
    latency: Histogram,
}

/// One per-member series: name (after the prefix), Prometheus type, help text, value.
type MemberSeries = (&'static str, &'static str, &'static str, fn(&Member) -> u64);

/// All counters of one proxy process.
pub struct Metrics {
    /// One entry per known method plus a last one for methods the protos don't know.
    methods: Box<[MethodStats]>,
    retries: AtomicU64,
    streams_broken: AtomicU64,
    authority_repairs: AtomicU64,
    watch_splits: AtomicU64,
    auth_renewals: AtomicU64,
    auth_retries: AtomicU64,
    watch_recreations: AtomicU64,
    client_connections: AtomicU64,
    /// Client connections the proxy closed, by [`ClosedBecause`].
    connections_closed: [AtomicU64; 4],
    /// Client requests the proxy refused itself, by [`Refusal`].
    refusals: [AtomicU64; 6],
    stream_pauses: AtomicU64,
    /// Limited Range answers by (truncation prefix label, outcome); labels come from configuration.
    budget: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Certificates in use, their expiry and reload counters.
    pub certificates: std::sync::Arc<crate::tls::CertRegistry>,
    /// The serializable-read cache's counters, once the request path made one.
    pub read_cache: std::sync::OnceLock<std::sync::Arc<crate::cache::CacheStats>>,
    /// Watch coalescing's counters, once the request path made its hub.
    pub watch_coalescing: std::sync::OnceLock<std::sync::Arc<dyn RenderMetrics>>,
    /// The gauges of request messages held, once the request path made its memory for them.
    pub request_memory: std::sync::OnceLock<std::sync::Arc<dyn RenderMetrics>>,
    /// The gauges of answers held for clients, once the request path made its memory for them.
    pub response_memory: std::sync::OnceLock<std::sync::Arc<dyn RenderMetrics>>,
    /// The auth sessions' gauge, once the server made them.
    pub auth_sessions: std::sync::OnceLock<std::sync::Arc<dyn RenderMetrics>>,
    /// Explains the failures the field reports describe; shared with the cluster's dials.
    pub explainer: crate::explain::Explainer,
}

/// Series of a part of the request path that keeps its own counters.
pub trait RenderMetrics: Send + Sync {
    /// Appends the series in Prometheus text format.
    fn render(&self, out: &mut String);
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            methods: (0..=METHODS.len()).map(|_| MethodStats::default()).collect(),
            retries: AtomicU64::new(0),
            streams_broken: AtomicU64::new(0),
            authority_repairs: AtomicU64::new(0),
            watch_splits: AtomicU64::new(0),
            auth_renewals: AtomicU64::new(0),
            auth_retries: AtomicU64::new(0),
            watch_recreations: AtomicU64::new(0),
            client_connections: AtomicU64::new(0),
            connections_closed: Default::default(),
            refusals: Default::default(),
            stream_pauses: AtomicU64::new(0),
            budget: Mutex::new(BTreeMap::new()),
            certificates: std::sync::Arc::default(),
            read_cache: std::sync::OnceLock::new(),
            watch_coalescing: std::sync::OnceLock::new(),
            request_memory: std::sync::OnceLock::new(),
            response_memory: std::sync::OnceLock::new(),
            auth_sessions: std::sync::OnceLock::new(),
            explainer: crate::explain::Explainer::default(),
        }
    }
}

/// Why the proxy closed a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBecause {
    /// No TLS handshake, HTTP/2 preface and SETTINGS within `--handshake-timeout`.
    Handshake = 0,
    /// Silent for `--idle-connection-timeout`, then no answer to a ping.
    NoPingAnswer = 1,
    /// Its TLS handshake failed (a certificate or protocol the proxy does not accept).
    TlsFailed = 2,
    /// It took nothing of an answer for `--unread-response-timeout`.
    AnswersUnread = 3,
}

impl ClosedBecause {
    const LABELS: [&'static str; 4] = ["handshake_timeout", "ping_timeout", "tls_handshake_failed", "response_unread"];
}

/// Why the proxy refused a client's request itself, without sending it to etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a gRPC request (method, content-type, `grpc-timeout`): reset as etcd resets it.
    Malformed = 0,
    /// A request message over etcd's receive limit.
    TooLarge = 1,
    /// A request message that stopped arriving (`--request-body-timeout`).
    Stalled = 2,
    /// The call's `grpc-timeout` passed.
    Deadline = 3,
    /// No room among the requests held in memory (`--max-held-request-bytes`) in time.
    MemoryFull = 4,
    /// A read's answer found no room among the answers held for clients (`--max-held-response-bytes`).
    ResponseMemoryFull = 5,
}

impl Refusal {
    const LABELS: [&'static str; 6] =
        ["malformed", "too_large", "stalled", "deadline", "memory_full", "response_memory_full"];
}

/// Keeps a client connection counted as open until dropped.
pub struct OpenConnection<'a>(&'a AtomicU64);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    /// Counts a client connection as open until the returned guard is dropped.
    pub fn client_connection_opened(&self) -> OpenConnection<'_> {
        self.client_connections.fetch_add(1, Relaxed);
        OpenConnection(&self.client_connections)
    }

    /// Counts a client connection the proxy closed.
    pub fn client_connection_closed(&self, why: ClosedBecause) {
        self.connections_closed[why as usize].fetch_add(1, Relaxed);
    }

    /// Counts a request the proxy refused itself.
    pub fn refused(&self, why: Refusal) {
        self.refusals[why as usize].fetch_add(1, Relaxed);
    }

    /// Counts a stream paused upstream because its client stopped reading.
    pub fn stream_paused(&self) {
        self.stream_pauses.fetch_add(1, Relaxed);
    }

    /// Counts a call as started.
    pub fn started(&self, method: usize) {
        self.methods[method].started.fetch_add(1, Relaxed);
    }

    /// Counts a call as finished with `code`; `elapsed` feeds the latency histogram when given.
    pub fn handled(&self, method: usize, code: Code, elapsed: Option<Duration>) {
        let stats = &self.methods[method];
        stats.handled[code as usize].fetch_add(1, Relaxed);
        if let Some(elapsed) = elapsed {
            stats.latency.observe(elapsed);
        }
    }

    /// Counts a request sent again to another member.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    /// Counts a response stream that ended because its upstream member went away.
    pub fn stream_broken(&self) {
        self.streams_broken.fetch_add(1, Relaxed);
    }

    /// Counts a request whose malformed `:authority` was dropped (see `legacy_authority`).
    pub fn authority_repaired(&self) {
        self.authority_repairs.fetch_add(1, Relaxed);
    }

    /// Counts watch responses split for size-limited clients.
    pub fn watch_responses_split(&self, n: u64) {
        self.watch_splits.fetch_add(n, Relaxed);
    }

    /// Counts an Authenticate call the proxy made to etcd to renew a session's token.
    pub fn auth_renewed(&self) {
        self.auth_renewals.fetch_add(1, Relaxed);
    }

    /// Counts a request sent again after etcd refused its token and the token was renewed.
    pub fn auth_retried(&self) {
        self.auth_retries.fetch_add(1, Relaxed);
    }

    /// Counts watches re-created upstream (after a token refusal or a lost member).
    pub fn watches_recreated(&self, n: u64) {
        self.watch_recreations.fetch_add(n, Relaxed);
    }

    /// Counts a Range answered under a size budget.
    pub fn budget_applied(&self, outcome: crate::budget::Outcome, prefix: String) {
        if let Ok(mut budget) = self.budget.lock() {
            *budget.entry((prefix, outcome.label())).or_default() += 1;
        }
    }

    /// Renders everything in the Prometheus text format.
    pub fn render(&self, upstream: &Cluster) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let labels = |index: usize| -> String {
            match METHODS.get(index) {
                Some(m) => format!(
                    "grpc_type=\"{}\",grpc_service=\"{}\",grpc_method=\"{}\"",
                    match (m.client_streaming, m.server_streaming) {
                        (false, false) => "unary",
                        (false, true) => "server_stream",
                        (true, false) => "client_stream",
                        (true, true) => "bidi_stream",
                    },
                    m.service,
                    m.method
                ),
                None => "grpc_type=\"unknown\",grpc_service=\"unknown\",grpc_method=\"unknown\"".to_owned(),
            }
        };
        let used: Vec<usize> = (0..self.methods.len()).filter(|i| self.methods[*i].started.load(Relaxed) > 0).collect();

        out.push_str("# HELP grpc_server_started_total Total number of RPCs started by clients of the proxy.\n# TYPE grpc_server_started_total counter\n");
        for &i in &used {
            let _ =
                writeln!(out, "grpc_server_started_total{{{}}} {}", labels(i), self.methods[i].started.load(Relaxed));
        }
        out.push_str("# HELP grpc_server_handled_total Total number of RPCs completed, by gRPC status code.\n# TYPE grpc_server_handled_total counter\n");
        for &i in &used {
            for code in ALL_CODES {
                let n = self.methods[i].handled[code as usize].load(Relaxed);
                if n > 0 {
                    let _ =
                        writeln!(out, "grpc_server_handled_total{{{},grpc_code=\"{}\"}} {n}", labels(i), code.name());
                }
            }
        }
        out.push_str("# HELP grpc_server_handling_seconds Latency of unary RPCs through the proxy.\n# TYPE grpc_server_handling_seconds histogram\n");
        for &i in &used {
            let h = &self.methods[i].latency;
            let count = h.count.load(Relaxed);
            if count == 0 {
                continue;
            }
            let l = labels(i);
            let mut cumulative = 0;
            for (bound, bucket) in BUCKETS.iter().zip(&h.buckets) {
                cumulative += bucket.load(Relaxed);
                let _ = writeln!(out, "grpc_server_handling_seconds_bucket{{{l},le=\"{bound}\"}} {cumulative}");
            }
            let _ = writeln!(out, "grpc_server_handling_seconds_bucket{{{l},le=\"+Inf\"}} {count}");
            let _ =
                writeln!(out, "grpc_server_handling_seconds_sum{{{l}}} {}", h.sum_micros.load(Relaxed) as f64 / 1e6);
            let _ = writeln!(out, "grpc_server_handling_seconds_count{{{l}}} {count}");
        }

        out.push_str("# HELP etcd_compat_proxy_retries_total Requests sent again to another member after a failure that was safe to retry.\n# TYPE etcd_compat_proxy_retries_total counter\n");
        let _ = writeln!(out, "etcd_compat_proxy_retries_total {}", self.retries.load(Relaxed));
        out.push_str("# HELP etcd_compat_proxy_streams_broken_total Response streams ended with Unavailable because their member went away.\n# TYPE etcd_compat_proxy_streams_broken_total counter\n");
        let _ = writeln!(out, "etcd_compat_proxy_streams_broken_total {}", self.streams_broken.load(Relaxed));

        out.push_str("# HELP etcd_compat_proxy_authority_repairs_total Requests from legacy clients whose malformed :authority was dropped.\n# TYPE etcd_compat_proxy_authority_repairs_total counter\n");
        let _ = writeln!(out, "etcd_compat_proxy_authority_repairs_total {}", self.authority_repairs.load(Relaxed));
        out.push_str("# HELP etcd_compat_proxy_limited_responses_total Range answers to size-limited clients, by truncation prefix rule and outcome (whole, paged, truncated, refused).\n# TYPE etcd_compat_proxy_limited_responses_total counter\n");
        if let Ok(budget) = self.budget.lock() {
            for ((prefix, outcome), n) in budget.iter() {
                let _ = writeln!(
                    out,
                    "etcd_compat_proxy_limited_responses_total{{prefix={prefix:?},outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP etcd_compat_proxy_watch_responses_split_total Watch responses larger than a limited client's budget, split into several.\n# TYPE etcd_compat_proxy_watch_responses_split_total counter\n");
        let _ = writeln!(out, "etcd_compat_proxy_watch_responses_split_total {}", self.watch_splits.load(Relaxed));
        out.push_str("# HELP etcd_compat_proxy_client_connections Client connections open now.\n# TYPE etcd_compat_proxy_client_connections gauge\n");
        let _ = writeln!(out, "etcd_compat_proxy_client_connections {}", self.client_connections.load(Relaxed));
        out.push_str("# HELP etcd_compat_proxy_client_connections_closed_total Client connections the proxy closed: no handshake in time (--handshake-timeout), silent and no answer to a ping (--idle-connection-timeout), a failed TLS handshake, or nothing of an answer taken (--unread-response-timeout).\n# TYPE etcd_compat_proxy_client_connections_closed_total counter\n");
        for (label, n) in ClosedBecause::LABELS.iter().zip(&self.connections_closed) {
            let _ = writeln!(
                out,
                "etcd_compat_proxy_client_connections_closed_total{{reason=\"{label}\"}} {}",
                n.load(Relaxed)
            );
        }
        out.push_str("# HELP etcd_compat_proxy_requests_refused_total Client requests the proxy answered itself: malformed (not gRPC), too_large (over etcd's receive limit), stalled (--request-body-timeout), deadline (grpc-timeout passed), memory_full (no room among the requests held, --max-held-request-bytes, within --request-body-timeout), none of which reached etcd; response_memory_full (a read whose answer found no room among the answers held for clients, --max-held-response-bytes).\n# TYPE etcd_compat_proxy_requests_refused_total counter\n");
        for (label, n) in Refusal::LABELS.iter().zip(&self.refusals) {
            let _ = writeln!(out, "etcd_compat_proxy_requests_refused_total{{reason=\"{label}\"}} {}", n.load(Relaxed));
        }
        for memory in [&self.request_memory, &self.response_memory] {
            if let Some(memory) = memory.get() {
                memory.render(&mut out);
            }
        }
        self.certificates.render(&mut out);
        if let Some(cache) = self.read_cache.get() {
            cache.render(&mut out);
        }
        if let Some(coalescing) = self.watch_coalescing.get() {
            coalescing.render(&mut out);
        }
        if let Some(sessions) = self.auth_sessions.get() {
            sessions.render(&mut out);
        }
        for (name, help, value) in [
            (
                "auth_renewals_total",
                "Authenticate calls the proxy made to etcd to renew a session's token.",
                &self.auth_renewals,
            ),
            (
                "auth_retries_total",
                "Requests sent again after etcd refused their token and it was renewed.",
                &self.auth_retries,
            ),
            (
                "stream_pauses_total",
                "Watch and keep-alive streams paused upstream because their client stopped reading (--max-buffered-response-bytes); resumed from the next undelivered revision.",
                &self.stream_pauses,
            ),
            (
                "watch_recreations_total",
                "Watches re-created upstream after a token refusal or a lost member, from the next undelivered revision.",
                &self.watch_recreations,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP etcd_compat_proxy_{name} {help}\n# TYPE etcd_compat_proxy_{name} counter\netcd_compat_proxy_{name} {}",
                value.load(Relaxed)
            );
        }
        let per_member: [MemberSeries; 3] = [
            (
                "upstream_healthy",
                "gauge",
                "Whether the proxy currently considers the etcd member healthy (1) or not (0).",
                |m| u64::from(m.is_healthy()),
            ),
            ("upstream_requests_total", "counter", "Requests sent to each etcd member.", |m| {
                m.stats.requests.load(Relaxed)
            }),
            (
                "upstream_failures_total",
                "counter",
                "Connection failures and failed health checks of each etcd member.",
                |m| m.stats.failures.load(Relaxed),
            ),
        ];
        for (name, kind, help, value) in per_member {
            let _ = writeln!(out, "# HELP etcd_compat_proxy_{name} {help}\n# TYPE etcd_compat_proxy_{name} {kind}");
            for member in upstream.members().iter() {
                let _ = writeln!(
                    out,
                    "etcd_compat_proxy_{name}{{endpoint=\"{}\"}} {}",
                    member.endpoint.url(),
                    value(member)
                );
            }
        }
        out
    }
}
