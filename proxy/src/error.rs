//! The proxy's own failures, and the one place they become gRPC statuses.
//!
//! Errors that come from etcd are not here: they are etcd's bytes and pass through untouched.
//! [`UpstreamError`] is why a request did not reach a member or its answer did not come back;
//! [`ProxyFailure`] is every answer the proxy gives itself, each with its code and message
//! (etcd's own words, from [`crate::etcd_errors`], where etcd would answer the same situation);
//! [`CallError`] is how a call that cannot be completed ends for the client.

use std::error::Error as StdError;
use std::fmt::Write;
use std::time::Duration;

use crate::etcd_errors;
use crate::grpc::{Code, Replay};

/// A failure to get a request to an etcd member or an answer back.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect failed.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect { endpoint: String, source: std::io::Error },
    /// Connect plus handshakes took longer than `--dial-timeout`.
    #[error("connecting to {endpoint} took longer than {after:?}")]
    DialTimeout { endpoint: String, after: Duration },
    /// The TLS handshake failed (certificate not trusted, wrong name, client certificate refused, ...).
    #[error("TLS handshake with {endpoint} failed: {source}")]
    Tls { endpoint: String, source: std::io::Error },
    /// The endpoint's host cannot be a TLS server name.
    #[error("{endpoint} has no valid TLS server name")]
    BadServerName { endpoint: String },
    /// The HTTP/2 handshake failed (the port is not an etcd client port, or speaks TLS when plaintext was expected).
    #[error("HTTP/2 handshake with {endpoint} failed: {source}")]
    Handshake { endpoint: String, source: h2::Error },
    /// The connection could not take the request (it is closed or failed): etcd never saw it.
    #[error("request to {endpoint} could not be sent: {}", chain(source))]
    NotSent { endpoint: String, source: h2::Error },
    /// Sending the request or receiving the response headers failed.
    #[error("request to {endpoint} failed: {}", chain(source))]
    Send { endpoint: String, source: h2::Error },
    /// The member answered its health check with a failure.
    #[error("{endpoint} is unhealthy: {why}")]
    Unhealthy { endpoint: String, why: String },
    /// The proxy could not build the request for the member; not the member's fault.
    #[error("the request could not be forwarded: {why}")]
    Request { why: String },
    /// etcd reset this one stream (RST_STREAM), as it does with a request it will not take:
    /// the answer to what the client sent, not a sign of the member's health.
    #[error("{endpoint} reset the stream ({reason:?})")]
    Reset { endpoint: String, reason: h2::Reason },
}

impl UpstreamError {
    /// Classifies a failure to send a request or receive its response headers: a reset of this
    /// stream alone is etcd's answer; anything else is the connection's (the member's) failure.
    pub fn sending(endpoint: String, source: h2::Error) -> UpstreamError {
        match source.reason() {
            Some(reason) if is_stream_answer(&source) => UpstreamError::Reset { endpoint, reason },
            _ => UpstreamError::Send { endpoint, source },
        }
    }

    /// Whether etcd cannot have received the request, so even a write may be sent elsewhere.
    pub fn request_not_sent(&self) -> bool {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::DialTimeout { .. }
            | UpstreamError::Tls { .. }
            | UpstreamError::BadServerName { .. }
            | UpstreamError::Handshake { .. }
            | UpstreamError::NotSent { .. } => true,
            UpstreamError::Send { source, .. } => never_processed(source),
            UpstreamError::Unhealthy { .. } => false,
            UpstreamError::Request { .. } => true,
            UpstreamError::Reset { .. } => false,
        }
    }

    /// Whether the failure says the member is unreachable or unwell (and so should be avoided).
    pub fn is_member_fault(&self) -> bool {
        !matches!(self, UpstreamError::Request { .. } | UpstreamError::Reset { .. })
    }

    /// Whether a request with this replay rule may be tried on another member after this failure.
    pub fn allows_retry(&self, replay: Replay) -> bool {
        match replay {
            Replay::Idempotent => true,
            Replay::IfNotSent => self.request_not_sent(),
            // The client's stream was handed to this attempt only if the request was sent.
            Replay::Never => self.request_not_sent(),
        }
    }
}

