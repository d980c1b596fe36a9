//! Hot reload of TLS material: each side's files are polled (content, not timestamps, so atomic
//! renames and Kubernetes-style symlink swaps are seen like in-place writes), debounced, and
//! rebuilt into a new rustls config; SIGHUP reloads at once. New handshakes pick up the new
//! config; established connections keep the one they were made with. A replacement that does
//! not load is logged and counted, and the previous config stays in use.

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::status::{now_unix, CertRegistry, LoadedCert, Side};

/// How long files must stay unchanged before a change is loaded: tools write a certificate and
/// its key one after the other, and loading between the two would pair a new certificate with
/// the old key.
const SETTLE: Duration = Duration::from_millis(300);
/// How often expiry warnings are repeated while a certificate stays in its warning window.
const WARNING_REPEAT: Duration = Duration::from_secs(24 * 60 * 60);

/// A TLS config that can be replaced while handshakes read it.
pub struct Reloadable<C> {
    current: RwLock<Arc<C>>,
}

impl<C> Reloadable<C> {
    /// Starts with `config`.
    pub fn new(config: Arc<C>) -> Self {
        Reloadable { current: RwLock::new(config) }
    }

    /// The config new handshakes use.
    pub fn current(&self) -> Arc<C> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Makes `config` the one new handshakes use.
    pub fn replace(&self, config: Arc<C>) {
        match self.current.write() {
            Ok(mut current) => *current = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }
}

/// What reloading one side yields: the certificates now in use, or why the new material was refused.
pub type ApplyResult = Result<Vec<LoadedCert>, String>;
/// Rebuilds, checks and installs one side's config.
pub type Apply = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ApplyResult> + Send>> + Send + Sync>;

/// Lists the files a side is built from now (the upstream side's change at a migration's cutover).
pub type Paths = Box<dyn Fn() -> Vec<PathBuf> + Send + Sync>;

/// One side's files and how to reload them.
pub struct WatchedSide {
    /// Which side, for logs and metrics.
    pub side: Side,
    /// Every file the side is built from.
    pub paths: Paths,
    /// Rebuild, check and install.
    pub apply: Apply,
}

/// Starts the reload loop: polls every `interval`, reloads on SIGHUP, repeats expiry warnings
/// daily; stops when `stop` is cancelled. Also installs the SIGHUP handler when nothing is
/// watched, so SIGHUP never kills the proxy.
pub fn spawn(sides: Vec<WatchedSide>, registry: Arc<CertRegistry>, interval: Duration, stop: CancellationToken) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(error) => {
            tracing::warn!(%error, "cannot install the SIGHUP handler; certificate files are still polled");
            None
        }
    };
    let mut seen: Vec<u64> = sides.iter().map(|side| fingerprint(&(side.paths)())).collect();
    tokio::spawn(async move {
        registry.warn_expiring(now_unix(), None);
        let mut last_warning = Instant::now();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => false,
                _ = next_hangup(&mut hangup) => true,
            };
            if forced {
                tracing::info!(sides = sides.len(), "SIGHUP: reloading certificates");
            }
            for (side, last) in sides.iter().zip(seen.iter_mut()) {
                let paths = (side.paths)();
                if paths.is_empty() {
                    // A side without TLS (a plaintext upstream) has nothing to reload.
                    continue;
                }
                let now_seen = fingerprint(&paths);
                if !forced {
                    if now_seen == *last {
                        continue;
                    }
                    tokio::time::sleep(SETTLE).await;
                    if fingerprint(&(side.paths)()) != now_seen {
                        // Still being written; the next tick looks again.
                        continue;
                    }
                }
                // Remembered even when the load fails, so a broken file is reported once, not every tick.
                *last = now_seen;
                reload_side(side, &registry).await;
            }
            if last_warning.elapsed() >= WARNING_REPEAT {
                registry.warn_expiring(now_unix(), None);
                last_warning = Instant::now();
            }
        }
    });
}

async fn reload_side(side: &WatchedSide, registry: &CertRegistry) {
    let started = Instant::now();
    match (side.apply)().await {
        Ok(certs) => {
            for cert in &certs {
                tracing::info!(
                    side = side.side.label(),
                    role = cert.role,
                    file = %cert.path,
                    subject = %cert.subject,
                    expires = %cert.expiry_text(),
                    "certificate loaded"
                );
            }
            tracing::info!(side = side.side.label(), took = ?started.elapsed(), "TLS material reloaded; new connections use it");
            registry.publish(side.side, certs);
            registry.count_reload(side.side, "applied");
            registry.warn_expiring(now_unix(), Some(side.side));
        }
        Err(error) => {
            registry.count_reload(side.side, "rejected");
            tracing::error!(
                side = side.side.label(),
                %error,
                "new TLS material rejected; the previous certificates stay in use"
            );
        }
    }
}

async fn next_hangup(hangup: &mut Option<Signal>) {
    match hangup {
        Some(hangup) => {
            if hangup.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// A hash of every file's content (or of the read error), following symlinks.
fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for path in paths {
        path.hash(&mut hasher);
        match std::fs::read(path) {
            Ok(content) => content.hash(&mut hasher),
            Err(error) => error.kind().to_string().hash(&mut hasher),
        }
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::fingerprint;

    #[test]
    fn fingerprint_follows_symlink_swaps() {
        let dir = std::env::temp_dir().join(format!("ecp-reload-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), "one").unwrap();
        std::fs::write(dir.join("b"), "two").unwrap();
        let link = dir.join("current");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(dir.join("a"), &link).unwrap();
        let before = fingerprint(std::slice::from_ref(&link));
        std::os::unix::fs::symlink(dir.join("b"), dir.join("next")).unwrap();
        std::fs::rename(dir.join("next"), &link).unwrap();
        assert_ne!(fingerprint(std::slice::from_ref(&link)), before);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
