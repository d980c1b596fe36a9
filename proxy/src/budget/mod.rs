//! Response-size budget: keeps every Range answer to a legacy client under its gRPC receive
//! limit (an old client's job list that grew past it failed with `received message larger than
//! max (4206331 vs. 4194304)`).
//!
//! Most gRPC libraries refuse messages over 4 MiB unless the program raised the limit, and the
//! programs this proxy serves cannot be rebuilt. Modern clientv3 (etcdctl 3.4+) accepts 2 GiB and
//! must get exactly what it gets from etcd, so only clients classified as limited are touched:
//! their Range requests are answered from pages fetched at one pinned revision, and never with a
//! message larger than the budget. Nothing is dropped silently: a result that does not fit is
//! either cut where the client asked for pages (`limit`, `more=true`), cut where the operator
//! opted in per key prefix, or refused with `ResourceExhausted` and a message saying what to do.

//!
//! [`paging`] serves a limited Range from etcd's pages (fetched by the request path through a
//! closure, so this module sends nothing itself); [`split`] cuts oversize watch responses.

mod paging;
mod split;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;

pub use paging::{pageable, range_asked, serve_range, Answer, KeySizeEstimate, Page, RangeAsked};
pub use split::split_watch_response;

/// User-agent prefixes of gRPC libraries whose default receive limit is 4 MiB.
pub const DEFAULT_LIMITED_USER_AGENTS: &[&str] =
    &["grpc-python/", "grpc-node-js/", "grpc-node/", "grpc-java-", "grpc-c/", "grpc-ruby/", "grpc-csharp/", "tonic/"];

/// How often the same key prefix may be logged as limited.
const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// How much a client may receive in one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientBudget<'a> {
    /// As directly from etcd: responses are forwarded untouched.
    Unlimited,
    /// At most `bytes` per message; `rule` names the classification rule, for logs and metrics.
    Limited { bytes: usize, rule: LimitRule<'a> },
}

/// The rule that classified a client as limited; shown as it is named in logs. Borrowed from the
/// policy: every call is classified, and most are never logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitRule<'a> {
    /// A `--limited-user-agents` prefix.
    UserAgent(&'a str),
    /// A grpc-go client that sends no `client-api-version` (clientv3 before 3.4).
    GoWithoutApiVersion,
}

impl std::fmt::Display for LimitRule<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitRule::UserAgent(prefix) => write!(f, "user-agent {prefix}"),
            LimitRule::GoWithoutApiVersion => f.write_str("grpc-go without client-api-version"),
        }
    }
}

impl ClientBudget<'_> {
    /// The client's limit, if it has one.
    pub fn bytes(&self) -> Option<usize> {
        match self {
            ClientBudget::Limited { bytes, .. } => Some(*bytes),
            ClientBudget::Unlimited => None,
        }
    }
}

/// The configured budget rules.
#[derive(Debug, Clone)]
pub struct BudgetPolicy {
    /// The budget of limited clients, in encoded message bytes.
    pub max_response_bytes: usize,
    /// User-agent prefixes that are limited.
    pub limited_user_agents: Vec<String>,
    /// User-agent prefixes that are never limited (checked first).
    pub unlimited_user_agents: Vec<String>,
    /// Limit grpc-go clients that do not send `client-api-version` (clientv3 before 3.4 and
    /// hand-written grpc-go programs, whose library default is 4 MiB).
    pub limit_go_without_api_version: bool,
    /// Key prefixes whose oversize results may be cut to a first page with `more=true` even
    /// when the client did not ask for pages (for clients known to follow `more`).
    pub truncate_prefixes: Vec<Bytes>,
}

impl BudgetPolicy {
    /// Decides a client's budget from its request metadata.
    pub fn classify(&self, headers: &HeaderMap) -> ClientBudget<'_> {
        let user_agent = headers.get(http::header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("");
        if self.unlimited_user_agents.iter().any(|p| user_agent.starts_with(p.as_str())) {
            return ClientBudget::Unlimited;
        }
        if let Some(prefix) = self.limited_user_agents.iter().find(|p| user_agent.starts_with(p.as_str())) {
            return ClientBudget::Limited { bytes: self.max_response_bytes, rule: LimitRule::UserAgent(prefix) };
        }
        if self.limit_go_without_api_version
            && user_agent.starts_with("grpc-go/")
            && !headers.contains_key("client-api-version")
        {
            return ClientBudget::Limited { bytes: self.max_response_bytes, rule: LimitRule::GoWithoutApiVersion };
        }
        ClientBudget::Unlimited
    }