/// Whether `error` is etcd resetting one stream on purpose (not the connection failing, not a
/// stream refused for capacity or shutdown, which is the member's state and is retried).
pub fn is_stream_answer(error: &h2::Error) -> bool {
    error.is_reset() && error.is_remote() && error.reason() != Some(h2::Reason::REFUSED_STREAM)
}

/// A stream etcd refused (REFUSED_STREAM) or that was beyond its GOAWAY was never processed.
fn never_processed(error: &h2::Error) -> bool {
    error.reason() == Some(h2::Reason::REFUSED_STREAM) || (error.is_go_away() && error.is_remote())
}

/// Formats an error and all its causes, `outer: inner: innermost`.
pub fn chain(error: &dyn StdError) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // hyper repeats its cause in its own message; don't print it twice.
        if !out.ends_with(&text) {
            let _ = write!(out, ": {text}");
        }
        source = cause.source();
    }
    out
}

/// How a call the proxy cannot complete ends for the client.
#[derive(Debug)]
pub enum CallError {
    /// A gRPC status made by the proxy (or etcd's, kept whole).
    Status(Code, String),
    /// etcd reset the stream: the client's stream is reset with the same reason.
    Reset(h2::Reason),
}

impl From<(Code, String)> for CallError {
    fn from((code, message): (Code, String)) -> Self {
        CallError::Status(code, message)
    }
}

impl From<ProxyFailure> for CallError {
    fn from(failure: ProxyFailure) -> Self {
        failure.status().into()
    }
}

impl CallError {
    /// The status a client of the proxy's own calls sees for it (as a grpc-go client reports a
    /// reset stream).
    pub fn into_status(self) -> (Code, String) {
        match self {
            CallError::Status(code, message) => (code, message),
            CallError::Reset(reason) => ProxyFailure::Reset(reason).status(),
        }
    }
}

