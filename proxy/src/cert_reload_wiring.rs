//! Connects the certificate reloader to the listener and the upstream pool at startup.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cert_status::{CertRegistry, Side};
use crate::config::Config;
use crate::reload::{Reloadable, WatchedSide};
use crate::tls::TlsError;
use crate::upstream::Upstream;

/// Publishes the upstream certificates and starts watching both sides' files (and SIGHUP).
pub fn start(
    config: &Config,
    listener: Option<Arc<Reloadable<rustls::ServerConfig>>>,
    upstream: &Arc<Upstream>,
    registry: &Arc<CertRegistry>,
    stop: CancellationToken,
) -> Result<(), TlsError> {
    let mut sides = Vec::new();
    if let (Some(files), Some(listener)) = (config.listener_tls.clone(), listener) {
        let legacy_counter = registry.legacy_counter();
        sides.push(WatchedSide {
            side: Side::Listener,
            paths: files.paths(),
            apply: Box::new(move || {
                let built = crate::tls::build_listener(&files, &legacy_counter)?;
                listener.replace(built.config);
                Ok(built.certs)
            }),
            after_apply: None,
        });
    }
    if let (Some(files), Some(tls)) = (config.upstream_tls.clone(), upstream.tls_config()) {
        registry.publish(Side::Upstream, crate::tls::build_upstream(&files)?.certs);
        let pool = Arc::clone(upstream);
        let counts = Arc::clone(registry);
        sides.push(WatchedSide {
            side: Side::Upstream,
            paths: files.paths(),
            apply: Box::new(move || {
                let built = crate::tls::build_upstream(&files)?;
                tls.replace(built.config);
                Ok(built.certs)
            }),
            after_apply: Some(Box::new(move || {
                let pool = Arc::clone(&pool);
                let counts = Arc::clone(&counts);
                tokio::spawn(async move {
                    let (redialled, failed) = pool.redial_all().await;
                    counts.count_redials(redialled, failed);
                    tracing::info!(redialled, failed, "upstream connections re-dialled with the reloaded TLS material");
                });
            })),
        });
    }
    crate::reload::spawn(sides, Arc::clone(registry), config.cert_reload_interval, stop);
    Ok(())
}
