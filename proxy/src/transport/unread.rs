//! Answers a client connection has not taken.
//!
//! Once an answer's body has handed a piece to the client's connection, the next piece waits
//! for the client's flow-control window, which only the client opens. A client that never opens
//! it (stuck, or hostile: it may still answer pings) would keep the answer, and whatever the
//! proxy holds for it, for as long as the connection lives. The proxy cannot end such a stream
//! on its own (the HTTP/2 server polls its body only when there is window), so the connection
//! is what is closed: each large or streamed answer, and each Watch or keep-alive stream whose
//! client is more than 64 KiB behind, reports here when it waits for the client, and a watch,
//! running only while the connection has such answers, cancels the connection's token once one
//! has waited too long.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The answers of one client connection that may wait for its window.
#[derive(Debug)]
pub struct UnreadAnswers {
    registry: Mutex<Registry>,
    timeout: Duration,
    /// Cancelled when an answer has waited longer than `timeout`.
    close: CancellationToken,
    stuck: AtomicBool,
    /// What its answers' times count from (the runtime's clock, which tests may pause).
    epoch: Instant,
}

#[derive(Debug, Default)]
struct Registry {
    answers: Vec<Weak<AnswerProgress>>,
    /// Whether the watch runs; it stops when no answer is left.
    watching: bool,
}

/// Whether one answer waits for its client, and since when; shared by the answer's body and its
/// connection's [`UnreadAnswers`].
#[derive(Debug)]
pub struct AnswerProgress {
    /// Milliseconds since `epoch`, plus one, since the body handed its last piece over; 0 while
    /// the body is being read or waits for etcd.
    waiting_since: AtomicU64,
    epoch: Instant,
}

impl AnswerProgress {
    /// The body handed a piece to the connection and has more: what follows waits for the client.
    pub fn waiting(&self) {
        self.waiting_since.store(millis_since(self.epoch), Relaxed);
    }

    /// The connection took the last piece and asks for more.
    pub fn taken(&self) {
        self.waiting_since.store(0, Relaxed);
    }

    /// See `waiting_since`: 0 unless the answer waits for its client.
    pub fn waiting_since(&self) -> u64 {
        self.waiting_since.load(Relaxed)
    }
}

impl UnreadAnswers {
    /// The answers of a connection that is closed through `close` once one of them has waited
    /// for the client longer than `timeout`.
    pub fn new(timeout: Duration, close: CancellationToken) -> Arc<UnreadAnswers> {
        let stuck = AtomicBool::new(false);
        Arc::new(UnreadAnswers { registry: Mutex::default(), timeout, close, stuck, epoch: Instant::now() })
    }

    /// Whether the connection is to be closed because an answer waited too long.
    pub fn is_stuck(&self) -> bool {
        self.stuck.load(Relaxed)
    }

    /// Registers an answer of this connection, forgotten once its body drops the result; starts
    /// the watch if it is not running. Needs a tokio runtime.
    pub fn register(self: &Arc<Self>) -> Arc<AnswerProgress> {
        let progress = Arc::new(AnswerProgress { waiting_since: AtomicU64::new(0), epoch: self.epoch });
        let mut registry = self.lock();
        registry.answers.retain(|answer| answer.strong_count() > 0);
        registry.answers.push(Arc::downgrade(&progress));
        if !registry.watching {
            registry.watching = true;
            tokio::spawn(Arc::clone(self).watch());
        }
        progress
    }

    /// Looks at the answers until none is left, or one has waited too long: then the
    /// connection is closed.
    async fn watch(self: Arc<Self>) {
        loop {
            let oldest = {
                let mut registry = self.lock();
                registry.answers.retain(|answer| answer.strong_count() > 0);
                if registry.answers.is_empty() {
                    registry.watching = false;
                    return;
                }
                registry
                    .answers
                    .iter()
                    .filter_map(Weak::upgrade)
                    .map(|answer| answer.waiting_since())
                    .filter(|since| *since > 0)
                    .min()
            };
            let Some(since) = oldest else {
                // None waits now, so none can have waited too long before a timeout from now:
                // a connection with long-lived streams is looked at once per timeout, not more.
                tokio::time::sleep(self.timeout).await;
                continue;
            };
            let waited = Duration::from_millis(millis_since(self.epoch).saturating_sub(since));
            if waited >= self.timeout {
                self.stuck.store(true, Relaxed);
                self.close.cancel();
                return;
            }
            tokio::time::sleep(self.timeout - waited).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Nothing can panic while it is held: a poisoned lock is usable.
        self.registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Milliseconds since `epoch`, plus one (0 means "not waiting").
fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_an_answer_waiting_for_its_client_too_long_closes_its_connection() {
        let close = CancellationToken::new();
        let timeout = Duration::from_secs(5);
        let unread = UnreadAnswers::new(timeout, close.clone());
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!close.is_cancelled(), "nothing registered: never stuck");

        // Read promptly, or waiting for etcd: not stuck.
        let answer = unread.register();
        for _ in 0..20 {
            answer.waiting();
            tokio::time::sleep(Duration::from_secs(4)).await;
            answer.taken();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        assert!(!close.is_cancelled(), "an answer taken within the timeout is not stuck");

        // A second answer the client never takes.
        let started = Instant::now();
        let stuck = unread.register();
        stuck.waiting();
        close.cancelled().await;
        let took = started.elapsed();
        assert!(
            took >= timeout && took <= timeout + Duration::from_millis(10),
            "closed after {took:?}, not as soon as the answer had waited the timeout"
        );
        assert!(unread.is_stuck());
        drop(answer);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watch_stops_with_the_last_answer_and_starts_with_the_next() {
        let close = CancellationToken::new();
        let unread = UnreadAnswers::new(Duration::from_secs(1), close.clone());
        let answer = unread.register();
        answer.waiting();
        drop(answer);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!close.is_cancelled(), "a dropped answer made the connection stuck");
        assert!(!unread.lock().watching, "the watch still runs without answers");
        assert!(unread.lock().answers.is_empty());

        let again = unread.register();
        again.waiting();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(close.is_cancelled(), "the watch did not start again");
    }
}