/// Every answer the proxy gives itself instead of etcd's.
#[derive(Debug)]
pub enum ProxyFailure {
    /// The client's request body failed while the proxy read it.
    RequestUnreadable(String),
    /// A request message stopped arriving for `--request-body-timeout`.
    MessageStalled(Duration),
    /// The call's `grpc-timeout` passed.
    DeadlineExceeded,
    /// A request message larger than etcd accepts.
    MessageTooLarge { claimed: u64, limit: usize },
    /// No room among the request messages held (`--max-held-request-bytes`) within `waited`.
    RequestMemoryFull { limit: usize, waited: Duration },
    /// No room among the request messages held for a stream's incomplete message.
    StreamMemoryFull { limit: usize },
    /// No room among the answers held for clients (`--max-held-response-bytes`) for a read's
    /// answer of `length` bytes.
    ResponseMemoryFull { limit: usize, length: usize },
    /// A token the proxy did not issue or no longer knows.
    InvalidToken,
    /// The system random generator failed while making a token.
    RandomFailed,
    /// A client's Authenticate the proxy cannot read.
    AuthenticateUndecodable,
    /// etcd's answer to an Authenticate the proxy cannot read.
    AuthenticateAnswerUndecodable,
    /// No member took the request; the failures seen, in order.
    NoMember(Vec<String>),
    /// A write whose member failed after it may have been applied.
    OutcomeUnknown(UpstreamError),
    /// etcd reset the stream (as a grpc-go client reports it).
    Reset(h2::Reason),
    /// The upstream connection broke during a streamed answer.
    StreamBroke { member: String, error: String },
    /// The upstream connection broke while the proxy read an answer whole; a write may have
    /// been applied (its answer was on its way).
    AnswerBroke { error: String, replay: Replay },
    /// A stream of the proxy's own (relayed Watch, keep-alives) ended without etcd's status.
    StreamEndedWithoutStatus,
    /// A stream task ended before the client was answered.
    StreamNotStarted(&'static str),
    /// The proxy is shutting down and ends its streams.
    ShuttingDown,
    /// An answer larger than a size-limited client takes, which cannot be cut; `key` when the
    /// call asked for one key (printable).
    AnswerTooLarge { length: usize, budget: usize, key: Option<String> },
    /// A limited client's Range whose result does not fit, with its size.
    RangeTooLarge { key: String, keys: i64, bytes: usize, budget: usize },
    /// A limited client's Range whose single key does not fit.
    KeyTooLarge { key: String, size: usize, budget: usize },
    /// etcd answered a Range page without any page.
    NoRangePage,
    /// etcd answered a Range page without a message.
    RangePageWithoutMessage,
    /// etcd's Range page could not be decoded.
    RangePageUndecodable(String),
    /// A change the running migration cannot carry to the new cluster, with why.
    Migrating(&'static str),
}

impl ProxyFailure {
    /// The code and message the client gets.
    pub fn status(&self) -> (Code, String) {
        use ProxyFailure::*;
        const P: &str = "etcd-compat-proxy";
        match self {
            RequestUnreadable(error) => {
                (Code::Cancelled, format!("{P}: the request could not be read from the client: {error}"))
            }
            MessageStalled(after) => (
                Code::DeadlineExceeded,
                format!("{P}: the request message stopped arriving: nothing for {after:?} (--request-body-timeout); send each message whole"),
            ),
            DeadlineExceeded => (Code::DeadlineExceeded, etcd_errors::DEADLINE_EXCEEDED.to_owned()),
            MessageTooLarge { claimed, limit } => {
                (Code::ResourceExhausted, etcd_errors::message_too_large(*claimed, *limit))
            }
            StreamMemoryFull { limit } => (
                Code::Unavailable,
                format!("{P}: the request messages the proxy holds reached --max-held-request-bytes ({limit} bytes) and this stream's next message found no room; the messages before it reached etcd; open the stream again, and if this is no flood of large requests, raise --max-held-request-bytes"),
            ),
            RequestMemoryFull { limit, waited } => (
                Code::Unavailable,
                format!("{P}: the request messages the proxy holds reached --max-held-request-bytes ({limit} bytes) and this one found no room within {waited:?}; nothing was sent to etcd, so it is safe to retry; if this is no flood of large requests, raise --max-held-request-bytes"),
            ),
            ResponseMemoryFull { limit, length } => (
                Code::Unavailable,
                format!("{P}: the answers the proxy holds for clients that have not taken them reached --max-held-response-bytes ({limit} bytes), so this answer of {length} bytes was not kept; the call changed nothing, so it is safe to retry; connections that take nothing for --unread-response-timeout are closed, which frees their room; if clients are reading, raise --max-held-response-bytes"),
            ),
            InvalidToken => (Code::Unauthenticated, etcd_errors::INVALID_AUTH_TOKEN.to_owned()),
            RandomFailed => {
                (Code::Internal, format!("{P}: the system random generator failed; retry Authenticate"))
            }
            AuthenticateUndecodable => (
                Code::InvalidArgument,
                format!("{P}: the Authenticate request could not be decoded (compressed or malformed); send an uncompressed AuthenticateRequest"),
            ),
            AuthenticateAnswerUndecodable => (Code::Internal, format!("{P}: cannot decode etcd's Authenticate answer")),
            NoMember(failures) => {
                let mut message = format!("{P}: no etcd member could serve the request");
                for (i, failure) in failures.iter().enumerate() {
                    message.push_str(if i == 0 { " (" } else { "; " });
                    message.push_str(failure);
                }
                if !failures.is_empty() {
                    message.push(')');
                }
                message.push_str("; check that the members in --endpoints are running and reachable");
                (Code::Unavailable, message)
            }
            OutcomeUnknown(failure) => (
                Code::Unavailable,
                format!("{P}: {failure}; the request may or may not have been applied, so it was not retried; check the result before retrying"),
            ),
            Reset(reason) => {
                let code = match *reason {
                    h2::Reason::CANCEL => Code::Cancelled,
                    h2::Reason::REFUSED_STREAM => Code::Unavailable,
                    h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
                    h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
                    _ => Code::Internal,
                };
                (code, etcd_errors::stream_reset(*reason))
            }
            StreamBroke { member, error } => (
                Code::Unavailable,
                format!("{P}: the connection to etcd member {member} broke during the call ({error}); retry the call"),
            ),
            AnswerBroke { error, replay: Replay::Idempotent } => (
                Code::Unavailable,
                format!("{P}: the connection to etcd broke while reading its answer ({error}); retry the call"),
            ),
            AnswerBroke { error, replay: Replay::IfNotSent | Replay::Never } => (
                Code::Unavailable,
                format!("{P}: the connection to etcd broke while reading its answer ({error}); the request may or may not have been applied, so it was not retried; check the result before retrying"),
            ),
            StreamEndedWithoutStatus => {
                (Code::Unavailable, format!("{P}: the stream ended inside the proxy without a status; retry the call"))
            }
            StreamNotStarted(what) => (Code::Cancelled, format!("{P}: the {what} stream ended before it started")),
            ShuttingDown => (Code::Unavailable, format!("{P} is shutting down; reconnect to continue")),
            AnswerTooLarge { length, budget, key: None } => (
                Code::ResourceExhausted,
                format!("{P}: etcd's answer is a {length}-byte message, more than this client's limit of {budget} bytes per message; read large results with paged Range calls (`limit`) or raise the client's gRPC receive limit"),
            ),
            AnswerTooLarge { length, budget, key: Some(key) } => (
                Code::ResourceExhausted,
                format!("{P}: etcd's answer for the key {key} is a {length}-byte message, more than this client's limit of {budget} bytes per message; one key cannot be paged: read it with a client whose gRPC receive limit is larger"),
            ),
            RangeTooLarge { key, keys, bytes, budget } => (
                Code::ResourceExhausted,
                format!("{P}: the range from {key} holds {keys} keys, {bytes} bytes encoded, more than this client's limit of {budget} bytes per message; read it in pages with `limit` (`more` and `count` in each response tell when to stop), raise the client's gRPC receive limit, or let the proxy return a first page for this key prefix with --truncate-oversize-prefix"),
            ),
            KeyTooLarge { key, size, budget } => (
                Code::ResourceExhausted,
                format!("{P}: the key {key} alone is {size} bytes with its value, more than this client's limit of {budget} bytes per message; read it with a client whose gRPC receive limit is larger"),
            ),
            NoRangePage => (Code::ResourceExhausted, format!("{P}: etcd returned no page for the range")),
            RangePageWithoutMessage => (Code::Internal, format!("{P}: etcd answered a Range page without a message")),
            RangePageUndecodable(error) => (Code::Internal, format!("{P}: cannot decode etcd's Range page: {error}")),
            Migrating(why) => (Code::FailedPrecondition, (*why).to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_in_etcds_words_where_etcd_has_them() {
        assert_eq!(
            ProxyFailure::DeadlineExceeded.status(),
            (Code::DeadlineExceeded, "context deadline exceeded".to_owned())
        );
        assert_eq!(
            ProxyFailure::MessageTooLarge { claimed: 104857610, limit: 2097152 }.status(),
            (Code::ResourceExhausted, "grpc: received message larger than max (104857610 vs. 2097152)".to_owned())
        );
        assert_eq!(
            ProxyFailure::InvalidToken.status(),
            (Code::Unauthenticated, "etcdserver: invalid auth token".to_owned())
        );
        assert_eq!(
            ProxyFailure::Reset(h2::Reason::PROTOCOL_ERROR).status(),
            (Code::Internal, "stream terminated by RST_STREAM with error code: PROTOCOL_ERROR".to_owned())
        );
        let (code, message) = ProxyFailure::NoMember(Vec::new()).status();
        assert_eq!(code, Code::Unavailable);
        assert_eq!(
            message,
            "etcd-compat-proxy: no etcd member could serve the request; check that the members in --endpoints are running and reachable"
        );
    }

    #[test]
    fn a_broken_answer_says_whether_the_call_may_have_been_applied() {
        let broke = |replay| ProxyFailure::AnswerBroke { error: "connection reset".to_owned(), replay }.status();
        assert_eq!(
            broke(Replay::Idempotent),
            (
                Code::Unavailable,
                "etcd-compat-proxy: the connection to etcd broke while reading its answer (connection reset); retry the call"
                    .to_owned()
            )
        );
        assert_eq!(
            broke(Replay::IfNotSent),
            (
                Code::Unavailable,
                "etcd-compat-proxy: the connection to etcd broke while reading its answer (connection reset); the request may or may not have been applied, so it was not retried; check the result before retrying"
                    .to_owned()
            )
        );
    }
}
