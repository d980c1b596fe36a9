//! What a listener does when `accept` fails: back off instead of spinning, and say so in the log
//! without flooding it.
//!
//! The usual cause is EMFILE (the process is out of file descriptors): retrying at once fails
//! again at once, burning a core and writing millions of identical lines, while the calls already
//! running are what will free descriptors. Existing connections are never touched here.

use std::time::{Duration, Instant};

/// Pause after the first failure; doubled after each further one in a row.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// Longest pause between attempts.
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// At most one log line per listener this often; the line counts the failures in between.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Accept failures of one listener in a row.
pub struct AcceptBackoff {
    /// Which listener, for the log line (`--listen-addr`, `--metrics-addr`).
    listener: &'static str,
    pause: Duration,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptBackoff {
    /// No failures yet for `listener`.
    pub fn new(listener: &'static str) -> Self {
        AcceptBackoff { listener, pause: FIRST_PAUSE, last_logged: None, unlogged: 0 }
    }

    /// After a successful accept: the next failure starts the backoff afresh.
    pub fn succeeded(&mut self) {
        self.pause = FIRST_PAUSE;
    }

    /// After a failed accept: logs (rate-limited) and waits before the next attempt.
    pub async fn failed(&mut self, error: &std::io::Error) {
        self.unlogged += 1;
        if self.last_logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            tracing::warn!(
                listener = self.listener,
                %error,
                failures = self.unlogged,
                retry_in = ?self.pause,
                "cannot accept client connections (out of file descriptors? raise the limit with ulimit -n or LimitNOFILE); calls already running continue"
            );
            self.last_logged = Some(Instant::now());
            self.unlogged = 0;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pauses_double_up_to_a_second_and_reset_on_success() {
        let mut backoff = AcceptBackoff::new("--listen-addr");
        let error = std::io::Error::from_raw_os_error(24);
        let mut pauses = Vec::new();
        for _ in 0..10 {
            let started = tokio::time::Instant::now();
            backoff.failed(&error).await;
            pauses.push(started.elapsed().as_millis());
        }
        assert_eq!(pauses, vec![5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.succeeded();
        let started = tokio::time::Instant::now();
        backoff.failed(&error).await;
        assert_eq!(started.elapsed().as_millis(), 5);
        assert_eq!(backoff.unlogged, 10, "one line for the first failure, the rest counted for the next");
    }
}
