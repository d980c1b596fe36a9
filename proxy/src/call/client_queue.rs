//! The frames a stream task of the proxy (a relayed Watch, a keep-alive stream) has for its
//! client, waiting until the client reads them: counted in bytes, so that the task can stop
//! taking etcd's data when a client falls behind, instead of holding it in memory or leaving it
//! in the member connection, where it would hold up every other stream on that connection.
//!
//! The task ([`QueueSender`]) pushes frames and asks whether the queue is full; the client's
//! response body ([`QueueReceiver`]) takes them as the client can receive them and wakes the task
//! once the queue has drained to half, or when the client is gone.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::Frame;

struct Shared {
    frames: VecDeque<Frame<Bytes>>,
    /// Data bytes in `frames`.
    bytes: usize,
    /// The body waiting for a frame.
    body: Option<Waker>,
    /// The task waiting for room or for the client to go away.
    task: Option<Waker>,
    /// The task is done: no more frames will come.
    sender_gone: bool,
    /// The client's body was dropped: nobody reads any more.
    receiver_gone: bool,
}

/// A new queue that counts as full once it holds `full_at` bytes of data.
pub fn channel(full_at: usize) -> (QueueSender, QueueReceiver) {
    let shared = Arc::new(Mutex::new(Shared {
        frames: VecDeque::new(),
        bytes: 0,
        body: None,
        task: None,
        sender_gone: false,
        receiver_gone: false,
    }));
    (QueueSender { shared: Arc::clone(&shared), full_at }, QueueReceiver { shared, full_at })
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // The queue's state stays consistent at every step, so a poisoned lock is still usable.
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The task's end of the queue.
pub struct QueueSender {
    shared: Arc<Mutex<Shared>>,
    full_at: usize,
}

impl QueueSender {
    /// Queues a frame for the client; false if the client is gone.
    pub fn push(&self, frame: Frame<Bytes>) -> bool {
        let mut shared = lock(&self.shared);
        if shared.receiver_gone {
            return false;
        }
        shared.bytes += frame.data_ref().map_or(0, Bytes::len);
        shared.frames.push_back(frame);
        if let Some(body) = shared.body.take() {
            body.wake();
        }
        true
    }

    /// Whether the client has fallen `full_at` bytes behind.
    pub fn is_full(&self) -> bool {
        lock(&self.shared).bytes >= self.full_at
    }

    /// Whether the client is gone.
    pub fn is_closed(&self) -> bool {
        lock(&self.shared).receiver_gone
    }

    /// Ready once the queue holds at most half of `full_at`, or the client is gone; otherwise
    /// the task is woken when that happens.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut shared = lock(&self.shared);
        if shared.receiver_gone || shared.bytes <= self.full_at / 2 {
            return Poll::Ready(());
        }
        shared.task = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Ready once the client is gone; otherwise the task is woken when that happens.
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut shared = lock(&self.shared);
        if shared.receiver_gone {
            return Poll::Ready(());
        }
        shared.task = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Resolves once the queue has room again (see [`QueueSender::poll_room`]).
    pub async fn room(&self) {
        std::future::poll_fn(|cx| self.poll_room(cx)).await
    }

    /// Resolves once the client is gone.
    pub async fn closed(&self) {
        std::future::poll_fn(|cx| self.poll_closed(cx)).await
    }
}

impl Drop for QueueSender {
    fn drop(&mut self) {
        let mut shared = lock(&self.shared);
        shared.sender_gone = true;
        if let Some(body) = shared.body.take() {
            body.wake();
        }
    }
}

/// The client's end of the queue.
pub struct QueueReceiver {
    shared: Arc<Mutex<Shared>>,
    full_at: usize,
}

impl QueueReceiver {
    /// The next frame; `None` once the task is done and everything was taken.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame<Bytes>>> {
        let mut shared = lock(&self.shared);
        match shared.frames.pop_front() {
            Some(frame) => {
                let was_full = shared.bytes > self.full_at / 2;
                shared.bytes -= frame.data_ref().map_or(0, Bytes::len);
                if was_full && shared.bytes <= self.full_at / 2 {
                    if let Some(task) = shared.task.take() {
                        task.wake();
                    }
                }
                Poll::Ready(Some(frame))
            }
            None if shared.sender_gone => Poll::Ready(None),
            None => {
                shared.body = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        let mut shared = lock(&self.shared);
        shared.receiver_gone = true;
        shared.frames.clear();
        if let Some(task) = shared.task.take() {
            task.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    fn data(n: usize) -> Frame<Bytes> {
        Frame::data(Bytes::from(vec![0; n]))
    }

    #[tokio::test]
    async fn full_at_the_mark_and_room_again_at_half() {
        let (sender, mut receiver) = channel(100);
        for _ in 0..4 {
            assert!(sender.push(data(30)));
        }
        assert!(sender.is_full());
        let waiting = tokio::spawn(async move {
            sender.room().await;
            sender
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // 120 -> 90 -> 60: still over half.
        for _ in 0..2 {
            assert!(poll_fn(|cx| receiver.poll_next(cx)).await.is_some());
        }
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert!(poll_fn(|cx| receiver.poll_next(cx)).await.is_some());
        let sender = waiting.await.unwrap();
        assert!(!sender.is_full());
        drop(sender);
        assert!(poll_fn(|cx| receiver.poll_next(cx)).await.is_some());
        assert!(poll_fn(|cx| receiver.poll_next(cx)).await.is_none());
    }

    #[tokio::test]
    async fn a_client_that_goes_away_releases_the_task() {
        let (sender, receiver) = channel(10);
        assert!(sender.push(data(20)));
        let waiting = tokio::spawn(async move {
            sender.closed().await;
            sender.push(data(1))
        });
        tokio::task::yield_now().await;
        drop(receiver);
        assert!(!waiting.await.unwrap(), "frames for a client that is gone are refused");
    }
}
