//! A counted, unbounded, single-reader queue between two tasks of the proxy: items in order, and
//! the bytes waiting known to the writers, so that a writer can hold back (or be told it is
//! behind) instead of the queue bounding itself.
//!
//! Why not tokio's mpsc: a fleet holds one or two of these per client watch, and an unbounded
//! mpsc costs about 1 KiB before its first item (cache-padded halves and a 32-slot block). This
//! one is a lock, a queue that grows with what is in it, and two wakers, about 100 bytes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// A new mailbox: its writing and its reading end.
pub fn mailbox<T>() -> (MailboxSender<T>, MailboxReceiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::new(), reader: None, writer: None, senders: 1, reading: true }),
        queued: AtomicUsize::new(0),
        paused: AtomicBool::new(false),
    });
    (MailboxSender { shared: Arc::clone(&shared) }, MailboxReceiver { shared })
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Weight of the items sent and not yet taken.
    queued: AtomicUsize,
    /// The reader said it takes nothing for now (see [`MailboxReceiver::pause`]).
    paused: AtomicBool,
}

struct State<T> {
    /// Each item with the weight it was sent with.
    items: VecDeque<(T, usize)>,
    /// The reader waiting for an item.
    reader: Option<Waker>,
    /// A writer waiting for the queue to get lighter.
    writer: Option<Waker>,
    /// Live senders; the reader sees the end once there are none and the queue is empty.
    senders: usize,
    /// False once the reader is gone: items are then refused.
    reading: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // No code holding the lock can panic halfway through a change: a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The writing end of a [`mailbox`]; clones write into the same queue.
pub struct MailboxSender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> MailboxSender<T> {
    /// Queues `item`, counted as `weight` until it is taken; false (and dropped) if the reader
    /// is gone.
    pub fn send(&self, item: T, weight: usize) -> bool {
        let reader = {
            let mut state = self.shared.lock();
            if !state.reading {
                return false;
            }
            state.items.push_back((item, weight));
            self.shared.queued.fetch_add(weight, Relaxed);
            state.reader.take()
        };
        if let Some(reader) = reader {
            reader.wake();
        }
        true
    }

    /// Weight sent and not yet taken.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Relaxed)
    }

    /// Whether the reader has paused and not asked for an item since.
    pub fn is_reader_paused(&self) -> bool {
        self.shared.paused.load(Relaxed)
    }

    /// Ready while less than `limit` waits, or the reader is gone; otherwise the writer is woken
    /// when the reader takes something.
    pub fn poll_room(&self, cx: &mut Context<'_>, limit: usize) -> Poll<()> {
        if self.queued() < limit {
            return Poll::Ready(());
        }
        let mut state = self.shared.lock();
        if self.queued() < limit || !state.reading {
            return Poll::Ready(());
        }
        state.writer = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<T> Clone for MailboxSender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        MailboxSender { shared: Arc::clone(&self.shared) }
    }
}

impl<T> Drop for MailboxSender<T> {
    fn drop(&mut self) {
        let reader = {
            let mut state = self.shared.lock();
            state.senders -= 1;
            if state.senders > 0 {
                return;
            }
            state.reader.take()
        };
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

/// The reading end of a [`mailbox`].
pub struct MailboxReceiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> MailboxReceiver<T> {
    /// Tells the senders the reader takes nothing for now, until it next asks for an item.
    pub fn pause(&self) {
        self.shared.paused.store(true, Relaxed);
    }

    /// The next item; `None` once every sender is gone and nothing is left.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.shared.paused.store(false, Relaxed);
        let (item, writer) = {
            let mut state = self.shared.lock();
            match state.items.pop_front() {
                Some((item, weight)) => {
                    self.shared.queued.fetch_sub(weight, Relaxed);
                    if state.items.is_empty() && state.items.capacity() > SHRINK_ABOVE {
                        // A burst's queue is not kept for the rest of a long-lived stream.
                        state.items = VecDeque::new();
                    }
                    (item, state.writer.take())
                }
                None if state.senders == 0 => return Poll::Ready(None),
                None => {
                    state.reader = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        };
        if let Some(writer) = writer {
            writer.wake();
        }
        Poll::Ready(Some(item))
    }
}

impl<T> Drop for MailboxReceiver<T> {
    fn drop(&mut self) {
        let (items, writer) = {
            let mut state = self.shared.lock();
            state.reading = false;
            self.shared.queued.store(0, Relaxed);
            (std::mem::take(&mut state.items), state.writer.take())
        };
        // Dropped outside the lock: an item's own drop may take other locks.
        drop(items);
        if let Some(writer) = writer {
            writer.wake();
        }
    }
}

/// Queue capacity kept once the queue is empty again.
const SHRINK_ABOVE: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    fn context() -> (Arc<CountingWaker>, Waker) {
        let counter = Arc::new(CountingWaker::default());
        (Arc::clone(&counter), Waker::from(counter))
    }

    #[test]
    fn items_arrive_in_order_with_their_weight_counted_until_taken() {
        let (sender, mut receiver) = mailbox();
        let (woken, waker) = context();
        let mut cx = Context::from_waker(&waker);
        assert!(receiver.poll_next(&mut cx).is_pending());
        assert!(sender.send("a", 3));
        assert_eq!(woken.0.load(Relaxed), 1);
        assert!(sender.send("b", 4));
        assert_eq!(sender.queued(), 7);
        assert_eq!(receiver.poll_next(&mut cx), Poll::Ready(Some("a")));
        assert_eq!(sender.queued(), 4);
        assert_eq!(receiver.poll_next(&mut cx), Poll::Ready(Some("b")));
        assert_eq!(sender.queued(), 0);
    }

    #[test]
    fn the_end_comes_after_the_last_sender_and_the_last_item() {
        let (sender, mut receiver) = mailbox();
        let (woken, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let second = sender.clone();
        sender.send(1, 0);
        drop(sender);
        assert_eq!(receiver.poll_next(&mut cx), Poll::Ready(Some(1)));
        assert!(receiver.poll_next(&mut cx).is_pending());
        drop(second);
        assert_eq!(woken.0.load(Relaxed), 1);
        assert_eq!(receiver.poll_next(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn a_writer_waits_for_room_and_is_woken_when_an_item_is_taken() {
        let (sender, mut receiver) = mailbox();
        let (woken, waker) = context();
        let mut cx = Context::from_waker(&waker);
        sender.send((), 10);
        assert!(sender.poll_room(&mut cx, 11).is_ready());
        assert!(sender.poll_room(&mut cx, 10).is_pending());
        assert_eq!(receiver.poll_next(&mut cx), Poll::Ready(Some(())));
        assert_eq!(woken.0.load(Relaxed), 1);
        assert!(sender.poll_room(&mut cx, 10).is_ready());
    }

    #[test]
    fn without_a_reader_items_are_refused_and_writers_never_wait() {
        let (sender, receiver) = mailbox();
        let (woken, waker) = context();
        let mut cx = Context::from_waker(&waker);
        sender.send(1, 100);
        assert!(sender.poll_room(&mut cx, 50).is_pending());
        drop(receiver);
        assert_eq!(woken.0.load(Relaxed), 1);
        assert!(!sender.send(2, 1));
        assert_eq!(sender.queued(), 0);
        assert!(sender.poll_room(&mut cx, 50).is_ready());
    }
}
