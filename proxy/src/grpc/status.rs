//! gRPC statuses: codes, and the headers or trailers that carry them.

use http::{HeaderMap, HeaderName, HeaderValue};

/// gRPC status codes (the numbering is fixed by the gRPC spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

/// Every code, indexed by its number.
pub const ALL_CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

impl Code {
    /// The name used by go-grpc-prometheus labels, so existing dashboards keep working.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "Canceled",
            Code::Unknown => "Unknown",
            Code::InvalidArgument => "InvalidArgument",
            Code::DeadlineExceeded => "DeadlineExceeded",
            Code::NotFound => "NotFound",
            Code::AlreadyExists => "AlreadyExists",
            Code::PermissionDenied => "PermissionDenied",
            Code::ResourceExhausted => "ResourceExhausted",
            Code::FailedPrecondition => "FailedPrecondition",
            Code::Aborted => "Aborted",
            Code::OutOfRange => "OutOfRange",
            Code::Unimplemented => "Unimplemented",
            Code::Internal => "Internal",
            Code::Unavailable => "Unavailable",
            Code::DataLoss => "DataLoss",
            Code::Unauthenticated => "Unauthenticated",
        }
    }

    /// Reads the `grpc-status` header or trailer; anything unparsable counts as `Unknown`, as gRPC clients do.
    pub fn from_headers(headers: &HeaderMap) -> Option<Code> {
        let value = headers.get(&GRPC_STATUS)?;
        let number: usize = value.to_str().ok().and_then(|s| s.parse().ok()).unwrap_or(Code::Unknown as usize);
        Some(ALL_CODES.get(number).copied().unwrap_or(Code::Unknown))
    }
}

/// The `grpc-status` header or trailer. Named once: every answer is looked up by it, and a
/// name given as text is parsed again at each lookup.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// The `grpc-message` header or trailer; see [`GRPC_STATUS`].
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The decoded `grpc-message` of a status, empty when there is none.
pub fn status_message(headers: &HeaderMap) -> String {
    let Some(raw) = headers.get(&GRPC_MESSAGE) else { return String::new() };
    let raw = raw.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = raw
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (raw[i], hex) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Builds the headers of a trailers-only gRPC response carrying an error.
pub fn status_headers(code: Code, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(3);
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS, HeaderValue::from(code as u16));
    if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert(GRPC_MESSAGE, value);
    }
    headers
}

/// Percent-encodes a grpc-message as the gRPC spec requires (printable ASCII except `%` stays).
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_message_encoding() {
        let headers = status_headers(Code::Unavailable, "etcdserver: 100% done\né");
        assert_eq!(status_message(&headers), "etcdserver: 100% done\né");
        assert_eq!(percent_encode("etcdserver: 100% done\n"), "etcdserver: 100%25 done%0A");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn status_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(Code::from_headers(&headers), None);
        headers.insert("grpc-status", HeaderValue::from_static("9"));
        assert_eq!(Code::from_headers(&headers), Some(Code::FailedPrecondition));
        headers.insert("grpc-status", HeaderValue::from_static("99"));
        assert_eq!(Code::from_headers(&headers), Some(Code::Unknown));
    }
}
