//! Slowing password guessing down, so that logins sent in parallel are no faster than logins
//! sent one after the other, and a flood of logins cannot tie up etcd.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failed logins from one address allowed before answers are delayed.
const FREE_LOGIN_FAILURES: u32 = 3;
/// Delay of the first login beyond the free ones; each further one doubles it.
const FIRST_LOGIN_DELAY: Duration = Duration::from_millis(100);
/// Failures older than this are forgotten.
const LOGIN_FAILURE_MEMORY: Duration = Duration::from_secs(300);
/// Authenticate calls checked by etcd at once, from all addresses together: each costs etcd a
/// bcrypt comparison, and a flood of them would slow every other request.
const MAX_CONCURRENT_LOGINS: usize = 16;

/// Slows password guessing down: after [`FREE_LOGIN_FAILURES`] failures from an address, its
/// logins are answered one at a time, each after a delay that doubles from
/// [`FIRST_LOGIN_DELAY`] up to `--max-login-delay`. Logins still being checked count as failures
/// when a new one takes its place in line, so thirty guesses sent at once wait as long as thirty
/// sent one after the other. Across all addresses, at most [`MAX_CONCURRENT_LOGINS`] are checked
/// by etcd at a time.
pub(super) struct LoginThrottle {
    by_addr: Mutex<HashMap<IpAddr, AddrLogins>>,
    etcd_checks: tokio::sync::Semaphore,
    max_delay: Duration,
}

/// One address's recent logins.
struct AddrLogins {
    failures: u32,
    last_failure: Instant,
    /// Logins admitted and not finished yet.
    in_flight: u32,
    /// Held by the login whose turn it is, once the address has to wait.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl LoginThrottle {
    pub(super) fn new(max_delay: Duration) -> Self {
        LoginThrottle {
            by_addr: Mutex::new(HashMap::new()),
            etcd_checks: tokio::sync::Semaphore::new(MAX_CONCURRENT_LOGINS),
            max_delay,
        }
    }

    /// The delay of the login at `position` among an address's failed or running logins.
    fn delay(&self, position: u32) -> Duration {
        match position.checked_sub(FREE_LOGIN_FAILURES) {
            None => Duration::ZERO,
            Some(doublings) => (FIRST_LOGIN_DELAY * (1 << doublings.min(16))).min(self.max_delay),
        }
    }

    pub(super) async fn admit(&self, addr: Option<IpAddr>) -> LoginTurn<'_> {
        // Where the address stands, counting logins not yet finished as failures.
        let ticket = addr.and_then(|addr| {
            let mut logins = self.by_addr.lock().ok()?;
            let entry = logins.entry(addr).or_insert_with(|| AddrLogins {
                failures: 0,
                last_failure: Instant::now(),
                in_flight: 0,
                turn: Arc::new(tokio::sync::Mutex::new(())),
            });
            if entry.last_failure.elapsed() >= LOGIN_FAILURE_MEMORY {
                entry.failures = 0;
            }
            let position = entry.failures + entry.in_flight;
            entry.in_flight += 1;
            Some((position, Arc::clone(&entry.turn)))
        });
        let mut turn = LoginTurn { throttle: self, addr, _line: None, _check: None, finished: false };
        if let Some((position, line)) = ticket {
            let delay = self.delay(position);
            if !delay.is_zero() {
                // One at a time, in arrival order (tokio's mutex is fair), each after its delay.
                turn._line = Some(line.lock_owned().await);
                tokio::time::sleep(delay).await;
            }
        }
        turn._check = self.etcd_checks.acquire().await.ok();
        turn
    }

    fn finish(&self, addr: IpAddr, succeeded: bool) {
        let Ok(mut logins) = self.by_addr.lock() else { return };
        let Some(entry) = logins.get_mut(&addr) else { return };
        entry.in_flight = entry.in_flight.saturating_sub(1);
        match succeeded {
            true => entry.failures = 0,
            false => {
                entry.failures = entry.failures.saturating_add(1);
                entry.last_failure = Instant::now();
            }
        }
    }

    pub(super) fn forget_old(&self) {
        if let Ok(mut logins) = self.by_addr.lock() {
            logins.retain(|_, entry| entry.in_flight > 0 || entry.last_failure.elapsed() < LOGIN_FAILURE_MEMORY);
        }
    }
}

