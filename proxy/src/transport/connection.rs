//! One HTTP/2 connection to an etcd member, on the `h2` crate directly.
//!
//! hyper's client sends every request through a channel to its connection task and spawns a
//! task per request to wait for the answer; here the calling task opens the stream itself and
//! polls its answer, so a forwarded unary call costs no spawn and no channel hop upstream. Every
//! request goes through [`Connection::send`]; its body is sent whole, copied up by a task, or
//! written by its owner (see [`Upload`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{RecvBody, RequestBody, MAX_FRAME_SIZE, MAX_SEND_BUFFER, STREAM_WINDOW, UPSTREAM_CONNECTION_WINDOW};

/// How often an idle or busy connection is pinged, and how long a ping may go unanswered: pings
/// notice a member that vanished without closing the TCP connection (VM migration, network
/// partition) long before the kernel would.
const PING_INTERVAL: Duration = Duration::from_secs(5);
/// See [`PING_INTERVAL`].
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle to one member connection; cheap to clone, one per request.
#[derive(Clone)]
pub struct Connection {
    sender: h2::client::SendRequest<Bytes>,
    /// Set when the connection task has ended: the handle can only fail from then on.
    closed: Arc<AtomicBool>,
}

impl Connection {
    /// Runs the HTTP/2 handshake over `io` and spawns the task that drives the connection;
    /// `member` names it in logs; `closing` ends it, with every stream on it.
    pub async fn handshake<T>(
        io: T,
        member: Arc<str>,
        closing: tokio_util::sync::CancellationToken,
    ) -> Result<Connection, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, mut connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(UPSTREAM_CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            // Until etcd's SETTINGS arrive, don't open more streams than any server accepts.
            .initial_max_send_streams(100)
            // Clients cancel watches and calls in bursts; each cancel is a reset stream.
            .max_concurrent_reset_streams(10_000)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let pings = connection.ping_pong();
        let ended = Arc::clone(&closed);
        tokio::spawn(async move {
            let outcome = tokio::select! {
                result = &mut connection => result.map_err(|e| e.to_string()),
                why = keep_pinging(pings) => Err(why),
                _ = closing.cancelled() => Err("the proxy stopped using this member".to_owned()),
            };
            ended.store(true, Relaxed);
            if let Err(error) = outcome {
                tracing::debug!(%member, %error, "connection to etcd member closed");
            }
        });
        Ok(Connection { sender, closed })
    }

    /// Whether the connection is gone; a new one must be dialled.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    /// Waits until the connection can open another stream. A connection that cannot (it failed)
    /// counts as closed from then on, so that the next request dials a new one instead of
    /// finding this one again until its task has wound down.
    pub async fn ready(&mut self) -> Result<(), h2::Error> {
        let result = std::future::poll_fn(|cx| self.sender.poll_ready(cx)).await;
        if result.is_err() {
            self.closed.store(true, Relaxed);
        }
        result
    }

    /// Opens a stream for `request` (call [`Connection::ready`] first), its body going up as
    /// `upload` says; returns etcd's response headers to come and, for [`Upload::ByCaller`], the
    /// stream to write the body into. An error means nothing was sent.
    pub fn send(
        &mut self,
        mut request: Request<()>,
        upload: Upload,
    ) -> Result<(ResponseFuture, Option<h2::SendStream<Bytes>>), h2::Error> {
        // HTTP/2 allows only `te: trailers`; h2 refuses any other value rather than drop it.
        if request.headers().get(http::header::TE).is_some_and(|te| te != "trailers") {
            request.headers_mut().remove(http::header::TE);
        }
        let end_of_stream = matches!(&upload, Upload::Message(message) if message.is_empty());
        let (response, mut stream) = self.sender.send_request(request, end_of_stream)?;
        let response = ResponseFuture { state: Ok(response) };
        match upload {
            Upload::Message(message) if !end_of_stream => {
                // h2 queues what the flow-control window cannot take yet and sends it as the
                // window opens; a unary request is already in memory in full.
                if let Err(error) = stream.send_data(message, true) {
                    return Ok((ResponseFuture { state: Err(Some(error)) }, None));
                }
                Ok((response, None))
            }
            Upload::Message(_) => Ok((response, None)),
            Upload::Body(body) => {
                tokio::spawn(copy_up(body, stream));
                Ok((response, None))
            }
            Upload::ByCaller => Ok((response, Some(stream))),
        }
    }
}

/// How a request's body goes up to etcd.
pub enum Upload {
    /// One whole message, sent at once with the end of the stream.
    Message(Bytes),
    /// A body copied up by a task as it arrives, with flow control (Watch relays, client streams).
    Body(RequestBody),
    /// Written by the caller message by message, through the stream [`Connection::send`]
    /// returns (keep-alives: a copy task would cost a wake-up per keep-alive).
    ByCaller,
}

/// etcd's response headers for one request.
pub struct ResponseFuture {
    state: Result<h2::client::ResponseFuture, Option<h2::Error>>,
}

impl Future for ResponseFuture {
    type Output = Result<Response<RecvBody>, h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            Ok(response) => {
                let response = ready!(Pin::new(response).poll(cx))?;
                Poll::Ready(Ok(response.map(RecvBody::new)))
            }
            Err(error) => Poll::Ready(Err(error.take().unwrap_or_else(|| h2::Error::from(h2::Reason::INTERNAL_ERROR)))),
        }
    }
}

/// Copies a client stream (or the proxy's own messages) up to etcd until it ends or etcd
/// resets the stream.
async fn copy_up(body: RequestBody, mut stream: h2::SendStream<Bytes>) {
    super::pipe(body, &mut stream).await;
}

/// Pings the member until a ping goes unanswered; returns why.
async fn keep_pinging(pings: Option<h2::PingPong>) -> String {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return format!("ping failed: {error}"),
            Err(_) => return format!("no answer to a ping within {PING_TIMEOUT:?}"),
        }
    }
}
