//! Errors the proxy itself produces, and the one place they become gRPC statuses.
//!
//! Errors that come from etcd are not here: they are etcd's bytes and pass through untouched.

use std::error::Error as StdError;
use std::fmt::Write;
use std::time::Duration;

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
}

/// Whether `error` is etcd resetting one stream on purpose (not the connection failing, not a
/// stream refused for capacity or shutdown, which is the member's state and is retried).
pub fn is_stream_answer(error: &h2::Error) -> bool {
    error.is_reset() && error.is_remote() && error.reason() != Some(h2::Reason::REFUSED_STREAM)
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

impl CallError {
    /// The status a client of the proxy's own calls sees for it (a grpc-go client reports a
    /// reset stream this way).
    pub fn into_status(self) -> (Code, String) {
        match self {
            CallError::Status(code, message) => (code, message),
            CallError::Reset(reason) => reset_status(reason),
        }
    }
}

/// What a grpc-go client reports for a stream reset with `reason` (its mapping of HTTP/2 error
/// codes to gRPC codes, and its message).
pub fn reset_status(reason: h2::Reason) -> (Code, String) {
    let code = match reason {
        h2::Reason::CANCEL => Code::Cancelled,
        h2::Reason::REFUSED_STREAM => Code::Unavailable,
        h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
        h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
        _ => Code::Internal,
    };
    (code, format!("stream terminated by RST_STREAM with error code: {reason:?}"))
}

impl UpstreamError {
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

/// The gRPC status for a call the proxy could not deliver to any member.
pub fn no_member_status(failures: &[UpstreamError]) -> (Code, String) {
    let mut message = String::from("etcd-compat-proxy: no etcd member could serve the request");
    for (i, failure) in failures.iter().enumerate() {
        message.push_str(if i == 0 { " (" } else { "; " });
        message.push_str(&failure.to_string());
    }
    if !failures.is_empty() {
        message.push(')');
    }
    message.push_str("; check that the members in --endpoints are running and reachable");
    (Code::Unavailable, message)
}

/// The gRPC status for a write that may or may not have been applied when its member failed.
pub fn outcome_unknown_status(failure: &UpstreamError) -> (Code, String) {
    (
        Code::Unavailable,
        format!("etcd-compat-proxy: {failure}; the request may or may not have been applied, so it was not retried; check the result before retrying"),
    )
}
