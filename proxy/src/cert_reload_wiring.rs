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
                let result = crate::tls::build_listener(&files, &legacy_counter).map(|built| {
                    listener.replace(built.config);
                    built.certs
                });
                Box::pin(async move { result.map_err(|error| error.to_string()) })
            }),
        });
    }
    if let Some(files) = config.upstream_tls.clone().filter(|_| upstream.tls_config().is_some()) {
        registry.publish(Side::Upstream, crate::tls::build_upstream(&files)?.certs);
        let pool = Arc::clone(upstream);
        let counts = Arc::clone(registry);
        sides.push(WatchedSide {
            side: Side::Upstream,
            paths: files.paths(),
            apply: Box::new(move || {
                let built = crate::tls::build_upstream(&files);
                let (pool, counts) = (Arc::clone(&pool), Arc::clone(&counts));
                Box::pin(async move {
                    let built = built.map_err(|error| error.to_string())?;
                    match pool.adopt_tls_config(built.config).await {
                        Ok(redials) => {
                            counts.count_redials(redials.redialled, redials.failed);
                            tracing::info!(
                                redialled = redials.redialled,
                                refused = redials.failed,
                                "upstream connections re-dialled with the reloaded TLS material; old ones drain"
                            );
                            Ok(built.certs)
                        }
                        Err((redials, refusals)) => {
                            counts.count_redials(redials.redialled, redials.failed);
                            Err(format!(
                                "every connected etcd member refused a connection with the new TLS material \
                                 (check that etcd trusts the new client certificate's CA and that --cacert \
                                 holds etcd's CA): {refusals}"
                            ))
                        }
                    }
                })
            }),
        });
    }
    crate::reload::spawn(sides, Arc::clone(registry), config.cert_reload_interval, stop);
    Ok(())
}
