//! Request headers gRPC gives a meaning to, read as etcd's gRPC server reads them.

/// Whether a request's `content-type` makes it a gRPC request, by grpc-go's rule (which etcd
/// applies): `application/grpc`, optionally followed by `+subtype` or `;parameters`.
pub fn is_grpc_content_type(value: &[u8]) -> bool {
    const BASE: &[u8] = b"application/grpc";
    value.starts_with(BASE) && matches!(value.get(BASE.len()), None | Some(b'+' | b';'))
}

/// Reads a `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &[u8]) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let number: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(number * 3600),
        b'M' => Duration::from_secs(number * 60),
        b'S' => Duration::from_secs(number),
        b'm' => Duration::from_millis(number),
        b'u' => Duration::from_micros(number),
        b'n' => Duration::from_nanos(number),
        _ => return None,
    })
}

/// The headers of a call the proxy makes itself (its watch streams).
pub fn own_call_headers() -> http::HeaderMap {
    let mut headers = http::HeaderMap::with_capacity(2);
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    headers
}

/// The headers of a gRPC answer the proxy starts itself, as etcd's server starts its own.
pub fn response_headers() -> http::HeaderMap {
    let mut headers = http::HeaderMap::with_capacity(1);
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_request_headers() {
        for good in ["application/grpc", "application/grpc+proto", "application/grpc;charset=utf-8"] {
            assert!(is_grpc_content_type(good.as_bytes()), "{good}");
        }
        for bad in ["text/plain", "application/grpcx", "application/json", ""] {
            assert!(!is_grpc_content_type(bad.as_bytes()), "{bad}");
        }
        use std::time::Duration;
        assert_eq!(parse_grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        for bad in ["abc", "S", "123456789S", "10x", "-1S", ""] {
            assert_eq!(parse_grpc_timeout(bad.as_bytes()), None, "{bad}");
        }
    }
}
