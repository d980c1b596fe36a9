//! One HTTP/2 connection to an etcd member, on the `h2` crate directly.
//!
//! hyper's client sends every request through a channel to its connection task and spawns a
//! task per request to wait for the answer; here the calling task opens the stream itself and
//! polls its answer, so a forwarded unary call costs no spawn and no channel hop upstream. Only
//! client streams (Watch, LeaseKeepAlive) get a task, which copies their messages up.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::body::RequestBody;
use crate::upstream::{CONNECTION_WINDOW, STREAM_WINDOW};

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
    /// `member` names it in logs.
    pub async fn handshake<T>(io: T, member: Arc<str>) -> Result<Connection, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, mut connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(1024 * 1024)
            // Large requests (a Put of a big value) go out without waiting on small steps.
            .max_send_buffer_size(1024 * 1024)
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

    /// Waits until the connection can open another stream.
    pub async fn ready(&mut self) -> Result<(), h2::Error> {
        std::future::poll_fn(|cx| self.sender.poll_ready(cx)).await
    }

    /// Opens a stream for `request` (call [`Connection::ready`] first) and sends its body: a
    /// buffered message at once, a stream by a task that copies it up as it arrives.
    pub fn send_request(&mut self, request: Request<RequestBody>) -> ResponseFuture {
        let (mut head, mut body) = request.into_parts();
        // HTTP/2 allows only `te: trailers`; h2 refuses any other value rather than drop it.
        if head.headers.get(http::header::TE).is_some_and(|te| te != "trailers") {
            head.headers.remove(http::header::TE);
        }
        let head = Request::from_parts(head, ());
        let message = match &mut body {
            RequestBody::Buffered(message) => Some(message.take().unwrap_or_default()),
            RequestBody::Streaming(_) | RequestBody::Channel(_) => None,
        };
        let end_of_stream = message.as_ref().is_some_and(Bytes::is_empty);
        let (response, mut stream) = match self.sender.send_request(head, end_of_stream) {
            Ok(opened) => opened,
            Err(error) => return ResponseFuture { state: Err(Some(error)) },
        };
        match message {
            Some(message) if !end_of_stream => {
                // h2 queues what the flow-control window cannot take yet and sends it as the
                // window opens; a unary request is already in memory in full.
                if let Err(error) = stream.send_data(message, true) {
                    return ResponseFuture { state: Err(Some(error)) };
                }
            }
            Some(_) => {}
            None => {
                tokio::spawn(copy_up(body, stream));
            }
        }
        ResponseFuture { state: Ok(response) }
    }
}

/// etcd's response headers for one request.
pub struct ResponseFuture {
    state: Result<h2::client::ResponseFuture, Option<h2::Error>>,
}

impl Future for ResponseFuture {
    type Output = Result<Response<UpstreamBody>, h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            Ok(response) => {
                let response = ready!(Pin::new(response).poll(cx))?;
                Poll::Ready(Ok(response.map(|recv| UpstreamBody { recv, data_done: false })))
            }
            Err(error) => Poll::Ready(Err(error.take().unwrap_or_else(|| h2::Error::from(h2::Reason::INTERNAL_ERROR)))),
        }
    }
}

/// The body of etcd's answer: DATA frames as they arrive, then trailers.
pub struct UpstreamBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The bytes are handed on at once; the window reopens for etcd's next ones.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Copies a client stream (or the proxy's own messages) up to etcd, respecting its flow
/// control, until the body ends or etcd resets the stream.
async fn copy_up(mut body: RequestBody, mut stream: h2::SendStream<Bytes>) {
    loop {
        let frame = tokio::select! {
            // etcd ended the call (or the proxy dropped the answer): stop reading the client.
            _ = std::future::poll_fn(|cx| stream.poll_reset(cx)) => return,
            frame = body.frame() => frame,
        };
        match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(_)) => {
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if send_within_window(&mut stream, data).await.is_err() {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = stream.send_trailers(trailers);
                    }
                    return;
                }
            },
        }
    }
}

/// Sends `data` in pieces the peer's window has room for, so a fast client cannot make the
/// proxy queue without bound.
async fn send_within_window(stream: &mut h2::SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(granted) => granted?,
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
        };
        if granted == 0 {
            continue;
        }
        let piece = data.split_to(granted.min(data.len()));
        stream.send_data(piece, false)?;
    }
    Ok(())
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
