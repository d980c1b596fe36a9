use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Sends `GET path` over plain HTTP/1.1 to `addr` and returns the status code and body.
///
/// `timeout` bounds the connect and every single read and write. Handles
/// `Content-Length`, chunked and read-to-close bodies; the body is decoded lossily as UTF-8.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    stream.flush()?;

    let mut reader = BufReader::new(stream);
    let status = read_status_line(&mut reader)?;
    let mut content_length = None;
    let mut chunked = false;
    loop {
        let line = read_crlf_line(&mut reader)?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(invalid(format!("malformed header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length = value.parse::<usize>().map_err(|_| invalid(format!("bad Content-Length {value:?}")))?;
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }

    let mut body = Vec::new();
    if chunked {
        read_chunked_body(&mut reader, &mut body)?;
    } else if let Some(length) = content_length {
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
        reader.read_to_end(&mut body)?;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn read_status_line(reader: &mut impl BufRead) -> io::Result<u16> {
    let line = read_crlf_line(reader)?;
    let mut parts = line.split_whitespace();
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(format!("not an HTTP/1.x status line: {line:?}")));
    }
    parts.next().and_then(|code| code.parse::<u16>().ok()).ok_or_else(|| invalid(format!("no status code in {line:?}")))
}

fn read_chunked_body(reader: &mut impl BufRead, body: &mut Vec<u8>) -> io::Result<()> {
    loop {
        let size_line = read_crlf_line(reader)?;
        let size_text = size_line.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size_text, 16).map_err(|_| invalid(format!("bad chunk size line {size_line:?}")))?;
        if size == 0 {
            // Trailers, if any, end with an empty line.
            while !read_crlf_line(reader)?.is_empty() {}
            return Ok(());
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        if !read_crlf_line(reader)?.is_empty() {
            return Err(invalid("chunk not followed by CRLF".to_owned()));
        }
    }
}

/// One line without its line ending; EOF before any byte is an error because every
/// caller expects more of the response.
fn read_crlf_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut raw = Vec::new();
    if reader.read_until(b'\n', &mut raw)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-response"));
    }
    while raw.last().is_some_and(|byte| *byte == b'\n' || *byte == b'\r') {
        raw.pop();
    }
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}
