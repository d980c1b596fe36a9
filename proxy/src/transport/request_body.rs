//! What goes up to etcd as a streamed request's body: the client's own stream, or the messages
//! a stream task of the proxy writes (counted, so that the task can hold its
//! client back while etcd is not reading).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::mailbox::{mailbox, MailboxReceiver, MailboxSender};

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
    let (sender, receiver) = mailbox();
    (FeedSender { messages: Some(sender) }, FeedReceiver { messages: receiver })
}

/// The writing end of a [`feed`].
pub struct FeedSender {
    /// `None`: a sender whose messages go nowhere.
    messages: Option<MailboxSender<Bytes>>,
}

impl FeedSender {
    /// A sender whose messages go nowhere (the upstream side was closed).
    pub fn closed() -> FeedSender {
        FeedSender { messages: None }
    }

    /// Queues a message for etcd; dropped if the stream is gone.
    pub fn send(&self, message: Bytes) {
        if let Some(messages) = &self.messages {
            let length = message.len();
            messages.send(message, length);
        }
    }

    /// Ready while fewer than `limit` bytes wait for etcd; otherwise the task is woken when
    /// they leave.
    pub fn poll_room(&self, cx: &mut Context<'_>, limit: usize) -> Poll<()> {
        match &self.messages {
            Some(messages) => messages.poll_room(cx, limit),
            None => Poll::Ready(()),
        }
    }
}

/// The reading end of a [`feed`], the body of the upstream request.
pub struct FeedReceiver {
    messages: MailboxReceiver<Bytes>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streaming(incoming) => Pin::new(incoming).poll_frame(cx),
            RequestBody::Channel(messages) => messages.messages.poll_next(cx).map(|m| m.map(|m| Ok(Frame::data(m)))),
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
