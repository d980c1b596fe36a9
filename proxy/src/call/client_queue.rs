//! The frames a stream task of the proxy (a relayed Watch, a keep-alive stream) has for its
//! client, waiting until the client reads them: counted in bytes, so that the task can stop
//! taking etcd's data when a client falls behind, instead of holding it in memory or leaving it
//! in the member connection, where it would hold up every other stream on that connection.
//!
//! The task ([`QueueSender`]) pushes frames and asks whether the queue is full; the client's
//! response body ([`QueueReceiver`]) takes them as the client can receive them and wakes the task
//! once the queue has drained to half, or when the client is gone.
//!
//! What many clients' queues hold together is bounded too (`--max-held-response-bytes`): a
//! message that waits behind [`UNCOUNTED`] bytes is counted in the proxy's memory for answers
//! until its last copy is gone (a shared watch's messages are counted by the hub, once however
//! many clients they wait for), and while that memory is full, a queue holding more than
//! [`UNCOUNTED`] is full as well. A client that takes nothing of such a queue for
//! `--unread-response-timeout` has its connection closed (`transport::unread`), which frees what
//! it held.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::Frame;

use super::admission::MemoryBudget;
use super::relay::ANSWER_PIECE;
use crate::transport::unread::{AnswerProgress, UnreadAnswers};

/// What a queue may hold while the memory for answers is full: a client that reads keeps
/// taking its stream's messages; only one behind by more waits until it catches up.
pub const UNCOUNTED: usize = ANSWER_PIECE;

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
    /// Reported to the client's connection while the queue holds more than [`UNCOUNTED`]:
    /// registered the first time it does.
    progress: Option<Arc<AnswerProgress>>,
}

/// Where a queue counts what it holds, and whom it tells when its client stops taking it.
#[derive(Clone, Default)]
pub struct Watched {
    /// The memory for answers; `None` for the hub's own stream, whose messages are counted
    /// when they are fanned out.
    pub memory: Option<Arc<MemoryBudget>>,
    /// The client connection's answers, if it is watched for clients that take nothing.
    pub unread: Option<Arc<UnreadAnswers>>,
}

