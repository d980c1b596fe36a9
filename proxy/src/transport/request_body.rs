//! What goes up to etcd as a streamed request's body: the client's own stream, or the messages
//! a stream task of the proxy writes (counted, so that the task can hold its
//! client back while etcd is not reading).

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// A streamed request body sent to etcd: the client's live stream, or the proxy's own messages.
pub enum RequestBody {
    /// A client stream (Watch, LeaseKeepAlive, unknown methods), forwarded frame by frame.
    Streaming(Incoming),
    /// Messages the proxy writes itself (a relayed Watch stream), ended when the sender goes away.
    Channel(FeedReceiver),
}

/// Messages a stream task writes into an upstream stream, counted until they leave for etcd so
/// that the task can stop taking its client's messages while etcd is not reading them.
pub fn feed() -> (FeedSender, FeedReceiver) {
    let (messages, receiver) = tokio::sync::mpsc::unbounded_channel();
    let state = Arc::new(FeedState { queued: AtomicUsize::new(0), writer: AtomicWaker::new() });
    (FeedSender { messages, state: Arc::clone(&state) }, FeedReceiver { messages: receiver, state })
}

struct FeedState {
    /// Bytes sent and not yet taken by the upstream stream.
    queued: AtomicUsize,
    /// The task waiting for room.
    writer: AtomicWaker,
}

/// The writing end of a [`feed`].
pub struct FeedSender {
    messages: tokio::sync::mpsc::UnboundedSender<Bytes>,
    state: Arc<FeedState>,
}

impl FeedSender {
    /// A sender whose messages go nowhere (the upstream side was closed).
    pub fn closed() -> FeedSender {
        feed().0
    }

    /// Queues a message for etcd; dropped if the stream is gone.
    pub fn send(&self, message: Bytes) {
        let length = message.len();
        if self.messages.send(message).is_ok() {
            self.state.queued.fetch_add(length, Relaxed);
        }
    }

    /// Ready while fewer than `limit` bytes wait for etcd; otherwise the task is woken when
    /// they leave.
    pub fn poll_room(&self, cx: &mut Context<'_>, limit: usize) -> Poll<()> {
        if self.state.queued.load(Relaxed) < limit || self.messages.is_closed() {
            return Poll::Ready(());
        }
        self.state.writer.register(cx.waker());
        match self.state.queued.load(Relaxed) < limit {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }
}

/// The reading end of a [`feed`], the body of the upstream request.
pub struct FeedReceiver {
    messages: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    state: Arc<FeedState>,
}

impl FeedReceiver {
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let message = std::task::ready!(self.messages.poll_recv(cx));
        if let Some(message) = &message {
            self.state.queued.fetch_sub(message.len(), Relaxed);
            self.state.writer.wake();
        }
        Poll::Ready(message)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streaming(incoming) => Pin::new(incoming).poll_frame(cx),
            RequestBody::Channel(messages) => messages.poll_message(cx).map(|m| m.map(|m| Ok(Frame::data(m)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming(incoming) => incoming.is_end_stream(),
            RequestBody::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming(incoming) => incoming.size_hint(),
            RequestBody::Channel(_) => SizeHint::default(),
        }
    }
}
