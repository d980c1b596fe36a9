//! The cutover's write hold: while it is closed, calls that may change the cluster wait at the
//! proxy instead of reaching the old cluster, and the cutover waits for those already sent to
//! be answered. Writes pay two atomic operations when it is open; reads never pass here.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// The gate every call that may write passes.
#[derive(Default)]
pub struct WriteHold {
    closed: AtomicBool,
    /// Writes past the gate and not yet answered.
    in_flight: AtomicUsize,
    /// Wakes the writes waiting at the gate when it opens.
    opened: Notify,
    /// Wakes the cutover when the last write in flight is answered.
    drained: Notify,
}

/// A write past the gate; dropping it (the write was answered) counts it out.
pub struct WritePass<'a>(&'a WriteHold);

impl Drop for WritePass<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.drained.notify_waiters();
        }
    }
}

impl WriteHold {
    /// Lets a write through at once if the gate is open (the common case, with no future to
    /// hold); `None` when it must [`WriteHold::pass`] and wait.
    pub fn try_pass(&self) -> Option<WritePass<'_>> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        // Closed between the check and the count: the cutover may already have seen no write in
        // flight, so this one must wait like the others.
        if self.closed.load(Ordering::Acquire) {
            drop(WritePass(self));
            return None;
        }
        Some(WritePass(self))
    }

    /// Lets a write through, waiting while the gate is closed.
    pub async fn pass(&self) -> WritePass<'_> {
        loop {
            if let Some(pass) = self.try_pass() {
                return pass;
            }
            let opened = self.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                opened.await;
            }
        }
    }

    /// Closes the gate and waits up to `within` for the writes already past it to be answered;
    /// false if some were not.
    pub async fn close_and_drain(&self, within: Duration) -> bool {
        self.closed.store(true, Ordering::Release);
        let drained = async {
            loop {
                let notified = self.drained.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(within, drained).await.is_ok()
    }

    /// Opens the gate: the waiting writes go on, to whichever cluster serves by then.
    pub fn open(&self) {
        self.closed.store(false, Ordering::Release);
        self.opened.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::WriteHold;

    #[tokio::test(start_paused = true)]
    async fn writes_wait_while_closed_and_the_cutover_waits_for_writes_in_flight() {
        let hold = Arc::new(WriteHold::default());
        let in_flight = hold.pass().await;
        assert!(!hold.close_and_drain(Duration::from_millis(50)).await, "a write in flight keeps it from draining");
        let waiting = tokio::spawn({
            let hold = Arc::clone(&hold);
            async move {
                let _pass = hold.pass().await;
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiting.is_finished(), "a new write waits while the gate is closed");
        drop(in_flight);
        assert!(hold.close_and_drain(Duration::from_millis(50)).await);
        assert!(!waiting.is_finished());
        hold.open();
        waiting.await.expect("the held write goes on once the gate opens");
        assert!(hold.close_and_drain(Duration::ZERO).await, "nothing in flight");
    }
}
