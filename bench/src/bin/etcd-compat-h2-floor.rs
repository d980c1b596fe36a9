//! The h2 floor: the least a forwarder built on the `h2` crate can do, as a measuring stick for
//! the proxy's cost (`etcd-compat-bench --h2-floor`). Not a proxy: no TLS, auth, routing,
//! retries, limits or metrics, and it holds whatever a client does not read.
//!
//! It is built the way the proxy's data path is, so that what remains between the two is the
//! proxy's own work: one single-threaded runtime, one HTTP/2 connection to the member with the
//! same windows and frame size, small frames batched into one write, mimalloc, a task per call,
//! a single-message request read whole before it goes up, etcd's headers, frames and trailers
//! passed back as they came.
//!
//! Usage (as the bench starts proxies): `etcd-compat-h2-floor start --endpoints=HOST:PORT
//! --listen-addr HOST:PORT --metrics-addr http://HOST:PORT`. The metrics address answers every
//! HTTP request with 200 and no body, which is all the bench's readiness check asks of it.

use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::{Bytes, BytesMut};
// The proxy's own settings and write batching, so that both pay for the same frames and writes.
use etcd_compat_proxy::http2::{
    BatchedWrites, CLIENT_CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_SEND_BUFFER, STREAM_WINDOW, UPSTREAM_CONNECTION_WINDOW,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where to listen and forward, from the flags the bench passes every proxy.
struct Addresses {
    member: String,
    listen: String,
    metrics: String,
}

impl Addresses {
    fn parse(args: &[String]) -> Result<Addresses> {
        let value = |name: &str| -> Option<String> {
            args.iter().enumerate().find_map(|(at, arg)| match arg.strip_prefix(name) {
                Some(rest) if rest.starts_with('=') => Some(rest[1..].to_owned()),
                Some("") => args.get(at + 1).cloned(),
                _ => None,
            })
        };
        let strip = |url: String| url.trim_start_matches("http://").to_owned();
        let member = value("--endpoints").ok_or_else(|| anyhow!("--endpoints HOST:PORT is required"))?;
        if member.contains(',') {
            bail!("--endpoints {member}: the h2 floor forwards to one member");
        }
        Ok(Addresses {
            member: strip(member),
            listen: value("--listen-addr").ok_or_else(|| anyhow!("--listen-addr HOST:PORT is required"))?,
            metrics: strip(value("--metrics-addr").ok_or_else(|| anyhow!("--metrics-addr URL is required"))?),
        })
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = Addresses::parse(&args).and_then(|addresses| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
        runtime.block_on(serve(addresses))
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("etcd-compat-h2-floor: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(addresses: Addresses) -> Result<()> {
    let member =
        TcpStream::connect(&addresses.member).await.with_context(|| format!("connecting to {}", addresses.member))?;
    member.set_nodelay(true)?;
    let (sender, connection) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(UPSTREAM_CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .handshake::<_, Bytes>(BatchedWrites(member))
        .await
        .context("HTTP/2 handshake with the member")?;
    let listener =
        TcpListener::bind(&addresses.listen).await.with_context(|| format!("listening on {}", addresses.listen))?;
    let health =
        TcpListener::bind(&addresses.metrics).await.with_context(|| format!("listening on {}", addresses.metrics))?;
    tokio::spawn(answer_health_checks(health));
    let authority = http::uri::Authority::try_from(addresses.member.as_str())?;
    let accepting = async {
        loop {
            let (client, _) = listener.accept().await.context("accepting a client")?;
            let _ = client.set_nodelay(true);
            tokio::spawn(serve_client(client, sender.clone(), authority.clone()));
        }
    };
    // Without its one member connection the floor can forward nothing: it exits, and the bench
    // starts it again.
    tokio::select! {
        outcome = connection => outcome.context("the member connection failed"),
        outcome = accepting => outcome,
    }
}

async fn answer_health_checks(listener: TcpListener) {
    while let Ok((mut socket, _)) = listener.accept().await {
        let mut request = [0u8; 1024];
        let _ = socket.read(&mut request).await;
        let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
    }
}

async fn serve_client(client: TcpStream, member: h2::client::SendRequest<Bytes>, authority: http::uri::Authority) {
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CLIENT_CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .handshake::<_, Bytes>(BatchedWrites(client))
        .await;
    let Ok(mut connection) = handshake else { return };
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        let member = member.clone();
        let authority = authority.clone();
        tokio::spawn(async move {
            if let Err(error) = forward(member, authority, request, &mut respond).await {
                eprintln!("etcd-compat-h2-floor: a call failed: {error:#}");
                respond.send_reset(h2::Reason::INTERNAL_ERROR);
            }
        });
    }
}

/// One call: the request up, etcd's answer back, frame by frame.
async fn forward(
    member: h2::client::SendRequest<Bytes>,
    authority: http::uri::Authority,
    request: http::Request<h2::RecvStream>,
    respond: &mut h2::server::SendResponse<Bytes>,
) -> Result<()> {
    let (parts, mut body) = request.into_parts();
    let path = parts.uri.path_and_query().cloned().ok_or_else(|| anyhow!("a request without a path"))?;
    // etcd's two bidirectional streams; every other call has one request message.
    let bidirectional = path.path().ends_with("/Watch") || path.path().ends_with("/LeaseKeepAlive");
    let uri = http::Uri::builder().scheme("http").authority(authority).path_and_query(path).build()?;
    let mut upstream = http::Request::builder().method(parts.method).uri(uri).body(())?;
    *upstream.headers_mut() = parts.headers;

    let response = if bidirectional {
        let mut member = member.ready().await?;
        let (response, mut up) = member.send_request(upstream, false)?;
        tokio::spawn(async move {
            while let Some(Ok(data)) = body.data().await {
                let _ = body.flow_control().release_capacity(data.len());
                if up.send_data(data, false).is_err() {
                    return;
                }
            }
            let _ = up.send_data(Bytes::new(), true);
        });
        response
    } else {
        let message = read_whole(&mut body).await?;
        let mut member = member.ready().await?;
        let (response, mut up) = member.send_request(upstream, false)?;
        up.send_data(message, true)?;
        response
    };

    let (parts, mut answer) = response.await?.into_parts();
    let mut down = respond.send_response(http::Response::from_parts(parts, ()), false)?;
    while let Some(data) = answer.data().await {
        let data = data?;
        let _ = answer.flow_control().release_capacity(data.len());
        down.send_data(data, false)?;
    }
    match answer.trailers().await? {
        Some(trailers) => down.send_trailers(trailers)?,
        None => down.send_data(Bytes::new(), true)?,
    }
    Ok(())
}

/// A single-message request, whole: most arrive in one frame, which is passed on as it came.
async fn read_whole(body: &mut h2::RecvStream) -> Result<Bytes> {
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    while let Some(data) = body.data().await {
        let data = data?;
        let _ = body.flow_control().release_capacity(data.len());
        match (&mut joined, first.take()) {
            (Some(buffer), _) => buffer.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(earlier)) => {
                let mut buffer = BytesMut::from(&earlier[..]);
                buffer.extend_from_slice(&data);
                joined = Some(buffer);
            }
        }
    }
    Ok(joined.map(BytesMut::freeze).or(first).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn takes_the_flags_the_bench_gives_every_proxy_in_either_form() {
        let parsed = Addresses::parse(&args(
            "start --endpoints=http://127.0.0.1:2379 --listen-addr 127.0.0.1:23790 --metrics-addr=http://127.0.0.1:9000",
        ))
        .unwrap();
        assert_eq!(
            (parsed.member.as_str(), parsed.listen.as_str(), parsed.metrics.as_str()),
            ("127.0.0.1:2379", "127.0.0.1:23790", "127.0.0.1:9000")
        );
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let error = |line| Addresses::parse(&args(line)).err().map(|e| e.to_string());
        assert_eq!(
            error("start --endpoints=a:1,b:2 --listen-addr x:1 --metrics-addr x:2").as_deref(),
            Some("--endpoints a:1,b:2: the h2 floor forwards to one member")
        );
        assert_eq!(
            error("start --endpoints=a:1 --metrics-addr x:2").as_deref(),
            Some("--listen-addr HOST:PORT is required")
        );
        // A flag that only starts like another is not taken for it.
        assert_eq!(
            error("start --endpointsx=a:1 --listen-addr x:1 --metrics-addr x:2").as_deref(),
            Some("--endpoints HOST:PORT is required")
        );
    }
}