/// A login's turn to be checked by etcd; say how it went with [`LoginTurn::finish`]. Dropped
/// unfinished (the client went away), it counts as neither success nor failure.
pub struct LoginTurn<'a> {
    throttle: &'a LoginThrottle,
    addr: Option<IpAddr>,
    _line: Option<tokio::sync::OwnedMutexGuard<()>>,
    _check: Option<tokio::sync::SemaphorePermit<'a>>,
    finished: bool,
}

impl LoginTurn<'_> {
    /// Records whether etcd accepted the credentials; `None` when etcd did not judge them
    /// (unavailable, or another error), which counts as neither.
    pub fn finish(mut self, accepted: Option<bool>) {
        self.finished = true;
        if let Some(addr) = self.addr {
            match accepted {
                Some(accepted) => self.throttle.finish(addr, accepted),
                None => self.throttle.release(addr),
            }
        }
    }
}

impl Drop for LoginTurn<'_> {
    fn drop(&mut self) {
        if let (false, Some(addr)) = (self.finished, self.addr) {
            self.throttle.release(addr);
        }
    }
}

impl LoginThrottle {
    /// A login that ended without a verdict on its credentials.
    fn release(&self, addr: IpAddr) {
        if let Ok(mut logins) = self.by_addr.lock() {
            if let Some(entry) = logins.get_mut(&addr) {
                entry.in_flight = entry.in_flight.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AuthConfig, AuthSessions};

    #[tokio::test(start_paused = true)]
    async fn failed_logins_slow_down() {
        let sessions =
            AuthSessions::new(AuthConfig { max_login_delay: Duration::from_secs(5), ..AuthConfig::default() }).unwrap();
        let addr = Some(IpAddr::from([127, 0, 0, 9]));
        let mut delays = Vec::new();
        for _ in 0..FREE_LOGIN_FAILURES + 2 {
            let started = tokio::time::Instant::now();
            let turn = sessions.admit_login(addr).await;
            delays.push(started.elapsed().as_millis());
            turn.finish(Some(false));
        }
        assert_eq!(delays, vec![0, 0, 0, 100, 200]);
        sessions.admit_login(addr).await.finish(Some(true));
        let started = tokio::time::Instant::now();
        sessions.admit_login(addr).await.finish(Some(false));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn parallel_logins_wait_as_long_as_serial_ones() {
        let sessions = Arc::new(
            AuthSessions::new(AuthConfig { max_login_delay: Duration::from_millis(200), ..AuthConfig::default() })
                .unwrap(),
        );
        let addr = Some(IpAddr::from([127, 0, 0, 9]));
        let started = tokio::time::Instant::now();
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let sessions = Arc::clone(&sessions);
                tokio::spawn(async move { sessions.admit_login(addr).await.finish(Some(false)) })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        // Positions 3..9 wait 100 ms, then 200 ms each (capped), one after the other.
        assert_eq!(started.elapsed(), Duration::from_millis(100 + 6 * 200));
    }

    #[tokio::test]
    async fn abandoned_logins_count_as_nothing() {
        let sessions =
            AuthSessions::new(AuthConfig { max_login_delay: Duration::from_secs(5), ..AuthConfig::default() }).unwrap();
        let addr = Some(IpAddr::from([127, 0, 0, 9]));
        for _ in 0..10 {
            drop(sessions.admit_login(addr).await);
        }
        let started = std::time::Instant::now();
        sessions.admit_login(addr).await.finish(None);
        assert!(started.elapsed() < Duration::from_millis(50));
    }
}