    /// The metrics label for a key: the truncation prefix rule it falls under, or "none".
    pub fn truncate_prefix_label(&self, key: &[u8]) -> String {
        self.truncation_allowed(key).map_or_else(|| "none".to_owned(), |p| String::from_utf8_lossy(p).into_owned())
    }

    fn truncation_allowed(&self, key: &[u8]) -> Option<&Bytes> {
        self.truncate_prefixes.iter().find(|prefix| key.starts_with(prefix))
    }
}

/// What a limited Range ended as, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything fit in the budget.
    Whole,
    /// The client asked for pages and got fewer keys than its limit, `more=true`.
    Paged,
    /// Cut to a first page under an operator's truncation opt-in.
    Truncated,
    /// Refused with `ResourceExhausted`.
    Refused,
}

impl Outcome {
    /// Label value for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Whole => "whole",
            Outcome::Paged => "paged",
            Outcome::Truncated => "truncated",
            Outcome::Refused => "refused",
        }
    }
}

/// A key for messages: UTF-8 as text, otherwise escaped; long keys shortened.
pub fn printable(key: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(key).chars().flat_map(char::escape_debug).take(200).collect();
    format!("\"{text}\"")
}

/// Rate-limits the "limited response" log line per key prefix.
#[derive(Default)]
pub struct LimitedLog {
    last: Mutex<HashMap<Vec<u8>, Instant>>,
}

impl LimitedLog {
    /// Whether a line about `key` may be logged now.
    pub fn should_log(&self, key: &[u8]) -> bool {
        let Ok(mut last) = self.last.lock() else { return false };
        let now = Instant::now();
        if last.len() > 10_000 {
            last.retain(|_, at| now.duration_since(*at) < LOG_INTERVAL);
        }
        match last.get(key) {
            Some(at) if now.duration_since(*at) < LOG_INTERVAL => false,
            _ => {
                last.insert(key.to_vec(), now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BudgetPolicy {
        BudgetPolicy {
            max_response_bytes: 4 << 20,
            limited_user_agents: DEFAULT_LIMITED_USER_AGENTS.iter().map(|s| s.to_string()).collect(),
            unlimited_user_agents: vec!["grpc-python/9".into()],
            limit_go_without_api_version: true,
            truncate_prefixes: vec![Bytes::from_static(b"/jobs/")],
        }
    }

    fn headers(user_agent: &str, api_version: bool) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::USER_AGENT, user_agent.parse().unwrap());
        if api_version {
            headers.insert("client-api-version", "3.5".parse().unwrap());
        }
        headers
    }

    #[test]
    fn classification() {
        let p = policy();
        let rule = |user_agent: &str| match p.classify(&headers(user_agent, false)) {
            ClientBudget::Limited { bytes: 4194304, rule } => rule.to_string(),
            other => format!("{other:?}"),
        };
        assert_eq!(rule("grpc-python/1.62.3 grpc-c/39.0.0 (linux; chttp2)"), "user-agent grpc-python/");
        assert_eq!(rule("grpc-node-js/1.9.0"), "user-agent grpc-node-js/");
        assert_eq!(rule("grpc-go/1.7.5"), "grpc-go without client-api-version");
        assert_eq!(p.classify(&headers("etcdctl grpc-go/1.26.0", true)), ClientBudget::Unlimited);
        assert_eq!(p.classify(&headers("grpc-go/1.41.0", true)), ClientBudget::Unlimited);
        assert_eq!(p.classify(&headers("grpc-python/9.0", false)), ClientBudget::Unlimited);
        assert_eq!(p.classify(&HeaderMap::new()), ClientBudget::Unlimited);
        assert_eq!(p.truncate_prefix_label(b"/jobs/a"), "/jobs/");
        assert_eq!(p.truncate_prefix_label(b"/other"), "none");
    }

    #[test]
    fn printable_keys() {
        assert_eq!(printable(b"/jobs/a"), "\"/jobs/a\"");
        assert_eq!(printable(b"a\nb"), "\"a\\nb\"");
    }
}
