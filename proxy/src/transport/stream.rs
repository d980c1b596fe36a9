//! The two halves of an HTTP/2 stream to etcd: what arrives ([`RecvBody`]: etcd's answer, as
//! an `http_body::Body`) and what is sent ([`pipe`]: a client stream, with flow control).

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The receiving half of a stream: DATA frames as they arrive, then trailers.
pub struct RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl RecvBody {
    /// Wraps the receiving half of a stream.
    pub fn new(recv: h2::RecvStream) -> RecvBody {
        RecvBody { recv, data_done: false }
    }
}

impl Body for RecvBody {
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

/// Sends `body` into `stream` until the body ends (then ends the stream, with its trailers if
/// it has some), the body fails (the stream is reset) or the peer resets the stream. A chunk is
/// handed to h2 once the stream has some send capacity, so one slow reader holds at most one
/// chunk of its body in the proxy.
pub async fn pipe<B>(mut body: B, stream: &mut h2::SendStream<Bytes>)
where
    B: Body<Data = Bytes> + Unpin,
{
    loop {
        let frame = poll_fn(|cx| {
            // Watching for a reset while waiting for the body stops a stream nobody reads.
            if stream.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        let frame = match frame {
            None => return,
            Some(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Err(_))) => {
                stream.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Some(Some(Ok(frame))) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.reserve_capacity(0);
                    let _ = stream.send_trailers(trailers);
                    return;
                }
                continue;
            }
        };
        if !data.is_empty() {
            // A minimal claim: h2 raises it to the chunk's length when the chunk is handed
            // over, and a claim of the whole chunk up front would pin connection window that
            // other streams may need.
            stream.reserve_capacity(1);
            let room = poll_fn(|cx| {
                while stream.capacity() == 0 {
                    match ready!(stream.poll_capacity(cx)) {
                        Some(Ok(_)) => {}
                        // The stream or its connection is gone: nobody reads any more.
                        Some(Err(_)) | None => return Poll::Ready(false),
                    }
                }
                Poll::Ready(true)
            })
            .await;
            if !room {
                return;
            }
        }
        let end = body.is_end_stream();
        if stream.send_data(data, end).is_err() || end {
            return;
        }
    }
}