/// A new queue that counts as full once it holds `full_at` bytes of data, or more than
/// [`UNCOUNTED`] while `watched.memory` is full.
pub fn channel(full_at: usize, watched: Watched) -> (QueueSender, QueueReceiver) {
    let shared = Arc::new(Mutex::new(Shared {
        frames: VecDeque::new(),
        bytes: 0,
        body: None,
        task: None,
        sender_gone: false,
        receiver_gone: false,
        progress: None,
    }));
    (QueueSender { shared: Arc::clone(&shared), full_at, watched }, QueueReceiver { shared, full_at })
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // The queue's state stays consistent at every step, so a poisoned lock is still usable.
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The task's end of the queue.
pub struct QueueSender {
    shared: Arc<Mutex<Shared>>,
    full_at: usize,
    watched: Watched,
}

impl QueueSender {
    /// Queues a frame for the client; false if the client is gone. Data that waits behind
    /// [`UNCOUNTED`] bytes is counted in the memory for answers until its last copy is gone; a
    /// client that keeps up costs no count.
    pub fn push(&self, frame: Frame<Bytes>) -> bool {
        self.enqueue(frame, false)
    }

    /// Queues a frame whose data is counted already (a shared watch's message); false if the
    /// client is gone.
    pub fn push_counted(&self, frame: Frame<Bytes>) -> bool {
        self.enqueue(frame, true)
    }

    fn enqueue(&self, frame: Frame<Bytes>, counted: bool) -> bool {
        let mut shared = lock(&self.shared);
        if shared.receiver_gone {
            return false;
        }
        let before = shared.bytes;
        let length = frame.data_ref().map_or(0, Bytes::len);
        shared.bytes += length;
        let frame = match (&self.watched.memory, frame.into_data()) {
            (Some(memory), Ok(data)) if !counted && shared.bytes > UNCOUNTED => Frame::data(memory.counted(data)),
            (_, Ok(data)) => Frame::data(data),
            (_, Err(frame)) => frame,
        };
        shared.frames.push_back(frame);
        if before <= UNCOUNTED && shared.bytes > UNCOUNTED {
            self.client_behind(&mut shared);
        }
        if let Some(body) = shared.body.take() {
            body.wake();
        }
        true
    }

    /// The client has fallen behind by more than [`UNCOUNTED`]: from now, its connection is
    /// closed if it takes nothing for `--unread-response-timeout`.
    fn client_behind(&self, shared: &mut Shared) {
        if shared.progress.is_none() {
            shared.progress = self.watched.unread.as_ref().map(|unread| unread.register());
        }
        if let Some(progress) = &shared.progress {
            progress.waiting();
        }
    }

    /// Whether the client has fallen `full_at` bytes behind, or more than [`UNCOUNTED`] while
    /// the memory for answers is full.
    pub fn is_full(&self) -> bool {
        self.full(lock(&self.shared).bytes)
    }

    fn full(&self, bytes: usize) -> bool {
        bytes >= self.full_at || (bytes > UNCOUNTED && self.memory_full())
    }

    fn memory_full(&self) -> bool {
        self.watched.memory.as_ref().is_some_and(|memory| memory.is_full())
    }

    /// Whether the client is gone.
    pub fn is_closed(&self) -> bool {
        lock(&self.shared).receiver_gone
    }

    /// Ready once the queue holds at most half of `full_at` (and at most [`UNCOUNTED`] while
    /// the memory for answers is full), or the client is gone; otherwise the task is woken when
    /// that may have happened.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut shared = lock(&self.shared);
        if shared.receiver_gone
            || (shared.bytes <= self.full_at / 2 && (shared.bytes <= UNCOUNTED || !self.memory_full()))
        {
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
                let before = shared.bytes;
                shared.bytes -= frame.data_ref().map_or(0, Bytes::len);
                let half = self.full_at / 2;
                // Past half, or past what may wait while the memory is full: the task may go on.
                let drained = |mark: usize| before > mark && shared.bytes <= mark;
                if shared.bytes <= half && (drained(half) || drained(UNCOUNTED)) {
                    if let Some(task) = shared.task.take() {
                        task.wake();
                    }
                }
                if let Some(progress) = &shared.progress {
                    // The client took something: what is left waits from now, if anything.
                    match shared.bytes > UNCOUNTED {
                        true => progress.waiting(),
                        false if before > UNCOUNTED => progress.taken(),
                        false => {}
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
        shared.bytes = 0;
        if let Some(progress) = shared.progress.take() {
            progress.taken();
        }
        if let Some(task) = shared.task.take() {
            task.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::admission::MemoryKind;
    use std::future::poll_fn;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    fn data(n: usize) -> Frame<Bytes> {
        Frame::data(Bytes::from(vec![0; n]))
    }

    #[tokio::test]
    async fn full_at_the_mark_and_room_again_at_half() {
        let (sender, mut receiver) = channel(100, Watched::default());
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
        let (sender, receiver) = channel(10, Watched::default());
        assert!(sender.push(data(20)));
        let waiting = tokio::spawn(async move {
            sender.closed().await;
            sender.push(data(1))
        });
        tokio::task::yield_now().await;
        drop(receiver);
        assert!(!waiting.await.unwrap(), "frames for a client that is gone are refused");
    }

    #[tokio::test]
    async fn while_the_memory_is_full_a_queue_behind_by_more_than_uncounted_is_full() {
        let memory = MemoryBudget::new(UNCOUNTED * 4, MemoryKind::Responses);
        let watched = Watched { memory: Some(Arc::clone(&memory)), unread: None };
        let (sender, mut receiver) = channel(UNCOUNTED * 8, watched);
        let piece = UNCOUNTED / 2;
        assert!(sender.push(data(piece)) && sender.push(data(piece)));
        assert_eq!(memory.held(), 0, "a client that keeps up costs no count");
        assert!(sender.push(data(piece)) && sender.push_counted(data(piece)));
        assert_eq!(memory.held(), piece, "what waits behind UNCOUNTED is counted, unless it was already");
        let others = memory.try_hold(UNCOUNTED * 4 - piece).expect("the rest of the memory");
        assert!(memory.is_full() && sender.is_full(), "behind by more than UNCOUNTED while the memory is full");
        let waiting = tokio::spawn(async move {
            sender.room().await;
            sender
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // 128 KiB -> 96 KiB: still behind.
        assert!(poll_fn(|cx| receiver.poll_next(cx)).await.is_some());
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // Down to UNCOUNTED: the task goes on, though the memory is still full.
        assert!(poll_fn(|cx| receiver.poll_next(cx)).await.is_some());
        let sender = tokio::time::timeout(Duration::from_secs(1), waiting).await.expect("woken").unwrap();
        assert!(memory.is_full() && !sender.is_full());
        assert!(sender.push(data(piece)));
        assert!(sender.is_full());
        drop(others);
        assert!(!sender.is_full(), "with room again only full_at counts");
        drop(receiver);
        assert_eq!(memory.held(), 0, "a client gone takes nothing with it");
        assert!(!sender.push_counted(data(1)), "frames for a client that is gone are refused");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_of_what_it_is_behind_has_its_connection_closed() {
        let timeout = Duration::from_secs(5);
        let close = CancellationToken::new();
        let unread = UnreadAnswers::new(timeout, close.clone());
        let watched = Watched { memory: None, unread: Some(Arc::clone(&unread)) };
        let (sender, mut receiver) = channel(UNCOUNTED * 8, watched);
        // Behind by no more than UNCOUNTED: never closed.
        assert!(sender.push(data(UNCOUNTED)));
        tokio::time::sleep(timeout * 3).await;
        assert!(!close.is_cancelled());
        // Behind by more, but taking something within each timeout: not closed.
        for _ in 0..6 {
            assert!(sender.push(data(UNCOUNTED)));
            tokio::time::sleep(timeout - Duration::from_secs(1)).await;
            assert!(poll_fn(|cx| receiver.poll_next(cx)).await.is_some());
        }
        assert!(!close.is_cancelled(), "a client that takes something is not closed");
        // Caught up to UNCOUNTED, it stops waiting.
        assert!(poll_fn(|cx| receiver.poll_next(cx)).await.is_some());
        tokio::time::sleep(timeout * 3).await;
        assert!(!close.is_cancelled(), "closed for what it had caught up with");
        // Behind again and taking nothing: closed once the timeout has passed.
        let behind = tokio::time::Instant::now();
        assert!(sender.push(data(UNCOUNTED)) && sender.push(data(1)));
        close.cancelled().await;
        assert_eq!(behind.elapsed(), timeout);
        assert!(unread.is_stuck());
    }
}
