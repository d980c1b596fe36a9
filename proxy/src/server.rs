//! The client-facing listener: accept, optional TLS, HTTP/2, and graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::auth::{AuthSessions, ClientInfo};
use crate::batched_writes::BatchedWrites;
use crate::config::Config;
use crate::forward::Forwarder;
use crate::legacy_authority::AuthorityRepair;
use crate::metrics::Metrics;
use crate::upstream::{Upstream, CONNECTION_WINDOW, STREAM_WINDOW};

/// How long a client may take to complete its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the proxy could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}; is another process using the port?")]
    Bind { addr: std::net::SocketAddr, what: &'static str, source: std::io::Error },
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Runs the proxy until `shutdown` resolves, then drains: stops accepting, ends streams with a
/// status, lets unary calls finish for up to `shutdown_grace`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    for ignored in &config.ignored_flags {
        tracing::warn!(flag = ignored.flag, why = ignored.why, "grpc-proxy flag accepted but has no effect");
    }
    let metrics = Arc::new(Metrics::default());
    let certificates = Arc::clone(&metrics.certificates);
    certificates.set_policy(config.cert_expiry);
    let listener_tls = match &config.listener_tls {
        Some(files) => {
            let built = crate::tls::build_listener(files, &certificates.legacy_counter())?;
            certificates.publish(crate::cert_status::Side::Listener, built.certs);
            Some(Arc::new(crate::reload::Reloadable::new(built.config)))
        }
        None => None,
    };
    let listener = TcpListener::bind(config.listen_addr).await.map_err(|source| RunError::Bind {
        addr: config.listen_addr,
        what: "--listen-addr",
        source,
    })?;
    let admin_listener = match config.metrics_addr {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| RunError::Bind {
            addr,
            what: "--metrics-addr",
            source,
        })?),
        None => None,
    };

    let stop = CancellationToken::new();
    let upstream = Upstream::new(&config)?;
    crate::cert_reload_wiring::start(&config, listener_tls.clone(), &upstream, &certificates, stop.clone())?;
    upstream.spawn_health_checks(config.health_interval, stop.clone());
    upstream.spawn_view_refresh(stop.clone());
    let auth = Arc::new(AuthSessions::new(config.auth.clone()));
    tokio::spawn(expire_idle_sessions(Arc::clone(&auth), stop.clone()));
    // The proxy's tokens live as long as the process: a restart makes clients authenticate again.
    let forwarder = Forwarder::new(
        Arc::clone(&upstream),
        Arc::clone(&metrics),
        config.budget.clone(),
        Arc::clone(&auth),
        stop.clone(),
    );
    if let Some(admin_listener) = admin_listener {
        let admin = Arc::new(Admin { upstream: Arc::clone(&upstream), metrics: Arc::clone(&metrics) });
        tokio::spawn(admin.serve(admin_listener, stop.clone()));
    }

    let http2 = http2_server(&config);
    let graceful = GracefulShutdown::new();
    tracing::info!(
        listen = %config.listen_addr,
        tls = listener_tls.is_some(),
        endpoints = ?config.endpoints.iter().map(|e| e.url()).collect::<Vec<_>>(),
        metrics = ?config.metrics_addr,
        "etcd-compat-proxy started"
    );

    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually EMFILE: back off instead of spinning; existing calls keep running.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let forwarder = Arc::clone(&forwarder);
        let http2 = http2.clone();
        let watcher = graceful.watcher();
        // Read per connection, so a reloaded certificate is used from the next handshake on.
        let tls = listener_tls.as_ref().map(|tls| tokio_rustls::TlsAcceptor::from(tls.current()));
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            // Auth sessions need to know who is calling: the address (to slow down password
            // guessing) and, for mTLS clients, the certificate's CN (to pick a configured identity).
            let service = |client: ClientInfo| {
                hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(client.clone());
                    Arc::clone(&forwarder).serve(request)
                })
            };
            let mut client = ClientInfo { addr: Some(peer.ip()), common_name: None };
            let result = match tls {
                None => {
                    let io = TokioIo::new(BatchedWrites(AuthorityRepair::new(stream, metrics)));
                    watcher.watch(http2.serve_connection(io, service(client))).await
                }
                Some(acceptor) => match tls_accept(&acceptor, stream).await {
                    Ok(tls_stream) => {
                        client.common_name = peer_common_name(&tls_stream);
                        let io = TokioIo::new(BatchedWrites(AuthorityRepair::new(tls_stream, metrics)));
                        watcher.watch(http2.serve_connection(io, service(client))).await
                    }
                    Err(error) => {
                        tracing::info!(%peer, %error, "client TLS handshake failed");
                        return;
                    }
                },
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "client connection ended with an error");
            }
        });
    }

    tracing::info!(grace = ?config.shutdown_grace, "shutting down: no new connections; ending streams, letting unary calls finish");
    drop(listener);
    stop.cancel();
    if tokio::time::timeout(config.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("calls still running after the shutdown grace period were cut");
    }
    Ok(())
}

/// The CN of the client certificate a TLS client presented, if any.
fn peer_common_name(stream: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<String> {
    let certificate = stream.get_ref().1.peer_certificates()?.first()?;
    etcd_compat_certs::inspect(certificate).ok()?.common_name
}

async fn tls_accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: TcpStream,
) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake took too long"))?
}

fn http2_server(config: &Config) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(1024 * 1024)
        .max_concurrent_streams(config.max_concurrent_streams)
        // etcd sends no Date header; adding one would make responses differ from direct ones.
        .auto_date_header(false)
        // Large responses leave as fast as the client reads them, not in 400 KiB steps.
        .max_send_buf_size(1024 * 1024);
    builder
}

/// Forgets idle proxy-token sessions once a minute.
async fn expire_idle_sessions(auth: Arc<AuthSessions>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => auth.expire_idle(),
        }
    }
}
